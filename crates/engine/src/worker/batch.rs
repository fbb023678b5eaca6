//! The two llama.cpp batches of a step: which waiting prompts one prefill call takes and how
//! many tokens of each ([`plan_prefill`]), and every decoding sequence's one next token. What
//! went in is recorded as [`BatchEntry`]s, which the worker reads back after the call to advance
//! each slot and sample where logits were asked for. Nothing here calls llama.cpp but to fill
//! the batch.

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::Worker;
use crate::slot::Slot;

impl Worker<'_> {
    /// Every runnable sequence past its prompt contributes its one next token, in sequence id
    /// order (llama.cpp groups runs of consecutive ids into one micro-batch).
    pub(super) fn fill_decode_batch(&mut self) -> Vec<BatchEntry> {
        let batch = &mut self.batch;
        batch.clear();
        let mut entries = Vec::with_capacity(self.slots.len());
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot.as_ref().filter(|slot| slot.is_runnable()) else {
                continue;
            };
            let Some((token, wants_logits)) = slot.decode_token() else {
                continue;
            };
            let logits_at = batch.n_tokens();
            // With more sequences than batch room, the last ones wait a step (and keep their token).
            if add_token(batch, token, slot.kv_tokens, slot.seq_id, wants_logits) {
                let logits_at = wants_logits.then_some(logits_at);
                entries.push(BatchEntry {
                    slot: index,
                    kind: Fed::Decode,
                    logits_at,
                    scores: None,
                });
            }
        }
        entries
    }

    /// Chunks of the waiting prompts, the oldest first, as [`plan_prefill`] groups them: one
    /// llama.cpp call prefills several prompts when that feeds more tokens than the oldest alone.
    pub(super) fn fill_prefill_batch(&mut self) -> Vec<BatchEntry> {
        let batch = &mut self.batch;
        batch.clear();
        let mut waiting: Vec<(usize, &Slot)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| Some((index, slot.as_ref()?)))
            .filter(|(_, slot)| slot.is_runnable() && !slot.prefill_remaining().is_empty())
            .collect();
        waiting.sort_by_key(|(_, slot)| slot.admitted);
        // A prompt being scored goes alone, when its turn comes, in short chunks: each of its
        // tokens has a vocabulary of logits in llama.cpp's output buffer.
        let capacity = self.config.batch_tokens as usize;
        let (capacity, alone) = match waiting.first() {
            Some((_, oldest)) if oldest.scores_prompt() => {
                (capacity.min(PROMPT_SCORE_CHUNK_TOKENS), true)
            }
            _ => {
                waiting.retain(|(_, slot)| !slot.scores_prompt());
                (capacity, false)
            }
        };
        if alone {
            waiting.truncate(1);
        }
        let remaining: Vec<usize> = waiting
            .iter()
            .map(|(_, slot)| slot.prefill_remaining().len())
            .collect();
        let (members, chunk) = plan_prefill(&remaining, capacity);
        let mut group: Vec<_> = members.into_iter().map(|member| waiting[member]).collect();
        // Ascending sequence ids: llama.cpp puts a run of consecutive ids in one micro-batch.
        group.sort_by_key(|(_, slot)| slot.seq_id);
        let mut entries = Vec::with_capacity(group.len());
        for (index, slot) in group {
            let remaining = slot.prefill_remaining();
            let completes_prompt = chunk == remaining.len();
            let samples = completes_prompt && slot.samples_after_prompt();
            // While prefilling, the cells hold the prompt's first `kv_tokens` tokens. A scored
            // prompt needs the logits of every token before a scored one: each scores the next.
            let first_token = slot.kv_tokens as usize;
            let (skipped, scored) = if slot.scores_prompt() {
                let skipped = (slot.scored_from() - 1)
                    .saturating_sub(first_token)
                    .min(chunk);
                let scored = chunk.min(slot.prompt_len().saturating_sub(first_token + 1));
                (skipped, scored.saturating_sub(skipped))
            } else {
                (0, 0)
            };
            let scores = (scored > 0).then(|| PromptScores {
                first_logits: batch.n_tokens() + i32::try_from(skipped).unwrap_or(i32::MAX),
                first_token: first_token + 1 + skipped,
                count: scored,
            });
            for (offset, &token) in remaining[..chunk].iter().enumerate() {
                let scores_next = offset >= skipped && offset < skipped + scored;
                let wants_logits = (samples && offset + 1 == chunk) || scores_next;
                let position = slot
                    .kv_tokens
                    .saturating_add(u32::try_from(offset).unwrap_or(u32::MAX));
                if !add_token(batch, token, position, slot.seq_id, wants_logits) {
                    // Cannot happen: the plan fits the batch capacity. Feed nothing rather than
                    // a partial chunk whose bookkeeping would be wrong.
                    batch.clear();
                    return Vec::new();
                }
            }
            entries.push(BatchEntry {
                slot: index,
                kind: Fed::Prefill(chunk),
                logits_at: samples.then(|| batch.n_tokens() - 1),
                scores,
            });
        }
        entries
    }
}

/// Which work of a slot went into the batch.
#[derive(Clone, Copy, Debug)]
pub(super) enum Fed {
    Prefill(usize),
    Decode,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct BatchEntry {
    /// The slot (and sequence id) whose tokens these are.
    pub(super) slot: usize,
    pub(super) kind: Fed,
    /// Index in the batch whose logits are this slot's next token distribution.
    pub(super) logits_at: Option<i32>,
    /// Prompt tokens of a scored prompt whose logits this batch computes.
    pub(super) scores: Option<PromptScores>,
}

/// Most tokens of a scored prompt (`Generation::prompt_logprobs`) one prefill call takes: each
/// of them asks llama.cpp for a whole vocabulary of logits.
pub const PROMPT_SCORE_CHUNK_TOKENS: usize = 64;

/// Where a scored prompt's logits sit in a batch: from batch index `first_logits` on, `count`
/// consecutive tokens, scoring prompt tokens `first_token..first_token + count` (each by the
/// logits of the token before it).
#[derive(Clone, Copy, Debug)]
pub(super) struct PromptScores {
    pub(super) first_logits: i32,
    pub(super) first_token: usize,
    pub(super) count: usize,
}

/// How many of `remaining` prompt tokens to prefill now, with `capacity` room: as many as fit,
/// but never leaving a single token for the next chunk, because a one-token chunk is computed
/// like a decode and would round differently from the same prompt chunked otherwise.
pub(super) fn prefill_chunk_len(remaining: usize, capacity: usize) -> usize {
    if remaining <= capacity {
        return remaining;
    }
    if remaining - capacity == 1 && capacity > 2 {
        return capacity - 1;
    }
    capacity
}

/// Which waiting prompts one prefill call takes and how many tokens of each: given the tokens
/// each still has to prefill, oldest first, returns the indices of the prompts taken (the oldest
/// always among them, in age order) and the chunk each of them gets.
///
/// Every member gets the same chunk, so that llama.cpp (which, with one KV stream per sequence,
/// cuts a batch into micro-batches of an equal share per sequence) computes each member's tokens
/// in one piece, exactly as if it were alone. A group's chunk is at least 2 tokens and leaves no
/// member a single token for later (see [`prefill_chunk_len`]); prompts with one token left go
/// alone. The plan is the one that feeds the most tokens within `capacity`; the oldest alone wins
/// ties, so a long prompt is not slowed down by short ones that arrived after it.
fn plan_prefill(remaining: &[usize], capacity: usize) -> (Vec<usize>, usize) {
    let Some(&oldest) = remaining.first() else {
        return (Vec::new(), 0);
    };
    let fits = |left: usize, chunk: usize| left == chunk || left >= chunk + 2;
    let mut best = (vec![0], prefill_chunk_len(oldest, capacity));
    for chunk in (2..=oldest.min(capacity / 2)).filter(|&chunk| fits(oldest, chunk)) {
        if (capacity / chunk) * chunk <= best.0.len() * best.1 {
            continue;
        }
        let members: Vec<usize> = (0..remaining.len())
            .filter(|&index| fits(remaining[index], chunk))
            .take(capacity / chunk)
            .collect();
        if members.len() * chunk > best.0.len() * best.1 {
            best = (members, chunk);
        }
    }
    best
}

/// Add one token to `batch`; false when the batch is full (or the position is out of range).
pub(crate) fn add_token(
    batch: &mut LlamaBatch<'_>,
    token: i32,
    position: u32,
    seq_id: i32,
    logits: bool,
) -> bool {
    let Ok(position) = i32::try_from(position) else {
        return false;
    };
    batch
        .add(LlamaToken(token), position, &[seq_id], logits)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::{plan_prefill, prefill_chunk_len};

    #[test]
    fn prefill_chunks_never_leave_a_single_token_behind() {
        assert_eq!(prefill_chunk_len(10, 512), 10);
        assert_eq!(prefill_chunk_len(512, 512), 512);
        assert_eq!(prefill_chunk_len(513, 512), 511);
        assert_eq!(prefill_chunk_len(514, 512), 512);
        assert_eq!(prefill_chunk_len(1, 512), 1);
        assert_eq!(prefill_chunk_len(3, 2), 2);
    }

    #[test]
    fn waiting_prompts_are_prefilled_together_in_equal_chunks() {
        let plan = |remaining: &[usize], capacity| {
            let (members, chunk) = plan_prefill(remaining, capacity);
            (members.len(), chunk)
        };
        assert_eq!(plan_prefill(&[], 512), (vec![], 0));
        // Alone, a prompt is chunked as before.
        assert_eq!(plan(&[1000], 512), (1, 512));
        assert_eq!(plan(&[513], 512), (1, 511));
        // Eight short prompts that arrived together go in one call.
        assert_eq!(plan(&[50; 8], 512), (8, 50));
        // A long prompt is not slowed down by a short one behind it.
        assert_eq!(plan(&[1000, 50], 512), (1, 512));
        // 50 would leave the second prompt one token, 49 the first: 48 each.
        assert_eq!(plan(&[50, 51], 512), (2, 48));
        // Two chunks of 32 feed more than three of 21.
        assert_eq!(plan(&[40, 40, 40], 64), (2, 32));
        // A prompt with one token left goes alone; two tokens still group, and a group never
        // leaves one token behind: the prompt that would be left one waits for the next call.
        assert_eq!(plan(&[1, 40], 512), (1, 1));
        assert_eq!(plan(&[2, 2], 512), (2, 2));
        assert_eq!(plan_prefill(&[2, 3, 2], 512), (vec![0, 2], 2));
        assert_eq!(plan_prefill(&[40, 1, 40], 512), (vec![0, 2], 40));
    }

    #[test]
    fn a_prefill_plan_fits_the_batch_and_leaves_no_single_token() {
        // A small deterministic generator: the plan must hold for any mix of waiting prompts.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound).unwrap()
        };
        for _ in 0..20_000 {
            let capacity = 2 + next(600);
            let remaining: Vec<usize> = (0..1 + next(8)).map(|_| 1 + next(1200)).collect();
            let (members, chunk) = plan_prefill(&remaining, capacity);
            assert_eq!(members.first(), Some(&0), "{remaining:?}");
            assert!(members.windows(2).all(|pair| pair[0] < pair[1]));
            assert!(
                members.len() * chunk <= capacity,
                "{remaining:?} {capacity}"
            );
            let alone = prefill_chunk_len(remaining[0], capacity);
            if members.len() > 1 {
                assert!(chunk >= 2);
                for &member in &members {
                    let left = remaining[member];
                    assert!(left == chunk || left >= chunk + 2, "{remaining:?} {chunk}");
                }
                assert!(members.len() * chunk > alone);
            } else {
                assert_eq!(chunk, alone);
            }
        }
    }
}
