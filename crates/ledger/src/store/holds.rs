//! Holds: the worst case of every admitted request that has not settled
//! yet, kept in the ledger itself so that gateways sharing one PostgreSQL
//! ledger admit against the same money.
//!
//! **Admission** ([`Store::admit_with_hold`]) is one transaction that
//! serialises per tenant: it opens the tenant's account if it has none,
//! locks the account's row (`FOR UPDATE`, the lock every settlement that
//! charges the tenant takes too), reads the balance, the daily cap and
//! today's spend as the ledger keeps them, adds the tenant's unexpired holds
//! to both, checks the request's worst case with [`admission::check`] and
//! inserts the request's hold. Two gateways admitting for one tenant take
//! turns, and each sees the other's holds.
//!
//! **Settlement** deletes the request's hold in the transaction that posts
//! its charge (`Store::settle`), so a charge is counted exactly once at
//! every moment: as a hold before the commit, in the balance after. A
//! request that ends without a settlement releases its hold
//! ([`Store::release_hold`]).
//!
//! **Leases.** A hold counts only until its `expires_at_ms`, read on the
//! database's clock so that the gateways' clocks do not matter. The gateway
//! that holds it renews the leases of the holds it still has in flight, all
//! in one statement ([`Store::renew_holds`]). The holds of a gateway that
//! died, or that cannot reach the database for longer than a lease, stop
//! counting by themselves; expired holds are deleted later
//! ([`Store::purge_expired_holds`]), so a late renewal may still revive
//! them.
//!
//! Holds need PostgreSQL's row locks: on SQLite, which serves one process,
//! the gateway holds in memory, and admitting or renewing here is refused.

use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};

use crate::admission::{self, PaymentRequired};
use crate::core::{AccountId, DurationMs, GatewayId, MicroUsd, RequestId, TenantId, TimestampMs};
use crate::statement::Period;

use super::rows::{self, AccountRow, ACCOUNT_COLUMNS};
use super::{Backend, Store, StoreError, TENANT_SPENT_SQL};

/// The database's clock in epoch milliseconds (PostgreSQL). The wall clock
/// of the moment the statement runs, not the transaction's start, so that a
/// transaction that waited for a tenant's lock reads the time it got it.
const PG_NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// Deletes one request's hold (settlement and release; both backends).
pub(super) const DELETE_HOLD: &str = "DELETE FROM ledger_holds WHERE hold_id = $1";

/// What admitting a request with a hold needs to know.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    /// The request; its id is the hold's id, and its settlement deletes it.
    pub request_id: &'a RequestId,
    pub tenant: &'a TenantId,
    /// Opens a missing account without a floor (fleet tenants), rather than
    /// prepaid with a zero balance.
    pub unlimited: bool,
    /// What the request may cost at most (`admission::worst_case_cost`).
    pub worst_case: MicroUsd,
    /// The gateway that will renew the hold's lease.
    pub gateway: &'a GatewayId,
    /// How long the hold counts unless renewed.
    pub lease: DurationMs,
    /// The period whose spend counts against the daily cap (today, UTC).
    pub today: Period,
}

/// How an admission with a hold ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldAdmission {
    /// Admitted: the hold is in, and counts until `expires_at` (the
    /// database's clock) unless renewed.
    Held { expires_at: TimestampMs },
    /// The tenant cannot pay for the worst case on top of its holds; no hold
    /// was taken.
    Refused(PaymentRequired),
}

impl Store {
    /// Admits a request against the tenant's money net of its unexpired
    /// holds, and holds its worst case, in one transaction serialised per
    /// tenant (see the module doc). PostgreSQL only.
    pub async fn admit_with_hold(
        &self,
        request: &HoldRequest<'_>,
    ) -> Result<HoldAdmission, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Err(StoreError::Unsupported(
                "holds in the ledger need PostgreSQL",
            ));
        };
        let lease = rows::to_sql("hold lease", request.lease.0)?;
        let mut tx = pool.begin().await?;
        let account = lock_tenant(&mut tx, request.tenant, request.unlimited).await?;
        let cap = read_daily_cap(&mut tx, request.tenant).await?;
        let spent = match cap {
            Some(_) => read_spent(&mut tx, request.tenant, request.today).await?,
            None => MicroUsd::ZERO,
        };
        let (held, now) = read_held(&mut tx, request.tenant).await?;
        let held_view = crate::core::AccountState {
            debits_posted: MicroUsd(account.debits_posted.0.saturating_add(held.0)),
            ..account
        };
        let spent_view = MicroUsd(spent.0.saturating_add(held.0));
        if let Err(refusal) = admission::check(request.worst_case, &held_view, cap, spent_view) {
            // Opening the account is kept: it happens at a tenant's first
            // request, admitted or not.
            tx.commit().await?;
            return Ok(HoldAdmission::Refused(refusal));
        }
        let expires_at = TimestampMs(now.0.saturating_add(lease));
        sqlx::query(
            "INSERT INTO ledger_holds (hold_id, tenant_id, amount, gateway_id, expires_at_ms) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(request.request_id.as_str())
        .bind(request.tenant.as_str())
        .bind(request.worst_case.0)
        .bind(request.gateway.as_str())
        .bind(expires_at.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(HoldAdmission::Held { expires_at })
    }

    /// Releases a request's hold without a settlement (it failed, was
    /// abandoned or was cancelled before any work). Whether a hold was
    /// there.
    pub async fn release_hold(&self, request: &RequestId) -> Result<bool, StoreError> {
        let deleted = on_pool!(self, pool => sqlx::query(DELETE_HOLD)
            .bind(request.as_str())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(deleted > 0)
    }

    /// Extends the leases of `holds` that `gateway` holds to `lease` from
    /// now, in one statement, expired ones included (a gateway that renews
    /// late still has those requests in flight). Returns how many it found:
    /// fewer than asked means some were settled, released or purged.
    /// PostgreSQL only.
    pub async fn renew_holds(
        &self,
        gateway: &GatewayId,
        holds: &[RequestId],
        lease: DurationMs,
    ) -> Result<u64, StoreError> {
        let pool = postgres_pool(self)?;
        let lease = rows::to_sql("hold lease", lease.0)?;
        let ids: Vec<&str> = holds.iter().map(RequestId::as_str).collect();
        let sql = format!(
            "UPDATE ledger_holds AS h SET expires_at_ms = {PG_NOW_MS} + $3 \
             FROM UNNEST($2::text[]) AS k(id) WHERE h.hold_id = k.id AND h.gateway_id = $1"
        );
        let renewed = sqlx::query(&sql)
            .bind(gateway.as_str())
            .bind(&ids)
            .bind(lease)
            .execute(pool)
            .await?
            .rows_affected();
        Ok(renewed)
    }

    /// Deletes the holds that expired at least `grace` ago (they count for
    /// nothing; the grace lets a gateway that renews late revive its own).
    /// A hold stops counting when the clock reaches its expiry, so with no
    /// grace it is purgeable in that same millisecond.
    /// PostgreSQL only. Returns how many were deleted.
    pub async fn purge_expired_holds(&self, grace: DurationMs) -> Result<u64, StoreError> {
        let pool = postgres_pool(self)?;
        let grace = rows::to_sql("hold purge grace", grace.0)?;
        let sql = format!("DELETE FROM ledger_holds WHERE expires_at_ms <= {PG_NOW_MS} - $1");
        let purged = sqlx::query(&sql)
            .bind(grace)
            .execute(pool)
            .await?
            .rows_affected();
        Ok(purged)
    }

    /// What a tenant's unexpired holds add up to now (PostgreSQL only).
    pub async fn tenant_held(&self, tenant: &TenantId) -> Result<MicroUsd, StoreError> {
        let pool = postgres_pool(self)?;
        let mut connection = pool.acquire().await?;
        let (held, _now) = read_held(&mut connection, tenant).await?;
        Ok(held)
    }

    /// The latest expiry among a gateway's holds (PostgreSQL only); `None`
    /// when it holds nothing.
    pub async fn gateway_holds_expiry(
        &self,
        gateway: &GatewayId,
    ) -> Result<Option<TimestampMs>, StoreError> {
        let pool = postgres_pool(self)?;
        let (latest,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(expires_at_ms) FROM ledger_holds WHERE gateway_id = $1")
                .bind(gateway.as_str())
                .fetch_one(pool)
                .await?;
        Ok(latest.map(TimestampMs))
    }

    /// The database's clock, the one hold leases are read on (PostgreSQL
    /// only).
    pub async fn database_now(&self) -> Result<TimestampMs, StoreError> {
        let pool = postgres_pool(self)?;
        let (now,): (i64,) = sqlx::query_as(&format!("SELECT {PG_NOW_MS}"))
            .fetch_one(pool)
            .await?;
        Ok(TimestampMs(now))
    }
}

fn postgres_pool(store: &Store) -> Result<&PgPool, StoreError> {
    match &store.backend {
        Backend::Postgres(pool) => Ok(pool),
        Backend::Sqlite(_) => Err(StoreError::Unsupported(
            "holds in the ledger need PostgreSQL",
        )),
    }
}

/// Opens the tenant's account if needed and locks its row until the
/// transaction ends.
async fn lock_tenant(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
    unlimited: bool,
) -> Result<crate::core::AccountState, StoreError> {
    let account = AccountId::Tenant(tenant.clone());
    let floor = if unlimited { None } else { Some(0_i64) };
    sqlx::query(
        "INSERT INTO ledger_accounts (id, balance_floor) VALUES ($1, $2) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(account.to_string())
    .bind(floor)
    .execute(&mut **tx)
    .await?;
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM ledger_accounts WHERE id = $1 FOR UPDATE");
    let row: Option<AccountRow> = sqlx::query_as(&sql)
        .bind(account.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let row = row.ok_or(StoreError::AccountNotFound(account))?;
    rows::account_from_row(row).map(|(_, state)| state)
}

async fn read_daily_cap(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
) -> Result<Option<MicroUsd>, StoreError> {
    let row: Option<(Option<i64>,)> =
        sqlx::query_as("SELECT daily_cap FROM ledger_tenant_limits WHERE tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.and_then(|(cap,)| cap).map(MicroUsd))
}

async fn read_spent(
    tx: &mut Transaction<'static, Postgres>,
    tenant: &TenantId,
    period: Period,
) -> Result<MicroUsd, StoreError> {
    let (spent,): (i64,) = sqlx::query_as(TENANT_SPENT_SQL)
        .bind(AccountId::Tenant(tenant.clone()).to_string())
        .bind(period.from.0)
        .bind(period.until.0)
        .fetch_one(&mut **tx)
        .await?;
    Ok(MicroUsd(spent))
}

/// The tenant's unexpired holds and the database's clock they were read at.
async fn read_held(
    connection: &mut sqlx::PgConnection,
    tenant: &TenantId,
) -> Result<(MicroUsd, TimestampMs), StoreError> {
    let sql = format!(
        "WITH clock AS (SELECT {PG_NOW_MS} AS now_ms) \
         SELECT CAST(COALESCE(SUM(h.amount), 0) AS BIGINT), clock.now_ms FROM clock \
         LEFT JOIN ledger_holds h ON h.tenant_id = $1 AND h.expires_at_ms > clock.now_ms \
         GROUP BY clock.now_ms"
    );
    let (held, now): (i64, i64) = sqlx::query_as(&sql)
        .bind(tenant.as_str())
        .fetch_one(&mut *connection)
        .await?;
    Ok((MicroUsd(held), TimestampMs(now)))
}
