//! Per-tenant caps on cloud spend, kept in the coordinator's database
//! (`cloud_budgets`, migration 0004) so that the CLI can set them while the
//! server runs.
//!
//! The spend is what the tenant is charged for cloud calls (the price
//! sheet's upstream price plus its cloud margin, as the ledger charges it),
//! added once each call's request is settled. The cap is checked before a call
//! starts: calls already in flight when it is reached finish, so the spend
//! may pass the cap by at most what those calls cost. Once spend ≥ cap,
//! `auto` stays on the fleet and `cloud/...` is refused with 402.
//!
//! **Counting spend across two databases.** The ledger writes a request's
//! cloud spend in the settlement's own transaction, marked uncounted
//! (`ledger::store::CloudSpend`). [`CloudBudgets::count_settled`] adds it
//! here and then marks it counted; a write here that fails, or a crash
//! between settling and counting, leaves it uncounted in the ledger, and
//! [`CloudBudgets::count_uncounted`] counts it when the gateway next starts.
//! So no settled cloud part is missing from a budget; one whose process died
//! between adding and marking is counted twice, erring on the cap's side.

use super::MicroUsd;
use crate::store::{on_database, Store, StoreError};
use ledger::core::{RequestId, TimestampMs};
use ledger::store::{
    CloudSpend, Store as Ledger, StoreError as LedgerStoreError, UNCOUNTED_CLOUD_SPEND_LISTED_MAX,
};

/// Why settled cloud spend could not be counted; it stays uncounted in the
/// ledger and is counted at the next start.
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    #[error("read or mark the ledger's cloud spend: {0}")]
    Ledger(#[from] LedgerStoreError),
    #[error("add to the cloud budget: {0}")]
    Budget(#[from] StoreError),
    #[error("the ledger's tenant {0} is not keyed by a tenant id")]
    Tenant(String),
}

/// A tenant's cap and spend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetStatus {
    /// `None`: no cap.
    pub cap: Option<MicroUsd>,
    pub spent: MicroUsd,
}

impl BudgetStatus {
    /// Whether another cloud call may start.
    pub fn allows_cloud(&self) -> bool {
        self.cap.is_none_or(|cap| self.spent < cap)
    }
}

/// One row of `fleetgrid cloud budget list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantBudget {
    pub tenant: String,
    pub status: BudgetStatus,
}

#[derive(Clone)]
pub struct CloudBudgets {
    store: Store,
}

impl CloudBudgets {
    pub fn new(store: Store) -> CloudBudgets {
        CloudBudgets { store }
    }

    /// Sets (or, with `None`, removes) a tenant's cap; the spend is kept.
    pub async fn set_cap(
        &self,
        tenant_name: &str,
        cap: Option<MicroUsd>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tenant = self.tenant_id(tenant_name).await?;
        let sql = "INSERT INTO cloud_budgets (tenant_id, cap_micro_usd, updated_ms) \
                   VALUES ($1, $2, $3) \
                   ON CONFLICT (tenant_id) DO UPDATE SET cap_micro_usd = excluded.cap_micro_usd, \
                   updated_ms = excluded.updated_ms";
        on_database!(self.store.database(), pool => {
            sqlx::query(sql)
            .bind(tenant)
            .bind(cap.map(|cap| cap.0))
            .bind(now_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Starts a tenant's spend from zero again (e.g. a new billing period).
    pub async fn reset_spent(&self, tenant_name: &str, now_ms: i64) -> Result<(), StoreError> {
        let tenant = self.tenant_id(tenant_name).await?;
        let sql = "UPDATE cloud_budgets SET spent_micro_usd = 0, updated_ms = $1 \
                   WHERE tenant_id = $2";
        on_database!(self.store.database(), pool => {
            sqlx::query(sql)
            .bind(now_ms)
            .bind(tenant)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn status(&self, tenant_id: i64) -> Result<BudgetStatus, StoreError> {
        let sql = "SELECT cap_micro_usd, spent_micro_usd FROM cloud_budgets WHERE tenant_id = $1";
        let row: Option<(Option<i64>, i64)> = on_database!(self.store.database(), pool => sqlx::query_as(sql)
                .bind(tenant_id)
                .fetch_optional(pool)
                .await?);
        let Some((cap, spent)) = row else {
            return Ok(BudgetStatus::default());
        };
        Ok(BudgetStatus {
            cap: cap.map(MicroUsd),
            spent: MicroUsd(spent),
        })
    }

    /// Adds what a cloud call cost the tenant.
    pub async fn add_spent(
        &self,
        tenant_id: i64,
        amount: MicroUsd,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // One statement, so that gateways adding at once both count.
        let sql = "INSERT INTO cloud_budgets (tenant_id, spent_micro_usd, updated_ms) \
                   VALUES ($1, $2, $3) \
                   ON CONFLICT (tenant_id) DO UPDATE SET \
                   spent_micro_usd = cloud_budgets.spent_micro_usd + excluded.spent_micro_usd, \
                   updated_ms = excluded.updated_ms";
        on_database!(self.store.database(), pool => {
            sqlx::query(sql)
            .bind(tenant_id)
            .bind(amount.0.max(0))
            .bind(now_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Counts a settled request's cloud spend, as the ledger recorded it in
    /// the settlement, in its tenant's budget, and returns it; `None` when
    /// there is nothing left to count (no cloud part, or counted already).
    pub async fn count_settled(
        &self,
        ledger: &Ledger,
        request: &RequestId,
        now_ms: i64,
    ) -> Result<Option<MicroUsd>, CountError> {
        let uncounted = ledger.uncounted_cloud_spend(Some(request), 1).await?;
        let Some(spend) = uncounted.first() else {
            return Ok(None);
        };
        self.count(ledger, spend, now_ms).await?;
        Ok(Some(spend.amount))
    }

    /// Counts every settled cloud spend a failed write or a crash left
    /// uncounted, oldest first; run when the gateway starts, before it
    /// serves. Returns how many requests' spend it counted. One that fails
    /// is logged and left for the next start; the others are counted.
    pub async fn count_uncounted(&self, ledger: &Ledger, now_ms: i64) -> Result<usize, CountError> {
        let mut counted = 0;
        loop {
            let batch = ledger
                .uncounted_cloud_spend(None, UNCOUNTED_CLOUD_SPEND_LISTED_MAX)
                .await?;
            let mut failed = 0;
            for spend in &batch {
                match self.count(ledger, spend, now_ms).await {
                    Ok(()) => counted += 1,
                    Err(error) => {
                        failed += 1;
                        tracing::error!(%error, request_id = %spend.request_id, "count settled cloud spend");
                    }
                }
            }
            // A batch with failures would be read again: stop until the
            // next start rather than loop on them.
            if failed > 0 || batch.len() < UNCOUNTED_CLOUD_SPEND_LISTED_MAX {
                return Ok(counted);
            }
        }
    }

    /// Adds one request's spend here, then marks it counted in the ledger.
    async fn count(
        &self,
        ledger: &Ledger,
        spend: &CloudSpend,
        now_ms: i64,
    ) -> Result<(), CountError> {
        let tenant_id = crate::billing_accounts::tenant_id_of(&spend.tenant)
            .ok_or_else(|| CountError::Tenant(spend.tenant.to_string()))?;
        self.add_spent(tenant_id, spend.amount, now_ms).await?;
        ledger
            .mark_cloud_spend_counted(&spend.request_id, TimestampMs(now_ms))
            .await?;
        Ok(())
    }

    /// Every tenant with its cap and spend, by name.
    pub async fn list(&self) -> Result<Vec<TenantBudget>, StoreError> {
        let sql = "SELECT t.name, b.cap_micro_usd, COALESCE(b.spent_micro_usd, 0) AS spent \
                   FROM tenants t LEFT JOIN cloud_budgets b ON b.tenant_id = t.id ORDER BY t.name";
        let rows: Vec<(String, Option<i64>, i64)> = on_database!(self.store.database(), pool => sqlx::query_as(sql)
                .fetch_all(pool)
                .await?);
        Ok(rows
            .into_iter()
            .map(|(tenant, cap, spent)| TenantBudget {
                tenant,
                status: BudgetStatus {
                    cap: cap.map(MicroUsd),
                    spent: MicroUsd(spent),
                },
            })
            .collect())
    }

    async fn tenant_id(&self, tenant_name: &str) -> Result<i64, StoreError> {
        Ok(self
            .store
            .tenant_by_name(tenant_name)
            .await?
            .ok_or_else(|| StoreError::NoSuchTenant(tenant_name.to_string()))?
            .id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestStore;
    use crate::store::TenantClass;

    /// Spend added at once by each of two gateways.
    const ADDS_PER_GATEWAY: i64 = 20;

    store::on_each_backend!(
        a_cap_stops_cloud_calls_once_the_spend_reaches_it,
        cloud_spend_whose_budget_write_failed_is_counted_at_the_next_start,
        spend_added_by_two_gateways_at_once_all_counts,
    );

    async fn a_cap_stops_cloud_calls_once_the_spend_reaches_it(test: &TestStore) {
        let store = test.store.clone();
        let (tenant, _) = store
            .create_tenant("acme", TenantClass::Spot, 1)
            .await
            .expect("tenant");
        let budgets = CloudBudgets::new(store);
        assert!(budgets
            .status(tenant.id)
            .await
            .expect("status")
            .allows_cloud());

        budgets
            .add_spent(tenant.id, MicroUsd(700), 2)
            .await
            .expect("spend");
        budgets
            .set_cap("acme", Some(MicroUsd(1_000)), 3)
            .await
            .expect("cap");
        let status = budgets.status(tenant.id).await.expect("status");
        assert_eq!(status.spent, MicroUsd(700));
        assert!(status.allows_cloud());

        budgets
            .add_spent(tenant.id, MicroUsd(300), 4)
            .await
            .expect("spend");
        assert!(!budgets
            .status(tenant.id)
            .await
            .expect("status")
            .allows_cloud());

        budgets.reset_spent("acme", 5).await.expect("reset");
        assert!(budgets
            .status(tenant.id)
            .await
            .expect("status")
            .allows_cloud());
        budgets.set_cap("acme", None, 6).await.expect("uncap");
        let listed = budgets.list().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status.cap, None);
        assert!(matches!(
            budgets.set_cap("nobody", None, 7).await,
            Err(StoreError::NoSuchTenant(_))
        ));
    }

    /// A settled request with a cloud segment, for a tenant keyed by id.
    async fn settle_cloud_request(ledger: &Ledger, tenant_id: i64, request: &str) -> MicroUsd {
        use ledger::core::{DurationMs, ModelId, Segment, TokenCount};
        use ledger::metering::{Server, UsageSegment};
        use ledger::settlement::CompletedRequest;

        let prices = ledger::price_file::PriceConfig::default_sheet().expect("prices");
        let book = ledger::pricing::PriceBook::new(prices.sheet).expect("book");
        let tenant = crate::billing_accounts::tenant_key(tenant_id);
        ledger.ensure_tenant(&tenant, true).await.expect("account");
        let request_id = RequestId::new(request).expect("request id");
        let completed = CompletedRequest {
            request_id: request_id.clone(),
            tenant,
            class: ledger::pricing::TenantClass::Spot,
            admitted_at: TimestampMs(1_700_000_000_000),
            completed_at: TimestampMs(1_700_000_001_000),
            segments: vec![UsageSegment {
                request_id,
                segment: Segment(0),
                server: Server::Cloud,
                model: ModelId::new("cloud/gpt-4o-mini").expect("model"),
                prompt_tokens: TokenCount(40_000),
                completion_tokens: TokenCount(20_000),
                compute: DurationMs(900),
                started_at: TimestampMs(1_700_000_000_100),
            }],
        };
        let receipt = ledger.settle(&completed, &book).await.expect("settle");
        assert!(receipt.charge.is_positive());
        receipt.charge
    }

    /// The ledger beside a test store: its own file next to the store's on
    /// SQLite, the store's own schema on PostgreSQL (both keep their tables
    /// and migrations apart in one database).
    async fn ledger_beside(test: &TestStore) -> Ledger {
        let ledger = match (test.directory(), test.postgres_options()) {
            (Some(dir), _) => Ledger::open_sqlite(&dir.join("ledger.db")).await,
            (None, Some(options)) => Ledger::connect_postgres_with(options).await,
            (None, None) => panic!("a test store is on one backend or the other"),
        };
        ledger.expect("ledger")
    }

    async fn cloud_spend_whose_budget_write_failed_is_counted_at_the_next_start(test: &TestStore) {
        let ledger = ledger_beside(test).await;
        let store = test.another_handle().await;
        let (tenant, _) = store
            .create_tenant("acme", TenantClass::Spot, 1)
            .await
            .expect("tenant");

        // Counted as it settles: once, however often it is counted again.
        let first = settle_cloud_request(&ledger, tenant.id, "chatcmpl-counted").await;
        let budgets = CloudBudgets::new(store.clone());
        let request = RequestId::new("chatcmpl-counted").expect("id");
        let counted = budgets.count_settled(&ledger, &request, 2).await;
        assert_eq!(counted.expect("count"), Some(first));
        let again = budgets.count_settled(&ledger, &request, 3).await;
        assert_eq!(again.expect("count"), None);

        // Settled, but the coordinator's database fails before the spend
        // reaches the budget.
        let second = settle_cloud_request(&ledger, tenant.id, "chatcmpl-lost").await;
        store.close().await;
        let request = RequestId::new("chatcmpl-lost").expect("id");
        assert!(budgets.count_settled(&ledger, &request, 4).await.is_err());

        // The next start counts what was settled and not counted, once.
        let store = test.another_handle().await;
        let budgets = CloudBudgets::new(store);
        assert_eq!(
            budgets.status(tenant.id).await.expect("status").spent,
            first
        );
        assert_eq!(budgets.count_uncounted(&ledger, 5).await.expect("count"), 1);
        let spent = budgets.status(tenant.id).await.expect("status").spent;
        assert_eq!(spent, MicroUsd(first.0 + second.0));
        assert_eq!(budgets.count_uncounted(&ledger, 6).await.expect("count"), 0);
        assert_eq!(
            budgets.status(tenant.id).await.expect("status").spent,
            spent
        );
        ledger.close().await;
    }

    /// Two gateways on one database add what their cloud calls cost at the
    /// same moment: every amount counts.
    async fn spend_added_by_two_gateways_at_once_all_counts(test: &TestStore) {
        let (tenant, _) = test
            .store
            .create_tenant("acme", TenantClass::Spot, 1)
            .await
            .expect("tenant");
        let other = test.another_handle().await;
        let gateways = [
            CloudBudgets::new(test.store.clone()),
            CloudBudgets::new(other.clone()),
        ];
        let mut adds = tokio::task::JoinSet::new();
        for add in 0..ADDS_PER_GATEWAY {
            for budgets in &gateways {
                let budgets = budgets.clone();
                adds.spawn(
                    async move { budgets.add_spent(tenant.id, MicroUsd(add + 1), add).await },
                );
            }
        }
        while let Some(added) = adds.join_next().await {
            added.expect("task").expect("add");
        }
        let each = ADDS_PER_GATEWAY * (ADDS_PER_GATEWAY + 1) / 2;
        assert_eq!(
            gateways[0].status(tenant.id).await.expect("status").spent,
            MicroUsd(2 * each)
        );
        other.close().await;
    }
}
