//! The words of [`super::RouteMachine`]: the events it is fed, the actions
//! it answers with, and the route reasons and counts those carry.

use crate::router::Decision;
use crate::{IncrementalConfig, TokenLogprob};

/// Which tier served a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Fleet,
    Cloud,
    /// The fleet started the answer and the cloud model finished it.
    FleetThenCloud,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fleet => "fleet",
            Tier::Cloud => "cloud",
            Tier::FleetThenCloud => "fleet+cloud",
        }
    }
}

/// Why a tier served: a stable code (the `x-fleetgrid-route-reason` header)
/// and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteReason {
    pub code: &'static str,
    pub detail: String,
}

impl RouteReason {
    pub fn new(code: &'static str, detail: impl Into<String>) -> RouteReason {
        RouteReason {
            code,
            detail: detail.into(),
        }
    }
}

/// The reason codes a routed response may carry.
pub mod reason {
    /// The client asked for `cloud/<model>`.
    pub const EXPLICIT_CLOUD: &str = "explicit_cloud";
    /// `auto`: the pre-route sent the prompt to the fleet, unjudged.
    pub const PRE_ROUTE_EDGE: &str = "pre_route_edge";
    /// `auto`: the pre-route sent the prompt straight to the cloud.
    pub const PRE_ROUTE_CLOUD: &str = "pre_route_cloud";
    /// `auto`: the fleet's answer was confident enough.
    pub const CASCADE_ACCEPTED: &str = "cascade_accepted";
    /// `auto`: the fleet's answer was unsure before any of it was sent.
    pub const CASCADE_ESCALATED: &str = "cascade_escalated";
    /// `auto`: confidence collapsed part-way; the cloud continued the answer.
    pub const HANDOFF: &str = "handoff";
    /// `auto`: the tenant's cloud budget is spent; the fleet answered.
    pub const BUDGET_EXHAUSTED: &str = "budget_exhausted";
    /// `auto`: the cloud could not take the request; the fleet answered.
    pub const CLOUD_UNAVAILABLE: &str = "cloud_unavailable";
    /// `cloud/...`: the upstream failed and the configured fallback is the fleet.
    pub const CLOUD_FALLBACK: &str = "cloud_fallback";
    /// `auto`: no vehicle could take the request; the cloud answered.
    pub const EDGE_UNAVAILABLE: &str = "edge_unavailable";
    /// `auto` with `quality: "exact"`: the cloud model's own answer, the part it agreed
    /// with drafted on the fleet.
    pub const EXACT_CASCADE: &str = "exact_cascade";
}

/// Token counts of the fleet's part of an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgePart {
    pub prompt_tokens: u32,
    /// Tokens whose text reached the client.
    pub completion_tokens: u32,
    /// Tokens generated but never sent (an escalation or a handoff dropped
    /// them); the platform's cost, not the tenant's.
    pub discarded_tokens: u32,
}

/// Token counts of the cloud's part: as the upstream reported them, or by
/// the gateway's own count when it reported none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloudUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// What the request asked for, and the facts the policy needs about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Setup {
    pub target: Target,
    /// The cloud model's public name (`cloud/<model>`).
    pub cloud_model: String,
    /// The prompt as the edge model tokenizes it (the gateway's own count).
    pub prompt_tokens: u32,
    /// The completion tokens the client asked for (or the default): the
    /// cloud's limit for a whole answer.
    pub max_tokens: u32,
    /// Whether the cloud can continue a started answer of this request
    /// (it can render the prompt with its own template).
    pub can_hand_off: bool,
    /// The streamed cascade's limits.
    pub incremental: IncrementalConfig,
}

/// What a routed request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// `cloud/<model>`; `fleet_fallback`: the fleet answers when the cloud
    /// cannot.
    Cloud { fleet_fallback: bool },
    /// `auto`: the router decides.
    Auto,
}

/// The tenant's cloud budget, as [`Action::CheckBudget`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Budget {
    Allows,
    /// Spent: the amounts as people read them, for the route reason.
    Spent {
        spent: String,
        cap: String,
    },
}

/// How an edge generation ended by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeEnd {
    Stop,
    Length,
}

/// What happened, fed to [`super::RouteMachine::handle`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The answer to [`Action::PreRoute`].
    PreRouted(Decision),
    /// The answer to [`Action::CheckBudget`].
    Budget(Budget),
    /// The answer to [`Action::ReserveCloud`].
    CloudSlot {
        granted: bool,
    },
    /// The answer to [`Action::StartEdge`]: it runs, with at most
    /// `max_tokens` new tokens.
    EdgeStarted {
        max_tokens: u32,
    },
    /// The answer to [`Action::StartEdge`]: no vehicle can take it.
    EdgeUnavailable {
        detail: String,
    },
    /// One committed edge token: its id, the text it adds (stop sequences
    /// held back by the driver's assembler), its log-probability and best
    /// alternative.
    EdgeToken {
        id: i32,
        text: String,
        logprob: TokenLogprob,
    },
    /// The edge generation ended by itself. `stop_sequence`: the text hit
    /// one of the client's stop sequences; `rest`: text the assembler held
    /// until the end.
    EdgeFinished {
        end: EdgeEnd,
        stop_sequence: bool,
        rest: String,
    },
    EdgeFailed {
        detail: String,
    },
    /// The answer to [`Action::StartCloud`]: the upstream accepted the call.
    CloudStarted,
    /// One chunk of the cloud's stream.
    CloudChunk {
        text: String,
        finish_reason: Option<String>,
        usage: Option<CloudUsage>,
    },
    /// The cloud's stream ended.
    CloudFinished,
    /// The cloud call failed (to start, or mid-stream). `fleet_could_serve`:
    /// the failure is the cloud's, not a refusal of the request itself.
    CloudFailed {
        detail: String,
        fleet_could_serve: bool,
    },
    /// The whole request's time is up.
    Deadline,
    /// The client went away.
    ClientGone,
}

/// What the driver does, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Ask the router's pre-route about the prompt; answer [`Event::PreRouted`].
    PreRoute,
    /// Read the tenant's cloud budget; answer [`Event::Budget`].
    CheckBudget,
    /// Take one of the cloud's concurrency slots, kept for the next
    /// [`Action::StartCloud`]; answer [`Event::CloudSlot`].
    ReserveCloud,
    /// Start an edge generation of the prompt followed by `continue_from`
    /// (tokens the client already has), with at most `max_tokens` new tokens
    /// (`None`: the request's own limit); answer [`Event::EdgeStarted`] or
    /// [`Event::EdgeUnavailable`].
    StartEdge {
        continue_from: Vec<i32>,
        max_tokens: Option<u32>,
    },
    /// The edge attempt is over: stop its generation if it still runs, and
    /// book its work as `text` says.
    StopEdge(EdgeText),
    /// Call the cloud with the reserved slot; answer [`Event::CloudStarted`]
    /// or [`Event::CloudFailed`].
    StartCloud {
        prompt: CloudPrompt,
        max_tokens: u32,
    },
    /// The answer starts: tell the client which tier serves it and why.
    Announce { tier: Tier, reason: RouteReason },
    /// The cloud takes over an answer the fleet started.
    AnnounceHandoff { reason: RouteReason },
    /// Send this text to the client.
    Release { text: String },
    /// The client went away mid-stream: book the cloud's part with `usage`.
    CutCloud { usage: CloudUsage },
    /// The answer is complete: book the cloud's part (if any), settle the
    /// request once, then tell the client how it ended.
    Finish(Outcome),
    /// The request fails; whatever still runs is dropped and nothing is
    /// settled.
    Fail(Failure),
    /// The client went away: settle for the work done until then.
    SettleCancelled,
}

/// How much of an edge attempt's text the client keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeText {
    /// All of it (or all it made before the client went away): booked in full.
    Served,
    /// Exactly the first `released_tokens` (a handoff): booked for those.
    PartlyServed { released_tokens: u32 },
    /// None of it: reimbursed, not charged, when the request settles.
    Discarded,
}

/// What the cloud is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudPrompt {
    /// The client's whole request.
    Whole,
    /// Continue an answer whose start, `sent`, the client already has.
    Continue { sent: String },
}

/// How an answer ended, for the final chunk or body.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub tier: Tier,
    pub reason: RouteReason,
    pub finish_reason: &'static str,
    pub edge: Option<EdgePart>,
    /// The cloud's part, to book before settling.
    pub cloud: Option<CloudUsage>,
}

/// Why a request failed; the driver maps each to its HTTP error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `cloud/<model>` with the tenant's cloud budget spent.
    BudgetSpent,
    /// `cloud/<model>` with the cloud at its concurrency limit.
    CloudBusy,
    /// The last cloud call failed.
    Cloud,
    /// The last [`Action::StartEdge`] was refused.
    EdgeUnavailable,
    /// The edge generation failed.
    Edge,
    /// The request's time ran out.
    TimedOut,
    /// An event that does not fit the request's state: a driver defect.
    Internal,
}
