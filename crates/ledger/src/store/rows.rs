//! Conversions between SQL rows and domain types, shared by both backends.
//!
//! Rows are read as plain tuples (which both drivers decode) and every value
//! from disk is parsed and range-checked here, never unwrapped.

use crate::core::{
    AccountId, AccountState, DurationMs, MicroUsd, ModelId, RequestId, Segment, TenantId,
    TimestampMs, TokenCount, Transfer, TransferId, TransferSpec,
};
use crate::invoice::RequestSummary;
use crate::metering::{Server, UsageSegment};

use super::StoreError;

/// `id, debit_account, credit_account, amount, kind, request_id, segment, quantity, at_ms`.
pub type TransferRow = (String, String, String, i64, String, String, i64, i64, i64);

pub const TRANSFER_COLUMNS: &str =
    "id, debit_account, credit_account, amount, kind, request_id, segment, quantity, at_ms";

/// `id, balance_floor, debits_posted, credits_posted`.
pub type AccountRow = (String, Option<i64>, i64, i64);

pub const ACCOUNT_COLUMNS: &str = "id, balance_floor, debits_posted, credits_posted";

/// Usage columns in `USAGE_COLUMNS` order.
pub type UsageRow = (
    String,
    i64,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

pub const USAGE_COLUMNS: &str = "request_id, segment, node_id, owner_id, model, prompt_tokens, \
     completion_tokens, compute_ms, energy_uwh, tariff_per_kwh, started_at_ms";

fn corrupt(what: &'static str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: reason.to_string(),
    }
}

/// A `u64` quantity as a signed SQL column.
pub fn to_sql(what: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

fn from_sql(what: &'static str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(what, format!("negative value {value}")))
}

pub fn transfer_from_row(row: TransferRow) -> Result<Transfer, StoreError> {
    let (id, debit, credit, amount, kind, request_id, segment, quantity, at_ms) = row;
    let segment = u32::try_from(segment).map_err(|_| corrupt("transfer segment", segment))?;
    let spec = TransferSpec {
        kind: kind.parse().map_err(|e| corrupt("transfer kind", e))?,
        debit: debit
            .parse()
            .map_err(|e| corrupt("transfer debit account", e))?,
        credit: credit
            .parse()
            .map_err(|e| corrupt("transfer credit account", e))?,
        amount: MicroUsd(amount),
        request_id: RequestId::new(request_id).map_err(|e| corrupt("transfer request id", e))?,
        segment: Segment(segment),
        quantity: from_sql("transfer quantity", quantity)?,
        at: TimestampMs(at_ms),
    };
    let transfer = Transfer::new(spec).map_err(|e| corrupt("transfer", e))?;
    if TransferId::from_hex(&id) != Some(transfer.id()) {
        return Err(corrupt(
            "transfer id",
            format!("{id} is not the id its fields derive ({})", transfer.id()),
        ));
    }
    Ok(transfer)
}

pub fn account_from_row(row: AccountRow) -> Result<(AccountId, AccountState), StoreError> {
    let (id, floor, debits, credits) = row;
    let account: AccountId = id.parse().map_err(|e| corrupt("account id", e))?;
    let state = AccountState {
        debits_posted: MicroUsd(debits),
        credits_posted: MicroUsd(credits),
        floor: floor.map(MicroUsd),
    };
    Ok((account, state))
}

/// The values of a usage segment in `USAGE_COLUMNS` order.
pub fn usage_to_row(usage: &UsageSegment) -> Result<UsageRow, StoreError> {
    let (node, owner, energy, tariff) = usage.server.columns();
    Ok((
        usage.request_id.to_string(),
        i64::from(usage.segment.0),
        node,
        owner,
        usage.model.to_string(),
        to_sql("prompt tokens", usage.prompt_tokens.0)?,
        to_sql("completion tokens", usage.completion_tokens.0)?,
        to_sql("compute ms", usage.compute.0)?,
        to_sql("energy", energy)?,
        tariff,
        usage.started_at.0,
    ))
}

pub fn usage_from_row(row: UsageRow) -> Result<UsageSegment, StoreError> {
    let (request_id, segment, node, owner, model, prompt, completion, compute, energy, tariff, at) =
        row;
    let energy = from_sql("usage energy", energy)?;
    let server = Server::from_columns((node, owner, energy, tariff))
        .map_err(|error| corrupt("usage server", error))?;
    Ok(UsageSegment {
        request_id: RequestId::new(request_id).map_err(|e| corrupt("usage request id", e))?,
        segment: Segment(u32::try_from(segment).map_err(|_| corrupt("usage segment", segment))?),
        server,
        model: ModelId::new(model).map_err(|e| corrupt("usage model", e))?,
        prompt_tokens: TokenCount(from_sql("usage prompt tokens", prompt)?),
        completion_tokens: TokenCount(from_sql("usage completion tokens", completion)?),
        compute: DurationMs(from_sql("usage compute ms", compute)?),
        started_at: TimestampMs(at),
    })
}

/// Request columns in `REQUEST_COLUMNS` order.
pub type RequestRow = (String, String, String, String, i64, i64, i64, i64, i64, i64);

pub const REQUEST_COLUMNS: &str = "request_id, tenant_id, class, model, prompt_tokens, \
     completion_tokens, charge, segments, admitted_at_ms, completed_at_ms";

pub fn request_to_row(request: &RequestSummary) -> Result<RequestRow, StoreError> {
    Ok((
        request.request_id.to_string(),
        request.tenant.to_string(),
        request.class.as_str().to_owned(),
        request.model.to_string(),
        to_sql("prompt tokens", request.prompt_tokens.0)?,
        to_sql("completion tokens", request.completion_tokens.0)?,
        request.charge.0,
        to_sql("segments", u64::from(request.segments))?,
        request.admitted_at.0,
        request.completed_at.0,
    ))
}

pub fn request_from_row(row: RequestRow) -> Result<RequestSummary, StoreError> {
    let (request_id, tenant, class, model, prompt, completion, charge, segments, admitted, done) =
        row;
    Ok(RequestSummary {
        request_id: RequestId::new(request_id).map_err(|e| corrupt("request id", e))?,
        tenant: TenantId::new(tenant).map_err(|e| corrupt("request tenant", e))?,
        class: class.parse().map_err(|e| corrupt("request class", e))?,
        model: ModelId::new(model).map_err(|e| corrupt("request model", e))?,
        prompt_tokens: TokenCount(from_sql("request prompt tokens", prompt)?),
        completion_tokens: TokenCount(from_sql("request completion tokens", completion)?),
        charge: MicroUsd(charge),
        segments: u32::try_from(segments).map_err(|_| corrupt("request segments", segments))?,
        admitted_at: TimestampMs(admitted),
        completed_at: TimestampMs(done),
    })
}
