//! Owner statements: what one vehicle did and earned in a period, with a CSV
//! export.
//!
//! A statement joins the coordinator's usage segments that ran on the vehicle
//! with the transfers that paid for them (matched by request id, segment and
//! kind), so every earning on it is a committed ledger transfer.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

use crate::core::{
    DurationMs, MicroUsd, MicroWh, NodeId, OwnerId, RequestId, Segment, TimestampMs, TokenCount,
    Transfer, TransferKind,
};
use crate::metering::{Server, UsageSegment};

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
    pub earnings: MicroUsd,
}

/// A vehicle's statement for a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub node: NodeId,
    pub period: Period,
    /// Ordered by start time, then request and segment.
    pub lines: Vec<StatementLine>,
    pub totals: StatementTotals,
}

/// Builds a statement from usage segments and transfers; both may contain
/// records of other vehicles and periods, which are left out.
pub fn build(
    node: &NodeId,
    period: Period,
    usage: &[UsageSegment],
    transfers: &[Transfer],
) -> Statement {
    let mut paid: HashMap<(&RequestId, Segment, TransferKind), MicroUsd> = HashMap::new();
    for transfer in transfers {
        paid.insert(
            (transfer.request_id(), transfer.segment(), transfer.kind()),
            transfer.amount(),
        );
    }
    let amount = |segment: &UsageSegment, kind| {
        paid.get(&(&segment.request_id, segment.segment, kind))
            .copied()
            .unwrap_or(MicroUsd::ZERO)
    };
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
    let totals = totals(&lines);
    Statement {
        node: node.clone(),
        period,
        lines,
        totals,
    }
}

fn totals(lines: &[StatementLine]) -> StatementTotals {
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
    totals.earnings = MicroUsd(totals.revenue_share.0 + totals.energy_reimbursement.0);
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
completion_tokens,compute_hours,energy_kwh,revenue_share_usd,energy_reimbursement_usd,earnings_usd";

const SUMMARY_HEADER: &str = "node,from_ms,until_ms,requests,prompt_tokens,completion_tokens,\
compute_hours,energy_kwh,revenue_share_usd,energy_reimbursement_usd,earnings_usd";

impl Statement {
    /// One row per segment and a final `total` row. Ids are restricted to
    /// characters that need no CSV quoting (see `core::ids`).
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
                "{},{},{},{},{},{},{},{},{},{},{}",
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
        let t = &self.totals;
        writeln!(
            out,
            "total,,,,{},{},{},{},{},{},{}",
            t.prompt_tokens,
            t.completion_tokens,
            t.compute.hours_string(),
            t.energy.kwh_string(),
            t.revenue_share,
            t.energy_reimbursement,
            t.earnings,
        )
    }

    /// Statements of many vehicles as one CSV, one row each.
    pub fn write_summary_csv<'a>(
        statements: impl IntoIterator<Item = &'a Statement>,
        out: &mut impl Write,
    ) -> io::Result<()> {
        writeln!(out, "{SUMMARY_HEADER}")?;
        for statement in statements {
            let t = &statement.totals;
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{}",
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
                t.earnings,
            )?;
        }
        Ok(())
    }
}
