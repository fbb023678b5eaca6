//! Hostile input, the money side (issue 11, items 1, 7 and 11): one tenant
//! must never be billed on another's account, an ownerless node never paid
//! into an owner's, a node that sits on a generation is paid for its tokens
//! and not for the wait, and a client that hangs up pays for what was made:
//! on the fleet, on a routed request's fleet or cloud part, and after its
//! answer ended but before it read the end.
//!
//! A real coordinator with the SQLite ledger and a test price sheet; the
//! nodes are hostile agents (`common::hostile`) speaking the real protocol,
//! so that what they send and when is exact.

mod cloud_common;
mod common;

use std::time::{Duration, Instant};

use common::hostile::{self, HostileAgent};
use common::{colour_chat, u64_of, Stack, WAIT};
use coordinator::limits;
use serde_json::{json, Value};

/// Spot $2 / $4 and fleet $5 / $10 per million prompt / completion tokens:
/// every token is worth whole micro-dollars, so charges are exact.
const SPOT_PROMPT_MICRO: u64 = 2;
const SPOT_COMPLETION_MICRO: u64 = 4;

/// The cloud model's $5 / $10 upstream price plus the sheet's 20 % margin.
const CLOUD_PROMPT_MICRO: u64 = 6;
const CLOUD_COMPLETION_MICRO: u64 = 12;

const HEARTBEAT: Duration = Duration::from_millis(300);

/// A stack on the test price sheet (kept in the returned directory).
fn priced_stack() -> (Stack, tempfile::TempDir) {
    priced_stack_with(&[])
}

/// A stack on the test price sheet with more `serve` flags, taking the
/// hostile agents' plain gRPC.
fn priced_stack_with(args: &[&str]) -> (Stack, tempfile::TempDir) {
    let args: Vec<&str> = std::iter::once("--agent-plaintext")
        .chain(args.iter().copied())
        .collect();
    let (options, prices) = common::billed_options(&args);
    (Stack::start(options), prices)
}

/// Real token ids of the served model with the text an honest node sends.
fn honest_tokens() -> Vec<(i32, Vec<u8>)> {
    let tokenizer = engine::Tokenizer::load(&common::model_path()).expect("tokenizer");
    let ids = tokenizer
        .tokenize(" red green blue yellow", false)
        .expect("tokenize");
    ids.into_iter()
        .map(|id| (id, tokenizer.piece(id)))
        .collect()
}

/// Enrols `name` (under `owner`, or none) and connects it as a hostile
/// agent declaring `hardware`.
async fn hostile_node(
    stack: &Stack,
    name: &str,
    owner: Option<&str>,
    hardware: proto::Hardware,
) -> HostileAgent {
    let mut args = vec!["nodes", "add", name];
    if let Some(owner) = owner {
        args.extend(["--owner", owner]);
    }
    let credential = stack.cli(&args);
    hostile::connect(stack.grpc, hostile::hello(name, &credential, hardware))
        .await
        .welcomed()
}

/// Answers every assignment honestly with `tokens[..count]`, until aborted.
fn serve_honestly(mut agent: HostileAgent, count: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tokens = honest_tokens();
        let _beats = agent.heartbeat_every(HEARTBEAT);
        while let Some(assign) = agent.next_assignment().await {
            agent.answer(&assign, &tokens[..count]).await;
        }
    })
}

/// A fixed-point decimal string as an integer of its smallest unit.
fn fixed(text: &str) -> u64 {
    text.replace('.', "").parse().expect("a fixed-point number")
}

fn balances(stack: &Stack) -> String {
    let output = std::process::Command::new(common::binary())
        .args(["ledger", "balances", "--data-dir"])
        .arg(stack.dir.path())
        .output()
        .expect("run fleetgrid");
    assert!(output.status.success(), "ledger balances failed");
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The balance `ledger balances` shows on the line of `label`, in µUSD.
fn balance_of(balances: &str, label: &str) -> Option<u64> {
    balances.lines().find_map(|line| {
        let rest = line.strip_prefix(label)?.strip_prefix(' ')?;
        rest.split_whitespace().next().map(fixed)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_is_never_billed_on_the_account_of_a_tenant_named_after_its_id() {
    let (stack, _prices) = priced_stack();
    let node = hostile_node(&stack, "car-h", None, hostile::modest_hardware()).await;
    let server = serve_honestly(node, 3);
    stack.wait_for_nodes(&["car-h"]).await;

    // "probe corp" is left unfunded; a tenant named after its id is funded.
    let probe_key = stack.cli(&["tenants", "create", "probe corp", "--class", "spot"]);
    let store = coordinator::store::Store::open(stack.dir.path())
        .await
        .expect("open the coordinator's database");
    let probe = store.tenant_by_name("probe corp").await.expect("lookup");
    let lookalike = format!("tenant-{}", probe.expect("probe corp exists").id);
    let lookalike_key = stack.cli(&["tenants", "create", &lookalike, "--class", "spot"]);
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        &lookalike,
        "--amount",
        "0.01",
        "--reference",
        "lookalike-1",
    ]);

    let refused = stack
        .post_as(&probe_key, "/v1/chat/completions", &colour_chat(3))
        .await;
    assert_eq!(
        refused.status(),
        402,
        "{}",
        refused.text().await.unwrap_or_default()
    );
    let (_, lookalike_usage) = stack.get_as(&lookalike_key, "/v1/usage").await;
    assert_eq!(
        lookalike_usage["balance_usd"], "0.010000",
        "{lookalike_usage}"
    );
    assert_eq!(u64_of(&lookalike_usage["requests"]), 0);
    assert_eq!(lookalike_usage["tenant"], lookalike.as_str());
    let (_, probe_usage) = stack.get_as(&probe_key, "/v1/usage").await;
    assert_eq!(probe_usage["tenant"], "probe corp", "{probe_usage}");
    assert_eq!(probe_usage["balance_usd"], "0.000000");

    // The funded tenant's own request is charged to it, and only to it.
    let served = stack
        .post_as(&lookalike_key, "/v1/chat/completions", &colour_chat(3))
        .await;
    assert_eq!(served.status(), 200);
    let (_, lookalike_usage) = stack.get_as(&lookalike_key, "/v1/usage").await;
    assert_eq!(u64_of(&lookalike_usage["requests"]), 1);
    let charged = u64_of(&lookalike_usage["charged_micro_usd"]);
    assert!(charged > 0);
    assert_eq!(
        fixed(lookalike_usage["balance_usd"].as_str().expect("balance")),
        10_000 - charged
    );
    let (_, probe_usage) = stack.get_as(&probe_key, "/v1/usage").await;
    assert_eq!(u64_of(&probe_usage["requests"]), 0, "{probe_usage}");
    assert_eq!(probe_usage["balance_usd"], "0.000000");
    stack.cli(&["ledger", "verify"]);
    server.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ownerless_node_named_like_an_owner_does_not_pay_that_owner() {
    let (stack, _prices) = priced_stack();
    stack.cli(&["owners", "create", "alice"]);
    let node = hostile_node(&stack, "alice", None, hostile::modest_hardware()).await;
    let server = serve_honestly(node, 3);
    stack.wait_for_nodes(&["alice"]).await;

    let body = stack.chat(&colour_chat(3)).await;
    assert_eq!(u64_of(&body["usage"]["completion_tokens"]), 3);
    let balances = balances(&stack);
    assert_eq!(balance_of(&balances, "owner:alice"), Some(0), "{balances}");
    let vehicle = balance_of(&balances, "vehicle:alice");
    assert!(vehicle.is_some_and(|earned| earned > 0), "{balances}");
    stack.cli(&["ledger", "verify"]);
    server.abort();
}

/// Hardware declaring itself absurdly slow, to raise its paid bound.
fn sluggish_hardware() -> proto::Hardware {
    proto::Hardware {
        decode_tokens_per_second: 0.001,
        prefill_tokens_per_second: 0.001,
        ..hostile::modest_hardware()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_waits_before_its_only_token_is_paid_for_the_token_not_the_wait() {
    // How long the hostile node sits on the generation before answering.
    const HOLD: Duration = Duration::from_secs(6);
    let (stack, _prices) = priced_stack();
    let owner_key = stack.cli(&["owners", "create", "mallory"]);
    let tokens = honest_tokens();
    let power = ledger::price_file::PriceConfig::parse_json(&common::test_prices_json())
        .expect("prices")
        .power_of(&ledger::core::NodeId::new("any").expect("node"));
    for (name, hardware) in [
        ("slowpoke", hostile::modest_hardware()),
        ("liar", sluggish_hardware()),
    ] {
        let mut agent = hostile_node(&stack, name, Some("mallory"), hardware.clone()).await;
        let beats = agent.heartbeat_every(HEARTBEAT);
        stack.wait_for_nodes(&[name]).await;
        let client = {
            let (url, key) = (stack.url("/v1/chat/completions"), stack.api_key.clone());
            tokio::spawn(async move {
                let response = reqwest::Client::new()
                    .post(url)
                    .bearer_auth(key)
                    .json(&colour_chat(1))
                    .send()
                    .await
                    .expect("send");
                response.status().as_u16()
            })
        };
        let assign = agent.next_assignment().await.expect("an assignment");
        // The hostile behaviour under test: nothing for a while, then one token.
        tokio::time::sleep(HOLD).await;
        assert!(agent.answer(&assign, &tokens[..1]).await);
        assert_eq!(client.await.expect("client"), 200);
        drop(beats);
        drop(agent);
        stack.wait_for_nodes(&[]).await;

        // The bound: its tokens at the speed it declared, never below the
        // floors, times the slack.
        let prompt = assign.prompt_tokens.len() as u64;
        let prefill = (hardware.prefill_tokens_per_second as u64)
            .max(limits::PAID_PREFILL_TOKENS_PER_SECOND_MIN);
        let decode = (hardware.decode_tokens_per_second as u64)
            .max(limits::PAID_DECODE_TOKENS_PER_SECOND_MIN);
        let bound_ms = limits::PAID_COMPUTE_SLACK
            * ((prompt * 1_000).div_ceil(prefill) + 1_000_u64.div_ceil(decode));
        assert!(
            bound_ms * 2 < HOLD.as_millis() as u64,
            "the test must tell them apart"
        );

        let path = format!("/owner/v1/vehicles/{name}/statement");
        let (status, statement) = stack.get_as(&owner_key, &path).await;
        assert_eq!(status, 200, "{statement}");
        assert_eq!(u64_of(&statement["requests"]), 1, "{statement}");
        let micro_hours = fixed(statement["compute_hours"].as_str().expect("hours"));
        assert!(
            micro_hours * 36 <= bound_ms * 10,
            "{name} was paid {micro_hours} µh of compute, more than its tokens' {bound_ms} ms"
        );
        let energy_uwh = fixed(statement["energy_kwh"].as_str().expect("energy"));
        let bound_energy = power.segment_energy(ledger::core::DurationMs(bound_ms));
        assert!(
            energy_uwh <= bound_energy.0,
            "{name} was paid for {energy_uwh} µWh, more than {bound_energy:?}"
        );
    }
    stack.cli(&["ledger", "verify"]);
}

/// A spot tenant funded with $1; returns its API key.
fn funded_spot_tenant(stack: &Stack, name: &str) -> String {
    let key = stack.cli(&["tenants", "create", name, "--class", "spot"]);
    stack.cli(&[
        "billing",
        "topup",
        "--tenant",
        name,
        "--amount",
        "1",
        "--reference",
        &format!("{name}-1"),
    ]);
    key
}

/// Reads a streamed response until its text holds `expected`, then hangs up.
async fn hang_up_after(response: reqwest::Response, expected: &str) {
    use futures::StreamExt;
    let mut stream = response.bytes_stream();
    let mut raw = String::new();
    let whole_lines = |raw: &str| raw[..raw.rfind('\n').map_or(0, |end| end + 1)].to_string();
    while !common::parse_sse(&whole_lines(&raw))
        .content
        .contains(expected.trim())
    {
        let chunk = stream.next().await.expect("a chunk").expect("chunk bytes");
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// The tenant's `/v1/usage` once its one request was charged: charges of
/// cancelled requests land in the background, so this polls (never sleeps).
async fn usage_once_charged(stack: &Stack, key: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, usage) = stack.get_as(key, "/v1/usage").await;
        if u64_of(&usage["requests"]) > 0 {
            assert_eq!(u64_of(&usage["requests"]), 1, "{usage}");
            return usage;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled request was never charged: {usage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that `usage` shows one request charged at the spot price for
/// `prompt` prompt tokens and `made` completion tokens.
fn assert_spot_charge(usage: &Value, prompt: u64, made: u64) {
    assert_eq!(u64_of(&usage["prompt_tokens"]), prompt, "{usage}");
    assert_eq!(u64_of(&usage["completion_tokens"]), made, "{usage}");
    assert_eq!(
        u64_of(&usage["charged_micro_usd"]),
        prompt * SPOT_PROMPT_MICRO + made * SPOT_COMPLETION_MICRO,
        "{usage}"
    );
}

/// The text of `tokens`.
fn text_of(tokens: &[(i32, Vec<u8>)]) -> String {
    tokens
        .iter()
        .map(|(_, piece)| String::from_utf8_lossy(piece).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_pays_for_the_prompt_and_the_tokens_made() {
    let (stack, _prices) = priced_stack();
    let owner_key = stack.cli(&["owners", "create", "olga"]);
    let mut agent = hostile_node(&stack, "car-c", Some("olga"), hostile::modest_hardware()).await;
    let _beats = agent.heartbeat_every(HEARTBEAT);
    stack.wait_for_nodes(&["car-c"]).await;
    let key = funded_spot_tenant(&stack, "hangs-up");

    let mut body = colour_chat(50);
    body["stream"] = json!(true);
    let response = stack.post_as(&key, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let assign = agent.next_assignment().await.expect("an assignment");
    let tokens = honest_tokens();
    let made = 3;
    assert!(
        agent
            .pieces(&assign.generation_id, 0, &tokens[..made])
            .await
    );
    hang_up_after(response, &text_of(&tokens[..made])).await;
    assert!(agent.expect_cancel(&assign.generation_id).await);

    let usage = usage_once_charged(&stack, &key).await;
    assert_spot_charge(&usage, assign.prompt_tokens.len() as u64, made as u64);
    // The node that made them is credited for them.
    let (status, statement) = stack
        .get_as(&owner_key, "/owner/v1/vehicles/car-c/statement")
        .await;
    assert_eq!(status, 200, "{statement}");
    assert_eq!(u64_of(&statement["requests"]), 1, "{statement}");
    assert_eq!(u64_of(&statement["completion_tokens"]), made as u64);
    assert!(u64_of(&statement["earnings_micro_usd"]) > 0, "{statement}");
    stack.cli(&["ledger", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_cut_off_after_its_answer_ended_pays_for_all_of_it() {
    // The client reads nothing, so the gateway cannot write the answer; the
    // node finishes it meanwhile, and the stall timeout then closes the
    // connection with the answer's end still unread.
    let (stack, _prices) = priced_stack_with(&[
        "--client-stall-timeout-ms",
        "3000",
        "--context-tokens",
        "8192",
    ]);
    stack.cli(&["owners", "create", "ola"]);
    let mut agent = hostile_node(&stack, "car-e", Some("ola"), hostile::modest_hardware()).await;
    let _beats = agent.heartbeat_every(HEARTBEAT);
    stack.wait_for_nodes(&["car-e"]).await;
    let key = funded_spot_tenant(&stack, "never-reads");

    let mut stream = hostile::non_reading_client(stack.http, &key, &hostile::flood_body()).await;
    let assign = agent.next_assignment().await.expect("an assignment");
    let made = 4000;
    assert!(agent.flood(&assign.generation_id, made).await);
    let prompt = assign.prompt_tokens.len() as u32;
    assert!(
        agent
            .done(
                &assign.generation_id,
                proto::FinishReason::Length,
                prompt,
                made,
                1
            )
            .await
    );
    // Read nothing until the gateway gave up on the client: reading would
    // let it write the end.
    let usage = usage_once_charged(&stack, &key).await;
    let received = hostile::read_until_closed(&mut stream, Instant::now() + WAIT).await;
    assert!(!String::from_utf8_lossy(&received).contains("[DONE]"));
    assert_spot_charge(&usage, u64::from(prompt), u64::from(made));
    stack.cli(&["ledger", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routed_client_that_hangs_up_pays_for_the_fleet_tokens_made() {
    // `cloud/...` with the cloud down falls back to the fleet.
    let mut args = cloud_common::upstream_args(&format!("http://127.0.0.1:{}/v1", closed_port()));
    args.extend(["--cloud-fallback".to_string(), "edge".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (stack, _prices) = priced_stack_with(&args);
    stack.cli(&["owners", "create", "oda"]);
    let mut agent = hostile_node(&stack, "car-r", Some("oda"), hostile::modest_hardware()).await;
    let _beats = agent.heartbeat_every(HEARTBEAT);
    stack.wait_for_nodes(&["car-r"]).await;
    let key = funded_spot_tenant(&stack, "routed-hangs-up");
    let tokens = honest_tokens();
    let made = 3;

    let mut body = colour_chat(50);
    body["model"] = json!(format!("cloud/{}", cloud_common::CLOUD_MODEL));
    body["stream"] = json!(true);
    // A routed response starts once its tier is known: with the first text.
    let response = stack.post_as(&key, "/v1/chat/completions", &body);
    let (response, assign) = tokio::join!(response, async {
        let assign = agent.next_assignment().await.expect("an assignment");
        assert!(
            agent
                .pieces(&assign.generation_id, 0, &tokens[..made])
                .await
        );
        assign
    });
    assert_eq!(response.status(), 200);
    hang_up_after(response, &text_of(&tokens[..made])).await;
    assert!(agent.expect_cancel(&assign.generation_id).await);

    let usage = usage_once_charged(&stack, &key).await;
    assert_spot_charge(&usage, assign.prompt_tokens.len() as u64, made as u64);
    stack.cli(&["ledger", "verify"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_on_the_cloud_pays_for_the_prompt_and_the_text_streamed() {
    let chunks = ["Red", " green", " blue"];
    let upstream = trickling_upstream(&chunks);
    let args = cloud_common::upstream_args(&format!("http://127.0.0.1:{upstream}/v1"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (stack, _prices) = priced_stack_with(&args);
    let key = funded_spot_tenant(&stack, "cloud-hangs-up");

    let mut body = colour_chat(50);
    body["model"] = json!(format!("cloud/{}", cloud_common::CLOUD_MODEL));
    body["stream"] = json!(true);
    let response = stack.post_as(&key, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    hang_up_after(response, &chunks.concat()).await;

    // The upstream never said how many tokens it counted: the gateway's own
    // count of the prompt, and a token per text chunk, at the cloud price.
    let usage = usage_once_charged(&stack, &key).await;
    let prompt = u64_of(&usage["prompt_tokens"]);
    assert!(prompt > 0, "{usage}");
    assert_eq!(
        u64_of(&usage["completion_tokens"]),
        chunks.len() as u64,
        "{usage}"
    );
    assert_eq!(
        u64_of(&usage["charged_micro_usd"]),
        prompt * CLOUD_PROMPT_MICRO + chunks.len() as u64 * CLOUD_COMPLETION_MICRO
    );
    stack.cli(&["ledger", "verify"]);
}

/// A port on which nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// An OpenAI-compatible upstream that answers every call with a stream of
/// `chunks` and then neither sends more nor closes; its thread ends when the
/// test process does.
fn trickling_upstream(chunks: &[&str]) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let events: String = chunks
        .iter()
        .map(|text| {
            let event = json!({"choices": [{"index": 0, "delta": {"content": text}}]});
            format!("data: {event}\n\n")
        })
        .collect();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut stream = reader.into_inner();
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(events.as_bytes());
            let _ = stream.flush();
            held.push(stream);
        }
    });
    port
}
