//! Events, actions and machines in the states the route-machine tests start
//! from.
#![allow(dead_code)]

use router::{
    AcceptRule, Action, Budget, CloudPrompt, CloudUsage, ConfidenceFeature, Decision, EdgeEnd,
    EdgePart, Event, IncrementalConfig, Outcome, PromptFeatures, Route, RouteMachine, RouteReason,
    Setup, Target, Tier, TokenLogprob,
};

pub const PROMPT_TOKENS: u32 = 10;
pub const MAX_TOKENS: u32 = 64;
/// A token the scorer is sure of.
pub const SURE: f32 = -0.05;
/// A token far below the accept rule's threshold.
pub const UNSURE: f32 = -3.0;
/// A token that collapses the scorer's window.
pub const LOST: f32 = -10.0;

pub fn setup(target: Target) -> Setup {
    Setup {
        target,
        cloud_model: "cloud/big".into(),
        prompt_tokens: PROMPT_TOKENS,
        max_tokens: MAX_TOKENS,
        can_hand_off: true,
        incremental: IncrementalConfig {
            holdback_tokens: 4,
            release_lag_tokens: 2,
            collapse_window_mean: -2.5,
        },
    }
}

pub fn machine(target: Target) -> RouteMachine {
    RouteMachine::new(setup(target))
}

fn decision(route: Route, rule: Option<AcceptRule>, reason: &str) -> Decision {
    Decision {
        route,
        rule,
        reason: reason.into(),
        features: PromptFeatures::of("what is 2 + 2?"),
    }
}

pub fn decision_edge() -> Decision {
    decision(Route::Edge, None, "edge: small talk")
}

pub fn decision_cloud() -> Decision {
    decision(Route::Cloud, None, "cloud: long prompt")
}

pub fn decision_cascade() -> Decision {
    let rule = AcceptRule {
        feature: ConfidenceFeature::MeanLogprob,
        threshold: -1.0,
    };
    decision(Route::Cascade, Some(rule), "cascade: math")
}

pub fn start_edge() -> Action {
    Action::StartEdge {
        continue_from: Vec::new(),
        max_tokens: None,
    }
}

pub fn edge_started() -> Event {
    Event::EdgeStarted {
        max_tokens: MAX_TOKENS,
    }
}

pub fn edge_unavailable() -> Event {
    Event::EdgeUnavailable {
        detail: "no vehicle can serve the model".into(),
    }
}

pub fn token(id: i32, text: &str, logprob: f32) -> Event {
    Event::EdgeToken {
        id,
        text: text.into(),
        logprob: TokenLogprob::new(logprob, []),
    }
}

pub fn finished() -> Event {
    finished_with("")
}

pub fn finished_with(rest: &str) -> Event {
    Event::EdgeFinished {
        end: EdgeEnd::Stop,
        stop_sequence: false,
        rest: rest.into(),
    }
}

pub fn slot(granted: bool) -> Event {
    Event::CloudSlot { granted }
}

pub fn spent() -> Event {
    Event::Budget(Budget::Spent {
        spent: "$1.00".into(),
        cap: "$1.00".into(),
    })
}

pub fn chunk(text: &str) -> Event {
    Event::CloudChunk {
        text: text.into(),
        finish_reason: None,
        usage: None,
    }
}

pub fn chunk_with_usage(text: &str, prompt_tokens: u32, completion_tokens: u32) -> Event {
    Event::CloudChunk {
        text: text.into(),
        finish_reason: Some("stop".into()),
        usage: Some(usage(prompt_tokens, completion_tokens)),
    }
}

pub fn cloud_failed(detail: &str) -> Event {
    Event::CloudFailed {
        detail: detail.into(),
        fleet_could_serve: true,
    }
}

pub fn usage(prompt_tokens: u32, completion_tokens: u32) -> CloudUsage {
    CloudUsage {
        prompt_tokens,
        completion_tokens,
    }
}

pub fn reason_of(code: &'static str, detail: &str) -> RouteReason {
    RouteReason::new(code, detail)
}

pub fn announce(tier: Tier, code: &'static str, detail: &str) -> Action {
    Action::Announce {
        tier,
        reason: reason_of(code, detail),
    }
}

pub fn release(text: &str) -> Action {
    Action::Release { text: text.into() }
}

pub fn edge_part(completion_tokens: u32, discarded_tokens: u32) -> EdgePart {
    EdgePart {
        prompt_tokens: PROMPT_TOKENS,
        completion_tokens,
        discarded_tokens,
    }
}

pub fn finish_fleet(
    code: &'static str,
    detail: &str,
    finish_reason: &'static str,
    edge: EdgePart,
) -> Action {
    Action::Finish(Outcome {
        tier: Tier::Fleet,
        reason: reason_of(code, detail),
        finish_reason,
        edge: Some(edge),
        cloud: None,
    })
}

pub fn finish_cloud(
    tier: Tier,
    code: &'static str,
    detail: &str,
    edge: Option<EdgePart>,
    cloud: CloudUsage,
) -> Action {
    Action::Finish(Outcome {
        tier,
        reason: reason_of(code, detail),
        finish_reason: "stop",
        edge,
        cloud: Some(cloud),
    })
}

pub fn start_cloud_whole(max_tokens: u32) -> Action {
    Action::StartCloud {
        prompt: CloudPrompt::Whole,
        max_tokens,
    }
}

/// `auto` pre-routed to the edge, its generation running.
pub fn edge_answering(target: Target) -> RouteMachine {
    let mut machine = machine(target);
    machine.start();
    machine.handle(Event::PreRouted(decision_edge()));
    assert_eq!(machine.handle(edge_started()), vec![]);
    machine
}

/// `auto` pre-routed to a cascade, its edge generation running.
pub fn cascading() -> RouteMachine {
    let mut machine = machine(Target::Auto);
    machine.start();
    machine.handle(Event::PreRouted(decision_cascade()));
    assert_eq!(
        machine.handle(Event::Budget(Budget::Allows)),
        vec![start_edge()]
    );
    assert_eq!(machine.handle(edge_started()), vec![]);
    machine
}

/// The cloud called for the whole answer, its stream open.
pub fn cloud_called(target: Target, pre_route: Decision) -> RouteMachine {
    let mut machine = machine(target);
    machine.start();
    if target == Target::Auto {
        machine.handle(Event::PreRouted(pre_route));
    }
    assert_eq!(
        machine.handle(Event::Budget(Budget::Allows)),
        vec![Action::ReserveCloud]
    );
    assert_eq!(
        machine.handle(slot(true)),
        vec![start_cloud_whole(MAX_TOKENS)]
    );
    assert_eq!(machine.handle(Event::CloudStarted), vec![]);
    machine
}

/// Feeds events and returns all the actions they led to.
pub fn feed(machine: &mut RouteMachine, events: impl IntoIterator<Item = Event>) -> Vec<Action> {
    events
        .into_iter()
        .flat_map(|event| machine.handle(event))
        .collect()
}

/// The reason of the first announcement among `actions`.
pub fn announced(actions: &[Action]) -> Option<&RouteReason> {
    actions.iter().find_map(|action| match action {
        Action::Announce { reason, .. } | Action::AnnounceHandoff { reason } => Some(reason),
        _ => None,
    })
}
