//! The books' side of a quarantine: taking back what a vehicle was paid for
//! the answers of its suspect window, and refunding their tenants.
//!
//! A cell that quarantines a vehicle records the quarantine and the public
//! ids of its suspect generations in the store (`store::trust`). Every
//! gateway applies the pending ones to the ledger, a pass every
//! [`CLAWBACK_INTERVAL`]: one `ClawbackOrder` per vehicle and reason, at most
//! `ORDER_REQUESTS_MAX` requests each, then marks them applied. The ledger's
//! clawback is idempotent (a second order reverses nothing twice), so
//! gateways racing, or a crash between the ledger's commit and the mark,
//! take nothing twice; a request that settles after its order is reversed
//! when it settles. The order also holds the vehicle's payouts.
//!
//! A quarantined vehicle also gives back the pay of its last
//! [`CHECK_SUSPECT_WINDOW`] checks (`ledger::store::Store::claw_back_checks`,
//! once per quarantine, marked in the store): once it has cheated, none of
//! its verdicts can be relied on. Its checks not paid by then are never paid
//! (`billing_checks`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ledger::clawback::{ClawbackOrder, ORDER_REQUESTS_MAX};
use ledger::core::{NodeId, RequestId, TimestampMs};
use ledger::pricing::PriceBook;
use ledger::store::Store as Ledger;
use store::trust::{PendingCheckClawback, PendingClawback};
use store::Store;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How often a gateway applies pending clawbacks.
pub const CLAWBACK_INTERVAL: Duration = Duration::from_secs(2);

/// Most pending clawbacks read in one pass; the rest wait for the next.
const CLAWBACKS_PER_PASS: u32 = 4_096;

/// How many of a quarantined vehicle's last checks give back their pay: as
/// many as the generations of the verification policy's default suspect
/// window (`trust::VerificationPolicy::suspect_window`).
pub const CHECK_SUSPECT_WINDOW: u32 = 200;

/// What applying clawbacks needs: the store they wait in, the ledger and the
/// price book the requests were settled with.
#[derive(Clone)]
pub struct Clawbacks {
    pub ledger: Arc<Ledger>,
    pub book: PriceBook,
    pub store: Store,
}

impl Clawbacks {
    /// Applies the clawbacks pending now; returns how many requests were
    /// applied. An order the ledger refuses stays pending and is logged.
    pub async fn apply_pending(&self, now_ms: i64) -> Result<usize, store::StoreError> {
        let pending = self.store.pending_clawbacks(CLAWBACKS_PER_PASS).await?;
        let mut applied = 0;
        for ((node, reason), requests) in orders(pending) {
            for chunk in requests.chunks(ORDER_REQUESTS_MAX) {
                if self.apply(&node, &reason, chunk).await {
                    for (request, _) in chunk {
                        self.store.clawback_applied(&node, request, now_ms).await?;
                    }
                    applied += chunk.len();
                }
            }
        }
        for pending in self
            .store
            .pending_check_clawbacks(CLAWBACKS_PER_PASS)
            .await?
        {
            if self.apply_checks(&pending).await {
                self.store
                    .check_clawback_applied(&pending.node, pending.quarantined_ms, now_ms)
                    .await?;
            }
        }
        Ok(applied)
    }

    /// Takes back the pay of a quarantined vehicle's last checks; whether
    /// the ledger committed.
    async fn apply_checks(&self, pending: &PendingCheckClawback) -> bool {
        let Ok(node) = NodeId::new(pending.node.as_str()) else {
            tracing::error!(node_id = %pending.node, "a quarantined node has an id the ledger cannot hold");
            return false;
        };
        let reason = match pending.reason.is_empty() {
            true => "quarantined",
            false => pending.reason.as_str(),
        };
        let at = TimestampMs(pending.quarantined_ms);
        match self
            .ledger
            .claw_back_checks(&node, reason, at, CHECK_SUSPECT_WINDOW)
            .await
        {
            Ok(receipt) => {
                if receipt.checks > 0 {
                    tracing::warn!(
                        node_id = %pending.node,
                        checks = receipt.checks,
                        clawed_back = receipt.clawed_back.0,
                        shortfall = receipt.shortfall.0,
                        "took back a quarantined vehicle's pay for its checks"
                    );
                }
                true
            }
            Err(error) => {
                tracing::error!(%error, node_id = %pending.node, "take back a quarantined vehicle's checks");
                false
            }
        }
    }

    /// One order to the ledger; whether it committed.
    async fn apply(&self, node: &str, reason: &str, requests: &[(String, i64)]) -> bool {
        let order = (|| {
            Some(ClawbackOrder {
                node: NodeId::new(node).ok()?,
                request_ids: requests
                    .iter()
                    .map(|(request, _)| RequestId::new(request.as_str()).ok())
                    .collect::<Option<Vec<_>>>()?,
                reason: reason.to_owned(),
                at: TimestampMs(requests.iter().map(|(_, at)| *at).min().unwrap_or(0)),
            })
        })();
        let Some(order) = order else {
            tracing::error!(node_id = %node, "a clawback names an id the ledger cannot hold");
            return false;
        };
        match self.ledger.claw_back(&order, &self.book).await {
            Ok(receipt) => {
                tracing::warn!(
                    node_id = %node,
                    requests = requests.len(),
                    revenue_clawed_back = receipt.revenue_clawed_back.0,
                    energy_clawed_back = receipt.energy_clawed_back.0,
                    refunded = receipt.refunded.0,
                    shortfall = receipt.shortfall.0,
                    "clawed back a quarantined vehicle's earnings"
                );
                true
            }
            Err(error) => {
                tracing::error!(%error, node_id = %node, "apply a clawback");
                false
            }
        }
    }

    /// Applies pending clawbacks every [`CLAWBACK_INTERVAL`] until the guard
    /// is dropped.
    pub fn spawn(self) -> DropGuard {
        every(CLAWBACK_INTERVAL, move |now| {
            let clawbacks = self.clone();
            async move {
                if let Err(error) = clawbacks.apply_pending(now).await {
                    tracing::warn!(%error, "read pending clawbacks");
                }
            }
        })
    }
}

/// Runs one of the books' passes every `period`, with the time it starts,
/// until the guard is dropped.
pub(crate) fn every<F, Fut>(period: Duration, mut pass: F) -> DropGuard
where
    F: FnMut(i64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stopped.cancelled() => return,
                _ = ticks.tick() => {}
            }
            pass(crate::core::now_ms().0).await;
        }
    });
    stop.drop_guard()
}

/// Pending clawbacks grouped into orders: by vehicle and reason, each
/// request with the time it was ordered.
fn orders(pending: Vec<PendingClawback>) -> BTreeMap<(String, String), Vec<(String, i64)>> {
    let mut orders: BTreeMap<(String, String), Vec<(String, i64)>> = BTreeMap::new();
    for clawback in pending {
        orders
            .entry((clawback.node, clawback.reason))
            .or_default()
            .push((clawback.request_id, clawback.at_ms));
    }
    orders
}
