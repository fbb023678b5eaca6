//! What the bus tests share: real `nats-server` processes on free loopback
//! ports (alone or clustered), and a deterministic cell.
//!
//! `nats-server` is found on `PATH`, or at `NATS_SERVER`; a test that cannot
//! start one fails with a message saying so, it is never skipped.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bus::{CellId, Cells, CellsConfig, ServeConfig};
use cell_api::metering::{Metering, NodeReport, PaidSpeed, SegmentTrack};
use cell_api::{
    Admitted, Capacity, Cell, CommittedToken, FinishReason, ModelHeads, NewGeneration, NodeSummary,
    Numerics, Rejection, TenantRef, Update, Usage,
};
use domain::{RequestId, TenantClass, TimestampMs};
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// The model every test cell serves.
pub const MODEL: &str = "tiny";

/// A `nats-server` child process, killed (SIGKILL) when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
}

impl NatsServer {
    /// A server alone.
    pub fn start() -> NatsServer {
        NatsServer::spawn(free_port(), &[])
    }

    /// `count` servers routed to each other on loopback, ready once every
    /// server passes messages to every other (see `wait_for_mesh`).
    pub fn cluster(count: usize) -> Vec<NatsServer> {
        let cluster_ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        (0..count)
            .map(|index| {
                let routes: Vec<String> = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
                    .collect();
                let cluster = format!("nats://127.0.0.1:{}", cluster_ports[index]);
                let routes = routes.join(",");
                NatsServer::spawn(
                    free_port(),
                    &[
                        "--cluster",
                        &cluster,
                        "--cluster_name",
                        "fleetgrid-test",
                        "--routes",
                        &routes,
                    ],
                )
            })
            .collect()
    }

    fn spawn(port: u16, extra: &[&str]) -> NatsServer {
        let binary = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_string());
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            // Clients reconnect only to the servers they were given.
            .arg("--no_advertise")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start `{binary}` (install nats-server or set NATS_SERVER): {error}")
            });
        let mut server = NatsServer { child, port };
        server.wait_listening();
        server
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nats-server on port {} exited: {status}", self.port);
            }
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and the process reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("its address").port()
}

/// A client of these servers, in order of preference.
pub async fn connect(servers: &[&NatsServer]) -> async_nats::Client {
    let addresses: Vec<async_nats::ServerAddr> = servers
        .iter()
        .map(|server| server.url().parse().expect("a server address"))
        .collect();
    async_nats::ConnectOptions::new()
        .connect(addresses)
        .await
        .expect("connect to nats-server")
}

/// Waits until a message published on each server reaches a subscriber on
/// each other one (routes are up and interest has spread).
pub async fn wait_for_mesh(servers: &[NatsServer]) {
    use futures::StreamExt;
    let mut clients = Vec::new();
    for server in servers {
        clients.push(connect(&[server]).await);
    }
    for (to, receiver) in clients.iter().enumerate() {
        for (from, sender) in clients.iter().enumerate().filter(|(from, _)| *from != to) {
            let subject = format!("mesh.{from}.{to}");
            let mut subscription = receiver.subscribe(subject.clone()).await.unwrap();
            receiver.flush().await.unwrap();
            let deadline = Instant::now() + WAIT;
            loop {
                sender
                    .publish(subject.clone(), "ping".into())
                    .await
                    .unwrap();
                sender.flush().await.unwrap();
                let heard = tokio::time::timeout(Duration::from_millis(50), subscription.next());
                if heard.await.is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster's routes never came up"
                );
            }
        }
    }
}

/// Polls `check` until it holds, failing the test after `WAIT`.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fast paces for tests: a lost cell is noticed in about a second.
pub fn serve_config() -> ServeConfig {
    ServeConfig {
        capacity_interval: Duration::from_millis(100),
        keepalive_interval: Duration::from_millis(100),
        listener_probe_interval: Duration::from_millis(200),
        ..ServeConfig::default()
    }
}

pub fn cells_config() -> CellsConfig {
    CellsConfig {
        submit_timeout: Duration::from_secs(2),
        silence_timeout: Duration::from_millis(1_000),
        capacity_stale_after: Duration::from_millis(600),
        moves_max: 8,
        move_retry_delay: Duration::from_millis(100),
        seed: Some(7),
        ..CellsConfig::default()
    }
}

/// A cell served on the bus, and how to stop it.
pub struct Served {
    pub cell: Arc<TestCell>,
    pub task: JoinHandle<()>,
    pub shutdown: CancellationToken,
}

pub async fn serve(nats: async_nats::Client, cell: Arc<TestCell>) -> Served {
    let shutdown = CancellationToken::new();
    let task = bus::serve_cell(
        nats,
        CellId::new(cell.name.clone()).unwrap(),
        Arc::clone(&cell) as Arc<dyn Cell>,
        serve_config(),
        shutdown.clone(),
    )
    .await
    .expect("serve the cell");
    Served {
        cell,
        task,
        shutdown,
    }
}

/// A gateway's `Cells` that knows exactly `names`.
pub async fn gateway(nats: async_nats::Client, names: &[&str]) -> Cells {
    let cells = Cells::connect(nats, cells_config()).await.expect("connect");
    let mut expected: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    expected.sort();
    eventually("the cells' summaries", || cells.cells() == expected).await;
    cells
}

/// The token a test cell produces at `position` of a generation: a pure
/// function of the prompt, the seed and the position, as sampling keyed
/// by (seed, position) is.
pub fn token_at(prompt: &[i32], seed: u64, position: u32) -> i32 {
    let mut hash = seed ^ 0x9e37_79b9_7f4a_7c15;
    for &token in prompt {
        hash = (hash ^ u64::from(token as u32)).wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ u64::from(position)).wrapping_mul(0x0100_0000_01b3);
    hash ^= hash >> 29;
    i32::try_from(hash % 50_000).unwrap() + 1
}

/// The committed token at `position`, as a test cell sends it.
pub fn committed_at(prompt: &[i32], seed: u64, position: u32) -> CommittedToken {
    let token = token_at(prompt, seed, position);
    CommittedToken {
        token_id: token,
        piece: format!("<{token}>").into_bytes(),
        logprob: -(position as f32) / 8.0,
        top_logprobs: vec![(token, format!("<{token}>").into_bytes(), -0.25)],
    }
}

/// A generation of `max_tokens` for the test cells.
pub fn generation(prompt: Vec<i32>, seed: u64, max_tokens: u32) -> NewGeneration {
    NewGeneration {
        public_id: format!("chatcmpl-{seed}"),
        tenant: TenantRef {
            id: 3,
            class: TenantClass::Spot,
        },
        model: MODEL.to_string(),
        prompt,
        committed: Vec::new(),
        numerics: None,
        sampling: proto::Sampling {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            seed,
            ignore_eos: false,
            ..proto::Sampling::default()
        },
        max_tokens,
        stop: vec!["\n\n".to_string()],
        top_logprobs: 1,
        prompt_logprobs: false,
        draft: Vec::new(),
        deadline_ms: Some(30_000),
    }
}

/// A cell that runs no model: each generation produces `token_at` for each
/// position after its committed tokens, one every `token_every`, then
/// finishes with `Length`. It honours `committed` (and refuses committed
/// tokens that are not its own), meters one segment per generation on its
/// one vehicle, and records what it was asked.
pub struct TestCell {
    pub name: String,
    slots: u32,
    running: u32,
    token_every: Duration,
    refusal: Mutex<Option<Rejection>>,
    /// The prompt-head hashes its capacity says its vehicle holds.
    heads: Mutex<Vec<u64>>,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    next: u64,
    submitted: Vec<NewGeneration>,
    cancelled: Vec<RequestId>,
    policies: Vec<(String, scheduler::OwnerPolicy)>,
    finished: Vec<Metering>,
    live: HashMap<u64, (CancellationToken, Metering)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    TimestampMs::from_system_time(SystemTime::now()).0
}

impl TestCell {
    /// A cell whose one vehicle declares `slots` and runs `running`.
    pub fn new(name: &str, slots: u32, running: u32, token_every: Duration) -> Arc<TestCell> {
        Arc::new(TestCell {
            name: name.to_string(),
            slots,
            running,
            token_every,
            refusal: Mutex::new(None),
            heads: Mutex::new(Vec::new()),
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    /// Its vehicle's name.
    pub fn node(&self) -> String {
        format!("{}-car", self.name)
    }

    /// The numbers its vehicle computes (each test cell's are its own).
    pub fn numerics(&self) -> Numerics {
        Numerics {
            cpu_kernels: format!("{} kernels", self.name),
            ..Numerics::default()
        }
    }

    /// From now on its capacity says its vehicle holds the head of `prompt`.
    pub fn hold_prompt_head(&self, prompt: &[i32]) {
        let heads = domain::PromptHeads::of(prompt);
        assert!(!heads.is_empty(), "a prompt shorter than one head block");
        lock(&self.heads).extend_from_slice(heads.hashes());
    }

    pub fn refuse_with(&self, rejection: Rejection) {
        *lock(&self.refusal) = Some(rejection);
    }

    pub fn submitted(&self) -> Vec<NewGeneration> {
        lock(&self.state).submitted.clone()
    }

    pub fn cancelled(&self) -> Vec<RequestId> {
        lock(&self.state).cancelled.clone()
    }

    pub fn policies(&self) -> Vec<(String, scheduler::OwnerPolicy)> {
        lock(&self.state).policies.clone()
    }

    /// The metering of every generation it finished.
    pub fn finished(&self) -> Vec<Metering> {
        lock(&self.state).finished.clone()
    }

    /// Generations it runs now.
    pub fn live(&self) -> usize {
        lock(&self.state).live.len()
    }

    fn admit(&self, generation: NewGeneration) -> Result<Admitted, Rejection> {
        let mut state = lock(&self.state);
        state.submitted.push(generation.clone());
        if let Some(rejection) = lock(&self.refusal).clone() {
            return Err(rejection);
        }
        let seed = generation.sampling.seed;
        let honest = generation
            .committed
            .iter()
            .zip(0..)
            .all(|(token, position)| *token == token_at(&generation.prompt, seed, position));
        if !honest {
            return Err(Rejection::Other {
                message: "committed tokens this cell would not have produced".to_string(),
            });
        }
        state.next += 1;
        let request = state.next;
        let prompt_tokens = u32::try_from(generation.prompt.len()).unwrap();
        let committed = u32::try_from(generation.committed.len()).unwrap();
        let segment = SegmentTrack::started(
            self.node(),
            prompt_tokens + committed,
            now_ms(),
            0,
            PaidSpeed::declared(1e3, 1e2),
        );
        let metering = Metering {
            prompt_tokens,
            segments: vec![segment],
            node_report: None,
            finished_ms: now_ms(),
        };
        let stop = CancellationToken::new();
        state.live.insert(request, (stop.clone(), metering));
        let (sender, updates) = mpsc::channel(generation.max_tokens as usize + 16);
        tokio::spawn(produce(
            Arc::clone(&self.state),
            request,
            generation,
            self.token_every,
            sender,
            stop,
        ));
        Ok(Admitted {
            request: RequestId(request),
            updates,
        })
    }
}

/// Produces a test cell's generation.
async fn produce(
    state: Arc<Mutex<State>>,
    request: u64,
    generation: NewGeneration,
    every: Duration,
    sender: mpsc::Sender<Update>,
    stop: CancellationToken,
) {
    let seed = generation.sampling.seed;
    let first = u32::try_from(generation.committed.len()).unwrap();
    let mut pace = tokio::time::interval(every);
    for position in first..generation.max_tokens {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pace.tick() => {}
        }
        {
            let mut state = lock(&state);
            let Some((_, metering)) = state.live.get_mut(&request) else {
                return;
            };
            let segment = &mut metering.segments[0];
            segment.completion_tokens += 1;
            let elapsed_us = u64::try_from(now_ms() - segment.started_ms).unwrap_or(0) * 1_000;
            segment.active(now_ms(), elapsed_us);
        }
        let token = committed_at(&generation.prompt, seed, position);
        if sender.send(Update::Token(token)).await.is_err() {
            return;
        }
    }
    let finished = {
        let mut state = lock(&state);
        let Some((_, mut metering)) = state.live.remove(&request) else {
            return;
        };
        let segment = &metering.segments[0];
        metering.node_report = Some(NodeReport {
            prompt_tokens: metering.prompt_tokens,
            completion_tokens: generation.max_tokens,
            compute_ms: segment.compute_ms(),
        });
        metering.finished_ms = now_ms();
        state.finished.push(metering.clone());
        metering
    };
    let _ = sender
        .send(Update::Finished {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: finished.prompt_tokens,
                completion_tokens: generation.max_tokens,
                cached_prompt_tokens: 0,
            },
            metering: finished,
        })
        .await;
}

impl Cell for TestCell {
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>> {
        Box::pin(futures::future::ready(self.admit(generation)))
    }

    fn cancel(&self, request: RequestId) -> Option<Metering> {
        let mut state = lock(&self.state);
        state.cancelled.push(request);
        let (stop, metering) = state.live.remove(&request.0)?;
        stop.cancel();
        Some(metering)
    }

    fn metered(&self, request: RequestId) -> Option<Metering> {
        lock(&self.state)
            .live
            .get(&request.0)
            .map(|(_, metering)| metering.clone())
    }

    fn numerics(&self, request: RequestId) -> Option<Numerics> {
        let live = lock(&self.state).live.contains_key(&request.0);
        live.then(|| TestCell::numerics(self))
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            nodes: vec![NodeSummary {
                name: self.node(),
                models: vec![MODEL.to_string()],
                slots: self.slots,
                running: self.running,
            }],
            prompt_heads: vec![ModelHeads {
                model: MODEL.to_string(),
                hashes: lock(&self.heads).clone(),
            }],
            unlisted: 0,
        }
    }

    fn owner_policy_changed(&self, node: &str, policy: scheduler::OwnerPolicy) {
        lock(&self.state).policies.push((node.to_string(), policy));
    }
}

/// Every update of a generation until its end (or until its channel
/// closes), failing the test after `WAIT`.
pub async fn collect(
    updates: &mut mpsc::Receiver<Update>,
) -> (Vec<CommittedToken>, Option<Update>) {
    let mut tokens = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, updates.recv()).await {
            Err(_) => panic!("the generation stalled after {} tokens", tokens.len()),
            Ok(None) => return (tokens, None),
            Ok(Some(Update::Token(token))) => tokens.push(token),
            Ok(Some(end)) => return (tokens, Some(end)),
        }
    }
}

/// The next `count` tokens, failing the test after `WAIT`.
pub async fn take_tokens(
    updates: &mut mpsc::Receiver<Update>,
    count: usize,
) -> Vec<CommittedToken> {
    let mut tokens = Vec::new();
    while tokens.len() < count {
        match tokio::time::timeout(WAIT, updates.recv()).await {
            Ok(Some(Update::Token(token))) => tokens.push(token),
            other => panic!("expected a token, got {other:?}"),
        }
    }
    tokens
}

/// Whether two token lists are the same (`CommittedToken` has no `PartialEq`).
pub fn same_tokens(a: &[CommittedToken], b: &[CommittedToken]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.token_id == b.token_id
                && a.piece == b.piece
                && a.logprob == b.logprob
                && a.top_logprobs == b.top_logprobs
        })
}

/// The whole sequence a test cell produces for a generation.
pub fn expected(generation: &NewGeneration) -> Vec<CommittedToken> {
    (0..generation.max_tokens)
        .map(|position| committed_at(&generation.prompt, generation.sampling.seed, position))
        .collect()
}

/// Completion tokens over every segment of `metering`.
pub fn metered_tokens(metering: &Metering) -> u32 {
    metering
        .segments
        .iter()
        .map(|segment| segment.completion_tokens)
        .sum()
}
