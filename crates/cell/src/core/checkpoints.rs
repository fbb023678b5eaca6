//! KV checkpoints of in-flight generations: the prompt's KV cache as the node
//! that prefilled it reported it, kept so that a handover loads it on the
//! next node instead of prefilling the prompt again.
//!
//! A checkpoint is asked for when a long prompt is first assigned
//! (`Assign.report_checkpoint`), arrives in pieces (`KvCheckpoint`), and is
//! sent with every later assignment of the same generation, and of no other.
//! It is dropped when its generation ends, or when a node it was sent to
//! reports it refused it (`GenerationDone.checkpoint_rejected`).
//!
//! Bounded: the bytes kept plus those being received never exceed the
//! budget; a checkpoint that would is refused at its first piece and the
//! generation is handed over by re-prefilling, as without checkpoints.
//!
//! Trust: a checkpoint comes from a node, and nodes are untrusted. Pieces are
//! taken only from the current attempt of a generation whose assignment asked
//! for one, once, in order, covering exactly the prompt, and within
//! `limits::kv_checkpoint_bytes_max` of the prompt's length; anything else is
//! a protocol violation ([`Core::checkpoint_violation`]) and the checkpoint is
//! dropped. The engine loading it checks its format and positions before
//! llama.cpp sees it, prefills the prompt's last tokens itself and compares
//! them with the checkpoint's, never lets another generation reuse its cells,
//! and prefills instead when anything is wrong. It never leaves the model it
//! was made with (assignments are per model).

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
    /// Bytes received so far.
    received: usize,
    /// The bytes, or `None` when the budget had no room: the pieces are
    /// still checked, and dropped.
    data: Option<Vec<u8>>,
}

pub(super) struct Checkpoints {
    kept: HashMap<RequestId, Kept>,
    arriving: HashMap<RequestId, Arriving>,
    /// The attempt whose assignment asked for a checkpoint, until its first
    /// piece arrives.
    asked: HashMap<RequestId, u32>,
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
    /// The node broke the protocol; the generation's checkpoint is dropped.
    Violation(Violation),
    /// Keeping it would exceed the budget; its pieces are still checked.
    OverBudget,
}

/// How a piece broke the checkpoint protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Violation {
    /// No checkpoint was asked of this attempt, or it was sent already.
    NotAsked,
    /// Its `tokens` is not the prompt's length.
    Tokens,
    /// Its `total_bytes` is beyond the bound for the prompt's length.
    TooLarge,
    /// An empty piece, or one larger than `KV_CHECKPOINT_CHUNK_BYTES_MAX`.
    PieceSize,
    /// Not the next piece: its offset, tokens or total disagree with the
    /// pieces before it, or it runs past the total.
    OutOfOrder,
}

impl Checkpoints {
    pub(super) fn new(budget: usize, prompt_tokens_min: usize) -> Checkpoints {
        Checkpoints {
            kept: HashMap::new(),
            arriving: HashMap::new(),
            asked: HashMap::new(),
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

    /// Attempt `attempt` was asked to report its prompt's KV cache: the only
    /// source a checkpoint for `request` is taken from.
    pub(super) fn ask(&mut self, request: RequestId, attempt: u32) {
        self.asked.insert(request, attempt);
    }

    /// The checkpoint to send with an assignment resuming the generation, if
    /// one is kept. The engine prefills the prompt's last tokens itself, so
    /// no committed token needs to follow it.
    pub(super) fn for_resume(&self, request: RequestId) -> Option<(u32, Bytes)> {
        let kept = self.kept.get(&request)?;
        Some((kept.tokens, kept.data.clone()))
    }

    /// Takes one piece from attempt `attempt` of a generation whose prompt
    /// has `prompt_tokens` tokens. Returns true when it completed the
    /// checkpoint. A violation drops everything of `request`'s checkpoint.
    pub(super) fn receive(
        &mut self,
        request: RequestId,
        attempt: u32,
        prompt_tokens: usize,
        piece: &proto::KvCheckpoint,
    ) -> Result<bool, Refused> {
        let checked = self.check(request, attempt, prompt_tokens, piece);
        if let Err(Refused::Violation(_)) = checked {
            self.drop_all(request);
        }
        checked
    }

    fn check(
        &mut self,
        request: RequestId,
        attempt: u32,
        prompt_tokens: usize,
        piece: &proto::KvCheckpoint,
    ) -> Result<bool, Refused> {
        let violation = |why| Err(Refused::Violation(why));
        let total = usize::try_from(piece.total_bytes).unwrap_or(usize::MAX);
        if piece.tokens as usize != prompt_tokens {
            return violation(Violation::Tokens);
        }
        if total > limits::kv_checkpoint_bytes_max(prompt_tokens) {
            return violation(Violation::TooLarge);
        }
        if piece.data.is_empty() || piece.data.len() > proto::KV_CHECKPOINT_CHUNK_BYTES_MAX {
            return violation(Violation::PieceSize);
        }
        let first = self.asked.get(&request) == Some(&attempt);
        if first {
            if piece.offset != 0 {
                return violation(Violation::OutOfOrder);
            }
            self.asked.remove(&request);
            let room = self.bytes.saturating_add(total) <= self.budget;
            if room {
                self.bytes += total;
            }
            self.arriving.insert(
                request,
                Arriving {
                    attempt,
                    tokens: piece.tokens,
                    total,
                    received: 0,
                    data: room.then(|| Vec::with_capacity(total)),
                },
            );
        }
        let Some(arriving) = self
            .arriving
            .get_mut(&request)
            .filter(|arriving| arriving.attempt == attempt)
        else {
            return violation(Violation::NotAsked);
        };
        let fits = arriving.tokens == piece.tokens
            && arriving.total == total
            && piece.offset == arriving.received as u64
            && arriving.received + piece.data.len() <= total;
        if !fits {
            return violation(Violation::OutOfOrder);
        }
        arriving.received += piece.data.len();
        let Some(data) = arriving.data.as_mut() else {
            if arriving.received == total {
                self.arriving.remove(&request);
            }
            return Err(Refused::OverBudget);
        };
        data.extend_from_slice(&piece.data);
        if arriving.received < total {
            return Ok(false);
        }
        let Some(Arriving {
            tokens,
            data: Some(data),
            ..
        }) = self.arriving.remove(&request)
        else {
            return Ok(false);
        };
        self.kept.insert(
            request,
            Kept {
                tokens,
                data: Bytes::from(data),
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
            .chain(self.asked.keys())
            .copied()
            .filter(|request| !in_flight(*request))
            .collect();
        for request in gone {
            self.drop_all(request);
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets a checkpoint still arriving or still asked for (its attempt
    /// is being replaced).
    pub(super) fn abandon(&mut self, request: RequestId) {
        self.asked.remove(&request);
        if let Some(arriving) = self.arriving.remove(&request) {
            if arriving.data.is_some() {
                self.bytes -= arriving.total;
            }
        }
    }

    /// Drops everything of `request`'s checkpoint: asked, arriving and kept.
    pub(super) fn drop_all(&mut self, request: RequestId) {
        self.abandon(request);
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
            // A stopped attempt's pieces can still be on their way, as its
            // tokens can: dropped, like them.
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
        match checkpoints.receive(request, inflight.attempt, inflight.prompt.len(), &piece) {
            Ok(true) => {
                self.metrics.kv_checkpoints_kept.fetch_add(1, ORDER);
                tracing::info!(
                    request_id = request.0,
                    kept_bytes = checkpoints.bytes(),
                    "kept the prompt's kv checkpoint"
                );
            }
            Ok(false) => {}
            Err(Refused::OverBudget) => {
                self.metrics.kv_checkpoints_refused.fetch_add(1, ORDER);
                if piece.offset == 0 {
                    tracing::warn!(
                        request_id = request.0,
                        "kv checkpoint refused: over the memory budget"
                    );
                }
            }
            Err(Refused::Violation(violation)) => {
                self.checkpoint_violation(&mut state, session, request, violation);
            }
        }
        // Also the moment to let go of checkpoints of finished generations.
        state.drop_finished_checkpoints();
    }

    /// A node broke the checkpoint protocol for `request` (its current
    /// attempt): the generation's checkpoint, arriving or kept, is dropped
    /// and the node is disconnected as for any protocol violation. Every such case comes
    /// through here.
    pub(super) fn checkpoint_violation(
        &self,
        state: &mut CoreState,
        session: NodeSession,
        request: RequestId,
        violation: Violation,
    ) {
        self.metrics.kv_checkpoints_refused.fetch_add(1, ORDER);
        state.checkpoints.drop_all(request);
        tracing::warn!(
            request_id = request.0,
            ?violation,
            "kv checkpoint piece broke the protocol; checkpoint dropped"
        );
        // Counted, logged and disconnected like every other violation; the
        // generation moves on from its committed tokens.
        self.protocol_violation(state, session, "kv checkpoint out of bounds");
    }

    /// The node running `request` refused the checkpoint it was handed: it
    /// is not sent again.
    pub(super) fn checkpoint_rejected_by_node(&self, state: &mut CoreState, request: RequestId) {
        self.metrics
            .kv_checkpoints_rejected_by_nodes
            .fetch_add(1, ORDER);
        state.checkpoints.drop_all(request);
        tracing::warn!(
            request_id = request.0,
            "a node refused the prompt's kv checkpoint; it will not be sent again"
        );
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

    fn violation(why: Violation) -> Result<bool, Refused> {
        Err(Refused::Violation(why))
    }

    #[test]
    fn pieces_in_order_from_the_asked_attempt_make_a_checkpoint_for_that_generation_only() {
        let mut checkpoints = Checkpoints::new(1_000, 4);
        let request = RequestId(1);
        assert!(checkpoints.wanted(request, 4));
        assert!(!checkpoints.wanted(request, 3), "short prompts re-prefill");
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert!(!checkpoints.wanted(request, 4), "one is arriving");
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 6, 4)),
            Ok(true)
        );
        assert_eq!(checkpoints.bytes(), 10);
        let (tokens, data) = checkpoints.for_resume(request).unwrap();
        assert_eq!((tokens, data.len()), (4, 10));
        assert!(checkpoints.for_resume(RequestId(2)).is_none());
        // One checkpoint per asked attempt: a second one breaks the protocol.
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 0, 6)),
            violation(Violation::NotAsked)
        );
        assert!(checkpoints.for_resume(request).is_none(), "dropped");
        assert_eq!(checkpoints.bytes(), 0);
    }

    #[test]
    fn unasked_wrong_and_oversized_pieces_are_violations_that_keep_nothing() {
        let mut checkpoints = Checkpoints::new(usize::MAX, 4);
        let request = RequestId(1);
        // Nobody asked.
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 0, 6)),
            violation(Violation::NotAsked)
        );
        // Asked of attempt 1, sent by attempt 2.
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 2, 4, &piece(4, 10, 0, 6)),
            violation(Violation::NotAsked)
        );
        // Not the prompt's length.
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(5, 10, 0, 6)),
            violation(Violation::Tokens)
        );
        // More than a prompt this long can need.
        checkpoints.ask(request, 1);
        let bound = limits::kv_checkpoint_bytes_max(4);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, bound + 1, 0, 6)),
            violation(Violation::TooLarge)
        );
        assert!(limits::kv_checkpoint_bytes_max(1 << 20) <= engine::CHECKPOINT_BYTES_MAX);
        // A gap between pieces.
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 7, 3)),
            violation(Violation::OutOfOrder)
        );
        // More than announced.
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 0, 6)),
            Ok(false)
        );
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 6, 5)),
            violation(Violation::OutOfOrder)
        );
        // A first piece that does not start at 0, and an empty piece.
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 4, 6)),
            violation(Violation::OutOfOrder)
        );
        checkpoints.ask(request, 1);
        assert_eq!(
            checkpoints.receive(request, 1, 4, &piece(4, 10, 0, 0)),
            violation(Violation::PieceSize)
        );
        assert_eq!(checkpoints.bytes(), 0);
        assert!(checkpoints.for_resume(request).is_none());
    }

    #[test]
    fn the_budget_bounds_what_is_kept_and_arriving() {
        let mut checkpoints = Checkpoints::new(25, 1);
        for request in 1..=3 {
            checkpoints.ask(RequestId(request), 1);
        }
        assert_eq!(
            checkpoints.receive(RequestId(1), 1, 1, &piece(1, 10, 0, 10)),
            Ok(true)
        );
        assert_eq!(
            checkpoints.receive(RequestId(2), 1, 1, &piece(1, 10, 0, 5)),
            Ok(false)
        );
        // No room: refused, but its pieces are still the protocol's, not violations.
        assert_eq!(
            checkpoints.receive(RequestId(3), 1, 1, &piece(1, 10, 0, 5)),
            Err(Refused::OverBudget)
        );
        assert_eq!(
            checkpoints.receive(RequestId(3), 1, 1, &piece(1, 10, 5, 5)),
            Err(Refused::OverBudget)
        );
        assert!(checkpoints.bytes() <= 25);
        assert!(checkpoints.for_resume(RequestId(3)).is_none());
        // A generation that ends frees its room.
        checkpoints.retain(|request| request != RequestId(1));
        checkpoints.ask(RequestId(3), 2);
        assert_eq!(
            checkpoints.receive(RequestId(3), 2, 1, &piece(1, 10, 0, 10)),
            Ok(true)
        );
        assert_eq!(checkpoints.bytes(), 20);
        // A zero budget keeps nothing and asks for nothing.
        let none = Checkpoints::new(0, 1);
        assert!(!none.wanted(RequestId(1), 100));
    }
}
