//! A fleetgrid cell: the vehicles' agent sessions (gRPC), the scheduler that
//! places generations on them, and what the scheduler does not know — every
//! in-flight generation's prompt, committed tokens and KV checkpoints.
//!
//! A gateway reaches a cell only through `cell_api::Cell`, which `Core`
//! implements. `start` binds the agents' listener and runs the cell's tasks
//! (the gRPC service, the scheduler's tick, the store's change feed and the
//! request log) until its shutdown token is cancelled.

pub mod core;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod node_input;
pub mod nodes;
pub mod testing;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cell_api::served::ServedModels;
use store::changes::Change;
use store::{RequestRecord, Store};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct CellConfig {
    /// Where agents connect.
    pub grpc_listen: SocketAddr,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub scheduler: scheduler::SchedulerConfig,
    /// Bytes of prompt KV caches kept for handovers (0: re-prefill always).
    pub kv_checkpoint_budget_bytes: usize,
    /// What each vehicle's electricity costs, which placement prefers the
    /// cheaper of otherwise equal vehicles by.
    pub energy_prices: nodes::EnergyPrices,
    /// Answers of a new vehicle verified before its rate starts to fall
    /// (`trust::VerificationPolicy::probation`).
    pub verification_probation: u32,
    /// Agents over mTLS, with certificates from the deployment's node
    /// authority (`tls`); `None`: plain gRPC, each node's credential in its
    /// `Hello`, for one machine's loopback.
    pub agent_tls: Option<tls::AgentTlsConfig>,
}

impl CellConfig {
    pub fn new(grpc_listen: SocketAddr) -> CellConfig {
        CellConfig {
            grpc_listen,
            heartbeat_interval: limits::HEARTBEAT_INTERVAL_DEFAULT,
            heartbeat_timeout: limits::HEARTBEAT_TIMEOUT_DEFAULT,
            // Nodes are not trusted: their claimed slots are capped by their
            // work, and generations that stall on them move.
            scheduler: scheduler::SchedulerConfig {
                trust: Some(scheduler::TrustConfig::default()),
                ..scheduler::SchedulerConfig::default()
            },
            kv_checkpoint_budget_bytes: limits::KV_CHECKPOINT_BYTES_BUDGET,
            energy_prices: nodes::EnergyPrices::default(),
            verification_probation: trust::VerificationPolicy::default().probation,
            agent_tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("read policy and contract changes: {0}")]
    Store(#[from] store::StoreError),
    #[error("agents' TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("agents' TLS configuration: {0}")]
    TlsConfig(#[from] tonic::transport::Error),
}

/// A running cell.
pub struct Running {
    pub core: Arc<Core>,
    pub metrics: Arc<Metrics>,
    /// The address agents connect to.
    pub grpc: SocketAddr,
    /// The gRPC service; ends after shutdown.
    pub task: JoinHandle<()>,
}

/// Binds the agents' listener and starts the cell. Policies and contracts
/// stored before start apply from the first request.
pub async fn start(
    config: CellConfig,
    store: Store,
    models: Arc<ServedModels>,
    shutdown: CancellationToken,
) -> Result<Running, CellError> {
    let metrics = Arc::new(Metrics::default());
    let (log_sender, log_receiver) = mpsc::channel(limits::REQUEST_LOG_CAPACITY);
    let core = Arc::new(Core::new(
        scheduler::Scheduler::new(config.scheduler.clone()),
        Arc::clone(&models),
        Arc::clone(&metrics),
        log_sender,
        Arc::new(core::SystemClock),
    ));
    core.set_kv_checkpoint_budget(config.kv_checkpoint_budget_bytes);
    core.set_energy_prices(config.energy_prices.clone());
    core.set_verification_probation(config.verification_probation);
    let listener = TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| CellError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let grpc = listener.local_addr().map_err(|source| CellError::Bind {
        addr: config.grpc_listen,
        source,
    })?;

    let applying = Arc::clone(&core);
    store::changes::follow(
        store.clone(),
        shutdown.clone(),
        move |change| match change {
            Change::Contract(change) => applying.tenant_configured(
                change.tenant.id,
                change.contract.config(change.tenant.class),
            ),
            Change::Policy(change) => applying.node_policy_changed(&change.node, change.policy),
        },
    )
    .await?;
    tokio::spawn(write_request_log(store.clone(), log_receiver));
    tokio::spawn(write_trust(
        Arc::clone(&core),
        store.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(tick(
        Arc::clone(&core),
        config.heartbeat_timeout,
        shutdown.clone(),
    ));

    let agent_tls = match &config.agent_tls {
        Some(tls_config) => Some(Arc::new(
            tls::CellTls::prepare(&store, tls_config, Arc::clone(&metrics)).await?,
        )),
        None => None,
    };
    if let Some(agent_tls) = &agent_tls {
        tokio::spawn(tls::watch_revocations(
            store.clone(),
            Arc::clone(agent_tls),
            shutdown.clone(),
        ));
    }
    let enrolment = agent_tls.as_ref().map(|agent_tls| {
        proto::enrolment_server::EnrolmentServer::new(tls::EnrolmentService::new(
            store.clone(),
            Arc::clone(agent_tls),
        ))
        .max_decoding_message_size(limits::ENROLMENT_MESSAGE_BYTES_MAX)
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(agent_tls) = &agent_tls {
        builder = builder.tls_config(agent_tls.server.clone())?;
    }
    let service = grpc::AgentService {
        core: Arc::clone(&core),
        store,
        heartbeat_interval: config.heartbeat_interval,
        heartbeat_timeout: config.heartbeat_timeout,
        handshakes: Arc::default(),
        shutdown: shutdown.clone(),
        tls: agent_tls,
    };
    let server = builder
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
        .add_optional_service(enrolment)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.cancelled().await
        });
    let task = tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(%error, "serve agents");
        }
    });
    Ok(Running {
        core,
        metrics,
        grpc,
        task,
    })
}

async fn write_request_log(store: Store, mut records: mpsc::Receiver<RequestRecord>) {
    while let Some(record) = records.recv().await {
        if let Err(error) = store.log_request(&record).await {
            tracing::warn!(%error, request_id = %record.id, "write request log");
        }
    }
}

/// Records the nodes' trust, their quarantines and the checks they answered
/// in the store as they change, where the owner API, the books and every
/// cell read them.
async fn write_trust(core: Arc<Core>, store: Store, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(limits::TRUST_WRITE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = interval.tick() => false,
        };
        let now = core::now_ms().0;
        for trust in core.take_trust_changes() {
            // A quarantine is recorded with its reason below, and lifted only
            // by the operator: a later count must not record it again.
            if matches!(trust.state, trust::TrustState::Quarantined { .. }) {
                continue;
            }
            let record = store::trust::TrustRecord {
                node: trust.node.clone(),
                state: trust_state_name(&trust.state).to_owned(),
                verified: i64::try_from(trust.verified).unwrap_or(i64::MAX),
                passed: i64::try_from(trust.passed).unwrap_or(i64::MAX),
                reason: None,
                quarantined_ms: None,
                updated_ms: now,
            };
            if let Err(error) = store.record_trust(&record).await {
                tracing::warn!(%error, node_id = %trust.node, "record node trust");
            }
        }
        let checks = core.take_checks();
        if !checks.is_empty() {
            if let Err(error) = store.record_checks(&checks).await {
                // Kept in the cell, to be recorded on the next try: the
                // verifiers are paid once the books read them.
                tracing::warn!(%error, checks = checks.len(), "record answered checks");
                core.requeue_checks(checks);
            }
        }
        for notice in core.take_quarantines() {
            if notice.forgotten > 0 {
                tracing::warn!(
                    node_id = %notice.node,
                    forgotten = notice.forgotten,
                    "suspect generations too old to name are not clawed back"
                );
            }
            let recorded = store
                .quarantine_node(&notice.node, &notice.reason, &notice.suspects, notice.at_ms)
                .await;
            match recorded {
                Ok(()) => core.quarantine_recorded(&notice.node),
                Err(error) => {
                    // Kept in the cell: it still refuses the node, and the
                    // quarantine is recorded on the next try.
                    tracing::error!(%error, node_id = %notice.node, "record quarantine");
                    core.requeue_quarantine(notice);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// The name the store and the owner API give a trust state.
pub fn trust_state_name(state: &trust::TrustState) -> &'static str {
    match state {
        trust::TrustState::Probation { .. } => "probation",
        trust::TrustState::Trusted { .. } => "trusted",
        trust::TrustState::Quarantined { .. } => "quarantined",
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
