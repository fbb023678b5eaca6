//! Follows the store's change feed of owner policies and tenant contracts,
//! so that a change written by another process (`fleetgrid policy set`,
//! `fleetgrid tenants set`) reaches the running scheduler (and a contract's
//! `max_concurrency` the gateway's `TenantRequests`) within
//! `CHANGES_POLL_INTERVAL`. Changes made through the owner API are applied
//! at once by the API itself; seeing them again here is harmless, because
//! applying the same policy or contract twice changes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::store::{Store, StoreError};
use crate::tenant_requests::TenantRequests;

/// How often the store is asked for changes made by other processes.
pub const CHANGES_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Changes of each kind read per query; more wait for the next round.
pub const CHANGES_PER_POLL_MAX: u32 = 1000;

/// The last revision of each kind already applied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    policies: i64,
    contracts: i64,
}

/// Applies every change after `cursor` (up to the per-poll bound) and moves
/// the cursor past them.
pub async fn apply_changes(
    store: &Store,
    core: &Core,
    tenant_requests: &TenantRequests,
    cursor: &mut Cursor,
) -> Result<(), StoreError> {
    for change in store
        .contracts_since(cursor.contracts, CHANGES_PER_POLL_MAX)
        .await?
    {
        core.tenant_configured(
            change.tenant.id,
            change.contract.config(change.tenant.class),
        );
        tenant_requests.set_limit(change.tenant.id, change.contract.max_concurrency);
        cursor.contracts = change.revision;
    }
    for change in store
        .policies_since(cursor.policies, CHANGES_PER_POLL_MAX)
        .await?
    {
        core.node_policy_changed(&change.node, change.policy);
        cursor.policies = change.revision;
    }
    Ok(())
}

/// Polls for changes until `shutdown`.
pub async fn follow(
    store: Store,
    core: Arc<Core>,
    tenant_requests: Arc<TenantRequests>,
    mut cursor: Cursor,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(CHANGES_POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {
                if let Err(error) = apply_changes(&store, &core, &tenant_requests, &mut cursor).await {
                    tracing::warn!(%error, "read policy and contract changes");
                }
            }
        }
    }
}
