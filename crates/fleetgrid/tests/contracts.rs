//! Tenant contracts and deadlines end to end: a contract set with
//! `fleetgrid tenants set` reaches the running coordinator, a tenant over its
//! concurrency or tokens-per-minute quota gets 429 with `Retry-After`, and a
//! spot request whose start deadline passes while it waits fails with a
//! clear error.

mod common;

use std::time::{Duration, Instant};

use common::{Stack, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};

/// How long a CLI change may take to reach the running coordinator: its
/// change-feed interval (1 s) plus slack for a loaded machine.
const CLI_CHANGE_WAIT: Duration = Duration::from_secs(10);

fn long_body() -> Value {
    json!({
        "model": MODEL, "max_tokens": 300, "temperature": 0.8, "seed": 5, "stream": true,
        "messages": [{"role": "user", "content": "Write a long story about a night train."}],
    })
}

fn short_body(max_tokens: u32) -> Value {
    json!({
        "model": MODEL, "max_tokens": max_tokens, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Say hi."}],
    })
}

async fn post_as(
    stack: &Stack,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = stack
        .client()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("send request")
}

/// Starts a long stream as `key`; returns the rest of it once its first
/// tokens arrived, so the generation is running on a car.
async fn running_stream(stack: &Stack, key: &str) -> impl futures::Stream {
    let response = post_as(stack, key, &long_body(), &[]).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    while raw.matches("data: ").count() < 3 {
        let chunk = bytes.next().await.expect("stream open").expect("chunk");
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_over_its_contract_quotas_gets_429_with_retry_after() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let key = stack.cli(&["tenants", "create", "metered", "--class", "reserved"]);
    stack.unlimited_credit("metered");
    stack.cli(&[
        "tenants",
        "set",
        "--name",
        "metered",
        "--max-concurrency",
        "1",
    ]);

    // One generation in flight is the contract's limit: the second request
    // is refused (once the coordinator has read the contract).
    let stream = running_stream(&stack, &key).await;
    let changed_at = Instant::now();
    loop {
        let response = post_as(&stack, &key, &short_body(1), &[]).await;
        if response.status() == 429 {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok());
            assert!(retry_after.is_some_and(|seconds| seconds >= 1));
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"]["type"], "rate_limit_error");
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("concurrent")));
            break;
        }
        assert_eq!(response.status(), 200);
        assert!(
            changed_at.elapsed() < CLI_CHANGE_WAIT,
            "the concurrency limit never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stream);

    // A tokens-per-minute quota smaller than one request's prompt plus
    // max_tokens refuses it until the minute is over.
    stack.cli(&[
        "tenants",
        "set",
        "--name",
        "metered",
        "--max-concurrency",
        "8",
        "--tpm",
        "40",
    ]);
    let changed_at = Instant::now();
    loop {
        let response = post_as(&stack, &key, &short_body(64), &[]).await;
        if response.status() == 429 {
            let retry_after: u64 = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
                .expect("Retry-After");
            assert!((1..=60).contains(&retry_after), "{retry_after}");
            let body: Value = response.json().await.expect("json");
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("tokens-per-minute")));
            break;
        }
        assert_eq!(response.status(), 200);
        assert!(
            changed_at.elapsed() < CLI_CHANGE_WAIT,
            "the tokens-per-minute limit never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = stack.cli(&["tenants", "list"]);
    assert!(listed.contains("metered"), "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_request_whose_start_deadline_passes_fails_with_a_clear_error() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 1);
    stack.wait_for_nodes(&["car-1"]).await;
    let spot = stack.cli(&["tenants", "create", "cheap", "--class", "spot"]);
    stack.unlimited_credit("cheap");

    let header = "x-fleetgrid-deadline-ms";
    let response = post_as(&stack, &spot, &short_body(2), &[(header, "soon")]).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["param"], header);

    // With a free car, a deadline is met.
    let response = post_as(&stack, &spot, &short_body(2), &[(header, "60000")]).await;
    assert_eq!(response.status(), 200);

    // The only car is busy with fleet work for seconds; spot work waits, and
    // gives up at its deadline.
    let stream = running_stream(&stack, &stack.api_key).await;
    let sent = Instant::now();
    let response = post_as(&stack, &spot, &short_body(2), &[(header, "500")]).await;
    let waited = sent.elapsed();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("deadline")),
        "{body}"
    );
    assert!(
        waited >= Duration::from_millis(500),
        "failed before its deadline: {waited:?}"
    );
    drop(stream);
}
