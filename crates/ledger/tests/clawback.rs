//! Clawbacks on SQLite and on PostgreSQL: a node found returning bad
//! answers loses what it was paid for the segments it served of its suspect
//! window, the tenants who paid for them are refunded, and its owner's
//! payouts are held. Every scenario runs on both backends; the PostgreSQL
//! half needs a server (see `common`).
//!
//! The request most scenarios use migrated from car-a (alice, segment 0:
//! 1,000 prompt and 300 completion tokens) to car-b (bob, segment 1: a
//! re-prefill and 700 tokens), at spot prices: the tenant pays 300 µUSD, of
//! which segment 0 earned 160 and segment 1 earned 140. Alice is paid a
//! revenue share of 112 and 156 of energy; bob 98 and 240.

#[macro_use]
mod common;

use common::{balance, cloud_segment, migrated_request, node_segment, open_parties, owner, tenant};
use ledger::clawback::{ClawbackError, ClawbackOrder};
use ledger::core::{
    AccountId, Instrument, MicroUsd, NodeId, RequestId, Segment, TimestampMs, TransferKind,
};
use ledger::payout::{PayoutAmount, PayoutError, PayoutOrder, PayoutRates};
use ledger::pricing::PriceBook;
use ledger::settlement::CompletedRequest;
use ledger::statement::Period;
use ledger::store::{verify, Store, StoreError};

const REASON: &str = "verification failed at token 17: not the sampler's pick";
const TOP_UP: i64 = 10_000_000;
const CHARGE: i64 = 300;
const ALICE_EARNED: i64 = 112 + 156;
const BOB_SHARE: i64 = 98;
const BOB_ENERGY: i64 = 240;
const BOB_EARNED: i64 = BOB_SHARE + BOB_ENERGY;
/// Segment 1's part of the charge: its 700 tokens at $0.20 per million.
const SEGMENT_1_CHARGE: i64 = 140;
/// What bob earns for a request served by car-b alone.
const SOLO_EARNED: i64 = ALICE_EARNED;

fn node(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

async fn tenant_balance(store: &Store) -> i64 {
    balance(store, AccountId::Tenant(tenant())).await
}

async fn owner_balance(store: &Store, name: &str) -> i64 {
    balance(store, AccountId::Owner(owner(name))).await
}

/// car-b alone, completed at `completed_ms`: bob earns what alice earns for
/// segment 0 of the migrated request (the same tokens and energy).
fn request_on_car_b(id: &str, completed_ms: i64) -> CompletedRequest {
    CompletedRequest {
        segments: vec![node_segment(
            id,
            0,
            "car-b",
            "bob",
            1_000,
            300,
            completed_ms - 5_000,
        )],
        ..migrated_request(id, completed_ms)
    }
}

fn order(node_name: &str, requests: &[&str], at_ms: i64) -> ClawbackOrder {
    ClawbackOrder {
        node: node(node_name),
        request_ids: requests
            .iter()
            .map(|id| RequestId::new(*id).unwrap())
            .collect(),
        reason: REASON.to_owned(),
        at: TimestampMs(at_ms),
    }
}

/// One micro-dollar per unit, so any balance can be paid out exactly.
/// Settles `request` on the test book.
async fn settle(store: &Store, request: &CompletedRequest) -> ledger::store::SettleReceipt {
    store.settle(request, &common::book()).await.unwrap()
}

/// Records `order` on the test book.
async fn claw_back(store: &Store, order: &ClawbackOrder) -> ledger::store::ClawbackReceipt {
    store.claw_back(order, &common::book()).await.unwrap()
}

fn rates() -> PayoutRates {
    PayoutRates::new([(Instrument::Cash, MicroUsd(1))]).unwrap()
}

fn payout(id: &str, name: &str, amount: PayoutAmount) -> PayoutOrder {
    PayoutOrder {
        payout_id: RequestId::new(id).unwrap(),
        owner: owner(name),
        instrument: Instrument::Cash,
        amount,
        at: TimestampMs(300_000),
    }
}

async fn assert_verified(store: &Store) -> ledger::core::VerifyReport {
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    report
}

/// (kind, segment, amount, time) of a request's reversals, sorted.
async fn reversals_of(store: &Store, request: &str) -> Vec<(TransferKind, Segment, i64, i64)> {
    let transfers = store
        .request_transfers(&RequestId::new(request).unwrap())
        .await
        .unwrap();
    let mut reversals: Vec<_> = transfers
        .iter()
        .filter(|transfer| transfer.kind().reverses().is_some())
        .map(|transfer| {
            (
                transfer.kind(),
                transfer.segment(),
                transfer.amount().0,
                transfer.at().0,
            )
        })
        .collect();
    reversals.sort();
    reversals
}

/// A verdict after settlement takes back what car-b was paid for its
/// segment and refunds that segment's part of the charge; car-a's segment
/// of the same request is left alone.
async fn clawback_after_settlement_reverses_only_the_cheating_node(store: &Store) {
    open_parties(store, TOP_UP).await;
    let request = migrated_request("r1", 100_000);
    store.settle(&request, &common::book()).await.unwrap();
    assert_eq!(owner_balance(store, "bob").await, BOB_EARNED);

    let receipt = claw_back(store, &order("car-b", &["r1"], 200_000)).await;
    assert_eq!(receipt.requests_recorded, 1);
    assert_eq!(receipt.revenue_clawed_back, MicroUsd(BOB_SHARE));
    assert_eq!(receipt.energy_clawed_back, MicroUsd(BOB_ENERGY));
    assert_eq!(receipt.refunded, MicroUsd(SEGMENT_1_CHARGE));
    assert_eq!(receipt.shortfall, MicroUsd(0));

    assert_eq!(owner_balance(store, "bob").await, 0);
    assert_eq!(owner_balance(store, "alice").await, ALICE_EARNED);
    assert_eq!(
        tenant_balance(store).await,
        TOP_UP - CHARGE + SEGMENT_1_CHARGE
    );
    assert_eq!(
        reversals_of(store, "r1").await,
        [
            (
                TransferKind::RevenueClawback,
                Segment(1),
                BOB_SHARE,
                200_000
            ),
            (
                TransferKind::EnergyClawback,
                Segment(1),
                BOB_ENERGY,
                200_000
            ),
            (TransferKind::Refund, Segment(1), SEGMENT_1_CHARGE, 200_000),
        ]
    );
    let report = assert_verified(store).await;
    assert!(report.owed_by_owners.is_empty());
}

/// A cloud segment of a clawed-back request keeps its upstream cost, and
/// the tenant gets back exactly the node's part of the charge.
async fn an_escalated_tail_is_left_alone(store: &Store) {
    open_parties(store, TOP_UP).await;
    let request = CompletedRequest {
        segments: vec![
            node_segment("r1", 0, "car-a", "alice", 1_000, 100, 95_000),
            cloud_segment("r1", 1, 1_100, 400),
        ],
        ..migrated_request("r1", 100_000)
    };
    let settled = store.settle(&request, &common::book()).await.unwrap();
    // Prompt 100 + 100 tokens at $0.20/M = 20: segment 0 earned 120 of 1,080.
    assert_eq!(settled.charge, MicroUsd(1_080));
    let receipt = claw_back(store, &order("car-a", &["r1"], 200_000)).await;
    assert_eq!(receipt.refunded, MicroUsd(120));
    assert_eq!(owner_balance(store, "alice").await, 0);
    assert_eq!(tenant_balance(store).await, TOP_UP - 1_080 + 120);
    let kinds: Vec<TransferKind> = reversals_of(store, "r1")
        .await
        .into_iter()
        .map(|(kind, segment, ..)| {
            assert_eq!(segment, Segment(0));
            kind
        })
        .collect();
    assert_eq!(
        kinds,
        [
            TransferKind::RevenueClawback,
            TransferKind::EnergyClawback,
            TransferKind::Refund
        ]
    );
    assert_verified(store).await;
}

/// A verdict may reach the ledger before the gateway settles the request:
/// the settlement then posts the reversals itself, and both orders of
/// events end with the same transfers and balances.
async fn clawback_before_settlement_is_posted_when_the_request_settles(store: &Store) {
    open_parties(store, TOP_UP).await;
    // r1: the verdict first.
    let early = claw_back(store, &order("car-b", &["r1"], 200_000)).await;
    assert_eq!(early.requests_recorded, 1);
    assert!(early.transfers.is_empty());
    assert_eq!(early.refunded, MicroUsd(0));
    let settled = settle(store, &migrated_request("r1", 100_000)).await;
    assert!(settled
        .transfers
        .iter()
        .any(|transfer| transfer.kind() == TransferKind::Refund));
    assert_eq!(owner_balance(store, "bob").await, 0);
    assert_eq!(owner_balance(store, "alice").await, ALICE_EARNED);
    assert_eq!(
        tenant_balance(store).await,
        TOP_UP - CHARGE + SEGMENT_1_CHARGE
    );

    // r2: the settlement first, the same verdict after.
    settle(store, &migrated_request("r2", 100_000)).await;
    claw_back(store, &order("car-b", &["r2"], 200_000)).await;
    assert_eq!(
        reversals_of(store, "r1").await,
        reversals_of(store, "r2").await
    );
    assert_eq!(owner_balance(store, "bob").await, 0);
    assert_eq!(owner_balance(store, "alice").await, 2 * ALICE_EARNED);
    assert_eq!(
        tenant_balance(store).await,
        TOP_UP - 2 * (CHARGE - SEGMENT_1_CHARGE)
    );
    // A retried settlement of r1 finds everything posted.
    let count = store.transfer_count().await.unwrap();
    settle(store, &migrated_request("r1", 100_000)).await;
    assert_eq!(store.transfer_count().await.unwrap(), count);
    assert_verified(store).await;
}

/// The same order twice is the same as once, even with a later time or
/// another reason: the first order's time and reason stay.
async fn a_repeated_order_changes_nothing(store: &Store) {
    open_parties(store, TOP_UP).await;
    settle(store, &migrated_request("r1", 100_000)).await;
    let first = claw_back(store, &order("car-b", &["r1", "r2"], 200_000)).await;
    assert_eq!(first.requests_recorded, 2);
    let count = store.transfer_count().await.unwrap();
    let balances = (
        tenant_balance(store).await,
        owner_balance(store, "bob").await,
    );

    let mut again = order("car-b", &["r1", "r2"], 250_000);
    again.reason = "found again".to_owned();
    let second = store.claw_back(&again, &common::book()).await.unwrap();
    assert_eq!(second.requests_recorded, 0);
    assert_eq!(second.transfers, first.transfers);
    assert_eq!(
        (
            second.revenue_clawed_back,
            second.energy_clawed_back,
            second.refunded
        ),
        (MicroUsd(0), MicroUsd(0), MicroUsd(0))
    );
    assert_eq!(store.transfer_count().await.unwrap(), count);
    assert_eq!(
        (
            tenant_balance(store).await,
            owner_balance(store, "bob").await
        ),
        balances
    );
    // r2 settles later with the first order's time.
    settle(store, &migrated_request("r2", 150_000)).await;
    assert!(reversals_of(store, "r2")
        .await
        .iter()
        .all(|(.., at)| *at == 200_000));
    let hold = store.payout_holds(&owner("bob")).await.unwrap();
    assert_eq!(hold.len(), 1);
    assert_eq!(hold[0].reason, REASON);
    assert_verified(store).await;
}

/// A clawback holds the node's payouts until the operator releases it;
/// other owners are paid as usual, and so is a node held without an order.
async fn payouts_are_refused_while_the_node_is_held(store: &Store) {
    open_parties(store, TOP_UP).await;
    settle(store, &migrated_request("r1", 100_000)).await;
    claw_back(store, &order("car-b", &["r1"], 200_000)).await;
    // Bob earns again on car-b, outside the suspect window.
    settle(store, &request_on_car_b("r2", 250_000)).await;
    assert_eq!(owner_balance(store, "bob").await, SOLO_EARNED);

    let error = store
        .pay_out(&payout("p-bob", "bob", PayoutAmount::All), &rates())
        .await
        .unwrap_err();
    match &error {
        StoreError::PayoutsHeld {
            owner,
            node,
            reason,
        } => {
            assert_eq!(
                (owner.as_str(), node.as_str(), reason.as_str()),
                ("bob", "car-b", REASON)
            );
        }
        other => panic!("expected a held payout, got {other}"),
    }
    assert!(error.to_string().contains(REASON), "{error}");
    assert_eq!(owner_balance(store, "bob").await, SOLO_EARNED);
    let alice = store
        .pay_out(&payout("p-alice", "alice", PayoutAmount::All), &rates())
        .await
        .unwrap();
    assert_eq!(alice.amount, MicroUsd(ALICE_EARNED));

    assert!(store.release_payouts(&node("car-b")).await.unwrap());
    assert!(!store.release_payouts(&node("car-b")).await.unwrap());
    let bob = store
        .pay_out(&payout("p-bob", "bob", PayoutAmount::All), &rates())
        .await
        .unwrap();
    assert_eq!(bob.amount, MicroUsd(SOLO_EARNED));
    assert_eq!(owner_balance(store, "bob").await, 0);

    // A hold without a clawback (a quarantine for another reason).
    settle(store, &migrated_request("r3", 300_000)).await;
    let held = store
        .hold_payouts(&node("car-a"), "quarantined: false verdict", TimestampMs(1))
        .await
        .unwrap();
    assert!(held);
    let refused = store
        .pay_out(&payout("p-alice-2", "alice", PayoutAmount::All), &rates())
        .await;
    assert!(
        matches!(refused, Err(StoreError::PayoutsHeld { .. })),
        "{refused:?}"
    );
    // A retry of a payout made before the hold still answers with its receipt.
    let retried = store
        .pay_out(&payout("p-alice", "alice", PayoutAmount::All), &rates())
        .await
        .unwrap();
    assert_eq!(retried.amount, MicroUsd(ALICE_EARNED));
    assert_verified(store).await;
}

/// The owner's statement lists what was taken back and why, and its CSV
/// nets it in the total.
async fn the_statement_shows_the_clawback_and_its_reason(store: &Store) {
    open_parties(store, TOP_UP).await;
    settle(store, &migrated_request("r1", 100_000)).await;
    claw_back(store, &order("car-b", &["r1"], 200_000)).await;
    let period = Period {
        from: TimestampMs(0),
        until: TimestampMs(1_000_000),
    };
    let statement = store.statement(&node("car-b"), period).await.unwrap();
    assert_eq!(statement.lines.len(), 1);
    assert_eq!(statement.lines[0].revenue_share, MicroUsd(BOB_SHARE));
    assert_eq!(statement.clawbacks.len(), 1);
    let line = &statement.clawbacks[0];
    assert_eq!(line.request_id.as_str(), "r1");
    assert_eq!(line.segment, Segment(1));
    assert_eq!(line.reason, REASON);
    assert_eq!(line.at, TimestampMs(200_000));
    assert_eq!(line.revenue_share, MicroUsd(BOB_SHARE));
    assert_eq!(line.energy_reimbursement, MicroUsd(BOB_ENERGY));
    assert_eq!(statement.totals.earnings, MicroUsd(BOB_EARNED));
    assert_eq!(statement.totals.clawed_back, MicroUsd(BOB_EARNED));
    assert_eq!(statement.totals.net_earnings, MicroUsd(0));

    let mut csv = Vec::new();
    statement.write_csv(&mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "{csv}");
    assert!(rows[0].ends_with(",earnings_usd,clawback_reason"), "{csv}");
    assert_eq!(
        rows[2],
        format!("r1,1,bob,200000,,,,,-0.000098,-0.000240,-0.000338,{REASON}")
    );
    assert!(
        rows[3].ends_with(",0.000000,0.000000,0.000000,"),
        "the total nets the clawback: {csv}"
    );

    // car-a's statement has no clawback; a period before the verdict has
    // bob's earning but not yet its clawback.
    let alice = store.statement(&node("car-a"), period).await.unwrap();
    assert!(alice.clawbacks.is_empty());
    let before = Period {
        from: TimestampMs(0),
        until: TimestampMs(200_000),
    };
    let earlier = store.statement(&node("car-b"), before).await.unwrap();
    assert_eq!((earlier.lines.len(), earlier.clawbacks.len()), (1, 0));
    assert_verified(store).await;
}

/// The owner was paid out before the verdict: the clawback still takes the
/// whole amount, the balance goes below zero by what was not there, verify
/// reports it as owed, and the owner's next earnings repay it first.
async fn a_clawback_of_paid_out_earnings_leaves_a_shortfall_owed(store: &Store) {
    open_parties(store, TOP_UP).await;
    settle(store, &migrated_request("r1", 100_000)).await;
    store
        .pay_out(
            &payout("p1", "bob", PayoutAmount::UpTo(MicroUsd(300))),
            &rates(),
        )
        .await
        .unwrap();
    let receipt = claw_back(store, &order("car-b", &["r1"], 200_000)).await;
    assert_eq!(
        receipt.revenue_clawed_back.0 + receipt.energy_clawed_back.0,
        BOB_EARNED
    );
    assert_eq!(receipt.shortfall, MicroUsd(300));
    assert_eq!(receipt.refunded, MicroUsd(SEGMENT_1_CHARGE));
    assert_eq!(owner_balance(store, "bob").await, -300);
    let report = assert_verified(store).await;
    assert_eq!(report.owed_by_owners, [(owner("bob"), MicroUsd(300))]);

    // Released, bob still cannot be paid while he owes.
    store.release_payouts(&node("car-b")).await.unwrap();
    let owing = store
        .pay_out(&payout("p2", "bob", PayoutAmount::All), &rates())
        .await;
    assert!(
        matches!(
            owing,
            Err(StoreError::Payout(PayoutError::BelowOneUnit { .. }))
        ),
        "{owing:?}"
    );
    // His next earnings repay the debt; only the rest can be paid out.
    for id in ["r2", "r3"] {
        settle(store, &request_on_car_b(id, 300_000)).await;
    }
    let paid = store
        .pay_out(&payout("p2", "bob", PayoutAmount::All), &rates())
        .await
        .unwrap();
    assert_eq!(paid.amount, MicroUsd(2 * SOLO_EARNED - 300));
    let report = assert_verified(store).await;
    assert!(report.owed_by_owners.is_empty());
}

/// A price book other than the one the request was settled with would
/// reverse other amounts than were paid: the order is refused whole, and
/// nothing is recorded.
async fn another_price_book_is_refused(store: &Store) {
    open_parties(store, TOP_UP).await;
    settle(store, &migrated_request("r1", 100_000)).await;
    let other = PriceBook::new(common::sheet(5_000, 2_000)).unwrap();
    let error = store
        .claw_back(&order("car-b", &["r1"], 200_000), &other)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::Clawback(ClawbackError::SettledDifferently { .. })
        ),
        "{error}"
    );
    assert_eq!(owner_balance(store, "bob").await, BOB_EARNED);
    assert!(store.payout_holds(&owner("bob")).await.unwrap().is_empty());
    let receipt = claw_back(store, &order("car-b", &["r1"], 200_000)).await;
    assert_eq!(receipt.requests_recorded, 1);
    assert_verified(store).await;
}

on_both_backends!(
    clawback_after_settlement_reverses_only_the_cheating_node,
    an_escalated_tail_is_left_alone,
    clawback_before_settlement_is_posted_when_the_request_settles,
    a_repeated_order_changes_nothing,
    payouts_are_refused_while_the_node_is_held,
    the_statement_shows_the_clawback_and_its_reason,
    a_clawback_of_paid_out_earnings_leaves_a_shortfall_owed,
    another_price_book_is_refused,
);

/// A verdict and the settlement of the same request, racing on two
/// connections to one PostgreSQL ledger: whichever commits second sees the
/// first, so the reversals are posted exactly once, every time.
#[tokio::test]
async fn a_verdict_racing_the_settlement_is_posted_once_on_postgres() {
    let ledger = common::postgres_store().await;
    let other = ledger.connect_again().await;
    open_parties(&ledger.store, TOP_UP).await;
    for round in 0..8 {
        let id = format!("race-{round}");
        let request = migrated_request(&id, 100_000);
        let clawback = order("car-b", &[id.as_str()], 200_000);
        let book = common::book();
        let (settled, clawed) = tokio::join!(
            ledger.store.settle(&request, &book),
            other.claw_back(&clawback, &book)
        );
        settled.unwrap();
        clawed.unwrap();
        assert_eq!(reversals_of(&ledger.store, &id).await.len(), 3, "{id}");
    }
    assert_eq!(owner_balance(&ledger.store, "bob").await, 0);
    assert_verified(&ledger.store).await;
    other.close().await;
    ledger.drop_schema().await;
}

/// Verify notices a clawback order whose segment's earnings were never
/// reversed (an order written behind the store's back).
#[tokio::test]
async fn verify_detects_an_unreversed_order_on_sqlite() {
    use sqlx::Connection;
    let (store, dir) = common::sqlite_store().await;
    open_parties(&store, TOP_UP).await;
    settle(&store, &migrated_request("r1", 100_000)).await;
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let mut raw = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO ledger_clawbacks (node_id, request_id, reason, at_ms) \
         VALUES ('car-b', 'r1', 'bad', 0)",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let report = verify(&store).await.unwrap();
    let missing: Vec<TransferKind> = report
        .problems
        .iter()
        .filter_map(|problem| match problem {
            ledger::core::Problem::MissingReversal { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect();
    assert_eq!(
        missing,
        [
            TransferKind::RevenueShare,
            TransferKind::EnergyReimbursement
        ],
        "{:?}",
        report.problems
    );
}
