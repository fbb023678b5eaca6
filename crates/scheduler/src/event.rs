//! The scheduler's inputs (`Event`) and outputs (`Command`): the whole contract with whoever
//! drives it, the coordinator server or the fleet simulator.

use crate::types::{
    Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, PromptHeads, RequestId, Resume,
    TenantConfig, TenantId, VehicleState,
};

/// Something that happened, applied at the time given to [`crate::Scheduler::handle`].
///
/// Events about unknown nodes or requests, or that no longer match the scheduler's view (a
/// failure reported by a node the request has already left), are ignored and counted in
/// [`crate::Scheduler::stale_events`]: the coordinator and the nodes race, and the scheduler's
/// view is the one that counts.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A node connected (or reconnected after a loss: it starts empty again).
    NodeRegistered {
        node: NodeId,
        capacity: NodeCapacity,
        state: VehicleState,
        policy: OwnerPolicy,
    },
    /// The vehicle reported a new state.
    NodeStateChanged { node: NodeId, state: VehicleState },
    /// The owner changed their limits.
    NodePolicyChanged { node: NodeId, policy: OwnerPolicy },
    /// The node used `wh` more watt-hours for compute (counts toward the owner's daily cap).
    NodeEnergyUsed { node: NodeId, wh: u32 },
    /// The driver gave the node work of its own that takes one of its slots (a verification
    /// check): the slot is not free until `NodeSlotReleased`. Held slots are never preempted.
    NodeSlotHeld { node: NodeId },
    /// The work of a `NodeSlotHeld` ended; its slot is free again.
    NodeSlotReleased { node: NodeId },
    /// The node's stream closed or its heartbeat timed out; its work moves at once.
    NodeLost { node: NodeId },
    /// A tenant was created or its contract changed (affects requests arriving from now on).
    TenantConfigured {
        tenant: TenantId,
        config: TenantConfig,
    },
    /// A client request was accepted by the gateway and asks for a place to run.
    RequestArrived {
        request: RequestId,
        tenant: TenantId,
        model: ModelId,
        prompt_tokens: u32,
        max_tokens: u32,
        /// If it has not started by then, reject it with `DeadlineExpired`.
        deadline: Option<Millis>,
        /// The hashes of its prompt's head blocks, for prefix affinity (empty: none).
        prompt_heads: PromptHeads,
        /// Tokens it already has from elsewhere, and the numerics they came from; None: a
        /// new generation.
        resumes: Option<Resume>,
    },
    /// The request has `committed_total` tokens committed in all (counting earlier attempts);
    /// the next attempt resumes from here. Accepted while it waits too (tokens that arrived
    /// after a `Stop`); the count never goes down.
    TokensCommitted {
        request: RequestId,
        committed_total: u32,
    },
    /// The generation completed normally.
    RequestFinished { request: RequestId },
    /// The client went away.
    RequestCancelled { request: RequestId },
    /// The node reported a retryable failure of this request.
    AttemptFailed { request: RequestId, node: NodeId },
    /// Time passed: deadlines, drains before departure, allowed hours, daily energy caps.
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Run `request` on `node`, continuing after `resume_from` committed tokens (0 for a fresh
    /// start). `resume_from` is the count the scheduler was last told; the coordinator holds the
    /// token log and must make the client's stream gapless and duplicate-free from it.
    Assign {
        request: RequestId,
        node: NodeId,
        resume_from: u32,
    },
    /// Stop running `request` on `node` (preempted, drained, or migrating). The coordinator keeps
    /// the committed tokens; the scheduler will issue a new `Assign` for it (maybe in the same
    /// batch of commands), or a `Reject` if it can never run again.
    Stop {
        request: RequestId,
        node: NodeId,
        reason: StopReason,
    },
    /// Cancel on node (client gone); nothing to resume.
    Cancel { request: RequestId, node: NodeId },
    /// Refuse or fail the request; the scheduler forgets it. `retry_after_ms` is set for the
    /// retryable reasons (see [`RejectReason::is_retryable`]).
    Reject {
        request: RequestId,
        reason: RejectReason,
        retry_after_ms: Option<u64>,
    },
}

/// Why a running generation is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// A higher class needed the slot.
    Preempted,
    /// The node is leaving service (departure window, owner limits such as hours, temperature,
    /// energy cap or excluded class) and this generation would not finish in time.
    Draining,
    /// The vehicle was unplugged (or its battery fell below the owner's threshold).
    Departed,
    /// The node's connection was lost.
    NodeLost,
    /// The generation made no progress within the node's stall bound (see `TrustConfig`).
    Stalled,
}

/// Why a request is refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// No known node has the model and accepts the tenant's class.
    NoEligibleNode,
    /// The class's admission queue is full.
    QueueFull,
    /// The tenant already has `max_concurrency` requests in flight.
    OverConcurrency,
    /// The tenant's tokens-per-minute quota is used up for this minute.
    OverTokensPerMinute,
    /// The request's deadline passed before it could start.
    DeadlineExpired,
    /// The tenant was never configured.
    UnknownTenant,
    /// The request failed on nodes `SchedulerConfig::attempts_max` times.
    AttemptsExhausted,
}

impl RejectReason {
    /// Whether the client may try again later (the reject then carries `retry_after_ms`).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            RejectReason::NoEligibleNode
                | RejectReason::QueueFull
                | RejectReason::OverConcurrency
                | RejectReason::OverTokensPerMinute
        )
    }
}
