//! Billing on the request path: admission against the tenant's money before
//! any work starts, and settlement in the ledger before the response ends.
//!
//! **Admission.** A request's worst case (its whole prompt plus `max_tokens`
//! completion tokens at the tenant's price) must fit what the tenant's account
//! has available *after* the worst cases of its other in-flight requests (its
//! holds, `billing_holds`), and what is left of its daily spend cap after
//! them. Otherwise the gateway answers 402 and nothing is queued. With the
//! embedded SQLite ledger one process holds, in memory. With a PostgreSQL
//! ledger the holds are rows of the ledger that every gateway sharing it
//! sees: admission is one transaction serialised per tenant (the tenant's
//! account row locked), so gateways cannot together admit more than the
//! tenant has; a ledger that does not answer within `HOLD_LEDGER_TIMEOUT`
//! makes admission fail with 503 and `Retry-After`.
//!
//! **Holds end with the money they stand for.** A settlement deletes its
//! request's hold in the transaction that posts the charge (in memory: just
//! after the commit), so a charge counts as a hold or in the balance, never
//! in neither. A request that fails or is abandoned releases its hold.
//!
//! **Leases, and what a tenant can overspend.** A shared hold counts for a
//! lease (`HoldConfig::lease`, 30 s by default, `fleetgrid gateway
//! --hold-lease-ms`) that its gateway renews, for all its holds in one
//! statement, three times per lease. The holds of a gateway that dies
//! (`kill -9`) stop counting one lease after its last renewal, and other
//! gateways admit against that money again. The answers it was serving are
//! never settled: the tokens it delivered before it died are never charged
//! (nor are their nodes paid), at most those requests' worst cases, which
//! are the platform's cost; nothing is charged twice. A gateway
//! cut off from the ledger for longer than a lease, whose requests keep
//! running, is the one way to admit more than a tenant has: for that
//! tenant, at most the sum of the worst cases that gateway had in flight
//! when its lease ran out (it admits nothing new while cut off). Even then
//! the tenant's balance never goes below its floor (the ledger refuses a
//! charge that would take it there, and the request ends withheld, as a
//! failed settlement does): the overrun is the platform's cost, bounded by
//! those worst cases. The daily spend cap, which settlement does not check,
//! may be exceeded by as much. Holds whose release could not reach the
//! ledger count until their lease ends: that errs on the side of refusing.
//!
//! **A ledger that is away at settlement.** A settlement that fails because
//! the ledger is unreachable (not because it refused) is kept in memory
//! with its hold (renewed all along) and retried until it commits
//! (`billing/settle_retry.rs`, at most `SETTLEMENT_RETRIES_MAX` at a time):
//! answers already running when the ledger went away are charged and paid
//! once it is back, and no ledger entry is lost. The client is told its
//! result is withheld and will be charged; a retry with the same
//! Idempotency-Key replays it without a second charge.
//!
//! **Settlement.** When a generation finishes, the core's own counts (see
//! `billing_meter`) become the ledger's `CompletedRequest`: the prompt once,
//! every completion token once, one segment per node attempt with its compute
//! time and energy (from the node's power profile and the owner's tariff).
//! The gateway commits it, durably, before the final response or the final
//! SSE chunk and `[DONE]` leave; if the commit fails the client gets an error
//! instead of a success it was not charged for. Re-prefill after a migration
//! is never charged to the tenant (the ledger's settlement rules).
//!
//! **Routed requests** (`auto`, `cloud/<model>`) are admitted once, with
//! `admit_any`, for every model that may serve them (the dearest assumed),
//! and settled once through `billing_finish::RoutedBooking`: the cloud's part
//! is a cloud segment priced by the sheet's `upstream` section under
//! `cloud/<model>` plus its cloud margin; the customer pays the marked-up
//! price, the platform owes the upstream its cost.
//!
//! **Failed generations are not charged**, whatever they produced before
//! failing (a timeout included): the work is the platform's cost, and owners
//! are not credited for it either. **A generation the client cancels** (it
//! hung up) is charged for the prompt and the tokens committed until then,
//! and its nodes are credited for them (`billing_finish::CancelCharge`), so
//! hanging up early never makes the fleet's work free.
//!
//! **Accounts are keyed by ids** (`billing_accounts`): a tenant's by its
//! tenant id, an owner's by its owner id, a node enrolled without owner by
//! its node name in a namespace of its own. Names are for people only.
//!
//! **Errors.** Billing speaks its own [`BillingError`]: a refusal with the
//! ledger's amounts, a ledger that did not take a settlement, a missing
//! price, an internal failure. The gateway maps it to its HTTP answer in
//! one place, so nothing here knows a status code.
//!
//! **Tenants without settings.** A tenant's ledger account is opened at its
//! first request: `fleet` tenants (the operator's own workloads) without a
//! floor, so they are metered and invoiced but never refused for money;
//! `reserved` and `spot` tenants prepaid with a zero balance, so they need a
//! top-up or a credit limit (`fleetgrid billing`) first.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ledger::admission::{self, AdmissionRequest};
use ledger::core::{
    BasisPoints, DurationMs, GatewayId, MicroUsd, ModelId, NodeId, OwnerId, RequestId, Segment,
    TenantId, TimestampMs, TokenCount,
};
use ledger::metering::{meter_node_segment, MeterTolerance, NodeObservation, UsageSegment};
use ledger::price_file::PriceConfig;
use ledger::pricing::{PriceBook, Rate, TenantClass};
use ledger::settlement::CompletedRequest;
use ledger::statement::Period;
use ledger::store::{MeterFlag, Store as Ledger, StoreError};
use tokio_util::sync::DropGuard;

use crate::billing_holds::{Hold, HoldAsk, HoldConfig, Holds};
use crate::billing_meter::Metering;
use crate::core::ORDER;
use crate::metrics::Metrics;
use crate::store::{Store, TenantRecord};

mod error;
mod settle_retry;

pub use error::BillingError;
pub use settle_retry::{
    SETTLEMENT_RETRIES_MAX, SETTLEMENT_RETRY_PAUSE_MAX, SETTLEMENT_RETRY_PAUSE_MIN,
};

/// File name of the SQLite ledger inside the data directory.
pub const LEDGER_FILE: &str = "ledger.db";

/// Attempts to admit a request while settlements of the same tenant keep
/// changing its balance between our read and our check.
pub const ADMISSION_ATTEMPTS_MAX: usize = 8;

/// The most one try to settle waits for the ledger before the settlement is
/// kept for retrying (the client waits for it).
pub const SETTLE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node's owner is remembered before it is looked up again.
pub const OWNER_CACHE_TTL: Duration = Duration::from_secs(30);

/// The most one look-up of a node's owner waits for the store.
pub const OWNER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Node owners remembered at most; beyond it the cache starts over.
pub const OWNER_CACHE_ENTRIES_MAX: usize = 100_000;

/// How far a node's report may stray from the coordinator's count: tokens
/// must agree exactly (both sides count the same committed tokens); compute
/// time may be up to twice ours, and always a second, because our count runs
/// from assignment to last token and theirs only while the engine works.
pub const METER_TOLERANCE: MeterTolerance = MeterTolerance {
    tokens: 0,
    compute: BasisPoints(10_000),
    compute_ms_min: 1_000,
};

/// Where the ledger lives and what it charges.
#[derive(Clone, Debug)]
pub struct BillingConfig {
    /// `postgres://…` for PostgreSQL, a path or `sqlite://PATH` for SQLite;
    /// `None` for `ledger.db` in the data directory.
    pub ledger_url: Option<String>,
    pub prices: Arc<PriceConfig>,
    /// How holds behave in a shared (PostgreSQL) ledger: their lease.
    pub holds: HoldConfig,
}

impl BillingConfig {
    /// The embedded default: SQLite in the data directory, the shipped prices.
    pub fn embedded() -> BillingConfig {
        let prices = PriceConfig::default_sheet()
            // The default sheet is a file of this crate, tested to parse.
            .unwrap_or_else(|error| panic!("the shipped price sheet is invalid: {error}"));
        BillingConfig {
            ledger_url: None,
            prices: Arc::new(prices),
            holds: HoldConfig::default(),
        }
    }
}

/// Opens the ledger a URL names (see `BillingConfig::ledger_url`).
pub async fn open_ledger(url: Option<&str>, data_dir: &Path) -> Result<Ledger, BillingError> {
    let open_error = |place: &str| {
        let place = place.to_string();
        move |source| BillingError::Open { place, source }
    };
    match url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            // The URL may hold a password: name only the host part.
            let place = url.rsplit('@').next().unwrap_or("postgresql").to_string();
            Ledger::connect_postgres(url)
                .await
                .map_err(open_error(&place))
        }
        other => {
            let path = match other {
                Some(url) => PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url)),
                None => data_dir.join(LEDGER_FILE),
            };
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| BillingError::Dir {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            Ledger::open_sqlite(&path)
                .await
                .map_err(open_error(&path.display().to_string()))
        }
    }
}

/// The ledger's key of a tenant: its immutable id, never its name (see
/// `billing_accounts`).
pub fn ledger_tenant(tenant: &TenantRecord) -> TenantId {
    crate::billing_accounts::tenant_key(tenant.id)
}

/// An admitted request: what settlement will need, and its hold.
#[derive(Debug)]
pub struct PendingCharge {
    pub request_id: RequestId,
    pub tenant: TenantId,
    pub class: TenantClass,
    pub model: ModelId,
    pub admitted_at: TimestampMs,
    pub worst_case: MicroUsd,
    pub(crate) hold: Hold,
}

/// A finished request ready to settle, and the node reports that disagreed.
#[derive(Clone, Debug)]
pub struct Completion {
    pub request: CompletedRequest,
    pub flags: Vec<MeterFlag>,
}

/// Why a settlement did not commit (logged where it happened).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SettleFailure {
    /// The ledger was not there (unreachable, restarting, too slow): the
    /// same settlement may commit later.
    Unavailable,
    /// The ledger refused it, or it could not be built: trying again will
    /// not help.
    Refused,
}

pub struct Billing {
    ledger: Arc<Ledger>,
    book: PriceBook,
    prices: Arc<PriceConfig>,
    holds: Holds,
    /// Stops the renewal of shared holds' leases when billing is dropped.
    _renewal: Option<DropGuard>,
    /// Stops applying quarantined vehicles' clawbacks when billing is dropped.
    _clawbacks: DropGuard,
    /// Stops paying the owners of vehicles that verified when billing is
    /// dropped.
    _check_payments: DropGuard,
    retries: Arc<settle_retry::SettlementRetries>,
    owners: Mutex<HashMap<String, (OwnerId, Instant)>>,
    /// Owners whose ledger account is known to exist.
    opened_owners: Mutex<HashSet<OwnerId>>,
    store: Store,
    metrics: Arc<Metrics>,
}

impl Billing {
    /// Opens the ledger and checks that every served model has a price for
    /// every tenant class; shared holds get the lease `config.holds` names.
    pub async fn open(
        config: &BillingConfig,
        data_dir: &Path,
        models: &[String],
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Billing, BillingError> {
        for model in models {
            let id = ModelId::new(model.as_str())
                .map_err(|error| BillingError::Invalid(format!("model {model}: {error}")))?;
            for class in [TenantClass::Fleet, TenantClass::Reserved, TenantClass::Spot] {
                if config.prices.sheet.rate(&id, class).is_err() {
                    return Err(BillingError::Unpriced {
                        model: model.clone(),
                        class,
                    });
                }
            }
        }
        let book = PriceBook::new(config.prices.sheet.clone())
            .map_err(|error| BillingError::Invalid(error.to_string()))?;
        let ledger = open_ledger(config.ledger_url.as_deref(), data_dir).await?;
        crate::billing_accounts::migrate_ledger(&store, &ledger, now())
            .await
            .map_err(|error| BillingError::Invalid(error.to_string()))?;
        let ledger = Arc::new(ledger);
        let (holds, renewal) = Holds::for_ledger(&ledger, &config.holds)?;
        tracing::info!(
            backend = ledger.backend_name(),
            gateway_id = holds.gateway().map(|id| id.as_str()),
            "ledger open"
        );
        let clawbacks = crate::billing_clawbacks::Clawbacks {
            ledger: Arc::clone(&ledger),
            book: book.clone(),
            store: store.clone(),
        }
        .spawn();
        let check_payments = crate::billing_checks::CheckPayments {
            ledger: Arc::clone(&ledger),
            book: book.clone(),
            prices: Arc::clone(&config.prices),
            store: store.clone(),
        }
        .spawn();
        Ok(Billing {
            ledger,
            book,
            prices: Arc::clone(&config.prices),
            holds,
            _renewal: renewal,
            _clawbacks: clawbacks,
            _check_payments: check_payments,
            retries: Arc::default(),
            owners: Mutex::new(HashMap::new()),
            opened_owners: Mutex::new(HashSet::new()),
            store,
            metrics,
        })
    }

    /// What applies quarantined vehicles' clawbacks to this ledger (a
    /// pass runs every `CLAWBACK_INTERVAL` on its own).
    pub fn clawbacks(&self) -> crate::billing_clawbacks::Clawbacks {
        crate::billing_clawbacks::Clawbacks {
            ledger: Arc::clone(&self.ledger),
            book: self.book.clone(),
            store: self.store.clone(),
        }
    }

    /// What pays answered checks to this ledger (a pass runs every
    /// `CHECK_PAY_INTERVAL` on its own).
    pub fn check_payments(&self) -> crate::billing_checks::CheckPayments {
        crate::billing_checks::CheckPayments {
            ledger: Arc::clone(&self.ledger),
            book: self.book.clone(),
            prices: Arc::clone(&self.prices),
            store: self.store.clone(),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The id under which this gateway holds money in a shared ledger;
    /// `None` when it holds in memory.
    pub fn gateway_id(&self) -> Option<&GatewayId> {
        self.holds.gateway()
    }

    /// How many settlements wait for the ledger to come back.
    pub fn settlements_waiting(&self) -> usize {
        self.retries.waiting()
    }

    /// Refuses a cloud model the price sheet has no upstream price for,
    /// with a sentence for the operator (checked when the server starts).
    pub fn check_cloud_priced(&self, model: &str) -> Result<(), String> {
        let sheet = self.book.sheet_at(now());
        let priced = ModelId::new(model)
            .ok()
            .is_some_and(|id| sheet.upstream.contains_key(&id));
        if priced {
            return Ok(());
        }
        Err(format!(
            "the price sheet has no upstream price for the cloud model {model}: add \"{model}\" \
             with its prompt and completion price per million tokens to the sheet's \"upstream\" \
             section (--prices)"
        ))
    }

    /// How a model is priced for a class by the sheet in force at `at`.
    pub fn rate_at(
        &self,
        model: &ModelId,
        class: TenantClass,
        at: TimestampMs,
    ) -> Result<Rate, BillingError> {
        self.book.sheet_at(at).rate(model, class).map_err(|error| {
            tracing::error!(%error, "billing: price a model");
            BillingError::UnknownPrice {
                model: model.to_string(),
            }
        })
    }

    /// Admits a request the tenant can pay for in the worst case, or refuses
    /// it with 402 before any work starts.
    pub async fn admit(
        &self,
        tenant: &TenantRecord,
        model: &str,
        prompt_tokens: usize,
        max_tokens: u32,
        request_id: &str,
    ) -> Result<PendingCharge, BillingError> {
        self.admit_any(tenant, &[model], prompt_tokens, max_tokens, request_id)
            .await
    }

    /// Admits a request that any of `models` may serve (a routed request:
    /// the edge model, the cloud model or both), assuming the dearest for
    /// its whole prompt and `max_tokens`. The charge's `model` is the first.
    pub async fn admit_any(
        &self,
        tenant: &TenantRecord,
        models: &[&str],
        prompt_tokens: usize,
        max_tokens: u32,
        request_id: &str,
    ) -> Result<PendingCharge, BillingError> {
        let now = now();
        let tenant_id = ledger_tenant(tenant);
        let class = tenant.class;
        let models = models
            .iter()
            .map(|model| ModelId::new(*model))
            .collect::<Result<Vec<ModelId>, _>>()
            .map_err(|error| BillingError::internal("model name", &error))?;
        let Some(model) = models.first().cloned() else {
            return Err(BillingError::internal(
                "admit a request",
                &"a request admitted for no model",
            ));
        };
        let request_id = RequestId::new(request_id)
            .map_err(|error| BillingError::internal("request id", &error))?;
        let worst_case = admission::worst_case_cost(
            self.book.sheet_at(now),
            &AdmissionRequest {
                models: &models,
                class,
                prompt_tokens: TokenCount(prompt_tokens as u64),
                max_completion_tokens: TokenCount(u64::from(max_tokens)),
            },
        )
        .map_err(|error| BillingError::internal("price the request", &error))?;
        let today = Period {
            from: now.utc_day_start(),
            until: TimestampMs(now.utc_day_start().0 + TimestampMs::PER_DAY),
        };
        let ask = HoldAsk {
            request_id: &request_id,
            tenant: &tenant_id,
            unlimited: class == TenantClass::Fleet,
            worst_case,
            today,
        };
        let hold = match self.holds.admit(&self.ledger, &ask).await {
            Ok(hold) => hold,
            Err(BillingError::Refused(refusal)) => {
                tracing::info!(request_id = %request_id, tenant_id = %tenant_id, %refusal, "payment required");
                return Err(BillingError::Refused(refusal));
            }
            Err(error) => return Err(error),
        };
        Ok(PendingCharge {
            request_id,
            tenant: tenant_id,
            class,
            model,
            admitted_at: now,
            worst_case,
            hold,
        })
    }

    /// Builds the ledger's record of a finished request from the core's
    /// counts, and checks the finishing node's own report against them.
    pub async fn complete(
        &self,
        pending: &PendingCharge,
        metering: &Metering,
    ) -> Result<Completion, BillingError> {
        let segments = self
            .node_segments(&pending.request_id, &pending.model, metering, 0)
            .await?;
        let flags = self.check_node_report(metering, segments.last());
        Ok(Completion {
            request: CompletedRequest {
                request_id: pending.request_id.clone(),
                tenant: pending.tenant.clone(),
                class: pending.class,
                admitted_at: pending.admitted_at,
                completed_at: TimestampMs(metering.finished_ms),
                segments,
            },
            flags,
        })
    }

    /// The ledger's segments of the node attempts in `metering`, numbered
    /// from `first_segment`, each priced for energy at its node's power
    /// profile and its owner's tariff.
    pub async fn node_segments(
        &self,
        request_id: &RequestId,
        model: &ModelId,
        metering: &Metering,
        first_segment: u32,
    ) -> Result<Vec<UsageSegment>, BillingError> {
        let mut segments = Vec::with_capacity(metering.segments.len());
        for (position, track) in metering.segments.iter().enumerate() {
            let node = NodeId::new(track.node.as_str())
                .map_err(|error| BillingError::internal("node name", &error))?;
            let owner = self.owner_of(&track.node).await?;
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            let observation = NodeObservation {
                request_id: request_id.clone(),
                segment: Segment(first_segment.saturating_add(position)),
                node: node.clone(),
                owner,
                model: model.clone(),
                prompt_tokens: TokenCount(u64::from(track.prefilled_tokens)),
                completion_tokens: TokenCount(u64::from(track.completion_tokens)),
                compute: DurationMs(track.compute_ms()),
                started_at: TimestampMs(track.started_ms),
            };
            segments.push(meter_node_segment(
                observation,
                &self.prices.power_of(&node),
                self.prices.tariff_of(&node),
            ));
        }
        Ok(segments)
    }

    /// Commits a finished request's transfers durably and returns what the
    /// tenant was charged. Settling the same request again changes nothing
    /// (the transfers exist). For a request settled without its charge (an
    /// idempotent replay settling a kept record again); an admitted request
    /// settles with `settle_charge`.
    pub async fn settle(&self, completion: &Completion) -> Result<MicroUsd, BillingError> {
        self.commit_settlement(completion)
            .await
            .map_err(|_failure| BillingError::LedgerUnavailable {
                retry_after_seconds: crate::limits::RETRY_AFTER_DEFAULT_SECONDS,
            })
    }

    /// Settles an admitted request and ends its hold: released with the
    /// commit, or with the request if the ledger refuses it. If the ledger
    /// cannot be reached, the settlement is kept with its hold and retried
    /// until it commits (`settle_retry`), and the client is told so with
    /// `SettlementPending`.
    pub async fn settle_charge(
        self: &Arc<Self>,
        pending: PendingCharge,
        completion: Completion,
    ) -> Result<MicroUsd, BillingError> {
        let retry_after_seconds = crate::limits::RETRY_AFTER_DEFAULT_SECONDS;
        match self.commit_settlement(&completion).await {
            Ok(charge) => {
                pending.hold.settled();
                Ok(charge)
            }
            Err(SettleFailure::Unavailable) => {
                Err(self.keep_for_later(pending, settle_retry::Kept::Completed(completion)))
            }
            // Refused: the hold goes with `pending`.
            Err(SettleFailure::Refused) => Err(BillingError::LedgerUnavailable {
                retry_after_seconds,
            }),
        }
    }

    /// Keeps a finished request that could not be metered yet (its nodes'
    /// owners could not be looked up: the store is away) with its hold, to
    /// meter and settle once the store is back; what the client is told.
    pub fn settle_later(
        self: &Arc<Self>,
        pending: PendingCharge,
        metering: Metering,
    ) -> BillingError {
        self.keep_for_later(pending, settle_retry::Kept::Metered(metering))
    }

    /// Keeps `kept` with its hold to settle once the ledger or the store is
    /// back (`SettlementPending`); with too many kept already it is given
    /// up and its hold released (`LedgerUnavailable`).
    fn keep_for_later(
        self: &Arc<Self>,
        pending: PendingCharge,
        kept: settle_retry::Kept,
    ) -> BillingError {
        let retry_after_seconds = crate::limits::RETRY_AFTER_DEFAULT_SECONDS;
        if settle_retry::keep(self, pending, kept) {
            BillingError::SettlementPending {
                retry_after_seconds,
            }
        } else {
            BillingError::LedgerUnavailable {
                retry_after_seconds,
            }
        }
    }

    /// One try to commit a settlement, within `SETTLE_ATTEMPT_TIMEOUT`; the
    /// meter flags are stored after it, best effort.
    pub(crate) async fn commit_settlement(
        &self,
        completion: &Completion,
    ) -> Result<MicroUsd, SettleFailure> {
        let request = &completion.request;
        let attempt = async {
            self.open_owner_accounts(request).await?;
            self.ledger.settle(request, &self.book).await
        };
        let committed = tokio::time::timeout(SETTLE_ATTEMPT_TIMEOUT, attempt).await;
        let receipt = match committed {
            Ok(Ok(receipt)) => receipt,
            Ok(Err(error)) => {
                tracing::error!(request_id = %request.request_id, %error, "settle request");
                return Err(if error.is_unavailable() {
                    SettleFailure::Unavailable
                } else {
                    SettleFailure::Refused
                });
            }
            Err(_) => {
                // It may have committed all the same: a retry finds the
                // transfers there and changes nothing.
                tracing::error!(request_id = %request.request_id, "settle request: the ledger did not answer in time");
                return Err(SettleFailure::Unavailable);
            }
        };
        tracing::info!(
            request_id = %request.request_id,
            tenant_id = %request.tenant,
            charge = %receipt.charge,
            transfers = receipt.transfers.len(),
            "settled"
        );
        if !completion.flags.is_empty() {
            // The flags are for review; a failure to store them must not
            // fail a request that is already settled.
            if let Err(error) = self.ledger.record_meter_flags(&completion.flags).await {
                tracing::error!(request_id = %request.request_id, %error, "store meter flags");
            }
        }
        Ok(receipt.charge)
    }

    /// Opens the account of every owner the request pays that has none yet
    /// (an owner's first earning); remembered so that it is done once.
    async fn open_owner_accounts(&self, request: &CompletedRequest) -> Result<(), StoreError> {
        for segment in &request.segments {
            let ledger::metering::Server::Node { owner, .. } = &segment.server else {
                continue;
            };
            if self.lock_opened().contains(owner) {
                continue;
            }
            self.ledger
                .open_account(&ledger::core::AccountId::Owner(owner.clone()))
                .await?;
            let mut opened = self.lock_opened();
            if opened.len() >= OWNER_CACHE_ENTRIES_MAX {
                opened.clear();
            }
            opened.insert(owner.clone());
        }
        Ok(())
    }

    fn lock_opened(&self) -> MutexGuard<'_, HashSet<OwnerId>> {
        // A plain cache: whatever a panicking holder left is still usable.
        self.opened_owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Flags, counts and logs where the finishing node's report disagrees
    /// with our count.
    pub fn check_node_report(
        &self,
        metering: &Metering,
        last: Option<&UsageSegment>,
    ) -> Vec<MeterFlag> {
        let flags = crate::billing_flags::node_report_flags(metering, last);
        for flag in &flags {
            self.metrics.node_report_mismatches.fetch_add(1, ORDER);
            tracing::warn!(
                request_id = %flag.request_id,
                node_id = %flag.node,
                field = %flag.field,
                coordinator_counted = flag.coordinator,
                node_reported = flag.node_value,
                "node usage report disagrees with the coordinator's count"
            );
        }
        flags
    }

    /// The owner paid for `node`'s work: remembered for `OWNER_CACHE_TTL`,
    /// then looked up again. While the store is away, a remembered owner
    /// however old is used; with none, `LedgerUnavailable` (the request is
    /// kept and settled once the owner can be looked up).
    async fn owner_of(&self, node: &str) -> Result<OwnerId, BillingError> {
        let cached = self.lock_owners().get(node).cloned();
        if let Some((owner, fetched)) = &cached {
            if fetched.elapsed() < OWNER_CACHE_TTL {
                return Ok(owner.clone());
            }
        }
        let lookup = tokio::time::timeout(OWNER_LOOKUP_TIMEOUT, self.store.node_record(node));
        let record = match lookup.await {
            Ok(Ok(record)) => record,
            Ok(Err(error)) if !error.is_unavailable() => {
                return Err(BillingError::internal("look up a node's owner", &error));
            }
            away => {
                if let Ok(Err(error)) = away {
                    tracing::warn!(%node, %error, "look up a node's owner: the store is away");
                }
                return match cached {
                    Some((owner, _)) => Ok(owner),
                    None => Err(BillingError::LedgerUnavailable {
                        retry_after_seconds: crate::limits::RETRY_AFTER_DEFAULT_SECONDS,
                    }),
                };
            }
        };
        let owner = crate::billing_accounts::earnings_account(node, record.as_ref())
            .map_err(|error| BillingError::internal("owner of node", &error))?;
        let mut owners = self.lock_owners();
        if owners.len() >= OWNER_CACHE_ENTRIES_MAX {
            owners.clear();
        }
        owners.insert(node.to_owned(), (owner.clone(), Instant::now()));
        Ok(owner)
    }

    fn lock_owners(&self) -> MutexGuard<'_, HashMap<String, (OwnerId, Instant)>> {
        // A plain cache: whatever a panicking holder left is still usable.
        self.owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn now() -> TimestampMs {
    crate::core::now_ms()
}
