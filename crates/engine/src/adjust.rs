//! What changes a generation's logits before the sampler draws: OpenAI's presence and
//! frequency penalties, the repetition penalty of llama.cpp and vLLM, `logit_bias`, and the
//! end-of-generation mask of `ignore_eos`.
//!
//! **Invariant:** the adjusted logits at a completion position are a pure function of the raw
//! logits, the rules, the prompt and the completion tokens before that position. A generation
//! resumed on another node rebuilds its [`Penalised`] state from the committed tokens and so
//! adjusts, and draws, exactly as the first node would have. Each token's adjustment is plain
//! f32 arithmetic on that token's logit alone (no fused operations), so every machine computes
//! the same bits.
//!
//! Order, for a token `t` whose raw logit is `l`:
//! 1. repetition penalty `r` if `t` is in the prompt or the completion so far: `l / r` when
//!    `l > 0`, else `l · r` (as vLLM and Hugging Face do);
//! 2. `- count(t) · frequency_penalty - presence_penalty` if `t` is in the completion (`count`
//!    counts completion tokens only, as OpenAI defines both);
//! 3. `+ logit_bias[t]`;
//! 4. `-inf` for an end-of-generation token when the generation ignores them.
//!
//! The reported log-probabilities are those of the adjusted logits: the distribution the token
//! was drawn from, before temperature.

use std::collections::BTreeMap;

use crate::TokenId;

/// Most `logit_bias` entries a generation may carry; OpenAI's API allows 300 too.
pub const LOGIT_BIAS_ENTRIES_MAX: usize = 300;

/// Largest magnitude of one `logit_bias` entry (OpenAI's range is [-100, 100]).
pub const LOGIT_BIAS_MAX: f32 = 100.0;

/// The penalty and bias rules of one generation, as the client asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Adjustments {
    /// Subtracted once from every token already in the completion; OpenAI's range is [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the completion; OpenAI's range is [-2, 2].
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens in the prompt or completion;
    /// 1.0 means none.
    pub repetition_penalty: f32,
    /// Added to a token's logit, by token id; at most one entry per token.
    pub logit_bias: Vec<(TokenId, f32)>,
}

impl Default for Adjustments {
    fn default() -> Self {
        Self {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl Adjustments {
    /// Whether these rules leave every logit as it is.
    #[must_use]
    pub fn is_none(&self) -> bool {
        self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.logit_bias.iter().all(|&(_, bias)| bias == 0.0)
    }

    fn penalises(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }

    /// Why these rules cannot be used with a vocabulary of `vocab_size`, if they cannot: every
    /// number finite, the repetition penalty positive, the bias within bounds and for tokens of
    /// the vocabulary.
    #[must_use]
    pub fn problem(&self, vocab_size: usize) -> Option<String> {
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Some("presence and frequency penalties must be finite".to_string());
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Some("the repetition penalty must be a positive number".to_string());
        }
        if self.logit_bias.len() > LOGIT_BIAS_ENTRIES_MAX {
            return Some(format!(
                "{} logit_bias entries; at most {LOGIT_BIAS_ENTRIES_MAX}",
                self.logit_bias.len()
            ));
        }
        for &(token, bias) in &self.logit_bias {
            if usize::try_from(token).map_or(true, |index| index >= vocab_size) {
                return Some(format!(
                    "logit_bias names token {token}, outside the vocabulary of {vocab_size}"
                ));
            }
            if !(bias.is_finite() && bias.abs() <= LOGIT_BIAS_MAX) {
                return Some(format!(
                    "logit_bias for token {token} is {bias}; it must be in [-100, 100]"
                ));
            }
        }
        None
    }
}

/// One generation's rules and what they depend on: which tokens the prompt holds and how often
/// each token occurs in the completion so far.
#[derive(Debug)]
pub(crate) struct Penalised {
    rules: Adjustments,
    /// Tokens of the prompt, for the repetition penalty; empty when there is none.
    prompt: Vec<TokenId>,
    /// Occurrences of each token in the completion so far.
    completion: BTreeMap<TokenId, u32>,
    ignore_eos: bool,
}

impl Penalised {
    /// The state after `prompt` and the completion tokens `committed`.
    pub fn new(
        rules: Adjustments,
        ignore_eos: bool,
        prompt: &[TokenId],
        committed: &[TokenId],
    ) -> Self {
        let prompt = if rules.repetition_penalty == 1.0 {
            Vec::new()
        } else {
            let mut tokens = prompt.to_vec();
            tokens.sort_unstable();
            tokens.dedup();
            tokens
        };
        let mut state = Self {
            rules,
            prompt,
            completion: BTreeMap::new(),
            ignore_eos,
        };
        for &token in committed {
            state.record(token);
        }
        state
    }

    /// Whether the logits are used as the model gave them.
    pub fn is_identity(&self) -> bool {
        !self.ignore_eos && self.rules.is_none()
    }

    /// Counts `token` as the completion's next token.
    pub fn record(&mut self, token: TokenId) {
        if self.rules.penalises() {
            *self.completion.entry(token).or_insert(0) += 1;
        }
    }

    /// Writes the adjusted `raw` logits into `adjusted`.
    pub fn apply(&self, raw: &[f32], end_of_generation: &[TokenId], adjusted: &mut Vec<f32>) {
        adjusted.clear();
        adjusted.extend_from_slice(raw);
        let repetition = self.rules.repetition_penalty;
        if repetition != 1.0 {
            let seen = self.prompt.iter().copied().chain(
                self.completion
                    .keys()
                    .copied()
                    .filter(|token| self.prompt.binary_search(token).is_err()),
            );
            for token in seen {
                if let Some(logit) = logit_mut(adjusted, token) {
                    *logit = if *logit > 0.0 {
                        *logit / repetition
                    } else {
                        *logit * repetition
                    };
                }
            }
        }
        let (presence, frequency) = (self.rules.presence_penalty, self.rules.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&token, &count) in &self.completion {
                if let Some(logit) = logit_mut(adjusted, token) {
                    // Narrowing: a count is at most a context's length, exact in an f32.
                    *logit = *logit - count as f32 * frequency - presence;
                }
            }
        }
        for &(token, bias) in &self.rules.logit_bias {
            if let Some(logit) = logit_mut(adjusted, token) {
                *logit += bias;
            }
        }
        if self.ignore_eos {
            for &token in end_of_generation {
                if let Some(logit) = logit_mut(adjusted, token) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }
}

fn logit_mut(logits: &mut [f32], token: TokenId) -> Option<&mut f32> {
    usize::try_from(token)
        .ok()
        .and_then(|index| logits.get_mut(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(presence: f32, frequency: f32, repetition: f32) -> Adjustments {
        Adjustments {
            presence_penalty: presence,
            frequency_penalty: frequency,
            repetition_penalty: repetition,
            logit_bias: Vec::new(),
        }
    }

    fn adjusted(state: &Penalised, raw: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        state.apply(raw, &[3], &mut out);
        out
    }

    #[test]
    fn frequency_counts_each_occurrence_and_presence_counts_once() {
        let state = Penalised::new(rules(0.5, 0.25, 1.0), false, &[0, 1], &[2, 2, 1]);
        let out = adjusted(&state, &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(
            out,
            vec![1.0, 1.0 - 0.25 - 0.5, 1.0 - 2.0 * 0.25 - 0.5, 1.0]
        );
    }

    #[test]
    fn repetition_divides_positive_and_multiplies_negative_logits_of_prompt_and_completion() {
        let state = Penalised::new(rules(0.0, 0.0, 2.0), false, &[0, 0], &[1]);
        let out = adjusted(&state, &[4.0, -4.0, 4.0, -4.0]);
        assert_eq!(out, vec![2.0, -8.0, 4.0, -4.0]);
    }

    #[test]
    fn bias_is_added_and_ignored_eos_is_masked_after_it() {
        let mut rules = rules(0.0, 0.0, 1.0);
        rules.logit_bias = vec![(0, -100.0), (3, 50.0)];
        let state = Penalised::new(rules, true, &[], &[]);
        let out = adjusted(&state, &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(out, vec![-99.0, 1.0, 1.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn a_resumed_state_is_the_state_of_the_tokens_recorded_one_by_one() {
        let committed = [5, 1, 5, 7, 5, 2];
        let rules = rules(0.3, 0.7, 1.3);
        let resumed = Penalised::new(rules.clone(), false, &[1, 9], &committed);
        let mut live = Penalised::new(rules, false, &[1, 9], &[]);
        for &token in &committed {
            live.record(token);
        }
        let raw: Vec<f32> = (0..10).map(|i| i as f32 * 0.37 - 1.5).collect();
        assert_eq!(adjusted(&resumed, &raw), adjusted(&live, &raw));
    }

    #[test]
    fn rules_naming_tokens_outside_the_vocabulary_or_out_of_range_have_a_problem() {
        let mut bad = Adjustments {
            logit_bias: vec![(10, 1.0)],
            ..Adjustments::default()
        };
        assert!(bad.problem(10).is_some());
        bad.logit_bias = vec![(9, 101.0)];
        assert!(bad.problem(10).is_some());
        bad.logit_bias = vec![(9, -100.0)];
        assert_eq!(bad.problem(10), None);
        let nan = rules(f32::NAN, 0.0, 1.0);
        assert!(nan.problem(10).is_some());
        assert!(rules(0.0, 0.0, 0.0).problem(10).is_some());
    }
}
