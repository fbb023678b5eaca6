//! The exact speculative cascade's promise, held on the engine with the production verdict
//! (`router::exact`): a draft from a car's engine, checked by the cloud's engine in one
//! prefill, kept up to where the cloud parts from it and continued by the cloud, gives at
//! temperature 0 the very tokens the cloud's engine decodes alone.
//!
//! A check in one prefill computes attention for a chunk of queries where decoding computes it
//! for one: llama.cpp sums those in different orders unless the engine runs ggml's reference
//! kernels (`EngineConfig::reference_kernels`), as the cloud does. Without them the two part
//! (docs/BENCHMARKS.md, "The cause, traced").

mod common;

use common::*;
use engine::testing::cloud_test_model_path;
use engine::{Engine, EngineConfig, FinishReason, Generation, SamplingParams, TokenId};
use router::exact::{verify_greedy, DraftScores};

/// Prompts: the first CommonsenseQA questions of the project's evaluation set.
const PROMPTS: usize = 50;
/// Answer length of every policy.
const ANSWER_TOKENS: u32 = 16;

fn qwen(reference_kernels: bool) -> Engine {
    let mut config = EngineConfig::new(cloud_test_model_path());
    config.parallel_sequences = 4;
    config.context_tokens_per_sequence = 512;
    config.reference_kernels = reference_kernels;
    Engine::start(config).expect("start the Qwen engine")
}

fn questions() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/eval/commonsenseqa_200.jsonl"
    );
    std::fs::read_to_string(path)
        .expect("read the CommonsenseQA set")
        .lines()
        .take(PROMPTS)
        .map(|line| {
            let item: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let stem = item["question"]["stem"].as_str().expect("a question");
            format!("{stem} Answer in a few words, then explain.")
        })
        .collect()
}

fn greedy(prompt: Vec<TokenId>, max_tokens: u32) -> Generation {
    generation(prompt, SamplingParams::greedy(), max_tokens)
}

/// The first `count` questions as chat prompts.
fn prompts(engine: &Engine, count: usize) -> Vec<Vec<TokenId>> {
    questions()
        .iter()
        .take(count)
        .map(|question| chat_prompt(engine, question))
        .collect()
}

/// The cloud's own greedy answers.
fn cloud_alone(cloud: &Engine, prompts: &[Vec<TokenId>]) -> Vec<Outcome> {
    run_all(
        cloud,
        prompts
            .iter()
            .map(|prompt| greedy(prompt.clone(), ANSWER_TOKENS))
            .collect(),
    )
}

/// The cloud's check of `answer` after `prompt`: both scored in one prefill with the most
/// likely token at each position, then the one token it generates after them.
fn check(prompt: &[TokenId], answer: &[TokenId]) -> Generation {
    let mut check = greedy([prompt, answer].concat(), 1);
    check.prompt_logprobs = true;
    check.top_logprobs = 1;
    check
}

/// What the cascade keeps of `draft` after the cloud scored prompt and draft (`scored`: the
/// prompt's log-probabilities with one alternative, then the one token generated after it).
fn verdict_tokens(
    cloud: &Engine,
    prompt_len: usize,
    draft: &[TokenId],
    scored: &Outcome,
) -> (usize, Vec<TokenId>, bool) {
    let scores = scored.prompt_scores.as_ref().expect("the prompt's scores");
    // Scores start at the prompt's second token: draft token j is scored at prompt_len + j - 1.
    let choices = (0..draft.len())
        .map(|j| {
            scores[prompt_len + j - 1]
                .top_logprobs
                .first()
                .map(|best| best.token)
        })
        .collect();
    let after = scored.tokens.first().map(|event| event.token);
    let ended = after.is_none() && scored.done.reason == FinishReason::Stop;
    let verdict = verify_greedy(
        draft,
        &DraftScores {
            choices,
            after,
            ended,
        },
        |token| cloud.tokenizer().is_end_of_generation(token),
    );
    (verdict.accepted, verdict.tokens(draft), verdict.ends)
}

/// 50 prompts at temperature 0: the cloud alone, and the cascade from a car's sampled drafts
/// (which part from the cloud's answer at every kind of place, or never). Each cascade answer
/// is the cloud's own, token for token.
#[test]
fn the_cascade_answers_what_the_cloud_alone_answers() {
    let cloud = qwen(true);
    let car = qwen(false);
    let prompts = prompts(&cloud, PROMPTS);
    let alone = cloud_alone(&cloud, &prompts);
    let drafts = run_all(
        &car,
        prompts
            .iter()
            .zip(1_u64..)
            .map(|(prompt, seed)| generation(prompt.clone(), sampled(0.7, seed), ANSWER_TOKENS))
            .collect(),
    );
    let scored = run_all(
        &cloud,
        prompts
            .iter()
            .zip(&drafts)
            .map(|(prompt, draft)| check(prompt, &draft.token_ids()))
            .collect(),
    );
    let verdicts: Vec<_> = prompts
        .iter()
        .zip(&drafts)
        .zip(&scored)
        .map(|((prompt, draft), scored)| {
            verdict_tokens(&cloud, prompt.len(), &draft.token_ids(), scored)
        })
        .collect();
    let continued = run_all(
        &cloud,
        prompts
            .iter()
            .zip(&verdicts)
            .map(|(prompt, (_, kept, ends))| {
                let left = if *ends {
                    0
                } else {
                    ANSWER_TOKENS.saturating_sub(kept.len() as u32)
                };
                greedy([prompt.clone(), kept.clone()].concat(), left.max(1))
            })
            .collect(),
    );

    let mut parted = 0;
    let mut accepted_tokens = 0;
    for (index, ((alone, (accepted, kept, ends)), continued)) in
        alone.iter().zip(&verdicts).zip(&continued).enumerate()
    {
        let mut answer = kept.clone();
        if !ends {
            answer.extend(continued.token_ids());
        }
        answer.truncate(ANSWER_TOKENS as usize);
        assert_eq!(
            answer,
            alone.token_ids(),
            "prompt {index}: the cascade kept {accepted} draft tokens of {:?}; the cloud alone said {:?}",
            drafts[index].text(),
            alone.text()
        );
        accepted_tokens += accepted;
        parted += usize::from(*accepted < drafts[index].tokens.len());
    }
    // The sampled drafts exercise both halves of the cascade: kept tokens and partings.
    assert!(
        parted > 0 && parted < PROMPTS,
        "{parted} of {PROMPTS} drafts parted"
    );
    assert!(accepted_tokens > 0, "no draft token was kept");
}

/// The cloud's own answer scored in one prefill: every token is the cloud's most likely one,
/// with the log-probability its decode reported, bit for bit.
#[test]
fn a_decoded_answer_scored_in_one_prefill_gets_its_decode_numbers() {
    let cloud = qwen(true);
    let prompts = prompts(&cloud, 4);
    let alone = cloud_alone(&cloud, &prompts);
    for (prompt, alone) in prompts.iter().zip(&alone) {
        let scored = run(&cloud, check(prompt, &alone.token_ids()));
        let scores = scored.prompt_scores.expect("the prompt's scores");
        for (decoded, scored) in alone.tokens.iter().zip(&scores[prompt.len() - 1..]) {
            assert_eq!(scored.token, decoded.token);
            assert_eq!(scored.top_logprobs[0].token, decoded.token, "{scored:?}");
            assert_eq!(
                scored.logprob.to_bits(),
                decoded.logprob.to_bits(),
                "{scored:?} scored, {decoded:?} decoded"
            );
        }
    }
}
