//! What a generation's numbers depend on, with llama.cpp's flash attention off and on, with
//! its default kernels and with ggml's reference kernels (`EngineConfig::reference_kernels`).
//!
//! A generation moved to another vehicle continues from its committed tokens; fleetgrid promises
//! the continuation is the one the first vehicle would have produced, token for token and
//! log-probability for log-probability. That holds only if a sequence's logits do not depend on
//! what else the engine does: the other sequences in its batch, the thread count, how its prompt
//! was cut into chunks, the size of its KV cache, or whether its past came from decoding one
//! token at a time or from prefilling it again after a handover.
//!
//! This runs one seeded generation per prompt as the reference (alone, 2 threads, prompt in one
//! chunk, 512 tokens of context, decoded uninterrupted) and again under each changed condition,
//! in four columns (flash attention off and on, each with both kinds of kernels), and prints
//! how many answers kept every token and every log-probability bit, and the largest
//! log-probability difference seen.
//!
//! ```sh
//! cargo run --release -p engine --example attention_identity [-- MODEL.gguf]
//! ```
//! Without an argument it uses the test model (`FLEETGRID_TEST_MODEL` or the model store).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{chat_prompt, collect, config, first_token, generation, run, sampled, Outcome};
use engine::{Engine, EngineConfig, Generation};

/// Tokens generated per answer.
const ANSWER_TOKENS: u32 = 48;
/// Committed tokens a resumed generation starts from.
const RESUMED_AFTER: usize = 16;
/// Numbers counted in front of a long prompt's question: about 220 tokens with the question, so that a prompt
/// prefilled at once is at least one 64-row tile of the flash-attention kernel, and so that its
/// sequence passes 256 cells, where llama.cpp's KV view grows to 512.
const LONG_PREAMBLE_NUMBERS: u32 = 50;

const QUESTIONS: [&str; 4] = [
    "Tell me a story about a robot who learns to paint.",
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "What should I pack for a week of hiking?",
];

/// How a variant's answer compares with the reference's.
#[derive(Default)]
struct Tally {
    answers: u32,
    same_tokens: u32,
    same_bits: u32,
    /// Largest |Δ logprob| over the positions before the first differing token.
    max_difference: f32,
    /// Earliest position at which a token differed.
    first_divergence: Option<usize>,
}

impl Tally {
    /// Compares `variant` with `reference` from `offset` on (the reference's position of the
    /// variant's first token).
    fn add(&mut self, reference: &Outcome, variant: &Outcome, offset: usize) {
        self.answers += 1;
        let expected = &reference.tokens[offset..];
        let mut same_bits = expected.len() == variant.tokens.len();
        let mut same_tokens = same_bits;
        for (index, (want, got)) in expected.iter().zip(&variant.tokens).enumerate() {
            if want.token != got.token {
                same_tokens = false;
                same_bits = false;
                let position = offset + index;
                self.first_divergence =
                    Some(self.first_divergence.map_or(position, |p| p.min(position)));
                break;
            }
            if want.logprob.to_bits() != got.logprob.to_bits() {
                same_bits = false;
            }
            self.max_difference = self.max_difference.max((want.logprob - got.logprob).abs());
        }
        self.same_tokens += u32::from(same_tokens);
        self.same_bits += u32::from(same_bits);
    }

    fn cell(&self) -> String {
        let divergence = self
            .first_divergence
            .map_or_else(String::new, |position| format!(", first at {position}"));
        format!(
            "{}/{} tokens{divergence}, {}/{} bits, max Δ {:.2e}",
            self.same_tokens, self.answers, self.same_bits, self.answers, self.max_difference
        )
    }
}

/// One column: flash attention, and whether ggml's reference kernels compute.
#[derive(Clone, Copy)]
struct Kernels {
    flash_attention: bool,
    reference: bool,
}

const COLUMNS: [Kernels; 4] = [
    Kernels {
        flash_attention: false,
        reference: false,
    },
    Kernels {
        flash_attention: true,
        reference: false,
    },
    Kernels {
        flash_attention: false,
        reference: true,
    },
    Kernels {
        flash_attention: true,
        reference: true,
    },
];

fn start(kernels: Kernels, change: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = config(1, 512);
    config.threads = 2;
    config.flash_attention = kernels.flash_attention;
    config.reference_kernels = kernels.reference;
    change(&mut config);
    Engine::start(config).expect("start engine")
}

/// `asked` run on `engine` with three other requests: submitted once its first token is out
/// (`joining`: they share its decode batches), or right with it (prefilled together).
fn in_company(engine: &Engine, asked: &Generation, joining: bool) -> Outcome {
    let mut stream = engine.submit(asked.clone()).expect("submit");
    let head = joining.then(|| first_token(&mut stream));
    let others: Vec<_> = QUESTIONS
        .iter()
        .zip(100_u64..)
        .take(3)
        .map(|(question, seed)| {
            engine
                .submit(request(engine, question, seed))
                .expect("submit")
        })
        .collect();
    let mut outcome = collect(stream);
    if let Some(head) = head {
        outcome.tokens.insert(0, head);
    }
    for other in others {
        collect(other);
    }
    outcome
}

/// The request run on `engine` on its own.
fn alone(engine: &Engine) -> impl Fn(&Generation, &Outcome) -> (Outcome, usize) + '_ {
    move |asked, _| (run(engine, asked.clone()), 0)
}

fn request(engine: &Engine, question: &str, seed: u64) -> Generation {
    let text = if LONG.load(std::sync::atomic::Ordering::Relaxed) {
        let numbers: Vec<String> = (1..=LONG_PREAMBLE_NUMBERS).map(|n| n.to_string()).collect();
        format!("{}.\n{question}", numbers.join(", "))
    } else {
        question.to_owned()
    };
    let mut request = generation(
        chat_prompt(engine, &text),
        sampled(0.8, seed),
        ANSWER_TOKENS,
    );
    request.ignore_eos = true;
    request
}

/// One condition: runs every question under it and tallies against the references.
fn condition(
    references: &[Outcome],
    measure: impl Fn(&Generation, &Outcome) -> (Outcome, usize),
    reference_engine: &Engine,
) -> Tally {
    let mut tally = Tally::default();
    for ((question, seed), reference) in QUESTIONS.iter().zip(1_u64..).zip(references) {
        let request = request(reference_engine, question, seed);
        let (variant, offset) = measure(&request, reference);
        tally.add(reference, &variant, offset);
    }
    tally
}

/// Whether prompts carry the long preamble.
static LONG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() {
    if let Some(model) = std::env::args().nth(1) {
        std::env::set_var("FLEETGRID_TEST_MODEL", model);
    }
    println!("{}", engine::cpu_kernels());
    for long in [false, true] {
        LONG.store(long, std::sync::atomic::Ordering::Relaxed);
        let probe = start(COLUMNS[0], |_| {});
        let prompt_tokens = request(&probe, QUESTIONS[0], 1).prompt.len();
        drop(probe);
        println!();
        println!(
            "{} answers of {ANSWER_TOKENS} tokens (temperature 0.8, seeded) to prompts of about \
             {prompt_tokens} tokens, each against the same request alone, 2 threads, prompt in one \
             chunk, 512 tokens of context",
            QUESTIONS.len()
        );
        println!();
        table();
    }
}

fn table() {
    println!(
        "| condition | flash attention off | flash attention on | reference kernels, flash \
         attention off | reference kernels, flash attention on |"
    );
    println!("|---|---|---|---|---|");
    let mut rows: Vec<(String, [String; 4])> = Vec::new();
    for (column, kernels) in COLUMNS.into_iter().enumerate() {
        let flash_attention = kernels.flash_attention;
        let reference_engine = start(kernels, |_| {});
        let references: Vec<Outcome> = QUESTIONS
            .iter()
            .zip(1_u64..)
            .map(|(question, seed)| {
                run(
                    &reference_engine,
                    request(&reference_engine, question, seed),
                )
            })
            .collect();
        let mut record = |name: &str, tally: Tally| {
            if let Some(row) = rows.iter_mut().find(|(row, _)| row == name) {
                row.1[column] = tally.cell();
            } else {
                let mut cells: [String; 4] = Default::default();
                cells[column] = tally.cell();
                rows.push((name.to_owned(), cells));
            }
        };

        if flash_attention {
            let off = start(
                Kernels {
                    flash_attention: false,
                    ..kernels
                },
                |_| {},
            );
            record(
                "flash attention on against off",
                condition(&references, alone(&off), &reference_engine),
            );
        }
        if kernels.reference {
            let default = start(
                Kernels {
                    reference: false,
                    ..kernels
                },
                |_| {},
            );
            record(
                "reference kernels against the default ones",
                condition(&references, alone(&default), &reference_engine),
            );
        }
        record(
            "again on the same engine (its prompt's cells reused)",
            condition(&references, alone(&reference_engine), &reference_engine),
        );
        let threads = start(kernels, |config| config.threads = 1);
        record(
            "1 thread instead of 2",
            condition(&references, alone(&threads), &reference_engine),
        );
        drop(threads);
        let chunks = start(kernels, |config| config.batch_tokens = 16);
        record(
            "prompt prefilled in 16-token chunks",
            condition(&references, alone(&chunks), &reference_engine),
        );
        drop(chunks);
        let context = start(kernels, |config| config.context_tokens_per_sequence = 2048);
        record(
            "2048 tokens of context instead of 512",
            condition(&references, alone(&context), &reference_engine),
        );
        drop(context);
        let wide = start(kernels, |config| config.parallel_sequences = 4);
        record(
            "alone in a 4-sequence engine",
            condition(&references, alone(&wide), &reference_engine),
        );
        record(
            "decoded beside 3 other sequences",
            condition(
                &references,
                |asked: &Generation, _: &Outcome| (in_company(&wide, asked, true), 0),
                &reference_engine,
            ),
        );
        record(
            "prefilled together with 3 other prompts",
            condition(
                &references,
                |asked: &Generation, _: &Outcome| (in_company(&wide, asked, false), 0),
                &reference_engine,
            ),
        );
        drop(wide);
        let other_node = start(kernels, |_| {});
        record(
            &format!("resumed on another engine after {RESUMED_AFTER} tokens (a handover)"),
            condition(
                &references,
                |request: &Generation, reference: &Outcome| {
                    let mut resumed = request.clone();
                    resumed.committed = reference.token_ids()[..RESUMED_AFTER].to_vec();
                    (run(&other_node, resumed), RESUMED_AFTER)
                },
                &reference_engine,
            ),
        );
    }
    for (name, cells) in rows {
        println!("| {name} | {} |", cells.join(" | "));
    }
}
