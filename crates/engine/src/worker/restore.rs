//! Restoring a prompt's head from a [`SequenceCheckpoint`] instead of prefilling it. The
//! checkpoint is parsed and checked against this context's sequence-state shape (probed once),
//! its head loaded into the empty sequence, and the prompt's last [`RESTORE_CHECKED_TOKENS`]
//! prefilled here and compared with the checkpoint's cells for them before any of the prompt's
//! logits count. Anything wrong leaves the prompt to be prefilled whole.

use std::sync::Arc;

use llama_cpp_2::context::LlamaContext;

use super::batch::add_token;
use super::sequence::{
    export_sequence, load_sequence, release_sequence, with_streams, CHECKPOINT_BYTES_MAX,
};
use super::Worker;
use crate::checkpoint::{Section, Shape, TAIL_DISTANCE_MAX};
use crate::slot::Slot;
use crate::SequenceCheckpoint;

/// Prompt tokens a restoring engine prefills itself, after a checkpoint's other cells, and
/// compares with the checkpoint's cells for them. Two would keep the invariant that a prompt's
/// last two tokens are always prefilled; sixteen also reach past a chat template's closing
/// tokens (the same in every chat prompt) into the tokens that tell prompts apart.
pub const RESTORE_CHECKED_TOKENS: usize = 16;

/// Shortest prompt restored from a checkpoint (a head of at least two cells is loaded); shorter
/// ones are prefilled whole.
const RESTORE_PROMPT_TOKENS_MIN: usize = RESTORE_CHECKED_TOKENS + 2;

impl Worker<'_> {
    /// Loads the head of `checkpoint` into `slot`'s (empty) sequence: every cell but the
    /// prompt's last [`RESTORE_CHECKED_TOKENS`], which the slot then prefills itself and compares
    /// (see [`Worker::check_restored_tail`]). The checkpoint is parsed and checked here first
    /// (cell count, positions `0..tokens`, one sequence per cell, this context's layers, types
    /// and sizes), and llama.cpp only sees metadata written here; anything wrong leaves the
    /// sequence empty and the prompt to be prefilled.
    pub(super) fn restore_prompt_head(
        &mut self,
        slot: &mut Slot,
        checkpoint: Arc<SequenceCheckpoint>,
    ) {
        let prompt_len = slot.prompt_len();
        if prompt_len < RESTORE_PROMPT_TOKENS_MIN || checkpoint.data.len() > CHECKPOINT_BYTES_MAX {
            // Too short to be worth checking, or more than this engine ever exports: prefill.
            return;
        }
        let Some(shape) = self.state_shape(slot.seq_id) else {
            return;
        };
        if checkpoint.tokens as usize != prompt_len {
            tracing::warn!(
                seq_id = slot.seq_id,
                tokens = checkpoint.tokens,
                prompt_len,
                "a checkpoint does not cover the prompt; prefilling it"
            );
            slot.checkpoint_rejected();
            return;
        }
        let section = match Section::parse(&checkpoint.data, prompt_len, Some(&shape)) {
            Ok(section) => section,
            Err(malformed) => {
                tracing::warn!(
                    seq_id = slot.seq_id,
                    ?malformed,
                    "a malformed checkpoint was refused; prefilling the prompt"
                );
                slot.checkpoint_rejected();
                return;
            }
        };
        let head = prompt_len - RESTORE_CHECKED_TOKENS;
        let streams = self.config.parallel_sequences;
        let state = with_streams(&section.head(head), streams as usize);
        if load_sequence(&mut self.context, slot.seq_id, &state, head) {
            slot.restored_head(head, checkpoint);
        } else {
            // Metadata written here, shape checked: llama.cpp should not refuse it.
            release_sequence(&mut self.context, slot.seq_id);
            slot.checkpoint_rejected();
        }
    }

    /// The shape of this context's sequence sections, probed once: two tokens decoded into the
    /// (empty) sequence `seq_id`, exported, parsed, and removed again.
    fn state_shape(&mut self, seq_id: i32) -> Option<Shape> {
        if let Some(shape) = &self.state_shape {
            return shape.clone();
        }
        let streams = self.config.parallel_sequences;
        self.batch.clear();
        let fed = add_token(&mut self.batch, 0, 0, seq_id, false)
            && add_token(&mut self.batch, 0, 1, seq_id, true);
        let probed = (fed && self.context.decode(&mut self.batch).is_ok())
            .then(|| export_sequence(&self.context, seq_id, streams))
            .flatten();
        self.batch.clear();
        release_sequence(&mut self.context, seq_id);
        let shape = probed
            .as_deref()
            .and_then(|section| Section::parse(section, 2, None).ok())
            .map(|section| section.shape());
        if shape.is_none() {
            tracing::warn!("this model's kv cells are not in the layout checkpoints are checked in; prompts are always prefilled");
        }
        self.state_shape = Some(shape.clone());
        shape
    }

    /// The prompt of `slot` is all in its cells, the head loaded from a checkpoint and the rest
    /// prefilled here: true when the cells computed here for the rest agree with the
    /// checkpoint's for the same positions (computed on top of the same head, they differ by
    /// rounding at most, unless the checkpoint was made for other tokens).
    pub(super) fn check_restored_tail(
        context: &LlamaContext<'_>,
        shape: Option<&Shape>,
        seq_id: i32,
        streams: u32,
        checkpoint: &SequenceCheckpoint,
        head: usize,
    ) -> bool {
        let tokens = checkpoint.tokens as usize;
        let Some(ours) = export_sequence(context, seq_id, streams) else {
            return false;
        };
        let (Ok(ours), Ok(theirs)) = (
            Section::parse(&ours, tokens, shape),
            Section::parse(&checkpoint.data, tokens, shape),
        ) else {
            return false;
        };
        let distance = ours.tail_distance(&theirs, head);
        let agrees = distance <= TAIL_DISTANCE_MAX;
        if !agrees {
            tracing::warn!(
                seq_id,
                distance,
                "a checkpoint's cells are not this prompt's; prefilling it instead"
            );
        }
        agrees
    }
}
