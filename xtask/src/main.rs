//! Project automation: `cargo xtask demo` and `cargo xtask test`, the two commands of the README.
//!
//! Both prepare a fresh Debian machine that has only the Rust toolchain (Debian packages, a Python
//! virtual environment, the models) and are safe to run again: every step checks first and is
//! skipped when already satisfied. xtask deliberately depends on nothing heavy; it shells out to
//! `apt-get`, `python3`, `cargo` and the `fleetgrid` binary.

mod command;
mod cross;
mod services;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo    install what is missing, fetch the models, run `fleetgrid demo` (Ctrl-C stops it)
  demo --cluster
          the same, and PostgreSQL and nats-server: `fleetgrid demo --cluster` (gateways and
          cells on a NATS cluster and PostgreSQL)
  test    install what is missing, fetch the models, start PostgreSQL and NATS, then run
          cargo fmt --check, cargo clippy -D warnings and the whole test suite, then check
          that the agent builds for aarch64 (the vehicles), with the CPU kernels of every ARM
          level, with Debian's clang and aarch64 libraries";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["demo"] => demo(false),
        ["demo", "--cluster"] => demo(true),
        ["test"] => test(),
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown arguments {arguments:?}\n\n{USAGE}"),
    }
}

/// The repository root: xtask's manifest lives one level below it.
fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}

fn demo(cluster: bool) -> Result<()> {
    let root = repo_root();
    setup::debian_packages(setup::BUILD_PACKAGES)?;
    let python = setup::python_venv(&root, setup::DEMO_PYTHON_PACKAGES)?;
    let fleetgrid = build_workspace(&root)?;
    setup::models(&fleetgrid, &python, setup::DEMO_MODELS)?;
    let mut demo = std::process::Command::new(&fleetgrid);
    demo.arg("demo");
    if cluster {
        services::postgres()?;
        services::nats(&root)?;
        demo.arg("--cluster");
    }
    command::step("run the demo (Ctrl-C stops it)");
    command::exec(&mut demo)
}

/// Builds every crate and test of the workspace once, and returns the
/// `fleetgrid` binary. Every later cargo step of `demo` and `test` selects
/// the same packages and targets, so that feature unification is the same
/// and llama.cpp (built by a dependency's build script) is compiled once.
fn build_workspace(root: &std::path::Path) -> Result<PathBuf> {
    command::step("build the workspace (the first build compiles llama.cpp: several minutes)");
    command::cargo(root, &["test", "--workspace", "--no-run"], &[])?;
    let binary = root.join("target").join("debug").join("fleetgrid");
    if !binary.is_file() {
        bail!("the build did not produce {}", binary.display());
    }
    Ok(binary)
}

fn test() -> Result<()> {
    let root = repo_root();
    setup::debian_packages(setup::BUILD_PACKAGES)?;
    let python = setup::python_venv(&root, setup::TEST_PYTHON_PACKAGES)?;
    command::step("check formatting");
    command::cargo(&root, &["fmt", "--all", "--", "--check"], &[])?;
    let fleetgrid = build_workspace(&root)?;
    setup::models(&fleetgrid, &python, setup::TEST_MODELS)?;
    services::postgres()?;
    services::nats(&root)?;

    let python_env = [("FLEETGRID_TEST_PYTHON", python.as_os_str())];
    command::step("lint");
    command::cargo(
        &root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    if command::succeeds(command::cargo_command(&root).args(["nextest", "--version"])) {
        command::step("run the tests with nextest");
        command::cargo(&root, &["nextest", "run", "--workspace"], &python_env)?;
    } else {
        command::step("run the tests (cargo-nextest not installed)");
        command::cargo(&root, &["test", "--workspace"], &python_env)?;
    }
    cross::check_agent_for_aarch64(&root)?;
    command::step("all checks passed");
    Ok(())
}
