//! Confidence of an answer from its token log-probabilities.
//!
//! Every score is "higher means more confident", so a threshold always reads
//! "accept when the score is at least this":
//!
//! * `mean_logprob` — the mean natural-log probability of the chosen tokens;
//! * `min_window_mean` — the lowest mean over any [`WINDOW_TOKENS`]
//!   consecutive tokens (the whole answer when it is shorter): a short
//!   stretch of guessing inside an otherwise fluent answer;
//! * `confident_share` — the share of tokens whose probability is at least
//!   10% (one minus the share of low-probability tokens);
//! * `mean_margin` — the mean gap, in log-probability, between the chosen
//!   token and the best alternative from `top_logprobs`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Log-probabilities are clamped to this floor, so that `-inf` and NaN from
/// an engine never poison a mean.
pub const LOGPROB_FLOOR: f32 = -100.0;

/// A token with a log-probability below this (probability below 10%) counts
/// as a low-probability token.
pub const LOW_PROBABILITY_LOGPROB: f32 = -std::f32::consts::LN_10;

/// Tokens in one window of `min_window_mean` and of the incremental scorer's
/// collapse detection.
pub const WINDOW_TOKENS: usize = 8;

/// Without `top_logprobs`, the best alternative is taken as all the
/// remaining probability mass, but never below this probability.
const ALTERNATIVE_PROBABILITY_MIN: f32 = 1e-6;

/// One generated token: its log-probability and that of the most likely
/// other token, when the engine reported alternatives.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub best_alternative: Option<f32>,
}

impl TokenLogprob {
    /// A token and the log-probabilities of alternatives (the chosen token
    /// itself must not be among them).
    pub fn new(logprob: f32, alternatives: impl IntoIterator<Item = f32>) -> TokenLogprob {
        let best_alternative = alternatives
            .into_iter()
            .map(sanitize)
            .fold(None, |best: Option<f32>, value| {
                Some(best.map_or(value, |best| best.max(value)))
            });
        TokenLogprob {
            logprob: sanitize(logprob),
            best_alternative,
        }
    }

    /// A token as OpenAI's `logprobs.content[i]` reports it: the chosen
    /// token's text and log-probability, and `top_logprobs` (which usually
    /// includes the chosen token; its first entry with the same text is left
    /// out of the alternatives).
    pub fn from_top<'a>(
        token: &str,
        logprob: f32,
        top: impl IntoIterator<Item = (&'a str, f32)>,
    ) -> TokenLogprob {
        let mut skipped_self = false;
        let alternatives = top.into_iter().filter_map(|(text, value)| {
            if !skipped_self && text == token {
                skipped_self = true;
                return None;
            }
            Some(value)
        });
        TokenLogprob::new(logprob, alternatives.collect::<Vec<_>>())
    }

    /// Log-probability gap between this token and the best alternative.
    pub fn margin(&self) -> f32 {
        let alternative = self.best_alternative.unwrap_or_else(|| {
            let rest = (1.0 - self.logprob.exp()).max(ALTERNATIVE_PROBABILITY_MIN);
            rest.ln()
        });
        (self.logprob - alternative).clamp(LOGPROB_FLOOR, -LOGPROB_FLOOR)
    }
}

fn sanitize(logprob: f32) -> f32 {
    if logprob.is_nan() {
        return LOGPROB_FLOOR;
    }
    logprob.clamp(LOGPROB_FLOOR, 0.0)
}

/// The confidence scores one threshold can be put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceFeature {
    MeanLogprob,
    MinWindowMean,
    ConfidentShare,
    MeanMargin,
}

impl ConfidenceFeature {
    pub const ALL: [ConfidenceFeature; 4] = [
        ConfidenceFeature::MeanLogprob,
        ConfidenceFeature::MinWindowMean,
        ConfidenceFeature::ConfidentShare,
        ConfidenceFeature::MeanMargin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConfidenceFeature::MeanLogprob => "mean_logprob",
            ConfidenceFeature::MinWindowMean => "min_window_mean",
            ConfidenceFeature::ConfidentShare => "confident_share",
            ConfidenceFeature::MeanMargin => "mean_margin",
        }
    }
}

impl std::fmt::Display for ConfidenceFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scores of a whole answer (or of the part seen so far).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceScores {
    pub tokens: u32,
    pub mean_logprob: f32,
    pub min_window_mean: f32,
    pub confident_share: f32,
    pub mean_margin: f32,
}

impl ConfidenceScores {
    /// The scores of an empty answer: the least confident possible.
    pub const EMPTY: ConfidenceScores = ConfidenceScores {
        tokens: 0,
        mean_logprob: LOGPROB_FLOOR,
        min_window_mean: LOGPROB_FLOOR,
        confident_share: 0.0,
        mean_margin: LOGPROB_FLOOR,
    };

    pub fn of(tokens: &[TokenLogprob]) -> ConfidenceScores {
        let mut accumulator = ScoreAccumulator::default();
        for token in tokens {
            accumulator.push(token);
        }
        accumulator.scores()
    }

    pub fn get(&self, feature: ConfidenceFeature) -> f32 {
        match feature {
            ConfidenceFeature::MeanLogprob => self.mean_logprob,
            ConfidenceFeature::MinWindowMean => self.min_window_mean,
            ConfidenceFeature::ConfidentShare => self.confident_share,
            ConfidenceFeature::MeanMargin => self.mean_margin,
        }
    }
}

/// Running sums behind [`ConfidenceScores`], fed one token at a time; both
/// the whole-answer scores and the incremental scorer use it, so they agree.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScoreAccumulator {
    count: u32,
    logprob_sum: f64,
    margin_sum: f64,
    confident: u32,
    /// The last `WINDOW_TOKENS` log-probabilities (bounded by that constant).
    window: VecDeque<f32>,
    window_sum: f64,
    min_full_window_mean: Option<f32>,
}

impl ScoreAccumulator {
    pub(crate) fn push(&mut self, token: &TokenLogprob) {
        let logprob = sanitize(token.logprob);
        self.count += 1;
        self.logprob_sum += f64::from(logprob);
        self.margin_sum += f64::from(token.margin());
        if logprob >= LOW_PROBABILITY_LOGPROB {
            self.confident += 1;
        }
        self.window.push_back(logprob);
        self.window_sum += f64::from(logprob);
        if self.window.len() > WINDOW_TOKENS {
            if let Some(oldest) = self.window.pop_front() {
                self.window_sum -= f64::from(oldest);
            }
        }
        if self.window.len() == WINDOW_TOKENS {
            let mean = self.window_mean();
            self.min_full_window_mean = Some(
                self.min_full_window_mean
                    .map_or(mean, |minimum| minimum.min(mean)),
            );
        }
    }

    /// The mean over the last window (fewer tokens at the start).
    pub(crate) fn window_mean(&self) -> f32 {
        if self.window.is_empty() {
            return LOGPROB_FLOOR;
        }
        (self.window_sum / self.window.len() as f64) as f32
    }

    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn scores(&self) -> ConfidenceScores {
        if self.count == 0 {
            return ConfidenceScores::EMPTY;
        }
        let count = f64::from(self.count);
        let mean_logprob = (self.logprob_sum / count) as f32;
        ConfidenceScores {
            tokens: self.count,
            mean_logprob,
            min_window_mean: self.min_full_window_mean.unwrap_or(mean_logprob),
            confident_share: (f64::from(self.confident) / count) as f32,
            mean_margin: (self.margin_sum / count) as f32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(logprobs: &[f32]) -> Vec<TokenLogprob> {
        logprobs
            .iter()
            .map(|&logprob| TokenLogprob::new(logprob, [LOGPROB_FLOOR]))
            .collect()
    }

    #[test]
    fn scores_of_a_confident_answer() {
        let scores = ConfidenceScores::of(&tokens(&[-0.1, -0.2, -0.3]));
        assert_eq!(scores.tokens, 3);
        assert!((scores.mean_logprob - -0.2).abs() < 1e-6);
        // Shorter than a window: the window minimum is the mean.
        assert!((scores.min_window_mean - -0.2).abs() < 1e-6);
        assert_eq!(scores.confident_share, 1.0);
    }

    #[test]
    fn a_short_stretch_of_guessing_shows_in_the_window_minimum_not_the_mean() {
        let mut logprobs = vec![-0.05; 40];
        logprobs[20..28].copy_from_slice(&[-3.0; 8]);
        let scores = ConfidenceScores::of(&tokens(&logprobs));
        assert!((scores.min_window_mean - -3.0).abs() < 1e-5);
        assert!(scores.mean_logprob > -0.7);
        assert!((scores.confident_share - 32.0 / 40.0).abs() < 1e-6);
    }

    #[test]
    fn margin_uses_the_best_alternative_that_is_not_the_token_itself() {
        let token = TokenLogprob::from_top(
            " Paris",
            -0.1,
            [(" Paris", -0.1), (" Lyon", -2.5), (" Nice", -3.0)],
        );
        assert_eq!(token.best_alternative, Some(-2.5));
        assert!((token.margin() - 2.4).abs() < 1e-6);
        // A token that was not the most likely one has a negative margin.
        let unlikely = TokenLogprob::from_top(" Lyon", -2.5, [(" Paris", -0.1), (" Lyon", -2.5)]);
        assert!(unlikely.margin() < 0.0);
    }

    #[test]
    fn margin_without_alternatives_uses_the_remaining_mass() {
        // p = 0.5, the rest is 0.5: a margin of zero.
        let even = TokenLogprob::new((0.5f32).ln(), []);
        assert!(even.margin().abs() < 1e-6);
        let certain = TokenLogprob::new(0.0, []);
        assert!(certain.margin() > 13.0);
    }

    #[test]
    fn infinite_and_nan_logprobs_are_clamped() {
        let scores = ConfidenceScores::of(&[
            TokenLogprob::new(f32::NEG_INFINITY, [f32::NAN]),
            TokenLogprob::new(f32::NAN, []),
        ]);
        assert!(scores.mean_logprob.is_finite());
        assert_eq!(scores.mean_logprob, LOGPROB_FLOOR);
        assert!(scores.mean_margin.is_finite());
        assert_eq!(ConfidenceScores::of(&[]), ConfidenceScores::EMPTY);
    }
}
