//! A streamed answer: server-sent events in OpenAI's chunk shapes, ending
//! with `data: [DONE]`. The answer is settled before its finishing chunk;
//! an error (the generation's, the router's, or the settlement's) becomes
//! the stream's last event before `[DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::envelope::{self, LogprobEntries, ResponseMeta};
use super::source::Source;
use super::{Ending, Event};
use crate::api::error::ApiError;
use crate::api::route::{RouteReason, Tier};
use crate::api::validate::Endpoint;
use crate::core::CommittedToken;

/// Turns an answer's events into the data of its server-sent events.
pub(super) struct StreamShape {
    meta: ResponseMeta,
    logprobs: LogprobEntries,
    /// The whole text, kept only when the settlement needs the body.
    whole_text: Option<String>,
}

impl StreamShape {
    pub(super) fn new(meta: ResponseMeta, keep_body: bool) -> StreamShape {
        StreamShape {
            meta,
            logprobs: LogprobEntries::default(),
            whole_text: keep_body.then(String::new),
        }
    }

    /// The first chunk: the assistant's role (chat), the echoed prompt
    /// (completions that asked for it) and the route a routed answer starts
    /// on. A fleet completion without echo has none.
    pub(super) fn opening(&mut self) -> Option<String> {
        let opening = match self.meta.endpoint {
            Endpoint::Chat => String::new(),
            Endpoint::Completion => self.meta.echo_prompt.clone().unwrap_or_default(),
        };
        if let Some(whole) = &mut self.whole_text {
            whole.push_str(&opening);
        }
        let route = envelope::opening_route(&self.meta);
        let is_chat = self.meta.endpoint == Endpoint::Chat;
        (is_chat || !opening.is_empty() || route.is_some())
            .then(|| envelope::chunk(&self.meta, &opening, Value::Null, None, true, route))
    }

    /// A chunk for the text released; none while it is held back.
    pub(super) fn text(&mut self, text: &str, token: Option<&CommittedToken>) -> Option<String> {
        self.logprobs.push(&self.meta, token);
        if let Some(whole) = &mut self.whole_text {
            whole.push_str(text);
        }
        (!text.is_empty()).then(|| {
            let logprobs = self.logprobs.take(&self.meta);
            envelope::chunk(&self.meta, text, logprobs, None, false, None)
        })
    }

    /// The chunk that announces the cloud taking over a started answer.
    pub(super) fn handoff(&self, reason: &RouteReason) -> String {
        let route = envelope::route_json(Tier::FleetThenCloud, reason);
        envelope::chunk(&self.meta, "", Value::Null, None, false, Some(route))
    }

    /// The non-streaming body of the answer, when the settlement keeps it
    /// for an idempotent replay (without logprobs).
    pub(super) fn kept_body(&self, ending: &Ending) -> Option<Value> {
        let whole = self.whole_text.as_ref()?;
        let text = format!("{whole}{}", ending.rest);
        Some(envelope::body(&self.meta, &text, Value::Null, ending))
    }

    /// The settled answer's last chunks: the held-back rest of its text,
    /// the finishing chunk (with a routed answer's summary), and the usage
    /// if the client asked for it.
    pub(super) fn ending(&mut self, ending: &Ending) -> Vec<String> {
        let mut chunks = Vec::with_capacity(3);
        if !ending.rest.is_empty() {
            let logprobs = self.logprobs.take(&self.meta);
            chunks.push(envelope::chunk(
                &self.meta,
                &ending.rest,
                logprobs,
                None,
                false,
                None,
            ));
        }
        let summary = ending.route.as_ref().map(envelope::summary_json);
        let logprobs = self.logprobs.take(&self.meta);
        chunks.push(envelope::chunk(
            &self.meta,
            "",
            logprobs,
            Some(ending.finish_reason),
            false,
            summary,
        ));
        if self.meta.include_usage {
            chunks.push(envelope::usage_chunk(&self.meta, &ending.usage));
        }
        chunks
    }
}

/// The stream's error event: the error's OpenAI body.
fn error_data(error: &ApiError) -> String {
    error.body_json()
}

/// Streams the answer. The headers go out at once; for a routed answer
/// they name the tier it started on.
pub(super) fn stream(meta: ResponseMeta, mut source: Source) -> Response {
    let response_headers = envelope::headers(&meta.id, &meta.route);
    let events = async_stream::stream! {
        let mut shape = StreamShape::new(meta, source.keeps_body());
        if let Some(opening) = shape.opening() {
            yield Ok::<SseEvent, Infallible>(SseEvent::default().data(opening));
        }
        loop {
            match source.next().await {
                Event::Text { text, token } => {
                    if let Some(chunk) = shape.text(&text, token.as_ref()) {
                        yield Ok(SseEvent::default().data(chunk));
                    }
                }
                Event::Handoff(reason) => yield Ok(SseEvent::default().data(shape.handoff(&reason))),
                Event::Start { .. } => {}
                Event::Finished(ending) => {
                    let body = shape.kept_body(&ending);
                    if let Err(error) = source.settle(body.as_ref()).await {
                        yield Ok(SseEvent::default().data(error_data(&error)));
                        break;
                    }
                    for chunk in shape.ending(&ending) {
                        yield Ok(SseEvent::default().data(chunk));
                    }
                    break;
                }
                Event::Failed(error) => {
                    yield Ok(SseEvent::default().data(error_data(&error)));
                    break;
                }
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    (
        response_headers,
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
        .into_response()
}
