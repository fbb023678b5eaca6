//! Starting stacks from a stand-in for the `fleetgrid` binary: a shell script
//! that prints what `fleetgrid` prints, so that no model is needed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stack::{Coordinator, CoordinatorSpec, Fleetgrid, LogFile, Stack, StackError};

const ANNOUNCEMENT: &str = "fleetgrid listening http=127.0.0.1:1 grpc=127.0.0.1:2";

/// An executable script in `dir` running `body`, whatever its arguments.
fn stand_in(dir: &Path, body: &str) -> Fleetgrid {
    let path: PathBuf = dir.join("fleetgrid");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write the stand-in");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Fleetgrid::new(path)
}

fn spec(dir: &Path) -> CoordinatorSpec {
    CoordinatorSpec::new(dir, LogFile::create(dir.join("coordinator.log")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_is_ready_once_it_announces_and_is_gone_with_its_stack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleetgrid = stand_in(
        dir.path(),
        &format!("echo '{ANNOUNCEMENT}'; exec sleep 600"),
    );
    let coordinator = Coordinator::start(&fleetgrid, &spec(dir.path()), Duration::from_secs(30))
        .await
        .expect("announced");
    let running = Stack::new(fleetgrid, coordinator);
    assert_eq!(running.http().port(), 1);
    assert_eq!(running.grpc().port(), 2);
    running.check_running().expect("the coordinator runs");
    let pid = running.coordinator().pid();
    drop(running);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the coordinator outlived its stack: {stat}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_vehicles_ends_with_the_coordinators_own_words_when_it_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = format!("echo '{ANNOUNCEMENT}'; echo 'no model to serve' >&2; exit 1");
    let fleetgrid = stand_in(dir.path(), &script);
    let coordinator = Coordinator::start(&fleetgrid, &spec(dir.path()), Duration::from_secs(30))
        .await
        .expect("announced");
    let running = Stack::new(fleetgrid, coordinator);
    let error = running
        .wait_for_vehicles(1, Duration::from_secs(600))
        .await
        .expect_err("the coordinator exited");
    assert!(
        matches!(&error, StackError::Exited { log_tail, .. } if log_tail.contains("no model to serve")),
        "{error}"
    );
}

#[test]
fn a_coordinator_that_never_announces_is_given_up_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleetgrid = stand_in(dir.path(), "exec sleep 600");
    let started =
        Coordinator::start_blocking(&fleetgrid, &spec(dir.path()), Duration::from_millis(300));
    assert!(
        matches!(started, Err(StackError::Timeout { .. })),
        "{:?}",
        started.err()
    );
}

#[test]
fn a_one_shot_command_gives_its_last_line_or_its_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let printing = stand_in(dir.path(), "echo 'created tenant'; echo sk-123; echo");
    assert_eq!(
        printing
            .cli(&["tenants", "create", "t"], dir.path())
            .expect("ran"),
        "sk-123"
    );
    let failing = stand_in(dir.path(), "echo 'no such tenant' >&2; exit 2");
    let error = failing
        .cli(&["tenants", "show", "t"], dir.path())
        .expect_err("failed");
    assert!(
        matches!(&error, StackError::CommandFailed { stderr, .. } if stderr.contains("no such tenant")),
        "{error}"
    );
}
