//! A streamed answer: server-sent events in OpenAI's chunk shapes, ending
//! with `data: [DONE]`. The answer is settled before its finishing chunk;
//! an error (the generation's, the router's, or the settlement's) becomes
//! the stream's last event before `[DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::envelope::{self, LogprobEntries, ResponseMeta};
use super::reading::Reading;
use super::source::Source;
use super::{Ending, Event};
use crate::api::error::ApiError;
use crate::api::route::{RouteReason, Tier};
use crate::api::tools::calls::Delta;
use crate::api::validate::Endpoint;
use crate::core::CommittedToken;

/// Turns an answer's events into the data of its server-sent events.
pub(super) struct StreamShape {
    meta: ResponseMeta,
    logprobs: LogprobEntries,
    reading: Reading,
}

impl StreamShape {
    pub(super) fn new(meta: ResponseMeta) -> StreamShape {
        let reading = Reading::new(&meta);
        StreamShape {
            meta,
            logprobs: LogprobEntries::default(),
            reading,
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
        self.reading.text(&opening);
        let route = envelope::opening_route(&self.meta);
        let is_chat = self.meta.endpoint == Endpoint::Chat;
        (is_chat || !opening.is_empty() || route.is_some())
            .then(|| envelope::chunk(&self.meta, &opening, Value::Null, None, true, route))
    }

    /// The chunks for the text released; none while it is held back (or, with tools, while
    /// it is not yet known what it is).
    pub(super) fn text(&mut self, text: &str, token: Option<&CommittedToken>) -> Vec<String> {
        self.logprobs.push(&self.meta, token);
        let deltas = self.reading.text(text);
        self.chunks(deltas)
    }

    /// The chunk of a part of a tool call read by the answer's source.
    pub(super) fn call(&mut self, delta: Delta) -> Vec<String> {
        let deltas = self.reading.call(delta);
        self.chunks(deltas)
    }

    fn chunks(&mut self, deltas: Vec<Delta>) -> Vec<String> {
        deltas
            .iter()
            .filter_map(|delta| {
                let logprobs = self.logprobs.take(&self.meta);
                match delta {
                    Delta::Content(text) => Some(envelope::chunk(
                        &self.meta, text, logprobs, None, false, None,
                    )),
                    call => envelope::call_chunk(&self.meta, call, logprobs),
                }
            })
            .collect()
    }

    /// The chunk that announces the cloud taking over a started answer.
    pub(super) fn handoff(&self, reason: &RouteReason) -> String {
        let route = envelope::route_json(Tier::FleetThenCloud, reason);
        envelope::chunk(&self.meta, "", Value::Null, None, false, Some(route))
    }

    /// The settled answer's last chunks: the held-back rest of its text,
    /// the finishing chunk (with a routed answer's summary), and the usage
    /// if the client asked for it. Call once the answer's end was read
    /// ([`StreamShape::read_rest`]).
    pub(super) fn ending(&mut self, ending: &Ending, rest: Vec<String>) -> Vec<String> {
        let mut chunks = rest;
        let summary = ending.route.as_ref().map(envelope::summary_json);
        let logprobs = self.logprobs.take(&self.meta);
        let finish_reason = self.reading.finish_reason(ending.finish_reason);
        chunks.push(envelope::chunk(
            &self.meta,
            "",
            logprobs,
            Some(finish_reason),
            false,
            summary,
        ));
        if self.meta.include_usage {
            chunks.push(envelope::usage_chunk(&self.meta, &ending.usage));
        }
        chunks
    }

    /// Reads the end of the answer's text: the chunks it still makes.
    pub(super) fn read_rest(&mut self, ending: &Ending) -> Vec<String> {
        let mut deltas = self.reading.text(&ending.rest);
        deltas.extend(self.reading.finish());
        self.chunks(deltas)
    }

    /// The non-streaming body of the whole answer, kept for an idempotent replay (without
    /// logprobs). Call after [`StreamShape::read_rest`].
    pub(super) fn kept_body(&self, ending: &Ending) -> Value {
        let finish_reason = self.reading.finish_reason(ending.finish_reason);
        envelope::body(
            &self.meta,
            self.reading.said(),
            Value::Null,
            ending,
            finish_reason,
        )
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
        let keeps_body = source.keeps_body();
        let mut shape = StreamShape::new(meta);
        if let Some(opening) = shape.opening() {
            yield Ok::<SseEvent, Infallible>(SseEvent::default().data(opening));
        }
        loop {
            match source.next().await {
                Event::Text { text, token } => {
                    for chunk in shape.text(&text, token.as_ref()) {
                        yield Ok(SseEvent::default().data(chunk));
                    }
                }
                Event::Call(delta) => {
                    for chunk in shape.call(delta) {
                        yield Ok(SseEvent::default().data(chunk));
                    }
                }
                Event::Handoff(reason) => yield Ok(SseEvent::default().data(shape.handoff(&reason))),
                Event::Start { .. } => {}
                Event::Finished(ending) => {
                    let rest = shape.read_rest(&ending);
                    let body = keeps_body.then(|| shape.kept_body(&ending));
                    if let Err(error) = source.settle(body.as_ref()).await {
                        yield Ok(SseEvent::default().data(error_data(&error)));
                        break;
                    }
                    for chunk in shape.ending(&ending, rest) {
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
