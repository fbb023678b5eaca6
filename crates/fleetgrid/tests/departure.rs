//! A car that leaves mid-generation: its vehicle-state feed (`file:`) says
//! "unplugged, departing in a few seconds" while it streams a generation.
//! The generation is handed over to the other car before the departure time,
//! the client's text equals an uninterrupted run, and the leaving car is
//! given nothing more. A car still plugged in whose departure nears takes no
//! new work inside its departure window and hands over what it runs at the
//! hard stop, a minute before it leaves.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Stack, MODEL};
use futures::StreamExt;
use serde_json::json;

/// How far ahead of the unplugging the owner's departure is scheduled.
const DEPARTURE_AFTER_UNPLUG: Duration = Duration::from_secs(4);

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as u64
}

/// Replaces the feed file atomically, as the adapter asks of its writers.
fn write_feed(path: &Path, plugged_in: bool, departure: SystemTime) {
    let feed = json!({
        "plugged_in": plugged_in, "charging": plugged_in, "soc": 0.8,
        "departure_unix_ms": unix_ms(departure), "temperature_c": 30.0,
    });
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, feed.to_string()).expect("write feed");
    std::fs::rename(&temporary, path).expect("replace feed");
}

fn count_lines(text: &str, needles: &[&str]) -> usize {
    text.lines()
        .filter(|line| needles.iter().all(|needle| line.contains(needle)))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_car_that_unplugs_to_leave_hands_its_generation_over_before_departure() {
    let mut stack = Stack::start(Default::default());
    let feed = stack.dir.path().join("leaving-feed.json");
    let far_away = SystemTime::now() + Duration::from_secs(10 * 3600);
    write_feed(&feed, true, far_away);
    let credential = stack.cli(&["nodes", "add", "leaving"]);
    stack.spawn_agent(
        "leaving",
        &credential,
        &format!("file:{}", feed.display()),
        1,
    );
    stack.wait_for_nodes(&["leaving"]).await;

    let body = json!({
        "model": MODEL, "max_tokens": 300, "temperature": 0.8, "seed": 11,
        "messages": [{"role": "user", "content": "Write a long story about a trip across the mountains."}],
    });
    let uninterrupted = stack.chat(&body).await;
    let expected = uninterrupted["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let tokens = uninterrupted["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        tokens >= 150,
        "the reference run is too short to interrupt: {tokens} tokens"
    );

    // The second car connects later, so the first (lower id, equally idle)
    // is where the stream starts.
    stack.add_agent("staying", 1);
    stack.wait_for_nodes(&["leaving", "staying"]).await;
    let reassigned_before = stack.metric("fleetgrid_reassignments_total").await;

    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let response = stack.post("/v1/chat/completions", &streamed_body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    while raw.matches("data: ").count() < 10 {
        let chunk = bytes.next().await.expect("stream open").expect("chunk");
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        count_lines(&stack.log("coordinator"), &["assigned", "node_id=staying"]),
        0,
        "the stream did not start on the car that is about to leave"
    );

    // The owner unplugs to drive off in a few seconds.
    let unplugged_at = Instant::now();
    let departure = SystemTime::now() + DEPARTURE_AFTER_UNPLUG;
    write_feed(&feed, false, departure);
    loop {
        if stack.metric("fleetgrid_reassignments_total").await > reassigned_before {
            break;
        }
        assert!(
            unplugged_at.elapsed() < DEPARTURE_AFTER_UNPLUG,
            "the generation was not handed over before the departure"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handed_over_after = unplugged_at.elapsed();

    // Work that arrives now goes to the car that stays.
    let answer = stack
        .chat(&json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]}))
        .await;
    assert!(answer["choices"][0]["message"]["content"].is_string());

    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
    }
    let streamed = common::parse_sse(&raw);
    assert!(streamed.errors.is_empty(), "errors: {:?}", streamed.errors);
    assert!(streamed.done);
    assert_eq!(
        streamed.content, expected,
        "the handed-over stream differs from an uninterrupted run"
    );

    // The car leaves; until then and after, it was given nothing more.
    let until_departure = departure
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(until_departure).await;
    stack.agents[0].kill();
    let coordinator_log = stack.log("coordinator");
    assert_eq!(
        count_lines(&coordinator_log, &["assigned", "node_id=leaving"]),
        2,
        "the leaving car got work after it unplugged:\n{coordinator_log}"
    );
    let agent_log = stack.log("leaving");
    assert_eq!(count_lines(&agent_log, &["assignment received"]), 2);
    assert_eq!(
        count_lines(&agent_log, &["cancelling", "Departed"]),
        1,
        "the leaving car did not stop its generation:\n{agent_log}"
    );
    assert_eq!(
        stack.metric("fleetgrid_reassignments_total").await,
        reassigned_before + 1.0
    );
    eprintln!("handed over {handed_over_after:?} after unplugging");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugged_in_car_near_its_departure_takes_no_new_work_and_hands_over_at_the_hard_stop() {
    let mut stack = Stack::start(Default::default());
    let feed = stack.dir.path().join("leaving-feed.json");
    write_feed(
        &feed,
        true,
        SystemTime::now() + Duration::from_secs(10 * 3600),
    );
    let credential = stack.cli(&["nodes", "add", "leaving"]);
    stack.spawn_agent(
        "leaving",
        &credential,
        &format!("file:{}", feed.display()),
        1,
    );
    stack.wait_for_nodes(&["leaving"]).await;
    let body = json!({
        "model": MODEL, "max_tokens": 500, "temperature": 0.8, "seed": 3,
        "messages": [{"role": "user", "content": "Write a very long story about a road trip."}],
    });
    let uninterrupted = stack.chat(&body).await;
    let expected = uninterrupted["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    stack.add_agent("staying", 1);
    stack.wait_for_nodes(&["leaving", "staying"]).await;
    let reassigned_before = stack.metric("fleetgrid_reassignments_total").await;

    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let response = stack.post("/v1/chat/completions", &streamed_body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut raw = String::new();
    while raw.matches("data: ").count() < 5 {
        let chunk = bytes.next().await.expect("stream open").expect("chunk");
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }

    // The owner schedules a departure in 14 minutes: inside the default
    // 15-minute window. The car takes no new work, but the generation it
    // runs would finish long before the hard stop, so it stays.
    write_feed(
        &feed,
        true,
        SystemTime::now() + Duration::from_secs(14 * 60),
    );
    let heartbeats = Duration::from_millis(1500);
    tokio::time::sleep(heartbeats).await;
    let answer = stack
        .chat(&json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]}))
        .await;
    assert!(answer["choices"][0]["message"]["content"].is_string());
    assert_eq!(
        count_lines(&stack.log("coordinator"), &["assigned", "node_id=leaving"]),
        2,
        "the car got new work inside its departure window"
    );
    assert_eq!(
        stack.metric("fleetgrid_reassignments_total").await,
        reassigned_before,
        "work that finishes in time was moved"
    );

    // Now the departure is a minute away: at the hard stop everything moves.
    let departure = SystemTime::now() + Duration::from_secs(61);
    write_feed(&feed, true, departure);
    let changed_at = Instant::now();
    while stack.metric("fleetgrid_reassignments_total").await <= reassigned_before {
        assert!(
            changed_at.elapsed() < Duration::from_secs(30),
            "the generation was not handed over at the hard stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(SystemTime::now() < departure);
    while let Some(chunk) = bytes.next().await {
        raw.push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
    }
    let streamed = common::parse_sse(&raw);
    assert!(streamed.errors.is_empty(), "errors: {:?}", streamed.errors);
    assert_eq!(
        streamed.content, expected,
        "the handed-over stream differs from an uninterrupted run"
    );
    let agent_log = stack.log("leaving");
    assert_eq!(count_lines(&agent_log, &["assignment received"]), 2);
    assert_eq!(count_lines(&agent_log, &["cancelling", "Draining"]), 1);
}
