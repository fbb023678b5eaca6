//! A quarantined vehicle gives back what it was paid for checking others'
//! answers, as it gives back its own answers' earnings: the books take back
//! its last checks once per quarantine, and pay none of its checks still
//! waiting. In-process, with the gateway's own books.

mod support;

use gateway::store::TenantClass;
use ledger::core::{NodeId, TimestampMs};
use ledger::statement::Period;
use store::checks::CheckRecord;
use support::{Gateway, MODEL};

fn check(name: &str, at_ms: i64) -> CheckRecord {
    CheckRecord {
        check: name.into(),
        node: "car-1".into(),
        model: MODEL.into(),
        tokens: 400,
        compute_ms: 900,
        started_ms: at_ms - 1_000,
        at_ms,
    }
}

#[tokio::test]
async fn a_quarantined_verifier_keeps_nothing_it_was_paid_for_its_checks() {
    let gateway = Gateway::start(TenantClass::Fleet).await;
    let now = now_ms();
    let payments = gateway.billing.check_payments();
    gateway
        .store
        .record_checks(&[
            check("check:a:1", now - 3_000),
            check("check:b:1", now - 2_000),
        ])
        .await
        .expect("record checks");
    // The gateway's own passes run too, each claiming what it pays for a
    // lease: paying as of after any such lease pays whatever they have not.
    let later = now + gateway::billing_checks::CHECK_CLAIM_LEASE.as_millis() as i64 + 1_000;
    payments.pay_pending(later).await.expect("pay");
    let node = NodeId::new("car-1").expect("node id");
    let period = Period {
        from: TimestampMs(now - 60_000),
        until: TimestampMs(now + 60_000),
    };
    let ledger = gateway.billing.ledger();
    let paid = ledger.statement(&node, period).await.expect("statement");
    assert_eq!(paid.verifications.len(), 2);
    assert!(paid.totals.net_earnings.is_positive());

    // Caught lying about an answer; a check it answered before reaches the
    // books only after that.
    gateway
        .store
        .quarantine_node(
            "car-1",
            "its verdict on generation 9 was contradicted",
            &[],
            now,
        )
        .await
        .expect("quarantine");
    gateway
        .store
        .record_checks(&[check("check:c:1", now - 1_000)])
        .await
        .expect("record checks");
    support::apply_clawbacks(&gateway).await;
    payments.pay_pending(later).await.expect("pay");

    let after = ledger.statement(&node, period).await.expect("statement");
    assert_eq!(
        after.verifications.len(),
        2,
        "the waiting check is not paid"
    );
    let taken: Vec<&str> = after
        .clawbacks
        .iter()
        .map(|line| line.request_id.as_str())
        .collect();
    assert_eq!(taken, ["check:a:1", "check:b:1"], "each once");
    assert!(after
        .clawbacks
        .iter()
        .all(|line| line.reason == "its verdict on generation 9 was contradicted"));
    assert_eq!(after.totals.clawed_back, paid.totals.earnings);
    assert_eq!(after.totals.net_earnings.0, 0);
    let report = ledger::store::verify(gateway.billing.ledger())
        .await
        .expect("verify");
    assert!(report.is_ok(), "{report:?}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}
