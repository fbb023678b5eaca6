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

use crate::database::{in_revision_transaction, RevisionKind};
use crate::{on_database, Store, StoreError, TenantClass, TenantRecord};

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

/// A row of `CONTRACT_COLUMNS`, in that order.
type ContractRow = (
    i64,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
);

/// Stores a contract at the next revision; run in a revision transaction,
/// so that revisions commit in the order taken.
const UPDATE_CONTRACT: &str = "UPDATE tenants SET weight = $1, max_concurrency = $2, \
     tokens_per_minute = $3, min_share_permille = $4, \
     contract_revision = (SELECT COALESCE(MAX(contract_revision), 0) + 1 FROM tenants) \
     WHERE name = $5 RETURNING contract_revision";

impl Store {
    /// The tenant's contract merged with `update`, checked and stored. The
    /// read, merge and write are one transaction, so two processes setting
    /// different fields at once both keep theirs.
    pub async fn set_tenant_contract(
        &self,
        name: &str,
        update: &TenantContract,
    ) -> Result<ContractChange, StoreError> {
        let select = format!("SELECT {CONTRACT_COLUMNS} FROM tenants WHERE name = $1");
        let change = in_revision_transaction!(self.database(), RevisionKind::Contracts, tx => {
            let current: Option<ContractRow> = sqlx::query_as(&select)
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            let current = current
                .map(contract_from_row)
                .transpose()?
                .ok_or_else(|| StoreError::NoSuchTenant(name.to_string()))?;
            let contract = current.contract.merged(update);
            contract.check(current.tenant.class)?;
            let (revision,): (i64,) = sqlx::query_as(UPDATE_CONTRACT)
                .bind(contract.weight.map(i64::from))
                .bind(contract.max_concurrency.map(i64::from))
                .bind(contract.tokens_per_minute.map(i64::from))
                .bind(contract.min_share_permille.map(i64::from))
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            ContractChange {
                tenant: current.tenant,
                contract,
                revision,
            }
        });
        Ok(change)
    }

    /// A tenant with its contract.
    pub async fn tenant_contract(&self, name: &str) -> Result<Option<ContractChange>, StoreError> {
        let sql = format!("SELECT {CONTRACT_COLUMNS} FROM tenants WHERE name = $1");
        let row: Option<ContractRow> = on_database!(self.database(), pool => sqlx::query_as(&sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        row.map(contract_from_row).transpose()
    }

    /// Contracts written after `revision`, oldest first, at most `limit`.
    pub async fn contracts_since(
        &self,
        revision: i64,
        limit: u32,
    ) -> Result<Vec<ContractChange>, StoreError> {
        let sql = format!(
            "SELECT {CONTRACT_COLUMNS} FROM tenants WHERE contract_revision > $1 \
             ORDER BY contract_revision LIMIT $2"
        );
        let rows: Vec<ContractRow> = on_database!(self.database(), pool => sqlx::query_as(&sql)
            .bind(revision)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(contract_from_row).collect()
    }
}

fn contract_from_row(row: ContractRow) -> Result<ContractChange, StoreError> {
    let (id, name, class, weight, max_concurrency, tokens_per_minute, min_share, revision) = row;
    let narrow = |column: &str, value: Option<i64>| -> Result<Option<u32>, StoreError> {
        value
            .map(|value| {
                u32::try_from(value).map_err(|_| {
                    StoreError::BadContract(format!("stored {column} {value} is out of range"))
                })
            })
            .transpose()
    };
    let share = narrow("min_share_permille", min_share)?
        .map(|share| u16::try_from(share).unwrap_or(MIN_SHARE_PERMILLE_MAX));
    Ok(ContractChange {
        tenant: TenantRecord {
            id,
            name,
            class: class.parse()?,
        },
        contract: TenantContract {
            weight: narrow("weight", weight)?,
            max_concurrency: narrow("max_concurrency", max_concurrency)?,
            tokens_per_minute: narrow("tokens_per_minute", tokens_per_minute)?,
            min_share_permille: share,
        },
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestStore;

    /// Rounds of two processes changing one tenant's contract at once.
    const RACES: usize = 10;

    crate::on_each_backend!(
        contracts_merge_check_and_feed_the_scheduler,
        two_processes_changing_different_fields_at_once_both_keep_theirs,
    );

    async fn two_processes_changing_different_fields_at_once_both_keep_theirs(test: &TestStore) {
        let other = test.another_handle().await;
        for race in 0..RACES {
            let name = format!("tenant-{race}");
            test.store
                .create_tenant(&name, TenantClass::Spot, 1)
                .await
                .expect("tenant");
            let weight = TenantContract {
                weight: Some(5),
                ..TenantContract::default()
            };
            let quota = TenantContract {
                tokens_per_minute: Some(9_000),
                ..TenantContract::default()
            };
            let (left, right) = tokio::join!(
                test.store.set_tenant_contract(&name, &weight),
                other.set_tenant_contract(&name, &quota),
            );
            let (left, right) = (left.expect("set"), right.expect("set"));
            assert_ne!(left.revision, right.revision);
            let stored = test
                .store
                .tenant_contract(&name)
                .await
                .expect("read")
                .expect("tenant");
            assert_eq!(stored.contract.weight, Some(5), "race {race}");
            assert_eq!(
                stored.contract.tokens_per_minute,
                Some(9_000),
                "race {race}"
            );
            assert_eq!(stored.revision, left.revision.max(right.revision));
        }
        other.close().await;
    }

    async fn contracts_merge_check_and_feed_the_scheduler(test: &TestStore) {
        let store = &test.store;
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
