//! A cluster end to end: `fleetgrid gateway` and two `fleetgrid cell`
//! processes on a real NATS cluster and a real PostgreSQL, with real agents
//! serving the real model. A cell killed with SIGKILL in the middle of a
//! streamed answer costs the client nothing: the gateway moves the
//! generation to the other cell with the tokens already sent, and the client
//! reads exactly the text of an uninterrupted run; the dead cell's vehicle
//! reconnects to the other cell; the request is charged once.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 and Debian's `nats-server` (`cargo
//! xtask test` starts and installs them); fails, never skips, without them.

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::OsString;

use common::{fleetgrid, parse_sse, Gateway, MODEL, WAIT};
use futures::StreamExt;
use serde_json::json;
use stack::nats::NatsCluster;
use stack::{AgentSpec, ClusterCell, ClusterGateway, ClusterSpec, LogFile, MemberSpec, Process};
use store::testing::PgSchema;

/// How fast cells and agents notice each other's loss in this test.
const HEARTBEATS: [&str; 4] = [
    "--heartbeat-interval-ms",
    "500",
    "--heartbeat-timeout-ms",
    "2000",
];

/// The cluster under test: its processes are stopped when it is dropped.
struct Cluster {
    dir: tempfile::TempDir,
    spec: ClusterSpec,
    _nats: NatsCluster,
    gateway: Gateway,
    gateway_process: Process,
    cells: Vec<ClusterCell>,
    agents: Vec<Process>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stack::stop_all_blocking(
            std::iter::once(&mut self.gateway_process)
                .chain(self.cells.iter_mut().map(|cell| &mut cell.process))
                .chain(&mut self.agents),
        );
    }
}

impl Cluster {
    /// NATS (three servers), two cells, one gateway, and a fleet tenant.
    async fn start(schema: &PgSchema) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nats = NatsCluster::start(3, dir.path(), WAIT)
            .await
            .expect("a NATS cluster starts");
        let spec = ClusterSpec {
            nats: nats.urls(),
            database: schema.url(),
            data_dir: dir.path().to_path_buf(),
            models: vec![MODEL.to_owned()],
        };
        let api_key = cli(
            &spec,
            &["tenants", "create", "cluster-tenant", "--class", "fleet"],
        );
        let mut cells = Vec::new();
        for cell_id in ["cell-a", "cell-b"] {
            let mut member =
                MemberSpec::new(LogFile::create(dir.path().join(format!("{cell_id}.log"))));
            member.args = HEARTBEATS.iter().map(OsString::from).collect();
            let (fleetgrid, spec, cell_id) = (fleetgrid(), spec.clone(), cell_id.to_owned());
            let cell = tokio::task::spawn_blocking(move || {
                ClusterCell::start_blocking(&fleetgrid, &spec, &cell_id, &member, WAIT)
            })
            .await
            .expect("start task")
            .unwrap_or_else(|error| panic!("a cell did not start: {error}"));
            cells.push(cell);
        }
        let member = MemberSpec::new(LogFile::create(dir.path().join("gateway.log")));
        let (fleetgrid, gateway_spec) = (fleetgrid(), spec.clone());
        let gateway = tokio::task::spawn_blocking(move || {
            ClusterGateway::start_blocking(&fleetgrid, &gateway_spec, "gateway", &member, WAIT)
        })
        .await
        .expect("start task")
        .unwrap_or_else(|error| panic!("the gateway did not start: {error}"));
        Cluster {
            gateway: Gateway {
                http: gateway.http,
                api_key,
            },
            gateway_process: gateway.process,
            dir,
            spec,
            _nats: nats,
            cells,
            agents: Vec::new(),
        }
    }

    /// Enrols `name` and starts its agent on `cells` (indexes into
    /// `self.cells`, its own cell first, then where it may fail over to).
    fn add_agent(&mut self, name: &str, cells: &[usize]) {
        let credential = cli(&self.spec, &["nodes", "add", name]);
        let trace = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE).expect("write trace");
        let spec = AgentSpec {
            node_id: name.to_owned(),
            credential,
            vehicle_state: format!("sim:{}", trace.display()),
            model: MODEL.to_owned(),
            parallel: 1,
            threads: 1,
            log: LogFile::create(self.dir.path().join(format!("{name}.log"))),
        };
        let endpoints: Vec<_> = cells.iter().map(|index| self.cells[*index].grpc).collect();
        let agent = fleetgrid()
            .cluster_agent(&endpoints, &spec)
            .unwrap_or_else(|error| panic!("{error}"));
        self.agents.push(agent);
    }

    async fn wait_for_nodes(&self, names: &[&str]) {
        let wanted: BTreeSet<String> = names.iter().map(|name| name.to_string()).collect();
        let client = self.gateway.client();
        let what = format!("nodes {wanted:?} connected through the gateway");
        stack::probe::wait_until(&[&self.gateway_process], &what, WAIT, || async {
            stack::probe::connected_nodes(&client, self.gateway.http, &self.gateway.api_key).await
                == Some(wanted.clone())
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    }

    /// The vehicle running a generation now, as the gateway sees its cells.
    async fn busy_node(&self) -> String {
        let busy = RefCell::new(None);
        stack::probe::wait_until(&[&self.gateway_process], "a busy vehicle", WAIT, || async {
            let health = self.gateway.operator_health().await;
            let found = health["running"].as_object().and_then(|running| {
                running
                    .iter()
                    .find(|(_, count)| count.as_u64().unwrap_or(0) > 0)
                    .map(|(name, _)| name.clone())
            });
            let done = found.is_some();
            *busy.borrow_mut() = found;
            done
        })
        .await
        .unwrap_or_else(|error| panic!("{error}"));
        busy.into_inner().expect("a busy vehicle")
    }
}

/// Runs a one-shot CLI command on the cluster's database; its last line.
fn cli(spec: &ClusterSpec, args: &[&str]) -> String {
    fleetgrid()
        .env("FLEETGRID_DATABASE_URL", &spec.database)
        .env("FLEETGRID_LEDGER_URL", &spec.database)
        .cli(args, &spec.data_dir)
        .unwrap_or_else(|error| panic!("{error}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_killed_mid_stream_costs_the_client_nothing() {
    let schema = PgSchema::create().await;
    let mut cluster = Cluster::start(&schema).await;
    // Each cell holds one vehicle, and each vehicle may fail over to the other cell.
    cluster.add_agent("car-a", &[0, 1]);
    cluster.add_agent("car-b", &[1, 0]);
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;

    let body = json!({
        "model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": 4242,
        "messages": [{"role": "user", "content": "Explain how a battery stores energy."}],
    });
    let uninterrupted = cluster.gateway.chat(&body).await;
    let expected = uninterrupted["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    assert!(
        uninterrupted["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0)
            >= 40,
        "the reference answer is too short to interrupt: {uninterrupted}"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = cluster
        .gateway
        .post("/v1/chat/completions", &streamed)
        .await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    let mut killed = None;
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        if killed.is_none() && raw.matches("data: ").count() >= 10 {
            let node = cluster.busy_node().await;
            let cell = if node == "car-a" { 0 } else { 1 };
            cluster.cells[cell].process.kill();
            killed = Some((node, cell));
        }
    }
    let (node, cell) = killed.expect("the answer ended before the kill");
    let streamed = parse_sse(&raw);
    assert!(
        streamed.errors.is_empty(),
        "errors in the stream: {:?}",
        streamed.errors
    );
    assert!(streamed.done);
    assert_eq!(
        streamed.content, expected,
        "the answer moved off the killed cell differs from an uninterrupted run"
    );

    // The killed cell's vehicle is back, through the other cell.
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;
    assert!(
        cluster.cells[cell].process.exit().is_some(),
        "{node}'s cell was killed"
    );

    // Charged once: two requests, two token charges, and the ledger verifies.
    let (_, usage) = cluster
        .gateway
        .get_as(&cluster.gateway.api_key, "/v1/usage")
        .await;
    assert_eq!(usage["requests"], 2, "usage: {usage}");
    cli(&cluster.spec, &["ledger", "verify"]);
    drop(cluster);
    schema.remove().await;
}
