//! Per-tenant bound on requests held at the gateway at once, so that one
//! tenant cannot take every slot of `INFLIGHT_REQUESTS_MAX` from the others.
//!
//! A request holds its tenant's slot from admission until its response is
//! dropped: queued, running, or a finished answer still being sent to a
//! client that reads slowly. The limit is the tenant's contract
//! `max_concurrency` (`fleetgrid tenants set --max-concurrency N`), or
//! `TENANT_CONCURRENT_REQUESTS_DEFAULT`; contracts reach it with the
//! scheduler's (`changes`). The scheduler applies the same number to the
//! generations it holds, which this bound always reaches first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::limits;

#[derive(Default)]
struct Counts {
    /// Requests held per tenant id; a tenant holding none has no entry.
    held: HashMap<i64, u32>,
    /// Limits set by contracts; a tenant without an entry has the default.
    limits: HashMap<i64, u32>,
}

/// The per-tenant counts of held requests and their limits.
#[derive(Default)]
pub struct TenantRequests {
    // A std mutex: nothing awaits while it is held.
    counts: Mutex<Counts>,
}

/// A refusal: the tenant already holds `limit` requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverLimit {
    pub limit: u32,
}

/// One held request of a tenant; dropping it frees the slot.
pub struct TenantSlot {
    requests: Arc<TenantRequests>,
    tenant_id: i64,
}

impl TenantRequests {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // A panic under this lock leaves plain counters behind, still usable.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets a tenant's limit from its contract; `None` restores the default.
    pub fn set_limit(&self, tenant_id: i64, limit: Option<u32>) {
        let mut counts = self.lock();
        match limit {
            Some(limit) => counts.limits.insert(tenant_id, limit.max(1)),
            None => counts.limits.remove(&tenant_id),
        };
    }

    /// The tenant's limit now.
    pub fn limit(&self, tenant_id: i64) -> u32 {
        Self::limit_in(&self.lock(), tenant_id)
    }

    fn limit_in(counts: &Counts, tenant_id: i64) -> u32 {
        counts
            .limits
            .get(&tenant_id)
            .copied()
            .unwrap_or(limits::TENANT_CONCURRENT_REQUESTS_DEFAULT)
    }

    /// Requests the tenant holds now.
    pub fn held(&self, tenant_id: i64) -> u32 {
        self.lock().held.get(&tenant_id).copied().unwrap_or(0)
    }

    /// A slot for one more request of the tenant, or the limit it is at.
    pub fn try_acquire(self: &Arc<Self>, tenant_id: i64) -> Result<TenantSlot, OverLimit> {
        let mut counts = self.lock();
        let limit = Self::limit_in(&counts, tenant_id);
        let held = counts.held.entry(tenant_id).or_insert(0);
        if *held >= limit {
            return Err(OverLimit { limit });
        }
        *held += 1;
        Ok(TenantSlot {
            requests: Arc::clone(self),
            tenant_id,
        })
    }
}

impl std::fmt::Debug for TenantSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSlot")
            .field("tenant_id", &self.tenant_id)
            .finish()
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut counts = self.requests.lock();
        if let Some(held) = counts.held.get_mut(&self.tenant_id) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.held.remove(&self.tenant_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_limit_is_refused_and_others_are_not() {
        let requests = Arc::new(TenantRequests::default());
        requests.set_limit(1, Some(2));
        let first = requests.try_acquire(1).expect("first");
        let _second = requests.try_acquire(1).expect("second");
        assert_eq!(
            requests.try_acquire(1).map(|_| ()),
            Err(OverLimit { limit: 2 })
        );
        let _other = requests.try_acquire(2).expect("another tenant");
        assert_eq!(
            requests.limit(2),
            limits::TENANT_CONCURRENT_REQUESTS_DEFAULT
        );
        drop(first);
        assert_eq!(requests.held(1), 1);
        let _third = requests.try_acquire(1).expect("a slot was freed");
    }

    #[test]
    fn the_default_applies_without_a_contract() {
        let requests = Arc::new(TenantRequests::default());
        let slots: Vec<TenantSlot> = (0..limits::TENANT_CONCURRENT_REQUESTS_DEFAULT)
            .map(|_| requests.try_acquire(7).expect("within the default"))
            .collect();
        assert!(requests.try_acquire(7).is_err());
        drop(slots);
        assert_eq!(requests.held(7), 0);
        requests.set_limit(7, Some(1));
        requests.set_limit(7, None);
        assert_eq!(
            requests.limit(7),
            limits::TENANT_CONCURRENT_REQUESTS_DEFAULT
        );
    }
}
