//! The agent's one long-lived stream to the coordinator (`Coordinator.Session`): dial, `Hello`, wait for `Welcome` or
//! `Refusal`, then heartbeat and serve assignments until the stream breaks; reconnect with backoff.
//!
//! Outgoing messages of a session (hello, heartbeats, tokens, results) all go through one bounded
//! queue into the request stream, so a slow link pushes back on token forwarding instead of growing
//! memory.

use std::time::Duration;

use engine::{Engine, SpeedReport};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_client::CoordinatorClient;
use proto::coordinator_message::Kind as CoordinatorKind;
use proto::{AgentMessage, RefusalCode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::Streaming;

use crate::backoff::{Backoff, BackoffConfig};
use crate::runner::Runner;
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

/// What stays the same across the sessions of one agent.
pub(crate) struct Node {
    node_id: String,
    credential: String,
    url: String,
    hardware: proto::Hardware,
    models: Vec<proto::CachedModel>,
    model_digest: String,
    default_heartbeat: Duration,
    engine: Engine,
    vehicle: VehicleReader,
}

impl Node {
    pub(crate) fn new(
        config: &AgentConfig,
        engine: Engine,
        speed: &SpeedReport,
        vehicle: Box<dyn VehicleStateAdapter>,
    ) -> Node {
        let info = engine.info();
        let hardware = proto::Hardware {
            memory_budget_bytes: config.engine.memory_budget_bytes,
            threads: info.threads,
            decode_tokens_per_second: speed.decode_tokens_per_second,
            prefill_tokens_per_second: speed.prefill_tokens_per_second,
            parallel_sequences: info.parallel_sequences,
            engine_version: info.engine_version.clone(),
        };
        let model_digest = config.model.digest.to_string();
        let models = vec![proto::CachedModel {
            name: config.model.name.clone(),
            sha256: model_digest.clone(),
            size_bytes: config.model.size_bytes,
            loaded: true,
        }];
        Node {
            node_id: config.node_id.clone(),
            credential: config.credential.clone(),
            url: config.coordinator_url.clone(),
            hardware,
            models,
            model_digest,
            default_heartbeat: config.heartbeat_interval,
            engine,
            vehicle: VehicleReader::new(vehicle),
        }
    }

    async fn hello(&self) -> AgentMessage {
        let state = self.vehicle.read().await;
        AgentMessage {
            kind: Some(AgentKind::Hello(proto::Hello {
                protocol_version: proto::PROTOCOL_VERSION,
                node_id: self.node_id.clone(),
                credential: self.credential.clone(),
                hardware: Some(self.hardware.clone()),
                models: self.models.clone(),
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

/// Checks the coordinator URL and sets the connection's timeouts.
pub(crate) fn endpoint(url: &str) -> Result<Endpoint, AgentError> {
    let invalid = |reason: String| AgentError::InvalidCoordinatorUrl {
        url: url.to_owned(),
        reason,
    };
    if !url.starts_with("http://") {
        return Err(invalid(
            "expected http://HOST:PORT (this build has no TLS support)".to_owned(),
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

/// Connects, serves and reconnects until shut down or refused.
pub(crate) async fn connect_loop(
    node: &Node,
    endpoint: Endpoint,
    backoff: BackoffConfig,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(backoff);
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        tracing::info!(node_id = %node.node_id, url = %node.url, attempt, "connecting to the coordinator");
        match session(node, &endpoint, shutdown).await {
            SessionEnd::Shutdown => {
                tracing::info!(node_id = %node.node_id, "agent shut down");
                return Ok(());
            }
            SessionEnd::Refused(error) => {
                tracing::error!(node_id = %node.node_id, %error, "giving up");
                return Err(error);
            }
            SessionEnd::Lost { reason, welcomed } => {
                if welcomed {
                    backoff.reset();
                    attempt = 0;
                }
                tracing::warn!(node_id = %node.node_id, url = %node.url, %reason, "connection to the coordinator lost");
            }
        }
        let delay = backoff.next_delay(&mut rand::thread_rng());
        tracing::info!(node_id = %node.node_id, delay_ms = delay.as_millis() as u64, "reconnecting after a pause");
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: handshake, then serve until it ends.
async fn session(node: &Node, endpoint: &Endpoint, shutdown: &CancellationToken) -> SessionEnd {
    let lost = |reason: String| SessionEnd::Lost {
        reason,
        welcomed: false,
    };
    let channel = tokio::select! {
        () = shutdown.cancelled() => return SessionEnd::Shutdown,
        connected = endpoint.connect() => match connected {
            Ok(channel) => channel,
            Err(error) => return lost(format!("connect: {}", error_chain(&error))),
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
            node_id = %node.node_id,
            ours = proto::PROTOCOL_VERSION,
            theirs = welcome.protocol_version,
            "coordinator welcomed us with another protocol version"
        );
    }
    let heartbeat_interval = node.heartbeat_interval(&welcome);
    tracing::info!(
        node_id = %node.node_id,
        heartbeat_interval_ms = heartbeat_interval.as_millis() as u64,
        "welcomed by the coordinator"
    );
    let reason = serve(node, heartbeat_interval, inbound, outbound, shutdown).await;
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
    let mut runner = Runner::new(
        node.engine.clone(),
        outbound.clone(),
        node.model_digest.clone(),
    );
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
        tracing::info!(node_id = %node.node_id, cancelled, "cancelled running generations");
    }
    end
}

fn handle(node: &Node, runner: &mut Runner, message: proto::CoordinatorMessage) {
    match message.kind {
        Some(CoordinatorKind::Assign(assign)) => runner.assign(assign),
        Some(CoordinatorKind::Cancel(cancel)) => runner.cancel(&cancel),
        Some(CoordinatorKind::Welcome(_) | CoordinatorKind::Refusal(_)) | None => {
            tracing::warn!(node_id = %node.node_id, "ignoring an unexpected message from the coordinator");
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
    if outbound.try_send(heartbeat).is_err() {
        tracing::debug!(node_id = %node.node_id, "outbound queue full; heartbeat skipped");
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
