//! The books' side of verification: paying the owners of the vehicles that
//! checked others' answers.
//!
//! A cell records every check a vehicle answered in the store
//! (`store::checks`). Every gateway pays the unpaid ones, a pass every
//! [`CHECK_PAY_INTERVAL`], each claiming those it pays for
//! [`CHECK_CLAIM_LEASE`] so that gateways share them: the verifier's energy from its power profile and
//! the owner's tariff, as for a generation, then the ledger's `pay_check`,
//! which posts the pay from the platform's verification account
//! (`ledger::verification`), and marks the check paid. The ledger pays a
//! check once, so gateways racing, or a crash between the ledger's commit
//! and the mark, pay nothing twice. A check the ledger refuses stays unpaid
//! and is logged. A check of a vehicle quarantined by the time it would be
//! paid is not paid (and leaves the queue), nor one the ledger withholds
//! because the vehicle's checks were taken back after it was made (a
//! quarantine recorded between this pass's look and its payment).

use std::sync::Arc;
use std::time::Duration;

use ledger::core::{DurationMs, ModelId, NodeId, OwnerId, RequestId, TimestampMs, TokenCount};
use ledger::price_file::PriceConfig;
use ledger::pricing::PriceBook;
use ledger::store::{CheckReceipt, Store as Ledger};
use ledger::verification::CheckWork;
use store::checks::CheckRecord;
use store::Store;
use tokio_util::sync::DropGuard;

/// How often a gateway pays answered checks.
pub const CHECK_PAY_INTERVAL: Duration = Duration::from_secs(2);

/// Most unpaid checks claimed in one pass; the rest wait for the next.
const CHECKS_PER_PASS: u32 = 1_024;

/// How long a gateway's claim on the checks of its pass lasts: past it, a
/// check it did not get to (it died, or the ledger refused it) is another
/// gateway's to pay. A pass of [`CHECKS_PER_PASS`] takes a few seconds.
pub const CHECK_CLAIM_LEASE: Duration = Duration::from_secs(60);

/// What paying checks needs: the store they wait in, the ledger, the price
/// book and the vehicles' power profiles and tariffs.
#[derive(Clone)]
pub struct CheckPayments {
    pub ledger: Arc<Ledger>,
    pub book: PriceBook,
    pub prices: Arc<PriceConfig>,
    pub store: Store,
}

impl CheckPayments {
    /// Pays the checks unpaid now; returns how many were paid.
    pub async fn pay_pending(&self, now_ms: i64) -> Result<usize, store::StoreError> {
        let lease_ms = i64::try_from(CHECK_CLAIM_LEASE.as_millis()).unwrap_or(i64::MAX);
        let mut unpaid = self
            .store
            .claim_unpaid_checks(CHECKS_PER_PASS, now_ms, lease_ms)
            .await?;
        unpaid.sort_by(|a, b| (a.at_ms, &a.check).cmp(&(b.at_ms, &b.check)));
        let mut paid = 0;
        let mut quarantined = std::collections::HashMap::new();
        for record in unpaid {
            // A vehicle quarantined since gets nothing for its verdicts.
            let withheld = match quarantined.get(&record.node) {
                Some(&withheld) => withheld,
                None => {
                    let withheld = self.store.is_quarantined(&record.node).await?;
                    quarantined.insert(record.node.clone(), withheld);
                    withheld
                }
            };
            if withheld {
                tracing::info!(check = %record.check, node_id = %record.node, "a quarantined vehicle's check is not paid");
                self.store.check_paid(&record.check, now_ms).await?;
                continue;
            }
            match self.pay(&record).await {
                Ok(CheckReceipt {
                    withheld: Some(reason),
                    ..
                }) => {
                    tracing::info!(check = %record.check, node_id = %record.node, %reason, "a check made before its vehicle's checks were taken back is not paid");
                    self.store.check_paid(&record.check, now_ms).await?;
                }
                Ok(receipt) => {
                    if receipt.newly_paid {
                        tracing::debug!(
                            check = %record.check,
                            node_id = %record.node,
                            pay = receipt.pay.0,
                            energy = receipt.energy.0,
                            "paid a check"
                        );
                    }
                    self.store.check_paid(&record.check, now_ms).await?;
                    paid += 1;
                }
                Err(error) => {
                    tracing::error!(%error, check = %record.check, node_id = %record.node, "pay a check");
                }
            }
        }
        Ok(paid)
    }

    async fn pay(&self, record: &CheckRecord) -> Result<CheckReceipt, String> {
        let node = NodeId::new(record.node.as_str()).map_err(|error| error.to_string())?;
        let owner = self.owner_of(&record.node).await?;
        let compute = DurationMs(u64::try_from(record.compute_ms).unwrap_or(0));
        let work = CheckWork {
            check: RequestId::new(record.check.as_str()).map_err(|error| error.to_string())?,
            owner,
            model: ModelId::new(record.model.as_str()).map_err(|error| error.to_string())?,
            tokens: TokenCount(u64::try_from(record.tokens).unwrap_or(0)),
            compute,
            energy: self.prices.power_of(&node).segment_energy(compute),
            tariff_per_kwh: self
                .prices
                .tariff_of(&node)
                .per_kwh_at(TimestampMs(record.started_ms)),
            at: TimestampMs(record.at_ms),
            node,
        };
        self.ledger
            .pay_check(&work, &self.book)
            .await
            .map_err(|error| error.to_string())
    }

    /// The account the node's earnings go to, as for its generations.
    async fn owner_of(&self, node: &str) -> Result<OwnerId, String> {
        let record = self
            .store
            .node_record(node)
            .await
            .map_err(|error| error.to_string())?;
        crate::billing_accounts::earnings_account(node, record.as_ref())
            .map_err(|error| error.to_string())
    }

    /// Pays answered checks every [`CHECK_PAY_INTERVAL`] until the guard is
    /// dropped.
    pub fn spawn(self) -> DropGuard {
        crate::billing_clawbacks::every(CHECK_PAY_INTERVAL, move |now| {
            let payments = self.clone();
            async move {
                if let Err(error) = payments.pay_pending(now).await {
                    tracing::warn!(%error, "read unpaid checks");
                }
            }
        })
    }
}
