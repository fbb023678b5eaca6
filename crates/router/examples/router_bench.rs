//! Times the router's own work: the pre-route decision (with and without a
//! neighbour index) and whole-answer scoring.
//!
//! `cargo run --release --example router_bench -- [PROMPTS.jsonl ...]`
//!
//! Each line of a prompts file is a JSON object; its `"question"` field (a
//! string, or an object with a `"stem"`) is the prompt. Without files a
//! built-in set is used. The neighbour index holds every prompt given.

use std::time::Instant;

use router::knn::{KnownPrompt, NeighbourConfig};
use router::{AcceptRule, ConfidenceFeature, Router, RouterConfig, TokenLogprob};

/// Times each prompt is routed per configuration.
const ROUNDS: usize = 50;

fn prompt_of(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let question = &value["question"];
    if let Some(text) = question.as_str() {
        return Some(text.to_string());
    }
    let stem = question["stem"].as_str()?;
    let choices: Vec<String> = question["choices"]
        .as_array()?
        .iter()
        .filter_map(|choice| {
            Some(format!(
                "{}. {}",
                choice["label"].as_str()?,
                choice["text"].as_str()?
            ))
        })
        .collect();
    Some(format!("{stem}\n{}", choices.join("\n")))
}

fn prompts() -> Vec<String> {
    let mut prompts = Vec::new();
    for path in std::env::args().skip(1) {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
        prompts.extend(text.lines().filter_map(prompt_of));
    }
    if prompts.is_empty() {
        prompts = [
            "What is the capital of France?",
            "Tom has 3 boxes of 12 eggs and eats 5. How many eggs are left?",
            "Write a Python function that reverses a list.",
            "Where would you find a jellyfish?\nA. ocean\nB. desert\nC. forest\nD. mall\nE. sky",
        ]
        .iter()
        .map(|prompt| prompt.to_string())
        .collect();
    }
    prompts
}

fn percentile(sorted_us: &[f64], share: f64) -> f64 {
    let index = ((sorted_us.len() as f64 - 1.0) * share).round() as usize;
    sorted_us[index]
}

fn time_routes(name: &str, router: &Router, prompts: &[String]) {
    let mut samples_us = Vec::with_capacity(prompts.len() * ROUNDS);
    let mut routes = std::collections::BTreeMap::new();
    for _ in 0..ROUNDS {
        for prompt in prompts {
            let start = Instant::now();
            let decision = router.pre_route(prompt);
            samples_us.push(start.elapsed().as_secs_f64() * 1e6);
            *routes.entry(decision.route.as_str()).or_insert(0usize) += 1;
        }
    }
    samples_us.sort_by(f64::total_cmp);
    println!(
        "pre-route {name:<28} n={:<6} p50 {:>8.1} µs  p95 {:>8.1} µs  p99 {:>8.1} µs  routes {routes:?}",
        samples_us.len(),
        percentile(&samples_us, 0.50),
        percentile(&samples_us, 0.95),
        percentile(&samples_us, 0.99),
    );
}

fn main() {
    let prompts = prompts();
    let plain = Router::new(RouterConfig::default()).expect("default configuration");
    time_routes("class policies", &plain, &prompts);

    let with_neighbours = RouterConfig {
        neighbours: Some(NeighbourConfig {
            k: 5,
            min_similarity: 0.3,
            min_agreement: 0.8,
            prompts: prompts
                .iter()
                .enumerate()
                .map(|(index, text)| KnownPrompt {
                    text: text.clone(),
                    edge_correct: index % 3 == 0,
                    cloud_correct: index % 2 == 0,
                })
                .collect(),
        }),
        ..RouterConfig::default()
    };
    let knn = Router::new(with_neighbours).expect("configuration with neighbours");
    time_routes(&format!("+ {} neighbours", prompts.len()), &knn, &prompts);

    // Judging a 256-token answer.
    let tokens: Vec<TokenLogprob> = (0..256)
        .map(|index| TokenLogprob::new(-0.01 * (index % 50) as f32, [-3.0, -4.0]))
        .collect();
    let rule = AcceptRule {
        feature: ConfidenceFeature::MeanLogprob,
        threshold: -0.5,
    };
    let start = Instant::now();
    let mut accepted = 0;
    for _ in 0..1000 {
        accepted += usize::from(plain.judge(&rule, &tokens).is_accept());
    }
    println!(
        "judge 256-token answer: {:.1} µs each ({accepted} accepted)",
        start.elapsed().as_secs_f64() * 1e6 / 1000.0
    );
}
