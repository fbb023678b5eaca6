//! What the scheduler remembers about each admitted request until it finishes, is cancelled or
//! is rejected.

use crate::types::{Millis, ModelId, NodeId, PromptHeads, TenantClass, TenantId};

/// Where an admitted request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Running on a node.
    Running { node: NodeId },
    /// Waiting for a slot. `parked` requests were stopped mid-generation (preempted, drained,
    /// node lost or failed) and wait at the front of their class; `seq` orders the wait.
    Waiting { parked: bool, seq: u64 },
}

/// An admitted request.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) tenant: TenantId,
    /// The tenant's class when the request arrived; a later contract change does not move it.
    pub(crate) class: TenantClass,
    pub(crate) model: ModelId,
    pub(crate) prompt_tokens: u32,
    pub(crate) max_tokens: u32,
    pub(crate) deadline: Option<Millis>,
    /// Tokens committed so far, over all attempts; the next attempt resumes from here.
    pub(crate) committed: u32,
    /// Failed attempts so far, bounded by `SchedulerConfig::attempts_max`.
    pub(crate) attempts_failed: u16,
    pub(crate) placement: Placement,
    /// When the current attempt started or last delivered tokens (stall detection).
    pub(crate) progress_at: Millis,
    /// Tokens the current attempt has delivered.
    pub(crate) attempt_tokens: u32,
    /// Its prompt's head hashes (prefix affinity).
    pub(crate) prompt_heads: PromptHeads,
}

impl Request {
    /// Tokens still to generate.
    pub(crate) fn remaining_tokens(&self) -> u32 {
        self.max_tokens.saturating_sub(self.committed)
    }

    /// The node it runs on, if running.
    pub(crate) fn node(&self) -> Option<NodeId> {
        match self.placement {
            Placement::Running { node } => Some(node),
            Placement::Waiting { .. } => None,
        }
    }
}
