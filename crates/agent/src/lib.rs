//! The agent that runs on each vehicle: it dials out to its cell, reports the node's hardware,
//! model and vehicle state, runs the generations it is assigned on the local engine and streams their
//! tokens back.
//!
//! [`run`] is the whole agent: start the engine once, then keep one bidirectional gRPC stream to a
//! cell open ([`connection`]), reconnecting with jittered exponential backoff ([`backoff`]) until
//! shut down or refused for good. The node knows a list of cells, its own first; a lost session is
//! retried on the next one, so a vehicle whose cell went down serves from another. In a cluster the
//! list comes with the node's enrolment ([`enrolment`]: one token, credential and cells, as
//! `fleetgrid nodes add` prints it). Assignments are
//! executed by an [`Executor`] (the engine, through `runner`); vehicle state comes from an adapter
//! in [`vehicle`].
//!
//! The session code does not need the engine: [`connection::serve_cells`] runs any [`Executor`], so
//! a load generator can hold many model-free sessions that speak exactly this protocol.
//!
//! **Architecture invariant:** generations never outlive the stream they were assigned on. When the
//! stream breaks, every running generation is cancelled: the coordinator hands them to other nodes,
//! and running on would only burn the owner's energy.

pub mod backoff;
pub mod connection;
pub mod enrolment;
mod runner;
pub mod tls;
pub mod vehicle;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use engine::{Engine, EngineConfig, EngineError, SpeedReport};
use models::VerifiedModel;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio_util::sync::CancellationToken;

pub use backoff::{Backoff, BackoffConfig};
pub use connection::{serve_cells, CellLink, Node, NodeIdentity, SessionStats};
pub use enrolment::Enrolment;
pub use runner::{Execution, Executor, GenerationTask, TOKENS_PER_BATCH_MAX};
pub use vehicle::{StateOfCharge, VehicleState, VehicleStateAdapter, VehicleStateSource};

/// The heartbeat interval used until the coordinator's `Welcome` says otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Everything one agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    /// The gRPC addresses of the cells this node may serve, e.g. `http://127.0.0.1:7070`, in
    /// order of preference: its own cell first, then those it fails over to. Never empty.
    pub cells: Vec<String>,
    pub node_id: String,
    /// The node's secret, as issued by `fleetgrid nodes add`; never logged. Over mTLS, the
    /// one-time token the node's first certificate is enrolled with.
    pub credential: String,
    /// The SHA-256 pin of the deployment's node authority (`sha256:HEX`, from the enrolment
    /// token): needed for `https://` cells.
    pub authority_pin: Option<String>,
    /// Where the node keeps its key and certificate for `https://` cells.
    pub identity_dir: Option<PathBuf>,
    pub vehicle_state: VehicleStateSource,
    /// The one model this node serves.
    pub model: VerifiedModel,
    /// The engine's settings; `model_path` is replaced by the model's path.
    pub engine: EngineConfig,
    /// Used until the coordinator's `Welcome` sets its own.
    pub heartbeat_interval: Duration,
    pub reconnect: BackoffConfig,
}

impl AgentConfig {
    /// A configuration with one cell and default engine settings, heartbeat and reconnect backoff;
    /// set `cells` for a node that may fail over.
    pub fn new(
        cell_url: impl Into<String>,
        node_id: impl Into<String>,
        credential: impl Into<String>,
        vehicle_state: VehicleStateSource,
        model: VerifiedModel,
    ) -> AgentConfig {
        AgentConfig {
            cells: vec![cell_url.into()],
            node_id: node_id.into(),
            credential: credential.into(),
            authority_pin: None,
            identity_dir: None,
            vehicle_state,
            engine: EngineConfig::new(model.path.clone()),
            model,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            reconnect: BackoffConfig::default(),
        }
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The credential is a secret; it must not end up in logs through a `{:?}`.
        f.debug_struct("AgentConfig")
            .field("cells", &self.cells)
            .field("node_id", &self.node_id)
            .field("credential", &"<redacted>")
            .field("authority_pin", &self.authority_pin)
            .field("identity_dir", &self.identity_dir)
            .field("vehicle_state", &self.vehicle_state)
            .field("model", &self.model.name)
            .field("model_digest", &self.model.digest.to_string())
            .field("engine", &self.engine)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("reconnect", &self.reconnect)
            .finish()
    }
}

/// Why the agent stopped (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator refused the node for a reason that retrying cannot fix.
    #[error("coordinator refused the node ({}): {reason}", .code.as_str_name())]
    Refused {
        code: proto::RefusalCode,
        reason: String,
    },
    #[error("invalid coordinator url {url:?}: {reason}")]
    InvalidCoordinatorUrl { url: String, reason: String },
    #[error("no cell to connect to: give at least one cell url")]
    NoCells,
    #[error("invalid vehicle state source {input:?}: {reason}")]
    InvalidVehicleStateSource { input: String, reason: String },
    #[error("cannot read vehicle state from {}: {cause}", .path.display())]
    ReadVehicleState {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid vehicle state in {}: {reason}", .path.display())]
    InvalidVehicleState { path: PathBuf, reason: String },
    #[error("start the engine: {0}")]
    Engine(#[from] EngineError),
    #[error("the engine's start-up thread failed: {0}")]
    EngineThread(String),
    #[error("the node's certificate: {0}")]
    Tls(String),
}

/// Runs the agent until `shutdown` is cancelled (then `Ok`) or a cell refuses the node for good
/// (bad credential, unknown node, protocol mismatch: `Err(AgentError::Refused)`, logged).
///
/// Connection failures and broken streams are not errors: the agent reconnects with backoff, to
/// the next of its cells.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let node_tls = match node_tls(&config, &shutdown).await? {
        Tls::Plain => None,
        Tls::Secure(node_tls) => Some(node_tls),
        Tls::ShutDown => return Ok(()),
    };
    let cells = config
        .cells
        .iter()
        .map(|url| CellLink::dial_with(url, node_tls.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    if cells.is_empty() {
        return Err(AgentError::NoCells);
    }
    if let Some(node_tls) = &node_tls {
        tokio::spawn(tls::keep_renewed(
            Arc::clone(node_tls),
            config.cells.clone(),
            shutdown.clone(),
        ));
    }
    let vehicle = config.vehicle_state.open(SystemTime::now())?;
    let engine_config = EngineConfig {
        model_path: config.model.path.clone(),
        ..config.engine.clone()
    };
    tracing::info!(
        node_id = %config.node_id,
        model = %config.model.name,
        path = %config.model.path.display(),
        flash_attention = %engine::FlashAttention::of(&engine_config),
        "starting the engine"
    );
    let Some((engine, speed)) = start_engine(engine_config, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(
        node_id = %config.node_id,
        prefill_tokens_per_second = speed.prefill_tokens_per_second,
        decode_tokens_per_second = speed.decode_tokens_per_second,
        "engine ready"
    );
    let node = Node::on_engine(&config, engine, &speed, vehicle, node_tls.is_some());
    let mut rng = StdRng::from_entropy();
    serve_cells(&node, &cells, config.reconnect.clone(), &mut rng, &shutdown).await
}

enum Tls {
    Plain,
    Secure(Arc<tls::NodeTls>),
    ShutDown,
}

/// The node's certificate when its cells are `https://` (enrolling it if it has none yet).
async fn node_tls(config: &AgentConfig, shutdown: &CancellationToken) -> Result<Tls, AgentError> {
    if !config.cells.iter().any(|url| url.starts_with("https://")) {
        return Ok(Tls::Plain);
    }
    let (Some(pin), Some(dir)) = (&config.authority_pin, &config.identity_dir) else {
        return Err(AgentError::Tls(
            "https:// cells need the enrolment token with the authority's pin (#sha256:...) and an identity directory".into(),
        ));
    };
    let obtained = tls::NodeTls::obtain(
        dir,
        &config.node_id,
        &config.credential,
        pin,
        &config.cells,
        shutdown,
    )
    .await?;
    Ok(obtained.map_or(Tls::ShutDown, Tls::Secure))
}

/// Loads the model and measures its speed on a blocking thread; `None` when shut down meanwhile.
async fn start_engine(
    config: EngineConfig,
    shutdown: &CancellationToken,
) -> Result<Option<(Engine, SpeedReport)>, AgentError> {
    let start = tokio::task::spawn_blocking(move || {
        let engine = Engine::start(config)?;
        let speed = engine.measure_speed()?;
        Ok::<_, EngineError>((engine, speed))
    });
    tokio::select! {
        // The blocking start-up finishes on its own and drops the engine it built.
        () = shutdown.cancelled() => Ok(None),
        joined = start => match joined {
            Ok(Ok(ready)) => Ok(Some(ready)),
            Ok(Err(error)) => Err(AgentError::Engine(error)),
            Err(join_error) => Err(AgentError::EngineThread(join_error.to_string())),
        },
    }
}
