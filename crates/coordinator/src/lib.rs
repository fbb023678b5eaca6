//! The fleetgrid coordinator: the OpenAI-compatible gateway, the agent-facing
//! gRPC service, the scheduler's driver and the embedded SQLite store, in one
//! process.
//!
//! `serve` binds both listeners, loads a tokenizer per served model and runs
//! until its shutdown token is cancelled.

pub mod api;
pub mod billing;
pub mod billing_accounts;
pub mod billing_finish;
pub mod billing_flags;
pub mod billing_holds;
pub mod billing_idempotency;
pub mod billing_meter;
pub mod changes;
pub mod cloud;
pub mod core;
pub mod grpc;
pub mod http_serve;
pub mod limits;
pub mod metrics;
pub mod node_input;
pub mod nodes;
pub mod owner_policy;
pub mod secrets;
pub mod served;
pub mod store;
pub mod store_contracts;
pub mod store_owners;
pub mod tenant_requests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::metrics::Metrics;
use crate::served::ServedModels;
use crate::store::{RequestRecord, Store};

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
    #[error("serve gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
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
    let (log_sender, log_receiver) = mpsc::channel(limits::REQUEST_LOG_CAPACITY);
    let scheduler = scheduler::Scheduler::new(config.scheduler.clone());
    let core = Arc::new(Core::new(
        scheduler,
        Arc::clone(&metrics),
        log_sender,
        Arc::new(core::SystemClock),
    ));
    core.set_kv_checkpoint_budget(config.kv_checkpoint_budget_bytes);

    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| CoordinatorError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let bound = Bound {
        http: http_listener.local_addr().map_err(CoordinatorError::Http)?,
        grpc: grpc_listener.local_addr().map_err(CoordinatorError::Http)?,
    };

    // Contracts and policies stored before start apply from the first request.
    let tenant_requests = Arc::new(tenant_requests::TenantRequests::default());
    let mut changes_cursor = changes::Cursor::default();
    changes::apply_changes(&store, &core, &tenant_requests, &mut changes_cursor).await?;
    tokio::spawn(changes::follow(
        store.clone(),
        Arc::clone(&core),
        Arc::clone(&tenant_requests),
        changes_cursor,
        shutdown.clone(),
    ));
    tokio::spawn(write_request_log(store.clone(), log_receiver));
    tokio::spawn(tick(
        Arc::clone(&core),
        config.heartbeat_timeout,
        shutdown.clone(),
    ));

    let service = grpc::AgentService {
        core: Arc::clone(&core),
        store: store.clone(),
        models: Arc::clone(&models),
        heartbeat_interval: config.heartbeat_interval,
        heartbeat_timeout: config.heartbeat_timeout,
        handshakes: Arc::default(),
    };
    let grpc_shutdown = shutdown.clone();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.heartbeat_interval))
        .max_concurrent_streams(Some(limits::AGENT_STREAMS_PER_CONNECTION_MAX))
        .initial_stream_window_size(Some(limits::AGENT_STREAM_WINDOW_BYTES))
        .add_service(grpc::HelloLimit {
            // Agents send small messages; only `Assign`s going out carry
            // whole KV checkpoints.
            inner: proto::coordinator_server::CoordinatorServer::new(service)
                .max_decoding_message_size(proto::AGENT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(proto::MESSAGE_BYTES_MAX),
            metrics: Arc::clone(&metrics),
        })
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), async move {
            grpc_shutdown.cancelled().await
        });

    let cloud = match config.cloud.clone() {
        Some(cloud) => Some(Arc::new(
            cloud::CloudTier::load(cloud, store.clone(), &billing)
                .await
                .map_err(CoordinatorError::Cloud)?,
        )),
        None => None,
    };
    let app = api::router(
        api::AppState::new(
            Arc::clone(&core),
            store.clone(),
            models,
            Arc::new(billing),
            Arc::new(idempotency),
        )
        .with_cloud(cloud)
        .with_tenant_requests(tenant_requests)
        .with_request_timeout(config.http.request_timeout),
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

    let grpc = tokio::spawn(grpc);
    let http = tokio::spawn(http);
    shutdown.cancelled().await;
    // Streams to agents and clients may stay open; give them a moment, then go.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = grpc.await;
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

async fn write_request_log(store: Store, mut records: mpsc::Receiver<RequestRecord>) {
    while let Some(record) = records.recv().await {
        if let Err(error) = store.log_request(&record).await {
            tracing::warn!(%error, request_id = %record.id, "write request log");
        }
    }
}

async fn tick(core: Arc<Core>, heartbeat_timeout: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(limits::TICK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => core.tick(heartbeat_timeout),
        }
    }
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
