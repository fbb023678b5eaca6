//! End to end: prefix affinity with `fleetgrid serve` and two real-model
//! agents. A request sharing a long system prompt with an earlier one goes
//! to the vehicle that kept the earlier prompt's KV cells and reuses them,
//! as the client sees in `usage.prompt_tokens_details.cached_tokens`; with
//! `--prefix-affinity off` it goes where plain placement puts it.

mod common;

use std::time::{Duration, Instant};

use common::{Stack, StackOptions, MODEL, WAIT};
use serde_json::json;

/// A system prompt of a few hundred tokens, as an application would send
/// with every request.
fn system_prompt() -> String {
    (1..=30)
        .map(|rule| format!("Rule {rule}: answer briefly, politely and only about electric cars."))
        .collect::<Vec<_>>()
        .join(" ")
}

fn asking(question: &str, stream: bool) -> serde_json::Value {
    json!({
        "model": MODEL, "max_tokens": 8, "temperature": 0, "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { json!(null) },
        "messages": [
            {"role": "system", "content": system_prompt()},
            {"role": "user", "content": question},
        ],
    })
}

/// A generation long enough to keep a one-slot vehicle busy while another
/// request is placed.
fn long_unrelated() -> serde_json::Value {
    json!({
        "model": MODEL, "max_tokens": 200, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "user", "content": "Count slowly from one to a thousand."}],
    })
}

fn cached_tokens(usage: &serde_json::Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {usage}"))
}

/// Where each request went and what the last one reused.
struct Outcome {
    /// The vehicle plain placement prefers (the first request, on an idle
    /// fleet, went there).
    preferred: String,
    /// The vehicle that ran the first request with the system prompt.
    holder: String,
    /// The vehicle that ran the second request with the system prompt.
    second: String,
    /// Its prompt tokens and the cached part of them, as the client saw.
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Two one-slot vehicles. A long unrelated generation occupies the vehicle
/// placement prefers, so the first request with the system prompt runs on
/// the other one; once both are idle, a second request with the same system
/// prompt is placed and streamed.
async fn run(affinity: &str) -> Outcome {
    let mut stack = Stack::start(StackOptions {
        extra_serve_args: vec!["--prefix-affinity".into(), affinity.into()],
    });
    stack.add_agent("car-1", 1);
    stack.add_agent("car-2", 1);
    stack.wait_for_nodes(&["car-1", "car-2"]).await;

    let idle = stack.assignment_counts().await;
    let long = long_unrelated();
    let occupy = stack.chat(&long);
    let first = async {
        // Place the first system-prompt request only once the long one runs.
        let deadline = Instant::now() + WAIT;
        loop {
            let counts = stack.assignment_counts().await;
            if counts.values().sum::<f64>() > idle.values().sum::<f64>() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the long generation never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = stack.assignment_counts().await;
        let preferred = stack.assigned_since(&idle).await;
        let answer = stack
            .chat(&asking("Do they need oil changes?", false))
            .await;
        (preferred, stack.assigned_since(&before).await, answer)
    };
    let (occupied, (preferred, holder, answer)) = tokio::join!(occupy, first);
    assert_eq!(occupied["usage"]["completion_tokens"], 200);
    assert_eq!(
        cached_tokens(&answer["usage"]),
        0,
        "a vehicle that ran nothing yet holds nothing"
    );

    let before = stack.assignment_counts().await;
    let streamed = stack
        .chat_stream(&asking("How far can they go on one charge?", true))
        .await;
    assert!(streamed.done && streamed.errors.is_empty(), "{streamed:?}");
    let usage = streamed.usage.expect("the streamed usage chunk");
    Outcome {
        preferred,
        holder,
        second: stack.assigned_since(&before).await,
        prompt_tokens: usage["prompt_tokens"].as_u64().expect("prompt tokens"),
        cached_tokens: cached_tokens(&usage),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_sharing_a_system_prompt_goes_to_the_vehicle_holding_it_and_reuses_it() {
    let on = run("on").await;
    assert_ne!(
        on.holder, on.preferred,
        "the setup put the head on the other vehicle"
    );
    assert_eq!(
        on.second, on.holder,
        "the second request went to the vehicle holding the system prompt"
    );
    // Everything up to the user's message is the same: a few hundred tokens.
    assert!(
        on.cached_tokens >= 200 && on.cached_tokens < on.prompt_tokens,
        "cached {} of {} prompt tokens",
        on.cached_tokens,
        on.prompt_tokens
    );

    let off = run("off").await;
    assert_ne!(off.holder, off.preferred);
    assert_eq!(
        off.second, off.preferred,
        "without affinity the idle fleet's usual choice takes it"
    );
    assert!(
        off.cached_tokens < 64,
        "only the chat template's first tokens are shared: {}",
        off.cached_tokens
    );
}
