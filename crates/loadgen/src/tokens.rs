//! The load generator's stand-in for a model: every token is a pure function of the assignment's
//! seed and the token's position, so a generation moved to another simulated vehicle (which gets
//! the committed tokens and continues at the next position) goes on exactly as it would have.

use std::time::{Duration, Instant};

use agent::{Execution, Executor, GenerationTask};
use proto::agent_message::Kind as AgentKind;
use proto::AgentMessage;

/// Tokens per second one simulated generation emits unless configured: about a small model on a
/// car's computer.
pub const TOKENS_PER_SECOND_DEFAULT: f64 = 20.0;

/// The fastest rate a simulated generation may be given; above it the generator would be measuring
/// its own timer, not the cell.
pub const TOKENS_PER_SECOND_MAX: f64 = 10_000.0;

/// The slowest rate: a generation must end within a bounded time.
pub const TOKENS_PER_SECOND_MIN: f64 = 0.1;

/// The vocabulary tokens are drawn from unless configured (SmolLM2's); it must match the model
/// the cell serves, whose vocabulary bounds every token id a node sends.
pub const VOCAB_SIZE_DEFAULT: u32 = 49_152;

/// The lowest logprob a simulated token gets; every one is finite and at most zero, as the cell
/// checks.
const LOGPROB_MIN: f32 = -8.0;

/// How a simulated vehicle "generates".
#[derive(Clone, Debug)]
pub struct TokenSource {
    /// The model it claims to serve (lowercase hex SHA-256); other assignments are refused as
    /// retryable elsewhere, as a vehicle without the model does.
    pub model_digest: String,
    pub model_name: String,
    pub vocab_size: u32,
    /// Clamped to `[TOKENS_PER_SECOND_MIN, TOKENS_PER_SECOND_MAX]`.
    pub tokens_per_second: f64,
}

impl TokenSource {
    pub fn new(model_name: impl Into<String>, model_digest: impl Into<String>) -> TokenSource {
        TokenSource {
            model_digest: model_digest.into(),
            model_name: model_name.into(),
            vocab_size: VOCAB_SIZE_DEFAULT,
            tokens_per_second: TOKENS_PER_SECOND_DEFAULT,
        }
    }

    fn token_interval(&self) -> Duration {
        let rate = if self.tokens_per_second.is_nan() {
            TOKENS_PER_SECOND_DEFAULT
        } else {
            self.tokens_per_second
                .clamp(TOKENS_PER_SECOND_MIN, TOKENS_PER_SECOND_MAX)
        };
        Duration::from_secs_f64(1.0 / rate)
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed hash of one word.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn draw(seed: u64, position: u32, salt: u64) -> u64 {
    mix(mix(seed ^ salt).wrapping_add(u64::from(position)))
}

/// The token at `position` of a generation with this sampling `seed`: the same on every simulated
/// vehicle, whichever ran the positions before it. `vocab_size` 0 counts as 1.
pub fn token_at(seed: u64, position: u32, vocab_size: u32) -> i32 {
    let id = draw(seed, position, 0) % u64::from(vocab_size.max(1));
    // Below `vocab_size`, a u32, so it fits; the fallback is never taken.
    i32::try_from(id).unwrap_or(0)
}

/// The logprob reported for the token at `position`: finite, in `[LOGPROB_MIN, 0]`.
pub fn logprob_at(seed: u64, position: u32) -> f32 {
    let fraction = (draw(seed, position, 1) % 1_000) as f32 / 1_000.0;
    LOGPROB_MIN * fraction
}

/// One token as a vehicle reports it, with `alternatives` alternatives (the chosen one first).
fn token(seed: u64, position: u32, vocab_size: u32, alternatives: u32) -> proto::Token {
    let token_id = token_at(seed, position, vocab_size);
    let logprob = logprob_at(seed, position);
    let top_logprobs = (0..alternatives)
        .map(|rank| proto::TokenLogprob {
            token_id: alternative(token_id, rank, vocab_size),
            piece: Vec::new(),
            logprob: logprob + LOGPROB_MIN * rank as f32,
        })
        .collect();
    proto::Token {
        position,
        token_id,
        // The cell detokenizes committed ids itself; a node's piece never reaches a client.
        piece: Vec::new(),
        logprob,
        top_logprobs,
    }
}

fn alternative(token_id: i32, rank: u32, vocab_size: u32) -> i32 {
    let vocab = i64::from(vocab_size.max(1));
    let id = (i64::from(token_id) + i64::from(rank)).rem_euclid(vocab);
    i32::try_from(id).unwrap_or(0)
}

impl Executor for TokenSource {
    fn execute(&self, assign: proto::Assign, task: GenerationTask) -> Execution {
        let source = self.clone();
        Box::pin(async move { source.generate(assign, task).await })
    }
}

impl TokenSource {
    /// Emits the assignment's tokens, one per `token_interval`, from the position after the
    /// committed ones up to `max_tokens`, then reports `Length` (or `Cancelled` when asked).
    async fn generate(self, assign: proto::Assign, task: GenerationTask) {
        if !assign.model_sha256.eq_ignore_ascii_case(&self.model_digest) {
            let message = format!(
                "this load generator serves only {}, not {}; try another node",
                self.model_digest, assign.model_sha256
            );
            return task.fail(message, true).await;
        }
        let started = Instant::now();
        let seed = assign.sampling.as_ref().map_or(0, |sampling| sampling.seed);
        let first = u32::try_from(assign.committed_tokens.len()).unwrap_or(u32::MAX);
        let interval = self.token_interval();
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut position = first;
        let reason = loop {
            if position >= assign.max_tokens {
                break proto::FinishReason::Length;
            }
            tokio::select! {
                biased;
                () = task.cancelled().cancelled() => break proto::FinishReason::Cancelled,
                _ = ticks.tick() => {}
            }
            let batch = AgentMessage {
                kind: Some(AgentKind::Tokens(proto::TokenBatch {
                    generation_id: task.id().to_owned(),
                    tokens: vec![token(seed, position, self.vocab_size, assign.top_logprobs)],
                })),
            };
            if !task.send(batch).await {
                // The session is gone; nobody to report to.
                return;
            }
            position += 1;
        };
        let done = proto::GenerationDone {
            generation_id: task.id().to_owned(),
            reason: reason.into(),
            prompt_tokens: u32::try_from(assign.prompt_tokens.len()).unwrap_or(u32::MAX),
            completion_tokens: position,
            compute_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            prompt_reused_tokens: 0,
            checkpoint_rejected: false,
        };
        task.send_done(done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_depend_only_on_seed_and_position() {
        let run: Vec<i32> = (0..200).map(|p| token_at(7, p, 1000)).collect();
        let again: Vec<i32> = (0..200).map(|p| token_at(7, p, 1000)).collect();
        assert_eq!(run, again);
        let other_seed: Vec<i32> = (0..200).map(|p| token_at(8, p, 1000)).collect();
        assert_ne!(run, other_seed);
        assert!(run.iter().all(|&t| (0..1000).contains(&t)));
        // Not a constant: a real stream of ids.
        assert!(run.iter().collect::<std::collections::HashSet<_>>().len() > 100);
    }

    #[test]
    fn logprobs_are_finite_and_not_above_zero() {
        for position in 0..10_000 {
            let logprob = logprob_at(3, position);
            assert!(logprob.is_finite() && (LOGPROB_MIN..=0.0).contains(&logprob));
        }
    }

    #[test]
    fn alternatives_are_as_many_as_asked_inside_the_vocabulary_and_ordered() {
        let token = token(1, 5, 10, 4);
        assert_eq!(token.top_logprobs.len(), 4);
        assert_eq!(token.top_logprobs[0].token_id, token.token_id);
        for pair in token.top_logprobs.windows(2) {
            assert!(pair[1].logprob < pair[0].logprob);
        }
        assert!(token
            .top_logprobs
            .iter()
            .all(|alt| (0..10).contains(&alt.token_id)));
    }

    #[test]
    fn rates_are_bounded() {
        let mut source = TokenSource::new("m", "00");
        source.tokens_per_second = 0.0;
        assert_eq!(source.token_interval(), Duration::from_secs(10));
        source.tokens_per_second = f64::INFINITY;
        assert_eq!(source.token_interval(), Duration::from_micros(100));
        source.tokens_per_second = f64::NAN;
        assert_eq!(source.token_interval(), Duration::from_millis(50));
    }
}
