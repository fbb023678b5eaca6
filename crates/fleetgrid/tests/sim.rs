//! `fleetgrid sim` as a user runs it: the files it writes, the same seed
//! giving the same sim.json, a scenario field it does not know refused by
//! name, and the sweep's grid.

use std::path::Path;
use std::process::{Command, Output};

fn fleetgrid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgrid"))
        .args(args)
        .output()
        .expect("run fleetgrid")
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "fleetgrid failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The shipped scenario with `change` applied, written to `dir`.
fn scenario(dir: &Path, change: impl FnOnce(&mut serde_json::Value)) -> String {
    let shown = fleetgrid(&["sim", "--show-scenario"]);
    ok(&shown);
    let mut value: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    change(&mut value);
    let path = dir.join("scenario.json");
    std::fs::write(&path, value.to_string()).expect("write scenario");
    path.to_string_lossy().into_owned()
}

#[test]
fn sim_writes_its_report_and_charts_and_the_same_seed_gives_the_same_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    for out in [&first, &second] {
        let out = out.to_string_lossy();
        let run = fleetgrid(&[
            "sim",
            "--vehicles",
            "150",
            "--days",
            "1",
            "--seed",
            "3",
            "--out",
            &out,
        ]);
        ok(&run);
    }
    let json = read(&first.join("sim.json"));
    assert_eq!(json, read(&second.join("sim.json")));
    let report: serde_json::Value = serde_json::from_str(&json).expect("sim.json is JSON");
    assert_eq!(report["run"]["vehicles"], 150);
    assert_eq!(report["checks"]["anomalies"], serde_json::json!({}));
    assert_eq!(report["day_profile"].as_array().map(Vec::len), Some(24));
    assert!(report["delivered_tokens_per_day"]["all_classes_on_vehicles"].as_f64() > Some(0.0));
    let page = read(&first.join("report.md"));
    assert!(
        page.starts_with("# fleetgrid sim: 150 vehicles × 1 days"),
        "{page}"
    );
    for chart in ["capacity.svg", "tokens.svg", "energy.svg", "earnings.svg"] {
        assert!(page.contains(chart), "the report shows {chart}");
        let svg = read(&first.join(chart));
        assert!(svg.starts_with("<svg") && svg.contains("polyline") || svg.contains("<rect"));
    }
    let timing: serde_json::Value =
        serde_json::from_str(&read(&first.join("timing.json"))).expect("timing.json");
    assert!(timing["events_per_second"].as_f64() > Some(0.0));
}

#[test]
fn a_scenario_field_the_simulator_does_not_know_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(dir.path(), |value| {
        value["tariffs"][0]["night_discount"] = serde_json::json!(0.5);
    });
    let out = dir.path().join("out");
    let run = fleetgrid(&["sim", "--scenario", &path, "--out", &out.to_string_lossy()]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("night_discount"), "{stderr}");
}

#[test]
fn the_sweep_runs_its_grid_and_draws_the_frontier() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = scenario(dir.path(), |value| {
        for class in value["demand"]["classes"].as_array_mut().expect("classes") {
            class["requests_per_vehicle_per_day"] = serde_json::json!(60.0);
        }
    });
    let out = dir.path().join("sweep");
    let run = fleetgrid(&[
        "sim",
        "--sweep",
        "--scenario",
        &path,
        "--vehicles",
        "40",
        "--out",
        &out.to_string_lossy(),
    ]);
    ok(&run);
    let sweep: serde_json::Value =
        serde_json::from_str(&read(&out.join("sweep.json"))).expect("sweep.json");
    let points = sweep["points"].as_array().expect("points");
    assert_eq!(points.len(), 72);
    // Electricity per token falls as the tariff falls, all else equal.
    let electricity = |tariff: f64| {
        points
            .iter()
            .find(|p| {
                p["max_batch"] == 0
                    && p["power_factor"] == 1.0
                    && p["plug_in_factor"] == 1.0
                    && p["tariff_per_kwh"] == tariff
            })
            .and_then(|p| p["electricity_per_million"].as_f64())
            .expect("a grid point")
    };
    assert!(electricity(0.05) < electricity(0.295));
    assert!(read(&out.join("frontier.svg")).contains("datacenter baseline"));
    assert!(read(&out.join("sweep.md")).contains("| max batch |"));
}

#[test]
fn validation_flags_are_refused_without_validate_and_a_fleet_too_large_to_start_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let out = out.to_string_lossy();
    let stray = fleetgrid(&["sim", "--minutes", "5", "--out", &out]);
    assert!(!stray.status.success());
    assert!(String::from_utf8_lossy(&stray.stderr).contains("--validate"));
    let large = fleetgrid(&["sim", "--validate", "--vehicles", "5000", "--out", &out]);
    assert!(!large.status.success());
    assert!(String::from_utf8_lossy(&large.stderr).contains("at most 100 vehicles"));
    let days = fleetgrid(&["sim", "--validate", "--days", "2", "--out", &out]);
    assert!(!days.status.success());
    assert!(String::from_utf8_lossy(&days.stderr).contains("--days"));
}
