//! The evaluation's OpenAI-compatible client: one chat completion at
//! temperature 0, with token log-probabilities when the router needs them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use router::TokenLogprob;
use serde_json::json;

/// How long one completion may take before the item counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Alternatives asked for per token, for the margin score.
pub const TOP_LOGPROBS: u32 = 5;

/// Attempts per request while the gateway answers that it is overloaded.
const OVERLOAD_ATTEMPTS_MAX: u32 = 20;

/// One OpenAI-compatible endpoint and the model to ask for there.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Ends in `/v1`.
    pub base_url: String,
    pub api_key: String,
    pub model: String,
}

impl Endpoint {
    pub fn new(url: &str, api_key: &str, model: &str) -> Endpoint {
        let trimmed = url.trim_end_matches('/');
        let base_url = if trimmed.ends_with("/v1") {
            trimmed.to_string()
        } else {
            format!("{trimmed}/v1")
        };
        Endpoint {
            base_url,
            api_key: api_key.to_string(),
            model: model.to_string(),
        }
    }
}

/// A finished completion.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency_ms: u64,
    /// Empty unless log-probabilities were asked for and returned.
    pub tokens: Vec<TokenLogprob>,
    /// The text each of `tokens` adds, from its bytes (a character split
    /// across tokens belongs to the token that completes it).
    pub token_texts: Vec<String>,
    /// `stop` or `length`, as the endpoint said.
    pub finish_reason: Option<String>,
    /// The gateway's `x-fleetgrid-tier` header, when it sent one.
    pub tier: Option<String>,
    /// The gateway's route reason (`fleetgrid.reason` / `.detail`), when it sent one.
    pub route_reason: Option<String>,
    /// Each tier's (prompt, completion) tokens of a routed answer
    /// (`fleetgrid.usage`), discarded edge tokens included: work that was done.
    pub edge_usage: Option<(u32, u32)>,
    pub cloud_usage: Option<(u32, u32)>,
    /// Tokens of the edge's part whose text was kept (`fleetgrid.usage.edge.completion_tokens`).
    pub edge_kept: Option<u32>,
    /// What the gateway charged for a routed answer (`fleetgrid.cost_micro_usd`), and what the
    /// cloud upstream costs the platform for its part.
    pub charged_micro_usd: Option<u64>,
    pub upstream_micro_usd: Option<u64>,
}

/// A continuation's log-likelihood after a context (`Client::loglikelihood`).
#[derive(Debug, Clone, Copy)]
pub struct Likelihood {
    /// The sum of the continuation's token log-probabilities.
    pub logprob: f64,
    pub tokens: u32,
    /// Every continuation token was the model's most likely one.
    pub greedy: bool,
    /// The whole text's tokens, as the endpoint counted them.
    pub prompt_tokens: u64,
    pub latency_ms: u64,
}

pub struct Client {
    http: reqwest::Client,
}

impl Client {
    pub fn new() -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("build the HTTP client")?;
        Ok(Client { http })
    }

    /// Asks `endpoint` for a completion of one user message.
    pub async fn complete(
        &self,
        endpoint: &Endpoint,
        prompt: &str,
        max_tokens: u32,
        logprobs: bool,
    ) -> anyhow::Result<Completion> {
        self.complete_with(endpoint, prompt, max_tokens, logprobs, None)
            .await
    }

    /// [`Client::complete`], with `quality` (the gateway's `auto` mode) when given.
    pub async fn complete_with(
        &self,
        endpoint: &Endpoint,
        prompt: &str,
        max_tokens: u32,
        logprobs: bool,
        quality: Option<&str>,
    ) -> anyhow::Result<Completion> {
        let mut body = chat_body(endpoint, prompt, max_tokens, quality, Sampling::GREEDY);
        if logprobs {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(TOP_LOGPROBS);
        }
        self.post(endpoint, "chat/completions", &body).await
    }

    /// [`Client::complete_with`] without log-probabilities, sampled as `sampling` says.
    pub async fn complete_sampled(
        &self,
        endpoint: &Endpoint,
        prompt: &str,
        max_tokens: u32,
        quality: Option<&str>,
        sampling: Sampling,
    ) -> anyhow::Result<Completion> {
        let body = chat_body(endpoint, prompt, max_tokens, quality, sampling);
        self.post(endpoint, "chat/completions", &body).await
    }

    /// Asks `endpoint` to continue a raw text prompt (`/completions`): how
    /// an answer another model started is continued, as the gateway's
    /// handoff does.
    pub async fn continue_text(
        &self,
        endpoint: &Endpoint,
        text: &str,
        max_tokens: u32,
    ) -> anyhow::Result<Completion> {
        let body = json!({
            "model": endpoint.model,
            "prompt": text,
            "temperature": 0,
            "seed": 0,
            "max_tokens": max_tokens,
        });
        self.post(endpoint, "completions", &body).await
    }

    /// The log-likelihood of `continuation` after `context` under the endpoint's model, asked as
    /// an evaluation harness asks: the whole text echoed with each token's log-probability
    /// (`echo`, `logprobs: 1`, one token generated), the continuation's tokens found by their
    /// text offsets.
    pub async fn loglikelihood(
        &self,
        endpoint: &Endpoint,
        context: &str,
        continuation: &str,
    ) -> anyhow::Result<Likelihood> {
        let text = format!("{context}{continuation}");
        let body = json!({
            "model": endpoint.model,
            "prompt": text,
            "echo": true,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
            "seed": 0,
        });
        let (value, latency_ms, _) = self.post_json(endpoint, "completions", &body).await?;
        let logprobs = &value["choices"][0]["logprobs"];
        let (Some(offsets), Some(scores), Some(tops)) = (
            logprobs["text_offset"].as_array(),
            logprobs["token_logprobs"].as_array(),
            logprobs["top_logprobs"].as_array(),
        ) else {
            bail!("the echoed completion has no text_offset, token_logprobs and top_logprobs");
        };
        let (start, end) = (context.chars().count(), text.chars().count());
        let mut likelihood = Likelihood {
            logprob: 0.0,
            tokens: 0,
            greedy: true,
            prompt_tokens: value["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            latency_ms,
        };
        for ((offset, score), top) in offsets.iter().zip(scores).zip(tops) {
            let offset = offset.as_u64().context("a text offset")? as usize;
            if offset < start || offset >= end {
                continue;
            }
            let score = score
                .as_f64()
                .context("a continuation token without its logprob")?;
            likelihood.logprob += score;
            likelihood.tokens += 1;
            let best = top.as_object().and_then(|top| {
                top.values()
                    .filter_map(serde_json::Value::as_f64)
                    .reduce(f64::max)
            });
            likelihood.greedy &= best.is_some_and(|best| score >= best - 1e-6);
        }
        if likelihood.tokens == 0 {
            bail!("no token of the continuation {continuation:?} came back scored");
        }
        Ok(likelihood)
    }

    async fn post(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<Completion> {
        let (value, latency_ms, tier) = self.post_json(endpoint, path, body).await?;
        let mut completion = parse_completion(&value)?;
        completion.latency_ms = latency_ms;
        completion.tier = tier.or(completion.tier);
        Ok(completion)
    }

    /// The JSON answer to `body`, its latency and the gateway's tier header.
    async fn post_json(
        &self,
        endpoint: &Endpoint,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(serde_json::Value, u64, Option<String>)> {
        let url = format!("{}/{path}", endpoint.base_url);
        let start = Instant::now();
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let response = self
                .http
                .post(&url)
                .bearer_auth(&endpoint.api_key)
                .json(body)
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            // Overload (429, or 503 with Retry-After) is waited out; other
            // errors, such as a 503 without Retry-After, are not retried.
            let status = response.status().as_u16();
            let retry_after_s = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok());
            let overloaded = status == 429 || (status == 503 && retry_after_s.is_some());
            if overloaded && attempt < OVERLOAD_ATTEMPTS_MAX {
                let wait_s = retry_after_s.unwrap_or(1).clamp(1, 10);
                tokio::time::sleep(Duration::from_secs(wait_s)).await;
                continue;
            }
            break response;
        };
        let status = response.status();
        let tier = response
            .headers()
            .get("x-fleetgrid-tier")
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        let text = response.text().await.context("read the response body")?;
        let latency_ms = start.elapsed().as_millis() as u64;
        if !status.is_success() {
            bail!(
                "{url} answered {status}: {}",
                text.chars().take(500).collect::<String>()
            );
        }
        let value: serde_json::Value =
            serde_json::from_str(&text).context("the response is not JSON")?;
        Ok((value, latency_ms, tier))
    }
}

fn parse_completion(value: &serde_json::Value) -> anyhow::Result<Completion> {
    let choice = value["choices"]
        .get(0)
        .context("the response has no choices")?;
    // A chat completion's message, or a text completion's text.
    let text = choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap_or_default()
        .to_string();
    let usage = &value["usage"];
    let count = |field: &str| usage[field].as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32;
    let entries = choice["logprobs"]["content"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let tokens = entries.iter().map(token_of).collect();
    let token_texts = token_texts(entries);
    let fleetgrid = &value["fleetgrid"];
    let route_reason =
        fleetgrid["reason"]
            .as_str()
            .map(|code| match fleetgrid["detail"].as_str() {
                Some(detail) if !detail.is_empty() => format!("{code}: {detail}"),
                _ => code.to_string(),
            });
    let part_usage = |part: &serde_json::Value| -> Option<(u32, u32)> {
        let tokens =
            |field: &str| part[field].as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32;
        part.is_object().then(|| {
            (
                tokens("prompt_tokens"),
                tokens("completion_tokens").saturating_add(tokens("discarded_tokens")),
            )
        })
    };
    Ok(Completion {
        edge_kept: fleetgrid["usage"]["edge"]["completion_tokens"]
            .as_u64()
            .map(|count| count.min(u64::from(u32::MAX)) as u32),
        charged_micro_usd: fleetgrid["cost_micro_usd"].as_u64(),
        upstream_micro_usd: fleetgrid["usage"]["cloud"]["upstream_cost_micro_usd"].as_u64(),
        edge_usage: part_usage(&fleetgrid["usage"]["edge"]),
        cloud_usage: part_usage(&fleetgrid["usage"]["cloud"]),
        text,
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        latency_ms: 0,
        tokens,
        token_texts,
        finish_reason: choice["finish_reason"].as_str().map(str::to_string),
        tier: fleetgrid["tier"].as_str().map(str::to_string),
        route_reason,
    })
}

/// Each token's text, assembled from its `bytes` (its `token` string when
/// the endpoint sent no bytes), so that the texts add up to the answer.
fn token_texts(entries: &[serde_json::Value]) -> Vec<String> {
    let mut assembler = engine::TextAssembler::new(Vec::new());
    let mut texts: Vec<String> = entries
        .iter()
        .map(|entry| {
            let bytes: Option<Vec<u8>> = entry["bytes"].as_array().and_then(|bytes| {
                bytes
                    .iter()
                    .map(|byte| byte.as_u64().and_then(|byte| u8::try_from(byte).ok()))
                    .collect()
            });
            match bytes {
                Some(bytes) => assembler.push(&bytes),
                None => assembler.push(entry["token"].as_str().unwrap_or_default().as_bytes()),
            }
        })
        .collect();
    let rest = assembler.finish();
    if let Some(last) = texts.last_mut() {
        last.push_str(&rest);
    }
    texts
}

fn token_of(entry: &serde_json::Value) -> TokenLogprob {
    let token = entry["token"].as_str().unwrap_or_default();
    // A missing log-probability counts as the least likely token.
    let logprob = entry["logprob"]
        .as_f64()
        .unwrap_or(f64::from(router::confidence::LOGPROB_FLOOR)) as f32;
    let top: Vec<(&str, f32)> = entry["top_logprobs"]
        .as_array()
        .map(|alternatives| {
            alternatives
                .iter()
                .filter_map(|alternative| {
                    Some((
                        alternative["token"].as_str()?,
                        alternative["logprob"].as_f64()? as f32,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    TokenLogprob::from_top(token, logprob, top)
}

/// How an eval request samples: its temperature and seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub seed: u64,
}

impl Sampling {
    /// Temperature 0, seed 0: what every policy but a sampled `--policy exact` asks.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        seed: 0,
    };
}

/// A one-message chat request for `endpoint`'s model.
fn chat_body(
    endpoint: &Endpoint,
    prompt: &str,
    max_tokens: u32,
    quality: Option<&str>,
    sampling: Sampling,
) -> serde_json::Value {
    let mut body = json!({
        "model": endpoint.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": sampling.temperature,
        "seed": sampling.seed,
        "max_tokens": max_tokens,
    });
    if let Some(quality) = quality {
        body["quality"] = json!(quality);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_urls_with_or_without_v1() {
        assert_eq!(
            Endpoint::new("http://h:1", "k", "m").base_url,
            "http://h:1/v1"
        );
        assert_eq!(
            Endpoint::new("http://h:1/v1/", "k", "m").base_url,
            "http://h:1/v1"
        );
    }

    #[test]
    fn completions_parse_with_logprobs_usage_and_route() {
        let body = json!({
            "choices": [{"message": {"content": "B"}, "logprobs": {"content": [
                {"token": "B", "logprob": -0.2, "top_logprobs": [
                    {"token": "B", "logprob": -0.2}, {"token": "C", "logprob": -1.9}]}
            ]}}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 1},
            "fleetgrid": {"tier": "fleet", "reason": "cascade_accepted", "detail": "mean_logprob ok",
                "usage": {"edge": {"prompt_tokens": 40, "completion_tokens": 1, "discarded_tokens": 2}, "cloud": null}}
        });
        let completion = parse_completion(&body).expect("parse");
        assert_eq!(completion.text, "B");
        assert_eq!(
            (completion.prompt_tokens, completion.completion_tokens),
            (40, 1)
        );
        assert_eq!(completion.tokens.len(), 1);
        assert_eq!(completion.tokens[0].best_alternative, Some(-1.9));
        assert_eq!(completion.tier.as_deref(), Some("fleet"));
        assert_eq!(
            completion.route_reason.as_deref(),
            Some("cascade_accepted: mean_logprob ok")
        );
        assert_eq!(completion.edge_usage, Some((40, 3)));
        assert_eq!(completion.cloud_usage, None);
        assert!(parse_completion(&json!({"choices": []})).is_err());
    }
}
