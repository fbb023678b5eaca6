//! Owner statements: what one vehicle did and earned in a period, and what
//! was clawed back from it and why, with a CSV export.
//!
//! A statement joins the coordinator's usage segments that ran on the vehicle
//! with the transfers that paid for them (matched by request id, segment and
//! kind), so every earning on it is a committed ledger transfer. Likewise
//! each clawback line is a clawback order of the vehicle's joined with the
//! reversals posted for it (`crate::clawback`). A clawback is shown in the
//! period it was ordered in (its reversals carry that time), which may be
//! later than the period of the segment it takes back. A check the vehicle
//! carried out on another's answer is a line of its own, joined with the
//! transfers the platform paid it with (`crate::verification`).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

use crate::core::{
    DurationMs, MicroUsd, MicroWh, NodeId, OwnerId, RequestId, Segment, TimestampMs, TokenCount,
    Transfer, TransferKind,
};
use crate::metering::{Server, UsageSegment};
use crate::verification::CheckWork;

/// A half-open period `[from, until)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub from: TimestampMs,
    pub until: TimestampMs,
}

impl Period {
    pub fn contains(&self, at: TimestampMs) -> bool {
        self.from <= at && at < self.until
    }
}

/// One segment the vehicle ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementLine {
    pub request_id: RequestId,
    pub segment: Segment,
    pub owner: OwnerId,
    pub started_at: TimestampMs,
    pub prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
    pub compute: DurationMs,
    pub energy: MicroWh,
    pub revenue_share: MicroUsd,
    pub energy_reimbursement: MicroUsd,
}

/// A clawback order of the vehicle's for one segment it served, or for one
/// check it made, as the store keeps it: which segment or check, whose, why
/// and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClawbackRecord {
    /// The request, or for a check the check's id (segment 0).
    pub request_id: RequestId,
    pub segment: Segment,
    pub owner: OwnerId,
    pub reason: String,
    /// When the clawback was ordered; its reversals carry this time.
    pub at: TimestampMs,
    /// Whether it takes back a check's pay and energy (else a segment's
    /// revenue share and energy reimbursement).
    pub of_check: bool,
}

impl ClawbackRecord {
    /// The kinds of its two reversals: of the pay, of the energy.
    pub fn reversal_kinds(&self) -> [TransferKind; 2] {
        match self.of_check {
            true => [
                TransferKind::VerificationPayClawback,
                TransferKind::VerificationEnergyClawback,
            ],
            false => [TransferKind::RevenueClawback, TransferKind::EnergyClawback],
        }
    }
}

/// What was taken back for one segment the vehicle served, or one check it
/// made, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClawbackLine {
    /// The request, or the check.
    pub request_id: RequestId,
    pub segment: Segment,
    pub owner: OwnerId,
    pub at: TimestampMs,
    pub reason: String,
    /// The segment's revenue share (a check's pay), taken back.
    pub revenue_share: MicroUsd,
    /// The segment's (the check's) energy reimbursement, taken back.
    pub energy_reimbursement: MicroUsd,
}

impl ClawbackLine {
    pub fn total(&self) -> MicroUsd {
        MicroUsd(self.revenue_share.0 + self.energy_reimbursement.0)
    }
}

/// A check the vehicle carried out on another vehicle's answer, and what
/// the platform paid its owner for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationLine {
    pub check: RequestId,
    pub owner: OwnerId,
    pub at: TimestampMs,
    /// Tokens prefilled: the prompt and the answer checked.
    pub tokens: TokenCount,
    pub compute: DurationMs,
    pub energy: MicroWh,
    pub pay: MicroUsd,
    pub energy_reimbursement: MicroUsd,
}

impl VerificationLine {
    pub fn total(&self) -> MicroUsd {
        MicroUsd(self.pay.0 + self.energy_reimbursement.0)
    }
}

/// Totals of a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatementTotals {
    /// Distinct requests the vehicle worked on.
    pub requests: u64,
    pub prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
    pub compute: DurationMs,
    pub energy: MicroWh,
    pub revenue_share: MicroUsd,
    pub energy_reimbursement: MicroUsd,
    /// Checks carried out on others' answers, and their usage and pay (the
    /// usage totals above are the generations' only).
    pub checks: u64,
    pub check_tokens: TokenCount,
    pub check_compute: DurationMs,
    pub check_energy: MicroWh,
    pub verification_pay: MicroUsd,
    pub verification_energy: MicroUsd,
    /// What the lines earned: revenue share plus energy reimbursement, and
    /// what checks earned, before clawbacks.
    pub earnings: MicroUsd,
    /// What the clawback lines took back.
    pub clawed_back: MicroUsd,
    /// `earnings` less `clawed_back`.
    pub net_earnings: MicroUsd,
}

/// A vehicle's statement for a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub node: NodeId,
    pub period: Period,
    /// Ordered by start time, then request and segment.
    pub lines: Vec<StatementLine>,
    /// Ordered by the time of the clawback, then request and segment.
    pub clawbacks: Vec<ClawbackLine>,
    /// Ordered by time, then check.
    pub verifications: Vec<VerificationLine>,
    pub totals: StatementTotals,
}

/// Builds a statement from usage segments, clawback orders, checks paid and
/// transfers; all may contain records of other vehicles and periods, which
/// are left out. A clawback order whose segment had nothing reversed (its
/// amounts were zero) makes no line.
pub fn build(
    node: &NodeId,
    period: Period,
    usage: &[UsageSegment],
    clawbacks: &[ClawbackRecord],
    checks: &[CheckWork],
    transfers: &[Transfer],
) -> Statement {
    let mut paid: HashMap<(&RequestId, Segment, TransferKind), MicroUsd> = HashMap::new();
    for transfer in transfers {
        paid.insert(
            (transfer.request_id(), transfer.segment(), transfer.kind()),
            transfer.amount(),
        );
    }
    let amount = |request_id: &RequestId, segment: Segment, kind| {
        paid.get(&(request_id, segment, kind))
            .copied()
            .unwrap_or(MicroUsd::ZERO)
    };
    let lines = earning_lines(node, period, usage, &amount);
    let clawbacks = clawback_lines(period, clawbacks, &amount);
    let verifications = verification_lines(node, period, checks, &amount);
    let totals = totals(&lines, &clawbacks, &verifications);
    Statement {
        node: node.clone(),
        period,
        lines,
        clawbacks,
        verifications,
        totals,
    }
}

/// The amount of the transfer of a kind for a (request, segment), or zero.
type AmountOf<'a> = dyn Fn(&RequestId, Segment, TransferKind) -> MicroUsd + 'a;

fn earning_lines(
    node: &NodeId,
    period: Period,
    usage: &[UsageSegment],
    amount: &AmountOf<'_>,
) -> Vec<StatementLine> {
    let amount = |segment: &UsageSegment, kind| amount(&segment.request_id, segment.segment, kind);
    let mut lines: Vec<StatementLine> = usage
        .iter()
        .filter(|segment| period.contains(segment.started_at))
        .filter_map(|segment| match &segment.server {
            Server::Node {
                node: ran_on,
                owner,
                energy,
                ..
            } if ran_on == node => Some(StatementLine {
                request_id: segment.request_id.clone(),
                segment: segment.segment,
                owner: owner.clone(),
                started_at: segment.started_at,
                prompt_tokens: segment.prompt_tokens,
                completion_tokens: segment.completion_tokens,
                compute: segment.compute,
                energy: *energy,
                revenue_share: amount(segment, TransferKind::RevenueShare),
                energy_reimbursement: amount(segment, TransferKind::EnergyReimbursement),
            }),
            _ => None,
        })
        .collect();
    lines.sort_by(|a, b| {
        (a.started_at, &a.request_id, a.segment).cmp(&(b.started_at, &b.request_id, b.segment))
    });
    lines
}

fn clawback_lines(
    period: Period,
    clawbacks: &[ClawbackRecord],
    amount: &AmountOf<'_>,
) -> Vec<ClawbackLine> {
    let mut lines: Vec<ClawbackLine> = clawbacks
        .iter()
        .filter(|record| period.contains(record.at))
        .map(|record| {
            let [pay, energy] = record.reversal_kinds();
            ClawbackLine {
                request_id: record.request_id.clone(),
                segment: record.segment,
                owner: record.owner.clone(),
                at: record.at,
                reason: record.reason.clone(),
                revenue_share: amount(&record.request_id, record.segment, pay),
                energy_reimbursement: amount(&record.request_id, record.segment, energy),
            }
        })
        .filter(|line| line.total().is_positive())
        .collect();
    lines.sort_by(|a, b| (a.at, &a.request_id, a.segment).cmp(&(b.at, &b.request_id, b.segment)));
    lines
}

fn verification_lines(
    node: &NodeId,
    period: Period,
    checks: &[CheckWork],
    amount: &AmountOf<'_>,
) -> Vec<VerificationLine> {
    let mut lines: Vec<VerificationLine> = checks
        .iter()
        .filter(|check| &check.node == node && period.contains(check.at))
        .map(|check| VerificationLine {
            check: check.check.clone(),
            owner: check.owner.clone(),
            at: check.at,
            tokens: check.tokens,
            compute: check.compute,
            energy: check.energy,
            pay: amount(&check.check, Segment(0), TransferKind::VerificationPay),
            energy_reimbursement: amount(
                &check.check,
                Segment(0),
                TransferKind::VerificationEnergy,
            ),
        })
        .collect();
    lines.sort_by(|a, b| (a.at, &a.check).cmp(&(b.at, &b.check)));
    lines
}

fn totals(
    lines: &[StatementLine],
    clawbacks: &[ClawbackLine],
    verifications: &[VerificationLine],
) -> StatementTotals {
    let mut totals = StatementTotals::default();
    let requests: BTreeSet<&RequestId> = lines.iter().map(|line| &line.request_id).collect();
    totals.requests = requests.len() as u64;
    for line in lines {
        totals.prompt_tokens.0 += line.prompt_tokens.0;
        totals.completion_tokens.0 += line.completion_tokens.0;
        totals.compute.0 += line.compute.0;
        totals.energy.0 += line.energy.0;
        totals.revenue_share.0 += line.revenue_share.0;
        totals.energy_reimbursement.0 += line.energy_reimbursement.0;
    }
    totals.checks = verifications.len() as u64;
    for line in verifications {
        totals.check_tokens.0 += line.tokens.0;
        totals.check_compute.0 += line.compute.0;
        totals.check_energy.0 += line.energy.0;
        totals.verification_pay.0 += line.pay.0;
        totals.verification_energy.0 += line.energy_reimbursement.0;
    }
    totals.earnings = MicroUsd(
        totals.revenue_share.0
            + totals.energy_reimbursement.0
            + totals.verification_pay.0
            + totals.verification_energy.0,
    );
    totals.clawed_back = MicroUsd(clawbacks.iter().map(|line| line.total().0).sum());
    totals.net_earnings = MicroUsd(totals.earnings.0 - totals.clawed_back.0);
    totals
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

const LINES_HEADER: &str = "request_id,segment,owner,started_at_ms,prompt_tokens,\
completion_tokens,compute_hours,energy_kwh,revenue_share_usd,energy_reimbursement_usd,earnings_usd,\
clawback_reason";

const SUMMARY_HEADER: &str = "node,from_ms,until_ms,requests,prompt_tokens,completion_tokens,\
compute_hours,energy_kwh,revenue_share_usd,energy_reimbursement_usd,checks,verification_usd,\
earnings_usd,clawed_back_usd,net_earnings_usd";

impl Statement {
    /// One row per segment, one row per clawback, one per check and a final
    /// `total` row. A check row has the check's name in `request_id`, its
    /// time in `started_at_ms`, the tokens it prefilled as prompt tokens,
    /// its pay as revenue share and its energy's reimbursement as such.
    /// A clawback row has the clawback's time in `started_at_ms`, no usage,
    /// the amounts taken back as negative amounts and its reason in
    /// `clawback_reason` (empty on other rows); the `total` row sums every
    /// row above it, so its earnings are the net earnings. Ids are
    /// restricted to characters that need no CSV quoting (see `core::ids`);
    /// a reason is quoted when it needs it.
    pub fn write_csv(&self, out: &mut impl Write) -> io::Result<()> {
        self.write_csv_named(out, &|owner: &OwnerId| owner.to_string())
    }

    /// Like `write_csv`, with each line's owner shown as `owner_name` names
    /// it (the ledger keys owners by ids, people know them by names). A name
    /// that needs it is quoted.
    pub fn write_csv_named(
        &self,
        out: &mut impl Write,
        owner_name: &dyn Fn(&OwnerId) -> String,
    ) -> io::Result<()> {
        writeln!(out, "{LINES_HEADER}")?;
        for line in &self.lines {
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},",
                line.request_id,
                line.segment,
                csv_field(&owner_name(&line.owner)),
                line.started_at.0,
                line.prompt_tokens,
                line.completion_tokens,
                line.compute.hours_string(),
                line.energy.kwh_string(),
                line.revenue_share,
                line.energy_reimbursement,
                MicroUsd(line.revenue_share.0 + line.energy_reimbursement.0),
            )?;
        }
        for line in &self.clawbacks {
            writeln!(
                out,
                "{},{},{},{},,,,,{},{},{},{}",
                line.request_id,
                line.segment,
                csv_field(&owner_name(&line.owner)),
                line.at.0,
                MicroUsd(-line.revenue_share.0),
                MicroUsd(-line.energy_reimbursement.0),
                MicroUsd(-line.total().0),
                csv_field(&line.reason),
            )?;
        }
        for line in &self.verifications {
            writeln!(
                out,
                "{},0,{},{},{},0,{},{},{},{},{},",
                line.check,
                csv_field(&owner_name(&line.owner)),
                line.at.0,
                line.tokens,
                line.compute.hours_string(),
                line.energy.kwh_string(),
                line.pay,
                line.energy_reimbursement,
                line.total(),
            )?;
        }
        let t = &self.totals;
        let clawed_revenue: i64 = self.clawbacks.iter().map(|l| l.revenue_share.0).sum();
        let clawed_energy: i64 = self
            .clawbacks
            .iter()
            .map(|l| l.energy_reimbursement.0)
            .sum();
        writeln!(
            out,
            "total,,,,{},{},{},{},{},{},{},",
            TokenCount(t.prompt_tokens.0 + t.check_tokens.0),
            t.completion_tokens,
            DurationMs(t.compute.0 + t.check_compute.0).hours_string(),
            MicroWh(t.energy.0 + t.check_energy.0).kwh_string(),
            MicroUsd(t.revenue_share.0 + t.verification_pay.0 - clawed_revenue),
            MicroUsd(t.energy_reimbursement.0 + t.verification_energy.0 - clawed_energy),
            t.net_earnings,
        )
    }

    /// Statements of many vehicles as one CSV, one row each: earnings before
    /// clawbacks (what checks earned among them), what was clawed back, and
    /// the net.
    pub fn write_summary_csv<'a>(
        statements: impl IntoIterator<Item = &'a Statement>,
        out: &mut impl Write,
    ) -> io::Result<()> {
        writeln!(out, "{SUMMARY_HEADER}")?;
        for statement in statements {
            let t = &statement.totals;
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                statement.node,
                statement.period.from.0,
                statement.period.until.0,
                t.requests,
                t.prompt_tokens,
                t.completion_tokens,
                t.compute.hours_string(),
                t.energy.kwh_string(),
                t.revenue_share,
                t.energy_reimbursement,
                t.checks,
                MicroUsd(t.verification_pay.0 + t.verification_energy.0),
                t.earnings,
                t.clawed_back,
                t.net_earnings,
            )?;
        }
        Ok(())
    }
}
