//! Calibration: choose, per task class, Edge, Cloud or Cascade with a
//! confidence threshold, so that the routed answers keep at least a target
//! share of cloud-only quality at the lowest cost.
//!
//! Inputs are per-item records: was the edge answer correct, was the cloud
//! answer correct, the edge answer's confidence scores, and what each tier
//! cost. A cascade pays for the edge answer always and for the cloud answer
//! when it escalates.
//!
//! The search is exact over its candidates. Per class, the candidates are
//! Edge, Cloud, and a cascade on each [`ConfidenceFeature`] with a threshold
//! half-way between each pair of adjacent distinct scores seen. A dynamic
//! programme over classes (a multiple-choice knapsack on the number of
//! correct answers) then finds the cheapest combination reaching the target.
//! **No evidence, no edge.** A candidate that keeps items at the edge is
//! considered only if the edge answered at least one of those kept items
//! correctly. Without that rule, on a small sample where the edge is never
//! right (the 135M model on grade-school math), a cascade would keep at the
//! edge exactly the items the cloud also got wrong: free on the calibration
//! data, and a pure loss on new data.
//!
//! **Evidence that generalises** ([`Evidence`]). A class may keep answers at
//! the edge only when the calibration holds at least `min_class_items` of its
//! items; a class with fewer goes to the cloud, and a class with none keeps
//! the base configuration's policy (the built-in default unless `--base` names
//! another). And the answers a candidate keeps at the edge count as correct
//! only up to the lower bound of the Wilson 95% interval of their accuracy, so
//! the target must be met with the sample's uncertainty counted against the
//! edge. [`cross_validate`] measures how the chosen policies hold on items
//! the calibration did not see.
//!
//! Ties go, in order, to: lower cost, more correct answers, more answers
//! served at the edge, then the candidate listed first (Edge, cascades by
//! feature then threshold, Cloud). The result does not depend on the order
//! of the items.

use serde::{Deserialize, Serialize};

use crate::confidence::{ConfidenceFeature, ConfidenceScores};
use crate::config::{AcceptRule, ClassPolicies, ClassPolicy};
use crate::cost::MicroUsd;
use crate::features::TaskClass;

/// The most items one calibration takes (its memory is linear in them).
pub const CALIBRATION_ITEMS_MAX: usize = 100_000;

/// One graded item.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibrationItem {
    pub class: TaskClass,
    pub edge_correct: bool,
    pub cloud_correct: bool,
    pub edge_confidence: ConfidenceScores,
    pub edge_cost: MicroUsd,
    pub cloud_cost: MicroUsd,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CalibrationError {
    #[error("no items to calibrate on")]
    NoItems,
    #[error("at most {CALIBRATION_ITEMS_MAX} items can be calibrated on, got {0}")]
    TooManyItems(usize),
    #[error("the target quality must be in (0, 1], got {0}")]
    Target(f64),
}

/// How much evidence a class needs before its answers may stay at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// Items of a class the calibration needs before any of them may stay at the edge.
    pub min_class_items: u32,
    /// Credit the answers kept at the edge with the lower bound of their accuracy's Wilson 95%
    /// interval, not with their count.
    pub lower_bound: bool,
}

impl Evidence {
    /// What `fleetgrid router calibrate` asks for unless told otherwise.
    pub const DEFAULT: Evidence = Evidence {
        min_class_items: 20,
        lower_bound: true,
    };
    /// The search alone: any class may keep answers at the edge on any count, credited with
    /// its count (how configurations were calibrated before these rules).
    pub const NONE: Evidence = Evidence {
        min_class_items: 0,
        lower_bound: false,
    };

    /// The correct answers `correct` of `kept` answers kept at the edge count for.
    fn credit(self, correct: u32, kept: u32) -> u32 {
        if !self.lower_bound || kept == 0 {
            return correct;
        }
        let (low, _) = wilson_interval(correct, kept);
        ((low * f64::from(kept)) + 1e-9).floor() as u32
    }
}

impl Default for Evidence {
    fn default() -> Evidence {
        Evidence::NONE
    }
}

/// The Wilson score interval at 95% for `correct` of `items`, as shares: (low, high).
pub fn wilson_interval(correct: u32, items: u32) -> (f64, f64) {
    if items == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_963_984_540_054;
    let n = f64::from(items);
    let p = f64::from(correct) / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Totals of a policy applied to items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub items: u32,
    pub correct: u32,
    /// Answers served by the edge model (not escalated).
    pub edge_served: u32,
    pub cost: MicroUsd,
}

impl Totals {
    fn add(self, other: Totals) -> Totals {
        Totals {
            items: self.items + other.items,
            correct: self.correct + other.correct,
            edge_served: self.edge_served + other.edge_served,
            cost: self.cost.saturating_add(other.cost),
        }
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.correct, self.items)
    }

    pub fn edge_share(&self) -> f64 {
        ratio(self.edge_served, self.items)
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    f64::from(part) / f64::from(whole)
}

/// What a calibration achieved on its own items; saved in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSummary {
    /// Which data the thresholds were chosen on, e.g. `"gsm8k calibrate half (even items)"`.
    pub source: String,
    pub target_quality: f64,
    pub routed: Totals,
    pub edge_only: Totals,
    pub cloud_only: Totals,
    /// `routed.correct / cloud_only.correct`.
    pub quality_vs_cloud: f64,
    /// `1 - routed.cost / cloud_only.cost`.
    pub cost_saving_vs_cloud: f64,
    /// The evidence rules the policies were chosen under (none in configurations calibrated
    /// before they existed).
    #[serde(default)]
    pub evidence: Evidence,
    /// The correct answers the target was met with: `routed.correct`, with the answers kept at
    /// the edge credited as [`Evidence::lower_bound`] says.
    #[serde(default)]
    pub credited_correct: Option<u32>,
    /// How the policies held on items the calibration did not see.
    #[serde(default)]
    pub cross_validated: Option<CrossValidation>,
}

/// `folds`-fold cross-validation of a calibration: item `i` is held out in fold `i mod folds`,
/// and each fold's held-out items are routed by the policies calibrated on all the others.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CrossValidation {
    pub folds: u32,
    /// Every item routed once, by the policies of the fold that held it out.
    pub routed: Totals,
    pub cloud_only: Totals,
    pub quality_vs_cloud: f64,
    pub cost_saving_vs_cloud: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationOutcome {
    pub policies: ClassPolicies,
    pub summary: CalibrationSummary,
}

/// One policy applied to one item.
fn apply(policy: &ClassPolicy, item: &CalibrationItem) -> Totals {
    let edge = Totals {
        items: 1,
        correct: u32::from(item.edge_correct),
        edge_served: 1,
        cost: item.edge_cost,
    };
    let cloud = Totals {
        items: 1,
        correct: u32::from(item.cloud_correct),
        edge_served: 0,
        cost: item.cloud_cost,
    };
    match policy {
        ClassPolicy::Edge => edge,
        ClassPolicy::Cloud => cloud,
        ClassPolicy::Cascade(rule) => {
            if item.edge_confidence.get(rule.feature) >= rule.threshold {
                edge
            } else {
                Totals {
                    cost: item.edge_cost.saturating_add(item.cloud_cost),
                    ..cloud
                }
            }
        }
    }
}

/// The totals of `policies` on `items`.
pub fn evaluate(policies: &ClassPolicies, items: &[CalibrationItem]) -> Totals {
    items
        .iter()
        .map(|item| apply(policies.get(item.class), item))
        .fold(Totals::default(), Totals::add)
}

/// Every candidate policy of one class with its totals, in tie-break order. A candidate's
/// `correct` is what it is credited with under `evidence`.
fn candidates(items: &[&CalibrationItem], evidence: Evidence) -> Vec<(ClassPolicy, Totals)> {
    let totals_of = |policy: &ClassPolicy| {
        items
            .iter()
            .map(|item| apply(policy, item))
            .fold(Totals::default(), Totals::add)
    };
    let cloud = (ClassPolicy::Cloud, totals_of(&ClassPolicy::Cloud));
    if (items.len() as u32) < evidence.min_class_items {
        return vec![cloud];
    }
    let edge_correct_total: u32 = items.iter().map(|item| u32::from(item.edge_correct)).sum();
    let mut candidates = Vec::new();
    if edge_correct_total > 0 {
        let mut edge = totals_of(&ClassPolicy::Edge);
        edge.correct = evidence.credit(edge.correct, edge.items);
        candidates.push((ClassPolicy::Edge, edge));
    }
    let edge_cost: MicroUsd = items.iter().map(|item| item.edge_cost).sum();
    for feature in ConfidenceFeature::ALL {
        let mut sorted: Vec<&CalibrationItem> = items.to_vec();
        sorted.sort_by(|a, b| {
            a.edge_confidence
                .get(feature)
                .total_cmp(&b.edge_confidence.get(feature))
        });
        // Prefix sums over the escalated (lowest-scoring) items; suffix over the accepted.
        let (mut escalated_cloud_cost, mut escalated_cloud_correct, mut escalated_edge_correct) =
            (MicroUsd::ZERO, 0u32, 0u32);
        for split in 1..sorted.len() {
            let previous = sorted[split - 1];
            escalated_cloud_cost = escalated_cloud_cost.saturating_add(previous.cloud_cost);
            escalated_cloud_correct += u32::from(previous.cloud_correct);
            escalated_edge_correct += u32::from(previous.edge_correct);
            let low = previous.edge_confidence.get(feature);
            let high = sorted[split].edge_confidence.get(feature);
            let kept_edge_correct = edge_correct_total - escalated_edge_correct;
            if low >= high || kept_edge_correct == 0 {
                continue;
            }
            let middle = low + (high - low) / 2.0;
            let threshold = if middle > low { middle } else { high };
            let kept = (sorted.len() - split) as u32;
            let totals = Totals {
                items: sorted.len() as u32,
                correct: escalated_cloud_correct + evidence.credit(kept_edge_correct, kept),
                edge_served: (sorted.len() - split) as u32,
                cost: edge_cost.saturating_add(escalated_cloud_cost),
            };
            let rule = AcceptRule { feature, threshold };
            candidates.push((ClassPolicy::Cascade(rule), totals));
        }
    }
    candidates.push(cloud);
    candidates
}

/// Is `a` a better way than `b` to reach the same number of correct answers?
fn cheaper(a: &Totals, b: &Totals) -> bool {
    (a.cost, std::cmp::Reverse(a.edge_served)) < (b.cost, std::cmp::Reverse(b.edge_served))
}

/// Chooses per-class policies on `items` keeping at least `target_quality`
/// of cloud-only correctness at the lowest cost, with the answers kept at the
/// edge credited as `evidence` says. Classes without items keep their policy
/// from `base`. `source` names the data for the summary.
pub fn calibrate(
    items: &[CalibrationItem],
    target_quality: f64,
    base: &ClassPolicies,
    source: &str,
    evidence: Evidence,
) -> Result<CalibrationOutcome, CalibrationError> {
    if items.is_empty() {
        return Err(CalibrationError::NoItems);
    }
    if items.len() > CALIBRATION_ITEMS_MAX {
        return Err(CalibrationError::TooManyItems(items.len()));
    }
    if !(target_quality > 0.0 && target_quality <= 1.0) {
        return Err(CalibrationError::Target(target_quality));
    }
    let cloud_only = evaluate(&all(ClassPolicy::Cloud), items);
    let edge_only = evaluate(&all(ClassPolicy::Edge), items);
    let required = (target_quality * f64::from(cloud_only.correct) - 1e-9)
        .ceil()
        .max(0.0) as u32;

    // best[k]: the cheapest (totals, choice per class so far) with exactly k correct.
    let mut best: Vec<Option<(Totals, Vec<ClassPolicy>)>> = vec![None; items.len() + 1];
    best[0] = Some((Totals::default(), Vec::new()));
    let mut classes = Vec::new();
    for class in TaskClass::ALL {
        let members: Vec<&CalibrationItem> =
            items.iter().filter(|item| item.class == class).collect();
        if members.is_empty() {
            continue;
        }
        classes.push(class);
        let options = candidates(&members, evidence);
        let mut next: Vec<Option<(Totals, Vec<ClassPolicy>)>> = vec![None; items.len() + 1];
        for (totals, choices) in best.iter().flatten() {
            for (policy, option) in &options {
                let combined = totals.add(*option);
                let slot = &mut next[combined.correct as usize];
                if slot
                    .as_ref()
                    .is_none_or(|(existing, _)| cheaper(&combined, existing))
                {
                    let mut chosen = choices.clone();
                    chosen.push(*policy);
                    *slot = Some((combined, chosen));
                }
            }
        }
        best = next;
    }
    let (credited, choices) = best
        .into_iter()
        .flatten()
        .filter(|(totals, _)| totals.correct >= required)
        .min_by(|(a, _), (b, _)| {
            (
                a.cost,
                std::cmp::Reverse(a.correct),
                std::cmp::Reverse(a.edge_served),
            )
                .cmp(&(
                    b.cost,
                    std::cmp::Reverse(b.correct),
                    std::cmp::Reverse(b.edge_served),
                ))
        })
        .expect("sending every class to the cloud always reaches the target");
    let mut policies = base.clone();
    for (class, policy) in classes.iter().zip(choices) {
        *policies.get_mut(*class) = policy;
    }
    let routed = evaluate(&policies, items);
    let summary = CalibrationSummary {
        source: source.to_string(),
        target_quality,
        routed,
        edge_only,
        cloud_only,
        quality_vs_cloud: ratio(routed.correct, cloud_only.correct),
        cost_saving_vs_cloud: saving(routed.cost, cloud_only.cost),
        evidence,
        credited_correct: Some(credited.correct),
        cross_validated: None,
    };
    Ok(CalibrationOutcome { policies, summary })
}

/// [`CrossValidation`] of [`calibrate`] with these arguments over `folds` folds (at least 2,
/// at most the number of items).
pub fn cross_validate(
    items: &[CalibrationItem],
    target_quality: f64,
    base: &ClassPolicies,
    evidence: Evidence,
    folds: u32,
) -> Result<CrossValidation, CalibrationError> {
    let folds = folds.clamp(2, (items.len() as u32).max(2));
    let (mut routed, mut cloud_only) = (Totals::default(), Totals::default());
    for fold in 0..folds {
        let held_out = |index: usize| index as u32 % folds == fold;
        let (training, test): (Vec<_>, Vec<_>) = items
            .iter()
            .enumerate()
            .partition(|(index, _)| !held_out(*index));
        let training: Vec<CalibrationItem> = training.into_iter().map(|(_, item)| *item).collect();
        let test: Vec<CalibrationItem> = test.into_iter().map(|(_, item)| *item).collect();
        if training.is_empty() || test.is_empty() {
            continue;
        }
        let outcome = calibrate(&training, target_quality, base, "fold", evidence)?;
        routed = routed.add(evaluate(&outcome.policies, &test));
        cloud_only = cloud_only.add(evaluate(&all(ClassPolicy::Cloud), &test));
    }
    Ok(CrossValidation {
        folds,
        routed,
        cloud_only,
        quality_vs_cloud: ratio(routed.correct, cloud_only.correct),
        cost_saving_vs_cloud: saving(routed.cost, cloud_only.cost),
    })
}

/// `1 - cost / reference`, or 0 when the reference is free.
pub fn saving(cost: MicroUsd, reference: MicroUsd) -> f64 {
    if reference.0 == 0 {
        return 0.0;
    }
    1.0 - cost.0 as f64 / reference.0 as f64
}

/// The same policy for every class.
pub fn all(policy: ClassPolicy) -> ClassPolicies {
    ClassPolicies {
        multiple_choice: policy,
        math: policy,
        code: policy,
        open: policy,
    }
}

#[cfg(test)]
mod tests;
