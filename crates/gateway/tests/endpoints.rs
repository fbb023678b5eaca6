//! The gateway's smaller endpoints and HTTP features, driven in-process
//! against a scripted cell: retrieving a model, unknown models as 404,
//! CORS for browsers, and vLLM's `/tokenize` and `/detokenize`.

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use cell_api::fake::Script;
use gateway::api;
use gateway::cloud::{CloudConfig, CloudTier};
use gateway::http_serve::Cors;
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::{send, Answer, Gateway, MODEL};

/// The cloud model of the shipped price sheet, as the upstream names it.
const CLOUD_MODEL: &str = "gpt-4o-mini";
const CLOUD_NAME: &str = "cloud/gpt-4o-mini";

/// The gateway's app with a cloud tier configured, so that `auto` and
/// `cloud/...` exist. Nothing listens at the upstream's address: these
/// tests never call it.
async fn with_cloud(gateway: &Gateway) -> Router {
    let config = CloudConfig::new("http://127.0.0.1:9/v1", CLOUD_MODEL);
    let cloud = CloudTier::load(config, gateway.store.clone(), &gateway.billing)
        .await
        .expect("cloud tier");
    api::router(gateway.state.clone().with_cloud(Some(Arc::new(cloud))))
}

/// The gateway's app answering browsers from `origins`, as `--cors-allow-origin` does.
fn with_cors(gateway: &Gateway, origins: &[&str]) -> Router {
    let origins: Vec<String> = origins.iter().map(|origin| origin.to_string()).collect();
    Cors::allow_origins(&origins)
        .expect("allowed origins")
        .apply(gateway.router().clone())
}

/// One request through `router` with exactly `headers`, and `body` as JSON.
async fn call(
    router: &Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = body.map_or_else(Body::empty, |body| Body::from(body.to_string()));
    send(router, request.body(body).expect("request")).await
}

/// A request as a tenant sends it: its key, and a JSON body if any.
async fn as_tenant(
    gateway: &Gateway,
    router: &Router,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Answer {
    let bearer = format!("Bearer {}", gateway.key);
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    call(router, method, path, &headers, body).await
}

fn assert_error(answer: &Answer, status: u16, param: Option<&str>, code: &str) {
    let body = answer.json();
    assert_eq!(answer.status, status, "{body}");
    assert_eq!(body["error"]["param"].as_str(), param, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[tokio::test]
async fn each_listed_model_is_retrieved_as_its_list_entry_and_an_unknown_one_is_a_404() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let router = with_cloud(&gateway).await;

    let list = as_tenant(&gateway, &router, "GET", "/v1/models", None).await;
    assert_eq!(list.status, 200);
    let entries = list.json()["data"].as_array().cloned().expect("a list");
    let ids: Vec<&str> = entries
        .iter()
        .filter_map(|entry| entry["id"].as_str())
        .collect();
    assert_eq!(ids, [MODEL, "auto", CLOUD_NAME]);
    for entry in &entries {
        let id = entry["id"].as_str().expect("an id");
        let retrieved =
            as_tenant(&gateway, &router, "GET", &format!("/v1/models/{id}"), None).await;
        assert_eq!(retrieved.status, 200, "{id}");
        let model = retrieved.json();
        assert_eq!(&model, entry, "{id}");
        assert_eq!(model["object"], "model");
        assert_eq!(model["owned_by"], "fleetgrid");
        assert!(model["created"].is_i64(), "{model}");
    }

    let unknown = as_tenant(&gateway, &router, "GET", "/v1/models/cloud/gpt-9", None).await;
    assert_error(&unknown, 404, Some("model"), "model_not_found");
    let message = unknown.json()["error"]["message"].to_string();
    assert!(
        message.contains("'cloud/gpt-9' does not exist"),
        "{message}"
    );
    let anonymous = call(&router, "GET", &format!("/v1/models/{MODEL}"), &[], None).await;
    assert_eq!(anonymous.status, 401);
}

#[tokio::test]
async fn an_unknown_model_in_a_completion_is_a_404_model_not_found_as_openai_answers() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    for (model, router) in [
        ("gpt-9", gateway.router().clone()),
        ("fleet/gpt-9", gateway.router().clone()),
        ("auto", gateway.router().clone()),
        ("cloud/gpt-9", with_cloud(&gateway).await),
    ] {
        let chat = json!({"model": model, "messages": messages});
        let answer = as_tenant(
            &gateway,
            &router,
            "POST",
            "/v1/chat/completions",
            Some(&chat),
        )
        .await;
        assert_error(&answer, 404, Some("model"), "model_not_found");
        let text = json!({"model": model, "prompt": "hi"});
        let answer = as_tenant(&gateway, &router, "POST", "/v1/completions", Some(&text)).await;
        assert_error(&answer, 404, Some("model"), "model_not_found");
    }
    assert!(gateway.cell.submitted().is_empty());
}

/// A browser's preflight for a chat completion from the OpenAI JS SDK.
async fn preflight(router: &Router, origin: &str) -> Answer {
    let headers = [
        ("origin", origin),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization,content-type,x-stainless-os,x-stainless-retry-count",
        ),
    ];
    call(router, "OPTIONS", "/v1/chat/completions", &headers, None).await
}

fn has_cors_headers(answer: &Answer) -> bool {
    answer
        .headers
        .keys()
        .any(|name| name.as_str().starts_with("access-control-"))
}

#[tokio::test]
async fn an_allowed_origin_gets_cors_headers_without_a_key_and_on_every_answer() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::answer(&["Hi"])]);
    let router = with_cors(&gateway, &["https://app.example", "http://localhost:5173"]);

    let allowed = preflight(&router, "https://app.example").await;
    assert!(allowed.status.is_success(), "{}", allowed.status);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let methods = allowed
        .header("access-control-allow-methods")
        .unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let headers = allowed
        .header("access-control-allow-headers")
        .unwrap_or_default();
    for asked in [
        "authorization",
        "content-type",
        "x-stainless-os",
        "x-stainless-retry-count",
    ] {
        assert!(headers.contains(asked), "{asked} in {headers}");
    }
    assert_eq!(allowed.header("access-control-allow-credentials"), None);

    // The request itself: its answer names the origin and exposes the
    // gateway's headers, and so does an error.
    let bearer = format!("Bearer {}", gateway.key);
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let headers = [
        ("origin", "http://localhost:5173"),
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let answer = call(
        &router,
        "POST",
        "/v1/chat/completions",
        &headers,
        Some(&body),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("http://localhost:5173")
    );
    let exposed = answer
        .header("access-control-expose-headers")
        .unwrap_or_default();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );
    assert!(answer.header("x-request-id").is_some());
    let refused = call(
        &router,
        "GET",
        "/v1/models",
        &[("origin", "https://app.example")],
        None,
    )
    .await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some("https://app.example")
    );
}

#[tokio::test]
async fn an_origin_not_allowed_is_not_granted_and_without_origins_there_are_no_cors_headers() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let router = with_cors(&gateway, &["https://app.example"]);
    let stranger = preflight(&router, "https://evil.example").await;
    assert_eq!(stranger.header("access-control-allow-origin"), None);
    let stranger = call(
        &router,
        "GET",
        "/health",
        &[("origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(stranger.status, 200);
    assert_eq!(stranger.header("access-control-allow-origin"), None);

    // `*` allows any origin.
    let any = preflight(&with_cors(&gateway, &["*"]), "https://evil.example").await;
    assert_eq!(any.header("access-control-allow-origin"), Some("*"));

    // No origin allowed (no flag): no CORS header at all, as without CORS.
    let off = with_cors(&gateway, &[]);
    let preflighted = preflight(&off, "https://app.example").await;
    assert!(!has_cors_headers(&preflighted), "{:?}", preflighted.headers);
    let health = call(
        &off,
        "GET",
        "/health",
        &[("origin", "https://app.example")],
        None,
    )
    .await;
    assert_eq!(health.status, 200);
    assert!(!has_cors_headers(&health), "{:?}", health.headers);
}

#[tokio::test]
async fn a_tokenized_prompt_detokenizes_to_the_same_text() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let router = gateway.router().clone();
    let text = "Parked electric cars answer questions: ¿qué tal? 電気自動車 🚗";

    let tokenized = as_tenant(
        &gateway,
        &router,
        "POST",
        "/tokenize",
        Some(&json!({"model": MODEL, "prompt": text})),
    )
    .await;
    assert_eq!(tokenized.status, 200);
    let body = tokenized.json();
    let tokens = body["tokens"].as_array().expect("tokens");
    assert_eq!(body["count"], tokens.len());
    assert!(tokens.len() >= gateway.count_tokens(text));
    assert_eq!(body["max_model_len"], 2048);

    let detokenized = as_tenant(
        &gateway,
        &router,
        "POST",
        "/detokenize",
        Some(&json!({"model": MODEL, "tokens": tokens})),
    )
    .await;
    assert_eq!(detokenized.status, 200);
    assert_eq!(detokenized.json(), json!({"prompt": text}));
}

#[tokio::test]
async fn a_tokenized_chat_counts_what_a_chat_completion_reports_as_its_prompt() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    gateway.cell.script([Script::answer(&["Four."])]);
    let router = gateway.router().clone();
    let messages = json!([
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "Two plus two?"}]},
    ]);

    let completion = as_tenant(
        &gateway,
        &router,
        "POST",
        "/v1/chat/completions",
        Some(&json!({"model": MODEL, "messages": messages})),
    )
    .await;
    assert_eq!(completion.status, 200);
    let prompt_tokens = completion.json()["usage"]["prompt_tokens"].clone();
    assert!(prompt_tokens.as_u64().is_some_and(|count| count > 0));

    let tokenized = as_tenant(
        &gateway,
        &router,
        "POST",
        "/tokenize",
        Some(&json!({"model": MODEL, "messages": messages})),
    )
    .await;
    assert_eq!(tokenized.status, 200);
    assert_eq!(tokenized.json()["count"], prompt_tokens);
    assert_eq!(
        tokenized.json()["tokens"],
        json!(gateway.cell.submitted()[0].prompt),
        "the very tokens the cell was given"
    );

    // Without the assistant's turn opened, the chat is shorter.
    let closed = as_tenant(
        &gateway,
        &router,
        "POST",
        "/tokenize",
        Some(&json!({"model": MODEL, "messages": messages, "add_generation_prompt": false})),
    )
    .await;
    let closed_count = closed.json()["count"].as_u64().expect("a count");
    assert!(closed_count < prompt_tokens.as_u64().unwrap_or(0));
}

#[tokio::test]
async fn auto_tokenizes_with_the_edge_model_and_a_cloud_model_is_refused() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let router = with_cloud(&gateway).await;
    let tokenize = |model: &str| json!({"model": model, "prompt": "Which tier answers?"});

    let fleet = as_tenant(
        &gateway,
        &router,
        "POST",
        "/tokenize",
        Some(&tokenize(MODEL)),
    )
    .await;
    let auto = as_tenant(
        &gateway,
        &router,
        "POST",
        "/tokenize",
        Some(&tokenize("auto")),
    )
    .await;
    assert_eq!(auto.status, 200);
    assert_eq!(auto.json(), fleet.json());

    let cloud = as_tenant(
        &gateway,
        &router,
        "POST",
        "/tokenize",
        Some(&tokenize(CLOUD_NAME)),
    )
    .await;
    assert_error(&cloud, 400, Some("model"), "invalid_value");
    let message = cloud.json()["error"]["message"].to_string();
    assert!(
        message.contains("only available for fleet models"),
        "{message}"
    );
    let detokenize = json!({"model": CLOUD_NAME, "tokens": [1, 2]});
    let cloud = as_tenant(&gateway, &router, "POST", "/detokenize", Some(&detokenize)).await;
    assert_error(&cloud, 400, Some("model"), "invalid_value");

    // Without a cloud tier, `auto` does not exist.
    let plain = gateway.router().clone();
    let auto = as_tenant(
        &gateway,
        &plain,
        "POST",
        "/tokenize",
        Some(&tokenize("auto")),
    )
    .await;
    assert_error(&auto, 404, Some("model"), "model_not_found");
}

#[tokio::test]
async fn bad_tokenize_and_detokenize_bodies_are_400s_naming_the_parameter() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let router = gateway.router().clone();
    let vocab_size = gateway
        .models
        .lookup(MODEL)
        .expect("model")
        .tokenizer
        .vocab_size();
    let user = json!([{"role": "user", "content": "hi"}]);
    let long_prompt = "electric ".repeat(3000);
    let cases = [
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "hi", "return_token_strs": true}),
            Some("return_token_strs"),
            "unknown_parameter",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "hi", "messages": user}),
            Some("messages"),
            "invalid_value",
        ),
        (
            "/tokenize",
            json!({"model": MODEL}),
            Some("prompt"),
            "missing_required_parameter",
        ),
        (
            "/tokenize",
            json!({"prompt": "hi"}),
            Some("model"),
            "missing_required_parameter",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "hi", "add_generation_prompt": true}),
            Some("add_generation_prompt"),
            "invalid_value",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
            Some("messages[0].role"),
            "invalid_value",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": long_prompt}),
            Some("prompt"),
            "context_length_exceeded",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}),
            Some("messages"),
            "context_length_exceeded",
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "x".repeat(2 << 20)}),
            None,
            "request_too_large",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [1], "skip_special_tokens": true}),
            Some("skip_special_tokens"),
            "unknown_parameter",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [1, vocab_size]}),
            Some("tokens"),
            "invalid_value",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [-1]}),
            Some("tokens"),
            "invalid_value",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [i64::MAX]}),
            Some("tokens"),
            "invalid_value",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": vec![1; 2049]}),
            Some("tokens"),
            "context_length_exceeded",
        ),
        (
            "/detokenize",
            json!({"model": MODEL}),
            Some("tokens"),
            "missing_required_parameter",
        ),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": "1 2"}),
            None,
            "invalid_json",
        ),
    ];
    for (path, body, param, code) in cases {
        let answer = as_tenant(&gateway, &router, "POST", path, Some(&body)).await;
        let shown = body.to_string();
        assert_eq!(answer.status, 400, "{path} {shown:.120}");
        let error = &answer.json()["error"];
        assert_eq!(
            error["param"].as_str(),
            param,
            "{path} {shown:.120}: {error}"
        );
        assert_eq!(error["code"], code, "{path} {shown:.120}: {error}");
    }
    let unknown = json!({"model": "gpt-9", "tokens": [1]});
    let answer = as_tenant(&gateway, &router, "POST", "/detokenize", Some(&unknown)).await;
    assert_error(&answer, 404, Some("model"), "model_not_found");
    let anonymous = call(
        &router,
        "POST",
        "/tokenize",
        &[("content-type", "application/json")],
        Some(&json!({"model": MODEL, "prompt": "hi"})),
    )
    .await;
    assert_eq!(anonymous.status, 401);
}
