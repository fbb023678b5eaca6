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

use common::cluster::{uninterrupted_answer, Cluster, ClusterOptions, OpenStream};
use common::MODEL;
use serde_json::json;
use store::testing::PgSchema;

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_killed_mid_stream_costs_the_client_nothing() {
    let schema = PgSchema::create().await;
    let mut cluster = Cluster::start(ClusterOptions::new(schema.url())).await;
    let gateway = cluster.gateway(0);
    // Each cell holds one vehicle, and each vehicle may fail over to the other cell.
    cluster.two_vehicles_failing_over().await;

    let body = json!({
        "model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": 4242,
        "messages": [{"role": "user", "content": "Explain how a battery stores energy."}],
    });
    let expected = uninterrupted_answer(&gateway, &body).await;

    // Car a connects to cell 0 first, car b to cell 1.
    let cell_of = |node: &str| usize::from(node != "car-a");
    let (node, content) = read_through_a_cell_kill(&mut cluster, &body, cell_of).await;
    let cell = cell_of(&node);
    assert_eq!(
        content, expected,
        "the answer moved off the killed cell differs from an uninterrupted run"
    );

    // The killed cell's vehicle is back, through the other cell.
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;
    assert!(
        cluster.cells[cell].process.exit().is_some(),
        "{node}'s cell was killed"
    );

    // Charged once: two requests, two token charges, and the ledger verifies.
    let (_, usage) = gateway.get_as(&gateway.api_key, "/v1/usage").await;
    assert_eq!(usage["requests"], 2, "usage: {usage}");
    cluster.verify_ledger();
    drop(cluster);
    schema.remove().await;
}

/// In a fleet of mixed attention settings, a generation whose cell is killed
/// mid-answer continues on the other cell's car of its own setting, not on
/// the `fast` car that connected there first (the lower node id, which new
/// work would take at equal load): the next cell is told what numbers the
/// committed tokens came from, and the client reads exactly the
/// uninterrupted answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_generation_moved_to_another_cell_continues_on_a_car_of_its_numerics() {
    let schema = PgSchema::create().await;
    let mut cluster = Cluster::start(ClusterOptions::new(schema.url())).await;
    let gateway = cluster.gateway(0);
    // Cell 0 has the most free slots, so the gateway places the answer there.
    cluster.add_agent("off-a", &[0], 4);
    cluster.wait_for_nodes(&["off-a"]).await;
    // One at a time, so that node ids in cell 1 follow this order.
    cluster.add_agent_with("fast", &[1], 1, &["--flash-attention", "fast"]);
    cluster.wait_for_nodes(&["off-a", "fast"]).await;
    cluster.add_agent("off-b", &[1], 1);
    cluster.wait_for_nodes(&["off-a", "fast", "off-b"]).await;

    let body = json!({
        "model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": 78,
        "messages": [{"role": "user", "content": "Explain how a battery stores energy."}],
    });
    let expected = uninterrupted_answer(&gateway, &body).await;
    let (node, content) = read_through_a_cell_kill(&mut cluster, &body, |_| 0).await;
    assert_eq!(node, "off-a");
    assert_eq!(
        content, expected,
        "the answer moved to the other cell differs from an uninterrupted run"
    );
    drop(cluster);
    schema.remove().await;
}

/// Streams `body` through gateway 0 and, once 10 chunks are read, kills the
/// cell `which` picks from the name of the vehicle serving it; the stream
/// must then end without error. Returns that vehicle and the content read.
async fn read_through_a_cell_kill(
    cluster: &mut Cluster,
    body: &serde_json::Value,
    which: impl FnOnce(&str) -> usize,
) -> (String, String) {
    let mut stream = OpenStream::open(&cluster.gateway(0), body).await;
    assert!(
        stream.read_until(|read| read.chunks >= 10).await,
        "the answer ended before the kill"
    );
    let node = cluster.busy_node().await;
    cluster.kill_cell(which(&node));
    let streamed = stream.finish().await.read();
    assert!(
        streamed.errors.is_empty(),
        "errors in the stream: {:?}",
        streamed.errors
    );
    assert!(streamed.done);
    (node, streamed.content)
}
