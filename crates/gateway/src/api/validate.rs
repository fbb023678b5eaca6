//! Request validation: wire bodies in, `ValidatedRequest` out, or an
//! OpenAI-shaped 400 naming the offending parameter.
//!
//! A body is parsed once (`WireRequest::parse`); `ValidatedRequest` can only
//! be built here, so every request that reaches the core has passed every
//! check. It keeps the model the client named apart from what serves it: the
//! fleet model, and for `auto` or `cloud/<model>` the routing target.

use std::sync::Arc;

use super::error::ApiError;
use super::types::{
    ChatCompletionRequest, CompletionRequest, MessageContent, PromptField, SamplingFields,
    StopField,
};
use crate::limits;
use crate::served::{ServedModel, ServedModels};

/// Roles a chat message may have.
const CHAT_ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A routed request's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteTarget {
    /// `cloud/<model>`: the cloud only.
    Cloud,
    /// `auto`: the router decides.
    Auto,
}

/// What a model name resolves to.
pub struct ModelChoice {
    /// The fleet model that serves the request: the one named, or for a
    /// routed request the edge model the router may use.
    pub model: Arc<ServedModel>,
    /// `None` for a fleet model named by the client.
    pub route: Option<RouteTarget>,
}

/// A request body as it arrived, parsed once.
pub enum WireRequest {
    Chat(ChatCompletionRequest),
    Completion(CompletionRequest),
}

impl WireRequest {
    /// Parses the body of `endpoint`; syntax and type errors are a 400.
    pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<WireRequest, ApiError> {
        Ok(match endpoint {
            Endpoint::Chat => WireRequest::Chat(parse_json(body)?),
            Endpoint::Completion => WireRequest::Completion(parse_json(body)?),
        })
    }

    /// The model the client named, if it named one.
    pub fn model(&self) -> Option<&str> {
        match self {
            WireRequest::Chat(request) => request.model.as_deref(),
            WireRequest::Completion(request) => request.model.as_deref(),
        }
    }
}

/// Validates a parsed body; `resolve` says what the named model is, or why
/// it is not served.
pub fn request(
    wire: WireRequest,
    resolve: impl FnOnce(&str) -> Result<ModelChoice, ApiError>,
) -> Result<ValidatedRequest, ApiError> {
    match wire {
        WireRequest::Chat(request) => chat(request, resolve),
        WireRequest::Completion(request) => completion(request, resolve),
    }
}

/// What the prompt is before it is rendered and tokenized.
#[derive(Clone)]
pub enum PromptSource {
    Chat(Vec<engine::ChatMessage>),
    Text(String),
}

pub struct ValidatedRequest {
    pub endpoint: Endpoint,
    /// The model the client named, exactly as it named it.
    pub requested_model: String,
    /// The fleet model that serves it (for a routed request, the edge model).
    pub model: Arc<ServedModel>,
    /// `auto` or `cloud/<model>`; `None` for a fleet model.
    pub route: Option<RouteTarget>,
    pub prompt: PromptSource,
    /// `None` when the client gave none; capped later by the context left.
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Run to `max_tokens` (or a stop sequence) past end-of-generation tokens.
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub top_logprobs: u32,
    pub echo: bool,
    _private: (),
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_value")
}

/// Parses a JSON body, turning syntax and type errors into a 400.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; expected a JSON object",
            None,
            "invalid_json",
        ));
    }
    serde_json::from_slice(body).map_err(|error| {
        ApiError::invalid(
            format!("we could not parse the JSON body of your request: {error}"),
            None,
            "invalid_json",
        )
    })
}

fn chat(
    request: ChatCompletionRequest,
    resolve: impl FnOnce(&str) -> Result<ModelChoice, ApiError>,
) -> Result<ValidatedRequest, ApiError> {
    let model = model(request.model, resolve)?;
    let messages = request.messages.ok_or_else(|| {
        ApiError::invalid(
            "'messages' is a required property",
            Some("messages"),
            "missing_required_parameter",
        )
    })?;
    if messages.is_empty() {
        return Err(invalid(
            "'messages' must contain at least one message",
            "messages",
        ));
    }
    if messages.len() > limits::CHAT_MESSAGES_MAX {
        return Err(invalid(
            format!(
                "'messages' has {} entries; the limit is {}",
                messages.len(),
                limits::CHAT_MESSAGES_MAX
            ),
            "messages",
        ));
    }
    let mut rendered = Vec::with_capacity(messages.len());
    for (index, message) in messages.into_iter().enumerate() {
        let param = format!("messages[{index}].role");
        let role = message.role.ok_or_else(|| {
            ApiError::invalid(
                "each message needs a 'role'",
                Some(&param),
                "missing_required_parameter",
            )
        })?;
        if !CHAT_ROLES.contains(&role.as_str()) {
            return Err(invalid(
                format!("'{role}' is not one of {CHAT_ROLES:?}"),
                &param,
            ));
        }
        let content = content_text(message.content, index)?;
        let role = if role == "developer" {
            "system".to_string()
        } else {
            role
        };
        rendered.push(engine::ChatMessage { role, content });
    }
    let logprobs = match request.sampling.logprobs.as_ref() {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(flag)) => *flag,
        Some(_) => return Err(invalid("'logprobs' must be a boolean", "logprobs")),
    };
    let top_logprobs = match request.sampling.top_logprobs {
        None => 0,
        Some(count) if !(0..=i64::from(limits::TOP_LOGPROBS_MAX)).contains(&count) => {
            return Err(invalid(
                format!(
                    "'top_logprobs' must be between 0 and {}",
                    limits::TOP_LOGPROBS_MAX
                ),
                "top_logprobs",
            ))
        }
        Some(_) if !logprobs => {
            return Err(invalid(
                "'top_logprobs' needs 'logprobs' set to true",
                "top_logprobs",
            ))
        }
        Some(count) => count as u32,
    };
    finish(
        Endpoint::Chat,
        model,
        PromptSource::Chat(rendered),
        request.sampling,
        logprobs,
        top_logprobs,
        false,
    )
}

fn completion(
    request: CompletionRequest,
    resolve: impl FnOnce(&str) -> Result<ModelChoice, ApiError>,
) -> Result<ValidatedRequest, ApiError> {
    let model = model(request.model, resolve)?;
    let prompt = match request.prompt {
        None => {
            return Err(ApiError::invalid(
                "'prompt' is a required property",
                Some("prompt"),
                "missing_required_parameter",
            ))
        }
        Some(PromptField::One(text)) => text,
        Some(PromptField::Many(mut texts)) if texts.len() == 1 => texts.remove(0),
        Some(PromptField::Many(_)) => {
            return Err(invalid(
                "only one prompt per request is supported",
                "prompt",
            ))
        }
    };
    if prompt.is_empty() {
        return Err(invalid("'prompt' must not be empty", "prompt"));
    }
    if request.suffix.is_some() {
        return Err(invalid("'suffix' is not supported", "suffix"));
    }
    let top_logprobs = match request.sampling.logprobs.as_ref() {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(count) if count <= u64::from(limits::TOP_LOGPROBS_MAX) => Some(count as u32),
            _ => {
                return Err(invalid(
                    format!(
                        "'logprobs' must be an integer between 0 and {}",
                        limits::TOP_LOGPROBS_MAX
                    ),
                    "logprobs",
                ))
            }
        },
    };
    finish(
        Endpoint::Completion,
        model,
        PromptSource::Text(prompt),
        request.sampling,
        top_logprobs.is_some(),
        top_logprobs.unwrap_or(0),
        request.echo.unwrap_or(false),
    )
}

/// The named model and what it resolves to.
struct Named {
    requested: String,
    choice: ModelChoice,
}

fn model(
    requested: Option<String>,
    resolve: impl FnOnce(&str) -> Result<ModelChoice, ApiError>,
) -> Result<Named, ApiError> {
    let requested = requested.ok_or_else(|| {
        ApiError::invalid(
            "'model' is a required property",
            Some("model"),
            "missing_required_parameter",
        )
    })?;
    let choice = resolve(&requested)?;
    Ok(Named { requested, choice })
}

/// Resolves a fleet model's name (`fleet/<model>` or a bare name).
pub fn fleet_model(models: &ServedModels, requested: &str) -> Result<ModelChoice, ApiError> {
    let model = models.lookup(requested).ok_or_else(|| {
        ApiError::model_not_found(requested, "GET /v1/models lists the models served here")
    })?;
    Ok(ModelChoice { model, route: None })
}

fn content_text(content: Option<MessageContent>, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match content {
        None => Err(ApiError::invalid(
            "each message needs 'content'",
            Some(&param),
            "missing_required_parameter",
        )),
        Some(MessageContent::Text(text)) => Ok(text),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(piece)) => text.push_str(&piece),
                    (kind, _) => {
                        return Err(invalid(
                            format!(
                                "content parts of type '{kind}' are not supported; only 'text'"
                            ),
                            &param,
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

fn finish(
    endpoint: Endpoint,
    model: Named,
    prompt: PromptSource,
    sampling: SamplingFields,
    logprobs: bool,
    top_logprobs: u32,
    echo: bool,
) -> Result<ValidatedRequest, ApiError> {
    if sampling.max_tokens.is_some() && sampling.max_completion_tokens.is_some() {
        return Err(invalid(
            "give 'max_tokens' or 'max_completion_tokens', not both",
            "max_tokens",
        ));
    }
    let (max_param, max_value) = match (sampling.max_tokens, sampling.max_completion_tokens) {
        (Some(value), _) => ("max_tokens", Some(value)),
        (_, Some(value)) => ("max_completion_tokens", Some(value)),
        _ => ("max_tokens", None),
    };
    let max_tokens = match max_value {
        None => None,
        Some(value) if value < 1 => {
            return Err(invalid(
                format!("'{max_param}' must be at least 1, got {value}"),
                max_param,
            ))
        }
        Some(value) if value > i64::from(limits::COMPLETION_TOKENS_MAX) => {
            return Err(invalid(
                format!(
                    "'{max_param}' is {value}; the limit is {}",
                    limits::COMPLETION_TOKENS_MAX
                ),
                max_param,
            ))
        }
        Some(value) => Some(value as u32),
    };
    let temperature = range(sampling.temperature, 1.0, 0.0, 2.0, "temperature", true)?;
    let top_p = range(sampling.top_p, 1.0, 0.0, 1.0, "top_p", false)?;
    let top_k = match sampling.top_k {
        None => 0,
        Some(value) if !(0..=100_000).contains(&value) => {
            return Err(invalid("'top_k' must be between 0 and 100000", "top_k"))
        }
        Some(value) => value as u32,
    };
    if let Some(n) = sampling.n {
        if n != 1 {
            return Err(invalid(format!("'n' is {n}; only 1 is supported"), "n"));
        }
    }
    for (value, param) in [
        (sampling.presence_penalty, "presence_penalty"),
        (sampling.frequency_penalty, "frequency_penalty"),
    ] {
        match value {
            Some(value) if !(-2.0..=2.0).contains(&value) => {
                return Err(invalid(
                    format!("'{param}' must be between -2 and 2"),
                    param,
                ))
            }
            Some(value) if value != 0.0 => {
                return Err(invalid(
                    format!("'{param}' is not supported (only 0)"),
                    param,
                ))
            }
            _ => {}
        }
    }
    if sampling
        .tools
        .as_ref()
        .is_some_and(|tools| !tools.is_null())
    {
        return Err(invalid("'tools' is not supported", "tools"));
    }
    let stop = stop_sequences(sampling.stop)?;
    let stream = sampling.stream.unwrap_or(false);
    let include_usage = sampling
        .stream_options
        .as_ref()
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    if sampling.stream_options.is_some() && !stream {
        return Err(invalid(
            "'stream_options' is only allowed when 'stream' is true",
            "stream_options",
        ));
    }
    Ok(ValidatedRequest {
        endpoint,
        requested_model: model.requested,
        model: model.choice.model,
        route: model.choice.route,
        prompt,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed: sampling.seed.map(|seed| seed as u64),
        stop,
        ignore_eos: sampling.ignore_eos.unwrap_or(false),
        stream,
        include_usage,
        logprobs,
        top_logprobs,
        echo,
        _private: (),
    })
}

fn range(
    value: Option<f64>,
    default: f32,
    low: f64,
    high: f64,
    param: &str,
    low_inclusive: bool,
) -> Result<f32, ApiError> {
    let Some(value) = value else {
        return Ok(default);
    };
    let above_low = if low_inclusive {
        value >= low
    } else {
        value > low
    };
    if !value.is_finite() || !above_low || value > high {
        let bracket = if low_inclusive { "[" } else { "(" };
        return Err(invalid(
            format!("'{param}' is {value}; it must be in {bracket}{low}, {high}]"),
            param,
        ));
    }
    Ok(value as f32)
}

fn stop_sequences(stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(StopField::One(one)) => vec![one],
        Some(StopField::Many(many)) => many,
    };
    if stop.len() > limits::STOP_SEQUENCES_MAX {
        return Err(invalid(
            format!(
                "at most {} stop sequences are allowed",
                limits::STOP_SEQUENCES_MAX
            ),
            "stop",
        ));
    }
    if stop
        .iter()
        .any(|sequence| sequence.is_empty() || sequence.len() > limits::STOP_SEQUENCE_BYTES_MAX)
    {
        return Err(invalid(
            format!(
                "stop sequences must be 1 to {} bytes long",
                limits::STOP_SEQUENCE_BYTES_MAX
            ),
            "stop",
        ));
    }
    Ok(stop)
}
