//! The one response path: fleet answers (a named fleet model) and routed
//! answers (`auto`, `cloud/<model>`) become the same OpenAI shapes, one JSON
//! body or a server-sent event stream whose text is exactly the body's text.
//!
//! Both feed the same [`Event`]s: a fleet answer's come from the core's
//! updates (`source::FleetAnswer`: text assembled with stop sequences held
//! back), a routed answer's from its driver (`route_drive`), which releases
//! text only when the router allows it. `envelope` shapes bodies, chunks,
//! usage, `finish_reason`, the `fleetgrid` field and the headers; `body` and
//! `stream` are the two ways an answer is sent, and the one place where an
//! error becomes the HTTP error or the stream's error event.
//!
//! **Invariant:** an answer is settled before its final body or finishing
//! chunk and `[DONE]`. A fleet answer settles here (`Source::settle`); a
//! routed one before its driver sends `Finished`. A client that hangs up is
//! charged for what was made: for a fleet answer the `CancelGuard`, dropped
//! with the response, cancels the generation and settles it; for a routed
//! one the driver sees its channel close.
//!
//! Which tier served and why: the `x-fleetgrid-tier` and
//! `x-fleetgrid-route-reason` headers and a `fleetgrid` field. A stream's
//! headers go out when its first tier starts (for a routed answer after the
//! cascade's hold-back), so they name that tier; a routed stream's first
//! chunk repeats it, a handoff chunk announces the cloud taking over, and
//! the finishing chunk carries the final tier, reason and each part's usage.

mod body;
mod envelope;
mod reading;
mod source;
mod stream;
#[cfg(test)]
mod tests;

use axum::response::Response;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::route::{RouteReason, RouteSummary, Tier};
use crate::core::CommittedToken;

pub(super) use crate::api::tools::calls::Delta;
pub use envelope::ResponseMeta;
pub(super) use source::{generation_error, request_timed_out, Source};
pub use source::{CancelGuard, FleetAnswer};

/// What an answer says, in order: for a routed answer `Start` once (before
/// any text); for a fleet answer that asked, `PromptScores` once; then `Text`
/// and at most one `Handoff`; then `Finished` or
/// `Failed`. A `Failed` before a routed answer's `Start` becomes the HTTP
/// error itself.
#[derive(Debug)]
pub(super) enum Event {
    Start {
        tier: Tier,
        reason: RouteReason,
        model: String,
    },
    /// Text the client may see (possibly none yet, while a fleet answer
    /// holds back a possible stop sequence) and the token it came from, for
    /// logprobs.
    Text {
        text: String,
        token: Option<CommittedToken>,
    },
    /// The prompt's tokens from the second on, each with its log-probability given the ones
    /// before it (a completion asking for `echo` with `logprobs`): before any `Text`.
    PromptScores(Vec<CommittedToken>),
    /// A part of a tool call the answer's source read itself (a routed answer's cloud call).
    Call(crate::api::tools::calls::Delta),
    Handoff(RouteReason),
    Finished(Box<Ending>),
    Failed(ApiError),
}

/// How an answer ended.
#[derive(Debug)]
pub(super) struct Ending {
    /// Text held back until the end (a fleet answer's undecided tail).
    pub rest: String,
    pub finish_reason: &'static str,
    pub usage: AnswerUsage,
    /// How a routed answer ended; `None` for a fleet model's.
    pub route: Option<RouteSummary>,
}

impl Ending {
    /// The end of a routed answer, settled by its driver.
    pub(super) fn routed(summary: RouteSummary) -> Ending {
        Ending {
            rest: String::new(),
            finish_reason: summary.finish_reason,
            usage: routed_usage(&summary),
            route: Some(summary),
        }
    }
}

/// The usage the client reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct AnswerUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// `prompt_tokens_details.cached_tokens`: fleet answers only.
    pub cached_prompt_tokens: Option<u32>,
    /// `completion_tokens_details`' prediction counts: answers to a request with `prediction`.
    pub prediction: Option<PredictionUsage>,
}

/// How an answer followed the request's `prediction`: `accepted`, the prediction's tokens it
/// took as they stood, from its first token to where it parted from them; `rejected`, the rest
/// of the prediction. Counted on the answer's tokens, whichever engine made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PredictionUsage {
    pub accepted: u32,
    pub rejected: u32,
}

/// How far an answer follows a prediction (a request's `prediction`, the exact cascade's
/// draft): the prediction's tokens it took as they stood, from its first token up to where it
/// parted from them.
pub(in crate::api) struct Followed {
    tokens: Vec<i32>,
    taken: usize,
    parted: bool,
}

impl Followed {
    pub(in crate::api) fn new(tokens: Vec<i32>) -> Followed {
        Followed {
            tokens,
            taken: 0,
            parted: false,
        }
    }

    /// The answer's next token.
    pub(in crate::api) fn push(&mut self, token: i32) {
        if !self.parted && self.tokens.get(self.taken) == Some(&token) {
            self.taken += 1;
        } else {
            self.parted = true;
        }
    }

    /// The prediction's tokens taken so far.
    pub(in crate::api) fn taken(&self) -> u32 {
        u32::try_from(self.taken).unwrap_or(u32::MAX)
    }

    /// Whether the count is final: the answer parted from the prediction or took all of it.
    pub(in crate::api) fn settled(&self) -> bool {
        self.parted || self.taken == self.tokens.len()
    }

    fn usage(&self) -> PredictionUsage {
        PredictionUsage {
            accepted: self.taken(),
            rejected: u32::try_from(self.tokens.len() - self.taken).unwrap_or(u32::MAX),
        }
    }
}

impl AnswerUsage {
    /// The usage of two generations of one answer (its choices), each billed: each
    /// prefilled its prompt, so the prompt counts once per choice.
    pub(super) fn plus(&self, other: &AnswerUsage) -> AnswerUsage {
        AnswerUsage {
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            cached_prompt_tokens: match (self.cached_prompt_tokens, other.cached_prompt_tokens) {
                (None, None) => None,
                (mine, theirs) => Some(mine.unwrap_or(0) + theirs.unwrap_or(0)),
            },
            prediction: match (self.prediction, other.prediction) {
                (None, None) => None,
                (mine, theirs) => {
                    let (mine, theirs) = (mine.unwrap_or_default(), theirs.unwrap_or_default());
                    Some(PredictionUsage {
                        accepted: mine.accepted + theirs.accepted,
                        rejected: mine.rejected + theirs.rejected,
                    })
                }
            },
        }
    }
}

/// The usage the tenant is charged for: the prompt once, as the tier that
/// started the answer counted it, and the sent tokens of each tier that
/// contributed. Edge tokens that were discarded are not in it (they are in
/// `fleetgrid.usage.edge.discarded_tokens`), nor is the cloud's re-prefill
/// after a handoff (in `fleetgrid.usage.cloud.prompt_tokens`).
fn routed_usage(summary: &RouteSummary) -> AnswerUsage {
    if let Some(answer) = summary.answer_tokens {
        return AnswerUsage {
            prompt_tokens: answer.prompt,
            completion_tokens: answer.completion,
            cached_prompt_tokens: None,
            prediction: None,
        };
    }
    let edge_counts = matches!(summary.tier, Tier::Fleet | Tier::FleetThenCloud);
    let (edge_prompt, edge_completion) = match summary.edge {
        Some(edge) if edge_counts => (edge.prompt_tokens, edge.completion_tokens),
        _ => (0, 0),
    };
    let (cloud_prompt, cloud_completion) = summary.cloud.map_or((0, 0), |cloud| {
        (cloud.prompt_tokens, cloud.completion_tokens)
    });
    let prompt_tokens = if summary.tier == Tier::Cloud {
        cloud_prompt
    } else {
        edge_prompt
    };
    AnswerUsage {
        prompt_tokens,
        completion_tokens: edge_completion + cloud_completion,
        cached_prompt_tokens: None,
        prediction: None,
    }
}

/// Answers from `sources`, one per generation (`n`, `best_of`): a stream or a whole body,
/// as the request asked.
pub(super) async fn answer(meta: ResponseMeta, sources: Vec<Source>) -> Result<Response, ApiError> {
    if meta.stream {
        Ok(stream::stream(meta, sources))
    } else {
        body::collect(meta, sources).await
    }
}

/// Waits for a routed answer's first tier to start (or the request to
/// fail), then answers.
pub(super) async fn routed(
    mut meta: ResponseMeta,
    mut events: mpsc::Receiver<Event>,
) -> Result<Response, ApiError> {
    match events.recv().await {
        Some(Event::Start {
            tier,
            reason,
            model,
        }) => meta.start_routed(tier, reason, model),
        Some(Event::Failed(error)) => return Err(error),
        Some(other) => {
            tracing::error!(request_id = %meta.id, event = ?other, "routed response did not start with its tier");
            return Err(ApiError::internal());
        }
        None => {
            tracing::error!(request_id = %meta.id, "routing ended without an answer");
            return Err(ApiError::internal());
        }
    }
    answer(meta, vec![Source::Routed(events)]).await
}
