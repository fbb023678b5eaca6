//! Storage of Idempotency-Key records in the coordinator's database (table
//! `idempotency_keys`, made by the store's migrations). See `api::idempotency` for the
//! protocol; this module only keeps the rows.
//!
//! A finished request is kept with its response and its settlement, the
//! ledger's `CompletedRequest` in a JSON shape of its own ([`KeptSettlement`],
//! serde-derived): its field names are those the first rows were written
//! with, so a row kept before an upgrade still settles again after it.
//!
//! Each process has a boot id. A row another boot left `running` belongs to a
//! process that is gone (it was killed mid-request, before it kept any
//! response, so nothing of it was settled): the next request with that key
//! takes it over and runs afresh.
//!
//! The rows live in the store's database, SQLite or PostgreSQL, through a
//! pool of their own with durable commits (`synchronous=FULL` on SQLite,
//! `synchronous_commit=on` on PostgreSQL, whatever the server's default):
//! a kept response must survive a crash of the process or the machine.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ledger::core::{DurationMs, ModelId, RequestId, Segment, TenantId, TimestampMs, TokenCount};
use ledger::metering::{Server, UsageSegment};
use ledger::settlement::CompletedRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::billing::BillingError;
use crate::store::{on_database, Database, Store, DATABASE_FILE};

/// How long a key is remembered; a retry later than this runs afresh.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest key accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// Connections of the idempotency pool on SQLite (one writer at a time).
const CONNECTIONS_MAX: u32 = 2;

/// Connections of the idempotency pool on PostgreSQL, per process.
const POSTGRES_CONNECTIONS_MAX: u32 = 4;

/// How long a SQLite writer waits for the write lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a query waits for a PostgreSQL connection.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// `request_hash, state, boot_id, response, settlement`.
type KeyRow = (String, String, String, Option<String>, Option<String>);

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
    /// Same body, still running in this process.
    InProgress,
    /// Another body under the same key.
    Mismatch,
}

pub struct IdempotencyStore {
    database: Database,
    boot_id: String,
}

impl IdempotencyStore {
    /// Opens its own pool on the SQLite database in `data_dir`, with durable
    /// commits: a kept response must survive a crash of the process.
    pub async fn open(data_dir: &Path) -> Result<IdempotencyStore, sqlx::Error> {
        let options = SqliteConnectOptions::new().filename(data_dir.join(DATABASE_FILE));
        IdempotencyStore::open_sqlite(options).await
    }

    /// Opens its own pool, with durable commits, on the database `store`
    /// uses (SQLite or PostgreSQL), whose migrations made the table.
    pub async fn for_store(store: &Store) -> Result<IdempotencyStore, sqlx::Error> {
        match store.database() {
            Database::Sqlite(pool) => {
                IdempotencyStore::open_sqlite((*pool.connect_options()).clone()).await
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
                Ok(IdempotencyStore::with_database(Database::Postgres(pool)))
            }
        }
    }

    async fn open_sqlite(options: SqliteConnectOptions) -> Result<IdempotencyStore, sqlx::Error> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        Ok(IdempotencyStore::with_database(Database::Sqlite(pool)))
    }

    fn with_database(database: Database) -> IdempotencyStore {
        IdempotencyStore {
            database,
            boot_id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// Claims `key` for a request with `hash`, or reports what holds it.
    pub async fn claim(
        self: &Arc<Self>,
        tenant_id: i64,
        key: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<Found, BillingError> {
        self.forget_expired(now_ms).await?;
        if self.insert_running(tenant_id, key, hash, now_ms).await? {
            return Ok(Found::Run(self.slot(tenant_id, key)));
        }
        let Some((stored_hash, state, boot_id, response, settlement)) =
            self.row(tenant_id, key).await?
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
        if boot_id == self.boot_id {
            return Ok(Found::InProgress);
        }
        if self.take_over(tenant_id, key, &boot_id, now_ms).await? {
            tracing::info!(
                tenant_id,
                "taking over an idempotency key left running by a previous process"
            );
            return Ok(Found::Run(self.slot(tenant_id, key)));
        }
        Ok(Found::InProgress)
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

    /// Inserts `key` as running in this boot; false if it is already held.
    async fn insert_running(
        &self,
        tenant_id: i64,
        key: &str,
        hash: &str,
        now_ms: i64,
    ) -> Result<bool, BillingError> {
        let sql = "INSERT INTO idempotency_keys (tenant_id, idempotency_key, request_hash, state, \
                   boot_id, created_ms) VALUES ($1, $2, $3, 'running', $4, $5) \
                   ON CONFLICT (tenant_id, idempotency_key) DO NOTHING";
        let inserted = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(tenant_id)
            .bind(key)
            .bind(hash)
            .bind(&self.boot_id)
            .bind(now_ms)
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

    /// Moves a key `boot_id` left running to this boot; false if it has
    /// changed meanwhile (finished, released, or taken by another).
    async fn take_over(
        &self,
        tenant_id: i64,
        key: &str,
        boot_id: &str,
        now_ms: i64,
    ) -> Result<bool, BillingError> {
        let sql = "UPDATE idempotency_keys SET boot_id = $1, created_ms = $2 \
                   WHERE tenant_id = $3 AND idempotency_key = $4 AND state = 'running' \
                   AND boot_id = $5";
        let taken = on_database!(&self.database, pool => sqlx::query(sql)
            .bind(&self.boot_id)
            .bind(now_ms)
            .bind(tenant_id)
            .bind(key)
            .bind(boot_id)
            .execute(pool)
            .await
            .map_err(database)?
            .rows_affected());
        Ok(taken == 1)
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
        settlement: &CompletedRequest,
    ) -> Result<(), BillingError> {
        let settlement = settlement_to_json(settlement).map_err(|error| {
            BillingError::internal("keep a settlement for idempotent replay", &error)
        })?;
        let kept = self
            .store
            .keep_done(self.tenant_id, &self.key, response.to_string(), settlement)
            .await?;
        if !kept {
            return Err(BillingError::internal(
                "keep a response for idempotent replay",
                &format!(
                    "the idempotency key of tenant {} vanished while its request ran",
                    self.tenant_id
                ),
            ));
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
            if let Err(error) = store.release(tenant_id, &key).await {
                tracing::warn!(%error, tenant_id, "release an idempotency key");
            }
        });
    }
}

fn database(error: sqlx::Error) -> BillingError {
    BillingError::internal("use the idempotency store", &error)
}

/// A settled request as kept with its response. Mirrors the ledger's
/// `CompletedRequest`; the names are the stored format's, keep them.
#[derive(Debug, Serialize, Deserialize)]
struct KeptSettlement {
    request_id: String,
    tenant: String,
    /// `fleet`, `reserved` or `spot`.
    class: String,
    admitted_at_ms: i64,
    completed_at_ms: i64,
    segments: Vec<KeptSegment>,
}

/// One segment of a kept settlement: `node` and `owner` are null, and the
/// energy and tariff zero, for the cloud.
#[derive(Debug, Serialize, Deserialize)]
struct KeptSegment {
    segment: u32,
    node: Option<String>,
    owner: Option<String>,
    energy_uwh: u64,
    tariff_per_kwh: i64,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    compute_ms: u64,
    started_at_ms: i64,
}

impl From<&CompletedRequest> for KeptSettlement {
    fn from(request: &CompletedRequest) -> KeptSettlement {
        let segments = request
            .segments
            .iter()
            .map(|segment| {
                let (node, owner, energy_uwh, tariff_per_kwh) = segment.server.columns();
                KeptSegment {
                    segment: segment.segment.0,
                    node,
                    owner,
                    energy_uwh,
                    tariff_per_kwh,
                    model: segment.model.as_str().to_string(),
                    prompt_tokens: segment.prompt_tokens.0,
                    completion_tokens: segment.completion_tokens.0,
                    compute_ms: segment.compute.0,
                    started_at_ms: segment.started_at.0,
                }
            })
            .collect();
        KeptSettlement {
            request_id: request.request_id.as_str().to_string(),
            tenant: request.tenant.as_str().to_string(),
            class: request.class.as_str().to_string(),
            admitted_at_ms: request.admitted_at.0,
            completed_at_ms: request.completed_at.0,
            segments,
        }
    }
}

impl TryFrom<KeptSettlement> for CompletedRequest {
    type Error = String;

    /// Checks every id as the ledger does; a row that does not pass is
    /// refused, never settled as something else.
    fn try_from(kept: KeptSettlement) -> Result<CompletedRequest, String> {
        let request_id = RequestId::new(kept.request_id).map_err(|error| error.to_string())?;
        let segments = kept
            .segments
            .into_iter()
            .map(|segment| {
                let server = Server::from_columns((
                    segment.node,
                    segment.owner,
                    segment.energy_uwh,
                    segment.tariff_per_kwh,
                ))?;
                Ok(UsageSegment {
                    request_id: request_id.clone(),
                    segment: Segment(segment.segment),
                    server,
                    model: ModelId::new(segment.model).map_err(|error| error.to_string())?,
                    prompt_tokens: TokenCount(segment.prompt_tokens),
                    completion_tokens: TokenCount(segment.completion_tokens),
                    compute: DurationMs(segment.compute_ms),
                    started_at: TimestampMs(segment.started_at_ms),
                })
            })
            .collect::<Result<Vec<UsageSegment>, String>>()?;
        Ok(CompletedRequest {
            request_id,
            tenant: TenantId::new(kept.tenant).map_err(|error| error.to_string())?,
            class: kept
                .class
                .parse()
                .map_err(|_| format!("unknown class {}", kept.class))?,
            admitted_at: TimestampMs(kept.admitted_at_ms),
            completed_at: TimestampMs(kept.completed_at_ms),
            segments,
        })
    }
}

/// The JSON text a settled request is kept as.
fn settlement_to_json(request: &CompletedRequest) -> Result<String, serde_json::Error> {
    serde_json::to_string(&KeptSettlement::from(request))
}

/// Reads back what `settlement_to_json` wrote, or says why it cannot.
fn settlement_from_json(text: &str) -> Result<CompletedRequest, String> {
    let kept: KeptSettlement = serde_json::from_str(text).map_err(|error| error.to_string())?;
    CompletedRequest::try_from(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestStore;
    use ledger::core::{MicroUsd, MicroWh, NodeId, OwnerId};
    use ledger::pricing::TenantClass;

    /// How long a test waits for a dropped slot's key to be released.
    const RELEASE_DEADLINE: Duration = Duration::from_secs(30);

    /// Pause between looks at whether a key was released.
    const RELEASE_CHECK_INTERVAL: Duration = Duration::from_millis(20);

    store::on_each_backend!(
        keys_claimed_kept_replayed_and_released_across_two_gateways,
        a_kept_response_is_committed_durably,
    );

    async fn gateway(store: &Store) -> Arc<IdempotencyStore> {
        Arc::new(
            IdempotencyStore::for_store(store)
                .await
                .expect("idempotency store"),
        )
    }

    /// Claims `key` until it runs: a slot dropped just before is released
    /// in a task of its own.
    async fn claim_once_released(store: &Arc<IdempotencyStore>, key: &str) -> Slot {
        let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
        loop {
            match store.claim(1, key, "h", 20).await.expect("claim") {
                Found::Run(slot) => return slot,
                Found::InProgress if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(RELEASE_CHECK_INTERVAL).await;
                }
                Found::InProgress => panic!("the dropped slot's key was never released"),
                _ => panic!("a released key is free"),
            }
        }
    }

    async fn keys_claimed_kept_replayed_and_released_across_two_gateways(test: &TestStore) {
        let other_store = test.another_handle().await;
        let first = gateway(&test.store).await;
        let second = gateway(&other_store).await;

        // Claimed, asked again while running, with another body, then kept
        // and replayed by the other gateway.
        let Found::Run(mut slot) = first.claim(1, "k1", "h", 10).await.expect("claim") else {
            panic!("a new key runs");
        };
        assert!(matches!(
            first.claim(1, "k1", "h", 11).await.expect("claim"),
            Found::InProgress
        ));
        assert!(matches!(
            second.claim(1, "k1", "other", 11).await.expect("claim"),
            Found::Mismatch
        ));
        let response = serde_json::json!({"id": "chatcmpl-1", "choices": []});
        slot.store_done(&response, &request()).await.expect("keep");
        match second.claim(1, "k1", "h", 12).await.expect("claim") {
            Found::Done {
                response: kept,
                settlement,
            } => {
                assert_eq!(kept, response);
                assert_eq!(settlement, Ok(request()));
            }
            _ => panic!("a kept key replays"),
        }
        // Keys are per tenant.
        let Found::Run(mut elsewhere) = second.claim(2, "k1", "h", 12).await.expect("claim") else {
            panic!("another tenant's key is its own");
        };
        elsewhere
            .store_done(&response, &request())
            .await
            .expect("keep");

        // A slot dropped before it kept anything frees its key.
        let Found::Run(dropped) = first.claim(1, "k2", "h", 13).await.expect("claim") else {
            panic!("a new key runs");
        };
        drop(dropped);
        let mut retried = claim_once_released(&first, "k2").await;
        retried
            .store_done(&response, &request())
            .await
            .expect("keep");

        // A key another boot holds running is taken over (its process is
        // taken to be gone); the first holder can no longer keep it.
        let Found::Run(mut left) = first.claim(1, "k3", "h", 15).await.expect("claim") else {
            panic!("a new key runs");
        };
        let Found::Run(mut taken) = second.claim(1, "k3", "h", 16).await.expect("claim") else {
            panic!("a key another boot left running is taken over");
        };
        taken.store_done(&response, &request()).await.expect("keep");
        assert!(left.store_done(&response, &request()).await.is_err());
        drop(left);
        assert!(matches!(
            first.claim(1, "k3", "h", 17).await.expect("claim"),
            Found::Done { .. }
        ));
        other_store.close().await;
    }

    /// A kept response survives a crash of the machine: its commit waits
    /// for the disk on either backend, even where the store's own
    /// connections do not (SQLite's `synchronous=NORMAL`, a PostgreSQL
    /// server or URL with `synchronous_commit=off`).
    async fn a_kept_response_is_committed_durably(test: &TestStore) {
        let lax = match test.postgres_options() {
            Some(options) => {
                Store::connect_postgres_with(options.options([("synchronous_commit", "off")]))
                    .await
                    .expect("store")
            }
            None => test.store.clone(),
        };
        let store = gateway(&lax).await;
        match &store.database {
            Database::Sqlite(pool) => {
                let (synchronous,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                    .fetch_one(pool)
                    .await
                    .expect("pragma");
                assert_eq!(synchronous, 2, "synchronous=FULL");
            }
            Database::Postgres(pool) => {
                let (commit,): (String,) = sqlx::query_as("SHOW synchronous_commit")
                    .fetch_one(pool)
                    .await
                    .expect("show");
                assert_eq!(commit, "on");
            }
        }
    }

    fn request() -> CompletedRequest {
        let request_id = RequestId::new("chatcmpl-1").unwrap();
        let segment = |position: u32, server: Server| UsageSegment {
            request_id: request_id.clone(),
            segment: Segment(position),
            server,
            model: ModelId::new("smollm2-135m-instruct").unwrap(),
            prompt_tokens: TokenCount(12),
            completion_tokens: TokenCount(7),
            compute: DurationMs(345),
            started_at: TimestampMs(1_700_000_000_000),
        };
        CompletedRequest {
            request_id: request_id.clone(),
            tenant: TenantId::new("acme").unwrap(),
            class: TenantClass::Spot,
            admitted_at: TimestampMs(1_700_000_000_000),
            completed_at: TimestampMs(1_700_000_000_500),
            segments: vec![
                segment(
                    0,
                    Server::Node {
                        node: NodeId::new("car-1").unwrap(),
                        owner: OwnerId::new("alice").unwrap(),
                        energy: MicroWh(5_750),
                        tariff_per_kwh: MicroUsd(300_000),
                    },
                ),
                segment(1, Server::Cloud),
            ],
        }
    }

    #[test]
    fn a_kept_settlement_reads_back_identically() {
        let request = request();
        let text = settlement_to_json(&request).unwrap();
        assert_eq!(settlement_from_json(&text), Ok(request));
        assert!(settlement_from_json(r#"{"request_id": "x"}"#).is_err());
        assert!(settlement_from_json("null").is_err());
    }

    /// A row kept by the hand-written codec that came before serde.
    #[test]
    fn a_settlement_kept_in_the_first_format_still_reads_back() {
        let first_format = r#"{"admitted_at_ms":1700000000000,"class":"spot",
            "completed_at_ms":1700000000500,"request_id":"chatcmpl-1","segments":[
            {"completion_tokens":7,"compute_ms":345,"energy_uwh":5750,
             "model":"smollm2-135m-instruct","node":"car-1","owner":"alice",
             "prompt_tokens":12,"segment":0,"started_at_ms":1700000000000,
             "tariff_per_kwh":300000},
            {"completion_tokens":7,"compute_ms":345,"energy_uwh":0,
             "model":"smollm2-135m-instruct","node":null,"owner":null,
             "prompt_tokens":12,"segment":1,"started_at_ms":1700000000000,
             "tariff_per_kwh":0}],"tenant":"acme"}"#;
        assert_eq!(settlement_from_json(first_format), Ok(request()));
    }

    #[test]
    fn a_kept_settlement_with_a_bad_id_is_refused() {
        let mut kept = KeptSettlement::from(&request());
        kept.segments[0].owner = None;
        assert!(CompletedRequest::try_from(kept).is_err());
        let mut kept = KeptSettlement::from(&request());
        kept.tenant = String::new();
        assert!(CompletedRequest::try_from(kept).is_err());
    }
}
