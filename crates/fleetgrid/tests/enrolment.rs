//! Enrolment in a cluster end to end: two `fleetgrid cell --agent-tls`
//! processes record themselves in a real PostgreSQL; `fleetgrid nodes add`
//! prints one token (the credential, the cells' `https://` URLs, home first,
//! the emptiest cell the home, and the node authority's pin); an agent given
//! nothing but that token enrols for its certificate, dials its home cell
//! and, when that cell is killed, the next one, which knows its certificate
//! from the database they share. Each cell's own `/metrics`
//! (`--metrics-listen`) shows where the vehicle is.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 and Debian's `nats-server` (`cargo
//! xtask test` starts and installs them); fails, never skips, without them.

mod common;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{fleetgrid, MODEL, WAIT};
use stack::nats::NatsCluster;
use stack::{AgentSpec, ClusterCell, ClusterSpec, LogFile, MemberSpec};
use store::testing::PgSchema;

/// How fast cells and agents notice each other's loss in this test (agents
/// come over mTLS, as cells take them by default).
const CELL_ARGS: [&str; 6] = [
    "--heartbeat-interval-ms",
    "500",
    "--heartbeat-timeout-ms",
    "2000",
    "--metrics-listen",
    "127.0.0.1:0",
];

/// How often the test scrapes while it waits.
const POLL: Duration = Duration::from_millis(200);

fn cli(spec: &ClusterSpec, args: &[&str]) -> String {
    fleetgrid()
        .env("FLEETGRID_DATABASE_URL", &spec.database)
        .cli(args, &spec.data_dir)
        .unwrap_or_else(|error| panic!("{error}"))
}

async fn start_cell(spec: &ClusterSpec, dir: &std::path::Path, cell_id: &str) -> ClusterCell {
    let mut member = MemberSpec::new(LogFile::create(dir.join(format!("{cell_id}.log"))));
    member.args = CELL_ARGS.iter().map(OsString::from).collect();
    let (fleetgrid, spec, cell_id) = (fleetgrid(), spec.clone(), cell_id.to_owned());
    tokio::task::spawn_blocking(move || {
        ClusterCell::start_blocking(&fleetgrid, &spec, &cell_id, &member, WAIT)
    })
    .await
    .expect("start task")
    .unwrap_or_else(|error| panic!("a cell did not start: {error}"))
}

/// The vehicles connected to the cell serving `/metrics` at `metrics`, as it
/// reports them; `None` while it does not answer.
async fn nodes_connected(metrics: SocketAddr) -> Option<i64> {
    let response = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .ok()?;
    let text = response.text().await.ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("fleetgrid_nodes_connected "))
        .and_then(|value| value.trim().parse().ok())
}

/// Waits until the cells report `expected` vehicles each, in order.
async fn wait_for_connected(cells: &[&ClusterCell], expected: &[i64]) {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for cell in cells {
            seen.push(nodes_connected(cell.metrics.expect("metrics address")).await);
        }
        if seen
            .iter()
            .zip(expected)
            .all(|(seen, want)| *seen == Some(*want))
        {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "the cells report {seen:?} vehicles, not {expected:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_given_only_its_enrolment_serves_from_its_home_cell_then_fails_over() {
    let schema = PgSchema::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsCluster::start(1, dir.path(), WAIT)
        .await
        .expect("NATS starts");
    let spec = ClusterSpec {
        nats: nats.urls(),
        database: schema.url(),
        data_dir: dir.path().to_path_buf(),
        models: vec![MODEL.to_owned()],
    };
    let mut cell_a = start_cell(&spec, dir.path(), "cell-a").await;
    let cell_b = start_cell(&spec, dir.path(), "cell-b").await;
    let url = |cell: &ClusterCell| format!("https://{}", cell.grpc);

    // The first vehicle goes home to cell-a (both empty: the smaller id), the
    // second to cell-b, now the emptier; each may fail over to the other.
    let first = cli(&spec, &["nodes", "add", "car-1"]);
    let second = cli(&spec, &["nodes", "add", "car-2"]);
    let cells_of = |token: &str| -> Vec<String> {
        let (token, pin) = token
            .rsplit_once('#')
            .expect("a token with the authority's pin");
        assert!(pin.starts_with("sha256:"), "{pin}");
        let (credential, cells) = token.split_once('@').expect("a token with cells");
        assert!(credential.starts_with("fgn-"), "{token}");
        cells.split(',').map(str::to_owned).collect()
    };
    assert_eq!(cells_of(&first), [url(&cell_a), url(&cell_b)]);
    assert_eq!(cells_of(&second), [url(&cell_b), url(&cell_a)]);

    let trace = dir.path().join("car-2.json");
    std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE).expect("write trace");
    let agent_spec = AgentSpec {
        node_id: "car-2".to_owned(),
        credential: second,
        vehicle_state: format!("sim:{}", trace.display()),
        model: MODEL.to_owned(),
        parallel: 1,
        threads: 1,
        args: Vec::new(),
        log: LogFile::create(dir.path().join("car-2.log")),
    };
    let mut agent = fleetgrid()
        .enrolled_agent(&agent_spec)
        .unwrap_or_else(|error| panic!("{error}"));
    wait_for_connected(&[&cell_a, &cell_b], &[0, 1]).await;

    let mut cell_b = cell_b;
    cell_b.process.kill();
    wait_for_connected(&[&cell_a], &[1]).await;

    stack::stop_all_blocking([&mut agent, &mut cell_a.process]);
    schema.remove().await;
}
