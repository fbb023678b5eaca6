//! The fleet scheduler: decides which vehicle runs which generation.
//!
//! It is a pure, synchronous state machine. The driver (the coordinator server, or the fleet
//! simulator) feeds it [`Event`]s with the current time through [`Scheduler::handle`] and carries
//! out the [`Command`]s it returns.
//!
//! **Architecture invariant:** the scheduler does no I/O, reads no clock, spawns nothing and
//! owns no random number generator. Time arrives with each event; the same events at the same
//! times give the same commands, byte for byte. (The [`bench`] module is the one place that reads
//! a clock, to time the scheduler from outside.)
//!
//! # The contract
//!
//! * **Eligibility.** A node starts a new generation only while it is connected, plugged in
//!   (or the owner allows unplugged work and the battery is above the owner's thresholds, with a
//!   stop/resume hysteresis), inside the owner's allowed hours, under the daily energy cap and
//!   the chip temperature limit, outside `stop_before_departure_ms` of its scheduled departure,
//!   accepts the tenant's class, has the model on disk, and has a free slot.
//! * **Placement.** Among eligible nodes, prefer one whose expected generation time (prefill +
//!   decode at the node's speeds, times `generation_time_margin_permille`) ends before the node
//!   must stop (`departure - departure_hard_stop_ms`), then one with the model loaded, then the
//!   less loaded, then cheaper electricity; ties go to the lower `NodeId`.
//! * **Prefix affinity.** Among the free nodes placement would accept (eligible, and covering
//!   the expected generation time if any node does), a node whose free KV sequence holds the
//!   longest head of the request's prompt (`PromptHeads`, whole blocks) goes first, ahead of the
//!   load and price preferences; see `heads` for how the scheduler knows what nodes hold.
//!   Affinity never preempts, never makes a node eligible and never reorders waiting work.
//! * **Priority.** `Fleet > Reserved > Spot`. A reserved tenant below its guaranteed share
//!   (`reserved_min_share_permille` of the slots on nodes taking work now) ranks above fleet
//!   work, and its running work is not preempted. A request that finds no free slot takes one
//!   from the lowest-ranked running work on a node that could run it: that work is stopped
//!   (`Stop { reason: Preempted }`) and placed elsewhere or parked; it is never dropped.
//! * **Waiting.** Requests that cannot start wait in a queue per class and model, bounded per
//!   class (`QueueFull` beyond it). Parked requests (stopped mid-generation) resume first; then
//!   tenants of a class take turns by running work per weight.
//! * **Quotas.** Per tenant: `max_concurrency` requests in flight (`OverConcurrency`), and
//!   `tokens_per_minute` of prompt plus `max_tokens` per calendar minute (`OverTokensPerMinute`,
//!   retry after the minute ends).
//! * **Leaving nodes.** Inside the departure window a node takes no new work, and running work
//!   that would not finish before the hard stop moves (`Draining`); at the hard stop everything
//!   moves. Unplugging (`Departed`), other owner limits (`Draining`) and `NodeLost` move all of
//!   a node's work at once. Moved work resumes from its committed token count.
//! * **No duplication.** A request runs on at most one node: every `Assign` of a request that
//!   was running is preceded, in the same or an earlier batch, by its `Stop`.
//! * **Every request ends.** Each admitted request ends with the driver's `RequestFinished` or
//!   `RequestCancelled`, or with the scheduler's `Reject`; nothing is silently dropped.
//!
//! Events that name unknown nodes or requests, or stale placements, are ignored and counted in
//! [`Scheduler::stale_events`].

pub mod bench;
mod config;
mod event;
mod fxhash;
mod heads;
mod index;
mod node_events;
mod nodes;
mod placement;
mod policy;
mod queues;
mod request_events;
mod requests;
mod scheduler;
mod search;
pub mod sim;
mod tenants;
mod trust;
mod types;

pub use config::{ConfigError, SchedulerConfig};
pub use event::{Command, Event, RejectReason, StopReason};
pub use scheduler::Scheduler;
pub use trust::TrustConfig;
pub use types::{
    ClassSet, Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, PromptHeads, RequestId, Resume,
    TenantClass, TenantConfig, TenantId, VehicleState, ALL_HOURS, NUMERICS_UNKNOWN,
};
