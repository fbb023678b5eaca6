//! The prompt heads each node holds, as the scheduler models them, for prefix affinity.
//!
//! What the engine really keeps: one KV sequence per parallel slot. A finished sequence keeps the
//! cells of the prompt it prefilled; a new prompt goes to the free sequence holding the longest
//! equal head, the lowest sequence among equals (an empty one when nothing is shared), and
//! overwrites what that sequence held. A prompt resumed from a checkpoint keeps nothing for
//! reuse. So a node holds at most one prompt per sequence, and only a *free* sequence's head is
//! reusable.
//!
//! The scheduler sees every assignment and every end of one, so it replays that rule here
//! instead of asking nodes what they hold: no protocol change, and nothing a node says steers
//! placement. It is a model, not a mirror: blocks of `PROMPT_HEAD_BLOCK_TOKENS` stand for
//! tokens, an end the node sees before the scheduler can make the two pick different
//! sequences, and a node that restarts its engine without reconnecting empties its sequences
//! unseen. A wrong guess costs a prefill, never a wrong answer (the engine compares tokens).
//!
//! Bounds: per node, `HELD_SEQUENCES_PER_NODE_MAX` sequences of at most `PROMPT_HEADS_MAX`
//! hashes; a node that never ran a prompt of a whole block costs nothing here. The holders
//! index keeps per (model, head) at most `HOLDERS_PER_HEAD_MAX` nodes, the latest; a holder
//! pushed out is not found by affinity, and one placement looks at no more than
//! `search::AFFINITY_PROBES_MAX` holders however large the fleet is.

use domain::PromptHeads;

use crate::fxhash::FxHashMap;
use crate::types::{ModelId, NodeId, RequestId};

/// Sequences modelled per node, at most (a node declaring more slots is modelled with this
/// many; its further sequences hold nothing the scheduler knows of).
pub(crate) const HELD_SEQUENCES_PER_NODE_MAX: usize = 16;

/// Nodes the holders index keeps per (model, head hash), the latest.
pub(crate) const HOLDERS_PER_HEAD_MAX: usize = 32;

/// One of a node's KV sequences.
#[derive(Debug, Clone)]
struct Sequence {
    /// The chained hashes of the prompt its cells hold (see `domain::PromptHeads`).
    hashes: Box<[u64]>,
    model: ModelId,
    /// The generation using it now; only a free sequence's head is reused.
    occupant: Option<RequestId>,
}

/// Every node's modelled sequences and, per head, the nodes holding it.
#[derive(Debug, Default)]
pub(crate) struct HeldHeads {
    nodes: FxHashMap<NodeId, Vec<Sequence>>,
    holders: FxHashMap<(ModelId, u64), Vec<NodeId>>,
}

impl HeldHeads {
    /// `request` (of `model`, with prompt `heads`, or none if it resumes from a checkpoint) starts
    /// on `node`, which runs `sequences` generations at once: it takes the sequence the engine
    /// would give it.
    pub(crate) fn started(
        &mut self,
        node: NodeId,
        sequences: u16,
        request: RequestId,
        model: ModelId,
        heads: &[u64],
    ) {
        if heads.is_empty() && !self.nodes.contains_key(&node) {
            return;
        }
        let sequences = usize::from(sequences).min(HELD_SEQUENCES_PER_NODE_MAX);
        let held = self.nodes.entry(node).or_default();
        let shared = |sequence: &Sequence| {
            if sequence.model != model {
                return 0;
            }
            let common = sequence.hashes.iter().zip(heads);
            common.take_while(|(a, b)| a == b).count()
        };
        // The engine's choice: the longest shared head among free sequences, the lowest index on
        // a tie; a sequence never used yet shares nothing and sits after those used.
        let mut best: Option<(usize, usize)> = None;
        for (index, sequence) in held.iter().enumerate() {
            if sequence.occupant.is_some() {
                continue;
            }
            let levels = shared(sequence);
            if best.is_none_or(|(_, most)| levels > most) {
                best = Some((index, levels));
            }
        }
        let unused = (held.len() < sequences).then_some(held.len());
        let index = match (best, unused) {
            (Some((index, 0)), Some(unused)) => index.min(unused),
            (Some((index, _)), _) => index,
            (None, Some(unused)) => unused,
            (None, None) => return,
        };
        let new = Sequence {
            hashes: heads.into(),
            model,
            occupant: Some(request),
        };
        if index == held.len() {
            held.push(new);
        } else {
            let old = std::mem::replace(&mut held[index], new);
            unindex(&mut self.holders, node, &old, held);
        }
        for hash in heads {
            let holders = self.holders.entry((model, *hash)).or_default();
            if holders.contains(&node) {
                continue;
            }
            if holders.len() >= HOLDERS_PER_HEAD_MAX {
                holders.remove(0);
            }
            holders.push(node);
        }
    }

    /// `request` no longer runs on `node`: its sequence is free, its head kept.
    pub(crate) fn left(&mut self, node: NodeId, request: RequestId) {
        if let Some(held) = self.nodes.get_mut(&node) {
            for sequence in held.iter_mut() {
                if sequence.occupant == Some(request) {
                    sequence.occupant = None;
                }
            }
        }
    }

    /// `node` disconnected or registered anew: its sequences are empty.
    pub(crate) fn forget(&mut self, node: NodeId) {
        let Some(held) = self.nodes.remove(&node) else {
            return;
        };
        for sequence in &held {
            unindex(&mut self.holders, node, sequence, &[]);
        }
    }

    /// Nodes holding the head `hash` of `model` (not all of them: see the module's bounds).
    pub(crate) fn holders(&self, model: ModelId, hash: u64) -> &[NodeId] {
        self.holders
            .get(&(model, hash))
            .map_or(&[][..], Vec::as_slice)
    }

    /// The most blocks of `heads` a free sequence of `node` holds.
    pub(crate) fn free_levels(&self, node: NodeId, model: ModelId, heads: &PromptHeads) -> usize {
        let Some(held) = self.nodes.get(&node) else {
            return 0;
        };
        held.iter()
            .filter(|sequence| sequence.occupant.is_none() && sequence.model == model)
            .map(|sequence| {
                let common = sequence.hashes.iter().zip(heads.hashes());
                common.take_while(|(a, b)| a == b).count()
            })
            .max()
            .unwrap_or(0)
    }

    /// Estimated bytes held (for the memory estimate).
    pub(crate) fn memory_estimate_bytes(&self) -> u64 {
        use std::mem::size_of;
        let per_map_entry = 2 * size_of::<u64>();
        let mut bytes = 0u64;
        for held in self.nodes.values() {
            bytes += (per_map_entry + held.capacity() * size_of::<Sequence>()) as u64;
            bytes += held
                .iter()
                .map(|sequence| (sequence.hashes.len() * size_of::<u64>()) as u64)
                .sum::<u64>();
        }
        for holders in self.holders.values() {
            bytes += (per_map_entry + size_of::<Vec<NodeId>>()) as u64;
            bytes += (holders.capacity() * size_of::<NodeId>()) as u64;
        }
        bytes
    }
}

/// Take `node` out of the holders of `old`'s hashes that no sequence in `remaining` holds.
fn unindex(
    holders_of: &mut FxHashMap<(ModelId, u64), Vec<NodeId>>,
    node: NodeId,
    old: &Sequence,
    remaining: &[Sequence],
) {
    for hash in old.hashes.iter() {
        let still = remaining
            .iter()
            .any(|other| other.model == old.model && other.hashes.contains(hash));
        if still {
            continue;
        }
        let key = (old.model, *hash);
        if let Some(holders) = holders_of.get_mut(&key) {
            holders.retain(|holder| *holder != node);
            if holders.is_empty() {
                holders_of.remove(&key);
            }
        }
    }
}
