//! Prefix affinity across cells, over a real `nats-server`: a prompt whose
//! head a cell's vehicles hold goes to that cell while it has a free slot.

mod common;

use std::time::Duration;

use cell_api::{Cell, Update};
use common::*;

/// A system prompt of `len` tokens, different for each `salt`.
fn system_prompt(len: i32, salt: i32) -> Vec<i32> {
    (0..len).map(|i| 1_000 + salt * 10_000 + i).collect()
}

/// `system` followed by a question of its own.
fn asking(system: &[i32], question: i32) -> Vec<i32> {
    let mut prompt = system.to_vec();
    prompt.extend([7, 8, question]);
    prompt
}

/// Runs each prompt to its end through `cells`.
async fn run_all(cells: &bus::Cells, prompts: &[Vec<i32>]) {
    for (seed, prompt) in prompts.iter().enumerate() {
        let mut admitted = cells
            .submit(generation(prompt.clone(), seed as u64, 2))
            .await
            .expect("admitted");
        let (_, end) = collect(&mut admitted.updates).await;
        assert!(matches!(end, Some(Update::Finished { .. })), "{end:?}");
    }
}

#[tokio::test]
async fn a_prompt_goes_to_the_cell_holding_its_head_while_it_has_a_free_slot() {
    let server = NatsServer::start();
    // `a` is the freest, so the power of two choices would favour it.
    let freest = TestCell::new("a", 4, 0, Duration::from_millis(1));
    let holder = TestCell::new("b", 4, 3, Duration::from_millis(1));
    let full = TestCell::new("c", 4, 4, Duration::from_millis(1));
    let shared = system_prompt(200, 1);
    holder.hold_prompt_head(&shared);
    // `c` holds another system prompt, and a longer head of the shared one,
    // but has no free slot.
    let other = system_prompt(150, 2);
    full.hold_prompt_head(&other);
    full.hold_prompt_head(&asking(&shared, 1));
    let _a = serve(connect(&[&server]).await, freest.clone()).await;
    let _b = serve(connect(&[&server]).await, holder.clone()).await;
    let _c = serve(connect(&[&server]).await, full.clone()).await;
    let cells = gateway(connect(&[&server]).await, &["a", "b", "c"]).await;

    let sharing: Vec<Vec<i32>> = (10..16).map(|question| asking(&shared, question)).collect();
    run_all(&cells, &sharing).await;
    assert_eq!(
        (
            freest.submitted().len(),
            holder.submitted().len(),
            full.submitted().len()
        ),
        (0, 6, 0),
        "every prompt with the held head went to its holder with a free slot"
    );

    // The only holder of this head is full: the power of two choices decides,
    // which never picks a full cell over a free one.
    let elsewhere: Vec<Vec<i32>> = (20..26).map(|question| asking(&other, question)).collect();
    run_all(&cells, &elsewhere).await;
    assert_eq!(full.submitted().len(), 0);
    assert_eq!(freest.submitted().len() + holder.submitted().len(), 12);
    assert!(!freest.submitted().is_empty(), "the freest cell took some");
}

#[tokio::test]
async fn with_prefix_affinity_off_placement_ignores_held_heads() {
    let server = NatsServer::start();
    let freest = TestCell::new("a", 4, 0, Duration::from_millis(1));
    let holder = TestCell::new("b", 4, 3, Duration::from_millis(1));
    let shared = system_prompt(200, 1);
    holder.hold_prompt_head(&shared);
    let _a = serve(connect(&[&server]).await, freest.clone()).await;
    let _b = serve(connect(&[&server]).await, holder.clone()).await;
    let config = bus::CellsConfig {
        prefix_affinity: false,
        ..cells_config()
    };
    let cells = bus::Cells::connect(connect(&[&server]).await, config)
        .await
        .expect("connect");
    eventually("both cells", || cells.cells() == ["a", "b"]).await;

    let sharing: Vec<Vec<i32>> = (10..16).map(|question| asking(&shared, question)).collect();
    run_all(&cells, &sharing).await;
    // Of two cells, the power of two choices always takes the freer.
    assert_eq!((freest.submitted().len(), holder.submitted().len()), (6, 0));
}
