//! Money held for in-flight requests: each admitted request holds its worst
//! case until it is settled or abandoned, so that a tenant's concurrent
//! requests cannot together spend more than it has.
//!
//! Two books sit behind one interface, [`Holds`], so that billing has one
//! code path:
//!
//! - **In memory** ([`HoldBook`]), for a ledger that one process uses (the
//!   embedded SQLite). The book lives under a `std::sync::Mutex` that is
//!   never held across an `.await`. Each release bumps the tenant's epoch:
//!   an admission that read the ledger balance before a settlement committed
//!   sees the epoch move and reads again, so a charge is always counted
//!   either in the balance or as a hold, never in neither.
//! - **In the ledger** ([`SharedHolds`]), for a PostgreSQL ledger that
//!   several gateways share: admission is one ledger transaction per request,
//!   serialised per tenant, that checks the worst case against the balance
//!   net of every gateway's unexpired holds and inserts the request's hold
//!   (`ledger::store::holds`). The settlement deletes the hold in the
//!   transaction that posts the charge. Each hold carries a lease; a
//!   background task renews the leases of this gateway's holds every
//!   `lease / HOLD_RENEWALS_PER_LEASE`, in one statement, so the holds of a
//!   gateway that dies stop counting one lease after its last renewal.
//!
//! Every call to a shared ledger is bounded by [`HOLD_LEDGER_TIMEOUT`]: a
//! database that does not answer makes admission fail fast with
//! [`BillingError::Unavailable`] (503 and `Retry-After`) instead of holding
//! the client. A hold whose release cannot reach the database expires by
//! itself, which errs on the side of refusing: it counts one lease too long.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ledger::admission::{self, PaymentRequired};
use ledger::core::{AccountState, DurationMs, GatewayId, MicroUsd, RequestId, TenantId};
use ledger::statement::Period;
use ledger::store::{HoldAdmission, HoldRequest, Store as Ledger, StoreError};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::billing::{BillingError, ADMISSION_ATTEMPTS_MAX};
use crate::limits::RETRY_AFTER_DEFAULT_SECONDS;

/// How long a hold in a shared ledger counts without a renewal: the time
/// after which a dead gateway's holds stop counting.
pub const HOLD_LEASE_DEFAULT: Duration = Duration::from_secs(30);

/// The shortest lease accepted: renewals run three times per lease, and
/// each may take up to `HOLD_LEDGER_TIMEOUT`.
pub const HOLD_LEASE_MIN: Duration = Duration::from_secs(1);

/// Renewals per lease: a lease survives two renewals in a row that fail.
pub const HOLD_RENEWALS_PER_LEASE: u32 = 3;

/// The most one admission, release or renewal waits for a shared ledger.
pub const HOLD_LEDGER_TIMEOUT: Duration = Duration::from_secs(2);

/// How the holds of a shared (PostgreSQL) ledger behave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldConfig {
    /// How long a hold counts unless its gateway renews it.
    pub lease: Duration,
}

impl Default for HoldConfig {
    fn default() -> HoldConfig {
        HoldConfig {
            lease: HOLD_LEASE_DEFAULT,
        }
    }
}

impl HoldConfig {
    fn check(&self) -> Result<(), BillingError> {
        if self.lease < HOLD_LEASE_MIN {
            return Err(BillingError::Invalid(format!(
                "the hold lease must be at least {HOLD_LEASE_MIN:?}, not {:?}",
                self.lease
            )));
        }
        Ok(())
    }

    fn lease_ms(&self) -> DurationMs {
        DurationMs(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
    }

    fn renewal_interval(&self) -> Duration {
        self.lease / HOLD_RENEWALS_PER_LEASE
    }
}

/// One request's admission, as the hold books need it.
#[derive(Debug)]
pub(crate) struct HoldAsk<'a> {
    pub(crate) request_id: &'a RequestId,
    pub(crate) tenant: &'a TenantId,
    /// A fleet tenant: its account, opened at its first request, has no
    /// floor.
    pub(crate) unlimited: bool,
    pub(crate) worst_case: MicroUsd,
    /// The period whose spend counts against the daily cap.
    pub(crate) today: Period,
}

/// The holds of this gateway: in memory or in a shared ledger.
pub(crate) enum Holds {
    Memory(Arc<HoldBook>),
    Shared(Arc<SharedHolds>),
}

impl Holds {
    /// Holds for `ledger`: in the ledger when it is PostgreSQL (shared by
    /// gateways), with a renewal task that ends when the returned guard is
    /// dropped; in memory otherwise.
    pub(crate) fn for_ledger(
        ledger: &Arc<Ledger>,
        config: &HoldConfig,
    ) -> Result<(Holds, Option<DropGuard>), BillingError> {
        config.check()?;
        if ledger.backend_name() != "postgres" {
            return Ok((Holds::Memory(Arc::new(HoldBook::default())), None));
        }
        let gateway = GatewayId::new(format!("gateway-{}", uuid::Uuid::new_v4().simple()))
            .map_err(|error| BillingError::internal("name this gateway", &error))?;
        let shared = Arc::new(SharedHolds {
            ledger: Arc::clone(ledger),
            gateway,
            config: config.clone(),
            live: Mutex::new(HashSet::new()),
            renewed_until: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        tokio::spawn(renew_until_stopped(Arc::clone(&shared), stop.clone()));
        Ok((Holds::Shared(shared), Some(stop.drop_guard())))
    }

    /// Checks the request's worst case against the tenant's money net of
    /// its holds and, if it fits, holds it.
    pub(crate) async fn admit(
        &self,
        ledger: &Ledger,
        ask: &HoldAsk<'_>,
    ) -> Result<Hold, BillingError> {
        match self {
            Holds::Memory(book) => book.admit(ledger, ask).await,
            Holds::Shared(shared) => shared.admit(ask).await,
        }
    }

    /// This gateway's id in a shared ledger; `None` for holds in memory.
    pub(crate) fn gateway(&self) -> Option<&GatewayId> {
        match self {
            Holds::Memory(_) => None,
            Holds::Shared(shared) => Some(&shared.gateway),
        }
    }
}

/// A ledger failure on the way to a hold: 503 and `Retry-After` when the
/// database is not there for now, an internal failure otherwise.
pub(crate) fn ledger_failure(what: &'static str, error: &StoreError) -> BillingError {
    if error.is_unavailable() {
        tracing::warn!(%error, "billing: {what}: the ledger is unavailable");
        return BillingError::Unavailable {
            retry_after_seconds: RETRY_AFTER_DEFAULT_SECONDS,
        };
    }
    BillingError::internal(what, error)
}

/// Worst cases held for a tenant's in-flight requests.
#[derive(Debug, Default)]
pub(crate) struct TenantHolds {
    pub(crate) held: MicroUsd,
    /// Bumped whenever a hold is released, so an admission that read the
    /// balance before a settlement can tell and read again.
    pub(crate) epoch: u64,
}

/// The in-memory book, for a ledger one process uses.
#[derive(Debug, Default)]
pub(crate) struct HoldBook {
    tenants: Mutex<HashMap<TenantId, TenantHolds>>,
}

impl HoldBook {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<TenantId, TenantHolds>> {
        // The map stays consistent between statements; a panic elsewhere
        // while holding it must not stop billing.
        self.tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn epoch(&self, tenant: &TenantId) -> u64 {
        self.lock().get(tenant).map_or(0, |holds| holds.epoch)
    }

    pub(crate) fn release(&self, tenant: &TenantId, amount: MicroUsd) {
        let mut tenants = self.lock();
        if let Some(holds) = tenants.get_mut(tenant) {
            holds.held = MicroUsd(holds.held.0.saturating_sub(amount.0).max(0));
            holds.epoch += 1;
        }
    }

    /// Reads the tenant's account, cap and spend, then checks and holds
    /// under the book's lock, again if a settlement released a hold of the
    /// tenant meanwhile.
    async fn admit(
        self: &Arc<Self>,
        ledger: &Ledger,
        ask: &HoldAsk<'_>,
    ) -> Result<Hold, BillingError> {
        for _ in 0..ADMISSION_ATTEMPTS_MAX {
            let epoch = self.epoch(ask.tenant);
            let (account, cap, spent) = read_money(ledger, ask).await?;
            let mut tenants = self.lock();
            let holds = tenants.entry(ask.tenant.clone()).or_default();
            if holds.epoch != epoch {
                // A settlement released a hold since we read the balance:
                // the balance we read may not show its charge yet.
                continue;
            }
            check_with_held(ask.worst_case, &account, cap, spent, holds.held)?;
            holds.held = MicroUsd(holds.held.0.saturating_add(ask.worst_case.0));
            return Ok(Hold {
                kind: Some(HoldKind::Memory {
                    book: Arc::clone(self),
                    tenant: ask.tenant.clone(),
                    amount: ask.worst_case,
                }),
            });
        }
        Err(BillingError::Contended {
            retry_after_seconds: RETRY_AFTER_DEFAULT_SECONDS,
        })
    }
}

/// The tenant's account (opened if it has none), daily cap and, with a
/// cap, what it spent in `ask.today`.
async fn read_money(
    ledger: &Ledger,
    ask: &HoldAsk<'_>,
) -> Result<(AccountState, Option<MicroUsd>, MicroUsd), BillingError> {
    let account = ledger
        .ensure_tenant(ask.tenant, ask.unlimited)
        .await
        .map_err(|error| ledger_failure("read the tenant's account", &error))?;
    let cap = ledger
        .daily_cap(ask.tenant)
        .await
        .map_err(|error| ledger_failure("read the daily cap", &error))?;
    let spent = match cap {
        Some(_) => ledger
            .tenant_spent(ask.tenant, ask.today)
            .await
            .map_err(|error| ledger_failure("read today's spend", &error))?,
        None => MicroUsd::ZERO,
    };
    Ok((account, cap, spent))
}

/// The ledger's admission check with `held` counted as spent and debited.
fn check_with_held(
    worst_case: MicroUsd,
    account: &AccountState,
    cap: Option<MicroUsd>,
    spent: MicroUsd,
    held: MicroUsd,
) -> Result<(), PaymentRequired> {
    let held_view = AccountState {
        debits_posted: MicroUsd(account.debits_posted.0.saturating_add(held.0)),
        ..*account
    };
    let spent_view = MicroUsd(spent.0.saturating_add(held.0));
    admission::check(worst_case, &held_view, cap, spent_view)
}

/// This gateway's holds in a shared ledger.
pub(crate) struct SharedHolds {
    ledger: Arc<Ledger>,
    gateway: GatewayId,
    config: HoldConfig,
    /// The requests whose holds this gateway renews: admitted, not yet
    /// settled or released. Bounded by the gateway's in-flight requests.
    live: Mutex<HashSet<RequestId>>,
    /// Until when the last renewal (or the first admission) keeps this
    /// gateway's holds counting, by this process's clock.
    renewed_until: Mutex<Option<Instant>>,
}

impl SharedHolds {
    async fn admit(self: &Arc<Self>, ask: &HoldAsk<'_>) -> Result<Hold, BillingError> {
        let request = HoldRequest {
            request_id: ask.request_id,
            tenant: ask.tenant,
            unlimited: ask.unlimited,
            worst_case: ask.worst_case,
            gateway: &self.gateway,
            lease: self.config.lease_ms(),
            today: ask.today,
        };
        let started = Instant::now();
        let admitted =
            tokio::time::timeout(HOLD_LEDGER_TIMEOUT, self.ledger.admit_with_hold(&request))
                .await
                // A transaction cut short may still have committed its hold: it
                // is in no live set, so it expires after one lease.
                .map_err(|_elapsed| {
                    unavailable("admit a request", &"the ledger did not answer in time")
                })?
                .map_err(|error| ledger_failure("admit a request", &error))?;
        match admitted {
            HoldAdmission::Refused(refusal) => Err(BillingError::Refused(refusal)),
            HoldAdmission::Held { .. } => {
                self.lock_live().insert(ask.request_id.clone());
                self.note_lease(started);
                Ok(Hold {
                    kind: Some(HoldKind::Shared {
                        holds: Arc::clone(self),
                        request: ask.request_id.clone(),
                    }),
                })
            }
        }
    }

    fn lock_live(&self) -> MutexGuard<'_, HashSet<RequestId>> {
        // A plain set: whatever a panicking holder left is still usable.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the ledger set this gateway's leases from a moment no
    /// earlier than `asked_at`: they count until `asked_at + lease` at least.
    fn note_lease(&self, asked_at: Instant) {
        let until = asked_at + self.config.lease;
        let mut renewed = self
            .renewed_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if renewed.is_none_or(|current| current < until) {
            *renewed = Some(until);
        }
    }

    /// Whether this gateway's holds may have stopped counting: no renewal
    /// confirmed them for a whole lease.
    fn lapsed(&self) -> bool {
        let renewed = self
            .renewed_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        renewed.is_some_and(|until| until < Instant::now())
    }

    /// Forgets a request's hold; with `delete`, deletes it from the ledger
    /// in a task of its own (a settlement deleted it already otherwise).
    fn forget(self: &Arc<Self>, request: RequestId, delete: bool) {
        self.lock_live().remove(&request);
        if !delete {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (shutting down): the hold expires by itself.
            return;
        };
        let holds = Arc::clone(self);
        runtime.spawn(async move {
            let released =
                tokio::time::timeout(HOLD_LEDGER_TIMEOUT, holds.ledger.release_hold(&request)).await;
            match released {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(request_id = %request, %error, "release a hold; it expires by itself");
                }
                Err(_) => {
                    tracing::warn!(request_id = %request, "release a hold timed out; it expires by itself");
                }
            }
        });
    }

    /// One renewal: extends the leases of the holds in flight, then deletes
    /// holds that expired a lease ago (any gateway's).
    async fn renew(&self) {
        let live: Vec<RequestId> = self.lock_live().iter().cloned().collect();
        if !live.is_empty() {
            let asked_at = Instant::now();
            let renewal = self
                .ledger
                .renew_holds(&self.gateway, &live, self.config.lease_ms());
            match tokio::time::timeout(HOLD_LEDGER_TIMEOUT, renewal).await {
                Ok(Ok(_renewed)) => self.note_lease(asked_at),
                Ok(Err(error)) => self.renewal_failed(&error),
                Err(_) => self.renewal_failed(&"the ledger did not answer in time"),
            }
        }
        let purge = self.ledger.purge_expired_holds(self.config.lease_ms());
        if let Ok(Err(error)) = tokio::time::timeout(HOLD_LEDGER_TIMEOUT, purge).await {
            tracing::debug!(%error, "purge expired holds");
        }
    }

    fn renewal_failed(&self, error: &dyn fmt::Display) {
        if self.lapsed() {
            tracing::error!(
                %error,
                gateway_id = %self.gateway,
                "hold leases lapsed: this gateway's in-flight requests no longer hold their \
                 tenants' money in the shared ledger"
            );
        } else {
            tracing::warn!(%error, gateway_id = %self.gateway, "renew hold leases");
        }
    }
}

/// Renews this gateway's leases every `lease / HOLD_RENEWALS_PER_LEASE`
/// until `stop` is cancelled (its `Billing` was dropped). A renewal under
/// way is abandoned then too: one still waiting for the ledger could
/// otherwise land a whole lease later and revive holds that other gateways
/// have already seen expire.
async fn renew_until_stopped(holds: Arc<SharedHolds>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(holds.config.renewal_interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = holds.renew() => {}
        }
    }
}

fn unavailable(what: &'static str, cause: &dyn fmt::Display) -> BillingError {
    tracing::warn!(error = %cause, "billing: {what}: the ledger is unavailable");
    BillingError::Unavailable {
        retry_after_seconds: RETRY_AFTER_DEFAULT_SECONDS,
    }
}

enum HoldKind {
    Memory {
        book: Arc<HoldBook>,
        tenant: TenantId,
        amount: MicroUsd,
    },
    Shared {
        holds: Arc<SharedHolds>,
        request: RequestId,
    },
}

/// A request's worst case, held until the request is settled or abandoned:
/// dropped, it releases the hold.
pub(crate) struct Hold {
    /// `None` once settled.
    kind: Option<HoldKind>,
}

impl Hold {
    /// Ends the hold of a request whose settlement committed. In memory it
    /// is released now (after the commit, never before it); in a shared
    /// ledger the settlement's transaction deleted it.
    pub(crate) fn settled(mut self) {
        match self.kind.take() {
            Some(HoldKind::Shared { holds, request }) => holds.forget(request, false),
            Some(HoldKind::Memory {
                book,
                tenant,
                amount,
            }) => book.release(&tenant, amount),
            None => {}
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        match self.kind.take() {
            Some(HoldKind::Shared { holds, request }) => holds.forget(request, true),
            Some(HoldKind::Memory {
                book,
                tenant,
                amount,
            }) => book.release(&tenant, amount),
            None => {}
        }
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Some(HoldKind::Memory { tenant, amount, .. }) => f
                .debug_struct("Hold")
                .field("tenant", tenant)
                .field("amount", amount)
                .finish(),
            Some(HoldKind::Shared { holds, request }) => f
                .debug_struct("Hold")
                .field("gateway", &holds.gateway)
                .field("request", request)
                .finish(),
            None => f.write_str("Hold(settled)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_hold_frees_its_money_and_moves_the_epoch() {
        let book = Arc::new(HoldBook::default());
        let tenant = TenantId::new("acme").unwrap();
        book.lock().entry(tenant.clone()).or_default().held = MicroUsd(700);
        let hold = Hold {
            kind: Some(HoldKind::Memory {
                book: Arc::clone(&book),
                tenant: tenant.clone(),
                amount: MicroUsd(300),
            }),
        };
        let before = book.epoch(&tenant);
        drop(hold);
        assert_eq!(book.lock()[&tenant].held, MicroUsd(400));
        assert_eq!(book.epoch(&tenant), before + 1);
    }

    #[test]
    fn a_settled_hold_in_memory_is_released_once() {
        let book = Arc::new(HoldBook::default());
        let tenant = TenantId::new("acme").unwrap();
        book.lock().entry(tenant.clone()).or_default().held = MicroUsd(700);
        let hold = Hold {
            kind: Some(HoldKind::Memory {
                book: Arc::clone(&book),
                tenant: tenant.clone(),
                amount: MicroUsd(300),
            }),
        };
        hold.settled();
        assert_eq!(book.lock()[&tenant].held, MicroUsd(400));
    }

    #[test]
    fn a_lease_shorter_than_the_minimum_is_refused() {
        let short = HoldConfig {
            lease: HOLD_LEASE_MIN / 2,
        };
        assert!(matches!(short.check(), Err(BillingError::Invalid(_))));
        assert!(HoldConfig::default().check().is_ok());
        assert_eq!(
            HoldConfig::default().renewal_interval(),
            Duration::from_secs(10)
        );
    }
}
