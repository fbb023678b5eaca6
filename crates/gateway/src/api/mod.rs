//! The OpenAI-compatible HTTP gateway: routes, authentication, admission.
//!
//! `router` builds the whole app so tests can drive it with `oneshot` as
//! well as over a socket.

mod admission;
pub mod deadline;
mod error;
mod extract;
mod fields;
mod generate;
mod idempotency;
mod models;
pub mod owner;
mod owner_statement;
pub mod rerun;
mod respond;
mod route;
mod route_drive;
mod stored;
mod tokenize;
mod tools;
mod types;
mod usage;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::Semaphore;

pub use error::ApiError;
pub use idempotency::HEADER as IDEMPOTENCY_HEADER;

use crate::limits;
use crate::served::ServedModels;
use crate::store::{Store, TenantRecord};
use crate::tenant_requests::TenantRequests;
use cell_api::Cell;

#[derive(Clone)]
pub struct AppState {
    /// The cell that runs generations; the gateway knows it only through
    /// the `Cell` interface.
    pub cell: Arc<dyn Cell>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub store: Store,
    pub models: Arc<ServedModels>,
    /// Caps requests held at once; `try_acquire` failing becomes 429.
    pub inflight: Arc<Semaphore>,
    /// Admission against the tenant's money, settlement in the ledger.
    pub billing: Arc<crate::billing::Billing>,
    pub idempotency: Arc<crate::billing_idempotency::IdempotencyStore>,
    /// The cloud tier, when configured: `auto` and `cloud/...` need it.
    pub cloud: Option<Arc<crate::cloud::CloudTier>>,
    /// Each tenant's requests held at once, against its limit.
    pub tenant_requests: Arc<TenantRequests>,
    /// Longest one request may take in all (`limits::REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Other parts of this process whose metrics `/metrics` shows (a cell
    /// run in the same process).
    pub metrics_of: Vec<MetricsSource>,
}

/// Renders some part's metrics in the Prometheus text format.
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

impl AppState {
    pub fn new(
        cell: Arc<dyn Cell>,
        metrics: Arc<crate::metrics::Metrics>,
        store: Store,
        models: Arc<ServedModels>,
        billing: Arc<crate::billing::Billing>,
        idempotency: Arc<crate::billing_idempotency::IdempotencyStore>,
    ) -> AppState {
        AppState {
            cell,
            metrics,
            store,
            models,
            inflight: Arc::new(Semaphore::new(limits::INFLIGHT_REQUESTS_MAX)),
            billing,
            idempotency,
            cloud: None,
            tenant_requests: Arc::new(TenantRequests::default()),
            request_timeout: limits::REQUEST_TIMEOUT,
            metrics_of: Vec::new(),
        }
    }

    /// Shares the per-tenant request counts the contract follower updates.
    pub fn with_tenant_requests(mut self, tenant_requests: Arc<TenantRequests>) -> AppState {
        self.tenant_requests = tenant_requests;
        self
    }

    pub fn with_request_timeout(mut self, request_timeout: Duration) -> AppState {
        self.request_timeout = request_timeout;
        self
    }

    /// `/metrics` shows what `source` renders too.
    pub fn with_metrics_of(mut self, source: MetricsSource) -> AppState {
        self.metrics_of.push(source);
        self
    }

    pub fn with_cloud(mut self, cloud: Option<Arc<crate::cloud::CloudTier>>) -> AppState {
        self.cloud = cloud;
        self
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(generate::chat_completions).get(stored::list),
        )
        .route("/v1/completions", post(generate::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::retrieve))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/invoices/{month}", get(usage::invoice))
        .merge(owner::routes())
        .merge(owner_statement::routes())
        .merge(stored::routes())
        .fallback(not_found)
        // One byte more than the limit so that an over-limit body is seen
        // as such by our own check and answered with an OpenAI-shaped 400.
        .layer(DefaultBodyLimit::max(limits::REQUEST_BODY_BYTES_MAX + 1))
        .with_state(state)
}

/// The key of an `Authorization: Bearer KEY` header, or 401 naming `what`
/// is missing and how to send it (`placeholder` stands for the key).
pub(crate) fn bearer_key<'h>(
    headers: &'h HeaderMap,
    what: &str,
    placeholder: &str,
) -> Result<&'h str, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(format!(
            "you didn't provide {what}; send it as 'Authorization: Bearer {placeholder}'"
        )));
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(format!(
                "the Authorization header must be 'Bearer {placeholder}'"
            ))
        })
}

/// The tenant behind the request's bearer token, or 401; 503 with
/// `Retry-After` when the store cannot say within `KEY_LOOKUP_TIMEOUT`.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<TenantRecord, ApiError> {
    let key = bearer_key(headers, "an API key", "YOUR_KEY")?;
    let store_away = || {
        ApiError::unavailable(
            "the database is unavailable for the moment; retry",
            limits::RETRY_AFTER_DEFAULT_SECONDS,
        )
    };
    let lookup = state.store.tenant_for_api_key(key);
    match tokio::time::timeout(limits::KEY_LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(Some(tenant))) => Ok(tenant),
        Ok(Ok(None)) => Err(ApiError::unauthorized("incorrect API key provided")),
        Ok(Err(error)) if error.is_unavailable() => {
            tracing::warn!(%error, "look up API key: the store is unavailable");
            Err(store_away())
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "look up API key");
            Err(ApiError::internal())
        }
        Err(_elapsed) => {
            tracing::warn!("look up API key: the store did not answer in time");
            Err(store_away())
        }
    }
}

/// Says whether the coordinator is healthy, and nothing more to anyone
/// without a key: node names would let anyone list the enrolled vehicles.
/// The operator's own (fleet-class) tenants also see the connected nodes
/// (a cell over a broker lists at most `cell_api::limits::NODES_PUBLISHED_MAX`
/// of its vehicles by name, those running something first, and counts the
/// rest in `nodes_unlisted`); a key that is sent must be valid.
async fn health(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !headers.contains_key(header::AUTHORIZATION) {
        return Json(serde_json::json!({ "status": "ok" })).into_response();
    }
    let tenant = match authenticate(&state, &headers).await {
        Ok(tenant) => tenant,
        Err(error) => return error.into_response(),
    };
    if tenant.class != crate::store::TenantClass::Fleet {
        return Json(serde_json::json!({ "status": "ok" })).into_response();
    }
    let capacity = state.cell.capacity();
    let nodes = capacity.node_names();
    // What each listed vehicle runs now, as its cell last reported it.
    let running: serde_json::Map<String, serde_json::Value> = capacity
        .nodes
        .iter()
        .map(|node| (node.name.clone(), node.running.into()))
        .collect();
    Json(serde_json::json!({
        "status": "ok",
        "nodes_connected": capacity.nodes_connected(),
        "nodes": nodes,
        "nodes_unlisted": capacity.unlisted,
        "running": running,
    }))
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    for render in &state.metrics_of {
        text.push_str(&render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}
