//! A hostile agent for the regression tests of hostile input: it speaks the
//! real protocol (`proto`'s generated tonic client over a real HTTP/2
//! connection) but sends whatever the test tells it to, in any order, with
//! any sizes — forged tokens, foreign checkpoints, lies about its speed.
//!
//! It does nothing by itself: no heartbeats, no engine. A test drives it
//! message by message and reads what the coordinator sends back.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::agent_message::Kind as AgentKind;
use proto::coordinator_client::CoordinatorClient;
use proto::coordinator_message::Kind as CoordinatorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Messages the hostile agent may have queued towards the coordinator.
const OUTBOUND_MESSAGES_MAX: usize = 64;

/// How long the hostile agent waits for the coordinator's next message.
pub const RECEIVE_WAIT: Duration = Duration::from_secs(60);

/// The SmolLM2 model as an honest agent would announce it.
pub fn smollm2_model() -> proto::CachedModel {
    let path = super::model_path();
    let size_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    proto::CachedModel {
        name: super::MODEL.to_string(),
        sha256: SMOLLM2_SHA256.to_string(),
        size_bytes,
        loaded: true,
    }
}

/// The digest of the packaged SmolLM2 file (the catalog's and the models table's).
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Hardware as an honest one-slot agent on this machine reports it.
pub fn modest_hardware() -> proto::Hardware {
    proto::Hardware {
        memory_budget_bytes: 2 << 30,
        threads: 1,
        decode_tokens_per_second: 40.0,
        prefill_tokens_per_second: 200.0,
        parallel_sequences: 1,
        engine_version: "hostile".into(),
        cpu_kernels: String::new(),
        attention: proto::Attention::Off as i32,
    }
}

/// A vehicle plugged in and charging for the next ten hours.
pub fn plugged_in_state() -> proto::VehicleState {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0);
    proto::VehicleState {
        plugged_in: true,
        charging: true,
        state_of_charge: 0.6,
        departure_unix_ms: now_ms + 10 * 3600 * 1000,
        temperature_c: 30.0,
        observed_unix_ms: now_ms,
    }
}

/// A `Hello` an honest agent with `hardware` would send, given the token
/// `nodes add` printed (or a bare credential).
pub fn hello(node_id: &str, token: &str, hardware: proto::Hardware) -> proto::Hello {
    let credential = agent::Enrolment::parse(token)
        .map(|enrolment| enrolment.credential)
        .unwrap_or_else(|_| token.to_owned());
    proto::Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        node_id: node_id.to_string(),
        credential,
        hardware: Some(hardware),
        models: vec![smollm2_model()],
        state: Some(plugged_in_state()),
    }
}

/// One session of a hostile agent: a sender of raw `AgentMessage`s and the
/// coordinator's stream of answers.
pub struct HostileAgent {
    outbound: mpsc::Sender<proto::AgentMessage>,
    inbound: Streaming<proto::CoordinatorMessage>,
}

/// How a session's opening went.
pub enum Opened {
    Welcomed(Box<HostileAgent>),
    Refused(proto::Refusal),
    /// The coordinator ended the stream or the call with this status.
    Closed(tonic::Status),
}

impl Opened {
    pub fn welcomed(self) -> HostileAgent {
        match self {
            Opened::Welcomed(agent) => *agent,
            Opened::Refused(refusal) => panic!("hostile agent refused: {refusal:?}"),
            Opened::Closed(status) => panic!("hostile agent's session closed: {status}"),
        }
    }

    pub fn refusal(self) -> proto::Refusal {
        match self {
            Opened::Refused(refusal) => refusal,
            Opened::Welcomed(_) => panic!("expected a refusal, the agent was welcomed"),
            Opened::Closed(status) => panic!("expected a refusal, the session closed: {status}"),
        }
    }
}

/// Dials the coordinator's gRPC address without the agent's size limits, so
/// that the coordinator's own limits are what is tested.
pub async fn client(grpc: SocketAddr) -> CoordinatorClient<tonic::transport::Channel> {
    client_from(grpc, None).await
}

/// Dials like [`client`], from the local address `local` (any of loopback's
/// 127.0.0.0/8 plays another client address).
pub async fn client_from(
    grpc: SocketAddr,
    local: Option<std::net::IpAddr>,
) -> CoordinatorClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(10))
        .local_address(local)
        .connect()
        .await
        .expect("connect to the coordinator");
    CoordinatorClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// Opens a session whose first message is `first` (normally a `Hello`).
pub async fn open(grpc: SocketAddr, first: proto::AgentMessage) -> Opened {
    open_from(grpc, None, first).await
}

/// Opens a session like [`open`], from the local address `local`.
pub async fn open_from(
    grpc: SocketAddr,
    local: Option<std::net::IpAddr>,
    first: proto::AgentMessage,
) -> Opened {
    let mut client = client_from(grpc, local).await;
    let (outbound, receiver) = mpsc::channel(OUTBOUND_MESSAGES_MAX);
    outbound.send(first).await.expect("queue first message");
    let response = match client.session(ReceiverStream::new(receiver)).await {
        Ok(response) => response,
        Err(status) => return Opened::Closed(status),
    };
    let mut inbound = response.into_inner();
    match tokio::time::timeout(RECEIVE_WAIT, inbound.message()).await {
        Ok(Ok(Some(proto::CoordinatorMessage {
            kind: Some(CoordinatorKind::Welcome(_)),
        }))) => Opened::Welcomed(Box::new(HostileAgent { outbound, inbound })),
        Ok(Ok(Some(proto::CoordinatorMessage {
            kind: Some(CoordinatorKind::Refusal(refusal)),
        }))) => Opened::Refused(refusal),
        Ok(Ok(other)) => panic!("unexpected first answer {other:?}"),
        Ok(Err(status)) => Opened::Closed(status),
        Err(_) => panic!("no answer to the first message within {RECEIVE_WAIT:?}"),
    }
}

/// Opens a session with a `Hello`.
pub async fn connect(grpc: SocketAddr, hello: proto::Hello) -> Opened {
    open(
        grpc,
        proto::AgentMessage {
            kind: Some(AgentKind::Hello(hello)),
        },
    )
    .await
}

impl HostileAgent {
    /// Sends one raw message; false once the coordinator closed the stream.
    pub async fn send(&self, kind: AgentKind) -> bool {
        self.outbound
            .send(proto::AgentMessage { kind: Some(kind) })
            .await
            .is_ok()
    }

    pub async fn heartbeat(&self, active_generations: u32) -> bool {
        self.send(AgentKind::Heartbeat(proto::Heartbeat {
            state: Some(plugged_in_state()),
            active_generations,
        }))
        .await
    }

    /// The coordinator's next message; `None` when its stream ended (or
    /// broke, as when it disconnects the agent).
    pub async fn next(&mut self) -> Option<CoordinatorKind> {
        match tokio::time::timeout(RECEIVE_WAIT, self.inbound.message()).await {
            Ok(Ok(Some(message))) => message.kind,
            Ok(Ok(None)) | Ok(Err(_)) => None,
            Err(_) => panic!("the coordinator sent nothing within {RECEIVE_WAIT:?}"),
        }
    }

    /// Waits for the next assignment, answering nothing else; `None` when
    /// the stream ended first.
    pub async fn next_assignment(&mut self) -> Option<proto::Assign> {
        loop {
            match self.next().await? {
                CoordinatorKind::Assign(assign) => return Some(assign),
                _ => continue,
            }
        }
    }

    /// Waits until the coordinator ends the stream (it disconnected the
    /// agent), skipping whatever else it sends. Panics if it does not within
    /// `RECEIVE_WAIT`.
    pub async fn expect_disconnected(&mut self) {
        while self.next().await.is_some() {}
    }

    /// Sends `tokens` for `generation_id`, each at the position after the
    /// last, with no text of their own (the coordinator detokenizes).
    pub async fn tokens(&self, generation_id: &str, first_position: u32, ids: &[i32]) -> bool {
        let tokens: Vec<(i32, Vec<u8>)> = ids.iter().map(|&id| (id, Vec::new())).collect();
        self.pieces(generation_id, first_position, &tokens).await
    }

    /// Reports `generation_id` finished with the counts an honest node would.
    pub async fn done(
        &self,
        generation_id: &str,
        reason: proto::FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        compute_ms: u64,
    ) -> bool {
        self.send(AgentKind::Done(proto::GenerationDone {
            generation_id: generation_id.to_string(),
            reason: reason as i32,
            prompt_tokens,
            completion_tokens,
            compute_ms,
            prompt_reused_tokens: 0,
            checkpoint_rejected: false,
        }))
        .await
    }
}
impl HostileAgent {
    /// Sends `data` as a KV checkpoint of `tokens` tokens for
    /// `generation_id`, announcing `total_bytes`, in pieces of at most
    /// `proto::KV_CHECKPOINT_CHUNK_BYTES_MAX` at consecutive offsets, as an
    /// honest agent does. False once the coordinator closed the stream.
    pub async fn checkpoint(
        &self,
        generation_id: &str,
        tokens: u32,
        total_bytes: u64,
        data: &[u8],
    ) -> bool {
        let mut offset = 0_u64;
        for piece in data.chunks(proto::KV_CHECKPOINT_CHUNK_BYTES_MAX) {
            let sent = self
                .send(AgentKind::Checkpoint(proto::KvCheckpoint {
                    generation_id: generation_id.to_string(),
                    tokens,
                    total_bytes,
                    offset,
                    data: piece.to_vec(),
                }))
                .await;
            if !sent {
                return false;
            }
            offset += piece.len() as u64;
        }
        true
    }
}

impl HostileAgent {
    /// Sends one token with its piece, as an honest agent would.
    pub async fn token_with_piece(
        &self,
        generation_id: &str,
        position: u32,
        token_id: i32,
        piece: Vec<u8>,
    ) -> bool {
        self.pieces(generation_id, position, &[(token_id, piece)])
            .await
    }
}

impl HostileAgent {
    /// Heartbeats every `interval` in the background (one active generation)
    /// until the session ends or the returned task is aborted, so that a test
    /// can wait on other things without the node being marked gone.
    pub fn keep_alive(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            loop {
                let heartbeat = proto::AgentMessage {
                    kind: Some(AgentKind::Heartbeat(proto::Heartbeat {
                        state: Some(plugged_in_state()),
                        active_generations: 1,
                    })),
                };
                if outbound.send(heartbeat).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// Heartbeats as [`HostileAgent::keep_alive`] does, until the returned
    /// guard is dropped.
    pub fn heartbeat_every(&self, interval: Duration) -> Heartbeats {
        Heartbeats(self.keep_alive(interval))
    }

    /// Sends `tokens` (id and the text an honest node gives it) for
    /// `generation_id`, each at the position after the last.
    pub async fn pieces(
        &self,
        generation_id: &str,
        first_position: u32,
        tokens: &[(i32, Vec<u8>)],
    ) -> bool {
        let tokens = tokens
            .iter()
            .enumerate()
            .map(|(index, (token_id, piece))| proto::Token {
                position: first_position + index as u32,
                token_id: *token_id,
                piece: piece.clone(),
                logprob: -0.5,
                top_logprobs: Vec::new(),
            })
            .collect();
        self.send(AgentKind::Tokens(proto::TokenBatch {
            generation_id: generation_id.to_string(),
            tokens,
        }))
        .await
    }

    /// Sends `count` tokens for `generation_id` from position 0, each as
    /// large as a token gets: the longest pieces of the vocabulary, with 20
    /// alternatives each (every alternative a client may ask for). Their
    /// stream is megabytes, more than socket buffers hold.
    pub async fn flood(&self, generation_id: &str, count: u32) -> bool {
        const BATCH: u32 = 200;
        let tokens = long_tokens(21);
        let token = |position: u32| {
            let (id, piece) = &tokens[(position % 21) as usize];
            proto::Token {
                position,
                token_id: *id,
                piece: piece.clone(),
                logprob: -0.5,
                top_logprobs: tokens[..20]
                    .iter()
                    .map(|(id, piece)| proto::TokenLogprob {
                        token_id: *id,
                        piece: piece.clone(),
                        logprob: -1.0,
                    })
                    .collect(),
            }
        };
        let mut position = 0;
        while position < count {
            let end = (position + BATCH).min(count);
            let batch = proto::TokenBatch {
                generation_id: generation_id.to_string(),
                tokens: (position..end).map(token).collect(),
            };
            if !self.send(AgentKind::Tokens(batch)).await {
                return false;
            }
            position = end;
        }
        true
    }

    /// Answers `assign` as an honest node would: `tokens`, then a `Done`
    /// with the counts the coordinator also has.
    pub async fn answer(&self, assign: &proto::Assign, tokens: &[(i32, Vec<u8>)]) -> bool {
        let first = assign.committed_tokens.len() as u32;
        self.pieces(&assign.generation_id, first, tokens).await
            && self
                .done(
                    &assign.generation_id,
                    proto::FinishReason::Stop,
                    assign.prompt_tokens.len() as u32,
                    first + tokens.len() as u32,
                    1,
                )
                .await
    }

    /// Waits for the coordinator to cancel `generation_id`, skipping
    /// anything else; false if the stream ended first.
    pub async fn expect_cancel(&mut self, generation_id: &str) -> bool {
        loop {
            match self.next().await {
                Some(CoordinatorKind::Cancel(cancel)) if cancel.generation_id == generation_id => {
                    return true
                }
                Some(_) => continue,
                None => return false,
            }
        }
    }
}

/// Token ids with the longest pieces of the served model's vocabulary, and
/// their pieces.
pub fn long_tokens(count: usize) -> Vec<(i32, Vec<u8>)> {
    let tokenizer = engine::Tokenizer::load(&super::model_path()).expect("tokenizer");
    let mut tokens: Vec<(i32, Vec<u8>)> = (0..tokenizer.vocab_size() as i32)
        .map(|id| (id, tokenizer.piece(id)))
        .filter(|(_, piece)| std::str::from_utf8(piece).is_ok())
        .collect();
    tokens.sort_by_key(|(_, piece)| std::cmp::Reverse(piece.len()));
    tokens.truncate(count);
    tokens
}

/// The body of a streamed chat request whose answer [`HostileAgent::flood`]
/// can fill: up to 4,096 tokens, every alternative of each asked for.
pub fn flood_body() -> serde_json::Value {
    serde_json::json!({
        "model": super::MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4096,
        "logprobs": true,
        "top_logprobs": 20,
        "stream": true,
    })
}

/// A client with a tiny receive window that sends `body` to the chat
/// endpoint with `key` and then reads nothing: once the socket buffers are
/// full, the gateway cannot write to it.
pub async fn non_reading_client(
    http: SocketAddr,
    key: &str,
    body: &serde_json::Value,
) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stream = socket.connect(http).await.expect("connect");
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    stream
}

/// Reads until the server closes the connection (EOF or reset); returns what
/// was read. Panics if it is still open at `deadline`.
pub async fn read_until_closed(stream: &mut TcpStream, deadline: Instant) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0_u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return received,
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => panic!(
                "the connection is still open; received so far: {:?}",
                String::from_utf8_lossy(&received[received.len().saturating_sub(300)..])
            ),
        }
    }
}

/// Heartbeats sent in the background until dropped, so that a hostile agent
/// that holds a generation is not taken for lost while it does.
pub struct Heartbeats(tokio::task::JoinHandle<()>);

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.0.abort();
    }
}
