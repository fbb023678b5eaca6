//! The store's change feed of owner policies and tenant contracts, followed
//! by every process that acts on them: a change written by another process
//! (`fleetgrid policy set`, `fleetgrid tenants set`, another gateway or
//! cell) reaches a running cell's scheduler, and a contract's
//! `max_concurrency` a gateway's per-tenant bound. Applying the same policy
//! or contract twice changes nothing, so a change also applied at once by
//! the owner API is harmless when it comes round again here.
//!
//! A follower keeps the last revision of each kind it applied and reads the
//! ones above it, every `CHANGES_POLL_INTERVAL`. Revisions commit in the
//! order they are taken (see `database`), so reading past a revision never
//! skips one committed later; a follower that lost its connection reads
//! everything it missed at its next poll.
//!
//! Latency: on SQLite, at most `CHANGES_POLL_INTERVAL` (plus the query). On
//! PostgreSQL a committed change also notifies every follower
//! (`LISTEN`/`NOTIFY` on `CHANGES_CHANNEL`), which reads at once: a round
//! trip or two, milliseconds. A notification lost while a follower's
//! listening connection is down is made up by the poll, so the bound there
//! is `CHANGES_POLL_INTERVAL` too; a lost listener is reconnected at the
//! next poll.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

use crate::contracts::ContractChange;
use crate::owners::PolicyChange;
use crate::{Database, Store, StoreError, CHANGES_CHANNEL};

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
    apply: impl FnMut(Change) + Send + 'static,
) -> Result<(), StoreError> {
    follow_every(store, CHANGES_POLL_INTERVAL, shutdown, apply).await
}

/// [`follow`], polling every `poll_interval`.
pub async fn follow_every(
    store: Store,
    poll_interval: Duration,
    shutdown: CancellationToken,
    mut apply: impl FnMut(Change) + Send + 'static,
) -> Result<(), StoreError> {
    // Listen before the first read, so that a change committed in between
    // wakes the loop rather than waiting for the poll.
    let mut wakeups = Wakeups::listen(&store).await;
    let mut cursor = Cursor::default();
    apply_changes(&store, &mut cursor, &mut apply).await?;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(poll_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => wakeups.relisten_if_lost().await,
                _ = wakeups.next() => {}
            }
            if let Err(error) = apply_changes(&store, &mut cursor, &mut apply).await {
                tracing::warn!(%error, "read policy and contract changes");
            }
        }
    });
    Ok(())
}

/// Notifications of changes committed on PostgreSQL; none on SQLite, where
/// the poll alone finds them. The listener holds one of the pool's
/// connections for as long as the follower runs.
struct Wakeups {
    pool: Option<PgPool>,
    listener: Option<PgListener>,
}

impl Wakeups {
    async fn listen(store: &Store) -> Wakeups {
        let pool = match store.database() {
            Database::Postgres(pool) => Some(pool.clone()),
            Database::Sqlite(_) => None,
        };
        let mut wakeups = Wakeups {
            pool,
            listener: None,
        };
        wakeups.relisten_if_lost().await;
        wakeups
    }

    /// Starts listening again if there is no listener; a failure leaves the
    /// poll to find changes until the next try.
    async fn relisten_if_lost(&mut self) {
        let Some(pool) = &self.pool else {
            return;
        };
        if self.listener.is_some() || pool.is_closed() {
            return;
        }
        match listen(pool).await {
            Ok(listener) => self.listener = Some(listener),
            Err(error) => tracing::warn!(%error, "listen for store changes; polling meanwhile"),
        }
    }

    /// Waits for a notification (forever without a listener). Notifications
    /// already queued are taken with it: one read covers them all.
    async fn next(&mut self) {
        let Some(listener) = &mut self.listener else {
            return std::future::pending().await;
        };
        match listener.recv().await {
            Ok(_) => while listener.next_buffered().is_some() {},
            Err(error) => {
                tracing::warn!(%error, "store change notifications lost; polling meanwhile");
                self.listener = None;
            }
        }
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGES_CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use scheduler::OwnerPolicy;
    use tokio::sync::mpsc;

    use super::*;
    use crate::contracts::TenantContract;
    use crate::testing::{Backend, TestStore};
    use crate::TenantClass;

    /// How long a test waits for a change to reach a follower: far above the
    /// poll interval, so a slow machine does not fail it, and still a bound.
    const ARRIVAL_DEADLINE: Duration = Duration::from_secs(30);

    /// Policy writes made concurrently by each of two handles.
    const WRITES_PER_HANDLE: usize = 25;

    crate::on_each_backend!(
        a_follower_sees_changes_written_by_another_handle,
        concurrent_policy_writes_reach_a_follower_each_once_in_revision_order,
    );

    /// Follows `store`, handing every change to the returned receiver.
    async fn follower(
        store: &Store,
        poll_interval: Duration,
        shutdown: &CancellationToken,
    ) -> mpsc::UnboundedReceiver<Change> {
        let (sender, receiver) = mpsc::unbounded_channel();
        follow_every(
            store.clone(),
            poll_interval,
            shutdown.clone(),
            move |change| {
                let _ = sender.send(change);
            },
        )
        .await
        .expect("follow");
        receiver
    }

    /// The next change, or a failed test once the deadline has passed.
    async fn next_change(changes: &mut mpsc::UnboundedReceiver<Change>) -> Change {
        tokio::time::timeout(ARRIVAL_DEADLINE, changes.recv())
            .await
            .expect("a change reaches the follower before the deadline")
            .expect("the follower is running")
    }

    async fn a_follower_sees_changes_written_by_another_handle(test: &TestStore) {
        let shutdown = CancellationToken::new();
        let mut changes = follower(&test.store, CHANGES_POLL_INTERVAL, &shutdown).await;
        let writer = test.another_handle().await;
        writer
            .create_tenant("acme", TenantClass::Reserved, 1)
            .await
            .expect("tenant");
        writer
            .set_tenant_contract(
                "acme",
                &TenantContract {
                    max_concurrency: Some(7),
                    ..TenantContract::default()
                },
            )
            .await
            .expect("contract");
        match next_change(&mut changes).await {
            Change::Contract(change) => {
                assert_eq!(change.tenant.name, "acme");
                assert_eq!(change.contract.max_concurrency, Some(7));
            }
            other => panic!("expected the contract, got {other:?}"),
        }

        writer.ensure_owner("alice", 2).await.expect("owner");
        writer.add_node("car-1", "alice", 2).await.expect("node");
        let policy = OwnerPolicy {
            allow_unplugged: true,
            ..OwnerPolicy::default()
        };
        writer
            .set_node_policy("car-1", &policy, 3)
            .await
            .expect("policy");
        match next_change(&mut changes).await {
            Change::Policy(change) => {
                assert_eq!(change.node, "car-1");
                assert_eq!(change.policy, policy);
            }
            other => panic!("expected the policy, got {other:?}"),
        }
        shutdown.cancel();
        writer.close().await;
    }

    async fn concurrent_policy_writes_reach_a_follower_each_once_in_revision_order(
        test: &TestStore,
    ) {
        let other = test.another_handle().await;
        let handles = [test.store.clone(), other.clone()];
        let nodes = 2 * WRITES_PER_HANDLE;
        for node in 0..nodes {
            test.store
                .add_node(&format!("car-{node}"), "", 1)
                .await
                .expect("node");
        }
        let shutdown = CancellationToken::new();
        let mut changes = follower(&test.store, CHANGES_POLL_INTERVAL, &shutdown).await;

        // Each node's policy says which node it is for (its UTC offset).
        let mut writes = tokio::task::JoinSet::new();
        for node in 0..nodes {
            let store = handles[node % handles.len()].clone();
            writes.spawn(async move {
                let offset = i16::try_from(node).expect("small");
                let policy = OwnerPolicy {
                    utc_offset_minutes: offset,
                    ..OwnerPolicy::default()
                };
                store
                    .set_node_policy(&format!("car-{node}"), &policy, 2)
                    .await
                    .expect("policy")
            });
        }
        let mut revisions = Vec::new();
        while let Some(revision) = writes.join_next().await {
            revisions.push(revision.expect("writer"));
        }
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), nodes, "no two writes share a revision");

        let mut seen = BTreeMap::new();
        let mut last_revision = 0;
        while seen.len() < nodes {
            let Change::Policy(change) = next_change(&mut changes).await else {
                panic!("only policies were written");
            };
            assert!(change.revision > last_revision, "revisions arrive in order");
            last_revision = change.revision;
            assert_eq!(
                change.node,
                format!("car-{}", change.policy.utc_offset_minutes)
            );
            assert!(
                seen.insert(change.node.clone(), change.revision).is_none(),
                "{} arrived twice",
                change.node
            );
        }
        shutdown.cancel();
        other.close().await;
    }

    /// On PostgreSQL a commit notifies followers: the change arrives although
    /// the follower would not poll for an hour.
    #[tokio::test]
    async fn on_postgres_a_commit_wakes_followers_without_waiting_for_the_poll() {
        const NO_POLL: Duration = Duration::from_secs(3600);
        let test = TestStore::new(Backend::Postgres).await;
        let shutdown = CancellationToken::new();
        let mut changes = follower(&test.store, NO_POLL, &shutdown).await;
        let writer = test.another_handle().await;
        writer
            .create_tenant("acme", TenantClass::Spot, 1)
            .await
            .expect("tenant");
        writer
            .set_tenant_contract(
                "acme",
                &TenantContract {
                    weight: Some(2),
                    ..TenantContract::default()
                },
            )
            .await
            .expect("contract");
        let Change::Contract(change) = next_change(&mut changes).await else {
            panic!("only a contract was written");
        };
        assert_eq!(change.contract.weight, Some(2));
        shutdown.cancel();
        writer.close().await;
        test.finish().await;
    }
}
