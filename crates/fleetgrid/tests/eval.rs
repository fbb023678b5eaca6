//! End to end: `fleetgrid eval` starts its own stack with the real SmolLM2
//! model, runs the gateway's routing machine in the client on CommonsenseQA
//! items, records both tiers' answers (the edge's with its tokens); `fleetgrid router calibrate` chooses thresholds from those
//! records; `eval --replay` reports the calibrated router with its curve.
//!
//! The "cloud" here is the same small model, so the test checks the
//! plumbing and the calibration's logic, not answer quality: with identical
//! answers on both tiers, calibration must keep everything at the edge.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::MODEL;
use router::{ClassPolicy, RouterConfig};

fn dataset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/eval/commonsenseqa_200.jsonl")
}

fn fleetgrid(args: &[&str]) -> String {
    let output = Command::new(common::binary())
        .args(args)
        .output()
        .expect("run fleetgrid");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "fleetgrid {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    serde_json::from_str(&text).expect("json")
}

#[test]
fn eval_records_both_tiers_then_calibration_keeps_identical_answers_at_the_edge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let records = out.join("records.jsonl");
    let dataset = dataset();
    let dataset = dataset.to_str().expect("utf-8 path");
    let out_arg = out.to_str().expect("utf-8 path");

    // A router that escalates every answer: no answer reaches a mean
    // log-probability of 0.5, so each item gets an edge and a cloud answer.
    let mut escalate_all = RouterConfig::default();
    escalate_all.policies.multiple_choice = ClassPolicy::Cascade(router::AcceptRule {
        feature: router::ConfidenceFeature::MeanLogprob,
        threshold: 0.5,
    });
    let escalate_all_path = dir.path().join("escalate-all.json");
    std::fs::write(&escalate_all_path, escalate_all.to_json()).expect("write config");
    let stack_dir = dir.path().join("stack");
    let stdout = fleetgrid(&[
        "eval",
        "--dataset",
        dataset,
        "--policy",
        "auto",
        "--half",
        "calibrate",
        "--limit",
        "2",
        "--edge-model",
        MODEL,
        "--cloud-model",
        MODEL,
        "--router-config",
        escalate_all_path.to_str().expect("path"),
        "--threads-per-vehicle",
        "1",
        "--out",
        out_arg,
        "--data-dir",
        stack_dir.to_str().expect("path"),
    ]);
    assert!(
        stdout.contains("served at the edge    0.0% (0/2)"),
        "{stdout}"
    );
    let report = read_json(&out.join("commonsenseqa_200-calibrate-auto.json"));
    assert_eq!(report["items"], 2);
    for result in report["results"].as_array().expect("results") {
        assert_eq!(result["served"], "escalated", "{result}");
        assert!(
            result["reason"]
                .as_str()
                .expect("reason")
                .contains("mean_logprob"),
            "{result}"
        );
    }
    // The router's own time is measured and tiny next to a generation.
    assert!(report["router_us"]["p50"].as_f64().expect("router time") < 50_000.0);

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&records)
        .expect("records")
        .lines()
        .map(|line| serde_json::from_str(line).expect("record"))
        .collect();
    assert_eq!(lines.len(), 4, "an edge and a cloud answer per item");
    for line in &lines {
        // Calibrate half: even line numbers of the file.
        assert_eq!(line["index"].as_u64().expect("index") % 2, 0);
        assert_eq!(line["class"], "multiple_choice");
        if line["tier"] == "edge" {
            assert!(
                line["confidence"]["tokens"].as_u64().expect("scores") > 0,
                "{line}"
            );
            // The tokens a replay feeds the machine add up to the answer.
            let tokens: String = line["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|token| token["text"].as_str().expect("token text"))
                .collect();
            assert_eq!(tokens, line["answer"].as_str().expect("answer"), "{line}");
        }
    }

    // Calibrate on those records: both tiers gave the same answers, so the
    // cheapest policy with full cloud quality serves everything at the edge,
    // as long as the edge got one of them right (with none right there is no
    // evidence for the edge, and calibration sends the class to the cloud).
    let edge_right = lines
        .iter()
        .any(|line| line["tier"] == "edge" && line["correct"] == true);
    let expected = if edge_right {
        ClassPolicy::Edge
    } else {
        ClassPolicy::Cloud
    };
    // Two items are no evidence for the edge under the default rules (20 items of a class
    // first): the class goes to the cloud, and the summary says how it held out of sample.
    let records_arg = records.to_str().expect("path");
    let calibrate = |out: &Path, rules: &[&str]| {
        let mut args = vec!["router", "calibrate", "--dataset", dataset];
        args.extend(["--records", records_arg, "--target-quality", "0.95"]);
        args.extend(rules);
        args.extend(["--out", out.to_str().expect("path")]);
        fleetgrid(&args)
    };
    let careful_path = dir.path().join("router-careful.json");
    let stdout = calibrate(&careful_path, &[]);
    assert!(stdout.contains("held out (2-fold)"), "{stdout}");
    let careful = RouterConfig::from_json(&std::fs::read_to_string(&careful_path).expect("config"))
        .expect("the calibrated configuration loads");
    assert_eq!(careful.policies.multiple_choice, ClassPolicy::Cloud);
    let checked = careful
        .calibration
        .and_then(|summary| summary.cross_validated)
        .expect("cross-validation");
    assert_eq!(checked.routed.items, 2);
    // The search alone, as the rest of this test replays it.
    let config_path = dir.path().join("router.json");
    calibrate(
        &config_path,
        &["--min-class-items", "0", "--point-estimates"],
    );
    let calibrated =
        RouterConfig::from_json(&std::fs::read_to_string(&config_path).expect("config"))
            .expect("the calibrated configuration loads");
    assert_eq!(calibrated.policies.multiple_choice, expected);
    let summary = calibrated.calibration.expect("calibration summary");
    assert_eq!(summary.routed.items, 2);
    assert!(
        summary.source.contains("calibrate half"),
        "{}",
        summary.source
    );

    // Replay the calibrated router on the same items: all at the edge (or
    // all in the cloud), the same accuracy as cloud-only, cheaper when at the
    // edge, and a curve naming the half.
    fleetgrid(&[
        "eval",
        "--dataset",
        dataset,
        "--policy",
        "auto",
        "--half",
        "calibrate",
        "--limit",
        "2",
        "--replay",
        "--router-config",
        config_path.to_str().expect("path"),
        "--out",
        out_arg,
    ]);
    let replayed = read_json(&out.join("commonsenseqa_200-calibrate-auto-replay.json"));
    let comparison = &replayed["comparison"];
    assert_eq!(replayed["correct"], comparison["cloud_only"]["correct"]);
    let saving = comparison["cost_saving_vs_cloud"].as_f64().expect("saving");
    if edge_right {
        assert_eq!(replayed["edge_share"], 1.0);
        assert!(saving > 0.0, "{comparison}");
    } else {
        assert_eq!(replayed["edge_share"], 0.0);
        assert_eq!(saving, 0.0, "{comparison}");
    }
    let svg =
        std::fs::read_to_string(out.join("commonsenseqa_200-calibrate-curve.svg")).expect("curve");
    assert!(
        svg.contains("calibrate half (even items), first 2 items"),
        "{svg}"
    );
}

/// `--scoring loglikelihood`: each option of a CommonsenseQA item is scored
/// through the gateway's echoed prompt log-probabilities; the report gives
/// both accuracies with their intervals and every option's score.
#[test]
fn options_scored_by_likelihood_are_reported_with_intervals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let dataset = dataset();
    let stdout = fleetgrid(&[
        "eval",
        "--dataset",
        dataset.to_str().expect("utf-8 path"),
        "--policy",
        "edge",
        "--scoring",
        "loglikelihood",
        "--limit",
        "3",
        "--edge-model",
        MODEL,
        "--threads-per-vehicle",
        "1",
        "--data-dir",
        dir.path().join("stack").to_str().expect("path"),
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(stdout.contains("scored by log-likelihood"), "{stdout}");
    let report = read_json(&out.join("loglikelihood-edge.json"));
    assert_eq!(report["scoring"], "loglikelihood");
    assert_eq!(report["acc"]["items"], 3);
    for figure in ["acc", "acc_norm"] {
        let accuracy = report[figure]["accuracy"].as_f64().expect("accuracy");
        let interval = report[figure]["wilson95"].as_array().expect("interval");
        let (low, high) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
        assert!(
            low <= accuracy && accuracy <= high && high - low > 0.2,
            "{report}"
        );
    }
    let items = report["items"].as_array().expect("items");
    assert_eq!(items.len(), 3);
    for item in items {
        let options = item["options"].as_array().expect("options");
        assert_eq!(options.len(), 5, "{item}");
        // Every option is a different text: scored differently, each a log-probability.
        let scores: Vec<f64> = options
            .iter()
            .map(|option| option["logprob"].as_f64().expect("a score"))
            .collect();
        assert!(scores.iter().all(|score| *score < 0.0), "{item}");
        assert!(scores.windows(2).any(|pair| pair[0] != pair[1]), "{item}");
    }
    // Nothing was written for the router's calibration: no answer was generated.
    assert!(!out.join("records.jsonl").exists());
}
