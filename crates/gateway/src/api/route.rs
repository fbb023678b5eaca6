//! Requests for `cloud/<model>` and `auto`: the gateway decides which tier
//! answers, runs it, and says which tier served and why.
//!
//! `fleet/<model>` (or a bare model name) never comes here. A routed request
//! is validated exactly like an edge request (its body is checked against the
//! edge model), then a driver task (`route_drive`) runs the edge generation
//! and/or the cloud call and sends `RoutedEvent`s over a bounded channel to
//! the response (`route_respond`). The driver holds the gateway permit; when
//! the client goes away the channel closes, the driver stops, and dropping
//! its guards cancels the edge generation and closes the upstream call.
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
use super::route_drive::Routing;
use super::route_respond::{self, RoutedMeta};
use super::validate::{self, Endpoint};
use super::AppState;
use crate::cloud::{CloudTier, AUTO_MODEL, CLOUD_PREFIX};
use crate::limits;
use crate::store::TenantRecord;

/// What a routed request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// `cloud/<model>`: the cloud only.
    Cloud,
    /// `auto`: the router decides.
    Auto,
}

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
}

/// What the driver tells the response, in order: `Start` once (before any
/// text), `Text` and at most one `Handoff`, then `Finished` or `Failed`.
/// A `Failed` before `Start` becomes the HTTP error itself.
#[derive(Debug)]
pub(super) enum RoutedEvent {
    Start {
        tier: Tier,
        reason: RouteReason,
        model: String,
    },
    Text(String),
    Handoff(RouteReason),
    Finished(Box<RouteSummary>),
    Failed(ApiError),
}

/// Whether a body asks for `auto` or `cloud/...`. Bodies that do not parse
/// are not routed: the edge path answers them with its own 400.
pub(super) fn is_routed(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct ModelOnly {
        model: Option<Value>,
    }
    let Ok(parsed) = serde_json::from_slice::<ModelOnly>(body) else {
        return false;
    };
    parsed
        .model
        .as_ref()
        .and_then(Value::as_str)
        .is_some_and(|name| name == AUTO_MODEL || name.starts_with(CLOUD_PREFIX))
}

/// Serves a routed request; `permit` is the gateway's slot for it.
pub(super) async fn serve(
    state: &AppState,
    tenant: TenantRecord,
    permit: RequestSlot,
    body: &[u8],
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let mut value: Value = validate::parse_json(body)?;
    let requested = value
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(cloud) = state.cloud.clone() else {
        return Err(model_not_found(
            &requested,
            "this gateway has no cloud model configured",
        ));
    };
    let target = target(&requested, &cloud)?;
    let Some(edge_model) = state.models.all().first().cloned() else {
        tracing::error!("no edge model is served");
        return Err(ApiError::internal());
    };
    // The body is checked against the edge model: the same parameters, the
    // same limits, the same errors as an edge request.
    if let Some(object) = value.as_object_mut() {
        object.insert("model".into(), Value::String(edge_model.name.clone()));
    }
    let request = match endpoint {
        Endpoint::Chat => validate::chat(from_value(value)?, &state.models)?,
        Endpoint::Completion => validate::completion(from_value(value)?, &state.models)?,
    };
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
    let public_id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        Endpoint::Completion => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    let meta = RoutedMeta::new(public_id.clone(), &request);
    let (sender, receiver) = mpsc::channel(limits::ROUTED_EVENTS_CAPACITY);
    tracing::info!(request_id = %public_id, tenant_id = tenant.id, model = %requested, "routing");
    let routing = Routing::new(
        state.clone(),
        cloud,
        tenant,
        request,
        public_id,
        sender,
        permit,
    );
    tokio::spawn(routing.run(target));
    route_respond::respond(meta, receiver).await
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
    ApiError::invalid(
        format!("the model '{requested}' does not exist: {why}; GET /v1/models lists the models served here"),
        Some("model"),
        "model_not_found",
    )
}

fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|error| {
        ApiError::invalid(
            format!("we could not parse the JSON body of your request: {error}"),
            None,
            "invalid_json",
        )
    })
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

    #[test]
    fn only_auto_and_cloud_names_are_routed() {
        assert!(is_routed(br#"{"model": "auto", "messages": []}"#));
        assert!(is_routed(br#"{"model": "cloud/big", "prompt": "x"}"#));
        assert!(!is_routed(br#"{"model": "fleet/small"}"#));
        assert!(!is_routed(br#"{"model": "small"}"#));
        assert!(!is_routed(br#"{"model": 3}"#));
        assert!(!is_routed(b"not json"));
        assert!(!is_routed(b"[1, 2]"));
    }
}
