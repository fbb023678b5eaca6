//! Starting, watching and stopping processes, with `sh` standing in for fleetgrid.

use std::os::unix::process::ExitStatusExt;

use super::*;
use crate::probe;

/// Whether `pid` is a live process (not gone, not a zombie waiting for a reaper).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Whether `pid` is gone within a few seconds: a signalled process dies
/// shortly after the signal is sent, not at once.
fn gone_soon(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Starts `command` as `name`, logging to `name.log` in `dir`.
fn start(dir: &Path, name: &str, command: Command, stdout: Stdout) -> Process {
    let log = LogFile::create(dir.join(format!("{name}.log")));
    Process::spawn(name, command, &log, stdout).expect("spawn")
}

fn sleep_long() -> Command {
    let mut command = Command::new("sleep");
    command.arg("600");
    command
}

fn sh(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.args(["-c", script]);
    command
}

/// A shell that starts a grandchild in its group and prints its pid.
fn shell_with_grandchild(dir: &Path) -> (Process, u32) {
    let mut process = start(dir, "sh", sh("sleep 600 & echo $!; wait"), Stdout::Lines);
    let lines = process.lines().expect("lines");
    let grandchild = lines
        .first_blocking(Duration::from_secs(10), |line| line.trim().parse().ok())
        .expect("the grandchild's pid");
    (process, grandchild)
}

#[test]
fn dropping_a_process_stops_its_whole_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (process, grandchild) = shell_with_grandchild(dir.path());
    let pid = process.pid();
    assert!(alive(pid) && alive(grandchild));
    drop(process);
    assert!(!alive(pid), "the child outlived its Process");
    assert!(
        gone_soon(grandchild),
        "the child's own child outlived its Process"
    );
}

#[test]
fn a_caller_that_panics_leaves_no_process_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = std::sync::Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(|| {
        let (process, grandchild) = shell_with_grandchild(dir.path());
        started
            .lock()
            .expect("lock")
            .extend([process.pid(), grandchild]);
        panic!("the caller fails while its process runs");
    });
    assert!(outcome.is_err());
    let started = started.into_inner().expect("lock");
    assert_eq!(started.len(), 2);
    assert!(
        started.iter().all(|pid| gone_soon(*pid)),
        "{started:?} still run"
    );
}

#[test]
fn a_process_that_ignores_sigterm_is_killed_after_its_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "trap '' TERM; echo ready; while :; do sleep 1; done";
    let mut process = start(dir.path(), "stubborn", sh(script), Stdout::Lines);
    // Once it has printed, its trap is in place.
    let lines = process.lines().expect("lines");
    lines
        .first_blocking(Duration::from_secs(10), |line| {
            (line == "ready").then_some(())
        })
        .expect("ready");
    process.set_grace(Duration::from_millis(200));
    process.stop_blocking();
    let exit = process.exit().expect("stopped");
    assert_eq!(exit.status().and_then(|status| status.signal()), Some(9));
}

#[test]
fn a_process_that_stops_on_sigterm_is_not_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start(dir.path(), "sleep", sleep_long(), Stdout::Null);
    process.stop_blocking();
    let exit = process.exit().expect("stopped");
    assert_eq!(exit.status().and_then(|status| status.signal()), Some(15));
}

/// The coordinator's addresses as announced on the first line of `script`'s output.
fn announcement_of(script: &str) -> Result<coordinator::Bound, StackError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut process = start(dir.path(), "coordinator", sh(script), Stdout::Lines);
    let lines = process.lines().expect("lines");
    lines.first_blocking(
        Duration::from_secs(10),
        coordinator::Bound::parse_announcement,
    )
}

#[test]
fn the_first_line_is_the_announcement() {
    let bound =
        announcement_of("echo 'fleetgrid listening http=127.0.0.1:1 grpc=127.0.0.1:2'; sleep 600")
            .expect("announced");
    assert_eq!(bound.http.port(), 1);
    assert_eq!(bound.grpc.port(), 2);
}

#[test]
fn a_process_that_exits_before_announcing_says_why() {
    match announcement_of("echo broken-widget >&2; exit 3") {
        Err(StackError::Exited { exit, log_tail, .. }) => {
            assert!(exit.contains('3'), "{exit}");
            assert!(log_tail.contains("broken-widget"), "{log_tail}");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
}

#[test]
fn another_first_line_is_no_announcement() {
    let error = announcement_of("echo hello; sleep 600").expect_err("not an announcement");
    assert!(
        matches!(&error, StackError::Announcement { line, .. } if line == "hello"),
        "{error:?}"
    );
}

#[test]
fn an_appended_log_keeps_what_an_earlier_start_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.log");
    for (word, log) in [
        ("first", LogFile::create(&path)),
        ("second", LogFile::append(&path)),
    ] {
        let script = format!("echo {word} >&2");
        let process = Process::spawn("agent", sh(&script), &log, Stdout::Null).expect("spawn");
        process.exit.wait_blocking(Duration::from_secs(10));
    }
    let text = std::fs::read_to_string(&path).expect("log");
    assert_eq!(text, "first\nsecond\n");
}

#[tokio::test]
async fn waiting_for_readiness_ends_when_a_member_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = start(
        dir.path(),
        "agent",
        sh("echo no-model >&2; exit 4"),
        Stdout::Null,
    );
    let error = probe::wait_until(
        &[&process],
        "never ready",
        Duration::from_secs(600),
        || async { false },
    )
    .await
    .expect_err("the member exited");
    assert!(
        matches!(&error, StackError::Exited { log_tail, .. } if log_tail.contains("no-model")),
        "{error:?}"
    );
    assert!(!process.exited().await.success());
}

#[tokio::test]
async fn stopping_together_stops_every_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut processes: Vec<Process> = (0..3)
        .map(|index| {
            start(
                dir.path(),
                &format!("sleep-{index}"),
                sleep_long(),
                Stdout::Null,
            )
        })
        .collect();
    stop_all(processes.iter_mut()).await;
    for process in &processes {
        assert!(process.exit().is_some(), "{} still runs", process.name);
        assert!(!alive(process.pid()));
    }
}
