//! KV checkpoints from other nodes, honest and hostile, with the real SmolLM2 model: an honest
//! one loads and changes nothing; a hostile one (cells at impossible positions, cut short, made
//! for other tokens) is refused, changes nothing either, and leaves the engine healthy; and cells
//! loaded from a checkpoint never reach another generation.

mod common;

use std::sync::Arc;

use common::*;
use engine::{Engine, Generation, SamplingParams, SequenceCheckpoint, TokenId};

const QUESTION: &str = "Tell me a story about a robot who learns to paint. Make it about a \
                        lighthouse keeper, a storm and a lost cat, and end it with a lesson \
                        about patience.";

/// Tokens generated in each run, and how many of them a resumed run is handed as committed.
const MAX_TOKENS: u32 = 24;
const COMMITTED: usize = 8;

/// A sampled generation with alternatives, so that logprobs are compared too.
fn story(engine: &Engine) -> Generation {
    let mut story = generation(chat_prompt(engine, QUESTION), sampled(0.8, 11), MAX_TOKENS);
    story.top_logprobs = 2;
    story
}

/// `generation` resumed after the first [`COMMITTED`] tokens of `full`, with `restore`.
fn resumed(
    generation: &Generation,
    full: &Outcome,
    restore: Option<SequenceCheckpoint>,
) -> Generation {
    let mut resumed = generation.clone();
    resumed.committed = full.token_ids()[..COMMITTED].to_vec();
    resumed.restore = restore.map(Arc::new);
    resumed
}

/// The checkpoint an honest engine reports for `generation`'s prompt, and its outcome.
fn exported(generation: &Generation) -> (SequenceCheckpoint, Outcome) {
    let node = start(1, 512);
    let mut reported = generation.clone();
    reported.export_checkpoint = true;
    let mut outcome = run(&node, reported);
    let checkpoint = outcome
        .checkpoint
        .take()
        .expect("a checkpoint was asked for");
    assert_eq!(checkpoint.tokens as usize, generation.prompt.len());
    (checkpoint, outcome)
}

/// One token event as bits: position, token, logprob, alternatives.
type TokenBits = (u32, TokenId, u32, Vec<(TokenId, u32)>);

/// Same tokens and the same logprob bits, position for position.
fn assert_same_tokens(got: &[engine::TokenEvent], expected: &[engine::TokenEvent], what: &str) {
    let bits = |events: &[engine::TokenEvent]| -> Vec<TokenBits> {
        events
            .iter()
            .map(|event| {
                let top = event
                    .top_logprobs
                    .iter()
                    .map(|top| (top.token, top.logprob.to_bits()))
                    .collect();
                (event.position, event.token, event.logprob.to_bits(), top)
            })
            .collect()
    };
    assert_eq!(bits(got), bits(expected), "{what}");
}

/// Rewrites the position of every cell of a checkpoint (the section starts with `u32 cell_count`,
/// then per cell `i32 pos, u32 n_seq_id, i32 seq_id`).
fn with_positions(checkpoint: &SequenceCheckpoint, position: impl Fn(usize) -> i32) -> Vec<u8> {
    let mut data = checkpoint.data.clone();
    for cell in 0..checkpoint.tokens as usize {
        let at = 4 + cell * 12;
        data[at..at + 4].copy_from_slice(&position(cell).to_ne_bytes());
    }
    data
}

/// `prompt` with the tokens in `range` replaced by another token: a context of the same length.
fn other_context(
    engine: &Engine,
    prompt: &[TokenId],
    range: std::ops::Range<usize>,
) -> Vec<TokenId> {
    let one = engine.tokenizer().tokenize("1", false).expect("tokenize")[0];
    let mut other = prompt.to_vec();
    for token in &mut other[range] {
        assert_ne!(*token, one);
        *token = one;
    }
    other
}

/// An honest checkpoint loads on another engine, without a committed token after it or with
/// some, and the generation is the one that engine gives without it, bit for bit.
#[test]
fn an_honest_checkpoint_loads_and_changes_nothing() {
    let second_node = start(1, 512);
    let asked = story(&second_node);
    let (checkpoint, full) = exported(&asked);
    assert_eq!(full.tokens.len(), MAX_TOKENS as usize, "{:?}", full.text());

    let mut fresh = asked.clone();
    fresh.restore = Some(Arc::new(checkpoint.clone()));
    let restored = run(&second_node, fresh);
    assert!(restored.done.prompt_restored, "the checkpoint was not used");
    assert!(!restored.done.checkpoint_rejected);
    assert_same_tokens(
        &restored.tokens,
        &full.tokens,
        "restored without committed tokens",
    );

    let tail = run(&second_node, resumed(&asked, &full, Some(checkpoint)));
    assert!(tail.done.prompt_restored);
    assert_same_tokens(
        &tail.tokens,
        &full.tokens[COMMITTED..],
        "restored and resumed",
    );
}

/// Cells loaded from a checkpoint are another node's work: when their generation ends they are
/// dropped, so the next prompt with the same head prefills it (nothing reused) and gets exactly
/// the answer a fresh engine gives. Cells this engine prefilled itself are still reused.
#[test]
fn cells_restored_from_a_checkpoint_are_never_reused_by_the_next_generation() {
    let node = start(1, 512);
    let asked = story(&node);
    let (checkpoint, full) = exported(&asked);

    let tail = run(&node, resumed(&asked, &full, Some(checkpoint)));
    assert!(tail.done.prompt_restored, "the checkpoint was not used");
    let next = run(&node, asked.clone());
    assert_eq!(
        next.done.prompt_reused, 0,
        "the next generation reused cells that came from a checkpoint"
    );
    assert_same_tokens(&next.tokens, &full.tokens, "after a restored generation");
    let again = run(&node, asked.clone());
    assert_eq!(
        again.done.prompt_reused as usize,
        asked.prompt.len() - 2,
        "cells prefilled here are reused as before"
    );
    assert_same_tokens(&again.tokens, &full.tokens, "reusing its own cells");
}

/// Hostile checkpoints, each well sized: cells at position 0x7fffffff (which llama.cpp cannot
/// remove again), cells shifted to start at -1, a checkpoint cut in half, and an honest engine's
/// checkpoint of another context of the same length. Each is refused, the generation gives
/// exactly the tokens it gives without a checkpoint, and the engine serves the generations
/// after it as a fresh one does.
#[test]
fn a_hostile_checkpoint_is_refused_changes_nothing_and_leaves_the_engine_healthy() {
    let node = start(1, 512);
    let asked = story(&node);
    let (honest, full) = exported(&asked);
    let prompt = &asked.prompt;
    let tail_start = prompt.len() - 12;
    let mut other = asked.clone();
    other.prompt = other_context(&node, prompt, tail_start..prompt.len() - 6);
    let (foreign, _) = exported(&other);
    let other_question = generation(
        chat_prompt(&node, "Name three colours."),
        SamplingParams::greedy(),
        12,
    );
    let fresh = start(1, 512);
    let other_reference = run(&fresh, other_question.clone());
    drop(fresh);

    let shaped = |data: Vec<u8>| SequenceCheckpoint {
        tokens: honest.tokens,
        data,
    };
    let mut truncated = honest.data.clone();
    truncated.truncate(truncated.len() / 2);
    let hostile = [
        (
            "positions 0x7fffffff",
            shaped(with_positions(&honest, |_| i32::MAX)),
        ),
        (
            "positions from -1",
            shaped(with_positions(&honest, |cell| cell as i32 - 1)),
        ),
        ("truncated", shaped(truncated)),
        ("another context", foreign),
    ];
    for (what, checkpoint) in hostile {
        let tail = run(&node, resumed(&asked, &full, Some(checkpoint)));
        assert!(!tail.done.prompt_restored, "{what}: loaded");
        assert!(tail.done.checkpoint_rejected, "{what}: not reported");
        assert_same_tokens(&tail.tokens, &full.tokens[COMMITTED..], what);
        // The engine is healthy: the same prompt from scratch, and another one.
        let again = run(&node, resumed(&asked, &full, None));
        assert_same_tokens(&again.tokens, &full.tokens[COMMITTED..], what);
        let other_answer = run(&node, other_question.clone());
        assert_same_tokens(&other_answer.tokens, &other_reference.tokens, what);
    }
}
