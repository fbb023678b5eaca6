//! Penalties, `logit_bias` and min-p on the real model: each does what it promises, and a
//! generation resumed from its committed tokens (as on another node after a handover) rebuilds
//! them and continues exactly.

mod common;

use common::*;
use engine::{Adjustments, SamplingParams, TokenId};

fn most_repeated(tokens: &[TokenId]) -> usize {
    let mut counts = std::collections::BTreeMap::new();
    for &token in tokens {
        *counts.entry(token).or_insert(0) += 1;
    }
    counts.into_values().max().unwrap_or(0)
}

fn with(adjustments: Adjustments, generation: &engine::Generation) -> engine::Generation {
    engine::Generation {
        adjustments,
        ..generation.clone()
    }
}

#[test]
fn a_frequency_or_presence_penalty_makes_the_answer_repeat_itself_less() {
    let engine = start(1, 512);
    let plain = generation(counting_prompt(&engine, 12), SamplingParams::greedy(), 48);
    let counted = run(&engine, plain.clone());
    // Counting on repeats the separator and the digits over and over.
    let repeats = most_repeated(&counted.token_ids());
    assert!(repeats >= 10, "{:?}", counted.text());
    for adjustments in [
        Adjustments {
            frequency_penalty: 2.0,
            ..Adjustments::default()
        },
        Adjustments {
            presence_penalty: 2.0,
            frequency_penalty: 1.0,
            ..Adjustments::default()
        },
    ] {
        let penalised = run(&engine, with(adjustments.clone(), &plain));
        let penalised_repeats = most_repeated(&penalised.token_ids());
        assert!(
            penalised_repeats < repeats / 2,
            "{adjustments:?}: a token still occurs {penalised_repeats} times (against {repeats}): {:?}",
            penalised.text()
        );
    }
}

#[test]
fn logit_bias_forces_a_token_in_or_keeps_it_out() {
    let engine = start(1, 512);
    let plain = generation(
        chat_prompt(&engine, "What is the capital of France?"),
        SamplingParams::greedy(),
        12,
    );
    let answer = run(&engine, plain.clone()).token_ids();
    let first = answer[0];
    let banned = run(
        &engine,
        with(
            Adjustments {
                logit_bias: vec![(first, -100.0)],
                ..Adjustments::default()
            },
            &plain,
        ),
    );
    assert!(!banned.token_ids().contains(&first), "{:?}", banned.text());
    let forced_token = engine.tokenizer().tokenize(" banana", false).unwrap()[0];
    let forced = run(
        &engine,
        with(
            Adjustments {
                logit_bias: vec![(forced_token, 100.0)],
                ..Adjustments::default()
            },
            &plain,
        ),
    );
    assert_eq!(forced.token_ids(), vec![forced_token; 12]);
    // The reported log-probability is the biased distribution's: the forced token is certain.
    assert!(forced.tokens.iter().all(|token| token.logprob > -1e-3));
}

#[test]
fn a_repetition_penalty_changes_the_greedy_answer_and_one_of_one_does_not() {
    let engine = start(1, 512);
    let plain = generation(counting_prompt(&engine, 12), SamplingParams::greedy(), 24);
    let reference = run(&engine, plain.clone()).token_ids();
    let neutral = Adjustments {
        repetition_penalty: 1.0,
        ..Adjustments::default()
    };
    assert_eq!(run(&engine, with(neutral, &plain)).token_ids(), reference);
    let strong = Adjustments {
        repetition_penalty: 1.8,
        ..Adjustments::default()
    };
    let penalised = run(&engine, with(strong, &plain));
    assert_ne!(penalised.token_ids(), reference, "{:?}", penalised.text());
}

/// Generate 40 tokens in one go, then resume from the first 15 with the same rules on a
/// second engine of another batch width: the same tokens with the same log-probabilities (to
/// the tolerance of a prompt prefilled in another batch shape), so the penalties were rebuilt
/// from the committed tokens.
#[test]
fn a_penalised_biased_min_p_generation_resumed_elsewhere_continues_exactly() {
    let first_node = start(2, 512);
    let prompt = chat_prompt(
        &first_node,
        "Tell me a story about a robot who learns to paint.",
    );
    let bias_token = first_node.tokenizer().tokenize(" the", false).unwrap()[0];
    let mut whole = generation(
        prompt,
        SamplingParams {
            min_p: 0.05,
            ..sampled(0.9, 4242)
        },
        40,
    );
    whole.adjustments = Adjustments {
        presence_penalty: 0.6,
        frequency_penalty: 0.4,
        repetition_penalty: 1.15,
        logit_bias: vec![(bias_token, -3.0)],
    };
    whole.top_logprobs = 2;
    let full = run(&first_node, whole.clone());
    assert_eq!(full.tokens.len(), 40, "{:?}", full.text());
    let plain = run(
        &first_node,
        engine::Generation {
            adjustments: Adjustments::default(),
            ..whole.clone()
        },
    );
    assert_ne!(
        plain.token_ids(),
        full.token_ids(),
        "the rules changed nothing"
    );
    drop(first_node);

    let second_node = start(1, 512);
    let mut resumed = whole;
    resumed.committed = full.token_ids()[..15].to_vec();
    let tail = run(&second_node, resumed);
    assert_eq!(tail.token_ids(), full.token_ids()[15..]);
    for (resumed, original) in tail.tokens.iter().zip(&full.tokens[15..]) {
        assert!(
            (resumed.logprob - original.logprob).abs() < 1e-4,
            "{resumed:?} vs {original:?}"
        );
    }
}
