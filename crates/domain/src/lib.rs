//! The quantities every part of fleetgrid speaks of, defined once: money in
//! micro-dollars, the tenant's priority class, ids, points in time and the
//! hashes of a prompt's head.
//!
//! The ledger, the router, the scheduler and the coordinator all use these
//! types; none of them keeps a copy or a converter. Every conversion between
//! representations is a checked method here, never an `as` cast that could
//! wrap.
//!
//! **Architecture invariant:** this crate does no I/O and reads no clock.

mod ids;
mod money;
mod prompt_heads;
mod tenant_class;
mod time;

pub use ids::{NodeId, RequestId, TenantId};
pub use money::MicroUsd;
pub use prompt_heads::{PromptHeads, PROMPT_HEADS_MAX, PROMPT_HEAD_BLOCK_TOKENS};
pub use tenant_class::{TenantClass, UnknownTenantClass};
pub use time::{ceil_ms, TimestampMs};
