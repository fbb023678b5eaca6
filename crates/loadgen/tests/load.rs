//! The load generator against real gRPC servers on 127.0.0.1: an in-process cell
//! (`cell::start`) for sessions, heartbeats and connection sharing, a scripted coordinator for
//! assignments (the cell serves no model here, so it assigns nothing), and the measurement.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cell_api::served::ServedModels;
use loadgen::{Enrolment, LoadConfig, LoadSide, MeasureConfig, TokenSource};
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_message::Kind as CoordinatorKind;
use proto::coordinator_server::{Coordinator, CoordinatorServer};
use proto::{AgentMessage, CoordinatorMessage};
use store::Store;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Generous: the test machine may be busy.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
const DIGEST: &str = "abababababababababababababababababababababababababababababababab";

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Established TCP connections whose local port is `port` (IPv4), from `/proc/net/tcp`.
fn established_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local_port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&local_port) && fields[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_vehicles_hold_sessions_with_a_cell_over_shared_connections_and_heartbeat() {
    const VEHICLES: usize = 22;
    const PER_CONNECTION: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).await.expect("store");
    let vehicles = loadgen::enrol(&store, "sim", VEHICLES)
        .await
        .expect("enrol");
    let shutdown = CancellationToken::new();
    let mut config = cell::CellConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    let interval = Duration::from_millis(200);
    config.heartbeat_interval = interval;
    config.heartbeat_timeout = interval * 3;
    let running = cell::start(
        config,
        store,
        Arc::new(ServedModels::default()),
        shutdown.clone(),
    )
    .await
    .expect("cell");
    let connected = || running.metrics.nodes_connected.load(Ordering::Relaxed);

    let mut load_config = LoadConfig::new(
        vec![format!("http://{}", running.grpc)],
        vehicles,
        TokenSource::new("m", DIGEST),
    );
    load_config.sessions_per_connection = PER_CONNECTION;
    let load = loadgen::start(load_config, shutdown.clone()).expect("load starts");
    wait_until("every vehicle is connected", || {
        connected() == VEHICLES as i64
    })
    .await;
    let names = running.core.connected_nodes();
    assert_eq!(names.first().map(String::as_str), Some("sim-000000"));
    assert_eq!(names.len(), VEHICLES);
    // Sessions share connections, at most four to one: at least six connections, and far fewer
    // than one per session. (Six is the usual count; a shared connection is sometimes opened
    // again while the ramp runs, so the bound is looser than that.)
    let connections = established_on(running.grpc.port());
    assert!(
        (VEHICLES.div_ceil(PER_CONNECTION)..=VEHICLES / 2).contains(&connections),
        "{connections} connections for {VEHICLES} sessions"
    );

    // Heartbeating at the interval the cell asked for keeps every session past several timeouts.
    let stats = Arc::clone(load.stats());
    let beats_before = stats.heartbeats_sent.load(Ordering::Relaxed);
    wait_until("heartbeats spanning three timeouts went out", || {
        stats.heartbeats_sent.load(Ordering::Relaxed) >= beats_before + (VEHICLES as u64) * 10
    })
    .await;
    assert_eq!(connected(), VEHICLES as i64);
    assert_eq!(running.metrics.nodes_lost.load(Ordering::Relaxed), 0);

    shutdown.cancel();
    let report = tokio::time::timeout(STEP_TIMEOUT, load.join())
        .await
        .expect("load stops");
    assert_eq!(report.vehicles, VEHICLES);
    assert_eq!(report.refused, 0);
    assert_eq!(report.welcomes, VEHICLES as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_with_a_wrong_credential_stops_and_the_others_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).await.expect("store");
    let mut vehicles = loadgen::enrol(&store, "sim", 3).await.expect("enrol");
    vehicles.push(Enrolment {
        node_id: "not-enrolled".to_owned(),
        credential: "guess".to_owned(),
    });
    let shutdown = CancellationToken::new();
    let running = cell::start(
        cell::CellConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        store,
        Arc::new(ServedModels::default()),
        shutdown.clone(),
    )
    .await
    .expect("cell");
    let load = loadgen::start(
        LoadConfig::new(
            vec![format!("http://{}", running.grpc)],
            vehicles,
            TokenSource::new("m", DIGEST),
        ),
        shutdown.clone(),
    )
    .expect("load starts");
    wait_until("three vehicles are connected", || {
        running.metrics.nodes_connected.load(Ordering::Relaxed) == 3
    })
    .await;
    let stats = Arc::clone(load.stats());
    wait_until("the stranger was refused and stopped", || {
        stats.refused.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(running.metrics.nodes_refused.load(Ordering::Relaxed), 1);
    shutdown.cancel();
    let report = tokio::time::timeout(STEP_TIMEOUT, load.join())
        .await
        .expect("load stops");
    assert_eq!(report.refused, 1);
}

/// One agent stream as a scripted coordinator sees it.
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

    async fn send(&self, kind: CoordinatorKind) {
        self.to_agent
            .send(Ok(CoordinatorMessage { kind: Some(kind) }))
            .await
            .expect("agent stream open");
    }

    async fn accept(&mut self) -> String {
        let AgentKind::Hello(hello) = self.next().await else {
            panic!("expected hello");
        };
        self.send(CoordinatorKind::Welcome(proto::Welcome {
            protocol_version: proto::PROTOCOL_VERSION,
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 15_000,
        }))
        .await;
        hello.node_id
    }

    /// Tokens until the generation's `Done`.
    async fn generation(&mut self, id: &str) -> (Vec<proto::Token>, proto::GenerationDone) {
        let mut tokens = Vec::new();
        loop {
            match self.next_event().await {
                AgentKind::Tokens(batch) => {
                    assert_eq!(batch.generation_id, id);
                    tokens.extend(batch.tokens);
                }
                AgentKind::Done(done) => {
                    assert_eq!(done.generation_id, id);
                    return (tokens, done);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

struct Scripted {
    sessions: mpsc::Sender<ServerSession>,
}

#[tonic::async_trait]
impl Coordinator for Scripted {
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
        self.sessions
            .send(ServerSession {
                from_agent,
                to_agent,
            })
            .await
            .map_err(|_| Status::unavailable("test is over"))?;
        Ok(Response::new(ReceiverStream::new(to_agent_receiver)))
    }
}

async fn next_session(sessions: &mut mpsc::Receiver<ServerSession>) -> ServerSession {
    tokio::time::timeout(STEP_TIMEOUT, sessions.recv())
        .await
        .expect("a vehicle connects")
        .expect("server running")
}

fn assign(id: &str, committed: Vec<i32>, max_tokens: u32) -> CoordinatorKind {
    CoordinatorKind::Assign(proto::Assign {
        generation_id: id.to_owned(),
        model_sha256: DIGEST.to_owned(),
        prompt_tokens: vec![1, 2, 3],
        committed_tokens: committed,
        sampling: Some(proto::Sampling {
            seed: 99,
            ..proto::Sampling::default()
        }),
        max_tokens,
        top_logprobs: 2,
        ..proto::Assign::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_moved_to_another_simulated_vehicle_continues_identically() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (sessions_sender, mut sessions) = mpsc::channel(8);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(Scripted {
                sessions: sessions_sender,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let vehicles = (0..2)
        .map(|index| Enrolment {
            node_id: format!("v{index}"),
            credential: "c".to_owned(),
        })
        .collect();
    let mut tokens = TokenSource::new("m", DIGEST);
    tokens.tokens_per_second = 500.0;
    let shutdown = CancellationToken::new();
    let _load = loadgen::start(
        LoadConfig::new(vec![url], vehicles, tokens),
        shutdown.clone(),
    )
    .expect("load starts");
    let mut first = next_session(&mut sessions).await;
    first.accept().await;
    let mut second = next_session(&mut sessions).await;
    second.accept().await;

    // The whole generation on the first vehicle.
    first.send(assign("whole", Vec::new(), 12)).await;
    let (whole, done) = first.generation("whole").await;
    assert_eq!(done.reason(), proto::FinishReason::Length);
    assert_eq!(done.completion_tokens, 12);
    assert_eq!(done.prompt_tokens, 3);
    let positions: Vec<u32> = whole.iter().map(|token| token.position).collect();
    assert_eq!(positions, (0..12).collect::<Vec<u32>>());
    assert!(whole.iter().all(|token| token.top_logprobs.len() == 2));

    // The same generation, its first five tokens committed elsewhere, on the second vehicle.
    let committed = whole[..5].iter().map(|token| token.token_id).collect();
    second.send(assign("moved", committed, 12)).await;
    let (rest, done) = second.generation("moved").await;
    assert_eq!(done.completion_tokens, 12);
    assert_eq!(rest, whole[5..].to_vec());

    // A cancelled generation ends at once with what it made.
    first.send(assign("long", Vec::new(), 10_000)).await;
    first
        .send(CoordinatorKind::Cancel(proto::Cancel {
            generation_id: "long".to_owned(),
            reason: "client went away".to_owned(),
        }))
        .await;
    let (made, done) = first.generation("long").await;
    assert_eq!(done.reason(), proto::FinishReason::Cancelled);
    assert_eq!(done.completion_tokens as usize, made.len());
    assert!(made.len() < 10_000);

    // A model it does not claim is refused, retryable elsewhere.
    second
        .send(CoordinatorKind::Assign(proto::Assign {
            generation_id: "other-model".to_owned(),
            model_sha256: "cd".repeat(32),
            max_tokens: 4,
            ..proto::Assign::default()
        }))
        .await;
    match second.next_event().await {
        AgentKind::Failed(failed) => {
            assert_eq!(failed.generation_id, "other-model");
            assert!(failed.retryable);
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_measurement_holds_every_session_and_reports_side_by_side_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = MeasureConfig::new(40, dir.path().to_owned(), LoadSide::InProcess);
    config.heartbeat_interval = Duration::from_millis(200);
    config.connect_within = STEP_TIMEOUT;
    config.settle = Duration::ZERO;
    config.window = Duration::from_millis(500);
    let measurement = loadgen::measure(config).await.expect("measured");
    assert_eq!(measurement.sessions_wanted, 40);
    assert_eq!(measurement.sessions_held, 40);
    assert!(measurement.load_in_process);
    assert!((measurement.heartbeats_per_second() - 200.0).abs() < 1e-9);
    assert!(measurement.rss_held_bytes > 0);
    assert!(measurement.window >= Duration::from_millis(500));
    assert!(measurement
        .cpu_seconds_per_1000_heartbeats_per_second()
        .is_finite());
}
