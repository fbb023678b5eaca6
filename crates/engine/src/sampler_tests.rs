//! Unit tests of the sampler: greedy ties, log-probabilities, cuts, and position-keyed draws.

use super::*;

fn seeded(temperature: f32, top_p: f32, top_k: u32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        top_k,
        seed,
        min_p: 0.0,
    }
}

/// Deterministic pseudo-random logits spread over roughly [-8, 8).
fn synthetic_logits(count: usize, salt: u64) -> Vec<f32> {
    (0..count)
        .map(|index| {
            let unit = uniform_for_position(salt, u32::try_from(index).unwrap());
            (unit as f32) * 16.0 - 8.0
        })
        .collect()
}

/// The nucleus computed the slow, obvious way: sort everything, walk until the mass is reached.
fn reference_nucleus(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<TokenId> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut all: Vec<(f32, TokenId)> = logits
        .iter()
        .enumerate()
        .map(|(index, &logit)| ((logit - max) / temperature, index as TokenId))
        .collect();
    all.sort_by(more_likely_first);
    let limit = if top_k == 0 { all.len() } else { top_k };
    let kept = &all[..limit];
    let total: f64 = kept.iter().map(|&(s, _)| f64::from(s.exp())).sum();
    let mut cumulative = 0.0;
    let mut out = Vec::new();
    for &(scaled, token) in kept {
        out.push(token);
        cumulative += f64::from(scaled.exp());
        if cumulative >= f64::from(top_p) * total {
            break;
        }
    }
    out
}

#[test]
fn greedy_picks_the_largest_logit_and_breaks_ties_by_lowest_id() {
    let mut sampler = Sampler::new();
    let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
    let sampled = sampler.sample(&logits, &SamplingParams::greedy(), 0, 0);
    assert_eq!(sampled.token, 1);
}

#[test]
fn logprob_is_log_softmax_of_raw_logits_whatever_the_temperature() {
    let logits = [1.0_f32, 2.0, 3.0];
    let normalizer = (1.0_f32.exp() + 2.0_f32.exp() + 3.0_f32.exp()).ln();
    let mut sampler = Sampler::new();
    for temperature in [0.0, 0.3, 1.0, 2.5] {
        for position in 0..50 {
            let sampled = sampler.sample(&logits, &seeded(temperature, 1.0, 0, 7), position, 3);
            let expected = logits[sampled.token as usize] - normalizer;
            assert!((sampled.logprob - expected).abs() < 1e-5, "{sampled:?}");
            assert!(sampled.logprob <= 0.0);
            let reported: Vec<f32> = sampled.top.iter().map(|c| c.logprob).collect();
            let expected_top: Vec<f32> =
                [2, 1, 0].iter().map(|&i| logits[i] - normalizer).collect();
            for (got, want) in reported.iter().zip(&expected_top) {
                assert!((got - want).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn top_logprobs_are_sorted_capped_and_start_with_the_greedy_choice() {
    let logits = synthetic_logits(5000, 3);
    let mut sampler = Sampler::new();
    let sampled = sampler.sample(&logits, &SamplingParams::greedy(), 0, 50);
    assert_eq!(sampled.top.len(), TOP_LOGPROBS_MAX);
    assert_eq!(sampled.top[0].token, sampled.token);
    assert!(sampled
        .top
        .windows(2)
        .all(|pair| pair[0].logprob >= pair[1].logprob));
    let mut sorted: Vec<(f32, TokenId)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (l, i as TokenId))
        .collect();
    sorted.sort_by(more_likely_first);
    let expected: Vec<TokenId> = sorted[..TOP_LOGPROBS_MAX].iter().map(|&(_, t)| t).collect();
    let got: Vec<TokenId> = sampled.top.iter().map(|c| c.token).collect();
    assert_eq!(got, expected);
}

#[test]
fn top_logprobs_ties_list_lower_ids_first() {
    let logits = [1.0, 3.0, 3.0, 0.0, 3.0];
    let sampled = Sampler::new().sample(&logits, &SamplingParams::greedy(), 0, 4);
    let tokens: Vec<TokenId> = sampled.top.iter().map(|c| c.token).collect();
    assert_eq!(tokens, vec![1, 2, 4, 0]);
}

#[test]
fn zero_top_logprobs_reports_no_alternatives() {
    let sampled = Sampler::new().sample(&[0.0, 1.0], &SamplingParams::greedy(), 0, 0);
    assert!(sampled.top.is_empty());
}

#[test]
fn a_draw_depends_only_on_seed_and_position_not_on_history() {
    let logits = synthetic_logits(1000, 11);
    let params = seeded(0.8, 0.95, 40, 1234);
    let mut long_lived = Sampler::new();
    let in_order: Vec<TokenId> = (0..64)
        .map(|position| long_lived.sample(&logits, &params, position, 0).token)
        .collect();
    // A fresh sampler starting at position 30 (a resumed generation) draws the same tokens.
    let mut resumed = Sampler::new();
    for position in 30..64 {
        let token = resumed.sample(&logits, &params, position, 0).token;
        assert_eq!(token, in_order[position as usize], "position {position}");
    }
    // And the draws actually vary with the position, or the test above proves nothing.
    let distinct: std::collections::BTreeSet<_> = in_order.iter().collect();
    assert!(distinct.len() > 5, "{in_order:?}");
}

#[test]
fn different_seeds_give_different_draws() {
    let logits = synthetic_logits(1000, 5);
    let mut sampler = Sampler::new();
    let run = |sampler: &mut Sampler, seed| -> Vec<TokenId> {
        (0..32)
            .map(|p| {
                sampler
                    .sample(&logits, &seeded(1.0, 1.0, 0, seed), p, 0)
                    .token
            })
            .collect()
    };
    assert_ne!(run(&mut sampler, 1), run(&mut sampler, 2));
    assert_eq!(run(&mut sampler, 3), run(&mut sampler, 3));
}

#[test]
fn draws_follow_the_softmax_distribution() {
    // Probabilities 1/4 and 3/4 at temperature 1.
    let logits = [0.0_f32, 3.0_f32.ln()];
    let mut sampler = Sampler::new();
    let draws = 20_000;
    let ones = (0..draws)
        .filter(|&p| {
            sampler
                .sample(&logits, &seeded(1.0, 1.0, 0, 99), p, 0)
                .token
                == 1
        })
        .count();
    let frequency = ones as f64 / f64::from(draws);
    assert!((frequency - 0.75).abs() < 0.02, "frequency {frequency}");
}

#[test]
fn low_temperature_concentrates_on_the_most_likely_token() {
    let logits = [0.0_f32, 1.0];
    let mut sampler = Sampler::new();
    let count_ones = |sampler: &mut Sampler, temperature| {
        (0..2000)
            .filter(|&p| {
                sampler
                    .sample(&logits, &seeded(temperature, 1.0, 0, 5), p, 0)
                    .token
                    == 1
            })
            .count()
    };
    let cold = count_ones(&mut sampler, 0.1);
    let warm = count_ones(&mut sampler, 1.0);
    assert!(cold > 1990, "cold {cold}");
    assert!(warm < 1600, "warm {warm}");
}

#[test]
fn top_k_limits_draws_to_the_k_most_likely_tokens() {
    let logits = synthetic_logits(3000, 17);
    let allowed = reference_nucleus(&logits, 1.0, 5, 1.0);
    let mut sampler = Sampler::new();
    let mut seen = std::collections::BTreeSet::new();
    for position in 0..500 {
        let token = sampler
            .sample(&logits, &seeded(5.0, 1.0, 5, 8), position, 0)
            .token;
        assert!(allowed.contains(&token), "token {token} outside top-5");
        seen.insert(token);
    }
    assert_eq!(seen.len(), 5, "a hot temperature should reach all five");
}

#[test]
fn top_k_of_one_is_greedy() {
    let logits = synthetic_logits(300, 23);
    let greedy = Sampler::new()
        .sample(&logits, &SamplingParams::greedy(), 0, 0)
        .token;
    let mut sampler = Sampler::new();
    for position in 0..50 {
        let token = sampler
            .sample(&logits, &seeded(3.0, 1.0, 1, 4), position, 0)
            .token;
        assert_eq!(token, greedy);
    }
}

#[test]
fn top_p_keeps_exactly_the_reference_nucleus() {
    // Temperature 3 flattens the distribution so the nucleus spans several sorting rounds.
    let logits = synthetic_logits(20_000, 31);
    for (top_k, top_p) in [(0, 0.5), (0, 0.9), (2000, 0.7), (10, 0.99)] {
        let allowed = reference_nucleus(&logits, 3.0, top_k, top_p);
        let mut candidates: Vec<(f32, TokenId)> = Vec::new();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| ((l - max) / 3.0, i as TokenId)),
        );
        let limit = if top_k == 0 { logits.len() } else { top_k };
        let kept = nucleus_prefix(&mut candidates, limit, top_p);
        let got: Vec<TokenId> = candidates[..kept].iter().map(|&(_, t)| t).collect();
        assert_eq!(got, allowed, "top_k {top_k} top_p {top_p}");
    }
}

#[test]
fn the_streamed_top_k_window_matches_sorting_the_whole_vocabulary() {
    let mut logits = synthetic_logits(20_000, 41);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Ties at the top and around the cut, and NaNs, which are never candidates.
    for index in [3, 900, 15_000] {
        logits[index] = max;
    }
    logits[7] = f32::NAN;
    logits[19_999] = f32::NAN;
    let temperature = 3.0;
    let mut window = Vec::new();
    for top_k in [1, 5, 40, 256] {
        most_likely_window(&mut window, &logits, |l| (l - max) / temperature, top_k);
        let mut all: Vec<(f32, TokenId)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(index, &l)| ((l - max) / temperature, index as TokenId))
            .collect();
        all.sort_by(more_likely_first);
        assert_eq!(window, all[..top_k], "top_k {top_k}");
        for top_p in [0.3, 0.9, 0.99, 1.0] {
            let kept = nucleus_of_sorted(&window, top_p);
            let got: Vec<TokenId> = window[..kept].iter().map(|&(_, t)| t).collect();
            let clean: Vec<f32> = logits
                .iter()
                .map(|l| if l.is_nan() { f32::NEG_INFINITY } else { *l })
                .collect();
            let expected = reference_nucleus(&clean, temperature, top_k, top_p);
            assert_eq!(got, expected, "top_k {top_k} top_p {top_p}");
        }
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    let logits = synthetic_logits(500, 41);
    let greedy = Sampler::new()
        .sample(&logits, &SamplingParams::greedy(), 0, 0)
        .token;
    let mut sampler = Sampler::new();
    for position in 0..50 {
        assert_eq!(
            sampler
                .sample(&logits, &seeded(1.0, 1e-6, 0, 3), position, 0)
                .token,
            greedy
        );
    }
}

#[test]
fn uniform_draws_stay_in_the_unit_interval_and_look_uniform() {
    let draws: Vec<f64> = (0..10_000).map(|p| uniform_for_position(42, p)).collect();
    assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
    let mean = draws.iter().sum::<f64>() / draws.len() as f64;
    assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    assert_ne!(uniform_for_position(1, 0), uniform_for_position(2, 0));
}

#[test]
fn negative_infinity_logits_are_never_drawn() {
    let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
    let mut sampler = Sampler::new();
    for position in 0..200 {
        let sampled = sampler.sample(&logits, &seeded(1.0, 1.0, 0, 6), position, 0);
        assert!(sampled.token == 1 || sampled.token == 3, "{sampled:?}");
    }
}

#[test]
fn the_vectorised_exp_stays_within_a_millionth_of_the_true_value() {
    let mut worst: f64 = 0.0;
    for step in 0..=175_000 {
        let x = -87.0 + f64::from(step) * 0.000_999_9;
        let x = x as f32;
        let got = f64::from(exp_f32(x));
        let want = f64::from(x).exp();
        worst = worst.max(((got - want) / want).abs());
    }
    assert!(worst < 1e-6, "worst relative error {worst:e}");
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_f32(-87.5), 0.0);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(f32::NAN), 0.0);
}

#[test]
fn a_draw_over_the_whole_vocabulary_is_the_first_token_whose_running_weight_passes_the_uniform() {
    // The obvious way: weights in id order, one running sum, no chunks.
    let reference = |logits: &[f32], temperature: f32, uniform: f64| -> TokenId {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits
            .iter()
            .map(|&logit| f64::from(exp_f32((logit - max) * (1.0 / temperature))))
            .collect();
        let threshold = uniform * weights.iter().sum::<f64>();
        let mut cumulative = 0.0;
        for (index, weight) in weights.iter().enumerate() {
            cumulative += weight;
            if cumulative > threshold {
                return index as TokenId;
            }
        }
        unreachable!("the threshold is below the total")
    };
    let mut sampler = Sampler::new();
    // 49,152 is SmolLM2's vocabulary; 1,003 leaves a partial last chunk.
    for (count, salt) in [(49_152, 1), (1_003, 2)] {
        let logits = synthetic_logits(count, salt);
        for temperature in [0.3_f32, 0.8, 1.0, 1.7] {
            for position in 0..300 {
                let params = seeded(temperature, 1.0, 0, 11);
                let got = sampler.sample(&logits, &params, position, 0).token;
                let uniform = uniform_for_position(11, position);
                assert_eq!(
                    got,
                    reference(&logits, temperature, uniform),
                    "T {temperature}"
                );
            }
        }
    }
}

#[test]
fn logits_that_are_all_infinite_or_nan_give_the_greedy_choice_without_panicking() {
    let mut sampler = Sampler::new();
    let cases: [&[f32]; 3] = [
        &[f32::NEG_INFINITY, f32::NEG_INFINITY],
        &[f32::NAN, f32::NAN, f32::NAN],
        &[0.0, f32::INFINITY, f32::INFINITY],
    ];
    for logits in cases {
        let sampled = sampler.sample(logits, &seeded(0.8, 1.0, 0, 3), 0, 0);
        let greedy = sampler.sample(logits, &SamplingParams::greedy(), 0, 0);
        assert_eq!(sampled.token, greedy.token, "{logits:?}");
    }
}

#[test]
fn a_chunk_whose_sum_rounds_past_the_draw_gives_its_own_last_weighted_token() {
    // The first chunk's sum came out a little above what its terms add up to one by one (as
    // rounding may have it); the draw lands in between. A token of zero weight must not win.
    let mut weights = vec![0.25, 0.25];
    weights.extend([0.0; 13]);
    weights.push(0.5);
    let terms = ExpTerms {
        terms: weights,
        chunk_sums: vec![0.500_000_1, 0.5],
    };
    let total = 1.000_000_1;
    let uniform = 0.500_000_05 / total;
    assert_eq!(terms.draw(uniform), Some(1));
    assert_eq!(terms.draw(0.2), Some(0));
    assert_eq!(terms.draw(0.9), Some(15));
}

#[test]
fn min_p_never_draws_a_token_less_likely_than_that_share_of_the_most_likely_one() {
    let logits = synthetic_logits(5_000, 11);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sampler = Sampler::new();
    // The whole-vocabulary path, the streamed top-k window and the selection path.
    for (top_k, top_p) in [(0, 1.0), (200, 1.0), (1_000, 0.99)] {
        for temperature in [0.7_f32, 1.0, 1.5] {
            let params = SamplingParams {
                min_p: 0.2,
                ..seeded(temperature, top_p, top_k, 5)
            };
            let mut drawn = std::collections::BTreeSet::new();
            for position in 0..400 {
                let token = sampler.sample(&logits, &params, position, 0).token;
                let relative = ((logits[token as usize] - max) / temperature).exp();
                assert!(
                    relative >= 0.199,
                    "token {token} is {relative} of the top at T={temperature}, k={top_k}"
                );
                drawn.insert(token);
            }
            assert!(drawn.len() > 1, "min-p 0.2 still leaves a choice here");
        }
    }
}

#[test]
fn min_p_of_one_keeps_only_the_most_likely_token() {
    let logits = synthetic_logits(3_000, 12);
    let greedy = Sampler::new()
        .sample(&logits, &SamplingParams::greedy(), 0, 0)
        .token;
    let mut sampler = Sampler::new();
    for (top_k, top_p) in [(0, 1.0), (50, 0.9), (2_000, 0.8)] {
        let params = SamplingParams {
            min_p: 1.0,
            ..seeded(1.3, top_p, top_k, 21)
        };
        for position in 0..100 {
            assert_eq!(sampler.sample(&logits, &params, position, 0).token, greedy);
        }
    }
}
