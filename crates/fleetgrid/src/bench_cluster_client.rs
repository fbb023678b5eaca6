//! The benchmark's HTTP client of a gateway: chat completions, whole or
//! streamed, with the arrival time of every token.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// A gateway and the key to use it.
#[derive(Clone)]
pub struct Gateway {
    pub http: SocketAddr,
    pub api_key: String,
    pub client: reqwest::Client,
}

impl Gateway {
    pub fn new(http: SocketAddr, api_key: &str) -> Gateway {
        Gateway {
            http,
            api_key: api_key.to_owned(),
            client: reqwest::Client::new(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.http)
    }

    /// A whole (not streamed) completion; its completion tokens.
    pub async fn complete(&self, body: &Value) -> anyhow::Result<u64> {
        let response = self
            .client
            .post(self.url())
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let answer: Value = response.json().await.context("read the answer")?;
        if !status.is_success() {
            bail!("{status}: {answer}");
        }
        answer["usage"]["completion_tokens"]
            .as_u64()
            .with_context(|| format!("no usage in {answer}"))
    }

    /// Opens a streamed completion (`body` must ask for `logprobs`, by which tokens are counted).
    pub async fn stream(&self, body: &Value) -> anyhow::Result<TokenStream> {
        let response = self
            .client
            .post(self.url())
            .bearer_auth(&self.api_key)
            .json(body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!(
                "{}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(TokenStream::new(response))
    }
}

/// A chat request body; a streamed one asks for logprobs (by which tokens are counted) and
/// usage at the end.
pub fn body(model: &str, messages: Value, max_tokens: u32, stream: bool, seed: u64) -> Value {
    let mut body = json!({
        "model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
        "ignore_eos": true, "stream": stream, "messages": messages,
    });
    if stream {
        body["logprobs"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// A streamed response, read piece by piece, with the arrival time of each
/// event that carried tokens and the tokens received by then.
pub struct TokenStream {
    response: reqwest::Response,
    buffer: String,
    pub tokens: usize,
    pub arrivals: Vec<(Instant, usize)>,
    /// From the usage chunk at the end (`stream_options.include_usage`).
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
}

impl TokenStream {
    /// Reads `response`, a successful streamed completion whose request
    /// asked for `logprobs`.
    pub fn new(response: reqwest::Response) -> TokenStream {
        TokenStream {
            response,
            buffer: String::new(),
            tokens: 0,
            arrivals: Vec::new(),
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
        }
    }

    /// Reads the next piece of the stream; false at its end.
    pub async fn read_more(&mut self) -> anyhow::Result<bool> {
        let Some(bytes) = self.response.chunk().await? else {
            return Ok(false);
        };
        let now = Instant::now();
        self.buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = self.buffer.find("\n\n") {
            let event: String = self.buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).context("parse an event")?;
            if chunk.get("error").is_some() {
                bail!("the stream failed: {chunk}");
            }
            if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
                self.prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0);
                self.cached_prompt_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
            }
            let entries = chunk["choices"][0]["logprobs"]["content"]
                .as_array()
                .map_or(0, Vec::len);
            if entries > 0 {
                self.tokens += entries;
                self.arrivals.push((now, self.tokens));
            }
        }
        Ok(true)
    }

    /// Reads until at least `tokens` tokens have arrived; false if the stream ended first.
    pub async fn read_until(&mut self, tokens: usize) -> anyhow::Result<bool> {
        while self.tokens < tokens {
            if !self.read_more().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
