//! `fleetgrid bench`: benchmarks that report ratios against a reference
//! measured in the same run. They are never part of the test suite.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::home;

// Parsed once per run from the command line: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Our engine against llama.cpp's llama-bench: prefill 512 and decode 128 tokens.
    Engine {
        /// CPU threads for both.
        #[arg(long)]
        threads: Option<u32>,
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// Paired rounds (each: both llama-benches, then ours); medians are reported.
        #[arg(long, default_value_t = bench::ENGINE_BENCH_ROUNDS)]
        rounds: u32,
    },
    /// One node's aggregate tokens/s at 1, 4 and 8 streams, gateway to agent,
    /// against llama-server with 8 slots.
    Serving {
        #[arg(long)]
        threads: Option<u32>,
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// Rounds of alternating measurements; each level reports its median round.
        #[arg(long, default_value_t = bench::SERVING_ROUNDS)]
        rounds: u32,
        /// Concurrency levels to measure, e.g. `--streams 8` or `--streams 1,4,8`; the target
        /// is judged at the highest.
        #[arg(long, value_delimiter = ',', default_values_t = bench::DEFAULT_CONCURRENCY_LEVELS)]
        streams: Vec<u32>,
    },
    /// Structured output's cost per token: one stream's decode rate with a JSON schema against
    /// without, on our stack and on llama-server's own grammar sampling, side by side.
    Structured {
        #[arg(long)]
        threads: Option<u32>,
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// Rounds of alternating measurements; each reports its median.
        #[arg(long, default_value_t = bench::SERVING_ROUNDS)]
        rounds: u32,
        /// Tokens per answer, constrained or not.
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
    },
    /// The scheduler with many registered nodes: placements/s, p99 latency,
    /// state events/s, bytes per node.
    Scheduler {
        #[arg(long, default_value_t = 1_000_000)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Node loss to the next token at the client, with a long context: p50/p95
    /// over repeated SIGKILLs, against a fresh request's time to first token.
    Handover(crate::bench_handover::HandoverArgs),
    /// The cluster on this machine: sessions one cell holds, NATS latency per token batch,
    /// throughput with 1, 2 and 4 cells, cell failover, placement with prefix affinity.
    Cluster(crate::bench_cluster::ClusterArgs),
    /// Checking untrusted vehicles: a check's cost on the real model, and a simulated fleet
    /// with cheaters under the verification policy (detection, false positives, overhead).
    Verification(crate::bench_verification::VerificationArgs),
}

pub(crate) fn threads_or_all(threads: Option<u32>) -> u32 {
    threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|count| u32::try_from(count.get()).unwrap_or(1))
            .unwrap_or(1)
    })
}

/// Where the reference tools are built: beside the model store, shared by runs.
pub(crate) fn reference_dir() -> PathBuf {
    home::root().join("reference")
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Engine {
            threads,
            model,
            rounds,
        } => {
            let model = home::model_store()?
                .resolve(&model)
                .context("resolve the model")?;
            let threads = threads_or_all(threads);
            let report = tokio::task::spawn_blocking(move || {
                let same = bench::reference::ensure_same_version_built(&reference_dir())?;
                let refs = bench::reference::ensure_built(&reference_dir())?;
                bench::engine(&model.path, threads, rounds, &same, &refs)
            })
            .await
            .context("bench task")?
            .context("run the engine benchmark")?;
            println!("{report}");
        }
        BenchCommand::Serving {
            threads,
            model,
            rounds,
            streams,
        } => {
            let report = against_llama_server(&model, threads, "bench-serving", move |config| {
                config.rounds = rounds;
                config.concurrency_levels = streams;
                bench::serving
            })
            .await
            .context("run the serving benchmark")?;
            println!("{report}");
        }
        BenchCommand::Structured {
            threads,
            model,
            rounds,
            max_tokens,
        } => {
            let report = against_llama_server(&model, threads, "bench-structured", move |config| {
                config.rounds = rounds;
                config.max_tokens = max_tokens;
                bench::structured
            })
            .await
            .context("run the structured output benchmark")?;
            println!("{report}");
        }
        BenchCommand::Scheduler { nodes, seed } => {
            let report = tokio::task::spawn_blocking(move || scheduler::bench::run(nodes, seed))
                .await
                .context("bench task")?;
            println!("{report}");
        }
        BenchCommand::Handover(args) => crate::bench_handover::run(args).await?,
        BenchCommand::Cluster(args) => crate::bench_cluster::run(args).await?,
        BenchCommand::Verification(args) => crate::bench_verification::run(args).await?,
    }
    Ok(())
}

/// The serving path's benchmark function: this binary, the reference tools, the settings.
type ServingBench<R> = fn(
    &std::path::Path,
    &bench::ReferenceBinaries,
    &bench::ServingConfig,
) -> Result<R, bench::BenchError>;

/// Runs a benchmark of our stack against llama-server: resolves `model`, builds the reference
/// tools when missing, lets `configure` set its options on the defaults and pick the benchmark.
async fn against_llama_server<R: Send + 'static>(
    model: &str,
    threads: Option<u32>,
    work_dir: &str,
    configure: impl FnOnce(&mut bench::ServingConfig) -> ServingBench<R> + Send + 'static,
) -> anyhow::Result<R> {
    let model = home::model_store()?
        .resolve(model)
        .context("resolve the model")?;
    let threads = threads_or_all(threads);
    let exe = std::env::current_exe().context("find the fleetgrid executable")?;
    let work_dir = home::root().join(work_dir);
    let report = tokio::task::spawn_blocking(move || {
        let refs = bench::reference::ensure_built(&reference_dir())?;
        let mut config = bench::ServingConfig::new(&model.path, threads, work_dir);
        let measure = configure(&mut config);
        measure(&exe, &refs, &config)
    })
    .await
    .context("bench task")??;
    Ok(report)
}
