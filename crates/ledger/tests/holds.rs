//! Holds in a PostgreSQL ledger shared by gateways: admission against the
//! balance net of every unexpired hold, one transaction per request; a
//! settlement that deletes its request's hold with the charge; leases that
//! expire unless renewed.

mod common;

use common::node_segment;
use ledger::admission::PaymentRequired;
use ledger::core::{
    AccountId, DurationMs, GatewayId, MicroUsd, OwnerId, RequestId, TenantId, TimestampMs,
};
use ledger::pricing::TenantClass;
use ledger::settlement::CompletedRequest;
use ledger::statement::Period;
use ledger::store::{HoldAdmission, HoldRequest, Store, StoreError};

/// Long enough never to run out during a test.
const LONG_LEASE: DurationMs = DurationMs(600_000);

fn tenant() -> TenantId {
    TenantId::new("tenant:1").unwrap()
}

fn gateway(name: &str) -> GatewayId {
    GatewayId::new(name).unwrap()
}

fn today() -> Period {
    let now = TimestampMs::from_system_time(std::time::SystemTime::now());
    Period {
        from: now.utc_day_start(),
        until: TimestampMs(now.utc_day_start().0 + TimestampMs::PER_DAY),
    }
}

/// A prepaid tenant with `balance`.
async fn funded(store: &Store, balance: i64) {
    store.ensure_tenant(&tenant(), false).await.unwrap();
    store
        .top_up(
            &tenant(),
            MicroUsd(balance),
            &RequestId::new("top-up-1").unwrap(),
            TimestampMs(1),
        )
        .await
        .unwrap();
}

async fn admit(
    store: &Store,
    request: &str,
    worst_case: i64,
    gateway_id: &GatewayId,
    lease: DurationMs,
) -> HoldAdmission {
    let request_id = RequestId::new(request).unwrap();
    let tenant = tenant();
    store
        .admit_with_hold(&HoldRequest {
            request_id: &request_id,
            tenant: &tenant,
            unlimited: false,
            worst_case: MicroUsd(worst_case),
            gateway: gateway_id,
            lease,
            today: today(),
        })
        .await
        .unwrap()
}

fn held(admission: &HoldAdmission) -> bool {
    matches!(admission, HoldAdmission::Held { .. })
}

async fn balance(store: &Store) -> MicroUsd {
    store
        .account(&AccountId::Tenant(tenant()))
        .await
        .unwrap()
        .unwrap()
        .balance()
}

/// Spot prices of `common::sheet`: 1,000 prompt and 1,000 completion tokens
/// cost 100 + 200 = 300.
fn completed(request: &str) -> CompletedRequest {
    let now = TimestampMs::from_system_time(std::time::SystemTime::now());
    CompletedRequest {
        request_id: RequestId::new(request).unwrap(),
        tenant: tenant(),
        class: TenantClass::Spot,
        admitted_at: now,
        completed_at: now,
        segments: vec![node_segment(
            request, 0, "car-a", "alice", 1_000, 1_000, now.0,
        )],
    }
}

#[tokio::test]
async fn admission_holds_worst_cases_until_the_money_is_held_then_refuses() {
    let ledger = common::postgres_store().await;
    let store = &ledger.store;
    funded(store, 1_000).await;
    let gw = gateway("gw-a");
    for request in ["r1", "r2", "r3"] {
        assert!(held(&admit(store, request, 300, &gw, LONG_LEASE).await));
    }
    assert_eq!(
        admit(store, "r4", 300, &gw, LONG_LEASE).await,
        HoldAdmission::Refused(PaymentRequired::InsufficientBalance {
            worst_case: MicroUsd(300),
            available: MicroUsd(100),
        })
    );
    assert_eq!(store.tenant_held(&tenant()).await.unwrap(), MicroUsd(900));
    assert!(held(&admit(store, "r5", 100, &gw, LONG_LEASE).await));
    // Releasing one frees exactly its worst case.
    assert!(store
        .release_hold(&RequestId::new("r2").unwrap())
        .await
        .unwrap());
    assert_eq!(store.tenant_held(&tenant()).await.unwrap(), MicroUsd(700));
    assert!(held(&admit(store, "r6", 300, &gw, LONG_LEASE).await));
    assert_eq!(balance(store).await, MicroUsd(1_000));
    ledger.drop_schema().await;
}

#[tokio::test]
async fn a_settlement_deletes_its_hold_in_the_transaction_that_charges() {
    let ledger = common::postgres_store().await;
    let store = &ledger.store;
    funded(store, 1_000).await;
    store
        .open_account(&AccountId::Owner(OwnerId::new("alice").unwrap()))
        .await
        .unwrap();
    let gw = gateway("gw-a");
    assert!(held(&admit(store, "r1", 400, &gw, LONG_LEASE).await));
    let request = completed("r1");
    let receipt = store.settle(&request, &common::book()).await.unwrap();
    assert_eq!(receipt.charge, MicroUsd(300));
    assert_eq!(store.tenant_held(&tenant()).await.unwrap(), MicroUsd::ZERO);
    assert_eq!(balance(store).await, MicroUsd(700));
    // A retried settlement changes nothing.
    store.settle(&request, &common::book()).await.unwrap();
    assert_eq!(balance(store).await, MicroUsd(700));
    // What is left is admitted to the micro-dollar, and not one more.
    assert!(!held(&admit(store, "r2", 701, &gw, LONG_LEASE).await));
    assert!(held(&admit(store, "r3", 700, &gw, LONG_LEASE).await));
    let report = ledger::store::verify(store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    ledger.drop_schema().await;
}

#[tokio::test]
async fn an_expired_hold_counts_for_nothing_until_its_gateway_renews_it() {
    let ledger = common::postgres_store().await;
    let store = &ledger.store;
    funded(store, 1_000).await;
    let gw = gateway("gw-a");
    // A lease of zero has run out the moment it is taken.
    assert!(held(&admit(store, "r1", 800, &gw, DurationMs(0)).await));
    assert_eq!(store.tenant_held(&tenant()).await.unwrap(), MicroUsd::ZERO);
    let ids = [RequestId::new("r1").unwrap()];
    // Another gateway cannot renew it; its own can, even late.
    assert_eq!(
        store
            .renew_holds(&gateway("gw-b"), &ids, LONG_LEASE)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.renew_holds(&gw, &ids, LONG_LEASE).await.unwrap(), 1);
    assert_eq!(store.tenant_held(&tenant()).await.unwrap(), MicroUsd(800));
    assert!(!held(&admit(store, "r2", 300, &gw, LONG_LEASE).await));
    let expiry = store.gateway_holds_expiry(&gw).await.unwrap().unwrap();
    assert!(expiry.0 > store.database_now().await.unwrap().0);

    // Purging deletes expired holds only.
    assert!(held(&admit(store, "r3", 100, &gw, DurationMs(0)).await));
    assert_eq!(store.purge_expired_holds(DurationMs(0)).await.unwrap(), 1);
    let purged = [RequestId::new("r3").unwrap()];
    assert_eq!(
        store.renew_holds(&gw, &purged, LONG_LEASE).await.unwrap(),
        0
    );
    assert_eq!(store.tenant_held(&tenant()).await.unwrap(), MicroUsd(800));
    ledger.drop_schema().await;
}

#[tokio::test]
async fn the_daily_cap_counts_what_is_held() {
    let ledger = common::postgres_store().await;
    let store = &ledger.store;
    funded(store, 1_000_000).await;
    store
        .set_daily_cap(&tenant(), Some(MicroUsd(500)))
        .await
        .unwrap();
    let gw = gateway("gw-a");
    assert!(held(&admit(store, "r1", 300, &gw, LONG_LEASE).await));
    assert_eq!(
        admit(store, "r2", 300, &gw, LONG_LEASE).await,
        HoldAdmission::Refused(PaymentRequired::DailyCapReached {
            cap: MicroUsd(500),
            spent_today: MicroUsd(300),
            worst_case: MicroUsd(300),
        })
    );
    ledger.drop_schema().await;
}

#[tokio::test]
async fn gateways_on_separate_connections_never_hold_more_than_the_balance() {
    const WORST_CASE: i64 = 100;
    const FITS: usize = 10;
    const TRIES: usize = 40;
    let ledger = common::postgres_store().await;
    funded(&ledger.store, WORST_CASE * FITS as i64).await;
    let stores = std::sync::Arc::new([ledger.connect_again().await, ledger.connect_again().await]);
    let mut tries = tokio::task::JoinSet::new();
    for index in 0..TRIES {
        let stores = std::sync::Arc::clone(&stores);
        tries.spawn(async move {
            let gw = gateway(&format!("gw-{}", index % 2));
            let store = &stores[index % 2];
            admit(store, &format!("r{index}"), WORST_CASE, &gw, LONG_LEASE).await
        });
    }
    let mut admitted = 0;
    while let Some(admission) = tries.join_next().await {
        if held(&admission.unwrap()) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, FITS);
    assert_eq!(
        ledger.store.tenant_held(&tenant()).await.unwrap(),
        MicroUsd(WORST_CASE * FITS as i64)
    );
    ledger.drop_schema().await;
}

#[tokio::test]
async fn holds_in_the_ledger_need_postgresql() {
    let (store, _dir) = common::sqlite_store().await;
    funded(&store, 1_000).await;
    let request_id = RequestId::new("r1").unwrap();
    let tenant = tenant();
    let gw = gateway("gw-a");
    let admitted = store
        .admit_with_hold(&HoldRequest {
            request_id: &request_id,
            tenant: &tenant,
            unlimited: false,
            worst_case: MicroUsd(1),
            gateway: &gw,
            lease: LONG_LEASE,
            today: today(),
        })
        .await;
    assert!(matches!(admitted, Err(StoreError::Unsupported(_))));
    // Settling on SQLite is untouched by the holds table.
    store
        .open_account(&AccountId::Owner(OwnerId::new("alice").unwrap()))
        .await
        .unwrap();
    store
        .settle(&completed("r1"), &common::book())
        .await
        .unwrap();
    assert_eq!(balance(&store).await, MicroUsd(700));
}
