//! The PostgreSQL backend, for a ledger shared by several coordinator cells.
//!
//! A commit locks the accounts its batch names (`FOR UPDATE`, in id order so
//! two batches cannot deadlock), inserts the transfers whose ids are free
//! (`ON CONFLICT DO NOTHING`, which waits for a concurrent insert of the same
//! id to commit or abort), and reads back only the skipped ones to decide
//! "exists" or "conflict"; under READ COMMITTED each statement sees every
//! commit before it.
//!
//! Rows travel as arrays through `UNNEST`, so a batch costs a handful of
//! round trips however large it is. Lookups join against `UNNEST` rather than
//! `= ANY($1)`: with a prepared statement's generic plan, `= ANY` over a large
//! array may be planned as a sequential scan of the whole transfer table.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};

use crate::core::{plan_batch, AccountId, AccountState, RequestId, Transfer, TransferId};
use crate::invoice::RequestSummary;
use crate::metering::UsageSegment;

use super::cloud_spend::{CloudSpend, INSERT_CLOUD_SPEND};
use super::holds::DELETE_HOLD;
use super::rows::{
    self, AccountRow, TransferRow, ACCOUNT_COLUMNS, REQUEST_COLUMNS, TRANSFER_COLUMNS,
    USAGE_COLUMNS,
};
use super::{Committed, StoreError};

/// Connections per pool.
const CONNECTIONS_MAX: u32 = 8;

/// How long to wait for a connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn connect(options: PgConnectOptions) -> Result<PgPool, StoreError> {
    // Durable commits whatever the server's default: a usage record counts
    // once it is committed, so the commit must mean "on disk".
    let options = options.options([("synchronous_commit", "on")]);
    let pool = PgPoolOptions::new()
        .max_connections(CONNECTIONS_MAX)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Writes a batch and what goes with it in `tx`, which the caller commits
/// (or drops, rolling everything back, on an error).
pub(super) async fn commit_in(
    tx: &mut Transaction<'static, Postgres>,
    batch: &[Transfer],
    usage: &[UsageSegment],
    request: Option<&RequestSummary>,
    cloud: Option<&CloudSpend>,
    hold: Option<&RequestId>,
) -> Result<Committed, StoreError> {
    let accounts = lock_accounts(tx, batch).await?;
    // Insert first and let the primary key skip what is already committed:
    // only the skipped transfers need reading back, which in the common case
    // (no retries) is none. On refusal below, the transaction is dropped and
    // rolls the inserts back.
    let inserted = insert_new_transfers(tx, batch).await?;
    let skipped: BTreeSet<TransferId> = batch
        .iter()
        .map(Transfer::id)
        .filter(|id| !inserted.contains(id))
        .collect();
    let skipped: Vec<TransferId> = skipped.into_iter().collect();
    let existing = find_transfers(tx, &skipped).await?;
    let plan = plan_batch(batch, &existing, &accounts)?;
    let planned: HashSet<TransferId> = plan
        .created
        .iter()
        .map(|index| batch[*index].id())
        .collect();
    if planned != inserted {
        // A transfer was skipped yet is not visible: a concurrent commit
        // raced us in a way READ COMMITTED should exclude. Start over.
        return Err(StoreError::Contention(1));
    }
    update_accounts(tx, &plan.accounts).await?;
    insert_usage(tx, usage).await?;
    if let Some(request) = request {
        insert_request(tx, request).await?;
    }
    if let Some(cloud) = cloud {
        sqlx::query(INSERT_CLOUD_SPEND)
            .bind(cloud.request_id.as_str())
            .bind(cloud.tenant.as_str())
            .bind(cloud.amount.0)
            .bind(cloud.completed_at.0)
            .execute(&mut **tx)
            .await?;
    }
    if let Some(hold) = hold {
        sqlx::query(DELETE_HOLD)
            .bind(hold.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(Committed {
        outcomes: plan.outcomes,
        shortfall: plan.shortfall,
    })
}

/// The first key of the advisory locks on requests: the two-key form keeps
/// them apart from every single-key advisory lock in the database.
const REQUEST_LOCK_SPACE: i32 = 0x4c45_4447; // "LEDG"

/// Takes the advisory lock of each request until `tx` ends, so that the
/// transactions about one request (its settlement, the clawback orders
/// naming it) take turns and each sees what the other committed. Keys are a
/// hash of the id: two requests that share one only wait for each other.
/// Locks are taken in key order, so two orders cannot deadlock.
pub(super) async fn lock_requests(
    tx: &mut Transaction<'static, Postgres>,
    request_ids: &[RequestId],
) -> Result<(), StoreError> {
    let keys: BTreeSet<i32> = request_ids.iter().map(request_lock_key).collect();
    let keys: Vec<i32> = keys.into_iter().collect();
    // UNNEST yields the array in order and each row's lock is taken as it
    // is produced, so the locks are taken in key order.
    sqlx::query("SELECT pg_advisory_xact_lock($1, k) FROM UNNEST($2::int4[]) AS u(k)")
        .bind(REQUEST_LOCK_SPACE)
        .bind(keys)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn request_lock_key(request_id: &RequestId) -> i32 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(request_id.as_str().as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Locks the rows of `accounts` that exist (`FOR UPDATE`, in id order,
/// like every commit) until `tx` ends.
pub(super) async fn lock_account_rows(
    tx: &mut Transaction<'static, Postgres>,
    accounts: &[AccountId],
) -> Result<(), StoreError> {
    let named: BTreeSet<String> = accounts.iter().map(ToString::to_string).collect();
    let named: Vec<String> = named.into_iter().collect();
    sqlx::query(
        "SELECT a.id FROM UNNEST($1::text[]) AS k(id) JOIN ledger_accounts a ON a.id = k.id \
         ORDER BY a.id FOR UPDATE OF a",
    )
    .bind(named)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn lock_accounts(
    tx: &mut Transaction<'static, Postgres>,
    batch: &[Transfer],
) -> Result<BTreeMap<AccountId, AccountState>, StoreError> {
    let named: BTreeSet<String> = batch
        .iter()
        .flat_map(|transfer| [transfer.debit().to_string(), transfer.credit().to_string()])
        .collect();
    let named: Vec<String> = named.into_iter().collect();
    let columns = prefixed("a", ACCOUNT_COLUMNS);
    let sql = format!(
        "SELECT {columns} FROM UNNEST($1::text[]) AS k(id) JOIN ledger_accounts a ON a.id = k.id \
         ORDER BY a.id FOR UPDATE OF a"
    );
    let found: Vec<AccountRow> = sqlx::query_as(&sql)
        .bind(&named)
        .fetch_all(&mut **tx)
        .await?;
    found.into_iter().map(rows::account_from_row).collect()
}

/// `a, b` as `t.a, t.b`.
fn prefixed(table: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|column| format!("{table}.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The committed transfers among `ids`.
pub(super) async fn transfers_by_id(
    pool: &PgPool,
    ids: &[TransferId],
) -> Result<HashMap<TransferId, Transfer>, StoreError> {
    let mut connection = pool.acquire().await?;
    find_transfers(&mut connection, ids).await
}

pub(super) async fn find_transfers(
    connection: &mut PgConnection,
    ids: &[TransferId],
) -> Result<HashMap<TransferId, Transfer>, StoreError> {
    let ids: Vec<String> = ids.iter().map(|id| id.to_hex()).collect();
    let columns = prefixed("t", TRANSFER_COLUMNS);
    let sql = format!(
        "SELECT {columns} FROM UNNEST($1::text[]) AS k(id) JOIN ledger_transfers t ON t.id = k.id"
    );
    let found: Vec<TransferRow> = sqlx::query_as(&sql)
        .bind(&ids)
        .fetch_all(&mut *connection)
        .await?;
    let mut existing = HashMap::with_capacity(found.len());
    for row in found {
        let transfer = rows::transfer_from_row(row)?;
        existing.insert(transfer.id(), transfer);
    }
    Ok(existing)
}

/// Inserts the batch's transfers whose ids are not yet taken; returns the
/// ids it inserted.
async fn insert_new_transfers(
    tx: &mut Transaction<'static, Postgres>,
    batch: &[Transfer],
) -> Result<HashSet<TransferId>, StoreError> {
    if batch.is_empty() {
        return Ok(HashSet::new());
    }
    let mut columns = TransferColumns::default();
    for transfer in batch {
        columns.push(transfer)?;
    }
    let sql = format!(
        "INSERT INTO ledger_transfers ({TRANSFER_COLUMNS}) SELECT * FROM UNNEST(\
         $1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], \
         $7::int8[], $8::int8[], $9::int8[]) ON CONFLICT (id) DO NOTHING RETURNING id"
    );
    let inserted: Vec<(String,)> = sqlx::query_as(&sql)
        .bind(columns.id)
        .bind(columns.debit)
        .bind(columns.credit)
        .bind(columns.amount)
        .bind(columns.kind)
        .bind(columns.request_id)
        .bind(columns.segment)
        .bind(columns.quantity)
        .bind(columns.at_ms)
        .fetch_all(&mut **tx)
        .await?;
    inserted
        .into_iter()
        .map(|(hex,)| {
            TransferId::from_hex(&hex).ok_or_else(|| StoreError::Corrupt {
                what: "transfer id",
                reason: format!("{hex:?} is not 32 hex digits"),
            })
        })
        .collect()
}

/// Transfers as column arrays, the shape `UNNEST` takes.
#[derive(Default)]
struct TransferColumns {
    id: Vec<String>,
    debit: Vec<String>,
    credit: Vec<String>,
    amount: Vec<i64>,
    kind: Vec<&'static str>,
    request_id: Vec<String>,
    segment: Vec<i64>,
    quantity: Vec<i64>,
    at_ms: Vec<i64>,
}

impl TransferColumns {
    fn push(&mut self, transfer: &Transfer) -> Result<(), StoreError> {
        self.quantity
            .push(rows::to_sql("transfer quantity", transfer.quantity())?);
        self.id.push(transfer.id().to_hex());
        self.debit.push(transfer.debit().to_string());
        self.credit.push(transfer.credit().to_string());
        self.amount.push(transfer.amount().0);
        self.kind.push(transfer.kind().as_str());
        self.request_id.push(transfer.request_id().to_string());
        self.segment.push(i64::from(transfer.segment().0));
        self.at_ms.push(transfer.at().0);
        Ok(())
    }
}

async fn update_accounts(
    tx: &mut Transaction<'static, Postgres>,
    accounts: &BTreeMap<AccountId, AccountState>,
) -> Result<(), StoreError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = accounts.keys().map(ToString::to_string).collect();
    let debits: Vec<i64> = accounts
        .values()
        .map(|state| state.debits_posted.0)
        .collect();
    let credits: Vec<i64> = accounts
        .values()
        .map(|state| state.credits_posted.0)
        .collect();
    sqlx::query(
        "UPDATE ledger_accounts AS a SET debits_posted = u.debits, credits_posted = u.credits \
         FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(id, debits, credits) \
         WHERE a.id = u.id",
    )
    .bind(ids)
    .bind(debits)
    .bind(credits)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_usage(
    tx: &mut Transaction<'static, Postgres>,
    usage: &[UsageSegment],
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO ledger_usage ({USAGE_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (request_id, segment) DO NOTHING"
    );
    for segment in usage {
        let row = rows::usage_to_row(segment)?;
        sqlx::query(&sql)
            .bind(row.0)
            .bind(row.1)
            .bind(row.2)
            .bind(row.3)
            .bind(row.4)
            .bind(row.5)
            .bind(row.6)
            .bind(row.7)
            .bind(row.8)
            .bind(row.9)
            .bind(row.10)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The request's summary; a retried settlement finds it already there.
async fn insert_request(
    tx: &mut Transaction<'static, Postgres>,
    request: &RequestSummary,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO ledger_requests ({REQUEST_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (request_id) DO NOTHING"
    );
    let row = rows::request_to_row(request)?;
    sqlx::query(&sql)
        .bind(row.0)
        .bind(row.1)
        .bind(row.2)
        .bind(row.3)
        .bind(row.4)
        .bind(row.5)
        .bind(row.6)
        .bind(row.7)
        .bind(row.8)
        .bind(row.9)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
