//! The fleetgrid gateway: the OpenAI-compatible HTTP API, authentication,
//! validation, billing admission and settlement, idempotency, usage and
//! invoices, the owner API, the routing driver (`auto`, `cloud/...`) and the
//! shaping of every answer.
//!
//! The gateway runs no model and holds no vehicle. It hands generations to
//! a cell through `cell_api::Cell` and turns the cell's token and finish
//! events into answers and money. It never names the cell's internals; a
//! process that runs both (`coordinator::serve`) wires one to the other.

pub mod api;
pub mod billing;
pub mod billing_accounts;
pub mod billing_checks;
pub mod billing_clawbacks;
pub mod billing_finish;
pub mod billing_flags;
pub mod billing_holds;
pub mod billing_idempotency;
pub mod cloud;
pub mod http_serve;
pub mod limits;
pub mod metrics;
pub mod sampling;
pub mod tenant_requests;

// The store and the seam's types, under the names the gateway's code uses.
pub use ::store;
pub use cell_api::metering as billing_meter;
pub use cell_api::served;
pub use store::contracts as store_contracts;
pub use store::owners as store_owners;
pub use store::{owner_policy, secrets};

/// The wall clock and the seam's generation types, as the gateway names
/// them.
pub mod core {
    use std::time::SystemTime;

    pub use cell_api::{
        Admitted, CommittedToken, FinishReason, GenerationError, NewGeneration, Rejection,
        TenantRef, Update, Usage,
    };
    pub use domain::TimestampMs;

    /// The system's wall clock, for what the gateway records (creation
    /// times, ledger times, invoices).
    pub fn now_ms() -> TimestampMs {
        TimestampMs::from_system_time(SystemTime::now())
    }

    pub(crate) const ORDER: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;
}
