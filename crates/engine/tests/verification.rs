//! Verification by recomputation on the real model (`Generation::verify`): honest generations,
//! however they were computed, pass; answers a cheating node could report do not.
//!
//! The honest set is the calibration of `engine::DEFAULT_TOLERANCE` (docs/VERIFICATION.md): 500
//! generations from engines that differ from the verifier in threads and parallel sequences,
//! decoded alone and in changing batches, and resumed on another engine after a handover.
//! Flash attention's settings are verified across, both ways, on long prompts.

mod common;

use common::*;
use engine::{
    Engine, FinishReason, FlashAttention, Mismatch, SamplingParams, TokenId, Tolerance,
    Verification, Verify,
};

/// The calibrated tolerance between engines of one attention setting.
const DEFAULT: Tolerance = engine::DEFAULT_TOLERANCE;

/// Completion tokens per generation.
const ANSWER_TOKENS: u32 = 12;

/// Honest generations checked in all; the calibration asks for at least 500.
const HONEST_ALONE: usize = 100;
const HONEST_BATCHED: usize = 300;
const HONEST_RESUMED: usize = 100;

/// Short openings the model continues in many ways.
const OPENINGS: [&str; 20] = [
    "The capital of France is",
    "Once upon a time",
    "To bake bread you need",
    "The best way to learn",
    "My favourite animal is",
    "In the morning I",
    "The sky is blue because",
    "Electric cars are",
    "A good password",
    "The ocean",
    "Yesterday the weather",
    "Programming in Rust",
    "The train left the station",
    "Water boils at",
    "Music makes people",
    "The old house on the hill",
    "Three reasons to exercise:",
    "A recipe for soup:",
    "The scientist opened the door and",
    "Q: What is two plus two?\nA:",
];

/// Chat questions, whose answers the model may end with its end-of-turn token.
const QUESTIONS: [&str; 4] = [
    "Say hi.",
    "Name a colour.",
    "Reply with one word: yes or no?",
    "What is 2+2? Answer with the number only.",
];

/// A completion as a node reports it.
#[derive(Clone, Debug)]
struct Reported {
    prompt: Vec<TokenId>,
    sampling: SamplingParams,
    tokens: Vec<TokenId>,
    logprobs: Vec<f32>,
    ended_by_eos: bool,
}

/// The sampling of the `index`th honest generation: greedy, nucleus with top-k, the whole
/// vocabulary, min-p and a cold temperature, each seeded differently.
fn sampling(index: usize) -> SamplingParams {
    let seed = 1_000 + index as u64;
    let with = |temperature, top_p, top_k, min_p| SamplingParams {
        temperature,
        top_p,
        top_k,
        seed,
        min_p,
    };
    match index % 5 {
        0 => SamplingParams::greedy(),
        1 => with(0.8, 0.95, 40, 0.0),
        2 => with(1.0, 1.0, 0, 0.0),
        3 => with(0.7, 1.0, 0, 0.05),
        _ => with(0.2, 0.9, 0, 0.0),
    }
}

/// The `index`th prompt: mostly raw openings, now and then a chat question.
fn prompt(engine: &Engine, index: usize) -> Vec<TokenId> {
    if index % 6 == 5 {
        chat_prompt(engine, QUESTIONS[(index / 6) % QUESTIONS.len()])
    } else {
        let text = OPENINGS[index % OPENINGS.len()];
        engine.tokenizer().tokenize(text, true).expect("tokenize")
    }
}

fn reported(prompt: Vec<TokenId>, sampling: SamplingParams, outcome: &Outcome) -> Reported {
    Reported {
        prompt,
        sampling,
        tokens: outcome.token_ids(),
        logprobs: outcome.tokens.iter().map(|token| token.logprob).collect(),
        // No stop sequences here: an answer that stopped early ended by end-of-generation.
        ended_by_eos: outcome.done.reason == FinishReason::Stop,
    }
}

fn verify(verifier: &Engine, reported: &Reported) -> Verification {
    verify_within(verifier, reported, DEFAULT)
}

fn verify_within(verifier: &Engine, reported: &Reported, tolerance: Tolerance) -> Verification {
    verify_as(verifier, reported, None, 0, ANSWER_TOKENS, tolerance)
}

/// Verifies `reported` as an answer constrained by `grammar`, its first `given` tokens taken as
/// committed elsewhere (not checked), within `tolerance`.
fn verify_as(
    verifier: &Engine,
    reported: &Reported,
    grammar: Option<&str>,
    given: u32,
    max_tokens: u32,
    tolerance: Tolerance,
) -> Verification {
    let mut generation = generation(reported.prompt.clone(), reported.sampling, max_tokens);
    generation.grammar = grammar.map(str::to_owned);
    generation.verify = Some(Verify {
        completion: reported.tokens.clone(),
        given,
        logprobs: reported.logprobs[given as usize..].to_vec(),
        ended_by_eos: reported.ended_by_eos,
        tolerance,
    });
    let outcome = run(verifier, generation);
    assert!(outcome.tokens.is_empty(), "a verification emitted tokens");
    outcome
        .verification
        .expect("a verification reports its outcome")
}

fn engine_with(threads: u32, parallel: u32) -> Engine {
    let mut config = config(parallel, 256);
    config.threads = threads;
    Engine::start(config).expect("start engine")
}

/// An engine with room for [`long_prompt`]s, under `attention`.
fn long_engine(threads: u32, parallel: u32, attention: FlashAttention) -> Engine {
    let mut config = config(parallel, LONG_CONTEXT_TOKENS);
    config.threads = threads;
    attention.apply(&mut config);
    Engine::start(config).expect("start engine")
}

/// Submits every generation at once and collects them: the engine batches them as it goes, so
/// batch composition changes as sequences start and finish.
fn generate_together(engine: &Engine, range: std::ops::Range<usize>) -> Vec<Reported> {
    generate_together_from(engine, range, prompt)
}

/// [`generate_together`] with the prompts of `prompt`.
fn generate_together_from(
    engine: &Engine,
    range: std::ops::Range<usize>,
    prompt: fn(&Engine, usize) -> Vec<TokenId>,
) -> Vec<Reported> {
    let submitted: Vec<_> = range
        .map(|index| {
            let prompt = prompt(engine, index);
            let sampling = sampling(index);
            let stream = engine
                .submit(generation(prompt.clone(), sampling, ANSWER_TOKENS))
                .expect("submit");
            (prompt, sampling, stream)
        })
        .collect();
    submitted
        .into_iter()
        .map(|(prompt, sampling, stream)| reported(prompt, sampling, &collect(stream)))
        .collect()
}

/// The counts the calibration reads, per sampling kind (`index % 5`, as [`sampling`] numbers
/// them).
#[derive(Debug, Default)]
struct Tally {
    generations: usize,
    positions: u32,
    not_exact: u32,
    max_logprob_difference: f32,
    max_tolerance_used: f32,
    per_kind: [(u32, u32, f32, f32); 5],
    flagged: Vec<(Reported, Verification)>,
}

impl Tally {
    fn add(&mut self, index: usize, reported: Reported, verification: Verification) {
        self.generations += 1;
        self.positions += verification.checked;
        self.not_exact += verification.checked - verification.exact;
        self.max_logprob_difference = self
            .max_logprob_difference
            .max(verification.max_logprob_difference);
        self.max_tolerance_used = self.max_tolerance_used.max(verification.max_tolerance_used);
        let kind = &mut self.per_kind[index % 5];
        kind.0 += verification.checked;
        kind.1 += verification.checked - verification.exact;
        kind.2 = kind.2.max(verification.max_logprob_difference);
        kind.3 = kind.3.max(verification.max_tolerance_used);
        if !verification.passed() {
            self.flagged.push((reported, verification));
        }
    }
}

#[test]
fn no_honest_generation_is_flagged_whatever_engine_computed_it() {
    let verifier = engine_with(2, 1);
    let alone = engine_with(1, 1);
    let batched = engine_with(2, 8);
    let resumed_on = engine_with(1, 4);
    let mut tally = Tally::default();

    // Decoded alone, on one thread.
    for index in 0..HONEST_ALONE {
        let prompt = prompt(&alone, index);
        let sampling = sampling(index);
        let outcome = run(&alone, generation(prompt.clone(), sampling, ANSWER_TOKENS));
        let reported = reported(prompt, sampling, &outcome);
        let verification = verify(&verifier, &reported);
        tally.add(index, reported, verification);
    }
    // Decoded in batches of up to eight, on two threads.
    let mut next = HONEST_ALONE;
    while next < HONEST_ALONE + HONEST_BATCHED {
        let end = (next + 16).min(HONEST_ALONE + HONEST_BATCHED);
        for (index, reported) in (next..end).zip(generate_together(&batched, next..end)) {
            let verification = verify(&verifier, &reported);
            tally.add(index, reported, verification);
        }
        next = end;
    }
    // Handed over: the first tokens from one engine, the rest resumed on another.
    let first = HONEST_ALONE + HONEST_BATCHED;
    for index in first..first + HONEST_RESUMED {
        let prompt = prompt(&batched, index);
        let sampling = sampling(index);
        let original = run(
            &batched,
            generation(prompt.clone(), sampling, ANSWER_TOKENS),
        );
        let handed_over_after = 1 + index % 8;
        if original.tokens.len() <= handed_over_after {
            // Ended before the handover: the answer is checked as it is.
            let reported = reported(prompt, sampling, &original);
            let verification = verify(&verifier, &reported);
            tally.add(index, reported, verification);
            continue;
        }
        let mut resumed = generation(prompt.clone(), sampling, ANSWER_TOKENS);
        resumed.committed = original.token_ids()[..handed_over_after].to_vec();
        let continuation = run(&resumed_on, resumed);
        let mut reported = reported(prompt, sampling, &continuation);
        reported.tokens = original.token_ids()[..handed_over_after]
            .iter()
            .copied()
            .chain(continuation.token_ids())
            .collect();
        reported.logprobs = original.tokens[..handed_over_after]
            .iter()
            .chain(&continuation.tokens)
            .map(|token| token.logprob)
            .collect();
        let verification = verify(&verifier, &reported);
        tally.add(index, reported, verification);
    }

    // Printed for the calibration (docs/VERIFICATION.md).
    eprintln!(
        "honest: {} generations, {} positions, {} passed only by the tolerance, largest logprob \
         difference {:.5}, largest tolerance used {:.5}",
        tally.generations,
        tally.positions,
        tally.not_exact,
        tally.max_logprob_difference,
        tally.max_tolerance_used
    );
    for (kind, (positions, not_exact, logprob, needed)) in tally.per_kind.iter().enumerate() {
        eprintln!(
            "  sampling {kind}: {positions} positions, {not_exact} by tolerance, logprob {logprob:.5}, \
             tolerance used {needed:.5}"
        );
    }
    assert!(tally.generations >= 500);
    assert!(
        tally.flagged.is_empty(),
        "{} honest generations flagged, the first: {:?}",
        tally.flagged.len(),
        tally.flagged.first()
    );
}

/// Context of the engines that take [`long_prompt`]s.
const LONG_CONTEXT_TOKENS: u32 = 512;

/// Fewest tokens of a [`long_prompt`]: a prompt prefilled whole is one 64-row tile of flash
/// attention's tiled kernel and more, and its sequence's KV view passes 512 cells (256 used,
/// padded) before the answer starts, where a lone decode row is split across threads.
const LONG_PROMPT_TOKENS_MIN: usize = 260;

/// Generations per group of [`flash_attention_is_verified_either_way`], unless
/// [`FLASH_GROUP_ENV`] says otherwise (the calibration in docs/VERIFICATION.md ran more).
const FLASH_GROUP: usize = 4;
const FLASH_GROUP_ENV: &str = "FLEETGRID_FLASH_CALIBRATION_GROUP";

/// Sequences the generating engines of that test decode together.
const FLASH_PARALLEL: u32 = 8;

fn flash_group() -> usize {
    std::env::var(FLASH_GROUP_ENV)
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|group| *group > 0)
        .unwrap_or(FLASH_GROUP)
}

/// The `index`th long prompt: the openings from the `index`th on, over and over, until the prompt
/// is long enough, ending with the `index`th opening to continue.
fn long_prompt(engine: &Engine, index: usize) -> Vec<TokenId> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    for turn in 1.. {
        text.push_str(OPENINGS[(index + turn) % OPENINGS.len()]);
        text.push_str(". ");
        tokens = engine.tokenizer().tokenize(&text, true).expect("tokenize");
        if tokens.len() >= LONG_PROMPT_TOKENS_MIN {
            break;
        }
    }
    text.push_str(OPENINGS[index % OPENINGS.len()]);
    let prompt = engine.tokenizer().tokenize(&text, true).expect("tokenize");
    assert!(prompt.len() > tokens.len());
    prompt
}

/// One group's tally against each verifier, printed for docs/VERIFICATION.md.
fn print_group(group: &str, verifier: FlashAttention, tally: &Tally) {
    eprintln!(
        "{group}, verified with flash attention {verifier}: {} generations, {} positions, {} \
         passed only by the tolerance, largest logprob difference {:.5}, largest tolerance used \
         {:.5}",
        tally.generations,
        tally.positions,
        tally.not_exact,
        tally.max_logprob_difference,
        tally.max_tolerance_used
    );
}

/// Every setting of `engine::FlashAttention` against verifiers of every setting (the
/// datacenter's and most vehicles' are `off`; a vehicle of another setting verifies too): long
/// prompts, so that flash attention's prefill goes through its tiled kernel and its decode
/// through the split-KV merge, the two paths whose numbers depend on the batch and the threads.
/// `fast` answers are generated in changing batches and also handed over to an engine with
/// another thread count: the weaker guarantee's continuation must still pass.
#[test]
fn flash_attention_is_verified_either_way() {
    let size = flash_group();
    let verifiers = FlashAttention::ALL.map(|setting| (setting, long_engine(2, 1, setting)));
    // Each group: its name, the setting that computed it, its answers by index.
    type Group = (&'static str, FlashAttention, Vec<(usize, Reported)>);
    let mut groups: Vec<Group> = Vec::new();
    for (group, attention, first) in [
        ("off, batched", FlashAttention::Off, 0),
        ("exact, batched", FlashAttention::Exact, size),
        ("fast, batched", FlashAttention::Fast, 2 * size),
    ] {
        let node = long_engine(2, FLASH_PARALLEL, attention);
        let range = first..first + size;
        let answers = generate_together_from(&node, range.clone(), long_prompt);
        groups.push((group, attention, range.zip(answers).collect()));
    }
    // `fast`, handed over after 1 to 8 tokens from a batch of two threads to one thread.
    let node = long_engine(2, FLASH_PARALLEL, FlashAttention::Fast);
    let resumed_on = long_engine(1, 4, FlashAttention::Fast);
    let first = 3 * size;
    let mut handed_over = Vec::new();
    let originals = generate_together_from(&node, first..first + size, long_prompt);
    for (index, original) in (first..).zip(originals) {
        let after = 1 + index % 8;
        if original.tokens.len() <= after {
            handed_over.push((index, original));
            continue;
        }
        let mut resumed = generation(original.prompt.clone(), original.sampling, ANSWER_TOKENS);
        resumed.committed = original.tokens[..after].to_vec();
        let continuation = run(&resumed_on, resumed);
        let mut reported = reported(original.prompt.clone(), original.sampling, &continuation);
        // No gap and no duplicate: the continuation starts right after the committed tokens.
        reported.tokens = original.tokens[..after]
            .iter()
            .copied()
            .chain(continuation.token_ids())
            .collect();
        reported.logprobs = original.logprobs[..after]
            .iter()
            .copied()
            .chain(continuation.tokens.iter().map(|token| token.logprob))
            .collect();
        assert!(reported.tokens.len() <= ANSWER_TOKENS as usize);
        handed_over.push((index, reported));
    }
    groups.push(("fast, handed over", FlashAttention::Fast, handed_over));

    let mut flagged = Vec::new();
    for (group, producer, answers) in &groups {
        assert!(answers
            .iter()
            .all(|(_, answer)| answer.prompt.len() >= LONG_PROMPT_TOKENS_MIN));
        for (name, verifier) in &verifiers {
            // As an agent chooses it: the default between engines of one setting, wider
            // between settings.
            let tolerance = engine::tolerance(*name, Some(*producer));
            let mut tally = Tally::default();
            for (index, answer) in answers {
                let verification = verify_within(verifier, answer, tolerance);
                tally.add(*index, answer.clone(), verification);
            }
            print_group(group, *name, &tally);
            flagged.extend(tally.flagged.into_iter().map(|flag| (*group, *name, flag)));
        }
    }
    assert!(
        flagged.is_empty(),
        "{} honest generations flagged, the first: {:?}",
        flagged.len(),
        flagged.first()
    );
}

/// Answers a cheating node could report for the prompt and sampling of an honest one.
fn cheats(engine: &Engine, honest: &Reported, index: usize) -> Vec<(&'static str, Reported)> {
    let vocabulary = engine.tokenizer().vocab_size();
    let mut cheats = Vec::new();
    // Random tokens, with believable log-probabilities.
    let mut random = honest.clone();
    random.tokens = (0..ANSWER_TOKENS)
        .map(|position| {
            let unit = engine::sampler::uniform_for_position(index as u64, position);
            (unit * f64::from(vocabulary)) as TokenId
        })
        .collect();
    random.logprobs = vec![-2.0; random.tokens.len()];
    random.ended_by_eos = false;
    cheats.push(("random tokens", random));
    // The answer drawn with another seed: the right model, not the draw that was asked for.
    let mut reseeded = honest.sampling;
    reseeded.seed ^= 0xDEAD_BEEF;
    let outcome = run(
        engine,
        generation(honest.prompt.clone(), reseeded, ANSWER_TOKENS),
    );
    let mut other_seed = reported(honest.prompt.clone(), honest.sampling, &outcome);
    other_seed.sampling = honest.sampling;
    cheats.push(("another seed's answer", other_seed));
    // Replayed: the answer to another prompt.
    let other = OPENINGS[(index + 7) % OPENINGS.len()];
    let other_prompt = engine.tokenizer().tokenize(other, true).expect("tokenize");
    let outcome = run(
        engine,
        generation(other_prompt, honest.sampling, ANSWER_TOKENS),
    );
    cheats.push((
        "another prompt's answer",
        reported(honest.prompt.clone(), honest.sampling, &outcome),
    ));
    // Cut short: half the answer, said to end there.
    let mut truncated = honest.clone();
    let half = honest.tokens.len() / 2;
    truncated.tokens.truncate(half);
    truncated.logprobs.truncate(half);
    truncated.ended_by_eos = true;
    cheats.push(("a truncated answer", truncated));
    // The right tokens with made-up log-probabilities.
    let mut logprobs = honest.clone();
    for logprob in &mut logprobs.logprobs {
        *logprob = (*logprob + 2.0).min(0.0) - 0.01;
    }
    cheats.push(("inflated log-probabilities", logprobs));
    cheats
}

#[test]
fn answers_a_cheating_node_could_report_are_flagged() {
    let verifier = engine_with(2, 1);
    let node = engine_with(2, 4);
    let mut caught = std::collections::BTreeMap::<&str, (u32, u32)>::new();
    let mut caught_wider = caught.clone();
    for (index, opening) in OPENINGS.iter().enumerate().take(10) {
        // Raw text the model keeps writing (it has no reason to stop), sampled warm.
        let prompt = node.tokenizer().tokenize(opening, true).expect("tokenize");
        let sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 40,
            seed: 77 + index as u64,
            min_p: 0.0,
        };
        let outcome = run(&node, generation(prompt.clone(), sampling, ANSWER_TOKENS));
        let honest = reported(prompt, sampling, &outcome);
        assert!(verify(&verifier, &honest).passed(), "{honest:?}");
        for (kind, cheat) in cheats(&node, &honest, index) {
            if cheat.tokens == honest.tokens && cheat.logprobs == honest.logprobs {
                // This cheat happened to report the honest answer: nothing to catch.
                continue;
            }
            let verification = verify(&verifier, &cheat);
            let entry = caught.entry(kind).or_default();
            entry.1 += 1;
            if !verification.passed() {
                entry.0 += 1;
            }
            // Verified across attention settings, with the wider tolerance.
            let wider = verify_within(&verifier, &cheat, engine::FLASH_ATTENTION_TOLERANCE);
            let entry = caught_wider.entry(kind).or_default();
            entry.1 += 1;
            if !wider.passed() {
                entry.0 += 1;
            }
            if kind == "a truncated answer" {
                assert!(
                    matches!(
                        verification.mismatches.last(),
                        Some(Mismatch::EndedEarly { .. })
                    ),
                    "{verification:?}"
                );
            }
        }
    }
    eprintln!("caught per kind (caught, tried): {caught:?}");
    eprintln!("with the tolerance across attention settings: {caught_wider:?}");
    assert_eq!(caught.len(), 5, "{caught:?}");
    for (kind, (flagged, tried)) in caught {
        assert!(tried >= 5, "{kind}: only {tried} tried");
        assert_eq!(flagged, tried, "{kind}: {flagged} of {tried} flagged");
    }
    // The wider tolerance lets more honest rounding pass, and with it some draws made with
    // another seed: the right model's tokens, each within the widened interval of its position
    // (docs/VERIFICATION.md). Every other kind is still caught by every check.
    for (kind, (flagged, tried)) in caught_wider {
        if kind == "another seed's answer" {
            assert!(2 * flagged > tried, "{kind}: {flagged} of {tried} flagged");
        } else {
            assert_eq!(flagged, tried, "{kind}: {flagged} of {tried} flagged");
        }
    }
}

/// A structured answer is verified with its grammar replayed: honest answers drawn under a JSON
/// schema pass at any temperature, ending where the grammar completes them; the same prompt's
/// unconstrained answer reported as the structured one fails.
#[test]
fn a_grammar_constrained_answer_is_verified_with_its_grammar() {
    const STRUCTURED_TOKENS: u32 = 40;
    let verifier = engine_with(2, 1);
    let node = engine_with(1, 2);
    let grammar = engine::json_schema_grammar(&serde_json::json!({
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "why": {"type": "string", "maxLength": 24},
        },
        "required": ["colour", "why"],
        "additionalProperties": false,
    }));
    let prompt = chat_prompt(&node, "Pick a colour and say why, as JSON.");
    let (mut ended_by_the_grammar, mut forgeries) = (0, 0);
    for (index, temperature) in [0.0, 0.7, 1.0, 1.3].into_iter().enumerate() {
        let sampling = SamplingParams {
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed: 500 + index as u64,
            min_p: 0.0,
        };
        let mut constrained = generation(prompt.clone(), sampling, STRUCTURED_TOKENS);
        constrained.grammar = Some(grammar.clone());
        let outcome = run(&node, constrained);
        let honest = reported(prompt.clone(), sampling, &outcome);
        if honest.ended_by_eos {
            ended_by_the_grammar += 1;
            serde_json::from_str::<serde_json::Value>(&outcome.text())
                .unwrap_or_else(|error| panic!("T={temperature}: {error}"));
        }
        let verification = verify_as(
            &verifier,
            &honest,
            Some(&grammar),
            0,
            STRUCTURED_TOKENS,
            DEFAULT,
        );
        assert!(
            verification.passed(),
            "T={temperature}: {verification:?} {honest:?}"
        );

        let free = run(
            &node,
            generation(prompt.clone(), sampling, STRUCTURED_TOKENS),
        );
        let forged = reported(prompt.clone(), sampling, &free);
        if forged.tokens == honest.tokens {
            // The model wrote the structured answer unasked: nothing to catch.
            continue;
        }
        let verification = verify_as(
            &verifier,
            &forged,
            Some(&grammar),
            0,
            STRUCTURED_TOKENS,
            DEFAULT,
        );
        assert!(
            !verification.passed(),
            "T={temperature}: an unconstrained answer passed as structured: {:?}",
            free.text()
        );
        forgeries += 1;
    }
    assert!(ended_by_the_grammar > 0, "no answer finished its JSON");
    assert!(
        forgeries >= 2,
        "only {forgeries} unconstrained answers differed"
    );
}

/// An answer resumed from tokens committed elsewhere is checked from the first token after
/// them: those are replayed as context, not checked, and the rest is checked as ever.
#[test]
fn a_resumed_answers_own_tokens_are_checked_after_the_given_ones() {
    let verifier = engine_with(2, 1);
    let node = engine_with(1, 2);
    for index in 0..10 {
        let prompt = prompt(&node, index);
        let sampling = sampling(index);
        let outcome = run(&node, generation(prompt.clone(), sampling, ANSWER_TOKENS));
        let honest = reported(prompt, sampling, &outcome);
        let length = honest.tokens.len() as u32;
        let given = (1 + index as u32 % 6).min(length);
        let verification = verify_as(&verifier, &honest, None, given, ANSWER_TOKENS, DEFAULT);
        assert!(verification.passed(), "{verification:?} {honest:?}");
        let end = u32::from(honest.ended_by_eos);
        assert_eq!(verification.checked, length - given + end, "{honest:?}");

        // A forged token after the given ones fails where it is.
        if given < length {
            let mut forged = honest.clone();
            let at = (given + (length - given) / 2) as usize;
            forged.tokens[at] = (forged.tokens[at] + 1_009) % 40_000;
            let verification = verify_as(&verifier, &forged, None, given, ANSWER_TOKENS, DEFAULT);
            assert!(!verification.passed(), "{forged:?}");
            assert_eq!(
                verification.mismatches[0].position(),
                at as u32,
                "{verification:?}"
            );
        }
    }
}

/// Makes [`answers_of_other_cpu_variants_pass_the_best_ones_check`] compute its answers and
/// print them, one per line, instead of checking: its child processes, and a build for another
/// machine (an aarch64 build under emulation) whose answers are to be checked here.
#[cfg(feature = "cpu-dispatch")]
const ANSWERS_CHILD_ENV: &str = "FLEETGRID_TEST_PRINT_ANSWERS";

/// Files of answers printed so elsewhere, checked as well: `NAME=PATH,NAME=PATH`.
#[cfg(feature = "cpu-dispatch")]
const FOREIGN_ANSWERS_ENV: &str = "FLEETGRID_TEST_FOREIGN_ANSWERS";

/// Answers computed by each producer: short prompts alone, short prompts batched, long prompts
/// batched.
#[cfg(feature = "cpu-dispatch")]
const PRODUCER_ANSWERS: [usize; 3] = [10, 30, 16];

/// Producers whose answers must pass the best variant's check at the default tolerance: the
/// default build's kernels. Others (SSE4.2 alone, ARM's) must pass the wider
/// `engine::FLASH_ATTENTION_TOLERANCE`; docs/VERIFICATION.md has what each needed.
#[cfg(feature = "cpu-dispatch")]
const AT_DEFAULT_TOLERANCE: [&str; 1] = ["haswell"];

/// The answers of [`PRODUCER_ANSWERS`], computed with the CPU kernels this process loaded.
#[cfg(feature = "cpu-dispatch")]
fn produce_answers() -> Vec<(usize, Reported)> {
    let [alone, batched, long] = PRODUCER_ANSWERS;
    let node = engine_with(1, 1);
    let mut answers: Vec<(usize, Reported)> = (0..alone)
        .map(|index| {
            let (prompt, sampling) = (prompt(&node, index), sampling(index));
            let outcome = run(&node, generation(prompt.clone(), sampling, ANSWER_TOKENS));
            (index, reported(prompt, sampling, &outcome))
        })
        .collect();
    let node = engine_with(2, 8);
    let range = alone..alone + batched;
    answers.extend(range.clone().zip(generate_together(&node, range)));
    let node = long_engine(2, FLASH_PARALLEL, FlashAttention::Off);
    let range = alone + batched..alone + batched + long;
    answers.extend(
        range
            .clone()
            .zip(generate_together_from(&node, range, long_prompt)),
    );
    answers
}

/// One answer as a line: `answer INDEX ENDED_BY_EOS TOKENS LOGPROB_BITS`, lists comma-separated.
#[cfg(feature = "cpu-dispatch")]
fn answer_line(index: usize, answer: &Reported) -> String {
    let join = |values: Vec<String>| values.join(",");
    format!(
        "answer {index} {} {} {}",
        answer.ended_by_eos,
        join(answer.tokens.iter().map(ToString::to_string).collect()),
        join(
            answer
                .logprobs
                .iter()
                .map(|p| p.to_bits().to_string())
                .collect()
        ),
    )
}

/// The answers in `text`'s answer lines, their prompts and samplings rebuilt from their indexes
/// with `engine`'s tokenizer.
#[cfg(feature = "cpu-dispatch")]
fn parse_answers(engine: &Engine, text: &str) -> Vec<(usize, Reported)> {
    fn numbers<T: std::str::FromStr>(text: &str) -> Vec<T>
    where
        T::Err: std::fmt::Debug,
    {
        let parse = |n: &str| n.parse().expect("a number");
        text.split(',')
            .filter(|n| !n.is_empty())
            .map(parse)
            .collect()
    }
    let [alone, batched, _] = PRODUCER_ANSWERS;
    let mut answers = Vec::new();
    for line in text.lines().filter_map(|line| line.strip_prefix("answer ")) {
        let [index, eos, tokens, logprobs] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("a malformed answer line {line:?}");
        };
        let index: usize = index.parse().expect("an index");
        let prompt = if index < alone + batched {
            prompt(engine, index)
        } else {
            long_prompt(engine, index)
        };
        let answer = Reported {
            prompt,
            sampling: sampling(index),
            tokens: numbers::<TokenId>(tokens),
            logprobs: numbers::<u32>(logprobs)
                .into_iter()
                .map(f32::from_bits)
                .collect(),
            ended_by_eos: eos == "true",
        };
        answers.push((index, answer));
    }
    answers
}

/// A fleet mixes CPUs, and a build that chooses its kernels at run time (`cpu-dispatch`)
/// computes with other instructions on each: the datacenter's verifier may run AVX-512 kernels
/// where the vehicle ran AVX2, or ARM's. Answers computed with other x86-64 variants than the
/// best this machine runs (each in its own process, since a process loads one), and any
/// computed elsewhere ([`FOREIGN_ANSWERS_ENV`]), are checked by the best one: at the default
/// tolerance for the default build's kernels, at the wider one for the rest
/// ([`AT_DEFAULT_TOLERANCE`]). Printed for docs/VERIFICATION.md; where the best variant is a
/// child's, that child is skipped.
#[cfg(feature = "cpu-dispatch")]
#[test]
fn answers_of_other_cpu_variants_pass_the_best_ones_check() {
    const NAME: &str = "answers_of_other_cpu_variants_pass_the_best_ones_check";
    if std::env::var_os(ANSWERS_CHILD_ENV).is_some() {
        // After the test runner's "test NAME ... ", which ends no line.
        println!();
        for (index, answer) in produce_answers() {
            println!("{}", answer_line(index, &answer));
        }
        return;
    }
    let verifier = long_engine(2, 1, FlashAttention::Off);
    let best = engine::dispatch::loaded_variant().expect("a CPU kernel module is loaded");
    let mut producers: Vec<(String, String)> = Vec::new();
    let children: &[&str] = if cfg!(target_arch = "x86_64") {
        &["haswell", "sse42"]
    } else {
        &[]
    };
    for variant in children.iter().filter(|variant| **variant != best) {
        let child = std::process::Command::new(std::env::current_exe().expect("this test"))
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(ANSWERS_CHILD_ENV, "1")
            .env(engine::dispatch::VARIANT_ENV, variant)
            .output()
            .expect("run the child");
        assert!(
            child.status.success(),
            "{variant}: {}",
            String::from_utf8_lossy(&child.stderr)
        );
        let stdout = String::from_utf8_lossy(&child.stdout).into_owned();
        producers.push((variant.to_string(), stdout));
    }
    for named in std::env::var(FOREIGN_ANSWERS_ENV)
        .unwrap_or_default()
        .split(',')
    {
        let Some((name, path)) = named.split_once('=') else {
            continue;
        };
        let text = std::fs::read_to_string(path).expect("read the foreign answers");
        producers.push((name.to_owned(), text));
    }
    let mut flagged = Vec::new();
    for (producer, text) in producers {
        let answers = parse_answers(&verifier, &text);
        assert_eq!(
            answers.len(),
            PRODUCER_ANSWERS.iter().sum::<usize>(),
            "{producer}: {text}"
        );
        let mut tally = Tally::default();
        for (index, answer) in answers {
            let verification = verify(&verifier, &answer);
            tally.add(index, answer, verification);
        }
        // What the wider tolerance (the one across attention settings) makes of those the
        // default flags.
        let still_flagged: Vec<_> = tally
            .flagged
            .iter()
            .filter(|(answer, _)| {
                !verify_within(&verifier, answer, engine::FLASH_ATTENTION_TOLERANCE).passed()
            })
            .cloned()
            .collect();
        eprintln!(
            "{producer} answers, verified by {best}: {} generations, {} positions, {} passed \
             only by the tolerance, largest logprob difference {:.5}, largest tolerance used \
             {:.5}; flagged at the default tolerance {}, at the wider one {}",
            tally.generations,
            tally.positions,
            tally.not_exact,
            tally.max_logprob_difference,
            tally.max_tolerance_used,
            tally.flagged.len(),
            still_flagged.len(),
        );
        // The default build's kernels (AVX2) must pass at the default tolerance; every
        // producer's must at the wider one.
        let must_pass = if AT_DEFAULT_TOLERANCE.contains(&producer.as_str()) {
            tally.flagged
        } else {
            still_flagged
        };
        flagged.extend(must_pass.into_iter().map(|flag| (producer.clone(), flag)));
    }
    assert!(
        flagged.is_empty(),
        "{} honest generations flagged, the first: {:?}",
        flagged.len(),
        flagged.first()
    );
}
