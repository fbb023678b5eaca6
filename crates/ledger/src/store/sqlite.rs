//! The SQLite backend: the embedded default.
//!
//! Write transactions start with `BEGIN IMMEDIATE`, which takes SQLite's one
//! write lock up front; a deferred transaction that read first could fail to
//! upgrade when another connection had written meanwhile. Readers are not
//! blocked (WAL).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, Transaction};

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

/// Connections in the pool: one writer at a time, a few concurrent readers.
const CONNECTIONS_MAX: u32 = 4;

/// How long a writer waits for the write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows per multi-row statement: 9 bound values each stays far below
/// SQLite's limit of 32,766 parameters.
const ROWS_PER_STATEMENT: usize = 500;

pub(super) async fn open(path: &Path) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL syncs the WAL on every commit: a committed transfer survives
        // power loss, which NORMAL does not promise in WAL mode.
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    let pool = SqlitePoolOptions::new()
        .max_connections(CONNECTIONS_MAX)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Writes a batch and what goes with it in `tx` (begun with `BEGIN
/// IMMEDIATE`), which the caller commits (or drops, rolling everything back,
/// on an error).
pub(super) async fn commit_in(
    tx: &mut Transaction<'static, Sqlite>,
    batch: &[Transfer],
    usage: &[UsageSegment],
    request: Option<&RequestSummary>,
    cloud: Option<&CloudSpend>,
    hold: Option<&RequestId>,
) -> Result<Committed, StoreError> {
    let ids: Vec<TransferId> = batch.iter().map(Transfer::id).collect();
    let existing = find_transfers(tx, &ids).await?;
    let accounts = load_accounts(tx, batch).await?;
    let plan = plan_batch(batch, &existing, &accounts)?;
    let created: Vec<&Transfer> = plan.created.iter().map(|index| &batch[*index]).collect();
    insert_transfers(tx, &created).await?;
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

/// The committed transfers among `ids`.
pub(super) async fn transfers_by_id(
    pool: &SqlitePool,
    ids: &[TransferId],
) -> Result<HashMap<TransferId, Transfer>, StoreError> {
    let mut connection = pool.acquire().await?;
    find_transfers(&mut connection, ids).await
}

pub(super) async fn find_transfers(
    connection: &mut SqliteConnection,
    ids: &[TransferId],
) -> Result<HashMap<TransferId, Transfer>, StoreError> {
    let mut existing = HashMap::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE id IN ("
        ));
        let mut separated = query.separated(", ");
        for id in chunk {
            separated.push_bind(id.to_hex());
        }
        query.push(")");
        let found: Vec<TransferRow> = query.build_query_as().fetch_all(&mut *connection).await?;
        for row in found {
            let transfer = rows::transfer_from_row(row)?;
            existing.insert(transfer.id(), transfer);
        }
    }
    Ok(existing)
}

async fn load_accounts(
    tx: &mut Transaction<'static, Sqlite>,
    batch: &[Transfer],
) -> Result<BTreeMap<AccountId, AccountState>, StoreError> {
    let named: BTreeSet<String> = batch
        .iter()
        .flat_map(|transfer| [transfer.debit().to_string(), transfer.credit().to_string()])
        .collect();
    let named: Vec<String> = named.into_iter().collect();
    let mut accounts = BTreeMap::new();
    for chunk in named.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM ledger_accounts WHERE id IN ("
        ));
        let mut ids = query.separated(", ");
        for id in chunk {
            ids.push_bind(id.as_str());
        }
        query.push(")");
        let found: Vec<AccountRow> = query.build_query_as().fetch_all(&mut **tx).await?;
        for row in found {
            let (id, state) = rows::account_from_row(row)?;
            accounts.insert(id, state);
        }
    }
    Ok(accounts)
}

async fn insert_transfers(
    tx: &mut Transaction<'static, Sqlite>,
    created: &[&Transfer],
) -> Result<(), StoreError> {
    for chunk in created.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "INSERT INTO ledger_transfers ({TRANSFER_COLUMNS}) "
        ));
        let quantities = chunk
            .iter()
            .map(|transfer| rows::to_sql("transfer quantity", transfer.quantity()))
            .collect::<Result<Vec<i64>, StoreError>>()?;
        query.push_values(
            chunk.iter().zip(quantities),
            |mut row, (transfer, quantity)| {
                row.push_bind(transfer.id().to_hex())
                    .push_bind(transfer.debit().to_string())
                    .push_bind(transfer.credit().to_string())
                    .push_bind(transfer.amount().0)
                    .push_bind(transfer.kind().as_str())
                    .push_bind(transfer.request_id().to_string())
                    .push_bind(i64::from(transfer.segment().0))
                    .push_bind(quantity)
                    .push_bind(transfer.at().0);
            },
        );
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn update_accounts(
    tx: &mut Transaction<'static, Sqlite>,
    accounts: &BTreeMap<AccountId, AccountState>,
) -> Result<(), StoreError> {
    // One statement per chunk of accounts rather than one per account: a batch of settlements
    // touches about a thousand accounts, and each statement is a round trip to sqlx's SQLite
    // worker thread.
    let accounts: Vec<(&AccountId, &AccountState)> = accounts.iter().collect();
    for chunk in accounts.chunks(ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::<Sqlite>::new("WITH u (id, debits, credits) AS (");
        query.push_values(chunk, |mut row, (id, state)| {
            row.push_bind(id.to_string())
                .push_bind(state.debits_posted.0)
                .push_bind(state.credits_posted.0);
        });
        query.push(
            ") UPDATE ledger_accounts SET debits_posted = u.debits, credits_posted = u.credits \
             FROM u WHERE ledger_accounts.id = u.id",
        );
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn insert_usage(
    tx: &mut Transaction<'static, Sqlite>,
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
    tx: &mut Transaction<'static, Sqlite>,
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
