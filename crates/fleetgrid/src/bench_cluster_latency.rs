//! Part `latency`: what NATS adds per token batch between a cell and a
//! gateway, against the single-process path, in the same run.
//!
//! A stamping cell (a `cell_api::Cell` whose generations emit tokens at a
//! set pace, each carrying the time it was sent) is used two ways, in
//! alternating rounds: directly, as `fleetgrid serve` hands the gateway its
//! in-process cell, and through `bus::serve_cell` on one NATS server and
//! `bus::Cells` on another server of the same 3-server cluster, as a
//! gateway and a cell in different processes reach each other. The
//! consumer reads each token off the generation's update channel and
//! records its age. Both paths carry the same aggregate token rate over
//! the same number of concurrent generations.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bus::{CellId, Cells, CellsConfig, ServeConfig};
use cell_api::metering::Metering;
use cell_api::{
    Admitted, Capacity, Cell, CommittedToken, FinishReason, NewGeneration, NodeSummary, Rejection,
    TenantRef, Update, Usage,
};
use domain::{RequestId, TenantClass};
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::stats::Summary;
use super::Bench;

/// The model name the stamping cell claims.
const MODEL: &str = "stamp";

#[derive(clap::Args, Clone)]
pub struct LatencyArgs {
    /// Aggregate tokens per second over all generations.
    #[arg(long, default_value_t = 20_000)]
    latency_tokens_per_second: u32,
    /// Generations streaming at once; each runs at the aggregate rate divided by this.
    #[arg(long, default_value_t = 40)]
    latency_generations: u32,
    /// Seconds per round.
    #[arg(long, default_value_t = 8)]
    latency_round_s: u32,
    /// Rounds of each path, alternating.
    #[arg(long, default_value_t = 2)]
    latency_rounds: u32,
}

/// A cell whose tokens carry the microseconds since `epoch` at which they were sent.
struct StampingCell {
    epoch: Instant,
    /// Time between two tokens of one generation.
    interval: Duration,
    next_request: std::sync::atomic::AtomicU64,
}

impl Cell for StampingCell {
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>> {
        let (sender, updates) = mpsc::channel(generation.max_tokens as usize + 16);
        let (epoch, interval) = (self.epoch, self.interval);
        let first = u32::try_from(generation.committed.len()).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(interval);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for position in first..generation.max_tokens {
                pace.tick().await;
                let stamp = epoch.elapsed().as_micros().to_string();
                let token = CommittedToken {
                    token_id: i32::try_from(position).unwrap_or(i32::MAX),
                    piece: stamp.into_bytes(),
                    logprob: 0.0,
                    top_logprobs: Vec::new(),
                };
                if sender.send(Update::Token(token)).await.is_err() {
                    return;
                }
            }
            let _ = sender
                .send(Update::Finished {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: 1,
                        completion_tokens: generation.max_tokens,
                        cached_prompt_tokens: 0,
                    },
                    metering: Metering {
                        prompt_tokens: 1,
                        segments: Vec::new(),
                        node_report: None,
                        finished_ms: 0,
                    },
                })
                .await;
        });
        let request = RequestId(
            self.next_request
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        Box::pin(futures::future::ready(Ok(Admitted { request, updates })))
    }

    fn cancel(&self, _request: RequestId) -> Option<Metering> {
        None
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            nodes: vec![NodeSummary {
                name: "stamping-car".to_owned(),
                models: vec![MODEL.to_owned()],
                slots: 4_096,
                running: 0,
            }],
            ..Capacity::default()
        }
    }

    fn owner_policy_changed(&self, _node: &str, _policy: scheduler::OwnerPolicy) {}
}

pub struct LatencyReport {
    tokens_per_second: u32,
    generations: u32,
    in_process: Summary,
    nats: Summary,
    in_process_seconds: f64,
    nats_seconds: f64,
}

pub async fn run(bench: &Bench, args: &LatencyArgs) -> anyhow::Result<LatencyReport> {
    if args.latency_generations == 0 || args.latency_tokens_per_second < args.latency_generations {
        bail!("--latency-generations must be between 1 and --latency-tokens-per-second");
    }
    let dir = bench.root.join("latency");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let nats = stack::nats::NatsCluster::start(super::NATS_SERVERS, &dir, super::STARTUP_TIMEOUT)
        .await
        .context("start the NATS cluster")?;
    let per_generation =
        f64::from(args.latency_tokens_per_second) / f64::from(args.latency_generations);
    let cell = Arc::new(StampingCell {
        epoch: Instant::now(),
        interval: Duration::from_secs_f64(1.0 / per_generation),
        next_request: std::sync::atomic::AtomicU64::new(1),
    });
    let max_tokens = (per_generation * f64::from(args.latency_round_s))
        .min(f64::from(cell_api::limits::COMPLETION_TOKENS_MAX)) as u32;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let _serving = bus::serve_cell(
        async_nats::connect(nats.servers[0].url()).await?,
        CellId::new("stamping")?,
        Arc::clone(&cell) as Arc<dyn Cell>,
        ServeConfig::default(),
        shutdown.clone(),
    )
    .await?;
    let cells = Arc::new(
        Cells::connect(
            async_nats::connect(nats.servers[1].url()).await?,
            CellsConfig::default(),
        )
        .await?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while cells.cells().is_empty() {
        if Instant::now() > deadline {
            bail!("the gateway side never heard of the stamping cell");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut in_process, mut over_nats) = (Vec::new(), Vec::new());
    let (mut in_process_seconds, mut nats_seconds) = (0.0, 0.0);
    for round in 0..args.latency_rounds {
        eprintln!("latency: round {} of {}", round + 1, args.latency_rounds);
        let started = Instant::now();
        let path = Arc::clone(&cell) as Arc<dyn Cell>;
        in_process.extend(round_latencies(path, cell.epoch, args, max_tokens).await?);
        in_process_seconds += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let path = Arc::clone(&cells) as Arc<dyn Cell>;
        over_nats.extend(round_latencies(path, cell.epoch, args, max_tokens).await?);
        nats_seconds += started.elapsed().as_secs_f64();
    }
    Ok(LatencyReport {
        tokens_per_second: args.latency_tokens_per_second,
        generations: args.latency_generations,
        in_process: Summary::of(&in_process),
        nats: Summary::of(&over_nats),
        in_process_seconds,
        nats_seconds,
    })
}

/// One round on `path`: every generation at once, each token's age in milliseconds.
async fn round_latencies(
    path: Arc<dyn Cell>,
    epoch: Instant,
    args: &LatencyArgs,
    max_tokens: u32,
) -> anyhow::Result<Vec<f64>> {
    let ages = Arc::new(Mutex::new(Vec::new()));
    let mut consumers = tokio::task::JoinSet::new();
    for index in 0..args.latency_generations {
        let admitted = path
            .submit(generation(index, max_tokens))
            .await
            .map_err(|rejection| anyhow::anyhow!("refused: {rejection:?}"))?;
        let ages = Arc::clone(&ages);
        consumers.spawn(consume(admitted, epoch, ages));
    }
    while let Some(done) = consumers.join_next().await {
        done.context("consumer task")??;
    }
    let ages = std::mem::take(&mut *ages.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(ages)
}

async fn consume(
    mut admitted: Admitted,
    epoch: Instant,
    ages: Arc<Mutex<Vec<f64>>>,
) -> anyhow::Result<()> {
    let mut mine = Vec::new();
    loop {
        match admitted.updates.recv().await {
            Some(Update::Token(token)) => {
                let now_us = epoch.elapsed().as_micros();
                let sent_us: u128 = std::str::from_utf8(&token.piece)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .context("a token without its stamp")?;
                mine.push(now_us.saturating_sub(sent_us) as f64 / 1000.0);
            }
            Some(Update::Finished { .. }) => break,
            Some(Update::PromptLogprobs(_)) => bail!("prompt scores nobody asked for"),
            Some(Update::Failed(error)) => bail!("a generation failed: {error:?}"),
            None => bail!("a generation ended without finishing"),
        }
    }
    // No `.await` happens under this lock.
    ages.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
    Ok(())
}

fn generation(index: u32, max_tokens: u32) -> NewGeneration {
    NewGeneration {
        public_id: format!("latency-{index}"),
        tenant: TenantRef {
            id: 1,
            class: TenantClass::Fleet,
        },
        model: MODEL.to_owned(),
        prompt: vec![1],
        committed: Vec::new(),
        numerics: None,
        sampling: proto::Sampling::default(),
        max_tokens,
        stop: Vec::new(),
        top_logprobs: 0,
        prompt_logprobs: false,
        draft: Vec::new(),
        deadline_ms: None,
    }
}

impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "== b. latency per token batch, cell -> gateway, {} tokens/s aggregate over {} generations",
            self.tokens_per_second, self.generations
        )?;
        writeln!(
            f,
            "{:<38} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "path", "tokens", "p50 ms", "p95 ms", "p99 ms", "max ms", "tok/s"
        )?;
        for (name, summary, seconds) in [
            (
                "in-process Cell (fleetgrid serve)",
                &self.in_process,
                self.in_process_seconds,
            ),
            (
                "NATS, cell and gateway on 2 servers",
                &self.nats,
                self.nats_seconds,
            ),
        ] {
            writeln!(
                f,
                "{name:<38} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.0}",
                summary.count,
                summary.p50,
                summary.p95,
                summary.p99,
                summary.max,
                summary.count as f64 / seconds.max(f64::EPSILON)
            )?;
        }
        let added_p50 = self.nats.p50 - self.in_process.p50;
        let added_p99 = self.nats.p99 - self.in_process.p99;
        write!(
            f,
            "added by NATS: p50 {added_p50:.3} ms, p99 {added_p99:.3} ms; NATS path p99 {:.3} ms (target <= 2 ms): {}",
            self.nats.p99,
            if self.nats.p99 <= 2.0 { "met" } else { "not met" }
        )
    }
}
