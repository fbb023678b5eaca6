//! The engine benchmark: our engine's prefill and decode speed against `llama-bench` on the same
//! model file and thread count, in one run, twice over: `llama-bench` built on the engine's own
//! llama.cpp library (the same version: a gap is our code), and `llama-cpp-python`'s (an outside
//! anchor: a gap there is also the llama.cpp version).

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::{Engine, EngineConfig, FlashAttention};

use crate::process::run_logged;
use crate::reference::{ReferenceBinaries, ENGINE_LLAMA_CPP_DESCRIPTION};
use crate::report::{comparison_table, Comparison};
use crate::BenchError;

/// Prompt length of the prefill test (llama-bench's `pp512`).
pub const PREFILL_TOKENS: u32 = 512;
/// Generated tokens of the decode test (llama-bench's `tg128`).
pub const DECODE_TOKENS: u32 = 128;
/// Rounds of the comparison unless told otherwise. Each round runs llama-bench once and our engine once, one right
/// after the other, so that both sides see the same machine; the report takes the median over
/// rounds. A small shared machine drifts by more than the difference being measured, so a single
/// run of each side, minutes apart, decides nothing.
pub const ENGINE_BENCH_ROUNDS: u32 = 5;
/// Our decode speed must reach this fraction of the same-version llama-bench's: the same
/// library, so nothing of ours may cost time.
pub const DECODE_TARGET_RATIO: f64 = 1.0;
/// Our prefill speed must reach this fraction of the same-version llama-bench's.
pub const PREFILL_TARGET_RATIO: f64 = 0.95;
/// Against `llama-cpp-python`'s llama-bench (another llama.cpp version) decode must reach this.
pub const ANCHOR_DECODE_TARGET_RATIO: f64 = 0.95;
/// Against `llama-cpp-python`'s llama-bench prefill must reach this.
pub const ANCHOR_PREFILL_TARGET_RATIO: f64 = 0.90;
/// With flash attention where identity allows it (`FlashAttention::Exact`), prefill and decode
/// must reach this against `llama-cpp-python`'s llama-bench with flash attention off.
pub const EXACT_FLASH_ANCHOR_TARGET_RATIO: f64 = 1.2;

/// One round: (prefill, decode) tokens/s of each side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineRound {
    pub ours: (f64, f64),
    /// Ours with `--flash-attention exact`: flash attention on ggml's reference kernels.
    pub ours_exact_flash: (f64, f64),
    /// Ours with `--flash-attention fast`: flash attention on the default kernels.
    pub ours_fast_flash: (f64, f64),
    /// The same-version llama-bench with flash attention set as our engine runs it (off).
    pub same_version: (f64, f64),
    /// The same-version llama-bench with flash attention on, for information.
    pub same_version_flash_attention: (f64, f64),
    /// `llama-cpp-python`'s llama-bench with flash attention off.
    pub reference: (f64, f64),
    /// `llama-cpp-python`'s llama-bench with flash attention on, for information.
    pub reference_flash_attention: (f64, f64),
}

/// The outcome of [`engine()`].
#[derive(Clone, Debug)]
pub struct EngineBenchReport {
    pub model_path: PathBuf,
    pub threads: u32,
    /// What our engine reports about itself.
    pub engine_version: String,
    /// What each reference llama-bench was built from.
    pub same_version: String,
    pub reference_version: String,
    /// The CPU flags both llama.cpp builds were configured with.
    pub cpu_flags: String,
    /// Medians over the rounds against the same-version llama-bench, flash attention off on both
    /// sides (our engine's setting): the targets.
    pub prefill: Comparison,
    pub decode: Comparison,
    /// Medians against the same-version llama-bench with flash attention on (not a target: our
    /// engine keeps it off so that a moved generation resumes bit-exactly).
    pub prefill_vs_flash_attention: Comparison,
    pub decode_vs_flash_attention: Comparison,
    /// Medians against `llama-cpp-python`'s llama-bench, flash attention off, then on.
    pub prefill_vs_anchor: Comparison,
    pub decode_vs_anchor: Comparison,
    pub prefill_vs_anchor_flash_attention: Comparison,
    pub decode_vs_anchor_flash_attention: Comparison,
    /// Ours with `--flash-attention exact`, then `fast`, against `llama-cpp-python`'s
    /// llama-bench with flash attention off: the first is a target
    /// ([`EXACT_FLASH_ANCHOR_TARGET_RATIO`]), the second information (it gives up identity).
    pub exact_flash_vs_anchor: [Comparison; 2],
    pub fast_flash_vs_anchor: [Comparison; 2],
    pub rounds: Vec<EngineRound>,
}

impl std::fmt::Display for EngineBenchReport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(formatter, "model:     {}", self.model_path.display())?;
        writeln!(formatter, "threads:   {}", self.threads)?;
        writeln!(formatter, "ours:      {}", self.engine_version)?;
        writeln!(formatter, "same:      llama-bench, {}", self.same_version)?;
        writeln!(
            formatter,
            "anchor:    llama-bench, {}",
            self.reference_version
        )?;
        writeln!(formatter, "cpu flags: {}", self.cpu_flags)?;
        writeln!(
            formatter,
            "rounds:    {} (each: same-version llama-bench, anchor llama-bench, then ours; medians below)",
            self.rounds.len()
        )?;
        let tables = [
            (
                "same llama.cpp, flash attention off on both sides (the target):",
                "llama-bench",
                [&self.prefill, &self.decode],
            ),
            (
                "same llama.cpp, llama-bench with flash attention on (information only):",
                "llama-bench -fa 1",
                [
                    &self.prefill_vs_flash_attention,
                    &self.decode_vs_flash_attention,
                ],
            ),
            (
                "llama-cpp-python's llama.cpp, flash attention off:",
                "anchor",
                [&self.prefill_vs_anchor, &self.decode_vs_anchor],
            ),
            (
                "llama-cpp-python's llama.cpp with flash attention on (information only):",
                "anchor -fa 1",
                [
                    &self.prefill_vs_anchor_flash_attention,
                    &self.decode_vs_anchor_flash_attention,
                ],
            ),
            (
                "ours with --flash-attention exact (identity kept) against llama-cpp-python's, flash attention off:",
                "anchor",
                [&self.exact_flash_vs_anchor[0], &self.exact_flash_vs_anchor[1]],
            ),
            (
                "ours with --flash-attention fast (identity not kept; information only) against llama-cpp-python's, flash attention off:",
                "anchor",
                [&self.fast_flash_vs_anchor[0], &self.fast_flash_vs_anchor[1]],
            ),
        ];
        for (title, reference, rows) in tables {
            writeln!(formatter)?;
            writeln!(formatter, "{title}")?;
            let rows = rows.map(Clone::clone);
            formatter.write_str(&comparison_table(reference, &rows))?;
        }
        writeln!(formatter)?;
        writeln!(
            formatter,
            "round  ours pp  ours tg  exact pp  exact tg  fast pp  fast tg  same pp  same tg  same-fa pp  same-fa tg  anchor pp  anchor tg  anchor-fa pp  anchor-fa tg"
        )?;
        for (index, round) in self.rounds.iter().enumerate() {
            writeln!(
                formatter,
                "{:>5}  {:>7.1}  {:>7.1}  {:>8.1}  {:>8.1}  {:>7.1}  {:>7.1}  {:>7.1}  {:>7.1}  {:>10.1}  {:>10.1}  {:>9.1}  {:>9.1}  {:>12.1}  {:>12.1}",
                index + 1,
                round.ours.0,
                round.ours.1,
                round.ours_exact_flash.0,
                round.ours_exact_flash.1,
                round.ours_fast_flash.0,
                round.ours_fast_flash.1,
                round.same_version.0,
                round.same_version.1,
                round.same_version_flash_attention.0,
                round.same_version_flash_attention.1,
                round.reference.0,
                round.reference.1,
                round.reference_flash_attention.0,
                round.reference_flash_attention.1
            )?;
        }
        Ok(())
    }
}

/// Median of a non-empty list (mean of the middle two for an even count); 0 when empty.
pub(crate) fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Measures prefill (512 tokens) and decode (128 tokens) in `rounds` interleaved rounds of both
/// llama-benches and our engine, and compares the medians.
pub fn engine(
    model_path: &Path,
    threads: u32,
    rounds: u32,
    same: &ReferenceBinaries,
    refs: &ReferenceBinaries,
) -> Result<EngineBenchReport, BenchError> {
    if threads == 0 || rounds == 0 {
        return Err(BenchError::InvalidSetting(
            "threads and rounds must be at least 1".to_owned(),
        ));
    }
    let model = model_path.to_owned();
    let thread_refs = [same.clone(), refs.clone()];
    // The engine's blocking calls run on a thread of their own, so that this may be called from
    // inside an async runtime too.
    let (engine_version, rounds) =
        std::thread::spawn(move || measure_rounds(&model, threads, rounds, &thread_refs))
            .join()
            .map_err(|_| BenchError::Panicked("engine benchmark thread"))??;
    let prefill_metric = format!("prefill pp{PREFILL_TOKENS} (tokens/s)");
    let decode_metric = format!("decode tg{DECODE_TOKENS} (tokens/s)");
    // One of our settings' prefill and decode against one reference's, each round's.
    type Pick = fn(&EngineRound) -> (f64, f64);
    let settings_against = |ours: Pick, reference: Pick, (prefill, decode): (f64, f64)| {
        let compare = |metric: &str, pick: fn((f64, f64)) -> f64, target_ratio: f64| Comparison {
            metric: metric.to_owned(),
            ours: median(rounds.iter().map(|round| pick(ours(round)))),
            reference: median(rounds.iter().map(|round| pick(reference(round)))),
            target_ratio,
        };
        (
            compare(&prefill_metric, |pair| pair.0, prefill),
            compare(&decode_metric, |pair| pair.1, decode),
        )
    };
    let against = |reference: Pick, targets: (f64, f64)| {
        settings_against(|round| round.ours, reference, targets)
    };
    let flash_targets = (
        EXACT_FLASH_ANCHOR_TARGET_RATIO,
        EXACT_FLASH_ANCHOR_TARGET_RATIO,
    );
    let exact_flash_vs_anchor = settings_against(
        |round| round.ours_exact_flash,
        |round| round.reference,
        flash_targets,
    );
    let fast_flash_vs_anchor = settings_against(
        |round| round.ours_fast_flash,
        |round| round.reference,
        flash_targets,
    );
    let targets = (PREFILL_TARGET_RATIO, DECODE_TARGET_RATIO);
    let anchor_targets = (ANCHOR_PREFILL_TARGET_RATIO, ANCHOR_DECODE_TARGET_RATIO);
    let (prefill, decode) = against(|round| round.same_version, targets);
    let (prefill_vs_flash_attention, decode_vs_flash_attention) =
        against(|round| round.same_version_flash_attention, targets);
    let (prefill_vs_anchor, decode_vs_anchor) = against(|round| round.reference, anchor_targets);
    let (prefill_vs_anchor_flash_attention, decode_vs_anchor_flash_attention) =
        against(|round| round.reference_flash_attention, anchor_targets);
    Ok(EngineBenchReport {
        model_path: model_path.to_owned(),
        threads,
        engine_version: format!("{engine_version} [{ENGINE_LLAMA_CPP_DESCRIPTION}]"),
        same_version: same.llama_cpp_version.clone(),
        reference_version: refs.llama_cpp_version.clone(),
        cpu_flags: refs.cpu_flags.to_string(),
        prefill,
        decode,
        prefill_vs_flash_attention,
        decode_vs_flash_attention,
        prefill_vs_anchor,
        decode_vs_anchor,
        prefill_vs_anchor_flash_attention,
        decode_vs_anchor_flash_attention,
        exact_flash_vs_anchor: exact_flash_vs_anchor.into(),
        fast_flash_vs_anchor: fast_flash_vs_anchor.into(),
        rounds,
    })
}

/// Alternates, `rounds` times: the same-version llama-bench, the anchor's, then one measured run
/// of our engine in each flash-attention setting, with one sequence as llama-bench runs one.
///
/// Each setting's engine is started for its run and dropped after it: one engine in the process
/// at a time, as in an agent. llama.cpp's OpenMP threads spin briefly between graphs only while
/// the process has no more of them than cores; three engines' threads in one process halved
/// decode here (63 against 110 tokens/s).
fn measure_rounds(
    model_path: &Path,
    threads: u32,
    rounds: u32,
    [same, anchor]: &[ReferenceBinaries; 2],
) -> Result<(String, Vec<EngineRound>), BenchError> {
    let measure = |setting: FlashAttention| {
        let mut config = EngineConfig {
            threads,
            parallel_sequences: 1,
            ..EngineConfig::new(model_path)
        };
        setting.apply(&mut config);
        let engine = Engine::start(config)?;
        // Untimed warm-up, as llama-bench does: it faults in the mapped weights and sizes
        // buffers.
        engine.bench_prefill_decode(PREFILL_TOKENS, DECODE_TOKENS)?;
        let speeds = engine.bench_prefill_decode(PREFILL_TOKENS, DECODE_TOKENS)?;
        Ok::<_, BenchError>((engine.info().engine_version.clone(), speeds))
    };
    // llama-bench's setting our first engine runs (`FlashAttention::Off`).
    let flash_attention = false;
    let mut engine_version = String::new();
    let mut measured = Vec::new();
    for _ in 0..rounds {
        let same = run_llama_bench(model_path, threads, same)?;
        let reference = run_llama_bench(model_path, threads, anchor)?;
        let (version, ours) = measure(FlashAttention::Off)?;
        engine_version = version;
        let (_, ours_exact_flash) = measure(FlashAttention::Exact)?;
        let (_, ours_fast_flash) = measure(FlashAttention::Fast)?;
        let pick = |results: &[LlamaBenchResult], on: bool| {
            results
                .iter()
                .find(|result| result.flash_attention == on)
                .map(|result| {
                    (
                        result.prefill_tokens_per_second,
                        result.decode_tokens_per_second,
                    )
                })
                .ok_or(BenchError::Parse {
                    what: "llama-bench json",
                    reason: format!("no results with flash attention {on}"),
                })
        };
        measured.push(EngineRound {
            ours,
            ours_exact_flash,
            ours_fast_flash,
            same_version: pick(&same, flash_attention)?,
            same_version_flash_attention: pick(&same, true)?,
            reference: pick(&reference, flash_attention)?,
            reference_flash_attention: pick(&reference, true)?,
        });
    }
    Ok((engine_version, measured))
}

/// The reference's speeds for one flash-attention setting, from llama-bench's JSON output.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LlamaBenchResult {
    flash_attention: bool,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
}

/// One llama-bench run: one repetition of each test, flash attention off and on.
fn run_llama_bench(
    model_path: &Path,
    threads: u32,
    refs: &ReferenceBinaries,
) -> Result<Vec<LlamaBenchResult>, BenchError> {
    let log_path = refs
        .llama_bench
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("llama-bench.log");
    let mut command = Command::new(&refs.llama_bench);
    command
        // The reference runs with llama.cpp's own defaults, not the switch our engine set.
        .env_remove(engine::TILED_MATMUL_ENV)
        .arg("-m")
        .arg(model_path)
        .args(["-t", &threads.to_string()])
        .args(["-p", &PREFILL_TOKENS.to_string()])
        .args(["-n", &DECODE_TOKENS.to_string()])
        .args(["-fa", "0,1"])
        .args(["-r", "1"])
        .args(["-o", "json"]);
    let stdout = run_logged(&mut command, "llama-bench", &log_path)?;
    parse_llama_bench_json(&stdout)
}

/// Picks `avg_ts` of the pp512 test (`n_prompt` 512, `n_gen` 0) and the tg128 test (`n_prompt` 0,
/// `n_gen` 128) for each flash-attention setting out of llama-bench's `-o json` array.
fn parse_llama_bench_json(text: &str) -> Result<Vec<LlamaBenchResult>, BenchError> {
    let parse_error = |reason: String| BenchError::Parse {
        what: "llama-bench json",
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?;
    let tests = value
        .as_array()
        .ok_or_else(|| parse_error("expected an array of tests".to_owned()))?;
    // Older builds write `flash_attn` as a boolean, newer ones as a number or "on"/"off".
    let flash_attention = |test: &serde_json::Value| match &test["flash_attn"] {
        serde_json::Value::Bool(on) => *on,
        serde_json::Value::Number(number) => number.as_i64() == Some(1),
        serde_json::Value::String(text) => text == "on" || text == "1" || text == "true",
        _ => false,
    };
    let mut settings: Vec<bool> = tests.iter().map(flash_attention).collect();
    settings.sort_unstable();
    settings.dedup();
    let find = |on: bool, n_prompt: u32, n_gen: u32| {
        tests
            .iter()
            .find(|test| {
                flash_attention(test) == on
                    && test["n_prompt"].as_u64() == Some(u64::from(n_prompt))
                    && test["n_gen"].as_u64() == Some(u64::from(n_gen))
            })
            .and_then(|test| test["avg_ts"].as_f64())
            .ok_or_else(|| {
                parse_error(format!(
                    "no avg_ts for n_prompt {n_prompt} n_gen {n_gen} flash attention {on}"
                ))
            })
    };
    settings
        .into_iter()
        .map(|on| {
            Ok(LlamaBenchResult {
                flash_attention: on,
                prefill_tokens_per_second: find(on, PREFILL_TOKENS, 0)?,
                decode_tokens_per_second: find(on, 0, DECODE_TOKENS)?,
            })
        })
        .collect()
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
        let results = parse_llama_bench_json(text).expect("parse");
        assert_eq!(results.len(), 1);
        assert!(!results[0].flash_attention);
        assert_eq!(results[0].prefill_tokens_per_second, 1234.5);
        assert_eq!(results[0].decode_tokens_per_second, 98.25);
    }

    #[test]
    fn llama_bench_json_is_split_by_flash_attention() {
        let text = r#"[
          {"n_prompt": 512, "n_gen": 0, "flash_attn": false, "avg_ts": 300.0},
          {"n_prompt": 0, "n_gen": 128, "flash_attn": false, "avg_ts": 90.0},
          {"n_prompt": 512, "n_gen": 0, "flash_attn": true, "avg_ts": 330.0},
          {"n_prompt": 0, "n_gen": 128, "flash_attn": true, "avg_ts": 99.0}
        ]"#;
        let results = parse_llama_bench_json(text).expect("parse");
        let off = results.iter().find(|r| !r.flash_attention).expect("off");
        let on = results.iter().find(|r| r.flash_attention).expect("on");
        assert_eq!(
            (off.prefill_tokens_per_second, off.decode_tokens_per_second),
            (300.0, 90.0)
        );
        assert_eq!(
            (on.prefill_tokens_per_second, on.decode_tokens_per_second),
            (330.0, 99.0)
        );
    }

    #[test]
    fn median_is_robust_to_one_outlier() {
        assert_eq!(median([100.0, 101.0, 30.0, 99.0, 102.0]), 100.0);
        assert_eq!(median([1.0, 3.0]), 2.0);
        assert_eq!(median(Vec::<f64>::new()), 0.0);
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
