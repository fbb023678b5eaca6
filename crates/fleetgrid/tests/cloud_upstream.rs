//! The cloud upstream failing: down (a closed port) or slow (a server that
//! accepts and never answers). `cloud/...` gets a clear error within the
//! timeout, or the configured fallback to the fleet; `auto` stays on the
//! fleet and says why. Nothing hangs.
//!
//! Needs the SmolLM2 model (the fleet); the upstreams here are deliberately
//! broken, so no cloud model runs.

mod cloud_common;
mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_common::{chat, gateway, post_chat, stream_chat, upstream_args, CLOUD_MODEL};

/// A port on which nothing listens.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A server that accepts connections, counts them and never answers; its
/// thread ends when the test process does.
fn stalling_server() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(64) {
            held.push(stream);
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, accepted)
}

/// Waits until `accepted` counts more than `before` connections.
async fn wait_for_connection(accepted: &AtomicUsize, before: usize) {
    let deadline = Instant::now() + common::WAIT;
    while accepted.load(Ordering::SeqCst) <= before {
        assert!(
            Instant::now() < deadline,
            "the gateway never connected to the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server that counts the connections it accepts and closes them; its
/// thread ends when the test process does.
fn counting_server() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, accepted)
}

fn cloud_name() -> String {
    format!("cloud/{CLOUD_MODEL}")
}

/// A prompt the default router configuration sends straight to the cloud.
const CODE_PROMPT: &str = "Write a Python function that returns the sum of a list.";

#[tokio::test]
async fn a_cloud_that_is_down_is_a_clear_502_and_auto_stays_on_the_fleet() {
    let url = format!("http://127.0.0.1:{}/v1", closed_port());
    let stack = gateway(upstream_args(&url)).await;

    let started = Instant::now();
    let refused = post_chat(&stack, &chat(&cloud_name(), "Hi", 8)).await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "upstream_unreachable");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("could not be reached")),
        "{}",
        refused.body
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Streaming fails the same way: before any event, with the HTTP status.
    let mut body = chat(&cloud_name(), "Hi", 8);
    body["stream"] = serde_json::json!(true);
    let response = stack.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 502);

    let served = post_chat(&stack, &chat("auto", CODE_PROMPT, 12)).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(served.tier, "fleet");
    assert_eq!(served.reason, "cloud_unavailable");
    assert_eq!(served.body["fleetgrid"]["tier"], "fleet");
    let detail = served.body["fleetgrid"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains("could not be reached"), "{detail}");
    assert!(!served.content().is_empty());
    assert!(served.body["fleetgrid"]["usage"]["cloud"].is_null());

    // Text completions are routed the same way.
    let response = stack
        .post(
            "/v1/completions",
            &serde_json::json!({
                "model": "auto", "prompt": CODE_PROMPT, "max_tokens": 8, "temperature": 0.0
            }),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-fleetgrid-tier"], "fleet");
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["object"], "text_completion");
    assert!(body["choices"][0]["text"]
        .as_str()
        .is_some_and(|text| !text.is_empty()));

    // Bad requests for routed names are OpenAI-shaped: an unknown model a
    // 404, as OpenAI answers it, the rest 400s.
    let unknown = post_chat(&stack, &chat("cloud/no-such-model", "Hi", 8)).await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(unknown.body["error"]["code"], "model_not_found");
    let mut with_logprobs = chat("auto", "Hi", 8);
    with_logprobs["logprobs"] = serde_json::json!(true);
    let refused = post_chat(&stack, &with_logprobs).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["error"]["param"], "logprobs");
    let invalid = post_chat(&stack, &chat("auto", "Hi", 0)).await;
    assert_eq!(invalid.status, 400, "{}", invalid.body);
    assert_eq!(invalid.body["error"]["param"], "max_tokens");

    // Headers whose promise a routed request cannot keep are refused, not ignored.
    for (header, value) in [
        ("idempotency-key", "k-1"),
        ("x-fleetgrid-deadline-ms", "500"),
    ] {
        let response = stack
            .client()
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(&stack.api_key)
            .header(header, value)
            .json(&chat("auto", "Hi", 8))
            .send()
            .await
            .expect("send request");
        assert_eq!(response.status(), 400, "{header}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(
            body["error"]["code"], "unsupported_header",
            "{header}: {body}"
        );
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
}

#[tokio::test]
async fn a_stalling_cloud_times_out_with_504_or_falls_back_to_the_fleet() {
    let (port, accepted) = stalling_server();
    let url = format!("http://127.0.0.1:{port}/v1");
    let mut error_args = upstream_args(&url);
    error_args.extend(
        ["--cloud-timeout-ms", "1500", "--cloud-concurrency", "1"]
            .iter()
            .map(|arg| arg.to_string()),
    );
    let strict = common::Stack::start(common::StackOptions {
        extra_serve_args: error_args,
    });
    let started = Instant::now();
    let first = chat(&cloud_name(), "Hi", 8);
    let connected_before = accepted.load(Ordering::SeqCst);
    let stalled = post_chat(&strict, &first);
    let second = async {
        // While the first call holds the only upstream slot, another is
        // refused at once with 429 and Retry-After, not queued. The slot is
        // taken before the upstream is dialled: once the upstream accepted
        // the first call's connection, the first call holds it.
        wait_for_connection(&accepted, connected_before).await;
        let response = strict
            .post("/v1/chat/completions", &chat(&cloud_name(), "Hi", 8))
            .await;
        (
            response.status(),
            response.headers().get("retry-after").cloned(),
        )
    };
    let (timed_out, (second_status, retry_after)) = tokio::join!(stalled, second);
    let waited = started.elapsed();
    assert_eq!(second_status, 429);
    assert!(retry_after.is_some());
    assert_eq!(timed_out.status, 504, "{}", timed_out.body);
    assert_eq!(timed_out.body["error"]["code"], "upstream_timeout");
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    let mut fallback_args = upstream_args(&url);
    fallback_args.extend(
        ["--cloud-timeout-ms", "1500", "--cloud-fallback", "edge"]
            .iter()
            .map(|arg| arg.to_string()),
    );
    let lenient = gateway(fallback_args).await;
    let started = Instant::now();
    let streamed = stream_chat(&lenient, &chat(&cloud_name(), "Say hello.", 8)).await;
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(streamed.tier, "fleet");
    assert_eq!(streamed.reason, "cloud_fallback");
    assert!(
        streamed.streamed.errors.is_empty(),
        "{:?}",
        streamed.streamed.errors
    );
    assert!(streamed.streamed.done);
    assert!(!streamed.streamed.content.is_empty());
    let last = streamed.route_fields.last().expect("a final route field");
    assert_eq!(last["reason"], "cloud_fallback");
    assert!(
        last["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("did not answer within")),
        "{last}"
    );
}

#[tokio::test]
async fn a_routed_request_the_tenant_cannot_pay_for_is_refused_402_before_any_work() {
    let (port, accepted) = counting_server();
    let url = format!("http://127.0.0.1:{port}/v1");
    let stack = common::Stack::start(common::StackOptions {
        extra_serve_args: upstream_args(&url),
    });
    let key = stack.cli(&["tenants", "create", "broke", "--class", "spot"]);
    let queued_before = stack.metric("fleetgrid_requests_accepted_total").await;

    // `cloud/...`, and `auto` both for a prompt the router sends to the cloud
    // and for one it would keep on the fleet: each is priced at the dearest
    // model that may serve it and refused before anything starts.
    for (model, prompt) in [
        (cloud_name(), "Hi"),
        ("auto".to_string(), CODE_PROMPT),
        ("auto".to_string(), "What is the capital of France?"),
    ] {
        let response = stack
            .client()
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(&model, prompt, 8))
            .send()
            .await
            .expect("send request");
        assert_eq!(response.status(), 402, "{model}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("insufficient balance"), "{message}");
    }
    // Nothing reached the upstream, nor the scheduler.
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert_eq!(
        stack.metric("fleetgrid_requests_accepted_total").await,
        queued_before
    );
}

#[test]
fn a_gateway_whose_price_sheet_does_not_price_its_cloud_model_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = std::process::Command::new(common::binary())
        .args(["serve", "--http-listen", "127.0.0.1:0"])
        .args(["--grpc-listen", "127.0.0.1:0"])
        .args(["--cloud-url", "http://127.0.0.1:9/v1"])
        .args(["--cloud-model", "unpriced-model"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run fleetgrid serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "the price sheet has no upstream price for the cloud model cloud/unpriced-model"
        ),
        "{stderr}"
    );
}
