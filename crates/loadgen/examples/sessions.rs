//! What K agent sessions cost a cell: memory per session and CPU per 1,000 heartbeats a second.
//!
//! ```text
//! cargo run --release -p loadgen --example sessions -- 10000               # load in a child process
//! cargo run --release -p loadgen --example sessions -- 10000 --in-process  # load next to the cell
//! ```
//!
//! The cell runs in this process on a fresh store in a temporary directory; the K simulated
//! vehicles (a load generator, not vehicles) run in a child process, this same program started
//! with `--load`, unless `--in-process` is given. Each session takes one file descriptor per
//! process for every `SESSIONS_PER_CONNECTION_DEFAULT` sessions, so K is bounded by
//! `RLIMIT_NOFILE` times that.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use loadgen::{LoadConfig, LoadSide, MeasureConfig, TokenSource};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: sessions K [--in-process] [--window SECONDS]
       sessions --load --cell URL --credentials FILE";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = if args.first().map(String::as_str) == Some("--load") {
        runtime.block_on(load(&args[1..]))
    } else {
        runtime.block_on(measure(&args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `flag`, if given.
fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|arg| arg == flag)
        .and_then(|index| args.get(index + 1))
        .map(String::as_str)
}

async fn measure(args: &[String]) -> Result<(), String> {
    let sessions: usize = args
        .first()
        .and_then(|k| k.parse().ok())
        .ok_or("K, the number of sessions, is required")?;
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let load = if args.iter().any(|arg| arg == "--in-process") {
        LoadSide::InProcess
    } else {
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let mut command = std::process::Command::new(exe);
        command.arg("--load");
        LoadSide::Child(command)
    };
    let mut config = MeasureConfig::new(sessions, dir.path().to_owned(), load);
    if let Some(window) = value(args, "--window") {
        let seconds: u64 = window.parse().map_err(|e| format!("--window: {e}"))?;
        config.window = Duration::from_secs(seconds);
    }
    println!(
        "measuring {sessions} sessions (heartbeat every {:?}, CPU window {:?})",
        config.heartbeat_interval, config.window
    );
    let measurement = loadgen::measure(config).await.map_err(|e| e.to_string())?;
    println!("{measurement}");
    Ok(())
}

/// The child: runs the simulated vehicles until killed.
async fn load(args: &[String]) -> Result<(), String> {
    let cell = value(args, "--cell").ok_or("--cell URL is required")?;
    let credentials = value(args, "--credentials").ok_or("--credentials FILE is required")?;
    let vehicles =
        loadgen::read_credentials(&PathBuf::from(credentials)).map_err(|e| e.to_string())?;
    let tokens = TokenSource::new("loadgen-none", "0".repeat(64));
    let config = LoadConfig::new(vec![cell.to_owned()], vehicles, tokens);
    // Runs until the measuring parent kills this process.
    loadgen::run(config, CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
