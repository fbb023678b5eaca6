//! Part `failover`: kill -9 of the cell running a streamed generation, to
//! the next token at the client.
//!
//! Two cells, one gateway, and simulated vehicles in two load children,
//! one per cell, whose vehicles dial their own cell first and the other
//! after. Each round streams a generation through the gateway, waits for a
//! few tokens, finds the cell that runs it (the `assigned` line in its
//! log), SIGKILLs it right after a token arrived, and times the first token
//! that arrives afterwards: the gateway has to notice the cell is gone and
//! resubmit the generation, with the tokens already forwarded, to the other
//! cell. Then the killed cell is restarted on the same address and its
//! vehicles' load child is restarted so that they come home, and the next
//! round starts from the same shape.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use stack::{ClusterCell, ClusterGateway, MemberSpec};

use super::client::{body, Gateway};
use super::load::{enrol, LoadChild, LoadSpec};
use super::stats::Summary;
use super::{Bench, Shared, STARTUP_TIMEOUT};

const CELLS: usize = 2;
/// Tokens the client has seen before the kill.
const TOKENS_BEFORE_KILL: usize = 5;
/// A token arriving this soon after the kill was already on its way from the killed cell.
const IN_FLIGHT_GUARD: Duration = Duration::from_millis(20);
/// The longest a round waits for the next token before it counts as failed.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
const HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// How long a killed cell may take to be reaped.
const KILL_WAIT: Duration = Duration::from_millis(500);

#[derive(clap::Args, Clone)]
pub struct FailoverArgs {
    /// Cells killed, one per round.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Simulated vehicles per cell.
    #[arg(long, default_value_t = 4)]
    failover_vehicles_per_cell: usize,
    /// Tokens per second of one simulated generation (a car's pace).
    #[arg(long, default_value_t = 20.0)]
    failover_tokens_per_second: f64,
}

pub struct FailoverReport {
    kills: u32,
    latencies_ms: Vec<f64>,
    failures: Vec<String>,
}

struct Cluster {
    shared: Shared,
    cells: Vec<Option<ClusterCell>>,
    /// Where each cell listens, kept across restarts.
    members: Vec<MemberSpec>,
    loads: Vec<Option<LoadChild>>,
    specs: Vec<LoadSpec>,
    /// Held: dropping it stops the gateway.
    _gateway: ClusterGateway,
    client: Gateway,
    names: Vec<String>,
}

pub async fn run(bench: &Bench, args: &FailoverArgs) -> anyhow::Result<FailoverReport> {
    let mut cluster = start(bench, args).await?;
    let mut latencies_ms = Vec::new();
    let mut failures = Vec::new();
    for round in 0..args.kills {
        match one_round(bench, &mut cluster, round).await {
            Ok(ms) => {
                eprintln!(
                    "failover: round {}: next token {ms:.0} ms after the kill",
                    round + 1
                );
                latencies_ms.push(ms);
            }
            Err(error) => {
                eprintln!("failover: round {} failed: {error:#}", round + 1);
                failures.push(format!("round {}: {error:#}", round + 1));
            }
        }
        restore(bench, &mut cluster).await?;
    }
    Ok(FailoverReport {
        kills: args.kills,
        latencies_ms,
        failures,
    })
}

async fn start(bench: &Bench, args: &FailoverArgs) -> anyhow::Result<Cluster> {
    let shared = bench.shared("failover").await?;
    let (model_name, model_digest) = bench.model_identity()?;
    let mut cells = Vec::new();
    let mut members = Vec::new();
    for index in 0..CELLS {
        let cell_id = cell_id(index);
        let mut member = shared.member(&cell_id);
        member.args = vec![
            // The load generator's simulated vehicles share connections.
            "--agent-plaintext".into(),
            "--heartbeat-interval-ms".into(),
            HEARTBEAT_INTERVAL_MS.to_string().into(),
            "--heartbeat-timeout-ms".into(),
            (3 * HEARTBEAT_INTERVAL_MS).to_string().into(),
        ];
        let cell = shared
            .start_cell(bench.fleetgrid(), &cell_id, member.clone())
            .await?;
        // A restarted cell listens where its vehicles dial.
        member.listen = cell.grpc;
        members.push(member);
        cells.push(Some(cell));
    }
    let gateway = shared.start_gateway(bench.fleetgrid(), Vec::new()).await?;
    let urls: Vec<String> = cells
        .iter()
        .flatten()
        .map(|c| format!("http://{}", c.grpc))
        .collect();
    let mut specs = Vec::new();
    let mut names = Vec::new();
    for index in 0..CELLS {
        let prefix = format!("c{}", index + 1);
        let credentials = shared.dir.join(format!("{prefix}-credentials.txt"));
        let vehicles = enrol(
            &shared.store,
            &prefix,
            args.failover_vehicles_per_cell,
            &credentials,
        )
        .await?;
        names.extend(vehicles.into_iter().map(|v| v.node_id));
        let mut dial = urls.clone();
        dial.rotate_left(index);
        specs.push(LoadSpec {
            cells: dial,
            credentials,
            model_name: model_name.clone(),
            model_digest: model_digest.clone(),
            tokens_per_second: args.failover_tokens_per_second,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            seed: index as u64 * 1_000_000,
        });
    }
    let mut loads = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let name = format!("load-{}", index + 1);
        loads.push(Some(LoadChild::start(
            bench.fleetgrid(),
            &shared.dir,
            &name,
            spec,
        )?));
    }
    let client = Gateway::new(gateway.http, &shared.api_key);
    let cluster = Cluster {
        shared,
        cells,
        members,
        loads,
        specs,
        _gateway: gateway,
        client,
        names,
    };
    cluster.wait_for_vehicles().await?;
    Ok(cluster)
}

fn cell_id(index: usize) -> String {
    format!("cell-{}", index + 1)
}

impl Cluster {
    fn log_of(&self, index: usize) -> String {
        let path = self.shared.dir.join(format!("{}.log", cell_id(index)));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits until the gateway sees every vehicle, and each load child holds all of its own.
    async fn wait_for_vehicles(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let per_child = (self.names.len() / CELLS) as u64;
        loop {
            let seen = stack::probe::connected_nodes(
                &self.client.client,
                self.client.http,
                &self.client.api_key,
            )
            .await
            .unwrap_or_default();
            let children_ready = self
                .loads
                .iter()
                .flatten()
                .all(|load| load.counters().open >= per_child);
            if children_ready && self.names.iter().all(|name| seen.contains(name)) {
                // One more capacity interval, so that every summary is current.
                tokio::time::sleep(bus::limits::CAPACITY_INTERVAL * 2).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway saw only {} of {} vehicles",
                    seen.len(),
                    self.names.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One round: stream, kill the cell running it, time the next token.
async fn one_round(bench: &Bench, cluster: &mut Cluster, round: u32) -> anyhow::Result<f64> {
    let logs_before: Vec<usize> = (0..CELLS).map(|i| cluster.log_of(i).len()).collect();
    let messages =
        json!([{"role": "user", "content": format!("Failover round {round}: a long story.")}]);
    let request = body(bench.model(), messages, 400, true, u64::from(round) + 1);
    let mut stream = cluster.client.stream(&request).await?;
    if !stream.read_until(TOKENS_BEFORE_KILL).await? {
        bail!("the generation ended before {TOKENS_BEFORE_KILL} tokens");
    }
    let running = (0..CELLS)
        .find(|&i| {
            cluster.log_of(i)[logs_before[i].min(cluster.log_of(i).len())..].contains(" assigned ")
        })
        .context("no cell logged the assignment")?;
    // Kill right after a token arrived, so that none is in flight.
    let seen = stream.tokens;
    stream.read_until(seen + 1).await?;
    let cell = cluster.cells[running]
        .as_mut()
        .context("the running cell is not up")?;
    let killed_at = Instant::now();
    // SIGKILL to its process group; `restore` waits for it to be gone.
    cell.process.start_kill();
    let before_kill = stream.arrivals.len();
    let deadline = killed_at + ROUND_TIMEOUT;
    loop {
        if let Some((at, _)) = stream.arrivals[before_kill..]
            .iter()
            .find(|(at, _)| *at >= killed_at + IN_FLIGHT_GUARD)
        {
            return Ok(at.duration_since(killed_at).as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            bail!("no token within {ROUND_TIMEOUT:?} of the kill");
        }
        let more = tokio::time::timeout(ROUND_TIMEOUT, stream.read_more())
            .await
            .context("the stream stalled")??;
        if !more {
            bail!("the stream ended without a token after the kill");
        }
    }
    // Dropping the stream cancels the generation.
}

/// Restarts every cell that is down, then every load child, so that the
/// vehicles are home again.
async fn restore(bench: &Bench, cluster: &mut Cluster) -> anyhow::Result<()> {
    for index in 0..CELLS {
        let Some(cell) = cluster.cells[index].as_ref() else {
            continue;
        };
        // A cell killed in the round is gone within moments; a live one never ends here.
        let gone = tokio::time::timeout(KILL_WAIT, cell.process.exited())
            .await
            .is_ok();
        if !gone {
            continue;
        }
        cluster.cells[index] = None;
        let cell = cluster
            .shared
            .start_cell(
                bench.fleetgrid(),
                &cell_id(index),
                cluster.members[index].clone(),
            )
            .await?;
        cluster.cells[index] = Some(cell);
    }
    for (index, spec) in cluster.specs.iter().enumerate() {
        if let Some(mut load) = cluster.loads[index].take() {
            load.process.kill();
        }
        let name = format!("load-{}", index + 1);
        cluster.loads[index] = Some(LoadChild::start(
            bench.fleetgrid(),
            &cluster.shared.dir,
            &name,
            spec,
        )?);
    }
    cluster.wait_for_vehicles().await
}

impl fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = Summary::of(&self.latencies_ms);
        writeln!(
            f,
            "== d. failover: kill -9 of the cell running a stream -> next token at the client"
        )?;
        writeln!(
            f,
            "kills {}, measured {}, failed {}",
            self.kills,
            summary.count,
            self.failures.len()
        )?;
        writeln!(
            f,
            "p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms   (target p95 <= 3000 ms): {}",
            summary.p50,
            summary.p95,
            summary.max,
            if summary.count > 0 && self.failures.is_empty() && summary.p95 <= 3000.0 {
                "met"
            } else {
                "not met"
            }
        )?;
        let all: Vec<String> = self
            .latencies_ms
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect();
        write!(f, "each round (ms): {}", all.join(" "))?;
        for failure in &self.failures {
            write!(f, "\n  {failure}")?;
        }
        Ok(())
    }
}
