//! A hostile node's KV checkpoints (issue 11, items 2, 3 and 5): a forged
//! node that prefilled a long prompt sends a well-formed checkpoint of
//! another context, one token, and disconnects; the honest node that takes
//! over must answer as if there were no checkpoint, and no other tenant may
//! ever be answered from cells another node chose. Checkpoints nobody asked
//! for, or larger than the prompt can need, are protocol violations and are
//! not kept.
//!
//! Needs the SmolLM2 model in the model store (`cargo xtask test`).

mod common;

use std::time::{Duration, Instant};

use common::hostile::{self, HostileAgent};
use common::*;
use serde_json::json;

/// Completion tokens asked in the handover scenario.
const MAX_TOKENS: u32 = 16;

/// A question behind a long preamble: over 256 tokens, so its first
/// assignment asks for the prompt's KV cache.
fn long_question() -> String {
    let preamble = "A parked electric car charges overnight in a garage while its computer \
                    lends spare cycles to a fleet that answers questions for strangers. "
        .repeat(12);
    format!("{preamble}\nNow explain how a battery stores energy.")
}

fn chat_body(question: &str, max_tokens: u32) -> serde_json::Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0,
    })
}

/// A chat completion as the tenant with `api_key`; panics unless it is 200.
async fn chat_as(stack: &Stack, api_key: &str, body: &serde_json::Value) -> serde_json::Value {
    let response = stack
        .client()
        .post(stack.url("/v1/chat/completions"))
        .bearer_auth(api_key)
        .json(body)
        .send()
        .await
        .expect("send request");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "chat failed: {text}");
    serde_json::from_str(&text).expect("json body")
}

fn content(response: &serde_json::Value) -> String {
    response["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn cached_tokens(response: &serde_json::Value) -> u64 {
    response["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

/// An engine like an honest agent's (the same model, one thread), in this
/// process: it computes the honest answer and exports the forged checkpoint.
fn honest_engine() -> engine::Engine {
    let mut config = engine::EngineConfig::new(model_path());
    config.threads = 1;
    config.parallel_sequences = 1;
    engine::Engine::start(config).expect("start engine")
}

/// Runs a generation to its end on `engine`: its checkpoint when asked for,
/// its tokens (id and piece) and its text.
async fn generate(
    engine: &engine::Engine,
    prompt: Vec<i32>,
    max_tokens: u32,
    export_checkpoint: bool,
) -> (
    Option<engine::SequenceCheckpoint>,
    Vec<(i32, Vec<u8>)>,
    String,
) {
    let mut stream = engine
        .submit(engine::Generation {
            prompt,
            committed: Vec::new(),
            sampling: engine::SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            top_logprobs: 0,
            ignore_eos: false,
            adjustments: engine::Adjustments::default(),
            grammar: None,
            restore: None,
            export_checkpoint,
            prompt_logprobs: false,
            verify: None,
            draft: Vec::new(),
        })
        .expect("submit");
    let (mut checkpoint, mut tokens, mut bytes) = (None, Vec::new(), Vec::new());
    loop {
        match stream.events.recv().await {
            Some(engine::GenerationEvent::Checkpoint(reported)) => checkpoint = Some(reported),
            Some(engine::GenerationEvent::Token(token)) => {
                bytes.extend_from_slice(&token.piece);
                tokens.push((token.token, token.piece));
            }
            Some(engine::GenerationEvent::Done(_)) => break,
            other => panic!("generation did not finish: {other:?}"),
        }
    }
    (
        checkpoint,
        tokens,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// `prompt` with the tokens in `range` replaced: another context of the same length.
fn forged_context(
    engine: &engine::Engine,
    prompt: &[i32],
    range: std::ops::Range<usize>,
) -> Vec<i32> {
    let one = engine.tokenizer().tokenize("1", false).expect("tokenize")[0];
    let mut forged = prompt.to_vec();
    for token in &mut forged[range] {
        assert_ne!(*token, one);
        *token = one;
    }
    forged
}

/// Waits until `metric` reaches at least `at_least`; panics at the deadline.
async fn wait_for_metric(stack: &Stack, metric: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = stack.metric(metric).await;
        if value >= at_least {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{metric} stayed at {value}, expected at least {at_least}; coordinator log:\n{}",
            stack.log("coordinator")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects a hostile agent enrolled as `name`.
async fn hostile_agent(stack: &Stack, name: &str) -> HostileAgent {
    let credential = stack.cli(&["nodes", "add", name]);
    let hello = hostile::hello(name, &credential, hostile::modest_hardware());
    hostile::connect(stack.grpc, hello).await.welcomed()
}

/// What one round of the handover scenario produced.
struct Round {
    /// The honest answer to the prompt, from the in-process engine.
    honest: String,
    /// The answer of the tenant whose generation the forged node started.
    first: serde_json::Value,
    /// The answer to the same prompt for another tenant, afterwards.
    other_tenant: serde_json::Value,
}

/// The scenario: the forged node `forged` is assigned the long
/// prompt (the only node connected), sends an honest engine's checkpoint of
/// the prompt with the tokens at `forge(prompt_len)` replaced, then the
/// honest first token, and disconnects; the honest agent `honest` takes over.
/// Then another tenant asks the same.
async fn forged_handover(
    stack: &mut Stack,
    engine: &engine::Engine,
    names: (&str, &str),
    other_key: &str,
    forge: fn(usize) -> std::ops::Range<usize>,
) -> Round {
    let (forged_name, honest_name) = names;
    let mut forged = hostile_agent(stack, forged_name).await;
    let alive = forged.keep_alive(Duration::from_millis(250));
    stack.wait_for_nodes(&[forged_name]).await;
    let body = chat_body(&long_question(), MAX_TOKENS);
    let first = {
        let client = stack.client();
        let url = stack.url("/v1/chat/completions");
        let (key, body) = (stack.api_key.clone(), body.clone());
        tokio::spawn(async move {
            let response = client.post(url).bearer_auth(key).json(&body).send().await;
            let response = response.expect("send request");
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.expect("json")
        })
    };
    let assign = forged.next_assignment().await.expect("an assignment");
    assert!(
        assign.report_checkpoint,
        "a long prompt's first assignment asks for its checkpoint"
    );
    let prompt = assign.prompt_tokens.clone();
    let (_, honest_tokens, honest) = generate(engine, prompt.clone(), MAX_TOKENS, false).await;
    let other = forged_context(engine, &prompt, forge(prompt.len()));
    let (checkpoint, _, _) = generate(engine, other, 1, true).await;
    let checkpoint = checkpoint.expect("a checkpoint was asked for");
    assert_eq!(checkpoint.tokens as usize, prompt.len());

    stack.add_agent(honest_name, 1);
    stack.wait_for_nodes(&[forged_name, honest_name]).await;
    let id = assign.generation_id.as_str();
    let total = checkpoint.data.len() as u64;
    let kept = stack.metric("fleetgrid_kv_checkpoints_kept_total").await;
    let committed = stack.metric("fleetgrid_completion_tokens_total").await;
    assert!(
        forged
            .checkpoint(id, checkpoint.tokens, total, &checkpoint.data)
            .await
    );
    let (first_token, first_piece) = honest_tokens[0].clone();
    assert!(
        forged
            .token_with_piece(id, 0, first_token, first_piece)
            .await
    );
    // Sent is not received: disconnect only once the coordinator has both.
    wait_for_metric(stack, "fleetgrid_kv_checkpoints_kept_total", kept + 1.0).await;
    wait_for_metric(stack, "fleetgrid_completion_tokens_total", committed + 1.0).await;
    alive.abort();
    let _ = alive.await;
    drop(forged);

    let first = first.await.expect("first request");
    let other_tenant = chat_as(stack, other_key, &body).await;
    Round {
        honest,
        first,
        other_tenant,
    }
}

/// Round one, the scenario: the checkpoint is of a prompt whose last
/// user tokens differ. The honest node refuses it (the cells it computes for
/// the prompt's last tokens disagree), tells the coordinator, and prefills:
/// both tenants get the honest answer.
///
/// Round two: the checkpoint's context differs only far from the end, which
/// the cheap check cannot see by design; its cells may shape that one
/// generation, but never another tenant's: the next request prefills the
/// whole prompt (no cached tokens) and gets the honest answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_checkpoint_never_reaches_another_answer() {
    let mut stack = Stack::start(StackOptions::plaintext());
    let engine = honest_engine();
    let other_keys = [
        stack.cli(&["tenants", "create", "other-1", "--class", "fleet"]),
        stack.cli(&["tenants", "create", "other-2", "--class", "fleet"]),
    ];

    let round = forged_handover(
        &mut stack,
        &engine,
        ("forged-1", "honest-1"),
        &other_keys[0],
        |len| len - 12..len - 6,
    )
    .await;
    assert_eq!(
        stack
            .metric("fleetgrid_kv_checkpoint_handovers_total")
            .await,
        1.0,
        "the forged checkpoint was not handed over; coordinator log:\n{}",
        stack.log("coordinator")
    );
    assert_eq!(
        stack
            .metric("fleetgrid_kv_checkpoints_rejected_by_nodes_total")
            .await,
        1.0,
        "the honest node did not report refusing the forged checkpoint"
    );
    assert_eq!(
        content(&round.first),
        round.honest,
        "the forged checkpoint changed the answer"
    );
    assert_eq!(
        content(&round.other_tenant),
        round.honest,
        "another tenant got an answer from the forged cells"
    );

    // Round two, on a fresh honest node.
    for agent in stack.agents.iter_mut() {
        agent.kill();
    }
    stack.wait_for_nodes(&[]).await;
    let round = forged_handover(
        &mut stack,
        &engine,
        ("forged-2", "honest-2"),
        &other_keys[1],
        |len| len / 3..len / 3 + 40,
    )
    .await;
    assert_eq!(
        stack
            .metric("fleetgrid_kv_checkpoint_handovers_total")
            .await,
        2.0
    );
    assert_eq!(
        cached_tokens(&round.other_tenant),
        0,
        "another tenant was answered from cells the forged node chose"
    );
    assert_eq!(
        content(&round.other_tenant),
        round.honest,
        "another tenant got an answer from the forged cells"
    );
}

/// Sends a checkpoint on the hostile agent's first assignment and checks it
/// is a protocol violation that keeps nothing.
async fn refused_checkpoint(question: &str, total_bytes: impl Fn(&proto::Assign) -> usize) {
    let stack = Stack::start(StackOptions::plaintext());
    let mut forged = hostile_agent(&stack, "forged").await;
    let alive = forged.keep_alive(Duration::from_millis(250));
    stack.wait_for_nodes(&["forged"]).await;
    let request = {
        let client = stack.client();
        let url = stack.url("/v1/chat/completions");
        let (key, body) = (stack.api_key.clone(), chat_body(question, 4));
        tokio::spawn(async move { client.post(url).bearer_auth(key).json(&body).send().await })
    };
    let assign = forged.next_assignment().await.expect("an assignment");
    let total = total_bytes(&assign);
    let data = vec![0x5a_u8; total];
    let tokens = assign.prompt_tokens.len() as u32;
    // The coordinator may disconnect the node at the first piece.
    let _ = forged
        .checkpoint(&assign.generation_id, tokens, total as u64, &data)
        .await;
    wait_for_metric(&stack, "fleetgrid_node_protocol_violations_total", 1.0).await;
    assert_eq!(
        stack.metric("fleetgrid_kv_checkpoints_kept_total").await,
        0.0,
        "the checkpoint was kept"
    );
    alive.abort();
    request.abort();
}

/// A short prompt's assignment asks for no checkpoint: one sent anyway is a
/// violation, and is not kept.
#[tokio::test(flavor = "multi_thread")]
async fn an_unrequested_checkpoint_is_refused_and_not_kept() {
    refused_checkpoint("Say hello.", |assign| {
        assert!(!assign.report_checkpoint, "a short prompt asks for none");
        2 << 20
    })
    .await;
}

/// A checkpoint larger than a prompt this long can need is a violation, and
/// is not kept, even when it was asked for.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_checkpoint_is_refused_and_not_kept() {
    refused_checkpoint(&long_question(), |assign| {
        assert!(assign.report_checkpoint);
        coordinator::limits::kv_checkpoint_bytes_max(assign.prompt_tokens.len()) + 1
    })
    .await;
}
