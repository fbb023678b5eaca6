//! Money held for in-flight requests: each admitted request holds its worst
//! case until it is settled or abandoned, so that a tenant's concurrent
//! requests cannot together spend more than it has.
//!
//! The book lives in memory under a `std::sync::Mutex` that is never held
//! across an `.await`. Each release bumps the tenant's epoch: an admission
//! that read the ledger balance before a settlement committed sees the epoch
//! move and reads again, so a charge is always counted either in the balance
//! or as a hold, never in neither.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ledger::core::{MicroUsd, TenantId};

/// Worst cases held for a tenant's in-flight requests.
#[derive(Debug, Default)]
pub(crate) struct TenantHolds {
    pub(crate) held: MicroUsd,
    /// Bumped whenever a hold is released, so an admission that read the
    /// balance before a settlement can tell and read again.
    pub(crate) epoch: u64,
}

#[derive(Debug, Default)]
pub(crate) struct HoldBook {
    tenants: Mutex<HashMap<TenantId, TenantHolds>>,
}

impl HoldBook {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<TenantId, TenantHolds>> {
        // The map stays consistent between statements; a panic elsewhere
        // while holding it must not stop billing.
        self.tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn epoch(&self, tenant: &TenantId) -> u64 {
        self.lock().get(tenant).map_or(0, |holds| holds.epoch)
    }

    pub(crate) fn release(&self, tenant: &TenantId, amount: MicroUsd) {
        let mut tenants = self.lock();
        if let Some(holds) = tenants.get_mut(tenant) {
            holds.held = MicroUsd(holds.held.0.saturating_sub(amount.0).max(0));
            holds.epoch += 1;
        }
    }
}

/// A request's worst case, held until the request is settled or abandoned.
#[derive(Debug)]
pub(crate) struct Hold {
    pub(crate) book: Arc<HoldBook>,
    pub(crate) tenant: TenantId,
    pub(crate) amount: MicroUsd,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.book.release(&self.tenant, self.amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_hold_frees_its_money_and_moves_the_epoch() {
        let book = Arc::new(HoldBook::default());
        let tenant = TenantId::new("acme").unwrap();
        book.lock().entry(tenant.clone()).or_default().held = MicroUsd(700);
        let hold = Hold {
            book: Arc::clone(&book),
            tenant: tenant.clone(),
            amount: MicroUsd(300),
        };
        let before = book.epoch(&tenant);
        drop(hold);
        assert_eq!(book.lock()[&tenant].held, MicroUsd(400));
        assert_eq!(book.epoch(&tenant), before + 1);
    }
}
