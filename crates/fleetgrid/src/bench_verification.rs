//! `fleetgrid bench verification`: what checking untrusted vehicles costs and what it catches.
//!
//! (a) The cost of a check, on the real model, side by side: the same answers generated (eight
//! streams together, as a vehicle serves them, and one at a time) and then verified by
//! recomputation (`engine::verify`); the ratio of verification time to generation time.
//! (b) The adversarial simulation (`trust::adversarial`): a fleet with 5 % cheaters of six
//! kinds and colluding pairs under the production verification policy, over several seeds.
//! (c) Honest nodes' safety: the same on a small fleet over many seeds, counting honest nodes
//! quarantined.
//! (d) With `--detect`: what one check catches, on real models: answers from a smaller model of
//! the same tokenizer (`--smaller-model`) and from the model requantized coarser
//! (`--coarser-type`, with the reference build's `llama-quantize`), each verified on the
//! model; the shares flagged are the simulation's detection probabilities for those kinds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use engine::{
    Adjustments, Engine, EngineConfig, FinishReason, Generation, GenerationEvent, SamplingParams,
    TokenId, Verification, Verify,
};
use trust::adversarial::{self, AdversarialConfig, AdversarialRun};

use crate::home;

#[derive(Args, Debug)]
pub struct VerificationArgs {
    /// Vehicles in the simulated fleet of part (b).
    #[arg(long, default_value_t = 1_000)]
    nodes: u32,
    /// Generations each live vehicle serves in part (b).
    #[arg(long, default_value_t = 1_000)]
    rounds: u32,
    /// Seeds of part (b).
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Seeds of part (c), the honest-safety sweep.
    #[arg(long, default_value_t = 10_000)]
    safety_seeds: u64,
    /// Vehicles and generations per vehicle in each run of part (c).
    #[arg(long, default_value_t = 200)]
    safety_nodes: u32,
    #[arg(long, default_value_t = 500)]
    safety_rounds: u32,
    /// Share of first verifications done by datacenter nodes.
    #[arg(long, default_value_t = 0.1)]
    datacenter_share: f64,
    /// Probability that an honest answer fails a check, for a sensitivity run (0: none seen in
    /// the calibration).
    #[arg(long, default_value_t = 0.0)]
    honest_failure: f64,
    /// Verification compute over generation compute; measured in part (a) when not given.
    #[arg(long)]
    verification_cost: Option<f64>,
    /// The model of part (a).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Answers generated and verified in part (a).
    #[arg(long, default_value_t = 64)]
    answers: u32,
    /// Threads for part (a)'s engines and for the simulations.
    #[arg(long)]
    threads: Option<u32>,
    /// Run part (d) first and use its shares in the simulation.
    #[arg(long)]
    detect: bool,
    /// A cheaper model with the same tokenizer as `--model`, for part (d).
    #[arg(long)]
    smaller_model: Option<String>,
    /// The coarser quantization of `--model` for part (d), as llama-quantize names it.
    #[arg(long, default_value = "Q2_K")]
    coarser_type: String,
    /// Answers per cheating model in part (d), and their length.
    #[arg(long, default_value_t = 40)]
    detect_answers: u32,
    #[arg(long, default_value_t = 48)]
    detect_tokens: u32,
    /// Also write every figure as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub async fn run(args: VerificationArgs) -> anyhow::Result<()> {
    let threads = crate::bench::threads_or_all(args.threads);
    let mut detection_shares = adversarial::Detection::default();
    let mut detected = Vec::new();
    if args.detect {
        let store = home::model_store()?;
        let model = store.resolve(&args.model).context("resolve the model")?;
        let mut cheats = Vec::new();
        if let Some(smaller) = &args.smaller_model {
            let smaller = store
                .resolve(smaller)
                .context("resolve the smaller model")?;
            cheats.push(("smaller model", smaller.path.clone()));
        }
        let coarser_type = args.coarser_type.clone();
        let source = model.path.clone();
        let coarser = tokio::task::spawn_blocking(move || requantize(&source, &coarser_type))
            .await
            .context("requantize task")??;
        cheats.push(("coarser quantization", coarser));
        for (kind, cheat) in cheats {
            let (verifier, answers, tokens) =
                (model.path.clone(), args.detect_answers, args.detect_tokens);
            let row = tokio::task::spawn_blocking(move || {
                measure_detection(&verifier, &cheat, threads, answers, tokens)
            })
            .await
            .context("detection task")??;
            let share = row.flagged_share();
            match kind {
                "smaller model" => detection_shares.smaller_model = share,
                _ => detection_shares.coarser_quantization = share,
            }
            detected.push((kind, row));
        }
        println!("== d. what one check catches, verified on {}\n", args.model);
        println!("| cheat | answers | flagged | greedy flagged | sampled flagged | positions the verifier would have picked |");
        println!("|---|---|---|---|---|---|");
        for (kind, row) in &detected {
            println!("{}", row.table_row(kind));
        }
        println!();
    }
    let cost = match args.verification_cost {
        Some(cost) => {
            println!("== a. cost of a check: given, {cost:.3} of generation compute\n");
            None
        }
        None => {
            let model = home::model_store()?
                .resolve(&args.model)
                .context("resolve the model")?;
            let answers = args.answers;
            let path = model.path.clone();
            let cost = tokio::task::spawn_blocking(move || measure_cost(path, threads, answers))
                .await
                .context("cost task")??;
            println!("{cost}");
            Some(cost)
        }
    };
    let verification_cost = args
        .verification_cost
        .or(cost.as_ref().map(|cost| cost.ratio_batched))
        .unwrap_or(1.0);
    let config = AdversarialConfig {
        nodes: args.nodes,
        rounds: args.rounds,
        datacenter_share: args.datacenter_share,
        honest_failure: args.honest_failure,
        verification_cost,
        detection: detection_shares.clone(),
        ..AdversarialConfig::default()
    };
    let started = Instant::now();
    let runs = run_seeds(&config, 0..args.seeds, threads).await?;
    let detection = adversarial::summarize(&config, &runs);
    println!(
        "== b. adversarial fleet: {} vehicles, {} generations each, {:.0} % cheaters + {} colluding pairs, {} seeds ({:.1} s)\n",
        config.nodes,
        config.rounds,
        config.cheater_share * 100.0,
        config.colluding_pairs,
        args.seeds,
        started.elapsed().as_secs_f64()
    );
    println!("{detection}\n");
    let safety_config = AdversarialConfig {
        nodes: args.safety_nodes,
        rounds: args.safety_rounds,
        colluding_pairs: 1,
        ..config.clone()
    };
    let started = Instant::now();
    let safety_runs = run_seeds(&safety_config, 0..args.safety_seeds, threads).await?;
    let safety = adversarial::summarize(&safety_config, &safety_runs);
    println!(
        "== c. honest nodes' safety: {} vehicles, {} generations each, {} seeds ({:.1} s)\n",
        safety_config.nodes,
        safety_config.rounds,
        args.safety_seeds,
        started.elapsed().as_secs_f64()
    );
    println!(
        "honest nodes quarantined: {} of {}; cheaters caught within {} generations: {:.3} %",
        safety.honest_quarantined,
        safety.honest_nodes,
        adversarial::CATCH_TARGET_GENERATIONS,
        100.0 * safety.caught_within_target()
    );
    if let Some(path) = args.out {
        let json = serde_json::json!({
            "cost": cost.as_ref().map(CostReport::json),
            "verification_cost": verification_cost,
            "detection": detected.iter().map(|(kind, row)| ((*kind).to_owned(), row.json())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "detection_shares": {
                "smaller_model": detection_shares.smaller_model,
                "coarser_quantization": detection_shares.coarser_quantization,
            },
            "simulation": summary_json(&detection),
            "safety": summary_json(&safety),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Runs `seeds` on `threads` threads; each seed's run is independent and deterministic.
async fn run_seeds(
    config: &AdversarialConfig,
    seeds: std::ops::Range<u64>,
    threads: u32,
) -> anyhow::Result<Vec<AdversarialRun>> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let seeds: Vec<u64> = seeds.collect();
        let chunk = seeds.len().div_ceil(threads.max(1) as usize).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = seeds
                .chunks(chunk)
                .map(|part| {
                    let config = &config;
                    scope.spawn(move || {
                        part.iter()
                            .map(|&seed| adversarial::run(config, seed))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().expect("a simulation thread panicked"))
                .collect()
        })
    })
    .await
    .context("simulation task")
}

fn summary_json(summary: &adversarial::AdversarialSummary) -> serde_json::Value {
    let kind = |kind: &adversarial::KindSummary| {
        serde_json::json!({
            "cheaters": kind.cheaters,
            "quarantined": kind.quarantined,
            "within_target": kind.within_target,
            "generations_p50": kind.generations_p50,
            "generations_p99": kind.generations_p99,
            "bad_answers": kind.bad_answers,
            "bad_answers_unverified": kind.bad_answers_unverified,
            "bad_answers_wrongly_passed": kind.bad_answers_wrongly_passed,
            "bad_answers_clawed_back": kind.bad_answers_clawed_back,
        })
    };
    serde_json::json!({
        "seeds": summary.seeds,
        "kinds": summary
            .kinds
            .iter()
            .map(|(name, summary)| (name.name().to_owned(), kind(summary)))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
        "colluding": kind(&summary.colluding),
        "late": kind(&summary.late),
        "caught_within_target": summary.caught_within_target(),
        "honest_nodes": summary.honest_nodes,
        "honest_quarantined": summary.honest_quarantined,
        "generations": summary.generations,
        "bad_generations": summary.bad_generations,
        "vehicle_verifications": summary.vehicle_verifications,
        "datacenter_verifications": summary.datacenter_verifications,
        "steady_overhead": summary.steady_overhead,
        "overall_overhead": summary.overall_overhead,
    })
}

/// Part (a)'s figures.
struct CostReport {
    answers: u32,
    completion_tokens: u64,
    prompt_tokens: u64,
    generated_batched: Duration,
    generated_alone: Duration,
    verified: Duration,
    flagged: u32,
    ratio_batched: f64,
    ratio_alone: f64,
}

impl CostReport {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "answers": self.answers,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "generated_batched_s": self.generated_batched.as_secs_f64(),
            "generated_alone_s": self.generated_alone.as_secs_f64(),
            "verified_s": self.verified.as_secs_f64(),
            "flagged": self.flagged,
            "ratio_batched": self.ratio_batched,
            "ratio_alone": self.ratio_alone,
        })
    }
}

impl std::fmt::Display for CostReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "== a. cost of a check: {} answers, {} prompt + {} completion tokens",
            self.answers, self.prompt_tokens, self.completion_tokens
        )?;
        writeln!(f, "| | seconds | verification / generation |")?;
        writeln!(f, "|---|---|---|")?;
        writeln!(
            f,
            "| generated, 8 streams together | {:.2} | {:.3} |",
            self.generated_batched.as_secs_f64(),
            self.ratio_batched
        )?;
        writeln!(
            f,
            "| generated, one at a time | {:.2} | {:.3} |",
            self.generated_alone.as_secs_f64(),
            self.ratio_alone
        )?;
        writeln!(
            f,
            "| verified (prefill of prompt + answer, checked) | {:.2} | |",
            self.verified.as_secs_f64()
        )?;
        writeln!(f, "answers flagged: {} of {}", self.flagged, self.answers)
    }
}

/// Prompts for part (a): varied openings the model writes on from.
const OPENINGS: [&str; 8] = [
    "The history of the bicycle begins",
    "Here is a short story about a lighthouse keeper:",
    "Ten tips for a tidy kitchen:\n1.",
    "The main causes of the French Revolution were",
    "A letter to a friend who moved abroad:\nDear Sam,",
    "How a heat pump works:",
    "The rules of chess, explained simply:",
    "Once upon a time in a village by the sea,",
];

const ANSWER_TOKENS: u32 = 128;

fn measure_cost(model: PathBuf, threads: u32, answers: u32) -> anyhow::Result<CostReport> {
    let batched = start_engine(&model, threads, 8)?;
    let prompts = requests(&batched, answers, false)?;
    // As a vehicle serves: eight at a time, the next starting as one ends.
    let started = Instant::now();
    let mut results = Vec::with_capacity(prompts.len());
    for group in prompts.chunks(8) {
        let streams: Vec<_> = group
            .iter()
            .map(|(prompt, sampling)| batched.submit(generation(prompt.clone(), *sampling, None)))
            .collect::<Result<_, _>>()?;
        for stream in streams {
            results.push(drain(stream)?);
        }
    }
    let generated_batched = started.elapsed();
    drop(batched);
    let alone = start_engine(&model, threads, 1)?;
    let started = Instant::now();
    for (prompt, sampling) in &prompts {
        drain(alone.submit(generation(prompt.clone(), *sampling, None))?)?;
    }
    let generated_alone = started.elapsed();
    let started = Instant::now();
    let mut flagged = 0;
    for ((prompt, sampling), answer) in prompts.iter().zip(&results) {
        let verify = Verify {
            completion: answer.tokens.clone(),
            given: 0,
            logprobs: answer.logprobs.clone(),
            ended_by_eos: answer.ended_by_eos,
            tolerance: engine::DEFAULT_TOLERANCE,
        };
        let outcome = drain(alone.submit(generation(prompt.clone(), *sampling, Some(verify)))?)?;
        if !outcome.verification.is_some_and(|found| found.passed()) {
            flagged += 1;
        }
    }
    let verified = started.elapsed();
    Ok(CostReport {
        answers,
        completion_tokens: results
            .iter()
            .map(|answer| answer.tokens.len() as u64)
            .sum(),
        prompt_tokens: prompts.iter().map(|(prompt, _)| prompt.len() as u64).sum(),
        generated_batched,
        generated_alone,
        verified,
        flagged,
        ratio_batched: verified.as_secs_f64() / generated_batched.as_secs_f64(),
        ratio_alone: verified.as_secs_f64() / generated_alone.as_secs_f64(),
    })
}

fn start_engine(model: &std::path::Path, threads: u32, parallel: u32) -> anyhow::Result<Engine> {
    let mut config = EngineConfig::new(model);
    config.parallel_sequences = parallel;
    config.threads = threads;
    config.context_tokens_per_sequence = 512;
    Engine::start(config).context("start an engine")
}

/// `answers` prompts from [`OPENINGS`], each sampled warm with its own seed, or, with
/// `greedy_too`, every other one greedy.
fn requests(
    engine: &Engine,
    answers: u32,
    greedy_too: bool,
) -> anyhow::Result<Vec<(Vec<TokenId>, SamplingParams)>> {
    (0..answers)
        .map(|index| {
            let text = OPENINGS[index as usize % OPENINGS.len()];
            let prompt = engine.tokenizer().tokenize(text, true)?;
            let sampling = if greedy_too && index % 2 == 0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    top_k: 40,
                    seed: u64::from(index),
                    min_p: 0.0,
                }
            };
            Ok((prompt, sampling))
        })
        .collect()
}

fn generation(
    prompt: Vec<TokenId>,
    sampling: SamplingParams,
    verify: Option<Verify>,
) -> Generation {
    Generation {
        prompt,
        committed: Vec::new(),
        sampling,
        max_tokens: ANSWER_TOKENS,
        stop: Vec::new(),
        top_logprobs: 0,
        // Every answer is the full length, generated and verified alike.
        ignore_eos: true,
        adjustments: Adjustments::default(),
        grammar: None,
        restore: None,
        export_checkpoint: false,
        prompt_logprobs: false,
        draft: Vec::new(),
        verify,
    }
}

/// A finished generation or verification.
struct Drained {
    tokens: Vec<TokenId>,
    logprobs: Vec<f32>,
    ended_by_eos: bool,
    verification: Option<Verification>,
}

fn drain(mut stream: engine::GenerationStream) -> anyhow::Result<Drained> {
    let mut drained = Drained {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        ended_by_eos: false,
        verification: None,
    };
    loop {
        match stream.events.blocking_recv() {
            Some(GenerationEvent::Token(token)) => {
                drained.tokens.push(token.token);
                drained.logprobs.push(token.logprob);
            }
            Some(GenerationEvent::Verified(found)) => drained.verification = Some(found),
            Some(GenerationEvent::Done(done)) => {
                drained.ended_by_eos = done.reason == FinishReason::Stop;
                return Ok(drained);
            }
            Some(GenerationEvent::Failed(error)) => bail!("generation failed: {error}"),
            Some(GenerationEvent::Checkpoint(_) | GenerationEvent::PromptLogprobs(_)) => {}
            None => bail!("the engine ended a generation without a result"),
        }
    }
}

/// `model` requantized to `kind` with the reference build's `llama-quantize`, kept beside the
/// reference tools for later runs.
fn requantize(model: &std::path::Path, kind: &str) -> anyhow::Result<PathBuf> {
    let tools = bench::reference::ensure_built(&crate::bench::reference_dir())?;
    let stem = model
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or("model");
    let out = crate::bench::reference_dir().join(format!("{stem}.{kind}.gguf"));
    if out.is_file() {
        return Ok(out);
    }
    let status = std::process::Command::new(&tools.llama_quantize)
        .arg("--allow-requantize")
        .arg(model)
        .arg(&out)
        .arg(kind)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("run llama-quantize")?;
    if !status.success() {
        let _ = std::fs::remove_file(&out);
        bail!("llama-quantize into {kind} failed: {status}");
    }
    Ok(out)
}

/// Part (d)'s figures for one cheating model.
struct DetectionRow {
    answers: u32,
    flagged: u32,
    greedy: (u32, u32),
    sampled: (u32, u32),
    positions: u64,
    exact_positions: u64,
}

impl DetectionRow {
    fn flagged_share(&self) -> f64 {
        f64::from(self.flagged) / f64::from(self.answers.max(1))
    }

    fn table_row(&self, kind: &str) -> String {
        format!(
            "| {kind} | {} | {} ({:.1} %) | {} of {} | {} of {} | {:.1} % |",
            self.answers,
            self.flagged,
            100.0 * self.flagged_share(),
            self.greedy.0,
            self.greedy.1,
            self.sampled.0,
            self.sampled.1,
            100.0 * self.exact_positions as f64 / self.positions.max(1) as f64
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "answers": self.answers,
            "flagged": self.flagged,
            "greedy_flagged": self.greedy.0,
            "greedy": self.greedy.1,
            "sampled_flagged": self.sampled.0,
            "sampled": self.sampled.1,
            "positions": self.positions,
            "exact_positions": self.exact_positions,
        })
    }
}

/// Answers generated by `cheat` (which must share `model`'s tokenizer), each verified on
/// `model`: greedy and sampled alternately.
fn measure_detection(
    model: &std::path::Path,
    cheat: &std::path::Path,
    threads: u32,
    answers: u32,
    tokens: u32,
) -> anyhow::Result<DetectionRow> {
    let verifier = start_engine(model, threads, 1)?;
    let cheater = start_engine(cheat, threads, 8)?;
    let probe = "Tokenizers agree: 12345, héllo, <tag>.";
    if verifier.tokenizer().vocab_size() != cheater.tokenizer().vocab_size()
        || verifier.tokenizer().tokenize(probe, true)?
            != cheater.tokenizer().tokenize(probe, true)?
    {
        bail!(
            "{} does not share the tokenizer of {}",
            cheat.display(),
            model.display()
        );
    }
    let requests = requests(&verifier, answers, true)?;
    let mut row = DetectionRow {
        answers,
        flagged: 0,
        greedy: (0, 0),
        sampled: (0, 0),
        positions: 0,
        exact_positions: 0,
    };
    for group in requests.chunks(8) {
        let streams: Vec<_> = group
            .iter()
            .map(|(prompt, sampling)| {
                let mut generation = generation(prompt.clone(), *sampling, None);
                generation.max_tokens = tokens;
                generation.ignore_eos = false;
                cheater.submit(generation)
            })
            .collect::<Result<_, _>>()?;
        for ((prompt, sampling), stream) in group.iter().zip(streams) {
            let answer = drain(stream)?;
            let verify = Verify {
                completion: answer.tokens,
                given: 0,
                logprobs: answer.logprobs,
                ended_by_eos: answer.ended_by_eos,
                tolerance: engine::DEFAULT_TOLERANCE,
            };
            let mut check = generation(prompt.clone(), *sampling, Some(verify));
            check.max_tokens = tokens;
            check.ignore_eos = false;
            let found = drain(verifier.submit(check)?)?
                .verification
                .context("a verification without its outcome")?;
            let flagged = !found.passed();
            row.flagged += u32::from(flagged);
            let tally = if sampling.is_greedy() {
                &mut row.greedy
            } else {
                &mut row.sampled
            };
            tally.0 += u32::from(flagged);
            tally.1 += 1;
            row.positions += u64::from(found.checked);
            row.exact_positions += u64::from(found.exact);
        }
    }
    Ok(row)
}
