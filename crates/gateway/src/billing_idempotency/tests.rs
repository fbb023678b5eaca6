//! The idempotency store on each backend, with two gateways sharing it.

use super::kept::tests::request;
use super::*;
use crate::store::testing::TestStore;

/// How long a test waits for a dropped slot's key to be released.
const RELEASE_DEADLINE: Duration = Duration::from_secs(30);

/// Pause between looks at whether a key was released.
const RELEASE_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// The lease of the takeover test: short, and long enough for its
/// renewals to run on a busy machine.
const SHORT_LEASE: Duration = Duration::from_secs(2);

store::on_each_backend!(
    keys_claimed_kept_replayed_and_released_across_two_gateways,
    a_running_key_passes_to_another_gateway_only_once_its_lease_expired,
    a_kept_response_is_committed_durably,
);

async fn gateway(store: &Store) -> Arc<IdempotencyStore> {
    Arc::new(
        IdempotencyStore::for_store(store)
            .await
            .expect("idempotency store"),
    )
}

/// Claims `key` until it runs: a slot dropped just before is released
/// in a task of its own.
async fn claim_once_released(store: &Arc<IdempotencyStore>, key: &str) -> Slot {
    let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
    loop {
        match store.claim(1, key, "h", 20).await.expect("claim") {
            Found::Run(slot) => return slot,
            Found::InProgress if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(RELEASE_CHECK_INTERVAL).await;
            }
            Found::InProgress => panic!("the dropped slot's key was never released"),
            _ => panic!("a released key is free"),
        }
    }
}

async fn keys_claimed_kept_replayed_and_released_across_two_gateways(test: &TestStore) {
    let other_store = test.another_handle().await;
    let first = gateway(&test.store).await;
    let second = gateway(&other_store).await;

    // Claimed, asked again while running, with another body, then kept
    // and replayed by the other gateway.
    let Found::Run(mut slot) = first.claim(1, "k1", "h", 10).await.expect("claim") else {
        panic!("a new key runs");
    };
    assert!(matches!(
        first.claim(1, "k1", "h", 11).await.expect("claim"),
        Found::InProgress
    ));
    assert!(matches!(
        second.claim(1, "k1", "other", 11).await.expect("claim"),
        Found::Mismatch
    ));
    let response = serde_json::json!({"id": "chatcmpl-1", "choices": []});
    slot.store_done(&response, &request()).await.expect("keep");
    match second.claim(1, "k1", "h", 12).await.expect("claim") {
        Found::Done {
            response: kept,
            settlement,
        } => {
            assert_eq!(kept, response);
            assert_eq!(settlement, Ok(request()));
        }
        _ => panic!("a kept key replays"),
    }
    // Keys are per tenant.
    let Found::Run(mut elsewhere) = second.claim(2, "k1", "h", 12).await.expect("claim") else {
        panic!("another tenant's key is its own");
    };
    elsewhere
        .store_done(&response, &request())
        .await
        .expect("keep");

    // A slot dropped before it kept anything frees its key.
    let Found::Run(dropped) = first.claim(1, "k2", "h", 13).await.expect("claim") else {
        panic!("a new key runs");
    };
    drop(dropped);
    let mut retried = claim_once_released(&first, "k2").await;
    retried
        .store_done(&response, &request())
        .await
        .expect("keep");

    other_store.close().await;
}

/// A key's lease and the database's clock, in epoch milliseconds.
async fn lease_and_now(store: &IdempotencyStore, key: &str) -> (i64, i64) {
    let leases = &store.leases;
    let sql = format!(
        "SELECT lease_expires_ms, {} FROM idempotency_keys \
         WHERE tenant_id = 1 AND idempotency_key = $1",
        leases.now_ms_sql()
    );
    on_database!(&leases.database, pool => sqlx::query_as(&sql)
        .bind(key)
        .fetch_one(pool)
        .await
        .expect("read a lease"))
}

/// Looks at `key`'s lease until `done(lease, now)`, or fails after
/// `RELEASE_DEADLINE`.
async fn until_lease(
    store: &IdempotencyStore,
    key: &str,
    what: &str,
    done: impl Fn(i64, i64) -> bool,
) {
    let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
    loop {
        let (lease, now) = lease_and_now(store, key).await;
        if done(lease, now) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(RELEASE_CHECK_INTERVAL).await;
    }
}

/// Two live gateways: one runs a key and renews its lease, so the
/// other's retries are told it is running, past the first lease. Once
/// the first stops renewing (it died), its lease expires and the retry
/// runs; the first can then no longer keep a response (and so settles
/// nothing), and every retry replays the one kept.
async fn a_running_key_passes_to_another_gateway_only_once_its_lease_expired(test: &TestStore) {
    let config = IdempotencyConfig { lease: SHORT_LEASE };
    let other_store = test.another_handle().await;
    let first = Arc::new(
        IdempotencyStore::for_store_with(&test.store, &config)
            .await
            .expect("idempotency store"),
    );
    let second = Arc::new(
        IdempotencyStore::for_store_with(&other_store, &config)
            .await
            .expect("idempotency store"),
    );
    let Found::Run(mut left) = first.claim(1, "k", "h", 10).await.expect("claim") else {
        panic!("a new key runs");
    };
    let (first_lease, _) = lease_and_now(&first, "k").await;
    until_lease(
        &first,
        "k",
        "the running key's first lease passed",
        |_, now| now > first_lease,
    )
    .await;
    assert!(
        matches!(
            second.claim(1, "k", "h", 11).await.expect("claim"),
            Found::InProgress
        ),
        "a key whose gateway renews its lease is still running"
    );

    first.stop_renewing();
    let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
    let mut taken = loop {
        match second.claim(1, "k", "h", 12).await.expect("claim") {
            Found::Run(slot) => break slot,
            Found::InProgress if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(RELEASE_CHECK_INTERVAL).await;
            }
            _ => panic!("a key whose lease expired is taken over"),
        }
    };
    let response = serde_json::json!({"id": "chatcmpl-1", "choices": []});
    assert!(
        left.store_done(&response, &request()).await.is_err(),
        "a gateway whose key was taken over keeps nothing"
    );
    drop(left);
    taken.store_done(&response, &request()).await.expect("keep");
    assert!(matches!(
        first.claim(1, "k", "h", 13).await.expect("claim"),
        Found::Done { .. }
    ));
    other_store.close().await;
}

/// A kept response survives a crash of the machine: its commit waits
/// for the disk on either backend, even where the store's own
/// connections do not (SQLite's `synchronous=NORMAL`, a PostgreSQL
/// server or URL with `synchronous_commit=off`).
async fn a_kept_response_is_committed_durably(test: &TestStore) {
    let lax = match test.postgres_options() {
        Some(options) => {
            Store::connect_postgres_with(options.options([("synchronous_commit", "off")]))
                .await
                .expect("store")
        }
        None => test.store.clone(),
    };
    let store = gateway(&lax).await;
    match &store.leases.database {
        Database::Sqlite(pool) => {
            let (synchronous,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .expect("pragma");
            assert_eq!(synchronous, 2, "synchronous=FULL");
        }
        Database::Postgres(pool) => {
            let (commit,): (String,) = sqlx::query_as("SHOW synchronous_commit")
                .fetch_one(pool)
                .await
                .expect("show");
            assert_eq!(commit, "on");
        }
    }
}
