//! Shared helpers of the engine's integration tests: locating the real test model, starting
//! engines, building chat prompts and draining event streams.
//!
//! These tests need the SmolLM2-135M-Instruct Q4_1 GGUF; `cargo xtask test` fetches it.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use engine::{
    ChatMessage, Engine, EngineConfig, FinishReason, Generation, GenerationDone, GenerationEvent,
    GenerationStream, SamplingParams, SequenceCheckpoint, TokenEvent, TokenId, Verification,
};

pub use engine::testing::test_model_path;

/// Longest a test waits for one event before declaring the engine stuck.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn config(parallel_sequences: u32, context_tokens_per_sequence: u32) -> EngineConfig {
    let mut config = EngineConfig::new(test_model_path());
    config.parallel_sequences = parallel_sequences;
    config.context_tokens_per_sequence = context_tokens_per_sequence;
    config
}

pub fn start(parallel_sequences: u32, context_tokens_per_sequence: u32) -> Engine {
    Engine::start(config(parallel_sequences, context_tokens_per_sequence)).expect("start engine")
}

/// A single-turn chat prompt rendered with the model's template, ready to submit.
pub fn chat_prompt(engine: &Engine, user: &str) -> Vec<TokenId> {
    let text = engine
        .tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", user)], true)
        .expect("render chat template");
    engine.tokenizer().tokenize(&text, true).expect("tokenize")
}

/// A raw-text prompt ("1, 2, ..., up_to,") that the model continues for a long time: it keeps
/// counting and has no reason to end its turn.
pub fn counting_prompt(engine: &Engine, up_to: u32) -> Vec<TokenId> {
    let text = (1..=up_to)
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
        + ",";
    engine.tokenizer().tokenize(&text, true).expect("tokenize")
}

pub fn generation(prompt: Vec<TokenId>, sampling: SamplingParams, max_tokens: u32) -> Generation {
    Generation {
        prompt,
        committed: Vec::new(),
        sampling,
        max_tokens,
        stop: Vec::new(),
        top_logprobs: 0,
        ignore_eos: false,
        adjustments: engine::Adjustments::default(),
        grammar: None,
        restore: None,
        export_checkpoint: false,
        prompt_logprobs: false,
        verify: None,
        draft: Vec::new(),
    }
}

pub fn sampled(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p: 0.95,
        top_k: 40,
        seed,
        min_p: 0.0,
    }
}

/// Everything a finished generation produced.
#[derive(Debug)]
pub struct Outcome {
    /// The checkpoint reported ahead of the tokens, when one was asked for.
    pub checkpoint: Option<SequenceCheckpoint>,
    /// The prompt's scores, reported ahead of the tokens, when they were asked for.
    pub prompt_scores: Option<Vec<TokenEvent>>,
    pub tokens: Vec<TokenEvent>,
    /// What a verification found, reported before `Done`.
    pub verification: Option<Verification>,
    pub done: GenerationDone,
}

impl Outcome {
    pub fn token_ids(&self) -> Vec<TokenId> {
        self.tokens.iter().map(|event| event.token).collect()
    }

    pub fn text(&self) -> String {
        let bytes: Vec<u8> = self
            .tokens
            .iter()
            .flat_map(|event| event.piece.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// [`EVENT_TIMEOUT`], or the seconds `FLEETGRID_TEST_EVENT_TIMEOUT_S` says: an engine built for
/// another architecture and run under emulation is tens of times slower.
pub fn event_timeout() -> Duration {
    std::env::var("FLEETGRID_TEST_EVENT_TIMEOUT_S")
        .ok()
        .and_then(|seconds| seconds.parse().ok())
        .map_or(EVENT_TIMEOUT, Duration::from_secs)
}

/// The next event, waiting at most [`event_timeout`].
pub fn next_event(stream: &mut GenerationStream) -> Option<GenerationEvent> {
    let timeout = event_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        match stream.events.try_recv() {
            Ok(event) => return Some(event),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return None,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no event within {timeout:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Drain a stream to its end; panics on `Failed` or a stream that ends without `Done`.
pub fn collect(mut stream: GenerationStream) -> Outcome {
    let mut tokens = Vec::new();
    let mut checkpoint = None;
    let mut prompt_scores = None;
    let mut verification = None;
    loop {
        match next_event(&mut stream) {
            Some(GenerationEvent::PromptLogprobs(scores)) => {
                assert!(tokens.is_empty(), "prompt scores after tokens");
                assert!(prompt_scores.is_none(), "a second report of prompt scores");
                prompt_scores = Some(scores);
            }
            Some(GenerationEvent::Checkpoint(reported)) => {
                assert!(tokens.is_empty(), "a checkpoint after tokens");
                assert!(checkpoint.is_none(), "a second checkpoint");
                checkpoint = Some(reported);
            }
            Some(GenerationEvent::Token(event)) => tokens.push(event),
            Some(GenerationEvent::Verified(found)) => {
                assert!(tokens.is_empty(), "a verification emitted tokens");
                assert!(verification.is_none(), "a second verification");
                verification = Some(found);
            }
            Some(GenerationEvent::Done(done)) => {
                assert!(next_event(&mut stream).is_none(), "events after done");
                return Outcome {
                    checkpoint,
                    prompt_scores,
                    tokens,
                    verification,
                    done,
                };
            }
            Some(GenerationEvent::Failed(error)) => panic!("generation failed: {error}"),
            None => panic!("stream ended without a final event"),
        }
    }
}

pub fn run(engine: &Engine, generation: Generation) -> Outcome {
    collect(engine.submit(generation).expect("submit"))
}

/// Wait for the first token of a stream (proof that its sequence is live).
pub fn first_token(stream: &mut GenerationStream) -> TokenEvent {
    match next_event(stream) {
        Some(GenerationEvent::Token(event)) => event,
        other => panic!("expected a token, got {other:?}"),
    }
}

pub fn assert_finished(outcome: &Outcome, reason: FinishReason) {
    assert_eq!(outcome.done.reason, reason, "{outcome:?}");
}

/// The same tokens with the same log-probabilities, bit for bit.
pub fn assert_bit_identical(got: &Outcome, expected: &Outcome) {
    assert_eq!(
        got.token_ids(),
        expected.token_ids(),
        "{:?}",
        expected.text()
    );
    for (got, expected) in got.tokens.iter().zip(&expected.tokens) {
        assert_eq!(
            got.logprob.to_bits(),
            expected.logprob.to_bits(),
            "{got:?} vs {expected:?}"
        );
    }
}

/// Every generation submitted at once, then each drained: the engine batches them.
pub fn run_all(engine: &Engine, generations: Vec<Generation>) -> Vec<Outcome> {
    let streams: Vec<_> = generations
        .into_iter()
        .map(|generation| engine.submit(generation).expect("submit"))
        .collect();
    streams.into_iter().map(collect).collect()
}

/// Runs each generation alone, then all of them submitted at once (prefilled together, decoded
/// side by side): each answer together is bit for bit its answer alone.
pub fn assert_together_as_alone(engine: &Engine, generations: &[Generation]) {
    let alone: Vec<_> = generations
        .iter()
        .map(|generation| run(engine, generation.clone()))
        .collect();
    for (together, alone) in run_all(engine, generations.to_vec()).iter().zip(&alone) {
        assert_bit_identical(together, alone);
    }
}
