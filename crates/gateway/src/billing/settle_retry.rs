//! Settlements the ledger could not take because it was not there (a
//! database down, restarting or cut off): each is kept in memory with its
//! hold and retried, with a growing pause, until it commits, so the work of
//! answers already running when the ledger went away is charged and paid
//! once it is back, and the tenant's money stays held meanwhile.
//!
//! Bounded: at most [`SETTLEMENT_RETRIES_MAX`] wait at a time; beyond it a
//! settlement is given up (logged) and its hold released. A settlement the
//! ledger refuses (a floor, a conflict) is never retried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger::core::MicroUsd;

use super::{Billing, BillingError, Completion, PendingCharge, SettleFailure};
use crate::billing_meter::Metering;

/// The most settlements waiting for the ledger at once.
pub const SETTLEMENT_RETRIES_MAX: usize = 10_000;

/// The first pause before a settlement is tried again.
pub const SETTLEMENT_RETRY_PAUSE_MIN: Duration = Duration::from_millis(100);

/// The longest pause between two tries: how long a ledger that is back may
/// wait for the settlements kept for it.
pub const SETTLEMENT_RETRY_PAUSE_MAX: Duration = Duration::from_secs(5);

/// How many settlements wait for the ledger.
#[derive(Debug, Default)]
pub(crate) struct SettlementRetries {
    waiting: AtomicUsize,
}

/// One waiting settlement's place in the bound, given back when dropped.
struct Waiting(Arc<SettlementRetries>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SettlementRetries {
    /// How many settlements wait for the ledger now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn reserve(self: &Arc<Self>) -> Option<Waiting> {
        let taken = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |waiting| {
                (waiting < SETTLEMENT_RETRIES_MAX).then_some(waiting + 1)
            });
        taken.ok().map(|_| Waiting(Arc::clone(self)))
    }
}

/// A kept settlement: built already, or still to be metered (its nodes'
/// owners could not be looked up while the store was away).
pub(super) enum Kept {
    Completed(Completion),
    Metered(Metering),
}

/// Keeps a settlement (and its hold) to retry in a task of its own; `false`
/// when too many wait already or there is no runtime, and then nothing is
/// kept: the caller's `pending` is dropped, which releases its hold.
pub(super) fn keep(billing: &Arc<Billing>, pending: PendingCharge, kept: Kept) -> bool {
    let Some(place) = billing.retries.reserve() else {
        tracing::error!(
            request_id = %pending.request_id,
            waiting = SETTLEMENT_RETRIES_MAX,
            "too many settlements wait for the ledger: this one is given up"
        );
        return false;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!(request_id = %pending.request_id, "no runtime to retry a settlement");
        return false;
    };
    runtime.spawn(retry(Arc::clone(billing), pending, kept, place));
    true
}

/// Tries the settlement again after a growing pause until the ledger takes
/// or refuses it.
async fn retry(billing: Arc<Billing>, pending: PendingCharge, mut kept: Kept, place: Waiting) {
    let mut pause = SETTLEMENT_RETRY_PAUSE_MIN;
    loop {
        tokio::time::sleep(pause).await;
        if let Kept::Metered(metering) = &kept {
            match billing.complete(&pending, metering).await {
                Ok(completion) => kept = Kept::Completed(completion),
                Err(BillingError::LedgerUnavailable { .. }) => {
                    pause = (pause * 2).min(SETTLEMENT_RETRY_PAUSE_MAX);
                    continue;
                }
                Err(error) => {
                    tracing::error!(request_id = %pending.request_id, %error, "meter a kept request");
                    break;
                }
            }
        }
        let Kept::Completed(completion) = &kept else {
            continue;
        };
        match billing.commit_settlement(completion).await {
            Ok(charge) => {
                settled(&pending, charge);
                pending.hold.settled();
                break;
            }
            Err(SettleFailure::Unavailable) => {
                pause = (pause * 2).min(SETTLEMENT_RETRY_PAUSE_MAX);
            }
            Err(SettleFailure::Refused) => {
                tracing::error!(request_id = %pending.request_id, "the ledger refused a kept settlement");
                break;
            }
        }
    }
    drop(place);
}

fn settled(pending: &PendingCharge, charge: MicroUsd) {
    tracing::info!(request_id = %pending.request_id, %charge, "kept settlement committed");
}
