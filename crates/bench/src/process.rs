//! Child processes of the benchmarks: checked one-shot commands, and free local ports for the
//! long-running servers (which the `stack` crate starts and stops).

use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::BenchError;

/// How much of a failed command's output goes into the error: enough for the compiler or server
/// message that explains the failure, small enough for a terminal.
pub(crate) const OUTPUT_TAIL_BYTES_MAX: u64 = 4_000;

/// Runs `command` to completion and returns its stdout. Its output is kept in `log_path` so that a
/// failure can be explained (and a long build inspected) without holding it all in memory.
pub(crate) fn run_logged(
    command: &mut Command,
    program: &str,
    log_path: &Path,
) -> Result<String, BenchError> {
    let log = File::create(log_path).map_err(|e| BenchError::io("create", log_path, e))?;
    let log_for_stderr = log
        .try_clone()
        .map_err(|e| BenchError::io("open", log_path, e))?;
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_for_stderr))
        .output()
        .map_err(|source| BenchError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    Err(BenchError::CommandFailed {
        program: program.to_owned(),
        status: output.status.to_string(),
        output_tail: format!("{}{}", stack::log_tail(log_path), tail_of_str(&stdout)),
    })
}

fn tail_of_str(text: &str) -> String {
    let bound = usize::try_from(OUTPUT_TAIL_BYTES_MAX).unwrap_or(usize::MAX);
    let mut start = text.len().saturating_sub(bound);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Removes a directory tree; one that does not exist is already removed.
pub(crate) fn remove_dir_if_present(path: &Path) -> Result<(), BenchError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BenchError::io("remove", path, e)),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process could take it before the
/// server binds it; the server then fails to start and says so, which is acceptable for a benchmark.
pub(crate) fn free_local_port() -> Result<u16, BenchError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| BenchError::io("bind", "127.0.0.1:0", e))?;
    let address = listener
        .local_addr()
        .map_err(|e| BenchError::io("inspect", "127.0.0.1:0", e))?;
    Ok(address.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_command_reports_its_own_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("fail.log");
        let result = run_logged(
            Command::new("sh").args(["-c", "echo broken-widget >&2; exit 3"]),
            "sh",
            &log,
        );
        match result {
            Err(BenchError::CommandFailed { output_tail, .. }) => {
                assert!(output_tail.contains("broken-widget"), "{output_tail}");
            }
            other => panic!("expected CommandFailed, got {other:?}"),
        }
    }

    #[test]
    fn free_port_can_be_bound() {
        let port = free_local_port().expect("free port");
        TcpListener::bind(("127.0.0.1", port)).expect("bind the free port");
    }
}
