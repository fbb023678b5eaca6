//! What sessions cost a cell: a cell started in this process (`cell::start`) on a fresh store,
//! `sessions` simulated vehicles enrolled in it and connected, then two readings side by side:
//! the cell process's resident memory per session held, and its CPU time per 1,000 heartbeats a
//! second while they only heartbeat.
//!
//! The simulated vehicles run either in this process (simple, but then both figures include the
//! load generator's own share) or in a child process, so that the figures are the cell's alone.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cell_api::served::ServedModels;
use store::Store;
use tokio_util::sync::CancellationToken;

use crate::{enrol, start, usage, write_credentials, LoadConfig, LoadError, TokenSource};

/// A node silent for this many heartbeat intervals is dropped by the measured cell.
pub const HEARTBEAT_TIMEOUT_INTERVALS: u32 = 3;

/// How often the measurement looks whether every session is connected.
const CONNECTED_POLL: Duration = Duration::from_millis(100);

/// The names the measurement enrols its simulated vehicles under (`load-000000`…).
pub const VEHICLE_PREFIX: &str = "load";

/// The file, in the data directory, that hands the credentials to a child load process.
pub const CREDENTIALS_FILE: &str = "load-credentials.txt";

/// The model the simulated vehicles claim; the measured cell serves no model, so nothing is
/// assigned and only sessions and heartbeats are measured.
const MODEL_NAME: &str = "loadgen-none";
const MODEL_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where the simulated vehicles run.
#[derive(Debug)]
pub enum LoadSide {
    /// In this process, next to the cell: its figures then include the load generator's.
    InProcess,
    /// A child process running [`crate::run`]: the command, to which `--cell URL --credentials
    /// FILE` are appended (the file as [`crate::read_credentials`] reads it). It is killed when
    /// the measurement ends.
    Child(std::process::Command),
}

/// What to measure.
#[derive(Debug)]
pub struct MeasureConfig {
    pub sessions: usize,
    /// An empty directory for the cell's store and the credentials file.
    pub data_dir: PathBuf,
    pub load: LoadSide,
    /// What the cell's `Welcome` asks for; a parked car's agent heartbeats every 5 s.
    pub heartbeat_interval: Duration,
    /// How long every session may take to connect before the measurement fails.
    pub connect_within: Duration,
    /// Time after every session connected before memory is read and the CPU window starts, so
    /// that the connection burst's work is not counted as heartbeat work.
    pub settle: Duration,
    /// How long CPU time is counted while the sessions only heartbeat.
    pub window: Duration,
}

impl MeasureConfig {
    pub fn new(sessions: usize, data_dir: PathBuf, load: LoadSide) -> MeasureConfig {
        MeasureConfig {
            sessions,
            data_dir,
            load,
            heartbeat_interval: crate::HEARTBEAT_INTERVAL_DEFAULT,
            connect_within: Duration::from_secs(600),
            settle: Duration::from_secs(10),
            window: Duration::from_secs(30),
        }
    }
}

/// The figures of one measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub sessions_wanted: usize,
    /// Sessions the cell held at the end of the CPU window.
    pub sessions_held: usize,
    pub load_in_process: bool,
    /// From starting the load until the cell held every session.
    pub connect_time: Duration,
    pub rss_before_bytes: u64,
    pub rss_held_bytes: u64,
    pub heartbeat_interval: Duration,
    pub window: Duration,
    pub cpu_in_window: Duration,
}

impl Measurement {
    /// Resident memory the cell process grew by, per session held.
    pub fn rss_per_session_bytes(&self) -> f64 {
        let grown = self.rss_held_bytes.saturating_sub(self.rss_before_bytes) as f64;
        grown / self.sessions_held.max(1) as f64
    }

    /// Heartbeats the cell receives per second: every held session sends one per interval.
    pub fn heartbeats_per_second(&self) -> f64 {
        self.sessions_held as f64 / self.heartbeat_interval.as_secs_f64().max(f64::EPSILON)
    }

    /// CPU seconds per second of the cell process, per 1,000 heartbeats a second.
    pub fn cpu_seconds_per_1000_heartbeats_per_second(&self) -> f64 {
        let cpu_per_second =
            self.cpu_in_window.as_secs_f64() / self.window.as_secs_f64().max(f64::EPSILON);
        cpu_per_second / (self.heartbeats_per_second() / 1000.0).max(f64::EPSILON)
    }

    /// Sessions connected per second while the load ramped up.
    pub fn sessions_connected_per_second(&self) -> f64 {
        self.sessions_held as f64 / self.connect_time.as_secs_f64().max(f64::EPSILON)
    }
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = if self.load_in_process {
            "in this process (figures include the load generator)"
        } else {
            "in a child process (figures are the cell's alone)"
        };
        writeln!(
            f,
            "sessions wanted                 {}",
            self.sessions_wanted
        )?;
        writeln!(f, "sessions held                   {}", self.sessions_held)?;
        writeln!(f, "load generator                  {load}")?;
        writeln!(
            f,
            "connect time                    {:.1} s ({:.0} sessions/s)",
            self.connect_time.as_secs_f64(),
            self.sessions_connected_per_second()
        )?;
        writeln!(
            f,
            "cell RSS before / held          {:.1} MiB / {:.1} MiB",
            mib(self.rss_before_bytes),
            mib(self.rss_held_bytes)
        )?;
        writeln!(
            f,
            "cell RSS per session            {:.1} KiB",
            self.rss_per_session_bytes() / 1024.0
        )?;
        writeln!(
            f,
            "heartbeats                      {:.0}/s (every {:.1} s)",
            self.heartbeats_per_second(),
            self.heartbeat_interval.as_secs_f64()
        )?;
        writeln!(
            f,
            "cell CPU in window              {:.2} s in {:.1} s",
            self.cpu_in_window.as_secs_f64(),
            self.window.as_secs_f64()
        )?;
        write!(
            f,
            "cell CPU per 1,000 heartbeats/s {:.3} CPU-s/s",
            self.cpu_seconds_per_1000_heartbeats_per_second()
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Starts a cell in this process, connects `config.sessions` simulated vehicles to it and
/// measures (see the module's documentation). Everything it started is stopped when it returns.
pub async fn measure(config: MeasureConfig) -> Result<Measurement, LoadError> {
    let store = Store::open(&config.data_dir).await?;
    let vehicles = enrol(&store, VEHICLE_PREFIX, config.sessions).await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut cell_config = cell::CellConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    cell_config.heartbeat_interval = config.heartbeat_interval;
    cell_config.heartbeat_timeout = config
        .heartbeat_interval
        .saturating_mul(HEARTBEAT_TIMEOUT_INTERVALS);
    let running = cell::start(
        cell_config,
        store,
        Arc::new(ServedModels::default()),
        shutdown.clone(),
    )
    .await?;
    let url = format!("http://{}", running.grpc);
    let connected =
        || usize::try_from(running.metrics.nodes_connected.load(Ordering::Relaxed)).unwrap_or(0);

    let before = usage::current()?;
    let started = Instant::now();
    let load_in_process = matches!(config.load, LoadSide::InProcess);
    // Held until the end: dropping them stops the load.
    let (_load, mut child) = match config.load {
        LoadSide::InProcess => {
            let tokens = TokenSource::new(MODEL_NAME, MODEL_DIGEST);
            let load = start(
                LoadConfig::new(vec![url.clone()], vehicles, tokens),
                shutdown.clone(),
            )?;
            (Some(load), None)
        }
        LoadSide::Child(command) => {
            let credentials = config.data_dir.join(CREDENTIALS_FILE);
            write_credentials(&credentials, &vehicles)?;
            let mut command = tokio::process::Command::from(command);
            command
                .arg("--cell")
                .arg(&url)
                .arg("--credentials")
                .arg(&credentials)
                .kill_on_drop(true);
            (None, Some(command.spawn().map_err(LoadError::Spawn)?))
        }
    };
    while connected() < config.sessions {
        if let Some(exited) = child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
        {
            return Err(LoadError::LoadExited(exited.to_string()));
        }
        if started.elapsed() >= config.connect_within {
            return Err(LoadError::NotConnected {
                held: connected(),
                wanted: config.sessions,
                within: config.connect_within,
            });
        }
        tokio::time::sleep(CONNECTED_POLL).await;
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(config.settle).await;
    let held = usage::current()?;
    let window_started = Instant::now();
    tokio::time::sleep(config.window).await;
    let end = usage::current()?;
    let window = window_started.elapsed();
    Ok(Measurement {
        sessions_wanted: config.sessions,
        sessions_held: connected(),
        load_in_process,
        connect_time,
        rss_before_bytes: before.rss_bytes,
        rss_held_bytes: held.rss_bytes,
        heartbeat_interval: config.heartbeat_interval,
        window,
        cpu_in_window: end.cpu.saturating_sub(held.cpu),
    })
}
