//! Request validation: wire bodies in, `ValidatedRequest` out, or an
//! OpenAI-shaped 400 naming the offending parameter.
//!
//! A body is parsed once (`WireRequest::parse`); `ValidatedRequest` can only
//! be built here, so every request that reaches the core has passed every
//! check. It keeps the model the client named apart from what serves it: the
//! fleet model, and for `auto` or `cloud/<model>` the routing target.

use std::sync::Arc;

use super::error::ApiError;
use super::fields;
use super::tools::{self, ToolMessage, Tools};
use super::types::{
    ChatCompletionRequest, CompletionRequest, MessageContent, PromptField, SamplingFields,
    StopField,
};
use crate::limits;
use crate::sampling::Sampling;
use crate::served::{ServedModel, ServedModels};

/// Roles a chat message may have.
const CHAT_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

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
        let value: serde_json::Value = parse_json(body)?;
        let serde_json::Value::Object(object) = &value else {
            return Err(ApiError::invalid(
                "the request body must be a JSON object",
                None,
                "invalid_json",
            ));
        };
        fields::check(object, endpoint)?;
        Ok(match endpoint {
            Endpoint::Chat => WireRequest::Chat(from_value(value)?),
            Endpoint::Completion => WireRequest::Completion(from_value(value)?),
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
    /// A chat with tools on offer or tool calls in it: rendered by the model's Jinja template.
    Conversation {
        messages: Vec<ToolMessage>,
        tools: Option<Arc<Tools>>,
    },
    Text(String),
    /// A completion's prompt given as token ids of the fleet model, checked against its
    /// vocabulary; its text (for `echo`) is their detokenization.
    Tokens(Vec<i32>),
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
    /// `logit_bias` holds token ids of the served model's vocabulary (for `cloud/<model>`,
    /// of the cloud model's, which its upstream checks).
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Run to `max_tokens` (or a stop sequence) past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Structured output: the grammar a fleet answer follows (`engine::json_schema_grammar`),
    /// already compiled once for the served model's vocabulary.
    pub grammar: Option<String>,
    /// The client's `response_format` when it asks for structure, as sent, for the cloud.
    pub response_format: Option<serde_json::Value>,
    /// The tools on offer, when the request has any.
    pub tools: Option<Arc<Tools>>,
    /// How many choices the answer has (`n`).
    pub choices: u32,
    /// How many generations run for them: `best_of` (at least `n`), else `n`. Each is its own
    /// generation with its own seed ([`choice_seed`]), placed, moved and billed on its own.
    pub generations: u32,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    pub top_logprobs: u32,
    pub echo: bool,
    /// vLLM's `return_tokens_as_token_ids`: logprobs name tokens `token_id:<id>`.
    pub token_ids: bool,
    /// How `auto` answers: routed between the tiers, or the exact speculative cascade.
    pub quality: Quality,
    /// OpenAI's predicted outputs: what the client expects most of the answer to be. A fleet
    /// answer's engine may check it in one prefill instead of decoding it; the answer is the
    /// one without it (`engine::Generation::draft`).
    pub prediction: Option<Prediction>,
    _private: (),
}

/// `prediction`'s content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// Text, tokenized as the answer's text is (no special tokens).
    Text(String),
    /// Token ids of the served model's vocabulary (`/v1/completions` only, as its `prompt`).
    Tokens(Vec<i32>),
}

/// `quality`, fleetgrid's extension for `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quality {
    /// The router decides which tier answers (the default).
    Routed,
    /// The cloud model's own answer, drafted on the fleet and checked by the cloud
    /// (`route_exact`).
    Exact,
}

impl ValidatedRequest {
    /// Whether the answer starts with the prompt's scores: a completion asking for `echo` and
    /// `logprobs` (the prompt's log-probabilities, as for an evaluation's loglikelihood).
    pub fn scores_prompt(&self) -> bool {
        self.echo && self.logprobs
    }

    /// How a vehicle samples this request's answer, with `seed` (the client's, or one drawn
    /// for it).
    pub fn vehicle_sampling(&self, seed: u64) -> proto::Sampling {
        let sampling = &self.sampling;
        proto::Sampling {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed,
            ignore_eos: self.ignore_eos,
            min_p: sampling.min_p,
            presence_penalty: sampling.presence_penalty,
            frequency_penalty: sampling.frequency_penalty,
            repetition_penalty: sampling.repetition_penalty,
            logit_bias: sampling
                .logit_bias
                .iter()
                .map(|&(token, bias)| proto::LogitBias { token, bias })
                .collect(),
            grammar: self.grammar.clone().unwrap_or_default(),
        }
    }
}

/// The seed of choice `index` of a request whose seed is `seed`: the request's own for the
/// first, then a stream of seeds mixed from it (SplitMix64), the same on every gateway.
pub fn choice_seed(seed: u64, index: u32) -> u64 {
    if index == 0 {
        return seed;
    }
    let mut mixed = seed.wrapping_add(u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mixed ^ (mixed >> 31)
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_value")
}

/// Reads a checked body into its wire type, turning type errors into a 400.
fn from_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|error| {
        ApiError::invalid(
            format!("we could not parse the JSON body of your request: {error}"),
            None,
            "invalid_json",
        )
    })
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
    mut request: ChatCompletionRequest,
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
    let mut conversation = Vec::with_capacity(messages.len());
    for (index, message) in messages.into_iter().enumerate() {
        conversation.push(chat_message(message, index)?);
    }
    let tools = tools::check(
        request.sampling.tools.take(),
        request.sampling.tool_choice.take(),
        request.sampling.parallel_tool_calls.take(),
    )?
    .map(Arc::new);
    let with_tools = tools.is_some()
        || conversation
            .iter()
            .any(|message| !message.calls.is_empty() || message.call_id.is_some());
    let prompt = if with_tools {
        PromptSource::Conversation {
            messages: conversation,
            tools: tools.clone(),
        }
    } else {
        PromptSource::Chat(
            conversation
                .into_iter()
                .map(|message| engine::ChatMessage {
                    role: message.role,
                    content: message.content.unwrap_or_default(),
                })
                .collect(),
        )
    };
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
    let mut validated = finish(
        Endpoint::Chat,
        model,
        prompt,
        request.sampling,
        logprobs,
        top_logprobs,
        false,
    )?;
    if let Some(tools) = tools {
        tool_grammar(&mut validated, tools)?;
    }
    routed_choices(&validated)?;
    Ok(validated)
}

/// One chat message: its role, its text, and an assistant's calls or the call a `tool`
/// message answers.
fn chat_message(message: super::types::ChatMessage, index: usize) -> Result<ToolMessage, ApiError> {
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
    let calls = message.tool_calls.unwrap_or_default();
    if !calls.is_empty() && role != "assistant" {
        return Err(invalid(
            "only an assistant message has 'tool_calls'",
            &format!("messages[{index}].tool_calls"),
        ));
    }
    let calls = calls
        .iter()
        .enumerate()
        .map(|(call, value)| tool_call(value, index, call))
        .collect::<Result<Vec<_>, _>>()?;
    let call_id = match (role.as_str(), message.tool_call_id) {
        ("tool", Some(id)) => Some(id),
        ("tool", None) => {
            return Err(ApiError::invalid(
                "a 'tool' message needs the 'tool_call_id' it answers",
                Some(&format!("messages[{index}].tool_call_id")),
                "missing_required_parameter",
            ))
        }
        (_, Some(_)) => {
            return Err(invalid(
                "only a 'tool' message has a 'tool_call_id'",
                &format!("messages[{index}].tool_call_id"),
            ))
        }
        (_, None) => None,
    };
    // An assistant message that calls tools may have no content.
    let content = match message.content {
        None if !calls.is_empty() => None,
        content => Some(content_text(content, index)?),
    };
    let role = if role == "developer" {
        "system".to_string()
    } else {
        role
    };
    Ok(ToolMessage {
        role,
        content,
        calls,
        call_id,
    })
}

/// One call of an assistant message sent back: `{"id", "type": "function", "function":
/// {"name", "arguments"}}`.
fn tool_call(
    value: &serde_json::Value,
    message: usize,
    index: usize,
) -> Result<(String, String, String), ApiError> {
    let param = format!("messages[{message}].tool_calls[{index}]");
    let text = |key: &str| value.get(key).and_then(serde_json::Value::as_str);
    let function = value.get("function");
    let field = |key: &str| {
        function
            .and_then(|function| function.get(key))
            .and_then(serde_json::Value::as_str)
    };
    match (text("id"), text("type"), field("name"), field("arguments")) {
        (Some(id), Some("function"), Some(name), Some(arguments)) => {
            Ok((id.to_string(), name.to_string(), arguments.to_string()))
        }
        _ => Err(invalid(
            r#"a tool call must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}"#,
            &param,
        )),
    }
}

/// A request that offers tools: the grammar its answer follows, for the fleet model's format.
fn tool_grammar(request: &mut ValidatedRequest, tools: Arc<Tools>) -> Result<(), ApiError> {
    if tools.callable() {
        if request.grammar.is_some() {
            return Err(unsupported(
                "'response_format' together with callable 'tools' is not supported: send 'tool_choice': 'none' for a structured answer",
                "response_format",
            ));
        }
        if request.ignore_eos {
            return Err(invalid(
                "'ignore_eos' cannot be used with callable 'tools': a call ends where its structure does",
                "ignore_eos",
            ));
        }
    }
    // The fleet model's grammar: a named fleet model's, or the edge model's under `auto`; a
    // cloud model follows its tools itself.
    if request.route != Some(RouteTarget::Cloud) {
        let format = request
            .model
            .tokenizer
            .jinja_template()
            .map_err(|reason| {
                unsupported(
                    format!("this model cannot render a conversation with tools: {reason}"),
                    "tools",
                )
            })?
            .tool_call_format();
        if let Some(grammar) = tools.grammar(format) {
            request.model.check_grammar(&grammar).map_err(|error| {
                invalid(
                    format!("the tools' 'parameters' cannot be followed: {error}"),
                    "tools",
                )
            })?;
            request.grammar = Some(grammar);
        }
    }
    request.tools = Some(tools);
    Ok(())
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
        Some(PromptField::One(text)) => PromptSource::Text(text),
        Some(PromptField::Many(mut texts)) if texts.len() == 1 => {
            PromptSource::Text(texts.remove(0))
        }
        Some(PromptField::Tokens(ids)) => token_prompt(&model.choice.model, &ids)?,
        Some(PromptField::ManyTokens(lists)) if lists.len() == 1 => {
            token_prompt(&model.choice.model, &lists[0])?
        }
        Some(PromptField::Many(_) | PromptField::ManyTokens(_)) => {
            return Err(invalid(
                "only one prompt per request is supported",
                "prompt",
            ))
        }
    };
    if matches!(&prompt, PromptSource::Text(text) if text.is_empty())
        || matches!(&prompt, PromptSource::Tokens(ids) if ids.is_empty())
    {
        return Err(invalid("'prompt' must not be empty", "prompt"));
    }
    if request
        .suffix
        .as_deref()
        .is_some_and(|suffix| !suffix.is_empty())
    {
        return Err(unsupported(
            "'suffix' (insertion) is not supported by the fleet's models",
            "suffix",
        ));
    }
    let best_of = choice_count(request.best_of, "best_of")?;
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
    let echo = request.echo.unwrap_or(false);
    let mut validated = finish(
        Endpoint::Completion,
        model,
        prompt,
        request.sampling,
        top_logprobs.is_some(),
        top_logprobs.unwrap_or(0),
        echo,
    )?;
    if let Some(best_of) = best_of {
        if best_of < validated.choices {
            return Err(invalid(
                format!(
                    "'best_of' ({best_of}) must be at least 'n' ({})",
                    validated.choices
                ),
                "best_of",
            ));
        }
        if best_of > validated.choices && validated.stream {
            return Err(invalid(
                "'best_of' above 'n' cannot be streamed: the best are known only at the end",
                "best_of",
            ));
        }
        validated.generations = best_of;
    }
    routed_choices(&validated)?;
    Ok(validated)
}

/// `n` or `best_of`: from 1 to [`limits::CHOICES_MAX`].
fn choice_count(value: Option<i64>, param: &str) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(count) => u32::try_from(count)
            .ok()
            .filter(|count| (1..=limits::CHOICES_MAX).contains(count))
            .map(Some)
            .ok_or_else(|| {
                invalid(
                    format!(
                        "'{param}' is {count}; it must be between 1 and {}",
                        limits::CHOICES_MAX
                    ),
                    param,
                )
            }),
    }
}

/// `n` (and `best_of`) above 1 are answered by the fleet: a routed answer is one generation.
fn routed_choices(request: &ValidatedRequest) -> Result<(), ApiError> {
    if request.route.is_some() && request.generations > 1 {
        return Err(unsupported(
            "'n' and 'best_of' above 1 are served by fleet models, not by 'auto' or 'cloud/...'",
            if request.choices > 1 { "n" } else { "best_of" },
        ));
    }
    Ok(())
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
    let choices = choice_count(sampling.n, "n")?.unwrap_or(1);
    let presence_penalty = range(
        sampling.presence_penalty,
        0.0,
        -2.0,
        2.0,
        "presence_penalty",
        true,
    )?;
    let frequency_penalty = range(
        sampling.frequency_penalty,
        0.0,
        -2.0,
        2.0,
        "frequency_penalty",
        true,
    )?;
    let repetition_penalty = range(
        sampling.repetition_penalty,
        1.0,
        0.0,
        limits::REPETITION_PENALTY_MAX,
        "repetition_penalty",
        false,
    )?;
    let min_p = range(sampling.min_p, 0.0, 0.0, 1.0, "min_p", true)?;
    let ignore_eos = sampling.ignore_eos.unwrap_or(false);
    let (grammar, response_format) =
        structured_output(sampling.response_format, &model.choice, ignore_eos)?;
    let logit_bias = logit_bias(sampling.logit_bias, &model.choice)?;
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
    let token_ids = sampling.return_tokens_as_token_ids.unwrap_or(false);
    if token_ids && !logprobs {
        return Err(invalid(
            "'return_tokens_as_token_ids' names the tokens of 'logprobs'; ask for logprobs too",
            "return_tokens_as_token_ids",
        ));
    }
    let prediction = prediction(sampling.prediction, endpoint, &model.choice)?;
    if prediction.is_some() && echo && logprobs {
        return Err(unsupported(
            "'prediction' cannot be combined with 'echo' and 'logprobs': the prompt's scores and the prediction's check are both one prefill",
            "prediction",
        ));
    }
    let quality = match sampling.quality.as_deref() {
        None | Some("routed") => Quality::Routed,
        Some("exact") if model.choice.route == Some(RouteTarget::Auto) => Quality::Exact,
        Some("exact") => {
            return Err(invalid(
                format!(
                    "'quality': \"exact\" is a mode of the model 'auto', not of '{}'",
                    model.requested
                ),
                "quality",
            ))
        }
        Some(other) => {
            return Err(invalid(
                format!("'quality' must be \"routed\" or \"exact\", got {other:?}"),
                "quality",
            ))
        }
    };
    Ok(ValidatedRequest {
        endpoint,
        requested_model: model.requested,
        model: model.choice.model,
        route: model.choice.route,
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
            min_p,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
        },
        seed: sampling.seed.map(|seed| seed as u64),
        stop,
        ignore_eos,
        grammar,
        response_format,
        tools: None,
        choices,
        generations: choices,
        stream,
        include_usage,
        logprobs,
        top_logprobs,
        echo,
        token_ids,
        quality,
        prediction,
        _private: (),
    })
}

/// `prediction`: `{"type": "content", "content": ...}` with text, an array of text parts, or
/// (on `/v1/completions`, as its `prompt`) token ids; for the fleet's models only.
fn prediction(
    value: Option<serde_json::Value>,
    endpoint: Endpoint,
    model: &ModelChoice,
) -> Result<Option<Prediction>, ApiError> {
    let Some(value) = value.filter(|value| !value.is_null()) else {
        return Ok(None);
    };
    if model.route.is_some() {
        return Err(unsupported(
            "'prediction' is available with the fleet's models, not with 'auto' or 'cloud/...'",
            "prediction",
        ));
    }
    let shape = || {
        invalid(
            "'prediction' must be {\"type\": \"content\", \"content\": ...} with text, text parts or (completions) token ids",
            "prediction",
        )
    };
    let serde_json::Value::Object(fields) = value else {
        return Err(shape());
    };
    if fields.get("type").and_then(serde_json::Value::as_str) != Some("content")
        || fields.keys().any(|key| key != "type" && key != "content")
    {
        return Err(shape());
    }
    match fields.get("content") {
        Some(serde_json::Value::String(text)) => Ok(Some(Prediction::Text(text.clone()))),
        Some(serde_json::Value::Array(items)) if items.iter().all(serde_json::Value::is_object) => {
            let mut text = String::new();
            for part in items {
                match (
                    part.get("type").and_then(serde_json::Value::as_str),
                    part.get("text"),
                ) {
                    (Some("text"), Some(serde_json::Value::String(piece))) => text.push_str(piece),
                    _ => return Err(shape()),
                }
            }
            Ok(Some(Prediction::Text(text)))
        }
        Some(serde_json::Value::Array(items)) if endpoint == Endpoint::Completion => {
            let ids = items
                .iter()
                .map(|item| item.as_i64().ok_or_else(shape))
                .collect::<Result<Vec<i64>, ApiError>>()?;
            Ok(Some(Prediction::Tokens(token_ids(
                &model.model,
                &ids,
                "prediction",
            )?)))
        }
        _ => Err(shape()),
    }
}

/// 400 for a field the gateway knows and does not implement (or not with this value).
/// A prompt of token ids, each in the vocabulary of the model that serves it.
fn token_prompt(model: &ServedModel, ids: &[i64]) -> Result<PromptSource, ApiError> {
    Ok(PromptSource::Tokens(token_ids(model, ids, "prompt")?))
}

/// `ids` as tokens of `model`'s vocabulary; 400 naming `param` for one outside it.
fn token_ids(model: &ServedModel, ids: &[i64], param: &str) -> Result<Vec<i32>, ApiError> {
    let vocab_size = model.tokenizer.vocab_size();
    ids.iter()
        .map(|&id| {
            i32::try_from(id)
                .ok()
                .filter(|&token| u32::try_from(token).is_ok_and(|token| token < vocab_size))
                .ok_or_else(|| {
                    invalid(
                        format!(
                            "{param} token {id} is outside the model's vocabulary of {vocab_size}"
                        ),
                        param,
                    )
                })
        })
        .collect()
}

fn unsupported(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "unsupported_parameter")
}

/// `logit_bias`: token ids as strings to numbers in [-100, 100], at most
/// [`engine::LOGIT_BIAS_ENTRIES_MAX`], for tokens of the served model's vocabulary.
fn logit_bias(
    bias: Option<serde_json::Map<String, serde_json::Value>>,
    choice: &ModelChoice,
) -> Result<Vec<(i32, f32)>, ApiError> {
    let Some(bias) = bias.filter(|bias| !bias.is_empty()) else {
        return Ok(Vec::new());
    };
    const PARAM: &str = "logit_bias";
    if bias.len() > engine::LOGIT_BIAS_ENTRIES_MAX {
        return Err(invalid(
            format!(
                "'logit_bias' has {} entries; the limit is {}",
                bias.len(),
                engine::LOGIT_BIAS_ENTRIES_MAX
            ),
            PARAM,
        ));
    }
    if choice.route == Some(RouteTarget::Auto) {
        return Err(unsupported(
            "'logit_bias' names token ids of one model's vocabulary, and an 'auto' answer may come from either model; name the model",
            PARAM,
        ));
    }
    // The fleet model's vocabulary; a cloud model's is its upstream's to check.
    let vocab_size = (choice.route.is_none()).then(|| choice.model.tokenizer.vocab_size());
    let mut entries = Vec::with_capacity(bias.len());
    for (key, value) in bias {
        let token = key
            .parse::<u32>()
            .ok()
            .filter(|&token| vocab_size.is_none_or(|size| token < size))
            .and_then(|token| i32::try_from(token).ok())
            .ok_or_else(|| {
                invalid(
                    match vocab_size {
                        Some(size) => format!(
                            "'logit_bias' key '{key}' is not a token id of this model (0 to {})",
                            size.saturating_sub(1)
                        ),
                        None => format!("'logit_bias' key '{key}' is not a token id"),
                    },
                    PARAM,
                )
            })?;
        let bias = value
            .as_f64()
            .filter(|bias| bias.abs() <= f64::from(engine::LOGIT_BIAS_MAX))
            .ok_or_else(|| {
                invalid(
                    format!("'logit_bias' for token {key} must be a number in [-100, 100]"),
                    PARAM,
                )
            })?;
        // Narrowing: the bias is within [-100, 100].
        entries.push((token, bias as f32));
    }
    entries.sort_unstable_by_key(|&(token, _)| token);
    Ok(entries)
}

/// `response_format`: plain text, or structured output. `json_object` is any JSON object;
/// `json_schema` follows its schema. The grammar is compiled for the served model here, so
/// that a schema the vehicles could not follow is refused before any work, naming what is
/// wrong. Returns the grammar and, for the cloud, the format as sent.
fn structured_output(
    format: Option<serde_json::Value>,
    choice: &ModelChoice,
    ignore_eos: bool,
) -> Result<(Option<String>, Option<serde_json::Value>), ApiError> {
    const PARAM: &str = "response_format";
    let Some(format) = format else {
        return Ok((None, None));
    };
    let schema = match format.get("type").and_then(serde_json::Value::as_str) {
        Some("text") => return Ok((None, None)),
        Some("json_object") => serde_json::json!({"type": "object"}),
        Some("json_schema") => json_schema_of(&format)?,
        _ => {
            return Err(invalid(
                "'response_format' must be an object whose 'type' is 'text', 'json_object' or 'json_schema'",
                PARAM,
            ))
        }
    };
    if let Some(extra) = format.as_object().and_then(|object| {
        object
            .keys()
            .find(|key| !["type", "json_schema"].contains(&key.as_str()))
    }) {
        return Err(invalid(
            format!("'response_format.{extra}' is not a field of a response format"),
            PARAM,
        ));
    }
    if ignore_eos {
        return Err(invalid(
            "'ignore_eos' cannot be used with structured output: the answer ends where its structure does",
            "ignore_eos",
        ));
    }
    let grammar = engine::json_schema_grammar(&schema);
    if choice.route != Some(RouteTarget::Cloud) {
        choice.model.check_grammar(&grammar).map_err(|error| {
            invalid(
                format!("the schema in 'response_format' cannot be used: {error}"),
                PARAM,
            )
        })?;
    }
    Ok((Some(grammar), Some(format)))
}

/// The schema of a `json_schema` response format: `{"name", "schema", "strict",
/// "description"}`, `name` required as OpenAI requires it; no schema means any JSON value.
fn json_schema_of(format: &serde_json::Value) -> Result<serde_json::Value, ApiError> {
    const PARAM: &str = "response_format";
    let Some(spec) = format
        .get("json_schema")
        .and_then(serde_json::Value::as_object)
    else {
        return Err(ApiError::invalid(
            "'response_format.json_schema' is required when its type is 'json_schema'",
            Some(PARAM),
            "missing_required_parameter",
        ));
    };
    if let Some(extra) = spec
        .keys()
        .find(|key| !["name", "schema", "strict", "description"].contains(&key.as_str()))
    {
        return Err(invalid(
            format!("'response_format.json_schema.{extra}' is not a field of a JSON schema format"),
            PARAM,
        ));
    }
    let named = spec
        .get("name")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|name| {
            (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
        });
    if !named {
        return Err(invalid(
            "'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'",
            PARAM,
        ));
    }
    match spec.get("schema") {
        None | Some(serde_json::Value::Null) => Ok(serde_json::json!({})),
        Some(schema @ serde_json::Value::Object(_)) => Ok(schema.clone()),
        Some(_) => Err(invalid(
            "'response_format.json_schema.schema' must be a JSON schema object",
            PARAM,
        )),
    }
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
