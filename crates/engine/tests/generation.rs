//! End-to-end generation with the real SmolLM2 model: determinism, batching, resumption,
//! sampling, log-probabilities, stops and lengths.

mod common;

use common::*;
use engine::{FinishReason, Generation, SamplingParams};

#[test]
fn greedy_chat_answer_is_sensible_and_identical_across_runs() {
    let engine = start(1, 512);
    let prompt = chat_prompt(&engine, "What is the capital of France?");
    let first = run(
        &engine,
        generation(prompt.clone(), SamplingParams::greedy(), 48),
    );
    let second = run(&engine, generation(prompt, SamplingParams::greedy(), 48));
    let text = first.text();
    assert!(text.contains("Paris"), "unexpected answer: {text:?}");
    assert_eq!(first.token_ids(), second.token_ids());
    assert_eq!(first.done.completion_tokens as usize, first.tokens.len());
    let positions: Vec<u32> = first.tokens.iter().map(|event| event.position).collect();
    assert_eq!(
        positions,
        (0..first.tokens.len() as u32).collect::<Vec<_>>()
    );
}

#[test]
fn concurrent_sequences_produce_what_each_produces_alone() {
    let engine = start(3, 512);
    let prompts = [
        chat_prompt(&engine, "Name three colours."),
        chat_prompt(&engine, "Write a short poem about the sea."),
        counting_prompt(&engine, 40),
    ];
    let alone: Vec<Vec<i32>> = prompts
        .iter()
        .map(|prompt| {
            run(
                &engine,
                generation(prompt.clone(), SamplingParams::greedy(), 40),
            )
            .token_ids()
        })
        .collect();
    // Start the first sequence alone, then let the others join while it decodes, so their
    // prompt chunks share decode batches with its tokens.
    let mut first = engine
        .submit(generation(prompts[0].clone(), SamplingParams::greedy(), 40))
        .unwrap();
    let head = first_token(&mut first);
    let others: Vec<_> = prompts[1..]
        .iter()
        .map(|prompt| {
            engine
                .submit(generation(prompt.clone(), SamplingParams::greedy(), 40))
                .unwrap()
        })
        .collect();
    let mut together = vec![std::iter::once(head.token)
        .chain(collect(first).token_ids())
        .collect::<Vec<_>>()];
    together.extend(others.into_iter().map(|stream| collect(stream).token_ids()));
    assert_eq!(together, alone);
}

/// Prompts that arrive together are prefilled together (one llama.cpp call, equal chunks); each
/// answer is still the one it gets alone, token for token and number for number.
#[test]
fn prompts_arriving_together_are_answered_as_each_would_be_alone() {
    let engine = start(4, 512);
    let questions = [
        "Name three colours.",
        "Write a short poem about the sea.",
        "What is the capital of France? Answer in one sentence.",
        "Describe a bicycle to a child.",
    ];
    let generations: Vec<_> = questions
        .iter()
        .zip(7_u64..)
        .map(|(question, seed)| {
            let mut generation = generation(chat_prompt(&engine, question), sampled(0.8, seed), 24);
            generation.top_logprobs = 2;
            generation
        })
        .collect();
    // Bit for bit: each sequence's rows are computed as when it is alone.
    assert_together_as_alone(&engine, &generations);
}

/// A sequence keeps the prompt cells its last occupant prefilled; a next prompt with the same
/// head (the chat template's system part, or the very same prompt) prefills only the rest and
/// still gets exactly the answer a fresh engine gives.
#[test]
fn a_prompt_sharing_its_head_with_the_previous_one_reuses_its_cells_with_the_same_answer() {
    let warm = start(1, 512);
    let fresh = start(1, 512);
    let first = chat_prompt(&warm, "Name three colours.");
    let second = chat_prompt(&warm, "Write a short poem about the sea.");
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 3, "chat prompts share the template's head");
    let mut asked = generation(second.clone(), sampled(0.8, 3), 24);
    asked.top_logprobs = 2;

    let before = run(&warm, generation(first, SamplingParams::greedy(), 8));
    assert_eq!(before.done.prompt_reused, 0, "the engine started empty");
    let reusing = run(&warm, asked.clone());
    assert_eq!(reusing.done.prompt_reused as usize, shared);
    let again = run(&warm, asked.clone());
    assert_eq!(
        again.done.prompt_reused as usize,
        second.len() - 2,
        "the same prompt again: all but the two tokens that give the first token's logits"
    );
    let reference = run(&fresh, asked);
    assert_eq!(reference.done.prompt_reused, 0);
    assert_eq!(reference.done.prompt_tokens, reusing.done.prompt_tokens);
    // Bit for bit: the kept cells are the ones prefilling computes.
    assert_bit_identical(&reusing, &reference);
    assert_bit_identical(&again, &reference);
}

/// Generate 40 tokens in one go, then 15 and resume from them: the continuation must match.
fn check_resume_equivalence(sampling: SamplingParams) {
    let engine = start(2, 512);
    let prompt = chat_prompt(
        &engine,
        "Tell me a story about a robot who learns to paint.",
    );
    let mut whole = generation(prompt, sampling, 40);
    whole.top_logprobs = 3;
    let full = run(&engine, whole.clone());
    assert_eq!(
        full.tokens.len(),
        40,
        "the story should not end this early: {:?}",
        full.text()
    );

    let mut head = whole.clone();
    head.max_tokens = 15;
    let head = run(&engine, head);
    assert_eq!(head.token_ids(), full.token_ids()[..15]);

    let mut resumed = whole;
    resumed.committed = head.token_ids();
    let tail = run(&engine, resumed);
    assert_eq!(tail.tokens.first().map(|event| event.position), Some(15));
    assert_eq!(tail.token_ids(), full.token_ids()[15..]);
    assert_eq!(tail.done.completion_tokens, 40);
    // Same numbers too, not only the same choices.
    for (resumed, original) in tail.tokens.iter().zip(&full.tokens[15..]) {
        assert!(
            (resumed.logprob - original.logprob).abs() < 1e-4,
            "{resumed:?} vs {original:?}"
        );
    }
}

/// Generate 30 tokens on one engine, reporting the prompt's KV cache; then on another engine
/// (another node) resume from that checkpoint and the first 10 tokens: the continuation matches,
/// number for number, without prefilling the prompt again.
#[test]
fn a_generation_resumed_from_another_engines_checkpoint_continues_exactly() {
    let first_node = start(2, 512);
    let prompt = chat_prompt(
        &first_node,
        "Tell me a story about a robot who learns to paint.",
    );
    let mut whole = generation(prompt.clone(), sampled(0.8, 42), 30);
    whole.top_logprobs = 2;
    let mut reported = whole.clone();
    reported.export_checkpoint = true;
    let full = run(&first_node, reported);
    assert_eq!(full.tokens.len(), 30, "{:?}", full.text());
    let checkpoint = full.checkpoint.clone().expect("a checkpoint was asked for");
    assert_eq!(checkpoint.tokens as usize, prompt.len());
    assert!(
        checkpoint.data.len() > prompt.len() * 1_000,
        "a prompt's KV cache is kilobytes per token, got {} bytes",
        checkpoint.data.len()
    );
    assert!(run(&first_node, whole.clone()).checkpoint.is_none());
    drop(first_node);

    let second_node = start(1, 512);
    let mut resumed = whole.clone();
    resumed.committed = full.token_ids()[..10].to_vec();
    resumed.restore = Some(std::sync::Arc::new(checkpoint.clone()));
    let tail = run(&second_node, resumed);
    assert!(tail.done.prompt_restored, "the checkpoint was not used");
    assert_eq!(tail.token_ids(), full.token_ids()[10..]);
    for (resumed, original) in tail.tokens.iter().zip(&full.tokens[10..]) {
        assert!(
            (resumed.logprob - original.logprob).abs() < 1e-4,
            "{resumed:?} vs {original:?}"
        );
    }

    // A damaged checkpoint is refused and the prompt prefilled: same answer, nothing lost.
    let mut damaged = whole;
    damaged.committed = full.token_ids()[..10].to_vec();
    let mut truncated = checkpoint;
    truncated.data.truncate(truncated.data.len() / 2);
    damaged.restore = Some(std::sync::Arc::new(truncated));
    let refilled = run(&second_node, damaged);
    assert!(!refilled.done.prompt_restored);
    assert_eq!(refilled.token_ids(), full.token_ids()[10..]);
}

#[test]
fn resumed_generation_continues_exactly_greedy() {
    check_resume_equivalence(SamplingParams::greedy());
}

#[test]
fn resumed_generation_continues_exactly_with_seeded_sampling() {
    check_resume_equivalence(sampled(0.8, 42));
}

#[test]
fn a_seed_replays_and_different_seeds_differ() {
    let engine = start(1, 512);
    let prompt = chat_prompt(&engine, "Invent a name for a cat.");
    let with_seed =
        |seed| run(&engine, generation(prompt.clone(), sampled(0.8, seed), 32)).token_ids();
    let a = with_seed(7);
    assert_eq!(a, with_seed(7));
    let others: Vec<_> = [8, 9, 10].into_iter().map(with_seed).collect();
    assert!(
        others.iter().any(|other| *other != a),
        "three other seeds all matched seed 7"
    );
}

#[test]
fn logprobs_are_probabilities_and_top_logprobs_are_sorted_and_contain_the_greedy_choice() {
    let engine = start(1, 512);
    let mut request = generation(
        chat_prompt(&engine, "Say hello."),
        SamplingParams::greedy(),
        16,
    );
    request.top_logprobs = 5;
    let outcome = run(&engine, request);
    assert!(!outcome.tokens.is_empty());
    for event in &outcome.tokens {
        assert!(
            event.logprob <= 0.0 && event.logprob.is_finite(),
            "{event:?}"
        );
        assert_eq!(event.top_logprobs.len(), 5);
        assert!(event
            .top_logprobs
            .windows(2)
            .all(|pair| pair[0].logprob >= pair[1].logprob));
        assert_eq!(
            event.top_logprobs[0].token, event.token,
            "greedy picks the most likely"
        );
        assert_eq!(event.top_logprobs[0].logprob, event.logprob);
        assert_eq!(event.top_logprobs[0].piece, event.piece);
    }
}

#[test]
fn max_tokens_ends_with_length() {
    let engine = start(1, 512);
    let outcome = run(
        &engine,
        generation(counting_prompt(&engine, 40), SamplingParams::greedy(), 7),
    );
    assert_finished(&outcome, FinishReason::Length);
    assert_eq!(outcome.tokens.len(), 7);
    assert_eq!(outcome.done.completion_tokens, 7);
}

#[test]
fn a_full_context_ends_with_length() {
    let engine = start(1, 64);
    let prompt = counting_prompt(&engine, 12);
    assert!(
        prompt.len() < 48,
        "prompt of {} tokens leaves too little room",
        prompt.len()
    );
    let room = 64 - prompt.len();
    let outcome = run(&engine, generation(prompt, SamplingParams::greedy(), 1000));
    assert_finished(&outcome, FinishReason::Length);
    // Every cell of the context is used: the prompt, then one fed token per new token but the last.
    assert_eq!(outcome.tokens.len(), room + 1);
}

#[test]
fn a_stop_sequence_ends_the_generation_after_the_token_that_completes_it() {
    let engine = start(1, 512);
    let prompt = counting_prompt(&engine, 40);
    let free = run(
        &engine,
        generation(prompt.clone(), SamplingParams::greedy(), 30),
    );
    let text = free.text();
    assert!(
        text.contains("45"),
        "expected the model to keep counting: {text:?}"
    );

    let mut stopped = generation(prompt, SamplingParams::greedy(), 30);
    stopped.stop = vec!["45".to_owned()];
    let outcome = run(&engine, stopped);
    assert_finished(&outcome, FinishReason::Stop);
    let emitted = outcome.text();
    assert!(emitted.contains("45"), "{emitted:?}");
    assert!(free.token_ids().starts_with(&outcome.token_ids()));
    // The last emitted token completed the stop: without it the text has no "45" yet.
    let without_last = &outcome.tokens[..outcome.tokens.len() - 1];
    let bytes: Vec<u8> = without_last
        .iter()
        .flat_map(|event| event.piece.clone())
        .collect();
    assert!(!String::from_utf8_lossy(&bytes).contains("45"));
}

#[test]
fn end_of_turn_is_not_emitted_and_finishes_with_stop() {
    let engine = start(1, 512);
    let outcome = run(
        &engine,
        generation(
            chat_prompt(&engine, "What is 2+2?"),
            SamplingParams::greedy(),
            200,
        ),
    );
    assert_finished(&outcome, FinishReason::Stop);
    assert!(outcome
        .tokens
        .iter()
        .all(|event| !engine.tokenizer().is_end_of_generation(event.token)));
    assert_eq!(
        outcome.done.completion_tokens as usize,
        outcome.tokens.len()
    );
}

#[test]
fn speed_measurements_are_positive() {
    let engine = start(1, 512);
    let report = engine.measure_speed().expect("measure");
    assert!(report.prefill_tokens_per_second > 0.0 && report.decode_tokens_per_second > 0.0);
    let (prefill, decode) = engine.bench_prefill_decode(128, 16).expect("bench");
    assert!(prefill > 0.0 && decode > 0.0);
    // Generation still works after a bench borrowed the context.
    let outcome = run(
        &engine,
        generation(counting_prompt(&engine, 40), SamplingParams::greedy(), 5),
    );
    assert_eq!(outcome.tokens.len(), 5);
}

/// Each `FlashAttention` setting starts, and the kernels report an agent registers with says
/// which one runs (the coordinator learns a node's numerics from it).
#[test]
fn flash_attention_can_be_switched_on() {
    for (setting, flash, reference) in [
        (engine::FlashAttention::Exact, true, true),
        (engine::FlashAttention::Off, false, false),
    ] {
        let mut config = config(1, 64);
        setting.apply(&mut config);
        assert_eq!(engine::FlashAttention::of(&config), setting);
        let engine = engine::Engine::start(config).expect("start");
        let kernels = &engine.info().cpu_kernels;
        assert_eq!(kernels.contains("FLASH_ATTN = 1 |"), flash, "{kernels}");
        assert_eq!(kernels.contains("REFERENCE = 1 |"), reference, "{kernels}");
    }
    let mut config = config(1, 512);
    engine::FlashAttention::Fast.apply(&mut config);
    let engine = engine::Engine::start(config).expect("start with flash attention");
    let kernels = &engine.info().cpu_kernels;
    assert!(kernels.contains("FLASH_ATTN = 1 |"), "{kernels}");
    assert!(!kernels.contains("REFERENCE"), "{kernels}");
    let prompt = chat_prompt(&engine, "What is the capital of France?");
    let outcome = run(&engine, generation(prompt, SamplingParams::greedy(), 24));
    assert!(outcome.text().contains("Paris"), "{:?}", outcome.text());
}

/// Flash attention on ggml's reference kernels takes its one-row kernel for every query: a
/// long prompt's answer is bit for bit the same prefilled whole or in 16-token chunks, decoded
/// beside other sequences, and on one thread instead of two. (On the default kernels the
/// chunked and the accompanied answers part within a few tokens: a prompt of 64 rows or more
/// goes through the tiled kernel, a KV view of 512 cells through the split-KV merge.)
#[test]
fn flash_attention_on_the_reference_kernels_does_not_depend_on_the_batch() {
    let start = |change: &dyn Fn(&mut engine::EngineConfig)| {
        let mut config = config(4, 512);
        config.threads = 2;
        config.flash_attention = true;
        config.reference_kernels = true;
        change(&mut config);
        engine::Engine::start(config).expect("start with flash attention on reference kernels")
    };
    let whole = start(&|_| {});
    // About 330 tokens: one 64-row tile and more, and a KV view of 512 cells while decoding.
    let asked = generation(counting_prompt(&whole, 100), sampled(0.8, 7), 24);
    let alone = run(&whole, asked.clone());
    assert_eq!(alone.tokens.len(), 24);

    let chunked = start(&|config| config.batch_tokens = 16);
    assert_bit_identical(&run(&chunked, asked.clone()), &alone);
    drop(chunked);
    let one_thread = start(&|config| config.threads = 1);
    assert_bit_identical(&run(&one_thread, asked.clone()), &alone);
    drop(one_thread);
    let others: Vec<Generation> = (1..4)
        .map(|up_to| {
            generation(
                counting_prompt(&whole, 20 * up_to),
                sampled(0.8, up_to.into()),
                24,
            )
        })
        .collect();
    assert_together_as_alone(&whole, &[vec![asked], others].concat());
}
