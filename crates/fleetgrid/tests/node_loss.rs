//! Losing a vehicle: the coordinator notices within the heartbeat timeout,
//! new work goes to the remaining node, and a generation interrupted by a
//! SIGKILLed agent continues on another node with the client seeing one
//! unbroken stream — the same text as an uninterrupted run.

mod common;

use std::time::{Duration, Instant};

use common::{Stack, MODEL};
use futures::StreamExt;
use serde_json::json;

/// The heartbeat timeout the test stack runs with (see `Stack::start`).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_is_marked_gone_and_requests_go_to_the_other_node() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.add_agent("car-2", 2);
    stack.wait_for_nodes(&["car-1", "car-2"]).await;

    let killed_at = Instant::now();
    stack.agents[0].kill();
    stack.wait_for_nodes(&["car-2"]).await;
    assert!(
        killed_at.elapsed() <= HEARTBEAT_TIMEOUT,
        "node marked gone after {:?}",
        killed_at.elapsed()
    );

    for _ in 0..3 {
        let answer = stack
            .chat(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6}))
            .await;
        assert!(answer["choices"][0]["message"]["content"].is_string());
    }
}

/// Streams `body` and SIGKILLs the agent running it once `kill_after_chunks` chunks have
/// arrived; returns what arrived before the kill and the whole stream.
async fn stream_with_kill(
    stack: &mut Stack,
    body: &serde_json::Value,
    kill_after_chunks: usize,
) -> (String, String) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let assigned_before = stack.assignment_counts().await;
    let response = stack.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    let mut killed = false;
    let mut before_kill = String::new();
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        let chunks = raw.matches("data: ").count();
        if !killed && chunks >= kill_after_chunks {
            // Whole events only: a read may end inside one.
            let events_end = raw.rfind("\n\n").map_or(0, |at| at + 2);
            before_kill = raw[..events_end].to_owned();
            let node = stack.assigned_since(&assigned_before).await;
            let agent = stack
                .agents
                .iter_mut()
                .find(|agent| agent.name == node)
                .expect("agent process");
            agent.kill();
            killed = true;
        }
    }
    assert!(killed, "the generation finished before the kill");
    let streamed = common::parse_sse(&raw);
    assert!(
        streamed.errors.is_empty(),
        "errors in the stream: {:?}",
        streamed.errors
    );
    assert!(streamed.done);
    (before_kill, raw)
}

/// The text of a chat answer.
fn answer_content(answer: &serde_json::Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// KV checkpoints handed over with a moved generation so far, and those refused by the node
/// they were handed to.
async fn checkpoint_handovers(stack: &Stack) -> (f64, f64) {
    (
        stack
            .metric("fleetgrid_kv_checkpoint_handovers_total")
            .await,
        stack
            .metric("fleetgrid_kv_checkpoints_rejected_by_nodes_total")
            .await,
    )
}

/// The text of a streamed chat answer.
fn streamed_content(raw: &str) -> String {
    common::parse_sse(raw).content
}

/// The tool calls of a streamed chat answer put together from their deltas: (name,
/// arguments).
fn streamed_calls(raw: &str) -> Vec<(String, String)> {
    let mut calls: Vec<(String, String)> = Vec::new();
    for data in raw.lines().filter_map(|line| line.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        let parts = chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .cloned();
        for part in parts.into_iter().flatten() {
            let function = &part["function"];
            if let Some(name) = function["name"].as_str() {
                calls.push((name.to_string(), String::new()));
            }
            if let (Some(call), Some(arguments)) =
                (calls.last_mut(), function["arguments"].as_str())
            {
                call.1.push_str(arguments);
            }
        }
    }
    calls
}

/// A question behind a long preamble: its prompt is long enough (over 256
/// tokens) for the coordinator to keep its KV cache for a handover.
fn long_question() -> String {
    let preamble = "A parked electric car charges overnight in a garage while its computer \
                    lends spare cycles to a fleet that answers questions for strangers. "
        .repeat(12);
    format!("{preamble}\nNow explain how a battery stores energy.")
}

/// Round one: a short prompt, greedy — the next node re-prefills it.
/// Round two: a long prompt, sampled — the next node loads the prompt's KV
/// cache that the first node reported, and only replays the committed tokens.
/// Both continue exactly as an uninterrupted run.
#[tokio::test(flavor = "multi_thread")]
async fn a_generation_survives_its_node_being_killed_mid_stream() {
    let mut stack = Stack::start(Default::default());
    let short = "Explain how a battery stores energy.".to_string();
    for (temperature, seed, question) in [(0.0, 1, short), (0.8, 1234, long_question())] {
        let with_checkpoint = question.len() > 1_000;
        let names = [format!("a-{seed}"), format!("b-{seed}")];
        for name in &names {
            stack.add_agent(name, 1);
        }
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        stack.wait_for_nodes(&wanted).await;
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 120, "temperature": temperature, "seed": seed,
        });
        let expected = answer_content(&stack.chat(&body).await);
        let reassigned_before = stack.metric("fleetgrid_reassignments_total").await;
        let (handovers_before, refused_before) = checkpoint_handovers(&stack).await;
        let text = streamed_content(&stream_with_kill(&mut stack, &body, 20).await.1);
        assert_eq!(
            text, expected,
            "temperature {temperature}: the resumed stream differs from an uninterrupted run"
        );
        assert_eq!(
            stack.metric("fleetgrid_reassignments_total").await,
            reassigned_before + 1.0
        );
        // A node handed a checkpoint either loads it or says it refused it
        // (and prefilled instead).
        let (handovers, refused) = checkpoint_handovers(&stack).await;
        let (handovers, refused) = (handovers - handovers_before, refused - refused_before);
        let restored = handovers == 1.0 && refused == 0.0;
        if with_checkpoint {
            assert_eq!(handovers, 1.0, "handed over without the KV checkpoint");
            assert!(
                restored,
                "the next node prefilled instead of loading the checkpoint"
            );
        } else {
            assert_eq!(handovers, 0.0, "a short prompt is re-prefilled");
            assert!(!restored);
        }
        // Leave no node of this round behind for the next one.
        for agent in stack.agents.iter_mut() {
            agent.kill();
        }
        stack.wait_for_nodes(&[]).await;
    }
}

/// Flash attention on the default kernels (`--flash-attention fast`) and its weaker guarantee:
/// a long, sampled answer whose car is killed mid-stream continues on the other `fast` car from
/// its committed tokens, the prompt's KV checkpoint from one `fast` car loading on the other, and
/// the client sees one unbroken stream. What the first car sent is what a fresh `fast` car
/// computes uninterrupted; what follows may differ (a `fast` car's numbers depend on its batch's
/// shape, even on whether it kept the prompt's cells from an earlier request, so the reference
/// runs on a car of its own).
#[tokio::test(flavor = "multi_thread")]
async fn a_fast_flash_attention_answer_continues_from_its_committed_tokens_after_a_kill() {
    let mut stack = Stack::start(Default::default());
    let fast = ["--flash-attention", "fast"];
    stack.add_agent_with("fast-reference", 1, &fast);
    stack.wait_for_nodes(&["fast-reference"]).await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": long_question()}],
        "max_tokens": 120, "temperature": 0.8, "seed": 77,
    });
    let expected = answer_content(&stack.chat(&body).await);
    stack.agents[0].kill();
    stack.wait_for_nodes(&[]).await;
    for name in ["fast-a", "fast-b"] {
        stack.add_agent_with(name, 1, &fast);
    }
    stack.wait_for_nodes(&["fast-a", "fast-b"]).await;
    let before = checkpoint_handovers(&stack).await;
    let (before_kill, raw) = stream_with_kill(&mut stack, &body, 20).await;
    let (before_kill, text) = (streamed_content(&before_kill), streamed_content(&raw));
    assert!(
        before_kill.len() > 10,
        "too little streamed before the kill: {before_kill:?}"
    );
    assert!(
        expected.starts_with(&before_kill),
        "before the kill {before_kill:?}, uninterrupted {expected:?}"
    );
    assert!(
        text.len() > before_kill.len(),
        "nothing after the kill: {text:?}"
    );
    let after = checkpoint_handovers(&stack).await;
    assert_eq!(
        after.0 - before.0,
        1.0,
        "handed over without the KV checkpoint"
    );
    assert_eq!(
        after.1 - before.1,
        0.0,
        "a fast car refused another fast car's checkpoint"
    );
}

/// In a fleet of mixed attention settings, a generation killed mid-answer on a car without
/// flash attention continues on the other such car, not on the `fast` car that connected
/// before it (the lower node id, which a new request would prefer at equal load): its KV
/// checkpoint loads there, and the client reads exactly the uninterrupted answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_answer_continues_exactly_on_a_car_of_its_attention_setting_in_a_mixed_fleet() {
    let mut stack = Stack::start(Default::default());
    // One at a time, so that node ids follow this order.
    let cars: [(&str, &[&str]); 3] = [
        ("off-a", &[]),
        ("fast", &["--flash-attention", "fast"]),
        ("off-b", &[]),
    ];
    let mut connected = Vec::new();
    for (name, args) in cars {
        stack.add_agent_with(name, 1, args);
        connected.push(name);
        stack.wait_for_nodes(&connected).await;
    }
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": long_question()}],
        "max_tokens": 120, "temperature": 0.8, "seed": 78,
    });
    let assigned_before = stack.assignment_counts().await;
    let expected = answer_content(&stack.chat(&body).await);
    assert_eq!(stack.assigned_since(&assigned_before).await, "off-a");
    let before = checkpoint_handovers(&stack).await;
    let (_, raw) = stream_with_kill(&mut stack, &body, 20).await;
    assert_eq!(streamed_content(&raw), expected);
    let after = checkpoint_handovers(&stack).await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1.0, 0.0),
        "handed over with its KV checkpoint, which the receiving car loaded"
    );
    let across = stack.metric("fleetgrid_moves_across_numerics_total").await;
    assert_eq!(across, 0.0, "no move to other numerics");
}

/// Penalties and a grammar depend on every token before, so the next node must
/// rebuild them from the committed tokens: a sampled answer with all the
/// penalties (and min-p and a bias), and one constrained by a JSON schema,
/// killed mid-stream, still read exactly as the uninterrupted ones.
#[tokio::test(flavor = "multi_thread")]
async fn penalised_constrained_and_tool_calling_answers_survive_their_node_being_killed_mid_stream()
{
    let mut stack = Stack::start(Default::default());
    let plain = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Explain how a battery stores energy."}],
        "max_tokens": 100, "temperature": 0.7, "seed": 77,
    });
    let mut penalised = plain.clone();
    for (key, value) in [
        ("presence_penalty", json!(0.8)),
        ("frequency_penalty", json!(0.6)),
        ("repetition_penalty", json!(1.2)),
        ("min_p", json!(0.05)),
        // Two tokens of the vocabulary made less likely.
        ("logit_bias", json!({"260": -4, "30": -2})),
    ] {
        penalised[key] = value;
    }
    let content = |answer: serde_json::Value| {
        answer["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string()
    };
    let mut constrained = plain.clone();
    constrained["max_tokens"] = json!(200);
    constrained["response_format"] = json!({"type": "json_schema", "json_schema": {
        "name": "facts",
        "schema": {"type": "object", "additionalProperties": false, "required": ["facts"],
            "properties": {"facts": {"type": "array", "minItems": 4, "maxItems": 6,
                "items": {"type": "string", "maxLength": 60}}}},
    }});
    let mut calling = plain.clone();
    calling["max_tokens"] = json!(200);
    calling["tool_choice"] = json!("required");
    calling["tools"] = json!([{"type": "function", "function": {
        "name": "store_fact", "description": "Store one fact about batteries",
        "parameters": {"type": "object", "additionalProperties": false, "required": ["fact"],
            "properties": {"fact": {"type": "string", "maxLength": 80}}}}}]);
    for (round, body, kill_after_chunks) in [(1, &penalised, 20), (2, &constrained, 10)] {
        let names = [format!("a-{round}"), format!("b-{round}")];
        for name in &names {
            stack.add_agent(name, 1);
        }
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        stack.wait_for_nodes(&wanted).await;
        let expected = content(stack.chat(body).await);
        if round == 1 {
            assert_ne!(
                expected,
                content(stack.chat(&plain).await),
                "the penalties changed nothing"
            );
        } else {
            let facts: serde_json::Value = serde_json::from_str(&expected).expect("JSON");
            let facts = facts["facts"].as_array().expect("an array of facts");
            assert!((4..=6).contains(&facts.len()), "{facts:?}");
        }
        let (_, raw) = stream_with_kill(&mut stack, body, kill_after_chunks).await;
        let text = streamed_content(&raw);
        assert_eq!(
            text, expected,
            "round {round}: the resumed stream differs from an uninterrupted run"
        );
        for agent in stack.agents.iter_mut() {
            agent.kill();
        }
        stack.wait_for_nodes(&[]).await;
    }
    // A tool call's arguments, streamed while its vehicle is killed, continue exactly.
    for name in ["a-3", "b-3"] {
        stack.add_agent(name, 1);
    }
    stack.wait_for_nodes(&["a-3", "b-3"]).await;
    let whole = stack.chat(&calling).await;
    let expected: Vec<(String, String)> = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no calls: {whole}"))
        .iter()
        .map(|call| {
            let function = &call["function"];
            (
                function["name"].as_str().expect("name").to_string(),
                function["arguments"]
                    .as_str()
                    .expect("arguments")
                    .to_string(),
            )
        })
        .collect();
    assert!(!expected.is_empty());
    let (_, raw) = stream_with_kill(&mut stack, &calling, 10).await;
    assert_eq!(
        streamed_calls(&raw),
        expected,
        "the resumed calls differ from an uninterrupted run"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_has_its_generation_cancelled_within_a_second() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let body = json!({
        "model": MODEL, "stream": true, "max_tokens": 1000, "temperature": 0.7, "seed": 3,
        "messages": [{"role": "user", "content": "Write a very long story about a road trip."}],
    });
    let response = stack.post("/v1/chat/completions", &body).await;
    let mut bytes = response.bytes_stream();
    let mut seen = 0;
    while seen < 5 {
        let chunk = bytes.next().await.expect("chunk").expect("bytes");
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    assert_eq!(stack.metric("fleetgrid_generations_active").await, 1.0);
    drop(bytes);
    let dropped_at = Instant::now();
    loop {
        let cancelled = stack
            .metric("fleetgrid_generations_cancelled_on_node_total")
            .await;
        if cancelled >= 1.0 {
            break;
        }
        assert!(
            dropped_at.elapsed() < Duration::from_secs(1),
            "not cancelled on the node within a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stack.metric("fleetgrid_generations_active").await, 0.0);
    assert_eq!(
        stack.metric("fleetgrid_requests_cancelled_total").await,
        1.0
    );
}

/// Each text of a streamed answer of several choices, by choice index.
fn streamed_choices(raw: &str) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for data in raw.lines().filter_map(|line| line.strip_prefix("data: ")) {
        let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        let index = choice["index"].as_u64().expect("index") as usize;
        if texts.len() <= index {
            texts.resize(index + 1, String::new());
        }
        if let Some(text) = choice["delta"]["content"].as_str() {
            texts[index].push_str(text);
        }
    }
    texts
}

#[tokio::test(flavor = "multi_thread")]
async fn each_choice_of_an_answer_moves_on_its_own_when_its_vehicle_is_killed() {
    let mut stack = Stack::start(Default::default());
    let names = ["a", "b", "c"];
    for name in names {
        stack.add_agent(name, 1);
    }
    stack.wait_for_nodes(&names).await;
    let body = json!({
        "model": MODEL, "n": 2, "max_tokens": 120, "temperature": 0.8, "seed": 5,
        "messages": [{"role": "user", "content": "Write a long story about a trip across the mountains."}],
    });
    let whole = stack.chat(&body).await;
    let expected: Vec<String> = whole["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|choice| {
            choice["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        })
        .collect();
    assert_eq!(expected.len(), 2);
    assert_ne!(expected[0], expected[1], "each choice has its own seed");

    // Streamed again; one of the two vehicles running it is killed mid-answer.
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let before = stack.assignment_counts().await;
    let response = stack.post("/v1/chat/completions", &streaming).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    let mut killed = None;
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        if killed.is_none() && raw.matches("data: ").count() >= 12 {
            let now = stack.assignment_counts().await;
            let running: Vec<String> = now
                .iter()
                .filter(|(name, count)| **count > before.get(*name).copied().unwrap_or(0.0))
                .map(|(name, _)| name.clone())
                .collect();
            assert_eq!(running.len(), 2, "each choice on its own vehicle: {now:?}");
            let victim = running[0].clone();
            stack
                .agents
                .iter_mut()
                .find(|agent| agent.name == victim)
                .expect("agent process")
                .kill();
            killed = Some(victim);
        }
    }
    assert!(killed.is_some(), "the answer finished before the kill");
    // The killed vehicle's choice was assigned again, to another vehicle.
    let after = stack.assignment_counts().await;
    let assigned: f64 = after
        .iter()
        .map(|(name, count)| count - before.get(name).copied().unwrap_or(0.0))
        .sum();
    assert!(assigned >= 3.0, "{before:?} -> {after:?}");
    let streamed = common::parse_sse(&raw);
    assert!(streamed.errors.is_empty(), "{:?}", streamed.errors);
    assert!(streamed.done);
    assert_eq!(
        streamed_choices(&raw),
        expected,
        "a moved choice differs from an uninterrupted run"
    );
}
