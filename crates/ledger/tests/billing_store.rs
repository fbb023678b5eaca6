//! The store's tenant-facing operations on SQLite and on PostgreSQL: top-ups
//! by reference, credit settings, daily caps, usage reports and invoices that
//! agree with the transfers, request lookups and meter flags. The PostgreSQL
//! half needs a server (see `common`); it fails, never skips, without one.

#[macro_use]
mod common;

use common::{book, cloud_segment, node_segment};
use ledger::core::{
    AccountId, LedgerError, MicroUsd, NodeId, Outcome, RequestId, Segment, TenantId, TimestampMs,
    TokenCount, TransferKind,
};
use ledger::invoice;
use ledger::pricing::TenantClass;
use ledger::settlement::CompletedRequest;
use ledger::statement::Period;
use ledger::store::{verify, MeterFlag, Store, StoreError};

/// 2026-11-15T00:00:00Z.
const MID_NOVEMBER_MS: i64 = 1_794_700_800_000;

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

fn request(id: &str, tenant_name: &str, completed_ms: i64) -> CompletedRequest {
    CompletedRequest {
        request_id: RequestId::new(id).unwrap(),
        tenant: tenant(tenant_name),
        class: TenantClass::Spot,
        admitted_at: TimestampMs(completed_ms - 1_000),
        completed_at: TimestampMs(completed_ms),
        segments: vec![node_segment(
            id,
            0,
            "car-a",
            "alice",
            1_000,
            300,
            completed_ms - 1_000,
        )],
    }
}

async fn top_ups_are_credited_once_per_reference(store: &Store) {
    let acme = tenant("acme");
    let state = store.ensure_tenant(&acme, false).await.unwrap();
    assert_eq!(state.floor, Some(MicroUsd::ZERO), "a new tenant is prepaid");
    let reference = RequestId::new("top-up:receipt-1").unwrap();
    let at = TimestampMs(MID_NOVEMBER_MS);
    let first = store
        .top_up(&acme, MicroUsd(5_000_000), &reference, at)
        .await;
    assert_eq!(first.unwrap(), Outcome::Created);
    let again = store
        .top_up(&acme, MicroUsd(5_000_000), &reference, at)
        .await;
    assert_eq!(again.unwrap(), Outcome::Exists);
    let other = store
        .top_up(&acme, MicroUsd(6_000_000), &reference, at)
        .await;
    assert!(
        matches!(other, Err(StoreError::Ledger(LedgerError::Conflict { .. }))),
        "{other:?}"
    );
    let account = AccountId::Tenant(acme.clone());
    assert_eq!(
        store.account(&account).await.unwrap().unwrap().balance(),
        MicroUsd(5_000_000)
    );
    store.set_unlimited_credit(&acme).await.unwrap();
    assert_eq!(store.account(&account).await.unwrap().unwrap().floor, None);
    store.set_credit_limit(&acme, MicroUsd(100)).await.unwrap();
    assert_eq!(
        store.account(&account).await.unwrap().unwrap().floor,
        Some(MicroUsd(-100))
    );
    // An existing account is left as it is.
    let again = store.ensure_tenant(&acme, true).await.unwrap();
    assert_eq!(again.floor, Some(MicroUsd(-100)));
    let fleet = store.ensure_tenant(&tenant("ops"), true).await.unwrap();
    assert_eq!(fleet.floor, None);

    assert_eq!(store.daily_cap(&acme).await.unwrap(), None);
    store
        .set_daily_cap(&acme, Some(MicroUsd(42)))
        .await
        .unwrap();
    assert_eq!(store.daily_cap(&acme).await.unwrap(), Some(MicroUsd(42)));
    store.set_daily_cap(&acme, None).await.unwrap();
    assert_eq!(store.daily_cap(&acme).await.unwrap(), None);
    verify_ok(store).await;
}

async fn usage_and_invoices_agree_with_the_transfers(store: &Store) {
    for (name, reference) in [("acme", "a"), ("globex", "g")] {
        store.ensure_tenant(&tenant(name), false).await.unwrap();
        let reference = RequestId::new(format!("top-up:{reference}")).unwrap();
        let at = TimestampMs(MID_NOVEMBER_MS);
        store
            .top_up(&tenant(name), MicroUsd(1_000_000), &reference, at)
            .await
            .unwrap();
    }
    store
        .open_account(&AccountId::Owner(
            ledger::core::OwnerId::new("alice").unwrap(),
        ))
        .await
        .unwrap();
    let book = common::book();
    let november = [
        request("chatcmpl-1", "acme", MID_NOVEMBER_MS),
        request("chatcmpl-2", "acme", MID_NOVEMBER_MS + 60_000),
        request("chatcmpl-3", "globex", MID_NOVEMBER_MS + 120_000),
    ];
    for settled in &november {
        store.settle(settled, &book).await.unwrap();
    }
    // A request completed on 1 December belongs to December's invoice.
    let december = invoice::month_period("2026-12").unwrap();
    store
        .settle(&request("chatcmpl-4", "acme", december.from.0), &book)
        .await
        .unwrap();
    // Settling again changes no summary.
    store.settle(&november[0], &book).await.unwrap();

    let bill = store.invoice(&tenant("acme"), "2026-11").await.unwrap();
    let totals = bill.usage.totals;
    assert_eq!(totals.requests, 2);
    assert_eq!(totals.prompt_tokens, TokenCount(2_000));
    assert_eq!(totals.completion_tokens, TokenCount(600));
    let period = invoice::month_period("2026-11").unwrap();
    assert_eq!(
        totals.charged,
        store.tenant_spent(&tenant("acme"), period).await.unwrap()
    );
    // Spot: 1,000 × $0.10 + 300 × $0.20 per million = 160 µUSD a request.
    assert_eq!(totals.charged, MicroUsd(320));
    assert_eq!(bill.top_ups, MicroUsd(1_000_000));
    assert_eq!(bill.balance, MicroUsd(1_000_000 - 3 * 160));
    let lines = store
        .tenant_requests(&tenant("acme"), period)
        .await
        .unwrap();
    let ids: Vec<&str> = lines.iter().map(|line| line.request_id.as_str()).collect();
    assert_eq!(ids, ["chatcmpl-1", "chatcmpl-2"]);
    let mut csv = Vec::new();
    invoice::write_csv(&mut csv, &bill, &lines).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(csv.lines().last(), Some("total,,,,2000,600,,0.000320"));

    let globex = store.tenant_usage(&tenant("globex"), period).await.unwrap();
    assert_eq!(globex.totals.requests, 1);
    let december_bill = store.invoice(&tenant("acme"), "2026-12").await.unwrap();
    assert_eq!(december_bill.usage.totals.requests, 1);
    assert!(store.invoice(&tenant("acme"), "2026-13").await.is_err());

    let id = RequestId::new("chatcmpl-1").unwrap();
    let summary = store.settled_request(&id).await.unwrap().unwrap();
    assert_eq!(summary.charge, MicroUsd(160));
    let transfers = store.request_transfers(&id).await.unwrap();
    let kinds: Vec<TransferKind> = transfers.iter().map(|t| t.kind()).collect();
    assert!(kinds.contains(&TransferKind::TokenCharge));
    assert!(kinds.contains(&TransferKind::RevenueShare));
    let usage = store.request_usage(&id).await.unwrap();
    assert_eq!(usage, november[0].segments);
    let missing = RequestId::new("chatcmpl-none").unwrap();
    assert_eq!(store.settled_request(&missing).await.unwrap(), None);
    verify_ok(store).await;
}

async fn meter_flags_are_kept_once_and_listed_by_node(store: &Store) {
    let flag = |request: &str, node: &str, field: &str| MeterFlag {
        request_id: RequestId::new(request).unwrap(),
        segment: Segment(0),
        node: NodeId::new(node).unwrap(),
        field: field.to_owned(),
        coordinator: 10,
        node_value: 12,
        at: TimestampMs(MID_NOVEMBER_MS),
    };
    let flags = [
        flag("r-1", "car-a", "completion_tokens"),
        flag("r-1", "car-a", "compute_ms"),
        flag("r-2", "car-b", "completion_tokens"),
    ];
    store.record_meter_flags(&flags).await.unwrap();
    store.record_meter_flags(&flags[..1]).await.unwrap();
    assert_eq!(store.meter_flags(None).await.unwrap().len(), 3);
    let car_a = store
        .meter_flags(Some(&NodeId::new("car-a").unwrap()))
        .await
        .unwrap();
    assert_eq!(car_a.len(), 2);
    assert!(car_a.iter().all(|found| found.node.as_str() == "car-a"));
    assert!(car_a.contains(&flags[0]));
}

async fn cloud_spend_is_kept_with_the_settlement_until_counted(store: &Store) {
    let acme = tenant("acme");
    store.ensure_tenant(&acme, true).await.unwrap();
    let alice = AccountId::Owner(ledger::core::OwnerId::new("alice").unwrap());
    store.open_account(&alice).await.unwrap();
    let cloud_only = CompletedRequest {
        segments: vec![cloud_segment("r-cloud", 0, 1_000, 500)],
        ..request("r-cloud", "acme", MID_NOVEMBER_MS)
    };
    let mut mixed = request("r-mixed", "acme", MID_NOVEMBER_MS + 1_000);
    mixed.segments.push(cloud_segment("r-mixed", 1, 1_500, 200));
    let fleet_only = request("r-fleet", "acme", MID_NOVEMBER_MS + 2_000);
    let charged = store.settle(&cloud_only, &book()).await.unwrap().charge;
    store.settle(&mixed, &book()).await.unwrap();
    store.settle(&fleet_only, &book()).await.unwrap();

    // $1 / $2 per million upstream plus a 20 % margin: the whole charge of
    // the cloud-only request, only the cloud's 200 completion tokens of the
    // mixed one (its prompt was billed on the node's segment).
    let uncounted = store.uncounted_cloud_spend(None, 10).await.unwrap();
    let amounts: Vec<(&str, MicroUsd)> = uncounted
        .iter()
        .map(|spend| (spend.request_id.as_str(), spend.amount))
        .collect();
    assert_eq!(
        amounts,
        [("r-cloud", MicroUsd(2_400)), ("r-mixed", MicroUsd(480))]
    );
    assert_eq!(charged, MicroUsd(2_400));
    assert!(uncounted.iter().all(|spend| spend.tenant == acme));

    let cloud_id = RequestId::new("r-cloud").unwrap();
    let one = store
        .uncounted_cloud_spend(Some(&cloud_id), 10)
        .await
        .unwrap();
    assert_eq!(one, uncounted[..1]);
    let at = TimestampMs(MID_NOVEMBER_MS + 5_000);
    assert!(store.mark_cloud_spend_counted(&cloud_id, at).await.unwrap());
    assert!(!store.mark_cloud_spend_counted(&cloud_id, at).await.unwrap());
    // Settling again changes nothing: the spend stays counted.
    store.settle(&cloud_only, &book()).await.unwrap();
    let left = store.uncounted_cloud_spend(None, 10).await.unwrap();
    assert_eq!(left, uncounted[1..]);
    let none = store
        .uncounted_cloud_spend(Some(&cloud_id), 10)
        .await
        .unwrap();
    assert!(none.is_empty());
}

async fn verify_ok(store: &Store) {
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn the_test_month_is_november_2026() {
    let period = invoice::month_period("2026-11").unwrap();
    assert!(Period::contains(&period, TimestampMs(MID_NOVEMBER_MS)));
}

on_both_backends!(
    top_ups_are_credited_once_per_reference,
    usage_and_invoices_agree_with_the_transfers,
    meter_flags_are_kept_once_and_listed_by_node,
    cloud_spend_is_kept_with_the_settlement_until_counted,
);
