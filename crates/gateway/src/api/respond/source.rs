//! Where an answer's events come from: a fleet generation's updates from
//! the core, or the routing driver's channel. Both give the same `Event`s;
//! only a fleet answer settles in the response (a routed one is settled by
//! its driver before it sends `Finished`).

use std::sync::Arc;

use axum::http::StatusCode;
use engine::TextAssembler;
use scheduler::RequestId;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{AnswerUsage, Ending, Event, Followed};
use crate::api::admission::RequestSlot;
use crate::api::error::ApiError;
use crate::billing_finish::{CancelCharge, Finisher};
use crate::billing_meter::Metering;
use crate::limits;
use cell_api::{Cell, FinishReason, GenerationError, Update};

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
    /// The request's slots, shared by its choices' generations.
    _permit: Arc<RequestSlot>,
}

impl CancelGuard {
    pub fn new(
        cell: Arc<dyn Cell>,
        request: RequestId,
        updates: mpsc::Receiver<Update>,
        permit: Arc<RequestSlot>,
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

    /// The metering of a generation that finished before the cancel,
    /// whose end was never read.
    fn queued_end(&mut self) -> Option<Metering> {
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

/// A fleet generation as the response reads it: the core's updates turned
/// into text (stop sequences held back), and its charge settled when it
/// finishes.
pub struct FleetAnswer {
    guard: CancelGuard,
    finisher: Finisher,
    assembler: TextAssembler,
    /// When the whole request times out, however its tokens trickle in.
    deadline: Instant,
    /// What the core metered, once the generation finished.
    metering: Option<Metering>,
    /// The request's `prediction` as tokens, and how the answer has followed it so far.
    prediction: Option<Followed>,
}

impl FleetAnswer {
    /// `stop` are the request's stop sequences; `deadline` bounds the whole
    /// request.
    pub fn new(
        mut guard: CancelGuard,
        finisher: Finisher,
        stop: Vec<String>,
        deadline: Instant,
    ) -> FleetAnswer {
        guard.charge_on_cancel(finisher.cancel_charge());
        FleetAnswer {
            guard,
            finisher,
            assembler: TextAssembler::new(stop),
            deadline,
            metering: None,
            prediction: None,
        }
    }

    /// The answer's usage reports how it followed `prediction` (the request's, as tokens).
    #[must_use]
    pub fn predicted(mut self, prediction: Option<Vec<i32>>) -> FleetAnswer {
        self.prediction = prediction.map(Followed::new);
        self
    }

    async fn next(&mut self) -> Event {
        let update = match tokio::time::timeout_at(self.deadline, self.guard.updates.recv()).await {
            Ok(Some(update)) => update,
            Ok(None) => {
                tracing::error!("generation ended without an answer");
                return self.platform_failed(ApiError::internal());
            }
            Err(_) => return self.platform_failed(request_timed_out()),
        };
        match update {
            Update::PromptLogprobs(scores) => Event::PromptScores(scores),
            Update::Token(token) => {
                if let Some(prediction) = &mut self.prediction {
                    prediction.push(token.token_id);
                }
                Event::Text {
                    text: self.assembler.push(&token.piece),
                    token: Some(token),
                }
            }
            Update::Finished {
                reason,
                usage,
                metering,
            } => {
                self.guard.disarm();
                self.metering = Some(metering);
                let rest = self.assembler.finish();
                Event::Finished(Box::new(Ending {
                    rest,
                    finish_reason: finish_reason(reason, &self.assembler),
                    usage: AnswerUsage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        cached_prompt_tokens: Some(usage.cached_prompt_tokens),
                        prediction: self.prediction.as_ref().map(Followed::usage),
                    },
                    route: None,
                }))
            }
            Update::Failed(error) => {
                self.guard.disarm();
                Event::Failed(generation_error(error))
            }
        }
    }

    /// The guard stays armed: the generation is cancelled when the response
    /// ends, uncharged (the platform's fault, not the client's).
    fn platform_failed(&mut self, error: ApiError) -> Event {
        self.guard.forgo_charge();
        Event::Failed(error)
    }

    async fn settle(&mut self, body: Option<&Value>) -> Result<(), ApiError> {
        let Some(metering) = self.metering.take() else {
            tracing::error!(
                request_id = self.guard.request.0,
                "a fleet answer settled before it finished"
            );
            return Err(ApiError::internal());
        };
        self.finisher
            .finish(&metering, body)
            .await
            .map_err(ApiError::from)
    }
}

/// The events of one answer.
pub(in crate::api) enum Source {
    Fleet(Box<FleetAnswer>),
    /// The routing driver's events, `Start` already read.
    Routed(mpsc::Receiver<Event>),
}

impl Source {
    pub(super) async fn next(&mut self) -> Event {
        match self {
            Source::Fleet(fleet) => fleet.next().await,
            Source::Routed(events) => events.recv().await.unwrap_or_else(|| {
                tracing::error!("routing ended without finishing");
                Event::Failed(ApiError::internal())
            }),
        }
    }

    /// Whether settling needs the whole body (to keep it for replay).
    pub(super) fn keeps_body(&self) -> bool {
        match self {
            Source::Fleet(fleet) => fleet.finisher.wants_body(),
            Source::Routed(_) => false,
        }
    }

    /// Settles a finished answer before its end reaches the client; an
    /// error replaces that end. The routing driver settles before it sends
    /// `Finished`, so a routed answer has nothing left to settle.
    pub(super) async fn settle(&mut self, body: Option<&Value>) -> Result<(), ApiError> {
        match self {
            Source::Fleet(fleet) => fleet.settle(body).await,
            Source::Routed(_) => Ok(()),
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

/// 504: the request passed its whole-request time bound.
pub(in crate::api) fn request_timed_out() -> ApiError {
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: "the generation took longer than the request timeout".into(),
        kind: "server_error",
        param: None,
        code: Some("timeout"),
        retry_after_seconds: None,
    }
}

pub(in crate::api) fn generation_error(error: GenerationError) -> ApiError {
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
