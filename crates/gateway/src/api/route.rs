//! Requests for `cloud/<model>` and `auto`: the gateway decides which tier
//! answers, runs it, and says which tier served and why.
//!
//! `fleet/<model>` (or a bare model name) never comes here. A routed request
//! is validated exactly like a fleet request, against the edge model, while
//! keeping the name the client asked for and its routing target; its prompt
//! is rendered and tokenized once (`route_drive::RoutedPrompt`), for the
//! admission, the edge generation and a handoff alike. Then a driver task
//! (`route_drive`) runs the edge generation and/or the cloud call and sends
//! the response's `Event`s over a bounded channel to the one response path
//! (`respond`). The driver holds the gateway permit; when the client goes
//! away the channel closes, the driver stops, and dropping its guards
//! cancels the edge generation and closes the upstream call.
//!
//! **Invariant:** the client never sees edge text that is later discarded.
//! The driver releases edge text only when the router's scorer says it may;
//! an escalation discards only text that was never sent, and a handoff keeps
//! exactly the text already sent, which the cloud model then continues.

use std::sync::Arc;

use axum::response::Response;
use serde_json::Value;
use tokio::sync::mpsc;

use super::admission::RequestSlot;
use super::error::ApiError;
use super::respond::{self, ResponseMeta};
use super::route_drive::{RoutedPrompt, RoutedRequest, Routing};
use super::validate::{self, Endpoint, ModelChoice, Quality, WireRequest};
use super::AppState;
use crate::cloud::{CloudTier, AUTO_MODEL, CLOUD_PREFIX};
use crate::limits;
use crate::store::TenantRecord;

/// What a routed request asked for.
pub(super) use super::validate::RouteTarget as Target;

// The tiers, route reasons and the fleet's counts are the router's words,
// shared with its `RouteMachine`.
pub(super) use router::machine::{EdgePart, RouteReason, Tier};

/// Token counts (as the upstream reports them) and price of the cloud's part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CloudPart {
    /// What the upstream prefilled: the prompt, or after a handoff the
    /// prompt plus the answer so far (a re-prefill the tenant does not pay).
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// The tenant's charge for this part: the price sheet's upstream price
    /// plus its cloud margin, for the prompt only when the cloud answered
    /// from the start; rounded up as the ledger rounds.
    pub cost: crate::cloud::MicroUsd,
    /// What the upstream charges the platform for everything it processed.
    pub upstream_cost: crate::cloud::MicroUsd,
}

/// How a routed answer ended.
#[derive(Clone, Debug)]
pub(super) struct RouteSummary {
    pub tier: Tier,
    pub reason: RouteReason,
    pub finish_reason: &'static str,
    pub edge: Option<EdgePart>,
    pub cloud: Option<CloudPart>,
    /// What the ledger charged the tenant for the whole request.
    pub charged: crate::cloud::MicroUsd,
    /// The answer's own token counts where the parts' counts are not them: the exact
    /// cascade, whose cloud part prefilled and generated more than the answer is.
    pub answer_tokens: Option<AnswerTokens>,
}

/// A prompt's and an answer's token counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AnswerTokens {
    pub prompt: u32,
    pub completion: u32,
}

/// Whether a model name asks for `auto` or `cloud/...`.
fn is_routed_name(name: &str) -> bool {
    name == AUTO_MODEL || name.starts_with(CLOUD_PREFIX)
}

/// Whether a parsed body asks for `auto` or `cloud/...`.
pub(super) fn is_routed(wire: &WireRequest) -> bool {
    wire.model().is_some_and(is_routed_name)
}

/// Serves a routed request; `permit` is the gateway's slot for it.
pub(super) async fn serve(
    state: &AppState,
    tenant: TenantRecord,
    permit: RequestSlot,
    wire: WireRequest,
) -> Result<Response, ApiError> {
    let Some(cloud) = state.cloud.clone() else {
        return Err(model_not_found(wire.model().unwrap_or_default(), NO_CLOUD));
    };
    // The body is checked against the edge model: the same parameters, the
    // same limits, the same errors as a fleet request.
    let request = validate::request(wire, |requested| choose(state, &cloud, requested))?;
    let requested = &request.requested_model;
    if request.logprobs {
        return Err(ApiError::invalid(
            format!("'logprobs' is not available with the model '{requested}'; ask for a fleet model by name"),
            Some("logprobs"),
            "invalid_value",
        ));
    }
    if request.echo {
        return Err(ApiError::invalid(
            format!("'echo' is not available with the model '{requested}'"),
            Some("echo"),
            "invalid_value",
        ));
    }
    if matches!(request.prompt, validate::PromptSource::Tokens(_)) {
        return Err(ApiError::invalid(
            format!("a prompt of token ids is not available with the model '{requested}', whose answer may come from another model's vocabulary"),
            Some("prompt"),
            "invalid_value",
        ));
    }
    let Some(target) = request.route else {
        tracing::error!(model = %requested, "a routed request without a routing target");
        return Err(ApiError::internal());
    };
    let prompt = RoutedPrompt::prepare(&request, &cloud).await?;
    if request.quality == Quality::Exact {
        check_exact(&request, &prompt, &cloud).await?;
    }
    let public_id = match request.endpoint {
        Endpoint::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        Endpoint::Completion => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    // The model is the one the first tier names, once it starts.
    let meta = ResponseMeta::new(public_id.clone(), &request, String::new(), &[]);
    let (sender, receiver) = mpsc::channel(limits::ROUTED_EVENTS_CAPACITY);
    tracing::info!(request_id = %public_id, tenant_id = tenant.id, model = %requested, "routing");
    let routed = RoutedRequest {
        request,
        prompt,
        public_id,
    };
    let routing = Routing::new(state.clone(), cloud, tenant, routed, sender, permit);
    tokio::spawn(routing.run(target));
    respond::routed(meta, receiver).await
}

/// Refuses, by the field that asks for it, what the exact cascade cannot make the cloud
/// model's own answer: a grammar or tools (the cloud's greedy scores are unconstrained),
/// penalties (they are of the raw distribution), and a pair of models that do not share a
/// vocabulary.
async fn check_exact(
    request: &validate::ValidatedRequest,
    prompt: &RoutedPrompt,
    cloud: &Arc<CloudTier>,
) -> Result<(), ApiError> {
    let refuse =
        |why: String, param: &str| Err(ApiError::invalid(why, Some(param), "invalid_value"));
    let sampling = &request.sampling;
    let penalties = [
        ("presence_penalty", sampling.presence_penalty != 0.0),
        ("frequency_penalty", sampling.frequency_penalty != 0.0),
        ("repetition_penalty", sampling.repetition_penalty != 1.0),
    ];
    if let Some((param, _)) = penalties.iter().find(|(_, asked)| *asked) {
        return refuse(
            format!("'{param}' is not available with 'quality': \"exact\", which checks the draft against the cloud model's own scores"),
            param,
        );
    }
    if request.response_format.is_some() || request.grammar.is_some() {
        return refuse(
            "'response_format' is not available with 'quality': \"exact\"".into(),
            "response_format",
        );
    }
    if request.tools.is_some() {
        return refuse(
            "'tools' are not available with 'quality': \"exact\"".into(),
            "tools",
        );
    }
    let model = Arc::clone(&request.model);
    let tier = Arc::clone(cloud);
    let shared = tokio::task::spawn_blocking(move || tier.shares_vocabulary(&model.tokenizer))
        .await
        .unwrap_or(false);
    if !shared || prompt.cloud_ids().is_none() {
        return refuse(
            format!(
                "'quality': \"exact\" needs a cloud model that shares the fleet model's vocabulary, with its tokenizer loaded here; {} and {} do not",
                request.model.name,
                cloud.upstream.config().public_name()
            ),
            "quality",
        );
    }
    Ok(())
}

/// Why `auto` and `cloud/...` do not exist on a gateway without a cloud.
const NO_CLOUD: &str = "this gateway has no cloud model configured";

/// What any model name resolves to, for an endpoint that needs only the
/// model's tokenizer: a fleet name its model, a routed name the edge model
/// and its target; 404 for a name not served here.
pub(super) fn resolve(state: &AppState, requested: &str) -> Result<ModelChoice, ApiError> {
    if !is_routed_name(requested) {
        return validate::fleet_model(&state.models, requested);
    }
    let Some(cloud) = &state.cloud else {
        return Err(model_not_found(requested, NO_CLOUD));
    };
    choose(state, cloud, requested)
}

/// What a routed name resolves to: its target, and the edge model that
/// may serve it.
fn choose(
    state: &AppState,
    cloud: &Arc<CloudTier>,
    requested: &str,
) -> Result<ModelChoice, ApiError> {
    let target = target(requested, cloud)?;
    let Some(model) = state.models.all().first().cloned() else {
        tracing::error!("no edge model is served");
        return Err(ApiError::internal());
    };
    Ok(ModelChoice {
        model,
        route: Some(target),
    })
}

fn target(requested: &str, cloud: &Arc<CloudTier>) -> Result<Target, ApiError> {
    if requested == AUTO_MODEL {
        return Ok(Target::Auto);
    }
    let model = requested.strip_prefix(CLOUD_PREFIX).unwrap_or(requested);
    if model == cloud.upstream.config().model {
        return Ok(Target::Cloud);
    }
    Err(model_not_found(
        requested,
        &format!(
            "the cloud model here is '{}'",
            cloud.upstream.config().public_name()
        ),
    ))
}

fn model_not_found(requested: &str, why: &str) -> ApiError {
    ApiError::model_not_found(
        requested,
        &format!("{why}; GET /v1/models lists the models served here"),
    )
}

/// `/v1/models` entries for the routed names, when a cloud is configured.
pub(super) fn model_entries(state: &AppState) -> Vec<Value> {
    let Some(cloud) = &state.cloud else {
        return Vec::new();
    };
    let created = state
        .models
        .all()
        .first()
        .map_or(0, |model| model.created_unix_s);
    vec![
        serde_json::json!({
            "id": AUTO_MODEL,
            "object": "model",
            "created": created,
            "owned_by": "fleetgrid",
            "tier": "auto",
        }),
        serde_json::json!({
            "id": cloud.upstream.config().public_name(),
            "object": "model",
            "created": created,
            "owned_by": "fleetgrid",
            "tier": "cloud",
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a body is routed: a body that does not parse never is.
    fn routed(body: &[u8], endpoint: Endpoint) -> bool {
        WireRequest::parse(body, endpoint).is_ok_and(|wire| is_routed(&wire))
    }

    #[test]
    fn only_auto_and_cloud_names_are_routed() {
        assert!(routed(
            br#"{"model": "auto", "messages": []}"#,
            Endpoint::Chat
        ));
        assert!(routed(
            br#"{"model": "cloud/big", "prompt": "x"}"#,
            Endpoint::Completion
        ));
        assert!(!routed(br#"{"model": "fleet/small"}"#, Endpoint::Chat));
        assert!(!routed(br#"{"model": "small"}"#, Endpoint::Completion));
        assert!(!routed(br#"{"model": 3}"#, Endpoint::Chat));
        assert!(!routed(b"not json", Endpoint::Chat));
        assert!(!routed(b"[1, 2]", Endpoint::Completion));
    }
}
