//! One write transaction on whichever backend the store holds, for the
//! operations that must read and write in a single transaction: a
//! settlement that looks for clawback orders of its request, a clawback
//! order that reverses what is settled, a payout that must not start while
//! its owner's payouts are held.
//!
//! On SQLite every write transaction begins with `BEGIN IMMEDIATE` and so
//! runs alone; on PostgreSQL (READ COMMITTED) the transactions that must
//! see each other take the same locks: the advisory lock of a request
//! (`lock_requests`) or the row of an account (`lock_accounts`).

use std::collections::HashMap;

use sqlx::{Postgres, Sqlite, Transaction};

use crate::core::{AccountId, AccountState, RequestId, Transfer, TransferId};
use crate::invoice::RequestSummary;
use crate::metering::UsageSegment;

use super::cloud_spend::CloudSpend;
use super::rows::{self, AccountRow, ACCOUNT_COLUMNS};
use super::{postgres, sqlite, Backend, Committed, Store, StoreError};

/// An open write transaction.
pub(super) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// Runs the same code against whichever transaction `$tx` is, like
/// `on_pool!`: the body is compiled once per backend, so it may use any SQL
/// both accept, with `$conn` a `&mut Transaction` of that backend.
macro_rules! on_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            Tx::Sqlite($conn) => $body,
            Tx::Postgres($conn) => $body,
        }
    };
}
pub(super) use on_tx;

impl Tx {
    pub(super) async fn begin(store: &Store) -> Result<Tx, StoreError> {
        Ok(match &store.backend {
            Backend::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    pub(super) async fn commit(self) -> Result<(), StoreError> {
        on_tx!(self, tx => tx.commit().await?);
        Ok(())
    }

    /// Serialises this transaction with every other one that locks one of
    /// the same requests (see `postgres::lock_requests`); SQLite's write
    /// transactions are serialised already.
    pub(super) async fn lock_requests(&mut self, ids: &[RequestId]) -> Result<(), StoreError> {
        match self {
            Tx::Sqlite(_) => Ok(()),
            Tx::Postgres(tx) => postgres::lock_requests(tx, ids).await,
        }
    }

    /// Locks the rows of these accounts until the transaction ends (on
    /// SQLite, the transaction holds the only write lock already).
    pub(super) async fn lock_accounts(&mut self, accounts: &[AccountId]) -> Result<(), StoreError> {
        match self {
            Tx::Sqlite(_) => Ok(()),
            Tx::Postgres(tx) => postgres::lock_account_rows(tx, accounts).await,
        }
    }

    pub(super) async fn account(
        &mut self,
        account: &AccountId,
    ) -> Result<Option<AccountState>, StoreError> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM ledger_accounts WHERE id = $1");
        let row: Option<AccountRow> = on_tx!(self, tx => sqlx::query_as(&sql)
            .bind(account.to_string())
            .fetch_optional(&mut **tx)
            .await?);
        row.map(|row| rows::account_from_row(row).map(|(_, state)| state))
            .transpose()
    }

    /// The committed transfers among `ids`.
    pub(super) async fn transfers(
        &mut self,
        ids: &[TransferId],
    ) -> Result<HashMap<TransferId, Transfer>, StoreError> {
        match self {
            Tx::Sqlite(tx) => sqlite::find_transfers(tx, ids).await,
            Tx::Postgres(tx) => postgres::find_transfers(tx, ids).await,
        }
    }

    /// Commits a batch by the core's rules (see `core::ledger`), with what
    /// a settlement writes beside it; the transaction stays open.
    pub(super) async fn commit_batch(
        &mut self,
        batch: &[Transfer],
        usage: &[UsageSegment],
        request: Option<&RequestSummary>,
        cloud: Option<&CloudSpend>,
        hold: Option<&RequestId>,
    ) -> Result<Committed, StoreError> {
        match self {
            Tx::Sqlite(tx) => sqlite::commit_in(tx, batch, usage, request, cloud, hold).await,
            Tx::Postgres(tx) => postgres::commit_in(tx, batch, usage, request, cloud, hold).await,
        }
    }
}
