//! Checks paid (`crate::verification`): the check's record and the transfers
//! that pay it commit in one transaction, so a check on a statement is a
//! check paid, and a check booked again pays nothing twice.
//!
//! Paying a node's check and taking back its checks take turns (the node's
//! lock, [`node_lock`]); once a node's checks were taken back at a time, a
//! check of its made by then is not paid, whenever it comes to be booked.

use crate::core::{
    AccountId, DurationMs, MicroUsd, MicroWh, ModelId, NodeId, OwnerId, RequestId, TimestampMs,
    TokenCount, Transfer, TransferId, TransferKind, TransferSpec,
};
use crate::pricing::PriceBook;
use crate::statement::{ClawbackRecord, Period};
use crate::verification::{self, CheckWork};

use super::tx::{on_tx, Tx};
use super::{Backend, Store, StoreError};

/// What booking a check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReceipt {
    /// False when the check was booked before, or withheld: nothing was
    /// posted now.
    pub newly_paid: bool,
    pub pay: MicroUsd,
    pub energy: MicroUsd,
    /// Why the check is not paid: its node's checks were taken back, with
    /// this reason, at or after the time it was made. Nothing is booked.
    pub withheld: Option<String>,
}

const COLUMNS: &str =
    "check_id, node_id, owner_id, model, tokens, compute_ms, energy_uwh, tariff_per_kwh, at_ms";

type CheckRow = (String, String, String, String, i64, i64, i64, i64, i64);

impl Store {
    /// Pays the verifier's owner for a check, from the platform's
    /// verification account. A check booked before keeps what it was booked
    /// with: the amounts are recomputed from the stored record, found
    /// existing, and reported with `newly_paid` false.
    pub async fn pay_check(
        &self,
        work: &CheckWork,
        book: &PriceBook,
    ) -> Result<CheckReceipt, StoreError> {
        self.open_account(&AccountId::Owner(work.owner.clone()))
            .await?;
        retry_collisions!(self.pay_check_once(work, book).await)
    }

    async fn pay_check_once(
        &self,
        work: &CheckWork,
        book: &PriceBook,
    ) -> Result<CheckReceipt, StoreError> {
        let mut tx = Tx::begin(self).await?;
        tx.lock_requests(&[node_lock(&work.node)?]).await?;
        // A check booked before the clawback keeps its booking (the clawback
        // reversed it); only the node of a clawback pays the second query.
        if let Some(reason) = taken_back_since(&mut tx, &work.node, work.at).await? {
            if !is_booked(&mut tx, &work.check).await? {
                tx.commit().await?;
                return Ok(CheckReceipt {
                    newly_paid: false,
                    pay: MicroUsd(0),
                    energy: MicroUsd(0),
                    withheld: Some(reason),
                });
            }
        }
        let insert = format!(
            "INSERT INTO ledger_verifications ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (check_id) DO NOTHING"
        );
        let inserted = on_tx!(&mut tx, tx => sqlx::query(&insert)
            .bind(work.check.as_str())
            .bind(work.node.as_str())
            .bind(work.owner.as_str())
            .bind(work.model.as_str())
            .bind(column("tokens", work.tokens.0)?)
            .bind(column("compute_ms", work.compute.0)?)
            .bind(column("energy_uwh", work.energy.0)?)
            .bind(work.tariff_per_kwh.0)
            .bind(work.at.0)
            .execute(&mut **tx)
            .await?
            .rows_affected());
        let booked = if inserted > 0 {
            work.clone()
        } else {
            let select = format!("SELECT {COLUMNS} FROM ledger_verifications WHERE check_id = $1");
            let row: CheckRow = on_tx!(&mut tx, tx => sqlx::query_as(&select)
                .bind(work.check.as_str())
                .fetch_one(&mut **tx)
                .await?);
            check_from_row(row)?
        };
        let paid = verification::pay(&booked, book)?;
        tx.commit_batch(&paid.transfers, &[], None, None, None)
            .await?;
        tx.commit().await?;
        Ok(CheckReceipt {
            newly_paid: inserted > 0,
            pay: paid.pay,
            energy: paid.energy,
            withheld: None,
        })
    }
}

/// The lock that makes paying a node's checks and taking them back take
/// turns: on PostgreSQL the advisory lock of a name no request has.
fn node_lock(node: &NodeId) -> Result<RequestId, StoreError> {
    Ok(RequestId::new(format!("checks-of:{}", node.as_str()))?)
}

async fn is_booked(tx: &mut Tx, check: &RequestId) -> Result<bool, StoreError> {
    let select = "SELECT COUNT(*) FROM ledger_verifications WHERE check_id = $1";
    let count: i64 = on_tx!(tx, tx => sqlx::query_scalar(select)
        .bind(check.as_str())
        .fetch_one(&mut **tx)
        .await?);
    Ok(count > 0)
}

/// The reason `node`'s checks were taken back, if they were at or after `at`.
async fn taken_back_since(
    tx: &mut Tx,
    node: &NodeId,
    at: TimestampMs,
) -> Result<Option<String>, StoreError> {
    let select =
        "SELECT reason FROM ledger_check_clawback_nodes WHERE node_id = $1 AND at_ms >= $2";
    Ok(on_tx!(tx, tx => sqlx::query_scalar(select)
        .bind(node.as_str())
        .bind(at.0)
        .fetch_optional(&mut **tx)
        .await?))
}

/// What taking back a verifier's checks did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckClawbackReceipt {
    /// Checks whose pay this call took back; a check taken back before is
    /// not counted again.
    pub checks: u64,
    /// Pay and energy taken back from owners by this call.
    pub clawed_back: MicroUsd,
    /// The part of it that owners' balances did not hold (they owe it).
    pub shortfall: MicroUsd,
}

impl Store {
    /// Takes back the pay and energy of `node`'s last `window` checks made
    /// at or before `at`, because the node was found cheating: once it has
    /// cheated, none of its verdicts can be relied on, and a vehicle that
    /// vouches for answers without checking them looks like an honest
    /// verifier whenever the answers were good. Each reversal mirrors the
    /// transfer that paid the check and carries `at`; the checks are
    /// recorded (`ledger_check_clawbacks`) with `reason` in the same
    /// transaction, so a check is taken back once however often this runs,
    /// and shown on the node's statement as a clawback. A check of the node
    /// made by `at` and not booked yet is never paid (`pay_check` withholds
    /// it). Holds the node's payouts as a clawback order does.
    pub async fn claw_back_checks(
        &self,
        node: &NodeId,
        reason: &str,
        at: TimestampMs,
        window: u32,
    ) -> Result<CheckClawbackReceipt, StoreError> {
        crate::clawback::check_reason(reason)?;
        retry_collisions!(self.claw_back_checks_once(node, reason, at, window).await)
    }

    async fn claw_back_checks_once(
        &self,
        node: &NodeId,
        reason: &str,
        at: TimestampMs,
        window: u32,
    ) -> Result<CheckClawbackReceipt, StoreError> {
        let mut tx = Tx::begin(self).await?;
        tx.lock_requests(&[node_lock(node)?]).await?;
        // From now on a check of the node made by `at` is not paid.
        let taken_back = "INSERT INTO ledger_check_clawback_nodes (node_id, reason, at_ms) \
                          VALUES ($1, $2, $3) ON CONFLICT (node_id) DO UPDATE \
                          SET reason = excluded.reason, at_ms = excluded.at_ms \
                          WHERE excluded.at_ms > ledger_check_clawback_nodes.at_ms";
        on_tx!(&mut tx, tx => sqlx::query(taken_back)
            .bind(node.as_str())
            .bind(reason)
            .bind(at.0)
            .execute(&mut **tx)
            .await
            .map(|_| ())?);
        let select = "SELECT check_id, owner_id FROM ledger_verifications \
                      WHERE node_id = $1 AND at_ms <= $2 \
                      ORDER BY at_ms DESC, check_id DESC LIMIT $3";
        let window_checks: Vec<(String, String)> = on_tx!(&mut tx, tx => sqlx::query_as(select)
            .bind(node.as_str())
            .bind(at.0)
            .bind(i64::from(window))
            .fetch_all(&mut **tx)
            .await?);
        let insert = "INSERT INTO ledger_check_clawbacks (check_id, node_id, owner_id, reason, \
                      at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (check_id) DO NOTHING";
        let mut recorded_checks = Vec::new();
        for (check, owner) in window_checks {
            let recorded = on_tx!(&mut tx, tx => sqlx::query(insert)
                .bind(&check)
                .bind(node.as_str())
                .bind(&owner)
                .bind(reason)
                .bind(at.0)
                .execute(&mut **tx)
                .await?
                .rows_affected());
            if recorded > 0 {
                recorded_checks.push(RequestId::new(check)?);
            }
        }
        let checks = recorded_checks.len() as u64;
        // What paid the newly recorded checks, read in one query.
        let ids = check_transfer_ids(&recorded_checks);
        let paid = tx.transfers(&ids).await?;
        let batch = ids
            .iter()
            .filter_map(|id| paid.get(id))
            .map(|original| reversal(original, at))
            .collect::<Result<Vec<_>, _>>()?;
        if checks > 0 {
            super::clawbacks::hold(&mut tx, node, reason, at).await?;
        }
        if batch.len() > crate::core::BATCH_TRANSFERS_MAX {
            return Err(crate::core::LedgerError::BatchTooLarge { len: batch.len() }.into());
        }
        let committed = tx.commit_batch(&batch, &[], None, None, None).await?;
        tx.commit().await?;
        let clawed_back = batch
            .iter()
            .zip(&committed.outcomes)
            .filter(|(_, outcome)| **outcome == crate::core::Outcome::Created)
            .map(|(transfer, _)| transfer.amount().0)
            .sum();
        Ok(CheckClawbackReceipt {
            checks,
            clawed_back: MicroUsd(clawed_back),
            shortfall: committed.shortfall,
        })
    }
}

/// The clawback of a check's pay or energy: the original's accounts
/// swapped, at `at`.
fn reversal(original: &Transfer, at: TimestampMs) -> Result<Transfer, StoreError> {
    let kind =
        crate::clawback::clawback_of(original.kind()).ok_or_else(|| StoreError::Corrupt {
            what: "check transfer",
            reason: format!("{} has no clawback", original.kind()),
        })?;
    Ok(Transfer::new(TransferSpec {
        kind,
        debit: original.credit().clone(),
        credit: original.debit().clone(),
        at,
        ..original.spec().clone()
    })?)
}

/// A node's check clawbacks in a period (by the clawback's time).
pub(super) async fn check_clawback_records(
    store: &Store,
    node: &NodeId,
    period: Period,
) -> Result<Vec<ClawbackRecord>, StoreError> {
    let sql = "SELECT check_id, owner_id, reason, at_ms FROM ledger_check_clawbacks \
               WHERE node_id = $1 AND at_ms >= $2 AND at_ms < $3";
    let rows: Vec<(String, String, String, i64)> = on_pool!(store, pool => sqlx::query_as(sql)
        .bind(node.as_str())
        .bind(period.from.0)
        .bind(period.until.0)
        .fetch_all(pool)
        .await?);
    rows.into_iter()
        .map(|(check, owner, reason, at)| {
            Ok(ClawbackRecord {
                request_id: RequestId::new(check)?,
                segment: crate::core::Segment(0),
                owner: OwnerId::new(owner)?,
                reason,
                at: TimestampMs(at),
                of_check: true,
            })
        })
        .collect()
}

/// A node's checks in a period.
pub(super) async fn checks_of(
    store: &Store,
    node: &NodeId,
    period: Period,
) -> Result<Vec<CheckWork>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM ledger_verifications \
         WHERE node_id = $1 AND at_ms >= $2 AND at_ms < $3"
    );
    let rows: Vec<CheckRow> = on_pool!(store, pool => sqlx::query_as(&sql)
        .bind(node.as_str())
        .bind(period.from.0)
        .bind(period.until.0)
        .fetch_all(pool)
        .await?);
    rows.into_iter().map(check_from_row).collect()
}

/// The ids of the transfers that paid the checks named `checks`.
pub(super) fn check_transfer_ids<'a>(
    checks: impl IntoIterator<Item = &'a RequestId>,
) -> Vec<TransferId> {
    checks
        .into_iter()
        .flat_map(|check| {
            [
                TransferKind::VerificationPay,
                TransferKind::VerificationEnergy,
            ]
            .map(|kind| TransferId::derive(check, crate::core::Segment(0), kind))
        })
        .collect()
}

fn column(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

fn check_from_row(row: CheckRow) -> Result<CheckWork, StoreError> {
    let (check, node, owner, model, tokens, compute_ms, energy_uwh, tariff, at_ms) = row;
    let unsigned = |what: &'static str, value: i64| {
        u64::try_from(value).map_err(|_| StoreError::Corrupt {
            what,
            reason: format!("negative {value}"),
        })
    };
    Ok(CheckWork {
        check: RequestId::new(check)?,
        node: NodeId::new(node)?,
        owner: OwnerId::new(owner)?,
        model: ModelId::new(model)?,
        tokens: TokenCount(unsigned("check tokens", tokens)?),
        compute: DurationMs(unsigned("check compute", compute_ms)?),
        energy: MicroWh(unsigned("check energy", energy_uwh)?),
        tariff_per_kwh: MicroUsd(tariff),
        at: TimestampMs(at_ms),
    })
}
