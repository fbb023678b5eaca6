//! `fleetgrid eval --policy auto`: the gateway's own routing policy,
//! [`RouteMachine`], driven over the evaluation's two tiers.
//!
//! The driver is the evaluation's counterpart of the gateway's
//! (`coordinator::api::route_drive`): it feeds the machine the same events
//! (the pre-route's decision, each edge token with its log-probabilities, the
//! edge's end, the cloud's answer and end, a failure of either) and carries
//! out the actions it gets back (start the edge, stop it, call the cloud for
//! the whole request or to continue the released text, release text, finish),
//! so an escalation and a handoff mid-answer are what the gateway would do.
//! Where the gateway asks its tenant's budget and the cloud's concurrency
//! slots, the evaluation's situation answers: its tenant has no cloud budget
//! and it runs one item at a time, so the budget allows and a slot is free.
//!
//! A tier is reached through [`RouteTiers`]: over HTTP in a live run, from
//! the records in a replay, canned in the tests. A tier's answer arrives
//! whole and is fed token by token; once the machine stops the edge, the
//! rest of its answer is not fed. Cost is what the gateway's path spends:
//! each edge attempt's prompt and the tokens fed before it stopped, and each
//! cloud call's usage. Latency is the tiers' own time, whole answers included.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use router::{
    Action, Budget, CloudPrompt, CloudUsage, EdgeEnd, Event, MicroUsd, Outcome, RouteMachine,
    Router, Setup, Target, Tier, TokenLogprob,
};

use crate::eval_report::Served;

/// Events one item's route may take before the driver gives up: every
/// token of two edge attempts and a few answers, with room to spare.
const ROUTE_EVENTS_MAX: usize = 100_000;

/// One tier's whole answer, to be fed to the machine.
#[derive(Debug, Clone, Default)]
pub struct TierAnswer {
    pub text: String,
    /// An edge answer's tokens: the text each adds and its log-probabilities.
    pub tokens: Vec<(String, TokenLogprob)>,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u64,
}

/// A tier's answer, or why the tier failed (the machine decides what that
/// leads to).
pub type TierCall = Result<TierAnswer, String>;

/// The two tiers as the driver calls them. The outer error is the driver's
/// own (a replay without the record it needs): the item cannot be routed.
#[allow(async_fn_in_trait)] // Only this crate implements it, never across threads.
pub trait RouteTiers {
    /// The edge model's answer with per-token log-probabilities, to the
    /// item (`sent` empty) or continuing `sent`, text the client already has.
    async fn edge(&mut self, sent: &str, max_tokens: u32) -> anyhow::Result<TierCall>;
    /// The cloud model's answer to the whole item, or its continuation of
    /// text the edge started.
    async fn cloud(&mut self, prompt: &CloudPrompt, max_tokens: u32) -> anyhow::Result<TierCall>;
}

/// What the machine made of one item.
#[derive(Debug, Clone)]
pub struct Routed {
    pub outcome: Outcome,
    /// The text the client received.
    pub text: String,
    pub cost: MicroUsd,
    pub latency_ms: u64,
    /// The router's own time: the pre-route and every step of the machine.
    pub router_time: Duration,
}

impl Routed {
    pub fn served(&self) -> Served {
        match self.outcome.tier {
            Tier::Fleet => Served::Edge,
            Tier::Cloud if self.outcome.edge.is_some() => Served::Escalated,
            Tier::Cloud => Served::Cloud,
            Tier::FleetThenCloud => Served::Handoff,
        }
    }

    /// As the gateway says it: the reason code and its detail.
    pub fn reason(&self) -> String {
        format!(
            "{}: {}",
            self.outcome.reason.code, self.outcome.reason.detail
        )
    }
}

/// The item as the machine needs it.
pub struct RouteItem<'a> {
    /// The user message (what the pre-route reads).
    pub prompt: &'a str,
    pub max_tokens: u32,
    /// Whether the cloud can continue a started answer (its chat template is known).
    pub can_hand_off: bool,
    /// The cloud model's name, for the route reasons.
    pub cloud_model: &'a str,
}

/// Runs the gateway's policy on one item.
pub async fn route<T: RouteTiers>(
    router: &Router,
    item: &RouteItem<'_>,
    tiers: &mut T,
) -> anyhow::Result<Routed> {
    let mut driver = Driver {
        tiers,
        router,
        prompt: item.prompt,
        max_tokens: item.max_tokens,
        text: String::new(),
        edge: None,
        edge_spent: Vec::new(),
        cloud: None,
        cost: MicroUsd::ZERO,
        latency_ms: 0,
        last_error: None,
    };
    let setup = Setup {
        target: Target::Auto,
        cloud_model: item.cloud_model.to_string(),
        // Both tiers report their usage, so the machine's own count of the
        // prompt is never needed.
        prompt_tokens: 0,
        max_tokens: item.max_tokens,
        can_hand_off: item.can_hand_off,
        incremental: router.config().incremental,
    };
    let mut machine = RouteMachine::new(setup);
    let mut router_time = Duration::ZERO;
    let started = Instant::now();
    let mut actions: VecDeque<Action> = machine.start().into();
    router_time += started.elapsed();
    let mut outcome = None;
    for _ in 0..ROUTE_EVENTS_MAX {
        while let Some(action) = actions.pop_front() {
            if let Action::Finish(finished) = &action {
                outcome = Some(finished.clone());
            }
            let (answer, spent) = driver.execute(action).await?;
            router_time += spent;
            if let Some(event) = answer {
                let started = Instant::now();
                actions.extend(machine.handle(event));
                router_time += started.elapsed();
            }
        }
        if machine.is_done() {
            let outcome = outcome.context("the route ended without an answer")?;
            return Ok(driver.routed(outcome, router_time));
        }
        let event = driver.next_event()?;
        let started = Instant::now();
        actions.extend(machine.handle(event));
        router_time += started.elapsed();
    }
    bail!("the route took more than {ROUTE_EVENTS_MAX} events")
}

/// The edge answer being fed.
struct EdgeFeed {
    answer: Result<TierAnswer, String>,
    fed: usize,
    /// Whether the machine still takes its tokens.
    running: bool,
    max_tokens: u32,
}

/// The cloud answer being fed: its one chunk, then its end.
struct CloudFeed {
    answer: Option<TierAnswer>,
}

struct Driver<'a, T> {
    tiers: &'a mut T,
    router: &'a Router,
    prompt: &'a str,
    /// The item's completion limit.
    max_tokens: u32,
    /// What was released to the client.
    text: String,
    edge: Option<EdgeFeed>,
    /// (prompt, fed tokens) of edge attempts that are over.
    edge_spent: Vec<(u32, u32)>,
    cloud: Option<CloudFeed>,
    cost: MicroUsd,
    latency_ms: u64,
    /// Why the last tier failed, for a failed route.
    last_error: Option<String>,
}

impl<T: RouteTiers> Driver<'_, T> {
    /// Carries out one action; a question is answered with its event. Also
    /// returns the router's own time in it (the pre-route).
    async fn execute(&mut self, action: Action) -> anyhow::Result<(Option<Event>, Duration)> {
        let answer = match action {
            Action::PreRoute => {
                let started = Instant::now();
                let decision = self.router.pre_route(self.prompt);
                return Ok((Some(Event::PreRouted(decision)), started.elapsed()));
            }
            // The evaluation's tenant has no cloud budget.
            Action::CheckBudget => Some(Event::Budget(Budget::Allows)),
            // One item at a time: the cloud always has a slot.
            Action::ReserveCloud => Some(Event::CloudSlot { granted: true }),
            Action::StartEdge {
                continue_from,
                max_tokens,
            } => Some(self.start_edge(&continue_from, max_tokens).await?),
            Action::StopEdge(_) => {
                if let Some(edge) = self.edge.as_mut() {
                    edge.running = false;
                }
                None
            }
            Action::StartCloud { prompt, max_tokens } => {
                Some(self.start_cloud(&prompt, max_tokens).await?)
            }
            Action::Release { text } => {
                self.text.push_str(&text);
                None
            }
            // Nobody hangs up on the evaluation, and how it ended is read
            // from the `Finish` action.
            Action::Announce { .. }
            | Action::AnnounceHandoff { .. }
            | Action::CutCloud { .. }
            | Action::SettleCancelled
            | Action::Finish(_) => None,
            Action::Fail(failure) => bail!(
                "the route failed ({failure:?}): {}",
                self.last_error.as_deref().unwrap_or("no tier said why")
            ),
        };
        Ok((answer, Duration::ZERO))
    }

    async fn start_edge(
        &mut self,
        continue_from: &[i32],
        max_tokens: Option<u32>,
    ) -> anyhow::Result<Event> {
        // The machine continues only from tokens of the last attempt, which
        // it numbered as they were fed.
        let sent = match self.edge.take() {
            Some(previous) => {
                let sent = continued_text(&previous, continue_from)?;
                self.edge_spent.push(previous.spent());
                sent
            }
            None if continue_from.is_empty() => String::new(),
            None => bail!("the machine continued an edge answer that never ran"),
        };
        // Without a limit of its own, an attempt has the item's.
        let max_tokens = max_tokens.unwrap_or(self.max_tokens);
        let answer = self.tiers.edge(&sent, max_tokens).await?;
        if let Ok(answer) = &answer {
            self.latency_ms += answer.latency_ms;
            if answer.tokens.is_empty() && answer.completion_tokens > 0 {
                bail!("the edge answered without log-probabilities, which the router needs");
            }
        }
        self.edge = Some(EdgeFeed {
            answer,
            fed: 0,
            running: true,
            max_tokens,
        });
        Ok(Event::EdgeStarted { max_tokens })
    }

    async fn start_cloud(
        &mut self,
        prompt: &CloudPrompt,
        max_tokens: u32,
    ) -> anyhow::Result<Event> {
        Ok(match self.tiers.cloud(prompt, max_tokens).await? {
            Ok(answer) => {
                self.latency_ms += answer.latency_ms;
                let price = self.router.config().prices.cloud;
                let spent = price.cost(answer.prompt_tokens, answer.completion_tokens);
                self.cost = self.cost.saturating_add(spent);
                self.cloud = Some(CloudFeed {
                    answer: Some(answer),
                });
                Event::CloudStarted
            }
            Err(detail) => {
                self.last_error = Some(detail.clone());
                Event::CloudFailed {
                    detail,
                    fleet_could_serve: true,
                }
            }
        })
    }

    /// What the running tier says next.
    fn next_event(&mut self) -> anyhow::Result<Event> {
        if let Some(edge) = self.edge.as_mut().filter(|edge| edge.running) {
            let answer = match &edge.answer {
                Ok(answer) => answer,
                Err(detail) => {
                    edge.running = false;
                    self.last_error = Some(detail.clone());
                    return Ok(Event::EdgeFailed {
                        detail: detail.clone(),
                    });
                }
            };
            if let Some((text, logprob)) = answer.tokens.get(edge.fed) {
                let id = i32::try_from(edge.fed).context("an edge answer this long")?;
                edge.fed += 1;
                return Ok(Event::EdgeToken {
                    id,
                    text: text.clone(),
                    logprob: *logprob,
                });
            }
            edge.running = false;
            let end = match answer.finish_reason.as_deref() {
                Some("length") => EdgeEnd::Length,
                Some(_) => EdgeEnd::Stop,
                None if answer.completion_tokens >= edge.max_tokens => EdgeEnd::Length,
                None => EdgeEnd::Stop,
            };
            return Ok(Event::EdgeFinished {
                end,
                stop_sequence: false,
                rest: String::new(),
            });
        }
        if let Some(cloud) = self.cloud.as_mut() {
            let Some(answer) = cloud.answer.take() else {
                self.cloud = None;
                return Ok(Event::CloudFinished);
            };
            return Ok(Event::CloudChunk {
                text: answer.text,
                finish_reason: answer.finish_reason,
                usage: Some(CloudUsage {
                    prompt_tokens: answer.prompt_tokens,
                    completion_tokens: answer.completion_tokens,
                }),
            });
        }
        bail!("the route waits on no tier")
    }

    fn routed(mut self, outcome: Outcome, router_time: Duration) -> Routed {
        if let Some(edge) = self.edge.take() {
            self.edge_spent.push(edge.spent());
        }
        let price = self.router.config().prices.edge;
        let edge_cost: MicroUsd = self
            .edge_spent
            .iter()
            .map(|(prompt, fed)| price.cost(*prompt, *fed))
            .sum();
        Routed {
            outcome,
            text: self.text,
            cost: self.cost.saturating_add(edge_cost),
            latency_ms: self.latency_ms,
            router_time,
        }
    }
}

impl EdgeFeed {
    /// The attempt's prompt and the tokens the gateway would have generated:
    /// those fed before the machine stopped it.
    fn spent(&self) -> (u32, u32) {
        let Ok(answer) = &self.answer else {
            return (0, 0);
        };
        if self.fed == answer.tokens.len() {
            // All of it: the endpoint's own count.
            return (answer.prompt_tokens, answer.completion_tokens);
        }
        (
            answer.prompt_tokens,
            u32::try_from(self.fed).unwrap_or(u32::MAX),
        )
    }
}

/// The text of the fed tokens `ids` (numbered from 0 as they were fed).
fn continued_text(edge: &EdgeFeed, ids: &[i32]) -> anyhow::Result<String> {
    let Ok(answer) = &edge.answer else {
        bail!("the machine continued a failed edge answer");
    };
    ids.iter()
        .map(|id| {
            usize::try_from(*id)
                .ok()
                .filter(|index| *index < edge.fed)
                .and_then(|index| answer.tokens.get(index))
                .map(|(text, _)| text.as_str())
                .with_context(|| format!("the machine continued from token {id}, never fed"))
        })
        .collect()
}

#[cfg(test)]
#[path = "eval_route_tests.rs"]
mod tests;
