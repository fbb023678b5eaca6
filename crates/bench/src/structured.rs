//! The cost of structured output per token: one stream's decode rate with a JSON schema
//! against the same stream without one, on our stack and on llama-server (its own grammar
//! sampling from the same schema), measured side by side in alternating rounds.
//!
//! The schema asks for more than `max_tokens` can hold (chapters of long text), so that a
//! constrained answer, like a plain one with `ignore_eos`, runs to `max_tokens`: both count
//! the same tokens, and only the time per token differs.

use std::path::Path;

use serde_json::{json, Value};

use crate::loadgen::{run_load, LoadResult, LoadSpec};
use crate::reference::ReferenceBinaries;
use crate::serving::{median, median_round, on_own_runtime, targets, ServingConfig};
use crate::BenchError;

/// Requests per measured load; one at a time.
const REQUESTS_PER_LOAD: u32 = 4;

/// The schema each constrained request follows: longer than any `max_tokens` measured.
fn chapters_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "chapters": {
                "type": "array", "minItems": 12, "maxItems": 12,
                "items": {
                    "type": "object",
                    "properties": {
                        "title": {"type": "string", "maxLength": 40},
                        "text": {"type": "string", "minLength": 400, "maxLength": 800},
                    },
                    "required": ["title", "text"],
                    "additionalProperties": false,
                },
            },
        },
        "required": ["chapters"],
        "additionalProperties": false,
    })
}

fn response_format() -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "story", "schema": chapters_schema()}})
}

/// One target's rounds: its median plain and constrained loads, and the ratio of each round.
#[derive(Clone, Debug)]
pub struct StructuredRow {
    pub target: String,
    pub plain: LoadResult,
    pub constrained: LoadResult,
    /// Constrained decode tokens/s over plain, per round.
    pub round_ratios: Vec<f64>,
    /// The start of one constrained answer, as evidence that the schema was followed.
    pub sample: String,
}

impl StructuredRow {
    /// Time per token constrained over time per token plain (1.10 = 10% dearer), from the
    /// median round ratio.
    pub fn cost_ratio(&self) -> f64 {
        1.0 / median(&self.round_ratios).unwrap_or(f64::NAN)
    }
}

#[derive(Clone, Debug)]
pub struct StructuredReport {
    pub config: ServingConfig,
    pub reference_version: String,
    pub ours: StructuredRow,
    pub reference: StructuredRow,
}

/// Measures both targets, `config.rounds` rounds, `config.max_tokens` tokens per answer, one
/// stream at a time. Runs on a thread of its own with its own runtime.
pub fn structured(
    fleetgrid_binary: &Path,
    refs: &ReferenceBinaries,
    config: &ServingConfig,
) -> Result<StructuredReport, BenchError> {
    let fleetgrid_binary = fleetgrid_binary.to_owned();
    let refs = refs.clone();
    let config = config.clone();
    on_own_runtime("structured benchmark", move || async move {
        measure(&fleetgrid_binary, &refs, &config).await
    })
}

async fn measure(
    fleetgrid_binary: &Path,
    refs: &ReferenceBinaries,
    config: &ServingConfig,
) -> Result<StructuredReport, BenchError> {
    if config.rounds == 0 || config.max_tokens == 0 {
        return Err(BenchError::InvalidSetting(
            "rounds and max_tokens must be at least 1".to_owned(),
        ));
    }
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|e| BenchError::io("create", &config.work_dir, e))?;
    let reference = targets::start_llama_server(refs, config).await?;
    let ours = targets::start_fleetgrid(fleetgrid_binary, config).await?;
    let specs = [reference.spec.clone(), ours.spec.clone()];
    let [reference_sample, ours_sample] = [
        constrained_sample(&specs[0]).await?,
        constrained_sample(&specs[1]).await?,
    ];
    let mut plain: [Vec<LoadResult>; 2] = Default::default();
    let mut constrained: [Vec<LoadResult>; 2] = Default::default();
    let mut first_request = 1;
    for round in 0..config.rounds {
        // Odd rounds measure our stack first, and within a target the constrained load first.
        let order: [usize; 2] = if round % 2 == 1 { [1, 0] } else { [0, 1] };
        for target in order {
            let load = |response_format: Option<Value>| LoadSpec {
                concurrency: 1,
                requests: REQUESTS_PER_LOAD,
                first_request,
                max_tokens: config.max_tokens,
                ignore_eos: response_format.is_none(),
                response_format,
                ..specs[target].clone()
            };
            let (plain_load, constrained_load) = (load(None), load(Some(response_format())));
            let (plain_result, constrained_result) = if round % 2 == 1 {
                let constrained_result = run_load(&constrained_load).await?;
                (run_load(&plain_load).await?, constrained_result)
            } else {
                let plain_result = run_load(&plain_load).await?;
                (plain_result, run_load(&constrained_load).await?)
            };
            plain[target].push(plain_result);
            constrained[target].push(constrained_result);
        }
        first_request = first_request.saturating_add(REQUESTS_PER_LOAD);
    }
    drop(ours);
    drop(reference);
    let [reference_plain, ours_plain] = plain;
    let [reference_constrained, ours_constrained] = constrained;
    let row = |target: &str, plain: Vec<LoadResult>, constrained: Vec<LoadResult>, sample| {
        let round_ratios = plain
            .iter()
            .zip(&constrained)
            .map(|(plain, constrained)| {
                constrained.decode_tokens_per_second()
                    / plain.decode_tokens_per_second().max(f64::MIN_POSITIVE)
            })
            .collect();
        StructuredRow {
            target: target.to_owned(),
            plain: median_round(plain).unwrap_or_default(),
            constrained: median_round(constrained).unwrap_or_default(),
            round_ratios,
            sample,
        }
    };
    Ok(StructuredReport {
        config: config.clone(),
        reference_version: refs.llama_cpp_version.clone(),
        ours: row("fleetgrid", ours_plain, ours_constrained, ours_sample),
        reference: row(
            "llama-server",
            reference_plain,
            reference_constrained,
            reference_sample,
        ),
    })
}

/// One plain (not streamed) constrained answer's first 120 characters; an error when the
/// target does not answer with the object the schema asks for.
async fn constrained_sample(spec: &LoadSpec) -> Result<String, BenchError> {
    let mut body = crate::loadgen::request_body(
        &LoadSpec {
            max_tokens: 48,
            response_format: Some(response_format()),
            ..spec.clone()
        },
        0,
    );
    body["stream"] = json!(false);
    if let Some(body) = body.as_object_mut() {
        body.remove("stream_options");
    }
    let failed = |why: String| BenchError::Request {
        target: spec.target_name.clone(),
        reason: why,
    };
    let client = reqwest::Client::new();
    let mut request = client
        .post(format!("{}/v1/chat/completions", spec.base_url))
        .json(&body);
    if let Some(key) = &spec.api_key {
        request = request.bearer_auth(key);
    }
    let answer: Value = request
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?
        .json()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(|| failed(format!("no content in {answer}")))?;
    let compact: String = content.chars().filter(|c| !c.is_whitespace()).collect();
    if !compact.starts_with("{\"chapters\":[{\"title\":\"") {
        return Err(failed(format!(
            "the answer does not follow the schema: {content:.120}"
        )));
    }
    Ok(content.chars().take(120).collect())
}

impl std::fmt::Display for StructuredReport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = &self.config;
        writeln!(formatter, "model:     {}", config.model_path.display())?;
        writeln!(
            formatter,
            "threads:   {}, one stream, {} requests per load, max_tokens {}, rounds {}; llama.cpp {}",
            config.threads,
            REQUESTS_PER_LOAD,
            config.max_tokens,
            config.rounds,
            self.reference_version
        )?;
        writeln!(
            formatter,
            "{:<13} {:>14} {:>14} {:>10} {:>12}  per-round ratios",
            "target", "plain tok/s", "schema tok/s", "tokens", "cost/token"
        )?;
        for row in [&self.ours, &self.reference] {
            let ratios: Vec<String> = row
                .round_ratios
                .iter()
                .map(|ratio| format!("{ratio:.3}"))
                .collect();
            writeln!(
                formatter,
                "{:<13} {:>14.1} {:>14.1} {:>10} {:>11.3}×  {}",
                row.target,
                row.plain.decode_tokens_per_second(),
                row.constrained.decode_tokens_per_second(),
                format!(
                    "{}/{}",
                    row.plain.completion_tokens, row.constrained.completion_tokens
                ),
                row.cost_ratio(),
                ratios.join(" ")
            )?;
        }
        writeln!(
            formatter,
            "constrained decode, fleetgrid over llama-server: {:.3}",
            self.ours.constrained.decode_tokens_per_second()
                / self
                    .reference
                    .constrained
                    .decode_tokens_per_second()
                    .max(f64::MIN_POSITIVE)
        )?;
        writeln!(formatter, "target: cost/token <= 1.10× on fleetgrid, and fleetgrid's constrained decode faster than llama-server's")?;
        for row in [&self.ours, &self.reference] {
            writeln!(formatter, "{} answers: {}", row.target, row.sample)?;
        }
        Ok(())
    }
}
