//! The pure, synchronous core of the ledger: domain types, transfers, the
//! batch rules and the invariant check.
//!
//! **Architecture invariant:** nothing under `core` does I/O, reads a clock or
//! draws randomness; the SQL stores and the property tests drive the same code.

pub mod ids;
pub mod ledger;
pub mod transfer;
pub mod units;
pub mod verify;

#[cfg(test)]
mod tests;

pub use ids::{
    AccountId, GatewayId, IdError, Instrument, ModelId, NodeId, OwnerId, RequestId, Segment,
    TenantId, TransferId,
};
pub use ledger::{
    plan_batch, AccountState, BatchPlan, Ledger, LedgerError, Outcome, BATCH_TRANSFERS_MAX,
};
pub use transfer::{Transfer, TransferError, TransferKind, TransferSpec};
pub use units::{BasisPoints, DurationMs, MicroUsd, MicroWh, TimestampMs, TokenCount};
pub use verify::{verify_ledger, Problem, Verifier, VerifyReport};
