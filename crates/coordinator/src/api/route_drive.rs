//! The driver of one routed request: runs the edge generation and/or the
//! cloud call and tells the response what to send, in order.
//!
//! `auto` asks the router to pre-route the prompt. A cascade generates on the
//! edge and feeds every committed token to the router's incremental scorer:
//! text is released to the client only up to the scorer's releasable count;
//! an escalation (nothing released yet) cancels the edge generation and
//! serves the whole request in the cloud; a handoff (confidence collapsed
//! after text was released) cancels it and asks the cloud model to continue
//! from exactly the released text, through `/v1/completions` with the chat
//! rendered by the cloud model's template.
//!
//! When the cloud cannot take over (budget spent, at its concurrency limit,
//! failing), `auto` stays on the fleet and says so; nothing that was sent is
//! ever taken back.
//!
//! Money: the request is admitted once, before any work, for every model
//! that may serve it (`cloud/...`: the cloud model, and the edge model when
//! the fallback is the fleet; `auto`: both), so a tenant that cannot pay gets
//! 402 and nothing reaches a vehicle or the upstream. Each tier's work is
//! added to one `RoutedBooking` as it ends, and the whole request is settled
//! once, before `Finished` (the final body, or the last chunk and `[DONE]`).

use std::collections::VecDeque;
use std::sync::Arc;

use axum::http::StatusCode;
use engine::TextAssembler;
use rand::Rng;
use router::{AcceptRule, Route, Step, TokenLogprob};
use scheduler::RequestId;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::admission::RequestSlot;
use super::error::ApiError;
use super::generate;
use super::respond;
use super::route::{
    reason, CloudPart, EdgePart, RouteReason, RouteSummary, RoutedEvent, Target, Tier,
};
use super::validate::{PromptSource, ValidatedRequest};
use super::AppState;
use crate::billing_finish::RoutedBooking;
use crate::billing_meter::Metering;
use crate::cloud::upstream::{UpstreamPrompt, UpstreamRequest, UpstreamUsage};
use crate::cloud::{BudgetStatus, CloudTier, Fallback, UpstreamError};
use crate::core::{CommittedToken, Core, FinishReason, NewGeneration, Update};
use crate::limits;
use crate::store::{RequestRecord, TenantRecord};

/// Alternatives asked for each edge token, so the router can score margins.
const ROUTING_TOP_LOGPROBS: u32 = 2;

/// The id of held text that belongs to no token (the assembler's last words).
const NOT_A_TOKEN: i32 = -1;

/// Why the driver stopped before finishing.
enum Stop {
    /// The client went away; there is no one to tell.
    ClientGone,
    Failed(ApiError),
}

type Flow<T> = Result<T, Stop>;

/// How a cloud call ended without finishing.
enum CloudFailure {
    /// Nothing of the cloud's answer was sent: another tier may still answer.
    BeforeText(UpstreamError),
    AfterText(UpstreamError),
    Stop(Stop),
}

impl From<Stop> for CloudFailure {
    fn from(stop: Stop) -> CloudFailure {
        CloudFailure::Stop(stop)
    }
}

/// Edge work the client's hang-up cut short, metered when its generation
/// was cancelled: the request is settled with it (`settle_cancelled`).
type CutEdge = Arc<std::sync::Mutex<Vec<Metering>>>;

/// A running edge generation. Dropped before it finished (the driver
/// stopped: the client went away, or the request failed), it is cancelled
/// and what it made is kept in `cut`.
struct EdgeRun {
    updates: mpsc::Receiver<Update>,
    core: Arc<Core>,
    request: RequestId,
    /// Whether the generation may still be running here (not finished,
    /// failed or stopped).
    armed: bool,
    cut: CutEdge,
    prompt: Vec<i32>,
    max_tokens: u32,
}

impl EdgeRun {
    /// Stops a generation whose text is handed off or discarded and returns
    /// what the core metered of it; `None` if it failed, or finished and
    /// its metering was read already.
    fn stop(&mut self) -> Option<Metering> {
        if self.armed {
            self.armed = false;
            if let Some(metering) = self.core.cancel_metered(self.request) {
                return Some(metering);
            }
        }
        // It ended before the cancel: its metering may still be queued.
        while let Ok(update) = self.updates.try_recv() {
            if let Update::Finished { metering, .. } = update {
                return Some(metering);
            }
        }
        None
    }
}

impl Drop for EdgeRun {
    fn drop(&mut self) {
        if self.armed {
            if let Some(metering) = self.stop() {
                // Plain data: whatever a panicking holder left is usable.
                self.cut
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(metering);
            }
        }
    }
}

/// How far a cloud call's stream got.
#[derive(Default)]
struct CloudProgress {
    /// Whether its tier was announced to the client.
    announced: bool,
    usage: Option<UpstreamUsage>,
    finish: Option<String>,
    text_chunks: u32,
}

/// A finished edge answer held back in full, kept to serve if the cloud fails.
struct HeldAnswer {
    text: String,
    finish: FinishReason,
    metering: Metering,
}

/// Edge tokens generated but not yet sent, and what was sent.
#[derive(Default)]
struct Held {
    /// (token id, text) of tokens not yet released, oldest first.
    pending: VecDeque<(i32, String)>,
    released_tokens: u32,
    released_ids: Vec<i32>,
    released_text: String,
    generated_tokens: u32,
}

impl Held {
    fn edge_part(&self, prompt_tokens: u32) -> EdgePart {
        EdgePart {
            prompt_tokens,
            completion_tokens: self.released_tokens,
            discarded_tokens: self.generated_tokens.saturating_sub(self.released_tokens),
        }
    }
}

/// What a cascade on the edge ended with.
enum CascadeEnd {
    /// The answer was sent in full.
    Done,
    /// Nothing was sent; the cloud should answer. Carries the edge's whole
    /// answer when it had finished, to serve if the cloud fails.
    Escalate {
        why: String,
        permit: OwnedSemaphorePermit,
        finished_text: Option<(String, FinishReason, Metering)>,
    },
    /// The cloud should continue from what was sent.
    Handoff {
        why: String,
        permit: OwnedSemaphorePermit,
    },
}

pub(super) struct Routing {
    state: AppState,
    cloud: Arc<CloudTier>,
    tenant: TenantRecord,
    request: ValidatedRequest,
    public_id: String,
    out: mpsc::Sender<RoutedEvent>,
    /// The gateway's slots, held for as long as the request runs.
    _permit: RequestSlot,
    /// The tier announced to the client, once `Start` was sent.
    started: Option<Tier>,
    created_ms: i64,
    /// When the whole request times out, however the edge's tokens or the
    /// cloud's chunks trickle in.
    deadline: tokio::time::Instant,
    /// The prompt as the edge model tokenizes it (the coordinator's count).
    prompt: Vec<i32>,
    /// The request's one admission and the parts booked so far; `None`
    /// before admission and once settled.
    booking: Option<RoutedBooking>,
    /// Edge attempts discarded by an escalation, booked when the request
    /// settles.
    discarded_edge: Vec<Metering>,
    /// Edge generations cut short when the driver stopped early.
    cut_edge: CutEdge,
    /// The cloud call the client's hang-up cut short, booked already.
    cut_cloud: Option<CloudPart>,
}

impl Routing {
    pub(super) fn new(
        state: AppState,
        cloud: Arc<CloudTier>,
        tenant: TenantRecord,
        request: ValidatedRequest,
        public_id: String,
        out: mpsc::Sender<RoutedEvent>,
        permit: RequestSlot,
    ) -> Routing {
        let deadline = tokio::time::Instant::now() + state.request_timeout;
        Routing {
            state,
            cloud,
            tenant,
            request,
            public_id,
            out,
            _permit: permit,
            started: None,
            created_ms: crate::core::now_ms().0 as i64,
            deadline,
            prompt: Vec::new(),
            booking: None,
            discarded_edge: Vec::new(),
            cut_edge: CutEdge::default(),
            cut_cloud: None,
        }
    }

    pub(super) async fn run(mut self, target: Target) {
        let flow = match self.admit(target).await {
            Ok(()) => match target {
                Target::Cloud => self.cloud_only().await,
                Target::Auto => self.auto().await,
            },
            Err(error) => Err(Stop::Failed(error)),
        };
        match flow {
            Ok(()) => {}
            Err(Stop::ClientGone) => self.settle_cancelled().await,
            Err(Stop::Failed(error)) => {
                tracing::warn!(request_id = %self.public_id, error = %error.message, "routed request failed");
                let _ = self.out.send(RoutedEvent::Failed(error)).await;
            }
        }
    }

    /// Admits the request once, before any work, for every model that may
    /// serve it, assuming the dearest for the whole prompt and `max_tokens`:
    /// 402 if the tenant cannot pay (fleet-class tenants never get it).
    ///
    /// The prompt is counted by the edge model's tokenizer (the coordinator's
    /// own count) and, where the cloud model's chat template is loaded, by
    /// the cloud model's too, which bills by its own; the larger count is
    /// admitted.
    async fn admit(&mut self, target: Target) -> Result<(), ApiError> {
        let (prompt, _) = generate::tokenize(&self.request).await?;
        let prompt_tokens = prompt
            .len()
            .max(self.cloud_prompt_tokens().await.unwrap_or(0));
        let config = self.cloud.upstream.config();
        let cloud_model = config.public_name();
        let edge_model = self.request.model.name.as_str();
        let edge_may_serve = match target {
            Target::Cloud => config.fallback == Fallback::Edge,
            Target::Auto => true,
        };
        let mut models = vec![cloud_model.as_str()];
        if edge_may_serve {
            models.insert(0, edge_model);
        }
        let charge = self
            .state
            .billing
            .admit_any(
                &self.tenant,
                &models,
                prompt_tokens,
                self.request_max_tokens(),
                &self.public_id,
            )
            .await?;
        self.prompt = prompt;
        self.booking = Some(RoutedBooking::new(Arc::clone(&self.state.billing), charge));
        Ok(())
    }

    // ---- `cloud/<model>` -------------------------------------------------

    async fn cloud_only(&mut self) -> Flow<()> {
        let config = self.cloud.upstream.config();
        let fallback = config.fallback;
        let explicit = RouteReason::new(
            reason::EXPLICIT_CLOUD,
            format!("the request named {}", config.public_name()),
        );
        let budget = self.budget().await?;
        if !budget.allows_cloud() {
            return Err(Stop::Failed(budget_spent(&budget)));
        }
        let Some(permit) = self.cloud.upstream.try_permit() else {
            if fallback == Fallback::Edge {
                let why = "the cloud model is at its concurrency limit; the fleet answered";
                return self
                    .edge_plain(RouteReason::new(reason::CLOUD_FALLBACK, why), false)
                    .await;
            }
            return Err(Stop::Failed(upstream_error(&UpstreamError::Busy)));
        };
        let request = self.upstream_request(self.cloud_prompt(), self.request_max_tokens());
        match self
            .cloud_part(request, permit, Tier::Cloud, explicit, None)
            .await
        {
            Ok(()) => Ok(()),
            Err(CloudFailure::BeforeText(error))
                if fallback == Fallback::Edge && error.edge_could_serve() =>
            {
                let why = format!("{error}; the fleet answered");
                self.edge_plain(RouteReason::new(reason::CLOUD_FALLBACK, why), false)
                    .await
            }
            Err(CloudFailure::BeforeText(error) | CloudFailure::AfterText(error)) => {
                Err(Stop::Failed(upstream_error(&error)))
            }
            Err(CloudFailure::Stop(stop)) => Err(stop),
        }
    }

    // ---- `auto` ----------------------------------------------------------

    async fn auto(&mut self) -> Flow<()> {
        let prompt = self.router_prompt();
        let decision = self.cloud.router.pre_route(&prompt);
        tracing::debug!(request_id = %self.public_id, reason = %decision.reason, "pre-route");
        if decision.route == Route::Edge {
            let why = RouteReason::new(reason::PRE_ROUTE_EDGE, decision.reason);
            return self.edge_plain(why, true).await;
        }
        let budget = self.budget().await?;
        if !budget.allows_cloud() {
            let why = format!(
                "the tenant's cloud budget is spent ({} of {}); the fleet answered instead ({})",
                budget.spent,
                budget.cap.unwrap_or_default(),
                decision.reason
            );
            return self
                .edge_plain(RouteReason::new(reason::BUDGET_EXHAUSTED, why), false)
                .await;
        }
        match (decision.route, decision.rule) {
            (Route::Cascade, Some(rule)) => self.cascade(rule, decision.reason).await,
            _ => {
                let why = RouteReason::new(reason::PRE_ROUTE_CLOUD, decision.reason);
                self.auto_cloud(why).await
            }
        }
    }

    /// `auto` sending the whole request to the cloud; the fleet answers if
    /// the cloud cannot.
    async fn auto_cloud(&mut self, why: RouteReason) -> Flow<()> {
        let Some(permit) = self.cloud.upstream.try_permit() else {
            let detail = format!(
                "{}; the cloud model is at its concurrency limit, so the fleet answered",
                why.detail
            );
            return self
                .edge_plain(RouteReason::new(reason::CLOUD_UNAVAILABLE, detail), false)
                .await;
        };
        let request = self.upstream_request(self.cloud_prompt(), self.request_max_tokens());
        match self
            .cloud_part(request, permit, Tier::Cloud, why.clone(), None)
            .await
        {
            Ok(()) => Ok(()),
            Err(CloudFailure::BeforeText(error)) => {
                let detail = format!("{}; {error}, so the fleet answered", why.detail);
                self.edge_plain(RouteReason::new(reason::CLOUD_UNAVAILABLE, detail), false)
                    .await
            }
            Err(CloudFailure::AfterText(error)) => Err(Stop::Failed(upstream_error(&error))),
            Err(CloudFailure::Stop(stop)) => Err(stop),
        }
    }

    /// The edge answers, unjudged. With `cloud_if_unavailable`, a request no
    /// vehicle can take goes to the cloud instead.
    async fn edge_plain(&mut self, why: RouteReason, cloud_if_unavailable: bool) -> Flow<()> {
        let mut edge = match self.start_edge(&[], None).await {
            Ok(edge) => edge,
            Err(error) if cloud_if_unavailable => {
                let detail = format!("{}; but {}", why.detail, error.message);
                let budget = self.budget().await?;
                if !budget.allows_cloud() {
                    return Err(Stop::Failed(error));
                }
                // Boxed: the cloud falls back to this function when it fails.
                return Box::pin(
                    self.auto_cloud(RouteReason::new(reason::EDGE_UNAVAILABLE, detail)),
                )
                .await;
            }
            Err(error) => return Err(Stop::Failed(error)),
        };
        let prompt_tokens = len_u32(&edge.prompt);
        let mut held = Held::default();
        let mut assembler = TextAssembler::new(self.request.stop.clone());
        loop {
            match self.next_edge(&mut edge.updates).await? {
                Update::Token(token) => {
                    held.generated_tokens += 1;
                    held.pending
                        .push_back((token.token_id, assembler.push(&token.piece)));
                    self.release(&mut held, u32::MAX, Tier::Fleet, &why).await?;
                }
                Update::Finished {
                    reason, metering, ..
                } => {
                    edge.armed = false;
                    push_rest(&mut held, assembler.finish());
                    self.release(&mut held, u32::MAX, Tier::Fleet, &why).await?;
                    self.announce(Tier::Fleet, &why).await?;
                    self.book_edge(&metering, None).await?;
                    let charged = self.settle().await?;
                    let summary = RouteSummary {
                        tier: Tier::Fleet,
                        reason: why,
                        finish_reason: finish_reason(reason, &assembler),
                        edge: Some(held.edge_part(prompt_tokens)),
                        cloud: None,
                        charged,
                    };
                    return self.emit(RoutedEvent::Finished(Box::new(summary))).await;
                }
                Update::Failed(error) => {
                    edge.armed = false;
                    return Err(Stop::Failed(respond::generation_error(error)));
                }
            }
        }
    }

    /// Generates on the edge, judged token by token; escalates or hands off
    /// when the scorer says so and the cloud can take it.
    async fn cascade(&mut self, rule: AcceptRule, pre_route: String) -> Flow<()> {
        let mut edge = match self.start_edge(&[], None).await {
            Ok(edge) => edge,
            Err(error) => {
                let detail = format!("{pre_route}; but {}", error.message);
                return self
                    .auto_cloud(RouteReason::new(reason::EDGE_UNAVAILABLE, detail))
                    .await;
            }
        };
        let prompt_tokens = len_u32(&edge.prompt);
        let mut held = Held::default();
        let mut tokens = Vec::new();
        let mut why = RouteReason::new(
            reason::CASCADE_ACCEPTED,
            format!("{pre_route}; confident so far"),
        );
        let end = self
            .run_cascade(&mut edge, rule, &mut held, &mut tokens, &mut why)
            .await?;
        match end {
            CascadeEnd::Done => Ok(()),
            CascadeEnd::Escalate {
                why: escalated,
                permit,
                finished_text,
            } => {
                let cancelled = edge.stop();
                drop(edge);
                let why = RouteReason::new(reason::CASCADE_ESCALATED, escalated);
                let part = held.edge_part(prompt_tokens);
                let held_answer = match finished_text {
                    Some((text, finish, metering)) => Some(HeldAnswer {
                        text,
                        finish,
                        metering,
                    }),
                    None => {
                        // The discarded attempt, booked if the cloud answers.
                        self.discarded_edge.extend(cancelled);
                        None
                    }
                };
                self.escalate(why, permit, part, held_answer).await
            }
            CascadeEnd::Handoff {
                why: collapsed,
                permit,
            } => {
                let prompt = edge.prompt.clone();
                let max_tokens = edge.max_tokens;
                let metering = edge.stop();
                drop(edge);
                // The sent text is served whatever follows: book exactly it.
                match metering {
                    Some(metering) => {
                        self.book_edge(&metering, Some(held.released_tokens))
                            .await?;
                    }
                    None => {
                        tracing::error!(request_id = %self.public_id, "a handed-off edge generation has no metering");
                        return Err(Stop::Failed(ApiError::internal()));
                    }
                }
                let why = RouteReason::new(reason::HANDOFF, collapsed);
                self.handoff(why, permit, &held, prompt, max_tokens).await
            }
        }
    }

    /// The token loop of a cascade. Returns once the answer was sent in full,
    /// or with what the cloud should do.
    async fn run_cascade(
        &mut self,
        edge: &mut EdgeRun,
        rule: AcceptRule,
        held: &mut Held,
        tokens: &mut Vec<TokenLogprob>,
        why: &mut RouteReason,
    ) -> Flow<CascadeEnd> {
        let mut scorer = self.cloud.router.scorer(rule);
        let mut assembler = TextAssembler::new(self.request.stop.clone());
        // Once the cloud cannot take over, the rest is released unjudged.
        let mut judging = true;
        let prompt_tokens = len_u32(&edge.prompt);
        loop {
            let update = self.next_edge(&mut edge.updates).await?;
            let (step, finished) = match update {
                Update::Token(token) => {
                    held.generated_tokens += 1;
                    held.pending
                        .push_back((token.token_id, assembler.push(&token.piece)));
                    let logprob = token_logprob(&token);
                    tokens.push(logprob);
                    let step = if judging {
                        scorer.push(&logprob)
                    } else {
                        Step::Continue
                    };
                    (step, None)
                }
                Update::Finished {
                    reason, metering, ..
                } => {
                    edge.armed = false;
                    push_rest(held, assembler.finish());
                    let step = if judging {
                        scorer.finish()
                    } else {
                        Step::Continue
                    };
                    (step, Some((reason, metering)))
                }
                Update::Failed(error) => {
                    edge.armed = false;
                    if held.released_tokens == 0 {
                        if let Some(permit) = self.cloud.upstream.try_permit() {
                            let why = format!("the fleet failed: {error:?}");
                            return Ok(CascadeEnd::Escalate {
                                why,
                                permit,
                                finished_text: None,
                            });
                        }
                    }
                    return Err(Stop::Failed(respond::generation_error(error)));
                }
            };
            match step {
                Step::Continue => {}
                Step::Escalate { reason: escalated } => match self.cloud.upstream.try_permit() {
                    Some(permit) => {
                        let finished_text = finished.map(|(reason, metering)| {
                            let text: String =
                                held.pending.iter().map(|(_, text)| text.as_str()).collect();
                            (text, reason, metering)
                        });
                        return Ok(CascadeEnd::Escalate {
                            why: escalated,
                            permit,
                            finished_text,
                        });
                    }
                    None => {
                        judging = false;
                        *why = RouteReason::new(
                            reason::CLOUD_UNAVAILABLE,
                            format!("{escalated}; the cloud model is at its concurrency limit, so the fleet answered"),
                        );
                    }
                },
                Step::Handoff {
                    keep_tokens,
                    reason: collapsed,
                } => {
                    // Every kept token was released already; release any
                    // the scorer allowed but the loop had not sent yet.
                    self.release(held, keep_tokens, Tier::Fleet, why).await?;
                    let permit = if self.can_hand_off() {
                        self.cloud.upstream.try_permit()
                    } else {
                        None
                    };
                    match permit {
                        Some(permit) if finished.is_none() => {
                            return Ok(CascadeEnd::Handoff {
                                why: collapsed,
                                permit,
                            })
                        }
                        _ => {
                            judging = false;
                            *why = RouteReason::new(
                                reason::CLOUD_UNAVAILABLE,
                                format!(
                                    "{collapsed}; no handoff was possible, so the fleet finished"
                                ),
                            );
                        }
                    }
                }
            }
            let releasable = if judging {
                scorer.releasable_tokens()
            } else {
                u32::MAX
            };
            self.release(held, releasable, Tier::Fleet, why).await?;
            if let Some((reason, metering)) = finished {
                if why.code == reason::CASCADE_ACCEPTED {
                    let judgement = self.cloud.router.judge(&rule, tokens);
                    why.detail = format!("{}; {}", why.detail, judgement.reason());
                }
                self.release(held, u32::MAX, Tier::Fleet, why).await?;
                self.announce(Tier::Fleet, why).await?;
                self.book_edge(&metering, None).await?;
                let charged = self.settle().await?;
                let summary = RouteSummary {
                    tier: Tier::Fleet,
                    reason: why.clone(),
                    finish_reason: finish_reason(reason, &assembler),
                    edge: Some(held.edge_part(prompt_tokens)),
                    cloud: None,
                    charged,
                };
                self.emit(RoutedEvent::Finished(Box::new(summary))).await?;
                return Ok(CascadeEnd::Done);
            }
        }
    }

    /// Serves an escalated request in the cloud; if the cloud fails before
    /// sending anything, the fleet's answer is served after all.
    async fn escalate(
        &mut self,
        why: RouteReason,
        permit: OwnedSemaphorePermit,
        edge_part: EdgePart,
        held_answer: Option<HeldAnswer>,
    ) -> Flow<()> {
        let request = self.upstream_request(self.cloud_prompt(), self.request_max_tokens());
        let discarded = EdgePart {
            completion_tokens: 0,
            discarded_tokens: edge_part.discarded_tokens + edge_part.completion_tokens,
            prompt_tokens: 0,
        };
        // A finished edge answer is discarded if the cloud answers.
        let held_metering = held_answer.as_ref().map(|answer| answer.metering.clone());
        let discards_before = self.discarded_edge.len();
        self.discarded_edge.extend(held_metering);
        match self
            .cloud_part(request, permit, Tier::Cloud, why.clone(), Some(discarded))
            .await
        {
            Ok(()) => Ok(()),
            Err(CloudFailure::BeforeText(error)) => {
                let detail = format!("{}; {error}, so the fleet answered", why.detail);
                let fallback = RouteReason::new(reason::CLOUD_UNAVAILABLE, detail);
                match held_answer {
                    Some(answer) => {
                        // Served after all: not discarded.
                        self.discarded_edge.truncate(discards_before);
                        self.serve_text(answer, fallback, edge_part).await
                    }
                    None => self.edge_plain(fallback, false).await,
                }
            }
            Err(CloudFailure::AfterText(error)) => Err(Stop::Failed(upstream_error(&error))),
            Err(CloudFailure::Stop(stop)) => Err(stop),
        }
    }

    /// Sends a finished edge answer that was held back in full.
    async fn serve_text(
        &mut self,
        answer: HeldAnswer,
        why: RouteReason,
        edge_part: EdgePart,
    ) -> Flow<()> {
        self.announce(Tier::Fleet, &why).await?;
        if !answer.text.is_empty() {
            self.emit(RoutedEvent::Text(answer.text)).await?;
        }
        self.book_edge(&answer.metering, None).await?;
        let charged = self.settle().await?;
        let finish = answer.finish;
        let summary = RouteSummary {
            tier: Tier::Fleet,
            reason: why,
            finish_reason: match finish {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
            },
            edge: Some(EdgePart {
                completion_tokens: edge_part.completion_tokens + edge_part.discarded_tokens,
                discarded_tokens: 0,
                ..edge_part
            }),
            cloud: None,
            charged,
        };
        self.emit(RoutedEvent::Finished(Box::new(summary))).await
    }

    /// The cloud continues an answer whose start the client already has. If
    /// the cloud fails before sending anything, the fleet continues instead.
    async fn handoff(
        &mut self,
        why: RouteReason,
        permit: OwnedSemaphorePermit,
        held: &Held,
        prompt: Vec<i32>,
        max_tokens: u32,
    ) -> Flow<()> {
        let edge_part = held.edge_part(len_u32(&prompt));
        let remaining = max_tokens.saturating_sub(held.released_tokens).max(1);
        let Some(continuation) = self.handoff_prompt(&held.released_text).await else {
            return Err(Stop::Failed(ApiError::internal()));
        };
        let request = self.upstream_request(continuation, remaining);
        match self
            .cloud_part(
                request,
                permit,
                Tier::FleetThenCloud,
                why.clone(),
                Some(edge_part),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(CloudFailure::BeforeText(error)) => {
                let detail = format!("{}; {error}, so the fleet continued", why.detail);
                let fallback = RouteReason::new(reason::CLOUD_UNAVAILABLE, detail);
                self.edge_continue(fallback, held, prompt, remaining).await
            }
            Err(CloudFailure::AfterText(error)) => Err(Stop::Failed(upstream_error(&error))),
            Err(CloudFailure::Stop(stop)) => Err(stop),
        }
    }

    /// The fleet continues from the tokens already sent, unjudged.
    async fn edge_continue(
        &mut self,
        why: RouteReason,
        before: &Held,
        prompt: Vec<i32>,
        remaining: u32,
    ) -> Flow<()> {
        let mut edge = self
            .start_edge(&before.released_ids, Some(remaining))
            .await
            .map_err(Stop::Failed)?;
        let mut held = Held {
            released_tokens: before.released_tokens,
            generated_tokens: before.generated_tokens,
            ..Held::default()
        };
        let mut assembler = TextAssembler::new(self.request.stop.clone());
        loop {
            match self.next_edge(&mut edge.updates).await? {
                Update::Token(token) => {
                    held.generated_tokens += 1;
                    held.pending
                        .push_back((token.token_id, assembler.push(&token.piece)));
                    self.release(&mut held, u32::MAX, Tier::Fleet, &why).await?;
                }
                Update::Finished {
                    reason, metering, ..
                } => {
                    edge.armed = false;
                    push_rest(&mut held, assembler.finish());
                    self.release(&mut held, u32::MAX, Tier::Fleet, &why).await?;
                    self.book_edge(&metering, None).await?;
                    let charged = self.settle().await?;
                    let summary = RouteSummary {
                        tier: Tier::Fleet,
                        reason: why,
                        finish_reason: finish_reason(reason, &assembler),
                        edge: Some(held.edge_part(len_u32(&prompt))),
                        cloud: None,
                        charged,
                    };
                    return self.emit(RoutedEvent::Finished(Box::new(summary))).await;
                }
                Update::Failed(error) => {
                    edge.armed = false;
                    return Err(Stop::Failed(respond::generation_error(error)));
                }
            }
        }
    }

    // ---- the cloud part --------------------------------------------------

    /// Runs one cloud call and streams its text. `tier` and `why` announce
    /// it: as the start of the answer, or as a handoff when the fleet
    /// started it. Meters the call and sends `Finished`.
    async fn cloud_part(
        &mut self,
        request: UpstreamRequest,
        permit: OwnedSemaphorePermit,
        tier: Tier,
        why: RouteReason,
        edge: Option<EdgePart>,
    ) -> Result<(), CloudFailure> {
        let started_ms = crate::core::now_ms().0 as i64;
        let mut stream = self
            .cloud
            .upstream
            .start(&request, permit)
            .await
            .map_err(CloudFailure::BeforeText)?;
        let mut progress = CloudProgress::default();
        match self
            .pump_cloud(&mut stream, tier, &why, &mut progress)
            .await
        {
            Ok(()) => {}
            Err(CloudFailure::Stop(Stop::ClientGone)) => {
                // The upstream worked on the prompt and what it streamed.
                let usage = self.own_cloud_usage(edge, progress.text_chunks);
                self.cut_cloud = self.book_cloud(usage, started_ms).ok();
                return Err(CloudFailure::Stop(Stop::ClientGone));
            }
            Err(failure) => return Err(failure),
        }
        if !progress.announced {
            self.announce(tier, &why).await?;
        }
        let usage = progress
            .usage
            .unwrap_or_else(|| self.own_cloud_usage(edge, progress.text_chunks));
        let part = self.book_cloud(usage, started_ms)?;
        let charged = self.settle().await?;
        self.record_cloud(part).await;
        let summary = RouteSummary {
            tier,
            reason: why,
            finish_reason: if progress.finish.as_deref() == Some("length") {
                "length"
            } else {
                "stop"
            },
            edge,
            cloud: Some(part),
            charged,
        };
        self.emit(RoutedEvent::Finished(Box::new(summary))).await?;
        Ok(())
    }

    /// Streams the cloud's text to the client until the upstream ends.
    async fn pump_cloud(
        &mut self,
        stream: &mut crate::cloud::upstream::UpstreamStream,
        tier: Tier,
        why: &RouteReason,
        progress: &mut CloudProgress,
    ) -> Result<(), CloudFailure> {
        loop {
            // The cloud call has its own bounds; the whole request's time
            // (edge part included) is bounded here.
            let next = tokio::select! {
                () = self.out.closed() => return Err(CloudFailure::Stop(Stop::ClientGone)),
                () = tokio::time::sleep_until(self.deadline) => {
                    return Err(CloudFailure::Stop(Stop::Failed(respond::request_timed_out())));
                }
                next = stream.next() => next,
            };
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(error) if progress.announced => return Err(CloudFailure::AfterText(error)),
                Err(error) => return Err(CloudFailure::BeforeText(error)),
            };
            if !progress.announced {
                self.announce(tier, why).await?;
                progress.announced = true;
            }
            if !event.text.is_empty() {
                progress.text_chunks += 1;
                self.emit(RoutedEvent::Text(event.text)).await?;
            }
            if event.finish_reason.is_some() {
                progress.finish = event.finish_reason;
            }
            if event.usage.is_some() {
                progress.usage = event.usage;
            }
        }
    }

    /// The cloud's usage by our own counts, for an upstream that reports
    /// none (or was cut off): the prompt as the edge model tokenizes it,
    /// plus any edge text it continued, and its text chunks (about a token
    /// each).
    fn own_cloud_usage(&self, edge: Option<EdgePart>, text_chunks: u32) -> UpstreamUsage {
        let sent_before = edge.map_or(0, |part| part.completion_tokens);
        UpstreamUsage {
            prompt_tokens: len_u32(&self.prompt).saturating_add(sent_before),
            completion_tokens: text_chunks,
        }
    }

    /// Books the cloud's part of the request and returns it with its cost.
    fn book_cloud(&mut self, usage: UpstreamUsage, started_ms: i64) -> Flow<CloudPart> {
        let finished_ms = crate::core::now_ms().0 as i64;
        let public_name = self.cloud.upstream.config().public_name();
        let charge = self
            .booking()?
            .add_cloud(
                &public_name,
                usage.prompt_tokens,
                usage.completion_tokens,
                started_ms,
                finished_ms,
            )
            .map_err(Stop::Failed)?;
        Ok(CloudPart {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost: crate::cloud::MicroUsd(charge.customer.0),
            upstream_cost: crate::cloud::MicroUsd(charge.upstream.0),
        })
    }

    /// Adds a settled cloud part to the tenant's cloud spend (what the
    /// ledger charged for it) and logs it as `<request id>/cloud`.
    async fn record_cloud(&self, part: CloudPart) {
        let config = self.cloud.upstream.config();
        let now_ms = crate::core::now_ms().0 as i64;
        if let Err(error) = self
            .cloud
            .budgets
            .add_spent(self.tenant.id, part.cost, now_ms)
            .await
        {
            tracing::error!(%error, request_id = %self.public_id, tenant_id = self.tenant.id, "add cloud spend");
        }
        let record = RequestRecord {
            id: format!("{}/cloud", self.public_id),
            tenant_id: self.tenant.id,
            model: config.public_name(),
            status: "finished",
            prompt_tokens: part.prompt_tokens,
            completion_tokens: part.completion_tokens,
            nodes: vec!["cloud".to_string()],
            created_ms: self.created_ms,
            finished_ms: now_ms,
            error: None,
        };
        if let Err(error) = self.state.store.log_request(&record).await {
            tracing::error!(%error, request_id = %self.public_id, "log cloud request");
        }
    }

    // ---- booking ---------------------------------------------------------

    fn booking(&mut self) -> Flow<&mut RoutedBooking> {
        self.booking.as_mut().ok_or_else(|| {
            tracing::error!("a routed request is booked before admission or after settling");
            Stop::Failed(ApiError::internal())
        })
    }

    /// Books an edge generation whose text reached the client: all of it,
    /// or only `released_tokens` (a handoff).
    async fn book_edge(&mut self, metering: &Metering, released_tokens: Option<u32>) -> Flow<()> {
        let model = self.request.model.name.clone();
        self.booking()?
            .add_edge(&model, metering, released_tokens)
            .await
            .map_err(Stop::Failed)
    }

    /// Settles a request the client went away from, for the work done
    /// until then, like a cancelled fleet request (`CancelCharge`): every
    /// edge generation cut short with all its tokens (the client asked for
    /// them), the cloud's prompt and streamed text, discarded attempts
    /// reimbursed. A request that made no vehicle or upstream work yet is
    /// not charged. A failure is logged: the client is gone.
    async fn settle_cancelled(&mut self) {
        if self.booking.is_none() {
            // Never admitted, or settled before the client left.
            return;
        }
        let cut = std::mem::take(
            &mut *self
                .cut_edge
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for metering in cut {
            if self.book_edge(&metering, None).await.is_err() {
                return;
            }
        }
        let worked = self
            .booking
            .as_ref()
            .is_some_and(|booking| !booking.is_empty());
        if !worked && self.discarded_edge.is_empty() {
            // Dropping the booking releases its hold.
            self.booking = None;
            return;
        }
        match self.settle().await {
            Ok(charged) => {
                tracing::info!(request_id = %self.public_id, %charged, "cancelled routed request settled");
                if let Some(part) = self.cut_cloud.take() {
                    self.record_cloud(part).await;
                }
            }
            Err(_) => {
                tracing::error!(request_id = %self.public_id, "settle a cancelled routed request");
            }
        }
    }

    /// Settles the request once, with every discarded edge attempt; a
    /// failure withholds the successful end from the client (it was not
    /// charged). Returns what the tenant was charged.
    async fn settle(&mut self) -> Flow<crate::cloud::MicroUsd> {
        let model = self.request.model.name.clone();
        let mut booking = self.booking.take().ok_or_else(|| {
            tracing::error!("a routed request is settled twice");
            Stop::Failed(ApiError::internal())
        })?;
        for metering in std::mem::take(&mut self.discarded_edge) {
            booking
                .add_discarded_edge(&model, &metering)
                .await
                .map_err(Stop::Failed)?;
        }
        let completed_ms = crate::core::now_ms().0 as i64;
        let charged = booking.settle(completed_ms).await.map_err(Stop::Failed)?;
        Ok(crate::cloud::MicroUsd(charged.0))
    }

    // ---- helpers ---------------------------------------------------------

    async fn budget(&self) -> Flow<BudgetStatus> {
        self.cloud
            .budgets
            .status(self.tenant.id)
            .await
            .map_err(|error| {
                tracing::error!(%error, tenant_id = self.tenant.id, "read cloud budget");
                Stop::Failed(ApiError::internal())
            })
    }

    /// Starts an edge generation of the prompt followed by `prefix` tokens.
    async fn start_edge(
        &self,
        prefix: &[i32],
        max_tokens: Option<u32>,
    ) -> Result<EdgeRun, ApiError> {
        let mut prompt = self.prompt.clone();
        prompt.extend_from_slice(prefix);
        let budget = generate::completion_budget(&self.request, prompt.len())?;
        let max_tokens = max_tokens.map_or(budget, |asked| asked.min(budget));
        let seed = self
            .request
            .seed
            .unwrap_or_else(|| rand::thread_rng().gen());
        // The request was admitted (`admit`) before any of its work started.
        let admitted = self
            .state
            .core
            .submit(NewGeneration {
                public_id: self.public_id.clone(),
                tenant: self.tenant.clone(),
                model: Arc::clone(&self.request.model),
                prompt: prompt.clone(),
                sampling: proto::Sampling {
                    temperature: self.request.temperature,
                    top_p: self.request.top_p,
                    top_k: self.request.top_k,
                    seed,
                    ignore_eos: self.request.ignore_eos,
                },
                max_tokens,
                stop: self.request.stop.clone(),
                top_logprobs: ROUTING_TOP_LOGPROBS,
            })
            .map_err(generate::rejection_error)?;
        Ok(EdgeRun {
            updates: admitted.updates,
            core: Arc::clone(&self.state.core),
            request: admitted.request,
            armed: true,
            cut: Arc::clone(&self.cut_edge),
            prompt,
            max_tokens,
        })
    }

    async fn next_edge(&self, updates: &mut mpsc::Receiver<Update>) -> Flow<Update> {
        tokio::select! {
            () = self.out.closed() => Err(Stop::ClientGone),
            received = tokio::time::timeout_at(self.deadline, updates.recv()) => match received {
                Ok(Some(update)) => Ok(update),
                Ok(None) => {
                    tracing::error!(request_id = %self.public_id, "edge generation ended without an answer");
                    Err(Stop::Failed(ApiError::internal()))
                }
                Err(_) => Err(Stop::Failed(respond::request_timed_out())),
            },
        }
    }

    /// Sends the text of held tokens up to `upto` tokens from the start.
    async fn release(
        &mut self,
        held: &mut Held,
        upto: u32,
        tier: Tier,
        why: &RouteReason,
    ) -> Flow<()> {
        let mut text = String::new();
        while held.released_tokens < upto {
            let Some((id, piece)) = held.pending.pop_front() else {
                break;
            };
            if id != NOT_A_TOKEN {
                held.released_tokens += 1;
                held.released_ids.push(id);
            }
            text.push_str(&piece);
        }
        if text.is_empty() {
            return Ok(());
        }
        self.announce(tier, why).await?;
        held.released_text.push_str(&text);
        self.emit(RoutedEvent::Text(text)).await
    }

    /// `Start` for the first tier to send anything; `Handoff` when another
    /// tier takes over an answer already started.
    async fn announce(&mut self, tier: Tier, why: &RouteReason) -> Flow<()> {
        match self.started {
            None => {
                let model = match tier {
                    Tier::Fleet | Tier::FleetThenCloud => self.request.model.name.clone(),
                    Tier::Cloud => self.cloud.upstream.config().public_name(),
                };
                self.started = Some(tier);
                self.emit(RoutedEvent::Start {
                    tier,
                    reason: why.clone(),
                    model,
                })
                .await
            }
            Some(started) if started != tier && tier == Tier::FleetThenCloud => {
                self.started = Some(tier);
                self.emit(RoutedEvent::Handoff(why.clone())).await
            }
            Some(_) => Ok(()),
        }
    }

    async fn emit(&self, event: RoutedEvent) -> Flow<()> {
        self.out.send(event).await.map_err(|_| Stop::ClientGone)
    }

    fn request_max_tokens(&self) -> u32 {
        self.request
            .max_tokens
            .unwrap_or(limits::COMPLETION_TOKENS_DEFAULT)
    }

    fn upstream_request(&self, prompt: UpstreamPrompt, max_tokens: u32) -> UpstreamRequest {
        UpstreamRequest {
            prompt,
            max_tokens,
            temperature: self.request.temperature,
            top_p: self.request.top_p,
            seed: self.request.seed,
            stop: self.request.stop.clone(),
        }
    }

    fn cloud_prompt(&self) -> UpstreamPrompt {
        match &self.request.prompt {
            PromptSource::Chat(messages) => UpstreamPrompt::Chat(messages.clone()),
            PromptSource::Text(text) => UpstreamPrompt::Text(text.clone()),
        }
    }

    /// The prompt as the cloud model counts it, where its tokenizer is
    /// loaded (for handoffs): the chat rendered by its own template.
    async fn cloud_prompt_tokens(&self) -> Option<usize> {
        let cloud = Arc::clone(&self.cloud);
        cloud.chat_template.as_ref()?;
        let prompt = self.cloud_prompt();
        let counted = tokio::task::spawn_blocking(move || {
            let tokenizer = cloud.chat_template.as_ref()?;
            let (text, add_special) = match prompt {
                UpstreamPrompt::Chat(messages) => {
                    (tokenizer.apply_chat_template(&messages, true).ok()?, false)
                }
                UpstreamPrompt::Text(text) => (text, true),
            };
            tokenizer
                .tokenize(&text, add_special)
                .ok()
                .map(|tokens| tokens.len())
        })
        .await;
        counted.unwrap_or_else(|error| {
            tracing::error!(%error, request_id = %self.public_id, "count the cloud prompt");
            None
        })
    }

    /// Whether the cloud can continue a started answer of this request.
    fn can_hand_off(&self) -> bool {
        match &self.request.prompt {
            PromptSource::Chat(_) => self.cloud.chat_template.is_some(),
            PromptSource::Text(_) => true,
        }
    }

    /// The prompt that makes the cloud model continue `sent`: the chat
    /// rendered by its own template with the assistant turn open, then the
    /// answer so far.
    async fn handoff_prompt(&self, sent: &str) -> Option<UpstreamPrompt> {
        let messages = match &self.request.prompt {
            PromptSource::Text(text) => return Some(UpstreamPrompt::Text(format!("{text}{sent}"))),
            PromptSource::Chat(messages) => messages.clone(),
        };
        let cloud = Arc::clone(&self.cloud);
        let rendered = tokio::task::spawn_blocking(move || {
            cloud
                .chat_template
                .as_ref()
                .map(|template| template.apply_chat_template(&messages, true))
        })
        .await;
        match rendered {
            Ok(Some(Ok(text))) => Some(UpstreamPrompt::Text(format!("{text}{sent}"))),
            Ok(Some(Err(error))) => {
                tracing::error!(%error, request_id = %self.public_id, "render the handoff prompt");
                None
            }
            Ok(None) => None,
            Err(error) => {
                tracing::error!(%error, request_id = %self.public_id, "handoff template task");
                None
            }
        }
    }

    /// What the pre-route reads: the last user message of a chat, or the prompt.
    fn router_prompt(&self) -> String {
        match &self.request.prompt {
            PromptSource::Text(text) => text.clone(),
            PromptSource::Chat(messages) => messages
                .iter()
                .rev()
                .find(|message| message.role == "user")
                .or(messages.last())
                .map(|message| message.content.clone())
                .unwrap_or_default(),
        }
    }
}

fn len_u32(tokens: &[i32]) -> u32 {
    u32::try_from(tokens.len()).unwrap_or(u32::MAX)
}

/// Text the assembler released at the end belongs to the last token.
fn push_rest(held: &mut Held, rest: String) {
    if rest.is_empty() {
        return;
    }
    match held.pending.back_mut() {
        Some((_, text)) => text.push_str(&rest),
        None => held.pending.push_back((NOT_A_TOKEN, rest)),
    }
}

fn token_logprob(token: &CommittedToken) -> TokenLogprob {
    let alternatives = token
        .top_logprobs
        .iter()
        .filter(|(id, _, _)| *id != token.token_id)
        .map(|(_, _, logprob)| *logprob);
    TokenLogprob::new(token.logprob, alternatives.collect::<Vec<_>>())
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

/// 402: the tenant's cloud budget is spent.
fn budget_spent(budget: &BudgetStatus) -> ApiError {
    ApiError {
        status: StatusCode::PAYMENT_REQUIRED,
        message: format!(
            "this tenant's cloud budget is spent ({} of a {} cap); ask for model 'auto' to be served by the fleet, or have the operator raise the cap",
            budget.spent,
            budget.cap.unwrap_or_default()
        ),
        kind: "insufficient_quota",
        param: None,
        code: Some("cloud_budget_exceeded"),
        retry_after_seconds: None,
    }
}

/// The client's view of an upstream failure: 504 for a timeout, 429/503 when
/// full, the upstream's own 400 for a request it refused, otherwise 502.
pub(super) fn upstream_error(error: &UpstreamError) -> ApiError {
    let gateway = |status: StatusCode, code: &'static str| ApiError {
        status,
        message: error.to_string(),
        kind: "server_error",
        param: None,
        code: Some(code),
        retry_after_seconds: None,
    };
    match error {
        UpstreamError::Busy => ApiError::too_many(
            "the cloud model has as many requests in flight as this gateway allows; retry shortly",
            limits::RETRY_AFTER_DEFAULT_SECONDS,
        ),
        UpstreamError::Timeout(_) => gateway(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        UpstreamError::Unreachable(_) => gateway(StatusCode::BAD_GATEWAY, "upstream_unreachable"),
        UpstreamError::Protocol(_) => gateway(StatusCode::BAD_GATEWAY, "upstream_error"),
        UpstreamError::Status {
            status,
            message,
            retry_after_seconds,
        } => match status {
            429 | 503 => ApiError::unavailable(
                format!("the cloud model is overloaded: {message}"),
                retry_after_seconds.unwrap_or(limits::RETRY_AFTER_DEFAULT_SECONDS),
            ),
            400 | 404 | 413 | 422 => ApiError::invalid(
                format!("the cloud model refused the request: {message}"),
                None,
                "upstream_rejected",
            ),
            _ => gateway(StatusCode::BAD_GATEWAY, "upstream_error"),
        },
    }
}
