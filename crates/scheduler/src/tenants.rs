//! Tenants: their contracts, what they have in flight, and the admission quotas (concurrency,
//! tokens per minute) and shares (weighted fairness, reserved minimum) that follow from them.

use crate::fxhash::FxHashMap;

use crate::event::RejectReason;
use crate::types::{Millis, TenantClass, TenantConfig, TenantId};

const MS_PER_MINUTE: u64 = 60_000;

/// Fair-share keys are `running * FAIR_SHARE_SCALE / weight`, so integer division keeps enough
/// resolution between weights.
const FAIR_SHARE_SCALE: u64 = 1_000_000;

/// A tenant and its usage.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    pub(crate) config: TenantConfig,
    /// Admitted and not yet finished (running, queued or parked).
    pub(crate) in_flight: u32,
    /// Running on a node right now.
    pub(crate) running: u32,
    /// The minute (`now / 60 s`) that `tokens_this_minute` counts.
    minute: u64,
    tokens_this_minute: u64,
}

/// All tenants, bounded by `SchedulerConfig::tenants_max`.
#[derive(Debug, Default)]
pub(crate) struct Tenants {
    by_id: FxHashMap<TenantId, Tenant>,
    /// Reserved tenants with a non-zero guaranteed share, in id order.
    guaranteed: Vec<TenantId>,
}

impl Tenants {
    /// Create or update a tenant; false when a new tenant would exceed `max`.
    pub(crate) fn configure(&mut self, tenant: TenantId, config: TenantConfig, max: u32) -> bool {
        if let Some(existing) = self.by_id.get_mut(&tenant) {
            existing.config = config;
        } else {
            if self.by_id.len() >= max as usize {
                return false;
            }
            let fresh = Tenant {
                config,
                in_flight: 0,
                running: 0,
                minute: 0,
                tokens_this_minute: 0,
            };
            self.by_id.insert(tenant, fresh);
        }
        let has_guarantee =
            config.class == TenantClass::Reserved && config.reserved_min_share_permille > 0;
        match (self.guaranteed.binary_search(&tenant), has_guarantee) {
            (Err(at), true) => self.guaranteed.insert(at, tenant),
            (Ok(at), false) => {
                self.guaranteed.remove(at);
            }
            _ => {}
        }
        true
    }

    /// Whether any tenant has a reserved guarantee.
    pub(crate) fn any_guarantee(&self) -> bool {
        !self.guaranteed.is_empty()
    }

    /// A value that changes when any tenant's guaranteed slot count changes, or its running work
    /// crosses it (below: may preempt fleet work; above: may be preempted).
    pub(crate) fn guarantee_signature(&self, available_slots: u64) -> u64 {
        self.guaranteed
            .iter()
            .filter_map(|tenant| self.by_id.get(tenant))
            .fold(0u64, |signature, tenant| {
                let guaranteed = tenant.guaranteed_slots(available_slots);
                let standing = u64::from(tenant.running).cmp(&guaranteed) as i8 as u64;
                signature
                    .wrapping_mul(1_000_003)
                    .wrapping_add(guaranteed * 4 + (standing & 3))
            })
    }

    pub(crate) fn get(&self, tenant: TenantId) -> Option<&Tenant> {
        self.by_id.get(&tenant)
    }

    pub(crate) fn get_mut(&mut self, tenant: TenantId) -> Option<&mut Tenant> {
        self.by_id.get_mut(&tenant)
    }

    /// Check the tenant's quotas for a request of `tokens` and, if it passes, count it as in
    /// flight. The error carries the reject reason and its retry-after.
    pub(crate) fn admit(
        &mut self,
        now: Millis,
        tenant: TenantId,
        tokens: u64,
        concurrency_retry_after_ms: u64,
    ) -> Result<TenantClass, (RejectReason, Option<u64>)> {
        let Some(entry) = self.by_id.get_mut(&tenant) else {
            return Err((RejectReason::UnknownTenant, None));
        };
        if entry.in_flight >= entry.config.max_concurrency {
            return Err((
                RejectReason::OverConcurrency,
                Some(concurrency_retry_after_ms),
            ));
        }
        // Before the epoch there is no tenant traffic; count it as minute zero.
        let now_ms = now.to_u64().unwrap_or(0);
        let minute = now_ms / MS_PER_MINUTE;
        if minute != entry.minute {
            entry.minute = minute;
            entry.tokens_this_minute = 0;
        }
        if let Some(limit) = entry.config.tokens_per_minute {
            if entry.tokens_this_minute.saturating_add(tokens) > u64::from(limit) {
                let next_minute_ms = (minute + 1) * MS_PER_MINUTE - now_ms;
                return Err((RejectReason::OverTokensPerMinute, Some(next_minute_ms)));
            }
        }
        entry.tokens_this_minute = entry.tokens_this_minute.saturating_add(tokens);
        entry.in_flight += 1;
        Ok(entry.config.class)
    }
}

impl Tenant {
    /// Weighted fair-share key: lower is served first.
    pub(crate) fn fair_share_key(&self) -> u64 {
        u64::from(self.running) * FAIR_SHARE_SCALE / u64::from(self.config.weight.max(1))
    }

    /// Slots guaranteed to this tenant out of `available_slots` (zero unless reserved).
    pub(crate) fn guaranteed_slots(&self, available_slots: u64) -> u64 {
        if self.config.class != TenantClass::Reserved {
            return 0;
        }
        available_slots * u64::from(self.config.reserved_min_share_permille.min(1000)) / 1000
    }
}
