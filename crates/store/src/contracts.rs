//! Tenant contracts in the store: weight, concurrency and tokens-per-minute
//! quotas and a reserved tenant's guaranteed minimum share, turned into the
//! scheduler's `TenantConfig`.
//!
//! A tenant without a contract gets its class's defaults (weight 1, no
//! tokens-per-minute limit, `TENANT_CONCURRENT_REQUESTS_DEFAULT` requests at
//! once). `max_concurrency` bounds both the requests the gateway holds for
//! the tenant (`tenant_requests`) and its generations in the scheduler. Every
//! contract write takes the next `contract_revision`, so a running
//! coordinator picks up changes made by the CLI with `contracts_since`.

use sqlx::Row;

use crate::{Store, StoreError, TenantClass, TenantRecord};

/// Requests one tenant may hold at the gateway at once (queued, running, or
/// a response still being sent), unless its contract says otherwise
/// (`fleetgrid tenants set --max-concurrency N`); beyond it, 429. An eighth
/// of the gateway's `INFLIGHT_REQUESTS_MAX` (1024), so that one tenant
/// cannot take the gateway.
pub const TENANT_CONCURRENT_REQUESTS_DEFAULT: u32 = 128;

/// The most a guaranteed share can be, permille of the fleet's slots.
pub const MIN_SHARE_PERMILLE_MAX: u16 = 1000;

/// A tenant's contract; `None` is the default for its class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantContract {
    pub weight: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub min_share_permille: Option<u16>,
}

/// A stored contract and the revision at which it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContractChange {
    pub tenant: TenantRecord,
    pub contract: TenantContract,
    pub revision: i64,
}

impl TenantContract {
    /// The scheduler's view of a tenant of `class` under this contract.
    pub fn config(&self, class: TenantClass) -> scheduler::TenantConfig {
        scheduler::TenantConfig {
            class,
            weight: self.weight.unwrap_or(1),
            max_concurrency: self
                .max_concurrency
                .unwrap_or(TENANT_CONCURRENT_REQUESTS_DEFAULT),
            tokens_per_minute: self.tokens_per_minute,
            reserved_min_share_permille: self.min_share_permille.unwrap_or(0),
        }
    }

    /// `self` with the fields of `update` that are set.
    pub fn merged(&self, update: &TenantContract) -> TenantContract {
        TenantContract {
            weight: update.weight.or(self.weight),
            max_concurrency: update.max_concurrency.or(self.max_concurrency),
            tokens_per_minute: update.tokens_per_minute.or(self.tokens_per_minute),
            min_share_permille: update.min_share_permille.or(self.min_share_permille),
        }
    }

    fn check(&self, class: TenantClass) -> Result<(), StoreError> {
        let positive = |value: Option<u32>, what: &str| match value {
            Some(0) => Err(StoreError::BadContract(format!(
                "{what} must be at least 1"
            ))),
            _ => Ok(()),
        };
        positive(self.weight, "weight")?;
        positive(self.max_concurrency, "max concurrency")?;
        positive(self.tokens_per_minute, "tokens per minute")?;
        match self.min_share_permille {
            Some(share) if share > MIN_SHARE_PERMILLE_MAX => Err(StoreError::BadContract(format!(
                "min share {share} permille is above {MIN_SHARE_PERMILLE_MAX}"
            ))),
            Some(share) if share > 0 && class != TenantClass::Reserved => {
                Err(StoreError::BadContract(format!(
                    "a minimum share is guaranteed only to reserved tenants, this one is {}",
                    class.as_str()
                )))
            }
            _ => Ok(()),
        }
    }
}

const CONTRACT_COLUMNS: &str = "id, name, class, weight, max_concurrency, tokens_per_minute, \
     min_share_permille, contract_revision";

impl Store {
    /// The tenant's contract merged with `update`, checked and stored.
    pub async fn set_tenant_contract(
        &self,
        name: &str,
        update: &TenantContract,
    ) -> Result<ContractChange, StoreError> {
        let current = self
            .tenant_contract(name)
            .await?
            .ok_or_else(|| StoreError::NoSuchTenant(name.to_string()))?;
        let contract = current.contract.merged(update);
        contract.check(current.tenant.class)?;
        let row = sqlx::query(
            "UPDATE tenants SET weight = ?, max_concurrency = ?, tokens_per_minute = ?, \
             min_share_permille = ?, \
             contract_revision = (SELECT COALESCE(MAX(contract_revision), 0) + 1 FROM tenants) \
             WHERE name = ? RETURNING contract_revision",
        )
        .bind(contract.weight.map(i64::from))
        .bind(contract.max_concurrency.map(i64::from))
        .bind(contract.tokens_per_minute.map(i64::from))
        .bind(contract.min_share_permille.map(i64::from))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NoSuchTenant(name.to_string()))?;
        Ok(ContractChange {
            tenant: current.tenant,
            contract,
            revision: row.try_get("contract_revision")?,
        })
    }

    /// A tenant with its contract.
    pub async fn tenant_contract(&self, name: &str) -> Result<Option<ContractChange>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CONTRACT_COLUMNS} FROM tenants WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| contract_from_row(&row)).transpose()
    }

    /// Contracts written after `revision`, oldest first, at most `limit`.
    pub async fn contracts_since(
        &self,
        revision: i64,
        limit: u32,
    ) -> Result<Vec<ContractChange>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CONTRACT_COLUMNS} FROM tenants WHERE contract_revision > ? \
             ORDER BY contract_revision LIMIT ?"
        ))
        .bind(revision)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(contract_from_row).collect()
    }
}

fn contract_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ContractChange, StoreError> {
    let class: String = row.try_get("class")?;
    let narrow = |column: &str| -> Result<Option<u32>, StoreError> {
        let value: Option<i64> = row.try_get(column)?;
        value
            .map(|value| {
                u32::try_from(value).map_err(|_| {
                    StoreError::BadContract(format!("stored {column} {value} is out of range"))
                })
            })
            .transpose()
    };
    let share = narrow("min_share_permille")?
        .map(|share| u16::try_from(share).unwrap_or(MIN_SHARE_PERMILLE_MAX));
    Ok(ContractChange {
        tenant: TenantRecord {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            class: class.parse()?,
        },
        contract: TenantContract {
            weight: narrow("weight")?,
            max_concurrency: narrow("max_concurrency")?,
            tokens_per_minute: narrow("tokens_per_minute")?,
            min_share_permille: share,
        },
        revision: row.try_get("contract_revision")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contracts_merge_check_and_feed_the_scheduler() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        store
            .create_tenant("sister", TenantClass::Reserved, 1)
            .await
            .expect("tenant");
        store
            .create_tenant("cheap", TenantClass::Spot, 1)
            .await
            .expect("tenant");
        assert!(store
            .contracts_since(0, 10)
            .await
            .expect("since")
            .is_empty());

        let set = store
            .set_tenant_contract(
                "sister",
                &TenantContract {
                    weight: Some(3),
                    min_share_permille: Some(250),
                    ..TenantContract::default()
                },
            )
            .await
            .expect("set");
        let again = store
            .set_tenant_contract(
                "sister",
                &TenantContract {
                    tokens_per_minute: Some(10_000),
                    ..TenantContract::default()
                },
            )
            .await
            .expect("set");
        assert!(again.revision > set.revision);
        let config = again.contract.config(again.tenant.class);
        assert_eq!(config.weight, 3);
        assert_eq!(config.tokens_per_minute, Some(10_000));
        assert_eq!(config.reserved_min_share_permille, 250);
        assert_eq!(config.class, scheduler::TenantClass::Reserved);

        assert!(matches!(
            store
                .set_tenant_contract(
                    "cheap",
                    &TenantContract {
                        min_share_permille: Some(100),
                        ..TenantContract::default()
                    }
                )
                .await,
            Err(StoreError::BadContract(_))
        ));
        assert!(matches!(
            store
                .set_tenant_contract(
                    "cheap",
                    &TenantContract {
                        max_concurrency: Some(0),
                        ..TenantContract::default()
                    }
                )
                .await,
            Err(StoreError::BadContract(_))
        ));
        assert!(matches!(
            store
                .set_tenant_contract("nobody", &TenantContract::default())
                .await,
            Err(StoreError::NoSuchTenant(_))
        ));
        let changes = store
            .contracts_since(set.revision, 10)
            .await
            .expect("since");
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].tenant.name, "sister");
    }
}
