//! The shapes clients read, built from sequences of events: no model, no
//! core, no network.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::*;
use crate::api::route::{CloudPart, EdgePart};
use crate::api::validate::Endpoint;
use crate::cloud::MicroUsd;

fn text(piece: &str) -> Event {
    Event::Text {
        text: piece.into(),
        token: None,
    }
}

/// A token whose text is `released` (empty while it is held back).
fn token(released: &str, piece: &str, logprob: f32) -> Event {
    Event::Text {
        text: released.into(),
        token: Some(CommittedToken {
            token_id: 7,
            piece: piece.as_bytes().to_vec(),
            logprob,
            top_logprobs: vec![(7, piece.as_bytes().to_vec(), logprob)],
        }),
    }
}

fn fleet_end(rest: &str, finish_reason: &'static str) -> Event {
    Event::Finished(Box::new(Ending {
        rest: rest.into(),
        finish_reason,
        usage: AnswerUsage {
            prompt_tokens: 5,
            completion_tokens: 3,
            cached_prompt_tokens: Some(2),
            prediction: None,
        },
        route: None,
    }))
}

fn reason(code: &'static str) -> RouteReason {
    RouteReason::new(code, format!("because {code}"))
}

/// A routed answer the fleet started and the cloud finished.
fn handed_off_summary() -> RouteSummary {
    RouteSummary {
        tier: Tier::FleetThenCloud,
        reason: reason("confidence_collapse"),
        finish_reason: "stop",
        edge: Some(EdgePart {
            prompt_tokens: 11,
            completion_tokens: 4,
            discarded_tokens: 2,
        }),
        cloud: Some(CloudPart {
            prompt_tokens: 15,
            completion_tokens: 6,
            cost: MicroUsd(30),
            upstream_cost: MicroUsd(20),
        }),
        charged: MicroUsd(90),
        answer_tokens: None,
    }
}

fn events(sequence: Vec<Event>) -> mpsc::Receiver<Event> {
    let (sender, receiver) = mpsc::channel(sequence.len() + 1);
    for event in sequence {
        sender
            .try_send(event)
            .expect("the channel holds the whole sequence");
    }
    receiver
}

async fn answer_from(meta: ResponseMeta, sequence: Vec<Event>) -> Result<Response, ApiError> {
    answer(meta, vec![Source::Routed(events(sequence))]).await
}

async fn body_of(response: Response) -> (HeaderMap, Value) {
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("read the body");
    (
        headers,
        serde_json::from_slice(&bytes).expect("a JSON body"),
    )
}

/// The `data:` of each server-sent event, `[DONE]` as a string.
async fn stream_of(response: Response) -> (HeaderMap, Vec<Value>) {
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("read the stream");
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8 events");
    let data = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap_or_else(|_| json!(data)))
        .collect();
    (headers, data)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

/// The text a client assembles from a chat stream's deltas.
fn streamed_content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect()
}

#[tokio::test]
async fn a_fleet_chat_body_has_the_whole_text_its_usage_and_route() {
    let meta = ResponseMeta::bare(Endpoint::Chat, false, false, false, None);
    let sequence = vec![
        text("Hel"),
        text(""),
        text("lo"),
        fleet_end(" world", "stop"),
    ];
    let response = answer_from(meta, sequence).await.expect("an answer");
    let (headers, body) = body_of(response).await;
    assert_eq!(header(&headers, "x-request-id"), "cmpl-test");
    assert_eq!(header(&headers, "x-fleetgrid-tier"), "fleet");
    assert_eq!(
        header(&headers, "x-fleetgrid-route-reason"),
        "explicit_fleet"
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "small");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello world");
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
               "prompt_tokens_details": {"cached_tokens": 2}})
    );
    assert_eq!(
        body["fleetgrid"],
        json!({"tier": "fleet", "reason": "explicit_fleet"})
    );
}

#[tokio::test]
async fn a_fleet_chat_stream_opens_the_message_and_ends_with_usage_and_done() {
    let meta = ResponseMeta::bare(Endpoint::Chat, true, true, false, None);
    let sequence = vec![
        text("Hel"),
        text(""),
        text("lo"),
        fleet_end(" world", "length"),
    ];
    let response = answer_from(meta, sequence).await.expect("a stream");
    let (headers, chunks) = stream_of(response).await;
    assert_eq!(header(&headers, "x-fleetgrid-tier"), "fleet");
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    let chunks = &chunks[..chunks.len() - 1];
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    // A held-back token sends no chunk: the opening, two texts, the rest,
    // the finishing chunk and the usage.
    assert_eq!(chunks.len(), 6);
    assert_eq!(streamed_content(chunks), "Hello world");
    for chunk in chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], "cmpl-test");
        assert_eq!(chunk["model"], "small");
        assert!(chunk.get("fleetgrid").is_none());
    }
    let finishing = &chunks[4]["choices"][0];
    assert_eq!(finishing["delta"], json!({}));
    assert_eq!(finishing["finish_reason"], "length");
    assert!(chunks[..4]
        .iter()
        .all(|chunk| chunk["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(chunks[5]["usage"]["total_tokens"], 8);
    assert_eq!(
        chunks[5]["usage"]["prompt_tokens_details"]["cached_tokens"],
        2
    );
}

#[tokio::test]
async fn a_stream_without_usage_asked_has_no_usage_chunk() {
    let meta = ResponseMeta::bare(Endpoint::Chat, true, false, false, None);
    let response = answer_from(meta, vec![text("hi"), fleet_end("", "stop")])
        .await
        .expect("a stream");
    let (_, chunks) = stream_of(response).await;
    assert_eq!(chunks.len(), 4, "opening, text, finishing chunk, [DONE]");
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
}

#[tokio::test]
async fn a_completion_stream_echoes_the_prompt_and_carries_held_back_logprobs() {
    let meta = ResponseMeta::bare(Endpoint::Completion, true, false, true, Some("Q:".into()));
    let sequence = vec![
        token("", "A", -0.5),
        token("AB", "B", -0.25),
        fleet_end("", "stop"),
    ];
    let response = answer_from(meta, sequence).await.expect("a stream");
    let (_, chunks) = stream_of(response).await;
    assert_eq!(chunks[0]["object"], "text_completion");
    assert_eq!(chunks[0]["choices"][0]["text"], "Q:");
    // The held-back token's logprobs go out with the text that releases it.
    let released = &chunks[1]["choices"][0];
    assert_eq!(released["text"], "AB");
    assert_eq!(released["logprobs"]["tokens"], json!(["A", "B"]));
    assert_eq!(released["logprobs"]["token_logprobs"], json!([-0.5, -0.25]));
    assert_eq!(released["logprobs"]["top_logprobs"][1], json!({"B": -0.25}));
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3], json!("[DONE]"));
}

#[tokio::test]
async fn a_chat_body_lists_each_tokens_logprobs() {
    let meta = ResponseMeta::bare(Endpoint::Chat, false, false, true, None);
    let sequence = vec![token("A", "A", -1.0), fleet_end("", "stop")];
    let (_, body) = body_of(answer_from(meta, sequence).await.expect("an answer")).await;
    let content = &body["choices"][0]["logprobs"]["content"];
    assert_eq!(content[0]["token"], "A");
    assert_eq!(content[0]["logprob"], -1.0);
    assert_eq!(content[0]["bytes"], json!([65]));
    assert_eq!(content[0]["top_logprobs"][0]["token"], "A");
}

#[tokio::test]
async fn a_failure_before_the_first_token_is_the_http_error() {
    let meta = ResponseMeta::bare(Endpoint::Chat, false, false, false, None);
    let failure = ApiError::unavailable("no vehicle", 3);
    let error = answer_from(meta, vec![Event::Failed(failure.clone())])
        .await
        .expect_err("the answer failed");
    assert_eq!(error, failure);

    // A routed request that fails before its tier starts answers the same.
    let meta = ResponseMeta::bare(Endpoint::Chat, true, false, false, None);
    let error = routed(meta, events(vec![Event::Failed(failure.clone())]))
        .await
        .expect_err("the routed answer failed");
    assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_failure_after_the_first_token_ends_the_stream_with_the_error() {
    let meta = ResponseMeta::bare(Endpoint::Chat, true, true, false, None);
    let failure = request_timed_out();
    let sequence = vec![text("partial"), Event::Failed(failure.clone())];
    let (_, chunks) = stream_of(answer_from(meta, sequence).await.expect("a stream")).await;
    assert_eq!(chunks.len(), 4, "opening, text, error, [DONE]");
    assert_eq!(streamed_content(&chunks), "partial");
    assert_eq!(chunks[2]["error"]["code"], "timeout");
    assert_eq!(chunks[2]["error"]["message"], failure.message);
    assert_eq!(chunks[3], json!("[DONE]"));
    assert!(chunks
        .iter()
        .all(|chunk| chunk["choices"][0]["finish_reason"].is_null()));

    // A whole body after a first token is the error alone.
    let meta = ResponseMeta::bare(Endpoint::Chat, false, false, false, None);
    let error = answer_from(meta, vec![text("partial"), Event::Failed(failure.clone())])
        .await
        .expect_err("the answer failed");
    assert_eq!(error.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn a_routed_stream_names_its_first_tier_the_handoff_and_the_end() {
    let meta = ResponseMeta::bare(Endpoint::Chat, true, true, false, None);
    let sequence = vec![
        Event::Start {
            tier: Tier::Fleet,
            reason: reason("cascade"),
            model: "small".into(),
        },
        text("Hello"),
        Event::Handoff(reason("confidence_collapse")),
        text(" world"),
        Event::Finished(Box::new(Ending::routed(handed_off_summary()))),
    ];
    let response = routed(meta, events(sequence)).await.expect("a stream");
    let (headers, chunks) = stream_of(response).await;
    // The headers went out when the first tier started.
    assert_eq!(header(&headers, "x-fleetgrid-tier"), "fleet");
    assert_eq!(header(&headers, "x-fleetgrid-route-reason"), "cascade");
    assert_eq!(
        chunks[0]["fleetgrid"],
        json!({"tier": "fleet", "reason": "cascade", "detail": "because cascade"})
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[2]["fleetgrid"]["tier"], "fleet+cloud");
    assert_eq!(chunks[2]["fleetgrid"]["reason"], "confidence_collapse");
    assert_eq!(streamed_content(&chunks), "Hello world");
    let finishing = &chunks[4];
    assert_eq!(finishing["choices"][0]["finish_reason"], "stop");
    assert_eq!(finishing["fleetgrid"]["tier"], "fleet+cloud");
    assert_eq!(finishing["fleetgrid"]["cost_micro_usd"], 90);
    assert_eq!(
        finishing["fleetgrid"]["usage"]["edge"]["discarded_tokens"],
        2
    );
    assert_eq!(
        finishing["fleetgrid"]["usage"]["cloud"]["upstream_cost_micro_usd"],
        20
    );
    // The prompt once, as the fleet counted it; each tier's sent tokens.
    assert_eq!(
        chunks[5]["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 10, "total_tokens": 21})
    );
    assert_eq!(chunks[6], json!("[DONE]"));
}

#[tokio::test]
async fn a_routed_body_names_the_tier_it_ended_on_and_the_model_that_started() {
    let meta = ResponseMeta::bare(Endpoint::Completion, false, false, false, None);
    let sequence = vec![
        Event::Start {
            tier: Tier::Cloud,
            reason: reason("hard_prompt"),
            model: "cloud/big".into(),
        },
        text("42"),
        Event::Finished(Box::new(Ending::routed(RouteSummary {
            tier: Tier::Cloud,
            reason: reason("hard_prompt"),
            finish_reason: "length",
            edge: None,
            cloud: Some(CloudPart {
                prompt_tokens: 9,
                completion_tokens: 1,
                cost: MicroUsd(4),
                upstream_cost: MicroUsd(3),
            }),
            charged: MicroUsd(4),
            answer_tokens: None,
        }))),
    ];
    let response = routed(meta, events(sequence)).await.expect("an answer");
    let (headers, body) = body_of(response).await;
    assert_eq!(header(&headers, "x-fleetgrid-tier"), "cloud");
    assert_eq!(header(&headers, "x-fleetgrid-route-reason"), "hard_prompt");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "cloud/big");
    assert_eq!(body["choices"][0]["text"], "42");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10})
    );
    assert_eq!(body["fleetgrid"]["detail"], "because hard_prompt");
    assert!(body["fleetgrid"]["usage"]["edge"].is_null());
}

#[tokio::test]
async fn a_routed_stream_whose_driver_vanishes_ends_with_an_error() {
    let meta = ResponseMeta::bare(Endpoint::Chat, true, false, false, None);
    let sequence = vec![
        Event::Start {
            tier: Tier::Fleet,
            reason: reason("cascade"),
            model: "small".into(),
        },
        text("Hel"),
    ];
    let (_, chunks) = stream_of(routed(meta, events(sequence)).await.expect("a stream")).await;
    assert_eq!(chunks.len(), 4, "opening, text, error, [DONE]");
    assert_eq!(chunks[2]["error"]["type"], "server_error");
    assert_eq!(chunks[3], json!("[DONE]"));
}

/// A chat answer whose model calls tools in llama-server's generic format.
fn calling_meta(stream: bool) -> ResponseMeta {
    let mut meta = ResponseMeta::bare(Endpoint::Chat, stream, false, false, None);
    meta.tool_format = Some(engine::ToolCallFormat::Generic);
    meta
}

const CALLS: [&str; 4] = [
    r#"{"tool_calls": [{"name": "get_weather", "#,
    r#""arguments": {"city": "Pa"#,
    r#"ris"}}, {"name": "now", "arguments": {}}"#,
    r#"]}"#,
];

#[tokio::test]
async fn a_body_gives_the_calls_read_from_the_text_with_null_content() {
    let mut sequence: Vec<Event> = CALLS.iter().map(|piece| text(piece)).collect();
    sequence.push(fleet_end("", "stop"));
    let response = answer_from(calling_meta(false), sequence)
        .await
        .expect("an answer");
    let (_, body) = body_of(response).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([
            {"id": "call_test_0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "call_test_1", "type": "function",
             "function": {"name": "now", "arguments": "{}"}},
        ])
    );
}

#[tokio::test]
async fn a_stream_opens_each_call_then_sends_its_arguments_in_pieces() {
    let mut sequence: Vec<Event> = CALLS.iter().map(|piece| text(piece)).collect();
    sequence.push(fleet_end("", "stop"));
    let response = answer_from(calling_meta(true), sequence)
        .await
        .expect("a stream");
    let (_, chunks) = stream_of(response).await;
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(
        deltas[0],
        &json!({"index": 0, "id": "call_test_0", "type": "function",
                "function": {"name": "get_weather", "arguments": ""}})
    );
    let arguments = |index: u64| -> String {
        deltas
            .iter()
            .filter(|delta| delta["index"] == index)
            .filter_map(|delta| delta["function"]["arguments"].as_str())
            .collect()
    };
    assert_eq!(arguments(0), r#"{"city": "Paris"}"#);
    assert_eq!(arguments(1), "{}");
    // The arguments arrived in more than one piece, as the model wrote them.
    assert!(deltas.iter().filter(|delta| delta["index"] == 0).count() > 2);
    assert_eq!(streamed_content(&chunks), "");
    let finishing = chunks
        .iter()
        .find_map(|chunk| chunk["choices"][0]["finish_reason"].as_str());
    assert_eq!(finishing, Some("tool_calls"));
}

#[tokio::test]
async fn a_generic_answer_that_answers_is_plain_content() {
    let sequence = vec![
        text(r#"{"response": "It is "#),
        text(r#"sunny \"today\""}"#),
        fleet_end("", "stop"),
    ];
    let response = answer_from(calling_meta(false), sequence)
        .await
        .expect("an answer");
    let (_, body) = body_of(response).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["content"], "It is sunny \"today\"");
    assert!(choice["message"].get("tool_calls").is_none());
}

/// A finished choice whose tokens had the log-probability `logprob` each.
fn choice_events(words: &[&str], logprob: f32) -> Vec<Event> {
    let mut sequence: Vec<Event> = words
        .iter()
        .map(|word| token(word, word, logprob))
        .collect();
    sequence.push(fleet_end("", "stop"));
    sequence
}

fn sources(choices: Vec<Vec<Event>>) -> Vec<Source> {
    choices
        .into_iter()
        .map(|sequence| Source::Routed(events(sequence)))
        .collect()
}

#[tokio::test]
async fn every_choice_is_in_the_body_with_its_index_and_the_usage_of_all() {
    let mut meta = ResponseMeta::bare(Endpoint::Chat, false, false, false, None);
    meta.choices = 2;
    let choices = vec![
        choice_events(&["Red", " car"], -0.5),
        choice_events(&["Blue", " van"], -0.1),
    ];
    let response = answer(meta, sources(choices)).await.expect("an answer");
    let (_, body) = body_of(response).await;
    let choices = body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["content"], "Red car");
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[1]["message"]["content"], "Blue van");
    // Each choice prefilled its prompt and was billed: the usage is the sum.
    assert_eq!(body["usage"]["prompt_tokens"], 10);
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
}

#[tokio::test]
async fn best_of_gives_the_choices_of_highest_mean_logprob_and_bills_all() {
    let mut meta = ResponseMeta::bare(Endpoint::Completion, false, false, false, None);
    meta.choices = 1;
    let choices = vec![
        choice_events(&["unsure"], -2.0),
        choice_events(&["sure", " thing"], -0.2),
        choice_events(&["maybe"], -1.0),
    ];
    let response = answer(meta, sources(choices)).await.expect("an answer");
    let (_, body) = body_of(response).await;
    let choices = body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["text"], "sure thing");
    assert_eq!(body["usage"]["completion_tokens"], 9);
}

#[tokio::test]
async fn a_stream_of_two_choices_names_each_chunks_choice_and_ends_once() {
    let mut meta = ResponseMeta::bare(Endpoint::Chat, true, true, false, None);
    meta.choices = 2;
    let choices = vec![
        choice_events(&["Red", " car"], -0.5),
        choice_events(&["Blue", " van"], -0.1),
    ];
    let response = answer(meta, sources(choices)).await.expect("a stream");
    let (_, chunks) = stream_of(response).await;
    assert_eq!(chunks.last(), Some(&json!("[DONE]")));
    let text_of = |index: u64| -> String {
        chunks
            .iter()
            .filter(|chunk| chunk["choices"][0]["index"] == index)
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect()
    };
    assert_eq!(text_of(0), "Red car");
    assert_eq!(text_of(1), "Blue van");
    for index in [0, 1] {
        let openings = chunks
            .iter()
            .filter(|chunk| chunk["choices"][0]["index"] == index)
            .filter(|chunk| chunk["choices"][0]["delta"]["role"] == "assistant")
            .count();
        let finishes = chunks
            .iter()
            .filter(|chunk| chunk["choices"][0]["index"] == index)
            .filter(|chunk| chunk["choices"][0]["finish_reason"] == "stop")
            .count();
        assert_eq!((openings, finishes), (1, 1), "choice {index}");
    }
    let usage: Vec<&Value> = chunks
        .iter()
        .filter(|chunk| chunk.get("usage").is_some())
        .collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["usage"]["completion_tokens"], 6);
}
