//! The same promises as `generation.rs`, on a model of K-quants and Q5_0/Q8_0 weights
//! (Qwen2.5-Coder-0.5B, the local cloud's model and a car's option).
//!
//! llama.cpp has kernels that compute a batch of rows otherwise than one row: repacked weight
//! layouts (four rows or more) and a tiled K-quant multiplication (eight rows or more). With
//! them, a token's numbers depended on how many other rows were computed with it: its
//! neighbours in a decode step, the chunk its prompt was cut into, the cells kept from an
//! earlier prompt. SmolLM2's Q4_1 weights never reach those kernels; these tests hold the
//! engine to the same identity on a model whose weights would.

mod common;

use common::*;
use engine::testing::cloud_test_model_path;
use engine::{Engine, EngineConfig, Generation};

const QUESTIONS: [&str; 8] = [
    "Name three colours.",
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Describe a bicycle to a child.",
    "Explain how a bicycle stays upright.",
    "What should I pack for a week of hiking?",
    "Tell me a story about a robot who learns to paint.",
    "Write a Python function that reverses a string.",
];

fn qwen(parallel_sequences: u32, batch_tokens: u32) -> Engine {
    let mut config = EngineConfig::new(cloud_test_model_path());
    config.parallel_sequences = parallel_sequences;
    config.context_tokens_per_sequence = 512;
    config.batch_tokens = batch_tokens;
    Engine::start(config).expect("start the Qwen engine")
}

fn asked(engine: &Engine, question: &str, seed: u64) -> Generation {
    let mut asked = generation(chat_prompt(engine, question), sampled(0.8, seed), 20);
    asked.top_logprobs = 2;
    asked
}

/// Eight prompts prefilled together and decoded side by side (eight rows in every step, where
/// the tiled kernel would take over): each answer is bit for bit the one it gets alone.
#[test]
fn a_k_quant_models_answers_do_not_depend_on_their_neighbours_in_the_batch() {
    let engine = qwen(8, 512);
    let generations: Vec<_> = QUESTIONS
        .iter()
        .zip(11_u64..)
        .map(|(question, seed)| asked(&engine, question, seed))
        .collect();
    assert_together_as_alone(&engine, &generations);
}

/// A prompt cut into chunks of 5 tokens (each under the kernels' thresholds), the same prompt
/// in one chunk, and the same prompt again on the warm engine (its cells kept, two tokens
/// recomputed): one answer, bit for bit.
#[test]
fn a_k_quant_models_answer_does_not_depend_on_how_its_prompt_was_cut() {
    let whole = qwen(1, 512);
    let chunked = qwen(1, 5);
    let generation = asked(&whole, QUESTIONS[6], 5);
    let reference = run(&whole, generation.clone());
    let again = run(&whole, generation.clone());
    assert_eq!(
        again.done.prompt_reused as usize,
        generation.prompt.len() - 2,
        "the same prompt again keeps all but two of its cells"
    );
    assert_bit_identical(&again, &reference);
    assert_bit_identical(&run(&chunked, generation), &reference);
}
