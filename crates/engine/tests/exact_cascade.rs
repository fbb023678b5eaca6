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

/// The sampled cascade's promise (`Generation::draft`): the cloud given a car's draft as its
/// prediction answers, token for token and log-probability for log-probability, what it
/// answers alone. 50 prompts, every other one greedy, the rest sampled at 0.7 with the car
/// drafting under the same seed (as the gateway asks it to).
#[test]
fn a_draft_changes_how_fast_the_cloud_answers_never_what() {
    let cloud = qwen(true);
    let car = qwen(false);
    let prompts = prompts(&cloud, PROMPTS);
    let sampling = |index: usize| {
        if index.is_multiple_of(2) {
            SamplingParams::greedy()
        } else {
            sampled(0.7, index as u64)
        }
    };
    let asked = |index: usize, prompt: &Vec<TokenId>| {
        let mut asked = generation(prompt.clone(), sampling(index), ANSWER_TOKENS);
        asked.top_logprobs = 2;
        asked
    };
    let alone = run_all(
        &cloud,
        prompts
            .iter()
            .enumerate()
            .map(|(index, prompt)| asked(index, prompt))
            .collect(),
    );
    let drafts = run_all(
        &car,
        prompts
            .iter()
            .enumerate()
            .map(|(index, prompt)| generation(prompt.clone(), sampling(index), ANSWER_TOKENS))
            .collect(),
    );
    let predicted = run_all(
        &cloud,
        prompts
            .iter()
            .enumerate()
            .zip(&drafts)
            .map(|((index, prompt), draft)| {
                let mut asked = asked(index, prompt);
                asked.draft = draft.token_ids();
                asked
            })
            .collect(),
    );
    let (mut taken_whole, mut parted, mut taken_tokens) = (0, 0, 0);
    for (index, ((alone, draft), predicted)) in
        alone.iter().zip(&drafts).zip(&predicted).enumerate()
    {
        assert_eq!(
            predicted.tokens,
            alone.tokens,
            "prompt {index}: with the draft {:?} the cloud said {:?}; alone {:?}",
            draft.text(),
            predicted.text(),
            alone.text()
        );
        assert_eq!(predicted.done.reason, alone.done.reason, "prompt {index}");
        let draft = draft.token_ids();
        let taken = draft
            .iter()
            .zip(alone.token_ids())
            .take_while(|(drafted, said)| **drafted == *said)
            .count();
        // The engine took exactly those from the prefill; it decoded the rest.
        assert_eq!(predicted.done.draft_taken as usize, taken, "prompt {index}");
        taken_tokens += taken;
        if taken == draft.len() {
            taken_whole += 1;
        } else {
            parted += 1;
        }
    }
    // Both halves are exercised: drafts taken whole, and drafts parted from, with tokens taken.
    assert!(
        taken_whole > 0 && parted > 0 && taken_tokens > 0,
        "{taken_whole} drafts taken whole, {parted} parted from, {taken_tokens} tokens taken"
    );
}

/// On the default kernels a prefilled token's numbers are not a decoded one's: a car's engine
/// does not use a draft, and answers as it does without one, decoding every token.
#[test]
fn an_engine_on_the_default_kernels_answers_as_without_a_draft() {
    let car = qwen(false);
    let prompts = prompts(&car, 4);
    let alone: Vec<Outcome> = run_all(
        &car,
        prompts
            .iter()
            .map(|prompt| greedy(prompt.clone(), ANSWER_TOKENS))
            .collect(),
    );
    let with_draft = run_all(
        &car,
        prompts
            .iter()
            .zip(&alone)
            .map(|(prompt, alone)| {
                let mut asked = greedy(prompt.clone(), ANSWER_TOKENS);
                let mut draft = alone.token_ids();
                // A wrong token in the middle, so that a followed draft would be cut there.
                if let Some(token) = draft.get_mut(3) {
                    *token = (*token + 1) % 1000;
                }
                asked.draft = draft;
                asked
            })
            .collect(),
    );
    for (alone, with_draft) in alone.iter().zip(&with_draft) {
        assert_eq!(with_draft.tokens, alone.tokens);
        assert_eq!(with_draft.done.draft_taken, 0, "every token decoded");
    }
}
