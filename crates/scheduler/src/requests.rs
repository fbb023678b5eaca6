//! What the scheduler remembers about each admitted request until it finishes, is cancelled or
//! is rejected.

use crate::types::{Millis, ModelId, NodeId, PromptHeads, TenantClass, TenantId, NUMERICS_UNKNOWN};

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
    /// When it must have started by; `None` once it has (or if it never had one).
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
    pub(crate) prompt_heads: Heads,
    /// The numerics (`NodeCapacity::numerics`) of the node it was last assigned to: its
    /// committed tokens continue bit for bit only on a node of the same.
    pub(crate) numerics: u32,
}

impl Request {
    /// Tokens still to generate.
    pub(crate) fn remaining_tokens(&self) -> u32 {
        self.max_tokens.saturating_sub(self.committed)
    }

    /// The numerics a node must have for its generation to continue bit for bit: those it last
    /// ran on, once it has committed tokens (a request is assigned before it commits any).
    /// None for a generation last run on a node of unknown numerics: no node is known to be
    /// alike.
    pub(crate) fn continues_on(&self) -> Option<u32> {
        (self.committed > 0 && self.numerics != NUMERICS_UNKNOWN).then_some(self.numerics)
    }

    /// The node it runs on, if running.
    pub(crate) fn node(&self) -> Option<NodeId> {
        match self.placement {
            Placement::Running { node } => Some(node),
            Placement::Waiting { .. } => None,
        }
    }
}

/// A request's prompt heads, boxed where it has any: they are most of a request's size, and the
/// scheduler moves its requests in and out of its table on every arrival and end.
#[derive(Debug, Clone, Default)]
pub(crate) struct Heads(Option<Box<PromptHeads>>);

impl Heads {
    pub(crate) fn new(heads: PromptHeads) -> Heads {
        Heads((!heads.is_empty()).then(|| Box::new(heads)))
    }

    pub(crate) fn get(&self) -> Option<&PromptHeads> {
        self.0.as_deref()
    }

    /// `PromptHeads::hashes`; none without heads.
    pub(crate) fn hashes(&self) -> &[u64] {
        self.get().map_or(&[], PromptHeads::hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_boxed_only_where_a_prompt_has_some_and_keep_every_hash() {
        let short = PromptHeads::of(&[7; 63]);
        assert!(Heads::new(short).get().is_none());
        assert!(Heads::new(short).hashes().is_empty());

        let long = PromptHeads::of(&(0..200).collect::<Vec<i32>>());
        let kept = Heads::new(long);
        assert_eq!(kept.get(), Some(&long));
        assert_eq!(kept.hashes(), long.hashes());
        assert_eq!(kept.hashes().len(), 3);
    }
}
