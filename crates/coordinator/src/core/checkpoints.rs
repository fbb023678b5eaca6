//! KV checkpoints of in-flight generations: the prompt's KV cache as the node
//! that prefilled it reported it, kept so that a handover loads it on the
//! next node instead of prefilling the prompt again.
//!
//! A checkpoint is asked for when a long prompt is first assigned
//! (`Assign.report_checkpoint`), arrives in pieces (`KvCheckpoint`), and is
//! sent with every later assignment of the same generation that has at
//! least one committed token (the engine needs a token to feed after it).
//! It is dropped when its generation ends.
//!
//! Bounded: the bytes kept plus those being received never exceed the
//! budget; a checkpoint that would is refused at its first piece and the
//! generation is handed over by re-prefilling, as without checkpoints.
//!
//! Trust: a checkpoint comes from a node, and nodes are untrusted. It can do
//! no more harm than that node's tokens already could: it only shapes the
//! tokens of the same generation, it must cover exactly that generation's
//! prompt, the engine loading it checks its format and positions and
//! prefills instead when they are wrong, and it never leaves the model it was
//! made with (assignments are per model).

use std::collections::HashMap;

use bytes::Bytes;
use scheduler::RequestId;

use super::{Core, CoreState, ORDER};
use crate::limits;
use crate::nodes::NodeSession;

/// A complete checkpoint, covering the prompt of its generation.
struct Kept {
    tokens: u32,
    data: Bytes,
}

/// A checkpoint still arriving from the attempt that prefilled the prompt.
struct Arriving {
    attempt: u32,
    tokens: u32,
    total: usize,
    data: Vec<u8>,
}

pub(super) struct Checkpoints {
    kept: HashMap<RequestId, Kept>,
    arriving: HashMap<RequestId, Arriving>,
    /// Bytes kept plus the full size of those arriving.
    bytes: usize,
    budget: usize,
    prompt_tokens_min: usize,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints::new(
            limits::KV_CHECKPOINT_BYTES_BUDGET,
            limits::KV_CHECKPOINT_PROMPT_TOKENS_MIN,
        )
    }
}

/// Why a piece of a checkpoint was refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// It does not cover exactly the prompt, or its pieces do not add up.
    Malformed,
    /// Keeping it would exceed the budget.
    OverBudget,
}

impl Checkpoints {
    pub(super) fn new(budget: usize, prompt_tokens_min: usize) -> Checkpoints {
        Checkpoints {
            kept: HashMap::new(),
            arriving: HashMap::new(),
            bytes: 0,
            budget,
            prompt_tokens_min,
        }
    }

    /// Whether the first assignment of a prompt this long should report its
    /// KV cache.
    pub(super) fn wanted(&self, request: RequestId, prompt_tokens: usize) -> bool {
        self.budget > 0
            && prompt_tokens >= self.prompt_tokens_min
            && !self.kept.contains_key(&request)
            && !self.arriving.contains_key(&request)
            && self.bytes < self.budget
    }

    /// The checkpoint to send with an assignment resuming after `committed`
    /// tokens, if one is kept and usable.
    pub(super) fn for_resume(&self, request: RequestId, committed: usize) -> Option<(u32, Bytes)> {
        if committed == 0 {
            return None;
        }
        let kept = self.kept.get(&request)?;
        Some((kept.tokens, kept.data.clone()))
    }

    /// Takes one piece from attempt `attempt` of a generation whose prompt
    /// has `prompt_tokens` tokens. Returns true when it completed the
    /// checkpoint.
    pub(super) fn receive(
        &mut self,
        request: RequestId,
        attempt: u32,
        prompt_tokens: usize,
        piece: proto::KvCheckpoint,
    ) -> Result<bool, Refused> {
        let total = usize::try_from(piece.total_bytes).unwrap_or(usize::MAX);
        let well_formed = piece.tokens as usize == prompt_tokens
            && !piece.data.is_empty()
            && piece.data.len() <= proto::KV_CHECKPOINT_CHUNK_BYTES_MAX
            && total <= engine::CHECKPOINT_BYTES_MAX;
        if !well_formed {
            self.abandon(request);
            return Err(Refused::Malformed);
        }
        if piece.offset == 0 {
            // A first piece: a new checkpoint replaces any earlier one.
            self.abandon(request);
            self.forget(request);
            if self.bytes.saturating_add(total) > self.budget {
                return Err(Refused::OverBudget);
            }
            self.bytes += total;
            self.arriving.insert(
                request,
                Arriving {
                    attempt,
                    tokens: piece.tokens,
                    total,
                    data: Vec::with_capacity(total),
                },
            );
        }
        let Some(arriving) = self.arriving.get_mut(&request) else {
            return Err(Refused::Malformed);
        };
        let fits = arriving.attempt == attempt
            && arriving.tokens == piece.tokens
            && arriving.total == total
            && piece.offset == arriving.data.len() as u64
            && arriving.data.len() + piece.data.len() <= total;
        if !fits {
            self.abandon(request);
            return Err(Refused::Malformed);
        }
        arriving.data.extend_from_slice(&piece.data);
        if arriving.data.len() < total {
            return Ok(false);
        }
        let Some(done) = self.arriving.remove(&request) else {
            return Ok(false);
        };
        self.kept.insert(
            request,
            Kept {
                tokens: done.tokens,
                data: Bytes::from(done.data),
            },
        );
        Ok(true)
    }

    /// Drops everything kept for generations that are no longer in flight.
    pub(super) fn retain(&mut self, in_flight: impl Fn(RequestId) -> bool) {
        let gone: Vec<RequestId> = self
            .kept
            .keys()
            .chain(self.arriving.keys())
            .copied()
            .filter(|request| !in_flight(*request))
            .collect();
        for request in gone {
            self.abandon(request);
            self.forget(request);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops a checkpoint still arriving (its attempt is being replaced).
    pub(super) fn abandon(&mut self, request: RequestId) {
        if let Some(arriving) = self.arriving.remove(&request) {
            self.bytes -= arriving.total;
        }
    }

    /// Drops a kept checkpoint.
    fn forget(&mut self, request: RequestId) {
        if let Some(kept) = self.kept.remove(&request) {
            self.bytes -= kept.data.len();
        }
    }
}

impl Core {
    /// Bytes of prompt KV caches kept at once; 0 turns checkpoints off.
    pub fn set_kv_checkpoint_budget(&self, bytes: usize) {
        let mut state = self.lock();
        state.checkpoints.budget = bytes;
        // What is kept beyond a lowered budget goes as its generations end.
        state.drop_finished_checkpoints();
    }

    /// A piece of the prompt's KV cache from the node running a generation.
    pub fn node_checkpoint(&self, session: NodeSession, piece: proto::KvCheckpoint) {
        let mut state = self.lock();
        let Some(request) = self.current_attempt(&state, session, &piece.generation_id) else {
            // A stale attempt's checkpoint is as good in principle, but its
            // node is being replaced; not worth the memory.
            return;
        };
        let CoreState {
            requests,
            checkpoints,
            ..
        } = &mut *state;
        let Some(inflight) = requests.get(&request) else {
            return;
        };
        let offset = piece.offset;
        match checkpoints.receive(request, inflight.attempt, inflight.prompt.len(), piece) {
            Ok(true) => {
                self.metrics.kv_checkpoints_kept.fetch_add(1, ORDER);
                tracing::info!(
                    request_id = request.0,
                    kept_bytes = checkpoints.bytes(),
                    "kept the prompt's kv checkpoint"
                );
            }
            Ok(false) => {}
            Err(refused) => {
                self.metrics.kv_checkpoints_refused.fetch_add(1, ORDER);
                tracing::warn!(
                    request_id = request.0,
                    offset,
                    ?refused,
                    "kv checkpoint refused"
                );
            }
        }
        // Also the moment to let go of checkpoints of finished generations.
        state.drop_finished_checkpoints();
    }
}

impl CoreState {
    /// Lets go of the checkpoints of generations no longer in flight.
    pub(super) fn drop_finished_checkpoints(&mut self) {
        let requests = &self.requests;
        self.checkpoints
            .retain(|request| requests.contains_key(&request));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(tokens: u32, total: usize, offset: usize, len: usize) -> proto::KvCheckpoint {
        proto::KvCheckpoint {
            generation_id: String::new(),
            tokens,
            total_bytes: total as u64,
            offset: offset as u64,
            data: vec![7; len],
        }
    }

    #[test]
    fn pieces_in_order_make_a_checkpoint_used_only_after_a_committed_token() {
        let mut checkpoints = Checkpoints::new(1_000, 4);
        let request = RequestId(1);
        assert!(checkpoints.wanted(request, 4));
        assert!(!checkpoints.wanted(request, 3), "short prompts re-prefill");
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert!(!checkpoints.wanted(request, 4), "one is arriving");
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 6, 4)),
            Ok(true)
        );
        assert_eq!(checkpoints.bytes(), 10);
        assert!(checkpoints.for_resume(request, 0).is_none());
        let (tokens, data) = checkpoints.for_resume(request, 3).unwrap();
        assert_eq!((tokens, data.len()), (4, 10));
        checkpoints.retain(|_| false);
        assert_eq!(checkpoints.bytes(), 0);
        assert!(checkpoints.for_resume(request, 3).is_none());
    }

    #[test]
    fn malformed_pieces_are_refused_and_free_their_room() {
        let mut checkpoints = Checkpoints::new(1_000, 4);
        let request = RequestId(1);
        // Not the prompt's length.
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(5, 10, 0, 6)),
            Err(Refused::Malformed)
        );
        // A gap between pieces.
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 7, 3)),
            Err(Refused::Malformed)
        );
        assert_eq!(checkpoints.bytes(), 0);
        // More than announced.
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 6, 5)),
            Err(Refused::Malformed)
        );
        // From another attempt.
        assert_eq!(
            checkpoints.receive(request, 1, 4, piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert_eq!(
            checkpoints.receive(request, 2, 4, piece(4, 10, 6, 4)),
            Err(Refused::Malformed)
        );
        assert_eq!(checkpoints.bytes(), 0);
        assert!(checkpoints.for_resume(request, 1).is_none());
    }

    #[test]
    fn the_budget_bounds_what_is_kept_and_arriving() {
        let mut checkpoints = Checkpoints::new(25, 1);
        assert_eq!(
            checkpoints.receive(RequestId(1), 1, 1, piece(1, 10, 0, 10)),
            Ok(true)
        );
        assert_eq!(
            checkpoints.receive(RequestId(2), 1, 1, piece(1, 10, 0, 5)),
            Ok(false)
        );
        assert_eq!(
            checkpoints.receive(RequestId(3), 1, 1, piece(1, 10, 0, 5)),
            Err(Refused::OverBudget)
        );
        assert!(checkpoints.bytes() <= 25);
        // A generation that ends frees its room.
        checkpoints.retain(|request| request != RequestId(1));
        assert_eq!(
            checkpoints.receive(RequestId(3), 1, 1, piece(1, 10, 0, 10)),
            Ok(true)
        );
        assert_eq!(checkpoints.bytes(), 20);
        // A zero budget keeps nothing and asks for nothing.
        let none = Checkpoints::new(0, 1);
        assert!(!none.wanted(RequestId(1), 100));
    }
}
