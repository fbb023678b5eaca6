//! The store the gateway and the cell share: tenants, hashed API keys,
//! owners and their keys, enrolled nodes (hashed credentials), owner
//! policies, tenant contracts, and a log of finished requests.
//!
//! What is rebuilt in memory at start-up and never stored: which nodes are
//! connected, their vehicle state, and in-flight generations — those live as
//! long as the connections that carry them.
//!
//! # Backends
//!
//! **SQLite** (the embedded default, [`Store::open`]): one file,
//! [`DATABASE_FILE`], in the data directory, in WAL mode, so that the CLI
//! (`fleetgrid tenants`, `fleetgrid nodes`) writes to it while the server
//! runs. Nothing else to install; one machine.
//!
//! **PostgreSQL** ([`Store::connect`] with a `postgres://` URL): one database
//! shared by gateways and cells on several machines and by the CLI, with its
//! own migrations (`migrations_pg/`, recorded in `store_migrations`, so the
//! ledger may share the database). Names are unique in the schema, so two
//! processes creating the same tenant, owner or node get one winner and a
//! clean `…Exists` error; ids are assigned by the database. Revisions of
//! policies and contracts are taken under an advisory lock and so commit in
//! order, which lets every process follow them by polling (`changes`); a
//! commit also notifies followers, which then read at once.
//!
//! Every method gives the same results on both; the SQL is shared (`$1`
//! placeholders, which SQLite accepts too) except for how a revision is
//! taken (`database`). Other crates that keep tables in the store's
//! database reach it through [`Store::database`] and [`on_database!`].

use std::path::Path;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

pub mod cells;
pub mod certificates;
pub mod changes;
pub mod checks;
pub mod contracts;
mod database;
pub mod owner_policy;
pub mod owners;
pub mod secrets;
pub mod stored_completions;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;

pub use database::{Database, CHANGES_CHANNEL};

/// File name of the database inside the data directory.
pub const DATABASE_FILE: &str = "fleetgrid.db";

/// URL schemes that select PostgreSQL in [`Store::connect`].
const POSTGRES_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// URL scheme of a SQLite database file in [`Store::connect`].
const SQLITE_SCHEME: &str = "sqlite:";

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
    #[error("migration {0} was changed after it was applied to this database")]
    MigrationChanged(i64),
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
    #[error("the database holds what this version cannot read: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether this is the database not being there for now (unreachable,
    /// restarting, out of connections): worth a retry, unlike a refusal.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Database(error) = self else {
            return false;
        };
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed => true,
            // Connection exceptions, insufficient resources, operator
            // intervention (a shutdown, a restart).
            sqlx::Error::Database(database) => database.code().is_some_and(|code| {
                ["08", "53", "57P"]
                    .iter()
                    .any(|class| code.starts_with(class))
            }),
            _ => false,
        }
    }
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

/// `id, name, class` of a tenant.
type TenantRow = (i64, String, String);

/// `name, owner, owner_id, last_seen_ms` of a node.
type NodeRow = (String, String, Option<i64>, Option<i64>);

#[derive(Clone)]
pub struct Store {
    /// The database; the gateway keeps its own tables (idempotency keys,
    /// cloud budgets) in it too.
    database: Database,
}

impl Store {
    /// Opens (creating if needed) the SQLite database in `data_dir` and
    /// migrates it.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::new().filename(data_dir.join(DATABASE_FILE));
        Store::open_sqlite_with(options).await
    }

    /// Opens the store a URL names: `postgres://…` or `postgresql://…` is a
    /// PostgreSQL database, `sqlite:…` a SQLite file, and anything else a
    /// data directory, as in [`Store::open`].
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        if is_postgres_url(url) {
            return Store::connect_postgres_with(url.parse()?).await;
        }
        if url.starts_with(SQLITE_SCHEME) {
            return Store::open_sqlite_with(SqliteConnectOptions::from_str(url)?).await;
        }
        Store::open(Path::new(url)).await
    }

    /// Opens a SQLite database with explicit options; the store's own
    /// settings (WAL, foreign keys, creating the file) are applied on top.
    pub async fn open_sqlite_with(options: SqliteConnectOptions) -> Result<Store, StoreError> {
        let pool = database::open_sqlite(options).await?;
        Ok(Store {
            database: Database::Sqlite(pool),
        })
    }

    /// Connects to PostgreSQL with explicit options (for example a
    /// `search_path` naming the schema) and migrates the schema.
    pub async fn connect_postgres_with(options: PgConnectOptions) -> Result<Store, StoreError> {
        let pool = database::connect_postgres(options).await?;
        Ok(Store {
            database: Database::Postgres(pool),
        })
    }

    /// The pool, for tables other crates keep in the store's database.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.database {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    /// Closes the pool, which every clone of this store shares; later
    /// queries fail.
    pub async fn close(&self) {
        on_database!(&self.database, pool => pool.close().await);
    }

    /// Creates a tenant and its first API key; the key is returned once.
    /// The tenant's name is unique: of two processes creating it at once,
    /// one gets `TenantExists`.
    pub async fn create_tenant(
        &self,
        name: &str,
        class: TenantClass,
        now_ms: i64,
    ) -> Result<(TenantRecord, String), StoreError> {
        let sql = "INSERT INTO tenants (name, class, created_ms) VALUES ($1, $2, $3) \
                   ON CONFLICT (name) DO NOTHING RETURNING id";
        let inserted: Option<(i64,)> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(name)
            .bind(class.as_str())
            .bind(now_ms)
            .fetch_optional(pool)
            .await?);
        let Some((id,)) = inserted else {
            return Err(StoreError::TenantExists(name.to_string()));
        };
        let tenant = TenantRecord {
            id,
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
        let sql = "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, created_ms) \
                   VALUES ($1, $2, $3, $4)";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
            .bind(secrets::hash(&key))
            .bind(&key[..secrets::API_KEY_PREFIX.len() + 6])
            .bind(tenant_id)
            .bind(now_ms)
            .execute(pool)
            .await?;
        });
        Ok(key)
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<TenantRecord>, StoreError> {
        let sql = "SELECT id, name, class FROM tenants WHERE name = $1";
        let row: Option<TenantRow> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        row.map(tenant_from_row).transpose()
    }

    pub async fn tenant_by_id(&self, id: i64) -> Result<Option<TenantRecord>, StoreError> {
        let sql = "SELECT id, name, class FROM tenants WHERE id = $1";
        let row: Option<TenantRow> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(pool)
            .await?);
        row.map(tenant_from_row).transpose()
    }

    /// The tenant owning an unrevoked API key.
    pub async fn tenant_for_api_key(&self, key: &str) -> Result<Option<TenantRecord>, StoreError> {
        let sql = "SELECT t.id, t.name, t.class FROM api_keys k \
                   JOIN tenants t ON t.id = k.tenant_id \
                   WHERE k.key_hash = $1 AND k.revoked_ms IS NULL";
        let row: Option<TenantRow> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(secrets::hash(key))
            .fetch_optional(pool)
            .await?);
        row.map(tenant_from_row).transpose()
    }

    pub async fn list_tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        let sql = "SELECT id, name, class FROM tenants ORDER BY id";
        let rows: Vec<TenantRow> =
            on_database!(&self.database, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter().map(tenant_from_row).collect()
    }

    /// Enrols a node owned by `owner` (an existing owner, or "" for none);
    /// its credential is returned once. The node's name is unique: of two
    /// processes enrolling it at once, one gets `NodeExists`.
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
        let sql = "INSERT INTO nodes (name, credential_hash, owner, owner_id, created_ms) \
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING";
        let inserted = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(name)
            .bind(secrets::hash(&credential))
            .bind(owner)
            .bind(owner_id)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected());
        if inserted == 0 {
            return Err(StoreError::NodeExists(name.to_string()));
        }
        Ok(credential)
    }

    /// Issues a new credential for an enrolled node; the old one stops working.
    pub async fn rotate_node_credential(&self, name: &str) -> Result<Option<String>, StoreError> {
        let credential = secrets::generate(secrets::NODE_CREDENTIAL_PREFIX);
        let sql = "UPDATE nodes SET credential_hash = $1 WHERE name = $2";
        let updated = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(secrets::hash(&credential))
            .bind(name)
            .execute(pool)
            .await?
            .rows_affected());
        Ok((updated == 1).then_some(credential))
    }

    /// The stored credential hash of a node, if it is enrolled.
    pub async fn node_credential_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT credential_hash FROM nodes WHERE name = $1";
        let row: Option<(String,)> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(|(hash,)| hash))
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let sql = "SELECT name, owner, owner_id, last_seen_ms FROM nodes ORDER BY name";
        let rows: Vec<NodeRow> =
            on_database!(&self.database, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(|(name, owner, owner_id, last_seen_ms)| NodeRecord {
                name,
                owner,
                owner_id,
                last_seen_ms,
            })
            .collect())
    }

    /// One enrolled node's record, if it is enrolled.
    pub async fn node_record(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        let sql = "SELECT name, owner, owner_id, last_seen_ms FROM nodes WHERE name = $1";
        let row: Option<NodeRow> = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(|(name, owner, owner_id, last_seen_ms)| NodeRecord {
            name,
            owner,
            owner_id,
            last_seen_ms,
        }))
    }

    pub async fn touch_node(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let sql = "UPDATE nodes SET last_seen_ms = $1 WHERE name = $2";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
            .bind(now_ms)
            .bind(name)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    pub async fn log_request(&self, record: &RequestRecord) -> Result<(), StoreError> {
        let sql = "INSERT INTO requests (id, tenant_id, model, status, prompt_tokens, \
                   completion_tokens, nodes, created_ms, finished_ms, error) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
            .bind(&record.id)
            .bind(record.tenant_id)
            .bind(&record.model)
            .bind(record.status)
            .bind(i64::from(record.prompt_tokens))
            .bind(i64::from(record.completion_tokens))
            .bind(record.nodes.join(","))
            .bind(record.created_ms)
            .bind(record.finished_ms)
            .bind(&record.error)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Number of logged requests with the given status (for tests and the CLI).
    pub async fn count_requests(&self, status: &str) -> Result<i64, StoreError> {
        let sql = "SELECT COUNT(*) FROM requests WHERE status = $1";
        let (count,): (i64,) = on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(status)
            .fetch_one(pool)
            .await?);
        Ok(count)
    }
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    POSTGRES_SCHEMES
        .iter()
        .any(|scheme| url.starts_with(scheme))
}

fn tenant_from_row((id, name, class): TenantRow) -> Result<TenantRecord, StoreError> {
    Ok(TenantRecord {
        id,
        name,
        class: class.parse()?,
    })
}

#[cfg(test)]
mod tests;
