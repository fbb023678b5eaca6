//! Settlement: the transfers a completed request produces.
//!
//! - One token charge, tenant → platform revenue: the prompt once (as
//!   prefilled by segment 0, at segment 0's rate) and every completion token
//!   once (at the rate of the segment that produced it), rounded up.
//! - Per fleet segment, platform revenue → owner: the owner share of the
//!   revenue that segment earned (the prompt for segment 0, its own completion
//!   tokens for every segment), rounded down.
//! - Per fleet segment, energy-reimbursement expense → owner: the segment's
//!   energy at the owner's tariff, rounded down.
//! - Per cloud segment, cloud upstream cost → cloud provider: what upstream
//!   charges for every token it processed, rounded up.
//!
//! A re-prefill after a migration is the platform's cost, never the
//! customer's: the customer pays for segment 0's prompt only, while the node
//! that re-prefilled is still reimbursed the energy and an upstream still
//! costs what it processed. Zero amounts produce no transfer.
//!
//! Settlement is a pure function of the request and the price book, so a retry
//! yields identical transfers and the ledger reports them as existing.

use crate::core::{
    AccountId, MicroUsd, MicroWh, RequestId, Segment, TenantId, TimestampMs, TokenCount, Transfer,
    TransferError, TransferKind, TransferSpec,
};
use crate::metering::{Server, UsageSegment};
use crate::pricing::{round_down, round_up, share_of, PriceBook, PricingError, Rate, TenantClass};

/// The most segments one request may have; a generation that migrated more
/// often than this is a scheduler bug, not something to bill.
pub const SEGMENTS_MAX: usize = 64;

/// A request that finished, with every segment the coordinator metered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedRequest {
    pub request_id: RequestId,
    pub tenant: TenantId,
    pub class: TenantClass,
    /// Prices are those in force at admission.
    pub admitted_at: TimestampMs,
    /// Every transfer of the request carries this time.
    pub completed_at: TimestampMs,
    /// Segments in order: `segments[i].segment == Segment(i)`.
    pub segments: Vec<UsageSegment>,
}

/// Why a request could not be settled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettlementError {
    #[error("request {0} has no segments")]
    NoSegments(RequestId),
    #[error("request {request_id} has {count} segments, more than {SEGMENTS_MAX}")]
    TooManySegments { request_id: RequestId, count: usize },
    #[error("segment {position} of request {request_id} is numbered {found} or belongs to another request")]
    SegmentOutOfOrder {
        request_id: RequestId,
        position: usize,
        found: Segment,
    },
    #[error("a fleet model cannot run in the cloud, nor a cloud model on a node (segment {0})")]
    ServerMismatch(Segment),
    #[error(transparent)]
    Pricing(#[from] PricingError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// A settled request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// What the customer pays.
    pub charge: MicroUsd,
    /// The part of `charge` its cloud segments earned, each rounded up
    /// (what the gateway counts against the tenant's cloud budget).
    pub cloud_charge: MicroUsd,
    /// `charge` divided among the segments, in segment order, by what each
    /// earned: segment `i` gets the rounded-up total of segments `0..=i`
    /// less that of `0..i`. The parts add up to `charge` exactly, so
    /// refunding every segment of a request (`crate::clawback`) refunds
    /// exactly what the tenant paid, never a micro-dollar more.
    pub segment_charges: Vec<MicroUsd>,
    pub transfers: Vec<Transfer>,
}

/// Computes a completed request's transfers.
pub fn settle(request: &CompletedRequest, book: &PriceBook) -> Result<Settlement, SettlementError> {
    check_segments(request)?;
    let sheet = book.sheet_at(request.admitted_at);
    let rates = request
        .segments
        .iter()
        .map(|segment| {
            let rate = sheet.rate(&segment.model, request.class)?;
            match (&segment.server, rate) {
                (Server::Node { .. }, Rate::Fleet(_)) | (Server::Cloud, Rate::Cloud { .. }) => {
                    Ok(rate)
                }
                _ => Err(SettlementError::ServerMismatch(segment.segment)),
            }
        })
        .collect::<Result<Vec<Rate>, SettlementError>>()?;
    let earned = earned_by_segment(request, &rates);
    let charge = round_up(earned.iter().sum());
    let segment_charges = cumulative_parts(&earned);
    let cloud_charge = request
        .segments
        .iter()
        .zip(&earned)
        .filter(|(segment, _)| segment.server == Server::Cloud)
        .fold(MicroUsd::ZERO, |sum, (_, earned)| {
            MicroUsd(sum.0.saturating_add(round_up(*earned).0))
        });
    let billed_tokens = request.segments[0].prompt_tokens.0
        + request
            .segments
            .iter()
            .map(|segment| segment.completion_tokens.0)
            .sum::<u64>();

    let mut builder = Builder {
        request,
        transfers: Vec::new(),
    };
    let tenant = AccountId::Tenant(request.tenant.clone());
    let charge_to_revenue = (tenant, AccountId::PlatformRevenue);
    builder.push(
        TransferKind::TokenCharge,
        charge_to_revenue,
        charge,
        Segment(0),
        billed_tokens,
    )?;
    for ((segment, rate), earned) in request.segments.iter().zip(&rates).zip(&earned) {
        builder.segment(segment, rate, share_of(*earned, sheet.owner_share))?;
    }
    Ok(Settlement {
        charge,
        cloud_charge,
        segment_charges,
        transfers: builder.transfers,
    })
}

/// Divides the rounded-up total of exact amounts among them: each part is
/// the rounded-up running total less the one before, so every part is
/// non-negative and the parts add up to the rounded-up total.
fn cumulative_parts(exact: &[i128]) -> Vec<MicroUsd> {
    let mut running = 0_i128;
    let mut before = MicroUsd::ZERO;
    exact
        .iter()
        .map(|amount| {
            running += amount;
            let through = round_up(running);
            let part = MicroUsd(through.0 - before.0);
            before = through;
            part
        })
        .collect()
}

/// Exact revenue each segment earned, in 10⁻⁶ µUSD: the prompt counts for
/// segment 0 only (a re-prefill is not billed), completion tokens for the
/// segment that produced them.
fn earned_by_segment(request: &CompletedRequest, rates: &[Rate]) -> Vec<i128> {
    request
        .segments
        .iter()
        .zip(rates)
        .enumerate()
        .map(|(position, (segment, rate))| {
            let billed_prompt = if position == 0 {
                segment.prompt_tokens
            } else {
                TokenCount(0)
            };
            rate.customer()
                .exact_cost(billed_prompt, segment.completion_tokens)
        })
        .collect()
}

/// Collects a request's transfers, leaving out zero amounts.
struct Builder<'a> {
    request: &'a CompletedRequest,
    transfers: Vec<Transfer>,
}

impl Builder<'_> {
    fn push(
        &mut self,
        kind: TransferKind,
        (debit, credit): (AccountId, AccountId),
        amount: MicroUsd,
        segment: Segment,
        quantity: u64,
    ) -> Result<(), TransferError> {
        if !amount.is_positive() {
            return Ok(());
        }
        self.transfers.push(Transfer::new(TransferSpec {
            kind,
            debit,
            credit,
            amount,
            request_id: self.request.request_id.clone(),
            segment,
            quantity,
            at: self.request.completed_at,
        })?);
        Ok(())
    }

    /// The owner's or the upstream's transfers for one segment.
    fn segment(
        &mut self,
        segment: &UsageSegment,
        rate: &Rate,
        owner_share: MicroUsd,
    ) -> Result<(), SettlementError> {
        match (&segment.server, rate) {
            (
                Server::Node {
                    owner,
                    energy,
                    tariff_per_kwh,
                    ..
                },
                _,
            ) => {
                let owner = AccountId::Owner(owner.clone());
                let prompt = if segment.segment == Segment(0) {
                    segment.prompt_tokens.0
                } else {
                    0
                };
                let tokens = prompt + segment.completion_tokens.0;
                let share_accounts = (AccountId::PlatformRevenue, owner.clone());
                self.push(
                    TransferKind::RevenueShare,
                    share_accounts,
                    owner_share,
                    segment.segment,
                    tokens,
                )?;
                let reimbursement = energy_cost(*energy, *tariff_per_kwh);
                let energy_accounts = (AccountId::EnergyReimbursement, owner);
                self.push(
                    TransferKind::EnergyReimbursement,
                    energy_accounts,
                    reimbursement,
                    segment.segment,
                    energy.0,
                )?;
            }
            (Server::Cloud, Rate::Cloud { upstream, .. }) => {
                let processed = (segment.prompt_tokens, segment.completion_tokens);
                let cost = round_up(upstream.exact_cost(processed.0, processed.1));
                let tokens = processed.0 .0 + processed.1 .0;
                let accounts = (AccountId::CloudUpstreamCost, AccountId::CloudProvider);
                self.push(
                    TransferKind::CloudCost,
                    accounts,
                    cost,
                    segment.segment,
                    tokens,
                )?;
            }
            // `settle` matched every rate to its server already.
            (Server::Cloud, Rate::Fleet(_)) => {
                return Err(SettlementError::ServerMismatch(segment.segment))
            }
        }
        Ok(())
    }
}

/// Energy at a per-kWh tariff, rounded down (the platform pays it).
pub fn energy_cost(energy: MicroWh, per_kwh: MicroUsd) -> MicroUsd {
    let exact = i128::from(energy.0) * i128::from(per_kwh.0);
    // µWh × µUSD/kWh / 10⁹ µWh/kWh = µUSD; `round_down` divides by 10⁶ already.
    round_down(exact / 1_000)
}

fn check_segments(request: &CompletedRequest) -> Result<(), SettlementError> {
    let count = request.segments.len();
    if count == 0 {
        return Err(SettlementError::NoSegments(request.request_id.clone()));
    }
    if count > SEGMENTS_MAX {
        return Err(SettlementError::TooManySegments {
            request_id: request.request_id.clone(),
            count,
        });
    }
    for (position, segment) in request.segments.iter().enumerate() {
        let numbered_right = u32::try_from(position).map(Segment) == Ok(segment.segment);
        if !numbered_right || segment.request_id != request.request_id {
            return Err(SettlementError::SegmentOutOfOrder {
                request_id: request.request_id.clone(),
                position,
                found: segment.segment,
            });
        }
    }
    Ok(())
}
