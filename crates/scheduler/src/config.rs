//! Every bound and margin of the scheduler, in one place.

use crate::trust::TrustConfig;
use crate::types::TenantClass;

/// Tunables. `Default` gives values fit for a production coordinator; every field is a bound or
/// a margin and says which.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Requests waiting for a slot, per class (`TenantClass::index` order), at most. A request
    /// that would exceed it is rejected with `QueueFull`. Parked requests (preempted or drained
    /// mid-generation) do not count: they are never dropped, and there are never more of them
    /// than the fleet has slots.
    pub queue_max_per_class: [u32; 3],
    /// `retry_after_ms` sent with `QueueFull`.
    pub queue_full_retry_after_ms: u64,
    /// `retry_after_ms` sent with `NoEligibleNode`.
    pub no_eligible_node_retry_after_ms: u64,
    /// `retry_after_ms` sent with `OverConcurrency`.
    pub over_concurrency_retry_after_ms: u64,
    /// Expected generation time is multiplied by this (permille) before it is compared with a
    /// node's remaining availability, to allow for slow tokens and load delays.
    pub generation_time_margin_permille: u32,
    /// Everything still running on a node is stopped this long before its scheduled departure,
    /// whatever the estimate said, so the hand-over is done before the car leaves.
    pub departure_hard_stop_ms: u64,
    /// Requests waiting for a model that no known node can serve any more (the last such node
    /// was lost) are rejected with `NoEligibleNode` after this long; nodes often reconnect.
    pub no_node_grace_ms: u64,
    /// Failed attempts (`AttemptFailed`) of one request before it is rejected with
    /// `AttemptsExhausted`; bounds the retry loop.
    pub attempts_max: u16,
    /// Tenants the scheduler keeps, at most; further `TenantConfigured` events for new tenants
    /// are ignored (bounds the fair-share scan).
    pub tenants_max: u32,
    /// Nodes the scheduler keeps, at most; the node table is indexed by `NodeId`, so a
    /// registration with an id at or above this is ignored.
    pub nodes_max: u32,
    /// How far nodes' claims are believed: slots capped by completed work, stalled generations
    /// moved (see `trust`). `None` believes every node, as the simulator's honest fleet is.
    pub trust: Option<TrustConfig>,
    /// Prefer, among the free nodes placement accepts, the one holding the longest head of the
    /// request's prompt (see `heads`); off, the scheduler does not track heads at all.
    pub prefix_affinity: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            queue_max_per_class: [10_000, 10_000, 10_000],
            queue_full_retry_after_ms: 1_000,
            no_eligible_node_retry_after_ms: 30_000,
            over_concurrency_retry_after_ms: 1_000,
            generation_time_margin_permille: 1_500,
            departure_hard_stop_ms: 60_000,
            no_node_grace_ms: 60_000,
            attempts_max: 5,
            tenants_max: 100_000,
            nodes_max: 4_000_000,
            trust: None,
            prefix_affinity: true,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The margin would make estimates shorter than the work.
    #[error("generation time margin must be at least 1000 permille, got {0}")]
    MarginBelowOne(u32),
    /// A request could never be retried.
    #[error("attempts_max must be at least 1")]
    NoAttempts,
}

impl SchedulerConfig {
    /// Check the values that would make the scheduler misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.generation_time_margin_permille < 1000 {
            return Err(ConfigError::MarginBelowOne(
                self.generation_time_margin_permille,
            ));
        }
        if self.attempts_max == 0 {
            return Err(ConfigError::NoAttempts);
        }
        Ok(())
    }

    /// The queue bound of `class`.
    pub fn queue_max(&self, class: TenantClass) -> u32 {
        self.queue_max_per_class[class.index()]
    }
}
