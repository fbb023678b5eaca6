//! The incremental scorer of a streamed cascade: fed the edge model's tokens
//! one by one, it says when text may reach the client, when to escalate the
//! whole request, and when to hand a generation over mid-way.
//!
//! The life of one generation:
//!
//! 1. **Hold-back.** The first `holdback_tokens` tokens are held. A collapse
//!    inside them (the last [`WINDOW_TOKENS`] tokens' mean below
//!    `collapse_window_mean`) escalates at once. When the hold-back fills,
//!    the prefix is judged with the class's accept rule: below it, escalate;
//!    otherwise streaming starts.
//! 2. **Streaming.** A token is releasable once `release_lag_tokens` newer
//!    tokens have been seen. A collapse now is a handoff: the gateway keeps
//!    exactly the released tokens (the client has them) and the cloud model
//!    continues from their text; the unreleased tail is dropped.
//! 3. **Finish.** An answer that ended inside the hold-back is judged whole,
//!    exactly as [`crate::Router::judge`] would; a streamed one is released
//!    in full.
//!
//! Whatever the scorer says, no token it did not declare releasable is ever
//! part of what the client keeps: `keep_tokens` of a handoff is at most the
//! releasable count, and an escalation happens only while nothing is released.

use crate::confidence::{ScoreAccumulator, TokenLogprob, WINDOW_TOKENS};
use crate::config::{AcceptRule, IncrementalConfig};
use crate::router::{judge_scores, Judgement};

/// What to do after a token.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Keep going; send the client every token up to
    /// [`IncrementalScorer::releasable_tokens`].
    Continue,
    /// Discard the edge answer (none of it was released) and serve the request in the cloud.
    Escalate { reason: String },
    /// Keep the first `keep_tokens` edge tokens (all released), drop the rest,
    /// and let the cloud model continue from their text.
    Handoff { keep_tokens: u32, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Holding,
    Streaming,
    /// Escalated, handed off or finished: the final step, repeated.
    Done(Step),
}

#[derive(Debug, Clone)]
pub struct IncrementalScorer {
    rule: AcceptRule,
    config: IncrementalConfig,
    accumulator: ScoreAccumulator,
    released: u32,
    phase: Phase,
}

impl IncrementalScorer {
    pub fn new(rule: AcceptRule, config: IncrementalConfig) -> IncrementalScorer {
        IncrementalScorer {
            rule,
            config,
            accumulator: ScoreAccumulator::default(),
            released: 0,
            phase: Phase::Holding,
        }
    }

    /// Tokens seen so far.
    pub fn seen_tokens(&self) -> u32 {
        self.accumulator.count()
    }

    /// How many tokens, from the first, may have been sent to the client.
    /// Never decreases.
    pub fn releasable_tokens(&self) -> u32 {
        self.released
    }

    /// Feeds the next committed edge token.
    pub fn push(&mut self, token: &TokenLogprob) -> Step {
        if let Phase::Done(step) = &self.phase {
            return step.clone();
        }
        self.accumulator.push(token);
        let seen = self.accumulator.count();
        let collapsed = seen as usize >= WINDOW_TOKENS
            && self.accumulator.window_mean() < self.config.collapse_window_mean;
        match self.phase {
            Phase::Holding => {
                if collapsed {
                    return self.end(Step::Escalate {
                        reason: self.collapse_reason(seen),
                    });
                }
                if seen < self.config.holdback_tokens {
                    return Step::Continue;
                }
                let judgement = judge_scores(&self.rule, &self.accumulator.scores());
                if let Judgement::Escalate { reason } = judgement {
                    return self.end(Step::Escalate {
                        reason: format!("first {seen} tokens: {reason}"),
                    });
                }
                self.phase = Phase::Streaming;
                self.release_lagged(seen);
                Step::Continue
            }
            Phase::Streaming => {
                if collapsed {
                    return self.end(Step::Handoff {
                        keep_tokens: self.released,
                        reason: self.collapse_reason(seen),
                    });
                }
                self.release_lagged(seen);
                Step::Continue
            }
            Phase::Done(_) => unreachable!("handled above"),
        }
    }

    /// The edge generation ended: judges an answer still held back, and
    /// releases the rest of a streamed one.
    pub fn finish(&mut self) -> Step {
        if let Phase::Done(step) = &self.phase {
            return step.clone();
        }
        let seen = self.accumulator.count();
        if self.phase == Phase::Holding {
            let judgement = judge_scores(&self.rule, &self.accumulator.scores());
            if let Judgement::Escalate { reason } = judgement {
                return self.end(Step::Escalate { reason });
            }
        }
        self.released = seen;
        self.end(Step::Continue)
    }

    fn release_lagged(&mut self, seen: u32) {
        let releasable = seen.saturating_sub(self.config.release_lag_tokens);
        self.released = self.released.max(releasable);
    }

    fn collapse_reason(&self, seen: u32) -> String {
        format!(
            "confidence collapsed at token {seen}: last {WINDOW_TOKENS} tokens mean logprob {:.3} < {}",
            self.accumulator.window_mean(),
            self.config.collapse_window_mean
        )
    }

    fn end(&mut self, step: Step) -> Step {
        self.phase = Phase::Done(step.clone());
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confidence::ConfidenceScores;
    use crate::ConfidenceFeature;

    fn rule() -> AcceptRule {
        AcceptRule {
            feature: ConfidenceFeature::MeanLogprob,
            threshold: -1.0,
        }
    }

    fn config() -> IncrementalConfig {
        IncrementalConfig {
            holdback_tokens: 16,
            release_lag_tokens: 8,
            collapse_window_mean: -2.5,
        }
    }

    fn token(logprob: f32) -> TokenLogprob {
        TokenLogprob::new(logprob, [])
    }

    #[test]
    fn a_confident_answer_is_held_then_released_with_a_lag() {
        let mut scorer = IncrementalScorer::new(rule(), config());
        for _ in 0..15 {
            assert_eq!(scorer.push(&token(-0.1)), Step::Continue);
            assert_eq!(scorer.releasable_tokens(), 0);
        }
        assert_eq!(scorer.push(&token(-0.1)), Step::Continue);
        assert_eq!(scorer.releasable_tokens(), 8);
        assert_eq!(scorer.push(&token(-0.1)), Step::Continue);
        assert_eq!(scorer.releasable_tokens(), 9);
        assert_eq!(scorer.finish(), Step::Continue);
        assert_eq!(scorer.releasable_tokens(), 17);
    }

    #[test]
    fn an_unsure_prefix_escalates_before_anything_is_released() {
        let mut scorer = IncrementalScorer::new(rule(), config());
        for _ in 0..15 {
            assert_eq!(scorer.push(&token(-1.5)), Step::Continue);
        }
        let step = scorer.push(&token(-1.5));
        assert!(matches!(step, Step::Escalate { .. }), "{step:?}");
        assert_eq!(scorer.releasable_tokens(), 0);
        // Later tokens do not change the verdict.
        assert_eq!(scorer.push(&token(0.0)), step);
        assert_eq!(scorer.finish(), step);
    }

    #[test]
    fn a_collapse_after_release_hands_off_keeping_only_released_tokens() {
        let mut scorer = IncrementalScorer::new(rule(), config());
        for _ in 0..30 {
            assert_eq!(scorer.push(&token(-0.05)), Step::Continue);
        }
        assert_eq!(scorer.releasable_tokens(), 22);
        let mut step = Step::Continue;
        for _ in 0..8 {
            step = scorer.push(&token(-4.0));
            if step != Step::Continue {
                break;
            }
        }
        match step {
            Step::Handoff {
                keep_tokens,
                reason,
            } => {
                assert!(keep_tokens >= 22 && keep_tokens <= scorer.seen_tokens() - 8);
                assert!(reason.contains("collapsed"), "{reason}");
            }
            other => panic!("expected a handoff, got {other:?}"),
        }
    }

    #[test]
    fn a_short_answer_is_judged_whole_like_the_router_does() {
        let logprobs = [-0.2, -1.9, -0.4];
        let tokens: Vec<TokenLogprob> = logprobs.iter().map(|&l| token(l)).collect();
        let whole = judge_scores(&rule(), &ConfidenceScores::of(&tokens));
        let mut scorer = IncrementalScorer::new(rule(), config());
        for token in &tokens {
            assert_eq!(scorer.push(token), Step::Continue);
        }
        let step = scorer.finish();
        assert_eq!(whole.is_accept(), step == Step::Continue);
        assert_eq!(scorer.releasable_tokens(), 3);
    }
}
