//! Admission limits and cancellation with the real SmolLM2 model: queue bounds, prompt length,
//! memory budget, cancel and dropped streams.

mod common;

use std::time::{Duration, Instant};

use common::*;
use engine::{
    Engine, EngineError, FinishReason, Generation, GenerationEvent, GenerationStream,
    SamplingParams,
};

/// A generation long enough that only cancellation ends it within the tests' deadlines.
const LONG_GENERATION_TOKENS: u32 = 1500;

/// A greedy generation long enough to still run while a test acts on it.
fn long_generation(engine: &Engine) -> Generation {
    generation(
        counting_prompt(engine, 40),
        SamplingParams::greedy(),
        LONG_GENERATION_TOKENS,
    )
}

/// Submits a long generation and waits until it produced its first token,
/// so that it holds a slot.
fn start_long_generation(engine: &Engine) -> GenerationStream {
    let mut running = engine.submit(long_generation(engine)).unwrap();
    first_token(&mut running);
    running
}

#[test]
fn a_prompt_that_leaves_no_room_is_refused_at_submit() {
    let engine = start(1, 64);
    let prompt: Vec<i32> = engine
        .tokenizer()
        .tokenize(&"word ".repeat(200), false)
        .unwrap();
    let fits = generation(prompt[..63].to_vec(), SamplingParams::greedy(), 1);
    let too_long = generation(prompt[..64].to_vec(), SamplingParams::greedy(), 1);
    match engine.submit(too_long) {
        Err(EngineError::PromptTooLong {
            prompt_tokens,
            context_tokens,
        }) => {
            assert_eq!((prompt_tokens, context_tokens), (64, 64));
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    // Committed tokens count against the context too.
    let mut resumed = generation(prompt[..40].to_vec(), SamplingParams::greedy(), 100);
    resumed.committed = prompt[40..64].to_vec();
    assert!(matches!(
        engine.submit(resumed),
        Err(EngineError::PromptTooLong { .. })
    ));
    let outcome = run(&engine, fits);
    assert_eq!(outcome.tokens.len(), 1);
}

#[test]
fn unknown_token_ids_and_empty_prompts_are_refused() {
    let engine = start(1, 128);
    let vocab = engine.tokenizer().vocab_size() as i32;
    for prompt in [vec![], vec![1, vocab], vec![-1]] {
        let result = engine.submit(generation(prompt.clone(), SamplingParams::greedy(), 4));
        assert!(
            matches!(result, Err(EngineError::InvalidGeneration(_))),
            "{prompt:?}: {result:?}"
        );
    }
}

#[test]
fn a_model_that_does_not_fit_the_budget_is_refused_before_loading() {
    let mut config = config(4, 2048);
    config.memory_budget_bytes = 64 << 20;
    match Engine::start(config.clone()) {
        Err(EngineError::OverBudget {
            needed_bytes,
            budget_bytes,
        }) => {
            assert_eq!(budget_bytes, 64 << 20);
            // At least the weights file.
            assert!(needed_bytes > std::fs::metadata(&config.model_path).unwrap().len());
        }
        other => panic!("expected OverBudget, got {other:?}"),
    }
    let estimate = engine::estimate_memory(&config).unwrap();
    // SmolLM2-135M: 30 layers, 3 KV heads of 64: 2 × 30 × 8192 cells × 384 × 2 bytes.
    assert_eq!(estimate.kv_cache_bytes, 30 * 8192 * 384 * 2);
    config.memory_budget_bytes = estimate.total_bytes();
    let engine = Engine::start(config).expect("exactly enough budget starts");
    assert_eq!(engine.info().kv_cache_bytes, estimate.kv_cache_bytes);
}

#[test]
fn a_missing_model_file_is_a_load_error() {
    let missing = std::env::temp_dir().join("fleetgrid-engine-no-such-model.gguf");
    let result = Engine::start(engine::EngineConfig::new(missing));
    assert!(
        matches!(result, Err(EngineError::ModelLoad(_))),
        "{result:?}"
    );
}

#[test]
fn submit_answers_busy_when_the_queue_is_full() {
    let mut config = config(1, 2048);
    config.queue_capacity = 1;
    let engine = Engine::start(config).unwrap();
    // Once it has produced a token, it holds the only slot.
    let running = start_long_generation(&engine);
    let queued = engine.submit(long_generation(&engine)).unwrap();
    assert!(matches!(
        engine.submit(long_generation(&engine)),
        Err(EngineError::Busy)
    ));
    running.cancel_handle().cancel();
    queued.cancel_handle().cancel();
}

#[test]
fn cancel_ends_the_generation_and_frees_its_slot_for_the_queue() {
    let engine = start(1, 2048);
    let mut running = start_long_generation(&engine);
    for _ in 0..9 {
        first_token(&mut running);
    }
    let queued = engine
        .submit(generation(
            chat_prompt(&engine, "Hi"),
            SamplingParams::greedy(),
            8,
        ))
        .unwrap();
    running.cancel_handle().cancel();
    let cancelled = collect(running);
    assert_finished(&cancelled, FinishReason::Cancelled);
    assert!(cancelled.done.completion_tokens < LONG_GENERATION_TOKENS);
    let next = collect(queued);
    assert!(matches!(
        next.done.reason,
        FinishReason::Stop | FinishReason::Length
    ));
}

#[test]
fn dropping_the_stream_cancels_the_generation_promptly() {
    let engine = start(1, 2048);
    let running = start_long_generation(&engine);
    let dropped_at = Instant::now();
    drop(running);
    while engine.live_sequences() > 0 {
        assert!(
            dropped_at.elapsed() < Duration::from_secs(5),
            "the dropped generation kept running"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The slot is usable again right away.
    let outcome = run(
        &engine,
        generation(chat_prompt(&engine, "Hi"), SamplingParams::greedy(), 4),
    );
    assert!(!outcome.tokens.is_empty());
}

#[test]
fn a_generation_cancelled_while_queued_never_runs() {
    let engine = start(1, 2048);
    let running = start_long_generation(&engine);
    let mut queued = engine
        .submit(generation(
            chat_prompt(&engine, "Hi"),
            SamplingParams::greedy(),
            8,
        ))
        .unwrap();
    queued.cancel_handle().cancel();
    running.cancel_handle().cancel();
    match next_event(&mut queued) {
        Some(GenerationEvent::Done(done)) => {
            assert_eq!(done.reason, FinishReason::Cancelled);
            assert_eq!(done.completion_tokens, 0);
        }
        other => panic!("expected a cancelled done, got {other:?}"),
    }
}

#[test]
fn a_consumer_that_stops_reading_pauses_its_sequence_without_losing_tokens() {
    let engine = start(2, 512);
    let slow_tokens = 2 * engine::EVENT_CHANNEL_CAPACITY as u32 + 20;
    let mut slow = engine
        .submit(generation(
            counting_prompt(&engine, 40),
            SamplingParams::greedy(),
            slow_tokens,
        ))
        .unwrap();
    first_token(&mut slow);
    // While the slow stream is not read, its channel fills and its sequence pauses; the other
    // sequence is served meanwhile.
    let other = run(
        &engine,
        generation(
            chat_prompt(&engine, "What is 2+2?"),
            SamplingParams::greedy(),
            16,
        ),
    );
    assert!(!other.tokens.is_empty());
    // The unread channel fills to its bound: the engine kept generating for
    // the slow consumer until then, and then stopped sending.
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while slow.events.len() < engine::EVENT_CHANNEL_CAPACITY {
        assert!(
            Instant::now() < deadline,
            "the unread channel holds {} events, never filled to {}",
            slow.events.len(),
            engine::EVENT_CHANNEL_CAPACITY
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        engine.live_sequences(),
        1,
        "the paused sequence keeps its slot"
    );
    let rest = collect(slow);
    assert_finished(&rest, FinishReason::Length);
    let positions: Vec<u32> = rest.tokens.iter().map(|event| event.position).collect();
    assert_eq!(
        positions,
        (1..slow_tokens).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
}

#[test]
fn dropping_the_engine_ends_its_generations() {
    let engine = start(1, 2048);
    let mut running = start_long_generation(&engine);
    drop(engine);
    let mut last = None;
    while let Some(event) = next_event(&mut running) {
        last = Some(event);
    }
    match last {
        Some(GenerationEvent::Done(done)) => assert_eq!(done.reason, FinishReason::Cancelled),
        other => panic!("expected a cancelled done, got {other:?}"),
    }
}
