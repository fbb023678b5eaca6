//! Paying for checks on SQLite and on PostgreSQL: a vehicle that verified
//! another's answer is paid by the platform's verification account, once
//! however often the check is booked, and the check shows on its statement.
//! Every scenario runs on both backends; the PostgreSQL half needs a server
//! (see `common`).

#[macro_use]
mod common;

use common::{balance, model, open_parties, owner, tariff, FLEET_MODEL, POWER};
use ledger::core::{
    AccountId, DurationMs, MicroUsd, NodeId, RequestId, TimestampMs, TokenCount, TransferId,
    TransferKind,
};
use ledger::statement::Period;
use ledger::store::{verify, Store};
use ledger::verification::CheckWork;

/// 1,500 tokens prefilled at spot's $0.10 per million prompt tokens is
/// 150 µUSD, of which owners get 70 %.
const PAY: i64 = 105;
/// 20 s at 72 W is 400 mWh; at 30 cents per kWh, 120 µUSD.
const ENERGY: i64 = 120;

fn check(name: &str, at_ms: i64) -> CheckWork {
    let compute = DurationMs(20_000);
    CheckWork {
        check: RequestId::new(name).unwrap(),
        node: NodeId::new("car-b").unwrap(),
        owner: owner("bob"),
        model: model(FLEET_MODEL),
        tokens: TokenCount(1_500),
        compute,
        energy: POWER.segment_energy(compute),
        tariff_per_kwh: tariff().per_kwh_at(TimestampMs(at_ms)),
        at: TimestampMs(at_ms),
    }
}

async fn a_check_is_paid_once_by_the_platform(store: &Store) {
    open_parties(store, 1).await;
    let book = common::book();
    let work = check("check:chatcmpl-1:1", 50_000);
    let first = store.pay_check(&work, &book).await.unwrap();
    assert!(first.newly_paid);
    assert_eq!((first.pay, first.energy), (MicroUsd(PAY), MicroUsd(ENERGY)));
    // Booked again, even with other figures (a gateway that measured
    // otherwise): what was booked first stands, and nothing moves twice.
    let mut again = work.clone();
    again.tokens = TokenCount(9_999);
    let second = store.pay_check(&again, &book).await.unwrap();
    assert!(!second.newly_paid);
    assert_eq!((second.pay, second.energy), (first.pay, first.energy));

    assert_eq!(
        balance(store, AccountId::Owner(owner("bob"))).await,
        PAY + ENERGY
    );
    assert_eq!(
        balance(store, AccountId::Verification).await,
        -(PAY + ENERGY)
    );
    let pay = store
        .transfer(TransferId::derive(
            &work.check,
            ledger::core::Segment(0),
            TransferKind::VerificationPay,
        ))
        .await
        .unwrap()
        .expect("the pay is a transfer of its own kind");
    assert_eq!(pay.quantity(), 1_500);
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}

async fn the_statement_shows_the_checks_the_vehicle_was_paid_for(store: &Store) {
    open_parties(store, 1).await;
    let book = common::book();
    store
        .pay_check(&check("check:chatcmpl-2:1", 60_000), &book)
        .await
        .unwrap();
    store
        .pay_check(&check("check:chatcmpl-1:2", 50_000), &book)
        .await
        .unwrap();
    // Outside the period.
    store
        .pay_check(&check("check:chatcmpl-3:1", 2_000_000), &book)
        .await
        .unwrap();
    let period = Period {
        from: TimestampMs(0),
        until: TimestampMs(1_000_000),
    };
    let statement = store
        .statement(&NodeId::new("car-b").unwrap(), period)
        .await
        .unwrap();
    assert!(statement.lines.is_empty());
    let names: Vec<&str> = statement
        .verifications
        .iter()
        .map(|line| line.check.as_str())
        .collect();
    assert_eq!(names, ["check:chatcmpl-1:2", "check:chatcmpl-2:1"]);
    assert_eq!(statement.verifications[0].pay, MicroUsd(PAY));
    assert_eq!(
        statement.verifications[0].energy_reimbursement,
        MicroUsd(ENERGY)
    );
    assert_eq!(statement.totals.checks, 2);
    assert_eq!(statement.totals.earnings, MicroUsd(2 * (PAY + ENERGY)));
    assert_eq!(statement.totals.net_earnings, statement.totals.earnings);

    let mut csv = Vec::new();
    statement.write_csv(&mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(
        rows[1].starts_with("check:chatcmpl-1:2,0,bob,50000,1500,0,"),
        "{csv}"
    );
    assert!(
        rows[3].ends_with(&format!(",{},", MicroUsd(2 * (PAY + ENERGY)))),
        "{csv}"
    );
    // The other vehicle's statement has none of them.
    let other = store
        .statement(&NodeId::new("car-a").unwrap(), period)
        .await
        .unwrap();
    assert!(other.verifications.is_empty());
}

/// `node`'s statement for the first 100 seconds, where these checks are.
async fn first_100_seconds(store: &Store, node: &NodeId) -> ledger::statement::Statement {
    let period = Period {
        from: TimestampMs(0),
        until: TimestampMs(100_000),
    };
    store.statement(node, period).await.unwrap()
}

/// A verifier found cheating gives back the pay of its last checks, once
/// however often it is asked; its statement shows each as a
/// clawback with the reason, and `verify` finds every reversal ordered and
/// every check of the window reversed.
async fn a_cheating_verifiers_last_checks_are_taken_back_once(store: &Store) {
    open_parties(store, 1).await;
    let book = common::book();
    for (name, at) in [
        ("check:chatcmpl-1:1", 10_000),
        ("check:chatcmpl-2:1", 20_000),
        ("check:chatcmpl-3:1", 30_000),
        ("check:chatcmpl-4:1", 90_000),
    ] {
        store.pay_check(&check(name, at), &book).await.unwrap();
    }
    let node = NodeId::new("car-b").unwrap();
    let reason = "its verdict on generation 4 was contradicted";
    // The last two checks made by the quarantine, not the one after it.
    let first = store
        .claw_back_checks(&node, reason, TimestampMs(40_000), 2)
        .await
        .unwrap();
    assert_eq!(first.checks, 2);
    assert_eq!(first.clawed_back, MicroUsd(2 * (PAY + ENERGY)));
    let again = store
        .claw_back_checks(&node, reason, TimestampMs(40_000), 2)
        .await
        .unwrap();
    assert_eq!((again.checks, again.clawed_back), (0, MicroUsd(0)));
    assert_eq!(
        balance(store, AccountId::Owner(owner("bob"))).await,
        2 * (PAY + ENERGY)
    );
    assert_eq!(
        balance(store, AccountId::Verification).await,
        -2 * (PAY + ENERGY)
    );
    let statement = first_100_seconds(store, &node).await;
    let taken: Vec<(&str, &str)> = statement
        .clawbacks
        .iter()
        .map(|line| (line.request_id.as_str(), line.reason.as_str()))
        .collect();
    assert_eq!(
        taken,
        [
            ("check:chatcmpl-2:1", reason),
            ("check:chatcmpl-3:1", reason)
        ]
    );
    assert_eq!(statement.totals.earnings, MicroUsd(4 * (PAY + ENERGY)));
    assert_eq!(statement.totals.net_earnings, MicroUsd(2 * (PAY + ENERGY)));
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}

/// A check the verifier made before its checks were taken back, but that
/// reaches the books only after (a gateway's pass that looked before the
/// quarantine was recorded), is not paid; a check booked before keeps its
/// booking, and one made after the clawback is paid.
async fn a_check_booked_after_its_verifiers_checks_were_taken_back_is_not_paid(store: &Store) {
    open_parties(store, 1).await;
    let book = common::book();
    store
        .pay_check(&check("check:chatcmpl-1:1", 10_000), &book)
        .await
        .unwrap();
    let node = NodeId::new("car-b").unwrap();
    let reason = "generation 7 failed verification";
    let taken = store
        .claw_back_checks(&node, reason, TimestampMs(40_000), 200)
        .await
        .unwrap();
    assert_eq!(taken.checks, 1);

    let late = store
        .pay_check(&check("check:chatcmpl-2:1", 30_000), &book)
        .await
        .unwrap();
    assert_eq!(late.withheld.as_deref(), Some(reason));
    assert!(!late.newly_paid);
    let replayed = store
        .pay_check(&check("check:chatcmpl-1:1", 10_000), &book)
        .await
        .unwrap();
    assert_eq!(
        (replayed.withheld, replayed.pay),
        (None, MicroUsd(PAY)),
        "a booked check keeps its booking"
    );
    assert_eq!(balance(store, AccountId::Owner(owner("bob"))).await, 0);
    let after = store
        .pay_check(&check("check:chatcmpl-3:1", 50_000), &book)
        .await
        .unwrap();
    assert!(after.newly_paid && after.withheld.is_none());
    assert_eq!(
        balance(store, AccountId::Owner(owner("bob"))).await,
        PAY + ENERGY
    );
    let statement = first_100_seconds(store, &node).await;
    let checks: Vec<&str> = statement
        .verifications
        .iter()
        .map(|line| line.check.as_str())
        .collect();
    assert_eq!(checks, ["check:chatcmpl-1:1", "check:chatcmpl-3:1"]);
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
}

on_both_backends!(
    a_check_is_paid_once_by_the_platform,
    the_statement_shows_the_checks_the_vehicle_was_paid_for,
    a_cheating_verifiers_last_checks_are_taken_back_once,
    a_check_booked_after_its_verifiers_checks_were_taken_back_is_not_paid,
);
