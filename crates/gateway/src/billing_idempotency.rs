//! Storage of Idempotency-Key records in the coordinator's database (table
//! `idempotency_keys`, made by the store's migrations). See `api::idempotency` for the
//! protocol; this module only keeps the rows.
//!
//! A finished request is kept with its response and its settlement, the
//! ledger's `CompletedRequest` in a JSON shape of its own (`kept`).
//!
//! A running row belongs to one process (its boot id) under a lease: that
//! process renews the leases of all its running rows in one statement,
//! `IDEMPOTENCY_RENEWALS_PER_LEASE` times per lease. While the lease holds,
//! a retry through any gateway is told the request is still running. Once it
//! expired, the process is taken to be gone (killed mid-request, before it
//! kept any response, so nothing of it was settled): the next request with
//! that key takes the row over and runs afresh. Should the first process
//! come back and finish after all, it can no longer keep its response (the
//! row names another boot), so it settles nothing: the request is charged
//! once, by the process that kept it. Leases are read and set by the
//! database's clock, so the gateways' clocks need not agree.
//!
//! The rows live in the store's database, SQLite or PostgreSQL, through a
//! pool of their own with durable commits (`synchronous=FULL` on SQLite,
//! `synchronous_commit=on` on PostgreSQL, whatever the server's default):
//! a kept response must survive a crash of the process or the machine.

mod kept;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger::settlement::CompletedRequest;
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio_util::sync::CancellationToken;

use crate::billing::BillingError;
use crate::store::{on_database, Database, Store, DATABASE_FILE};
use kept::{settlement_from_json, settlement_to_json};

/// How long a key is remembered; a retry later than this runs afresh.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest key accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// How long a running key stays its process's without a renewal: how long a
/// retry of a request whose gateway died waits before it runs again.
pub const IDEMPOTENCY_LEASE_DEFAULT: Duration = Duration::from_secs(10);

/// The shortest lease accepted: renewals run several times per lease, and
/// each may take up to `IDEMPOTENCY_RENEWAL_TIMEOUT`.
pub const IDEMPOTENCY_LEASE_MIN: Duration = Duration::from_millis(500);

/// Renewals per lease: a lease survives two renewals in a row that fail.
pub const IDEMPOTENCY_RENEWALS_PER_LEASE: u32 = 3;

/// The most one renewal waits for the database.
const IDEMPOTENCY_RENEWAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections of the idempotency pool on SQLite (one writer at a time).
const CONNECTIONS_MAX: u32 = 2;

/// Connections of the idempotency pool on PostgreSQL, per process.
const POSTGRES_CONNECTIONS_MAX: u32 = 4;

/// How long a SQLite writer waits for the write lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a query waits for a PostgreSQL connection.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The database's clock in epoch milliseconds, in each dialect.
const SQLITE_NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
const POSTGRES_NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// `request_hash, state, boot_id, response, settlement`.
type KeyRow = (String, String, String, Option<String>, Option<String>);

/// How the running keys' leases behave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// How long a running key stays this process's unless it renews it.
    pub lease: Duration,
}

impl Default for IdempotencyConfig {
    fn default() -> IdempotencyConfig {
        IdempotencyConfig {
            lease: IDEMPOTENCY_LEASE_DEFAULT,
        }
    }
}

impl IdempotencyConfig {
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    fn renewal_interval(&self) -> Duration {
        self.lease / IDEMPOTENCY_RENEWALS_PER_LEASE
    }
}

/// What an earlier request with the same key left.
pub enum Found {
    /// None: this request runs, and owns the slot.
    Run(Slot),
    /// Same body, finished: its response, to replay, and its settlement,
    /// to settle again (or why it cannot be read back).
    Done {
        response: Value,
        settlement: Result<CompletedRequest, String>,
    },
    /// Same body, still running in this process or in another whose lease
    /// holds.
    InProgress,
    /// Another body under the same key.
    Mismatch,
}

pub struct IdempotencyStore {
    leases: Arc<Leases>,
    /// Stops the renewals; cancelled when the store is dropped.
    renewals: CancellationToken,
}

/// The rows' pool, this boot's id, and what the renewals need.
struct Leases {
    database: Database,
    boot_id: String,
    config: IdempotencyConfig,
    /// Slots this boot holds and has neither kept nor released: renewals
    /// write only while there are some.
    running: AtomicUsize,
}

impl IdempotencyStore {
    /// Opens its own pool on the SQLite database in `data_dir`, with durable
    /// commits: a kept response must survive a crash of the process.
    pub async fn open(data_dir: &Path) -> Result<IdempotencyStore, sqlx::Error> {
        IdempotencyStore::open_with(data_dir, &IdempotencyConfig::default()).await
    }

    /// `open`, with the leases configured (see `for_store_with`).
    pub async fn open_with(
        data_dir: &Path,
        config: &IdempotencyConfig,
    ) -> Result<IdempotencyStore, sqlx::Error> {
        let options = SqliteConnectOptions::new().filename(data_dir.join(DATABASE_FILE));
        IdempotencyStore::open_sqlite(options, config).await
    }

    /// Opens its own pool, with durable commits, on the database `store`
    /// uses (SQLite or PostgreSQL), whose migrations made the table.
    pub async fn for_store(store: &Store) -> Result<IdempotencyStore, sqlx::Error> {
        IdempotencyStore::for_store_with(store, &IdempotencyConfig::default()).await
    }

    /// `for_store`, with the leases configured. A lease shorter than
    /// `IDEMPOTENCY_LEASE_MIN` is raised to it.
    pub async fn for_store_with(
        store: &Store,
        config: &IdempotencyConfig,
    ) -> Result<IdempotencyStore, sqlx::Error> {
        match store.database() {
            Database::Sqlite(pool) => {
                IdempotencyStore::open_sqlite((*pool.connect_options()).clone(), config).await
            }
            Database::Postgres(pool) => {
                let options = (*pool.connect_options())
                    .clone()
                    .options([("synchronous_commit", "on")]);
                let pool = PgPoolOptions::new()
                    .max_connections(POSTGRES_CONNECTIONS_MAX)
                    .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?;
                Ok(IdempotencyStore::with_database(
                    Database::Postgres(pool),
                    config,
                ))
            }
        }
    }

    async fn open_sqlite(
        options: SqliteConnectOptions,
        config: &IdempotencyConfig,
    ) -> Result<IdempotencyStore, sqlx::Error> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        Ok(IdempotencyStore::with_database(
            Database::Sqlite(pool),
            config,
        ))
    }

    /// Starts the renewals, which run until the store is dropped.
    fn with_database(database: Database, config: &IdempotencyConfig) -> IdempotencyStore {
        let config = IdempotencyConfig {
            lease: config.lease.max(IDEMPOTENCY_LEASE_MIN),
        };
        let leases = Arc::new(Leases {
            database,
            boot_id: uuid::Uuid::new_v4().simple().to_string(),
            config,
            running: AtomicUsize::new(0),
        });
        let renewals = CancellationToken::new();
        tokio::spawn(renew_until_stopped(Arc::clone(&leases), renewals.clone()));
        IdempotencyStore { leases, renewals }
    }

    /// Stops renewing this process's leases, as a process that hangs or
    /// dies does: its running keys pass to the next retry one lease later.
    /// Tests use it to stand for a gateway that died.
    pub fn stop_renewing(&self) {
        self.renewals.cancel();
    }

    /// Claims `key` for a request with `hash`, or reports what holds it.
    pub async fn claim(
        self: &Arc<Self>,
        tenant_id: i64,
        key: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<Found, BillingError> {
        let leases = &self.leases;
        leases.forget_expired(now_ms).await?;
        if leases.insert_running(tenant_id, key, hash, now_ms).await? {
            return Ok(Found::Run(self.slot(tenant_id, key)));
        }
        let Some((stored_hash, state, boot_id, response, settlement)) =
            leases.row(tenant_id, key).await?
        else {
            // Deleted between our insert and our read (retention): the
            // caller may simply try again.
            return Ok(Found::InProgress);
        };
        if stored_hash != hash {
            return Ok(Found::Mismatch);
        }
        if state == "done" {
            let response = response
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .unwrap_or(Value::Null);
            return Ok(Found::Done {
                response,
                settlement: settlement_from_json(settlement.as_deref().unwrap_or("null")),
            });
        }
        if boot_id == leases.boot_id {
            return Ok(Found::InProgress);
        }
        if leases.take_over(tenant_id, key, &boot_id, now_ms).await? {
            tracing::info!(
                tenant_id,
                "taking over an idempotency key whose process let its lease expire"
            );
            return Ok(Found::Run(self.slot(tenant_id, key)));
        }
        Ok(Found::InProgress)
    }

    fn slot(self: &Arc<Self>, tenant_id: i64, key: &str) -> Slot {
        self.leases.running.fetch_add(1, Ordering::Relaxed);
        Slot {
            store: Arc::clone(self),
            tenant_id,
            key: key.to_string(),
            done: false,
        }
    }
}

impl Drop for IdempotencyStore {
    fn drop(&mut self) {
        self.renewals.cancel();
    }
}

impl Leases {
    /// The database's clock, in epoch milliseconds, as SQL.
    fn now_ms_sql(&self) -> &'static str {
        match self.database {
            Database::Sqlite(_) => SQLITE_NOW_MS,
            Database::Postgres(_) => POSTGRES_NOW_MS,
        }
    }

    /// Deletes the keys older than the retention bound.
    async fn forget_expired(&self, now_ms: i64) -> Result<(), BillingError> {
        let retention_ms = i64::try_from(IDEMPOTENCY_RETENTION.as_millis()).unwrap_or(i64::MAX);
        let sql = "DELETE FROM idempotency_keys WHERE created_ms < $1";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
            .bind(now_ms.saturating_sub(retention_ms))
            .execute(pool)
            .await
            .map_err(database)?;
        });
        Ok(())
    }

    /// Inserts `key` as running in this boot, under a fresh lease; false if
    /// it is already held.
    async fn insert_running(
        &self,
        tenant_id: i64,
        key: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<bool, BillingError> {
        let sql = format!(
            "INSERT INTO idempotency_keys (tenant_id, idempotency_key, request_hash, state, \
             boot_id, created_ms, lease_expires_ms) \
             VALUES ($1, $2, $3, 'running', $4, $5, {} + $6) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
            self.now_ms_sql()
        );
        let inserted = on_database!(&self.database, pool => sqlx::query(&sql)
            .bind(tenant_id)
            .bind(key)
            .bind(hash)
            .bind(&self.boot_id)
            .bind(now_ms)
            .bind(self.config.lease_ms())
            .execute(pool)
            .await
            .map_err(database)?
            .rows_affected());
        Ok(inserted == 1)
    }

    async fn row(&self, tenant_id: i64, key: &str) -> Result<Option<KeyRow>, BillingError> {
        let sql = "SELECT request_hash, state, boot_id, response, settlement \
                   FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = $2";
        Ok(on_database!(&self.database, pool => sqlx::query_as(sql)
            .bind(tenant_id)
            .bind(key)
            .fetch_optional(pool)
            .await
            .map_err(database)?))
    }

    /// Moves a key `boot_id` left running to this boot if its lease has
    /// expired; false if it holds or the row changed meanwhile (finished,
    /// released, or taken by another).
    async fn take_over(
        &self,
        tenant_id: i64,
        key: &str,
        boot_id: &str,
        now_ms: i64,
    ) -> Result<bool, BillingError> {
        let now = self.now_ms_sql();
        let sql = format!(
            "UPDATE idempotency_keys SET boot_id = $1, created_ms = $2, \
             lease_expires_ms = {now} + $3 \
             WHERE tenant_id = $4 AND idempotency_key = $5 AND state = 'running' \
             AND boot_id = $6 AND lease_expires_ms < {now}"
        );
        let taken = on_database!(&self.database, pool => sqlx::query(&sql)
            .bind(&self.boot_id)
            .bind(now_ms)
            .bind(self.config.lease_ms())
            .bind(tenant_id)
            .bind(key)
            .bind(boot_id)
            .execute(pool)
            .await
            .map_err(database)?
            .rows_affected());
        Ok(taken == 1)
    }

    /// Extends the leases of every key this boot runs, in one statement.
    async fn renew(&self) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE idempotency_keys SET lease_expires_ms = {} + $1 \
             WHERE boot_id = $2 AND state = 'running'",
            self.now_ms_sql()
        );
        Ok(on_database!(&self.database, pool => sqlx::query(&sql)
            .bind(self.config.lease_ms())
            .bind(&self.boot_id)
            .execute(pool)
            .await?
            .rows_affected()))
    }

    /// Keeps a finished request's response and settlement under a key this
    /// boot holds; false if it holds it no more.
    async fn keep_done(
        &self,
        tenant_id: i64,
        key: &str,
        response: String,
        settlement: String,
    ) -> Result<bool, BillingError> {
        let sql = "UPDATE idempotency_keys SET state = 'done', response = $1, settlement = $2 \
                   WHERE tenant_id = $3 AND idempotency_key = $4 AND boot_id = $5";
        let updated = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(&response)
            .bind(&settlement)
            .bind(tenant_id)
            .bind(key)
            .bind(&self.boot_id)
            .execute(pool)
            .await
            .map_err(database)?
            .rows_affected());
        Ok(updated == 1)
    }

    /// Deletes a key this boot holds and has not finished.
    async fn release(&self, tenant_id: i64, key: &str) -> Result<(), sqlx::Error> {
        let sql = "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND idempotency_key = $2 \
                   AND state = 'running' AND boot_id = $3";
        on_database!(&self.database, pool => {
            sqlx::query(sql)
            .bind(tenant_id)
            .bind(key)
            .bind(&self.boot_id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

/// Renews this boot's leases every `lease / IDEMPOTENCY_RENEWALS_PER_LEASE`
/// while it runs any key, until `stop` is cancelled.
async fn renew_until_stopped(leases: Arc<Leases>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(leases.config.renewal_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if leases.running.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(IDEMPOTENCY_RENEWAL_TIMEOUT, leases.renew()).await {
            Ok(Ok(_renewed)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "renew idempotency key leases"),
            Err(_) => tracing::warn!("renew idempotency key leases: the database did not answer"),
        }
    }
}

/// A claimed key. Dropped before `store_done`, it is released so that the
/// client may retry with the same key.
pub struct Slot {
    store: Arc<IdempotencyStore>,
    tenant_id: i64,
    key: String,
    done: bool,
}

impl Slot {
    /// Keeps the response and the settled request for replay. Fails if the
    /// key is no longer this process's (its lease expired and a retry took
    /// it over): the caller then settles nothing.
    pub async fn store_done(
        &mut self,
        response: &Value,
        settlement: &CompletedRequest,
    ) -> Result<(), BillingError> {
        let settlement = settlement_to_json(settlement).map_err(|error| {
            BillingError::internal("keep a settlement for idempotent replay", &error)
        })?;
        let kept = self
            .store
            .leases
            .keep_done(self.tenant_id, &self.key, response.to_string(), settlement)
            .await?;
        if !kept {
            return Err(BillingError::internal(
                "keep a response for idempotent replay",
                &format!(
                    "the idempotency key of tenant {} passed to another request while its \
                     request ran",
                    self.tenant_id
                ),
            ));
        }
        self.done = true;
        self.store.leases.running.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.store.leases.running.fetch_sub(1, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let leases = Arc::clone(&self.store.leases);
        let tenant_id = self.tenant_id;
        let key = std::mem::take(&mut self.key);
        runtime.spawn(async move {
            if let Err(error) = leases.release(tenant_id, &key).await {
                tracing::warn!(%error, tenant_id, "release an idempotency key");
            }
        });
    }
}

fn database(error: sqlx::Error) -> BillingError {
    BillingError::internal("use the idempotency store", &error)
}

#[cfg(test)]
mod tests;
