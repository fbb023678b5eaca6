//! Turning a generation's updates into an OpenAI response: one JSON body, or
//! a server-sent event stream whose text is exactly the JSON body's text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::TextAssembler;
use scheduler::RequestId;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::admission::RequestSlot;
use super::error::ApiError;
use super::validate::{Endpoint, ValidatedRequest};
use crate::billing_finish::{CancelCharge, Finisher};
use crate::limits;
use cell_api::{Cell, CommittedToken, FinishReason, GenerationError, Update, Usage};

/// Owns a generation's updates. Cancels the generation when the client's
/// response is dropped before the generation's end was read (the client
/// disconnected), charging what was made until then (`CancelCharge`): all
/// of it when the generation had finished and its end was still queued.
/// Holds the gateway permit for as long as the response lives.
pub struct CancelGuard {
    cell: Arc<dyn Cell>,
    request: RequestId,
    updates: mpsc::Receiver<Update>,
    armed: bool,
    charge: Option<CancelCharge>,
    _permit: RequestSlot,
}

impl CancelGuard {
    pub fn new(
        cell: Arc<dyn Cell>,
        request: RequestId,
        updates: mpsc::Receiver<Update>,
        permit: RequestSlot,
    ) -> CancelGuard {
        CancelGuard {
            cell,
            request,
            updates,
            armed: true,
            charge: None,
            _permit: permit,
        }
    }

    /// Charges the client for what the generation made if it cancels.
    pub fn charge_on_cancel(&mut self, charge: CancelCharge) {
        self.charge = Some(charge);
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Waits for the next update, until the whole request's deadline.
    async fn next(&mut self, deadline: Instant) -> Result<Update, ApiError> {
        next_update(&mut self.updates, deadline).await
    }

    /// The metering of a generation that finished before the cancel,
    /// whose end was never read.
    fn queued_end(&mut self) -> Option<crate::billing_meter::Metering> {
        while let Ok(update) = self.updates.try_recv() {
            if let Update::Finished { metering, .. } = update {
                return Some(metering);
            }
        }
        None
    }

    /// The generation is cancelled because the platform failed it (a
    /// timeout), not the client: nothing is charged.
    fn forgo_charge(&mut self) {
        self.charge = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(request_id = self.request.0, "client went away; cancelling");
            let metering = self.cell.cancel(self.request).or_else(|| self.queued_end());
            if let (Some(metering), Some(charge)) = (metering, self.charge.take()) {
                charge.settle_in_background(metering);
            }
        }
    }
}

/// What every response chunk repeats.
pub struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
    logprobs: bool,
    echo_prompt: Option<String>,
    stop: Vec<String>,
    /// When the whole request times out, however its tokens trickle in.
    deadline: Instant,
}

impl ResponseMeta {
    /// `request_timeout` bounds the whole request from now.
    pub fn new(
        id: String,
        request: &ValidatedRequest,
        prompt_text: String,
        request_timeout: Duration,
    ) -> ResponseMeta {
        ResponseMeta {
            deadline: Instant::now() + request_timeout,
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or_default(),
            model: request.model.name.clone(),
            endpoint: request.endpoint,
            include_usage: request.include_usage,
            logprobs: request.logprobs,
            echo_prompt: request.echo.then_some(prompt_text),
            stop: request.stop.clone(),
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, streaming: bool, choices: Value) -> Value {
        let mut envelope = json!({
            "id": self.id,
            "object": self.object(streaming),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        });
        if !streaming {
            // Which tier served and why, as routed responses say it too.
            envelope["fleetgrid"] = json!({"tier": "fleet", "reason": EXPLICIT_FLEET});
        }
        envelope
    }
}

/// The route reason of a request that named a fleet model.
const EXPLICIT_FLEET: &str = "explicit_fleet";

fn headers(meta: &ResponseMeta) -> [(HeaderName, HeaderValue); 3] {
    [
        (
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_str(&meta.id).unwrap_or(HeaderValue::from_static("unknown")),
        ),
        (
            HeaderName::from_static("x-fleetgrid-tier"),
            HeaderValue::from_static("fleet"),
        ),
        (
            HeaderName::from_static("x-fleetgrid-route-reason"),
            HeaderValue::from_static(EXPLICIT_FLEET),
        ),
    ]
}

/// Waits for the next update, until the whole request's deadline.
async fn next_update(
    updates: &mut mpsc::Receiver<Update>,
    deadline: Instant,
) -> Result<Update, ApiError> {
    match tokio::time::timeout_at(deadline, updates.recv()).await {
        Ok(Some(update)) => Ok(update),
        Ok(None) => {
            tracing::error!("generation ended without an answer");
            Err(ApiError::internal())
        }
        Err(_) => Err(request_timed_out()),
    }
}

/// 504: the request passed its whole-request time bound.
pub(super) fn request_timed_out() -> ApiError {
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: "the generation took longer than the request timeout".into(),
        kind: "server_error",
        param: None,
        code: Some("timeout"),
        retry_after_seconds: None,
    }
}

pub(super) fn generation_error(error: GenerationError) -> ApiError {
    match error {
        GenerationError::Rejected {
            reason,
            retry_after_seconds,
        } => ApiError::unavailable(reason, retry_after_seconds),
        GenerationError::TooManyAttempts => ApiError::unavailable(
            "the generation was interrupted too many times; retry",
            limits::RETRY_AFTER_DEFAULT_SECONDS,
        ),
        GenerationError::Failed(message) => ApiError {
            status: StatusCode::BAD_GATEWAY,
            message: format!("the generation failed: {message}"),
            kind: "server_error",
            param: None,
            code: Some("generation_failed"),
            retry_after_seconds: None,
        },
    }
}

/// Logprob entries of the tokens committed since the last chunk.
#[derive(Default)]
struct LogprobEntries {
    chat: Vec<Value>,
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
}

impl LogprobEntries {
    /// Records a token's logprobs in the endpoint's format; nothing at all
    /// when the client did not ask for logprobs, the common case.
    fn push(&mut self, meta: &ResponseMeta, token: &CommittedToken) {
        if !meta.logprobs {
            return;
        }
        let text = String::from_utf8_lossy(&token.piece).into_owned();
        match meta.endpoint {
            Endpoint::Chat => {
                let top: Vec<Value> = token
                    .top_logprobs
                    .iter()
                    .map(|(_, piece, logprob)| json!({"token": String::from_utf8_lossy(piece), "logprob": logprob, "bytes": piece}))
                    .collect();
                self.chat.push(json!({"token": text, "logprob": token.logprob, "bytes": token.piece, "top_logprobs": top}));
            }
            Endpoint::Completion => {
                let top: serde_json::Map<String, Value> = token
                    .top_logprobs
                    .iter()
                    .map(|(_, piece, logprob)| {
                        (String::from_utf8_lossy(piece).into_owned(), json!(logprob))
                    })
                    .collect();
                self.tokens.push(text);
                self.token_logprobs.push(token.logprob);
                self.top.push(Value::Object(top));
            }
        }
    }

    fn take(&mut self, meta: &ResponseMeta) -> Value {
        if !meta.logprobs {
            return Value::Null;
        }
        let taken = std::mem::take(self);
        match meta.endpoint {
            Endpoint::Chat => json!({ "content": taken.chat }),
            Endpoint::Completion => json!({
                "tokens": taken.tokens,
                "token_logprobs": taken.token_logprobs,
                "top_logprobs": taken.top,
            }),
        }
    }
}

fn finish_reason(reason: FinishReason, assembler: &TextAssembler) -> &'static str {
    if assembler.stopped() {
        return "stop";
    }
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    })
}

/// Non-streaming: waits for the whole generation, and settles it before
/// answering.
pub async fn collect(
    meta: ResponseMeta,
    mut guard: CancelGuard,
    mut finisher: Finisher,
) -> Result<Response, ApiError> {
    let mut assembler = TextAssembler::new(meta.stop.clone());
    let mut text = meta.echo_prompt.clone().unwrap_or_default();
    let mut logprobs = LogprobEntries::default();
    let (reason, usage, metering) = loop {
        match guard
            .next(meta.deadline)
            .await
            .inspect_err(|_| guard.forgo_charge())?
        {
            Update::Token(token) => {
                logprobs.push(&meta, &token);
                text.push_str(&assembler.push(&token.piece));
            }
            Update::Finished {
                reason,
                usage,
                metering,
            } => break (reason, usage, metering),
            Update::Failed(error) => {
                guard.disarm();
                return Err(generation_error(error));
            }
        }
    };
    guard.disarm();
    text.push_str(&assembler.finish());
    let finish = finish_reason(reason, &assembler);
    let choice = match meta.endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": logprobs.take(&meta),
            "finish_reason": finish,
        }),
        Endpoint::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": logprobs.take(&meta),
            "finish_reason": finish,
        }),
    };
    let mut body = meta.envelope(false, json!([choice]));
    body["usage"] = usage_json(usage);
    finisher.finish(&metering, Some(&body)).await?;
    Ok((headers(&meta), Json(body)).into_response())
}

/// The non-streaming body of a streamed response, kept for idempotent replay.
fn stored_body(meta: &ResponseMeta, text: &str, finish: &str, usage: Usage) -> Value {
    let choice = match meta.endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": Value::Null,
            "finish_reason": finish,
        }),
        Endpoint::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": Value::Null,
            "finish_reason": finish,
        }),
    };
    let mut body = meta.envelope(false, json!([choice]));
    body["usage"] = usage_json(usage);
    body
}

fn chunk(
    meta: &ResponseMeta,
    text: &str,
    logprobs: Value,
    finish: Option<&str>,
    first: bool,
) -> Event {
    let choice = match meta.endpoint {
        Endpoint::Chat => {
            let delta = match (first, finish) {
                (true, _) => json!({"role": "assistant", "content": text}),
                (false, Some(_)) if text.is_empty() => json!({}),
                _ => json!({"content": text}),
            };
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
        Endpoint::Completion => {
            json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    };
    Event::default().data(meta.envelope(true, json!([choice])).to_string())
}

/// Streaming: server-sent events, ending with `data: [DONE]`. The request is
/// settled before its finishing chunk.
pub fn stream(meta: ResponseMeta, mut guard: CancelGuard, mut finisher: Finisher) -> Response {
    let response_headers = headers(&meta);
    let events = async_stream::stream! {
        let mut assembler = TextAssembler::new(meta.stop.clone());
        let mut logprobs = LogprobEntries::default();
        let opening = match meta.endpoint {
            Endpoint::Chat => String::new(),
            Endpoint::Completion => meta.echo_prompt.clone().unwrap_or_default(),
        };
        // The whole text, kept only when an idempotent replay needs it.
        let mut whole_text = String::new();
        if finisher.wants_body() {
            whole_text.push_str(&opening);
        }
        if meta.endpoint == Endpoint::Chat || !opening.is_empty() {
            yield Ok::<Event, Infallible>(chunk(&meta, &opening, Value::Null, None, true));
        }
        loop {
            match guard.next(meta.deadline).await {
                Ok(Update::Token(token)) => {
                    logprobs.push(&meta, &token);
                    let text = assembler.push(&token.piece);
                    if finisher.wants_body() {
                        whole_text.push_str(&text);
                    }
                    if !text.is_empty() {
                        yield Ok(chunk(&meta, &text, logprobs.take(&meta), None, false));
                    }
                }
                Ok(Update::Finished { reason, usage, metering }) => {
                    guard.disarm();
                    let rest = assembler.finish();
                    let finish = finish_reason(reason, &assembler);
                    let body = finisher.wants_body().then(|| {
                        whole_text.push_str(&rest);
                        stored_body(&meta, &whole_text, finish, usage)
                    });
                    if let Err(error) = finisher.finish(&metering, body.as_ref()).await {
                        yield Ok(Event::default().data(ApiError::from(error).body_json()));
                        break;
                    }
                    if !rest.is_empty() {
                        yield Ok(chunk(&meta, &rest, logprobs.take(&meta), None, false));
                    }
                    yield Ok(chunk(&meta, "", logprobs.take(&meta), Some(finish), false));
                    if meta.include_usage {
                        let mut last = meta.envelope(true, json!([]));
                        last["usage"] = usage_json(usage);
                        yield Ok(Event::default().data(last.to_string()));
                    }
                    break;
                }
                Ok(Update::Failed(error)) => {
                    guard.disarm();
                    yield Ok(Event::default().data(generation_error(error).body_json()));
                    break;
                }
                Err(error) => {
                    // The guard stays armed: the generation is cancelled
                    // when this stream ends, uncharged (our timeout).
                    guard.forgo_charge();
                    yield Ok(Event::default().data(error.body_json()));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    (
        response_headers,
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
        .into_response()
}
