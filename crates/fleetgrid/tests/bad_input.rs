//! Every kind of bad request gets an OpenAI-shaped 4xx, and the server keeps
//! serving; overload and missing capacity get 429/503 with `Retry-After`.

mod common;

use common::{Stack, StackOptions, MODEL};
use serde_json::json;

struct Case {
    name: &'static str,
    body: String,
    status: u16,
    param: Option<&'static str>,
    code: &'static str,
}

fn case(
    name: &'static str,
    body: serde_json::Value,
    param: Option<&'static str>,
    code: &'static str,
) -> Case {
    Case {
        name,
        body: body.to_string(),
        status: 400,
        param,
        code,
    }
}

fn cases() -> Vec<Case> {
    let user = json!([{"role": "user", "content": "hi"}]);
    let long_prompt = "electric ".repeat(3000);
    vec![
        Case { name: "malformed json", body: "{\"model\": ".into(), status: 400, param: None, code: "invalid_json" },
        Case { name: "empty body", body: String::new(), status: 400, param: None, code: "invalid_json" },
        case("missing messages", json!({"model": MODEL}), Some("messages"), "missing_required_parameter"),
        case("empty messages", json!({"model": MODEL, "messages": []}), Some("messages"), "invalid_value"),
        case("unknown role", json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}), Some("messages[0].role"), "invalid_value"),
        Case { name: "unknown model", body: json!({"model": "gpt-9", "messages": user}).to_string(), status: 404, param: Some("model"), code: "model_not_found" },
        case("max_tokens zero", json!({"model": MODEL, "messages": user, "max_tokens": 0}), Some("max_tokens"), "invalid_value"),
        case("max_tokens negative", json!({"model": MODEL, "messages": user, "max_tokens": -3}), Some("max_tokens"), "invalid_value"),
        case("max_tokens over limit", json!({"model": MODEL, "messages": user, "max_tokens": 1_000_000}), Some("max_tokens"), "invalid_value"),
        case("temperature too high", json!({"model": MODEL, "messages": user, "temperature": 2.5}), Some("temperature"), "invalid_value"),
        case("temperature negative", json!({"model": MODEL, "messages": user, "temperature": -0.1}), Some("temperature"), "invalid_value"),
        case("top_p too high", json!({"model": MODEL, "messages": user, "top_p": 1.5}), Some("top_p"), "invalid_value"),
        case("top_p zero", json!({"model": MODEL, "messages": user, "top_p": 0}), Some("top_p"), "invalid_value"),
        case("wrong type", json!({"model": MODEL, "messages": user, "max_tokens": "ten"}), None, "invalid_json"),
        case("prompt longer than the context", json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}), Some("messages"), "context_length_exceeded"),
        Case {
            name: "body over the size limit",
            body: json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(2 * 1024 * 1024)}]}).to_string(),
            status: 400,
            param: None,
            code: "request_too_large",
        },
    ]
}

async fn assert_serves(stack: &Stack) {
    let answer = stack
        .chat(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}))
        .await;
    assert!(answer["choices"][0]["message"]["content"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_shaped_errors_and_the_server_keeps_serving() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 2);
    stack.wait_for_nodes(&["car-1"]).await;
    let client = stack.client();
    for case in cases() {
        let response = client
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(&stack.api_key)
            .header("content-type", "application/json")
            .body(case.body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
        let error: serde_json::Value = response.json().await.expect("error json");
        let fields = &error["error"];
        assert!(
            fields["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "{}: {error}",
            case.name
        );
        assert_eq!(
            fields["type"], "invalid_request_error",
            "{}: {error}",
            case.name
        );
        assert_eq!(fields["code"], case.code, "{}: {error}", case.name);
        assert_eq!(
            fields["param"].as_str(),
            case.param,
            "{}: {error}",
            case.name
        );
    }
    assert_serves(&stack).await;

    let completion = client
        .post(stack.url("/v1/completions"))
        .bearer_auth(&stack.api_key)
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .expect("send");
    assert_eq!(completion.status(), 400);
    let error: serde_json::Value = completion.json().await.expect("json");
    assert_eq!(error["error"]["param"], "prompt");

    for key in [None, Some("fg-not-a-real-key")] {
        let mut request = client
            .post(stack.url("/v1/chat/completions"))
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status(), 401, "key {key:?}");
        let error: serde_json::Value = response.json().await.expect("json");
        assert_eq!(error["error"]["code"], "invalid_api_key");
    }
    assert_serves(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_eligible_node_is_503_and_a_full_queue_is_429_both_with_retry_after() {
    let mut stack = Stack::start(StackOptions {
        extra_serve_args: vec!["--queue-max-per-class".into(), "1".into()],
    });
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300, "temperature": 0});

    let response = stack.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 503);
    assert!(
        response.headers().get("retry-after").is_some(),
        "503 without Retry-After"
    );
    let error: serde_json::Value = response.json().await.expect("json");
    assert_eq!(error["error"]["type"], "server_error");

    stack.add_agent("car-1", 1);
    stack.wait_for_nodes(&["car-1"]).await;
    // One runs, one waits in the queue of one, the rest are refused.
    let requests: Vec<_> = (0..4)
        .map(|_| stack.post("/v1/chat/completions", &body))
        .collect();
    let responses = futures::future::join_all(requests).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|response| response.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|status| **status == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|status| **status == 429).count(),
        2,
        "{statuses:?}"
    );
    for response in responses.iter().filter(|response| response.status() == 429) {
        assert!(
            response.headers().get("retry-after").is_some(),
            "429 without Retry-After"
        );
    }
    assert_serves(&stack).await;
}
