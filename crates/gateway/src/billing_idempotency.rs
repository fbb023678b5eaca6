//! Storage of Idempotency-Key records in the coordinator's database (table
//! `idempotency_keys`, migration 0003). See `api::idempotency` for the
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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ledger::core::{DurationMs, ModelId, RequestId, Segment, TenantId, TimestampMs, TokenCount};
use ledger::metering::{Server, UsageSegment};
use ledger::settlement::CompletedRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use crate::billing::BillingError;
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
    ) -> Result<Found, BillingError> {
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
        settlement: &CompletedRequest,
    ) -> Result<(), BillingError> {
        let settlement = settlement_to_json(settlement).map_err(|error| {
            BillingError::internal("keep a settlement for idempotent replay", &error)
        })?;
        let updated = sqlx::query(
            "UPDATE idempotency_keys SET state = 'done', response = ?, settlement = ? \
             WHERE tenant_id = ? AND idempotency_key = ? AND boot_id = ?",
        )
        .bind(response.to_string())
        .bind(settlement)
        .bind(self.tenant_id)
        .bind(&self.key)
        .bind(&self.store.boot_id)
        .execute(&self.store.pool)
        .await
        .map_err(database)?;
        if updated.rows_affected() != 1 {
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
    use ledger::core::{MicroUsd, MicroWh, NodeId, OwnerId};
    use ledger::pricing::TenantClass;

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
