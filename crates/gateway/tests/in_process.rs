//! The gateway's API shapes, refusals and billing decisions, driven
//! in-process against a scripted cell: each test runs in milliseconds, with
//! no vehicle and no model run. What needs a real model (the text itself,
//! handovers, a node's behaviour) stays in the end-to-end tests.

mod support;

use cell_api::fake::Script;
use cell_api::{FinishReason, GenerationError, Rejection};
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::{Gateway, MODEL};

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

#[tokio::test]
async fn a_fleet_answer_has_the_openai_shape_and_the_gateways_own_counts() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::answer(&["Hel", "lo", "!"])]);

    let answer = gateway
        .post(
            "/v1/chat/completions",
            &chat("Say hello.", json!({"max_tokens": 8})),
        )
        .await;

    assert_eq!(answer.status, 200);
    let body = answer.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello!");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let submitted = gateway.cell.submitted();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0].model, MODEL);
    assert_eq!(submitted[0].max_tokens, 8);
    assert_eq!(
        body["usage"]["prompt_tokens"],
        submitted[0].prompt.len(),
        "usage counts the prompt the gateway tokenized"
    );
    assert!(submitted[0].prompt.len() > gateway.count_tokens("Say hello."));
}

#[tokio::test]
async fn a_streamed_answer_sends_its_text_then_the_finish_then_usage_then_done() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::Answer {
        node: "car-1".into(),
        pieces: vec!["A".into(), "B".into(), "C".into()],
        reason: FinishReason::Length,
    }]);

    let answer = gateway
        .post(
            "/v1/chat/completions",
            &chat(
                "Letters?",
                json!({"stream": true, "max_tokens": 3, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;

    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let events = answer.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).expect("chunk json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "ABC");
    assert!(chunks
        .iter()
        .all(|chunk| chunk["object"] == "chat.completion.chunk"));
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|chunk| &chunk["choices"][0]["finish_reason"])
        .filter(|reason| !reason.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);
    let usage = &chunks.last().expect("a usage chunk")["usage"];
    assert_eq!(usage["completion_tokens"], 3);
}

#[tokio::test]
async fn the_cells_refusals_become_429_and_503_with_retry_after() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([
        Script::Refuse(Rejection::NoEligibleNode {
            retry_after_seconds: 7,
        }),
        Script::Refuse(Rejection::QueueFull {
            retry_after_seconds: 3,
        }),
    ]);

    let no_node = gateway
        .post("/v1/chat/completions", &chat("hi", json!({})))
        .await;
    assert_eq!(no_node.status, 503);
    assert_eq!(no_node.header("retry-after"), Some("7"));
    assert!(no_node.json()["error"]["message"].is_string());

    let full = gateway
        .post("/v1/chat/completions", &chat("hi", json!({})))
        .await;
    assert_eq!(full.status, 429);
    assert_eq!(full.header("retry-after"), Some("3"));
    assert!(full.json()["error"]["message"].is_string());
}

#[tokio::test]
async fn a_generation_that_fails_midway_ends_the_stream_with_an_error_event_not_a_finish() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::FailAfter {
        pieces: vec!["Par".into(), "tial".into()],
        error: GenerationError::Failed("the node's engine failed".into()),
    }]);

    let answer = gateway
        .post("/v1/chat/completions", &chat("hi", json!({"stream": true})))
        .await;

    assert_eq!(answer.status, 200, "the stream had started");
    let events = answer.events();
    assert!(events.iter().any(|data| data.contains("Par")));
    // The error is the stream's last event before `[DONE]`, and no chunk
    // pretends the answer finished.
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&events[events.len() - 2]).expect("json");
    assert_eq!(error["error"]["code"], "generation_failed", "{error}");
    assert!(events[..events.len() - 1].iter().all(|data| {
        let chunk: Value = serde_json::from_str(data).expect("json");
        chunk["choices"][0]["finish_reason"].is_null()
    }));
}

#[tokio::test]
async fn bad_requests_are_refused_before_the_cell_sees_anything() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        ("{\"model\": ".to_string(), 400, None, "invalid_json"),
        (json!({"model": MODEL}).to_string(), 400, Some("messages"), "missing_required_parameter"),
        (json!({"model": "gpt-9", "messages": user}).to_string(), 404, Some("model"), "model_not_found"),
        (json!({"model": MODEL, "messages": user, "max_tokens": 0}).to_string(), 400, Some("max_tokens"), "invalid_value"),
        (json!({"model": MODEL, "messages": user, "temperature": 2.5}).to_string(), 400, Some("temperature"), "invalid_value"),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "electric ".repeat(3000)}]}).to_string(), 400, Some("messages"), "context_length_exceeded"),
    ];
    for (body, status, param, code) in cases {
        let answer = gateway.post("/v1/chat/completions", &body).await;
        assert_eq!(answer.status, status, "{body:.80}");
        let error = &answer.json()["error"];
        assert_eq!(error["code"], code, "{body:.80}");
        assert_eq!(error["param"].as_str(), param, "{body:.80}");
        assert_eq!(error["type"], "invalid_request_error");
    }
    assert!(gateway.cell.submitted().is_empty());
}

#[tokio::test]
async fn a_tenant_that_cannot_pay_is_refused_with_402_before_any_work() {
    let gateway = Gateway::start(TenantClass::Spot).await;
    gateway.cell.script([Script::answer(&["never", "sent"])]);

    let answer = gateway
        .post("/v1/chat/completions", &chat("hi", json!({})))
        .await;

    assert_eq!(answer.status, 402);
    assert_eq!(answer.json()["error"]["code"], "insufficient_quota");
    assert!(gateway.cell.submitted().is_empty());
}

#[tokio::test]
async fn a_paid_answer_is_settled_before_it_ends_at_the_price_of_its_tokens() {
    let gateway = Gateway::start(TenantClass::Spot).await;
    gateway.allow_credit("1").await;
    gateway.cell.script([Script::answer(&["one", " two"])]);

    let answer = gateway
        .post(
            "/v1/chat/completions",
            &chat("Count.", json!({"max_tokens": 4})),
        )
        .await;

    assert_eq!(answer.status, 200);
    let charged = -gateway.balance().await;
    assert!(
        charged > 0,
        "the answer was charged before its body was sent"
    );
    let usage = gateway.get("/v1/usage").await.json();
    assert_eq!(usage["completion_tokens"], 2, "{usage}");
    assert_eq!(
        usage["prompt_tokens"],
        answer.json()["usage"]["prompt_tokens"]
    );
    assert_eq!(
        usage["charged_micro_usd"], charged,
        "the balance moved by the charge"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_generation_on_the_cell() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::Hang]);
    let body = chat("hi", json!({"stream": true}));
    let request = gateway.post("/v1/chat/completions", &body);
    // The client gives up while the generation runs: dropping the request
    // future drops the response, as a closed connection does.
    let gave_up = tokio::time::timeout(std::time::Duration::from_millis(200), request).await;
    assert!(
        gave_up.is_err(),
        "a hanging generation does not end by itself"
    );

    let submitted = gateway.cell.submitted();
    assert_eq!(submitted.len(), 1);
    assert_eq!(gateway.cell.cancelled().len(), 1);
}
