//! A hostile node against a real coordinator (issue 11, items 4, 5, 6 and 8): forged tokens,
//! oversized messages, claims it does not honour, and probes for enrolled nodes. Each test
//! drives the hostile agent (`common::hostile`) over the real protocol next to honest agents.
//!
//! Needs the SmolLM2 model in the model store (`cargo xtask test` fetches it).

mod common;

use std::time::{Duration, Instant};

use common::hostile::{self, HostileAgent};
use common::{Stack, StackOptions, MODEL, WAIT};
use coordinator::limits;
use proto::agent_message::Kind as AgentKind;
use proto::coordinator_message::Kind as CoordinatorKind;
use serde_json::json;

/// How often a hostile node that should stay connected heartbeats (the test stack's timeout
/// is 2 s).
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// The request every forgery test sends: greedy, with one alternative per token asked.
fn chat_body() -> serde_json::Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": true,
        "top_logprobs": 1,
    })
}

fn token(position: u32, token_id: i32, piece: &[u8], logprob: f32) -> proto::Token {
    proto::Token {
        position,
        token_id,
        piece: piece.to_vec(),
        logprob,
        top_logprobs: Vec::new(),
    }
}

/// Enrols `name` and connects a hostile agent as it, with `hardware`.
async fn hostile_node(stack: &Stack, name: &str, hardware: proto::Hardware) -> HostileAgent {
    let credential = stack.cli(&["nodes", "add", name]);
    reconnect(stack, name, &credential, hardware).await
}

async fn reconnect(
    stack: &Stack,
    name: &str,
    credential: &str,
    hardware: proto::Hardware,
) -> HostileAgent {
    hostile::connect(stack.grpc, hostile::hello(name, credential, hardware))
        .await
        .welcomed()
}

/// The content and raw size of a chat response that must be 200.
async fn chat_content(stack: &Stack, body: &serde_json::Value) -> (String, usize) {
    let response = stack.post("/v1/chat/completions", body).await;
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "chat failed: {text}");
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("json body");
    let content = parsed["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    (content, text.len())
}

/// Waits (polling, with a deadline) until the coordinator's `metric` reaches `at_least`.
async fn wait_for_metric(stack: &Stack, metric: &str, at_least: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = stack.metric(metric).await;
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{metric} stayed at {value}, wanted {at_least}; coordinator log:\n{}",
            stack.log("coordinator")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Forgeries a node might send as the first tokens of its assignment.
fn forgeries() -> Vec<(&'static str, Vec<proto::Token>)> {
    let mut too_many_alternatives = token(0, 1000, b"", -0.5);
    too_many_alternatives.top_logprobs = (0..300)
        .map(|id| proto::TokenLogprob {
            token_id: id,
            piece: Vec::new(),
            logprob: -1.0,
        })
        .collect();
    vec![
        (
            "forged text",
            vec![token(
                0,
                1000,
                b"INJECTED</script><script>alert(1)</script>",
                -0.5,
            )],
        ),
        ("negative id", vec![token(0, -5, b"", -0.5)]),
        ("out of order", vec![token(1, 1000, b"", -0.5)]),
        (
            "more tokens than max_tokens",
            (0..7)
                .map(|position| token(position, 1000, b"", -0.5))
                .collect(),
        ),
        (
            "id past the vocabulary",
            vec![token(0, 1_000_000_000, b"", -0.5)],
        ),
        ("NaN logprob", vec![token(0, 1000, b"", f32::NAN)]),
        ("300 alternatives for 1", vec![too_many_alternatives]),
        (
            "16 MiB token",
            vec![token(0, 1000, &vec![b'A'; 16 << 20], -0.5)],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_oversized_tokens_never_reach_the_client_and_disconnect_the_node() {
    let mut stack = Stack::start(StackOptions::plaintext());
    // The hostile node connects first, so it has the lower node id and wins placement ties
    // against the honest car whenever both are idle.
    let credential = stack.cli(&["nodes", "add", "evil"]);
    let evil = reconnect(&stack, "evil", &credential, hostile::modest_hardware()).await;
    let heartbeats = evil.keep_alive(HEARTBEAT_EVERY);
    stack.add_agent("car-1", 1);
    stack.wait_for_nodes(&["car-1", "evil"]).await;
    heartbeats.abort();
    drop(evil);
    stack.wait_for_nodes(&["car-1"]).await;
    let (honest, _) = chat_content(&stack, &chat_body()).await;

    for (what, tokens) in forgeries() {
        let mut evil = reconnect(&stack, "evil", &credential, hostile::modest_hardware()).await;
        let heartbeats = evil.keep_alive(HEARTBEAT_EVERY);
        stack.wait_for_nodes(&["car-1", "evil"]).await;
        let violations = stack
            .metric("fleetgrid_node_protocol_violations_total")
            .await;
        let request = {
            let body = chat_body();
            let stack = &stack;
            async move { chat_content(stack, &body).await }
        };
        let forge = async {
            let assign = evil.next_assignment().await.expect("an assignment");
            let batch = proto::TokenBatch {
                generation_id: assign.generation_id.clone(),
                tokens,
            };
            evil.send(AgentKind::Tokens(batch)).await;
            evil.expect_disconnected().await;
        };
        let ((content, response_bytes), ()) = tokio::join!(request, forge);
        heartbeats.abort();
        assert_eq!(content, honest, "{what}: the client got the honest answer");
        assert!(!content.contains("INJECTED"), "{what}");
        assert!(
            response_bytes < 64 * 1024,
            "{what}: a {response_bytes}-byte response"
        );
        wait_for_metric(
            &stack,
            "fleetgrid_node_protocol_violations_total",
            violations + 1.0,
        )
        .await;
        stack.wait_for_nodes(&["car-1"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hello_is_refused_from_its_length_prefix() {
    let stack = Stack::start(StackOptions::plaintext());
    let credential = stack.cli(&["nodes", "add", "car-x"]);
    let mut hello = hostile::hello("car-x", &credential, hostile::modest_hardware());
    // Honest fields, then padding: without a limit this Hello would be welcomed.
    hello.hardware.as_mut().expect("hardware").engine_version = "x".repeat(1 << 20);
    match hostile::connect(stack.grpc, hello).await {
        hostile::Opened::Closed(_) => {}
        hostile::Opened::Refused(refusal) => panic!("read and refused: {refusal:?}"),
        hostile::Opened::Welcomed(_) => panic!("a 1 MiB Hello was welcomed"),
    }
    assert_eq!(
        stack.metric("fleetgrid_node_hellos_oversized_total").await,
        1.0
    );
    // A Hello of the usual size still gets in.
    reconnect(&stack, "car-x", &credential, hostile::modest_hardware()).await;
}

/// Opens `count` agent streams that never send their Hello; each task ends
/// with the code it was refused with, if it was.
fn streams_without_hello(
    grpc: std::net::SocketAddr,
    count: usize,
) -> tokio::task::JoinSet<Option<tonic::Code>> {
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..count {
        opening.spawn(async move {
            let mut client = hostile::client(grpc).await;
            let (outbound, receiver) = tokio::sync::mpsc::channel::<proto::AgentMessage>(1);
            let opened = client
                .session(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await;
            drop(outbound);
            opened.err().map(|status| status.code())
        });
    }
    opening
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_to_authenticate_are_bounded() {
    let stack = Stack::start(StackOptions::plaintext());
    // Streams that never send their Hello hold a place until the Hello timeout.
    let mut opening = streams_without_hello(stack.grpc, 80);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut refused = 0;
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, opening.join_next()).await {
        if joined.expect("task") == Some(tonic::Code::ResourceExhausted) {
            refused += 1;
        }
    }
    assert!(refused >= 1, "no stream was refused");
    let counted = stack
        .metric("fleetgrid_node_sessions_refused_busy_total")
        .await;
    assert!(counted >= f64::from(refused), "{counted} < {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_waiting_to_authenticate_does_not_keep_other_cars_out() {
    let stack = Stack::start(StackOptions::plaintext());
    let credential = stack.cli(&["nodes", "add", "car-y"]);
    // 80 streams from one address never send their Hello; each holds its
    // place until the Hello timeout, or is refused at once.
    let mut holding = streams_without_hello(stack.grpc, 80);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused = stack
            .metric("fleetgrid_node_sessions_refused_busy_total")
            .await;
        if refused >= (80 - limits::UNAUTHENTICATED_SESSIONS_PER_ADDRESS_MAX) as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {refused} streams refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile a car from another address is let in.
    let other_address = Some(std::net::IpAddr::from([127, 0, 0, 2]));
    let hello = hostile::hello("car-y", &credential, hostile::modest_hardware());
    let opened = hostile::open_from(
        stack.grpc,
        other_address,
        proto::AgentMessage {
            kind: Some(AgentKind::Hello(hello)),
        },
    )
    .await;
    assert!(
        matches!(opened, hostile::Opened::Welcomed(_)),
        "the car was kept out"
    );
    holding.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_nodes_and_wrong_credentials_get_the_same_refusal() {
    let stack = Stack::start(StackOptions::plaintext());
    stack.cli(&["nodes", "add", "car-x"]);
    let wrong = "fgn-000000000000000000000000000000000000000000000000";
    let enrolled = hostile::connect(
        stack.grpc,
        hostile::hello("car-x", wrong, hostile::modest_hardware()),
    )
    .await
    .refusal();
    let unknown = hostile::connect(
        stack.grpc,
        hostile::hello("ghost", wrong, hostile::modest_hardware()),
    )
    .await
    .refusal();
    assert_eq!(enrolled.code, unknown.code);
    assert_eq!(enrolled.reason, unknown.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_without_a_key_names_no_node() {
    let stack = Stack::start(StackOptions::plaintext());
    let _evil = hostile_node(&stack, "evil-car", hostile::modest_hardware()).await;
    stack.wait_for_nodes(&["evil-car"]).await;
    let response = reqwest::get(stack.url("/health")).await.expect("health");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    assert!(!text.contains("evil-car"), "{text}");
    let health: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(health, json!({"status": "ok"}));
    // A key that is not valid gets nothing more.
    let response = stack
        .client()
        .get(stack.url("/health"))
        .bearer_auth("fg-not-a-key")
        .send()
        .await
        .expect("health");
    assert_eq!(response.status(), 401);
}

/// Bounds small enough for a test; production defaults are in `scheduler::TrustConfig`.
const STALL_CEILING_MS: u64 = 3_000;
const UNPROVEN_SLOTS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_claims_much_and_delivers_nothing_gets_little_and_loses_it() {
    let mut stack = Stack::start(StackOptions {
        extra_serve_args: vec![
            "--agent-plaintext".into(),
            "--stall-floor-ms".into(),
            "500".into(),
            "--stall-ceiling-ms".into(),
            STALL_CEILING_MS.to_string(),
            "--stall-prefill-tokens-per-second".into(),
            "1000".into(),
            "--unproven-node-slots".into(),
            UNPROVEN_SLOTS.to_string(),
        ],
    });
    let boastful = proto::Hardware {
        parallel_sequences: 64,
        decode_tokens_per_second: 5_000.0,
        prefill_tokens_per_second: 50_000.0,
        ..hostile::modest_hardware()
    };
    let mut evil = hostile_node(&stack, "evil", boastful).await;
    let heartbeats = evil.keep_alive(HEARTBEAT_EVERY);
    stack.add_agent("car-1", 1);
    stack.wait_for_nodes(&["car-1", "evil"]).await;

    let started = Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 3,
            "temperature": 0,
        });
        let http = stack.url("/v1/chat/completions");
        let key = stack.api_key.clone();
        requests.spawn(async move {
            let response = reqwest::Client::new()
                .post(http)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("send");
            response.status()
        });
    }
    // Read what the hostile node is given while the requests run: never more at once than a
    // new node's capped share, and nothing it holds is left to stall past the bound.
    let mut running_on_evil: usize = 0;
    let mut most_on_evil: usize = 0;
    let mut answered = 0;
    while answered < 4 {
        tokio::select! {
            message = evil.next() => match message {
                // Checks of car-1's answers come too; they are not generations.
                Some(CoordinatorKind::Assign(assign)) if assign.verify.is_none() => {
                    running_on_evil += 1;
                    most_on_evil = most_on_evil.max(running_on_evil);
                }
                Some(CoordinatorKind::Cancel(_)) => {
                    running_on_evil = running_on_evil.saturating_sub(1);
                }
                Some(_) => {}
                None => panic!("the hostile node was disconnected; it only stalled"),
            },
            joined = requests.join_next() => {
                let status = joined.expect("a request").expect("request task");
                assert_eq!(status, 200);
                answered += 1;
            }
        }
        assert!(
            started.elapsed() < WAIT,
            "requests not answered; coordinator log:\n{}",
            stack.log("coordinator")
        );
    }
    heartbeats.abort();
    assert!(most_on_evil >= 1, "the hostile node was never tried");
    assert!(
        most_on_evil <= UNPROVEN_SLOTS,
        "{most_on_evil} generations at once on a node that never delivered"
    );
    assert!(stack.metric("fleetgrid_generations_stalled_total").await >= 1.0);
}
