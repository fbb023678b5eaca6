//! The OpenAI shapes of an answer, for fleet and routed answers alike: the
//! envelope every body and chunk repeats, the choice, the usage, the
//! `fleetgrid` field that says which tier served and why, and the headers.
//!
//! Everything here is a pure function of the response's metadata and what
//! the answer said so far, so that the shapes clients read are unit-tested
//! without a model (`respond/tests.rs`).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderName, HeaderValue};
use serde_json::{json, Value};

use super::reading::Said;
use super::AnswerUsage;
use crate::api::route::{RouteReason, RouteSummary, Tier};
use crate::api::tools::calls::{arguments_text, Delta};
use crate::api::validate::{Endpoint, ValidatedRequest};
use crate::core::CommittedToken;

/// The route reason of a request that named a fleet model.
const EXPLICIT_FLEET: &str = "explicit_fleet";

/// Which tier answers and why, as the headers and the `fleetgrid` field say it.
#[derive(Clone, Debug)]
pub(super) enum Route {
    /// The client named a fleet model.
    Fleet,
    /// `auto` or `cloud/<model>`: the tier the router started with.
    Routed { tier: Tier, reason: RouteReason },
}

impl Route {
    fn tier(&self) -> &'static str {
        match self {
            Route::Fleet => "fleet",
            Route::Routed { tier, .. } => tier.as_str(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Route::Fleet => EXPLICIT_FLEET,
            Route::Routed { reason, .. } => reason.code,
        }
    }

    fn json(&self) -> Value {
        match self {
            Route::Fleet => json!({"tier": "fleet", "reason": EXPLICIT_FLEET}),
            Route::Routed { tier, reason } => route_json(*tier, reason),
        }
    }
}

/// What every body and chunk of one response repeats.
pub struct ResponseMeta {
    pub(super) id: String,
    created: u64,
    /// The model the response names: the fleet model that serves, or for a
    /// routed request the model of the tier that started the answer.
    model: String,
    pub(super) endpoint: Endpoint,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) logprobs: bool,
    /// The prompt text, when a completion asked for `echo`.
    pub(super) echo_prompt: Option<String>,
    /// The text of the prompt's first token (which has no score), when a completion asked for
    /// `echo` with `logprobs`: the answer starts with the prompt's scores.
    pub(super) prompt_first: Option<(i32, Vec<u8>)>,
    /// vLLM's `return_tokens_as_token_ids`: logprobs name each token `token_id:<id>`.
    pub(super) token_ids: bool,
    /// How the answer writes tool calls, when the request lets the model call tools and the
    /// response reads them out of its text.
    pub(super) tool_format: Option<engine::ToolCallFormat>,
    /// How many choices the client reads (`n`); `best_of` may run more generations.
    pub(super) choices: usize,
    pub(super) route: Route,
}

impl ResponseMeta {
    /// The metadata of an answer by the request's fleet model; `prompt_text`
    /// is the rendered prompt, shown only when the request asked for `echo`, and `prompt` its
    /// tokens.
    pub fn new(
        id: String,
        request: &ValidatedRequest,
        prompt_text: String,
        prompt: &[i32],
    ) -> ResponseMeta {
        ResponseMeta {
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or_default(),
            model: request.model.name.clone(),
            endpoint: request.endpoint,
            stream: request.stream,
            include_usage: request.include_usage,
            logprobs: request.logprobs,
            echo_prompt: request.echo.then_some(prompt_text),
            prompt_first: request
                .scores_prompt()
                .then(|| {
                    prompt
                        .first()
                        .map(|&token| (token, request.model.tokenizer.piece(token)))
                })
                .flatten(),
            token_ids: request.token_ids,
            tool_format: request
                .tools
                .as_ref()
                .filter(|tools| tools.callable())
                .and_then(|_| request.model.tokenizer.jinja_template().ok())
                .map(engine::ChatTemplate::tool_call_format),
            choices: request.choices as usize,
            route: Route::Fleet,
        }
    }

    /// Whether the answer starts with the prompt's scores (`echo` with `logprobs`).
    pub(super) fn scores_prompt(&self) -> bool {
        self.prompt_first.is_some()
    }

    /// What this answer's tool call ids start with: unique per response.
    pub(super) fn call_id_stem(&self) -> String {
        let tail = self.id.rsplit('-').next().unwrap_or(&self.id);
        tail.chars().take(24).collect()
    }

    /// A routed answer started: its first tier, why, and the model named.
    /// A routed answer with tools is the work of one tier (it is never handed over): the fleet
    /// model's text is read for calls in its format, the cloud's calls come read.
    pub(super) fn start_routed(&mut self, tier: Tier, reason: RouteReason, model: String) {
        if tier == Tier::Cloud {
            self.tool_format = None;
        }
        self.route = Route::Routed { tier, reason };
        self.model = model;
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    pub(super) fn envelope(&self, streaming: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streaming),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    }
}

/// The headers of a response whose route is `route`.
pub(super) fn headers(id: &str, route: &Route) -> [(HeaderName, HeaderValue); 3] {
    [
        (
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown")),
        ),
        (
            HeaderName::from_static("x-fleetgrid-tier"),
            HeaderValue::from_static(route.tier()),
        ),
        (
            HeaderName::from_static("x-fleetgrid-route-reason"),
            HeaderValue::from_static(route.reason()),
        ),
    ]
}

/// The headers of a whole body: a routed answer names the tier it ended on.
pub(super) fn body_headers(
    meta: &ResponseMeta,
    summary: Option<&RouteSummary>,
) -> [(HeaderName, HeaderValue); 3] {
    match summary {
        Some(summary) => headers(
            &meta.id,
            &Route::Routed {
                tier: summary.tier,
                reason: summary.reason.clone(),
            },
        ),
        None => headers(&meta.id, &meta.route),
    }
}

/// One choice of a whole answer: what it said, its logprobs and why it ended.
pub(super) struct ChoiceBody<'a> {
    pub said: &'a Said,
    pub logprobs: Value,
    pub finish_reason: &'a str,
}

/// The whole (non-streaming) body: each choice, the usage of all of them, and the
/// `fleetgrid` field (a routed answer's summary, else the route).
pub(super) fn body(
    meta: &ResponseMeta,
    choices: Vec<ChoiceBody<'_>>,
    usage: &AnswerUsage,
    summary: Option<&RouteSummary>,
) -> Value {
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(index, choice)| choice_json(meta, index, choice))
        .collect();
    let mut body = meta.envelope(false, Value::Array(choices));
    body["usage"] = usage_json(usage);
    body["fleetgrid"] = match summary {
        Some(summary) => summary_json(summary),
        None => meta.route.json(),
    };
    body
}

fn choice_json(meta: &ResponseMeta, index: usize, choice: ChoiceBody<'_>) -> Value {
    let said = choice.said;
    match meta.endpoint {
        Endpoint::Chat => {
            let mut message = json!({ "role": "assistant", "content": said.content });
            if !said.calls.is_empty() {
                if said.content.is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = said
                    .calls
                    .iter()
                    .map(|call| {
                        json!({"id": call.id, "type": "function", "function": {
                            "name": call.name, "arguments": arguments_text(&call.arguments),
                        }})
                    })
                    .collect();
            }
            json!({
                "index": index,
                "message": message,
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason,
            })
        }
        Endpoint::Completion => json!({
            "index": index,
            "text": said.content,
            "logprobs": choice.logprobs,
            "finish_reason": choice.finish_reason,
        }),
    }
}

/// The chunk of a stream that carries a part of a tool call of choice `choice`, as OpenAI
/// streams calls: the call's id, type and name with empty arguments first, then its arguments
/// in pieces.
pub(super) fn call_chunk(
    meta: &ResponseMeta,
    choice: u32,
    delta: &Delta,
    logprobs: Value,
) -> Option<String> {
    let call = match delta {
        Delta::Call { index, id, name } => json!({
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }),
        Delta::Arguments { index, text } => json!({
            "index": index, "function": {"arguments": text},
        }),
        Delta::Content(_) => return None,
    };
    let choice = json!({
        "index": choice,
        "delta": {"tool_calls": [call]},
        "logprobs": logprobs,
        "finish_reason": Value::Null,
    });
    Some(meta.envelope(true, json!([choice])).to_string())
}

/// What one chunk of a stream says of choice `choice`: its text, `first` to open the
/// assistant's message, `finish` when it ends.
pub(super) struct ChunkParts<'a> {
    pub choice: u32,
    pub text: &'a str,
    pub logprobs: Value,
    pub finish: Option<&'a str>,
    pub first: bool,
}

/// One chunk of a stream; `fleetgrid` is the route the chunk announces, if any.
pub(super) fn chunk(
    meta: &ResponseMeta,
    parts: ChunkParts<'_>,
    fleetgrid: Option<Value>,
) -> String {
    let ChunkParts {
        choice: index,
        text,
        logprobs,
        finish,
        first,
    } = parts;
    let choice = match meta.endpoint {
        Endpoint::Chat => {
            let delta = match (first, finish) {
                (true, _) => json!({"role": "assistant", "content": text}),
                (false, Some(_)) if text.is_empty() => json!({}),
                _ => json!({"content": text}),
            };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
        Endpoint::Completion => {
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    };
    let mut chunk = meta.envelope(true, json!([choice]));
    if let Some(fleetgrid) = fleetgrid {
        chunk["fleetgrid"] = fleetgrid;
    }
    chunk.to_string()
}

/// The route a stream's first chunk repeats: routed answers only.
pub(super) fn opening_route(meta: &ResponseMeta) -> Option<Value> {
    match meta.route {
        Route::Fleet => None,
        Route::Routed { .. } => Some(meta.route.json()),
    }
}

/// The last chunk of a stream that asked for usage.
pub(super) fn usage_chunk(meta: &ResponseMeta, usage: &AnswerUsage) -> String {
    let mut last = meta.envelope(true, json!([]));
    last["usage"] = usage_json(usage);
    last.to_string()
}

fn usage_json(usage: &AnswerUsage) -> Value {
    let mut value = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    });
    if let Some(cached) = usage.cached_prompt_tokens {
        value["prompt_tokens_details"] = json!({ "cached_tokens": cached });
    }
    if let Some(prediction) = usage.prediction {
        value["completion_tokens_details"] = json!({
            "accepted_prediction_tokens": prediction.accepted,
            "rejected_prediction_tokens": prediction.rejected,
        });
    }
    value
}

pub(super) fn route_json(tier: Tier, reason: &RouteReason) -> Value {
    json!({ "tier": tier.as_str(), "reason": reason.code, "detail": reason.detail })
}

/// The `fleetgrid` field of a finished routed answer: tier, reason, each
/// part's usage and the charge.
pub(super) fn summary_json(summary: &RouteSummary) -> Value {
    let mut value = route_json(summary.tier, &summary.reason);
    value["cost_micro_usd"] = json!(summary.charged.0);
    value["usage"] = json!({
        "edge": summary.edge.map(|edge| json!({
            "prompt_tokens": edge.prompt_tokens,
            "completion_tokens": edge.completion_tokens,
            "discarded_tokens": edge.discarded_tokens,
        })),
        "cloud": summary.cloud.map(|cloud| json!({
            "prompt_tokens": cloud.prompt_tokens,
            "completion_tokens": cloud.completion_tokens,
            "cost_micro_usd": cloud.cost.0,
            "upstream_cost_micro_usd": cloud.upstream_cost.0,
        })),
    });
    value
}

/// How logprobs name a token: its text, or `token_id:<id>` when the client asked for ids
/// (vLLM's `return_tokens_as_token_ids`, which names tokens whose bytes are no whole text).
fn token_name(meta: &ResponseMeta, id: i32, piece: &[u8]) -> String {
    if meta.token_ids {
        return format!("token_id:{id}");
    }
    String::from_utf8_lossy(piece).into_owned()
}

/// Logprob entries of the tokens committed since the last chunk.
#[derive(Default)]
pub(super) struct LogprobEntries {
    chat: Vec<Value>,
    tokens: Vec<String>,
    /// `None` for the prompt's first token, which nothing scores.
    token_logprobs: Vec<Option<f32>>,
    top: Vec<Value>,
    text_offset: Vec<usize>,
    /// Where the next token's text starts in the choice's text, in characters; kept across
    /// [`LogprobEntries::take`].
    offset: usize,
}

impl LogprobEntries {
    /// No entries yet: the first token's text starts after an echoed prompt, unless the prompt's
    /// own scores come first.
    pub(super) fn new(meta: &ResponseMeta) -> LogprobEntries {
        let offset = match (&meta.echo_prompt, meta.scores_prompt()) {
            (Some(prompt), false) => prompt.chars().count(),
            _ => 0,
        };
        LogprobEntries {
            offset,
            ..LogprobEntries::default()
        }
    }

    /// Records the prompt's entries (a completion with `echo` and `logprobs`): its first token,
    /// unscored, then each further token's score. The completion's tokens follow the prompt.
    pub(super) fn push_prompt(&mut self, meta: &ResponseMeta, scores: &[CommittedToken]) {
        let Some((first, piece)) = meta.prompt_first.as_ref() else {
            return;
        };
        let text = String::from_utf8_lossy(piece).into_owned();
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
        self.tokens.push(token_name(meta, *first, piece));
        self.token_logprobs.push(None);
        self.top.push(Value::Null);
        for score in scores {
            self.push_completion(meta, score);
        }
        if let Some(prompt) = &meta.echo_prompt {
            self.offset = prompt.chars().count();
        }
    }

    fn push_completion(&mut self, meta: &ResponseMeta, token: &CommittedToken) {
        let top: serde_json::Map<String, Value> = token
            .top_logprobs
            .iter()
            .map(|(id, piece, logprob)| (token_name(meta, *id, piece), json!(logprob)))
            .collect();
        self.text_offset.push(self.offset);
        self.offset += String::from_utf8_lossy(&token.piece).chars().count();
        self.tokens
            .push(token_name(meta, token.token_id, &token.piece));
        self.token_logprobs.push(Some(token.logprob));
        self.top.push(Value::Object(top));
    }

    /// Records a token's logprobs in the endpoint's format; nothing at all
    /// when the client did not ask for logprobs, the common case.
    pub(super) fn push(&mut self, meta: &ResponseMeta, token: Option<&CommittedToken>) {
        let Some(token) = token.filter(|_| meta.logprobs) else {
            return;
        };
        match meta.endpoint {
            Endpoint::Chat => {
                let text = token_name(meta, token.token_id, &token.piece);
                let top: Vec<Value> = token
                    .top_logprobs
                    .iter()
                    .map(|(id, piece, logprob)| json!({"token": token_name(meta, *id, piece), "logprob": logprob, "bytes": piece}))
                    .collect();
                self.chat.push(json!({"token": text, "logprob": token.logprob, "bytes": token.piece, "top_logprobs": top}));
            }
            Endpoint::Completion => self.push_completion(meta, token),
        }
    }

    pub(super) fn take(&mut self, meta: &ResponseMeta) -> Value {
        if !meta.logprobs {
            return Value::Null;
        }
        let offset = self.offset;
        let taken = std::mem::replace(
            self,
            LogprobEntries {
                offset,
                ..LogprobEntries::default()
            },
        );
        match meta.endpoint {
            Endpoint::Chat => json!({ "content": taken.chat }),
            Endpoint::Completion => json!({
                "tokens": taken.tokens,
                "token_logprobs": taken.token_logprobs,
                "top_logprobs": taken.top,
                "text_offset": taken.text_offset,
            }),
        }
    }
}

#[cfg(test)]
impl ResponseMeta {
    /// A fleet answer's metadata for the model `small`, without a request.
    pub(super) fn bare(
        endpoint: Endpoint,
        stream: bool,
        include_usage: bool,
        logprobs: bool,
        echo_prompt: Option<String>,
    ) -> ResponseMeta {
        ResponseMeta {
            id: "cmpl-test".into(),
            created: 1_700_000_000,
            model: "small".into(),
            endpoint,
            stream,
            include_usage,
            logprobs,
            echo_prompt,
            prompt_first: None,
            token_ids: false,
            tool_format: None,
            choices: 1,
            route: Route::Fleet,
        }
    }
}
