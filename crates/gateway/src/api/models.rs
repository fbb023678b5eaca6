//! `GET /v1/models` and `GET /v1/models/{id}`: the models served here, as
//! OpenAI lists and retrieves them. Both answer from one list of entries, so
//! a retrieved model is exactly its entry in the list.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::error::ApiError;
use super::extract::ApiPath;
use super::{authenticate, route, AppState};

pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = authenticate(&state, &headers).await {
        return error.into_response();
    }
    Json(serde_json::json!({ "object": "list", "data": entries(&state) })).into_response()
}

/// One model by the id the list shows (ids such as `cloud/...` hold a `/`:
/// the route's last segment is a wildcard), or 404 `model_not_found`.
pub(super) async fn retrieve(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Response {
    if let Err(error) = authenticate(&state, &headers).await {
        return error.into_response();
    }
    let found = entries(&state)
        .into_iter()
        .find(|entry| entry["id"].as_str() == Some(id.as_str()));
    match found {
        Some(entry) => Json(entry).into_response(),
        None => ApiError::model_not_found(&id, "GET /v1/models lists the models served here")
            .into_response(),
    }
}

/// Every model served here: the fleet's, then the routed names when a
/// cloud is configured.
fn entries(state: &AppState) -> Vec<Value> {
    state
        .models
        .all()
        .iter()
        .map(|model| {
            serde_json::json!({
                "id": model.name,
                "object": "model",
                "created": model.created_unix_s,
                "owned_by": "fleetgrid",
                "tier": "fleet",
                "sha256": model.digest,
                "context_length": model.context_tokens,
            })
        })
        .chain(route::model_entries(state))
        .collect()
}
