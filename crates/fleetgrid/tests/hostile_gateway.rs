//! Hostile clients against a real `fleetgrid serve` (issue 11, the gateway
//! items): slow headers and bodies, floods of connections, one tenant
//! holding every slot, a client that never reads its stream, and a node that
//! sends one token and then nothing. Raw `TcpStream`s on loopback play the
//! slow clients; the hostile agent of `common::hostile` plays the node.
//!
//! Needs the SmolLM2 model in the model store (its tokenizer; no agent runs
//! the model here).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::hostile::{self, HostileAgent};
use common::{Stack, StackOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something the gateway must do within a bound
/// of a second or two.
const PROMPT_WAIT: Duration = Duration::from_secs(20);

/// A coordinator with `args` that takes the hostile agents' plain gRPC.
fn options(args: &[&str]) -> StackOptions {
    let mut options = StackOptions::plaintext();
    options
        .extra_serve_args
        .extend(args.iter().map(|arg| arg.to_string()));
    options
}

/// Reads one response with a `Content-Length` body, leaving the connection
/// open; returns the status line's code and the whole response text.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = Instant::now() + PROMPT_WAIT;
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if received.len() >= head_end + 4 + length {
                return (status_of(&text), text);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (status_of(&text), text),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => panic!("no whole response in time; have {text:?}"),
        }
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn has_retry_after(response: &str) -> bool {
    response
        .lines()
        .any(|line| line.to_ascii_lowercase().starts_with("retry-after:"))
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// A keep-alive `GET /v1/models` with `key`; the connection counts as
/// authenticated once answered.
async fn authenticated_get(stream: &mut TcpStream, key: &str) -> u16 {
    let request =
        format!("GET /v1/models HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    read_response(stream).await.0
}

#[tokio::test]
async fn slow_headers_and_trickled_bodies_are_cut_off() {
    let stack = Stack::start(options(&[
        "--header-read-timeout-ms",
        "1000",
        "--body-read-timeout-ms",
        "1500",
    ]));

    // Slow loris: headers one byte at a time, well past the header timeout.
    let mut lorises = Vec::new();
    for _ in 0..40 {
        let mut stream = connect(stack.http).await;
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\nHo")
            .await
            .expect("start headers");
        lorises.push(stream);
    }
    let started = Instant::now();
    let trickle = async {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for stream in &mut lorises {
                let _ = stream.write_all(b"x").await;
            }
        }
    };
    trickle.await;
    let deadline = started + PROMPT_WAIT;
    for stream in &mut lorises {
        hostile::read_until_closed(stream, deadline).await;
    }

    // An authenticated body trickled one byte at a time: 408, then closed.
    let mut stream = connect(stack.http).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 1048576\r\n\r\n{{",
        stack.api_key
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    let writing = async {
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let started = Instant::now();
    writing.await;
    let answer = hostile::read_until_closed(&mut stream, started + PROMPT_WAIT).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Without a key the body is not even read: 401 at once, then closed.
    let mut stream = connect(stack.http).await;
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
              content-length: 1048576\r\n\r\n{",
        )
        .await
        .expect("send head");
    let answer = hostile::read_until_closed(&mut stream, Instant::now() + PROMPT_WAIT).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 401, "{answer}");

    // The gateway still serves everyone else.
    let response = stack
        .client()
        .get(stack.url("/v1/models"))
        .bearer_auth(&stack.api_key)
        .send()
        .await
        .expect("models");
    assert_eq!(response.status(), 200);
    assert!(
        stack
            .metric("fleetgrid_http_connections_closed_slow_total")
            .await
            >= 40.0
    );
}

#[tokio::test]
async fn connections_are_bounded_per_address_and_until_authenticated() {
    let stack = Stack::start(options(&[
        "--connections-per-address-max",
        "30",
        "--unauthenticated-connections-max",
        "10",
        "--header-read-timeout-ms",
        "60000",
    ]));

    // Ten connections that never say who they are fill the unauthenticated
    // bound: the eleventh is answered 503 with Retry-After and closed.
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(connect(stack.http).await);
    }
    let mut refused = connect(stack.http).await;
    let answer = hostile::read_until_closed(&mut refused, Instant::now() + PROMPT_WAIT).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(has_retry_after(&answer), "{answer}");
    drop(idle);

    // Once they are gone, authenticated connections may use the address up
    // to its bound (the closed ones leave as the server notices).
    let deadline = Instant::now() + PROMPT_WAIT;
    let mut held = Vec::new();
    while held.len() < 30 {
        let mut stream = connect(stack.http).await;
        match authenticated_get(&mut stream, &stack.api_key).await {
            200 => held.push(stream),
            status => {
                assert!(
                    Instant::now() < deadline,
                    "connections not freed: answered {status}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut refused = connect(stack.http).await;
    let answer = hostile::read_until_closed(&mut refused, Instant::now() + PROMPT_WAIT).await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 429, "{answer}");
    assert!(has_retry_after(&answer), "{answer}");
    // The held connections still work.
    assert_eq!(authenticated_get(&mut held[0], &stack.api_key).await, 200);
}

/// A hostile node enrolled on the stack, welcomed, heartbeating.
async fn hostile_node(
    stack: &Stack,
    name: &str,
    slots: u32,
) -> (HostileAgent, tokio::task::JoinHandle<()>) {
    let credential = stack.cli(&["nodes", "add", name]);
    let mut hardware = hostile::modest_hardware();
    hardware.parallel_sequences = slots;
    let agent = hostile::connect(stack.grpc, hostile::hello(name, &credential, hardware))
        .await
        .welcomed();
    let heartbeats = agent.keep_alive(Duration::from_millis(300));
    stack.wait_for_nodes(&[name]).await;
    (agent, heartbeats)
}

fn create_tenant(stack: &Stack, name: &str, class: &str) -> String {
    stack.cli(&["tenants", "create", name, "--class", class])
}

#[tokio::test]
async fn one_tenant_cannot_take_the_gateway() {
    let mut stack = Stack::start(StackOptions::plaintext());
    let greedy = create_tenant(&stack, "greedy", "fleet");
    let capped = create_tenant(&stack, "capped", "fleet");
    stack.cli(&[
        "tenants",
        "set",
        "--name",
        "capped",
        "--max-concurrency",
        "2",
    ]);
    // Contracts are read when the coordinator starts.
    stack.restart_coordinator(&StackOptions::plaintext());
    let (mut agent, heartbeats) = hostile_node(&stack, "evil", 4).await;

    let body = json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "stream": true,
    });
    let open = |key: String| {
        let client = stack.client();
        let url = stack.url("/v1/chat/completions");
        let body = body.clone();
        async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("send")
        }
    };

    // A tenant without a contract holds the default number of requests
    // (waiting for a node that never answers); the next one is refused.
    let default_limit = coordinator::limits::TENANT_CONCURRENT_REQUESTS_DEFAULT as usize;
    let held: Vec<reqwest::Response> =
        futures::future::join_all((0..default_limit).map(|_| open(greedy.clone()))).await;
    for response in &held {
        assert_eq!(response.status(), 200);
    }
    let refused = open(greedy.clone()).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let error: Value = refused.json().await.expect("error body");
    assert_eq!(
        error["error"]["code"], "concurrency_limit_exceeded",
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains(&default_limit.to_string())),
        "{error}"
    );

    // Another tenant is unaffected, and a contract's own limit applies.
    let other = open(stack.api_key.clone()).await;
    assert_eq!(other.status(), 200);
    let capped_held = [open(capped.clone()).await, open(capped.clone()).await];
    for response in &capped_held {
        assert_eq!(response.status(), 200);
    }
    let refused = open(capped.clone()).await;
    assert_eq!(refused.status(), 429);
    let error: Value = refused.json().await.expect("error body");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("max_concurrency 2")),
        "{error}"
    );

    // Closing the held streams frees the slots.
    drop(held);
    drop(capped_held);
    drop(other);
    let deadline = Instant::now() + PROMPT_WAIT;
    loop {
        let response = open(greedy.clone()).await;
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 429);
        assert!(
            Instant::now() < deadline,
            "the greedy tenant's slots were never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = agent.next_assignment().await;
    heartbeats.abort();
}

#[tokio::test]
async fn a_client_that_does_not_read_its_stream_is_disconnected() {
    let stack = Stack::start(options(&[
        "--client-stall-timeout-ms",
        "1000",
        "--context-tokens",
        "8192",
    ]));
    let (mut agent, heartbeats) = hostile_node(&stack, "evil", 1).await;

    // A client with a tiny receive window that reads the response's head and
    // then nothing more.
    let mut stream =
        hostile::non_reading_client(stack.http, &stack.api_key, &hostile::flood_body()).await;
    let assign = agent.next_assignment().await.expect("assignment");

    // The node streams thousands of large tokens (every alternative asked
    // for), megabytes more than the socket buffers hold, but not all.
    assert!(agent.flood(&assign.generation_id, 4000).await);

    // The gateway gives up on the client: the node is told to stop, and the
    // connection is closed before the answer ended.
    assert!(agent.expect_cancel(&assign.generation_id).await);
    let received = hostile::read_until_closed(&mut stream, Instant::now() + PROMPT_WAIT).await;
    assert!(!String::from_utf8_lossy(&received).contains("[DONE]"));
    assert!(
        stack
            .metric("fleetgrid_http_connections_closed_slow_total")
            .await
            >= 1.0
    );
    let deadline = Instant::now() + PROMPT_WAIT;
    while stack.metric("fleetgrid_generations_active").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the generation was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    heartbeats.abort();
}

/// Sends one token every `TRICKLE_INTERVAL` (well within the request
/// timeout each) until `answer` is ready; returns its output.
async fn trickle_until<T>(
    agent: &HostileAgent,
    generation_id: &str,
    token: i32,
    answer: tokio::task::JoinHandle<T>,
) -> T {
    const TRICKLE_INTERVAL: Duration = Duration::from_millis(700);
    let mut answer = answer;
    let mut position = 0;
    loop {
        // The generation may have been cancelled already: a refused send
        // is fine, the answer is what is checked.
        let _ = agent.tokens(generation_id, position, &[token]).await;
        position += 1;
        tokio::select! {
            joined = &mut answer => return joined.expect("join"),
            () = tokio::time::sleep(TRICKLE_INTERVAL) => {}
        }
        assert!(position < 60, "the request outlived its time by far");
    }
}

#[tokio::test]
async fn a_node_that_trickles_tokens_cannot_hold_a_request_past_its_time() {
    // A header timeout shorter than the request: it bounds only the wait
    // for a request's headers, never an answer being generated.
    let stack = Stack::start(options(&[
        "--request-timeout-ms",
        "3000",
        "--header-read-timeout-ms",
        "1000",
    ]));
    let (mut agent, heartbeats) = hostile_node(&stack, "evil", 2).await;
    let body = json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 64,
        "ignore_eos": true,
    });
    let token = hostile::long_tokens(1)[0].0;

    // Not streamed: a token every 0.7 s never lets the wait between two
    // tokens reach the timeout, but the whole request passes it: 504.
    let client = stack.client();
    let request = client
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&stack.api_key)
        .json(&body)
        .send();
    let answer = tokio::spawn(request);
    let assign = agent.next_assignment().await.expect("assignment");
    let started = Instant::now();
    let response = trickle_until(&agent, &assign.generation_id, token, answer)
        .await
        .expect("response");
    assert_eq!(response.status(), 504);
    let error: Value = response.json().await.expect("error body");
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(agent.expect_cancel(&assign.generation_id).await);

    // Streamed: an error event, then the end of the stream.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let request = client
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&stack.api_key)
        .json(&streamed)
        .send();
    let answer = tokio::spawn(async move { request.await.expect("send").text().await });
    let assign = agent.next_assignment().await.expect("assignment");
    let text = trickle_until(&agent, &assign.generation_id, token, answer)
        .await
        .expect("stream body");
    let parsed = common::parse_sse(&text);
    assert!(parsed.done, "{text}");
    assert_eq!(parsed.errors.len(), 1, "{text}");
    assert_eq!(parsed.errors[0]["error"]["code"], "timeout", "{text}");
    assert!(agent.expect_cancel(&assign.generation_id).await);
    heartbeats.abort();
}

/// A router configuration that keeps every prompt on the edge.
fn edge_only_router_config(dir: &std::path::Path) -> std::path::PathBuf {
    let edge = json!({"route": "edge"});
    let config = json!({
        "version": 1,
        "policies": {"multiple_choice": edge, "math": edge, "code": edge, "open": edge},
        "cloud_prompt_chars_min": null,
        "incremental": {"holdback_tokens": 16, "release_lag_tokens": 8, "collapse_window_mean": -5.0},
        "prices": {
            "edge": {"prompt_per_million": 20000, "completion_per_million": 20000},
            "cloud": {"prompt_per_million": 150000, "completion_per_million": 600000},
        },
    });
    let path = dir.join("router.json");
    std::fs::write(&path, config.to_string()).expect("write router config");
    path
}

#[tokio::test]
async fn a_routed_request_is_bounded_as_a_whole_too() {
    // The cloud is never reached here: `auto` keeps the prompt on the edge.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config_dir = tempfile::tempdir().expect("tempdir");
    let router_config = edge_only_router_config(config_dir.path());
    let stack = Stack::start(StackOptions {
        extra_serve_args: vec![
            "--agent-plaintext".into(),
            "--cloud-url".into(),
            format!("http://127.0.0.1:{closed_port}/v1"),
            "--cloud-model".into(),
            "qwen2.5-coder-0.5b-instruct".into(),
            "--router-config".into(),
            router_config.display().to_string(),
            "--request-timeout-ms".into(),
            "3000".into(),
        ],
    });
    let (mut agent, heartbeats) = hostile_node(&stack, "evil", 2).await;
    let body = json!({
        "model": "auto",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 64,
        "ignore_eos": true,
    });
    let request = stack
        .client()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(&stack.api_key)
        .json(&body)
        .send();
    let answer = tokio::spawn(request);
    let assign = agent.next_assignment().await.expect("assignment");
    let token = hostile::long_tokens(1)[0].0;
    let response = trickle_until(&agent, &assign.generation_id, token, answer)
        .await
        .expect("response");
    assert_eq!(response.status(), 504);
    let error: Value = response.json().await.expect("error body");
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    assert!(agent.expect_cancel(&assign.generation_id).await);
    heartbeats.abort();
}
