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

use common::{generations_stopped, node_assignments, Stack, MODEL};
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

    let body = common::long_story(0.8);
    let expected = common::long_reference_text(&stack.chat(&body).await);

    // The second car connects later, so the first (lower id, equally idle)
    // is where the stream starts.
    stack.add_agent("staying", 1);
    stack.wait_for_nodes(&["leaving", "staying"]).await;
    let reassigned_before = stack.metric("fleetgrid_reassignments_total").await;
    let cancelled_before = stack
        .metric("fleetgrid_generations_cancelled_on_node_total")
        .await;

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
        (
            stack.metric(&node_assignments("leaving")).await,
            stack.metric(&node_assignments("staying")).await
        ),
        (2.0, 0.0),
        "the stream did not start on the car that is about to leave"
    );

    // The owner unplugs to drive off in a few seconds.
    let unplugged_at = Instant::now();
    let departure = SystemTime::now() + DEPARTURE_AFTER_UNPLUG;
    write_feed(&feed, false, departure);
    stack
        .wait_for_metric(
            "fleetgrid_reassignments_total",
            DEPARTURE_AFTER_UNPLUG.saturating_sub(unplugged_at.elapsed()),
            "the generation was handed over before the departure",
            |reassigned| reassigned > reassigned_before,
        )
        .await;
    let handed_over_after = unplugged_at.elapsed();

    // Work that arrives now goes to the car that stays.
    let short =
        json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]});
    let answer = stack.chat(&short).await;
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

    // The leaving car was told to stop its generation because it departs,
    // and confirmed it stopped.
    stopped_and_confirmed(&stack, "departed", cancelled_before).await;

    // Until it leaves, work that arrives goes to the car that stays; then
    // the car leaves. It was given nothing more after it unplugged.
    let mut short_answers = 1.0;
    while SystemTime::now() < departure {
        stack.chat(&short).await;
        short_answers += 1.0;
    }
    stack.agents[0].kill();
    assert_eq!(
        stack.metric(&node_assignments("leaving")).await,
        2.0,
        "the leaving car got work after it unplugged"
    );
    assert_eq!(
        stack.metric(&node_assignments("staying")).await,
        1.0 + short_answers,
        "the car that stays took the handed-over generation and the new work"
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
    let cancelled_before = stack
        .metric("fleetgrid_generations_cancelled_on_node_total")
        .await;

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
    let leaving_states =
        common::labelled("fleetgrid_node_state_changes_total", "node_id", "leaving");
    let states_before = stack.metric(&leaving_states).await;
    write_feed(
        &feed,
        true,
        SystemTime::now() + Duration::from_secs(14 * 60),
    );
    stack
        .wait_for_metric(
            &leaving_states,
            common::WAIT,
            "the coordinator heard of the car's new departure",
            |states| states > states_before,
        )
        .await;
    let answer = stack
        .chat(&json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}]}))
        .await;
    assert!(answer["choices"][0]["message"]["content"].is_string());
    assert_eq!(
        (
            stack.metric(&node_assignments("leaving")).await,
            stack.metric(&node_assignments("staying")).await
        ),
        (2.0, 1.0),
        "the car got new work inside its departure window"
    );
    assert_eq!(
        stack.metric("fleetgrid_reassignments_total").await,
        reassigned_before,
        "work that finishes in time was moved"
    );
    assert_eq!(stack.metric(&generations_stopped("draining")).await, 0.0);

    // Now the departure is a minute away: at the hard stop everything moves.
    let departure = SystemTime::now() + Duration::from_secs(61);
    write_feed(&feed, true, departure);
    stack
        .wait_for_metric(
            "fleetgrid_reassignments_total",
            Duration::from_secs(30),
            "the generation was handed over at the hard stop",
            |reassigned| reassigned > reassigned_before,
        )
        .await;
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
    // The car was told to stop it because it drains for its departure, and
    // confirmed it stopped; it was given nothing else.
    stopped_and_confirmed(&stack, "draining", cancelled_before).await;
    assert_eq!(stack.metric(&node_assignments("leaving")).await, 2.0);
}

/// Asserts that the leaving car was told to stop one generation for
/// `reason`, and waits until it confirmed it stopped.
async fn stopped_and_confirmed(stack: &Stack, reason: &str, cancelled_before: f64) {
    assert_eq!(stack.metric(&generations_stopped(reason)).await, 1.0);
    stack
        .wait_for_metric(
            "fleetgrid_generations_cancelled_on_node_total",
            common::WAIT,
            "the leaving car confirmed it stopped its generation",
            |cancelled| cancelled > cancelled_before,
        )
        .await;
}
