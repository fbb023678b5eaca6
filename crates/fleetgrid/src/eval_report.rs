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
    println!(
        "  served at the edge    {:.1}% ({at_edge}/{items})",
        ratio(at_edge, items) * 100.0
    );
    println!(
        "  cost                  {} µUSD (${:.6})",
        cost.0,
        cost.as_usd()
    );
    if let (Some(p50), Some(p95)) = (percentile(&latencies, 0.5), percentile(&latencies, 0.95)) {
        println!("  latency               p50 {p50:.0} ms, p95 {p95:.0} ms");
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
        "cost_micro_usd": cost.0,
        "latency_ms": {"p50": percentile(&latencies, 0.5), "p95": percentile(&latencies, 0.95)},
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
}
