//! Running external commands: each is printed before it runs, and a failure names the command.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// When the current step began, and when the first did.
static STEPS: Mutex<Option<(Instant, Instant)>> = Mutex::new(None);

/// Prints a step heading so a long run reads as a list of what happened, each heading after the
/// first with the minutes the step before it took and the minutes since the first began: where a
/// run's time goes.
pub fn step(description: &str) {
    let now = Instant::now();
    let mut steps = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((began, first)) = *steps {
        println!(
            "    (that step: {:.1} min; {:.1} min in all)",
            minutes(now - began),
            minutes(now - first)
        );
    }
    let first = steps.map_or(now, |(_, first)| first);
    *steps = Some((now, first));
    println!("\n==> {description}");
}

fn minutes(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() / 60.0
}

/// Prints a note under the current step.
pub fn note(message: &str) {
    println!("    {message}");
}

/// Runs `command` with inherited stdio and fails unless it exits successfully.
pub fn run(command: &mut Command) -> Result<()> {
    println!("    $ {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("start `{}`", describe(command)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", describe(command));
    }
    Ok(())
}

/// Whether `command` runs and exits successfully; its output is discarded.
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The cargo that runs xtask (so the same toolchain builds everything), in the repository root.
pub fn cargo_command(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(root);
    command
}

/// Runs `cargo <arguments>` in the repository root with extra environment variables.
pub fn cargo(root: &Path, arguments: &[&str], env: &[(&str, &OsStr)]) -> Result<()> {
    let mut command = cargo_command(root);
    command.args(arguments);
    for (key, value) in env {
        command.env(key, value);
    }
    run(&mut command)
}

/// Replaces this process with `command`, so that Ctrl-C reaches it directly.
#[cfg(unix)]
pub fn exec(command: &mut Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    println!("    $ {}", describe(command));
    let error = command.exec();
    Err(error).with_context(|| format!("start `{}`", describe(command)))
}

#[cfg(not(unix))]
pub fn exec(command: &mut Command) -> Result<()> {
    run(command)
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
