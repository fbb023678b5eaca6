//! Prompt-head hashes: the one definition of "which head of a prompt" that
//! the gateway, the bus and the cell's scheduler compare.
//!
//! A prompt's tokens are cut into blocks of [`PROMPT_HEAD_BLOCK_TOKENS`];
//! the hash at level `k` covers `prompt[..k * PROMPT_HEAD_BLOCK_TOKENS]`,
//! for every whole block up to [`PROMPT_HEADS_MAX`] of them. The hashes are
//! chained (each level continues the state of the one before), so two
//! prompts share the hash at level `k` exactly when they share the first
//! `k` blocks (up to a 64-bit collision), and computing every level is one
//! pass over at most `PROMPT_HEADS_MAX * PROMPT_HEAD_BLOCK_TOKENS` tokens.
//!
//! The hash is a fixed function of the token ids: the same in every
//! process, on every machine and in every version (a test pins its values),
//! because a gateway compares hashes a cell computed in another process. It
//! is not keyed and not collision resistant: a collision, or a prompt made
//! to collide, only steers placement towards a vehicle that then reuses
//! nothing (the engine compares the tokens themselves).

use serde::{Deserialize, Serialize};

/// Tokens per head block: a head is counted in whole blocks.
pub const PROMPT_HEAD_BLOCK_TOKENS: usize = 64;

/// Levels hashed at most: heads beyond `PROMPT_HEADS_MAX` blocks (1,024
/// tokens) count as that long.
pub const PROMPT_HEADS_MAX: usize = 16;

/// The chained head hashes of one prompt: `hashes()[k - 1]` covers its first
/// `k` blocks. A prompt shorter than one block has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct PromptHeads {
    hashes: [u64; PROMPT_HEADS_MAX],
    levels: u8,
}

/// Start of the chain (the FNV-1a 64-bit offset basis).
const SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// One step of the chain: the state with one token folded in. A
/// multiply-xorshift mix (the finaliser of SplitMix64), bijective in the
/// state, so that the order of tokens matters.
fn fold(state: u64, token: u32) -> u64 {
    let mut x = (state ^ u64::from(token)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl PromptHeads {
    /// The heads of `prompt` (token ids as the tokenizer gives them; a
    /// negative id is hashed as its two's-complement bits).
    pub fn of(prompt: &[i32]) -> PromptHeads {
        let mut heads = PromptHeads::default();
        let mut state = SEED;
        for block in prompt
            .chunks_exact(PROMPT_HEAD_BLOCK_TOKENS)
            .take(PROMPT_HEADS_MAX)
        {
            for token in block {
                state = fold(state, u32::from_ne_bytes(token.to_ne_bytes()));
            }
            heads.hashes[usize::from(heads.levels)] = state;
            heads.levels += 1;
        }
        heads
    }

    /// The hashes, shortest head first.
    pub fn hashes(&self) -> &[u64] {
        &self.hashes[..usize::from(self.levels)]
    }

    /// Whether the prompt has no whole block.
    pub fn is_empty(&self) -> bool {
        self.levels == 0
    }

    /// Blocks the two prompts share at their head (0 if none).
    pub fn shared_levels(&self, other: &PromptHeads) -> usize {
        // Chained: equal at level k means equal at every level below, so
        // the deepest equal level is the first unequal one.
        self.hashes()
            .iter()
            .zip(other.hashes())
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// The deepest level (1-based) whose hash `holds` says is held, or 0.
    pub fn deepest_held(&self, mut holds: impl FnMut(u64) -> bool) -> usize {
        self.hashes()
            .iter()
            .rposition(|hash| holds(*hash))
            .map_or(0, |at| at + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(len: usize, salt: i32) -> Vec<i32> {
        (0..len as i32).map(|i| i.wrapping_mul(7) + salt).collect()
    }

    #[test]
    fn a_prompt_has_one_hash_per_whole_block_up_to_the_bound() {
        assert!(PromptHeads::of(&prompt(63, 0)).is_empty());
        assert_eq!(PromptHeads::of(&prompt(64, 0)).hashes().len(), 1);
        assert_eq!(PromptHeads::of(&prompt(200, 0)).hashes().len(), 3);
        assert_eq!(
            PromptHeads::of(&prompt(5_000, 0)).hashes().len(),
            PROMPT_HEADS_MAX
        );
    }

    #[test]
    fn prompts_share_exactly_the_blocks_their_heads_share() {
        let system = prompt(300, 1);
        let mut first = system.clone();
        first.extend(prompt(100, 9));
        let mut second = system;
        second.extend(prompt(100, 5));
        let (a, b) = (PromptHeads::of(&first), PromptHeads::of(&second));
        // 300 shared tokens are four whole blocks; the fifth differs.
        assert_eq!(a.shared_levels(&b), 4);
        assert_eq!(a.hashes()[..4], b.hashes()[..4]);
        assert_ne!(a.hashes()[4], b.hashes()[4]);
        let mut swapped = first.clone();
        swapped.swap(0, 1);
        assert_eq!(PromptHeads::of(&swapped).shared_levels(&a), 0);
    }

    #[test]
    fn the_deepest_held_level_is_found() {
        let heads = PromptHeads::of(&prompt(256, 3));
        let second = heads.hashes()[1];
        assert_eq!(heads.deepest_held(|hash| hash == second), 2);
        assert_eq!(heads.deepest_held(|_| false), 0);
        assert_eq!(heads.deepest_held(|_| true), 4);
    }

    /// Gateways and cells of different versions compare these values: a
    /// change here is a wire change.
    #[test]
    fn the_hash_is_the_same_everywhere_and_in_every_version() {
        let heads = PromptHeads::of(&prompt(128, -40));
        assert_eq!(
            heads.hashes(),
            [0x542f_4b98_0f10_20a1_u64, 0x9ee4_b4ad_eb46_ca5d]
        );
    }
}
