//! `GET /owner/v1/vehicles/{node}/statement?from=YYYY-MM-DD&to=YYYY-MM-DD`:
//! what one of the caller's vehicles did and earned in a period (requests,
//! tokens, compute hours, kWh, revenue share, energy reimbursement), from
//! the ledger. `to` is exclusive; both default to the current UTC month.
//! `format=csv` gives one line per segment the vehicle ran.
//!
//! Owner-authenticated ([`OwnerAuth`]); a vehicle that is not the caller's
//! is answered 404 exactly like one that does not exist.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ledger::core::{MicroUsd, NodeId, TimestampMs};
use ledger::invoice;
use ledger::statement::{Period, Statement};
use serde_json::{json, Value};

use super::extract::{ApiPath, ApiQuery};
use super::owner::{owned, OwnerAuth};
use super::{ApiError, AppState};

/// Lines a JSON statement lists at most; the totals always cover the whole
/// period, and the CSV export has every line.
pub const STATEMENT_LINES_LISTED_MAX: usize = 1_000;

/// The longest period one statement may span.
pub const STATEMENT_PERIOD_DAYS_MAX: i64 = 366;

pub fn routes() -> Router<AppState> {
    Router::new().route("/owner/v1/vehicles/{node}/statement", get(statement))
}

async fn statement(
    OwnerAuth(owner): OwnerAuth,
    State(state): State<AppState>,
    ApiPath(node): ApiPath<String>,
    ApiQuery(query): ApiQuery<HashMap<String, String>>,
) -> Response {
    vehicle_statement(&state, &owner, &node, &query)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn vehicle_statement(
    state: &AppState,
    owner: &crate::store_owners::OwnerRecord,
    node: &str,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    owned(state, owner, node).await?;
    let period = period(query)?;
    let node_id = NodeId::new(node).map_err(|_| ApiError::not_found("no such vehicle"))?;
    let statement = state
        .billing
        .ledger()
        .statement(&node_id, period)
        .await
        .map_err(|error| {
            tracing::error!(%error, node_id = node, "owner statement");
            ApiError::internal()
        })?;
    match query.get("format").map(String::as_str) {
        None | Some("json") => Ok(Json(statement_json(&statement)).into_response()),
        Some("csv") => {
            let mut csv = Vec::new();
            // The ledger keys owners by id; the caller knows itself by name.
            let own_key = crate::billing_accounts::owner_key(owner.id);
            let owner_name = |key: &ledger::core::OwnerId| {
                if *key == own_key {
                    owner.name.clone()
                } else {
                    key.to_string()
                }
            };
            statement
                .write_csv_named(&mut csv, &owner_name)
                .map_err(|error| {
                    tracing::error!(%error, "write statement csv");
                    ApiError::internal()
                })?;
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

fn period(query: &HashMap<String, String>) -> Result<Period, ApiError> {
    let now = crate::core::now_ms();
    let this_month = invoice::month_period(&invoice::month_containing(now)).map_err(|error| {
        tracing::error!(%error, "current month");
        ApiError::internal()
    })?;
    let date = |param: &str, default: TimestampMs| match query.get(param) {
        None => Ok(default),
        Some(text) => invoice::day_start(text).ok_or_else(|| {
            ApiError::invalid(
                format!("{param} must be a date as YYYY-MM-DD"),
                Some(param),
                "invalid_period",
            )
        }),
    };
    let period = Period {
        from: date("from", this_month.from)?,
        until: date("to", this_month.until)?,
    };
    // Both ends come from the client: never subtract them unchecked.
    let days = period
        .until
        .0
        .checked_sub(period.from.0)
        .map(|span| span / TimestampMs::PER_DAY);
    if period.until <= period.from || days.is_none_or(|days| days > STATEMENT_PERIOD_DAYS_MAX) {
        return Err(ApiError::invalid(
            format!("to must be after from, by at most {STATEMENT_PERIOD_DAYS_MAX} days"),
            Some("to"),
            "invalid_period",
        ));
    }
    Ok(period)
}

fn statement_json(statement: &Statement) -> Value {
    let totals = &statement.totals;
    let lines: Vec<Value> = statement
        .lines
        .iter()
        .take(STATEMENT_LINES_LISTED_MAX)
        .map(|line| {
            json!({
                "request_id": line.request_id.as_str(),
                "segment": line.segment.0,
                "started_at_ms": line.started_at.0,
                "prompt_tokens": line.prompt_tokens.0,
                "completion_tokens": line.completion_tokens.0,
                "compute_hours": line.compute.hours_string(),
                "energy_kwh": line.energy.kwh_string(),
                "revenue_share_usd": line.revenue_share.to_string(),
                "energy_reimbursement_usd": line.energy_reimbursement.to_string(),
            })
        })
        .collect();
    let clawbacks: Vec<Value> = statement
        .clawbacks
        .iter()
        .take(STATEMENT_LINES_LISTED_MAX)
        .map(|clawback| {
            json!({
                "request_id": clawback.request_id.as_str(),
                "segment": clawback.segment.0,
                "at_ms": clawback.at.0,
                "reason": clawback.reason,
                "revenue_share_usd": clawback.revenue_share.to_string(),
                "energy_reimbursement_usd": clawback.energy_reimbursement.to_string(),
                "total_usd": clawback.total().to_string(),
            })
        })
        .collect();
    let checks: Vec<Value> = statement
        .verifications
        .iter()
        .take(STATEMENT_LINES_LISTED_MAX)
        .map(|check| {
            json!({
                "check": check.check.as_str(),
                "at_ms": check.at.0,
                "tokens": check.tokens.0,
                "compute_hours": check.compute.hours_string(),
                "energy_kwh": check.energy.kwh_string(),
                "verification_pay_usd": check.pay.to_string(),
                "energy_reimbursement_usd": check.energy_reimbursement.to_string(),
                "total_usd": check.total().to_string(),
            })
        })
        .collect();
    json!({
        "object": "vehicle.statement",
        "vehicle": statement.node.as_str(),
        "from_ms": statement.period.from.0,
        "to_ms": statement.period.until.0,
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens.0,
        "completion_tokens": totals.completion_tokens.0,
        "compute_hours": totals.compute.hours_string(),
        "energy_kwh": totals.energy.kwh_string(),
        "revenue_share_usd": totals.revenue_share.to_string(),
        "energy_reimbursement_usd": totals.energy_reimbursement.to_string(),
        // Checks of other vehicles' answers, paid by the platform; part of
        // the earnings below.
        "checks": totals.checks,
        "verification_usd": MicroUsd(totals.verification_pay.0 + totals.verification_energy.0).to_string(),
        "earnings_usd": totals.earnings.to_string(),
        "earnings_micro_usd": totals.earnings.0,
        // What verification took back of those earnings, and what is left.
        "clawed_back_usd": totals.clawed_back.to_string(),
        "net_earnings_usd": totals.net_earnings.to_string(),
        "net_earnings_micro_usd": totals.net_earnings.0,
        "lines": lines,
        "clawbacks": clawbacks,
        "clawbacks_truncated": statement.clawbacks.len() > STATEMENT_LINES_LISTED_MAX,
        "check_lines": checks,
        "check_lines_truncated": statement.verifications.len() > STATEMENT_LINES_LISTED_MAX,
        "lines_truncated": statement.lines.len() > STATEMENT_LINES_LISTED_MAX,
    })
}
