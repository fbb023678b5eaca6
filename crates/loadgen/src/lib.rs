//! A **load generator** for cells — not a vehicle, and never to be enrolled as one in a real
//! fleet. It holds many simulated vehicles' sessions in one process to measure what a cell costs
//! per session and per heartbeat (`fleetgrid bench cluster`).
//!
//! Each simulated vehicle is a tokio task running the agent's own session code
//! ([`agent::serve_cells`]: the same `Hello`, heartbeats, assignments, cancellation and failover
//! as a vehicle) over a real gRPC stream. Instead of a model it has a [`TokenSource`]: tokens are a
//! pure function of (seed, position), emitted at a set rate, so a generation that moves between
//! simulated vehicles continues identically. Vehicles share HTTP/2 connections,
//! `sessions_per_connection` at a time (a cell accepts a few streams per connection), and start
//! with a few handshakes in flight at most, so that a cell's bound on them is not hit.
//!
//! [`measure`] starts a cell in-process, enrols the simulated vehicles and reports the cell's
//! memory per session and CPU per heartbeat rate.

pub mod measure;
pub mod tokens;
pub mod usage;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent::{serve_cells, AgentError, BackoffConfig, CellLink, Node, NodeIdentity, SessionStats};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use measure::{measure, LoadSide, MeasureConfig, Measurement};
pub use tokens::{token_at, TokenSource};

/// Sessions carried by one HTTP/2 connection unless configured: the most a cell allows
/// (`cell::limits::AGENT_STREAMS_PER_CONNECTION_MAX`); a session beyond it would wait for a place.
pub const SESSIONS_PER_CONNECTION_DEFAULT: usize =
    cell::limits::AGENT_STREAMS_PER_CONNECTION_MAX as usize;

/// How often a simulated vehicle heartbeats until a cell's `Welcome` says otherwise: as often as a
/// parked car's agent is expected to.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// Sessions that may be handshaking at once: below the cell's bound per client address
/// (`cell::limits::UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX`), so that a ramp is not refused.
pub const HANDSHAKES_IN_FLIGHT_DEFAULT: usize =
    cell::limits::UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX / 2;

/// The longest the ramp waits for earlier handshakes before it starts the next vehicle anyway (a
/// session that gets no answer retries on its own backoff).
pub const START_WAIT_MAX: Duration = agent::connection::HANDSHAKE_TIMEOUT;

/// How often the ramp looks whether earlier handshakes have been answered.
const START_POLL: Duration = Duration::from_millis(2);

/// One enrolled simulated vehicle.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrolment {
    pub node_id: String,
    /// As issued by the store; never logged.
    pub credential: String,
}

impl fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolment")
            .field("node_id", &self.node_id)
            .field("credential", &"<redacted>")
            .finish()
    }
}

/// What to simulate and where.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The cells every simulated vehicle may serve, in order of preference (a vehicle's list).
    pub cells: Vec<String>,
    /// One simulated vehicle each.
    pub vehicles: Vec<Enrolment>,
    pub sessions_per_connection: usize,
    pub handshakes_in_flight: usize,
    /// Used until a cell's `Welcome` sets its own.
    pub heartbeat_interval: Duration,
    pub tokens: TokenSource,
    pub reconnect: BackoffConfig,
    /// Seeds the vehicles' jitter generators (vehicle `i` gets `seed + i`), so that a run's
    /// reconnect pattern can be replayed.
    pub seed: u64,
}

impl LoadConfig {
    /// Defaults for everything but the cells, the vehicles and the model they claim to serve.
    pub fn new(cells: Vec<String>, vehicles: Vec<Enrolment>, tokens: TokenSource) -> LoadConfig {
        LoadConfig {
            cells,
            vehicles,
            sessions_per_connection: SESSIONS_PER_CONNECTION_DEFAULT,
            handshakes_in_flight: HANDSHAKES_IN_FLIGHT_DEFAULT,
            heartbeat_interval: HEARTBEAT_INTERVAL_DEFAULT,
            tokens,
            reconnect: BackoffConfig::default(),
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no simulated vehicles to run")]
    NoVehicles,
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("start the cell: {0}")]
    Cell(#[from] cell::CellError),
    #[error("{what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials file {}, line {line}: expected NODE_ID CREDENTIAL", .path.display())]
    CredentialsLine { path: PathBuf, line: usize },
    #[error("start the load process: {0}")]
    Spawn(std::io::Error),
    #[error("the load process ended before every session connected: {0}")]
    LoadExited(String),
    #[error("read this process's usage: {0}")]
    Usage(String),
    #[error("only {held} of {wanted} sessions connected within {within:?}")]
    NotConnected {
        held: usize,
        wanted: usize,
        within: Duration,
    },
}

/// A running load: its counters, live, and its tasks. Dropping it does not stop the simulated
/// vehicles; cancelling the `shutdown` given to [`start`] does.
pub struct Load {
    stats: Arc<SessionStats>,
    ramp: tokio::task::JoinHandle<JoinSet<Result<(), AgentError>>>,
}

/// How a load ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub vehicles: usize,
    pub welcomes: u64,
    pub sessions_lost: u64,
    pub heartbeats_sent: u64,
    /// Vehicles refused for good (bad credential, unknown node): they stopped.
    pub refused: usize,
}

impl Load {
    /// The counters of all simulated vehicles together.
    pub fn stats(&self) -> &Arc<SessionStats> {
        &self.stats
    }

    /// Waits for every simulated vehicle to stop (after shutdown, or each refused for good).
    pub async fn join(self) -> LoadReport {
        let mut report = LoadReport::default();
        if let Ok(mut sessions) = self.ramp.await {
            while let Some(ended) = sessions.join_next().await {
                report.vehicles += 1;
                if matches!(ended, Ok(Err(_))) {
                    report.refused += 1;
                }
            }
        }
        report.welcomes = self.stats.welcomes.load(Ordering::Relaxed);
        report.sessions_lost = self.stats.sessions_lost.load(Ordering::Relaxed);
        report.heartbeats_sent = self.stats.heartbeats_sent.load(Ordering::Relaxed);
        report
    }
}

/// Runs the load until `shutdown`, then reports.
pub async fn run(config: LoadConfig, shutdown: CancellationToken) -> Result<LoadReport, LoadError> {
    Ok(start(config, shutdown)?.join().await)
}

/// Starts the simulated vehicles in the background (in batches of `handshakes_in_flight`) and
/// returns at once.
pub fn start(config: LoadConfig, shutdown: CancellationToken) -> Result<Load, LoadError> {
    if config.vehicles.is_empty() {
        return Err(LoadError::NoVehicles);
    }
    if config.cells.is_empty() {
        return Err(LoadError::Agent(AgentError::NoCells));
    }
    let endpoints = config
        .cells
        .iter()
        .map(|url| agent::connection::endpoint(url).map(|endpoint| (url.clone(), endpoint)))
        .collect::<Result<Vec<_>, _>>()?;
    let stats = Arc::new(SessionStats::default());
    let ramp = tokio::spawn(ramp(config, endpoints, Arc::clone(&stats), shutdown));
    Ok(Load { stats, ramp })
}

/// Starts the vehicles with at most `handshakes_in_flight` of them waiting for an answer to their
/// `Hello` (welcomed or lost); a wait longer than `START_WAIT_MAX` starts the next anyway.
async fn ramp(
    config: LoadConfig,
    endpoints: Vec<(String, tonic::transport::Endpoint)>,
    stats: Arc<SessionStats>,
    shutdown: CancellationToken,
) -> JoinSet<Result<(), AgentError>> {
    let mut sessions = JoinSet::new();
    let per_connection = config.sessions_per_connection.max(1);
    let batch = config.handshakes_in_flight.max(1);
    let executor = Arc::new(config.tokens.clone());
    let mut links: Vec<CellLink> = Vec::new();
    for (index, vehicle) in config.vehicles.iter().enumerate() {
        if shutdown.is_cancelled() {
            break;
        }
        if index % per_connection == 0 {
            // A new set of connections (one per cell, opened on first use) for the next vehicles.
            links = endpoints
                .iter()
                .map(|(url, endpoint)| CellLink::shared(url, endpoint.connect_lazy()))
                .collect();
        }
        // At most `batch` handshakes in flight: this one starts once all but `batch - 1` of
        // those started before it were answered.
        wait_for_answers(&stats, (index + 1).saturating_sub(batch), &shutdown).await;
        let node = simulated_vehicle(vehicle, &config, &executor, &stats);
        let cells = links.clone();
        let reconnect = config.reconnect.clone();
        let seed = config.seed.wrapping_add(index as u64);
        let shutdown = shutdown.clone();
        sessions.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            serve_cells(&node, &cells, reconnect, &mut rng, &shutdown).await
        });
    }
    sessions
}

/// Waits until `answered` sessions have had an answer to their `Hello`, at most
/// `START_WAIT_MAX`.
async fn wait_for_answers(stats: &SessionStats, answered: usize, shutdown: &CancellationToken) {
    let deadline = tokio::time::Instant::now() + START_WAIT_MAX;
    let answered = answered as u64;
    while stats.welcomes.load(Ordering::Relaxed) + stats.sessions_lost.load(Ordering::Relaxed)
        < answered
    {
        if tokio::time::Instant::now() >= deadline || shutdown.is_cancelled() {
            return;
        }
        tokio::time::sleep(START_POLL).await;
    }
}

fn simulated_vehicle(
    vehicle: &Enrolment,
    config: &LoadConfig,
    executor: &Arc<TokenSource>,
    stats: &Arc<SessionStats>,
) -> Node {
    let identity = NodeIdentity {
        node_id: vehicle.node_id.clone(),
        credential: vehicle.credential.clone(),
        hardware: proto::Hardware {
            memory_budget_bytes: 0,
            threads: 1,
            decode_tokens_per_second: config.tokens.tokens_per_second,
            prefill_tokens_per_second: config.tokens.tokens_per_second * 10.0,
            parallel_sequences: 1,
            engine_version: format!("loadgen {}", env!("CARGO_PKG_VERSION")),
            cpu_kernels: String::new(),
            attention: proto::Attention::Off as i32,
        },
        models: vec![proto::CachedModel {
            name: config.tokens.model_name.clone(),
            sha256: config.tokens.model_digest.clone(),
            size_bytes: 0,
            loaded: true,
        }],
    };
    Node::new(
        identity,
        Arc::clone(executor) as Arc<dyn agent::Executor>,
        Box::new(AlwaysPlugged),
        config.heartbeat_interval,
    )
    .with_stats(Arc::clone(stats))
}

/// Plugged in and idle: what a simulated vehicle reports.
struct AlwaysPlugged;

impl agent::VehicleStateAdapter for AlwaysPlugged {
    fn current(&mut self, now: SystemTime) -> Result<agent::VehicleState, AgentError> {
        Ok(agent::VehicleState {
            plugged_in: true,
            charging: false,
            state_of_charge: agent::StateOfCharge::FULL,
            departure: None,
            temperature_c: None,
            observed_at: now,
        })
    }
}

/// Enrols `count` simulated vehicles named `PREFIX-000000`… in `store`; their credentials are
/// returned once, as `fleetgrid nodes add` prints them.
pub async fn enrol(
    store: &store::Store,
    prefix: &str,
    count: usize,
) -> Result<Vec<Enrolment>, LoadError> {
    let mut vehicles = Vec::with_capacity(count);
    for index in 0..count {
        let node_id = format!("{prefix}-{index:06}");
        let credential = store.add_node(&node_id, "", 0).await?;
        vehicles.push(Enrolment {
            node_id,
            credential,
        });
    }
    Ok(vehicles)
}

/// Writes enrolments one per line, `NODE_ID CREDENTIAL`, for a load process to read.
pub fn write_credentials(path: &Path, vehicles: &[Enrolment]) -> Result<(), LoadError> {
    let mut text = String::new();
    for vehicle in vehicles {
        text.push_str(&vehicle.node_id);
        text.push(' ');
        text.push_str(&vehicle.credential);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|source| LoadError::File {
        what: "write credentials",
        path: path.to_owned(),
        source,
    })
}

/// Reads what [`write_credentials`] wrote.
pub fn read_credentials(path: &Path) -> Result<Vec<Enrolment>, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::File {
        what: "read credentials",
        path: path.to_owned(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(node_id), Some(credential), None) => Ok(Enrolment {
                    node_id: node_id.to_owned(),
                    credential: credential.to_owned(),
                }),
                _ => Err(LoadError::CredentialsLine {
                    path: path.to_owned(),
                    line: index + 1,
                }),
            }
        })
        .collect()
}
