//! A sequence's KV cells in the llama.cpp context: exported as a checkpoint section and loaded
//! back, a finished prompt's head kept for a next occupant that starts the same way, and the
//! rest released. The layout of llama.cpp's sequence state (a section per KV stream) is known
//! only here.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::LlamaStateSeqFlags;

use crate::slot::Slot;
use crate::TokenId;

/// The largest sequence checkpoint exported or loaded; a longer context is re-prefilled instead.
pub const CHECKPOINT_BYTES_MAX: usize = 64 << 20;

/// A copy of a sequence's KV cells in the portable form of [`crate::SequenceCheckpoint`], or
/// `None` (logged) when it is empty, too large or not shaped as expected.
pub(super) fn export_sequence(
    context: &LlamaContext<'_>,
    seq_id: i32,
    streams: u32,
) -> Option<Vec<u8>> {
    let flags = LlamaStateSeqFlags::empty();
    let size = context.state_seq_get_size_ext(seq_id, flags);
    if size == 0 || size > CHECKPOINT_BYTES_MAX {
        tracing::warn!(
            seq_id,
            size,
            "sequence checkpoint not exported: empty or too large"
        );
        return None;
    }
    let mut data = vec![0_u8; size];
    // SAFETY: `data` holds the `size` bytes llama.cpp just said this sequence's state needs, and
    // nothing else touches the context meanwhile (this thread owns it).
    let written = unsafe { context.state_seq_get_data_ext(data.as_mut_ptr(), seq_id, flags) };
    if written == 0 || written > size {
        tracing::warn!(seq_id, written, "sequence checkpoint export failed");
        return None;
    }
    data.truncate(written);
    let stream = usize::try_from(seq_id).ok()?;
    let section = own_stream_section(&data, stream, streams as usize);
    if section.is_none() {
        tracing::warn!(
            seq_id,
            "sequence checkpoint not exported: unexpected layout"
        );
    }
    section
}

/// Loads `state` (a sequence state whose metadata this engine wrote: positions `0..cells`) into
/// the empty sequence `seq_id`. True only when llama.cpp accepted it and the sequence then holds
/// exactly positions `0..cells`.
pub(super) fn load_sequence(
    context: &mut LlamaContext<'_>,
    seq_id: i32,
    state: &[u8],
    cells: usize,
) -> bool {
    // SAFETY: llama.cpp reads at most `state.len()` bytes and checks the format as it goes
    // (stream and cell counts against this context, tensor types and sizes against the model),
    // failing with 0 rather than reading past the buffer. The cell metadata in `state` was
    // written by this engine, so a failed load leaves no cell that `seq_rm` cannot remove.
    let loaded =
        unsafe { context.state_seq_set_data_ext(state, seq_id, LlamaStateSeqFlags::empty()) };
    let last = i64::try_from(cells).unwrap_or(i64::MAX) - 1;
    let shaped = context.kv_cache_seq_pos_min(seq_id) == 0
        && i64::from(context.kv_cache_seq_pos_max(seq_id)) == last;
    if !(loaded && shaped) {
        tracing::warn!(
            seq_id,
            cells,
            loaded,
            "a sequence checkpoint did not load; prefilling the prompt instead"
        );
        return false;
    }
    true
}

/// The magic number llama.cpp puts at the head of a sequence state.
const SEQUENCE_STATE_MAGIC: u32 = 0xaf14_3cd8;

/// The bytes of one stream's section in llama.cpp's sequence state, which is laid out as
/// `u32 magic`, `i32 seq_id`, `u32 n_stream`, then per stream `u32 cell_count` and, when it is
/// not 0, the cells. With one KV stream per sequence only the sequence's own stream has cells;
/// keeping just its section makes a checkpoint loadable by an engine with another number of
/// sequences, into any sequence.
fn own_stream_section(state: &[u8], stream: usize, streams: usize) -> Option<Vec<u8>> {
    const WORD: usize = std::mem::size_of::<u32>();
    if stream >= streams {
        return None;
    }
    let before = WORD * (3 + stream);
    let after = WORD * (streams - stream - 1);
    if state.len() < before + WORD + after {
        return None;
    }
    let word = |at: usize| state[at..at + WORD].try_into().ok().map(u32::from_ne_bytes);
    let empty = |bytes: &[u8]| bytes.iter().all(|&byte| byte == 0);
    let section = &state[before..state.len() - after];
    let shaped = word(0)? == SEQUENCE_STATE_MAGIC
        && word(2 * WORD)? as usize == streams
        && empty(&state[3 * WORD..before])
        && empty(&state[state.len() - after..])
        && !empty(&section[..WORD]);
    shaped.then(|| section.to_vec())
}

/// A section from [`own_stream_section`] as the sequence state of a context with `streams`
/// streams: llama.cpp loads a non-empty section into the destination sequence's own stream,
/// whichever place it has, so the others follow as empty.
pub(super) fn with_streams(section: &[u8], streams: usize) -> Vec<u8> {
    const WORD: usize = std::mem::size_of::<u32>();
    let mut state = Vec::with_capacity(section.len() + WORD * (streams + 2));
    state.extend_from_slice(&SEQUENCE_STATE_MAGIC.to_ne_bytes());
    // The sequence it was saved from; llama.cpp reads and ignores it.
    state.extend_from_slice(&0_u32.to_ne_bytes());
    state.extend_from_slice(&u32::try_from(streams).unwrap_or(u32::MAX).to_ne_bytes());
    state.extend_from_slice(section);
    state.resize(state.len() + WORD * streams.saturating_sub(1), 0);
    state
}

/// How many leading tokens of `prompt` a sequence holding the cells of `cached` can keep: their
/// common head, but leaving at least two prompt tokens to prefill (the last one's logits are
/// needed, and a one-token chunk is computed like a decode; see
/// [`prefill_chunk_len`](super::batch::prefill_chunk_len)).
pub(super) fn reusable_head(cached: &[TokenId], prompt: &[TokenId]) -> usize {
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(cached, prompt)| cached == prompt)
        .count();
    common.min(prompt.len().saturating_sub(2))
}

/// Frees a sequence's cells from position `keep` on, leaving its first `keep` tokens. False when
/// llama.cpp cannot cut the sequence there; the caller then empties it.
pub(super) fn keep_sequence_head(context: &mut LlamaContext<'_>, seq_id: i32, keep: usize) -> bool {
    let (Ok(seq), Ok(keep)) = (u32::try_from(seq_id), u32::try_from(keep)) else {
        return false;
    };
    let kept = matches!(
        context.clear_kv_cache_seq(Some(seq), Some(keep), None),
        Ok(true)
    ) && context.kv_cache_seq_pos_min(seq_id) == 0
        && i64::from(context.kv_cache_seq_pos_max(seq_id)) == i64::from(keep) - 1;
    if !kept {
        tracing::warn!(
            seq_id,
            keep,
            "could not keep a sequence's prompt head; prefilling it"
        );
    }
    kept
}

/// The occupant of `slot`'s sequence is done: keep the cells of its prefilled prompt for a
/// next prompt with the same head (remembered in `cached`), free the rest. A scored prompt's
/// cells are not kept: a prompt continued from them was seen to part from the same prompt
/// continued from cells of a plain prefill or of decodes (a cloud checking a draft, then
/// continuing it, would not give its own answer).
pub(super) fn retire_sequence(
    context: &mut LlamaContext<'_>,
    cached: &mut Vec<TokenId>,
    slot: &Slot,
) {
    cached.clear();
    let head = slot.prefilled_prompt();
    if !head.is_empty()
        && !slot.prompt_was_scored()
        && keep_sequence_head(context, slot.seq_id, head.len())
    {
        cached.extend_from_slice(head);
    } else {
        release_sequence(context, slot.seq_id);
    }
}

/// Free a sequence's KV cells so the next occupant of the slot starts empty.
pub(crate) fn release_sequence(context: &mut LlamaContext<'_>, seq_id: i32) {
    let Ok(seq) = u32::try_from(seq_id) else {
        return;
    };
    if let Err(error) = context.clear_kv_cache_seq(Some(seq), None, None) {
        tracing::error!(%error, seq_id, "could not clear a sequence's kv cache");
    }
}

#[cfg(test)]
mod tests {
    use super::{own_stream_section, reusable_head, with_streams};

    fn words(values: &[u32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|value| value.to_ne_bytes())
            .collect()
    }

    #[test]
    fn a_sequence_state_moves_between_contexts_with_different_stream_counts() {
        const MAGIC: u32 = super::SEQUENCE_STATE_MAGIC;
        // Sequence 1 of three streams: its own stream holds 2 cells and their data.
        let exported = words(&[MAGIC, 1, 3, 0, 2, 0xAAAA, 0xBBBB, 0]);
        let section = own_stream_section(&exported, 1, 3).unwrap();
        assert_eq!(section, words(&[2, 0xAAAA, 0xBBBB]));
        assert_eq!(
            with_streams(&section, 1),
            words(&[MAGIC, 0, 1, 2, 0xAAAA, 0xBBBB])
        );
        assert_eq!(
            with_streams(&section, 2),
            words(&[MAGIC, 0, 2, 2, 0xAAAA, 0xBBBB, 0])
        );
        // Anything else is not what this engine exports.
        assert!(
            own_stream_section(&exported, 0, 3).is_none(),
            "another stream's cells"
        );
        assert!(
            own_stream_section(&exported, 1, 2).is_none(),
            "stream count"
        );
        let no_magic = words(&[7, 1, 3, 0, 2, 0xAAAA, 0xBBBB, 0]);
        assert!(own_stream_section(&no_magic, 1, 3).is_none(), "magic");
        let no_cells = words(&[MAGIC, 1, 3, 0, 0, 0]);
        assert!(own_stream_section(&no_cells, 1, 3).is_none(), "no cells");
        assert!(
            own_stream_section(&words(&[MAGIC]), 0, 1).is_none(),
            "too short"
        );
    }

    #[test]
    fn a_cached_head_is_reused_up_to_two_tokens_before_the_prompt_ends() {
        assert_eq!(reusable_head(&[], &[1, 2, 3, 4]), 0);
        assert_eq!(reusable_head(&[1, 2, 9, 9], &[1, 2, 3, 4, 5]), 2);
        // The same prompt, or one that the cache covers: the last two tokens are prefilled.
        assert_eq!(reusable_head(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]), 3);
        assert_eq!(reusable_head(&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4]), 2);
        assert_eq!(reusable_head(&[1, 2], &[1, 2]), 0);
        assert_eq!(reusable_head(&[7, 2, 3], &[1, 2, 3, 4]), 0);
    }
}
