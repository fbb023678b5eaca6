//! The store's tenant-facing operations: account set-up (prepaid, credit
//! limit, unlimited), top-ups, daily caps, usage reports, invoices, and the
//! flags raised when a node's report disagrees with the coordinator.

use std::collections::BTreeMap;

use crate::core::{
    AccountId, AccountState, MicroUsd, ModelId, NodeId, Outcome, RequestId, Segment, TenantId,
    TimestampMs, TokenCount, Transfer, TransferKind, TransferSpec,
};
use crate::invoice::{self, Invoice, RequestSummary, UsageReport, UsageTotals};
use crate::statement::Period;

use super::rows::{self, RequestRow, REQUEST_COLUMNS};
use super::{Backend, Store, StoreError};

/// The most request lines one listing returns (CSV invoices of a month);
/// a tenant with more is told to narrow the period.
pub const REQUEST_LINES_MAX: usize = 1_000_000;

/// The most meter flags one listing returns.
pub const METER_FLAGS_LISTED_MAX: i64 = 10_000;

/// A node's report that disagreed with the coordinator's count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterFlag {
    pub request_id: RequestId,
    pub segment: Segment,
    pub node: NodeId,
    /// `prompt_tokens`, `completion_tokens` or `compute_ms`.
    pub field: String,
    pub coordinator: u64,
    pub node_value: u64,
    pub at: TimestampMs,
}

impl Store {
    /// Opens a tenant's account if it has none: prepaid (floor zero) or, with
    /// `unlimited`, without a floor. Returns the account's state.
    pub async fn ensure_tenant(
        &self,
        tenant: &TenantId,
        unlimited: bool,
    ) -> Result<AccountState, StoreError> {
        let account = AccountId::Tenant(tenant.clone());
        if let Some(state) = self.account(&account).await? {
            return Ok(state);
        }
        let floor = if unlimited { None } else { Some(0_i64) };
        let sql = "INSERT INTO ledger_accounts (id, balance_floor) VALUES ($1, $2) \
                   ON CONFLICT (id) DO NOTHING";
        on_pool!(self, pool => {
            sqlx::query(sql).bind(account.to_string()).bind(floor).execute(pool).await?;
        });
        self.account(&account)
            .await?
            .ok_or(StoreError::AccountNotFound(account))
    }

    /// Removes a tenant's floor: it may run up any debt (the operator's own
    /// workloads). `set_credit_limit` puts a floor back.
    pub async fn set_unlimited_credit(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let account = AccountId::Tenant(tenant.clone());
        let sql = "UPDATE ledger_accounts SET balance_floor = NULL WHERE id = $1";
        let updated = on_pool!(self, pool => sqlx::query(sql)
            .bind(account.to_string())
            .execute(pool)
            .await?
            .rows_affected());
        if updated == 0 {
            return Err(StoreError::AccountNotFound(account));
        }
        Ok(())
    }

    /// Credits a prepaid top-up. `reference` names the payment (a receipt
    /// number); topping up twice with one reference credits once.
    pub async fn top_up(
        &self,
        tenant: &TenantId,
        amount: MicroUsd,
        reference: &RequestId,
        at: TimestampMs,
    ) -> Result<Outcome, StoreError> {
        let transfer = Transfer::new(TransferSpec {
            kind: TransferKind::TopUp,
            debit: AccountId::TenantDeposits,
            credit: AccountId::Tenant(tenant.clone()),
            amount,
            request_id: reference.clone(),
            segment: Segment(0),
            quantity: 0,
            at,
        })?;
        if let Some(existing) = self.transfer(transfer.id()).await? {
            // A retry of the same top-up keeps its first time; a different
            // tenant or amount under one reference is a conflict.
            let same = existing.credit() == transfer.credit() && existing.amount() == amount;
            return if same {
                Ok(Outcome::Exists)
            } else {
                Err(crate::core::LedgerError::Conflict {
                    index: 0,
                    id: transfer.id(),
                    existing: Box::new(existing.spec().clone()),
                    attempted: Box::new(transfer.spec().clone()),
                }
                .into())
            };
        }
        let outcomes = self.commit(std::slice::from_ref(&transfer)).await?;
        Ok(outcomes.first().copied().unwrap_or(Outcome::Created))
    }

    /// Sets or clears (`None`) a tenant's daily spend cap.
    pub async fn set_daily_cap(
        &self,
        tenant: &TenantId,
        cap: Option<MicroUsd>,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO ledger_tenant_limits (tenant_id, daily_cap) VALUES ($1, $2) \
                   ON CONFLICT (tenant_id) DO UPDATE SET daily_cap = excluded.daily_cap";
        on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(tenant.as_str())
                .bind(cap.map(|cap| cap.0))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn daily_cap(&self, tenant: &TenantId) -> Result<Option<MicroUsd>, StoreError> {
        let sql = "SELECT daily_cap FROM ledger_tenant_limits WHERE tenant_id = $1";
        let row: Option<(Option<i64>,)> = on_pool!(self, pool => sqlx::query_as(sql)
            .bind(tenant.as_str())
            .fetch_optional(pool)
            .await?);
        Ok(row.and_then(|(cap,)| cap).map(MicroUsd))
    }

    /// A settled request's summary, if it was settled.
    pub async fn settled_request(
        &self,
        request: &RequestId,
    ) -> Result<Option<RequestSummary>, StoreError> {
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM ledger_requests WHERE request_id = $1");
        let row: Option<RequestRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(request.as_str())
            .fetch_optional(pool)
            .await?);
        row.map(rows::request_from_row).transpose()
    }

    /// Every transfer of a request, in no particular order (audits, tests).
    pub async fn request_transfers(
        &self,
        request: &RequestId,
    ) -> Result<Vec<Transfer>, StoreError> {
        let sql = format!(
            "SELECT {} FROM ledger_transfers WHERE request_id = $1",
            rows::TRANSFER_COLUMNS
        );
        let found: Vec<rows::TransferRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(request.as_str())
            .fetch_all(pool)
            .await?);
        found.into_iter().map(rows::transfer_from_row).collect()
    }

    /// The usage segments a request was settled with, in order.
    pub async fn request_usage(
        &self,
        request: &RequestId,
    ) -> Result<Vec<crate::metering::UsageSegment>, StoreError> {
        let sql = format!(
            "SELECT {} FROM ledger_usage WHERE request_id = $1 ORDER BY segment",
            rows::USAGE_COLUMNS
        );
        let found: Vec<rows::UsageRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(request.as_str())
            .fetch_all(pool)
            .await?);
        found.into_iter().map(rows::usage_from_row).collect()
    }

    /// A tenant's usage in a period (by completion time), per model.
    pub async fn tenant_usage(
        &self,
        tenant: &TenantId,
        period: Period,
    ) -> Result<UsageReport, StoreError> {
        let sql = "SELECT model, COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
                   CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
                   CAST(COALESCE(SUM(charge), 0) AS BIGINT) FROM ledger_requests \
                   WHERE tenant_id = $1 AND completed_at_ms >= $2 AND completed_at_ms < $3 \
                   GROUP BY model ORDER BY model";
        let found: Vec<(String, i64, i64, i64, i64)> = on_pool!(self, pool => sqlx::query_as(sql)
            .bind(tenant.as_str())
            .bind(period.from.0)
            .bind(period.until.0)
            .fetch_all(pool)
            .await?);
        let mut by_model = BTreeMap::new();
        for (model, requests, prompt, completion, charged) in found {
            let model = ModelId::new(model)?;
            let non_negative = |what: &'static str, value: i64| {
                u64::try_from(value).map_err(|_| StoreError::Corrupt {
                    what,
                    reason: format!("negative sum {value}"),
                })
            };
            by_model.insert(
                model,
                UsageTotals {
                    requests: non_negative("request count", requests)?,
                    prompt_tokens: TokenCount(non_negative("prompt tokens", prompt)?),
                    completion_tokens: TokenCount(non_negative("completion tokens", completion)?),
                    charged: MicroUsd(charged),
                },
            );
        }
        Ok(UsageReport::new(tenant.clone(), period, by_model))
    }

    /// A tenant's settled requests in a period, oldest first.
    pub async fn tenant_requests(
        &self,
        tenant: &TenantId,
        period: Period,
    ) -> Result<Vec<RequestSummary>, StoreError> {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM ledger_requests WHERE tenant_id = $1 \
             AND completed_at_ms >= $2 AND completed_at_ms < $3 \
             ORDER BY completed_at_ms, request_id LIMIT $4"
        );
        let limit = i64::try_from(REQUEST_LINES_MAX).unwrap_or(i64::MAX);
        let found: Vec<RequestRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(tenant.as_str())
            .bind(period.from.0)
            .bind(period.until.0)
            .bind(limit)
            .fetch_all(pool)
            .await?);
        found.into_iter().map(rows::request_from_row).collect()
    }

    /// Top-ups a tenant received in a period.
    pub async fn tenant_top_ups(
        &self,
        tenant: &TenantId,
        period: Period,
    ) -> Result<MicroUsd, StoreError> {
        let sql = "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger_transfers \
                   WHERE credit_account = $1 AND kind = 'top-up' AND at_ms >= $2 AND at_ms < $3";
        let (sum,): (i64,) = on_pool!(self, pool => sqlx::query_as(sql)
            .bind(AccountId::Tenant(tenant.clone()).to_string())
            .bind(period.from.0)
            .bind(period.until.0)
            .fetch_one(pool)
            .await?);
        Ok(MicroUsd(sum))
    }

    /// A tenant's invoice for a `YYYY-MM` month. Its total is checked against
    /// the tenant's token-charge transfers in the month; a difference is
    /// reported as corruption rather than printed on an invoice.
    pub async fn invoice(&self, tenant: &TenantId, month: &str) -> Result<Invoice, StoreError> {
        let period = invoice::month_period(month).map_err(|error| StoreError::Corrupt {
            what: "invoice month",
            reason: error.to_string(),
        })?;
        let usage = self.tenant_usage(tenant, period).await?;
        let charged = self.tenant_spent(tenant, period).await?;
        if charged != usage.totals.charged {
            return Err(StoreError::Corrupt {
                what: "invoice",
                reason: format!(
                    "request summaries add up to {} but token charges to {charged}",
                    usage.totals.charged
                ),
            });
        }
        let top_ups = self.tenant_top_ups(tenant, period).await?;
        let balance = self
            .account(&AccountId::Tenant(tenant.clone()))
            .await?
            .map_or(MicroUsd::ZERO, |state| state.balance());
        Ok(Invoice {
            month: month.to_owned(),
            usage,
            top_ups,
            balance,
        })
    }

    /// Stores flags; a flag already stored for a (request, segment, field) is kept.
    pub async fn record_meter_flags(&self, flags: &[MeterFlag]) -> Result<(), StoreError> {
        let sql = "INSERT INTO ledger_meter_flags (request_id, segment, node_id, field, \
                   coordinator_value, node_value, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                   ON CONFLICT (request_id, segment, field) DO NOTHING";
        for flag in flags {
            let coordinator = rows::to_sql("flag coordinator value", flag.coordinator)?;
            let node_value = rows::to_sql("flag node value", flag.node_value)?;
            on_pool!(self, pool => {
                sqlx::query(sql)
                    .bind(flag.request_id.as_str())
                    .bind(i64::from(flag.segment.0))
                    .bind(flag.node.as_str())
                    .bind(flag.field.as_str())
                    .bind(coordinator)
                    .bind(node_value)
                    .bind(flag.at.0)
                    .execute(pool)
                    .await?;
            });
        }
        Ok(())
    }

    /// The newest flags, optionally of one node.
    pub async fn meter_flags(&self, node: Option<&NodeId>) -> Result<Vec<MeterFlag>, StoreError> {
        let sql = "SELECT request_id, segment, node_id, field, coordinator_value, node_value, \
                   at_ms FROM ledger_meter_flags WHERE ($1 IS NULL OR node_id = $1) \
                   ORDER BY at_ms DESC LIMIT $2";
        type FlagRow = (String, i64, String, String, i64, i64, i64);
        let node = node.map(|node| node.to_string());
        let found: Vec<FlagRow> = match &self.backend {
            Backend::Sqlite(pool) => {
                sqlx::query_as(sql)
                    .bind(node)
                    .bind(METER_FLAGS_LISTED_MAX)
                    .fetch_all(pool)
                    .await?
            }
            // PostgreSQL needs to know the parameter's type to test it for NULL.
            Backend::Postgres(pool) => {
                sqlx::query_as(&sql.replace("$1 IS NULL", "$1::text IS NULL"))
                    .bind(node)
                    .bind(METER_FLAGS_LISTED_MAX)
                    .fetch_all(pool)
                    .await?
            }
        };
        let corrupt = |what: &'static str, value: i64| StoreError::Corrupt {
            what,
            reason: format!("negative value {value}"),
        };
        found
            .into_iter()
            .map(|(request, segment, node, field, ours, theirs, at)| {
                Ok(MeterFlag {
                    request_id: RequestId::new(request)?,
                    segment: Segment(
                        u32::try_from(segment).map_err(|_| corrupt("flag segment", segment))?,
                    ),
                    node: NodeId::new(node)?,
                    field,
                    coordinator: u64::try_from(ours).map_err(|_| corrupt("flag value", ours))?,
                    node_value: u64::try_from(theirs)
                        .map_err(|_| corrupt("flag node value", theirs))?,
                    at: TimestampMs(at),
                })
            })
            .collect()
    }
}
