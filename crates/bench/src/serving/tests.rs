//! Tests of the serving report and settings.

use super::*;

fn load(tokens: u64, seconds: u64) -> LoadResult {
    LoadResult {
        requests: 2,
        completion_tokens: tokens,
        wall: Duration::from_secs(seconds),
        time_to_first_token_mean: Duration::from_millis(250),
        usage_reported: true,
    }
}

fn report(ours: [Option<LoadResult>; 2], ours_error: Option<String>) -> ServingBenchReport {
    let [ours_low, ours_high] = ours;
    ServingBenchReport {
        config: ServingConfig::new("model.gguf", 2, "work"),
        reference_version: "llama.cpp test".to_owned(),
        reference_ignore_eos: true,
        ours_ignore_eos: false,
        rows: vec![
            ServingRow {
                concurrency: 1,
                reference: load(256, 4),
                ours: ours_low,
                round_ratios: Vec::new(),
            },
            ServingRow {
                concurrency: 8,
                reference: load(2048, 16),
                ours: ours_high,
                round_ratios: vec![0.5, 0.25, 0.75],
            },
        ],
        ours_error,
    }
}

#[test]
fn target_is_judged_at_the_highest_concurrency() {
    let report = report([Some(load(256, 2)), Some(load(2048, 32))], None);
    let comparison = report.comparison().expect("both measured");
    assert_eq!(comparison.metric, "aggregate at 8 streams (tokens/s)");
    assert_eq!(comparison.ours, 64.0);
    assert_eq!(comparison.reference, 128.0);
    assert_eq!(comparison.verdict(), crate::Verdict::Fail);
    let text = report.to_string();
    assert!(text.contains("ratio 0.500"), "{text}");
    assert!(
        text.contains("8 streams, ratio per round: 0.500 0.250 0.750 (median 0.500)"),
        "{text}"
    );
    assert!(text.contains("FAIL"), "{text}");
}

#[test]
fn a_stack_that_failed_still_shows_the_reference() {
    let report = report([None, None], Some("fleetgrid serve failed".to_owned()));
    assert!(report.comparison().is_none());
    let text = report.to_string();
    assert!(text.contains("128.0"), "reference figure missing: {text}");
    assert!(
        text.contains("fleetgrid not measured: fleetgrid serve failed"),
        "{text}"
    );
}

#[test]
fn nonsense_settings_are_refused_before_anything_starts() {
    let mut config = ServingConfig::new("model.gguf", 2, "work");
    config.concurrency_levels = vec![1, 0];
    assert!(matches!(
        validate(&config),
        Err(BenchError::InvalidSetting(_))
    ));
    config.concurrency_levels = Vec::new();
    assert!(validate(&config).is_err());
    let mut config = ServingConfig::new("model.gguf", 2, "work");
    config.rounds = 0;
    assert!(validate(&config).is_err());
    assert!(validate(&ServingConfig::new("model.gguf", 2, "work")).is_ok());
}

#[test]
fn each_level_reports_its_median_round() {
    // Three rounds at 100, 20 (a disturbed round) and 90 tokens/s: the median is 90, not the mean.
    let rounds = vec![load(1000, 10), load(200, 10), load(900, 10)];
    let median = median_round(rounds).expect("a round");
    assert_eq!(median.completion_tokens, 900);
    assert_eq!(median_round(Vec::new()), None);
}

#[test]
fn the_median_of_round_ratios_takes_the_middle_or_the_mean_of_the_middle_two() {
    assert_eq!(median(&[1.2, 0.9, 1.0]), Some(1.0));
    assert_eq!(median(&[1.2, 0.9, 1.0, 0.7]), Some(0.95));
    assert_eq!(median(&[]), None);
}
