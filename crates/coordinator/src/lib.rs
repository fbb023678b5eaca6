//! The server roles, wired: `fleetgrid serve`, a gateway and a cell in one
//! process on the embedded SQLite store, and `fleetgrid
//! gateway` and `fleetgrid cell`, the same halves as processes of a cluster
//! on NATS and PostgreSQL.
//!
//! `serve` loads a tokenizer per served model, starts the cell (the agents'
//! gRPC listener, the scheduler, the generations) and the gateway (the HTTP
//! API) on the same store, hands the gateway the cell through the
//! `cell_api::Cell` interface, and runs until its shutdown token is
//! cancelled. A cluster's gateway gets the cells through the same interface,
//! carried over NATS by the `bus` crate.

// The gateway's parts, the store and the seam, under the names the command
// line and the tests use.
pub use gateway::{
    api, billing, billing_accounts, billing_finish, billing_flags, billing_holds,
    billing_idempotency, billing_meter, cloud, core, http_serve, metrics, owner_policy, secrets,
    served, store, store_contracts, store_owners, tenant_requests,
};

mod cell_metrics;
mod cluster;

pub use cluster::{
    serve_cell, serve_gateway, CellRole, Cluster, Listening, NATS_CELL_NAME_PREFIX,
    NATS_GATEWAY_NAME,
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
    /// Answers of a new vehicle verified before its rate starts to fall.
    pub verification_probation: u32,
    /// Agents over mTLS (`cell::tls`); `None`: plain gRPC with credentials.
    pub agent_tls: Option<cell::tls::AgentTlsConfig>,
    /// The gateway's bounds on connections, header, body and request times.
    pub http: limits::HttpLimits,
    /// Prefix affinity: a cell's scheduler prefers the vehicle holding the
    /// longest head of a prompt, and a gateway the cell holding it.
    pub prefix_affinity: bool,
    /// How the gateway holds a running Idempotency-Key.
    pub idempotency: billing_idempotency::IdempotencyConfig,
    /// The browser origins the gateway answers cross-origin (off: none).
    pub cors: http_serve::Cors,
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
            verification_probation: cell::CellConfig::new(([127, 0, 0, 1], 0).into())
                .verification_probation,
            agent_tls: None,
            http: limits::HttpLimits::default(),
            prefix_affinity: true,
            idempotency: billing_idempotency::IdempotencyConfig::default(),
            cors: http_serve::Cors::Off,
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
    #[error("nats: {0}")]
    Nats(String),
    #[error("advertise the cell: {0}")]
    Advertise(String),
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
    let idempotency =
        billing_idempotency::IdempotencyStore::open_with(&config.data_dir, &config.idempotency)
            .await
            .map_err(CoordinatorError::Idempotency)?;
    let gateway = Gateway::open(&config, store.clone(), Arc::clone(&models), idempotency).await?;
    let http_listener = bind_http(config.http_listen).await?;

    // The cell: the agents' sessions, the scheduler and the generations.
    let cell = cell::start(
        cell_config(&config),
        store.clone(),
        Arc::clone(&models),
        shutdown.clone(),
    )
    .await?;
    let bound = Bound {
        http: http_listener.local_addr().map_err(CoordinatorError::Http)?,
        grpc: cell.grpc,
    };
    let cell_metrics = Arc::clone(&cell.metrics);
    let http = gateway
        .serve(
            http_listener,
            Arc::clone(&cell.core) as Arc<dyn Cell>,
            Some(Arc::new(move || cell_metrics.render())),
            shutdown.clone(),
        )
        .await?;
    ready(bound);
    tracing::info!(http = %bound.http, grpc = %bound.grpc, "coordinator listening");

    shutdown.cancelled().await;
    // Streams to agents and clients may stay open; give them a moment, then go.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = cell.task.await;
        let _ = http.await;
    })
    .await;
    Ok(())
}

/// The cell's part of a coordinator's configuration.
fn cell_config(config: &CoordinatorConfig) -> cell::CellConfig {
    cell::CellConfig {
        grpc_listen: config.grpc_listen,
        heartbeat_interval: config.heartbeat_interval,
        heartbeat_timeout: config.heartbeat_timeout,
        scheduler: scheduler::SchedulerConfig {
            prefix_affinity: config.prefix_affinity,
            ..config.scheduler.clone()
        },
        kv_checkpoint_budget_bytes: config.kv_checkpoint_budget_bytes,
        energy_prices: energy_prices(&config.billing),
        verification_probation: config.verification_probation,
        agent_tls: config.agent_tls.clone(),
    }
}

/// The price sheet's tariffs as the cell's placement sees them: each
/// vehicle's day-mean price per kWh.
fn energy_prices(billing: &billing::BillingConfig) -> cell::nodes::EnergyPrices {
    let clamp = |price: i64| u32::try_from(price.max(0)).unwrap_or(u32::MAX);
    let (default, own) = billing.prices.day_mean_prices();
    cell::nodes::EnergyPrices {
        default: clamp(default.0),
        by_node: own
            .into_iter()
            .map(|(node, price)| (node.as_str().to_owned(), clamp(price.0)))
            .collect(),
    }
}

async fn bind_http(addr: SocketAddr) -> Result<TcpListener, CoordinatorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CoordinatorError::Bind { addr, source })
}

/// A gateway's own state: the store, billing, idempotency keys, the cloud
/// tier and the per-tenant request bound. It reaches its cell (in this
/// process or over the bus) only through `Arc<dyn Cell>`.
pub(crate) struct Gateway {
    store: Store,
    models: Arc<ServedModels>,
    metrics: Arc<Metrics>,
    billing: Arc<billing::Billing>,
    idempotency: Arc<billing_idempotency::IdempotencyStore>,
    cloud: Option<Arc<cloud::CloudTier>>,
    tenant_requests: Arc<tenant_requests::TenantRequests>,
    http: limits::HttpLimits,
    cors: http_serve::Cors,
}

impl Gateway {
    pub(crate) async fn open(
        config: &CoordinatorConfig,
        store: Store,
        models: Arc<ServedModels>,
        idempotency: billing_idempotency::IdempotencyStore,
    ) -> Result<Gateway, CoordinatorError> {
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
        let cloud = match config.cloud.clone() {
            Some(cloud) => Some(Arc::new(
                cloud::CloudTier::load(cloud, store.clone(), &billing)
                    .await
                    .map_err(CoordinatorError::Cloud)?,
            )),
            None => None,
        };
        Ok(Gateway {
            store,
            models,
            metrics,
            billing: Arc::new(billing),
            idempotency: Arc::new(idempotency),
            cloud,
            tenant_requests: Arc::new(tenant_requests::TenantRequests::default()),
            http: config.http,
            cors: config.cors.clone(),
        })
    }

    /// Follows the contracts for the per-tenant request bound, then serves
    /// the HTTP API on `listener` until `shutdown`; `cell_metrics` adds an
    /// in-process cell's families to `/metrics`.
    pub(crate) async fn serve(
        self,
        listener: TcpListener,
        cell: Arc<dyn Cell>,
        cell_metrics: Option<api::MetricsSource>,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, CoordinatorError> {
        let limits_of_tenants = Arc::clone(&self.tenant_requests);
        store::changes::follow(self.store.clone(), shutdown.clone(), move |change| {
            if let Change::Contract(change) = change {
                limits_of_tenants.set_limit(change.tenant.id, change.contract.max_concurrency);
            }
        })
        .await?;
        let mut state = api::AppState::new(
            cell,
            Arc::clone(&self.metrics),
            self.store.clone(),
            self.models,
            self.billing,
            self.idempotency,
        )
        .with_cloud(self.cloud)
        .with_tenant_requests(self.tenant_requests)
        .with_request_timeout(self.http.request_timeout);
        if let Some(cell_metrics) = cell_metrics {
            state = state.with_metrics_of(cell_metrics);
        }
        // Clawed-back stored completions whose tenants asked are re-run by
        // every gateway, for as long as it serves.
        let reruns = api::rerun::Reruns::new(state.clone()).spawn();
        let http = http_serve::serve(
            listener,
            api::router(state),
            self.store,
            self.http,
            self.cors,
            self.metrics,
            shutdown,
        );
        Ok(tokio::spawn(async move {
            let _reruns = reruns;
            http.await
        }))
    }
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
