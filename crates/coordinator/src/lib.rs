//! `fleetgrid serve`: a gateway and a cell in one process, on the embedded
//! SQLite store.
//!
//! `serve` loads a tokenizer per served model, starts the cell (the agents'
//! gRPC listener, the scheduler, the generations) and the gateway (the HTTP
//! API) on the same store, hands the gateway the cell through the
//! `cell_api::Cell` interface, and runs until its shutdown token is
//! cancelled.

// The gateway's parts, the store and the seam, under the names the command
// line and the tests use.
pub use gateway::{
    api, billing, billing_accounts, billing_finish, billing_flags, billing_holds,
    billing_idempotency, billing_meter, cloud, core, http_serve, metrics, owner_policy, secrets,
    served, store, store_contracts, store_owners, tenant_requests,
};

/// Every bound, the gateway's and the cell's.
pub mod limits {
    pub use cell::limits::*;
    pub use gateway::limits::*;
}

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cell_api::Cell;
use store::changes::Change;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::served::ServedModels;
use crate::store::Store;

/// How long in-flight HTTP responses get to finish after shutdown is asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A model file the coordinator serves, already verified by the model store.
#[derive(Clone, Debug)]
pub struct ModelToServe {
    pub name: String,
    pub path: PathBuf,
    pub digest: String,
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub http_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub models: Vec<ModelToServe>,
    pub context_tokens: u32,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub scheduler: scheduler::SchedulerConfig,
    /// The ledger and the prices it charges.
    pub billing: billing::BillingConfig,
    /// The cloud (system-2) upstream; without one, `auto` and `cloud/...` do not exist.
    pub cloud: Option<cloud::CloudConfig>,
    /// Bytes of prompt KV caches kept for handovers (0: re-prefill always).
    pub kv_checkpoint_budget_bytes: usize,
    /// The gateway's bounds on connections, header, body and request times.
    pub http: limits::HttpLimits,
}

impl CoordinatorConfig {
    pub fn new(data_dir: PathBuf, models: Vec<ModelToServe>) -> CoordinatorConfig {
        CoordinatorConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir,
            models,
            context_tokens: limits::CONTEXT_TOKENS_DEFAULT,
            heartbeat_interval: limits::HEARTBEAT_INTERVAL_DEFAULT,
            heartbeat_timeout: limits::HEARTBEAT_TIMEOUT_DEFAULT,
            // Nodes are not trusted: their claimed slots are capped by their work, and
            // generations that stall on them move.
            scheduler: scheduler::SchedulerConfig {
                trust: Some(scheduler::TrustConfig::default()),
                ..scheduler::SchedulerConfig::default()
            },
            billing: billing::BillingConfig::embedded(),
            cloud: None,
            kv_checkpoint_budget_bytes: limits::KV_CHECKPOINT_BYTES_BUDGET,
            http: limits::HttpLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("open store: {0}")]
    Store(#[from] store::StoreError),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("load tokenizer of {model}: {source}")]
    Tokenizer {
        model: String,
        source: engine::EngineError,
    },
    #[error("cell: {0}")]
    Cell(#[from] cell::CellError),
    #[error("serve HTTP: {0}")]
    Http(std::io::Error),
    #[error("no model to serve")]
    NoModels,
    #[error("cloud upstream: {0}")]
    Cloud(String),
    #[error("billing: {0}")]
    Billing(#[from] billing::BillingError),
    #[error("open the idempotency store: {0}")]
    Idempotency(sqlx::Error),
}

/// The addresses the coordinator actually listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

impl Bound {
    const ANNOUNCEMENT_PREFIX: &'static str = "fleetgrid listening ";

    /// The line `fleetgrid serve` prints once it listens; `demo`, the
    /// benchmarks and the tests read it back with `parse_announcement`.
    pub fn announcement(&self) -> String {
        format!(
            "{}http={} grpc={}",
            Self::ANNOUNCEMENT_PREFIX,
            self.http,
            self.grpc
        )
    }

    pub fn parse_announcement(line: &str) -> Option<Bound> {
        let rest = line.trim().strip_prefix(Self::ANNOUNCEMENT_PREFIX)?;
        let mut http = None;
        let mut grpc = None;
        for field in rest.split_whitespace() {
            match field.split_once('=')? {
                ("http", addr) => http = addr.parse().ok(),
                ("grpc", addr) => grpc = addr.parse().ok(),
                _ => {}
            }
        }
        Some(Bound {
            http: http?,
            grpc: grpc?,
        })
    }
}

/// Runs the coordinator until `shutdown` is cancelled. `ready` is called once
/// both listeners are bound.
pub async fn serve(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(Bound),
) -> Result<(), CoordinatorError> {
    let store = Store::open(&config.data_dir).await?;
    let models = Arc::new(load_models(&config).await?);
    let metrics = Arc::new(Metrics::default());
    let model_names: Vec<String> = config.models.iter().map(|m| m.name.clone()).collect();
    let billing = billing::Billing::open(
        &config.billing,
        &config.data_dir,
        &model_names,
        store.clone(),
        Arc::clone(&metrics),
    )
    .await?;
    let idempotency = billing_idempotency::IdempotencyStore::open(&config.data_dir)
        .await
        .map_err(CoordinatorError::Idempotency)?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.http_listen,
            source,
        })?;

    // The cell: the agents' sessions, the scheduler and the generations.
    let cell = cell::start(
        cell::CellConfig {
            grpc_listen: config.grpc_listen,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            scheduler: config.scheduler.clone(),
            kv_checkpoint_budget_bytes: config.kv_checkpoint_budget_bytes,
        },
        store.clone(),
        Arc::clone(&models),
        shutdown.clone(),
    )
    .await?;
    let bound = Bound {
        http: http_listener.local_addr().map_err(CoordinatorError::Http)?,
        grpc: cell.grpc,
    };

    // The gateway follows contracts for its per-tenant request bound.
    let tenant_requests = Arc::new(tenant_requests::TenantRequests::default());
    let limits_of_tenants = Arc::clone(&tenant_requests);
    store::changes::follow(store.clone(), shutdown.clone(), move |change| {
        if let Change::Contract(change) = change {
            limits_of_tenants.set_limit(change.tenant.id, change.contract.max_concurrency);
        }
    })
    .await?;

    let cloud = match config.cloud.clone() {
        Some(cloud) => Some(Arc::new(
            cloud::CloudTier::load(cloud, store.clone(), &billing)
                .await
                .map_err(CoordinatorError::Cloud)?,
        )),
        None => None,
    };
    let cell_metrics = Arc::clone(&cell.metrics);
    let app = api::router(
        api::AppState::new(
            Arc::clone(&cell.core) as Arc<dyn Cell>,
            Arc::clone(&metrics),
            store.clone(),
            models,
            Arc::new(billing),
            Arc::new(idempotency),
        )
        .with_cloud(cloud)
        .with_tenant_requests(tenant_requests)
        .with_request_timeout(config.http.request_timeout)
        .with_metrics_of(Arc::new(move || cell_metrics.render())),
    );
    let http = http_serve::serve(
        http_listener,
        app,
        store,
        config.http,
        Arc::clone(&metrics),
        shutdown.clone(),
    );
    ready(bound);
    tracing::info!(http = %bound.http, grpc = %bound.grpc, "coordinator listening");

    let http = tokio::spawn(http);
    shutdown.cancelled().await;
    // Streams to agents and clients may stay open; give them a moment, then go.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = cell.task.await;
        let _ = http.await;
    })
    .await;
    Ok(())
}

async fn load_models(config: &CoordinatorConfig) -> Result<ServedModels, CoordinatorError> {
    if config.models.is_empty() {
        return Err(CoordinatorError::NoModels);
    }
    let mut served = ServedModels::default();
    let created = core::now_ms().0 / 1000;
    for model in &config.models {
        let path = model.path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            engine::Tokenizer::load(&path).map(|tokenizer| {
                let pieces = served::PieceTable::build(&tokenizer);
                (tokenizer, pieces)
            })
        })
        .await
        .map_err(|error| CoordinatorError::Tokenizer {
            model: model.name.clone(),
            source: engine::EngineError::ModelLoad(error.to_string()),
        })?;
        let (tokenizer, pieces) = loaded.map_err(|source| CoordinatorError::Tokenizer {
            model: model.name.clone(),
            source,
        })?;
        let context = config.context_tokens.min(tokenizer.context_train().max(1));
        served.add(
            model.name.clone(),
            model.digest.clone(),
            tokenizer,
            pieces,
            context,
            created,
        );
    }
    Ok(served)
}

#[cfg(test)]
mod tests {
    use super::Bound;

    #[test]
    fn the_listening_announcement_round_trips() {
        let bound = Bound {
            http: "127.0.0.1:8080".parse().expect("addr"),
            grpc: "[::1]:7070".parse().expect("addr"),
        };
        assert_eq!(
            Bound::parse_announcement(&bound.announcement()),
            Some(bound)
        );
        assert_eq!(
            Bound::parse_announcement("fleetgrid listening http=x grpc=y"),
            None
        );
        assert_eq!(Bound::parse_announcement("something else"), None);
    }
}
