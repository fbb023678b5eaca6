//! The agent's one long-lived stream to a cell (`Coordinator.Session`): dial, `Hello`, wait for
//! `Welcome` or `Refusal`, then heartbeat and serve assignments until the stream breaks; reconnect
//! with backoff, to the next cell of its list ([`serve_cells`]).
//!
//! Outgoing messages of a session (hello, heartbeats, tokens, results) all go through one bounded
//! queue into the request stream, so a slow link pushes back on token forwarding instead of growing
//! memory.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::{Engine, SpeedReport};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_client::CoordinatorClient;
use proto::coordinator_message::Kind as CoordinatorKind;
use proto::{AgentMessage, RefusalCode};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

use crate::backoff::{Backoff, BackoffConfig};
use crate::runner::{EngineExecutor, Executor, Runner};
use crate::tls::NodeTls;
use crate::vehicle::{VehicleReader, VehicleStateAdapter};
use crate::{AgentConfig, AgentError};

/// Outgoing messages queued for the request stream of one session. Tokens of all running
/// generations share it; when it is full, token forwarding waits (and heartbeats are skipped).
pub const OUTBOUND_MESSAGES_MAX: usize = 256;

/// How long establishing the TCP/HTTP-2 connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the coordinator may take to answer `Hello` with `Welcome` or `Refusal`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// HTTP/2 pings find a dead link (a car driving out of Wi-Fi range) even when no message flows.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A ping unanswered for this long closes the connection.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Bounds on the heartbeat interval a coordinator may ask for: a faulty one must not make the agent
/// spin, nor go silent for long.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// What a node says about itself in its `Hello`, the same in every session.
#[derive(Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    /// The node's secret, as issued by `fleetgrid nodes add`; never logged.
    pub credential: String,
    pub hardware: proto::Hardware,
    pub models: Vec<proto::CachedModel>,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("credential", &"<redacted>")
            .field("hardware", &self.hardware)
            .field("models", &self.models)
            .finish()
    }
}

/// Counts of what a node's sessions did, shared by any number of nodes (a load generator keeps
/// one for all of its simulated vehicles).
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Sessions welcomed by a cell and not yet ended.
    pub sessions_open: AtomicU64,
    /// Every `Welcome` received.
    pub welcomes: AtomicU64,
    /// Sessions that ended other than by shutdown or refusal, after or before `Welcome`.
    pub sessions_lost: AtomicU64,
    /// Heartbeats queued for sending.
    pub heartbeats_sent: AtomicU64,
    /// Nodes refused for good (unknown node, bad credential, protocol mismatch): they stopped.
    pub refused: AtomicU64,
}

/// Ordering for the statistics' counters: they order nothing else.
const STATS_ORDER: Ordering = Ordering::Relaxed;

/// What stays the same across the sessions of one agent.
pub struct Node {
    identity: NodeIdentity,
    default_heartbeat: Duration,
    executor: Arc<dyn Executor>,
    vehicle: VehicleReader,
    stats: Arc<SessionStats>,
}

impl Node {
    /// A node that runs its assignments on `executor` and reads its vehicle from `vehicle`;
    /// `default_heartbeat` applies until a cell's `Welcome` asks for another interval.
    pub fn new(
        identity: NodeIdentity,
        executor: Arc<dyn Executor>,
        vehicle: Box<dyn VehicleStateAdapter>,
        default_heartbeat: Duration,
    ) -> Node {
        Node {
            identity,
            default_heartbeat,
            executor,
            vehicle: VehicleReader::new(vehicle),
            stats: Arc::default(),
        }
    }

    /// Counts this node's sessions into `stats` (shared with other nodes) instead of its own.
    pub fn with_stats(mut self, stats: Arc<SessionStats>) -> Node {
        self.stats = stats;
        self
    }

    pub fn stats(&self) -> &Arc<SessionStats> {
        &self.stats
    }

    pub fn node_id(&self) -> &str {
        &self.identity.node_id
    }

    /// The vehicle's node: its hardware and model as the engine reports them.
    pub(crate) fn on_engine(
        config: &AgentConfig,
        engine: Engine,
        speed: &SpeedReport,
        vehicle: Box<dyn VehicleStateAdapter>,
        over_tls: bool,
    ) -> Node {
        let info = engine.info();
        let hardware = proto::Hardware {
            memory_budget_bytes: config.engine.memory_budget_bytes,
            threads: info.threads,
            decode_tokens_per_second: speed.decode_tokens_per_second,
            prefill_tokens_per_second: speed.prefill_tokens_per_second,
            parallel_sequences: info.parallel_sequences,
            engine_version: info.engine_version.clone(),
            cpu_kernels: info.cpu_kernels.clone(),
            attention: crate::runner::attention_on_the_wire(info.flash_attention) as i32,
        };
        let model_digest = config.model.digest.to_string();
        let models = vec![proto::CachedModel {
            name: config.model.name.clone(),
            sha256: model_digest.clone(),
            size_bytes: config.model.size_bytes,
            loaded: true,
        }];
        let identity = NodeIdentity {
            node_id: config.node_id.clone(),
            // Over mTLS the certificate authenticates the node; the token was spent enrolling it.
            credential: if over_tls {
                String::new()
            } else {
                config.credential.clone()
            },
            hardware,
            models,
        };
        let executor = Arc::new(EngineExecutor {
            engine,
            model_digest,
        });
        Node::new(identity, executor, vehicle, config.heartbeat_interval)
    }

    async fn hello(&self) -> AgentMessage {
        let state = self.vehicle.read().await;
        AgentMessage {
            kind: Some(AgentKind::Hello(proto::Hello {
                protocol_version: proto::PROTOCOL_VERSION,
                node_id: self.identity.node_id.clone(),
                credential: self.identity.credential.clone(),
                hardware: Some(self.identity.hardware.clone()),
                models: self.identity.models.clone(),
                state: Some(state.to_proto()),
            })),
        }
    }

    /// The heartbeat interval the coordinator asked for, within bounds; its zero means "no opinion".
    fn heartbeat_interval(&self, welcome: &proto::Welcome) -> Duration {
        let asked = match welcome.heartbeat_interval_ms {
            0 => self.default_heartbeat,
            ms => Duration::from_millis(u64::from(ms)),
        };
        asked.clamp(HEARTBEAT_INTERVAL_MIN, HEARTBEAT_INTERVAL_MAX)
    }
}

/// Checks a cell's URL and sets the connection's timeouts and keep-alive.
pub fn endpoint(url: &str) -> Result<Endpoint, AgentError> {
    let invalid = |reason: String| AgentError::InvalidCoordinatorUrl {
        url: url.to_owned(),
        reason,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(invalid(
            "expected https://HOST:PORT (mTLS) or http://HOST:PORT".to_owned(),
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| invalid(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        // Tokens are small and latency matters more than packet count.
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// One cell a node may hold its session with.
#[derive(Clone, Debug)]
pub struct CellLink {
    url: String,
    link: Link,
}

#[derive(Clone, Debug)]
enum Link {
    /// A new HTTP/2 connection for every session: a vehicle's own link; over mTLS with the node's
    /// current certificate when it has one.
    Dial(Box<Endpoint>, Option<Arc<NodeTls>>),
    /// Sessions share one HTTP/2 connection (which reconnects by itself): many simulated vehicles
    /// in one load-generator process.
    Shared(Channel),
}

impl CellLink {
    /// A cell dialled afresh for every session, in plain gRPC.
    pub fn dial(url: &str) -> Result<CellLink, AgentError> {
        CellLink::dial_with(url, None)
    }

    /// A cell dialled afresh for every session, over mTLS with `tls` when given: an `https://`
    /// URL needs it, an `http://` one must not have it.
    pub fn dial_with(url: &str, tls: Option<Arc<NodeTls>>) -> Result<CellLink, AgentError> {
        let secure = url.starts_with("https://");
        if secure != tls.is_some() {
            return Err(AgentError::InvalidCoordinatorUrl {
                url: url.to_owned(),
                reason: if secure {
                    "an https:// cell needs the node's certificate: give the enrolment token \
                     that carries the authority's pin (#sha256:...)"
                        .to_owned()
                } else {
                    "a node enrolled for mTLS dials https:// cells".to_owned()
                },
            });
        }
        Ok(CellLink {
            url: url.to_owned(),
            link: Link::Dial(Box::new(endpoint(url)?), tls),
        })
    }

    /// A cell reached over `channel`, which other sessions may share; the cell bounds the
    /// sessions one connection carries, and a session beyond that waits for a place.
    pub fn shared(url: &str, channel: Channel) -> CellLink {
        CellLink {
            url: url.to_owned(),
            link: Link::Shared(channel),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<Channel, String> {
        match &self.link {
            Link::Dial(endpoint, None) => endpoint
                .connect()
                .await
                .map_err(|error| format!("connect: {}", error_chain(&error))),
            Link::Dial(endpoint, Some(tls)) => (**endpoint)
                .clone()
                .tls_config(tls.client_config())
                .map_err(|error| format!("tls: {}", error_chain(&error)))?
                .connect()
                .await
                .map_err(|error| format!("connect: {}", error_chain(&error))),
            Link::Shared(channel) => Ok(channel.clone()),
        }
    }
}

/// The cells a node may hold its session with, in order of preference: its own cell first, then
/// those it fails over to.
fn check_cells(cells: &[CellLink]) -> Result<(), AgentError> {
    if cells.is_empty() {
        return Err(AgentError::NoCells);
    }
    Ok(())
}

/// How one session ended.
enum SessionEnd {
    Shutdown,
    /// A final refusal; the agent stops.
    Refused(AgentError),
    /// The connection failed or broke; `welcomed` says whether it had got as far as `Welcome`.
    Lost {
        reason: String,
        welcomed: bool,
    },
}

/// Holds one session with one of `cells` until `shutdown` (then `Ok`) or a final refusal.
///
/// It starts with the first cell. A session that fails or breaks (connection refused, a stream
/// error, a dead link found by HTTP/2 keep-alive, no answer to `Hello`) is retried after a
/// jittered backoff drawn from `rng`, on the next cell in the list, round and round: a node stays
/// with the cell that works rather than returning to its own. Whatever ran in a lost session is
/// abandoned; the cell moves it.
pub async fn serve_cells<R: Rng + Send>(
    node: &Node,
    cells: &[CellLink],
    backoff: BackoffConfig,
    rng: &mut R,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    check_cells(cells)?;
    let mut backoff = Backoff::new(backoff);
    let mut next = 0_usize;
    let mut attempt: u64 = 0;
    loop {
        let cell = &cells[next % cells.len()];
        attempt += 1;
        tracing::info!(node_id = %node.node_id(), url = %cell.url, attempt, "connecting to a cell");
        match session(node, cell, shutdown).await {
            SessionEnd::Shutdown => {
                tracing::info!(node_id = %node.node_id(), "agent shut down");
                return Ok(());
            }
            SessionEnd::Refused(error) => {
                node.stats.refused.fetch_add(1, STATS_ORDER);
                tracing::error!(node_id = %node.node_id(), %error, "giving up");
                return Err(error);
            }
            SessionEnd::Lost { reason, welcomed } => {
                node.stats.sessions_lost.fetch_add(1, STATS_ORDER);
                if welcomed {
                    backoff.reset();
                    attempt = 0;
                }
                tracing::warn!(node_id = %node.node_id(), url = %cell.url, %reason, "session with the cell lost");
            }
        }
        next = (next + 1) % cells.len();
        let delay = backoff.next_delay(rng);
        tracing::info!(
            node_id = %node.node_id(),
            next = %cells[next].url,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "reconnecting after a pause"
        );
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: handshake, then serve until it ends.
async fn session(node: &Node, cell: &CellLink, shutdown: &CancellationToken) -> SessionEnd {
    let lost = |reason: String| SessionEnd::Lost {
        reason,
        welcomed: false,
    };
    let channel = tokio::select! {
        () = shutdown.cancelled() => return SessionEnd::Shutdown,
        connected = cell.connect() => match connected {
            Ok(channel) => channel,
            Err(reason) => return lost(reason),
        },
    };
    let (outbound, outbound_queue) = mpsc::channel(OUTBOUND_MESSAGES_MAX);
    if outbound.try_send(node.hello().await).is_err() {
        // Cannot happen: the queue is new and empty; but a lost hello must not hang the handshake.
        return lost("hello could not be queued".to_owned());
    }
    let mut client = CoordinatorClient::new(channel)
        .max_decoding_message_size(proto::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(proto::MESSAGE_BYTES_MAX);
    let handshake = async {
        let response = client
            .session(ReceiverStream::new(outbound_queue))
            .await
            .map_err(|status| format!("open stream: {}", status.message()))?;
        let mut inbound = response.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|status| format!("await welcome: {}", status.message()))?;
        Ok::<_, String>((inbound, first))
    };
    let (inbound, first) = tokio::select! {
        () = shutdown.cancelled() => return SessionEnd::Shutdown,
        answered = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match answered {
            Err(_elapsed) => return lost("no answer to hello in time".to_owned()),
            Ok(Err(reason)) => return lost(reason),
            Ok(Ok(answer)) => answer,
        },
    };
    let welcome = match first.and_then(|message| message.kind) {
        Some(CoordinatorKind::Welcome(welcome)) => welcome,
        Some(CoordinatorKind::Refusal(refusal)) => return refused(refusal),
        Some(_) => return lost("the coordinator sent work before welcome".to_owned()),
        None => return lost("the coordinator closed the stream before welcome".to_owned()),
    };
    if welcome.protocol_version != proto::PROTOCOL_VERSION {
        tracing::warn!(
            node_id = %node.node_id(),
            ours = proto::PROTOCOL_VERSION,
            theirs = welcome.protocol_version,
            "coordinator welcomed us with another protocol version"
        );
    }
    let heartbeat_interval = node.heartbeat_interval(&welcome);
    tracing::info!(
        node_id = %node.node_id(),
        url = %cell.url,
        heartbeat_interval_ms = u64::try_from(heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
        "welcomed by the cell"
    );
    if let Link::Dial(_, Some(tls)) = &cell.link {
        tls.welcomed_by(&cell.url);
    }
    node.stats.welcomes.fetch_add(1, STATS_ORDER);
    node.stats.sessions_open.fetch_add(1, STATS_ORDER);
    let reason = serve(node, heartbeat_interval, inbound, outbound, shutdown).await;
    node.stats.sessions_open.fetch_sub(1, STATS_ORDER);
    match reason {
        None => SessionEnd::Shutdown,
        Some(reason) => SessionEnd::Lost {
            reason,
            welcomed: true,
        },
    }
}

/// A refusal is final unless its code is unspecified (a coordinator that could not decide, e.g.
/// while starting up).
fn refused(refusal: proto::Refusal) -> SessionEnd {
    let code = refusal.code();
    if code == RefusalCode::Unspecified {
        return SessionEnd::Lost {
            reason: format!("refused without a code: {}", refusal.reason),
            welcomed: false,
        };
    }
    SessionEnd::Refused(AgentError::Refused {
        code,
        reason: refusal.reason,
    })
}

/// Serves a welcomed session: heartbeats out, assignments and cancellations in. Returns why the
/// session ended, or `None` on shutdown. Every running generation is cancelled before it returns.
async fn serve(
    node: &Node,
    heartbeat_interval: Duration,
    mut inbound: Streaming<proto::CoordinatorMessage>,
    outbound: mpsc::Sender<AgentMessage>,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut runner = Runner::new(Arc::clone(&node.executor), outbound.clone());
    let first_beat = tokio::time::Instant::now() + heartbeat_interval;
    let mut heartbeat = tokio::time::interval_at(first_beat, heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break None,
            _ = heartbeat.tick() => send_heartbeat(node, &runner, &outbound).await,
            message = inbound.message() => match message {
                Ok(Some(message)) => handle(node, &mut runner, message),
                Ok(None) => break Some("the coordinator closed the stream".to_owned()),
                Err(status) => break Some(format!("stream error: {}", status.message())),
            },
            Some(finished) = runner.join_next() => runner.finished(finished),
        }
    };
    let cancelled = runner.active_generations();
    runner.shutdown().await;
    if cancelled > 0 {
        tracing::info!(node_id = %node.node_id(), cancelled, "cancelled running generations");
    }
    end
}

fn handle(node: &Node, runner: &mut Runner, message: proto::CoordinatorMessage) {
    match message.kind {
        Some(CoordinatorKind::Assign(assign)) => runner.assign(assign),
        Some(CoordinatorKind::Cancel(cancel)) => runner.cancel(&cancel),
        Some(CoordinatorKind::Welcome(_) | CoordinatorKind::Refusal(_)) | None => {
            tracing::warn!(node_id = %node.node_id(), "ignoring an unexpected message from the coordinator");
        }
    }
}

async fn send_heartbeat(node: &Node, runner: &Runner, outbound: &mpsc::Sender<AgentMessage>) {
    let state = node.vehicle.read().await;
    let heartbeat = AgentMessage {
        kind: Some(AgentKind::Heartbeat(proto::Heartbeat {
            state: Some(state.to_proto()),
            active_generations: runner.active_generations(),
        })),
    };
    // Never wait here: a full queue means tokens are flowing, which already shows the node is alive,
    // and the serve loop must stay free to act on cancellations.
    if outbound.try_send(heartbeat).is_ok() {
        node.stats.heartbeats_sent.fetch_add(1, STATS_ORDER);
    } else {
        tracing::debug!(node_id = %node.node_id(), "outbound queue full; heartbeat skipped");
    }
}

/// An error with its causes, for a log line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
