//! The evaluation's report: accuracy, cost, share served at the edge,
//! latency, the router's own time, comparisons with edge-only and cloud-only
//! from the records, a JSON file, and the cost–quality curve as SVG.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context;
use router::calibrate::{self, CalibrationItem};
use router::curve;
use router::{ClassPolicy, ConfidenceFeature, MicroUsd, RouterConfig};
use serde::Serialize;
use serde_json::json;

use crate::eval::Policy;
use crate::eval_data::Half;
use crate::eval_records::{self, ItemRecords};

/// Which tier answered an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    Edge,
    Cloud,
    /// The edge answered, was judged unsure, and the cloud answered instead.
    Escalated,
    /// The edge started and the cloud finished (a handoff).
    Handoff,
}

impl Served {
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Edge => "edge",
            Served::Cloud => "cloud",
            Served::Escalated => "escalated",
            Served::Handoff => "edge+cloud",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub index: usize,
    pub served: Served,
    pub correct: bool,
    pub cost: MicroUsd,
    pub latency_ms: u64,
    /// The router's own time (pre-route plus judging), when it ran here.
    pub router_us: Option<f64>,
    pub reason: String,
}

pub struct ReportInput<'a> {
    pub dataset: &'a str,
    pub half: Half,
    pub policy: Policy,
    pub replayed: bool,
    pub config: &'a RouterConfig,
    pub results: &'a [ItemResult],
    pub records: &'a BTreeMap<usize, ItemRecords>,
    /// The item indices, when `--limit` made this a subset of the half.
    pub subset: Option<BTreeSet<usize>>,
    pub out: &'a Path,
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(samples: &[f64], share: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((share * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Resamples of [`bootstrap95`]: enough for the 2.5th and 97.5th percentiles to settle to
/// well within a reported figure's precision.
const BOOTSTRAP_RESAMPLES: usize = 2_000;

/// The fixed seed of [`bootstrap95`]: the same items give the same interval.
const BOOTSTRAP_SEED: u64 = 0x5eed_b007;

/// A percentile-bootstrap 95% interval of `statistic` over `samples`: the statistic of
/// [`BOOTSTRAP_RESAMPLES`] resamples (drawn with replacement, as many as the samples, from a
/// fixed seed), their 2.5th and 97.5th percentiles. `None` without samples.
pub fn bootstrap95(samples: &[f64], statistic: impl Fn(&[f64]) -> f64) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut state = BOOTSTRAP_SEED;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let count = samples.len() as u64;
    let mut resample = vec![0.0; samples.len()];
    let statistics: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            for slot in &mut resample {
                *slot = samples[(next() % count) as usize];
            }
            statistic(&resample)
        })
        .collect();
    Some((
        percentile(&statistics, 0.025)?,
        percentile(&statistics, 0.975)?,
    ))
}

fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len().max(1) as f64
}

/// Where the figures were measured, for every title and file name.
fn scope(input: &ReportInput<'_>) -> String {
    let mut scope = format!("{}, {}", input.dataset, input.half.describe());
    if input.subset.is_some() {
        scope.push_str(&format!(", first {} items", input.results.len()));
    }
    scope
}

pub fn finish(input: ReportInput<'_>) -> anyhow::Result<()> {
    let results = input.results;
    let items = results.len() as u32;
    let correct = results.iter().filter(|result| result.correct).count() as u32;
    let at_edge = results
        .iter()
        .filter(|result| result.served == Served::Edge)
        .count() as u32;
    let cost: MicroUsd = results.iter().map(|result| result.cost).sum();
    let costs: Vec<f64> = results.iter().map(|result| result.cost.0 as f64).collect();
    let cost_per_item = bootstrap95(&costs, mean);
    let latencies: Vec<f64> = results
        .iter()
        .map(|result| result.latency_ms as f64)
        .collect();
    let router_us: Vec<f64> = results
        .iter()
        .filter_map(|result| result.router_us)
        .collect();

    // Edge-only and cloud-only on the same items, from the records.
    let indices: BTreeSet<usize> = results.iter().map(|result| result.index).collect();
    let same_items: BTreeMap<usize, ItemRecords> = input
        .records
        .iter()
        .filter(|(index, _)| indices.contains(index))
        .map(|(index, records)| (*index, records.clone()))
        .collect();
    let (calibration_items, incomplete) =
        eval_records::calibration_items(&same_items, Half::All, &input.config.prices);
    let complete = incomplete == 0 && calibration_items.len() == results.len();
    let reference = complete.then(|| {
        (
            calibrate::evaluate(&calibrate::all(ClassPolicy::Edge), &calibration_items),
            calibrate::evaluate(&calibrate::all(ClassPolicy::Cloud), &calibration_items),
        )
    });

    let scope = scope(&input);
    let accuracy = ratio(correct, items);
    println!();
    println!(
        "fleetgrid eval — {scope} — policy {}{}",
        input.policy.as_str(),
        if input.replayed {
            " (replayed from records)"
        } else {
            ""
        }
    );
    println!("  items                 {items}");
    let (low, high) = router::wilson_interval(correct, items);
    println!(
        "  accuracy              {:.1}% ({correct}/{items}), 95% interval {:.1}–{:.1}%",
        accuracy * 100.0,
        low * 100.0,
        high * 100.0
    );
    let edge_interval = router::wilson_interval(at_edge, items);
    println!(
        "  served at the edge    {:.1}% ({at_edge}/{items}), 95% interval {:.1}–{:.1}%",
        ratio(at_edge, items) * 100.0,
        edge_interval.0 * 100.0,
        edge_interval.1 * 100.0
    );
    println!(
        "  cost                  {} µUSD (${:.6})",
        cost.0,
        cost.as_usd()
    );
    if let Some((low, high)) = cost_per_item {
        println!(
            "  cost per item         {:.1} µUSD, bootstrap 95% interval {low:.1}–{high:.1}",
            mean(&costs)
        );
    }
    let p50_interval = bootstrap95(&latencies, |samples| {
        percentile(samples, 0.5).unwrap_or(f64::NAN)
    });
    let p95_interval = bootstrap95(&latencies, |samples| {
        percentile(samples, 0.95).unwrap_or(f64::NAN)
    });
    if let (Some(p50), Some(p95), Some(p50_in), Some(p95_in)) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        p50_interval,
        p95_interval,
    ) {
        println!(
            "  latency               p50 {p50:.0} ms ({:.0}–{:.0}), p95 {p95:.0} ms ({:.0}–{:.0}), bootstrap 95% intervals",
            p50_in.0, p50_in.1, p95_in.0, p95_in.1
        );
    }
    if let (Some(p50), Some(p95)) = (percentile(&router_us, 0.5), percentile(&router_us, 0.95)) {
        println!("  router's own time     p50 {p50:.1} µs, p95 {p95:.1} µs");
    }
    let mut comparison = serde_json::Value::Null;
    if let Some((edge_only, cloud_only)) = reference {
        let saving = calibrate::saving(cost, cloud_only.cost);
        let quality = ratio(correct, cloud_only.correct);
        println!(
            "  edge-only             {:.1}% accuracy, {} µUSD",
            edge_only.accuracy() * 100.0,
            edge_only.cost.0
        );
        println!(
            "  cloud-only            {:.1}% accuracy, {} µUSD",
            cloud_only.accuracy() * 100.0,
            cloud_only.cost.0
        );
        println!("  quality vs cloud-only {:.1}%", quality * 100.0);
        println!("  cost saving vs cloud  {:.1}%", saving * 100.0);
        comparison = json!({
            "edge_only": edge_only, "cloud_only": cloud_only,
            "quality_vs_cloud": quality, "cost_saving_vs_cloud": saving,
        });
    } else {
        println!(
            "  (edge-only and cloud-only comparisons need both tiers' records for these items)"
        );
    }

    std::fs::create_dir_all(input.out)
        .with_context(|| format!("create {}", input.out.display()))?;
    let stem = format!(
        "{}-{}-{}{}",
        input.dataset,
        input.half.as_str(),
        input.policy.as_str(),
        if input.replayed { "-replay" } else { "" }
    );
    let report = json!({
        "dataset": input.dataset, "half": input.half.as_str(), "scope": scope,
        "policy": input.policy.as_str(), "replayed": input.replayed,
        "items": items, "correct": correct, "accuracy": accuracy,
        "accuracy_wilson95": [low, high],
        "served_at_edge": at_edge, "edge_share": ratio(at_edge, items),
        "edge_share_wilson95": [edge_interval.0, edge_interval.1],
        "cost_micro_usd": cost.0,
        "cost_per_item_micro_usd": {"mean": (!costs.is_empty()).then(|| mean(&costs)),
                                    "bootstrap95": cost_per_item},
        "latency_ms": {"p50": percentile(&latencies, 0.5), "p95": percentile(&latencies, 0.95),
                       "p50_bootstrap95": p50_interval, "p95_bootstrap95": p95_interval},
        "router_us": {"p50": percentile(&router_us, 0.5), "p95": percentile(&router_us, 0.95)},
        "comparison": comparison,
        "results": results,
    });
    let report_path = input.out.join(format!("{stem}.json"));
    write(&report_path, &serde_json::to_string_pretty(&report)?)?;
    println!("  report                {}", report_path.display());

    if complete && !calibration_items.is_empty() {
        let svg_path = input.out.join(format!(
            "{}-{}-curve.svg",
            input.dataset,
            input.half.as_str()
        ));
        let feature = main_feature(input.config, &calibration_items);
        let curve = curve::sweep(
            &format!("Cost–quality: {scope}"),
            &calibration_items,
            feature,
            Some(&input.config.policies),
        );
        write(&svg_path, &curve.to_svg())?;
        println!("  cost–quality curve    {}", svg_path.display());
    }
    Ok(())
}

/// The feature the configured cascade of the items' most common class uses.
fn main_feature(config: &RouterConfig, items: &[CalibrationItem]) -> ConfidenceFeature {
    let mut counts: BTreeMap<router::TaskClass, usize> = BTreeMap::new();
    for item in items {
        *counts.entry(item.class).or_default() += 1;
    }
    let class = counts
        .iter()
        .max_by_key(|(class, count)| (**count, std::cmp::Reverse(**class)))
        .map(|(class, _)| *class);
    match class.map(|class| *config.policies.get(class)) {
        Some(ClassPolicy::Cascade(rule)) => rule.feature,
        _ => ConfidenceFeature::MeanLogprob,
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    f64::from(part) / f64::from(whole)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&samples, 0.5), Some(3.0));
        assert_eq!(percentile(&samples, 0.95), Some(5.0));
        assert_eq!(percentile(&[7.0], 0.5), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn a_bootstrap_interval_holds_the_estimate_narrows_with_more_items_and_repeats() {
        // Latencies of a skewed service: most fast, some slow.
        let latencies = |count: usize| -> Vec<f64> {
            (0..count)
                .map(|index| {
                    if index % 5 == 0 {
                        900.0
                    } else {
                        100.0 + index as f64 % 7.0
                    }
                })
                .collect()
        };
        let few = latencies(20);
        let many = latencies(400);
        let (low, high) = bootstrap95(&few, mean).expect("an interval");
        assert!(low <= mean(&few) && mean(&few) <= high, "{low}–{high}");
        assert!(low < high, "resampling a varied sample varies its mean");
        let (many_low, many_high) = bootstrap95(&many, mean).expect("an interval");
        assert!(many_high - many_low < (high - low) / 2.0);
        // The same items give the same interval; one value has no spread.
        assert_eq!(bootstrap95(&few, mean), Some((low, high)));
        assert_eq!(bootstrap95(&[3.0; 10], mean), Some((3.0, 3.0)));
        assert_eq!(bootstrap95(&[], mean), None);
    }
}
