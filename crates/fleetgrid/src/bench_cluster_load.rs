//! The load generator's child process: simulated vehicles (`loadgen`, a
//! load generator, not a vehicle) run in `fleetgrid bench cluster
//! --load-spec FILE`, a process of their own, so that their CPU is theirs
//! and every file descriptor limit is per side.
//!
//! The child prints its counters once a second on stdout
//! (`load open=… welcomes=… lost=… heartbeats=… refused=…`); the parent
//! keeps the latest in a [`LoadChild`].

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use loadgen::{Enrolment, LoadConfig, TokenSource};
use serde::{Deserialize, Serialize};
use stack::{Fleetgrid, LogFile, Process, Stdout};
use tokio_util::sync::CancellationToken;

/// How often the child prints its counters.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// How long the parent waits for a line before it looks again whether the child lives.
const LINE_WAIT: Duration = Duration::from_secs(5);

/// Enrolments made at once: enough to hide a round trip, few against the pool.
const ENROL_CONCURRENCY: usize = 16;

/// What the child simulates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadSpec {
    /// gRPC URLs every vehicle dials, in order of preference.
    pub cells: Vec<String>,
    /// `NODE_ID CREDENTIAL` lines.
    pub credentials: PathBuf,
    pub model_name: String,
    pub model_digest: String,
    pub tokens_per_second: f64,
    pub heartbeat_interval_ms: u64,
    pub seed: u64,
}

/// The child's counters, as it last printed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadCounters {
    /// Sessions welcomed and not ended: the sessions held now.
    pub open: u64,
    pub welcomes: u64,
    pub lost: u64,
    pub heartbeats: u64,
    pub refused: u64,
}

impl LoadCounters {
    fn line(&self) -> String {
        format!(
            "load open={} welcomes={} lost={} heartbeats={} refused={}",
            self.open, self.welcomes, self.lost, self.heartbeats, self.refused
        )
    }

    fn parse(line: &str) -> Option<LoadCounters> {
        let rest = line.trim().strip_prefix("load ")?;
        let mut counters = LoadCounters::default();
        for field in rest.split_whitespace() {
            let (name, value) = field.split_once('=')?;
            let value: u64 = value.parse().ok()?;
            match name {
                "open" => counters.open = value,
                "welcomes" => counters.welcomes = value,
                "lost" => counters.lost = value,
                "heartbeats" => counters.heartbeats = value,
                "refused" => counters.refused = value,
                _ => {}
            }
        }
        Some(counters)
    }
}

/// The child's side: runs the load until killed.
pub async fn run_child(spec_path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(spec_path)
        .with_context(|| format!("read {}", spec_path.display()))?;
    let spec: LoadSpec = serde_json::from_str(&text).context("parse the load spec")?;
    let vehicles = loadgen::read_credentials(&spec.credentials)?;
    let mut tokens = TokenSource::new(spec.model_name, spec.model_digest);
    tokens.tokens_per_second = spec.tokens_per_second;
    let mut config = LoadConfig::new(spec.cells, vehicles, tokens);
    config.heartbeat_interval = Duration::from_millis(spec.heartbeat_interval_ms);
    config.seed = spec.seed;
    let shutdown = CancellationToken::new();
    let load = loadgen::start(config, shutdown.clone())?;
    let stats = Arc::clone(load.stats());
    // Runs until the parent kills this process (or it exits with the parent).
    let stop = crate::run::shutdown_token(true)?;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let counters = LoadCounters {
            open: stats.sessions_open.load(Ordering::Relaxed),
            welcomes: stats.welcomes.load(Ordering::Relaxed),
            lost: stats.sessions_lost.load(Ordering::Relaxed),
            heartbeats: stats.heartbeats_sent.load(Ordering::Relaxed),
            refused: stats.refused.load(Ordering::Relaxed),
        };
        println!("{}", counters.line());
    }
    shutdown.cancel();
    Ok(())
}

/// A running child and its latest counters.
pub struct LoadChild {
    pub process: Process,
    latest: Arc<Mutex<LoadCounters>>,
}

impl LoadChild {
    /// Writes `spec` beside `dir/<name>.json` and starts the child.
    pub fn start(
        fleetgrid: &Fleetgrid,
        dir: &Path,
        name: &str,
        spec: &LoadSpec,
    ) -> anyhow::Result<LoadChild> {
        let spec_path = dir.join(format!("{name}.json"));
        std::fs::write(&spec_path, serde_json::to_string_pretty(spec)?)
            .with_context(|| format!("write {}", spec_path.display()))?;
        let mut command = fleetgrid.command();
        command
            .args(["bench", "cluster", "--load-spec"])
            .arg(&spec_path)
            .env("RUST_LOG", "warn");
        let log = LogFile::append(dir.join(format!("{name}.log")));
        let mut process = Process::spawn(name, command, &log, Stdout::Lines)?;
        let mut lines = process.lines().context("the load child's output")?;
        let latest = Arc::new(Mutex::new(LoadCounters::default()));
        let writer = Arc::clone(&latest);
        std::thread::Builder::new()
            .name(format!("counters-{name}"))
            .spawn(move || loop {
                match lines.next_blocking(LINE_WAIT) {
                    Ok(Some(line)) => {
                        if let Some(counters) = LoadCounters::parse(&line) {
                            // No `.await` happens under this lock.
                            *writer.lock().unwrap_or_else(|p| p.into_inner()) = counters;
                        }
                    }
                    Ok(None) => return,
                    Err(_) => continue,
                }
            })
            .context("start the counters' reader")?;
        Ok(LoadChild { process, latest })
    }

    pub fn counters(&self) -> LoadCounters {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `open` sessions are held, the child exits or `timeout` passes; the
    /// counters at the end.
    pub async fn wait_open(&self, open: u64, timeout: Duration) -> anyhow::Result<LoadCounters> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process.check_running()?;
            let counters = self.counters();
            if counters.open >= open || Instant::now() >= deadline {
                return Ok(counters);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Enrols `count` simulated vehicles named `PREFIX-000000`… in `store`, a
/// few at a time, and writes their credentials to `path`.
pub async fn enrol(
    store: &coordinator::store::Store,
    prefix: &str,
    count: usize,
    path: &Path,
) -> anyhow::Result<Vec<Enrolment>> {
    let mut vehicles = Vec::with_capacity(count);
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i:06}")).collect();
    for chunk in names.chunks(ENROL_CONCURRENCY) {
        let mut tasks = tokio::task::JoinSet::new();
        for (offset, name) in chunk.iter().enumerate() {
            let (store, name) = (store.clone(), name.clone());
            tasks.spawn(async move {
                let now = coordinator::core::now_ms().0;
                let credential = store.add_node(&name, "", now).await;
                (offset, name, credential)
            });
        }
        let mut done = Vec::with_capacity(chunk.len());
        while let Some(joined) = tasks.join_next().await {
            let (offset, node_id, credential) = joined.context("enrol task")?;
            let credential = credential.with_context(|| format!("enrol {node_id}"))?;
            done.push((
                offset,
                Enrolment {
                    node_id,
                    credential,
                },
            ));
        }
        done.sort_by_key(|(offset, _)| *offset);
        vehicles.extend(done.into_iter().map(|(_, vehicle)| vehicle));
    }
    loadgen::write_credentials(path, &vehicles)?;
    Ok(vehicles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_round_trip_through_their_line() {
        let counters = LoadCounters {
            open: 5,
            welcomes: 7,
            lost: 2,
            heartbeats: 100,
            refused: 0,
        };
        assert_eq!(LoadCounters::parse(&counters.line()), Some(counters));
        assert_eq!(LoadCounters::parse("something else"), None);
    }
}
