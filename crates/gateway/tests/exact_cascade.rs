//! `auto` with `quality: "exact"`, in-process: the fleet's draft from a scripted cell, the
//! cloud a scripted OpenAI-compatible upstream on a loopback port whose greedy answer is a
//! fixed token sequence. The client must get exactly the cloud's answer, the draft prefix the
//! cloud agreed with billed to the fleet, and the cloud asked as the cascade asks (one
//! prefill scoring prompt and draft, then a continuation from the agreed tokens).

mod support;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Router;
use cell_api::fake::Script;
use engine::testing::test_model_path;
use gateway::api;
use gateway::cloud::{CloudConfig, CloudTier};
use gateway::store::TenantClass;
use serde_json::{json, Value};
use support::Gateway;

const CLOUD_MODEL: &str = "qwen2.5-coder-1.5b-instruct";
const QUESTION: &str = "What is the capital of France?";

/// The scripted cloud: after any prompt of `prompt_len` tokens, its greedy answer is
/// `answer`, then the end; every call it got is kept.
#[derive(Clone, Default)]
struct Cloud {
    prompt_len: usize,
    answer: Vec<i32>,
    calls: Arc<Mutex<Vec<Value>>>,
}

fn named(id: i32) -> String {
    format!("token_id:{id}")
}

/// One event of a completions stream carrying `tokens` (id, logprob, top choice).
fn chunk(tokens: &[(i32, Option<f32>, Option<i32>)], finish: Option<&str>) -> String {
    let logprobs = json!({
        "tokens": tokens.iter().map(|(id, _, _)| named(*id)).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|(_, logprob, _)| *logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|(_, logprob, top)| match top {
            Some(top) => json!({ named(*top): logprob.unwrap_or(-0.1) }),
            None => Value::Null,
        }).collect::<Vec<_>>(),
    });
    let event = json!({"choices": [{"index": 0, "text": "", "logprobs": logprobs, "finish_reason": finish}]});
    format!("data: {event}\n\n")
}

async fn completions(State(cloud): State<Cloud>, body: String) -> impl IntoResponse {
    let body: Value = serde_json::from_str(&body).expect("a JSON body");
    cloud.calls.lock().unwrap().push(body.clone());
    let prompt: Vec<i32> = body["prompt"]
        .as_array()
        .expect("a prompt of token ids")
        .iter()
        .map(|id| i32::try_from(id.as_i64().expect("an id")).expect("an i32 id"))
        .collect();
    let max_tokens = body["max_tokens"].as_u64().expect("max_tokens") as usize;
    // The answer so far: what follows the chat prompt.
    let said = &prompt[cloud.prompt_len..];
    let mut events = String::new();
    if body["echo"] == json!(true) {
        // Scores: the first prompt token has none; at an answer position the top choice is
        // the cloud's own token there (or none past the end of its answer).
        let scored: Vec<(i32, Option<f32>, Option<i32>)> = prompt
            .iter()
            .enumerate()
            .map(|(at, &id)| {
                let top = match at.checked_sub(cloud.prompt_len) {
                    None => Some(id),
                    Some(offset) => cloud.answer.get(offset).copied(),
                };
                (id, (at > 0).then_some(-0.1), top.filter(|_| at > 0))
            })
            .collect();
        events.push_str(&chunk(&scored, None));
    }
    let agreed = cloud.answer.starts_with(said);
    let next: Vec<i32> = if agreed {
        cloud.answer[said.len()..]
            .iter()
            .take(max_tokens)
            .copied()
            .collect()
    } else {
        Vec::new()
    };
    for &id in &next {
        events.push_str(&chunk(&[(id, Some(-0.1), Some(id))], None));
    }
    let finish = if next.len() == max_tokens {
        "length"
    } else {
        "stop"
    };
    events.push_str(&chunk(&[], Some(finish)));
    let usage = json!({"choices": [], "usage": {"prompt_tokens": prompt.len(), "completion_tokens": next.len()}});
    events.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
    ([("content-type", "text/event-stream")], events)
}

/// Serves `cloud` on a loopback port; returns its `/v1` URL.
async fn serve(cloud: Cloud) -> String {
    let app = Router::new()
        .route("/v1/completions", axum::routing::post(completions))
        .with_state(cloud);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/v1")
}

struct Setup {
    gateway: Gateway,
    router: Router,
    cloud: Cloud,
    /// The cloud's answer as (id, piece) tokens.
    answer: Vec<(i32, String)>,
    prompt: Vec<i32>,
}

/// A gateway whose cloud shares the test model's vocabulary (its tokenizer is the test
/// model's own) and answers " Paris is the capital." to any prompt.
async fn setup(shared_vocabulary: bool) -> Setup {
    setup_with(shared_vocabulary, false).await
}

/// As `setup`, the gateway told whether its cloud follows predictions.
async fn setup_with(shared_vocabulary: bool, follows_predictions: bool) -> Setup {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let model = gateway.models.all()[0].clone();
    let tokenizer = &model.tokenizer;
    let prompt = tokenizer
        .apply_chat_template(&[engine::ChatMessage::new("user", QUESTION)], true)
        .expect("render");
    let prompt = tokenizer.tokenize(&prompt, false).expect("tokenize");
    let ids = tokenizer
        .tokenize(" Paris is the capital.", false)
        .expect("tokenize");
    let answer: Vec<(i32, String)> = ids
        .iter()
        .map(|&id| {
            (
                id,
                String::from_utf8_lossy(&tokenizer.piece(id)).into_owned(),
            )
        })
        .collect();
    let cloud = Cloud {
        prompt_len: prompt.len(),
        answer: ids,
        calls: Arc::default(),
    };
    let mut config = CloudConfig::new(serve(cloud.clone()).await, CLOUD_MODEL);
    config.chat_template_model = shared_vocabulary.then(test_model_path);
    config.follows_predictions = follows_predictions;
    let tier = CloudTier::load(config, gateway.store.clone(), &gateway.billing)
        .await
        .expect("cloud tier");
    let router = api::router(gateway.state.clone().with_cloud(Some(Arc::new(tier))));
    Setup {
        gateway,
        router,
        cloud,
        answer,
        prompt,
    }
}

fn exact(max_tokens: u32) -> Value {
    json!({
        "model": "auto",
        "quality": "exact",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

async fn post(setup: &Setup, body: &Value) -> support::Answer {
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("authorization", format!("Bearer {}", setup.gateway.key))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .expect("request");
    support::send(&setup.router, request).await
}

/// A request that must succeed: the answer and its JSON body.
async fn answered(setup: &Setup, body: &Value) -> (support::Answer, Value) {
    let answer = post(setup, body).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let json = answer.json();
    (answer, json)
}

/// The whole content of a chat body.
fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

/// The whole content of a streamed chat answer.
fn streamed_content(answer: &support::Answer) -> String {
    answer
        .events()
        .iter()
        .filter(|event| *event != "[DONE]")
        .filter_map(|event| {
            let chunk: Value = serde_json::from_str(event).ok()?;
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn text(tokens: &[(i32, String)]) -> String {
    tokens.iter().map(|(_, piece)| piece.as_str()).collect()
}

#[tokio::test]
async fn the_answer_is_the_clouds_own_with_the_agreed_draft_billed_to_the_fleet() {
    let setup = setup(true).await;
    let cloud_text = text(&setup.answer);
    // The draft agrees on two tokens, then parts from the cloud.
    let draft = parting_draft(&setup);
    setup
        .gateway
        .cell
        .script([Script::AnswerTokens(draft.clone())]);
    let (answer, body) = answered(&setup, &exact(32)).await;
    assert_eq!(content(&body), cloud_text);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer.header("x-fleetgrid-tier"), Some("cloud"));
    assert_eq!(
        answer.header("x-fleetgrid-route-reason"),
        Some("exact_cascade")
    );
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], setup.prompt.len());
    assert_eq!(usage["completion_tokens"], setup.answer.len());
    let edge = &body["fleetgrid"]["usage"]["edge"];
    assert_eq!(edge["completion_tokens"], 2, "{body}");
    assert_eq!(edge["discarded_tokens"], 2, "{body}");
    assert!(body["fleetgrid"]["cost_micro_usd"].as_u64() > Some(0));

    // In the ledger: the vehicle's segment delivered the two kept tokens (its owner earns
    // them), the cloud's segment the rest, with both of its prefills.
    let prompt = setup.prompt.len() as u64;
    let answer_len = setup.answer.len() as u64;
    assert_eq!(
        served(&setup, &body).await,
        [
            (true, prompt, 2),
            // Prompt and draft, then prompt and the three agreed tokens; it generated what
            // followed them.
            (false, prompt + 4 + prompt + 3, answer_len - 3),
        ]
    );

    // The draft was asked for greedily, the whole answer long.
    let submitted = setup.gateway.cell.submitted();
    assert_eq!(submitted.len(), 1);
    assert_eq!(submitted[0].max_tokens, 32);
    // The cloud scored prompt and draft in one call, then continued from the agreed two
    // tokens and its own third.
    let calls = setup.cloud.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let mut scored = setup.prompt.clone();
    scored.extend(ids(&draft));
    assert_eq!(calls[0]["prompt"], json!(scored));
    assert_eq!(calls[0]["echo"], true);
    assert_eq!(calls[0]["logprobs"], 1);
    assert_eq!(calls[0]["return_tokens_as_token_ids"], true);
    assert_eq!(calls[0]["temperature"], 0.0);
    let mut continued = setup.prompt.clone();
    continued.extend(ids(&setup.answer[..3]));
    assert_eq!(calls[1]["prompt"], json!(continued));
    assert_eq!(calls[1].get("echo"), None);
    assert_eq!(calls[1]["max_tokens"], 32 - 3);

    // Streamed, the same text.
    setup
        .gateway
        .cell
        .script([Script::AnswerTokens(draft.clone())]);
    let mut streamed = exact(32);
    streamed["stream"] = json!(true);
    let answer = post(&setup, &streamed).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(streamed_content(&answer), cloud_text);
}

/// The (id, piece) tokens' ids.
fn ids(tokens: &[(i32, String)]) -> Vec<i32> {
    tokens.iter().map(|(id, _)| *id).collect()
}

/// The ledger's served segments of an answer: (on a node, prompt tokens, completion tokens).
async fn served(setup: &Setup, body: &Value) -> Vec<(bool, u64, u64)> {
    let request = ledger::core::RequestId::new(body["id"].as_str().expect("id")).expect("id");
    let segments = setup
        .gateway
        .billing
        .ledger()
        .request_usage(&request)
        .await
        .expect("usage");
    segments
        .iter()
        .filter(|segment| segment.completion_tokens.0 > 0)
        .map(|segment| {
            let on_node = matches!(segment.server, ledger::metering::Server::Node { .. });
            (
                on_node,
                segment.prompt_tokens.0,
                segment.completion_tokens.0,
            )
        })
        .collect()
}

/// A draft that agrees with the cloud's answer on two tokens, then parts from it.
fn parting_draft(setup: &Setup) -> Vec<(i32, String)> {
    let mut draft = setup.answer[..2].to_vec();
    draft.extend([(11, "x".to_string()), (12, "y".to_string())]);
    draft
}

/// The cascade in one call, with a parting draft: `body` asked plain and streamed gets the
/// cloud's text; the vehicle is booked for the two kept tokens, the cloud for prompt and
/// draft prefilled once and the rest generated; the one call offers the draft as its
/// prediction. Returns the plain answer's call to the cloud.
async fn answered_in_one_call(setup: &Setup, mut body: Value) -> Value {
    let cloud_text = text(&setup.answer);
    let draft = parting_draft(setup);
    setup
        .gateway
        .cell
        .script([Script::AnswerTokens(draft.clone())]);
    let (answer, json) = answered(setup, &body).await;
    assert_eq!(content(&json), cloud_text);
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer.header("x-fleetgrid-tier"), Some("cloud"));
    assert_eq!(
        answer.header("x-fleetgrid-route-reason"),
        Some("exact_cascade")
    );
    assert_eq!(json["usage"]["completion_tokens"], setup.answer.len());
    let edge = &json["fleetgrid"]["usage"]["edge"];
    assert_eq!(edge["completion_tokens"], 2, "{json}");
    assert_eq!(edge["discarded_tokens"], 2, "{json}");
    let prompt = setup.prompt.len() as u64;
    let answer_len = setup.answer.len() as u64;
    assert_eq!(
        served(setup, &json).await,
        [(true, prompt, 2), (false, prompt + 4, answer_len - 2)]
    );
    let calls = setup.cloud.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = calls[0].clone();
    assert_eq!(call["prompt"], json!(setup.prompt));
    assert_eq!(
        call["prediction"],
        json!({"type": "content", "content": ids(&draft)})
    );
    assert_eq!(call["max_tokens"], body["max_tokens"]);
    assert_eq!(call.get("echo"), None);

    // Streamed, the same text.
    setup.gateway.cell.script([Script::AnswerTokens(draft)]);
    body["stream"] = json!(true);
    let answer = post(setup, &body).await;
    assert_eq!(answer.status, 200);
    assert_eq!(streamed_content(&answer), cloud_text);
    call
}

/// Sampled: one cloud call with the draft as its prediction; the answer is the cloud's own
/// (the scripted cloud's answer does not depend on the prediction, as a real cloud's must
/// not), and the draft's share is what the answer took of it from the start.
#[tokio::test]
async fn sampled_the_answer_is_the_clouds_own_draw_and_the_draft_its_prediction() {
    let setup = setup(true).await;
    let mut sampled = exact(32);
    sampled["temperature"] = json!(0.7);
    sampled["seed"] = json!(5);
    let call = answered_in_one_call(&setup, sampled).await;
    // The drafts (plain and streamed) were sampled as the cloud samples, with the same seed.
    let submitted = setup.gateway.cell.submitted();
    assert_eq!(submitted.len(), 2);
    assert!(submitted
        .iter()
        .all(|generation| (generation.sampling.temperature - 0.7).abs() < 1e-6));
    // The temperature as the engines read it (an f32).
    assert_eq!(call["temperature"].as_f64().map(|t| t as f32), Some(0.7));
    assert_eq!(call["seed"], 5);
}

/// Greedy, against a cloud that follows predictions: the draft is checked in the call that
/// answers, as when sampling, instead of a scoring call and a continuation.
#[tokio::test]
async fn greedy_against_a_cloud_that_follows_predictions_one_call_checks_and_answers() {
    let setup = setup_with(true, true).await;
    let call = answered_in_one_call(&setup, exact(32)).await;
    assert_eq!(call["temperature"], 0.0);
}

#[tokio::test]
async fn a_draft_the_cloud_agrees_with_to_its_end_is_checked_in_one_call() {
    let setup = setup(true).await;
    setup
        .gateway
        .cell
        .script([Script::AnswerTokens(setup.answer.clone())]);
    let (_, body) = answered(&setup, &exact(32)).await;
    assert_eq!(content(&body), text(&setup.answer));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let edge = &body["fleetgrid"]["usage"]["edge"];
    assert_eq!(edge["completion_tokens"], setup.answer.len());
    assert_eq!(edge["discarded_tokens"], 0);
    // The cloud ended its answer where the draft did: nothing is left to continue.
    assert_eq!(setup.cloud.calls.lock().unwrap().len(), 1);

    // A limit inside the answer: the draft fills it, the cloud agrees, and the answer is cut
    // there as the cloud's own would be.
    setup
        .gateway
        .cell
        .script([Script::AnswerTokens(setup.answer.clone())]);
    let (_, body) = answered(&setup, &exact(3)).await;
    assert_eq!(content(&body), text(&setup.answer[..3]));
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn without_a_vehicle_the_cloud_answers_alone() {
    let setup = setup(true).await;
    // No script: the cell refuses the draft.
    let (_, body) = answered(&setup, &exact(32)).await;
    assert_eq!(content(&body), text(&setup.answer));
    assert_eq!(body["fleetgrid"]["usage"]["edge"]["completion_tokens"], 0);
    let calls = setup.cloud.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "no draft to check: {calls:?}");
    assert_eq!(calls[0]["prompt"], json!(setup.prompt));
}

#[tokio::test]
async fn what_the_cascade_cannot_make_exact_is_refused_by_name() {
    let setup = setup(true).await;
    let refused = |body: Value, param: &'static str| {
        let setup = &setup;
        async move {
            let answer = post(setup, &body).await;
            assert_eq!(
                answer.status,
                400,
                "{param}: {}",
                String::from_utf8_lossy(&answer.body)
            );
            assert_eq!(answer.json()["error"]["param"], param);
        }
    };
    let mut penalised = exact(8);
    penalised["presence_penalty"] = json!(0.5);
    refused(penalised, "presence_penalty").await;
    let mut predicted = exact(8);
    predicted["prediction"] = json!({"type": "content", "content": "Paris"});
    refused(predicted, "prediction").await;
    let mut structured = exact(8);
    structured["response_format"] = json!({"type": "json_object"});
    refused(structured, "response_format").await;
    let mut fleet = exact(8);
    fleet["model"] = json!(support::MODEL);
    refused(fleet, "quality").await;
    let mut unknown = exact(8);
    unknown["quality"] = json!("fast");
    refused(unknown, "quality").await;
    assert!(setup.gateway.cell.submitted().is_empty());
    assert!(setup.cloud.calls.lock().unwrap().is_empty());

    // A cloud whose tokenizer is not loaded here cannot be checked token by token.
    let unknown_vocabulary = self::setup(false).await;
    let answer = post(&unknown_vocabulary, &exact(8)).await;
    assert_eq!(
        answer.status,
        400,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["error"]["param"], "quality");
}
