//! Runs the benchmarks without the `fleetgrid` CLI, for working on this crate:
//!
//! ```text
//! cargo run --release -p bench --example bench -- engine  MODEL.gguf THREADS CACHE_DIR
//! cargo run --release -p bench --example bench -- serving MODEL.gguf THREADS CACHE_DIR FLEETGRID_BIN
//! ```
//!
//! `CACHE_DIR` holds the reference build (e.g. `target/reference`); the serving benchmark also
//! keeps its logs and scratch data there.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, String> {
    let usage = "usage: bench (engine|serving) MODEL THREADS CACHE_DIR [FLEETGRID_BIN]";
    let [kind, model, threads, cache_dir, rest @ ..] = args else {
        return Err(usage.to_owned());
    };
    let model = PathBuf::from(model);
    let threads: u32 = threads.parse().map_err(|_| usage.to_owned())?;
    let cache_dir = PathBuf::from(cache_dir);
    let refs = bench::ensure_built(&cache_dir).map_err(|e| e.to_string())?;
    match (kind.as_str(), rest) {
        ("engine", []) => bench::reference::ensure_same_version_built(&cache_dir)
            .and_then(|same| {
                bench::engine(&model, threads, bench::ENGINE_BENCH_ROUNDS, &same, &refs)
            })
            .map(|report| report.to_string())
            .map_err(|e| e.to_string()),
        ("serving", [fleetgrid]) => {
            let config = bench::ServingConfig::new(model, threads, cache_dir.join("serving"));
            bench::serving(&PathBuf::from(fleetgrid), &refs, &config)
                .map(|report| report.to_string())
                .map_err(|e| e.to_string())
        }
        _ => Err(usage.to_owned()),
    }
}
