//! [`RouteMachine`]: the whole `auto` / `cloud/<model>` policy of one routed
//! request as a pure state machine. The gateway's driver owns the I/O (the
//! edge generation, the cloud call, the client's stream, the deadline and the
//! money) and runs it: it feeds each [`Event`] to [`RouteMachine::handle`] and
//! carries out the [`Action`]s it gets back, in order.
//!
//! **Architecture invariant:** the machine does no I/O and reads no clock. A
//! timeout is the [`Event::Deadline`] the driver feeds; a cloud slot or a
//! budget is asked for with an action and answered with an event, so every
//! decision is a function of the events seen, and a test replays any path.
//!
//! The paths it runs:
//!
//! * `cloud/<model>`: the cloud answers; when it is at its concurrency limit
//!   or fails before any text and the configured fallback is the fleet, the
//!   fleet answers instead. A spent cloud budget is a 402.
//! * `auto`: the router's pre-route decides. `Edge` serves on the fleet
//!   unjudged (and in the cloud when no vehicle can take it); `Cloud` serves
//!   in the cloud (on the fleet when the cloud cannot); `Cascade` generates on
//!   the edge and feeds every token to the [`crate::IncrementalScorer`]: text is
//!   released only up to its releasable count, an escalation (nothing
//!   released) discards the edge answer and asks the cloud for the whole one,
//!   and a handoff (confidence collapsed after text was released) keeps
//!   exactly the released tokens and asks the cloud to continue their text.
//!   When the cloud fails before sending anything, the fleet answers after
//!   all: an escalated answer that had finished is served as it was, and a
//!   handed-off one is continued on the fleet from the released tokens.
//!
//! Nothing that was sent is ever taken back, and the client never sees edge
//! text that is later discarded.
//!
//! Money, as the actions say it: each edge attempt ends with one
//! [`Action::StopEdge`] saying how much of its text was served (booked) or
//! that it was discarded (reimbursed, not charged); the cloud's part is
//! booked by [`Action::Finish`] with its usage, or by [`Action::CutCloud`]
//! when the client went away mid-stream; [`Action::Finish`] settles the
//! request once before the client hears the end, and a client that goes away
//! is settled for the work done until then ([`Action::SettleCancelled`]).
//! A failed request ([`Action::Fail`]) is not settled.

mod cloud;
mod edge;
mod words;

pub use words::{
    reason, Action, Budget, CloudPrompt, CloudUsage, EdgeEnd, EdgePart, EdgeText, Event, Failure,
    Outcome, RouteReason, Setup, Target, Tier,
};

use crate::config::{AcceptRule, IncrementalConfig};
use crate::router::{Decision, Route};

use cloud::{CloudCall, CloudRole};
use edge::{EdgeRun, FinishedEdge};

/// What the machine waits for besides the running generation or call.
#[derive(Clone, Debug, PartialEq)]
enum Waiting {
    Nothing,
    PreRoute,
    Budget(BudgetFor),
    Slot(SlotFor),
    /// `Finish` was said: only a client that goes away before the driver
    /// carried it out still matters.
    Finished,
    Done,
}

#[derive(Clone, Debug, PartialEq)]
enum BudgetFor {
    CloudOnly,
    Auto(Decision),
    /// The pre-route chose the edge, no vehicle could take it: the cloud
    /// answers if the budget allows, with this reason.
    EdgeUnavailable(String),
}

#[derive(Clone, Debug, PartialEq)]
enum SlotFor {
    CloudOnly,
    AutoCloud(RouteReason),
    /// The cascade's edge generation failed before releasing anything.
    CascadeFailed {
        detail: String,
    },
    CascadeEscalate {
        reason: String,
        finished: Option<FinishedEdge>,
    },
    CascadeHandoff {
        reason: String,
    },
}

/// The policy of one routed request.
#[derive(Clone, Debug)]
pub struct RouteMachine {
    setup: Setup,
    /// The tier announced to the client, once it was.
    started: Option<Tier>,
    waiting: Waiting,
    /// The current (or last finished) edge attempt.
    edge: Option<EdgeRun>,
    /// The current cloud call.
    cloud: Option<CloudCall>,
}

impl RouteMachine {
    pub fn new(setup: Setup) -> RouteMachine {
        RouteMachine {
            setup,
            started: None,
            waiting: Waiting::Nothing,
            edge: None,
            cloud: None,
        }
    }

    /// Whether the request has ended (finished, failed or settled as
    /// cancelled): no more edge or cloud events are awaited. A client that
    /// goes away while the end is sent still gets `SettleCancelled`.
    pub fn is_done(&self) -> bool {
        matches!(self.waiting, Waiting::Finished | Waiting::Done)
    }

    /// The first actions of an admitted request.
    pub fn start(&mut self) -> Vec<Action> {
        match self.setup.target {
            Target::Cloud { .. } => {
                self.waiting = Waiting::Budget(BudgetFor::CloudOnly);
                vec![Action::CheckBudget]
            }
            Target::Auto => {
                self.waiting = Waiting::PreRoute;
                vec![Action::PreRoute]
            }
        }
    }

    /// Takes one event and says what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match (&self.waiting, &event) {
            (Waiting::Finished, Event::ClientGone) => {
                // The client left while the end was being sent: the driver
                // settles it as cancelled unless it settled already.
                self.waiting = Waiting::Done;
                return vec![Action::SettleCancelled];
            }
            (Waiting::Finished | Waiting::Done, _) => return Vec::new(),
            _ => {}
        }
        match event {
            Event::ClientGone => self.client_gone(),
            Event::Deadline => self.fail(Failure::TimedOut),
            Event::PreRouted(decision) if self.waiting == Waiting::PreRoute => {
                self.pre_routed(decision)
            }
            Event::Budget(budget) => match std::mem::replace(&mut self.waiting, Waiting::Nothing) {
                Waiting::Budget(purpose) => self.budget(purpose, budget),
                other => self.unexpected(other),
            },
            Event::CloudSlot { granted } => {
                match std::mem::replace(&mut self.waiting, Waiting::Nothing) {
                    Waiting::Slot(purpose) => self.slot(purpose, granted),
                    other => self.unexpected(other),
                }
            }
            Event::EdgeStarted { max_tokens } => self.edge_started(max_tokens),
            Event::EdgeUnavailable { detail } => self.edge_unavailable(detail),
            Event::EdgeToken { id, text, logprob } => self.edge_token(id, text, logprob),
            Event::EdgeFinished {
                end,
                stop_sequence,
                rest,
            } => self.edge_finished(end, stop_sequence, rest),
            Event::EdgeFailed { detail } => self.edge_failed(detail),
            Event::CloudStarted => self.cloud_started(),
            Event::CloudChunk {
                text,
                finish_reason,
                usage,
            } => self.cloud_chunk(text, finish_reason, usage),
            Event::CloudFinished => self.cloud_finished(),
            Event::CloudFailed {
                detail,
                fleet_could_serve,
            } => self.cloud_failed(detail, fleet_could_serve),
            Event::PreRouted(_) => self.fail(Failure::Internal),
        }
    }

    fn pre_routed(&mut self, decision: Decision) -> Vec<Action> {
        self.waiting = Waiting::Nothing;
        if decision.route == Route::Edge {
            let why = RouteReason::new(reason::PRE_ROUTE_EDGE, decision.reason);
            return self.edge_plain(why, true);
        }
        self.waiting = Waiting::Budget(BudgetFor::Auto(decision));
        vec![Action::CheckBudget]
    }

    fn budget(&mut self, purpose: BudgetFor, budget: Budget) -> Vec<Action> {
        match (purpose, budget) {
            (BudgetFor::CloudOnly, Budget::Spent { .. }) => self.fail(Failure::BudgetSpent),
            (BudgetFor::CloudOnly, Budget::Allows) => self.reserve(SlotFor::CloudOnly),
            (BudgetFor::Auto(decision), Budget::Spent { spent, cap }) => {
                let why = format!(
                    "the tenant's cloud budget is spent ({spent} of {cap}); the fleet answered instead ({})",
                    decision.reason
                );
                self.edge_plain(RouteReason::new(reason::BUDGET_EXHAUSTED, why), false)
            }
            (BudgetFor::Auto(decision), Budget::Allows) => match (decision.route, decision.rule) {
                (Route::Cascade, Some(rule)) => self.cascade(rule, decision.reason),
                _ => {
                    let why = RouteReason::new(reason::PRE_ROUTE_CLOUD, decision.reason);
                    self.auto_cloud(why)
                }
            },
            (BudgetFor::EdgeUnavailable(_), Budget::Spent { .. }) => {
                self.fail(Failure::EdgeUnavailable)
            }
            (BudgetFor::EdgeUnavailable(detail), Budget::Allows) => {
                self.auto_cloud(RouteReason::new(reason::EDGE_UNAVAILABLE, detail))
            }
        }
    }

    fn reserve(&mut self, purpose: SlotFor) -> Vec<Action> {
        self.waiting = Waiting::Slot(purpose);
        vec![Action::ReserveCloud]
    }

    fn slot(&mut self, purpose: SlotFor, granted: bool) -> Vec<Action> {
        match purpose {
            SlotFor::CloudOnly => self.cloud_only_slot(granted),
            SlotFor::AutoCloud(why) if granted => {
                self.start_cloud(CloudRole::Auto, Tier::Cloud, why, None, CloudPrompt::Whole)
            }
            SlotFor::AutoCloud(why) => {
                let detail = format!(
                    "{}; the cloud model is at its concurrency limit, so the fleet answered",
                    why.detail
                );
                self.edge_plain(RouteReason::new(reason::CLOUD_UNAVAILABLE, detail), false)
            }
            SlotFor::CascadeFailed { detail } if granted => {
                self.escalate(format!("the fleet failed: {detail}"), None)
            }
            SlotFor::CascadeFailed { .. } => self.fail(Failure::Edge),
            SlotFor::CascadeEscalate { reason, finished } if granted => {
                self.escalate(reason, finished)
            }
            SlotFor::CascadeEscalate { reason, finished } => {
                let detail = format!(
                    "{reason}; the cloud model is at its concurrency limit, so the fleet answered"
                );
                self.judging_stopped(detail, finished)
            }
            SlotFor::CascadeHandoff { reason } if granted => self.handoff(reason),
            SlotFor::CascadeHandoff { reason } => {
                let detail = format!("{reason}; no handoff was possible, so the fleet finished");
                self.judging_stopped(detail, None)
            }
        }
    }

    fn cloud_only_slot(&mut self, granted: bool) -> Vec<Action> {
        if granted {
            let why = RouteReason::new(
                reason::EXPLICIT_CLOUD,
                format!("the request named {}", self.setup.cloud_model),
            );
            return self.start_cloud(
                CloudRole::Explicit,
                Tier::Cloud,
                why,
                None,
                CloudPrompt::Whole,
            );
        }
        if self.fleet_fallback() {
            let why = "the cloud model is at its concurrency limit; the fleet answered";
            return self.edge_plain(RouteReason::new(reason::CLOUD_FALLBACK, why), false);
        }
        self.fail(Failure::CloudBusy)
    }

    fn fleet_fallback(&self) -> bool {
        matches!(
            self.setup.target,
            Target::Cloud {
                fleet_fallback: true
            }
        )
    }

    /// `auto` sending the whole request to the cloud; the fleet answers if
    /// the cloud cannot.
    fn auto_cloud(&mut self, why: RouteReason) -> Vec<Action> {
        self.reserve(SlotFor::AutoCloud(why))
    }

    /// The client went away: the running edge generation is booked for all
    /// it made, the cloud's streamed part by the gateway's own count, and
    /// the request is settled for that work.
    fn client_gone(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.edge.as_ref().is_some_and(EdgeRun::is_running) {
            actions.push(Action::StopEdge(EdgeText::Served));
        }
        if let Some(call) = self.cloud.take() {
            actions.extend(call.cut(self.setup.prompt_tokens));
        }
        self.edge = None;
        self.waiting = Waiting::Done;
        actions.push(Action::SettleCancelled);
        actions
    }

    fn fail(&mut self, failure: Failure) -> Vec<Action> {
        self.edge = None;
        self.cloud = None;
        self.waiting = Waiting::Done;
        vec![Action::Fail(failure)]
    }

    fn finish(&mut self, outcome: Outcome) -> Action {
        self.edge = None;
        self.cloud = None;
        self.waiting = Waiting::Finished;
        Action::Finish(outcome)
    }

    /// An event that does not fit: the driver fed it out of turn.
    fn unexpected(&mut self, waiting: Waiting) -> Vec<Action> {
        self.waiting = waiting;
        self.fail(Failure::Internal)
    }

    /// `Announce` for the first tier to send anything; `AnnounceHandoff`
    /// when the cloud takes over an answer the fleet started.
    fn announce(&mut self, tier: Tier, why: &RouteReason) -> Option<Action> {
        match self.started {
            None => {
                self.started = Some(tier);
                Some(Action::Announce {
                    tier,
                    reason: why.clone(),
                })
            }
            Some(started) if started != tier && tier == Tier::FleetThenCloud => {
                self.started = Some(tier);
                Some(Action::AnnounceHandoff {
                    reason: why.clone(),
                })
            }
            Some(_) => None,
        }
    }
}

fn finish_reason(end: EdgeEnd) -> &'static str {
    match end {
        EdgeEnd::Stop => "stop",
        EdgeEnd::Length => "length",
    }
}

/// A rule and the scorer's limits, for a cascade.
fn scorer(rule: AcceptRule, config: IncrementalConfig) -> crate::IncrementalScorer {
    crate::IncrementalScorer::new(rule, config)
}
