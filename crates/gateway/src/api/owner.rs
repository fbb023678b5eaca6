//! The owner API: a vehicle owner, authenticated by an owner key, sees and
//! edits only their own vehicles.
//!
//! - `GET /owner/v1/vehicles` — the caller's vehicles, with their policies.
//! - `GET /owner/v1/vehicles/{node}/policy` — one vehicle's policy.
//! - `PUT /owner/v1/vehicles/{node}/policy` — change it (fields left out keep
//!   their value); the running scheduler applies it at once.
//!
//! [`OwnerAuth`] is the extractor every owner route starts with; [`owned`]
//! answers 404 for a vehicle that is not the caller's (or does not exist),
//! so an owner cannot tell another owner's vehicle from a missing one.
//! Owner keys and tenant keys are separate: each is refused (401) where the
//! other belongs.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::extract::ApiPath;
use super::{ApiError, AppState};
use crate::owner_policy::{self, PolicyUpdate, PolicyView};
use crate::secrets;
use crate::store::StoreError;
use crate::store_owners::{OwnerRecord, OWNER_KEY_PREFIX};

/// Largest policy body read; a policy is a few hundred bytes.
const POLICY_BODY_BYTES_MAX: usize = 16 * 1024;

/// The owner routes, to be merged into the gateway's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/owner/v1/vehicles", get(list_vehicles))
        .route(
            "/owner/v1/vehicles/{node}/policy",
            get(get_policy).put(put_policy),
        )
}

/// The owner behind the request's `Authorization: Bearer` owner key.
///
/// Rejects with an OpenAI-shaped 401: no key, a malformed header, an unknown
/// key, or a tenant API key.
#[derive(Clone, Debug)]
pub struct OwnerAuth(pub OwnerRecord);

impl FromRequestParts<AppState> for OwnerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate_owner(state, &parts.headers)
            .await
            .map(OwnerAuth)
    }
}

async fn authenticate_owner(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<OwnerRecord, ApiError> {
    let key = super::bearer_key(headers, "an owner key", "YOUR_OWNER_KEY")?;
    if key.starts_with(secrets::API_KEY_PREFIX) {
        return Err(ApiError::unauthorized(
            "a tenant API key cannot be used on the owner API; use an owner key",
        ));
    }
    if !key.starts_with(OWNER_KEY_PREFIX) {
        return Err(ApiError::unauthorized("incorrect owner key provided"));
    }
    match state.store.owner_for_key(key).await {
        Ok(Some(owner)) => Ok(owner),
        Ok(None) => Err(ApiError::unauthorized("incorrect owner key provided")),
        Err(error) => {
            tracing::error!(%error, "look up owner key");
            Err(ApiError::internal())
        }
    }
}

/// Whether `owner` owns the enrolled vehicle `node`.
pub async fn owns(state: &AppState, owner: &OwnerRecord, node: &str) -> Result<bool, ApiError> {
    state.store.owns(owner.id, node).await.map_err(|error| {
        tracing::error!(%error, node_id = %node, "check vehicle owner");
        ApiError::internal()
    })
}

/// `Ok` when `owner` owns `node`, else the 404 every owner route gives for a
/// vehicle that is not the caller's.
pub async fn owned(state: &AppState, owner: &OwnerRecord, node: &str) -> Result<(), ApiError> {
    if owns(state, owner, node).await? {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "you have no vehicle named {node:?}"
        )))
    }
}

async fn list_vehicles(State(state): State<AppState>, OwnerAuth(owner): OwnerAuth) -> Response {
    let vehicles = match state.store.owner_vehicles(owner.id).await {
        Ok(vehicles) => vehicles,
        Err(error) => {
            tracing::error!(%error, owner = %owner.name, "list owner vehicles");
            return ApiError::internal().into_response();
        }
    };
    // `null` where the vehicle's cell lists too many vehicles to tell.
    let capacity = state.cell.capacity();
    let mut data = Vec::with_capacity(vehicles.len());
    for vehicle in vehicles {
        let policy = match stored_policy(&state, &vehicle.name).await {
            Ok(policy) => policy,
            Err(error) => return error.into_response(),
        };
        let trust = match state.store.node_trust(&vehicle.name).await {
            Ok(trust) => trust,
            Err(error) => {
                tracing::error!(%error, node_id = %vehicle.name, "read vehicle trust");
                return ApiError::internal().into_response();
            }
        };
        data.push(serde_json::json!({
            "id": vehicle.name,
            "object": "vehicle",
            "connected": capacity.holds(&vehicle.name),
            "last_seen_ms": vehicle.last_seen_ms,
            "policy": PolicyView::of(&policy),
            "trust": trust_view(trust.as_ref()),
        }));
    }
    Json(serde_json::json!({ "object": "list", "owner": owner.name, "data": data })).into_response()
}

/// A vehicle's trust as its owner sees it: `probation` until its first
/// answers are verified, `trusted`, or `quarantined` with the reason (no new
/// work, its suspect earnings taken back). A vehicle no cell has recorded
/// yet is in probation.
fn trust_view(trust: Option<&store::trust::TrustRecord>) -> serde_json::Value {
    match trust {
        None => serde_json::json!({ "state": "probation", "verified": 0, "passed": 0 }),
        Some(trust) => serde_json::json!({
            "state": trust.state,
            "verified": trust.verified,
            "passed": trust.passed,
            "reason": trust.reason,
            "quarantined_ms": trust.quarantined_ms,
        }),
    }
}

async fn stored_policy(state: &AppState, node: &str) -> Result<scheduler::OwnerPolicy, ApiError> {
    match state.store.node_policy(node).await {
        Ok(policy) => Ok(policy),
        Err(StoreError::NoSuchNode(_)) => Err(ApiError::not_found(format!(
            "you have no vehicle named {node:?}"
        ))),
        Err(error) => {
            tracing::error!(%error, node_id = %node, "read vehicle policy");
            Err(ApiError::internal())
        }
    }
}

fn policy_body(node: &str, policy: &scheduler::OwnerPolicy) -> Response {
    let mut body = serde_json::to_value(PolicyView::of(policy)).unwrap_or_default();
    body["vehicle"] = serde_json::Value::String(node.to_string());
    body["object"] = serde_json::Value::String("vehicle.policy".to_string());
    Json(body).into_response()
}

async fn get_policy(
    State(state): State<AppState>,
    OwnerAuth(owner): OwnerAuth,
    ApiPath(node): ApiPath<String>,
) -> Result<Response, ApiError> {
    owned(&state, &owner, &node).await?;
    let policy = stored_policy(&state, &node).await?;
    Ok(policy_body(&node, &policy))
}

async fn put_policy(
    State(state): State<AppState>,
    OwnerAuth(owner): OwnerAuth,
    ApiPath(node): ApiPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    owned(&state, &owner, &node).await?;
    let too_large = || {
        ApiError::invalid(
            format!("the policy body is larger than {POLICY_BODY_BYTES_MAX} bytes"),
            None,
            "request_too_large",
        )
    };
    let body = body.map_err(|_| too_large())?;
    if body.len() > POLICY_BODY_BYTES_MAX {
        return Err(too_large());
    }
    let update: PolicyUpdate = serde_json::from_slice(&body).map_err(|error| {
        ApiError::invalid(
            format!("the policy is not valid: {error}"),
            None,
            "invalid_policy",
        )
    })?;
    let current = stored_policy(&state, &node).await?;
    let policy = owner_policy::apply(&current, &update).map_err(|error| {
        ApiError::invalid(error.to_string(), Some(error.field), "invalid_policy")
    })?;
    if let Err(error) = state
        .store
        .set_node_policy(&node, &policy, crate::core::now_ms().0)
        .await
    {
        tracing::error!(%error, node_id = %node, "store vehicle policy");
        return Err(ApiError::internal());
    }
    state.cell.owner_policy_changed(&node, policy);
    tracing::info!(owner = %owner.name, node_id = %node, "owner changed vehicle policy");
    Ok(policy_body(&node, &policy))
}
