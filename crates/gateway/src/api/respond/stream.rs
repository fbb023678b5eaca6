//! A streamed answer: server-sent events in OpenAI's chunk shapes, ending
//! with `data: [DONE]`. Each choice (`n`) is its own generation; their chunks
//! interleave as they come, each naming its choice's index. A choice is
//! settled before its finishing chunk; an error (a generation's, the
//! router's, or a settlement's) becomes the stream's last event before
//! `[DONE]`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;

use super::envelope::{self, ChoiceBody, ChunkParts, LogprobEntries, ResponseMeta};
use super::reading::Reading;
use super::source::Source;
use super::{AnswerUsage, Ending, Event};
use crate::api::error::ApiError;
use crate::api::route::{RouteReason, Tier};
use crate::api::tools::calls::Delta;
use crate::api::validate::Endpoint;
use crate::core::CommittedToken;

/// Turns one choice's events into the data of its server-sent events.
pub(super) struct StreamShape {
    meta: Arc<ResponseMeta>,
    choice: u32,
    logprobs: LogprobEntries,
    reading: Reading,
}

impl StreamShape {
    pub(super) fn new(meta: Arc<ResponseMeta>, choice: u32) -> StreamShape {
        let reading = Reading::new(&meta);
        let logprobs = LogprobEntries::new(&meta);
        StreamShape {
            meta,
            choice,
            logprobs,
            reading,
        }
    }

    fn chunk(
        &self,
        text: &str,
        logprobs: Value,
        finish: Option<&str>,
        first: bool,
        fleetgrid: Option<Value>,
    ) -> String {
        let parts = ChunkParts {
            choice: self.choice,
            text,
            logprobs,
            finish,
            first,
        };
        envelope::chunk(&self.meta, parts, fleetgrid)
    }

    /// The first chunk: the assistant's role (chat), the echoed prompt
    /// (completions that asked for it) and the route a routed answer starts
    /// on. A fleet completion without echo has none; one whose prompt is
    /// scored opens when the scores come ([`StreamShape::prompt_scores`]).
    pub(super) fn opening(&mut self) -> Option<String> {
        if self.meta.scores_prompt() {
            return None;
        }
        let opening = match self.meta.endpoint {
            Endpoint::Chat => String::new(),
            Endpoint::Completion => self.meta.echo_prompt.clone().unwrap_or_default(),
        };
        self.reading.text(&opening);
        let route = envelope::opening_route(&self.meta);
        let is_chat = self.meta.endpoint == Endpoint::Chat;
        (is_chat || !opening.is_empty() || route.is_some())
            .then(|| self.chunk(&opening, Value::Null, None, true, route))
    }

    /// The first chunk of a completion whose prompt is scored: the echoed prompt with its
    /// tokens' log-probabilities.
    pub(super) fn prompt_scores(&mut self, scores: &[CommittedToken]) -> String {
        let prompt = self.meta.echo_prompt.clone().unwrap_or_default();
        self.reading.text(&prompt);
        self.logprobs.push_prompt(&self.meta, scores);
        let logprobs = self.logprobs.take(&self.meta);
        self.chunk(&prompt, logprobs, None, true, None)
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
                    Delta::Content(text) => Some(self.chunk(text, logprobs, None, false, None)),
                    call => envelope::call_chunk(&self.meta, self.choice, call, logprobs),
                }
            })
            .collect()
    }

    /// The chunk that announces the cloud taking over a started answer.
    pub(super) fn handoff(&self, reason: &RouteReason) -> String {
        let route = envelope::route_json(Tier::FleetThenCloud, reason);
        self.chunk("", Value::Null, None, false, Some(route))
    }

    /// Reads the end of the choice's text: the chunks it still makes.
    pub(super) fn read_rest(&mut self, ending: &Ending) -> Vec<String> {
        let mut deltas = self.reading.text(&ending.rest);
        deltas.extend(self.reading.finish());
        self.chunks(deltas)
    }

    /// The settled choice's finishing chunk (with a routed answer's summary). Call once its
    /// end was read ([`StreamShape::read_rest`]).
    pub(super) fn finishing(&mut self, ending: &Ending) -> String {
        let summary = ending.route.as_ref().map(envelope::summary_json);
        let logprobs = self.logprobs.take(&self.meta);
        let finish_reason = self.reading.finish_reason(ending.finish_reason);
        self.chunk("", logprobs, Some(finish_reason), false, summary)
    }

    /// The non-streaming body of the whole answer, kept for an idempotent replay (without
    /// logprobs); one choice only. Call after [`StreamShape::read_rest`].
    pub(super) fn kept_body(&self, ending: &Ending) -> Value {
        let choice = ChoiceBody {
            said: self.reading.said(),
            logprobs: Value::Null,
            finish_reason: self.reading.finish_reason(ending.finish_reason),
        };
        envelope::body(
            &self.meta,
            vec![choice],
            &ending.usage,
            ending.route.as_ref(),
        )
    }
}

/// The stream's error event: the error's OpenAI body.
fn error_data(error: &ApiError) -> String {
    error.body_json()
}

/// A choice's next event, with the choice and its source handed back.
type NextEvent = Pin<Box<dyn Future<Output = (usize, Source, Event)> + Send>>;

fn next_of(choice: usize, mut source: Source) -> NextEvent {
    Box::pin(async move {
        let event = source.next().await;
        (choice, source, event)
    })
}

/// Streams the answer of every source, one choice each. The headers go out at once; for a
/// routed answer they name the tier it started on.
pub(super) fn stream(meta: ResponseMeta, sources: Vec<Source>) -> Response {
    let response_headers = envelope::headers(&meta.id, &meta.route);
    let meta = Arc::new(meta);
    let events = async_stream::stream! {
        let keeps_body = sources.len() == 1 && sources[0].keeps_body();
        let mut shapes: Vec<StreamShape> = (0..sources.len())
            .map(|choice| StreamShape::new(Arc::clone(&meta), u32::try_from(choice).unwrap_or(u32::MAX)))
            .collect();
        for shape in &mut shapes {
            if let Some(opening) = shape.opening() {
                yield Ok::<SseEvent, Infallible>(SseEvent::default().data(opening));
            }
        }
        let mut pending: FuturesUnordered<NextEvent> = sources
            .into_iter()
            .enumerate()
            .map(|(choice, source)| next_of(choice, source))
            .collect();
        let mut usage = AnswerUsage::default();
        let mut failed = false;
        while let Some((choice, mut source, event)) = pending.next().await {
            let shape = &mut shapes[choice];
            match event {
                Event::Text { text, token } => {
                    for chunk in shape.text(&text, token.as_ref()) {
                        yield Ok(SseEvent::default().data(chunk));
                    }
                }
                Event::PromptScores(scores) => {
                    yield Ok(SseEvent::default().data(shape.prompt_scores(&scores)));
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
                        failed = true;
                        break;
                    }
                    for chunk in rest {
                        yield Ok(SseEvent::default().data(chunk));
                    }
                    yield Ok(SseEvent::default().data(shape.finishing(&ending)));
                    usage = usage.plus(&ending.usage);
                    // This choice is done; its source goes with it.
                    continue;
                }
                Event::Failed(error) => {
                    // The other choices are cancelled when the stream ends, and pay for what
                    // they made.
                    yield Ok(SseEvent::default().data(error_data(&error)));
                    failed = true;
                    break;
                }
            }
            pending.push(next_of(choice, source));
        }
        if !failed && meta.include_usage {
            yield Ok(SseEvent::default().data(envelope::usage_chunk(&meta, &usage)));
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    (
        response_headers,
        Sse::new(events).keep_alive(KeepAlive::default()),
    )
        .into_response()
}
