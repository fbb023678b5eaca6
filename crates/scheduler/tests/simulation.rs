//! Deterministic simulation: many random scenarios against the real scheduler, with the
//! contract's invariants checked after every event. `SCHED_SEED=n` replays one seed; a failure
//! prints the seed and the events that led to it.

use scheduler::sim::{self, SimConfig};

/// Seeds per run: enough to cover rare interleavings, few enough for about 20 s in debug.
const SEEDS: u64 = 1_000;

#[test]
fn random_fleets_keep_every_invariant() {
    let config = SimConfig::default();
    let seeds: Vec<u64> = match std::env::var("SCHED_SEED") {
        Ok(seed) => vec![seed
            .trim()
            .parse()
            .expect("SCHED_SEED must be an unsigned integer")],
        Err(_) => (0..SEEDS).collect(),
    };
    let mut totals = sim::SimReport::default();
    for seed in &seeds {
        match sim::run(*seed, &config) {
            Ok(report) => {
                totals.requests += report.requests;
                totals.finished += report.finished;
                totals.rejected += report.rejected;
                totals.preemptions += report.preemptions;
                totals.stops += report.stops;
            }
            Err(violation) => panic!("{violation}\nreplay with SCHED_SEED={seed}"),
        }
    }
    // The scenarios must actually exercise the scheduler, or the invariants prove nothing.
    assert!(
        totals.finished > totals.requests / 4,
        "too few requests finished: {totals:?}"
    );
    if seeds.len() as u64 == SEEDS {
        assert!(
            totals.preemptions > 0 && totals.stops > totals.preemptions,
            "no preemption or migration: {totals:?}"
        );
        assert!(totals.rejected > 0, "no rejection: {totals:?}");
    }
}

#[test]
fn a_seed_replays_command_for_command() {
    let config = SimConfig::default();
    let first = sim::run(7, &config).expect("seed 7 passes");
    let second = sim::run(7, &config).expect("seed 7 passes");
    assert_eq!(first, second);
    let other = sim::run(8, &config).expect("seed 8 passes");
    assert_ne!(
        first.digest, other.digest,
        "different seeds should give different runs"
    );
}
