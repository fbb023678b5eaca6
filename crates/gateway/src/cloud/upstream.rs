//! The HTTP client for the cloud model: any OpenAI-compatible endpoint.
//!
//! Every upstream call streams (`stream: true` with usage in the last chunk),
//! whether or not the client streams, so that one parser and one set of
//! timeouts serve both. The number of calls in flight is capped by a
//! semaphore whose permit the caller takes first (`try_permit`); a call that
//! finds none is refused at once, never queued.
//!
//! Timeouts: the response headers must arrive within `timeout`, and after
//! them every chunk within `timeout` of the one before; the whole call ends
//! at `limits::REQUEST_TIMEOUT` whatever the upstream does.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::sse::SseParser;
use super::CloudConfig;
use crate::limits;
use crate::sampling::Sampling;

/// What the prompt of an upstream call is.
#[derive(Clone, Debug)]
pub enum UpstreamPrompt {
    /// `POST /chat/completions` with these messages (OpenAI's message objects).
    Chat(Vec<Value>),
    /// `POST /completions` with this text (a rendered chat plus the answer
    /// so far, for a handoff).
    Text(String),
    /// `POST /completions` with these token ids of the cloud model (a rendered chat plus a
    /// draft or the answer so far, for the exact cascade).
    Tokens(Vec<i32>),
}

/// Log-probabilities asked of the upstream, each token named by its id
/// (`return_tokens_as_token_ids`, as vLLM and fleetgrid name them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamScores {
    /// The prompt's own tokens scored too (`echo`), before the answer's.
    pub echo: bool,
    /// Alternatives per token (`logprobs`).
    pub top_logprobs: u32,
}

#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    pub prompt: UpstreamPrompt,
    pub max_tokens: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Sent only where they ask for something (OpenAI's own API refuses the extensions
    /// `top_k`, `min_p` and `repetition_penalty`, and its refusal reaches the client).
    /// Token ids in `logit_bias` are of the cloud model's vocabulary.
    pub sampling: Sampling,
    /// Structured output, as the client asked for it.
    pub response_format: Option<Value>,
    /// `tools`, `tool_choice` and `parallel_tool_calls`, as the client asked for them.
    pub tools: Option<UpstreamTools>,
    /// Log-probabilities with token ids (`/completions` only).
    pub scores: Option<UpstreamScores>,
    /// Predicted output as token ids of the cloud model (`/completions` with a prompt of token
    /// ids only; an extension of OpenAI's `prediction` that `fleetgrid cloud serve` takes);
    /// empty for none.
    pub prediction: Vec<i32>,
}

/// The tools a chat offers the cloud model.
#[derive(Clone, Debug)]
pub struct UpstreamTools {
    pub tools: Value,
    pub tool_choice: Value,
    pub parallel_tool_calls: bool,
}

impl UpstreamRequest {
    /// Writes the sampling fields that ask for something into `body`.
    fn write_sampling(&self, body: &mut Value) {
        let sampling = &self.sampling;
        body["max_tokens"] = json!(self.max_tokens);
        body["temperature"] = json!(sampling.temperature);
        body["top_p"] = json!(sampling.top_p);
        if let Some(seed) = self.seed {
            // OpenAI takes a signed 64-bit seed.
            body["seed"] = json!(seed as i64);
        }
        if !self.stop.is_empty() {
            body["stop"] = json!(self.stop);
        }
        if sampling.top_k != 0 {
            body["top_k"] = json!(sampling.top_k);
        }
        if sampling.min_p != 0.0 {
            body["min_p"] = json!(sampling.min_p);
        }
        if sampling.presence_penalty != 0.0 {
            body["presence_penalty"] = json!(sampling.presence_penalty);
        }
        if sampling.frequency_penalty != 0.0 {
            body["frequency_penalty"] = json!(sampling.frequency_penalty);
        }
        if sampling.repetition_penalty != 1.0 {
            body["repetition_penalty"] = json!(sampling.repetition_penalty);
        }
        if !sampling.logit_bias.is_empty() {
            let bias: serde_json::Map<String, Value> = sampling
                .logit_bias
                .iter()
                .map(|&(token, bias)| (token.to_string(), json!(bias)))
                .collect();
            body["logit_bias"] = Value::Object(bias);
        }
        if let Some(format) = &self.response_format {
            body["response_format"] = format.clone();
        }
        if let Some(tools) = &self.tools {
            body["tools"] = tools.tools.clone();
            body["tool_choice"] = tools.tool_choice.clone();
            body["parallel_tool_calls"] = json!(tools.parallel_tool_calls);
        }
        if !self.prediction.is_empty() {
            body["prediction"] = json!({"type": "content", "content": self.prediction});
        }
        if let Some(scores) = self.scores {
            body["logprobs"] = json!(scores.top_logprobs);
            body["return_tokens_as_token_ids"] = json!(true);
            if scores.echo {
                body["echo"] = json!(true);
            }
        }
    }
}

/// Token counts as the upstream reports them (it bills by them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// One parsed chunk of the upstream's stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamEvent {
    pub text: String,
    /// Parts of tool calls, as OpenAI streams them.
    pub calls: Vec<UpstreamCall>,
    pub finish_reason: Option<String>,
    pub usage: Option<UpstreamUsage>,
    /// The chunk's tokens with their log-probabilities, when they were asked for
    /// ([`UpstreamScores`]); an echoed prompt's first token has no logprob.
    pub tokens: Vec<UpstreamToken>,
}

/// One token of an upstream answer (or echoed prompt), named by its id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpstreamToken {
    pub id: i32,
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, most likely first.
    pub top: Vec<(i32, f32)>,
}

/// A part of one tool call in a streamed chunk: the first names the call, the rest carry
/// pieces of its arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCall {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("the cloud model has as many requests in flight as allowed")]
    Busy,
    #[error("the cloud model could not be reached: {0}")]
    Unreachable(String),
    #[error("the cloud model did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the cloud model answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after_seconds: Option<u64>,
    },
    #[error("the cloud model's answer could not be read: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Whether serving the request on the fleet instead could help.
    pub fn edge_could_serve(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => true,
        }
    }
}

/// Largest error body read from the upstream, for its message.
const ERROR_BODY_BYTES_MAX: usize = 64 * 1024;

pub struct Upstream {
    config: CloudConfig,
    http: reqwest::Client,
    api_key: Option<String>,
    permits: Arc<Semaphore>,
}

impl Upstream {
    /// Builds the client; fails when the key's environment variable is named
    /// but not set, so that a misconfiguration shows at start-up.
    pub fn new(config: CloudConfig) -> Result<Upstream, String> {
        let api_key = match &config.api_key_env {
            None => None,
            Some(variable) => Some(
                std::env::var(variable)
                    .map_err(|_| format!("the cloud API key variable {variable} is not set"))?,
            ),
        };
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(format!(
                "the cloud URL {:?} must start with http:// or https://",
                config.base_url
            ));
        }
        if config.concurrency_max == 0 {
            return Err("the cloud concurrency limit must be at least 1".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .build()
            .map_err(|error| format!("build the cloud HTTP client: {error}"))?;
        Ok(Upstream {
            permits: Arc::new(Semaphore::new(config.concurrency_max)),
            config,
            http,
            api_key,
        })
    }

    pub fn config(&self) -> &CloudConfig {
        &self.config
    }

    /// A slot for one upstream call, or `None` when all are taken.
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    /// Starts a call: returns once the upstream accepted it (status 2xx).
    pub async fn start(
        &self,
        request: &UpstreamRequest,
        permit: OwnedSemaphorePermit,
    ) -> Result<UpstreamStream, UpstreamError> {
        let started = Instant::now();
        let (path, mut body) = match &request.prompt {
            UpstreamPrompt::Chat(messages) => ("chat/completions", json!({ "messages": messages })),
            UpstreamPrompt::Text(prompt) => ("completions", json!({ "prompt": prompt })),
            UpstreamPrompt::Tokens(prompt) => ("completions", json!({ "prompt": prompt })),
        };
        body["model"] = json!(self.config.model);
        request.write_sampling(&mut body);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let url = format!("{}/{path}", self.config.base_url.trim_end_matches('/'));
        let mut call = self.http.post(&url).json(&body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key);
        }
        let timeout = self.config.timeout;
        let response = match tokio::time::timeout(timeout, call.send()).await {
            Err(_) => return Err(UpstreamError::Timeout(timeout)),
            Ok(Err(error)) if error.is_timeout() => return Err(UpstreamError::Timeout(timeout)),
            Ok(Err(error)) => return Err(UpstreamError::Unreachable(describe(&error))),
            Ok(Ok(response)) => response,
        };
        if !response.status().is_success() {
            return Err(status_error(response, timeout).await);
        }
        Ok(UpstreamStream {
            response,
            parser: SseParser::default(),
            pending: VecDeque::new(),
            ended: false,
            chunk_timeout: timeout,
            deadline: started + limits::REQUEST_TIMEOUT,
            _permit: permit,
        })
    }
}

/// The error's chain of causes, which is where reqwest says "connection refused".
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn status_error(mut response: reqwest::Response, timeout: Duration) -> UpstreamError {
    let status = response.status().as_u16();
    let retry_after_seconds = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok());
    let mut body = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        while let Ok(Some(chunk)) = response.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() >= ERROR_BODY_BYTES_MAX {
                break;
            }
        }
    })
    .await;
    let message = if read.is_err() {
        String::from("(no error message in time)")
    } else {
        error_message(&body)
    };
    UpstreamError::Status {
        status,
        message,
        retry_after_seconds,
    }
}

/// `error.message` of an OpenAI-shaped error body, else the body's start.
fn error_message(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        if let Some(message) = value["error"]["message"].as_str() {
            return message.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    text.chars().take(200).collect()
}

/// An accepted upstream call; dropping it closes the connection, which stops
/// the upstream's generation, and frees the concurrency slot.
pub struct UpstreamStream {
    response: reqwest::Response,
    parser: SseParser,
    /// Event payloads received but not yet returned.
    pending: VecDeque<String>,
    ended: bool,
    chunk_timeout: Duration,
    deadline: Instant,
    _permit: OwnedSemaphorePermit,
}

impl UpstreamStream {
    /// The next chunk, or `None` once the upstream said `[DONE]` or closed.
    pub async fn next(&mut self) -> Result<Option<UpstreamEvent>, UpstreamError> {
        loop {
            if let Some(payload) = self.pending.pop_front() {
                if payload.trim() == "[DONE]" {
                    self.ended = true;
                    self.pending.clear();
                    return Ok(None);
                }
                return parse_event(&payload).map(Some);
            }
            if self.ended {
                return Ok(None);
            }
            let wait = self
                .chunk_timeout
                .min(self.deadline.saturating_duration_since(Instant::now()));
            let chunk = match tokio::time::timeout(wait, self.response.chunk()).await {
                Err(_) => return Err(UpstreamError::Timeout(self.chunk_timeout)),
                Ok(Err(error)) => return Err(UpstreamError::Unreachable(describe(&error))),
                Ok(Ok(chunk)) => chunk,
            };
            let mut events = Vec::new();
            let parsed = match chunk {
                Some(bytes) => self.parser.push(&bytes, &mut events),
                None => {
                    self.ended = true;
                    self.parser.finish(&mut events)
                }
            };
            parsed.map_err(|error| UpstreamError::Protocol(error.to_string()))?;
            self.pending.extend(events);
        }
    }
}

/// One event's JSON: text from a chat delta or a completion, the finish
/// reason, usage, or an error sent in the stream.
fn parse_event(payload: &str) -> Result<UpstreamEvent, UpstreamError> {
    let value: Value = serde_json::from_str(payload)
        .map_err(|error| UpstreamError::Protocol(format!("an event is not JSON: {error}")))?;
    if let Some(error) = value.get("error").filter(|error| !error.is_null()) {
        let message = error["message"]
            .as_str()
            .unwrap_or("an error without a message")
            .to_string();
        return Err(UpstreamError::Status {
            status: 502,
            message,
            retry_after_seconds: None,
        });
    }
    let mut event = UpstreamEvent::default();
    if let Some(choice) = value["choices"].get(0) {
        let text = choice["delta"]["content"]
            .as_str()
            .or_else(|| choice["text"].as_str())
            .unwrap_or_default();
        event.text = text.to_string();
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            event.calls = calls.iter().map(upstream_call).collect::<Result<_, _>>()?;
        }
        event.finish_reason = choice["finish_reason"].as_str().map(str::to_string);
        if let Some(logprobs) = choice.get("logprobs").filter(|value| !value.is_null()) {
            event.tokens = scored_tokens(logprobs)?;
        }
    }
    if let Some(usage) = value.get("usage").filter(|usage| !usage.is_null()) {
        let count = |field: &str| {
            usage[field]
                .as_u64()
                .and_then(|count| u32::try_from(count).ok())
                .unwrap_or(0)
        };
        event.usage = Some(UpstreamUsage {
            prompt_tokens: count("prompt_tokens"),
            completion_tokens: count("completion_tokens"),
        });
    }
    Ok(event)
}

/// A completion chunk's `logprobs` (`tokens`, `token_logprobs`, `top_logprobs`), every token
/// named `token_id:<id>`.
fn scored_tokens(logprobs: &Value) -> Result<Vec<UpstreamToken>, UpstreamError> {
    let bad = |what: &str| UpstreamError::Protocol(format!("logprobs with {what}"));
    let Some(names) = logprobs["tokens"].as_array() else {
        return Err(bad("no 'tokens' list"));
    };
    let logprob_at = |index: usize| {
        logprobs["token_logprobs"]
            .get(index)
            .and_then(Value::as_f64)
    };
    names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let id = name
                .as_str()
                .and_then(token_id)
                .ok_or_else(|| bad("a token not named token_id:<id>"))?;
            let mut top = Vec::new();
            if let Some(entries) = logprobs["top_logprobs"]
                .get(index)
                .and_then(Value::as_object)
            {
                for (name, logprob) in entries {
                    let id = token_id(name)
                        .ok_or_else(|| bad("an alternative not named token_id:<id>"))?;
                    let logprob = logprob
                        .as_f64()
                        .ok_or_else(|| bad("an alternative without a logprob"))?;
                    top.push((id, logprob as f32));
                }
            }
            // Most likely first, ties by the lower id, as the engine ranks them.
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            Ok(UpstreamToken {
                id,
                logprob: logprob_at(index).map(|logprob| logprob as f32),
                top,
            })
        })
        .collect()
}

/// The id in `token_id:<id>`.
fn token_id(name: &str) -> Option<i32> {
    name.strip_prefix("token_id:")?.parse().ok()
}

/// One entry of a chunk's `delta.tool_calls`.
fn upstream_call(value: &Value) -> Result<UpstreamCall, UpstreamError> {
    let index = value["index"]
        .as_u64()
        .and_then(|index| usize::try_from(index).ok())
        .ok_or_else(|| UpstreamError::Protocol("a tool call without its index".into()))?;
    let text = |value: &Value| value.as_str().map(str::to_string);
    Ok(UpstreamCall {
        index,
        id: text(&value["id"]),
        name: text(&value["function"]["name"]),
        arguments: text(&value["function"]["arguments"]).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_parts_parse() {
        let first = parse_event(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(
            first.calls,
            [UpstreamCall {
                index: 0,
                id: Some("call_1".into()),
                name: Some("get_weather".into()),
                arguments: String::new(),
            }]
        );
        let more = parse_event(
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\""}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(more.calls[0].arguments, "{\"city\"");
        assert_eq!(more.calls[0].name, None);
    }

    #[test]
    fn chat_and_completion_chunks_parse() {
        let chat = parse_event(
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(chat.text, "Hi");
        assert_eq!(chat.finish_reason, None);
        let text =
            parse_event(r#"{"choices":[{"text":" there","finish_reason":"length"}]}"#).unwrap();
        assert_eq!(text.text, " there");
        assert_eq!(text.finish_reason.as_deref(), Some("length"));
        let usage =
            parse_event(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#)
                .unwrap();
        assert_eq!(
            usage.usage,
            Some(UpstreamUsage {
                prompt_tokens: 7,
                completion_tokens: 3
            })
        );
    }

    #[test]
    fn scored_tokens_are_read_by_id() {
        let chunk = parse_event(
            r#"{"choices":[{"text":"ab","finish_reason":null,"logprobs":{"tokens":["token_id:5","token_id:9"],"token_logprobs":[null,-0.5],"top_logprobs":[null,{"token_id:3":-1.5,"token_id:9":-0.5}],"text_offset":[0,1]}}]}"#,
        )
        .unwrap();
        assert_eq!(
            chunk.tokens,
            [
                UpstreamToken {
                    id: 5,
                    logprob: None,
                    top: Vec::new()
                },
                UpstreamToken {
                    id: 9,
                    logprob: Some(-0.5),
                    top: vec![(9, -0.5), (3, -1.5)]
                },
            ]
        );
        // Tokens named by their text cannot be checked against a draft's ids.
        let by_text = parse_event(
            r#"{"choices":[{"text":"a","logprobs":{"tokens":["a"],"token_logprobs":[-0.1],"top_logprobs":[{"a":-0.1}]}}]}"#,
        );
        assert!(
            matches!(by_text, Err(UpstreamError::Protocol(_))),
            "{by_text:?}"
        );
    }

    #[test]
    fn an_error_in_the_stream_is_an_error() {
        let error =
            parse_event(r#"{"error":{"message":"overloaded","type":"server_error"}}"#).unwrap_err();
        assert!(error.to_string().contains("overloaded"), "{error}");
        assert!(parse_event("not json").is_err());
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(
            error_message(br#"{"error":{"message":"bad key"}}"#),
            "bad key"
        );
        assert_eq!(error_message(b"plain text"), "plain text");
    }
}
