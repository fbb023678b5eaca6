//! The bus end to end: real `nats-server` processes, a gateway's `Cells`
//! and cells served with `serve_cell`, in one test process.

mod common;

use std::time::Duration;

use bus::wire::{self, Batch, SubmitReply, SubmitRequest, WireGeneration};
use bus::{subjects, CellId};
use cell_api::{Cell, FinishReason, Rejection, Update};
use common::*;
use futures::StreamExt;

#[tokio::test]
async fn a_generation_round_trips_with_its_tokens_usage_and_metering() {
    let server = NatsServer::start();
    let cell = TestCell::new("a", 4, 0, Duration::from_millis(1));
    let _served = serve(connect(&[&server]).await, cell.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a"]).await;

    let sent = generation(vec![11, 12, 13], 42, 30);
    let mut admitted = cells.submit(sent.clone()).await.expect("admitted");
    let (tokens, end) = collect(&mut admitted.updates).await;

    assert!(same_tokens(&tokens, &expected(&sent)), "{tokens:?}");
    let Some(Update::Finished {
        reason,
        usage,
        metering,
    }) = end
    else {
        panic!("expected Finished, got {end:?}");
    };
    assert_eq!(reason, FinishReason::Length);
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 30));
    assert_eq!(
        cell.finished(),
        [metering],
        "the cell's metering, unchanged"
    );
    let received = cell.submitted();
    assert_eq!(received.len(), 1);
    assert_eq!(
        WireGeneration::from(&received[0]),
        WireGeneration::from(&sent)
    );
    assert_eq!(cells.cancel(admitted.request), None, "it had ended");
    eventually("the generation to be forgotten", || cells.in_flight() == 0).await;
}

#[tokio::test]
async fn the_only_cells_refusal_comes_back_and_a_second_cell_takes_what_the_first_refuses() {
    let server = NatsServer::start();
    let refusing = TestCell::new("a", 8, 0, Duration::from_millis(1));
    let refusal = Rejection::QueueFull {
        retry_after_seconds: 7,
    };
    refusing.refuse_with(refusal.clone());
    let _a = serve(connect(&[&server]).await, refusing.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a"]).await;
    let sent = generation(vec![1], 5, 4);
    match cells.submit(sent.clone()).await {
        Err(rejection) => assert_eq!(rejection, refusal),
        Ok(_) => panic!("admitted by a refusing cell"),
    }
    assert_eq!(cells.in_flight(), 0);

    // A second cell, less free, so that placement asks the refusing one
    // first.
    let willing = TestCell::new("b", 8, 6, Duration::from_millis(1));
    let _b = serve(connect(&[&server]).await, willing.clone()).await;
    eventually("both cells", || cells.cells() == ["a", "b"]).await;
    let mut admitted = cells.submit(sent.clone()).await.expect("the other cell");
    let (tokens, end) = collect(&mut admitted.updates).await;
    assert!(same_tokens(&tokens, &expected(&sent)));
    assert!(matches!(end, Some(Update::Finished { .. })), "{end:?}");
    assert_eq!(
        (refusing.submitted().len(), willing.submitted().len()),
        (2, 1)
    );
}

#[tokio::test]
async fn a_generation_whose_cell_dies_continues_on_another_without_gap_or_repeat() {
    let server = NatsServer::start();
    // `a` is freer, so it takes the generation first.
    let first = TestCell::new("a", 8, 0, Duration::from_millis(10));
    let second = TestCell::new("b", 8, 6, Duration::from_millis(2));
    let a = serve(connect(&[&server]).await, first.clone()).await;
    let _b = serve(connect(&[&server]).await, second.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a", "b"]).await;

    let sent = generation(vec![7, 8, 9, 10], 99, 120);
    let mut admitted = cells.submit(sent.clone()).await.expect("admitted");
    let mut tokens = take_tokens(&mut admitted.updates, 20).await;
    assert_eq!(cells.cell_of(admitted.request).as_deref(), Some("a"));
    // The cell side dies: its streams stop and its connection closes.
    a.task.abort();
    let (rest, end) = collect(&mut admitted.updates).await;
    tokens.extend(rest);

    assert!(
        same_tokens(&tokens, &expected(&sent)),
        "each position once, in order: {:?}",
        tokens
            .iter()
            .map(|token| token.token_id)
            .collect::<Vec<_>>()
    );
    let resumed = second.submitted();
    assert_eq!(resumed.len(), 1);
    let moved_at = resumed[0].committed.len();
    assert!(
        (20..120).contains(&moved_at),
        "moved after {moved_at} tokens"
    );
    let expected_ids: Vec<i32> = expected(&sent)[..moved_at]
        .iter()
        .map(|token| token.token_id)
        .collect();
    assert_eq!(resumed[0].committed, expected_ids);
    assert_eq!(
        resumed[0].numerics,
        Some(first.numerics()),
        "the next cell is told what numbers the tokens came from"
    );

    let Some(Update::Finished {
        usage, metering, ..
    }) = end
    else {
        panic!("expected Finished, got {end:?}");
    };
    assert_eq!(usage.completion_tokens, 120);
    let by_node: Vec<(String, u32)> = metering
        .segments
        .iter()
        .map(|segment| (segment.node.clone(), segment.completion_tokens))
        .collect();
    assert_eq!(
        by_node,
        [
            ("a-car".to_string(), moved_at as u32),
            ("b-car".to_string(), 120 - moved_at as u32)
        ],
        "each cell's attempt, charged for the tokens forwarded from it"
    );
}

#[tokio::test]
async fn cancel_hands_back_what_was_sent_and_reaches_the_cell() {
    let server = NatsServer::start();
    let cell = TestCell::new("a", 4, 0, Duration::from_millis(20));
    let _served = serve(connect(&[&server]).await, cell.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a"]).await;

    let mut admitted = cells
        .submit(generation(vec![3, 4], 1, 1_000))
        .await
        .expect("admitted");
    let mut received = take_tokens(&mut admitted.updates, 5).await.len();
    let metering = cells.cancel(admitted.request).expect("it was running");
    // What was forwarded before the cancel is still in the channel.
    let (rest, end) = collect(&mut admitted.updates).await;
    received += rest.len();
    assert!(end.is_none(), "no end after a cancel: {end:?}");
    assert_eq!(metered_tokens(&metering), received as u32);
    assert_eq!(metering.segments[0].node, "a-car");
    eventually("the cell to see the cancel", || {
        cell.cancelled().len() == 1 && cell.live() == 0
    })
    .await;
    assert_eq!(cells.cancel(admitted.request), None, "cancelled once");
    assert_eq!(cells.in_flight(), 0);
}

#[tokio::test]
async fn a_generation_nobody_listens_to_any_more_is_stopped_on_its_cell() {
    let server = NatsServer::start();
    let cell = TestCell::new("a", 4, 0, Duration::from_millis(20));
    let _served = serve(connect(&[&server]).await, cell.clone()).await;
    // A gateway by hand, so that it can vanish without a cancel, as a
    // killed one does: its inbox goes with it.
    let nats = connect(&[&server]).await;
    let inbox = nats.new_inbox();
    let mut batches = nats.subscribe(inbox.clone()).await.expect("subscribe");
    let body = wire::encode(&SubmitRequest {
        generation: (&generation(vec![3, 4], 1, 4_000)).into(),
        batches_to: inbox,
    })
    .expect("encode");
    let reply = nats
        .request(subjects::submit(&CellId::new("a").unwrap()), body)
        .await
        .expect("the cell answers");
    assert!(matches!(
        wire::decode::<SubmitReply>(&reply.payload),
        Ok(SubmitReply::Admitted { .. })
    ));
    let first: Batch = wire::decode(&batches.next().await.expect("a batch").payload).unwrap();
    assert!(first.end.is_none());
    assert_eq!(cell.live(), 1);

    drop(batches);
    // 4,000 tokens at 20 ms would run for 80 s.
    eventually("the cell to stop the generation nobody hears", || {
        cell.cancelled().len() == 1 && cell.live() == 0
    })
    .await;
}

#[tokio::test]
async fn placement_prefers_the_cell_with_more_free_slots() {
    let server = NatsServer::start();
    let busy = TestCell::new("a", 4, 3, Duration::from_millis(1));
    let free = TestCell::new("b", 4, 1, Duration::from_millis(1));
    let _a = serve(connect(&[&server]).await, busy.clone()).await;
    let _b = serve(connect(&[&server]).await, free.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a", "b"]).await;

    for seed in 0..10 {
        let mut admitted = cells.submit(generation(vec![1, 2], seed, 3)).await.unwrap();
        let (_, end) = collect(&mut admitted.updates).await;
        assert!(matches!(end, Some(Update::Finished { .. })));
    }
    assert_eq!((busy.submitted().len(), free.submitted().len()), (0, 10));
    assert_eq!(cells.capacity().node_names(), ["a-car", "b-car"]);
}

#[tokio::test]
async fn a_gateway_refuses_past_its_bound_of_generations_in_flight() {
    let server = NatsServer::start();
    let cell = TestCell::new("a", 4, 0, Duration::from_secs(1));
    let _served = serve(connect(&[&server]).await, cell.clone()).await;
    let config = bus::CellsConfig {
        generations_max: 1,
        ..cells_config()
    };
    let cells = bus::Cells::connect(connect(&[&server]).await, config)
        .await
        .unwrap();
    eventually("the cell's summary", || cells.cells() == ["a"]).await;
    let running = cells.submit(generation(vec![1], 1, 100)).await.unwrap();
    match cells.submit(generation(vec![1], 2, 100)).await {
        Err(Rejection::QueueFull { .. }) => {}
        Err(other) => panic!("expected QueueFull, got {other:?}"),
        Ok(_) => panic!("admitted past the bound"),
    }
    assert!(cells.cancel(running.request).is_some());
    let _admitted = cells.submit(generation(vec![1], 3, 100)).await.unwrap();
}

#[tokio::test]
async fn an_owner_policy_change_reaches_the_cells() {
    let server = NatsServer::start();
    let cell = TestCell::new("a", 4, 0, Duration::from_millis(1));
    let _served = serve(connect(&[&server]).await, cell.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a"]).await;
    let policy = scheduler::OwnerPolicy {
        allow_unplugged: true,
        max_energy_per_day_wh: Some(1_200),
        ..scheduler::OwnerPolicy::default()
    };
    cells.owner_policy_changed("a-car", policy);
    eventually("the policy at the cell", || {
        cell.policies() == [("a-car".to_string(), policy)]
    })
    .await;
}

/// A 3-server cluster; the gateway and the cell on different servers.
async fn through_a_cluster(kill: usize, gateway_servers: &[usize]) {
    let mut servers = NatsServer::cluster(3);
    wait_for_mesh(&servers).await;
    let cell = TestCell::new("a", 4, 0, Duration::from_millis(10));
    let _served = serve(connect(&[&servers[1]]).await, cell.clone()).await;
    let listed: Vec<&NatsServer> = gateway_servers.iter().map(|at| &servers[*at]).collect();
    let cells = gateway(connect(&listed).await, &["a"]).await;

    let sent = generation(vec![5, 6], 17, 150);
    let mut admitted = cells.submit(sent.clone()).await.expect("admitted");
    let mut tokens = take_tokens(&mut admitted.updates, 20).await;
    servers[kill].kill();
    let (rest, end) = collect(&mut admitted.updates).await;
    tokens.extend(rest);
    assert!(
        same_tokens(&tokens, &expected(&sent)),
        "{:?}",
        tokens
            .iter()
            .map(|token| token.token_id)
            .collect::<Vec<_>>()
    );
    let Some(Update::Finished {
        usage, metering, ..
    }) = end
    else {
        panic!("expected Finished, got {end:?}");
    };
    assert_eq!(usage.completion_tokens, 150);
    assert_eq!(metered_tokens(&metering), 150, "every token charged once");
}

#[tokio::test]
async fn a_cluster_server_neither_side_uses_dies_mid_stream() {
    through_a_cluster(2, &[0]).await;
}

#[tokio::test]
async fn the_gateways_server_dies_mid_stream_and_it_reconnects_to_another() {
    through_a_cluster(0, &[0, 2]).await;
}
