//! The agent against a real in-process gRPC coordinator on 127.0.0.1 and the real SmolLM2 model:
//! refusals, an assignment streamed to the end, a cancellation, and a reconnect.
//!
//! The model comes from `FLEETGRID_TEST_MODEL` (a path to the .gguf) or the model store; run
//! `cargo xtask test` once to fetch it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::{AgentConfig, AgentError, BackoffConfig, VehicleStateSource};
use engine::{ChatMessage, Tokenizer};
use models::{ModelStore, VerifiedModel};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_message::Kind as CoordinatorKind;
use proto::coordinator_server::{Coordinator, CoordinatorServer};
use proto::{AgentMessage, CoordinatorMessage, RefusalCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const MODEL_NAME: &str = "smollm2-135m-instruct";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const CREDENTIAL: &str = "right-secret";
/// Generous: several tests load the model at once on a small machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

fn model() -> VerifiedModel {
    if let Some(path) = std::env::var_os("FLEETGRID_TEST_MODEL") {
        let path = PathBuf::from(path);
        let size_bytes = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("FLEETGRID_TEST_MODEL {}: {e}", path.display()))
            .len();
        return VerifiedModel {
            name: MODEL_NAME.to_owned(),
            digest: MODEL_SHA256.parse().expect("valid digest"),
            path,
            size_bytes,
        };
    }
    ModelStore::open(ModelStore::default_root())
        .and_then(|store| store.resolve(MODEL_NAME))
        .unwrap_or_else(|e| {
            panic!("test model {MODEL_NAME} not available ({e}); run cargo xtask test")
        })
}

/// One agent connection as the test coordinator sees it.
struct ServerSession {
    from_agent: mpsc::Receiver<AgentMessage>,
    to_agent: mpsc::Sender<Result<CoordinatorMessage, Status>>,
}

impl ServerSession {
    async fn next(&mut self) -> AgentKind {
        let message = tokio::time::timeout(STEP_TIMEOUT, self.from_agent.recv())
            .await
            .expect("agent message in time")
            .expect("agent stream open");
        message.kind.expect("message has a kind")
    }

    /// The next message that is not a heartbeat.
    async fn next_event(&mut self) -> AgentKind {
        loop {
            match self.next().await {
                AgentKind::Heartbeat(_) => continue,
                other => return other,
            }
        }
    }

    async fn hello(&mut self) -> proto::Hello {
        match self.next().await {
            AgentKind::Hello(hello) => hello,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    async fn send(&self, kind: CoordinatorKind) {
        let message = CoordinatorMessage { kind: Some(kind) };
        self.to_agent
            .send(Ok(message))
            .await
            .expect("agent stream open");
    }

    async fn welcome(&self) {
        self.send(CoordinatorKind::Welcome(proto::Welcome {
            protocol_version: proto::PROTOCOL_VERSION,
            heartbeat_interval_ms: 100,
            heartbeat_timeout_ms: 5_000,
        }))
        .await;
    }
}

/// A coordinator that hands every connection to the test.
struct TestCoordinator {
    sessions: mpsc::Sender<ServerSession>,
}

#[tonic::async_trait]
impl Coordinator for TestCoordinator {
    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (from_agent_sender, from_agent) = mpsc::channel(1024);
        let (to_agent, to_agent_receiver) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if from_agent_sender.send(message).await.is_err() {
                    break;
                }
            }
        });
        let session = ServerSession {
            from_agent,
            to_agent,
        };
        self.sessions
            .send(session)
            .await
            .map_err(|_| Status::unavailable("test is over"))?;
        Ok(Response::new(ReceiverStream::new(to_agent_receiver)))
    }
}

struct Harness {
    url: String,
    sessions: mpsc::Receiver<ServerSession>,
    model: VerifiedModel,
}

impl Harness {
    async fn start() -> Harness {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("agent=debug,info")
            .try_init();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (sessions_sender, sessions) = mpsc::channel(8);
        let service = CoordinatorServer::new(TestCoordinator {
            sessions: sessions_sender,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Harness {
            url,
            sessions,
            model: model(),
        }
    }

    fn config(&self, credential: &str) -> AgentConfig {
        let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/car-a.json");
        let mut config = AgentConfig::new(
            self.url.clone(),
            "car-1",
            credential,
            VehicleStateSource::Sim(trace),
            self.model.clone(),
        );
        config.engine.context_tokens_per_sequence = 1024;
        config.engine.parallel_sequences = 2;
        // Several tests run engines at once on small machines; more threads would only contend.
        config.engine.threads = 1;
        config.reconnect = BackoffConfig {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            factor: 2,
        };
        config
    }

    fn spawn_agent(
        &self,
        credential: &str,
    ) -> (JoinHandle<Result<(), AgentError>>, CancellationToken) {
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn(agent::run(self.config(credential), shutdown.clone()));
        (agent, shutdown)
    }

    async fn session(&mut self) -> ServerSession {
        tokio::time::timeout(STEP_TIMEOUT, self.sessions.recv())
            .await
            .expect("agent connects in time")
            .expect("server running")
    }

    fn prompt(&self, question: &str) -> Vec<i32> {
        let tokenizer = Tokenizer::load(&self.model.path).expect("tokenizer");
        let messages = [ChatMessage {
            role: "user".to_owned(),
            content: question.to_owned(),
        }];
        let text = tokenizer
            .apply_chat_template(&messages, true)
            .expect("chat template");
        tokenizer.tokenize(&text, true).expect("tokenize")
    }

    fn assign(&self, generation_id: &str, prompt: Vec<i32>, max_tokens: u32) -> CoordinatorKind {
        CoordinatorKind::Assign(proto::Assign {
            generation_id: generation_id.to_owned(),
            model_sha256: self.model.digest.to_string(),
            prompt_tokens: prompt,
            committed_tokens: Vec::new(),
            sampling: Some(proto::Sampling {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 7,
                ignore_eos: false,
                ..proto::Sampling::default()
            }),
            max_tokens,
            stop: Vec::new(),
            top_logprobs: 2,
            ..proto::Assign::default()
        })
    }
}

/// A coordinator that checks the hello the way the real one does, with `version` as its own
/// protocol version.
async fn check_hello(session: &mut ServerSession, version: u32) -> Option<proto::Refusal> {
    let hello = session.hello().await;
    if hello.protocol_version != version {
        return Some(proto::Refusal {
            code: RefusalCode::ProtocolVersion.into(),
            reason: format!(
                "protocol version {} is not supported; this coordinator speaks {version}",
                hello.protocol_version
            ),
            protocol_version: version,
        });
    }
    if hello.credential != CREDENTIAL {
        return Some(proto::Refusal {
            code: RefusalCode::BadCredential.into(),
            reason: format!("bad credential for node {}", hello.node_id),
            protocol_version: version,
        });
    }
    None
}

async fn refused_run(agent: JoinHandle<Result<(), AgentError>>) -> (RefusalCode, String) {
    let ended = tokio::time::timeout(STEP_TIMEOUT, agent)
        .await
        .expect("agent stops after a refusal")
        .expect("agent task");
    match ended {
        Err(AgentError::Refused { code, reason }) => (code, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credential_stops_the_agent_with_the_coordinators_reason() {
    let mut harness = Harness::start().await;
    let (agent, _shutdown) = harness.spawn_agent("wrong-secret");
    let mut session = harness.session().await;
    let refusal = check_hello(&mut session, proto::PROTOCOL_VERSION)
        .await
        .expect("refused");
    session.send(CoordinatorKind::Refusal(refusal)).await;
    drop(session);

    let (code, reason) = refused_run(agent).await;
    assert_eq!(code, RefusalCode::BadCredential);
    assert_eq!(reason, "bad credential for node car-1");
    assert!(
        harness.sessions.try_recv().is_err(),
        "a refused agent must not retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_mismatch_stops_the_agent() {
    let mut harness = Harness::start().await;
    let (agent, _shutdown) = harness.spawn_agent(CREDENTIAL);
    let mut session = harness.session().await;
    let coordinator_version = proto::PROTOCOL_VERSION + 1;
    let refusal = check_hello(&mut session, coordinator_version)
        .await
        .expect("refused");
    session.send(CoordinatorKind::Refusal(refusal)).await;

    let (code, reason) = refused_run(agent).await;
    assert_eq!(code, RefusalCode::ProtocolVersion);
    assert!(reason.contains("not supported"), "{reason}");
    assert!(
        harness.sessions.try_recv().is_err(),
        "a refused agent must not retry"
    );
}

/// Reads one generation's messages until its `Done`; returns the tokens and the `Done`.
async fn read_generation(
    session: &mut ServerSession,
    generation_id: &str,
) -> (Vec<proto::Token>, proto::GenerationDone) {
    let mut tokens = Vec::new();
    loop {
        match session.next_event().await {
            AgentKind::Tokens(batch) => {
                assert_eq!(batch.generation_id, generation_id);
                assert!(!batch.tokens.is_empty(), "no empty batches");
                tokens.extend(batch.tokens);
            }
            AgentKind::Done(done) => {
                assert_eq!(done.generation_id, generation_id);
                return (tokens, done);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_streams_tokens_then_done() {
    let mut harness = Harness::start().await;
    let (agent, shutdown) = harness.spawn_agent(CREDENTIAL);
    let mut session = harness.session().await;
    let hello = session.hello().await;
    assert_eq!(hello.node_id, "car-1");
    assert_eq!(hello.models.len(), 1);
    assert_eq!(hello.models[0].sha256, MODEL_SHA256);
    assert!(hello.models[0].loaded);
    let hardware = hello.hardware.expect("hardware");
    assert!(hardware.decode_tokens_per_second > 0.0);
    assert_eq!(hardware.parallel_sequences, 2);
    assert!(
        hello.state.expect("state").plugged_in,
        "car-a starts plugged in"
    );
    session.welcome().await;

    let prompt = harness.prompt("What is the capital of France?");
    let prompt_len = prompt.len();
    session.send(harness.assign("g-1", prompt, 24)).await;
    let (tokens, done) = read_generation(&mut session, "g-1").await;

    assert!(!tokens.is_empty());
    let positions: Vec<u32> = tokens.iter().map(|t| t.position).collect();
    assert_eq!(positions, (0..tokens.len() as u32).collect::<Vec<_>>());
    assert_eq!(done.completion_tokens as usize, tokens.len());
    assert_eq!(done.prompt_tokens as usize, prompt_len);
    assert!(matches!(
        done.reason(),
        proto::FinishReason::Stop | proto::FinishReason::Length
    ));
    for token in &tokens {
        assert!(token.logprob <= 0.0);
        assert_eq!(token.top_logprobs.len(), 2);
    }
    let text: Vec<u8> = tokens.iter().flat_map(|t| t.piece.clone()).collect();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("Paris"), "answer: {text}");

    // Heartbeats carry the simulated vehicle's state.
    let heartbeat = loop {
        if let AgentKind::Heartbeat(heartbeat) = session.next().await {
            break heartbeat;
        }
    };
    let state = heartbeat.state.expect("state");
    assert!(state.plugged_in && state.charging);
    assert!(state.departure_unix_ms > 0);

    // A model the node does not have is refused, retryable elsewhere.
    session
        .send(CoordinatorKind::Assign(proto::Assign {
            model_sha256: "ab".repeat(32),
            ..match harness.assign("g-2", vec![1, 2, 3], 4) {
                CoordinatorKind::Assign(assign) => assign,
                _ => unreachable!(),
            }
        }))
        .await;
    match session.next_event().await {
        AgentKind::Failed(failed) => {
            assert_eq!(failed.generation_id, "g-2");
            assert!(failed.retryable);
            assert!(
                failed.message.contains("another node"),
                "{}",
                failed.message
            );
        }
        other => panic!("expected failure, got {other:?}"),
    }

    shutdown.cancel();
    let ended = tokio::time::timeout(STEP_TIMEOUT, agent)
        .await
        .expect("agent stops");
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_generation_ends_it_quickly() {
    let mut harness = Harness::start().await;
    let (_agent, _shutdown) = harness.spawn_agent(CREDENTIAL);
    let mut session = harness.session().await;
    session.hello().await;
    session.welcome().await;

    let prompt = harness.prompt("Write a very long story about a dragon who learns to cook.");
    session.send(harness.assign("g-long", prompt, 600)).await;
    let mut received = match session.next_event().await {
        AgentKind::Tokens(batch) => batch.tokens.len(),
        other => panic!("expected tokens, got {other:?}"),
    };
    session
        .send(CoordinatorKind::Cancel(proto::Cancel {
            generation_id: "g-long".to_owned(),
            reason: "client went away".to_owned(),
        }))
        .await;
    let cancelled_at = Instant::now();
    let (more, done) = read_generation(&mut session, "g-long").await;
    let took = cancelled_at.elapsed();
    received += more.len();

    assert_eq!(done.reason(), proto::FinishReason::Cancelled);
    assert_eq!(done.completion_tokens as usize, received);
    assert!(received < 600, "the generation ran to its end");
    assert!(took < Duration::from_secs(2), "cancel took {took:?}");

    // Nothing more is sent for it, and the node reports itself idle again.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match session.next().await {
            AgentKind::Heartbeat(heartbeat) if heartbeat.active_generations == 0 => break,
            AgentKind::Heartbeat(_) => assert!(Instant::now() < deadline, "still active"),
            other => panic!("unexpected after done: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_when_the_stream_drops() {
    let mut harness = Harness::start().await;
    let (_agent, _shutdown) = harness.spawn_agent(CREDENTIAL);
    let mut first = harness.session().await;
    assert!(check_hello(&mut first, proto::PROTOCOL_VERSION)
        .await
        .is_none());
    first.welcome().await;
    assert!(matches!(first.next().await, AgentKind::Heartbeat(_)));
    // The coordinator cell goes away: its end of the stream closes.
    drop(first);

    let mut second = harness.session().await;
    let hello = second.hello().await;
    assert_eq!(hello.node_id, "car-1");
    second.welcome().await;

    // The node still works after the reconnect.
    let prompt = harness.prompt("Say hello.");
    second.send(harness.assign("g-after", prompt, 4)).await;
    let (tokens, done) = read_generation(&mut second, "g-after").await;
    assert_eq!(done.completion_tokens as usize, tokens.len());
}
