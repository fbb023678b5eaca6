use proptest::prelude::*;

use super::*;

fn item(class: TaskClass, edge: bool, cloud: bool, mean_logprob: f32) -> CalibrationItem {
    CalibrationItem {
        class,
        edge_correct: edge,
        cloud_correct: cloud,
        edge_confidence: ConfidenceScores {
            tokens: 4,
            mean_logprob,
            min_window_mean: mean_logprob,
            confident_share: 1.0,
            mean_margin: 1.0,
        },
        edge_cost: MicroUsd(1),
        cloud_cost: MicroUsd(10),
    }
}

fn base() -> ClassPolicies {
    all(ClassPolicy::Cloud)
}

#[test]
fn confident_edge_answers_stay_and_unsure_ones_escalate() {
    // The edge is right exactly when it is confident; the cloud is always right.
    let items = [
        item(TaskClass::Math, true, true, -0.1),
        item(TaskClass::Math, true, true, -0.2),
        item(TaskClass::Math, false, true, -1.5),
        item(TaskClass::Math, false, true, -2.0),
    ];
    let outcome = calibrate(&items, 1.0, &base(), "test", Evidence::NONE).expect("calibrate");
    let ClassPolicy::Cascade(rule) = outcome.policies.math else {
        panic!("expected a cascade, got {:?}", outcome.policies.math);
    };
    assert!(rule.threshold > -1.5 && rule.threshold <= -0.2, "{rule:?}");
    assert_eq!(outcome.summary.routed.correct, 4);
    assert_eq!(outcome.summary.routed.edge_served, 2);
    // 4 edge answers + 2 escalations = 4 + 20, against 40 cloud-only.
    assert_eq!(outcome.summary.routed.cost, MicroUsd(24));
    assert!((outcome.summary.cost_saving_vs_cloud - 0.4).abs() < 1e-9);
    // Classes without items keep the base policy.
    assert_eq!(outcome.policies.code, ClassPolicy::Cloud);
}

#[test]
fn a_low_target_keeps_everything_at_the_edge() {
    let items = [
        item(TaskClass::Open, true, true, -0.1),
        item(TaskClass::Open, false, true, -3.0),
    ];
    let outcome = calibrate(&items, 0.5, &base(), "test", Evidence::NONE).expect("calibrate");
    assert_eq!(outcome.policies.open, ClassPolicy::Edge);
    assert_eq!(outcome.summary.routed.cost, MicroUsd(2));
}

#[test]
fn an_edge_that_is_never_right_sends_the_class_to_the_cloud() {
    let items = [
        item(TaskClass::Math, false, true, -0.1),
        item(TaskClass::Math, false, true, -0.3),
        item(TaskClass::MultipleChoice, true, true, -0.1),
    ];
    let outcome = calibrate(&items, 0.95, &base(), "test", Evidence::NONE).expect("calibrate");
    assert_eq!(outcome.policies.math, ClassPolicy::Cloud);
    assert_eq!(outcome.policies.multiple_choice, ClassPolicy::Edge);
}

#[test]
fn no_edge_answer_is_kept_without_a_correct_one_to_show_for_it() {
    // The confident edge answers are wrong, and so are the cloud's on them:
    // keeping them at the edge costs nothing here, but there is no evidence
    // that the edge can answer this class at all.
    let items = [
        item(TaskClass::Math, false, false, -0.1),
        item(TaskClass::Math, false, false, -0.2),
        item(TaskClass::Math, false, true, -1.5),
        item(TaskClass::Math, false, true, -2.0),
    ];
    let outcome = calibrate(
        &items,
        0.95,
        &all(ClassPolicy::Edge),
        "test",
        Evidence::NONE,
    )
    .expect("calibrate");
    assert_eq!(outcome.policies.math, ClassPolicy::Cloud);
    assert_eq!(outcome.summary.routed.edge_served, 0);
}

#[test]
fn bad_inputs_are_errors() {
    assert_eq!(
        calibrate(&[], 0.9, &base(), "test", Evidence::NONE),
        Err(CalibrationError::NoItems)
    );
    let items = [item(TaskClass::Open, true, true, -0.1)];
    assert_eq!(
        calibrate(&items, 0.0, &base(), "test", Evidence::NONE),
        Err(CalibrationError::Target(0.0))
    );
    assert!(calibrate(&items, f64::NAN, &base(), "test", Evidence::NONE).is_err());
    assert!(calibrate(&items, 1.5, &base(), "test", Evidence::NONE).is_err());
}

/// `count` items of `class`, the edge right on the first `edge_right` (confident) and wrong on
/// the rest (unsure), the cloud always right.
fn class_items(class: TaskClass, count: usize, edge_right: usize) -> Vec<CalibrationItem> {
    (0..count)
        .map(|index| {
            let right = index < edge_right;
            item(class, right, true, if right { -0.1 } else { -2.0 })
        })
        .collect()
}

#[test]
fn a_class_with_too_few_items_goes_to_the_cloud() {
    // Five confident, correct edge answers: the search alone keeps them at the edge, the
    // evidence rules want twenty items of the class first.
    let items = class_items(TaskClass::Open, 5, 5);
    let point = calibrate(&items, 0.95, &base(), "test", Evidence::NONE).expect("calibrate");
    assert_eq!(point.policies.open, ClassPolicy::Edge);
    let careful = calibrate(&items, 0.95, &base(), "test", Evidence::DEFAULT).expect("calibrate");
    assert_eq!(careful.policies.open, ClassPolicy::Cloud);
    assert_eq!(careful.summary.routed.edge_served, 0);
    assert_eq!(careful.summary.evidence, Evidence::DEFAULT);
}

#[test]
fn the_lower_bound_counts_the_samples_uncertainty_against_the_edge() {
    // Edge-only is right on 36 of 40 answers: exactly 90% of the cloud's 40, by count. The
    // Wilson lower bound of 36/40 is 76.9%, worth 30 answers: not enough for 90%.
    // Every answer equally confident: no cascade can tell the wrong ones apart.
    let items: Vec<CalibrationItem> = (0..40)
        .map(|index| item(TaskClass::Open, index < 36, true, -0.1))
        .collect();
    let point = calibrate(&items, 0.9, &base(), "test", Evidence::NONE).expect("calibrate");
    assert_eq!(point.policies.open, ClassPolicy::Edge);
    let careful = calibrate(&items, 0.9, &base(), "test", Evidence::DEFAULT).expect("calibrate");
    assert_eq!(careful.policies.open, ClassPolicy::Cloud);
    assert_eq!(careful.summary.credited_correct, Some(40));
    // Where the edge is clearly good enough, the lower bound still lets it serve: right on all
    // 60 confident answers (lower bound 94%, 56 credited) for a target of 90%.
    let items = class_items(TaskClass::Open, 60, 60);
    let careful = calibrate(&items, 0.9, &base(), "test", Evidence::DEFAULT).expect("calibrate");
    assert_eq!(careful.policies.open, ClassPolicy::Edge);
    assert_eq!(careful.summary.credited_correct, Some(56));
    assert_eq!(careful.summary.routed.correct, 60);
}

#[test]
fn cross_validation_routes_every_item_once_by_policies_that_did_not_see_it() {
    // Confident answers right, unsure ones wrong: every fold finds a cascade that keeps the
    // confident ones, so held out the routing keeps all of the cloud's quality for less.
    let items: Vec<CalibrationItem> = class_items(TaskClass::Math, 50, 25);
    let checked = cross_validate(&items, 1.0, &base(), Evidence::NONE, 5).expect("cross-validate");
    assert_eq!(checked.folds, 5);
    assert_eq!(checked.routed.items, 50);
    assert_eq!(checked.cloud_only.correct, 50);
    assert_eq!(checked.routed.correct, 50);
    assert_eq!(checked.routed.edge_served, 25);
    assert!(
        (checked.cost_saving_vs_cloud - 0.4).abs() < 1e-9,
        "{checked:?}"
    );
    // Held out, a policy chosen on a few lucky items shows its loss: with 2 folds of 3 items
    // each, the edge kept on the right answers of one fold is wrong on the other's.
    let lucky = [
        item(TaskClass::Open, true, true, -0.1),
        item(TaskClass::Open, false, true, -0.1),
        item(TaskClass::Open, true, true, -0.1),
        item(TaskClass::Open, false, true, -0.1),
        item(TaskClass::Open, true, true, -0.1),
        item(TaskClass::Open, false, true, -0.1),
    ];
    let checked = cross_validate(&lucky, 0.5, &base(), Evidence::NONE, 2).expect("cross-validate");
    assert!(checked.quality_vs_cloud < 1.0, "{checked:?}");
}

#[test]
fn wilson_intervals_match_the_textbook_values() {
    let (low, high) = wilson_interval(23, 100);
    assert!(
        (low - 0.1584).abs() < 1e-3 && (high - 0.3215).abs() < 1e-3,
        "{low} {high}"
    );
    let (low, high) = wilson_interval(10, 10);
    assert!(low < 0.75 && high > 0.999_999, "{low} {high}");
    assert_eq!(wilson_interval(0, 10).0, 0.0);
    assert_eq!(wilson_interval(0, 0), (0.0, 1.0));
}

fn arbitrary_item() -> impl Strategy<Value = CalibrationItem> {
    (
        prop::sample::select(vec![
            TaskClass::Math,
            TaskClass::MultipleChoice,
            TaskClass::Open,
        ]),
        any::<bool>(),
        any::<bool>(),
        // Few distinct scores, so ties between items are common.
        (0u8..12, 0u8..12, 0u8..5),
        (1i64..20, 1i64..200),
    )
        .prop_map(|(class, edge_correct, cloud_correct, scores, costs)| {
            let (mean, window, share) = scores;
            CalibrationItem {
                class,
                edge_correct,
                cloud_correct,
                edge_confidence: ConfidenceScores {
                    tokens: 10,
                    mean_logprob: -f32::from(mean) / 4.0,
                    min_window_mean: -f32::from(window) / 2.0,
                    confident_share: f32::from(share) / 4.0,
                    mean_margin: f32::from(mean + window) / 3.0,
                },
                edge_cost: MicroUsd(costs.0),
                cloud_cost: MicroUsd(costs.1),
            }
        })
}

/// Every combination of the per-class candidates, the slow way.
fn brute_force_cost(items: &[CalibrationItem], required: u32) -> MicroUsd {
    let mut classes: Vec<Vec<(ClassPolicy, Totals)>> = Vec::new();
    for class in TaskClass::ALL {
        let members: Vec<&CalibrationItem> =
            items.iter().filter(|item| item.class == class).collect();
        if !members.is_empty() {
            classes.push(candidates(&members, Evidence::NONE));
        }
    }
    let mut best = MicroUsd(i64::MAX);
    let mut index = vec![0usize; classes.len()];
    loop {
        let totals = classes
            .iter()
            .zip(&index)
            .map(|(options, &i)| options[i].1)
            .fold(Totals::default(), Totals::add);
        if totals.correct >= required && totals.cost < best {
            best = totals.cost;
        }
        let mut position = 0;
        loop {
            if position == classes.len() {
                return best;
            }
            index[position] += 1;
            if index[position] < classes[position].len() {
                break;
            }
            index[position] = 0;
            position += 1;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn the_chosen_policies_meet_the_target_at_no_more_than_cloud_cost(
        items in prop::collection::vec(arbitrary_item(), 1..40),
        target in 0.5f64..=1.0,
    ) {
        let outcome = calibrate(&items, target, &base(), "prop", Evidence::NONE).expect("calibrate");
        // Re-applying the saved policies gives the totals the summary claims.
        let applied = evaluate(&outcome.policies, &items);
        prop_assert_eq!(applied, outcome.summary.routed);
        let cloud = outcome.summary.cloud_only;
        prop_assert!(f64::from(applied.correct) >= target * f64::from(cloud.correct) - 1e-9);
        prop_assert!(applied.cost <= cloud.cost);
    }

    #[test]
    fn under_the_evidence_rules_the_target_is_met_by_the_credited_count(
        items in prop::collection::vec(arbitrary_item(), 1..60),
        target in 0.5f64..=1.0,
    ) {
        let outcome =
            calibrate(&items, target, &base(), "prop", Evidence::DEFAULT).expect("calibrate");
        let cloud = outcome.summary.cloud_only;
        let credited = outcome.summary.credited_correct.expect("credited");
        prop_assert!(f64::from(credited) >= target * f64::from(cloud.correct) - 1e-9);
        prop_assert!(credited <= outcome.summary.routed.correct);
        prop_assert_eq!(evaluate(&outcome.policies, &items), outcome.summary.routed);
    }

    #[test]
    fn the_choice_is_the_cheapest_and_does_not_depend_on_item_order(
        items in prop::collection::vec(arbitrary_item(), 1..14),
        target in 0.5f64..=1.0,
        rotation in 0usize..14,
    ) {
        let outcome = calibrate(&items, target, &base(), "prop", Evidence::NONE).expect("calibrate");
        let required =
            (target * f64::from(outcome.summary.cloud_only.correct) - 1e-9).ceil() as u32;
        prop_assert_eq!(outcome.summary.routed.cost, brute_force_cost(&items, required));

        let mut reordered = items.clone();
        reordered.reverse();
        let rotation = rotation % reordered.len();
        reordered.rotate_left(rotation);
        let again = calibrate(&reordered, target, &base(), "prop", Evidence::NONE).expect("calibrate");
        prop_assert_eq!(again, outcome);
    }
}
