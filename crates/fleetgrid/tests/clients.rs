//! The compatibility suite: the official `openai` SDK, `langchain-openai` and
//! `litellm`, as users run them, against a real gateway and a vehicle running
//! the real model (`clients/compat.py`). Needs the virtual environment
//! `cargo xtask test` prepares (`FLEETGRID_TEST_PYTHON` names its interpreter).

mod cloud_common;
mod common;

use cloud_common::LocalCloud;
use common::{model_path, run_python, Stack, MODEL};
use serde_json::{json, Value};

const SCRIPT: &str = concat!(
    include_str!("clients/shared.py"),
    include_str!("clients/compat.py")
);
const AUTO_SCRIPT: &str = concat!(
    include_str!("clients/shared.py"),
    include_str!("clients/compat_auto.py")
);

fn text<'a>(results: &'a Value, key: &str) -> &'a str {
    results[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not text: {results}"))
}

/// A call of one of the suite's two tools whose arguments follow its parameters.
fn assert_valid_call(call: &Value, results: &Value) {
    let arguments = &call["arguments"];
    let short = |key: &str| {
        arguments[key]
            .as_str()
            .is_some_and(|text| text.chars().count() <= 20)
    };
    match call["name"].as_str() {
        Some("get_weather") => {
            assert!(short("city"), "{results}");
            assert!(
                ["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap_or("")),
                "{results}"
            );
            assert_eq!(
                arguments.as_object().map(|object| object.len()),
                Some(2),
                "{results}"
            );
        }
        Some("get_time") => {
            assert!(short("timezone"), "{results}");
            assert_eq!(
                arguments.as_object().map(|object| object.len()),
                Some(1),
                "{results}"
            );
        }
        _ => panic!("a call of no tool offered: {call} in {results}"),
    }
}

fn most_repeated_word(text: &str) -> usize {
    let mut counts = std::collections::BTreeMap::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word).or_insert(0) += 1;
    }
    counts.into_values().max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_langchain_and_litellm_get_what_they_ask_for() {
    let tokenizer = engine::Tokenizer::load(&model_path()).expect("tokenizer");
    let forced = tokenizer.tokenize(" banana", false).expect("tokenize")[0];
    let forced_text = String::from_utf8_lossy(&tokenizer.piece(forced)).into_owned();
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let args = vec![
        stack.url("/v1"),
        stack.api_key.clone(),
        MODEL.to_string(),
        forced.to_string(),
        forced_text.clone(),
    ];
    let results = run_python(SCRIPT, args).await;

    // Penalties reach the sampler: the counting answer repeats itself less, and
    // streaming gives the same text as a plain answer.
    let plain = text(&results, "sdk_plain");
    let penalised = text(&results, "sdk_penalised");
    assert_ne!(plain, penalised, "{results}");
    assert!(
        most_repeated_word(penalised) < most_repeated_word(plain),
        "{results}"
    );
    assert_eq!(text(&results, "sdk_penalised_streamed"), penalised);
    // Extensions in `extra_body` change the answer, reproducibly, streamed or not.
    let extended = text(&results, "sdk_extensions");
    assert_eq!(text(&results, "sdk_extensions_again"), extended);
    assert_eq!(text(&results, "sdk_extensions_streamed"), extended);
    assert_ne!(text(&results, "sdk_without_extensions"), extended);
    // A bias of 100 forces the token every time.
    assert_eq!(text(&results, "sdk_forced"), forced_text.repeat(5));
    assert!(!text(&results, "sdk_completion_penalised").is_empty());
    // What is not implemented is refused by name, as a BadRequestError.
    for (key, param) in [
        ("refused_unknown", "guided_json"),
        ("refused_tool_schema", "tools"),
        ("refused_tool_choice", "tool_choice"),
        ("refused_store_n", "store"),
    ] {
        assert_eq!(results[key]["status"], 400, "{key}: {results}");
        assert_eq!(results[key]["param"], param, "{key}: {results}");
    }
    // A stored completion is read back, listed once (the SDK pages one at a
    // time), its messages given, its metadata replaced, and deleted.
    let stored = &results["stored"];
    assert!(
        stored["content"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "{stored}"
    );
    assert_eq!(stored["retrieved_content"], stored["content"], "{stored}");
    assert_eq!(
        stored["retrieved_metadata"],
        json!({"suite": "compat"}),
        "{stored}"
    );
    assert_eq!(stored["listed"], 1, "{stored}");
    assert_eq!(
        stored["messages"],
        json!(["Write a short story about a parked car."]),
        "{stored}"
    );
    assert_eq!(
        stored["updated_metadata"],
        json!({"suite": "updated"}),
        "{stored}"
    );
    assert_eq!(
        (&stored["deleted"], &stored["after_delete"]),
        (&json!(true), &json!(404)),
        "{stored}"
    );
    assert!(results["accepted_user_metadata"].is_string(), "{results}");
    // Structured output: the SDK's `parse`, LangChain's `with_structured_output`
    // and litellm each get an answer that parses into the Pydantic model (the
    // script raises otherwise), at any temperature.
    let parsed = results["sdk_parsed"].as_array().expect("parsed answers");
    assert_eq!(parsed.len(), 3, "{results}");
    for person in parsed.iter().chain([
        &results["langchain_structured"],
        &results["litellm_structured"],
    ]) {
        assert!(
            ["red", "green", "blue"].contains(&person["colour"].as_str().unwrap_or("")),
            "{results}"
        );
        assert!(
            person["age"].as_u64().is_some_and(|age| age <= 120),
            "{results}"
        );
    }
    assert!(results["sdk_json_object"].is_object(), "{results}");
    // Tool calls: `required` calls a tool whose arguments follow its parameters,
    // streamed or not, the stream sending the arguments in pieces.
    let required = &results["tools_required"];
    assert_eq!(required["finish_reason"], "tool_calls", "{results}");
    assert!(required["content"].is_null(), "{results}");
    let calls = required["calls"].as_array().expect("calls");
    assert!(!calls.is_empty(), "{results}");
    for call in calls {
        assert_valid_call(call, &results);
    }
    let streamed = &results["tools_required_streamed"];
    assert_eq!(streamed["finish_reason"], "tool_calls", "{results}");
    let streamed_calls = streamed["calls"].as_array().expect("streamed calls");
    assert_eq!(streamed_calls.len(), calls.len(), "{results}");
    for (streamed, whole) in streamed_calls.iter().zip(calls) {
        assert_eq!(streamed["name"], whole["name"], "{results}");
        assert_eq!(streamed["arguments"], whole["arguments"], "{results}");
        assert!(streamed["pieces"].as_u64() > Some(1), "{results}");
        assert!(streamed["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")));
    }
    // A named function is the one called; without parallel calls there is one.
    for call in results["tools_named"]["calls"].as_array().expect("named") {
        assert_eq!(call["name"], "get_time", "{results}");
        assert_valid_call(call, &results);
    }
    assert_eq!(
        results["tools_single"]["calls"].as_array().map(Vec::len),
        Some(1),
        "{results}"
    );
    // `auto` either calls valid tools or answers; `none` answers.
    let auto = &results["tools_auto"];
    match auto["calls"].as_array().map(Vec::len) {
        Some(0) => assert!(auto["content"].is_string(), "{results}"),
        _ => auto["calls"]
            .as_array()
            .into_iter()
            .flatten()
            .for_each(|call| assert_valid_call(call, &results)),
    }
    assert!(
        results["tools_none"]["calls"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{results}"
    );
    assert!(results["tools_none"]["content"].is_string(), "{results}");
    // LangChain's round trip: a call, its result sent back, an answer in words.
    let langchain = &results["langchain_tools"];
    assert_eq!(langchain["calls"][0]["name"], "get_weather", "{results}");
    assert!(
        langchain["calls"][0]["args"]["city"].is_string(),
        "{results}"
    );
    assert!(!text(langchain, "answer").is_empty(), "{results}");
    assert_eq!(langchain["answer_calls"], 0, "{results}");
    assert_eq!(
        results["litellm_tools"][0]["name"], "get_weather",
        "{results}"
    );
    // n > 1: three choices, each its own generation (not all the same at this
    // temperature), reproducible with the seed, streamed as a whole answer.
    let choices = results["n_choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{results}");
    assert_eq!(
        results["n_indices"],
        serde_json::json!([0, 1, 2]),
        "{results}"
    );
    assert!(choices
        .iter()
        .all(|choice| choice.as_str().is_some_and(|text| !text.is_empty())));
    assert!(
        choices.iter().any(|choice| choice != &choices[0]),
        "{results}"
    );
    assert_eq!(&results["n_again"], &results["n_choices"], "{results}");
    assert_eq!(&results["n_streamed"], &results["n_choices"], "{results}");
    assert_eq!(&results["langchain_n"], &results["n_choices"], "{results}");
    // Every choice prefilled its prompt and is billed: usage counts them all.
    let usage = &results["n_usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        results["n_completions"].as_array().map(Vec::len),
        Some(2),
        "{results}"
    );
    // best_of 3 gives one choice and bills three generations' tokens.
    assert_eq!(
        results["best_of"]["texts"].as_array().map(Vec::len),
        Some(1),
        "{results}"
    );
    assert!(
        results["best_of"]["completion_tokens"].as_u64() > Some(12),
        "{results}"
    );
    assert_echoed_scores(&results["echo_logprobs"]);
    // LangChain and litellm pass the penalties through: the same greedy text
    // as the SDK, plain and streamed.
    for key in [
        "langchain_invoke",
        "langchain_stream",
        "litellm",
        "litellm_stream",
    ] {
        assert_eq!(text(&results, key), penalised, "{key}: {results}");
    }
}

/// An evaluation harness's loglikelihood request (`echo` with `logprobs`, one token
/// generated): the prompt's tokens come first, the first unscored, each spelling the prompt
/// where its offset says, and the model prefers the right continuation to a silly one.
fn assert_echoed_scores(scored: &Value) {
    let prompt = scored["prompt"].as_str().expect("the prompt");
    let prompt_tokens = scored["prompt_tokens"].as_u64().expect("usage") as usize;
    let tokens: Vec<&str> = scored["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let completion_tokens = scored["completion_tokens"].as_u64().expect("usage") as usize;
    assert_eq!(tokens.len(), prompt_tokens + completion_tokens, "{scored}");
    assert_eq!(tokens[..prompt_tokens].concat(), prompt, "{scored}");
    assert_eq!(scored["text"].as_str(), Some(tokens.concat().as_str()));
    let logprobs = scored["token_logprobs"].as_array().expect("token_logprobs");
    assert!(
        logprobs[0].is_null() && scored["top_logprobs"][0].is_null(),
        "{scored}"
    );
    for (index, logprob) in logprobs.iter().enumerate().skip(1) {
        let logprob = logprob.as_f64().expect("a scored token");
        assert!(logprob <= 0.0, "{index}: {scored}");
        // With one alternative asked, the most likely token is listed, at least as likely.
        let top = scored["top_logprobs"][index]
            .as_object()
            .expect("alternatives");
        assert_eq!(top.len(), 1, "{index}: {scored}");
        assert!(top
            .values()
            .all(|best| best.as_f64() >= Some(logprob - 1e-4)));
    }
    let offsets = scored["text_offset"].as_array().expect("text_offset");
    let mut at = 0;
    for (token, offset) in tokens.iter().zip(offsets) {
        assert_eq!(offset.as_u64(), Some(at), "{scored}");
        at += token.chars().count() as u64;
    }
    let (paris, banana) = (scored["paris"].as_f64(), scored["banana"].as_f64());
    assert!(paris > banana && paris < Some(0.0), "{paris:?} {banana:?}");
}

/// The same clients on `auto`, with the local cloud as the upstream: whichever
/// tier answers, structured output parses, tool calls follow their tools, the
/// penalties go through, and what `auto` cannot do is refused by name.
#[tokio::test(flavor = "multi_thread")]
async fn the_clients_get_what_they_ask_for_on_auto() {
    let cloud = LocalCloud::shared();
    let stack = cloud_common::gateway(cloud.serve_args()).await;
    let results = run_python(AUTO_SCRIPT, vec![stack.url("/v1"), stack.api_key.clone()]).await;
    let penalised = &results["penalised"];
    assert!(!text(penalised, "content").is_empty(), "{results}");
    assert!(["fleet", "cloud", "fleet_then_cloud"].contains(&text(penalised, "tier")));
    assert!(
        !text(&results, "penalised_streamed").is_empty(),
        "{results}"
    );
    for key in ["sdk_parsed", "langchain_structured", "litellm_structured"] {
        let person = &results[key];
        assert!(
            ["red", "green", "blue"].contains(&person["colour"].as_str().unwrap_or("")),
            "{key}: {results}"
        );
        assert!(
            person["age"].as_u64().is_some_and(|age| age <= 120),
            "{key}: {results}"
        );
    }
    let calls = results["sdk_tools"].as_array().expect("calls");
    assert!(!calls.is_empty(), "{results}");
    for call in calls {
        assert_eq!(call["name"], "get_weather", "{results}");
        assert!(call["arguments"]["city"].is_string(), "{results}");
    }
    let langchain = &results["langchain_tools"];
    assert_eq!(langchain["calls"][0]["name"], "get_weather", "{results}");
    assert!(!text(langchain, "answer").is_empty(), "{results}");
    for (key, param) in [
        ("refused_logit_bias", "logit_bias"),
        ("refused_n", "n"),
        ("refused_echo", "echo"),
        ("refused_token_prompt", "prompt"),
    ] {
        assert_eq!(results[key]["status"], 400, "{key}: {results}");
        assert_eq!(results[key]["param"], param, "{key}: {results}");
    }
}
