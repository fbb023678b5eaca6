//! `fleetgrid eval --policy exact`: the exact speculative cascade (`auto` with
//! `quality: "exact"`) measured against cloud-only (`cloud/<model>`) on the same gateway,
//! item by item, the two requests of an item one after the other (which goes first
//! alternates). For each item: whether the two answers are the same text, each one's grade,
//! latency and charge, and how many of the answer's tokens the fleet's draft gave. The report
//! (`OUT/exact.json`) sums them: the share of answer tokens accepted from the car, the cloud
//! decode tokens saved, latency percentiles, and cost, with Wilson 95% intervals on the
//! accuracies and the identity rate.

use std::path::Path;

use anyhow::Context;
use router::wilson_interval;
use serde_json::json;

use crate::eval_client::{Client, Completion, Endpoint, Sampling};
use crate::eval_data::Item;

/// One item, both ways.
struct Pair {
    index: usize,
    cloud: Completion,
    exact: Completion,
    cloud_correct: bool,
    exact_correct: bool,
}

/// Runs every item as cloud-only and as the exact cascade on `gateway` (whose cloud model is
/// `cloud_model`, named `cloud/<model>`), both at `temperature` with the item's index as the
/// seed, and writes the report to `out/exact.json`.
pub async fn run(
    dataset: &str,
    items: &[Item],
    gateway: &Endpoint,
    cloud_model: &str,
    temperature: f32,
    out: &Path,
) -> anyhow::Result<()> {
    let client = Client::new()?;
    let cloud_name = if cloud_model.starts_with("cloud/") {
        cloud_model.to_string()
    } else {
        format!("cloud/{cloud_model}")
    };
    let cloud = Endpoint {
        model: cloud_name.clone(),
        ..gateway.clone()
    };
    let auto = Endpoint {
        model: "auto".to_string(),
        ..gateway.clone()
    };
    let mut pairs = Vec::with_capacity(items.len());
    for (number, item) in items.iter().enumerate() {
        let sampling = Sampling {
            temperature,
            seed: item.index as u64,
        };
        let ask_cloud =
            || client.complete_sampled(&cloud, &item.prompt, item.max_tokens, None, sampling);
        let ask_exact = || {
            client.complete_sampled(
                &auto,
                &item.prompt,
                item.max_tokens,
                Some("exact"),
                sampling,
            )
        };
        let (cloud_answer, exact_answer) = if number % 2 == 0 {
            let cloud_answer = ask_cloud().await;
            (cloud_answer, ask_exact().await)
        } else {
            let exact_answer = ask_exact().await;
            (ask_cloud().await, exact_answer)
        };
        let context = || format!("item {} ({})", item.index, item.id);
        let pair = Pair {
            index: item.index,
            cloud_correct: false,
            exact_correct: false,
            cloud: cloud_answer.with_context(context)?,
            exact: exact_answer.with_context(context)?,
        };
        let pair = Pair {
            cloud_correct: item.grader.grade(&pair.cloud.text).correct,
            exact_correct: item.grader.grade(&pair.exact.text).correct,
            ..pair
        };
        eprintln!(
            "  [{}/{}] item {:>3} {} kept {:>3}/{:<3} draft, {:>6} ms exact vs {:>6} ms cloud",
            number + 1,
            items.len(),
            item.index,
            if pair.cloud.text == pair.exact.text {
                "same"
            } else {
                "DIFF"
            },
            pair.exact.edge_kept.unwrap_or(0),
            pair.exact.edge_usage.map_or(0, |(_, drafted)| drafted),
            pair.exact.latency_ms,
            pair.cloud.latency_ms,
        );
        pairs.push(pair);
    }
    let report = summarise(dataset, &cloud_name, temperature, &pairs);
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let path = out.join("exact.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(&report["summary"])?);
    eprintln!("fleetgrid eval: wrote {}", path.display());
    Ok(())
}

fn summarise(
    dataset: &str,
    cloud_model: &str,
    temperature: f32,
    pairs: &[Pair],
) -> serde_json::Value {
    let n = pairs.len() as u64;
    let count =
        |test: &dyn Fn(&Pair) -> bool| pairs.iter().filter(|pair| test(pair)).count() as u64;
    let sum = |value: &dyn Fn(&Pair) -> u64| pairs.iter().map(value).sum::<u64>();
    let rate = |hits: u64| {
        let narrow = |count: u64| u32::try_from(count).unwrap_or(u32::MAX);
        let (low, high) = wilson_interval(narrow(hits), narrow(n));
        json!({"count": hits, "of": n, "rate": ratio(hits, n), "wilson95": [low, high]})
    };
    let identical = count(&|pair| pair.cloud.text == pair.exact.text);
    let answer_tokens = sum(&|pair| u64::from(pair.exact.completion_tokens));
    let kept = sum(&|pair| u64::from(pair.exact.edge_kept.unwrap_or(0)));
    let drafted = sum(&|pair| u64::from(pair.exact.edge_usage.map_or(0, |(_, drafted)| drafted)));
    let cloud_only_decoded = sum(&|pair| u64::from(pair.cloud.completion_tokens));
    let exact_decoded = sum(&|pair| u64::from(pair.exact.cloud_usage.map_or(0, |(_, made)| made)));
    let exact_prefilled =
        sum(&|pair| u64::from(pair.exact.cloud_usage.map_or(0, |(read, _)| read)));
    let cloud_prefilled = sum(&|pair| u64::from(pair.cloud.prompt_tokens));
    let latencies = |pick: &dyn Fn(&Pair) -> u64| {
        let mut values: Vec<u64> = pairs.iter().map(pick).collect();
        values.sort_unstable();
        json!({"p50_ms": percentile(&values, 50), "p90_ms": percentile(&values, 90), "total_ms": values.iter().sum::<u64>()})
    };
    let items: Vec<serde_json::Value> = pairs
        .iter()
        .map(|pair| {
            json!({
                "index": pair.index,
                "identical": pair.cloud.text == pair.exact.text,
                "cloud": {"text": pair.cloud.text, "correct": pair.cloud_correct, "latency_ms": pair.cloud.latency_ms,
                          "completion_tokens": pair.cloud.completion_tokens,
                          "charged_micro_usd": pair.cloud.charged_micro_usd,
                          "upstream_micro_usd": pair.cloud.upstream_micro_usd},
                "exact": {"text": pair.exact.text, "correct": pair.exact_correct, "latency_ms": pair.exact.latency_ms,
                          "completion_tokens": pair.exact.completion_tokens,
                          "draft_tokens": pair.exact.edge_usage.map(|(_, drafted)| drafted),
                          "kept_draft_tokens": pair.exact.edge_kept,
                          "cloud_usage": pair.exact.cloud_usage,
                          "charged_micro_usd": pair.exact.charged_micro_usd,
                          "upstream_micro_usd": pair.exact.upstream_micro_usd,
                          "reason": pair.exact.route_reason},
            })
        })
        .collect();
    json!({
        "dataset": dataset,
        "cloud_model": cloud_model,
        "scoring": if temperature == 0.0 {
            "generate (temperature 0, the item's own max_tokens)".to_string()
        } else {
            format!("generate (temperature {temperature}, seeded by the item's index, the item's own max_tokens)")
        },
        "summary": {
            "items": n,
            "identical_answers": rate(identical),
            "cloud_only_correct": rate(count(&|pair| pair.cloud_correct)),
            "exact_correct": rate(count(&|pair| pair.exact_correct)),
            "answer_tokens": answer_tokens,
            "draft_tokens": drafted,
            "kept_draft_tokens": kept,
            "share_of_answer_tokens_from_the_car": ratio(kept, answer_tokens),
            "share_of_draft_kept": ratio(kept, drafted),
            "cloud_decoded_tokens": {"cloud_only": cloud_only_decoded, "exact": exact_decoded,
                                     "saved": cloud_only_decoded.saturating_sub(exact_decoded)},
            "cloud_prefilled_tokens": {"cloud_only": cloud_prefilled, "exact": exact_prefilled},
            "latency": {"cloud_only": latencies(&|pair| pair.cloud.latency_ms),
                        "exact": latencies(&|pair| pair.exact.latency_ms)},
            "tenant_charged_micro_usd": {
                "cloud_only": sum(&|pair| pair.cloud.charged_micro_usd.unwrap_or(0)),
                "exact": sum(&|pair| pair.exact.charged_micro_usd.unwrap_or(0)),
            },
            "upstream_cost_micro_usd": {
                "cloud_only": sum(&|pair| pair.cloud.upstream_micro_usd.unwrap_or(0)),
                "exact": sum(&|pair| pair.exact.upstream_micro_usd.unwrap_or(0)),
            },
        },
        "items": items,
    })
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// The `p`th percentile of sorted `values` (nearest rank).
fn percentile(values: &[u64], p: usize) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let rank = (p * values.len()).div_ceil(100).max(1);
    values.get(rank - 1).copied()
}
