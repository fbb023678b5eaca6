//! An Idempotency-Key retried through another gateway, on each backend: two
//! gateways in-process, each with its own pools on one store and one
//! ledger, as two gateway processes of a cluster would be, each with its
//! own scripted cell.
//!
//! The PostgreSQL half needs a server (`FLEETGRID_TEST_POSTGRES_URL`, see
//! `store::testing`); it fails with a clear message when there is none.

mod support;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use cell_api::fake::{FakeCell, Script};
use cell_api::served::ServedModels;
use gateway::api::{self, AppState};
use gateway::billing::{ledger_tenant, Billing, BillingConfig};
use gateway::billing_idempotency::{IdempotencyConfig, IdempotencyStore};
use gateway::metrics::Metrics;
use gateway::store::{Store, TenantClass, TenantRecord};
use serde_json::json;
use store::testing::TestStore;
use support::{send, Answer, MODEL};

/// The running key's lease: short, so that a dead gateway's key passes on
/// within the test, and long enough for renewals on a busy machine.
const LEASE: Duration = Duration::from_secs(2);

/// How long the test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(60);

/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(50);

store::on_each_backend!(
    a_retry_through_another_gateway_waits_for_the_first_to_die_and_is_charged_once
);

/// One gateway of the pair: its router, its cell and its idempotency store.
struct Member {
    router: Router,
    cell: Arc<FakeCell>,
    idempotency: Arc<IdempotencyStore>,
    billing: Arc<Billing>,
}

async fn member(store: Store, ledger_dir: &Path, models: &Arc<ServedModels>) -> Member {
    let metrics = Arc::new(Metrics::default());
    let billing = Arc::new(
        Billing::open(
            &BillingConfig::embedded(),
            ledger_dir,
            &[MODEL.to_string()],
            store.clone(),
            Arc::clone(&metrics),
        )
        .await
        .expect("billing"),
    );
    let idempotency = Arc::new(
        IdempotencyStore::for_store_with(&store, &IdempotencyConfig { lease: LEASE })
            .await
            .expect("idempotency store"),
    );
    let cell = Arc::new(FakeCell::new());
    cell.connect(&["car-1"]);
    let state = AppState::new(
        Arc::clone(&cell) as Arc<dyn cell_api::Cell>,
        metrics,
        store,
        Arc::clone(models),
        Arc::clone(&billing),
        Arc::clone(&idempotency),
    );
    Member {
        router: api::router(state),
        cell,
        idempotency,
        billing,
    }
}

/// The chat request every attempt sends, under the same key.
fn retried_request(key: &str, path: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("idempotency-key", "order-42")
        .body(Body::from(body.to_string()))
        .expect("request")
}

/// Waits until `condition` holds, or fails the test after `PATIENCE`.
async fn eventually<F, Fut, T>(what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not true after {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn balance(billing: &Billing, tenant: &TenantRecord) -> i64 {
    let account = ledger::core::AccountId::Tenant(ledger_tenant(tenant));
    billing
        .ledger()
        .account(&account)
        .await
        .expect("read account")
        .map_or(0, |state| state.balance().0)
}

/// Gateway A runs a request that hangs; the client retries the same key
/// through gateway B: 409 with `Retry-After` while A lives (it renews its
/// lease). A dies (its renewals stop): once its lease expired, the retry
/// through B runs and answers. The tenant is charged once, and a retry
/// through A replays B's answer without a second charge.
async fn a_retry_through_another_gateway_waits_for_the_first_to_die_and_is_charged_once(
    test: &TestStore,
) {
    let ledger_dir = tempfile::tempdir().expect("tempdir");
    let models = Arc::new(support::served_models());
    let (tenant, key) = test
        .store
        .create_tenant("acme", TenantClass::Spot, 1)
        .await
        .expect("tenant");
    test.store.create_owner("alice", 1).await.expect("owner");
    test.store
        .add_node("car-1", "alice", 1)
        .await
        .expect("node");
    let first = member(test.another_handle().await, ledger_dir.path(), &models).await;
    let second = member(test.another_handle().await, ledger_dir.path(), &models).await;
    let ledger = first.billing.ledger();
    let account = ledger_tenant(&tenant);
    ledger
        .ensure_tenant(&account, false)
        .await
        .expect("account");
    ledger
        .set_credit_limit(&account, domain::MicroUsd::parse_usd("1").expect("dollars"))
        .await
        .expect("credit");

    let path = "/v1/chat/completions";
    let body = json!({"model": MODEL, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Count."}]})
    .to_string();
    first.cell.script([Script::Hang]);
    let hanging = {
        let router = first.router.clone();
        let request = retried_request(&key, path, &body);
        tokio::spawn(async move { send(&router, request).await })
    };
    let first_cell = Arc::clone(&first.cell);
    eventually("gateway A submits the request to its cell", || {
        let submitted = first_cell.submitted().len();
        async move { (submitted == 1).then_some(()) }
    })
    .await;

    let busy = send(&second.router, retried_request(&key, path, &body)).await;
    assert_eq!(busy.status, 409, "{}", String::from_utf8_lossy(&busy.body));
    assert_eq!(
        busy.json()["error"]["code"],
        "idempotency_request_in_progress"
    );
    assert_eq!(busy.json()["error"]["type"], "invalid_request_error");
    assert!(busy.header("retry-after").is_some());
    assert!(second.cell.submitted().is_empty(), "B ran nothing");

    // A dies: its renewals stop. B's retries run once its lease expired.
    first.idempotency.stop_renewing();
    second.cell.script([Script::answer(&["one", " two"])]);
    let answer: Answer = eventually("a retry through B runs", || {
        let request = retried_request(&key, path, &body);
        let router = second.router.clone();
        async move {
            let answer = send(&router, request).await;
            (answer.status != 409).then_some(answer)
        }
    })
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "one two");
    assert_eq!(second.cell.submitted().len(), 1);

    let charged = -balance(&first.billing, &tenant).await;
    assert!(charged > 0, "B's answer was charged");
    let replay = send(&first.router, retried_request(&key, path, &body)).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.json()["id"], answer.json()["id"]);
    assert_eq!(
        -balance(&first.billing, &tenant).await,
        charged,
        "a replay is not charged again"
    );
    let usage = send(
        &first.router,
        Request::builder()
            .uri("/v1/usage")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .expect("request"),
    )
    .await
    .json();
    assert_eq!(
        usage["completion_tokens"], 2,
        "one request's tokens: {usage}"
    );
    assert_eq!(usage["charged_micro_usd"], charged);
    assert_eq!(first.cell.submitted().len(), 1, "A's cell ran it once");
    assert!(
        !hanging.is_finished(),
        "A's request still hangs, unanswered"
    );
    hanging.abort();
}
