//! The cloud side of [`RouteMachine`]: one cloud call at a time, its stream
//! released to the client as it comes, and what its failure leads to.

use super::edge::{Held, HeldAnswer};
use super::{
    reason, Action, CloudPrompt, CloudUsage, EdgePart, EdgeText, Failure, Outcome, RouteMachine,
    RouteReason, Tier,
};

/// Why the cloud was called, which says what its failure leads to.
#[derive(Clone, Debug)]
pub(super) enum CloudRole {
    /// `cloud/<model>`.
    Explicit,
    /// `auto` sending the whole request to the cloud.
    Auto,
    /// An escalated cascade; `held` is the edge's finished answer, if it had
    /// finished, served when the cloud fails before sending anything.
    Escalated { held: Option<HeldAnswer> },
    /// A handoff: the fleet continues from the released tokens when the
    /// cloud fails before sending anything.
    Handoff {
        released_ids: Vec<i32>,
        continued: Held,
        remaining: u32,
    },
}

/// The current cloud call and how far its stream got.
#[derive(Clone, Debug)]
pub(super) struct CloudCall {
    role: CloudRole,
    tier: Tier,
    why: RouteReason,
    /// The fleet's part of the answer, for the summary.
    edge: Option<EdgePart>,
    /// Whether the upstream accepted the call.
    streaming: bool,
    /// Whether any chunk arrived (and the tier was announced).
    chunk_seen: bool,
    text_chunks: u32,
    usage: Option<CloudUsage>,
    finish: Option<String>,
}

impl CloudCall {
    /// The cloud's usage by the gateway's own counts, for an upstream that
    /// reports none (or was cut off): the prompt as the edge model counts
    /// it, plus any edge text it continued, and its text chunks (about a
    /// token each).
    fn own_usage(&self, prompt_tokens: u32) -> CloudUsage {
        let sent_before = self.edge.map_or(0, |part| part.completion_tokens);
        CloudUsage {
            prompt_tokens: prompt_tokens.saturating_add(sent_before),
            completion_tokens: self.text_chunks,
        }
    }

    /// The client went away during the call: a held edge answer is
    /// discarded, and the upstream's work on the prompt and the text it
    /// streamed is booked.
    pub(super) fn cut(self, prompt_tokens: u32) -> Vec<Action> {
        let mut actions = Vec::new();
        if matches!(self.role, CloudRole::Escalated { held: Some(_) }) {
            actions.push(Action::StopEdge(EdgeText::Discarded));
        }
        if self.streaming {
            actions.push(Action::CutCloud {
                usage: self.own_usage(prompt_tokens),
            });
        }
        actions
    }
}

impl RouteMachine {
    pub(super) fn start_cloud(
        &mut self,
        role: CloudRole,
        tier: Tier,
        why: RouteReason,
        edge: Option<EdgePart>,
        prompt: CloudPrompt,
    ) -> Vec<Action> {
        let max_tokens = match &role {
            CloudRole::Handoff { remaining, .. } => *remaining,
            _ => self.setup.max_tokens,
        };
        self.cloud = Some(CloudCall {
            role,
            tier,
            why,
            edge,
            streaming: false,
            chunk_seen: false,
            text_chunks: 0,
            usage: None,
            finish: None,
        });
        vec![Action::StartCloud { prompt, max_tokens }]
    }

    pub(super) fn cloud_started(&mut self) -> Vec<Action> {
        match self.cloud.as_mut() {
            Some(call) if !call.streaming => {
                call.streaming = true;
                Vec::new()
            }
            _ => self.fail(Failure::Internal),
        }
    }

    pub(super) fn cloud_chunk(
        &mut self,
        text: String,
        finish: Option<String>,
        usage: Option<CloudUsage>,
    ) -> Vec<Action> {
        let Some(mut call) = self.cloud.take().filter(|call| call.streaming) else {
            return self.fail(Failure::Internal);
        };
        let mut actions = Vec::new();
        if !call.chunk_seen {
            actions.extend(self.announce(call.tier, &call.why));
            call.chunk_seen = true;
        }
        if !text.is_empty() {
            call.text_chunks += 1;
            actions.push(Action::Release { text });
        }
        if finish.is_some() {
            call.finish = finish;
        }
        if usage.is_some() {
            call.usage = usage;
        }
        self.cloud = Some(call);
        actions
    }

    pub(super) fn cloud_finished(&mut self) -> Vec<Action> {
        let Some(call) = self.cloud.take().filter(|call| call.streaming) else {
            return self.fail(Failure::Internal);
        };
        let mut actions = Vec::new();
        if matches!(call.role, CloudRole::Escalated { held: Some(_) }) {
            // The cloud answered: the fleet's finished answer is discarded.
            actions.push(Action::StopEdge(EdgeText::Discarded));
        }
        if !call.chunk_seen {
            actions.extend(self.announce(call.tier, &call.why));
        }
        let usage = call
            .usage
            .unwrap_or_else(|| call.own_usage(self.setup.prompt_tokens));
        let finish_reason = if call.finish.as_deref() == Some("length") {
            "length"
        } else {
            "stop"
        };
        let outcome = Outcome {
            tier: call.tier,
            reason: call.why,
            finish_reason,
            edge: call.edge,
            cloud: Some(usage),
        };
        actions.push(self.finish(outcome));
        actions
    }

    /// A cloud call failed: after text it is the request's failure; before
    /// any, the fleet answers where the request's route allows it.
    pub(super) fn cloud_failed(&mut self, detail: String, fleet_could_serve: bool) -> Vec<Action> {
        let Some(call) = self.cloud.take() else {
            return self.fail(Failure::Internal);
        };
        if call.chunk_seen {
            return self.fail(Failure::Cloud);
        }
        let why = call.why;
        match call.role {
            CloudRole::Explicit if self.fleet_fallback() && fleet_could_serve => {
                let why = format!("{detail}; the fleet answered");
                self.edge_plain(RouteReason::new(reason::CLOUD_FALLBACK, why), false)
            }
            CloudRole::Explicit => self.fail(Failure::Cloud),
            CloudRole::Auto => {
                let detail = format!("{}; {detail}, so the fleet answered", why.detail);
                self.edge_plain(RouteReason::new(reason::CLOUD_UNAVAILABLE, detail), false)
            }
            CloudRole::Escalated { held } => {
                let detail = format!("{}; {detail}, so the fleet answered", why.detail);
                let fallback = RouteReason::new(reason::CLOUD_UNAVAILABLE, detail);
                match held {
                    Some(answer) => self.serve_held(answer, fallback),
                    None => self.edge_plain(fallback, false),
                }
            }
            CloudRole::Handoff {
                released_ids,
                continued,
                remaining,
            } => {
                let detail = format!("{}; {detail}, so the fleet continued", why.detail);
                let fallback = RouteReason::new(reason::CLOUD_UNAVAILABLE, detail);
                self.edge_continue(fallback, released_ids, continued, remaining)
            }
        }
    }
}
