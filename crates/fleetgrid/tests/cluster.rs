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

    let mut stream = OpenStream::open(&gateway, &body).await;
    assert!(
        stream.read_until(|read| read.chunks >= 10).await,
        "the answer ended before the kill"
    );
    let node = cluster.busy_node().await;
    let cell = if node == "car-a" { 0 } else { 1 };
    cluster.kill_cell(cell);
    let streamed = stream.finish().await.read();
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
    let (_, usage) = gateway.get_as(&gateway.api_key, "/v1/usage").await;
    assert_eq!(usage["requests"], 2, "usage: {usage}");
    cluster.verify_ledger();
    drop(cluster);
    schema.remove().await;
}
