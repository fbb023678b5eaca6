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

use sqlx::Row;

use super::MicroUsd;
use crate::store::{Store, StoreError};

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
        sqlx::query(
            "INSERT INTO cloud_budgets (tenant_id, cap_micro_usd, updated_ms) VALUES (?, ?, ?) \
             ON CONFLICT (tenant_id) DO UPDATE SET cap_micro_usd = excluded.cap_micro_usd, \
             updated_ms = excluded.updated_ms",
        )
        .bind(tenant)
        .bind(cap.map(|cap| cap.0))
        .bind(now_ms)
        .execute(&self.store.pool)
        .await?;
        Ok(())
    }

    /// Starts a tenant's spend from zero again (e.g. a new billing period).
    pub async fn reset_spent(&self, tenant_name: &str, now_ms: i64) -> Result<(), StoreError> {
        let tenant = self.tenant_id(tenant_name).await?;
        sqlx::query(
            "UPDATE cloud_budgets SET spent_micro_usd = 0, updated_ms = ? WHERE tenant_id = ?",
        )
        .bind(now_ms)
        .bind(tenant)
        .execute(&self.store.pool)
        .await?;
        Ok(())
    }

    pub async fn status(&self, tenant_id: i64) -> Result<BudgetStatus, StoreError> {
        let row = sqlx::query(
            "SELECT cap_micro_usd, spent_micro_usd FROM cloud_budgets WHERE tenant_id = ?",
        )
        .bind(tenant_id)
        .fetch_optional(&self.store.pool)
        .await?;
        let Some(row) = row else {
            return Ok(BudgetStatus::default());
        };
        let cap: Option<i64> = row.try_get("cap_micro_usd")?;
        Ok(BudgetStatus {
            cap: cap.map(MicroUsd),
            spent: MicroUsd(row.try_get("spent_micro_usd")?),
        })
    }

    /// Adds what a cloud call cost the tenant.
    pub async fn add_spent(
        &self,
        tenant_id: i64,
        amount: MicroUsd,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cloud_budgets (tenant_id, spent_micro_usd, updated_ms) VALUES (?, ?, ?) \
             ON CONFLICT (tenant_id) DO UPDATE SET \
             spent_micro_usd = cloud_budgets.spent_micro_usd + excluded.spent_micro_usd, \
             updated_ms = excluded.updated_ms",
        )
        .bind(tenant_id)
        .bind(amount.0.max(0))
        .bind(now_ms)
        .execute(&self.store.pool)
        .await?;
        Ok(())
    }

    /// Every tenant with its cap and spend, by name.
    pub async fn list(&self) -> Result<Vec<TenantBudget>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.name, b.cap_micro_usd, COALESCE(b.spent_micro_usd, 0) AS spent \
             FROM tenants t LEFT JOIN cloud_budgets b ON b.tenant_id = t.id ORDER BY t.name",
        )
        .fetch_all(&self.store.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let cap: Option<i64> = row.try_get("cap_micro_usd")?;
                Ok(TenantBudget {
                    tenant: row.try_get("name")?,
                    status: BudgetStatus {
                        cap: cap.map(MicroUsd),
                        spent: MicroUsd(row.try_get("spent")?),
                    },
                })
            })
            .collect()
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
    use crate::store::TenantClass;

    #[tokio::test]
    async fn a_cap_stops_cloud_calls_once_the_spend_reaches_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
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
}
