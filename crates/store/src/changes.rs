//! The store's change feed of owner policies and tenant contracts, followed
//! by every process that acts on them: a change written by another process
//! (`fleetgrid policy set`, `fleetgrid tenants set`) reaches a running cell's
//! scheduler, and a contract's `max_concurrency` a gateway's per-tenant
//! bound, within `CHANGES_POLL_INTERVAL`. Applying the same policy or
//! contract twice changes nothing, so a change also applied at once by the
//! owner API is harmless when it comes round again here.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::contracts::ContractChange;
use crate::owners::PolicyChange;
use crate::{Store, StoreError};

/// How often the store is asked for changes made by other processes.
pub const CHANGES_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Changes of each kind read per query; more wait for the next round.
pub const CHANGES_PER_POLL_MAX: u32 = 1000;

/// One change, in the order of its kind's revisions.
#[derive(Clone, Debug)]
pub enum Change {
    Contract(ContractChange),
    Policy(PolicyChange),
}

/// The last revision of each kind already applied.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    policies: i64,
    contracts: i64,
}

/// Hands every change after `cursor` (up to the per-poll bound) to `apply`
/// and moves the cursor past them.
pub async fn apply_changes(
    store: &Store,
    cursor: &mut Cursor,
    apply: &mut impl FnMut(Change),
) -> Result<(), StoreError> {
    for change in store
        .contracts_since(cursor.contracts, CHANGES_PER_POLL_MAX)
        .await?
    {
        cursor.contracts = change.revision;
        apply(Change::Contract(change));
    }
    for change in store
        .policies_since(cursor.policies, CHANGES_PER_POLL_MAX)
        .await?
    {
        cursor.policies = change.revision;
        apply(Change::Policy(change));
    }
    Ok(())
}

/// Applies what is stored now, then follows new changes until `shutdown`.
/// Returns once the stored changes are applied; the following runs in a task.
pub async fn follow(
    store: Store,
    shutdown: CancellationToken,
    mut apply: impl FnMut(Change) + Send + 'static,
) -> Result<(), StoreError> {
    let mut cursor = Cursor::default();
    apply_changes(&store, &mut cursor, &mut apply).await?;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(CHANGES_POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {
                    if let Err(error) = apply_changes(&store, &mut cursor, &mut apply).await {
                        tracing::warn!(%error, "read policy and contract changes");
                    }
                }
            }
        }
    });
    Ok(())
}
