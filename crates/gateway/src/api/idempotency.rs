//! `Idempotency-Key` on completion requests.
//!
//! - A key is scoped to the tenant and kept for `IDEMPOTENCY_RETENTION`.
//! - Same key, same body (endpoint and bytes, hashed): the first request runs;
//!   a later one gets the kept response and is not charged again (the kept
//!   settlement is settled again, which the ledger finds already there).
//! - While the first is still running, a repeat is answered 409 with
//!   `Retry-After` rather than held open: the client's retry loop already
//!   knows how to wait, and a held connection would pin a gateway permit.
//!   This holds across gateways: the one running the request keeps a lease
//!   on its key, and only once that lease has expired (its gateway died)
//!   does a retry, through any gateway, run afresh.
//! - Same key, different body: 422, `idempotency_key_reused`.
//! - A request that fails or is cancelled releases its key, so a retry runs.
//! - Streaming: the kept response is the complete (non-streaming) body; a
//!   replay of a streamed request sends it as server-sent events: one chunk
//!   with the whole text, the finishing chunk, the usage chunk if the request
//!   asked for one, and `[DONE]`. Logprobs are not replayed in a stream.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::validate::Endpoint;
use super::AppState;
use crate::billing_idempotency::{Found, Slot, IDEMPOTENCY_KEY_BYTES_MAX};
use crate::store::TenantRecord;

/// The request header.
pub const HEADER: &str = "idempotency-key";

/// What the gateway does with a request.
pub enum Start {
    /// Run it; with a slot when it carries a key.
    Run(Option<Slot>),
    /// Answer with this (a replay or a refusal) and run nothing.
    Answer(Response),
}

pub async fn start(
    state: &AppState,
    tenant: &TenantRecord,
    headers: &HeaderMap,
    body: &Bytes,
    endpoint: Endpoint,
) -> Result<Start, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(Start::Run(None));
    };
    let key = value
        .to_str()
        .ok()
        .filter(|key| !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX)
        .ok_or_else(|| {
            ApiError::invalid(
                format!(
                    "the Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ascii characters"
                ),
                None,
                "invalid_idempotency_key",
            )
        })?;
    let mut hasher = Sha256::new();
    hasher.update(endpoint_name(endpoint).as_bytes());
    hasher.update([0]);
    hasher.update(body);
    let hash = hex::encode(hasher.finalize());
    let now_ms = crate::core::now_ms().0;
    match state
        .idempotency
        .claim(tenant.id, key, &hash, now_ms)
        .await?
    {
        Found::Run(slot) => Ok(Start::Run(Some(slot))),
        Found::InProgress => Err(ApiError {
            status: StatusCode::CONFLICT,
            message: "a request with this Idempotency-Key is still running; retry shortly to \
                      get its result"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("idempotency_request_in_progress"),
            retry_after_seconds: Some(crate::limits::RETRY_AFTER_DEFAULT_SECONDS),
        }),
        Found::Mismatch => Err(ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: "this Idempotency-Key was already used with a different request; use a new \
                      key for a new request"
                .into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("idempotency_key_reused"),
            retry_after_seconds: None,
        }),
        Found::Done {
            response,
            settlement,
        } => {
            crate::billing_finish::settle_again(&state.billing, settlement).await?;
            let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            Ok(Start::Answer(replay(response, &request, endpoint)))
        }
    }
}

fn endpoint_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completion => "/v1/completions",
    }
}

fn replay(response: Value, request: &Value, endpoint: Endpoint) -> Response {
    let id = response["id"].as_str().unwrap_or("unknown").to_string();
    let headers = [
        (
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("unknown")),
        ),
        (
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        ),
    ];
    if request["stream"].as_bool() != Some(true) {
        return (headers, Json(response)).into_response();
    }
    let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
    let events: Vec<Result<Event, Infallible>> = replay_chunks(&response, endpoint, include_usage)
        .into_iter()
        .map(|chunk| Ok(Event::default().data(chunk)))
        .collect();
    (headers, Sse::new(futures::stream::iter(events))).into_response()
}

/// The SSE data lines that replay a kept response.
fn replay_chunks(response: &Value, endpoint: Endpoint, include_usage: bool) -> Vec<String> {
    let choice = &response["choices"][0];
    let finish = choice["finish_reason"].clone();
    let envelope = |choices: Value| {
        let object = match endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        json!({
            "id": response["id"],
            "object": object,
            "created": response["created"],
            "model": response["model"],
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    };
    let (text_choice, finish_choice) = match endpoint {
        Endpoint::Chat => (
            json!({"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]}, "logprobs": Value::Null, "finish_reason": Value::Null}),
            json!({"index": 0, "delta": {}, "logprobs": Value::Null, "finish_reason": finish}),
        ),
        Endpoint::Completion => (
            json!({"index": 0, "text": choice["text"], "logprobs": Value::Null, "finish_reason": Value::Null}),
            json!({"index": 0, "text": "", "logprobs": Value::Null, "finish_reason": finish}),
        ),
    };
    let mut chunks = vec![
        envelope(json!([text_choice])).to_string(),
        envelope(json!([finish_choice])).to_string(),
    ];
    if include_usage {
        let mut last = envelope(json!([]));
        last["usage"] = response["usage"].clone();
        chunks.push(last.to_string());
    }
    chunks.push("[DONE]".to_string());
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_replay_carries_the_whole_text_and_ends_with_done() {
        let response = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        });
        let chunks = replay_chunks(&response, Endpoint::Chat, true);
        assert_eq!(chunks.len(), 4);
        let first: Value = serde_json::from_str(&chunks[0]).unwrap();
        assert_eq!(first["choices"][0]["delta"]["content"], "Hello there");
        assert_eq!(first["object"], "chat.completion.chunk");
        let finish: Value = serde_json::from_str(&chunks[1]).unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        let usage: Value = serde_json::from_str(&chunks[2]).unwrap();
        assert_eq!(usage["usage"]["total_tokens"], 5);
        assert_eq!(chunks[3], "[DONE]");
        assert_eq!(replay_chunks(&response, Endpoint::Chat, false).len(), 3);
    }
}
