//! `fleetgrid sim --validate` as a user runs it: a window of the shipped
//! scenario through a real coordinator, one real agent per vehicle replaying
//! its recorded sessions and a client replaying the recorded requests, with
//! the simulator's delivered tokens, migrations and owner earnings within
//! the documented tolerances of the real ones (the command fails otherwise),
//! energy against the simulator's at the machine's speeds before and after
//! the window.
//!
//! It runs alone (`.config/nextest.toml`): the agents share the machine's
//! cores, and what they are calibrated at must be what they run at.

use std::process::Command;

#[test]
fn a_window_through_real_processes_agrees_with_the_simulator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("validation");
    let output = Command::new(env!("CARGO_BIN_EXE_fleetgrid"))
        .args(["sim", "--validate", "--vehicles", "12", "--seed", "2"])
        .args(["--minutes", "2", "--drain-minutes", "2"])
        // 07:00, when owners who charged overnight leave: departures in the
        // window, announced and not.
        .args(["--start-minute", "420"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run fleetgrid");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fleetgrid sim --validate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("validation.json")).expect("validation.json"),
    )
    .expect("JSON");
    let checks = report["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 7, "{report:#}");
    assert!(checks.iter().all(|c| c["within"] == true), "{report:#}");
    // Work was done and paid on both sides: the agreement is not two zeros.
    let served = |side: &str| -> u64 {
        report[side]["served"]
            .as_array()
            .expect("served")
            .iter()
            .map(|n| n.as_u64().expect("count"))
            .sum()
    };
    assert!(served("real") > 0, "{report:#}");
    assert_eq!(
        served("real"),
        report["requests"].as_u64().expect("requests")
    );
    assert!(report["real"]["revenue_share"].as_i64().expect("money") > 0);
    assert!(report["real"]["energy_reimbursed"].as_i64().expect("money") > 0);
    // The machine's speeds were measured again after the window, and energy
    // is compared with the band between them.
    let speed = |calibration: &str| {
        report[calibration]["decode_tokens_per_second"]
            .as_f64()
            .expect("speed")
    };
    assert!(speed("calibration") > 0.0 && speed("calibration_after") > 0.0);
    assert!(
        checks[3]["simulated_at_speeds_after"]
            .as_f64()
            .expect("band")
            > 0.0
    );
}
