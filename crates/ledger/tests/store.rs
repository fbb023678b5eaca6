//! The persistent ledger on SQLite and on PostgreSQL: every scenario runs on
//! both backends. The PostgreSQL half needs a server (see `common`).

#[macro_use]
mod common;

use common::{
    balance, cloud_segment, migrated_request, open_parties, owner, tenant, CLOUD_MODEL, FLEET_MODEL,
};
use ledger::admission::{self, AdmissionRequest, PaymentRequired};
use ledger::core::{
    AccountId, Instrument, LedgerError, MicroUsd, NodeId, Outcome, Problem, RequestId, Segment,
    TimestampMs, TokenCount, Transfer, TransferKind, TransferSpec,
};
use ledger::payout::{PayoutAmount, PayoutError, PayoutOrder, PayoutRates};
use ledger::pricing::{PriceBook, TenantClass};
use ledger::settlement::CompletedRequest;
use ledger::statement::Period;
use ledger::store::{verify, Store, StoreError};

async fn assert_verified(store: &Store) {
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A settlement retried is processed once; a "retry" with other amounts is refused.
async fn retries_are_processed_once(store: &Store) {
    open_parties(store, 10_000_000).await;
    let request = migrated_request("chatcmpl-1", 100_000);
    let first = store.settle(&request, &common::book()).await.unwrap();
    assert!(first.outcomes.iter().all(|o| *o == Outcome::Created));
    let count = store.transfer_count().await.unwrap();
    let retry = store.settle(&request, &common::book()).await.unwrap();
    assert!(retry.outcomes.iter().all(|o| *o == Outcome::Exists));
    assert_eq!(store.transfer_count().await.unwrap(), count);

    let other_prices = PriceBook::new(common::sheet(5_000, 2_000)).unwrap();
    let error = store.settle(&request, &other_prices).await.unwrap_err();
    assert!(
        matches!(error, StoreError::Ledger(LedgerError::Conflict { .. })),
        "{error}"
    );
    assert_eq!(store.transfer_count().await.unwrap(), count);
    assert_verified(store).await;
}

/// The customer pays the prompt once; each owner earns for its own tokens.
async fn migration_pays_each_owner_for_its_tokens(store: &Store) {
    open_parties(store, 10_000_000).await;
    let receipt = store
        .settle(&migrated_request("chatcmpl-2", 100_000), &common::book())
        .await
        .unwrap();
    // Spot: 1,000 prompt × $0.10/M + 1,000 completion × $0.20/M = 100 + 200 µUSD.
    assert_eq!(receipt.charge, MicroUsd(300));
    assert_eq!(
        balance(store, AccountId::Tenant(tenant())).await,
        10_000_000 - 300
    );
    // Alice: 70 % of (100 + 60); energy 72 W × 26 s = 520 mWh at $0.30/kWh = 156 µUSD.
    assert_eq!(
        balance(store, AccountId::Owner(owner("alice"))).await,
        112 + 156
    );
    // Bob: 70 % of 140 = 98; energy 72 W × 40 s = 800 mWh → 240 µUSD (re-prefill included).
    assert_eq!(
        balance(store, AccountId::Owner(owner("bob"))).await,
        98 + 240
    );
    assert_eq!(
        balance(store, AccountId::PlatformRevenue).await,
        300 - 112 - 98
    );
    assert_eq!(
        balance(store, AccountId::EnergyReimbursement).await,
        -(156 + 240)
    );
    assert_verified(store).await;
}

/// An escalation costs upstream price plus margin; upstream cost is booked.
async fn escalation_is_priced_at_upstream_plus_margin(store: &Store) {
    open_parties(store, 10_000_000).await;
    let request = CompletedRequest {
        request_id: RequestId::new("chatcmpl-3").unwrap(),
        tenant: tenant(),
        class: TenantClass::Reserved,
        admitted_at: TimestampMs(0),
        completed_at: TimestampMs(1),
        segments: vec![cloud_segment("chatcmpl-3", 0, 1_000, 500)],
    };
    let receipt = store.settle(&request, &common::book()).await.unwrap();
    // Upstream $1/$2 per million + 20 %: 1,200 + 1,200 µUSD.
    assert_eq!(receipt.charge, MicroUsd(2_400));
    assert_eq!(balance(store, AccountId::CloudProvider).await, 2_000);
    assert_eq!(balance(store, AccountId::CloudUpstreamCost).await, -2_000);
    assert_verified(store).await;
}

/// A failing transfer leaves its whole batch unapplied; limits hold.
async fn batches_are_atomic_and_limits_hold(store: &Store) {
    open_parties(store, 1_000).await;
    let charge = |request: &str, amount| {
        Transfer::new(TransferSpec {
            kind: TransferKind::TokenCharge,
            debit: AccountId::Tenant(tenant()),
            credit: AccountId::PlatformRevenue,
            amount: MicroUsd(amount),
            request_id: RequestId::new(request).unwrap(),
            segment: Segment(0),
            quantity: 1,
            at: TimestampMs(10),
        })
        .unwrap()
    };
    let error = store
        .commit(&[charge("r1", 600), charge("r2", 600)])
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        StoreError::Ledger(LedgerError::InsufficientFunds { index: 1, .. })
    ));
    assert_eq!(balance(store, AccountId::Tenant(tenant())).await, 1_000);
    assert_eq!(store.transfer(charge("r1", 600).id()).await.unwrap(), None);

    store
        .set_credit_limit(&tenant(), MicroUsd(500))
        .await
        .unwrap();
    let outcomes = store
        .commit(&[charge("r1", 600), charge("r2", 600)])
        .await
        .unwrap();
    assert_eq!(outcomes, [Outcome::Created, Outcome::Created]);
    assert_eq!(balance(store, AccountId::Tenant(tenant())).await, -200);
    assert_verified(store).await;
}

/// Payouts convert at the configured rate, never beyond the balance, once.
async fn payouts_never_exceed_the_balance(store: &Store) {
    open_parties(store, 10_000_000).await;
    store
        .settle(&migrated_request("chatcmpl-4", 100_000), &common::book())
        .await
        .unwrap();
    let rates = PayoutRates::new([(Instrument::ChargingCredit, MicroUsd(180))]).unwrap();
    let order = |id: &str, amount| PayoutOrder {
        payout_id: RequestId::new(id).unwrap(),
        owner: owner("alice"),
        instrument: Instrument::ChargingCredit,
        amount,
        at: TimestampMs(200_000),
    };
    let too_much = store
        .pay_out(&order("p0", PayoutAmount::UpTo(MicroUsd(269))), &rates)
        .await;
    assert!(matches!(
        too_much,
        Err(StoreError::Payout(PayoutError::ExceedsBalance { .. }))
    ));
    // Alice holds 268 µUSD: one Wh costs 180, so one Wh is paid, 88 remain.
    let paid = store
        .pay_out(&order("p1", PayoutAmount::All), &rates)
        .await
        .unwrap();
    assert_eq!(
        (paid.units, paid.amount, paid.outcome),
        (1, MicroUsd(180), Outcome::Created)
    );
    let again = store
        .pay_out(&order("p1", PayoutAmount::All), &rates)
        .await
        .unwrap();
    assert_eq!((again.units, again.outcome), (1, Outcome::Exists));
    assert_eq!(balance(store, AccountId::Owner(owner("alice"))).await, 88);
    assert_eq!(
        balance(store, AccountId::Payouts(Instrument::ChargingCredit)).await,
        180
    );
    assert_verified(store).await;
}

/// The statement of one vehicle lists its own segments and earnings only.
async fn statements_show_what_a_vehicle_earned(store: &Store) {
    open_parties(store, 10_000_000).await;
    for (index, completed) in [100_000, 200_000, 9_000_000].into_iter().enumerate() {
        let request = migrated_request(&format!("chatcmpl-s{index}"), completed);
        store.settle(&request, &common::book()).await.unwrap();
    }
    let period = Period {
        from: TimestampMs(0),
        until: TimestampMs(1_000_000),
    };
    let statement = store
        .statement(&NodeId::new("car-a").unwrap(), period)
        .await
        .unwrap();
    assert_eq!(statement.totals.requests, 2);
    assert_eq!(statement.totals.prompt_tokens, TokenCount(2_000));
    assert_eq!(statement.totals.earnings, MicroUsd(2 * (112 + 156)));
    let mut csv = Vec::new();
    statement.write_csv(&mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(
        lines[1].starts_with("chatcmpl-s0,0,alice,95000,1000,300,"),
        "{csv}"
    );
    // The total row's earnings, and no clawback reason.
    assert!(lines[3].ends_with(",0.000536,"), "{csv}");
    assert_verified(store).await;
}

/// Daily spend feeds admission, which refuses with a clear 402 message.
async fn daily_spend_limits_admission(store: &Store) {
    open_parties(store, 10_000_000).await;
    let day = TimestampMs::PER_DAY * 20_000;
    store
        .settle(
            &migrated_request("chatcmpl-5", day + 60_000),
            &common::book(),
        )
        .await
        .unwrap();
    store
        .settle(
            &migrated_request("chatcmpl-6", day - 60_000),
            &common::book(),
        )
        .await
        .unwrap();
    let today = Period {
        from: TimestampMs(day + 60_000).utc_day_start(),
        until: TimestampMs(day + TimestampMs::PER_DAY),
    };
    let spent = store.tenant_spent(&tenant(), today).await.unwrap();
    assert_eq!(spent, MicroUsd(300));
    let models = [common::model(FLEET_MODEL), common::model(CLOUD_MODEL)];
    let request = AdmissionRequest {
        models: &models,
        class: TenantClass::Spot,
        prompt_tokens: TokenCount(100),
        max_completion_tokens: TokenCount(100),
    };
    let worst = admission::worst_case_cost(common::book().sheet_at(today.from), &request).unwrap();
    assert_eq!(worst, MicroUsd(360));
    let account = store
        .account(&AccountId::Tenant(tenant()))
        .await
        .unwrap()
        .unwrap();
    assert!(admission::check(worst, &account, Some(MicroUsd(660)), spent).is_ok());
    let refused = admission::check(worst, &account, Some(MicroUsd(659)), spent).unwrap_err();
    assert!(matches!(refused, PaymentRequired::DailyCapReached { .. }));
}

/// Many concurrent retries of one settlement create its transfers once.
async fn concurrent_retries_create_one_set_of_transfers(store: &Store) {
    open_parties(store, 10_000_000).await;
    let request = migrated_request("chatcmpl-7", 100_000);
    let book = common::book();
    let before = store.transfer_count().await.unwrap();
    let attempts = (0..8).map(|_| store.settle(&request, &book));
    let receipts = futures::future::join_all(attempts).await;
    let mut created = 0;
    for receipt in receipts {
        let receipt = receipt.unwrap();
        created += receipt
            .outcomes
            .iter()
            .filter(|o| **o == Outcome::Created)
            .count();
    }
    // Charge, and per segment a revenue share and an energy reimbursement.
    assert_eq!(created, 5);
    assert_eq!(store.transfer_count().await.unwrap(), before + 5);
    assert_eq!(
        balance(store, AccountId::Tenant(tenant())).await,
        10_000_000 - 300
    );
    assert_verified(store).await;
}

on_both_backends!(
    retries_are_processed_once,
    migration_pays_each_owner_for_its_tokens,
    escalation_is_priced_at_upstream_plus_margin,
    batches_are_atomic_and_limits_hold,
    payouts_never_exceed_the_balance,
    statements_show_what_a_vehicle_earned,
    daily_spend_limits_admission,
    concurrent_retries_create_one_set_of_transfers,
);

/// Verify must notice a balance or a transfer edited behind the ledger's back.
#[tokio::test]
async fn verify_detects_tampering_on_sqlite() {
    use sqlx::Connection;
    let (store, dir) = common::sqlite_store().await;
    open_parties(&store, 5_000).await;
    let db = dir.path().join("ledger.db");
    let url = format!("sqlite://{}", db.display());
    let mut raw = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "UPDATE ledger_accounts SET credits_posted = credits_posted + 1 WHERE id = 'tenant:acme'",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    sqlx::query("UPDATE ledger_transfers SET kind = 'token-charge'")
        .execute(&mut raw)
        .await
        .unwrap();
    let report = verify(&store).await.unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| matches!(p, Problem::TotalsUnbalanced { .. })));
    assert!(report
        .problems
        .iter()
        .any(|p| matches!(p, Problem::BadTransfer { .. })));
}
