//! End to end: a coordinator and two agents serving SmolLM2 through the real
//! gateway, plain and streamed.

mod common;

use common::{Stack, MODEL};
use serde_json::json;

fn messages() -> serde_json::Value {
    json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write two sentences about electric cars."}
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_and_streamed_completions_agree_and_usage_matches_the_tokenizer() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.add_agent("car-2", 2);
    stack.wait_for_nodes(&["car-1", "car-2"]).await;
    let tokenizer = engine::Tokenizer::load(&common::model_path()).expect("tokenizer");
    let chat: Vec<engine::ChatMessage> = messages()
        .as_array()
        .expect("messages")
        .iter()
        .map(|message| engine::ChatMessage {
            role: message["role"].as_str().expect("role").into(),
            content: message["content"].as_str().expect("content").into(),
        })
        .collect();
    let rendered = tokenizer
        .apply_chat_template(&chat, true)
        .expect("template");
    let prompt_tokens = tokenizer
        .tokenize(&rendered, false)
        .expect("tokenize")
        .len();

    let mut seeded_texts = Vec::new();
    for (temperature, seed) in [(0.0, 7), (0.8, 42), (0.8, 43)] {
        let body = json!({
            "model": MODEL, "messages": messages(), "max_tokens": 40,
            "temperature": temperature, "seed": seed, "logprobs": true, "top_logprobs": 2,
            "stream_options": null,
        });
        let plain = stack.chat(&body).await;
        let text = plain["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string();
        assert!(!text.trim().is_empty(), "empty answer: {plain}");
        assert_eq!(plain["object"], "chat.completion");
        assert_eq!(plain["model"], MODEL);

        let mut streamed_body = body.clone();
        streamed_body["stream_options"] = json!({"include_usage": true});
        let streamed = stack.chat_stream(&streamed_body).await;
        assert!(streamed.done, "stream did not end with [DONE]");
        assert!(
            streamed.errors.is_empty(),
            "stream errors: {:?}",
            streamed.errors
        );
        assert_eq!(
            streamed.content, text,
            "streamed text differs at temperature {temperature}"
        );
        assert_eq!(
            streamed.finish_reason.as_deref(),
            plain["choices"][0]["finish_reason"].as_str()
        );

        let usage = &plain["usage"];
        assert_eq!(
            usage["prompt_tokens"], prompt_tokens,
            "prompt tokens: {usage}"
        );
        let logprobs = plain["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("logprobs");
        assert_eq!(
            usage["completion_tokens"],
            logprobs.len(),
            "one logprob entry per completion token"
        );
        let pieces: String = logprobs
            .iter()
            .map(|entry| entry["token"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(pieces, text, "the tokens' text is the answer");
        assert_eq!(usage["total_tokens"], prompt_tokens + logprobs.len());
        let streamed_usage = streamed.usage.as_ref().expect("streamed usage");
        for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(
                streamed_usage[count], usage[count],
                "streamed usage equals plain usage: {streamed_usage} {usage}"
            );
        }
        // How much of the prompt a node still held depends on what it served before.
        for reported in [usage, streamed_usage] {
            let cached = reported["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached tokens");
            assert!(cached <= prompt_tokens as u64, "{reported}");
        }
        for entry in logprobs {
            let logprob = entry["logprob"].as_f64().expect("logprob");
            assert!(logprob <= 0.0, "logprob {logprob} > 0");
            assert_eq!(entry["top_logprobs"].as_array().map(Vec::len), Some(2));
        }
        if temperature > 0.0 {
            seeded_texts.push(text);
        }
    }
    assert_ne!(
        seeded_texts[0], seeded_texts[1],
        "different seeds gave the same sample"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_prompt_reports_the_head_the_node_kept_as_cached_tokens() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 1);
    stack.wait_for_nodes(&["car-1"]).await;
    let body = json!({
        "model": MODEL, "messages": messages(), "max_tokens": 12, "temperature": 0,
    });
    let first = stack.chat(&body).await;
    let second = stack.chat(&body).await;
    let prompt_tokens = first["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    assert_eq!(
        first["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "a fresh node holds nothing: {first}"
    );
    // The node keeps the first prompt's cells and prefills only the last two tokens again.
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 2,
        "{second}"
    );
    assert_eq!(second["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(
        first["choices"][0]["message"]["content"], second["choices"][0]["message"]["content"],
        "reused cells give the same answer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ignore_eos_runs_an_answer_that_would_end_to_max_tokens() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let body = json!({
        "model": MODEL, "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    });
    let natural = stack.chat(&body).await;
    assert_eq!(
        natural["choices"][0]["finish_reason"], "stop",
        "the short answer ends on its own: {natural}"
    );
    let natural_tokens = natural["usage"]["completion_tokens"]
        .as_u64()
        .expect("count");
    assert!(natural_tokens < 64, "{natural}");

    let mut ignoring = body.clone();
    ignoring["ignore_eos"] = json!(true);
    let forced = stack.chat(&ignoring).await;
    assert_eq!(forced["choices"][0]["finish_reason"], "length", "{forced}");
    assert_eq!(forced["usage"]["completion_tokens"], 64, "{forced}");
    let natural_text = natural["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    let forced_text = forced["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert!(
        forced_text.starts_with(natural_text) && forced_text.len() > natural_text.len(),
        "greedy picks the same tokens up to where the answer ended: {natural_text:?} / {forced_text:?}"
    );

    let mut wrong = body.clone();
    wrong["ignore_eos"] = json!("yes");
    let response = stack.post("/v1/chat/completions", &wrong).await;
    assert_eq!(response.status(), 400);
    let error: serde_json::Value = response.json().await.expect("error body");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn text_completions_and_models_listing() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;

    let models: serde_json::Value = stack
        .client()
        .get(stack.url("/v1/models"))
        .bearer_auth(&stack.api_key)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("models json");
    assert_eq!(models["data"][0]["id"], MODEL);

    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": ["\n"]});
    let response = stack.post("/v1/completions", &body).await;
    assert_eq!(response.status(), 200);
    let completion: serde_json::Value = response.json().await.expect("json");
    let text = completion["choices"][0]["text"].as_str().expect("text");
    assert!(!text.contains('\n'), "stop sequence leaked into {text:?}");
    assert!(text.contains("Paris"), "expected Paris in {text:?}");
    assert_eq!(completion["object"], "text_completion");

    // `fleet/NAME` pins the edge tier and answers the same.
    let mut pinned = body.clone();
    pinned["model"] = json!(format!("fleet/{MODEL}"));
    let response = stack.post("/v1/completions", &pinned).await;
    assert_eq!(response.headers()["x-fleetgrid-tier"], "fleet");
    let again: serde_json::Value = response.json().await.expect("json");
    assert_eq!(
        again["choices"][0]["text"],
        completion["choices"][0]["text"]
    );
}
