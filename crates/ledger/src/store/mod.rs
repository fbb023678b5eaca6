//! Persistent ledger: the core's operations on SQLite (the embedded default)
//! or PostgreSQL, through sqlx, with one set of portable migrations.
//!
//! What is stored: accounts with their posted totals (a derived table, updated
//! in the same transaction as the transfers that change it), the immutable
//! transfers, and the usage segments that settlements paid for (statements
//! join the two), and each settled request's cloud spend until the gateway
//! has counted it in its budgets (`cloud_spend`), the clawback orders against
//! nodes found cheating and the nodes whose owners' payouts are held
//! (`clawbacks`). Nothing is kept in memory between calls, so several
//! coordinator processes may share one PostgreSQL ledger; on PostgreSQL the
//! worst cases of their admitted, unsettled requests are kept here too
//! (`holds`), so that they admit against the same money.
//!
//! A batch commits in one transaction and follows the core's rules exactly:
//! each backend loads the accounts and existing transfers a batch names,
//! decides it with [`plan_batch`](crate::core::plan_batch), then writes the
//! result. Durability: SQLite runs in WAL mode with `synchronous=FULL`;
//! PostgreSQL sessions run with `synchronous_commit=on`. A commit returns only
//! once the transaction is on disk.

mod postgres;
mod rows;
mod sqlite;

use std::collections::HashMap;
use std::path::Path;

use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::SqlitePool;

use crate::clawback::ClawbackError;
use crate::core::{
    AccountId, AccountState, LedgerError, MicroUsd, NodeId, Outcome, OwnerId, TenantId, Transfer,
    TransferId, TransferKind, Verifier, VerifyReport,
};
use crate::invoice::RequestSummary;
use crate::metering::Server;
use crate::payout::{self, PayoutError, PayoutOrder, PayoutRates, PayoutReceipt};
use crate::pricing::PriceBook;
use crate::settlement::{self, CompletedRequest, Settlement, SettlementError};
use crate::statement::{self, Period, Statement};
use rows::{AccountRow, TransferRow, UsageRow, ACCOUNT_COLUMNS, TRANSFER_COLUMNS, USAGE_COLUMNS};
use tx::Tx;

/// How often a commit is retried when a concurrent commit inserted the same
/// transfer id between our check and our insert (PostgreSQL only; SQLite
/// commits are serialised by `BEGIN IMMEDIATE`).
pub const COMMIT_ATTEMPTS_MAX: usize = 3;

/// Migrations shared by both backends.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrate ledger database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Settlement(#[from] SettlementError),
    #[error(transparent)]
    Payout(#[from] PayoutError),
    #[error(transparent)]
    Transfer(#[from] crate::core::TransferError),
    #[error(transparent)]
    Id(#[from] crate::core::IdError),
    #[error("account {0} does not exist")]
    AccountNotFound(AccountId),
    #[error("stored {what} is invalid: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("{what} of {value} does not fit a signed 64-bit column")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("re-key accounts: {0}")]
    Rekey(String),
    #[error("commit collided with concurrent commits {0} times")]
    Contention(usize),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Clawback(#[from] ClawbackError),
    #[error(transparent)]
    Verification(#[from] crate::verification::VerificationPayError),
    #[error("payouts to owner {owner} are on hold for node {node}: {reason}")]
    PayoutsHeld {
        owner: OwnerId,
        node: NodeId,
        reason: String,
    },
}

impl StoreError {
    /// Whether the failure is the database's state rather than the request's:
    /// unreachable, restarting, out of resources, or a transaction that lost
    /// a race. The same call may succeed later; a settlement that failed so
    /// is worth retrying, one the ledger refused (a floor, a conflict) is not.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(error) => is_unavailable_database(error),
            StoreError::Contention(_) => true,
            _ => false,
        }
    }
}

/// SQLSTATE classes of a database that is not there for now: `08`
/// connection exceptions, `53` insufficient resources, `57P` operator
/// intervention (a shutdown, a restart), and `40` transaction rollbacks
/// (serialisation failures, deadlocks); SQLite's busy and locked errors; a
/// connection that broke or could not be had in time.
fn is_unavailable_database(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or_default();
            ["08", "53", "57P", "40"]
                .iter()
                .any(|class| code.starts_with(class))
                || matches!(code.as_ref(), "5" | "6" | "261" | "262" | "517")
        }
        _ => false,
    }
}

enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same code against whichever pool the store holds; the body is
/// compiled once per backend, so it may use any SQL both accept.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs `$attempt`, an expression that begins, writes and commits one
/// transaction, again when it collided with a concurrent commit of the same
/// transfer id (PostgreSQL), at most [`COMMIT_ATTEMPTS_MAX`] times.
macro_rules! retry_collisions {
    ($attempt:expr) => {{
        use $crate::store::{is_unique_violation, StoreError, COMMIT_ATTEMPTS_MAX};
        let mut result = Err(StoreError::Contention(COMMIT_ATTEMPTS_MAX));
        for _ in 0..COMMIT_ATTEMPTS_MAX {
            match $attempt {
                Err(StoreError::Database(error)) if is_unique_violation(&error) => continue,
                other => {
                    result = other;
                    break;
                }
            }
        }
        result
    }};
}

mod billing;
mod clawbacks;
mod cloud_spend;
mod holds;
mod rekey;
mod tx;
mod verifications;

pub use billing::{MeterFlag, METER_FLAGS_LISTED_MAX, REQUEST_LINES_MAX};
pub use clawbacks::{ClawbackReceipt, PayoutHold};
pub use cloud_spend::{CloudSpend, UNCOUNTED_CLOUD_SPEND_LISTED_MAX};
pub use holds::{HoldAdmission, HoldRequest};
pub use rekey::{Rekey, RekeyOutcome};
pub use verifications::{CheckClawbackReceipt, CheckReceipt};

/// A ledger in SQLite or PostgreSQL.
pub struct Store {
    backend: Backend,
}

/// What a settled request produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleReceipt {
    pub charge: MicroUsd,
    /// The settlement's transfers, then the reversals of the segments that
    /// a clawback order names (`clawbacks`), if any.
    pub transfers: Vec<Transfer>,
    pub outcomes: Vec<Outcome>,
}

/// What one commit did: each transfer's outcome, and how far its clawbacks
/// took owners below zero (see `core::ledger`).
pub(crate) struct Committed {
    pub outcomes: Vec<Outcome>,
    pub shortfall: MicroUsd,
}

impl Store {
    /// Opens (creating if needed) a SQLite ledger file and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let pool = sqlite::open(path).await?;
        Store::ready(Backend::Sqlite(pool)).await
    }

    /// Connects to PostgreSQL (`postgres://user@host/db`) and migrates.
    pub async fn connect_postgres(url: &str) -> Result<Store, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        Store::connect_postgres_with(options).await
    }

    /// Connects with explicit options (for example a `search_path`).
    pub async fn connect_postgres_with(options: PgConnectOptions) -> Result<Store, StoreError> {
        let pool = postgres::connect(options).await?;
        Store::ready(Backend::Postgres(pool)).await
    }

    async fn ready(backend: Backend) -> Result<Store, StoreError> {
        let store = Store { backend };
        on_pool!(store, pool => MIGRATOR.run(pool).await?);
        for account in AccountId::system_accounts() {
            store.open_account(&account).await?;
        }
        Ok(store)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    pub async fn close(self) {
        on_pool!(self, pool => pool.close().await);
    }

    /// Opens an account with its kind's default floor (zero for tenants and
    /// owners); opening an existing account changes nothing.
    pub async fn open_account(&self, account: &AccountId) -> Result<(), StoreError> {
        let floor = AccountState::opened(account).floor.map(|floor| floor.0);
        let sql = "INSERT INTO ledger_accounts (id, balance_floor) VALUES ($1, $2) \
                   ON CONFLICT (id) DO NOTHING";
        on_pool!(self, pool => {
            sqlx::query(sql).bind(account.to_string()).bind(floor).execute(pool).await?;
        });
        Ok(())
    }

    /// Lets a tenant's balance go down to `-limit`; zero makes it prepaid.
    pub async fn set_credit_limit(
        &self,
        tenant: &TenantId,
        limit: MicroUsd,
    ) -> Result<(), StoreError> {
        let account = AccountId::Tenant(tenant.clone());
        let sql = "UPDATE ledger_accounts SET balance_floor = $1 WHERE id = $2";
        let updated = on_pool!(self, pool => sqlx::query(sql)
            .bind(-limit.0.abs())
            .bind(account.to_string())
            .execute(pool)
            .await?
            .rows_affected());
        if updated == 0 {
            return Err(StoreError::AccountNotFound(account));
        }
        Ok(())
    }

    pub async fn account(&self, account: &AccountId) -> Result<Option<AccountState>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM ledger_accounts WHERE id = $1");
        let row: Option<AccountRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(account.to_string())
            .fetch_optional(pool)
            .await?);
        row.map(|row| rows::account_from_row(row).map(|(_, state)| state))
            .transpose()
    }

    /// Every account, ordered by id.
    pub async fn accounts(&self) -> Result<Vec<(AccountId, AccountState)>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM ledger_accounts ORDER BY id");
        let rows: Vec<AccountRow> =
            on_pool!(self, pool => sqlx::query_as(&sql).fetch_all(pool).await?);
        rows.into_iter().map(rows::account_from_row).collect()
    }

    pub async fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, StoreError> {
        let sql = format!("SELECT {TRANSFER_COLUMNS} FROM ledger_transfers WHERE id = $1");
        let row: Option<TransferRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(id.to_hex())
            .fetch_optional(pool)
            .await?);
        row.map(rows::transfer_from_row).transpose()
    }

    /// Commits a batch atomically (see `core::ledger` for the rules).
    pub async fn commit(&self, batch: &[Transfer]) -> Result<Vec<Outcome>, StoreError> {
        if batch.len() > crate::core::ledger::BATCH_TRANSFERS_MAX {
            return Err(LedgerError::BatchTooLarge { len: batch.len() }.into());
        }
        let committed = retry_collisions!(self.commit_once(batch).await)?;
        Ok(committed.outcomes)
    }

    async fn commit_once(&self, batch: &[Transfer]) -> Result<Committed, StoreError> {
        let mut tx = Tx::begin(self).await?;
        let committed = tx.commit_batch(batch, &[], None, None, None).await?;
        tx.commit().await?;
        Ok(committed)
    }

    /// Settles a completed request: its transfers, usage segments, the
    /// request's summary (for usage reports and invoices) and its cloud
    /// spend, if it has a cloud segment (`cloud_spend`), commit together,
    /// and the request's hold, if it has one (`holds`), is deleted in the
    /// same transaction. A retry returns `Exists` outcomes and changes
    /// nothing.
    ///
    /// If a clawback order names the request and a node that served one of
    /// its segments (the verdict came first), the reversals of that node's
    /// segments are posted in the same transaction (`clawbacks`).
    pub async fn settle(
        &self,
        request: &CompletedRequest,
        book: &PriceBook,
    ) -> Result<SettleReceipt, StoreError> {
        let settlement = settlement::settle(request, book)?;
        let (transfers, committed) =
            retry_collisions!(self.settle_once(request, &settlement).await)?;
        Ok(SettleReceipt {
            charge: settlement.charge,
            transfers,
            outcomes: committed.outcomes,
        })
    }

    /// One attempt at `settle`'s transaction; returns the batch it committed.
    async fn settle_once(
        &self,
        request: &CompletedRequest,
        settlement: &Settlement,
    ) -> Result<(Vec<Transfer>, Committed), StoreError> {
        let summary = RequestSummary::of(request, settlement);
        let cloud = CloudSpend::of(request, settlement);
        let mut tx = Tx::begin(self).await?;
        let mut batch = settlement.transfers.clone();
        let on_nodes = request
            .segments
            .iter()
            .any(|segment| matches!(segment.server, Server::Node { .. }));
        if on_nodes {
            tx.lock_requests(std::slice::from_ref(&request.request_id))
                .await?;
            batch.extend(clawbacks::ordered_reversals(&mut tx, request, settlement).await?);
        }
        let committed = tx
            .commit_batch(
                &batch,
                &request.segments,
                summary.as_ref(),
                cloud.as_ref(),
                // The request's hold (`holds`) goes in the transaction that
                // posts its charge: counted as a hold until then, in the
                // balance after.
                Some(&request.request_id),
            )
            .await?;
        tx.commit().await?;
        Ok((batch, committed))
    }

    /// Pays out an owner's balance; a retried order is paid once. Refused
    /// with [`StoreError::PayoutsHeld`] while a node the owner earned for
    /// is held (`clawbacks`); a retry of an order paid before the hold still
    /// returns its receipt.
    pub async fn pay_out(
        &self,
        order: &PayoutOrder,
        rates: &PayoutRates,
    ) -> Result<PayoutReceipt, StoreError> {
        if let Some(existing) = self.transfer(order.transfer_id()).await? {
            return Ok(payout::receipt_for_existing(order, &existing)?);
        }
        match retry_collisions!(self.pay_out_once(order, rates).await) {
            Ok(receipt) => Ok(receipt),
            // The same order committed concurrently with another balance.
            Err(StoreError::Ledger(LedgerError::Conflict { .. })) => {
                match self.transfer(order.transfer_id()).await? {
                    Some(existing) => Ok(payout::receipt_for_existing(order, &existing)?),
                    None => Err(StoreError::Contention(1)),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// One attempt at a payout: the owner's row is locked before the holds
    /// are read, so a hold committed before the lock is seen, and a hold
    /// being placed waits for this payout (see `clawbacks::hold`).
    async fn pay_out_once(
        &self,
        order: &PayoutOrder,
        rates: &PayoutRates,
    ) -> Result<PayoutReceipt, StoreError> {
        let owner = AccountId::Owner(order.owner.clone());
        let mut tx = Tx::begin(self).await?;
        tx.lock_accounts(std::slice::from_ref(&owner)).await?;
        clawbacks::refuse_if_held(&mut tx, &order.owner).await?;
        let balance = tx
            .account(&owner)
            .await?
            .ok_or(StoreError::AccountNotFound(owner))?
            .balance();
        let planned = payout::plan(order, balance, rates)?;
        let batch = std::slice::from_ref(&planned.transfer);
        let committed = tx.commit_batch(batch, &[], None, None, None).await?;
        tx.commit().await?;
        Ok(PayoutReceipt {
            units: planned.units,
            amount: planned.transfer.amount(),
            outcome: committed
                .outcomes
                .first()
                .copied()
                .unwrap_or(Outcome::Created),
        })
    }

    /// What a tenant was charged for tokens in a period (for daily caps).
    pub async fn tenant_spent(
        &self,
        tenant: &TenantId,
        period: Period,
    ) -> Result<MicroUsd, StoreError> {
        let (spent,): (i64,) = on_pool!(self, pool => sqlx::query_as(TENANT_SPENT_SQL)
            .bind(AccountId::Tenant(tenant.clone()).to_string())
            .bind(period.from.0)
            .bind(period.until.0)
            .fetch_one(pool)
            .await?);
        Ok(MicroUsd(spent))
    }

    /// A vehicle's statement for a period, with the clawbacks ordered in
    /// it and the checks it was paid for. Its earnings, clawbacks and checks'
    /// pay are found by the ids their transfers must have, not by a scan.
    pub async fn statement(&self, node: &NodeId, period: Period) -> Result<Statement, StoreError> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM ledger_usage \
             WHERE node_id = $1 AND started_at_ms >= $2 AND started_at_ms < $3"
        );
        let rows: Vec<UsageRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(node.to_string())
            .bind(period.from.0)
            .bind(period.until.0)
            .fetch_all(pool)
            .await?);
        let usage = rows
            .into_iter()
            .map(rows::usage_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut clawbacks = clawbacks::clawback_records(self, node, period).await?;
        clawbacks.extend(verifications::check_clawback_records(self, node, period).await?);
        let mut ids: Vec<TransferId> = usage
            .iter()
            .flat_map(|segment| {
                [
                    TransferKind::RevenueShare,
                    TransferKind::EnergyReimbursement,
                ]
                .map(|kind| TransferId::derive(&segment.request_id, segment.segment, kind))
            })
            .collect();
        ids.extend(clawbacks::clawback_ids(&clawbacks));
        let checks = verifications::checks_of(self, node, period).await?;
        ids.extend(verifications::check_transfer_ids(
            checks.iter().map(|check| &check.check),
        ));
        let transfers = self.transfers_by_id(&ids).await?;
        let transfers: Vec<Transfer> = transfers.into_values().collect();
        Ok(statement::build(
            node, period, &usage, &clawbacks, &checks, &transfers,
        ))
    }

    /// The committed transfers among `ids`.
    async fn transfers_by_id(
        &self,
        ids: &[TransferId],
    ) -> Result<HashMap<TransferId, Transfer>, StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => sqlite::transfers_by_id(pool, ids).await,
            Backend::Postgres(pool) => postgres::transfers_by_id(pool, ids).await,
        }
    }

    /// How many transfers the ledger holds.
    pub async fn transfer_count(&self) -> Result<u64, StoreError> {
        let sql = "SELECT COUNT(*) FROM ledger_transfers";
        let (count,): (i64,) = on_pool!(self, pool => sqlx::query_as(sql).fetch_one(pool).await?);
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

/// What a tenant was charged for tokens in a period: `$1` its account, `$2`
/// and `$3` the period. The kind is a literal so that both databases can use
/// the partial index on token charges.
const TENANT_SPENT_SQL: &str = "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) \
     FROM ledger_transfers WHERE debit_account = $1 AND kind = 'token-charge' \
     AND at_ms >= $2 AND at_ms < $3";

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|database| database.is_unique_violation())
}

/// Checks the ledger's invariant from scratch: debits equal credits overall,
/// every account's posted totals equal the sum of its transfers, no owner
/// balance is negative except by what clawbacks took (reported as owed),
/// every stored transfer carries the id its fields derive, and every
/// reversal undoes its original and belongs to a clawback order that has
/// all its segments' earnings reversed (`clawbacks`). Streams the
/// transfers, so memory grows with accounts (and clawed-back segments) only.
pub async fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let mut verifier = Verifier::default();
    let sql = format!("SELECT {TRANSFER_COLUMNS} FROM ledger_transfers");
    on_pool!(store, pool => {
        let mut rows = sqlx::query_as::<_, TransferRow>(&sql).fetch(pool);
        while let Some(row) = rows.try_next().await? {
            let stored_id = row.0.clone();
            match rows::transfer_from_row(row) {
                Ok(transfer) => verifier.add_transfer(&transfer),
                Err(error) => verifier.add_problem(crate::core::Problem::BadTransfer {
                    stored_id,
                    reason: error.to_string(),
                }),
            }
        }
    });
    let reversed: Vec<TransferId> = verifier
        .reversals()
        .iter()
        .filter_map(Transfer::reversed_id)
        .collect();
    let originals = store.transfers_by_id(&reversed).await?;
    clawbacks::verify_orders(store, &mut verifier).await?;
    let accounts = store.accounts().await?;
    Ok(verifier.finish(accounts.iter().map(|(id, state)| (id, state)), &originals))
}
