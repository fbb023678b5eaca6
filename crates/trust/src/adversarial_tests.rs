//! The adversarial simulation on small fleets: deterministic, cheaters caught, honest nodes
//! left alone, and the overhead where the policy puts it.

use super::*;

fn small() -> AdversarialConfig {
    AdversarialConfig {
        nodes: 200,
        rounds: 600,
        cheater_share: 0.06,
        honest_prefix: 200,
        colluding_pairs: 2,
        ..AdversarialConfig::default()
    }
}

#[test]
fn a_seed_gives_the_same_run_and_another_seed_another() {
    let config = small();
    assert_eq!(run(&config, 7), run(&config, 7));
    assert_ne!(run(&config, 7), run(&config, 8));
}

#[test]
fn cheaters_are_quarantined_and_honest_nodes_are_not() {
    let config = small();
    let runs: Vec<_> = (0..5).map(|seed| run(&config, seed)).collect();
    let summary = summarize(&config, &runs);
    assert_eq!(summary.honest_quarantined, 0, "{summary}");
    for (kind, kind_summary) in &summary.kinds {
        assert!(kind_summary.cheaters > 0, "{kind:?}");
        assert_eq!(
            kind_summary.quarantined, kind_summary.cheaters,
            "{kind:?}\n{summary}"
        );
    }
    // Colluders fail honest answers and are contradicted by the datacenter at once.
    assert_eq!(summary.colluding.quarantined, summary.colluding.cheaters);
    for run in &runs {
        for cheater in run
            .cheaters
            .iter()
            .filter(|cheater| !cheater.late && !cheater.colluding)
        {
            // In probation from its first generation: the first bad answer is checked.
            assert_eq!(cheater.generations_to_quarantine, Some(1), "{cheater:?}");
            assert_eq!(cheater.bad_answers_unverified, 0);
        }
    }
}

#[test]
fn a_late_cheaters_unchecked_answers_are_clawed_back() {
    let config = AdversarialConfig {
        colluding_pairs: 0,
        late_share: 1.0,
        ..small()
    };
    let runs: Vec<_> = (0..5).map(|seed| run(&config, seed)).collect();
    let mut late = 0;
    for cheater in runs.iter().flat_map(|run| &run.cheaters) {
        if cheater.kind == CheatKind::InflatedComputeMs {
            continue;
        }
        late += 1;
        assert!(cheater.quarantined, "{cheater:?}");
        // Every bad answer it got away with unverified is within the suspect window, and
        // so is the one that failed.
        assert_eq!(
            cheater.bad_answers_clawed_back,
            cheater.bad_answers - cheater.bad_answers_wrongly_passed,
            "{cheater:?}"
        );
        assert!(cheater.generations_to_quarantine.unwrap() >= 1);
    }
    assert!(late >= 20, "{late}");
}

#[test]
fn steady_overhead_is_the_floor_times_the_cost_of_a_check() {
    let config = AdversarialConfig {
        cheater_share: 0.0,
        colluding_pairs: 0,
        rounds: 3_000,
        ..small()
    };
    let result = run(&config, 1);
    let floor = config.policy.floor * config.verification_cost;
    // After probation the rate is 1/n down to the floor, and audits add a tenth of vehicle
    // passes again.
    assert!(
        result.steady_overhead >= floor && result.steady_overhead <= floor * 1.6,
        "{} vs floor {floor}",
        result.steady_overhead
    );
    assert!(result.overall_overhead > result.steady_overhead);
    assert_eq!(result.honest_quarantined, 0);
}

#[test]
fn an_honest_false_failure_rate_would_quarantine_honest_nodes() {
    let config = AdversarialConfig {
        honest_failure: 0.01,
        ..small()
    };
    let result = run(&config, 3);
    assert!(result.honest_quarantined > 0);
}

#[test]
fn percentiles_take_the_nearest_rank() {
    let values: Vec<u64> = (1..=100).collect();
    assert_eq!(percentile(&values, 50), 50);
    assert_eq!(percentile(&values, 99), 99);
    assert_eq!(percentile(&[7], 99), 7);
    assert_eq!(percentile(&[], 50), 0);
}
