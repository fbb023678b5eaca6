//! Owner policies and tenant contracts reaching the running scheduler: the
//! owner API and the store's change feed call these, and the scheduler
//! applies each change at once (`NodePolicyChanged`, `TenantConfigured`).

use scheduler::{Event, OwnerPolicy, TenantConfig, TenantId};

use super::Core;

impl Core {
    /// The owner changed a vehicle's policy. A connected vehicle gets it now
    /// (work it may no longer run moves elsewhere); a vehicle that is not
    /// connected reads its stored policy when it connects.
    pub fn node_policy_changed(&self, name: &str, policy: OwnerPolicy) {
        let now = self.clock.now();
        let mut state = self.lock();
        let Some(node) = state.node_ids_by_name.get(name).copied() else {
            return;
        };
        if !state.nodes.contains_key(&node) {
            return;
        }
        tracing::info!(node_id = %name, ?policy, "applying owner policy");
        self.handle(&mut state, now, Event::NodePolicyChanged { node, policy });
    }

    /// A tenant's contract was set or changed; requests arriving from now on
    /// are admitted under it.
    pub fn tenant_configured(&self, tenant_id: i64, config: TenantConfig) {
        let now = self.clock.now();
        let mut state = self.lock();
        let Ok(id) = u32::try_from(tenant_id) else {
            tracing::error!(tenant_id, "tenant id does not fit the scheduler's ids");
            return;
        };
        state.configured_tenants.insert(tenant_id);
        self.handle(
            &mut state,
            now,
            Event::TenantConfigured {
                tenant: TenantId(id),
                config,
            },
        );
    }
}
