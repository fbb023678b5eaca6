//! Stored chat completions, as OpenAI's API has them: a chat completion sent
//! with `store: true` is kept, with its `metadata`, for
//! [`STORED_RETENTION`], and its tenant can read it back:
//!
//! - `GET /v1/chat/completions` lists them (`limit`, `after`, `order`,
//!   `model`; filtering by `metadata` is refused by name);
//! - `GET /v1/chat/completions/{id}` is one, as its client got it, with its
//!   metadata;
//! - `GET /v1/chat/completions/{id}/messages` is its request's messages;
//! - `POST /v1/chat/completions/{id}` replaces its metadata;
//! - `DELETE /v1/chat/completions/{id}` deletes it.
//!
//! Another tenant's id is not found, as an unknown one is.
//!
//! fleetgrid's extension `on_clawback` says what happens should the answer
//! be clawed back from a vehicle that failed verification: `"refund"` (the
//! default, what every clawed-back answer gets) or `"rerun"`, which needs
//! `store: true`: the answer is refunded and the request run again
//! (`rerun`), and the new answer replaces the kept one. A retrieved
//! completion says so in its `fleetgrid` field.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::time::Duration;

use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::validate::WireRequest;
use super::{authenticate, AppState};
use crate::store::TenantRecord;
use store::stored_completions::{OnClawback, StoredCompletion, StoredQuery};

/// How long a stored completion is kept (OpenAI keeps them 30 days).
pub const STORED_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Pairs a completion's metadata may have, and the longest key and value.
const METADATA_PAIRS_MAX: usize = 16;
const METADATA_KEY_CHARS_MAX: usize = 64;
const METADATA_VALUE_CHARS_MAX: usize = 512;

/// A list's page size when none is asked, and the largest one.
const LIST_LIMIT_DEFAULT: u32 = 20;
const LIST_LIMIT_MAX: u32 = 100;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/chat/completions/{id}",
            get(retrieve).post(update).delete(delete),
        )
        .route("/v1/chat/completions/{id}/messages", get(messages))
}

/// What a request asks to keep: `store: true`, its metadata and what to do
/// on a clawback.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Keep {
    pub metadata: Map<String, Value>,
    pub on_clawback: OnClawback,
}

/// Reads `store`, `metadata` and `on_clawback` from a parsed request
/// (checked field by field already): `None` when it keeps nothing.
pub(super) fn asked(wire: &WireRequest) -> Result<Option<Keep>, ApiError> {
    let WireRequest::Chat(body) = wire else {
        return Ok(None);
    };
    let store = match &body.store {
        None | Some(Value::Null) => false,
        Some(Value::Bool(store)) => *store,
        Some(_) => return Err(invalid("'store' must be a boolean", "store")),
    };
    let on_clawback = match &body.on_clawback {
        None | Some(Value::Null) => OnClawback::Refund,
        Some(Value::String(name)) => OnClawback::parse(name)
            .ok_or_else(|| invalid("'on_clawback' must be 'refund' or 'rerun'", "on_clawback"))?,
        Some(_) => {
            return Err(invalid(
                "'on_clawback' must be 'refund' or 'rerun'",
                "on_clawback",
            ))
        }
    };
    if !store {
        if on_clawback == OnClawback::Rerun {
            return Err(invalid(
                "'on_clawback': 'rerun' needs 'store': true: the new answer replaces the stored one",
                "on_clawback",
            ));
        }
        return Ok(None);
    }
    let metadata = match &body.metadata {
        None | Some(Value::Null) => Map::new(),
        Some(value) => metadata(value)?,
    };
    Ok(Some(Keep {
        metadata,
        on_clawback,
    }))
}

/// Checks `metadata` as OpenAI bounds it: an object of at most 16 string
/// values, keys of at most 64 characters, values of at most 512.
fn metadata(value: &Value) -> Result<Map<String, Value>, ApiError> {
    let Value::Object(pairs) = value else {
        return Err(invalid(
            "'metadata' must be an object of strings",
            "metadata",
        ));
    };
    if pairs.len() > METADATA_PAIRS_MAX {
        return Err(invalid(
            format!(
                "'metadata' has {} keys; the limit is {METADATA_PAIRS_MAX}",
                pairs.len()
            ),
            "metadata",
        ));
    }
    for (key, value) in pairs {
        let fits = key.chars().count() <= METADATA_KEY_CHARS_MAX
            && value
                .as_str()
                .is_some_and(|text| text.chars().count() <= METADATA_VALUE_CHARS_MAX);
        if !fits {
            return Err(invalid(
                format!(
                    "'metadata.{key}': keys are at most {METADATA_KEY_CHARS_MAX} characters and values strings of at most {METADATA_VALUE_CHARS_MAX}"
                ),
                "metadata",
            ));
        }
    }
    Ok(pairs.clone())
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_value")
}

/// 503 with `Retry-After` while the store is away, 500 otherwise.
fn store_error(error: store::StoreError) -> ApiError {
    if error.is_unavailable() {
        return ApiError::unavailable(
            "the database is unavailable for the moment; retry",
            crate::limits::RETRY_AFTER_DEFAULT_SECONDS,
        );
    }
    tracing::error!(%error, "stored completions");
    ApiError::internal()
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no stored chat completion with id '{id}'"))
}

/// The completion as its client reads it back: the answer as sent (a
/// re-run's under the first id), its metadata, and what became of it.
fn shown(kept: &StoredCompletion) -> Value {
    let mut body: Value = serde_json::from_str(&kept.response).unwrap_or(Value::Null);
    let Value::Object(object) = &mut body else {
        return json!({"id": kept.id, "object": "chat.completion"});
    };
    object.insert("id".into(), Value::String(kept.id.clone()));
    object.insert(
        "metadata".into(),
        serde_json::from_str(&kept.metadata).unwrap_or_else(|_| json!({})),
    );
    let mut fleetgrid = match object.remove("fleetgrid") {
        Some(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    fleetgrid.insert("on_clawback".into(), kept.on_clawback.as_str().into());
    if kept.reruns > 0 {
        fleetgrid.insert(
            "rerun".into(),
            json!({
                "count": kept.reruns,
                "request_id": kept.answered_by,
                "reason": kept.rerun_reason,
            }),
        );
    }
    if let Some(reason) = &kept.clawed_back {
        // The answer shown was clawed back and is refunded; a re-run, if one
        // was asked for, has not replaced it yet (or could not).
        fleetgrid.insert("clawed_back".into(), json!({ "reason": reason }));
    }
    object.insert("fleetgrid".into(), Value::Object(fleetgrid));
    body
}

/// `GET /v1/chat/completions`.
pub(super) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let page = page(&query, true)?;
    let query = StoredQuery {
        limit: page.limit + 1,
        ..page.clone()
    };
    let mut kept = state
        .store
        .list_stored_completions(tenant.id, &query)
        .await
        .map_err(store_error)?;
    let has_more = kept.len() > page.limit as usize;
    kept.truncate(page.limit as usize);
    Ok(Json(list_of(kept.iter().map(shown).collect(), has_more)))
}

fn list_of(data: Vec<Value>, has_more: bool) -> Value {
    let id = |item: Option<&Value>| item.and_then(|item| item.get("id")).cloned();
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// A list's query string: `limit`, `after`, `order` and (for completions)
/// `model`; anything else is refused by name.
fn page(pairs: &[(String, String)], with_model: bool) -> Result<StoredQuery, ApiError> {
    let mut query = StoredQuery {
        limit: LIST_LIMIT_DEFAULT,
        ..StoredQuery::default()
    };
    for (key, value) in pairs {
        match key.as_str() {
            "limit" => {
                query.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=LIST_LIMIT_MAX).contains(limit))
                    .ok_or_else(|| {
                        invalid(format!("'limit' must be 1 to {LIST_LIMIT_MAX}"), "limit")
                    })?;
            }
            "after" => query.after = Some(value.clone()),
            "order" => {
                query.descending = match value.as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => return Err(invalid("'order' must be 'asc' or 'desc'", "order")),
                }
            }
            "model" if with_model => query.model = Some(value.clone()),
            other if other.starts_with("metadata") && with_model => return Err(ApiError::invalid(
                "filtering stored completions by metadata is not supported; list them and filter",
                Some(other),
                "unsupported_parameter",
            )),
            other => {
                return Err(ApiError::invalid(
                    format!("Unrecognized query parameter: {other}"),
                    Some(other),
                    "unknown_parameter",
                ))
            }
        }
    }
    Ok(query)
}

async fn find(
    state: &AppState,
    tenant: &TenantRecord,
    id: &str,
) -> Result<StoredCompletion, ApiError> {
    state
        .store
        .stored_completion(tenant.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/chat/completions/{id}`.
async fn retrieve(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    Ok(Json(shown(&find(&state, &tenant, &id).await?)))
}

/// `POST /v1/chat/completions/{id}`: `{"metadata": {...}}` replaces the
/// metadata; nothing else of a stored completion changes.
async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let body = super::generate::read_body(body).await?;
    let body: Value = super::validate::parse_json(&body)?;
    let Value::Object(fields) = body else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
            "invalid_json",
        ));
    };
    if let Some(other) = fields.keys().find(|key| key.as_str() != "metadata") {
        return Err(ApiError::invalid(
            format!(
                "Unrecognized request argument supplied: {other}; only 'metadata' can be updated"
            ),
            Some(other),
            "unknown_parameter",
        ));
    }
    let metadata = match fields.get("metadata") {
        None => {
            return Err(ApiError::invalid(
                "'metadata' is a required property",
                Some("metadata"),
                "missing_required_parameter",
            ))
        }
        Some(Value::Null) => Map::new(),
        Some(value) => metadata(value)?,
    };
    let metadata = Value::Object(metadata).to_string();
    let found = state
        .store
        .update_stored_metadata(tenant.id, &id, &metadata)
        .await
        .map_err(store_error)?;
    if !found {
        return Err(not_found(&id));
    }
    Ok(Json(shown(&find(&state, &tenant, &id).await?)))
}

/// `DELETE /v1/chat/completions/{id}`.
async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let deleted = state
        .store
        .delete_stored_completion(tenant.id, &id)
        .await
        .map_err(store_error)?;
    if !deleted {
        return Err(not_found(&id));
    }
    Ok(Json(
        json!({"object": "chat.completion.deleted", "id": id, "deleted": true}),
    ))
}

/// `GET /v1/chat/completions/{id}/messages`: the request's messages, each
/// with the id `{id}-{index}`, pages as for the list.
async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let page = page(&query, false)?;
    let kept = find(&state, &tenant, &id).await?;
    let request: Value = serde_json::from_str(&kept.request).unwrap_or(Value::Null);
    let mut all: Vec<Value> = request
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages
                .iter()
                .enumerate()
                .map(|(index, message)| {
                    let mut message = message.clone();
                    if let Value::Object(fields) = &mut message {
                        fields.insert("id".into(), format!("{id}-{index}").into());
                    }
                    message
                })
                .collect()
        })
        .unwrap_or_default();
    if page.descending {
        all.reverse();
    }
    let start = match &page.after {
        Some(after) => all
            .iter()
            .position(|message| message.get("id").and_then(Value::as_str) == Some(after))
            .map_or(all.len(), |at| at + 1),
        None => 0,
    };
    let rest = all.split_off(start.min(all.len()));
    let has_more = rest.len() > page.limit as usize;
    let data = rest.into_iter().take(page.limit as usize).collect();
    Ok(Json(list_of(data, has_more)).into_response())
}
