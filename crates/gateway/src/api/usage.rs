//! `GET /v1/usage` and `GET /v1/invoices/{YYYY-MM}`: what the calling tenant
//! used and owes, straight from the ledger. Both are scoped to the tenant of
//! the API key; naming another tenant is refused with 403, and there is no
//! way to read another tenant's figures.
//!
//! `/v1/usage` takes `from` and `to` as UTC dates (`YYYY-MM-DD`, `to`
//! exclusive) or `start_time` and `end_time` as Unix seconds; by default the
//! current month so far. An invoice is JSON, or CSV with one line per request
//! (`?format=csv`).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ledger::core::{MicroUsd, TimestampMs};
use ledger::invoice::{self, UsageReport, UsageTotals};
use ledger::statement::Period;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery};
use super::{authenticate, AppState};
use crate::billing::ledger_tenant;
use crate::store::TenantRecord;

/// The longest period one usage query may span.
pub const USAGE_PERIOD_DAYS_MAX: i64 = 366;

pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Response {
    usage_report(&state, &headers, &query)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn usage_report(
    state: &AppState,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(state, headers).await?;
    check_scope(&tenant, query)?;
    let period = usage_period(query)?;
    let tenant_id = ledger_tenant(&tenant);
    let ledger = state.billing.ledger();
    let report = ledger
        .tenant_usage(&tenant_id, period)
        .await
        .map_err(|error| internal("usage report", &error))?;
    let account = ledger
        .account(&ledger::core::AccountId::Tenant(tenant_id.clone()))
        .await
        .map_err(|error| internal("tenant account", &error))?;
    let cap = ledger
        .daily_cap(&tenant_id)
        .await
        .map_err(|error| internal("daily cap", &error))?;
    let mut body = report_json(&report, &tenant);
    body["object"] = json!("usage");
    body["balance_usd"] = json!(account.map_or(MicroUsd::ZERO, |a| a.balance()).to_string());
    body["available_usd"] = match account.and_then(|a| a.available()) {
        Some(available) => json!(available.max(MicroUsd::ZERO).to_string()),
        None if account.is_some() => json!("unlimited"),
        None => json!(MicroUsd::ZERO.to_string()),
    };
    body["daily_cap_usd"] = cap.map_or(Value::Null, |cap| json!(cap.to_string()));
    Ok(Json(body).into_response())
}

pub async fn invoice(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(month): ApiPath<String>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Response {
    monthly_invoice(&state, &headers, &month, &query)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn monthly_invoice(
    state: &AppState,
    headers: &HeaderMap,
    month: &str,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let tenant = authenticate(state, headers).await?;
    check_scope(&tenant, query)?;
    let period = invoice::month_period(month)
        .map_err(|error| ApiError::invalid(error.to_string(), Some("month"), "invalid_month"))?;
    let tenant_id = ledger_tenant(&tenant);
    let ledger = state.billing.ledger();
    let bill = ledger
        .invoice(&tenant_id, month)
        .await
        .map_err(|error| internal("invoice", &error))?;
    match query.get("format").map(String::as_str) {
        None | Some("json") => {
            let mut body = report_json(&bill.usage, &tenant);
            body["object"] = json!("invoice");
            body["month"] = json!(bill.month);
            body["total_usd"] = json!(bill.usage.totals.charged.to_string());
            body["total_micro_usd"] = json!(bill.usage.totals.charged.0);
            body["top_ups_usd"] = json!(bill.top_ups.to_string());
            body["balance_usd"] = json!(bill.balance.to_string());
            Ok(Json(body).into_response())
        }
        Some("csv") => {
            let requests = ledger
                .tenant_requests(&tenant_id, period)
                .await
                .map_err(|error| internal("invoice lines", &error))?;
            let mut csv = Vec::new();
            invoice::write_csv(&mut csv, &bill, &requests)
                .map_err(|error| internal("write csv", &error))?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
                csv,
            )
                .into_response())
        }
        Some(_) => Err(ApiError::invalid(
            "format must be json or csv",
            Some("format"),
            "invalid_format",
        )),
    }
}

/// A `tenant` parameter may only name the caller.
fn check_scope(tenant: &TenantRecord, query: &HashMap<String, String>) -> Result<(), ApiError> {
    match query.get("tenant") {
        Some(named) if *named != tenant.name && *named != ledger_tenant(tenant).as_str() => {
            Err(ApiError {
                status: StatusCode::FORBIDDEN,
                message: "an API key can only read its own tenant's usage".into(),
                kind: "permission_error",
                param: Some("tenant".into()),
                code: Some("forbidden"),
                retry_after_seconds: None,
            })
        }
        _ => Ok(()),
    }
}

fn usage_period(query: &HashMap<String, String>) -> Result<Period, ApiError> {
    let bad = |param: &str, what: &str| {
        ApiError::invalid(
            format!("{param} must be {what}"),
            Some(param),
            "invalid_period",
        )
    };
    let date = |param: &str| -> Result<Option<TimestampMs>, ApiError> {
        query
            .get(param)
            .map(|text| invoice::day_start(text).ok_or_else(|| bad(param, "a date as YYYY-MM-DD")))
            .transpose()
    };
    let unix = |param: &str| -> Result<Option<TimestampMs>, ApiError> {
        query
            .get(param)
            .map(|text| {
                text.parse::<i64>()
                    .ok()
                    .and_then(|seconds| seconds.checked_mul(1000))
                    .map(TimestampMs)
                    .ok_or_else(|| bad(param, "unix seconds"))
            })
            .transpose()
    };
    let now = crate::core::now_ms();
    let (from, from_param) = match (date("from")?, unix("start_time")?) {
        (Some(from), _) => (from, "from"),
        (None, Some(from)) => (from, "start_time"),
        (None, None) => (month_start(now), "from"),
    };
    let (until, until_param) = match (date("to")?, unix("end_time")?) {
        (Some(until), _) => (until, "to"),
        (None, Some(until)) => (until, "end_time"),
        (None, None) => (TimestampMs(now.0.saturating_add(1)), "to"),
    };
    if until <= from {
        return Err(bad(until_param, &format!("after {from_param}")));
    }
    // Both ends come from the client: the span may not fit in an i64.
    let span_max = USAGE_PERIOD_DAYS_MAX * TimestampMs::PER_DAY;
    if until
        .0
        .checked_sub(from.0)
        .is_none_or(|span| span > span_max)
    {
        return Err(bad(
            until_param,
            &format!("at most {USAGE_PERIOD_DAYS_MAX} days after {from_param}"),
        ));
    }
    Ok(Period { from, until })
}

/// The first instant of the UTC month containing `at`.
fn month_start(at: TimestampMs) -> TimestampMs {
    invoice::month_period(&invoice::month_containing(at)).map_or(at.utc_day_start(), |p| p.from)
}

fn totals_json(totals: &UsageTotals) -> Value {
    json!({
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens.0,
        "completion_tokens": totals.completion_tokens.0,
        "total_tokens": totals.prompt_tokens.0 + totals.completion_tokens.0,
        "charged_usd": totals.charged.to_string(),
        "charged_micro_usd": totals.charged.0,
    })
}

/// The report as JSON; `tenant` names the tenant by its name, not by the
/// id its ledger account is keyed by.
fn report_json(report: &UsageReport, tenant: &TenantRecord) -> Value {
    let by_model: Vec<Value> = report
        .by_model
        .iter()
        .map(|(model, totals)| {
            let mut line = totals_json(totals);
            line["model"] = json!(model.as_str());
            line
        })
        .collect();
    let mut body = totals_json(&report.totals);
    body["tenant"] = json!(tenant.name);
    body["from_ms"] = json!(report.period.from.0);
    body["to_ms"] = json!(report.period.until.0);
    body["by_model"] = json!(by_model);
    body
}

fn internal(what: &str, error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%error, "{what}");
    ApiError::internal()
}
