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

use common::cluster::{Cluster, ClusterOptions};
use common::{parse_sse, MODEL};
use futures::StreamExt;
use serde_json::json;
use store::testing::PgSchema;

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_killed_mid_stream_costs_the_client_nothing() {
    let schema = PgSchema::create().await;
    let mut cluster = Cluster::start(ClusterOptions::new(schema.url())).await;
    let gateway = cluster.gateway(0);
    // Each cell holds one vehicle, and each vehicle may fail over to the other cell.
    cluster.add_agent("car-a", &[0, 1], 1);
    cluster.add_agent("car-b", &[1, 0], 1);
    cluster.wait_for_nodes(&["car-a", "car-b"]).await;

    let body = json!({
        "model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": 4242,
        "messages": [{"role": "user", "content": "Explain how a battery stores energy."}],
    });
    let uninterrupted = gateway.chat(&body).await;
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
    let response = gateway.post("/v1/chat/completions", &streamed).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    let mut killed = None;
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        if killed.is_none() && raw.matches("data: ").count() >= 10 {
            let node = cluster.busy_node().await;
            let cell = if node == "car-a" { 0 } else { 1 };
            cluster.kill_cell(cell);
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
    let (_, usage) = gateway.get_as(&gateway.api_key, "/v1/usage").await;
    assert_eq!(usage["requests"], 2, "usage: {usage}");
    cluster.verify_ledger();
    drop(cluster);
    schema.remove().await;
}
