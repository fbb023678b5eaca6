//! The cloud spend of settled requests, kept for the gateway's per-tenant
//! cloud budgets, which live in another database.
//!
//! Settling a request with a cloud segment writes its spend (the part of the
//! charge its cloud segments earned) in the settlement's own transaction,
//! uncounted. The gateway adds it to the tenant's budget and then marks it
//! counted; whatever a failed write or a crash left uncounted, the gateway
//! counts when it next starts. So a settled cloud part always reaches the
//! budget: once, or, if the process dies between adding and marking, twice,
//! which errs on the side of the cap.

use crate::core::{MicroUsd, RequestId, TenantId, TimestampMs};
use crate::settlement::{CompletedRequest, Settlement};

use super::{Backend, Store, StoreError};

/// The most uncounted rows one listing returns.
pub const UNCOUNTED_CLOUD_SPEND_LISTED_MAX: usize = 10_000;

pub(super) const INSERT_CLOUD_SPEND: &str = "INSERT INTO ledger_cloud_spend \
     (request_id, tenant_id, amount, completed_at_ms) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (request_id) DO NOTHING";

/// `request_id, tenant_id, amount, completed_at_ms`.
type CloudSpendRow = (String, String, i64, i64);

/// What one settled request spent in the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSpend {
    pub request_id: RequestId,
    pub tenant: TenantId,
    pub amount: MicroUsd,
    pub completed_at: TimestampMs,
}

impl CloudSpend {
    /// The cloud spend of a settled request; `None` without a cloud segment.
    pub fn of(request: &CompletedRequest, settlement: &Settlement) -> Option<CloudSpend> {
        let in_cloud = request
            .segments
            .iter()
            .any(|segment| segment.server == crate::metering::Server::Cloud);
        in_cloud.then(|| CloudSpend {
            request_id: request.request_id.clone(),
            tenant: request.tenant.clone(),
            amount: settlement.cloud_charge,
            completed_at: request.completed_at,
        })
    }
}

impl Store {
    /// Settled cloud spend not yet counted, oldest first, at most `limit`
    /// rows (and at most [`UNCOUNTED_CLOUD_SPEND_LISTED_MAX`]); with
    /// `request`, that request's only.
    pub async fn uncounted_cloud_spend(
        &self,
        request: Option<&RequestId>,
        limit: usize,
    ) -> Result<Vec<CloudSpend>, StoreError> {
        let limit = limit.min(UNCOUNTED_CLOUD_SPEND_LISTED_MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = "SELECT request_id, tenant_id, amount, completed_at_ms FROM ledger_cloud_spend \
                   WHERE counted_at_ms IS NULL AND ($1 IS NULL OR request_id = $1) \
                   ORDER BY completed_at_ms, request_id LIMIT $2";
        let rows: Vec<CloudSpendRow> = on_pool!(self, pool => sqlx::query_as(sql)
            .bind(request.map(RequestId::as_str))
            .bind(limit)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(cloud_spend_from_row).collect()
    }

    /// Marks a request's cloud spend as counted in its tenant's budget;
    /// `false` when it was counted already (or there is none).
    pub async fn mark_cloud_spend_counted(
        &self,
        request: &RequestId,
        at: TimestampMs,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE ledger_cloud_spend SET counted_at_ms = $1 \
                   WHERE request_id = $2 AND counted_at_ms IS NULL";
        let updated = on_pool!(self, pool => sqlx::query(sql)
            .bind(at.0)
            .bind(request.as_str())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(updated == 1)
    }
}

fn cloud_spend_from_row(row: CloudSpendRow) -> Result<CloudSpend, StoreError> {
    let (request_id, tenant, amount, completed_at_ms) = row;
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "cloud spend",
        reason,
    };
    Ok(CloudSpend {
        request_id: RequestId::new(request_id).map_err(|error| corrupt(error.to_string()))?,
        tenant: TenantId::new(tenant).map_err(|error| corrupt(error.to_string()))?,
        amount: MicroUsd(amount),
        completed_at: TimestampMs(completed_at_ms),
    })
}
