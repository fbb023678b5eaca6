//! Scoring a prompt (`Generation::prompt_logprobs`, what `echo` with `logprobs` asks): each prompt
//! token's log-probability given the tokens before it, on the real test model.

mod common;

use common::{collect, counting_prompt, generation, run, start};
use engine::{SamplingParams, TokenEvent, PROMPT_SCORE_CHUNK_TOKENS};

fn scored(prompt: Vec<i32>, max_tokens: u32, top_logprobs: u32) -> engine::Generation {
    let mut scored = generation(prompt, SamplingParams::greedy(), max_tokens);
    scored.prompt_logprobs = true;
    scored.top_logprobs = top_logprobs;
    scored
}

fn assert_close(got: f32, expected: f32, what: &str) {
    assert!(
        (got - expected).abs() <= 2e-3,
        "{what}: {got} against {expected}"
    );
}

#[test]
fn a_prompt_is_scored_as_the_model_would_have_generated_it() {
    let engine = start(2, 1024);
    // Longer than one scoring chunk, so that the scores span several prefill calls.
    let prompt = counting_prompt(&engine, 40);
    assert!(prompt.len() > PROMPT_SCORE_CHUNK_TOKENS + 2);
    let mut greedy = generation(prompt.clone(), SamplingParams::greedy(), 12);
    greedy.top_logprobs = 2;
    let answer = run(&engine, greedy);
    assert_eq!(answer.tokens.len(), 12, "{answer:?}");
    assert!(answer.prompt_scores.is_none(), "scores nobody asked for");

    // The prompt followed by that answer, scored: the answer's part must carry the logprobs
    // the answer was generated with, and each of its tokens is the most likely one.
    let mut whole = prompt.clone();
    whole.extend(answer.token_ids());
    let outcome = run(&engine, scored(whole.clone(), 1, 3));
    let scores: Vec<TokenEvent> = outcome.prompt_scores.clone().expect("the prompt's scores");
    assert_eq!(scores.len(), whole.len() - 1);
    for (index, score) in scores.iter().enumerate() {
        assert_eq!(score.position as usize, index + 1);
        assert_eq!(score.token, whole[index + 1]);
        assert_eq!(score.piece, engine.tokenizer().piece(whole[index + 1]));
        assert!(
            score.logprob <= 0.0 && score.logprob.is_finite(),
            "{score:?}"
        );
        assert_eq!(score.top_logprobs.len(), 3);
        assert!(score.top_logprobs[0].logprob >= score.logprob - 1e-6);
    }
    for (offset, token) in answer.tokens.iter().enumerate() {
        let score = &scores[prompt.len() - 1 + offset];
        assert_eq!(
            score.top_logprobs[0].token, token.token,
            "position {offset}"
        );
        assert_close(score.logprob, token.logprob, "an answer token's score");
    }
    // A counting prompt is predictable: most of its numbers are near certain.
    let confident = scores.iter().filter(|score| score.logprob > -0.5).count();
    assert!(
        confident * 2 > scores.len(),
        "{confident} of {}",
        scores.len()
    );
    // Scoring does not change what comes after the prompt.
    let plain = run(
        &engine,
        generation(whole.clone(), SamplingParams::greedy(), 1),
    );
    assert_eq!(outcome.token_ids(), plain.token_ids());
}

#[test]
fn a_scored_prompt_is_prefilled_whole_and_scored_the_same_every_time() {
    let engine = start(1, 512);
    let prompt = counting_prompt(&engine, 12);
    // A scored prompt's cells are not kept for the next prompt: the plain run after it
    // prefills the whole prompt. That plain run's cells are kept and a second plain run reuses
    // them; a scored one must not (those cells give no logits).
    let first = run(&engine, scored(prompt.clone(), 2, 1));
    let plain = || generation(prompt.clone(), SamplingParams::greedy(), 2);
    let after_scoring = run(&engine, plain());
    assert_eq!(
        after_scoring.done.prompt_reused, 0,
        "{:?}",
        after_scoring.done
    );
    let reused = run(&engine, plain());
    assert!(reused.done.prompt_reused > 0, "{:?}", reused.done);
    let again = run(&engine, scored(prompt.clone(), 2, 1));
    assert_eq!(again.done.prompt_reused, 0);
    assert_eq!(first.prompt_scores, again.prompt_scores);
    assert_eq!(first.token_ids(), again.token_ids());
    assert_eq!(first.token_ids(), reused.token_ids());
    assert_eq!(first.token_ids(), after_scoring.token_ids());
}

#[test]
fn a_one_token_prompt_has_nothing_to_score() {
    let engine = start(1, 256);
    let prompt = engine
        .tokenizer()
        .tokenize("Hello", false)
        .expect("tokenize");
    assert_eq!(prompt.len(), 1, "{prompt:?}");
    let stream = engine.submit(scored(prompt, 3, 2)).expect("submit");
    let outcome = collect(stream);
    assert_eq!(outcome.prompt_scores, Some(Vec::new()));
    assert_eq!(outcome.tokens.len(), 3);
}
