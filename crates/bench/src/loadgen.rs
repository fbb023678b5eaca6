//! An OpenAI-compatible load generator: N concurrent streaming chat completions against one base
//! URL, counting completion tokens and wall time.

use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::BenchError;

/// A single request may take this long at most; on two cores 128 tokens at 8 streams take well
/// under a minute, so this only catches a server that hangs.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// A stream line longer than this is not a token chunk; the server is misbehaving.
const SSE_LINE_BYTES_MAX: usize = 1 << 20;
/// How much of an error body goes into an error message.
const ERROR_BODY_CHARS_MAX: usize = 500;

/// What to send and how hard.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Shown in errors, e.g. "llama-server".
    pub target_name: String,
    /// Up to and excluding `/v1`, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    /// Streams in flight at once.
    pub concurrency: u32,
    /// Requests in total; each stream picks up the next one when its request ends.
    pub requests: u32,
    /// The number of the first request; the others follow. A run that gives every load its own
    /// numbers sends no prompt twice, so no server answers from a cached copy of a whole prompt.
    pub first_request: u32,
    pub max_tokens: u32,
    /// Ask the server to keep going past end-of-generation (llama-server's `ignore_eos`), so that
    /// each request produces exactly `max_tokens`.
    pub ignore_eos: bool,
    /// Structured output to ask for (`response_format`), if any.
    pub response_format: Option<serde_json::Value>,
}

/// The outcome of one load run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadResult {
    pub requests: u32,
    pub completion_tokens: u64,
    pub wall: Duration,
    /// Mean time from sending a request to its first content chunk.
    pub time_to_first_token_mean: Duration,
    /// Whether every request's count came from the server's `usage` rather than counted chunks.
    pub usage_reported: bool,
}

impl LoadResult {
    /// Completion tokens over the time spent after each request's first token: the decode
    /// rate of one stream, when the load ran one request at a time.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let decoding = self
            .wall
            .saturating_sub(self.time_to_first_token_mean * self.requests)
            .as_secs_f64();
        if decoding > 0.0 {
            self.completion_tokens as f64 / decoding
        } else {
            0.0
        }
    }

    /// Total completion tokens over wall time: what the node delivers to all clients together.
    pub fn aggregate_tokens_per_second(&self) -> f64 {
        let seconds = self.wall.as_secs_f64();
        if seconds > 0.0 {
            self.completion_tokens as f64 / seconds
        } else {
            0.0
        }
    }

    pub fn completion_tokens_per_request_mean(&self) -> f64 {
        self.completion_tokens as f64 / f64::from(self.requests.max(1))
    }
}

/// One request's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct StreamCount {
    content_chunks: u64,
    usage_completion_tokens: Option<u64>,
    time_to_first_token: Option<Duration>,
}

/// Runs `spec.requests` streaming chat completions, `spec.concurrency` at a time.
pub async fn run_load(spec: &LoadSpec) -> Result<LoadResult, BenchError> {
    if spec.concurrency == 0 || spec.requests == 0 {
        return Err(BenchError::InvalidSetting(
            "concurrency and requests must be at least 1".to_owned(),
        ));
    }
    // A new connection per request: a kept-alive one may be closed by the server (llama-server
    // limits requests per connection) just as the next request goes out, which fails that
    // request. Connecting costs the same little on both sides.
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| request_error(spec, &e.to_string()))?;
    let started = Instant::now();
    let concurrency = usize::try_from(spec.concurrency).unwrap_or(usize::MAX);
    let numbers = spec.first_request..spec.first_request.saturating_add(spec.requests);
    let counts: Vec<Result<StreamCount, BenchError>> = futures::stream::iter(numbers)
        .map(|index| one_request(&client, spec, index))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut completion_tokens = 0;
    let mut usage_reported = true;
    let mut first_token_total = Duration::ZERO;
    for count in counts {
        let count = count?;
        usage_reported &= count.usage_completion_tokens.is_some();
        completion_tokens += count
            .usage_completion_tokens
            .unwrap_or(count.content_chunks);
        first_token_total += count.time_to_first_token.unwrap_or(wall);
    }
    Ok(LoadResult {
        requests: spec.requests,
        completion_tokens,
        wall,
        time_to_first_token_mean: first_token_total / spec.requests,
        usage_reported,
    })
}

/// The chat request number `index`. Each starts with its own number, so that what a server can
/// reuse of an earlier prompt is the chat template's head and nothing after the number; each asks
/// for a long answer so that a server without `ignore_eos` still tends to run to `max_tokens`.
pub(crate) fn request_body(spec: &LoadSpec, index: u32) -> serde_json::Value {
    let prompt = format!(
        "Request {index}. Write a long, detailed story about a lighthouse keeper who has to guide \
         a fleet of ships through a storm. Give it many chapters, with dialogue, and describe the \
         sea, the light and every ship."
    );
    let mut body = serde_json::json!({
        "model": spec.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": spec.max_tokens,
        "temperature": 0.8,
        "seed": index,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if spec.ignore_eos {
        body["ignore_eos"] = serde_json::Value::Bool(true);
    }
    if let Some(format) = &spec.response_format {
        body["response_format"] = format.clone();
    }
    body
}

async fn one_request(
    client: &reqwest::Client,
    spec: &LoadSpec,
    index: u32,
) -> Result<StreamCount, BenchError> {
    let url = format!(
        "{}/v1/chat/completions",
        spec.base_url.trim_end_matches('/')
    );
    let mut request = client.post(&url).json(&request_body(spec, index));
    if let Some(key) = &spec.api_key {
        request = request.bearer_auth(key);
    }
    let sent = Instant::now();
    let response = request
        .send()
        .await
        .map_err(|e| request_error(spec, &error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        let body: String = body.chars().take(ERROR_BODY_CHARS_MAX).collect();
        return Err(request_error(spec, &format!("http {status}: {body}")));
    }
    let mut count = StreamCount::default();
    let mut pending = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(|e| request_error(spec, &error_chain(&e)))?;
        pending.extend_from_slice(&bytes);
        while let Some(newline) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=newline).collect();
            let line = String::from_utf8_lossy(&line);
            if apply_sse_line(line.trim(), &mut count, sent.elapsed())
                .map_err(|reason| request_error(spec, &reason))?
            {
                return Ok(count);
            }
        }
        if pending.len() > SSE_LINE_BYTES_MAX {
            return Err(request_error(spec, "stream line too long"));
        }
    }
    Ok(count)
}

/// Folds one server-sent-events line into `count`; `Ok(true)` at `data: [DONE]`.
fn apply_sse_line(line: &str, count: &mut StreamCount, elapsed: Duration) -> Result<bool, String> {
    let Some(payload) = line.strip_prefix("data:") else {
        return Ok(false);
    };
    let payload = payload.trim();
    if payload == "[DONE]" {
        return Ok(true);
    }
    let chunk: serde_json::Value =
        serde_json::from_str(payload).map_err(|e| format!("bad stream chunk: {e}"))?;
    if let Some(error) = chunk.get("error") {
        return Err(format!("error in stream: {error}"));
    }
    let has_content = chunk["choices"]
        .as_array()
        .and_then(|choices| choices.first())
        .and_then(|choice| choice["delta"]["content"].as_str())
        .is_some_and(|content| !content.is_empty());
    if has_content {
        count.content_chunks += 1;
        count.time_to_first_token.get_or_insert(elapsed);
    }
    if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
        count.usage_completion_tokens = Some(tokens);
    }
    Ok(false)
}

/// An error with every cause it carries: reqwest's own message alone ("error sending request")
/// does not say what went wrong.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn request_error(spec: &LoadSpec, reason: &str) -> BenchError {
    BenchError::Request {
        target: spec.target_name.clone(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests;
