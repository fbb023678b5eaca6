//! The store the gateway and the cell share: SQLite in WAL mode.
//!
//! What is stored: tenants, hashed API keys, enrolled nodes (hashed
//! credentials) and a log of finished requests. What is rebuilt in memory at
//! start-up and never stored: which nodes are connected, their vehicle state,
//! and in-flight generations — those live as long as the connections that
//! carry them. The CLI (`fleetgrid tenants`, `fleetgrid nodes`) writes to the
//! same database while the server runs; WAL lets both proceed.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

pub mod changes;
pub mod contracts;
pub mod owner_policy;
pub mod owners;
pub mod secrets;

/// Connections in the pool; SQLite has one writer, so more would only wait.
const POOL_CONNECTIONS_MAX: u32 = 4;

/// File name of the database inside the data directory.
pub const DATABASE_FILE: &str = "fleetgrid.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrate database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("no tenant named {0:?}")]
    NoSuchTenant(String),
    #[error("node {0:?} already exists")]
    NodeExists(String),
    #[error(transparent)]
    BadClass(#[from] domain::UnknownTenantClass),
    #[error("owner {0:?} already exists")]
    OwnerExists(String),
    #[error("no owner named {0:?}; create it with 'fleetgrid owners create'")]
    NoSuchOwner(String),
    #[error("no node named {0:?}")]
    NoSuchNode(String),
    #[error("invalid tenant contract: {0}")]
    BadContract(String),
}

/// A tenant's priority class; the one definition is in `domain`.
pub use domain::TenantClass;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRecord {
    pub id: i64,
    pub name: String,
    pub class: TenantClass,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub owner: String,
    /// The owner's immutable id; `None` for a node enrolled without owner.
    pub owner_id: Option<i64>,
    pub last_seen_ms: Option<i64>,
}

/// One finished request, as kept in the request log.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub id: String,
    pub tenant_id: i64,
    pub model: String,
    pub status: &'static str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub nodes: Vec<String>,
    pub created_ms: i64,
    pub finished_ms: i64,
    pub error: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    /// The database; the gateway keeps its own tables (idempotency keys,
    /// cloud budgets) in it too.
    pub pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join(DATABASE_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    /// Creates a tenant and its first API key; the key is returned once.
    pub async fn create_tenant(
        &self,
        name: &str,
        class: TenantClass,
        now_ms: i64,
    ) -> Result<(TenantRecord, String), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO tenants (name, class, created_ms) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .bind(name)
        .bind(class.as_str())
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = inserted else {
            return Err(StoreError::TenantExists(name.to_string()));
        };
        let tenant = TenantRecord {
            id: row.try_get("id")?,
            name: name.to_string(),
            class,
        };
        let key = self.insert_api_key(tenant.id, now_ms).await?;
        Ok((tenant, key))
    }

    /// Issues another API key for an existing tenant.
    pub async fn create_api_key(
        &self,
        tenant_name: &str,
        now_ms: i64,
    ) -> Result<String, StoreError> {
        let tenant = self
            .tenant_by_name(tenant_name)
            .await?
            .ok_or_else(|| StoreError::NoSuchTenant(tenant_name.to_string()))?;
        self.insert_api_key(tenant.id, now_ms).await
    }

    async fn insert_api_key(&self, tenant_id: i64, now_ms: i64) -> Result<String, StoreError> {
        let key = secrets::generate(secrets::API_KEY_PREFIX);
        sqlx::query(
            "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, created_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(secrets::hash(&key))
        .bind(&key[..secrets::API_KEY_PREFIX.len() + 6])
        .bind(tenant_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(key)
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<TenantRecord>, StoreError> {
        let row = sqlx::query("SELECT id, name, class FROM tenants WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| tenant_from_row(&row)).transpose()
    }

    /// The tenant owning an unrevoked API key.
    pub async fn tenant_for_api_key(&self, key: &str) -> Result<Option<TenantRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT t.id, t.name, t.class FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.key_hash = ? AND k.revoked_ms IS NULL",
        )
        .bind(secrets::hash(key))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| tenant_from_row(&row)).transpose()
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        let rows = sqlx::query("SELECT id, name, class FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    /// Enrols a node owned by `owner` (an existing owner, or "" for none);
    /// its credential is returned once.
    pub async fn add_node(
        &self,
        name: &str,
        owner: &str,
        now_ms: i64,
    ) -> Result<String, StoreError> {
        let owner_id = match owner {
            "" => None,
            name => Some(
                self.owner_by_name(name)
                    .await?
                    .ok_or_else(|| StoreError::NoSuchOwner(name.to_string()))?
                    .id,
            ),
        };
        let credential = secrets::generate(secrets::NODE_CREDENTIAL_PREFIX);
        let inserted = sqlx::query(
            "INSERT INTO nodes (name, credential_hash, owner, owner_id, created_ms) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(secrets::hash(&credential))
        .bind(owner)
        .bind(owner_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::NodeExists(name.to_string()));
        }
        Ok(credential)
    }

    /// Issues a new credential for an enrolled node; the old one stops working.
    pub async fn rotate_node_credential(&self, name: &str) -> Result<Option<String>, StoreError> {
        let credential = secrets::generate(secrets::NODE_CREDENTIAL_PREFIX);
        let updated = sqlx::query("UPDATE nodes SET credential_hash = ? WHERE name = ?")
            .bind(secrets::hash(&credential))
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok((updated.rows_affected() == 1).then_some(credential))
    }

    /// The stored credential hash of a node, if it is enrolled.
    pub async fn node_credential_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT credential_hash FROM nodes WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.try_get("credential_hash")).transpose()?)
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT name, owner, owner_id, last_seen_ms FROM nodes ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeRecord {
                    name: row.try_get("name")?,
                    owner: row.try_get("owner")?,
                    owner_id: row.try_get("owner_id")?,
                    last_seen_ms: row.try_get("last_seen_ms")?,
                })
            })
            .collect()
    }

    pub async fn touch_node(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET last_seen_ms = ? WHERE name = ?")
            .bind(now_ms)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn log_request(&self, record: &RequestRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO requests (id, tenant_id, model, status, prompt_tokens, completion_tokens, \
             nodes, created_ms, finished_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&record.id)
        .bind(record.tenant_id)
        .bind(&record.model)
        .bind(record.status)
        .bind(record.prompt_tokens)
        .bind(record.completion_tokens)
        .bind(record.nodes.join(","))
        .bind(record.created_ms)
        .bind(record.finished_ms)
        .bind(&record.error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Number of logged requests with the given status (for tests and the CLI).
    pub async fn count_requests(&self, status: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM requests WHERE status = ?")
            .bind(status)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }
}

fn tenant_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<TenantRecord, StoreError> {
    let class: String = row.try_get("class")?;
    Ok(TenantRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        class: class.parse()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tenants_keys_and_nodes_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        let (tenant, key) = store
            .create_tenant("acme", TenantClass::Spot, 1)
            .await
            .expect("create");
        assert_eq!(
            store.tenant_for_api_key(&key).await.expect("lookup"),
            Some(tenant.clone())
        );
        assert_eq!(
            store.tenant_for_api_key("fg-nope").await.expect("lookup"),
            None
        );
        assert!(matches!(
            store.create_tenant("acme", TenantClass::Fleet, 2).await,
            Err(StoreError::TenantExists(_))
        ));
        let second = store.create_api_key("acme", 3).await.expect("second key");
        assert_ne!(second, key);
        assert_eq!(
            store.tenant_for_api_key(&second).await.expect("lookup"),
            Some(tenant)
        );

        store.ensure_owner("alice", 4).await.expect("owner");
        let credential = store.add_node("car-1", "alice", 4).await.expect("add node");
        let stored = store.node_credential_hash("car-1").await.expect("hash");
        assert_eq!(stored, Some(secrets::hash(&credential)));
        assert!(matches!(
            store.add_node("car-1", "alice", 5).await,
            Err(StoreError::NodeExists(_))
        ));

        // A second open of the same directory sees the same data (the CLI does this).
        let again = Store::open(dir.path()).await.expect("reopen");
        assert_eq!(again.list_tenants().await.expect("list").len(), 1);
    }
}
