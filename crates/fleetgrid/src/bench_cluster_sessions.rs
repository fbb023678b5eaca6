//! Part `sessions`: vehicle sessions held by one `fleetgrid cell` process.
//!
//! The cell runs as its own process on the part's NATS cluster and
//! database, heartbeats every 5 s (15 s timeout); `--sessions` simulated
//! vehicles, each its own gRPC stream (4 streams per HTTP/2 connection, the
//! cell's bound), connect from the load child. Readings of the cell
//! process alone: RSS before the load and once it is held, CPU over a
//! window while the sessions only heartbeat; and what the ramp cost
//! PostgreSQL per session.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;

use super::load::{enrol, LoadChild, LoadCounters, LoadSpec};
use super::stats::{self, mib, DatabaseWrites, Usage};
use super::{database_writes, Bench};

/// The heartbeat interval a parked car's agent uses.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Three silent intervals and a session is gone.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);
/// Time after the ramp before memory is read and the CPU window opens.
const SETTLE: Duration = Duration::from_secs(10);
/// The ramp gives up when no session was added for this long.
const RAMP_STALL: Duration = Duration::from_secs(120);

#[derive(clap::Args, Clone)]
pub struct SessionsArgs {
    /// Simulated vehicles connecting to the one cell.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// How long the cell's CPU is counted while sessions only heartbeat, in seconds.
    #[arg(long, default_value_t = 30)]
    sessions_window_s: u64,
    /// The longest the ramp may take, in seconds.
    #[arg(long, default_value_t = 600)]
    sessions_connect_within_s: u64,
}

pub struct SessionsReport {
    wanted: usize,
    /// Held at the end of the ramp and at the end of the window.
    held_after_ramp: u64,
    held_at_end: u64,
    /// In the cell's own capacity summary on the bus, if it published one.
    held_by_cell_summary: Option<usize>,
    summary_bytes: Option<usize>,
    ramp: Duration,
    ramp_counters: LoadCounters,
    end_counters: LoadCounters,
    cell_before: Usage,
    cell_held: Usage,
    window: Duration,
    cell_cpu_in_window: Duration,
    load_cpu_in_window: Duration,
    cell_files: usize,
    load_files: usize,
    nofile_limit: String,
    ramp_writes: DatabaseWrites,
    capacity_errors: usize,
}

pub async fn run(bench: &Bench, args: &SessionsArgs) -> anyhow::Result<SessionsReport> {
    let shared = bench.shared("sessions").await?;
    let (model_name, model_digest) = bench.model_identity()?;
    eprintln!("sessions: enrolling {} simulated vehicles", args.sessions);
    let credentials = shared.dir.join("credentials.txt");
    enrol(&shared.store, "load", args.sessions, &credentials).await?;
    let mut member = shared.member("cell-1");
    member.args = vec![
        // The load generator's simulated vehicles share connections.
        "--agent-plaintext".into(),
        "--heartbeat-interval-ms".into(),
        HEARTBEAT_INTERVAL.as_millis().to_string().into(),
        "--heartbeat-timeout-ms".into(),
        HEARTBEAT_TIMEOUT.as_millis().to_string().into(),
    ];
    let cell = shared
        .start_cell(bench.fleetgrid(), "cell-1", member)
        .await?;
    let cell_pid = cell.process.pid();
    let summaries = summary_watch(&shared.spec.nats).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cell_before = stats::usage(cell_pid).context("read the cell process")?;
    let writes_before = database_writes(&shared.stats_pool).await?;
    let spec = LoadSpec {
        cells: vec![format!("http://{}", cell.grpc)],
        credentials,
        model_name,
        model_digest,
        tokens_per_second: loadgen::tokens::TOKENS_PER_SECOND_DEFAULT,
        heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
        seed: 1,
    };
    eprintln!(
        "sessions: connecting {} sessions to one cell",
        args.sessions
    );
    let started = Instant::now();
    let load = LoadChild::start(bench.fleetgrid(), &shared.dir, "load", &spec)?;
    let wanted = args.sessions as u64;
    let ramp_counters = ramp(&load, &cell.process, wanted, args).await?;
    let ramp_time = started.elapsed();
    eprintln!(
        "sessions: {} held after {:.1} s; settling",
        ramp_counters.open,
        ramp_time.as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let ramp_writes = database_writes(&shared.stats_pool)
        .await?
        .since(&writes_before);
    let cell_held = stats::usage(cell_pid).context("read the cell process")?;
    let load_held = stats::usage(load.process.pid()).context("read the load process")?;
    let window_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.sessions_window_s)).await;
    let cell_end = stats::usage(cell_pid).context("read the cell process")?;
    let load_end = stats::usage(load.process.pid()).context("read the load process")?;
    let window = window_started.elapsed();
    let end_counters = load.counters();
    let (held_by_cell_summary, summary_bytes) = summaries.latest();
    let capacity_errors = std::fs::read_to_string(cell.process.log_path())
        .unwrap_or_default()
        .matches("capacity summary")
        .count();
    Ok(SessionsReport {
        wanted: args.sessions,
        held_after_ramp: ramp_counters.open,
        held_at_end: end_counters.open,
        held_by_cell_summary,
        summary_bytes,
        ramp: ramp_time,
        ramp_counters,
        end_counters,
        cell_before,
        cell_held,
        window,
        cell_cpu_in_window: cell_end.cpu.saturating_sub(cell_held.cpu),
        load_cpu_in_window: load_end.cpu.saturating_sub(load_held.cpu),
        cell_files: stats::open_files(cell_pid),
        load_files: stats::open_files(load.process.pid()),
        nofile_limit: nofile_limit(),
        ramp_writes,
        capacity_errors,
    })
}

/// Waits until `wanted` sessions are held, the ramp stalls or its time is up.
async fn ramp(
    load: &LoadChild,
    cell: &stack::Process,
    wanted: u64,
    args: &SessionsArgs,
) -> anyhow::Result<LoadCounters> {
    let deadline = Instant::now() + Duration::from_secs(args.sessions_connect_within_s);
    let mut best = 0;
    let mut progressed = Instant::now();
    let mut reported = Instant::now();
    loop {
        cell.check_running()?;
        let counters = load.wait_open(wanted, Duration::from_secs(1)).await?;
        if counters.open > best {
            best = counters.open;
            progressed = Instant::now();
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "sessions: open {} welcomes {} lost {}",
                counters.open, counters.welcomes, counters.lost
            );
            reported = Instant::now();
        }
        if counters.open >= wanted
            || Instant::now() >= deadline
            || progressed.elapsed() >= RAMP_STALL
        {
            return Ok(counters);
        }
    }
}

/// The latest capacity summary the cell published, counted.
struct SummaryWatch {
    latest: std::sync::Arc<std::sync::Mutex<(Option<usize>, Option<usize>)>>,
}

impl SummaryWatch {
    /// Nodes in the latest summary and its size in bytes.
    fn latest(&self) -> (Option<usize>, Option<usize>) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn summary_watch(nats: &str) -> anyhow::Result<SummaryWatch> {
    let first = nats.split(',').next().context("no NATS server")?;
    let client = async_nats::connect(first)
        .await
        .context("connect to NATS")?;
    let mut summaries = client
        .subscribe(bus::subjects::CAPACITY_ALL)
        .await
        .context("subscribe to capacity summaries")?;
    let latest = std::sync::Arc::new(std::sync::Mutex::new((None, None)));
    let writer = std::sync::Arc::clone(&latest);
    tokio::spawn(async move {
        // Holds the client for as long as the subscription runs.
        let _client = client;
        while let Some(message) = summaries.next().await {
            let Ok(summary) = bus::wire::decode::<bus::wire::CapacitySummary>(&message.payload)
            else {
                continue;
            };
            // No `.await` happens under this lock.
            *writer.lock().unwrap_or_else(|p| p.into_inner()) = (
                Some(usize::try_from(summary.capacity.nodes_connected()).unwrap_or(usize::MAX)),
                Some(message.payload.len()),
            );
        }
    });
    Ok(SummaryWatch { latest })
}

/// This process's `RLIMIT_NOFILE`, soft and hard, which its children inherit.
fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .map(|line| {
                    line.split_whitespace()
                        .skip(3)
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

impl SessionsReport {
    fn rss_per_session_bytes(&self) -> f64 {
        let grown = self
            .cell_held
            .rss_bytes
            .saturating_sub(self.cell_before.rss_bytes);
        grown as f64 / self.held_after_ramp.max(1) as f64
    }

    fn heartbeats_per_second(&self) -> f64 {
        self.held_at_end as f64 / HEARTBEAT_INTERVAL.as_secs_f64()
    }

    fn cpu_per_1000_heartbeats_per_second(&self, cpu: Duration) -> f64 {
        let share = cpu.as_secs_f64() / self.window.as_secs_f64().max(f64::EPSILON);
        share / (self.heartbeats_per_second() / 1000.0).max(f64::EPSILON)
    }
}

impl fmt::Display for SessionsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "== a. sessions held by one cell process (heartbeat every 5 s)"
        )?;
        writeln!(
            f,
            "sessions wanted / held after ramp / held at end: {} / {} / {}   (target >= 100,000)",
            self.wanted, self.held_after_ramp, self.held_at_end
        )?;
        match (self.held_by_cell_summary, self.summary_bytes) {
            (Some(nodes), Some(bytes)) => writeln!(
                f,
                "the cell's last capacity summary on the bus: {nodes} vehicles, {bytes} bytes"
            )?,
            _ => writeln!(
                f,
                "the cell published no capacity summary that could be read"
            )?,
        }
        writeln!(
            f,
            "capacity summary errors in the cell's log: {}",
            self.capacity_errors
        )?;
        writeln!(
            f,
            "ramp: {:.1} s ({:.0} sessions/s); welcomes {} lost {} refused {}",
            self.ramp.as_secs_f64(),
            self.held_after_ramp as f64 / self.ramp.as_secs_f64().max(f64::EPSILON),
            self.ramp_counters.welcomes,
            self.ramp_counters.lost,
            self.ramp_counters.refused
        )?;
        writeln!(
            f,
            "during the window: welcomes {} lost {} (churn)",
            self.end_counters.welcomes
                - self.ramp_counters.welcomes.min(self.end_counters.welcomes),
            self.end_counters.lost - self.ramp_counters.lost.min(self.end_counters.lost)
        )?;
        writeln!(
            f,
            "cell RSS before / held: {:.1} / {:.1} MiB; per session {:.1} KiB   (target <= 32 KiB)",
            mib(self.cell_before.rss_bytes),
            mib(self.cell_held.rss_bytes),
            self.rss_per_session_bytes() / 1024.0
        )?;
        writeln!(
            f,
            "heartbeats {:.0}/s; cell CPU {:.2} s in {:.1} s = {:.3} CPU-s/s per 1,000 heartbeats/s",
            self.heartbeats_per_second(),
            self.cell_cpu_in_window.as_secs_f64(),
            self.window.as_secs_f64(),
            self.cpu_per_1000_heartbeats_per_second(self.cell_cpu_in_window)
        )?;
        writeln!(
            f,
            "load generator CPU (for information): {:.3} CPU-s/s per 1,000 heartbeats/s",
            self.cpu_per_1000_heartbeats_per_second(self.load_cpu_in_window)
        )?;
        writeln!(
            f,
            "PostgreSQL during the ramp: {} commits, {} rows written ({:.2} commits per session)",
            self.ramp_writes.commits,
            self.ramp_writes.rows,
            self.ramp_writes.commits as f64 / self.held_after_ramp.max(1) as f64
        )?;
        write!(
            f,
            "open files: cell {} load {}; RLIMIT_NOFILE soft / hard {}",
            self.cell_files, self.load_files, self.nofile_limit
        )
    }
}
