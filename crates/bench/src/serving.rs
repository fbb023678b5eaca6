//! The serving benchmark: one node's aggregate completion tokens/s at several concurrent streams,
//! through our whole gateway → agent path and through `llama-server` with the same slot count.
//!
//! Both targets are started first and stay up; the load then alternates between them, one
//! concurrency level at a time, for [`SERVING_ROUNDS`] rounds (or `rounds`), and each level
//! reports the median round and the ratio of each round. Load never reaches both at once: on a
//! small machine they would share the same cores and measure each other. An idle server costs
//! nothing; alternating, and swapping which side goes first every round, means a drift of the
//! machine (another process, thermal state) hits both sides alike.

pub(crate) mod targets;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::loadgen::{run_load, LoadResult, LoadSpec};
use crate::reference::ReferenceBinaries;
use crate::report::Comparison;
use crate::BenchError;

/// Concurrent streams measured by default.
pub const DEFAULT_CONCURRENCY_LEVELS: [u32; 3] = [1, 4, 8];
/// Requests per stream at each level: each stream runs this many requests back to back, so that
/// a level with N streams sends this × N requests.
pub const DEFAULT_REQUESTS_PER_STREAM: u32 = 2;
/// Completion tokens each request asks for.
pub const DEFAULT_MAX_TOKENS: u32 = 128;
/// Sequences decoded together on each side (`llama-server -np`, `fleetgrid agent --parallel`).
pub const DEFAULT_SLOTS: u32 = 8;
/// Context window per slot on each side; llama-server gets slots × this in total (`-c`).
pub const CONTEXT_TOKENS_PER_SLOT: u32 = 2048;
/// At the highest concurrency our stack must deliver at least this fraction of llama-server's
/// aggregate tokens/s.
pub const SERVING_TARGET_RATIO: f64 = 1.0;
/// Rounds of alternating measurements by default; each level reports its median round.
pub const SERVING_ROUNDS: u32 = 3;
/// Completion tokens of the untimed warm-up request sent before each target is measured.
const WARM_UP_MAX_TOKENS: u32 = 8;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ServingConfig {
    pub model_path: PathBuf,
    pub threads: u32,
    /// Scratch space: logs, the fleetgrid data directory, the model store.
    pub work_dir: PathBuf,
    pub concurrency_levels: Vec<u32>,
    pub requests_per_stream: u32,
    pub max_tokens: u32,
    pub slots: u32,
    /// Rounds of alternating measurements.
    pub rounds: u32,
}

impl ServingConfig {
    /// The defaults above for one model file, thread count and scratch directory.
    pub fn new(model_path: impl Into<PathBuf>, threads: u32, work_dir: impl Into<PathBuf>) -> Self {
        ServingConfig {
            model_path: model_path.into(),
            threads,
            work_dir: work_dir.into(),
            concurrency_levels: DEFAULT_CONCURRENCY_LEVELS.to_vec(),
            requests_per_stream: DEFAULT_REQUESTS_PER_STREAM,
            max_tokens: DEFAULT_MAX_TOKENS,
            slots: DEFAULT_SLOTS,
            rounds: SERVING_ROUNDS,
        }
    }
}

/// One concurrency level, measured on both targets.
#[derive(Clone, Debug)]
pub struct ServingRow {
    pub concurrency: u32,
    pub reference: LoadResult,
    /// `None` when our stack could not be measured; see [`ServingBenchReport::ours_error`].
    pub ours: Option<LoadResult>,
    /// Our aggregate tokens/s over the reference's in each round, in round order: each pair ran
    /// back to back, so these show how far the run-to-run noise reaches.
    pub round_ratios: Vec<f64>,
}

/// The outcome of [`serving()`].
#[derive(Clone, Debug)]
pub struct ServingBenchReport {
    pub config: ServingConfig,
    pub reference_version: String,
    /// Whether llama-server honoured `ignore_eos` (every request then produced `max_tokens`).
    pub reference_ignore_eos: bool,
    /// Whether our gateway accepted `ignore_eos`.
    pub ours_ignore_eos: bool,
    pub rows: Vec<ServingRow>,
    /// Why our stack has no figures, when it has none. The reference figures are still reported,
    /// so that a failing stack does not cost the reference run.
    pub ours_error: Option<String>,
}

impl ServingBenchReport {
    /// Our aggregate tokens/s against llama-server's at the highest concurrency, the target.
    pub fn comparison(&self) -> Option<Comparison> {
        let row = self.rows.iter().max_by_key(|row| row.concurrency)?;
        Some(Comparison {
            metric: format!("aggregate at {} streams (tokens/s)", row.concurrency),
            ours: row.ours.as_ref()?.aggregate_tokens_per_second(),
            reference: row.reference.aggregate_tokens_per_second(),
            target_ratio: SERVING_TARGET_RATIO,
        })
    }
}

/// Measures `llama-server` (from `refs`) and then our stack (`fleetgrid serve` + one `fleetgrid
/// agent`, from `fleetgrid_binary`) at each concurrency level of `config`.
///
/// Runs on a thread of its own with its own async runtime, so it may be called from anywhere,
/// including from inside another runtime.
pub fn serving(
    fleetgrid_binary: &Path,
    refs: &ReferenceBinaries,
    config: &ServingConfig,
) -> Result<ServingBenchReport, BenchError> {
    validate(config)?;
    let fleetgrid_binary = fleetgrid_binary.to_owned();
    let refs = refs.clone();
    let config = config.clone();
    on_own_runtime("serving benchmark", move || async move {
        serving_on_runtime(&fleetgrid_binary, &refs, &config).await
    })
}

/// Runs the future `make` builds to its end on a thread of its own with its own runtime, so
/// that a benchmark may be called from anywhere, including from inside another runtime.
pub(crate) fn on_own_runtime<T, F>(
    what: &'static str,
    make: impl FnOnce() -> F + Send + 'static,
) -> Result<T, BenchError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, BenchError>>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::io("start runtime for", what, e))?;
        runtime.block_on(make())
    })
    .join()
    .map_err(|_| BenchError::Panicked(what))?
}

fn validate(config: &ServingConfig) -> Result<(), BenchError> {
    let invalid = |reason: &str| Err(BenchError::InvalidSetting(reason.to_owned()));
    if config.threads == 0 || config.slots == 0 || config.max_tokens == 0 {
        return invalid("threads, slots and max_tokens must be at least 1");
    }
    if config.requests_per_stream == 0
        || config.rounds == 0
        || config.concurrency_levels.contains(&0)
    {
        return invalid("requests per stream and every concurrency level must be at least 1");
    }
    if config.concurrency_levels.is_empty() {
        return invalid("no concurrency level to measure");
    }
    Ok(())
}

async fn serving_on_runtime(
    fleetgrid_binary: &Path,
    refs: &ReferenceBinaries,
    config: &ServingConfig,
) -> Result<ServingBenchReport, BenchError> {
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|e| BenchError::io("create", &config.work_dir, e))?;
    let reference = targets::start_llama_server(refs, config).await?;
    let reference_spec = warmed_up(&reference.spec).await?;
    // Our stack failing must not cost the reference figures: it is then measured alone.
    let ours = match targets::start_fleetgrid(fleetgrid_binary, config).await {
        Ok(target) => match warmed_up(&target.spec).await {
            Ok(spec) => Ok((target, spec)),
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    let (ours_spec, mut ours_error) = match &ours {
        Ok((_, spec)) => (Some(spec.clone()), None),
        Err(error) => (None, Some(error.to_string())),
    };

    let levels = &config.concurrency_levels;
    let mut reference_rounds: Vec<Vec<LoadResult>> = vec![Vec::new(); levels.len()];
    let mut ours_rounds: Vec<Vec<LoadResult>> = vec![Vec::new(); levels.len()];
    // Request 0 is the warm-up's; every load after it gets numbers of its own, the same on both
    // sides, so that neither side ever sees a prompt it has served before.
    let mut first_request = 1;
    for round in 0..config.rounds {
        for (index, &concurrency) in levels.iter().enumerate() {
            let reference_load = level(&reference_spec, concurrency, config, first_request);
            first_request = first_request.saturating_add(reference_load.requests);
            let ours_load = ours_spec.as_ref().map(|spec| LoadSpec {
                first_request: reference_load.first_request,
                ..level(spec, concurrency, config, 0)
            });
            // Odd rounds measure our stack first.
            let ours_first = round % 2 == 1;
            if !ours_first {
                reference_rounds[index].push(run_load(&reference_load).await?);
            }
            if let (Some(load), None) = (&ours_load, &ours_error) {
                match run_load(load).await {
                    Ok(result) => ours_rounds[index].push(result),
                    Err(error) => ours_error = Some(error.to_string()),
                }
            }
            if ours_first {
                reference_rounds[index].push(run_load(&reference_load).await?);
            }
        }
    }
    drop(ours);
    drop(reference);

    let rows = levels
        .iter()
        .zip(reference_rounds)
        .zip(ours_rounds)
        .map(|((&concurrency, reference), ours)| {
            let round_ratios = if ours_error.is_some() {
                Vec::new()
            } else {
                reference
                    .iter()
                    .zip(&ours)
                    .map(|(reference, ours)| ratio(ours, reference))
                    .collect()
            };
            ServingRow {
                concurrency,
                reference: median_round(reference).unwrap_or_default(),
                ours: if ours_error.is_some() {
                    None
                } else {
                    median_round(ours)
                },
                round_ratios,
            }
        })
        .collect();
    Ok(ServingBenchReport {
        config: config.clone(),
        reference_version: refs.llama_cpp_version.clone(),
        reference_ignore_eos: reference_spec.ignore_eos,
        ours_ignore_eos: ours_spec.is_some_and(|spec| spec.ignore_eos),
        rows,
        ours_error,
    })
}

/// The load of one concurrency level: `requests_per_stream` requests per stream, numbered from
/// `first_request`.
fn level(
    spec: &LoadSpec,
    concurrency: u32,
    config: &ServingConfig,
    first_request: u32,
) -> LoadSpec {
    LoadSpec {
        concurrency,
        requests: concurrency.saturating_mul(config.requests_per_stream),
        first_request,
        max_tokens: config.max_tokens,
        ..spec.clone()
    }
}

/// Our aggregate tokens/s over the reference's (0 when the reference measured nothing).
fn ratio(ours: &LoadResult, reference: &LoadResult) -> f64 {
    ours.aggregate_tokens_per_second()
        / reference
            .aggregate_tokens_per_second()
            .max(f64::MIN_POSITIVE)
}

/// The median of `values` (the mean of the middle two for an even count), `None` when empty.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        count if count % 2 == 1 => Some(sorted[middle]),
        _ => Some((sorted[middle - 1] + sorted[middle]) / 2.0),
    }
}

/// The round with the median aggregate tokens/s (the lower middle one for an even count).
pub(crate) fn median_round(mut rounds: Vec<LoadResult>) -> Option<LoadResult> {
    if rounds.is_empty() {
        return None;
    }
    rounds.sort_by(|a, b| {
        a.aggregate_tokens_per_second()
            .total_cmp(&b.aggregate_tokens_per_second())
    });
    let middle = (rounds.len() - 1) / 2;
    Some(rounds.swap_remove(middle))
}

/// Warms `spec`'s target up and returns the spec to measure it with: with `ignore_eos` if the
/// target takes the field, without it if it refuses it.
async fn warmed_up(spec: &LoadSpec) -> Result<LoadSpec, BenchError> {
    let mut spec = spec.clone();
    spec.ignore_eos = true;
    if warm_up(&spec).await.is_err() {
        spec.ignore_eos = false;
        warm_up(&spec).await?;
    }
    Ok(spec)
}

async fn warm_up(spec: &LoadSpec) -> Result<LoadResult, BenchError> {
    let warm_up = LoadSpec {
        concurrency: 1,
        requests: 1,
        first_request: 0,
        max_tokens: WARM_UP_MAX_TOKENS,
        ..spec.clone()
    };
    run_load(&warm_up).await
}

impl std::fmt::Display for ServingBenchReport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = &self.config;
        writeln!(formatter, "model:     {}", config.model_path.display())?;
        writeln!(
            formatter,
            "threads:   {}, slots: {}, max_tokens: {}, requests per stream: {}, rounds: {}",
            config.threads,
            config.slots,
            config.max_tokens,
            config.requests_per_stream,
            config.rounds
        )?;
        writeln!(
            formatter,
            "reference: llama-server, {}",
            self.reference_version
        )?;
        writeln!(
            formatter,
            "ignore_eos honoured: llama-server {}, fleetgrid {}",
            self.reference_ignore_eos, self.ours_ignore_eos
        )?;
        writeln!(formatter)?;
        formatter.write_str(&rows_table(&self.rows))?;
        writeln!(formatter)?;
        for row in self.rows.iter().filter(|row| !row.round_ratios.is_empty()) {
            let rounds: Vec<String> = row
                .round_ratios
                .iter()
                .map(|ratio| format!("{ratio:.3}"))
                .collect();
            writeln!(
                formatter,
                "{} streams, ratio per round: {} (median {:.3})",
                row.concurrency,
                rounds.join(" "),
                median(&row.round_ratios).unwrap_or(0.0)
            )?;
        }
        if let Some(comparison) = self.comparison() {
            let ratio = comparison.ratio().unwrap_or(0.0);
            writeln!(
                formatter,
                "\n{}: ratio {ratio:.3}, target ≥{:.2}: {}",
                comparison.metric,
                comparison.target_ratio,
                comparison.verdict()
            )?;
        }
        if let Some(error) = &self.ours_error {
            writeln!(formatter, "\nfleetgrid not measured: {error}")?;
        }
        Ok(())
    }
}

fn rows_table(rows: &[ServingRow]) -> String {
    let mut table = String::new();
    // Writing into a String cannot fail, hence the ignored results.
    let _ = writeln!(
        table,
        "{:>7}  {:>8}  {:>14}  {:>11}  {:>9}  {:>17}  {:>11}  {:>9}  {:>6}",
        "streams",
        "requests",
        "fleetgrid t/s",
        "tokens/req",
        "ttft ms",
        "llama-server t/s",
        "tokens/req",
        "ttft ms",
        "ratio"
    );
    for row in rows {
        let (ours_rate, ours_tokens, ours_ttft, ratio) = match &row.ours {
            Some(ours) => (
                format!("{:.1}", ours.aggregate_tokens_per_second()),
                format!("{:.1}", ours.completion_tokens_per_request_mean()),
                milliseconds(ours.time_to_first_token_mean),
                format!("{:.3}", ratio(ours, &row.reference)),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            table,
            "{:>7}  {:>8}  {:>14}  {:>11}  {:>9}  {:>17.1}  {:>11.1}  {:>9}  {:>6}",
            row.concurrency,
            row.reference.requests,
            ours_rate,
            ours_tokens,
            ours_ttft,
            row.reference.aggregate_tokens_per_second(),
            row.reference.completion_tokens_per_request_mean(),
            milliseconds(row.reference.time_to_first_token_mean),
            ratio
        );
    }
    table
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.0}", duration.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests;
