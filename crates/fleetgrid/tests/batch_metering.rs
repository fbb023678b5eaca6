//! End to end: a vehicle that decodes several generations in one batch is
//! paid for its time once. A real coordinator, one agent running SmolLM2 with
//! three sequences, real HTTP, the SQLite ledger.

mod common;

use common::{Stack, MODEL};
use serde_json::json;

fn now_ms() -> i64 {
    coordinator::core::now_ms().0
}

#[tokio::test(flavor = "multi_thread")]
async fn generations_batched_on_one_vehicle_are_paid_its_time_once() {
    let mut stack = Stack::start(Default::default());
    stack.add_agent("car-1", 3);
    stack.wait_for_nodes(&["car-1"]).await;
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a car."}],
        "max_tokens": 48,
        "temperature": 0.0,
        "stream_options": {"include_usage": true},
    });

    // Three streamed requests at once: the agent decodes them together.
    let sent_ms = now_ms();
    let finished = futures::future::join_all((0..3).map(|_| async {
        let streamed = stack.chat_stream(&body).await;
        (streamed, now_ms())
    }))
    .await;
    let done_ms = now_ms();
    for (streamed, _) in &finished {
        assert!(streamed.done && streamed.errors.is_empty(), "{streamed:?}");
    }
    let first_done_ms = finished.iter().map(|(_, at)| *at).min().expect("three");

    let ledger = ledger::store::Store::open_sqlite(&stack.dir.path().join("ledger.db"))
        .await
        .expect("ledger");
    let month = ledger::invoice::month_containing(ledger::core::TimestampMs(sent_ms));
    let period = ledger::invoice::month_period(&month).expect("month");
    let car = ledger::core::NodeId::new("car-1").expect("node");
    let statement = ledger.statement(&car, period).await.expect("statement");
    assert_eq!(statement.lines.len(), 3, "{statement:?}");
    // They ran together: every one was assigned before any of them ended.
    for line in &statement.lines {
        assert!(line.started_at.0 < first_done_ms, "{statement:?}");
        assert!(line.compute.0 > 0, "{statement:?}");
    }

    // Together they are paid at most the time the batch took, where each
    // being paid its own wall time would have been about three times that.
    let span_ms = u64::try_from(done_ms - sent_ms).expect("time moves on");
    let compute_ms = statement.totals.compute.0;
    assert!(
        compute_ms <= span_ms,
        "paid {compute_ms} ms of compute for a batch that took {span_ms} ms"
    );
    let prices = ledger::price_file::PriceConfig::default_sheet().expect("price sheet");
    let power = prices.power_of(&car);
    assert!(statement.totals.energy <= power.segment_energy(ledger::core::DurationMs(span_ms)));

    // The agent reports its share of the batch the same way, so an honest
    // vehicle is not flagged for its report.
    let flags = ledger.meter_flags(Some(&car)).await.expect("flags");
    assert!(flags.is_empty(), "{flags:?}");
}
