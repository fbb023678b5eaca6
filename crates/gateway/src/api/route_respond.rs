//! The response of a routed request: one JSON body or a server-sent event
//! stream, in the same OpenAI shapes as an edge response, plus which tier
//! served and why.
//!
//! The tier and reason are in the `x-fleetgrid-tier` and
//! `x-fleetgrid-route-reason` headers and in a `fleetgrid` field of the body.
//! A stream's headers go out when its first tier starts (after the cascade's
//! hold-back), so they name that tier; the first chunk repeats it, a handoff
//! chunk announces the cloud taking over, and the last chunk carries the
//! final tier, reason and the usage of each part.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::route::{RouteReason, RouteSummary, RoutedEvent, Tier};
use super::validate::{Endpoint, ValidatedRequest};

/// What every chunk of a routed response repeats.
pub(super) struct RoutedMeta {
    id: String,
    created: u64,
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
}

impl RoutedMeta {
    pub(super) fn new(id: String, request: &ValidatedRequest) -> RoutedMeta {
        RoutedMeta {
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|elapsed| elapsed.as_secs())
                .unwrap_or_default(),
            endpoint: request.endpoint,
            stream: request.stream,
            include_usage: request.include_usage,
        }
    }

    fn envelope(&self, model: &str, choices: Value) -> Value {
        let object = match (self.endpoint, self.stream) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    }
}

/// Waits for the first tier to start (or the request to fail), then answers.
pub(super) async fn respond(
    meta: RoutedMeta,
    mut events: mpsc::Receiver<RoutedEvent>,
) -> Result<Response, ApiError> {
    let (tier, reason, model) = match events.recv().await {
        Some(RoutedEvent::Start {
            tier,
            reason,
            model,
        }) => (tier, reason, model),
        Some(RoutedEvent::Failed(error)) => return Err(error),
        Some(other) => {
            tracing::error!(request_id = %meta.id, event = ?other, "routed response did not start with its tier");
            return Err(ApiError::internal());
        }
        None => {
            tracing::error!(request_id = %meta.id, "routing ended without an answer");
            return Err(ApiError::internal());
        }
    };
    if meta.stream {
        Ok(stream(meta, tier, reason, model, events))
    } else {
        collect(meta, model, events).await
    }
}

fn headers(id: &str, tier: Tier, reason: &RouteReason) -> [(HeaderName, HeaderValue); 3] {
    [
        (
            HeaderName::from_static("x-request-id"),
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown")),
        ),
        (
            HeaderName::from_static("x-fleetgrid-tier"),
            HeaderValue::from_static(tier.as_str()),
        ),
        (
            HeaderName::from_static("x-fleetgrid-route-reason"),
            HeaderValue::from_static(reason.code),
        ),
    ]
}

fn route_json(tier: Tier, reason: &RouteReason) -> Value {
    json!({ "tier": tier.as_str(), "reason": reason.code, "detail": reason.detail })
}

/// The `fleetgrid` field of a finished answer: tier, reason, each part's usage.
fn summary_json(summary: &RouteSummary) -> Value {
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

/// The usage the tenant is charged for: the prompt once, as the tier that
/// started the answer counted it, and the sent tokens of each tier that
/// contributed. Edge tokens that were discarded are not in it (they are in
/// `fleetgrid.usage.edge.discarded_tokens`), nor is the cloud's re-prefill
/// after a handoff (in `fleetgrid.usage.cloud.prompt_tokens`).
fn usage_json(summary: &RouteSummary) -> Value {
    let edge_counts = matches!(summary.tier, Tier::Fleet | Tier::FleetThenCloud);
    let (edge_prompt, edge_completion) = match summary.edge {
        Some(edge) if edge_counts => (edge.prompt_tokens, edge.completion_tokens),
        _ => (0, 0),
    };
    let (cloud_prompt, cloud_completion) = summary.cloud.map_or((0, 0), |cloud| {
        (cloud.prompt_tokens, cloud.completion_tokens)
    });
    let prompt = if summary.tier == Tier::Cloud {
        cloud_prompt
    } else {
        edge_prompt
    };
    let completion = edge_completion + cloud_completion;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn collect(
    meta: RoutedMeta,
    model: String,
    mut events: mpsc::Receiver<RoutedEvent>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let summary = loop {
        match events.recv().await {
            Some(RoutedEvent::Text(piece)) => text.push_str(&piece),
            Some(RoutedEvent::Start { .. } | RoutedEvent::Handoff(_)) => {}
            Some(RoutedEvent::Finished(summary)) => break summary,
            Some(RoutedEvent::Failed(error)) => return Err(error),
            None => {
                tracing::error!(request_id = %meta.id, "routing ended without finishing");
                return Err(ApiError::internal());
            }
        }
    };
    let choice = match meta.endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": Value::Null,
            "finish_reason": summary.finish_reason,
        }),
        Endpoint::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": Value::Null,
            "finish_reason": summary.finish_reason,
        }),
    };
    let mut body = meta.envelope(&model, json!([choice]));
    body["usage"] = usage_json(&summary);
    body["fleetgrid"] = summary_json(&summary);
    Ok((headers(&meta.id, summary.tier, &summary.reason), Json(body)).into_response())
}

fn chunk(
    meta: &RoutedMeta,
    model: &str,
    text: &str,
    finish: Option<&str>,
    first: bool,
    fleetgrid: Option<Value>,
) -> Event {
    let choice = match meta.endpoint {
        Endpoint::Chat => {
            let delta = match (first, finish) {
                (true, _) => json!({"role": "assistant", "content": text}),
                (false, Some(_)) if text.is_empty() => json!({}),
                _ => json!({"content": text}),
            };
            json!({"index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish})
        }
        Endpoint::Completion => {
            json!({"index": 0, "text": text, "logprobs": Value::Null, "finish_reason": finish})
        }
    };
    let mut body = meta.envelope(model, json!([choice]));
    if let Some(fleetgrid) = fleetgrid {
        body["fleetgrid"] = fleetgrid;
    }
    Event::default().data(body.to_string())
}

fn stream(
    meta: RoutedMeta,
    tier: Tier,
    reason: RouteReason,
    model: String,
    mut events: mpsc::Receiver<RoutedEvent>,
) -> Response {
    let response_headers = headers(&meta.id, tier, &reason);
    let sse = async_stream::stream! {
        yield Ok::<Event, Infallible>(chunk(&meta, &model, "", None, true, Some(route_json(tier, &reason))));
        loop {
            match events.recv().await {
                Some(RoutedEvent::Text(text)) => {
                    yield Ok(chunk(&meta, &model, &text, None, false, None));
                }
                Some(RoutedEvent::Handoff(handoff)) => {
                    let route = route_json(Tier::FleetThenCloud, &handoff);
                    yield Ok(chunk(&meta, &model, "", None, false, Some(route)));
                }
                Some(RoutedEvent::Start { .. }) => {}
                Some(RoutedEvent::Finished(summary)) => {
                    let route = summary_json(&summary);
                    yield Ok(chunk(&meta, &model, "", Some(summary.finish_reason), false, Some(route)));
                    if meta.include_usage {
                        let mut last = meta.envelope(&model, json!([]));
                        last["usage"] = usage_json(&summary);
                        yield Ok(Event::default().data(last.to_string()));
                    }
                    break;
                }
                Some(RoutedEvent::Failed(error)) => {
                    yield Ok(Event::default().data(error.body_json()));
                    break;
                }
                None => {
                    tracing::error!(request_id = %meta.id, "routing ended without finishing");
                    yield Ok(Event::default().data(ApiError::internal().body_json()));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    (
        response_headers,
        Sse::new(sse).keep_alive(KeepAlive::default()),
    )
        .into_response()
}
