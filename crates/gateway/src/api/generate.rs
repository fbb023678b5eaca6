//! `POST /v1/chat/completions` and `POST /v1/completions`: from a request
//! body to an admitted generation.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::Rng;

use super::error::ApiError;
use super::idempotency;
use super::respond::{self, CancelGuard, FleetAnswer, ResponseMeta, Source};
use super::validate::{self, Endpoint, PromptSource, ValidatedRequest, WireRequest};
use super::{authenticate, AppState};
use crate::billing_finish::{Finisher, KeptCompletion};
use crate::limits;
use crate::served::ServedModel;
use crate::store::TenantRecord;
use cell_api::{NewGeneration, Rejection, TenantRef};
use store::stored_completions::NewStoredCompletion;

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(&state, &headers, body, Endpoint::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run(&state, &headers, body, Endpoint::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let tenant = authenticate(state, headers).await?;
    let permit = super::admission::admit(state, &tenant)?;
    // The body is read only once the caller is known and has a slot.
    let body = read_body(body).await?;
    run_as(state, tenant, permit, headers, body, endpoint).await
}

/// Runs a request `tenant` sent (or a re-run made for it), admitted under
/// `permit`.
pub(super) async fn run_as(
    state: &AppState,
    tenant: TenantRecord,
    permit: super::admission::RequestSlot,
    headers: &HeaderMap,
    body: Bytes,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let deadline_ms = super::deadline::from_headers(headers)?;
    // The body is parsed once. `auto` and `cloud/...` are routed between
    // the fleet and the cloud; a body that does not parse is not routed:
    // the fleet path answers it with its own 400, after the idempotency
    // check as for any fleet request.
    let wire = WireRequest::parse(&body, endpoint);
    let keep = match &wire {
        Ok(wire) => super::stored::asked(wire)?,
        Err(_) => None,
    };
    let wire = match wire {
        Ok(wire) if super::route::is_routed(&wire) => {
            // A routed request is not kept for replay and has no start
            // deadline: refuse the headers rather than silently ignore what
            // they promise.
            if headers.contains_key(idempotency::HEADER) {
                return Err(ApiError::invalid(
                    "Idempotency-Key is supported for fleet models only, not for `auto` or `cloud/...`",
                    None,
                    "unsupported_header",
                ));
            }
            if deadline_ms.is_some() {
                return Err(ApiError::invalid(
                    "x-fleetgrid-deadline-ms is supported for fleet models only, not for `auto` or `cloud/...`",
                    None,
                    "unsupported_header",
                ));
            }
            if keep.is_some() {
                return Err(ApiError::invalid(
                    "'store' is supported for fleet models only, not for `auto` or `cloud/...`",
                    Some("store"),
                    "unsupported_parameter",
                ));
            }
            return super::route::serve(state, tenant, permit, wire).await;
        }
        parsed => parsed,
    };
    let idempotency = match idempotency::start(state, &tenant, headers, &body, endpoint).await? {
        idempotency::Start::Answer(response) => return Ok(response),
        idempotency::Start::Run(slot) => slot,
    };
    let request = validate::request(wire?, |requested| {
        validate::fleet_model(&state.models, requested)
    })?;
    let (prompt, prompt_text) = tokenize(&request).await?;
    let max_tokens = completion_budget(&request, prompt.len())?;
    let draft = draft(&request, max_tokens).await?;
    let public_id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        Endpoint::Completion => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    // Without a client seed the coordinator picks one, so that a generation
    // moved to another node continues exactly as it would have.
    let seed = request.seed.unwrap_or_else(|| rand::thread_rng().gen());
    if request.generations > 1 && idempotency.is_some() {
        return Err(ApiError::invalid(
            "Idempotency-Key is not supported with 'n' or 'best_of' above 1",
            None,
            "unsupported_header",
        ));
    }
    if request.generations > 1 && keep.is_some() {
        return Err(ApiError::invalid(
            "'store' is supported with 'n' = 1 only",
            Some("store"),
            "unsupported_parameter",
        ));
    }
    let mut kept =
        keep.map(|keep| kept_completion(state, &tenant, &public_id, &body, seed, keep, &request));
    // The whole request is bounded from here, however its tokens trickle in.
    let deadline = tokio::time::Instant::now() + state.request_timeout;
    let permit = Arc::new(permit);
    let mut idempotency = idempotency;
    let mut answers = Vec::with_capacity(request.generations as usize);
    for index in 0..request.generations {
        // Each choice is its own generation: its own id (the first keeps the response's), its
        // own seed, placed, moved and billed on its own.
        let id = match index {
            0 => public_id.clone(),
            _ => format!("{public_id}-{index}"),
        };
        // Refused with 402 here, before anything is queued, if the tenant
        // cannot pay for the worst case.
        let charge = (state.billing)
            .admit(&tenant, &request.model.name, prompt.len(), max_tokens, &id)
            .await?;
        let admitted = state
            .cell
            .submit(NewGeneration {
                public_id: id.clone(),
                tenant: TenantRef {
                    id: tenant.id,
                    class: tenant.class,
                },
                model: request.model.name.clone(),
                prompt: prompt.clone(),
                committed: Vec::new(),
                numerics: None,
                sampling: request.vehicle_sampling(validate::choice_seed(seed, index)),
                max_tokens,
                stop: request.stop.clone(),
                top_logprobs: if request.logprobs {
                    request.top_logprobs
                } else {
                    0
                },
                prompt_logprobs: request.scores_prompt(),
                draft: draft.clone(),
                deadline_ms,
            })
            .await
            .map_err(rejection_error)?;
        tracing::info!(request_id = %id, tenant_id = tenant.id, model = %request.model.name, "admitted");
        let guard = CancelGuard::new(
            Arc::clone(&state.cell),
            admitted.request,
            admitted.updates,
            Arc::clone(&permit),
        );
        let finisher = Finisher::new(Arc::clone(&state.billing), charge, idempotency.take())
            .keeping(kept.take());
        let fleet = FleetAnswer::new(guard, finisher, request.stop.clone(), deadline)
            .predicted(request.prediction.is_some().then(|| draft.clone()));
        answers.push(Source::Fleet(Box::new(fleet)));
    }
    let meta = ResponseMeta::new(public_id, &request, prompt_text, &prompt);
    respond::answer(meta, answers).await
}

/// What a request with `store: true` keeps: the request as it ran (with the
/// seed it ran with, so that a re-run samples the same way), its metadata
/// and what to do on a clawback; the response is added when it finished.
fn kept_completion(
    state: &AppState,
    tenant: &TenantRecord,
    public_id: &str,
    body: &[u8],
    seed: u64,
    keep: super::stored::Keep,
    request: &ValidatedRequest,
) -> KeptCompletion {
    let mut ran: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if let serde_json::Value::Object(fields) = &mut ran {
        // As a client sends it: a request's seed is a signed 64-bit integer,
        // read back as these same 64 bits.
        fields.insert("seed".into(), (seed as i64).into());
    }
    KeptCompletion {
        store: state.store.clone(),
        record: NewStoredCompletion {
            id: public_id.to_owned(),
            tenant_id: tenant.id,
            model: request.requested_model.clone(),
            created_ms: crate::core::now_ms().0,
            metadata: serde_json::Value::Object(keep.metadata).to_string(),
            request: ran.to_string(),
            response: String::new(),
            on_clawback: keep.on_clawback,
        },
    }
}

/// The whole request body, within `REQUEST_BODY_BYTES_MAX`; 408 when the
/// client took longer than the body read timeout to send it.
pub(super) async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(body, limits::REQUEST_BODY_BYTES_MAX + 1).await {
        Ok(bytes) if bytes.len() > limits::REQUEST_BODY_BYTES_MAX => Err(body_too_large()),
        Ok(bytes) => Ok(bytes),
        Err(error) if crate::http_serve::is_body_read_timeout(&error) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: "the request body was not received in time".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after_seconds: None,
        }),
        Err(error) if crate::http_serve::is_length_limit(&error) => Err(body_too_large()),
        Err(_) => Err(ApiError::invalid(
            "the request body could not be read",
            None,
            "invalid_body",
        )),
    }
}

fn body_too_large() -> ApiError {
    ApiError::invalid(
        format!(
            "the request body is larger than {} bytes",
            limits::REQUEST_BODY_BYTES_MAX
        ),
        None,
        "request_too_large",
    )
}

/// Renders (chat) and tokenizes the prompt off the async threads. Returns the
/// tokens and, for `echo`, the prompt text.
pub(super) async fn tokenize(request: &ValidatedRequest) -> Result<(Vec<i32>, String), ApiError> {
    let rendering = Rendering::generation(&request.prompt);
    tokenize_as(&request.model, request.prompt.clone(), rendering).await
}

/// The request's `prediction` as the answer's tokens would be (text without special tokens),
/// cut to `max_tokens`: no more of it could be taken. Empty without one.
async fn draft(request: &ValidatedRequest, max_tokens: u32) -> Result<Vec<i32>, ApiError> {
    let mut tokens = match &request.prediction {
        None => return Ok(Vec::new()),
        Some(validate::Prediction::Tokens(tokens)) => tokens.clone(),
        Some(validate::Prediction::Text(text)) => {
            let model = Arc::clone(&request.model);
            let text = text.clone();
            let joined =
                tokio::task::spawn_blocking(move || model.tokenizer.tokenize(&text, false)).await;
            match joined {
                Ok(Ok(tokens)) => tokens,
                Ok(Err(error)) => {
                    return Err(ApiError::invalid(
                        format!("'prediction' cannot be tokenized: {error}"),
                        Some("prediction"),
                        "invalid_value",
                    ))
                }
                Err(error) => {
                    tracing::error!(%error, "tokenizer task");
                    return Err(ApiError::internal());
                }
            }
        }
    };
    tokens.truncate(max_tokens as usize);
    Ok(tokens)
}

/// `tokenize`, rendered as `rendering` says, with `model`'s tokenizer.
pub(super) async fn tokenize_as(
    model: &Arc<ServedModel>,
    source: PromptSource,
    rendering: Rendering,
) -> Result<(Vec<i32>, String), ApiError> {
    let model = Arc::clone(model);
    let joined = tokio::task::spawn_blocking(move || {
        render_and_tokenize_as(&model.tokenizer, source, rendering)
    })
    .await;
    match joined {
        Ok(prepared) => prepared.map_err(prompt_error),
        Err(error) => {
            tracing::error!(%error, "tokenizer task");
            Err(ApiError::internal())
        }
    }
}

/// How a prompt becomes tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rendering {
    /// A chat ends with the assistant's turn open, so the model answers next.
    pub add_generation_prompt: bool,
    /// The tokenizer adds the model's BOS/EOS tokens around the text.
    pub add_special_tokens: bool,
}

impl Rendering {
    /// How a generation renders its prompt: a chat with the assistant's
    /// turn open and no special tokens added to the rendered template (it
    /// writes its own), a text prompt with the model's special tokens.
    pub(super) fn generation(source: &PromptSource) -> Rendering {
        Rendering {
            add_generation_prompt: true,
            add_special_tokens: matches!(source, PromptSource::Text(_)),
        }
    }
}

/// The prompt as `tokenizer` sees it when a generation runs it: a chat
/// rendered by its template with the assistant's turn open, then tokenized.
/// Blocks: call it off the async threads.
pub(super) fn render_and_tokenize(
    tokenizer: &engine::Tokenizer,
    source: PromptSource,
) -> Result<(Vec<i32>, String), engine::EngineError> {
    let rendering = Rendering::generation(&source);
    render_and_tokenize_as(tokenizer, source, rendering)
}

/// `render_and_tokenize`, rendered as `rendering` says. Blocks.
fn render_and_tokenize_as(
    tokenizer: &engine::Tokenizer,
    source: PromptSource,
    rendering: Rendering,
) -> Result<(Vec<i32>, String), engine::EngineError> {
    let text = match source {
        PromptSource::Chat(messages) => {
            tokenizer.apply_chat_template(&messages, rendering.add_generation_prompt)?
        }
        PromptSource::Conversation { messages, tools } => {
            let template = tokenizer
                .jinja_template()
                .map_err(engine::EngineError::ChatTemplate)?;
            let (messages, tools) = super::tools::template_input(
                &messages,
                tools.as_deref(),
                template.tool_call_format(),
            );
            template.render(&messages, tools.as_ref(), rendering.add_generation_prompt)?
        }
        PromptSource::Text(text) => text,
        PromptSource::Tokens(tokens) => {
            let text = tokenizer.detokenize(&tokens);
            return Ok((tokens, text));
        }
    };
    let tokens = tokenizer.tokenize(&text, rendering.add_special_tokens)?;
    Ok((tokens, text))
}

/// 400 for a prompt the serving model cannot render or tokenize.
pub(super) fn prompt_error(error: engine::EngineError) -> ApiError {
    tracing::warn!(%error, "render or tokenize prompt");
    ApiError::invalid(
        format!("the prompt could not be prepared: {error}"),
        Some("messages"),
        "invalid_prompt",
    )
}

/// The completion tokens this request may have, given its prompt.
pub(super) fn completion_budget(
    request: &ValidatedRequest,
    prompt_tokens: usize,
) -> Result<u32, ApiError> {
    let context = request.model.context_tokens as usize;
    let param = match request.endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    if prompt_tokens + 1 > context {
        return Err(ApiError::invalid(
            format!("this model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} tokens"),
            Some(param),
            "context_length_exceeded",
        ));
    }
    let room = context - prompt_tokens;
    match request.max_tokens {
        Some(asked) if asked as usize > room => Err(ApiError::invalid(
            format!("this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} and max_tokens asks for {asked} more"),
            Some("max_tokens"),
            "context_length_exceeded",
        )),
        Some(asked) => Ok(asked),
        None => Ok(limits::COMPLETION_TOKENS_DEFAULT.min(room as u32)),
    }
}

pub(super) fn rejection_error(rejection: Rejection) -> ApiError {
    match rejection {
        Rejection::NoEligibleNode {
            retry_after_seconds,
        } => ApiError::unavailable(
            "no vehicle that can serve this model is available right now",
            retry_after_seconds,
        ),
        Rejection::QueueFull {
            retry_after_seconds,
        } => ApiError::too_many(
            "the queue for this model is full; retry shortly",
            retry_after_seconds,
        ),
        Rejection::OverQuota {
            message,
            retry_after_seconds,
        } => ApiError::too_many(message, retry_after_seconds),
        Rejection::Other { message } => {
            ApiError::unavailable(message, limits::RETRY_AFTER_DEFAULT_SECONDS)
        }
    }
}
