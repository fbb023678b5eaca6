//! Unit tests of the tolerant check: every pick under logits moved within the tolerance passes,
//! tokens the sampler could not have picked and wrong log-probabilities do not.

use super::*;
use crate::sampler::uniform_for_position;

const VOCABULARY: usize = 512;

/// Deterministic pseudo-random logits spread over roughly [-8, 8).
fn logits(salt: u64) -> Vec<f32> {
    (0..VOCABULARY)
        .map(|index| {
            let unit = uniform_for_position(salt, u32::try_from(index).unwrap());
            (unit as f32) * 16.0 - 8.0
        })
        .collect()
}

/// `logits` with each moved by less than `by`, as another engine's arithmetic would.
fn moved(logits: &[f32], by: f32, salt: u64) -> Vec<f32> {
    logits
        .iter()
        .enumerate()
        .map(|(index, &logit)| {
            let unit = uniform_for_position(salt ^ 0x5EED, u32::try_from(index).unwrap());
            logit + by * ((unit as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// A few near-ties, so that moved logits change the pick now and then.
fn with_near_ties(mut logits: Vec<f32>, salt: u64) -> Vec<f32> {
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for step in 0..6_u32 {
        let index = (uniform_for_position(salt, 10_000 + step) * VOCABULARY as f64) as usize;
        logits[index] = top - 0.01 * step as f32;
    }
    logits
}

fn parameter_sets(seed: u64) -> Vec<SamplingParams> {
    let sampled = |temperature, top_p, top_k, min_p| SamplingParams {
        temperature,
        top_p,
        top_k,
        seed,
        min_p,
    };
    vec![
        SamplingParams::greedy(),
        sampled(1.0, 1.0, 0, 0.0),
        sampled(0.7, 1.0, 0, 0.0),
        sampled(0.8, 0.9, 0, 0.0),
        sampled(1.0, 1.0, 40, 0.0),
        sampled(0.6, 0.95, 20, 0.0),
        sampled(1.0, 1.0, 0, 0.05),
        sampled(0.9, 0.8, 50, 0.1),
        sampled(0.05, 1.0, 0, 0.0),
    ]
}

const TOLERANCE: Tolerance = Tolerance {
    logit: 0.1,
    logprob: 0.2,
};

fn reported(
    sampler: &mut Sampler,
    logits: &[f32],
    params: &SamplingParams,
    position: u32,
) -> (TokenId, f32) {
    let sampled = sampler.sample(logits, params, position, 0);
    (sampled.token, sampled.logprob)
}

/// [`check_token`] with the tests' tolerance.
fn check(
    sampler: &mut Sampler,
    logits: &[f32],
    params: &SamplingParams,
    position: u32,
    token: TokenId,
    logprob: f32,
) -> Checked {
    check_token(
        sampler, logits, params, position, token, logprob, &TOLERANCE,
    )
}

#[test]
fn the_verifiers_own_pick_passes_exactly() {
    let mut sampler = Sampler::new();
    for salt in 0..20_u64 {
        let logits = with_near_ties(logits(salt), salt);
        for params in parameter_sets(salt) {
            for position in 0..8 {
                let (token, logprob) = reported(&mut sampler, &logits, &params, position);
                let checked = check(&mut sampler, &logits, &params, position, token, logprob);
                assert!(checked.exact, "{params:?} at {position}");
                assert_eq!(checked.mismatch, None, "{params:?} at {position}");
            }
        }
    }
}

#[test]
fn every_pick_of_logits_moved_within_the_tolerance_passes() {
    let mut sampler = Sampler::new();
    let mut differed = 0;
    let mut checked_count = 0;
    for salt in 0..60_u64 {
        let verifier = with_near_ties(logits(salt), salt);
        let honest = moved(&verifier, TOLERANCE.logit, salt);
        for params in parameter_sets(salt) {
            for position in 0..16 {
                let (token, logprob) = reported(&mut sampler, &honest, &params, position);
                let checked = check(&mut sampler, &verifier, &params, position, token, logprob);
                checked_count += 1;
                if !checked.exact {
                    differed += 1;
                }
                assert_eq!(
                    checked.mismatch, None,
                    "{params:?} at {position}, salt {salt}"
                );
            }
        }
    }
    // The test means something only if moved logits did change picks.
    assert!(
        differed > 20,
        "{differed} of {checked_count} picks differed"
    );
}

#[test]
fn a_token_far_from_the_pick_fails() {
    let mut sampler = Sampler::new();
    let (mut uncut, mut uncut_failed) = (0, 0);
    for salt in 0..40_u64 {
        let logits = logits(salt);
        // The least likely token: no cut keeps it; a draw over the whole vocabulary in id
        // order reaches it only when the draw lands where moved weights could put it.
        let (least, _) = logits
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .unwrap();
        let least = TokenId::try_from(least).unwrap();
        for params in parameter_sets(salt) {
            let logprob = sampler.score(&logits, least, 0).logprob;
            let checked = check(&mut sampler, &logits, &params, 3, least, logprob);
            let failed = matches!(
                checked.mismatch,
                Some(Mismatch::NotPicked { token, .. }) if token == least
            );
            let cut = params.is_greedy()
                || params.top_k > 0
                || params.top_p < 1.0
                || params.min_p > 0.0
                || params.temperature < 0.1;
            if cut {
                assert!(failed, "{params:?}: {checked:?}");
                assert_eq!(checked.tolerance_used, f32::INFINITY);
            } else {
                uncut += 1;
                uncut_failed += u32::from(failed);
            }
        }
    }
    assert!(
        uncut_failed * 10 >= uncut * 8,
        "{uncut_failed} of {uncut} failed"
    );
}

#[test]
fn tokens_of_another_model_fail_at_most_positions() {
    let mut sampler = Sampler::new();
    let mut failed = 0;
    let mut total = 0;
    for salt in 0..40_u64 {
        let verifier = logits(salt);
        let other_model = logits(salt + 1_000);
        for params in parameter_sets(salt) {
            for position in 0..8 {
                let (token, logprob) = reported(&mut sampler, &other_model, &params, position);
                let checked = check(&mut sampler, &verifier, &params, position, token, logprob);
                total += 1;
                if checked.mismatch.is_some() {
                    failed += 1;
                }
            }
        }
    }
    assert!(failed * 10 >= total * 9, "{failed} of {total} failed");
}

#[test]
fn a_wrong_log_probability_fails() {
    let mut sampler = Sampler::new();
    let logits = logits(7);
    let params = SamplingParams::greedy();
    let (token, logprob) = reported(&mut sampler, &logits, &params, 0);
    for wrong in [
        logprob - 1.0,
        0.0_f32.min(logprob + 1.0),
        f32::NAN,
        f32::NEG_INFINITY,
    ] {
        let checked = check(&mut sampler, &logits, &params, 0, token, wrong);
        assert!(
            matches!(checked.mismatch, Some(Mismatch::Logprob { .. })),
            "{wrong}: {checked:?}"
        );
    }
}

#[test]
fn a_token_outside_the_vocabulary_fails() {
    let mut sampler = Sampler::new();
    let logits = logits(3);
    let params = SamplingParams::greedy();
    for token in [-1, VOCABULARY as TokenId, TokenId::MAX] {
        let checked = check(&mut sampler, &logits, &params, 0, token, -1.0);
        assert!(
            matches!(checked.mismatch, Some(Mismatch::NotPicked { .. })),
            "{token}"
        );
    }
}

#[test]
fn an_answer_may_end_only_where_end_of_generation_could_be_picked() {
    let mut sampler = Sampler::new();
    let mut logits = logits(11);
    let end = [5];
    let params = SamplingParams::greedy();
    logits[5] = 20.0;
    let checked = check_end(&mut sampler, &logits, &params, 9, &end, &TOLERANCE);
    assert!(checked.exact && checked.mismatch.is_none());
    logits[5] = -20.0;
    let checked = check_end(&mut sampler, &logits, &params, 9, &end, &TOLERANCE);
    assert!(matches!(
        checked.mismatch,
        Some(Mismatch::EndedEarly { position: 9, .. })
    ));
}

#[test]
fn a_verification_counts_every_mismatch_and_keeps_the_first() {
    let mut verification = Verification::default();
    let failed = |position| Checked {
        exact: false,
        logprob_difference: Some(0.0),
        tolerance_used: f32::INFINITY,
        mismatch: Some(Mismatch::NotPicked {
            position,
            token: 1,
            pick: 2,
        }),
    };
    for position in 0..20 {
        verification.record(failed(position));
    }
    verification.record(Checked {
        exact: false,
        logprob_difference: Some(0.25),
        tolerance_used: 0.5,
        mismatch: None,
    });
    assert!(!verification.passed());
    assert_eq!(verification.checked, 21);
    assert_eq!(verification.exact, 0);
    assert_eq!(verification.mismatch_count, 20);
    assert_eq!(verification.mismatches.len(), MISMATCHES_KEPT);
    assert_eq!(verification.max_logprob_difference, 0.25);
    // Only positions that passed count towards the tolerance used.
    assert_eq!(verification.max_tolerance_used, 0.5);
}
