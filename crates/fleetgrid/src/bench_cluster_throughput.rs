//! Part `throughput`: tokens/s and requests/s through one gateway with 1, 2
//! and 4 cells on this machine, and the CPU each part of the cluster used.
//!
//! Each level is a cluster of its own (fresh database, 3 NATS servers, the
//! cells, one gateway) with the same simulated vehicles in all (one load
//! child per cell, whose vehicles dial their cell first and the others
//! after) and the same clients: `--throughput-clients` loops of whole chat
//! completions from this process. Requests finished inside the window
//! count; CPU is read from `/proc/PID/stat` at the window's start and end.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::store::TenantClass;
use serde_json::json;
use stack::{ClusterCell, ClusterGateway};

use super::client::{body, Gateway};
use super::load::{enrol, LoadChild, LoadSpec};
use super::stats::{self, DatabaseWrites, Summary};
use super::{database_writes, Bench, Shared, STARTUP_TIMEOUT};

/// How often a vehicle heartbeats in this part.
const HEARTBEAT_INTERVAL_MS: u64 = 5_000;

#[derive(clap::Args, Clone)]
pub struct ThroughputArgs {
    /// Cell counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_usize, 2, 4])]
    cells: Vec<usize>,
    /// Simulated vehicles in all, shared out among the cells (one slot each).
    #[arg(long, default_value_t = 64)]
    throughput_vehicles: usize,
    /// Tokens per second of one simulated generation.
    #[arg(long, default_value_t = 500.0)]
    throughput_vehicle_tokens_per_second: f64,
    /// Clients sending requests back to back.
    #[arg(long, default_value_t = 64)]
    throughput_clients: usize,
    /// Tenants the clients are shared out among: a tenant's admissions are serialised on its
    /// ledger account row, so one tenant measures that row, not the cluster.
    #[arg(long, default_value_t = 16)]
    throughput_tenants: usize,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 64)]
    throughput_max_tokens: u32,
    /// Seconds before the window, not counted.
    #[arg(long, default_value_t = 5)]
    throughput_warmup_s: u64,
    /// Seconds counted.
    #[arg(long, default_value_t = 20)]
    throughput_window_s: u64,
}

/// CPU-seconds per second of each part.
#[derive(Clone, Copy, Debug, Default)]
struct CpuShares {
    gateway: f64,
    cells: f64,
    nats: f64,
    agents: f64,
    clients: f64,
}

struct Level {
    cells: usize,
    requests: usize,
    tokens: u64,
    errors: usize,
    first_error: Option<String>,
    window: Duration,
    latency_ms: Summary,
    cpu: CpuShares,
    writes: DatabaseWrites,
}

pub struct ThroughputReport {
    args: ThroughputArgs,
    levels: Vec<Level>,
    failed: Vec<(usize, String)>,
}

pub async fn run(bench: &Bench, args: &ThroughputArgs) -> anyhow::Result<ThroughputReport> {
    let mut levels = Vec::new();
    let mut failed = Vec::new();
    for &cells in &args.cells {
        eprintln!("throughput: {cells} cells");
        match level(bench, args, cells).await {
            Ok(level) => levels.push(level),
            Err(error) => failed.push((cells, format!("{error:#}"))),
        }
    }
    Ok(ThroughputReport {
        args: args.clone(),
        levels,
        failed,
    })
}

/// The processes of one level, stopped when dropped.
struct Members {
    cells: Vec<ClusterCell>,
    gateway: ClusterGateway,
    loads: Vec<LoadChild>,
}

async fn level(bench: &Bench, args: &ThroughputArgs, count: usize) -> anyhow::Result<Level> {
    if count == 0 || args.throughput_vehicles < count || args.throughput_tenants == 0 {
        bail!("each cell needs at least one vehicle, and the clients a tenant");
    }
    let shared = bench.shared(&format!("throughput-{count}")).await?;
    let members = start(bench, &shared, args, count).await?;
    let gateway = Gateway::new(members.gateway.http, &shared.api_key);
    wait_for_vehicles(&gateway, args.throughput_vehicles).await?;
    let mut keys = vec![shared.api_key.clone()];
    for tenant in 1..args.throughput_tenants {
        let now = coordinator::core::now_ms().0;
        let (_, key) = shared
            .store
            .create_tenant(&format!("bench-{tenant}"), TenantClass::Fleet, now)
            .await
            .context("create a tenant")?;
        keys.push(key);
    }
    let pids = Pids {
        gateway: vec![members.gateway.process.pid()],
        cells: members.cells.iter().map(|c| c.process.pid()).collect(),
        nats: shared.nats_pids(),
        agents: members.loads.iter().map(|l| l.process.pid()).collect(),
        clients: vec![std::process::id()],
    };
    let started = Instant::now();
    let window_start = started + Duration::from_secs(args.throughput_warmup_s);
    let window_end = window_start + Duration::from_secs(args.throughput_window_s);
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..args.throughput_clients {
        let mut gateway = gateway.clone();
        gateway.api_key = keys[index % keys.len()].clone();
        let model = bench.model().to_owned();
        let max_tokens = args.throughput_max_tokens;
        clients.spawn(client_loop(gateway, model, index, max_tokens, window_end));
    }
    tokio::time::sleep_until(window_start.into()).await;
    let cpu_before = pids.read();
    let writes_before = database_writes(&shared.stats_pool).await?;
    tokio::time::sleep_until(window_end.into()).await;
    let cpu_after = pids.read();
    let window = window_start.elapsed();
    let mut outcomes = Vec::new();
    while let Some(done) = clients.join_next().await {
        outcomes.extend(done.context("client task")?);
    }
    // PostgreSQL's statistics lag by up to a second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let writes = database_writes(&shared.stats_pool)
        .await?
        .since(&writes_before);
    drop(members);
    Ok(summarise(
        count,
        &outcomes,
        window_start,
        window_end,
        window,
        &cpu_before,
        &cpu_after,
        writes,
    ))
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    cells: usize,
    outcomes: &[Outcome],
    window_start: Instant,
    window_end: Instant,
    window: Duration,
    before: &[Duration; 5],
    after: &[Duration; 5],
    writes: DatabaseWrites,
) -> Level {
    let inside: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.finished >= window_start && o.finished <= window_end)
        .collect();
    let ok: Vec<&&Outcome> = inside.iter().filter(|o| o.result.is_ok()).collect();
    let share = |i: usize| stats::cpu_share(before[i], after[i], window);
    Level {
        cells,
        requests: ok.len(),
        tokens: ok.iter().map(|o| *o.result.as_ref().unwrap_or(&0)).sum(),
        errors: inside.len() - ok.len(),
        first_error: inside.iter().find_map(|o| o.result.as_ref().err().cloned()),
        window,
        latency_ms: Summary::of(&ok.iter().map(|o| o.latency_ms).collect::<Vec<_>>()),
        cpu: CpuShares {
            gateway: share(0),
            cells: share(1),
            nats: share(2),
            agents: share(3),
            clients: share(4),
        },
        writes,
    }
}

struct Pids {
    gateway: Vec<u32>,
    cells: Vec<u32>,
    nats: Vec<u32>,
    agents: Vec<u32>,
    clients: Vec<u32>,
}

impl Pids {
    fn read(&self) -> [Duration; 5] {
        [
            stats::cpu_of(&self.gateway),
            stats::cpu_of(&self.cells),
            stats::cpu_of(&self.nats),
            stats::cpu_of(&self.agents),
            stats::cpu_of(&self.clients),
        ]
    }
}

async fn start(
    bench: &Bench,
    shared: &Shared,
    args: &ThroughputArgs,
    count: usize,
) -> anyhow::Result<Members> {
    let (model_name, model_digest) = bench.model_identity()?;
    let mut cells = Vec::new();
    for index in 0..count {
        let cell_id = format!("cell-{}", index + 1);
        let mut member = shared.member(&cell_id);
        member.args = vec![
            // The load generator's simulated vehicles share connections.
            "--agent-plaintext".into(),
            "--heartbeat-interval-ms".into(),
            HEARTBEAT_INTERVAL_MS.to_string().into(),
            "--heartbeat-timeout-ms".into(),
            (3 * HEARTBEAT_INTERVAL_MS).to_string().into(),
        ];
        cells.push(
            shared
                .start_cell(bench.fleetgrid(), &cell_id, member)
                .await?,
        );
    }
    let gateway = shared.start_gateway(bench.fleetgrid(), Vec::new()).await?;
    let urls: Vec<String> = cells.iter().map(|c| format!("http://{}", c.grpc)).collect();
    let mut loads = Vec::new();
    for index in 0..count {
        // Vehicles `index`, `index + count`, … are this cell's.
        let mine = (index..args.throughput_vehicles).step_by(count).count();
        let prefix = format!("c{}", index + 1);
        let credentials = shared.dir.join(format!("{prefix}-credentials.txt"));
        enrol(&shared.store, &prefix, mine, &credentials).await?;
        let mut dial = urls.clone();
        dial.rotate_left(index);
        let spec = LoadSpec {
            cells: dial,
            credentials,
            model_name: model_name.clone(),
            model_digest: model_digest.clone(),
            tokens_per_second: args.throughput_vehicle_tokens_per_second,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            seed: index as u64 * 1_000_000,
        };
        let name = format!("load-{}", index + 1);
        loads.push(LoadChild::start(
            bench.fleetgrid(),
            &shared.dir,
            &name,
            &spec,
        )?);
    }
    Ok(Members {
        cells,
        gateway,
        loads,
    })
}

/// Waits until the gateway sees `count` vehicles (through the cells' capacity summaries).
async fn wait_for_vehicles(gateway: &Gateway, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let seen = stack::probe::connected_nodes(&gateway.client, gateway.http, &gateway.api_key)
            .await
            .map_or(0, |nodes| nodes.len());
        if seen >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway saw only {seen} of {count} vehicles");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Outcome {
    finished: Instant,
    latency_ms: f64,
    /// Completion tokens, or the error.
    result: Result<u64, String>,
}

async fn client_loop(
    gateway: Gateway,
    model: String,
    index: usize,
    max_tokens: u32,
    until: Instant,
) -> Vec<Outcome> {
    let gateway = Arc::new(gateway);
    let mut outcomes = Vec::new();
    let mut request = 0_u64;
    while Instant::now() < until {
        request += 1;
        let messages = json!([{"role": "user", "content": format!("Client {index}, request {request}: tell a story.")}]);
        let sent = Instant::now();
        let result = gateway
            .complete(&body(&model, messages, max_tokens, false, request))
            .await
            .map_err(|error| format!("{error:#}"));
        if result.is_err() {
            // A refusal comes back at once; do not spin on it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        outcomes.push(Outcome {
            finished: Instant::now(),
            latency_ms: sent.elapsed().as_secs_f64() * 1000.0,
            result,
        });
    }
    outcomes
}

impl fmt::Display for ThroughputReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let args = &self.args;
        writeln!(
            f,
            "== c. throughput through one gateway: {} simulated vehicles at {:.0} tokens/s each, {} clients of {} tenants, {} tokens per request",
            args.throughput_vehicles,
            args.throughput_vehicle_tokens_per_second,
            args.throughput_clients,
            args.throughput_tenants,
            args.throughput_max_tokens
        )?;
        writeln!(
            f,
            "{:>5} {:>9} {:>10} {:>7} {:>9} {:>9} | CPU-s/s: {:>7} {:>6} {:>6} {:>6} {:>7} {:>6} | {:>9} {:>8}",
            "cells", "req/s", "tokens/s", "errors", "p50 ms", "p99 ms", "gateway", "cells", "nats",
            "agents", "clients", "total", "commits/s", "per req"
        )?;
        for level in &self.levels {
            let seconds = level.window.as_secs_f64().max(f64::EPSILON);
            let cpu = level.cpu;
            let total = cpu.gateway + cpu.cells + cpu.nats + cpu.agents + cpu.clients;
            writeln!(
                f,
                "{:>5} {:>9.1} {:>10.0} {:>7} {:>9.0} {:>9.0} | {:>16.2} {:>6.2} {:>6.2} {:>6.2} {:>7.2} {:>6.2} | {:>9.1} {:>8.2}",
                level.cells,
                level.requests as f64 / seconds,
                level.tokens as f64 / seconds,
                level.errors,
                level.latency_ms.p50,
                level.latency_ms.p99,
                cpu.gateway,
                cpu.cells,
                cpu.nats,
                cpu.agents,
                cpu.clients,
                total,
                level.writes.commits as f64 / seconds,
                level.writes.commits as f64 / level.requests.max(1) as f64
            )?;
            if let Some(error) = &level.first_error {
                writeln!(f, "      first error: {error}")?;
            }
            writeln!(
                f,
                "      PostgreSQL rows written per request: {:.2}",
                level.writes.rows as f64 / level.requests.max(1) as f64
            )?;
        }
        for (cells, error) in &self.failed {
            writeln!(f, "{cells:>5} cells: not measured: {error}")?;
        }
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        write!(
            f,
            "(the machine's {cores} cores give at most {cores}.00 CPU-s/s; PostgreSQL's CPU is not counted)"
        )
    }
}
