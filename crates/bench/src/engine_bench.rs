//! The engine benchmark: our engine's prefill and decode speed against `llama-bench` on the same
//! model file and thread count, in one run.

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::{Engine, EngineConfig};

use crate::process::run_logged;
use crate::reference::{ReferenceBinaries, ENGINE_LLAMA_CPP_DESCRIPTION};
use crate::report::{comparison_table, Comparison};
use crate::BenchError;

/// Prompt length of the prefill test (llama-bench's `pp512`).
pub const PREFILL_TOKENS: u32 = 512;
/// Generated tokens of the decode test (llama-bench's `tg128`).
pub const DECODE_TOKENS: u32 = 128;
/// Measured repetitions on each side (llama-bench `-r`); both also run one untimed warm-up.
pub const ENGINE_BENCH_REPETITIONS: u32 = 3;
/// Our decode speed must reach this fraction of llama-bench's.
pub const DECODE_TARGET_RATIO: f64 = 0.95;
/// Our prefill speed must reach this fraction of llama-bench's.
pub const PREFILL_TARGET_RATIO: f64 = 0.90;

/// The outcome of [`engine()`].
#[derive(Clone, Debug)]
pub struct EngineBenchReport {
    pub model_path: PathBuf,
    pub threads: u32,
    /// What our engine reports about itself.
    pub engine_version: String,
    /// What the reference tools were built from.
    pub reference_version: String,
    /// The CPU flags both llama.cpp builds were configured with.
    pub cpu_flags: String,
    pub prefill: Comparison,
    pub decode: Comparison,
    /// Our (prefill, decode) tokens/s of each measured repetition.
    pub ours_runs: Vec<(f64, f64)>,
}

impl std::fmt::Display for EngineBenchReport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(formatter, "model:     {}", self.model_path.display())?;
        writeln!(formatter, "threads:   {}", self.threads)?;
        writeln!(formatter, "ours:      {}", self.engine_version)?;
        writeln!(
            formatter,
            "reference: llama-bench, {}",
            self.reference_version
        )?;
        writeln!(formatter, "cpu flags: {}", self.cpu_flags)?;
        writeln!(formatter)?;
        let rows = [self.prefill.clone(), self.decode.clone()];
        formatter.write_str(&comparison_table("llama-bench", &rows))
    }
}

/// Measures prefill (512 tokens) and decode (128 tokens) with `llama-bench` and with our engine,
/// each [`ENGINE_BENCH_REPETITIONS`] times, and compares the means.
pub fn engine(
    model_path: &Path,
    threads: u32,
    refs: &ReferenceBinaries,
) -> Result<EngineBenchReport, BenchError> {
    if threads == 0 {
        return Err(BenchError::InvalidSetting(
            "threads must be at least 1".to_owned(),
        ));
    }
    let reference = run_llama_bench(model_path, threads, refs)?;
    let (engine_version, ours_runs) = run_our_engine(model_path, threads)?;
    let mean = |select: fn(&(f64, f64)) -> f64| {
        ours_runs.iter().map(select).sum::<f64>() / ours_runs.len().max(1) as f64
    };
    Ok(EngineBenchReport {
        model_path: model_path.to_owned(),
        threads,
        engine_version: format!("{engine_version} [{ENGINE_LLAMA_CPP_DESCRIPTION}]"),
        reference_version: refs.llama_cpp_version.clone(),
        cpu_flags: refs.cpu_flags.to_string(),
        prefill: Comparison {
            metric: format!("prefill pp{PREFILL_TOKENS} (tokens/s)"),
            ours: mean(|run| run.0),
            reference: reference.prefill_tokens_per_second,
            target_ratio: PREFILL_TARGET_RATIO,
        },
        decode: Comparison {
            metric: format!("decode tg{DECODE_TOKENS} (tokens/s)"),
            ours: mean(|run| run.1),
            reference: reference.decode_tokens_per_second,
            target_ratio: DECODE_TARGET_RATIO,
        },
        ours_runs,
    })
}

/// Starts our engine with one sequence, as llama-bench runs one, and measures it. The engine's
/// blocking calls run on a thread of their own, so that this may be called from inside an async
/// runtime too.
fn run_our_engine(
    model_path: &Path,
    threads: u32,
) -> Result<(String, Vec<(f64, f64)>), BenchError> {
    let model_path = model_path.to_owned();
    std::thread::spawn(move || measure_our_engine(&model_path, threads))
        .join()
        .map_err(|_| BenchError::Panicked("engine benchmark thread"))?
}

fn measure_our_engine(
    model_path: &Path,
    threads: u32,
) -> Result<(String, Vec<(f64, f64)>), BenchError> {
    let config = EngineConfig {
        threads,
        parallel_sequences: 1,
        ..EngineConfig::new(model_path)
    };
    let engine = Engine::start(config)?;
    // Untimed warm-up, as llama-bench does: it faults in the mapped weights and sizes buffers.
    engine.bench_prefill_decode(PREFILL_TOKENS, DECODE_TOKENS)?;
    let mut runs = Vec::new();
    for _ in 0..ENGINE_BENCH_REPETITIONS {
        runs.push(engine.bench_prefill_decode(PREFILL_TOKENS, DECODE_TOKENS)?);
    }
    Ok((engine.info().engine_version.clone(), runs))
}

/// The reference's mean speeds, from llama-bench's JSON output.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LlamaBenchResult {
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
}

fn run_llama_bench(
    model_path: &Path,
    threads: u32,
    refs: &ReferenceBinaries,
) -> Result<LlamaBenchResult, BenchError> {
    let log_path = refs
        .llama_bench
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("llama-bench.log");
    let mut command = Command::new(&refs.llama_bench);
    command
        .arg("-m")
        .arg(model_path)
        .args(["-t", &threads.to_string()])
        .args(["-p", &PREFILL_TOKENS.to_string()])
        .args(["-n", &DECODE_TOKENS.to_string()])
        .args(["-r", &ENGINE_BENCH_REPETITIONS.to_string()])
        .args(["-o", "json"]);
    let stdout = run_logged(&mut command, "llama-bench", &log_path)?;
    parse_llama_bench_json(&stdout)
}

/// Picks `avg_ts` of the pp512 test (`n_prompt` 512, `n_gen` 0) and the tg128 test (`n_prompt` 0,
/// `n_gen` 128) out of llama-bench's `-o json` array.
fn parse_llama_bench_json(text: &str) -> Result<LlamaBenchResult, BenchError> {
    let parse_error = |reason: String| BenchError::Parse {
        what: "llama-bench json",
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?;
    let tests = value
        .as_array()
        .ok_or_else(|| parse_error("expected an array of tests".to_owned()))?;
    let find = |n_prompt: u32, n_gen: u32| {
        tests
            .iter()
            .find(|test| {
                test["n_prompt"].as_u64() == Some(u64::from(n_prompt))
                    && test["n_gen"].as_u64() == Some(u64::from(n_gen))
            })
            .and_then(|test| test["avg_ts"].as_f64())
            .ok_or_else(|| parse_error(format!("no avg_ts for n_prompt {n_prompt} n_gen {n_gen}")))
    };
    Ok(LlamaBenchResult {
        prefill_tokens_per_second: find(PREFILL_TOKENS, 0)?,
        decode_tokens_per_second: find(0, DECODE_TOKENS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_bench_json_gives_prefill_and_decode() {
        // Shape of `llama-bench -o json` output, trimmed to the fields the parser reads and a few
        // it must ignore.
        let text = r#"[
          {"build_commit": "0c1e570", "n_prompt": 512, "n_gen": 0, "n_threads": 2,
           "avg_ts": 1234.5, "stddev_ts": 10.0, "samples_ts": [1230.0, 1239.0]},
          {"build_commit": "0c1e570", "n_prompt": 0, "n_gen": 128, "n_threads": 2,
           "avg_ts": 98.25, "stddev_ts": 1.0, "samples_ts": [98.0, 98.5]}
        ]"#;
        let result = parse_llama_bench_json(text).expect("parse");
        assert_eq!(result.prefill_tokens_per_second, 1234.5);
        assert_eq!(result.decode_tokens_per_second, 98.25);
    }

    #[test]
    fn llama_bench_json_without_decode_test_is_an_error() {
        let text = r#"[{"n_prompt": 512, "n_gen": 0, "avg_ts": 1.0}]"#;
        assert!(matches!(
            parse_llama_bench_json(text),
            Err(BenchError::Parse { .. })
        ));
    }
}
