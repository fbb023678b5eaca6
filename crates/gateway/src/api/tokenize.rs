//! `POST /tokenize` and `POST /detokenize` in vLLM's shape: a fleet model's
//! own token ids for a prompt or a chat, and the text of token ids.
//!
//! A prompt is validated and rendered exactly as a completion's is (the same
//! checks in `validate`, the same chat template and tokenizer call in
//! `generate`), so a chat's `count` is the `usage.prompt_tokens` a chat
//! completion of the same messages reports. `auto` counts with the edge
//! model that may answer it; a `cloud/...` model is tokenized by its
//! upstream, which the gateway cannot speak for, so it is refused.
//!
//! Both are bounded like a completion: the body by `REQUEST_BODY_BYTES_MAX`,
//! a chat by `CHAT_MESSAGES_MAX`, a prompt and a token list by the model's
//! context (`max_model_len`). Token ids are checked against the vocabulary
//! before they reach the tokenizer.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use super::generate::{self, Rendering};
use super::validate::{self, Endpoint, ModelChoice, RouteTarget, WireRequest};
use super::{admission, authenticate, route, AppState};
use crate::served::ServedModel;

/// A `/tokenize` body: `prompt` (a text) or `messages` (a chat).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    model: Option<String>,
    prompt: Option<String>,
    /// Checked exactly as a chat completion's `messages`.
    messages: Option<Value>,
    /// A chat only: the tools on offer, rendered as a chat completion renders them.
    tools: Option<Value>,
    /// A chat only: open the assistant's turn after the messages (default).
    add_generation_prompt: Option<bool>,
    /// Add the model's BOS/EOS tokens: by default for a text prompt, not
    /// for a chat, whose template writes its own.
    add_special_tokens: Option<bool>,
}

/// A `/detokenize` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    model: Option<String>,
    /// Wider than a token id, so that an id out of range is answered as
    /// outside the vocabulary rather than as unreadable JSON.
    tokens: Option<Vec<i64>>,
}

pub(super) async fn tokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_tokenize(&state, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn detokenize(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_detokenize(&state, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run_tokenize(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = authenticate(state, headers).await?;
    // The tokenizer's work is bounded like a generation's: it holds slots.
    let _slot = admission::admit(state, &tenant)?;
    let body: TokenizeBody = parse(&generate::read_body(body).await?)?;
    let (wire, TokenizeRendering { rendering, param }) = body.into_wire()?;
    let request = validate::request(wire, |requested| fleet_choice(state, requested))?;
    let (tokens, _) = generate::tokenize_as(&request.model, request.prompt, rendering).await?;
    let max_model_len = request.model.context_tokens;
    if tokens.len() > max_model_len as usize {
        return Err(ApiError::invalid(
            format!(
                "this model's maximum context length is {max_model_len} tokens, but the {param} has {} tokens",
                tokens.len()
            ),
            Some(param),
            "context_length_exceeded",
        ));
    }
    Ok(Json(serde_json::json!({
        "count": tokens.len(),
        "max_model_len": max_model_len,
        "tokens": tokens,
    }))
    .into_response())
}

async fn run_detokenize(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let tenant = authenticate(state, headers).await?;
    let _slot = admission::admit(state, &tenant)?;
    let body: DetokenizeBody = parse(&generate::read_body(body).await?)?;
    let requested = body.model.ok_or_else(|| missing("model"))?;
    let model = fleet_choice(state, &requested)?.model;
    let tokens = checked_tokens(&model, body.tokens.ok_or_else(|| missing("tokens"))?)?;
    let joined = tokio::task::spawn_blocking(move || model.tokenizer.detokenize(&tokens)).await;
    match joined {
        Ok(prompt) => Ok(Json(serde_json::json!({ "prompt": prompt })).into_response()),
        Err(error) => {
            tracing::error!(%error, "detokenizer task");
            Err(ApiError::internal())
        }
    }
}

/// How a `/tokenize` body's prompt is rendered, and the parameter that
/// holds it.
struct TokenizeRendering {
    rendering: Rendering,
    param: &'static str,
}

impl TokenizeBody {
    /// The body as the completion it would be, for `validate`, and how its
    /// prompt is rendered.
    fn into_wire(self) -> Result<(WireRequest, TokenizeRendering), ApiError> {
        let model = Value::from(self.model);
        match (self.prompt, self.messages) {
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "give 'prompt' or 'messages', not both",
                Some("messages"),
                "invalid_value",
            )),
            (None, None) => Err(ApiError::invalid(
                "'prompt' or 'messages' is a required property",
                Some("prompt"),
                "missing_required_parameter",
            )),
            (Some(prompt), None) => {
                for (given, param) in [
                    (
                        self.add_generation_prompt.is_some(),
                        "add_generation_prompt",
                    ),
                    (self.tools.is_some(), "tools"),
                ] {
                    if given {
                        return Err(ApiError::invalid(
                            format!("'{param}' applies to 'messages' only"),
                            Some(param),
                            "invalid_value",
                        ));
                    }
                }
                let wire = as_completion(
                    serde_json::json!({ "model": model, "prompt": prompt }),
                    Endpoint::Completion,
                )?;
                let rendering = Rendering {
                    add_generation_prompt: false,
                    add_special_tokens: self.add_special_tokens.unwrap_or(true),
                };
                Ok((
                    wire,
                    TokenizeRendering {
                        rendering,
                        param: "prompt",
                    },
                ))
            }
            (None, Some(messages)) => {
                let wire = as_completion(
                    serde_json::json!({ "model": model, "messages": messages, "tools": self.tools }),
                    Endpoint::Chat,
                )?;
                let rendering = Rendering {
                    add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
                    add_special_tokens: self.add_special_tokens.unwrap_or(false),
                };
                Ok((
                    wire,
                    TokenizeRendering {
                        rendering,
                        param: "messages",
                    },
                ))
            }
        }
    }
}

/// The model a name resolves to, if the gateway holds its tokenizer: a
/// fleet model, or the edge model of `auto`.
fn fleet_choice(state: &AppState, requested: &str) -> Result<ModelChoice, ApiError> {
    let choice = route::resolve(state, requested)?;
    if choice.route == Some(RouteTarget::Cloud) {
        return Err(ApiError::invalid(
            format!(
                "tokenization is only available for fleet models; '{requested}' is served by the cloud"
            ),
            Some("model"),
            "invalid_value",
        ));
    }
    Ok(choice)
}

/// `tokens` as ids of `model`'s vocabulary, no more than its context holds.
fn checked_tokens(model: &ServedModel, tokens: Vec<i64>) -> Result<Vec<i32>, ApiError> {
    let max_model_len = model.context_tokens;
    if tokens.len() > max_model_len as usize {
        return Err(ApiError::invalid(
            format!(
                "'tokens' has {} entries; this model's maximum context length is {max_model_len} tokens",
                tokens.len()
            ),
            Some("tokens"),
            "context_length_exceeded",
        ));
    }
    let vocab_size = model.tokenizer.vocab_size();
    tokens
        .iter()
        .enumerate()
        .map(|(index, &token)| {
            i32::try_from(token)
                .ok()
                .filter(|&id| model.tokenizer.is_valid(id))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!(
                            "tokens[{index}] is {token}, outside the vocabulary of {vocab_size} tokens (0 to {})",
                            vocab_size.saturating_sub(1)
                        ),
                        Some("tokens"),
                        "invalid_value",
                    )
                })
        })
        .collect()
}

fn missing(param: &str) -> ApiError {
    ApiError::invalid(
        format!("'{param}' is a required property"),
        Some(param),
        "missing_required_parameter",
    )
}

/// Parses a body as `validate` does; a field these endpoints do not take
/// is a 400 naming it.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    validate::parse_json(body).map_err(|error| match unknown_field(&error.message) {
        Some(field) => ApiError::invalid(
            format!("unrecognized request argument supplied: {field}"),
            Some(field),
            "unknown_parameter",
        ),
        None => error,
    })
}

/// The field serde names in its `deny_unknown_fields` error.
fn unknown_field(message: &str) -> Option<&str> {
    const MARK: &str = "unknown field `";
    let start = message.find(MARK)? + MARK.len();
    message[start..].split('`').next()
}

/// The prompt's part of a body as the body of a completion at `endpoint`,
/// parsed as that endpoint parses its bodies: a chat's messages pass the
/// very checks a chat completion's do.
fn as_completion(body: Value, endpoint: Endpoint) -> Result<WireRequest, ApiError> {
    let bytes = serde_json::to_vec(&body).map_err(|error| {
        tracing::error!(%error, "serialize a tokenize body");
        ApiError::internal()
    })?;
    WireRequest::parse(&bytes, endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_field_is_named_from_serdes_error() {
        let error = parse::<DetokenizeBody>(br#"{"model": "m", "tokens": [], "skip": true}"#)
            .err()
            .expect("refused");
        assert_eq!(error.param.as_deref(), Some("skip"));
        assert_eq!(error.code, Some("unknown_parameter"));
        let error = parse::<DetokenizeBody>(br#"{"model": 3}"#)
            .err()
            .expect("refused");
        assert_eq!(error.param, None);
        assert_eq!(error.code, Some("invalid_json"));
    }
}
