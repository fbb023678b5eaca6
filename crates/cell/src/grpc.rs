//! The agent-facing gRPC service: one bidirectional `Session` stream per
//! connected vehicle.
//!
//! The handshake is checked here (protocol version, enrolled node, matching
//! credential); everything after it is handed to the core.
//!
//! Every byte from a node is bounded: before authentication, a stream's
//! first message by `HELLO_BYTES_MAX` (`HelloLimit`) and the streams waiting
//! by `UNAUTHENTICATED_SESSIONS_MAX`, of which one address holds at most
//! `UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX` (`Handshakes`); after it, every message by
//! `proto::AGENT_MESSAGE_BYTES_MAX` and its contents by what was asked
//! (`node_input`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_message::Kind as CoordinatorKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{http, Service};
use tonic::{Request, Response, Status, Streaming};

use crate::core::Core;
use crate::limits;
use crate::node_input;
use crate::nodes::NodeSession;
use store::secrets;
use store::Store;

pub struct AgentService {
    pub core: Arc<Core>,
    pub store: Store,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Places for streams that have not yet authenticated.
    pub handshakes: Arc<Handshakes>,
    /// The cell's shutdown: it ends every agent session, so that vehicles fail over to another
    /// cell at once instead of holding streams that graceful shutdown would wait for.
    pub shutdown: CancellationToken,
    /// Agents over mTLS: a node authenticates by its certificate, bound to its node id, instead of
    /// its credential (`crate::tls`).
    pub tls: Option<Arc<crate::tls::CellTls>>,
}

/// Places for agent streams that have not yet authenticated:
/// `UNAUTHENTICATED_SESSIONS_MAX` in all, and at most
/// `UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX` from one client address, so
/// that one address opening streams without a `Hello` cannot keep every
/// other vehicle out.
#[derive(Debug, Default)]
pub struct Handshakes {
    held: Mutex<HandshakeCounts>,
}

#[derive(Debug, Default)]
struct HandshakeCounts {
    in_all: usize,
    per_address: HashMap<IpAddr, usize>,
}

impl Handshakes {
    /// A place for a stream from `address` (unknown: counted in all only),
    /// or `None` when the stream must be refused.
    pub fn try_take(self: &Arc<Self>, address: Option<IpAddr>) -> Option<HandshakePlace> {
        let mut counts = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if counts.in_all >= limits::UNAUTHENTICATED_SESSIONS_MAX {
            return None;
        }
        if let Some(address) = address {
            let from_address = counts.per_address.entry(address).or_insert(0);
            if *from_address >= limits::UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX {
                return None;
            }
            *from_address += 1;
        }
        counts.in_all += 1;
        Some(HandshakePlace {
            book: Arc::clone(self),
            address,
        })
    }
}

/// A stream's place until it authenticated or ended.
#[derive(Debug)]
pub struct HandshakePlace {
    book: Arc<Handshakes>,
    address: Option<IpAddr>,
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        let mut counts = self
            .book
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.in_all = counts.in_all.saturating_sub(1);
        if let Some(address) = self.address {
            if let Some(count) = counts.per_address.get_mut(&address) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.per_address.remove(&address);
                }
            }
        }
    }
}

/// The one reason given for an unknown node and for a wrong credential.
pub const NOT_AUTHENTICATED_REASON: &str =
    "unknown node or wrong credential; enrol the node with 'fleetgrid nodes add' and use the credential it printed";

/// Compared against when the node is not enrolled, so that the answer takes
/// as long as for a wrong credential. No issued credential has this form.
const UNENROLLED_CREDENTIAL: &str = "not-enrolled";

type OutboundStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

fn refusal(code: proto::RefusalCode, reason: String) -> OutboundStream {
    let message = proto::CoordinatorMessage {
        kind: Some(CoordinatorKind::Refusal(proto::Refusal {
            code: code as i32,
            reason,
            protocol_version: proto::PROTOCOL_VERSION,
        })),
    };
    Box::pin(futures::stream::once(async move { Ok(message) }))
}

impl AgentService {
    /// Checks a `Hello`, and over mTLS the certificate the stream presented; `Err` carries the
    /// refusal to send back.
    async fn check_hello(
        &self,
        hello: &proto::Hello,
        presented: Option<&Result<pki::Presented, pki::PkiError>>,
    ) -> Result<(), (proto::RefusalCode, String)> {
        if hello.protocol_version != proto::PROTOCOL_VERSION {
            return Err((
                proto::RefusalCode::ProtocolVersion,
                format!(
                    "agent speaks protocol version {}, this coordinator speaks {}",
                    hello.protocol_version,
                    proto::PROTOCOL_VERSION
                ),
            ));
        }
        if self.tls.is_some() {
            let presented =
                match presented {
                    Some(Ok(presented)) => presented,
                    Some(Err(error)) => {
                        return Err((
                            proto::RefusalCode::BadCredential,
                            format!("unusable client certificate: {error}"),
                        ))
                    }
                    None => return Err((
                        proto::RefusalCode::BadCredential,
                        "this cell takes agents over mTLS only: enrol the agent with the token \
                         'fleetgrid nodes add' printed to get its certificate"
                            .into(),
                    )),
                };
            return match crate::tls::check_certificate(&self.store, presented, &hello.node_id).await
            {
                Ok(()) => Ok(()),
                Err(crate::tls::CertificateRefusal::Refused(reason)) => {
                    Err((proto::RefusalCode::BadCredential, reason))
                }
                Err(crate::tls::CertificateRefusal::Storage) => Err((
                    proto::RefusalCode::Unspecified,
                    "coordinator storage error; retry later".into(),
                )),
            };
        }
        let stored = match self.store.node_credential_hash(&hello.node_id).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(%error, node_id = %hello.node_id, "look up node credential");
                return Err((
                    proto::RefusalCode::Unspecified,
                    "coordinator storage error; retry later".into(),
                ));
            }
        };
        // An unknown node and a wrong credential get the same answer after
        // the same work (a hash and a comparison), so that nobody can tell
        // from outside which nodes are enrolled.
        let offered = secrets::hash(&hello.credential);
        let (stored, enrolled) = match stored {
            Some(stored) => (stored, true),
            None => (secrets::hash(UNENROLLED_CREDENTIAL), false),
        };
        if !(secrets::hashes_equal(&stored, &offered) && enrolled) {
            return Err((
                proto::RefusalCode::BadCredential,
                NOT_AUTHENTICATED_REASON.into(),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for AgentService {
    type SessionStream = OutboundStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // Nothing of a stream is read before it holds one of the few places
        // for streams that have not yet authenticated.
        let address = request.remote_addr().map(|address| address.ip());
        let presented = crate::tls::presented(&request);
        let Some(unauthenticated) = self.handshakes.try_take(address) else {
            self.core
                .metrics
                .node_sessions_refused_busy
                .fetch_add(1, crate::core::ORDER);
            return Err(Status::resource_exhausted(
                "too many agents are connecting; retry later",
            ));
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(limits::HELLO_TIMEOUT, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(proto::AgentMessage {
                kind: Some(AgentKind::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                self.core
                    .metrics
                    .nodes_refused
                    .fetch_add(1, crate::core::ORDER);
                return Ok(Response::new(refusal(
                    proto::RefusalCode::BadHello,
                    "the first message must be Hello".into(),
                )));
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within the time limit")),
        };
        let checked = self.check_hello(&hello, presented.as_ref()).await;
        drop(unauthenticated);
        if let Err((code, reason)) = checked {
            tracing::warn!(node_id = %hello.node_id, ?code, %reason, "refusing agent");
            self.core
                .metrics
                .nodes_refused
                .fetch_add(1, crate::core::ORDER);
            return Ok(Response::new(refusal(code, reason)));
        }
        // Quarantined here, or by any cell (the store): refused either way.
        let quarantined = self
            .store
            .is_quarantined(&hello.node_id)
            .await
            .map(|in_store| self.core.quarantine_holds(&hello.node_id, in_store));
        let refused = match quarantined {
            Ok(false) => None,
            Ok(true) => Some((
                proto::RefusalCode::Quarantined,
                "this node is quarantined: one of its answers failed verification; its owner can see why",
            )),
            Err(error) => {
                tracing::error!(%error, node_id = %hello.node_id, "look up node trust");
                Some((
                    proto::RefusalCode::Unspecified,
                    "coordinator storage error; retry later",
                ))
            }
        };
        if let Some((code, reason)) = refused {
            tracing::warn!(node_id = %hello.node_id, ?code, "refusing agent");
            self.core
                .metrics
                .nodes_refused
                .fetch_add(1, crate::core::ORDER);
            return Ok(Response::new(refusal(code, reason.into())));
        }
        // The owner's stored policy applies from the first moment; a change
        // made while this loads reaches the scheduler through the change feed.
        let loaded = async {
            let policy = self.store.node_policy(&hello.node_id).await?;
            let record = self.store.node_record(&hello.node_id).await?;
            Ok::<_, store::StoreError>((policy, record.map(|record| record.owner)))
        };
        let (policy, owner) = match loaded.await {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(%error, node_id = %hello.node_id, "load owner policy");
                return Ok(Response::new(refusal(
                    proto::RefusalCode::Unspecified,
                    "coordinator storage error; retry later".into(),
                )));
            }
        };
        let (outbound, receiver) = mpsc::channel(limits::NODE_OUTBOUND_CAPACITY);
        let welcome = proto::CoordinatorMessage {
            kind: Some(CoordinatorKind::Welcome(proto::Welcome {
                protocol_version: proto::PROTOCOL_VERSION,
                heartbeat_interval_ms: duration_ms(self.heartbeat_interval),
                heartbeat_timeout_ms: duration_ms(self.heartbeat_timeout),
            })),
        };
        if outbound.try_send(welcome).is_err() {
            return Err(Status::internal("could not queue welcome"));
        }
        let (session, disconnect) = self.core.node_connected(
            &hello.node_id,
            owner.as_deref().unwrap_or(""),
            &hello,
            outbound,
            policy,
        );
        let hardware = hello.hardware.clone().unwrap_or_default();
        tracing::info!(
            node_id = %hello.node_id,
            models = hello.models.len(),
            engine = ?crate::node_input::bounded_node_text(hardware.engine_version),
            cpu_kernels = ?crate::node_input::bounded_node_text(hardware.cpu_kernels),
            "node connected"
        );
        let store = self.store.clone();
        let name = hello.node_id.clone();
        tokio::spawn(async move {
            if let Err(error) = store.touch_node(&name, crate::core::now_ms().0).await {
                tracing::warn!(%error, node_id = %name, "record node last seen");
            }
        });
        // Over mTLS the session is bound to its certificate: revoking it closes the session.
        let close = CancellationToken::new();
        let binding = match (&self.tls, &presented) {
            (Some(tls), Some(Ok(presented))) => Some((
                Arc::clone(&tls.sessions),
                tls.sessions.bind(&hello.node_id, presented, close.clone()),
            )),
            _ => None,
        };
        let reading = read_agent(
            Arc::clone(&self.core),
            session,
            disconnect,
            close,
            self.shutdown.clone(),
            inbound,
            hello.node_id.clone(),
        );
        let name = hello.node_id;
        tokio::spawn(async move {
            reading.await;
            if let Some((sessions, id)) = binding {
                sessions.unbind(&name, id);
            }
        });
        let stream = ReceiverStream::new(receiver).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn duration_ms(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Reads one agent's messages until its stream ends, the core drops the
/// session (`disconnect`) or the cell shuts down, then reports it lost, which
/// ends the agent's stream. A message that breaks the protocol disconnects
/// the node.
async fn read_agent(
    core: Arc<Core>,
    session: NodeSession,
    disconnect: CancellationToken,
    revoked: CancellationToken,
    shutdown: CancellationToken,
    mut inbound: Streaming<proto::AgentMessage>,
    name: String,
) {
    loop {
        let received = tokio::select! {
            _ = disconnect.cancelled() => {
                tracing::info!(node_id = %name, "stopped reading a dropped session");
                break;
            }
            _ = revoked.cancelled() => {
                tracing::warn!(node_id = %name, "ending the session: its certificate was revoked or expired");
                break;
            }
            _ = shutdown.cancelled() => {
                tracing::info!(node_id = %name, "cell shutting down; ending the session");
                break;
            }
            received = inbound.message() => received,
        };
        let message = match received {
            Ok(Some(message)) => message,
            Ok(None) => {
                tracing::info!(node_id = %name, "agent closed its stream");
                break;
            }
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                // A message over `AGENT_MESSAGE_BYTES_MAX`, refused from its length prefix.
                core.node_protocol_violation(session, status.message());
                break;
            }
            Err(status) => {
                tracing::warn!(node_id = %name, %status, "agent stream broke");
                break;
            }
        };
        if !handle_agent_message(&core, session, message) {
            break;
        }
    }
    core.node_lost(session);
}

/// Hands one message of an authenticated agent's session to the core, after
/// checking its shape; `false` when the session must end (a message that
/// breaks the protocol, which the core has dealt with).
pub fn handle_agent_message(
    core: &Core,
    session: NodeSession,
    message: proto::AgentMessage,
) -> bool {
    if let Err(violation) = node_input::check_shape(&message) {
        core.node_protocol_violation(session, &violation.to_string());
        return false;
    }
    match message.kind {
        Some(AgentKind::Heartbeat(heartbeat)) => core.heartbeat(session, &heartbeat),
        Some(AgentKind::Tokens(batch)) => core.node_tokens(session, batch),
        Some(AgentKind::Done(done)) => core.node_done(session, done),
        Some(AgentKind::Failed(failed)) => core.node_failed(session, failed),
        Some(AgentKind::Checkpoint(piece)) => core.node_checkpoint(session, piece),
        Some(AgentKind::PromptLogprobs(scores)) => core.node_prompt_logprobs(session, scores),
        Some(AgentKind::Verified(verified)) => core.node_verified(session, &verified),
        // `check_shape` refused these.
        Some(AgentKind::Hello(_)) | None => return false,
    }
    true
}

/// Wraps the agent service so that the first message of every stream — the
/// `Hello`, sent before authentication — may be at most `HELLO_BYTES_MAX`:
/// its gRPC length prefix is read as it passes, and a larger one ends the
/// stream before the message is buffered. Later messages are bounded by the
/// service's decoding limit (`proto::AGENT_MESSAGE_BYTES_MAX`).
#[derive(Clone)]
pub struct HelloLimit<S> {
    pub inner: S,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for HelloLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for HelloLimit<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let metrics = Arc::clone(&self.metrics);
        let request = request.map(|body| {
            tonic::body::Body::new(FirstMessageLimit {
                inner: body,
                header: Vec::with_capacity(GRPC_HEADER_BYTES),
                state: LimitState::ReadingHeader,
                metrics,
            })
        });
        self.inner.call(request)
    }
}

/// A gRPC message starts with a 1-byte compression flag and a 4-byte
/// big-endian length.
const GRPC_HEADER_BYTES: usize = 5;

enum LimitState {
    ReadingHeader,
    Passed,
    Refused,
}

/// A request body that ends with an error when the length prefix of its
/// first gRPC message exceeds `HELLO_BYTES_MAX`. It holds no more than the
/// five header bytes; the data frames themselves pass through unchanged.
struct FirstMessageLimit {
    inner: tonic::body::Body,
    header: Vec<u8>,
    state: LimitState,
    metrics: Arc<crate::metrics::Metrics>,
}

impl http_body::Body for FirstMessageLimit {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let this = &mut *self;
        if let LimitState::Refused = this.state {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let (LimitState::ReadingHeader, Some(data)) = (&this.state, frame.data_ref()) {
            let wanted = GRPC_HEADER_BYTES - this.header.len();
            this.header
                .extend_from_slice(&data[..wanted.min(data.len())]);
            if this.header.len() == GRPC_HEADER_BYTES {
                let length = u32::from_be_bytes([
                    this.header[1],
                    this.header[2],
                    this.header[3],
                    this.header[4],
                ]) as usize;
                if length > limits::HELLO_BYTES_MAX {
                    this.state = LimitState::Refused;
                    this.metrics
                        .node_hellos_oversized
                        .fetch_add(1, crate::core::ORDER);
                    tracing::warn!(
                        bytes = length,
                        "refusing an agent stream whose first message is too large"
                    );
                    return Poll::Ready(Some(Err(Status::out_of_range(format!(
                        "the first message may be at most {} bytes before authentication",
                        limits::HELLO_BYTES_MAX
                    )))));
                }
                this.state = LimitState::Passed;
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, LimitState::Refused) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use http_body::Body as _;

    use super::*;

    #[test]
    fn one_address_cannot_take_every_handshake_place() {
        let handshakes = Arc::new(Handshakes::default());
        let greedy = Some(IpAddr::from([10, 0, 0, 1]));
        let held: Vec<HandshakePlace> = (0..limits::UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX)
            .map(|_| handshakes.try_take(greedy).expect("a place"))
            .collect();
        assert!(handshakes.try_take(greedy).is_none());
        // Everyone else still gets in, up to the bound in all.
        let others: Vec<HandshakePlace> = (0..limits::UNAUTHENTICATED_SESSIONS_MAX - held.len())
            .map(|index| {
                let address = IpAddr::from([10, 0, 1, u8::try_from(index % 8).unwrap_or(0)]);
                handshakes.try_take(Some(address)).expect("a place")
            })
            .collect();
        assert!(handshakes.try_take(None).is_none());
        assert!(handshakes
            .try_take(Some(IpAddr::from([10, 0, 2, 1])))
            .is_none());
        // Places come back when their streams end.
        drop(held);
        assert!(handshakes.try_take(greedy).is_some());
        drop(others);
        let counts = handshakes.held.lock().expect("counts");
        assert_eq!(counts.in_all, 0);
        assert!(counts.per_address.is_empty());
    }

    /// A request body that yields the given chunks as data frames.
    struct Chunks(VecDeque<bytes::Bytes>);

    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|chunk| Ok(http_body::Frame::data(chunk))),
            )
        }
    }

    /// What the limited body yields for these chunks: the data passed on, and
    /// whether it ended with an error.
    async fn read(chunks: Vec<Vec<u8>>) -> (Vec<u8>, bool, u64) {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let chunks = chunks.into_iter().map(bytes::Bytes::from).collect();
        let mut body = FirstMessageLimit {
            inner: tonic::body::Body::new(Chunks(chunks)),
            header: Vec::new(),
            state: LimitState::ReadingHeader,
            metrics: Arc::clone(&metrics),
        };
        let mut passed = Vec::new();
        let mut refused = false;
        while let Some(frame) =
            std::future::poll_fn(|context| Pin::new(&mut body).poll_frame(context)).await
        {
            match frame {
                Ok(frame) => passed.extend_from_slice(frame.data_ref().expect("data")),
                Err(_) => refused = true,
            }
        }
        let counted = metrics.node_hellos_oversized.load(crate::core::ORDER);
        (passed, refused, counted)
    }

    fn header(length: usize) -> Vec<u8> {
        let mut header = vec![0];
        header.extend_from_slice(&(length as u32).to_be_bytes());
        header
    }

    #[tokio::test]
    async fn a_first_message_within_the_limit_passes_whole_and_later_ones_are_not_looked_at() {
        let mut first = header(limits::HELLO_BYTES_MAX);
        first.extend(vec![7; limits::HELLO_BYTES_MAX]);
        let mut second = header(10 * limits::HELLO_BYTES_MAX);
        second.extend(vec![8; 100]);
        let (passed, refused, counted) = read(vec![first.clone(), second.clone()]).await;
        assert_eq!(passed, [first, second].concat());
        assert!(!refused);
        assert_eq!(counted, 0);
    }

    #[tokio::test]
    async fn a_larger_first_message_is_refused_from_its_prefix_even_split_across_frames() {
        let header = header(limits::HELLO_BYTES_MAX + 1);
        let (passed, refused, counted) = read(vec![
            header[..2].to_vec(),
            [&header[2..], &[1u8; 100][..]].concat(),
            vec![2; 1000],
        ])
        .await;
        assert!(refused);
        assert_eq!(counted, 1);
        // Only the frame that completed nothing: the two header bytes; the rest is never passed.
        assert_eq!(passed, header[..2].to_vec());
    }
}
