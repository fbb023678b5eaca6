//! What billing says when it cannot open, refuses a request or fails one,
//! in its own words and with the figures a client needs. Billing knows no
//! HTTP: the gateway turns each case into its answer in one place
//! (`api::error`), so every call site keeps using `?`.

use std::path::PathBuf;

use ledger::admission::PaymentRequired;
use ledger::pricing::TenantClass;
use ledger::store::StoreError as LedgerStoreError;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The ledger cannot be opened (start-up).
    #[error("open the ledger at {place}: {source}")]
    Open {
        place: String,
        source: LedgerStoreError,
    },
    /// The SQLite ledger's directory cannot be created (start-up).
    #[error("create the ledger's directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A served model the price sheet does not price (start-up).
    #[error("served model {model} has no price for class {class} in the price sheet")]
    Unpriced { model: String, class: TenantClass },
    /// A configuration the ledger refuses (start-up).
    #[error("{0}")]
    Invalid(String),
    /// The tenant cannot pay for the request's worst case: its balance (a
    /// credit limit included) or what is left of its daily cap is too small.
    /// The ledger's refusal carries the amounts; its message is the client's.
    #[error(transparent)]
    Refused(#[from] PaymentRequired),
    /// Settlements kept changing the tenant's balance while the request was
    /// being admitted; a retry after `retry_after_seconds` will do.
    #[error("this tenant's balance is changing too fast to admit the request; retry")]
    Contended { retry_after_seconds: u64 },
    /// The ledger cannot be reached to admit a request (a shared ledger that
    /// does not answer): nothing was started or charged; a retry after
    /// `retry_after_seconds` may find it back.
    #[error("billing is unavailable, so the request was not started; retry")]
    Unavailable { retry_after_seconds: u64 },
    /// The ledger did not take a finished request's settlement: the result
    /// is withheld and nothing was charged; a retry after
    /// `retry_after_seconds` may find it back.
    #[error(
        "the usage of this request could not be recorded, so its result is withheld and it was \
         not charged; retry"
    )]
    LedgerUnavailable { retry_after_seconds: u64 },
    /// The ledger could not be reached to settle a finished request: the
    /// result is withheld, and the settlement is kept and retried until the
    /// ledger takes it, so the work done is charged once. A retry with the
    /// same Idempotency-Key after `retry_after_seconds` replays the result
    /// without a second charge.
    #[error(
        "the usage of this request could not be recorded yet, so its result is withheld; it will \
         be charged once the ledger records it; retry with the same Idempotency-Key to get the \
         result without a second charge"
    )]
    SettlementPending { retry_after_seconds: u64 },
    /// The price sheet in force has no price for a model a request used.
    #[error("the price sheet has no price for model {model}")]
    UnknownPrice { model: String },
    /// Anything else; the cause was logged where it happened. Names what
    /// failed, for the log only.
    #[error("billing failed to {0}")]
    Internal(&'static str),
}

impl BillingError {
    /// An internal failure, logged here with its cause: the client is told
    /// only that the server failed.
    pub(crate) fn internal(what: &'static str, cause: &dyn std::fmt::Display) -> BillingError {
        tracing::error!(error = %cause, "billing: {what}");
        BillingError::Internal(what)
    }
}
