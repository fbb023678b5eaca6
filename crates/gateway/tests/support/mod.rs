//! A gateway driven in-process (`api::router` with `oneshot`) against a
//! scripted cell (`cell_api::fake::FakeCell`): no agent, no engine, no
//! socket. Only the served model's tokenizer is real (a vocab-only load of
//! the test model), so that token counts are the gateway's own.

#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use cell_api::fake::FakeCell;
use cell_api::served::{PieceTable, ServedModels};
use engine::testing::{test_model_path, TEST_MODEL_NAME, TEST_MODEL_SHA256};
use gateway::api::{self, AppState};
use gateway::billing::{Billing, BillingConfig};
use gateway::billing_idempotency::IdempotencyStore;
use gateway::metrics::Metrics;
use gateway::store::{Store, TenantClass, TenantRecord};
use serde_json::Value;
use tower::ServiceExt;

/// The served model's public name.
pub const MODEL: &str = TEST_MODEL_NAME;

pub fn served_models() -> ServedModels {
    let tokenizer = engine::Tokenizer::load(&test_model_path()).expect("load the tokenizer");
    let pieces = PieceTable::build(&tokenizer);
    let mut served = ServedModels::default();
    served.add(
        MODEL.to_string(),
        TEST_MODEL_SHA256.to_string(),
        tokenizer,
        pieces,
        2048,
        0,
    );
    served
}

pub struct Gateway {
    pub cell: Arc<FakeCell>,
    pub billing: Arc<Billing>,
    pub store: Store,
    pub tenant: TenantRecord,
    pub key: String,
    /// The key of `alice`, who owns `car-1`.
    pub owner_key: String,
    pub models: Arc<ServedModels>,
    /// What `router` serves, for a test that needs a router built otherwise
    /// (with a cloud tier, behind CORS).
    pub state: AppState,
    router: Router,
    _dir: tempfile::TempDir,
}

/// One HTTP answer, read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    pub fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

impl Gateway {
    /// A gateway with one tenant of `class`, on a fake cell with `car-1`
    /// connected.
    pub async fn start(class: TenantClass) -> Gateway {
        Gateway::start_with(class, served_models()).await
    }

    /// `start`, serving `models` (none: no tokenizer is loaded).
    pub async fn start_with(class: TenantClass, models: ServedModels) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("store");
        let (tenant, key) = store.create_tenant("acme", class, 1).await.expect("tenant");
        let (_, owner_key) = store.create_owner("alice", 1).await.expect("owner");
        store.add_node("car-1", "alice", 1).await.expect("node");
        let models = Arc::new(models);
        let names: Vec<String> = models
            .all()
            .iter()
            .map(|model| model.name.clone())
            .collect();
        let metrics = Arc::new(Metrics::default());
        let billing = Arc::new(
            Billing::open(
                &BillingConfig::embedded(),
                dir.path(),
                &names,
                store.clone(),
                Arc::clone(&metrics),
            )
            .await
            .expect("billing"),
        );
        let idempotency = IdempotencyStore::open(dir.path())
            .await
            .expect("idempotency store");
        let cell = Arc::new(FakeCell::new());
        cell.connect(&["car-1"]);
        let state = AppState::new(
            Arc::clone(&cell) as Arc<dyn cell_api::Cell>,
            metrics,
            store.clone(),
            Arc::clone(&models),
            Arc::clone(&billing),
            Arc::new(idempotency),
        );
        Gateway {
            cell,
            billing,
            store,
            tenant,
            key,
            owner_key,
            models,
            router: api::router(state.clone()),
            state,
            _dir: dir,
        }
    }

    /// Lets the tenant owe up to `dollars` (the ledger's `billing credit`).
    pub async fn allow_credit(&self, dollars: &str) {
        let ledger = self.billing.ledger();
        let tenant = gateway::billing::ledger_tenant(&self.tenant);
        ledger
            .ensure_tenant(&tenant, false)
            .await
            .expect("tenant account");
        let limit = domain::MicroUsd::parse_usd(dollars).expect("dollars");
        ledger
            .set_credit_limit(&tenant, limit)
            .await
            .expect("credit limit");
    }

    /// The tenant's ledger balance, in micro-dollars.
    pub async fn balance(&self) -> i64 {
        let tenant = gateway::billing::ledger_tenant(&self.tenant);
        let account = ledger::core::AccountId::Tenant(tenant);
        self.billing
            .ledger()
            .account(&account)
            .await
            .expect("read account")
            .map_or(0, |state| state.balance().0)
    }

    /// How many tokens the served model's tokenizer makes of `text`.
    pub fn count_tokens(&self, text: &str) -> usize {
        let model = self.models.lookup(MODEL).expect("model");
        model
            .tokenizer
            .tokenize(text, false)
            .expect("tokenize")
            .len()
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        self.send(request).await
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub async fn get(&self, path: &str) -> Answer {
        let request = Request::builder()
            .method("GET")
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key))
            .body(Body::empty())
            .expect("request");
        self.send(request).await
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        send(&self.router, request).await
    }
}

/// Applies the clawbacks pending in the store until none is: the
/// gateway's own pass runs beside this one, and an order it has committed
/// to the ledger but not yet marked applied is applied again here (the
/// ledger takes nothing twice).
pub async fn apply_clawbacks(gateway: &Gateway) {
    let clawbacks = gateway.billing.clawbacks();
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        clawbacks.apply_pending(now).await.expect("apply clawbacks");
        let requests = gateway.store.pending_clawbacks(1).await.expect("pending");
        let checks = gateway
            .store
            .pending_check_clawbacks(1)
            .await
            .expect("pending");
        if requests.is_empty() && checks.is_empty() {
            return;
        }
    }
}

/// Runs one request through `router` in-process and reads its answer whole.
pub async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 16 << 20)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        body: body.to_vec(),
    }
}
