//! Clawback: undoing what a node was paid for answers found to be bad, and
//! refunding the tenants who paid for them.
//!
//! Nodes are untrusted. When a verifier finds that a node returned bad
//! answers, a [`ClawbackOrder`] names the node and the requests of its
//! suspect window. For every segment of those requests that *this* node
//! served, three reversals undo what the segment's settlement moved:
//!
//! - revenue clawback, owner → platform revenue: the segment's revenue
//!   share, exactly;
//! - energy clawback, owner → energy-reimbursement expense: the segment's
//!   energy reimbursement, exactly;
//! - refund, platform revenue → tenant: the segment's part of the request's
//!   token charge ([`Settlement::segment_charges`]), so a request whose every
//!   segment is refunded is refunded exactly its charge.
//!
//! Segments served by other nodes or by the cloud are left alone: their
//! answers were not the cheater's. Nothing already posted is edited; every
//! reversal is a new transfer whose id derives from the same (request,
//! segment) as its original and its own kind, and it carries the time of the
//! order. So the reversals of a segment are a pure function of the settled
//! request, the price book and the order: the same transfers whether the
//! order is recorded before or after the request settles (`store`), posted
//! once, and found existing by any retry.
//!
//! An owner may have been paid out before the clawback: a clawback is then
//! not refused for the owner's floor but takes the balance below zero (see
//! `core::ledger`), and that shortfall is what the owner owes.

use std::collections::{BTreeSet, HashMap};

use crate::core::{
    AccountId, NodeId, RequestId, Segment, TimestampMs, Transfer, TransferError, TransferId,
    TransferKind, TransferSpec,
};
use crate::invoice::RequestSummary;
use crate::metering::{Server, UsageSegment};
use crate::settlement::{CompletedRequest, Settlement};

/// The most requests one order may name. A suspect window is at least the
/// node's last 200 generations (`trust`); a longer one is sent as several
/// orders, so that one order is one bounded transaction.
pub const ORDER_REQUESTS_MAX: usize = 1_000;

/// The longest reason accepted, in bytes; it is shown on owner statements.
pub const REASON_BYTES_MAX: usize = 512;

/// A verdict's consequence for the ledger: take back what `node` was paid
/// for the segments it served of `request_ids`, and refund their tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClawbackOrder {
    /// The node found cheating, as metering names it (`ledger_usage`).
    pub node: NodeId,
    /// The requests of the node's suspect window; requests not settled yet
    /// are reversed when they settle.
    pub request_ids: Vec<RequestId>,
    /// Why, in words an owner can read on a statement (for example
    /// "verification failed at token 17: not the sampler's pick").
    pub reason: String,
    /// When the verdict was reached; every reversal carries this time.
    pub at: TimestampMs,
}

/// Why a clawback could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClawbackError {
    #[error("a clawback order must name at least one request")]
    NoRequests,
    #[error("a clawback order names {count} requests, more than {ORDER_REQUESTS_MAX}")]
    TooManyRequests { count: usize },
    #[error("a clawback order names request {0} twice")]
    DuplicateRequest(RequestId),
    #[error("a clawback reason must not be empty")]
    EmptyReason,
    #[error("a clawback reason is longer than {REASON_BYTES_MAX} bytes")]
    ReasonTooLong,
    #[error("a clawback reason must not contain control characters")]
    ReasonControlCharacter,
    #[error(
        "request {request_id} settles to other transfers than the ledger holds \
         ({detail}); is this the price book it was settled with?"
    )]
    SettledDifferently {
        request_id: RequestId,
        detail: String,
    },
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

impl ClawbackOrder {
    /// Checks the order's bounds; the store refuses an order that fails.
    pub fn validate(&self) -> Result<(), ClawbackError> {
        if self.request_ids.is_empty() {
            return Err(ClawbackError::NoRequests);
        }
        if self.request_ids.len() > ORDER_REQUESTS_MAX {
            return Err(ClawbackError::TooManyRequests {
                count: self.request_ids.len(),
            });
        }
        let mut seen = BTreeSet::new();
        if let Some(twice) = self.request_ids.iter().find(|id| !seen.insert(*id)) {
            return Err(ClawbackError::DuplicateRequest(twice.clone()));
        }
        check_reason(&self.reason)
    }
}

/// Checks a reason shown to owners (a clawback's or a payout hold's): not
/// blank, bounded, and one line without control characters, so that it
/// prints as one CSV field and one log line.
pub fn check_reason(reason: &str) -> Result<(), ClawbackError> {
    if reason.trim().is_empty() {
        return Err(ClawbackError::EmptyReason);
    }
    if reason.len() > REASON_BYTES_MAX {
        return Err(ClawbackError::ReasonTooLong);
    }
    if reason.chars().any(char::is_control) {
        return Err(ClawbackError::ReasonControlCharacter);
    }
    Ok(())
}

/// The completed request a settled request was settled from, rebuilt from
/// its summary and its usage segments (in segment order).
pub fn settled_request(summary: &RequestSummary, segments: Vec<UsageSegment>) -> CompletedRequest {
    CompletedRequest {
        request_id: summary.request_id.clone(),
        tenant: summary.tenant.clone(),
        class: summary.class,
        admitted_at: summary.admitted_at,
        completed_at: summary.completed_at,
        segments,
    }
}

/// Every id a settlement of `request` may hold, whether or not its amount
/// was zero (zero amounts produce no transfer).
pub fn settlement_ids(request: &CompletedRequest) -> Vec<TransferId> {
    let per_segment = [
        TransferKind::RevenueShare,
        TransferKind::EnergyReimbursement,
        TransferKind::CloudCost,
    ];
    let charge = TransferId::derive(&request.request_id, Segment(0), TransferKind::TokenCharge);
    let segments = request.segments.iter().flat_map(|segment| {
        per_segment.map(|kind| TransferId::derive(&request.request_id, segment.segment, kind))
    });
    std::iter::once(charge).chain(segments).collect()
}

/// Checks that a settlement recomputed now is the one the ledger holds:
/// under every id of [`settlement_ids`], the same transfer or none in both.
/// A reversal computed from a settlement that differs (another price book)
/// would not undo what was paid, so it is refused.
pub fn check_recomputed(
    request: &CompletedRequest,
    settlement: &Settlement,
    stored: &HashMap<TransferId, Transfer>,
) -> Result<(), ClawbackError> {
    let recomputed: HashMap<TransferId, &Transfer> = settlement
        .transfers
        .iter()
        .map(|transfer| (transfer.id(), transfer))
        .collect();
    for id in settlement_ids(request) {
        let ours = recomputed.get(&id).map(|transfer| transfer.spec());
        let theirs = stored.get(&id).map(Transfer::spec);
        if ours != theirs {
            return Err(ClawbackError::SettledDifferently {
                request_id: request.request_id.clone(),
                detail: format!("transfer {id} is {theirs:?} in the ledger, {ours:?} now"),
            });
        }
    }
    Ok(())
}

/// The reversals of the segments `node` served in a settled request: a
/// clawback of each of their revenue shares and energy reimbursements, and a
/// refund of each one's part of the charge; none for a zero amount.
pub fn reversals(
    request: &CompletedRequest,
    settlement: &Settlement,
    node: &NodeId,
    at: TimestampMs,
) -> Result<Vec<Transfer>, TransferError> {
    let served: Vec<&UsageSegment> = request
        .segments
        .iter()
        .filter(|segment| matches!(&segment.server, Server::Node { node: ran_on, .. } if ran_on == node))
        .collect();
    let served_segments: BTreeSet<Segment> = served.iter().map(|segment| segment.segment).collect();
    let mut reversals = Vec::new();
    for paid in &settlement.transfers {
        let Some(kind) = clawback_of(paid.kind()) else {
            continue;
        };
        if served_segments.contains(&paid.segment()) {
            reversals.push(Transfer::new(TransferSpec {
                kind,
                debit: paid.credit().clone(),
                credit: paid.debit().clone(),
                at,
                ..paid.spec().clone()
            })?);
        }
    }
    for segment in served {
        let part = usize::try_from(segment.segment.0)
            .ok()
            .and_then(|index| settlement.segment_charges.get(index))
            .copied()
            .unwrap_or_default();
        if part.is_positive() {
            reversals.push(Transfer::new(TransferSpec {
                kind: TransferKind::Refund,
                debit: AccountId::PlatformRevenue,
                credit: AccountId::Tenant(request.tenant.clone()),
                amount: part,
                request_id: request.request_id.clone(),
                segment: segment.segment,
                quantity: billed_tokens(segment),
                at,
            })?);
        }
    }
    Ok(reversals)
}

/// The clawback that reverses an owner's earning of this kind, if any.
pub(crate) fn clawback_of(kind: TransferKind) -> Option<TransferKind> {
    TransferKind::ALL
        .into_iter()
        .find(|clawback| clawback.is_clawback() && clawback.reverses() == Some(kind))
}

/// The tokens a segment was billed for: the prompt on segment 0 only (a
/// re-prefill is not billed, see `settlement`), and its completion tokens.
fn billed_tokens(segment: &UsageSegment) -> u64 {
    let prompt = if segment.segment == Segment(0) {
        segment.prompt_tokens.0
    } else {
        0
    };
    prompt + segment.completion_tokens.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(reason: &str, requests: usize) -> ClawbackOrder {
        ClawbackOrder {
            node: NodeId::new("car-a").unwrap(),
            request_ids: (0..requests)
                .map(|index| RequestId::new(format!("r{index}")).unwrap())
                .collect(),
            reason: reason.to_owned(),
            at: TimestampMs(0),
        }
    }

    #[test]
    fn orders_are_bounded_where_they_enter() {
        assert_eq!(order("bad answers", 200).validate(), Ok(()));
        assert_eq!(order("bad", 0).validate(), Err(ClawbackError::NoRequests));
        assert!(matches!(
            order("bad", ORDER_REQUESTS_MAX + 1).validate(),
            Err(ClawbackError::TooManyRequests { .. })
        ));
        assert_eq!(order("  ", 1).validate(), Err(ClawbackError::EmptyReason));
        let long = "x".repeat(REASON_BYTES_MAX + 1);
        assert_eq!(
            order(&long, 1).validate(),
            Err(ClawbackError::ReasonTooLong)
        );
        assert_eq!(
            order("bad\nanswers", 1).validate(),
            Err(ClawbackError::ReasonControlCharacter)
        );
        let mut twice = order("bad", 2);
        twice.request_ids[1] = twice.request_ids[0].clone();
        assert!(matches!(
            twice.validate(),
            Err(ClawbackError::DuplicateRequest(_))
        ));
    }
}
