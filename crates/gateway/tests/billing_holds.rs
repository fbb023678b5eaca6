//! Payment admission across gateways sharing one PostgreSQL ledger: each
//! `Billing` here has its own connection pool, as separate gateway
//! processes would, on one throw-away schema. And the embedded SQLite
//! ledger, which holds in memory.
//!
//! The PostgreSQL tests need a server: `LEDGER_TEST_POSTGRES_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test`. They fail with a clear message
//! when it is unreachable; they never skip.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell_api::metering::{Metering, PaidSpeed, SegmentTrack};
use gateway::billing::{ledger_tenant, Billing, BillingConfig, BillingError, PendingCharge};
use gateway::billing_holds::{HoldConfig, HOLD_LEDGER_TIMEOUT};
use gateway::metrics::Metrics;
use gateway::store::{Store, TenantClass, TenantRecord};
use ledger::core::{AccountId, MicroUsd, RequestId, TimestampMs, TransferKind};
use ledger::store::Store as Ledger;
use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The served model: smollm2 at spot prices ($0.03 and $0.06 per million).
const MODEL: &str = "smollm2-135m-instruct";

const PROMPT_TOKENS: u32 = 10_000;
const MAX_TOKENS: u32 = 10_000;

/// 10,000 prompt tokens at $0.03/M plus 10,000 at $0.06/M.
const WORST_CASE: MicroUsd = MicroUsd(900);

/// How long a test waits for a condition that should come true.
const PATIENCE: Duration = Duration::from_secs(60);

/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(50);

fn postgres_url() -> String {
    std::env::var("LEDGER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

static SCHEMA_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A throw-away schema, dropped by `drop`.
struct Schema {
    name: String,
}

impl Schema {
    async fn create() -> Schema {
        let url = postgres_url();
        let mut admin = admin(&url).await;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "gateway_holds_{}_{nanos}_{}",
            std::process::id(),
            SCHEMA_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        Schema { name }
    }

    /// The ledger URL of this schema, through `via` (a proxy) if given.
    fn url(&self, via: Option<SocketAddr>) -> String {
        let mut url = postgres_url();
        if let Some(via) = via {
            url = with_host(&url, &via.to_string());
        }
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}options[search_path]={}", self.name)
    }

    async fn drop(self) {
        let mut admin = admin(&postgres_url()).await;
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

async fn admin(url: &str) -> sqlx::PgConnection {
    let options: PgConnectOptions = url.parse().unwrap();
    sqlx::PgConnection::connect_with(&options)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "the gateway's holds tests need PostgreSQL at {url} (set \
                 LEDGER_TEST_POSTGRES_URL to use another): {error}"
            )
        })
}

/// `url` with its `host:port` replaced.
fn with_host(url: &str, host: &str) -> String {
    let start = url
        .find('@')
        .map_or_else(|| url.find("://").unwrap() + 3, |at| at + 1);
    let end = url[start..]
        .find('/')
        .map_or(url.len(), |slash| start + slash);
    format!("{}{host}{}", &url[..start], &url[end..])
}

fn upstream_addr() -> String {
    let options: PgConnectOptions = postgres_url().parse().unwrap();
    format!("{}:{}", options.get_host(), options.get_port())
}

/// One gateway's store and tenant; the tenant's id is the same in every
/// gateway's store, as it would be in a shared one.
struct Gateway {
    billing: Arc<Billing>,
    tenant: TenantRecord,
    _dir: tempfile::TempDir,
}

async fn gateway(ledger_url: Option<String>, holds: &HoldConfig) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let (tenant, _key) = store
        .create_tenant("acme", TenantClass::Spot, 1)
        .await
        .unwrap();
    store.create_owner("alice", 1).await.unwrap();
    store.add_node("car-1", "alice", 1).await.unwrap();
    let config = BillingConfig {
        ledger_url,
        holds: holds.clone(),
        ..BillingConfig::embedded()
    };
    let billing = Billing::open(
        &config,
        dir.path(),
        &[MODEL.to_owned()],
        store,
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    Gateway {
        billing: Arc::new(billing),
        tenant,
        _dir: dir,
    }
}

/// Tops the tenant up by `amount` (its account opened first).
async fn fund(gateway: &Gateway, amount: MicroUsd) {
    let key = ledger_tenant(&gateway.tenant);
    let ledger = gateway.billing.ledger();
    ledger.ensure_tenant(&key, false).await.unwrap();
    ledger
        .top_up(
            &key,
            amount,
            &RequestId::new(format!("top-up-{}", amount.0)).unwrap(),
            TimestampMs(1),
        )
        .await
        .unwrap();
}

async fn admit(gateway: &Gateway, request: &str) -> Result<PendingCharge, BillingError> {
    gateway
        .billing
        .admit(
            &gateway.tenant,
            MODEL,
            PROMPT_TOKENS as usize,
            MAX_TOKENS,
            request,
        )
        .await
}

/// The cell's count of a generation on `car-1` that prefilled the whole
/// prompt and produced `completion` tokens.
fn metering(completion: u32) -> Metering {
    let now = gateway::core::now_ms().0;
    Metering {
        prompt_tokens: PROMPT_TOKENS,
        segments: vec![SegmentTrack {
            node: "car-1".to_owned(),
            prefilled_tokens: PROMPT_TOKENS,
            completion_tokens: completion,
            started_ms: now - 1_000,
            last_active_ms: now,
            share_started_us: 0,
            share_last_active_us: 1_000_000,
            speed: PaidSpeed {
                prefill_tokens_per_second: 10_000,
                decode_tokens_per_second: 100,
            },
        }],
        node_report: None,
        finished_ms: now,
    }
}

/// Settles an admitted request for `completion` tokens; what was charged.
async fn settle(
    billing: &Arc<Billing>,
    pending: PendingCharge,
    completion: u32,
) -> Result<MicroUsd, BillingError> {
    let completion = billing.complete(&pending, &metering(completion)).await?;
    billing.settle_charge(pending, completion).await
}

async fn balance(ledger: &Ledger, gateway: &Gateway) -> MicroUsd {
    ledger
        .account(&AccountId::Tenant(ledger_tenant(&gateway.tenant)))
        .await
        .unwrap()
        .unwrap()
        .balance()
}

async fn held(gateway: &Gateway) -> MicroUsd {
    let key = ledger_tenant(&gateway.tenant);
    gateway.billing.ledger().tenant_held(&key).await.unwrap()
}

/// Waits until `condition` holds, or fails the test after `PATIENCE`.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still not true after {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn refused(result: &Result<PendingCharge, BillingError>) -> bool {
    matches!(result, Err(BillingError::Refused(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_gateways_admit_no_more_than_the_tenant_has_and_settle_it_to_zero() {
    const FITS: usize = 50;
    const TRIES: usize = 200;
    const GATEWAYS: usize = 4;
    let schema = Schema::create().await;
    let mut gateways = Vec::new();
    for _ in 0..GATEWAYS {
        gateways.push(Arc::new(
            gateway(Some(schema.url(None)), &HoldConfig::default()).await,
        ));
    }
    fund(&gateways[0], MicroUsd(WORST_CASE.0 * FITS as i64)).await;

    let mut tries = JoinSet::new();
    for index in 0..TRIES {
        let gateway = Arc::clone(&gateways[index % GATEWAYS]);
        tries.spawn(async move {
            let admitted = admit(&gateway, &format!("req-{index}")).await;
            (index % GATEWAYS, admitted)
        });
    }
    let mut admitted = Vec::new();
    while let Some(joined) = tries.join_next().await {
        let (at, result) = joined.unwrap();
        match result {
            Ok(pending) => {
                assert_eq!(pending.worst_case, WORST_CASE);
                admitted.push((at, pending));
            }
            Err(BillingError::Refused(_)) => {}
            Err(other) => panic!("an admission failed: {other}"),
        }
    }
    assert_eq!(admitted.len(), FITS, "none settled, so exactly {FITS} fit");
    assert_eq!(
        held(&gateways[0]).await,
        MicroUsd(WORST_CASE.0 * FITS as i64)
    );
    assert!(refused(&admit(&gateways[1], "one-more").await));

    // Every admitted request settles at its worst case, on its gateway,
    // while the balance is watched.
    let ledger = gateways[0].billing.ledger();
    let lowest = Arc::new(Mutex::new(i64::MAX));
    let settling = Arc::new(AtomicBool::new(true));
    let watcher = {
        let gateway = Arc::clone(&gateways[3]);
        let (lowest, settling) = (Arc::clone(&lowest), Arc::clone(&settling));
        tokio::spawn(async move {
            while settling.load(Ordering::Relaxed) {
                let now = balance(gateway.billing.ledger(), &gateway).await;
                let mut lowest = lowest.lock().unwrap();
                *lowest = (*lowest).min(now.0);
            }
        })
    };
    let mut settlements = JoinSet::new();
    for (at, pending) in admitted {
        let billing = Arc::clone(&gateways[at].billing);
        settlements.spawn(async move { settle(&billing, pending, MAX_TOKENS).await });
    }
    while let Some(charged) = settlements.join_next().await {
        assert_eq!(charged.unwrap().unwrap(), WORST_CASE);
    }
    settling.store(false, Ordering::Relaxed);
    watcher.await.unwrap();

    assert_eq!(balance(ledger, &gateways[0]).await, MicroUsd::ZERO);
    assert!(*lowest.lock().unwrap() >= 0, "the balance went negative");
    assert_eq!(held(&gateways[0]).await, MicroUsd::ZERO);
    let report = ledger::store::verify(ledger).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(refused(&admit(&gateways[2], "after").await));
    drop(gateways);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_holds_stop_counting_when_their_lease_ends() {
    let schema = Schema::create().await;
    let lease = HoldConfig {
        lease: Duration::from_secs(3),
    };
    let killed = gateway(Some(schema.url(None)), &lease).await;
    let survivor = gateway(Some(schema.url(None)), &lease).await;
    // One hold takes the whole balance: the survivor can admit only once
    // that hold has stopped counting.
    fund(&killed, WORST_CASE).await;
    let charge = admit(&killed, "a-1").await.unwrap();
    let killed_id = killed.billing.gateway_id().unwrap().clone();
    let ledger = survivor.billing.ledger();

    // Killed: nothing releases its hold and its renewals stop.
    std::mem::forget(charge);
    drop(killed);

    // The hold's expiry only moves later (a renewal the killed gateway had
    // in flight may still land), so it is read after each try, never
    // before: what a try is judged against is the hold's final lease.
    let expiry = || async {
        ledger
            .gateway_holds_expiry(&killed_id)
            .await
            .unwrap()
            .map_or(i64::MIN, |expiry| expiry.0)
    };
    let refusals = &std::sync::atomic::AtomicUsize::new(0);
    let survivor_ref = &survivor;
    eventually(
        "the survivor admits once the killed gateway's lease ends",
        || {
            let survivor = survivor_ref;
            async move {
                let before = ledger.database_now().await.unwrap();
                let result = admit(survivor, "b-1").await;
                let after = ledger.database_now().await.unwrap();
                match result {
                    Ok(pending) => {
                        assert!(
                            after.0 >= expiry().await,
                            "admitted while the killed gateway's hold still counted"
                        );
                        drop(pending);
                        true
                    }
                    Err(BillingError::Refused(_)) => {
                        assert!(
                            before.0 < expiry().await,
                            "refused after the killed gateway's hold expired"
                        );
                        refusals.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Err(other) => panic!("admission failed: {other}"),
                }
            }
        },
    )
    .await;
    assert!(
        refusals.load(Ordering::Relaxed) > 0,
        "the holds never counted"
    );
    drop(survivor);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_gateway_keeps_its_holds_past_many_leases() {
    let schema = Schema::create().await;
    let lease = HoldConfig {
        lease: Duration::from_secs(1),
    };
    let holder = gateway(Some(schema.url(None)), &lease).await;
    let other = gateway(Some(schema.url(None)), &lease).await;
    fund(&holder, WORST_CASE).await;
    let pending = admit(&holder, "h-1").await.unwrap();
    let holder_id = holder.billing.gateway_id().unwrap().clone();
    let ledger = other.billing.ledger();
    let first_expiry = ledger
        .gateway_holds_expiry(&holder_id)
        .await
        .unwrap()
        .unwrap();
    let three_leases_later = first_expiry.0 + 2_000;
    eventually("three leases pass on the ledger's clock", || async move {
        ledger.database_now().await.unwrap().0 > three_leases_later
    })
    .await;
    assert!(refused(&admit(&other, "o-1").await));
    let renewed = ledger
        .gateway_holds_expiry(&holder_id)
        .await
        .unwrap()
        .unwrap();
    assert!(renewed.0 > three_leases_later);
    // Released with its request, the hold stops counting at once.
    drop(pending);
    let other_ref = &other;
    eventually("the released hold is gone", || async move {
        held(other_ref).await == MicroUsd::ZERO
    })
    .await;
    assert!(admit(&other, "o-2").await.is_ok());
    drop((holder, other));
    schema.drop().await;
}

#[tokio::test]
async fn a_settlement_replaces_its_hold_with_the_charge_exactly_once() {
    let schema = Schema::create().await;
    let gw = gateway(Some(schema.url(None)), &HoldConfig::default()).await;
    fund(&gw, MicroUsd(10_000)).await;
    let pending = admit(&gw, "c-1").await.unwrap();
    assert_eq!(held(&gw).await, WORST_CASE);
    let completion = gw
        .billing
        .complete(&pending, &metering(MAX_TOKENS / 2))
        .await
        .unwrap();
    let charged = gw
        .billing
        .settle_charge(pending, completion.clone())
        .await
        .unwrap();
    // The prompt (300) and half the completion (300).
    assert_eq!(charged, MicroUsd(600));
    let ledger = gw.billing.ledger();
    assert_eq!(held(&gw).await, MicroUsd::ZERO);
    assert_eq!(balance(ledger, &gw).await, MicroUsd(10_000 - 600));
    // Settled again (an idempotent replay), nothing changes.
    gw.billing.settle(&completion).await.unwrap();
    assert_eq!(balance(ledger, &gw).await, MicroUsd(10_000 - 600));
    let charges = ledger
        .request_transfers(&RequestId::new("c-1").unwrap())
        .await
        .unwrap()
        .into_iter()
        .filter(|transfer| transfer.kind() == TransferKind::TokenCharge)
        .count();
    assert_eq!(charges, 1);

    // A request that fails releases its hold without a charge.
    let failed = admit(&gw, "c-2").await.unwrap();
    assert_eq!(held(&gw).await, WORST_CASE);
    drop(failed);
    let gw_ref = &gw;
    eventually("the failed request's hold is released", || async move {
        held(gw_ref).await == MicroUsd::ZERO
    })
    .await;
    assert_eq!(balance(ledger, &gw).await, MicroUsd(10_000 - 600));
    drop(gw);
    schema.drop().await;
}

/// A TCP proxy in front of PostgreSQL that can be cut (every connection
/// closed, new ones closed at once) and restored.
struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            open: Arc::new(AtomicBool::new(true)),
            connections: Arc::new(Mutex::new(CancellationToken::new())),
            stop: CancellationToken::new(),
        };
        let (open, connections, stop) = (
            Arc::clone(&proxy.open),
            Arc::clone(&proxy.connections),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !open.load(Ordering::SeqCst) {
                    continue;
                }
                let cut = connections.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        proxy
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut connections = self.connections.lock().unwrap();
        connections.cancel();
        *connections = CancellationToken::new();
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.connections.lock().unwrap().cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_ledger_a_gateway_refuses_fast_and_settles_once_it_is_back() {
    let schema = Schema::create().await;
    let proxy = Proxy::start(upstream_addr()).await;
    let cut_off = gateway(Some(schema.url(Some(proxy.addr))), &HoldConfig::default()).await;
    let direct = gateway(Some(schema.url(None)), &HoldConfig::default()).await;
    fund(&direct, MicroUsd(10_000)).await;
    let running = admit(&cut_off, "p-1").await.unwrap();

    proxy.cut();
    let started = tokio::time::Instant::now();
    let refused = admit(&cut_off, "p-2").await;
    assert!(
        matches!(refused, Err(BillingError::Unavailable { .. })),
        "{refused:?}"
    );
    assert!(started.elapsed() < HOLD_LEDGER_TIMEOUT + Duration::from_secs(2));

    // The running request finishes while the ledger is away: its
    // settlement waits, and its money stays held for every gateway.
    let pending = settle(&cut_off.billing, running, MAX_TOKENS).await;
    assert!(
        matches!(pending, Err(BillingError::SettlementPending { .. })),
        "{pending:?}"
    );
    assert_eq!(cut_off.billing.settlements_waiting(), 1);
    let ledger = direct.billing.ledger();
    assert_eq!(held(&direct).await, WORST_CASE);
    assert_eq!(balance(ledger, &direct).await, MicroUsd(10_000));

    proxy.restore();
    let request = &RequestId::new("p-1").unwrap();
    let billing = &cut_off.billing;
    eventually("the kept settlement commits", || async move {
        ledger.settled_request(request).await.unwrap().is_some()
            && billing.settlements_waiting() == 0
    })
    .await;
    assert_eq!(held(&direct).await, MicroUsd::ZERO);
    assert_eq!(
        balance(ledger, &direct).await,
        MicroUsd(10_000 - WORST_CASE.0)
    );
    assert!(admit(&cut_off, "p-3").await.is_ok());
    drop((cut_off, direct, proxy));
    schema.drop().await;
}

#[tokio::test]
async fn the_embedded_ledger_holds_in_memory_and_frees_a_hold_with_its_settlement() {
    let gw = gateway(None, &HoldConfig::default()).await;
    assert!(gw.billing.gateway_id().is_none());
    fund(&gw, WORST_CASE).await;
    let first = admit(&gw, "m-1").await.unwrap();
    assert!(refused(&admit(&gw, "m-2").await));
    let charged = settle(&gw.billing, first, MAX_TOKENS / 2).await.unwrap();
    assert_eq!(charged, MicroUsd(600));
    // 300 are left, and nothing is held any more: a request whose worst
    // case is the prompt alone (300) fits, once.
    let ledger = gw.billing.ledger();
    assert_eq!(balance(ledger, &gw).await, MicroUsd(300));
    let prompt_only = |request: &'static str| {
        gw.billing
            .admit(&gw.tenant, MODEL, PROMPT_TOKENS as usize, 0, request)
    };
    let fits = prompt_only("m-3").await;
    assert!(fits.is_ok(), "{fits:?}");
    assert!(refused(&prompt_only("m-4").await));
}
