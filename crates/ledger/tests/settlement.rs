//! Settlement as a pure function: what a completed request turns into.

mod common;

use common::{cloud_segment, node_segment};
use ledger::core::{
    AccountId, MicroUsd, OwnerId, RequestId, Segment, TenantId, TimestampMs, TransferKind,
};
use ledger::pricing::TenantClass;
use ledger::settlement::{settle, CompletedRequest, SettlementError};

fn request(segments: Vec<ledger::metering::UsageSegment>) -> CompletedRequest {
    CompletedRequest {
        request_id: RequestId::new("r").unwrap(),
        tenant: TenantId::new("acme").unwrap(),
        class: TenantClass::Spot,
        admitted_at: TimestampMs(1_000),
        completed_at: TimestampMs(2_000),
        segments,
    }
}

#[test]
fn a_price_change_after_admission_does_not_change_a_retry() {
    let completed = request(vec![node_segment(
        "r", 0, "car-a", "alice", 500, 500, 1_000,
    )]);
    let mut book = common::book();
    let first = settle(&completed, &book).unwrap();
    book.publish(TimestampMs(1_500), common::sheet(1_000, 9_000))
        .unwrap();
    assert_eq!(settle(&completed, &book).unwrap(), first);
    // A request admitted after the change pays the new owner share.
    let later = CompletedRequest {
        admitted_at: TimestampMs(1_500),
        ..completed
    };
    assert_ne!(settle(&later, &book).unwrap().transfers, first.transfers);
}

#[test]
fn an_escalated_tail_is_charged_at_the_cloud_rate_without_the_re_prefill() {
    let completed = request(vec![
        node_segment("r", 0, "car-a", "alice", 1_000, 100, 1_000),
        cloud_segment("r", 1, 1_100, 400),
    ]);
    let settlement = settle(&completed, &common::book()).unwrap();
    // Prompt at fleet spot $0.10/M = 100; 100 tokens at $0.20/M = 20;
    // 400 tokens at $2.40/M (upstream $2 + 20 %) = 960.
    assert_eq!(settlement.charge, MicroUsd(1_080));
    let kinds: Vec<(TransferKind, Segment)> = settlement
        .transfers
        .iter()
        .map(|t| (t.kind(), t.segment()))
        .collect();
    assert_eq!(
        kinds,
        [
            (TransferKind::TokenCharge, Segment(0)),
            (TransferKind::RevenueShare, Segment(0)),
            (TransferKind::EnergyReimbursement, Segment(0)),
            (TransferKind::CloudCost, Segment(1)),
        ]
    );
    // Upstream is paid for everything it processed, re-prefill included:
    // 1,100 × $1/M + 400 × $2/M = 1,900.
    assert_eq!(settlement.transfers[3].amount(), MicroUsd(1_900));
    assert_eq!(
        settlement.transfers[1].credit(),
        &AccountId::Owner(OwnerId::new("alice").unwrap())
    );
}

#[test]
fn malformed_requests_are_refused() {
    assert!(matches!(
        settle(&request(vec![]), &common::book()),
        Err(SettlementError::NoSegments(_))
    ));
    let skipped = request(vec![node_segment("r", 1, "car-a", "alice", 10, 10, 0)]);
    assert!(matches!(
        settle(&skipped, &common::book()),
        Err(SettlementError::SegmentOutOfOrder { position: 0, .. })
    ));
    let foreign = request(vec![node_segment("other", 0, "car-a", "alice", 10, 10, 0)]);
    assert!(settle(&foreign, &common::book()).is_err());
    let mut cloud_model_on_a_car = node_segment("r", 0, "car-a", "alice", 10, 10, 0);
    cloud_model_on_a_car.model = common::model(common::CLOUD_MODEL);
    assert_eq!(
        settle(&request(vec![cloud_model_on_a_car]), &common::book()),
        Err(SettlementError::ServerMismatch(Segment(0)))
    );
}

#[test]
fn a_free_class_produces_no_zero_transfers() {
    let mut sheet = common::sheet(7_000, 0);
    for price in sheet.fleet.values_mut() {
        *price = common::price(0, 0);
    }
    let book = ledger::pricing::PriceBook::new(sheet).unwrap();
    let completed = request(vec![node_segment("r", 0, "car-a", "alice", 100, 100, 0)]);
    let settlement = settle(&completed, &book).unwrap();
    assert_eq!(settlement.charge, MicroUsd(0));
    // Only the energy the owner paid for is reimbursed.
    let kinds: Vec<TransferKind> = settlement.transfers.iter().map(|t| t.kind()).collect();
    assert_eq!(kinds, [TransferKind::EnergyReimbursement]);
}

#[test]
fn the_segments_parts_of_the_charge_add_up_to_it() {
    // Three segments whose exact earnings each end in a fraction of a
    // micro-dollar: 1 completion token at $0.20/M is 0.2 µUSD.
    let completed = request(vec![
        node_segment("r", 0, "car-a", "alice", 3, 1, 1_000),
        node_segment("r", 1, "car-b", "bob", 4, 1, 1_000),
        cloud_segment("r", 2, 5, 1),
    ]);
    let settlement = settle(&completed, &common::book()).unwrap();
    // 3 × 0.1 + 0.2 = 0.5; 0.2; 2.4: 3.1 in all, charged 4.
    assert_eq!(settlement.charge, MicroUsd(4));
    assert_eq!(
        settlement.segment_charges,
        [MicroUsd(1), MicroUsd(0), MicroUsd(3)]
    );
}
