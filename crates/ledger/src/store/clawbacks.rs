//! The store's side of clawbacks (`crate::clawback`): durable orders, the
//! reversals they post, payout holds, and what statements and `verify` read
//! of them.
//!
//! **Orders.** [`Store::claw_back`] records one row per (node, request) of
//! the order and posts the reversals of every settled segment the node
//! served of those requests, in one transaction. A request that settles
//! later finds its rows in its own settlement transaction and posts the
//! reversals there (`ordered_reversals`, called by `Store::settle`). On
//! PostgreSQL both transactions take the advisory locks of their requests
//! first, so whichever commits second sees what the first committed; on
//! SQLite writers run one at a time. So a verdict and a settlement may come
//! in either order: the reversals are the same transfers (same ids, the
//! stored order's time) and are posted once.
//!
//! **Shortfall.** A clawback takes the whole amount a segment was paid, even
//! if the owner's balance no longer holds it (it was paid out): the balance
//! goes below zero and the receipt reports the part that was not there as
//! the shortfall; `verify` reports it as owed, and later earnings repay it.
//! We chose this over taking only what the balance allows because the ledger
//! then still says exactly what happened: every reversal mirrors its
//! original, the debt is a balance rather than a note kept beside the
//! ledger, and it is collected without a second mechanism, since no payout
//! can pass the floor of zero while the owner owes.
//!
//! **Payout holds.** A hold is kept per node (`ledger_payout_holds`): while
//! a node is held, a payout to any owner the node earned for (by its usage
//! segments) is refused with [`StoreError::PayoutsHeld`]. A new clawback
//! order holds its node with the order's reason, in the order's
//! transaction: a node found cheating is quarantined, and the rest of its
//! suspect window may still be clawed back. [`Store::hold_payouts`] holds a
//! node without an order (a quarantine for another reason) and
//! [`Store::release_payouts`] lifts a hold when the quarantine ends; an
//! order that repeats one already recorded does not hold again. A payout
//! locks its owner's account row before reading the holds, and placing a
//! hold locks the rows of the node's owners, so a hold waits for a payout in
//! progress and every later payout sees it.

use std::collections::BTreeSet;

use crate::clawback::{self, ClawbackOrder};
use crate::core::{
    AccountId, MicroUsd, NodeId, Outcome, OwnerId, Problem, RequestId, Segment, TimestampMs,
    Transfer, TransferId, TransferKind, Verifier,
};
use crate::metering::{Server, UsageSegment};
use crate::pricing::PriceBook;
use crate::settlement::{self, CompletedRequest, Settlement};
use crate::statement::{ClawbackRecord, Period};

use super::rows::{self, RequestRow, UsageRow, REQUEST_COLUMNS, USAGE_COLUMNS};
use super::tx::{on_tx, Tx};
use super::{Backend, Committed, Store, StoreError};

/// What a clawback order did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClawbackReceipt {
    /// The order's requests recorded by this call; zero when an identical
    /// order was recorded before.
    pub requests_recorded: u64,
    /// The reversals of every settled segment the node served of the
    /// order's requests, whether posted by this call or before (by a
    /// settlement, or an earlier identical order).
    pub transfers: Vec<Transfer>,
    pub outcomes: Vec<Outcome>,
    /// Revenue shares taken back from owners by this call.
    pub revenue_clawed_back: MicroUsd,
    /// Energy reimbursements taken back from owners by this call.
    pub energy_clawed_back: MicroUsd,
    /// Refunded to tenants by this call.
    pub refunded: MicroUsd,
    /// The part of what this call clawed back that owners' balances did not
    /// hold: their balances went below zero by this much, and they owe it.
    pub shortfall: MicroUsd,
}

impl ClawbackReceipt {
    fn new(requests_recorded: u64, transfers: Vec<Transfer>, committed: Committed) -> Self {
        let created = |kind: TransferKind| {
            let amounts = transfers
                .iter()
                .zip(&committed.outcomes)
                .filter(|(transfer, outcome)| {
                    transfer.kind() == kind && **outcome == Outcome::Created
                })
                .map(|(transfer, _)| transfer.amount().0);
            MicroUsd(amounts.sum())
        };
        ClawbackReceipt {
            requests_recorded,
            revenue_clawed_back: created(TransferKind::RevenueClawback),
            energy_clawed_back: created(TransferKind::EnergyClawback),
            refunded: created(TransferKind::Refund),
            shortfall: committed.shortfall,
            outcomes: committed.outcomes,
            transfers,
        }
    }
}

/// A node whose owners' payouts are held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutHold {
    pub node: NodeId,
    pub reason: String,
    pub at: TimestampMs,
}

/// The holds that stop payouts to an owner (`$1`, its raw id): those of the
/// nodes it earned for.
const HOLDS_OF_OWNER: &str = "SELECT h.node_id, h.reason, h.at_ms FROM ledger_payout_holds h \
     WHERE EXISTS (SELECT 1 FROM ledger_usage u WHERE u.node_id = h.node_id AND u.owner_id = $1) \
     ORDER BY h.node_id";

impl Store {
    /// Records a clawback order and, in the same transaction, posts the
    /// reversals of every settled segment `order.node` served of its
    /// requests (module doc). Requests not settled yet are reversed when
    /// they settle. `book` must be the price book the requests were settled
    /// with: each request's refund is its segments' part of the charge,
    /// recomputed, and a recomputed settlement that differs from the ledger
    /// is refused ([`ClawbackError::SettledDifferently`]).
    ///
    /// A second identical order changes nothing and reports zero amounts.
    ///
    /// [`ClawbackError::SettledDifferently`]: crate::clawback::ClawbackError::SettledDifferently
    pub async fn claw_back(
        &self,
        order: &ClawbackOrder,
        book: &PriceBook,
    ) -> Result<ClawbackReceipt, StoreError> {
        order.validate()?;
        retry_collisions!(self.claw_back_once(order, book).await)
    }

    async fn claw_back_once(
        &self,
        order: &ClawbackOrder,
        book: &PriceBook,
    ) -> Result<ClawbackReceipt, StoreError> {
        let mut tx = Tx::begin(self).await?;
        tx.lock_requests(&order.request_ids).await?;
        let recorded = record_order(&mut tx, order).await?;
        if recorded > 0 {
            hold(&mut tx, &order.node, &order.reason, order.at).await?;
        }
        let mut batch = Vec::new();
        for request_id in &order.request_ids {
            let reversals = settled_reversals(&mut tx, &order.node, request_id, book).await?;
            batch.extend(reversals);
        }
        if batch.len() > crate::core::BATCH_TRANSFERS_MAX {
            return Err(crate::core::LedgerError::BatchTooLarge { len: batch.len() }.into());
        }
        let committed = tx.commit_batch(&batch, &[], None, None, None).await?;
        tx.commit().await?;
        Ok(ClawbackReceipt::new(recorded, batch, committed))
    }

    /// Holds the payouts of every owner `node` earned for, for `reason`.
    /// Returns false if the node was held already (the first hold's reason
    /// is kept).
    pub async fn hold_payouts(
        &self,
        node: &NodeId,
        reason: &str,
        at: TimestampMs,
    ) -> Result<bool, StoreError> {
        clawback::check_reason(reason)?;
        let mut tx = Tx::begin(self).await?;
        let held = hold(&mut tx, node, reason, at).await?;
        tx.commit().await?;
        Ok(held)
    }

    /// Lifts a node's payout hold; returns false if it had none. Its
    /// clawback orders stay: settling one of their requests still posts its
    /// reversals.
    pub async fn release_payouts(&self, node: &NodeId) -> Result<bool, StoreError> {
        let sql = "DELETE FROM ledger_payout_holds WHERE node_id = $1";
        let deleted = on_pool!(self, pool => sqlx::query(sql)
            .bind(node.as_str())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(deleted > 0)
    }

    /// The holds that stop payouts to `owner`, by node id.
    pub async fn payout_holds(&self, owner: &OwnerId) -> Result<Vec<PayoutHold>, StoreError> {
        let found: Vec<HoldRow> = on_pool!(self, pool => sqlx::query_as(HOLDS_OF_OWNER)
            .bind(owner.as_str())
            .fetch_all(pool)
            .await?);
        found.into_iter().map(hold_from_row).collect()
    }
}

/// `node_id, reason, at_ms`.
type HoldRow = (String, String, i64);

fn hold_from_row((node, reason, at): HoldRow) -> Result<PayoutHold, StoreError> {
    Ok(PayoutHold {
        node: NodeId::new(node).map_err(|error| corrupt("hold node id", error))?,
        reason,
        at: TimestampMs(at),
    })
}

fn corrupt(what: &'static str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: reason.to_string(),
    }
}

/// Inserts the order's rows that are not there yet; returns how many.
async fn record_order(tx: &mut Tx, order: &ClawbackOrder) -> Result<u64, StoreError> {
    let sql = "INSERT INTO ledger_clawbacks (node_id, request_id, reason, at_ms) \
               VALUES ($1, $2, $3, $4) ON CONFLICT (node_id, request_id) DO NOTHING";
    let mut recorded = 0;
    for request_id in &order.request_ids {
        recorded += on_tx!(tx, tx => sqlx::query(sql)
            .bind(order.node.as_str())
            .bind(request_id.as_str())
            .bind(order.reason.as_str())
            .bind(order.at.0)
            .execute(&mut **tx)
            .await?
            .rows_affected());
    }
    Ok(recorded)
}

/// Holds `node`'s payouts unless it is held already, then waits for the
/// payouts in progress to its owners (their account rows' locks), so that
/// none commits after the hold does. Returns whether it was newly held.
pub(super) async fn hold(
    tx: &mut Tx,
    node: &NodeId,
    reason: &str,
    at: TimestampMs,
) -> Result<bool, StoreError> {
    let insert = "INSERT INTO ledger_payout_holds (node_id, reason, at_ms) VALUES ($1, $2, $3) \
                  ON CONFLICT (node_id) DO NOTHING";
    let owners = "SELECT DISTINCT owner_id FROM ledger_usage WHERE node_id = $1";
    let (inserted, owners): (u64, Vec<(String,)>) = on_tx!(tx, tx => {
        let inserted = sqlx::query(insert)
            .bind(node.as_str())
            .bind(reason)
            .bind(at.0)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        let owners = sqlx::query_as(owners)
            .bind(node.as_str())
            .fetch_all(&mut **tx)
            .await?;
        (inserted, owners)
    });
    let accounts = owners
        .into_iter()
        .map(|(owner,)| Ok(AccountId::Owner(OwnerId::new(owner)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    tx.lock_accounts(&accounts).await?;
    Ok(inserted > 0)
}

/// Refuses a payout to `owner` while a node it earned for is held.
pub(super) async fn refuse_if_held(tx: &mut Tx, owner: &OwnerId) -> Result<(), StoreError> {
    let sql = format!("{HOLDS_OF_OWNER} LIMIT 1");
    let found: Option<HoldRow> = on_tx!(tx, tx => sqlx::query_as(&sql)
        .bind(owner.as_str())
        .fetch_optional(&mut **tx)
        .await?);
    match found.map(hold_from_row).transpose()? {
        Some(hold) => Err(StoreError::PayoutsHeld {
            owner: owner.clone(),
            node: hold.node,
            reason: hold.reason,
        }),
        None => Ok(()),
    }
}

/// The reversals of the segments `node` served of a settled request; none
/// if the request is not settled or the node served none of it. Checks that
/// `book` settles the request to the transfers the ledger holds.
async fn settled_reversals(
    tx: &mut Tx,
    node: &NodeId,
    request_id: &RequestId,
    book: &PriceBook,
) -> Result<Vec<Transfer>, StoreError> {
    let usage = request_usage(tx, request_id).await?;
    let served = usage.iter().any(
        |segment| matches!(&segment.server, Server::Node { node: ran_on, .. } if ran_on == node),
    );
    if !served {
        return Ok(Vec::new());
    }
    let summary = request_summary(tx, request_id).await?.ok_or_else(|| {
        corrupt(
            "settled request",
            format!("request {request_id} has usage but no summary"),
        )
    })?;
    let request = clawback::settled_request(&summary, usage);
    let settlement = settlement::settle(&request, book)?;
    let stored = tx.transfers(&clawback::settlement_ids(&request)).await?;
    clawback::check_recomputed(&request, &settlement, &stored)?;
    let at = order_time(tx, node, request_id).await?;
    Ok(clawback::reversals(&request, &settlement, node, at)?)
}

/// The reversals a settlement posts for the clawback orders of its request
/// that name a node which served one of its segments.
pub(super) async fn ordered_reversals(
    tx: &mut Tx,
    request: &CompletedRequest,
    settlement: &Settlement,
) -> Result<Vec<Transfer>, StoreError> {
    let sql = "SELECT node_id, at_ms FROM ledger_clawbacks WHERE request_id = $1 ORDER BY node_id";
    let orders: Vec<(String, i64)> = on_tx!(tx, tx => sqlx::query_as(sql)
        .bind(request.request_id.as_str())
        .fetch_all(&mut **tx)
        .await?);
    let mut reversals = Vec::new();
    for (node, at) in orders {
        let node = NodeId::new(node).map_err(|error| corrupt("clawback node id", error))?;
        reversals.extend(clawback::reversals(
            request,
            settlement,
            &node,
            TimestampMs(at),
        )?);
    }
    Ok(reversals)
}

/// The time of the recorded order for (node, request): the first order's,
/// which every reversal of it carries.
async fn order_time(
    tx: &mut Tx,
    node: &NodeId,
    request_id: &RequestId,
) -> Result<TimestampMs, StoreError> {
    let sql = "SELECT at_ms FROM ledger_clawbacks WHERE node_id = $1 AND request_id = $2";
    let found: Option<(i64,)> = on_tx!(tx, tx => sqlx::query_as(sql)
        .bind(node.as_str())
        .bind(request_id.as_str())
        .fetch_optional(&mut **tx)
        .await?);
    // `claw_back` recorded the row earlier in this transaction.
    let (at,) = found.ok_or_else(|| corrupt("clawback order", "recorded row not found"))?;
    Ok(TimestampMs(at))
}

async fn request_usage(
    tx: &mut Tx,
    request_id: &RequestId,
) -> Result<Vec<UsageSegment>, StoreError> {
    let sql =
        format!("SELECT {USAGE_COLUMNS} FROM ledger_usage WHERE request_id = $1 ORDER BY segment");
    let found: Vec<UsageRow> = on_tx!(tx, tx => sqlx::query_as(&sql)
        .bind(request_id.as_str())
        .fetch_all(&mut **tx)
        .await?);
    found.into_iter().map(rows::usage_from_row).collect()
}

async fn request_summary(
    tx: &mut Tx,
    request_id: &RequestId,
) -> Result<Option<crate::invoice::RequestSummary>, StoreError> {
    let sql = format!("SELECT {REQUEST_COLUMNS} FROM ledger_requests WHERE request_id = $1");
    let found: Option<RequestRow> = on_tx!(tx, tx => sqlx::query_as(&sql)
        .bind(request_id.as_str())
        .fetch_optional(&mut **tx)
        .await?);
    found.map(rows::request_from_row).transpose()
}

/// The clawback orders of `node` in `period` (by the order's time), one
/// record per settled segment the node served of each order's request.
pub(super) async fn clawback_records(
    store: &Store,
    node: &NodeId,
    period: Period,
) -> Result<Vec<ClawbackRecord>, StoreError> {
    let sql = "SELECT c.request_id, u.segment, u.owner_id, c.reason, c.at_ms \
               FROM ledger_clawbacks c JOIN ledger_usage u \
               ON u.request_id = c.request_id AND u.node_id = c.node_id \
               WHERE c.node_id = $1 AND c.at_ms >= $2 AND c.at_ms < $3";
    type RecordRow = (String, i64, Option<String>, String, i64);
    let found: Vec<RecordRow> = on_pool!(store, pool => sqlx::query_as(sql)
        .bind(node.as_str())
        .bind(period.from.0)
        .bind(period.until.0)
        .fetch_all(pool)
        .await?);
    found
        .into_iter()
        .map(|(request_id, segment, owner, reason, at)| {
            let owner =
                owner.ok_or_else(|| corrupt("clawback usage", "a node segment without owner"))?;
            Ok(ClawbackRecord {
                request_id: RequestId::new(request_id)
                    .map_err(|error| corrupt("clawback request id", error))?,
                segment: Segment(
                    u32::try_from(segment).map_err(|_| corrupt("clawback segment", segment))?,
                ),
                owner: OwnerId::new(owner).map_err(|error| corrupt("clawback owner", error))?,
                reason,
                at: TimestampMs(at),
                of_check: false,
            })
        })
        .collect()
}

/// The ids of the reversals a statement's clawback records may have.
pub(super) fn clawback_ids(records: &[ClawbackRecord]) -> Vec<TransferId> {
    records
        .iter()
        .flat_map(|record| {
            record
                .reversal_kinds()
                .map(|kind| TransferId::derive(&record.request_id, record.segment, kind))
        })
        .collect()
}

/// What `verify` checks of clawbacks beyond the core's check of each
/// reversal against its original: every reversal is of a segment a
/// clawback order names (served by the node it names), and every revenue
/// share and energy reimbursement of such a segment is reversed. Refunds are
/// not checked for completeness, since their amounts need the price book;
/// the core checks that they never exceed the charge. Memory grows with the
/// number of clawed-back segments.
pub(super) async fn verify_orders(
    store: &Store,
    verifier: &mut Verifier,
) -> Result<(), StoreError> {
    let sql = "SELECT u.request_id, u.segment FROM ledger_clawbacks c JOIN ledger_usage u \
               ON u.request_id = c.request_id AND u.node_id = c.node_id";
    let found: Vec<(String, i64)> =
        on_pool!(store, pool => sqlx::query_as(sql).fetch_all(pool).await?);
    let mut ordered = BTreeSet::new();
    for (request_id, segment) in found {
        let request_id =
            RequestId::new(request_id).map_err(|error| corrupt("clawback request id", error))?;
        let segment = u32::try_from(segment).map_err(|_| corrupt("clawback segment", segment))?;
        ordered.insert((request_id, Segment(segment)));
    }
    let checks = "SELECT check_id FROM ledger_check_clawbacks";
    let found: Vec<(String,)> =
        on_pool!(store, pool => sqlx::query_as(checks).fetch_all(pool).await?);
    let mut checks = BTreeSet::new();
    for (check,) in found {
        let check = RequestId::new(check).map_err(|error| corrupt("clawback check id", error))?;
        ordered.insert((check.clone(), Segment(0)));
        checks.insert((check, Segment(0)));
    }
    let unordered: Vec<Problem> = verifier
        .reversals()
        .iter()
        .filter(|reversal| !ordered.contains(&(reversal.request_id().clone(), reversal.segment())))
        .map(|reversal| Problem::ReversalWithoutOrder {
            transfer: reversal.id(),
        })
        .collect();
    for problem in unordered {
        verifier.add_problem(problem);
    }
    let segments: BTreeSet<(RequestId, Segment)> = ordered.difference(&checks).cloned().collect();
    for problem in missing_reversals(store, &segments, &SEGMENT_EARNINGS).await? {
        verifier.add_problem(problem);
    }
    for problem in missing_reversals(store, &checks, &CHECK_EARNINGS).await? {
        verifier.add_problem(problem);
    }
    Ok(())
}

/// A segment's earnings and the clawbacks that reverse them.
const SEGMENT_EARNINGS: [(TransferKind, TransferKind); 2] = [
    (TransferKind::RevenueShare, TransferKind::RevenueClawback),
    (
        TransferKind::EnergyReimbursement,
        TransferKind::EnergyClawback,
    ),
];

/// A check's earnings and the clawbacks that reverse them.
const CHECK_EARNINGS: [(TransferKind, TransferKind); 2] = [
    (
        TransferKind::VerificationPay,
        TransferKind::VerificationPayClawback,
    ),
    (
        TransferKind::VerificationEnergy,
        TransferKind::VerificationEnergyClawback,
    ),
];

/// The earnings (of the kinds `pairs` name, each with its clawback) of
/// ordered segments or checks that have no reversal.
async fn missing_reversals(
    store: &Store,
    ordered: &BTreeSet<(RequestId, Segment)>,
    pairs: &[(TransferKind, TransferKind); 2],
) -> Result<Vec<Problem>, StoreError> {
    let ids: Vec<TransferId> = ordered
        .iter()
        .flat_map(|(request_id, segment)| {
            pairs.iter().flat_map(move |(earning, clawback)| {
                [*earning, *clawback].map(|kind| TransferId::derive(request_id, *segment, kind))
            })
        })
        .collect();
    let found = store.transfers_by_id(&ids).await?;
    let mut problems = Vec::new();
    for (request_id, segment) in ordered {
        for &(earning, clawback) in pairs {
            let paid = TransferId::derive(request_id, *segment, earning);
            let reversed = TransferId::derive(request_id, *segment, clawback);
            if found.contains_key(&paid) && !found.contains_key(&reversed) {
                problems.push(Problem::MissingReversal {
                    request_id: request_id.clone(),
                    segment: *segment,
                    kind: earning,
                });
            }
        }
    }
    Ok(problems)
}
