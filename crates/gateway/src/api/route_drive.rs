//! The driver of one routed request: runs the router's [`RouteMachine`] and
//! carries out what it says, in order.
//!
//! The machine holds the whole `auto` / `cloud/<model>` policy (pre-route,
//! cascade, escalation, handoff, every fallback; see `router::machine`). The
//! driver owns the I/O: the edge generation through `Cell::submit`, the
//! `Upstream` cloud stream, the client's `out` channel, the request's
//! deadline and the money. Its one loop waits for the next edge update or
//! cloud chunk (or the client leaving, or the deadline), feeds it to the
//! machine and carries out the actions it gets back. Actions that ask a
//! question (the pre-route, the budget, a cloud slot, starting a tier) are
//! answered with an event at once.
//!
//! Money: the request is admitted once, before any work, for every model
//! that may serve it (`cloud/...`: the cloud model, and the edge model when
//! the fallback is the fleet; `auto`: both), so a tenant that cannot pay gets
//! 402 and nothing reaches a vehicle or the upstream. Each tier's work is
//! added to one `RoutedBooking` as it ends (`StopEdge`, the cloud's part at
//! `Finish`), discarded edge attempts are booked last with nothing charged,
//! and the whole request is settled once, before `Finished` (the final body,
//! or the last chunk and `[DONE]`). A client that goes away is settled for
//! the work done until then: the edge generation cut short with all its
//! tokens, the cloud's prompt and streamed text. A failed request is not
//! settled; dropping its booking releases the admission's hold.

mod exact;
mod money;
mod tiers;

use std::collections::VecDeque;
use std::sync::Arc;

use router::{Action, Event, Failure, RouteMachine};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::admission::RequestSlot;
use super::error::ApiError;
use super::respond::{self, Ending, Event as Reply};
use super::route::{RouteSummary, Target, Tier};
use super::validate::{Quality, ValidatedRequest};
use super::AppState;
use crate::billing_finish::RoutedBooking;
use crate::billing_meter::Metering;
use crate::cloud::{BudgetStatus, CloudTier, Fallback, UpstreamError};
use crate::store::TenantRecord;
use cell_api::GenerationError;

use money::upstream_error;
pub(super) use tiers::RoutedPrompt;
use tiers::{CloudCall, EdgeRun};

/// Why the driver stopped carrying out actions.
enum Stop {
    /// The client went away; the machine decides what is settled.
    ClientGone,
    Failed(ApiError),
}

type Flow<T> = Result<T, Stop>;

/// A routed request as the gateway hands it to its driver.
pub(super) struct RoutedRequest {
    pub request: ValidatedRequest,
    /// The prompt, rendered and tokenized once.
    pub prompt: RoutedPrompt,
    /// The response's id, also the request's id in the ledger.
    pub public_id: String,
}

pub(super) struct Routing {
    state: AppState,
    cloud: Arc<CloudTier>,
    tenant: TenantRecord,
    request: ValidatedRequest,
    public_id: String,
    out: mpsc::Sender<Reply>,
    /// The gateway's slots, held for as long as the request runs.
    _permit: RequestSlot,
    created_ms: i64,
    /// When the whole request times out, however the edge's tokens or the
    /// cloud's chunks trickle in.
    deadline: tokio::time::Instant,
    /// The prompt, rendered and tokenized once for every tier.
    prompt: RoutedPrompt,
    /// The request's one admission and the parts booked so far; `None`
    /// before admission and once settled.
    booking: Option<RoutedBooking>,
    /// Edge attempts discarded by an escalation, booked when the request
    /// settles.
    discarded_edge: Vec<Metering>,
    /// The cloud call the client's hang-up cut short, booked already.
    cut_cloud: Option<super::route::CloudPart>,
    /// The current (or last finished) edge generation.
    edge: Option<EdgeRun>,
    /// The current cloud call.
    cloud_call: Option<CloudCall>,
    /// The cloud slot reserved for the next cloud call.
    cloud_slot: Option<OwnedSemaphorePermit>,
    /// What the machine's failures refer to: the last budget read, edge
    /// refusal, edge failure and cloud failure.
    last_budget: Option<BudgetStatus>,
    last_edge_refusal: Option<ApiError>,
    last_edge_error: Option<GenerationError>,
    last_cloud_error: Option<UpstreamError>,
    /// Parts of the cloud's tool calls read with its last chunk, sent to the client once the
    /// machine has acted on that chunk (announced the tier, released its text).
    pending_calls: Vec<respond::Delta>,
}

impl Routing {
    pub(super) fn new(
        state: AppState,
        cloud: Arc<CloudTier>,
        tenant: TenantRecord,
        routed: RoutedRequest,
        out: mpsc::Sender<Reply>,
        permit: RequestSlot,
    ) -> Routing {
        let deadline = tokio::time::Instant::now() + state.request_timeout;
        let RoutedRequest {
            request,
            prompt,
            public_id,
        } = routed;
        Routing {
            state,
            cloud,
            tenant,
            request,
            public_id,
            out,
            _permit: permit,
            created_ms: crate::core::now_ms().0,
            deadline,
            prompt,
            booking: None,
            discarded_edge: Vec::new(),
            cut_cloud: None,
            edge: None,
            cloud_call: None,
            cloud_slot: None,
            last_budget: None,
            last_edge_refusal: None,
            last_edge_error: None,
            last_cloud_error: None,
            pending_calls: Vec::new(),
        }
    }

    pub(super) async fn run(mut self, target: Target) {
        let driven = match self.request.quality {
            Quality::Exact => self.drive_exact().await,
            Quality::Routed => self.drive(target).await,
        };
        if let Err(error) = driven {
            // Whatever still runs is stopped before the client hears why.
            self.edge = None;
            self.cloud_call = None;
            tracing::warn!(request_id = %self.public_id, error = %error.message, "routed request failed");
            let _ = self.out.send(Reply::Failed(error)).await;
        }
    }

    /// Admits the request, then runs the machine until it is done.
    async fn drive(&mut self, target: Target) -> Result<(), ApiError> {
        self.admit(target).await?;
        let mut machine = RouteMachine::new(self.setup(target));
        let mut actions: VecDeque<Action> = machine.start().into();
        loop {
            while let Some(action) = actions.pop_front() {
                match self.execute(action).await {
                    Ok(None) => {}
                    Ok(Some(answer)) => {
                        // A question is always the last action of its batch.
                        debug_assert!(actions.is_empty());
                        actions.extend(machine.handle(answer));
                    }
                    Err(Stop::ClientGone) => actions = machine.handle(Event::ClientGone).into(),
                    Err(Stop::Failed(error)) => return Err(error),
                }
            }
            for delta in std::mem::take(&mut self.pending_calls) {
                // A client gone is seen with the next event.
                if self.emit(Reply::Call(delta)).await.is_err() {
                    break;
                }
            }
            if machine.is_done() {
                return Ok(());
            }
            let event = match self.next_event().await {
                Ok(event) => event,
                Err(Stop::ClientGone) => Event::ClientGone,
                Err(Stop::Failed(error)) => return Err(error),
            };
            actions.extend(machine.handle(event));
        }
    }

    fn setup(&self, target: Target) -> router::Setup {
        let config = self.cloud.upstream.config();
        let target = match target {
            Target::Cloud => router::Target::Cloud {
                fleet_fallback: config.fallback == Fallback::Edge,
            },
            Target::Auto => router::Target::Auto,
        };
        router::Setup {
            target,
            cloud_model: config.public_name(),
            prompt_tokens: len_u32(&self.prompt.edge_tokens),
            max_tokens: self.request_max_tokens(),
            can_hand_off: self.can_hand_off(),
            incremental: self.cloud.router.config().incremental,
        }
    }

    /// Waits for what the running tier says next.
    async fn next_event(&mut self) -> Flow<Event> {
        let out = &self.out;
        let deadline = self.deadline;
        if let Some(edge) = self.edge.as_mut().filter(|edge| edge.is_running()) {
            let received = tokio::select! {
                () = out.closed() => return Err(Stop::ClientGone),
                received = tokio::time::timeout_at(deadline, edge.next()) => received,
            };
            if let Some(error) = edge.take_error() {
                self.last_edge_error = Some(error);
            }
            return match received {
                Ok(Some(event)) => Ok(event),
                Ok(None) => {
                    tracing::error!(request_id = %self.public_id, "edge generation ended without an answer");
                    Err(Stop::Failed(ApiError::internal()))
                }
                Err(_) => Ok(Event::Deadline),
            };
        }
        if let Some(call) = self.cloud_call.as_mut() {
            // The cloud call has its own bounds; the whole request's time
            // (edge part included) is bounded here.
            let next = tokio::select! {
                () = out.closed() => return Err(Stop::ClientGone),
                () = tokio::time::sleep_until(deadline) => return Ok(Event::Deadline),
                next = call.stream.next() => next,
            };
            let stem = self.public_id.rsplit('-').next().unwrap_or_default();
            return Ok(match next {
                Ok(Some(mut chunk)) => {
                    let parts = std::mem::take(&mut chunk.calls);
                    self.pending_calls.extend(call.calls.read(parts, stem));
                    Event::CloudChunk {
                        text: chunk.text,
                        finish_reason: chunk.finish_reason,
                        usage: chunk.usage.map(|usage| router::CloudUsage {
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                        }),
                    }
                }
                Ok(None) => Event::CloudFinished,
                Err(error) => self.cloud_failed(error),
            });
        }
        tracing::error!(request_id = %self.public_id, "a routed request waits on no tier");
        Err(Stop::Failed(ApiError::internal()))
    }

    /// Carries out one action; a question is answered with its event.
    async fn execute(&mut self, action: Action) -> Flow<Option<Event>> {
        match action {
            Action::PreRoute => {
                let decision = self.cloud.router.pre_route(&self.router_prompt());
                tracing::debug!(request_id = %self.public_id, reason = %decision.reason, "pre-route");
                Ok(Some(Event::PreRouted(decision)))
            }
            Action::CheckBudget => Ok(Some(Event::Budget(self.check_budget().await?))),
            Action::ReserveCloud => {
                self.cloud_slot = self.cloud.upstream.try_permit();
                let granted = self.cloud_slot.is_some();
                Ok(Some(Event::CloudSlot { granted }))
            }
            Action::StartEdge {
                continue_from,
                max_tokens,
            } => Ok(Some(self.start_edge(&continue_from, max_tokens).await)),
            Action::StopEdge(text) => {
                self.stop_edge(text).await?;
                Ok(None)
            }
            Action::StartCloud { prompt, max_tokens } => {
                Ok(Some(self.start_cloud(prompt, max_tokens).await?))
            }
            Action::Announce { tier, reason } => {
                let model = match tier {
                    Tier::Fleet | Tier::FleetThenCloud => self.request.model.name.clone(),
                    Tier::Cloud => self.cloud.upstream.config().public_name(),
                };
                self.emit(Reply::Start {
                    tier,
                    reason,
                    model,
                })
                .await?;
                Ok(None)
            }
            Action::AnnounceHandoff { reason } => {
                self.emit(Reply::Handoff(reason)).await?;
                Ok(None)
            }
            Action::Release { text } => {
                self.emit(Reply::Text { text, token: None }).await?;
                Ok(None)
            }
            Action::CutCloud { usage } => {
                let started_ms = self.cloud_started_ms();
                self.cut_cloud = self.book_cloud(usage, started_ms).ok();
                Ok(None)
            }
            Action::Finish(outcome) => {
                self.finish(outcome).await?;
                Ok(None)
            }
            Action::Fail(failure) => Err(Stop::Failed(self.failure_error(failure))),
            Action::SettleCancelled => {
                self.settle_cancelled().await;
                Ok(None)
            }
        }
    }

    /// Books the cloud's part, settles the request once and sends the end.
    async fn finish(&mut self, outcome: router::Outcome) -> Flow<()> {
        let cloud = match outcome.cloud {
            Some(usage) => {
                let started_ms = self.cloud_started_ms();
                Some(self.book_cloud(usage, started_ms)?)
            }
            None => None,
        };
        let charged = self.settle().await?;
        if let Some(part) = cloud {
            self.record_cloud(part).await;
        }
        let summary = RouteSummary {
            tier: outcome.tier,
            reason: outcome.reason,
            finish_reason: outcome.finish_reason,
            edge: outcome.edge,
            cloud,
            charged,
            answer_tokens: None,
        };
        self.emit(Reply::Finished(Box::new(Ending::routed(summary))))
            .await
    }

    /// The client's error for a failure the machine reported.
    fn failure_error(&mut self, failure: Failure) -> ApiError {
        let known = match failure {
            Failure::BudgetSpent => self.last_budget.as_ref().map(money::budget_spent),
            Failure::CloudBusy => Some(upstream_error(&UpstreamError::Busy)),
            Failure::Cloud => self.last_cloud_error.as_ref().map(upstream_error),
            Failure::EdgeUnavailable => self.last_edge_refusal.take(),
            Failure::Edge => self.last_edge_error.take().map(respond::generation_error),
            Failure::TimedOut => Some(respond::request_timed_out()),
            Failure::Internal => None,
        };
        known.unwrap_or_else(|| {
            tracing::error!(request_id = %self.public_id, ?failure, "a routed request failed out of turn");
            ApiError::internal()
        })
    }

    async fn emit(&self, event: Reply) -> Flow<()> {
        self.out.send(event).await.map_err(|_| Stop::ClientGone)
    }
}

fn len_u32(tokens: &[i32]) -> u32 {
    u32::try_from(tokens.len()).unwrap_or(u32::MAX)
}
