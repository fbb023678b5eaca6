//! `fleetgrid eval --scoring loglikelihood`: multiple-choice items scored the
//! way lm-evaluation-harness scores them, by each option's log-likelihood as
//! the answer to the question, instead of by what the model writes. A model
//! that would first reason at length is not cut off before it names an option:
//! it is never asked to write anything.
//!
//! The context is `Question: {question}\nAnswer:` and each option ` {text}`
//! (the shape of the harness's ARC and PIQA tasks); `acc` picks the option of
//! highest summed log-probability, `acc_norm` the highest per character of the
//! option's text. Each option is one `/v1/completions` request with `echo` and
//! `logprobs`. Accuracies come with Wilson 95% intervals.

use std::path::Path;

use anyhow::{bail, Context};
use router::grade::Grader;
use router::wilson_interval;
use serde_json::json;

use crate::eval_client::{Client, Endpoint, Likelihood};
use crate::eval_data::Item;

/// One item's options, scored.
struct Scored {
    index: usize,
    key: char,
    /// (label, summed logprob, logprob per character, greedy).
    options: Vec<(char, f64, f64, bool)>,
    latency_ms: u64,
    prompt_tokens: u64,
}

impl Scored {
    fn pick(&self, by: impl Fn(&(char, f64, f64, bool)) -> f64) -> Option<char> {
        self.options
            .iter()
            .max_by(|a, b| by(a).total_cmp(&by(b)))
            .map(|option| option.0)
    }
}

/// Scores every item on `endpoint` (the tier `tier` names) and writes the
/// report to `out/loglikelihood-{tier}.json`.
pub async fn run(
    dataset: &str,
    items: &[Item],
    endpoint: &Endpoint,
    tier: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let client = Client::new()?;
    let mut scored = Vec::with_capacity(items.len());
    for (number, item) in items.iter().enumerate() {
        let (Grader::MultipleChoice { key, choices }, Some(question)) =
            (&item.grader, &item.question)
        else {
            bail!(
                "item {} ({}) is not a multiple-choice question: loglikelihood scoring needs \
                 CommonsenseQA-shaped items",
                item.index,
                item.id
            );
        };
        let context = format!("Question: {question}\nAnswer:");
        let mut options = Vec::with_capacity(choices.len());
        let (mut latency_ms, mut prompt_tokens) = (0, 0);
        for (label, text) in choices {
            let likelihood: Likelihood = client
                .loglikelihood(endpoint, &context, &format!(" {text}"))
                .await
                .with_context(|| format!("item {} option {label}", item.index))?;
            latency_ms += likelihood.latency_ms;
            prompt_tokens += likelihood.prompt_tokens;
            let characters = text.chars().count().max(1) as f64;
            options.push((
                *label,
                likelihood.logprob,
                likelihood.logprob / characters,
                likelihood.greedy,
            ));
        }
        let item_scored = Scored {
            index: item.index,
            key: *key,
            options,
            latency_ms,
            prompt_tokens,
        };
        eprintln!(
            "  [{}/{}] item {:>3} {} acc_norm {} {:>6} ms",
            number + 1,
            items.len(),
            item.index,
            if item_scored.pick(|option| option.1) == Some(*key) {
                "✓"
            } else {
                "✗"
            },
            if item_scored.pick(|option| option.2) == Some(*key) {
                "✓"
            } else {
                "✗"
            },
            latency_ms
        );
        scored.push(item_scored);
    }
    report(dataset, endpoint, tier, &scored, out)
}

fn report(
    dataset: &str,
    endpoint: &Endpoint,
    tier: &str,
    scored: &[Scored],
    out: &Path,
) -> anyhow::Result<()> {
    let items = scored.len() as u32;
    let count = |by: fn(&(char, f64, f64, bool)) -> f64| {
        scored
            .iter()
            .filter(|item| item.pick(by) == Some(item.key))
            .count() as u32
    };
    let acc = count(|option| option.1);
    let acc_norm = count(|option| option.2);
    let latencies: Vec<f64> = scored.iter().map(|item| item.latency_ms as f64).collect();
    let prompt_tokens: u64 = scored.iter().map(|item| item.prompt_tokens).sum();
    let figure = |correct: u32| {
        let (low, high) = wilson_interval(correct, items);
        json!({"correct": correct, "items": items,
               "accuracy": f64::from(correct) / f64::from(items.max(1)),
               "wilson95": [low, high]})
    };
    println!();
    println!(
        "fleetgrid eval — {dataset} — {tier} ({}) — scored by log-likelihood",
        endpoint.model
    );
    for (name, correct) in [("acc", acc), ("acc_norm", acc_norm)] {
        let (low, high) = wilson_interval(correct, items);
        println!(
            "  {name:<9} {:.1}% ({correct}/{items}), 95% interval {:.1}–{:.1}%",
            100.0 * f64::from(correct) / f64::from(items.max(1)),
            low * 100.0,
            high * 100.0
        );
    }
    let p50 = crate::eval_report::percentile(&latencies, 0.5).unwrap_or(0.0);
    println!("  latency   p50 {p50:.0} ms per item (every option scored)");
    println!("  prompt    {prompt_tokens} tokens prefilled in all");
    let report = json!({
        "dataset": dataset,
        "tier": tier,
        "model": endpoint.model,
        "scoring": "loglikelihood",
        "context": "Question: {question}\\nAnswer:",
        "acc": figure(acc),
        "acc_norm": figure(acc_norm),
        "latency_ms_p50": p50,
        "prompt_tokens": prompt_tokens,
        "items": scored.iter().map(|item| json!({
            "index": item.index,
            "key": item.key.to_string(),
            "options": item.options.iter().map(|(label, logprob, per_char, greedy)| json!({
                "label": label.to_string(), "logprob": logprob,
                "logprob_per_char": per_char, "greedy": greedy,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let path = out.join(format!("loglikelihood-{tier}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("write {}", path.display()))?;
    println!("  report    {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Scored;

    #[test]
    fn acc_sums_and_acc_norm_divides_by_the_options_length() {
        let item = Scored {
            index: 0,
            key: 'B',
            // A short wrong option is likelier in sum, the long right one per character.
            options: vec![('A', -3.0, -1.0, false), ('B', -6.0, -0.5, false)],
            latency_ms: 0,
            prompt_tokens: 0,
        };
        assert_eq!(item.pick(|option| option.1), Some('A'));
        assert_eq!(item.pick(|option| option.2), Some('B'));
    }
}
