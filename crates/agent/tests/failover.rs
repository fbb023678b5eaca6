//! A node with two cells fails over: real in-process cells (`cell::start`) on 127.0.0.1, one
//! shared store that enrols the node, and the agent's own session loop with a model-free executor
//! (no model needed, so these run everywhere).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent::{
    serve_cells, BackoffConfig, CellLink, Execution, Executor, GenerationTask, Node, NodeIdentity,
    VehicleStateSource,
};
use cell_api::served::ServedModels;
use rand::rngs::StdRng;
use rand::SeedableRng;
use store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NODE: &str = "car-failover";
/// How long a failover may take: the backoff's first cap plus a handshake, with a wide margin
/// for a loaded test machine.
const FAILOVER_WITHIN: Duration = Duration::from_secs(10);
/// How often the test looks at a cell's connected nodes while it waits.
const POLL: Duration = Duration::from_millis(20);

/// Refuses every assignment as retryable: these tests exercise sessions, not generations.
struct NoModel;

impl Executor for NoModel {
    fn execute(&self, _assign: proto::Assign, task: GenerationTask) -> Execution {
        Box::pin(async move { task.fail("no model here".to_owned(), true).await })
    }
}

struct TestCell {
    running: cell::Running,
    shutdown: CancellationToken,
}

impl TestCell {
    async fn start(store: &Store) -> TestCell {
        let shutdown = CancellationToken::new();
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let running = cell::start(
            cell::CellConfig::new(listen),
            store.clone(),
            Arc::new(ServedModels::default()),
            shutdown.clone(),
        )
        .await
        .expect("cell starts");
        TestCell { running, shutdown }
    }

    fn url(&self) -> String {
        format!("http://{}", self.running.grpc)
    }

    fn holds(&self, node: &str) -> bool {
        self.running
            .core
            .connected_nodes()
            .iter()
            .any(|n| n == node)
    }

    /// Waits until `node` holds a session here; panics after `within`.
    async fn wait_for(&self, node: &str, within: Duration) -> Duration {
        let started = Instant::now();
        while !self.holds(node) {
            assert!(
                started.elapsed() < within,
                "{node} not connected to {} within {within:?}",
                self.url()
            );
            tokio::time::sleep(POLL).await;
        }
        started.elapsed()
    }
}

async fn enrolled_store(dir: &tempfile::TempDir) -> (Store, String) {
    let store = Store::open(dir.path()).await.expect("store");
    let credential = store.add_node(NODE, "", 0).await.expect("enrol");
    (store, credential)
}

fn node(credential: &str) -> Node {
    let identity = NodeIdentity {
        node_id: NODE.to_owned(),
        credential: credential.to_owned(),
        hardware: proto::Hardware {
            memory_budget_bytes: 1 << 30,
            threads: 1,
            decode_tokens_per_second: 10.0,
            prefill_tokens_per_second: 100.0,
            parallel_sequences: 1,
            engine_version: "none".to_owned(),
            cpu_kernels: String::new(),
            attention: proto::Attention::Off as i32,
        },
        models: Vec::new(),
    };
    let vehicle = VehicleStateSource::Datacenter
        .open(SystemTime::now())
        .expect("adapter");
    Node::new(
        identity,
        Arc::new(NoModel),
        vehicle,
        Duration::from_millis(200),
    )
}

fn fast_backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        factor: 2,
    }
}

fn links(urls: &[String]) -> Vec<CellLink> {
    urls.iter()
        .map(|url| CellLink::dial(url).expect("valid url"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_cell_goes_down_registers_with_the_next_cell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, credential) = enrolled_store(&dir).await;
    let first = TestCell::start(&store).await;
    let second = TestCell::start(&store).await;
    let cells = links(&[first.url(), second.url()]);
    let node = node(&credential);
    let shutdown = CancellationToken::new();
    let agent_shutdown = shutdown.clone();
    let agent = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(11);
        serve_cells(&node, &cells, fast_backoff(), &mut rng, &agent_shutdown).await
    });

    // Its own cell first, and only there.
    first.wait_for(NODE, FAILOVER_WITHIN).await;
    assert!(!second.holds(NODE));

    first.shutdown.cancel();
    let took = second.wait_for(NODE, FAILOVER_WITHIN).await;
    assert!(!first.holds(NODE));
    assert!(took < FAILOVER_WITHIN, "failover took {took:?}");

    shutdown.cancel();
    let ended = tokio::time::timeout(FAILOVER_WITHIN, agent)
        .await
        .expect("agent stops")
        .expect("agent task");
    assert!(ended.is_ok(), "{ended:?}");
    second.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_own_cell_refuses_connections_starts_on_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, credential) = enrolled_store(&dir).await;
    // A port nobody listens on: bound, then released.
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        format!("http://{}", listener.local_addr().expect("address"))
    };
    let second = TestCell::start(&store).await;
    let cells = links(&[dead, second.url()]);
    let node = node(&credential);
    let shutdown = CancellationToken::new();
    let agent_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(5);
        serve_cells(&node, &cells, fast_backoff(), &mut rng, &agent_shutdown).await
    });
    second.wait_for(NODE, FAILOVER_WITHIN).await;
    shutdown.cancel();
    second.shutdown.cancel();
}

/// A generator that always draws the smallest value, so that every delay is as short as the
/// backoff allows: the worst case for a reconnect loop.
struct Zeros;

impl rand::RngCore for Zeros {
    fn next_u32(&mut self) -> u32 {
        0
    }
    fn next_u64(&mut self) -> u64 {
        0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.fill(0);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        dest.fill(0);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_loop_against_dead_cells_does_not_spin() {
    // Two "cells" that accept TCP and hang up at once: every attempt fails fast.
    let mut urls = Vec::new();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        urls.push(format!(
            "http://{}",
            listener.local_addr().expect("address")
        ));
        let accepted = Arc::clone(&accepted);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    connection = listener.accept() => match connection {
                        Ok((socket, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            drop(socket);
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    }
    let cells = links(&urls);
    let node = node("any-credential");
    let stats = Arc::clone(node.stats());
    let shutdown = CancellationToken::new();
    let agent_shutdown = shutdown.clone();
    // A cap well above the floor, so that only the floor can keep the attempts apart.
    let backoff = BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
        factor: 2,
    };
    let started = Instant::now();
    let agent = tokio::spawn(async move {
        serve_cells(&node, &cells, backoff, &mut Zeros, &agent_shutdown).await
    });
    // Wait until a few attempts have failed, then give the loop a fixed window.
    let window = Duration::from_millis(500);
    let deadline = Instant::now() + FAILOVER_WITHIN;
    while stats.sessions_lost.load(Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "no attempts were made");
        tokio::time::sleep(POLL).await;
    }
    tokio::time::sleep(window).await;
    shutdown.cancel();
    let elapsed = started.elapsed();
    agent.await.expect("agent task").expect("agent ends");
    stop.cancel();

    let attempts = stats.sessions_lost.load(Ordering::Relaxed) as u128;
    // One immediate retry, then at least RETRY_DELAY_FLOOR between attempts.
    let most = 2 + elapsed.as_millis() / agent::backoff::RETRY_DELAY_FLOOR.as_millis();
    assert!(
        attempts <= most,
        "{attempts} attempts in {elapsed:?}, more than {most}"
    );
    assert!(accepted.load(Ordering::Relaxed) >= 3);
    assert_eq!(stats.welcomes.load(Ordering::Relaxed), 0);
}
