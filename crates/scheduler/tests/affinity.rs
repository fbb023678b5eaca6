//! Prefix affinity: among the free nodes placement accepts, the one whose free KV sequence holds
//! the longest head of the prompt; never a node placement would not accept, never a preemption.

mod common;

use common::*;
use scheduler::{
    ClassSet, Command, Event, NodeId, OwnerPolicy, PromptHeads, RequestId, SchedulerConfig,
    TenantClass, TenantId, VehicleState,
};

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

fn ask(
    h: &mut Harness,
    id: u64,
    tenant: TenantId,
    prompt: &[i32],
    max_tokens: u32,
) -> Vec<Command> {
    h.send(Event::RequestArrived {
        request: RequestId(id),
        tenant,
        model: MODEL,
        prompt_tokens: prompt.len() as u32,
        max_tokens,
        deadline: None,
        prompt_heads: PromptHeads::of(prompt),
        resumes: None,
    })
}

fn finish(h: &mut Harness, id: u64) -> Vec<Command> {
    h.send(Event::RequestFinished {
        request: RequestId(id),
    })
}

/// Nodes 0, 1 and 2 with four slots each, where node 2 (the last choice by id) ran `prompt` and
/// finished it, so that its free sequence holds the prompt's head.
fn fleet_where_node_2_holds(h: &mut Harness, prompt: &[i32]) {
    h.plain_node(2, 4);
    assert_eq!(ask(h, 1, FLEET, prompt, 10), vec![assign(1, 2, 0)]);
    assert_eq!(finish(h, 1), vec![]);
    h.plain_node(0, 4);
    h.plain_node(1, 4);
}

#[test]
fn a_prompt_goes_to_the_free_node_holding_its_head() {
    let mut h = Harness::new();
    let system = system_prompt(300, 1);
    fleet_where_node_2_holds(&mut h, &asking(&system, 1));

    // Without affinity the lowest id would win; node 2 holds four blocks of this prompt.
    assert_eq!(
        ask(&mut h, 2, FLEET, &asking(&system, 2), 10),
        vec![assign(2, 2, 0)]
    );
    // An unrelated prompt, and one too short to have a whole block, follow the usual order.
    let unrelated = asking(&system_prompt(300, 2), 1);
    assert_eq!(ask(&mut h, 3, FLEET, &unrelated, 10), vec![assign(3, 0, 0)]);
    assert_eq!(ask(&mut h, 4, FLEET, &[1, 2, 3], 10), vec![assign(4, 1, 0)]);
}

#[test]
fn a_head_held_only_by_a_busy_sequence_attracts_nothing() {
    let mut h = Harness::new();
    let system = system_prompt(300, 1);
    fleet_where_node_2_holds(&mut h, &asking(&system, 1));
    // The second prompt takes node 2's sequence holding the head and is still running.
    assert_eq!(
        ask(&mut h, 2, FLEET, &asking(&system, 2), 10),
        vec![assign(2, 2, 0)]
    );
    // The engine reuses only a free sequence's cells: nothing to gain on node 2 now.
    assert_eq!(
        ask(&mut h, 3, FLEET, &asking(&system, 3), 10),
        vec![assign(3, 0, 0)]
    );
    // Once both end, node 0 and node 2 hold the head, and the lower id wins the tie.
    finish(&mut h, 2);
    finish(&mut h, 3);
    assert_eq!(
        ask(&mut h, 4, FLEET, &asking(&system, 4), 10),
        vec![assign(4, 0, 0)]
    );
}

#[test]
fn the_longest_held_head_wins() {
    let mut h = Harness::new();
    let system = system_prompt(300, 1);
    let mut longer = system.clone();
    longer.extend(system_prompt(200, 3));
    h.plain_node(0, 4);
    h.plain_node(1, 4);
    // Node 0 holds four blocks of `longer`'s head, node 1 all seven.
    assert_eq!(
        ask(&mut h, 1, FLEET, &asking(&system, 1), 10),
        vec![assign(1, 0, 0)]
    );
    assert_eq!(
        ask(&mut h, 2, FLEET, &asking(&longer, 1), 10),
        vec![assign(2, 1, 0)]
    );
    finish(&mut h, 1);
    finish(&mut h, 2);
    assert_eq!(
        ask(&mut h, 3, FLEET, &asking(&longer, 2), 10),
        vec![assign(3, 1, 0)]
    );
    assert_eq!(
        ask(&mut h, 4, FLEET, &asking(&system, 2), 10),
        vec![assign(4, 0, 0)]
    );
}

#[test]
fn affinity_never_picks_a_node_whose_owner_refuses_the_class_or_that_is_unplugged() {
    let mut h = Harness::new();
    let system = system_prompt(300, 1);
    fleet_where_node_2_holds(&mut h, &asking(&system, 1));
    // The owner of node 2 now refuses spot work.
    h.send(Event::NodePolicyChanged {
        node: NodeId(2),
        policy: OwnerPolicy {
            allowed_classes: ClassSet::ALL.without(TenantClass::Spot),
            ..OwnerPolicy::default()
        },
    });
    assert_eq!(
        ask(&mut h, 2, SPOT, &asking(&system, 2), 10),
        vec![assign(2, 0, 0)]
    );
    // Unplugged, it takes no work at all, whoever holds what.
    h.send(Event::NodeStateChanged {
        node: NodeId(2),
        state: VehicleState {
            plugged_in: false,
            ..VehicleState::default()
        },
    });
    assert_eq!(
        ask(&mut h, 3, FLEET, &asking(&system, 3), 10),
        vec![assign(3, 1, 0)]
    );
}

#[test]
fn affinity_never_preempts_and_never_beats_finishing_before_departure() {
    let mut h = Harness::new();
    let system = system_prompt(300, 1);
    // Node 2 has one slot and holds the head.
    h.send(Event::NodeRegistered {
        node: NodeId(2),
        capacity: capacity(1),
        state: VehicleState::default(),
        policy: OwnerPolicy::default(),
    });
    assert_eq!(
        ask(&mut h, 1, FLEET, &asking(&system, 1), 10),
        vec![assign(1, 2, 0)]
    );
    finish(&mut h, 1);
    h.plain_node(0, 4);
    // Spot work with the same head goes there and fills it.
    assert_eq!(
        ask(&mut h, 2, SPOT, &asking(&system, 2), 10_000),
        vec![assign(2, 2, 0)]
    );
    // Fleet work could preempt the spot work on node 2, but a free node takes it.
    assert_eq!(
        ask(&mut h, 3, FLEET, &asking(&system, 3), 10),
        vec![assign(3, 0, 0)]
    );

    // Node 0 now holds the head too but leaves in 17 minutes: 30,000 tokens do not fit.
    let mut h2 = Harness::new();
    h2.node(
        0,
        capacity(4),
        VehicleState {
            departure_at: Some(h2.now.plus(17 * MINUTE_MS)),
            ..VehicleState::default()
        },
        OwnerPolicy::default(),
    );
    assert_eq!(
        ask(&mut h2, 1, FLEET, &asking(&system, 1), 10),
        vec![assign(1, 0, 0)]
    );
    finish(&mut h2, 1);
    h2.plain_node(1, 4);
    assert_eq!(
        ask(&mut h2, 2, FLEET, &asking(&system, 2), 30_000),
        vec![assign(2, 1, 0)]
    );
    assert_eq!(
        ask(&mut h2, 3, FLEET, &asking(&system, 3), 20),
        vec![assign(3, 0, 0)]
    );
}

#[test]
fn a_lost_node_holds_nothing_when_it_comes_back() {
    let mut h = Harness::new();
    let system = system_prompt(300, 1);
    fleet_where_node_2_holds(&mut h, &asking(&system, 1));
    h.send(Event::NodeLost { node: NodeId(2) });
    h.plain_node(2, 4);
    assert_eq!(
        ask(&mut h, 2, FLEET, &asking(&system, 2), 10),
        vec![assign(2, 0, 0)]
    );
}

#[test]
fn with_affinity_off_placement_ignores_heads() {
    let mut h = Harness::with_config(SchedulerConfig {
        prefix_affinity: false,
        ..SchedulerConfig::default()
    });
    let system = system_prompt(300, 1);
    fleet_where_node_2_holds(&mut h, &asking(&system, 1));
    assert_eq!(
        ask(&mut h, 2, FLEET, &asking(&system, 2), 10),
        vec![assign(2, 0, 0)]
    );
}

/// The same events give the same commands: affinity adds no hidden state or randomness.
#[test]
fn placement_with_affinity_replays_exactly() {
    let run = || {
        let mut h = Harness::new();
        for node in 0..8 {
            h.plain_node(node, 2);
        }
        let systems: Vec<Vec<i32>> = (0..3).map(|salt| system_prompt(200, salt)).collect();
        let mut commands = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for id in 1..400_u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let prompt = asking(&systems[(state % 3) as usize], (state >> 8) as i32 % 50);
            commands.extend(ask(&mut h, id, FLEET, &prompt, 10));
            // Twelve run at once on sixteen slots, so that placement has a choice to make.
            if id > 12 {
                commands.extend(finish(&mut h, id - 12));
            }
        }
        commands
    };
    let first = run();
    assert!(first.len() >= 399, "every request was placed");
    assert_eq!(first, run());
}
