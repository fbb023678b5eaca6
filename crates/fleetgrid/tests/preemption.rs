//! Lend and reclaim end to end: two cars with one slot each are both busy
//! with spot streams when a fleet request arrives. The fleet request takes a
//! slot back at once and is served; the preempted spot stream is parked with
//! its committed tokens, resumes when a slot frees, and its client sees the
//! same text as an uninterrupted run, with no error and no gap.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Stack, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};

fn spot_body(seed: u64, topic: &str) -> Value {
    json!({
        "model": MODEL, "max_tokens": 200, "temperature": 0.8, "seed": seed,
        "messages": [{"role": "user", "content": format!("Write a long story about {topic}.")}],
    })
}

async fn post_as(stack: &Stack, key: &str, body: &Value) -> reqwest::Response {
    stack
        .client()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("send request")
}

async fn content_as(stack: &Stack, key: &str, body: &Value) -> String {
    let response = post_as(stack, key, body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// Streams `body`, counting chunks into `seen` as they arrive; returns the
/// whole event stream.
async fn stream_counting(
    client: reqwest::Client,
    url: String,
    key: String,
    body: Value,
    seen: Arc<AtomicUsize>,
) -> String {
    let mut body = body;
    body["stream"] = json!(true);
    let response = client
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("send stream");
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        seen.store(raw.matches("data: ").count(), Ordering::Relaxed);
    }
    raw
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_request_reclaims_a_slot_from_spot_work_which_resumes_unchanged() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 1);
    stack.add_agent("car-2", 1);
    stack.wait_for_nodes(&["car-1", "car-2"]).await;
    let spot = stack.cli(&["tenants", "create", "cheap", "--class", "spot"]);
    stack.unlimited_credit("cheap");
    let bodies = [
        spot_body(21, "a lighthouse keeper"),
        spot_body(22, "a river that changed course"),
    ];
    let mut expected = Vec::new();
    for body in &bodies {
        expected.push(content_as(&stack, &spot, body).await);
    }
    let reassigned_before = stack.metric("fleetgrid_reassignments_total").await;

    // Both cars busy with spot work.
    let mut streams = Vec::new();
    let mut progress = Vec::new();
    for body in &bodies {
        let seen = Arc::new(AtomicUsize::new(0));
        progress.push(Arc::clone(&seen));
        streams.push(tokio::spawn(stream_counting(
            stack.client(),
            stack.url("/v1/chat/completions"),
            spot.clone(),
            body.clone(),
            seen,
        )));
    }
    let started = Instant::now();
    while progress.iter().any(|seen| seen.load(Ordering::Relaxed) < 5) {
        assert!(
            started.elapsed() < common::WAIT,
            "spot streams did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The fleet needs a slot: it is taken from spot work, not queued behind it.
    let fleet = json!({
        "model": MODEL, "max_tokens": 16, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Name three colours."}],
    });
    let fleet_answer = content_as(&stack, &stack.api_key, &fleet).await;
    assert!(!fleet_answer.is_empty());
    let unfinished = streams
        .iter()
        .filter(|stream| !stream.is_finished())
        .count();
    assert!(
        unfinished >= 1,
        "the fleet request waited for spot work to finish instead of preempting it"
    );

    for (stream, expected) in streams.into_iter().zip(&expected) {
        let raw = stream.await.expect("stream task");
        let streamed = common::parse_sse(&raw);
        assert!(streamed.errors.is_empty(), "errors: {:?}", streamed.errors);
        assert!(streamed.done);
        assert_eq!(
            &streamed.content, expected,
            "a preempted spot stream differs from its uninterrupted run"
        );
    }
    let reassigned = stack.metric("fleetgrid_reassignments_total").await - reassigned_before;
    assert!(
        reassigned >= 1.0,
        "no spot generation was preempted and resumed"
    );
    let preempted = stack
        .metric(&common::generations_stopped("preempted"))
        .await;
    assert!(
        preempted >= 1.0,
        "the coordinator never preempted: {preempted} stopped for preemption"
    );
}
