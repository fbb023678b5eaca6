//! The two databases the store runs on, and what differs between them:
//! opening, migrations, and how a write takes the next revision of a change
//! kind. Queries themselves are shared: both backends accept `$1`-style
//! placeholders, and every column is read as `i64`, `String` or `bool`.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, PgConnection};

use crate::StoreError;

/// Connections in a SQLite pool; SQLite has one writer, so more would only wait.
const SQLITE_CONNECTIONS_MAX: u32 = 4;

/// How long a SQLite writer waits for the write lock before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in a PostgreSQL pool, per process.
const POSTGRES_CONNECTIONS_MAX: u32 = 8;

/// How long a query waits for a PostgreSQL connection before failing.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The SQLite schema's migrations, recorded by sqlx in the store's own file.
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL schema's migrations. They are recorded in a table of the
/// store's own ([`POSTGRES_MIGRATIONS_TABLE`]), not in sqlx's
/// `_sqlx_migrations`: the ledger may share the database and keeps its own
/// numbered migrations there, which the two sets would collide with.
static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("./migrations_pg");

/// Where the PostgreSQL migrations applied so far are recorded.
const POSTGRES_MIGRATIONS_TABLE: &str = "store_migrations";

/// Advisory lock held while migrating, so that processes starting together
/// migrate one after the other (the value is arbitrary and unique to us).
const MIGRATION_LOCK_KEY: i64 = 0x6667_5354_4f52_0001;

/// Advisory locks that order each change kind's revisions (see
/// [`RevisionKind`]).
const POLICY_REVISION_LOCK_KEY: i64 = 0x6667_5354_4f52_0002;
const CONTRACT_REVISION_LOCK_KEY: i64 = 0x6667_5354_4f52_0003;

/// The channel on which PostgreSQL writers announce a change to followers.
pub const CHANGES_CHANNEL: &str = "fleetgrid_store_changes";

/// A connection pool on either backend.
///
/// Code outside the store that keeps tables in the store's database (the
/// gateway's idempotency keys and cloud budgets) runs its SQL through
/// [`on_database!`](crate::on_database), written once for both.
#[derive(Clone, Debug)]
pub enum Database {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Evaluates `$body` with `$pool` bound to whichever pool `$database` holds;
/// the body is compiled once per backend, so it may use any SQL both accept.
#[macro_export]
macro_rules! on_database {
    ($database:expr, $pool:ident => $body:expr) => {
        match $database {
            $crate::Database::Sqlite($pool) => $body,
            $crate::Database::Postgres($pool) => $body,
        }
    };
}

/// A change kind whose rows carry a revision that followers read past.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RevisionKind {
    Policies,
    Contracts,
}

impl RevisionKind {
    fn lock_key(self) -> i64 {
        match self {
            RevisionKind::Policies => POLICY_REVISION_LOCK_KEY,
            RevisionKind::Contracts => CONTRACT_REVISION_LOCK_KEY,
        }
    }
}

/// Runs `$body` in a write transaction in which the next revision of
/// `$kind` may be taken as `MAX(revision) + 1`, with `$tx` bound to the
/// transaction, and commits it.
///
/// A follower reads every revision above the last it saw, so revisions must
/// become visible in the order they are taken: a revision committed after a
/// higher one was read would never be read. SQLite's `BEGIN IMMEDIATE` takes
/// its single write lock up front; on PostgreSQL an advisory lock per kind,
/// held to the commit, serialises the writers (a commit is visible before
/// its locks are released), and the commit notifies followers.
macro_rules! in_revision_transaction {
    ($database:expr, $kind:expr, $tx:ident => $body:expr) => {
        match $database {
            $crate::Database::Sqlite(pool) => {
                let mut $tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let result = $body;
                $tx.commit().await?;
                result
            }
            $crate::Database::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                $crate::database::lock_revisions(&mut $tx, $kind).await?;
                let result = $body;
                $crate::database::notify_change(&mut $tx).await?;
                $tx.commit().await?;
                result
            }
        }
    };
}
pub(crate) use in_revision_transaction;

/// Opens a SQLite pool with the store's settings (WAL, foreign keys) and
/// migrates it.
pub(crate) async fn open_sqlite(options: SqliteConnectOptions) -> Result<SqlitePool, StoreError> {
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(SQLITE_CONNECTIONS_MAX)
        .connect_with(options)
        .await?;
    SQLITE_MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// Connects a PostgreSQL pool and migrates the schema its `search_path`
/// names first.
pub(crate) async fn connect_postgres(options: PgConnectOptions) -> Result<PgPool, StoreError> {
    migrate_postgres(&options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(POSTGRES_CONNECTIONS_MAX)
        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies the PostgreSQL migrations not yet recorded, each in its own
/// transaction, on a connection of its own: the session's advisory lock
/// goes with the connection, however the migration ends.
async fn migrate_postgres(options: &PgConnectOptions) -> Result<(), StoreError> {
    let mut connection = PgConnection::connect_with(options).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut connection)
        .await?;
    let migrated = apply_postgres_migrations(&mut connection).await;
    connection.close().await?;
    migrated
}

async fn apply_postgres_migrations(connection: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {POSTGRES_MIGRATIONS_TABLE} (\
           version BIGINT PRIMARY KEY, \
           description TEXT NOT NULL, \
           checksum BYTEA NOT NULL, \
           applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .execute(&mut *connection)
    .await?;
    let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(&format!(
        "SELECT version, checksum FROM {POSTGRES_MIGRATIONS_TABLE} ORDER BY version"
    ))
    .fetch_all(&mut *connection)
    .await?;
    for migration in POSTGRES_MIGRATOR.iter() {
        match applied
            .iter()
            .find(|(version, _)| *version == migration.version)
        {
            Some((_, checksum)) if *checksum == *migration.checksum => continue,
            Some(_) => return Err(StoreError::MigrationChanged(migration.version)),
            None => {}
        }
        let mut tx = connection.begin().await?;
        sqlx::raw_sql(&migration.sql).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "INSERT INTO {POSTGRES_MIGRATIONS_TABLE} (version, description, checksum) \
             VALUES ($1, $2, $3)"
        ))
        .bind(migration.version)
        .bind(migration.description.as_ref())
        .bind(migration.checksum.as_ref())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Takes `kind`'s revision lock until the transaction ends.
pub(crate) async fn lock_revisions(
    tx: &mut PgConnection,
    kind: RevisionKind,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(kind.lock_key())
        .execute(tx)
        .await?;
    Ok(())
}

/// Announces a change to followers once the transaction commits (PostgreSQL
/// delivers a notification only on commit, and drops it on rollback).
pub(crate) async fn notify_change(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANGES_CHANNEL)
        .execute(tx)
        .await?;
    Ok(())
}
