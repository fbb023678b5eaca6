//! Storage of Idempotency-Key records in the coordinator's database (table
//! `idempotency_keys`, migration 0003). See `api::idempotency` for the
//! protocol; this module only keeps the rows.
//!
//! Each process has a boot id. A row another boot left `running` belongs to a
//! process that is gone (it was killed mid-request, before it kept any
//! response, so nothing of it was settled): the next request with that key
//! takes it over and runs afresh.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use crate::api::ApiError;
use crate::store::DATABASE_FILE;

/// How long a key is remembered; a retry later than this runs afresh.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest key accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// Connections of the idempotency pool (one writer at a time in SQLite).
const CONNECTIONS_MAX: u32 = 2;

/// `request_hash, state, boot_id, response, settlement`.
type KeyRow = (String, String, String, Option<String>, Option<String>);

/// What an earlier request with the same key left.
pub enum Found {
    /// None: this request runs, and owns the slot.
    Run(Slot),
    /// Same body, finished: its response and settlement, to replay.
    Done { response: Value, settlement: Value },
    /// Same body, still running in this process.
    InProgress,
    /// Another body under the same key.
    Mismatch,
}

pub struct IdempotencyStore {
    pool: SqlitePool,
    boot_id: String,
}

impl IdempotencyStore {
    /// Opens its own pool on the coordinator's database, with durable
    /// commits: a kept response must survive a crash of the process.
    pub async fn open(data_dir: &Path) -> Result<IdempotencyStore, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join(DATABASE_FILE))
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        Ok(IdempotencyStore {
            pool,
            boot_id: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// Claims `key` for a request with `hash`, or reports what holds it.
    pub async fn claim(
        self: &Arc<Self>,
        tenant_id: i64,
        key: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<Found, ApiError> {
        let retention_ms = i64::try_from(IDEMPOTENCY_RETENTION.as_millis()).unwrap_or(i64::MAX);
        sqlx::query("DELETE FROM idempotency_keys WHERE created_ms < ?")
            .bind(now_ms.saturating_sub(retention_ms))
            .execute(&self.pool)
            .await
            .map_err(database)?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, idempotency_key, request_hash, state, \
             boot_id, created_ms) VALUES (?, ?, ?, 'running', ?, ?) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(key)
        .bind(hash)
        .bind(&self.boot_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(database)?;
        if inserted.rows_affected() == 1 {
            return Ok(Found::Run(self.slot(tenant_id, key)));
        }
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT request_hash, state, boot_id, response, settlement FROM idempotency_keys \
                 WHERE tenant_id = ? AND idempotency_key = ?",
        )
        .bind(tenant_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(database)?;
        let Some((stored_hash, state, boot_id, response, settlement)) = row else {
            // Deleted between our insert and our read (retention): the
            // caller may simply try again.
            return Ok(Found::InProgress);
        };
        if stored_hash != hash {
            return Ok(Found::Mismatch);
        }
        if state == "done" {
            let parse = |text: Option<String>| {
                text.and_then(|text| serde_json::from_str::<Value>(&text).ok())
                    .unwrap_or(Value::Null)
            };
            return Ok(Found::Done {
                response: parse(response),
                settlement: parse(settlement),
            });
        }
        if boot_id == self.boot_id {
            return Ok(Found::InProgress);
        }
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET boot_id = ?, created_ms = ? \
             WHERE tenant_id = ? AND idempotency_key = ? AND state = 'running' AND boot_id = ?",
        )
        .bind(&self.boot_id)
        .bind(now_ms)
        .bind(tenant_id)
        .bind(key)
        .bind(&boot_id)
        .execute(&self.pool)
        .await
        .map_err(database)?;
        if taken.rows_affected() == 1 {
            tracing::info!(
                tenant_id,
                "taking over an idempotency key left running by a previous process"
            );
            return Ok(Found::Run(self.slot(tenant_id, key)));
        }
        Ok(Found::InProgress)
    }

    fn slot(self: &Arc<Self>, tenant_id: i64, key: &str) -> Slot {
        Slot {
            store: Arc::clone(self),
            tenant_id,
            key: key.to_string(),
            done: false,
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
    /// Keeps the response and the settled request for replay.
    pub async fn store_done(
        &mut self,
        response: &Value,
        settlement: &Value,
    ) -> Result<(), ApiError> {
        let updated = sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', response = ?, settlement = ? \
             WHERE tenant_id = ? AND idempotency_key = ? AND boot_id = ?",
        )
        .bind(response.to_string())
        .bind(settlement.to_string())
        .bind(self.tenant_id)
        .bind(&self.key)
        .bind(&self.store.boot_id)
        .execute(&self.store.pool)
        .await
        .map_err(database)?;
        if updated.rows_affected() != 1 {
            tracing::error!(
                tenant_id = self.tenant_id,
                "idempotency key vanished while its request ran"
            );
            return Err(ApiError::internal());
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(&self.store);
        let tenant_id = self.tenant_id;
        let key = std::mem::take(&mut self.key);
        runtime.spawn(async move {
            let released = sqlx::query(
                "DELETE FROM idempotency_keys WHERE tenant_id = ? AND idempotency_key = ? \
                 AND state = 'running' AND boot_id = ?",
            )
            .bind(tenant_id)
            .bind(&key)
            .bind(&store.boot_id)
            .execute(&store.pool)
            .await;
            if let Err(error) = released {
                tracing::warn!(%error, tenant_id, "release an idempotency key");
            }
        });
    }
}

fn database(error: sqlx::Error) -> ApiError {
    tracing::error!(%error, "idempotency store");
    ApiError::internal()
}
