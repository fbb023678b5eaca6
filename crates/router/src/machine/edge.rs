//! The edge side of [`RouteMachine`]: one edge generation at a time, its
//! tokens held until they may be released, and the cascade's judging.
//!
//! An edge generation runs in one of three roles: plain (the fleet answers,
//! unjudged), cascade (every token is fed to the incremental scorer, which
//! may escalate or hand off), or a continuation (the fleet continues an
//! answer the cloud was asked to take over but could not). The token loop is
//! the same for all three; only what a token and the end lead to differs.

use std::collections::VecDeque;

use super::cloud::CloudRole;
use super::{
    finish_reason, reason, scorer, Action, CloudPrompt, EdgeEnd, EdgePart, EdgeText, Failure,
    Outcome, RouteMachine, RouteReason, SlotFor, Tier, Waiting,
};
use crate::confidence::ConfidenceScores;
use crate::config::AcceptRule;
use crate::incremental::{IncrementalScorer, Step};
use crate::router::judge_scores;
use crate::TokenLogprob;

/// Edge tokens generated but not yet sent, and what was sent.
#[derive(Clone, Debug, Default)]
pub(super) struct Held {
    /// (token id, text) of tokens not yet released, oldest first; text the
    /// assembler released at the very end belongs to no token.
    pending: VecDeque<(Option<i32>, String)>,
    pub(super) released_tokens: u32,
    pub(super) released_ids: Vec<i32>,
    released_text: String,
    pub(super) generated_tokens: u32,
}

impl Held {
    /// A continuation's count: the tokens released and generated before it.
    pub(super) fn continuing(released_tokens: u32, generated_tokens: u32) -> Held {
        Held {
            released_tokens,
            generated_tokens,
            ..Held::default()
        }
    }

    pub(super) fn edge_part(&self, prompt_tokens: u32) -> EdgePart {
        EdgePart {
            prompt_tokens,
            completion_tokens: self.released_tokens,
            discarded_tokens: self.generated_tokens.saturating_sub(self.released_tokens),
        }
    }

    /// Takes the text of held tokens up to `upto` tokens from the start.
    fn take_upto(&mut self, upto: u32) -> String {
        let mut text = String::new();
        while self.released_tokens < upto {
            let Some((id, piece)) = self.pending.pop_front() else {
                break;
            };
            if let Some(id) = id {
                self.released_tokens += 1;
                self.released_ids.push(id);
            }
            text.push_str(&piece);
        }
        self.released_text.push_str(&text);
        text
    }

    /// Text the assembler released at the end belongs to the last token.
    fn push_rest(&mut self, rest: String) {
        if rest.is_empty() {
            return;
        }
        match self.pending.back_mut() {
            Some((_, text)) => text.push_str(&rest),
            None => self.pending.push_back((None, rest)),
        }
    }

    fn pending_text(&self) -> String {
        self.pending.iter().map(|(_, text)| text.as_str()).collect()
    }
}

/// How a finished edge generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FinishedEdge {
    end: EdgeEnd,
    stop_sequence: bool,
}

impl FinishedEdge {
    fn finish_reason(self) -> &'static str {
        if self.stop_sequence {
            return "stop";
        }
        finish_reason(self.end)
    }
}

/// A finished edge answer held back in full while the cloud tries; served
/// if the cloud fails before sending anything.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct HeldAnswer {
    text: String,
    end: EdgeEnd,
    part: EdgePart,
}

#[derive(Clone, Debug)]
pub(super) enum EdgeRole {
    /// The fleet answers, unjudged. With `cloud_if_unavailable`, a request
    /// no vehicle can take goes to the cloud instead.
    Plain {
        why: RouteReason,
        cloud_if_unavailable: bool,
    },
    Cascade(Box<Cascade>),
    /// The fleet continues from tokens already sent, unjudged.
    Continue {
        why: RouteReason,
    },
}

#[derive(Clone, Debug)]
pub(super) struct Cascade {
    rule: AcceptRule,
    pre_route: String,
    why: RouteReason,
    /// Once the cloud cannot take over, the rest is released unjudged.
    judging: bool,
    scorer: IncrementalScorer,
    tokens: Vec<TokenLogprob>,
}

/// The current edge attempt.
#[derive(Clone, Debug)]
pub(super) struct EdgeRun {
    role: EdgeRole,
    held: Held,
    /// Whether the generation started and has not ended yet.
    running: bool,
    /// Whether `StartEdge` was answered.
    answered: bool,
    max_tokens: u32,
}

impl EdgeRun {
    pub(super) fn is_running(&self) -> bool {
        self.running
    }
}

impl RouteMachine {
    pub(super) fn edge_plain(
        &mut self,
        why: RouteReason,
        cloud_if_unavailable: bool,
    ) -> Vec<Action> {
        let role = EdgeRole::Plain {
            why,
            cloud_if_unavailable,
        };
        self.start_edge(role, Held::default(), Vec::new(), None)
    }

    /// Generates on the edge, judged token by token.
    pub(super) fn cascade(&mut self, rule: AcceptRule, pre_route: String) -> Vec<Action> {
        let why = RouteReason::new(
            reason::CASCADE_ACCEPTED,
            format!("{pre_route}; confident so far"),
        );
        let cascade = Cascade {
            rule,
            pre_route,
            why,
            judging: true,
            scorer: scorer(rule, self.setup.incremental),
            tokens: Vec::new(),
        };
        self.start_edge(
            EdgeRole::Cascade(Box::new(cascade)),
            Held::default(),
            Vec::new(),
            None,
        )
    }

    /// The fleet continues from `released_ids`, which the client has.
    pub(super) fn edge_continue(
        &mut self,
        why: RouteReason,
        released_ids: Vec<i32>,
        held: Held,
        remaining: u32,
    ) -> Vec<Action> {
        self.start_edge(
            EdgeRole::Continue { why },
            held,
            released_ids,
            Some(remaining),
        )
    }

    fn start_edge(
        &mut self,
        role: EdgeRole,
        held: Held,
        continue_from: Vec<i32>,
        max_tokens: Option<u32>,
    ) -> Vec<Action> {
        self.edge = Some(EdgeRun {
            role,
            held,
            running: false,
            answered: false,
            max_tokens: 0,
        });
        vec![Action::StartEdge {
            continue_from,
            max_tokens,
        }]
    }

    pub(super) fn edge_started(&mut self, max_tokens: u32) -> Vec<Action> {
        match self.edge.as_mut() {
            Some(run) if !run.answered => {
                run.answered = true;
                run.running = true;
                run.max_tokens = max_tokens;
                Vec::new()
            }
            _ => self.fail(Failure::Internal),
        }
    }

    pub(super) fn edge_unavailable(&mut self, detail: String) -> Vec<Action> {
        let run = match self.edge.take() {
            Some(run) if !run.answered => run,
            _ => return self.fail(Failure::Internal),
        };
        match run.role {
            EdgeRole::Plain {
                why,
                cloud_if_unavailable: true,
            } => {
                let detail = format!("{}; but {detail}", why.detail);
                self.waiting = Waiting::Budget(super::BudgetFor::EdgeUnavailable(detail));
                vec![Action::CheckBudget]
            }
            EdgeRole::Plain { .. } | EdgeRole::Continue { .. } => {
                self.fail(Failure::EdgeUnavailable)
            }
            EdgeRole::Cascade(cascade) => {
                let detail = format!("{}; but {detail}", cascade.pre_route);
                self.reserve(SlotFor::AutoCloud(RouteReason::new(
                    reason::EDGE_UNAVAILABLE,
                    detail,
                )))
            }
        }
    }

    /// Takes the running edge attempt out, if there is one and nothing else
    /// is awaited.
    fn running_edge(&mut self) -> Option<EdgeRun> {
        if self.waiting != Waiting::Nothing || !self.edge.as_ref().is_some_and(|run| run.running) {
            return None;
        }
        self.edge.take()
    }

    pub(super) fn edge_token(
        &mut self,
        id: i32,
        text: String,
        logprob: TokenLogprob,
    ) -> Vec<Action> {
        let Some(mut run) = self.running_edge() else {
            return self.fail(Failure::Internal);
        };
        run.held.generated_tokens += 1;
        run.held.pending.push_back((Some(id), text));
        let step = match &mut run.role {
            EdgeRole::Plain { why, .. } | EdgeRole::Continue { why } => {
                let why = why.clone();
                let actions = self.release(&mut run, u32::MAX, &why);
                self.edge = Some(run);
                return actions;
            }
            EdgeRole::Cascade(cascade) => {
                cascade.tokens.push(logprob);
                if cascade.judging {
                    cascade.scorer.push(&logprob)
                } else {
                    Step::Continue
                }
            }
        };
        self.cascade_step(run, step, None)
    }

    pub(super) fn edge_finished(
        &mut self,
        end: EdgeEnd,
        stop_sequence: bool,
        rest: String,
    ) -> Vec<Action> {
        let Some(mut run) = self.running_edge() else {
            return self.fail(Failure::Internal);
        };
        run.running = false;
        run.held.push_rest(rest);
        let finished = FinishedEdge { end, stop_sequence };
        let (why, announce) = match &mut run.role {
            EdgeRole::Plain { why, .. } => (why.clone(), true),
            EdgeRole::Continue { why } => (why.clone(), false),
            EdgeRole::Cascade(cascade) => {
                let step = if cascade.judging {
                    cascade.scorer.finish()
                } else {
                    Step::Continue
                };
                return self.cascade_step(run, step, Some(finished));
            }
        };
        self.serve_finished(run, why, finished, announce)
    }

    pub(super) fn edge_failed(&mut self, detail: String) -> Vec<Action> {
        let Some(mut run) = self.running_edge() else {
            return self.fail(Failure::Internal);
        };
        run.running = false;
        let escalate = matches!(run.role, EdgeRole::Cascade(_)) && run.held.released_tokens == 0;
        self.edge = Some(run);
        if escalate {
            return self.reserve(SlotFor::CascadeFailed { detail });
        }
        self.fail(Failure::Edge)
    }

    /// What a scorer's step leads to. `finished`: the generation ended with
    /// this token (the step is the scorer's verdict on the whole answer).
    fn cascade_step(
        &mut self,
        mut run: EdgeRun,
        step: Step,
        finished: Option<FinishedEdge>,
    ) -> Vec<Action> {
        match step {
            Step::Continue => self.cascade_release(run, finished),
            Step::Escalate { reason } => {
                self.edge = Some(run);
                self.reserve(SlotFor::CascadeEscalate { reason, finished })
            }
            Step::Handoff {
                keep_tokens,
                reason,
            } => {
                // Every kept token was released already; release any the
                // scorer allowed but were not sent yet.
                let why = cascade_of(&run).why.clone();
                let mut actions = self.release(&mut run, keep_tokens, &why);
                self.edge = Some(run);
                if self.setup.can_hand_off && finished.is_none() {
                    actions.extend(self.reserve(SlotFor::CascadeHandoff { reason }));
                } else {
                    let detail =
                        format!("{reason}; no handoff was possible, so the fleet finished");
                    actions.extend(self.judging_stopped(detail, finished));
                }
                actions
            }
        }
    }

    /// The cloud cannot take over: the fleet goes on, unjudged, and says why.
    pub(super) fn judging_stopped(
        &mut self,
        detail: String,
        finished: Option<FinishedEdge>,
    ) -> Vec<Action> {
        let Some(mut run) = self.edge.take() else {
            return self.fail(Failure::Internal);
        };
        let cascade = cascade_of_mut(&mut run);
        cascade.judging = false;
        cascade.why = RouteReason::new(reason::CLOUD_UNAVAILABLE, detail);
        self.cascade_release(run, finished)
    }

    /// Releases what the scorer allows and, at the end, serves the answer.
    fn cascade_release(&mut self, mut run: EdgeRun, finished: Option<FinishedEdge>) -> Vec<Action> {
        let cascade = cascade_of(&run);
        let releasable = if cascade.judging {
            cascade.scorer.releasable_tokens()
        } else {
            u32::MAX
        };
        let why = cascade.why.clone();
        let mut actions = self.release(&mut run, releasable, &why);
        let Some(finished) = finished else {
            self.edge = Some(run);
            return actions;
        };
        let cascade = cascade_of_mut(&mut run);
        if cascade.why.code == reason::CASCADE_ACCEPTED {
            let judgement = judge_scores(&cascade.rule, &ConfidenceScores::of(&cascade.tokens));
            cascade.why.detail = format!("{}; {}", cascade.why.detail, judgement.reason());
        }
        let why = cascade.why.clone();
        actions.extend(self.serve_finished(run, why, finished, true));
        actions
    }

    /// Sends the rest of a finished edge answer, books it and finishes.
    fn serve_finished(
        &mut self,
        mut run: EdgeRun,
        why: RouteReason,
        finished: FinishedEdge,
        announce: bool,
    ) -> Vec<Action> {
        let mut actions = self.release(&mut run, u32::MAX, &why);
        if announce {
            actions.extend(self.announce(Tier::Fleet, &why));
        }
        actions.push(Action::StopEdge(EdgeText::Served));
        let outcome = Outcome {
            tier: Tier::Fleet,
            reason: why,
            finish_reason: finished.finish_reason(),
            edge: Some(run.held.edge_part(self.setup.prompt_tokens)),
            cloud: None,
        };
        actions.push(self.finish(outcome));
        actions
    }

    /// Sends held tokens up to `upto` tokens from the start.
    fn release(&mut self, run: &mut EdgeRun, upto: u32, why: &RouteReason) -> Vec<Action> {
        let text = run.held.take_upto(upto);
        if text.is_empty() {
            return Vec::new();
        }
        let mut actions: Vec<Action> = self.announce(Tier::Fleet, why).into_iter().collect();
        actions.push(Action::Release { text });
        actions
    }

    /// Nothing was sent and the answer is unsure: the cloud answers the
    /// whole request. A finished edge answer is kept to serve if the cloud
    /// fails before sending anything.
    pub(super) fn escalate(
        &mut self,
        escalated: String,
        finished: Option<FinishedEdge>,
    ) -> Vec<Action> {
        let Some(run) = self.edge.take() else {
            return self.fail(Failure::Internal);
        };
        let why = RouteReason::new(reason::CASCADE_ESCALATED, escalated);
        let part = run.held.edge_part(self.setup.prompt_tokens);
        let mut actions = Vec::new();
        let held = match finished {
            Some(finished) => Some(HeldAnswer {
                text: run.held.pending_text(),
                end: finished.end,
                part,
            }),
            None => {
                actions.push(Action::StopEdge(EdgeText::Discarded));
                None
            }
        };
        let discarded = EdgePart {
            prompt_tokens: 0,
            completion_tokens: 0,
            discarded_tokens: part.discarded_tokens + part.completion_tokens,
        };
        let role = CloudRole::Escalated { held };
        actions.extend(self.start_cloud(
            role,
            Tier::Cloud,
            why,
            Some(discarded),
            CloudPrompt::Whole,
        ));
        actions
    }

    /// Confidence collapsed after text was released: the released tokens
    /// are kept and booked, and the cloud continues their text.
    pub(super) fn handoff(&mut self, collapsed: String) -> Vec<Action> {
        let Some(run) = self.edge.take() else {
            return self.fail(Failure::Internal);
        };
        let held = run.held;
        let mut actions = vec![Action::StopEdge(EdgeText::PartlyServed {
            released_tokens: held.released_tokens,
        })];
        let why = RouteReason::new(reason::HANDOFF, collapsed);
        let part = held.edge_part(self.setup.prompt_tokens);
        let remaining = run.max_tokens.saturating_sub(held.released_tokens).max(1);
        let sent = held.released_text;
        let role = CloudRole::Handoff {
            released_ids: held.released_ids,
            continued: Held::continuing(held.released_tokens, held.generated_tokens),
            remaining,
        };
        actions.extend(self.start_cloud(
            role,
            Tier::FleetThenCloud,
            why,
            Some(part),
            CloudPrompt::Continue { sent },
        ));
        actions
    }

    /// Serves a finished edge answer that was held back in full, after the
    /// cloud failed before sending anything.
    pub(super) fn serve_held(&mut self, answer: HeldAnswer, why: RouteReason) -> Vec<Action> {
        let mut actions: Vec<Action> = self.announce(Tier::Fleet, &why).into_iter().collect();
        if !answer.text.is_empty() {
            actions.push(Action::Release { text: answer.text });
        }
        actions.push(Action::StopEdge(EdgeText::Served));
        let part = answer.part;
        let outcome = Outcome {
            tier: Tier::Fleet,
            reason: why,
            finish_reason: finish_reason(answer.end),
            edge: Some(EdgePart {
                completion_tokens: part.completion_tokens + part.discarded_tokens,
                discarded_tokens: 0,
                ..part
            }),
            cloud: None,
        };
        actions.push(self.finish(outcome));
        actions
    }
}

fn cascade_of(run: &EdgeRun) -> &Cascade {
    match &run.role {
        EdgeRole::Cascade(cascade) => cascade,
        _ => unreachable!("only a cascade is judged"),
    }
}

fn cascade_of_mut(run: &mut EdgeRun) -> &mut Cascade {
    match &mut run.role {
        EdgeRole::Cascade(cascade) => cascade,
        _ => unreachable!("only a cascade is judged"),
    }
}
