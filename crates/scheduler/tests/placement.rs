//! Placement preferences: time to finish before departure, then model loaded, then load, then
//! electricity price, then node id.

mod common;

use common::*;
use scheduler::{
    Command, Event, NodeCapacity, NodeId, OwnerPolicy, RejectReason, RequestId, Resume,
    VehicleState, NUMERICS_UNKNOWN,
};

fn node_with(h: &mut Harness, id: u32, change: impl FnOnce(&mut NodeCapacity, &mut VehicleState)) {
    let mut cap = capacity(4);
    let mut state = VehicleState::default();
    change(&mut cap, &mut state);
    h.node(id, cap, state, OwnerPolicy::default());
}

#[test]
fn prefers_a_node_that_stays_long_enough_over_a_loaded_cheaper_one() {
    let mut h = Harness::new();
    // Leaves in 17 minutes and must stop one minute before: 20 tokens at 20 tokens/s (x1.5
    // margin) take 1.5 s, 30,000 take 37.5 minutes.
    let leaving_soon = h.now.plus(17 * MINUTE_MS);
    node_with(&mut h, 0, |cap, state| {
        state.departure_at = Some(leaving_soon);
        cap.energy_price_micro_usd_per_kwh = 1;
    });
    node_with(&mut h, 1, |cap, _| cap.loaded.clear());
    let out = h.request(1, FLEET, 30_000);
    assert_eq!(
        out,
        vec![assign(1, 1, 0)],
        "the long generation goes to the node with no departure"
    );
    let out = h.request(2, FLEET, 20);
    assert_eq!(
        out,
        vec![assign(2, 0, 0)],
        "a short one fits before the departure and the model is loaded there"
    );
}

#[test]
fn prefers_loaded_model_then_less_load_then_cheaper_power_then_lower_id() {
    let mut h = Harness::new();
    node_with(&mut h, 0, |cap, _| cap.loaded.clear());
    node_with(&mut h, 1, |cap, _| {
        cap.energy_price_micro_usd_per_kwh = 300_000
    });
    node_with(&mut h, 2, |cap, _| {
        cap.energy_price_micro_usd_per_kwh = 100_000
    });
    node_with(&mut h, 3, |cap, _| {
        cap.energy_price_micro_usd_per_kwh = 100_000
    });
    // Loaded and cheapest, lowest id among equals.
    assert_eq!(h.request(1, FLEET, 10), vec![assign(1, 2, 0)]);
    // Node 2 now has one slot in use: node 3 (same price, idle) is less loaded.
    assert_eq!(h.request(2, FLEET, 10), vec![assign(2, 3, 0)]);
    // Both cheap nodes busy: the idle loaded node 1 beats them despite its price.
    assert_eq!(h.request(3, FLEET, 10), vec![assign(3, 1, 0)]);
    // All loaded nodes at 1/4: the cheapest, lowest id again; node 0 (not loaded) still last.
    assert_eq!(h.request(4, FLEET, 10), vec![assign(4, 2, 0)]);
}

#[test]
fn node_lacking_the_model_or_excluding_the_class_gets_nothing() {
    let mut h = Harness::new();
    node_with(&mut h, 0, |cap, _| {
        cap.models = vec![OTHER_MODEL];
        cap.loaded.clear();
    });
    let spot_only = OwnerPolicy {
        allowed_classes: scheduler::ClassSet::only(scheduler::TenantClass::Spot),
        ..Default::default()
    };
    h.node(1, capacity(1), VehicleState::default(), spot_only);
    // Nothing connected could ever run fleet work on this model: refused at once.
    let out = h.request(1, FLEET, 10);
    assert!(
        matches!(
            out.as_slice(),
            [Command::Reject {
                reason: RejectReason::NoEligibleNode,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(h.request(2, SPOT, 10), vec![assign(2, 1, 0)]);
    // Once a node that could serve it is connected, fleet requests wait for it instead.
    let unplugged = VehicleState {
        plugged_in: false,
        ..Default::default()
    };
    h.send(Event::NodeRegistered {
        node: NodeId(2),
        capacity: capacity(1),
        state: unplugged,
        policy: OwnerPolicy::default(),
    });
    assert_eq!(h.request(3, FLEET, 10), vec![]);
    assert_eq!(h.scheduler.placement_of(RequestId(3)), None);
    let out = h.send(Event::NodeStateChanged {
        node: NodeId(2),
        state: VehicleState::default(),
    });
    assert_eq!(out, vec![assign(3, 2, 0)]);
}

/// A slot the driver holds for work of its own (a verification check) is not free: a one-slot
/// node holding it takes no request until it is released, then takes the one that waited. A
/// release with nothing held is stale.
#[test]
fn a_held_slot_takes_no_request_until_it_is_released() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    assert!(h.send(Event::NodeSlotHeld { node: NodeId(0) }).is_empty());
    assert!(h.request(1, SPOT, 10).is_empty(), "the request waits");
    assert!(
        h.request(2, FLEET, 10).is_empty(),
        "a held slot is not preempted, even for the fleet"
    );
    assert_eq!(
        h.send(Event::NodeSlotReleased { node: NodeId(0) }),
        vec![assign(2, 0, 0)]
    );
    let stale = h.scheduler.stale_events();
    h.send(Event::NodeSlotReleased { node: NodeId(0) });
    assert_eq!(h.scheduler.stale_events(), stale + 1, "only one was held");
}

/// Unplugs `node`; returns the scheduler's commands.
fn unplug(h: &mut Harness, node: u32) -> Vec<Command> {
    h.send(Event::NodeStateChanged {
        node: NodeId(node),
        state: VehicleState {
            plugged_in: false,
            ..Default::default()
        },
    })
}

/// Request `request` has committed `committed` tokens when `node` is unplugged; returns the
/// scheduler's commands.
fn commit_then_unplug(h: &mut Harness, request: u64, committed: u32, node: u32) -> Vec<Command> {
    h.send(Event::TokensCommitted {
        request: RequestId(request),
        committed_total: committed,
    });
    unplug(h, node)
}

/// Nodes 0, 1, … with 4 slots, each at its (electricity price, numerics).
fn nodes_of_numerics(h: &mut Harness, nodes: &[(u32, u32)]) {
    for (id, &(price, numerics)) in nodes.iter().enumerate() {
        node_with(h, id as u32, |cap, _| {
            cap.energy_price_micro_usd_per_kwh = price;
            cap.numerics = numerics;
        });
    }
}

/// Where an assign command sends its request, and from which token.
fn assigned(out: &[Command], request: u64) -> Option<(NodeId, u32)> {
    out.iter().find_map(|command| match command {
        Command::Assign {
            request: id,
            node,
            resume_from,
        } if *id == RequestId(request) => Some((*node, *resume_from)),
        _ => None,
    })
}

#[test]
fn moved_work_goes_to_a_node_of_the_numerics_it_started_on_and_new_work_anywhere() {
    let mut h = Harness::new();
    // Nodes 0 and 2 run one engine build, node 1 another; node 1 is the cheaper of the two that
    // are left once node 0 has gone.
    nodes_of_numerics(&mut h, &[(100_000, 7), (200_000, 9), (300_000, 7)]);
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    let out = commit_then_unplug(&mut h, 1, 40, 0);
    assert_eq!(
        assigned(&out, 1),
        Some((NodeId(2), 40)),
        "its committed tokens continue on the dearer node of its own numerics: {out:?}"
    );
    assert_eq!(
        h.request(2, FLEET, 100),
        vec![assign(2, 1, 0)],
        "a new request takes the cheapest node, whatever its numerics"
    );
}

#[test]
fn moved_work_continues_on_other_numerics_rather_than_wait_and_then_follows_them() {
    let mut h = Harness::new();
    let node = |h: &mut Harness, id: u32, numerics: u32| {
        node_with(h, id, |cap, _| {
            cap.numerics = numerics;
            cap.slots = 1;
        })
    };
    node(&mut h, 0, 7);
    node(&mut h, 1, 9);
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    let out = commit_then_unplug(&mut h, 1, 40, 0);
    assert_eq!(
        assigned(&out, 1),
        Some((NodeId(1), 40)),
        "no node of its numerics is left: it continues on the other build: {out:?}"
    );
    // Its tokens now come from node 1's build, and so would its KV checkpoint: the next move
    // follows that build, not the one it began on.
    node(&mut h, 2, 7);
    node(&mut h, 3, 9);
    let out = commit_then_unplug(&mut h, 1, 60, 1);
    assert_eq!(assigned(&out, 1), Some((NodeId(3), 60)), "{out:?}");
}

#[test]
fn work_moved_before_its_first_token_starts_afresh_anywhere_and_is_held_to_its_new_node() {
    let mut h = Harness::new();
    nodes_of_numerics(
        &mut h,
        &[(100_000, 7), (200_000, 9), (300_000, 7), (400_000, 9)],
    );
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    // Nothing committed on node 0: it starts again on the cheapest node, of the other build.
    let out = unplug(&mut h, 0);
    assert_eq!(assigned(&out, 1), Some((NodeId(1), 0)), "{out:?}");
    // Now it has tokens from node 1's build: node 3 continues them, not the cheaper node 2.
    let out = commit_then_unplug(&mut h, 1, 3, 1);
    assert_eq!(assigned(&out, 1), Some((NodeId(3), 3)), "{out:?}");
}

/// Request `id` arriving with `committed` tokens from a lost cell's node of `numerics`.
fn arrives_resuming(h: &mut Harness, id: u64, committed: u32, numerics: u32) -> Vec<Command> {
    h.send(Event::RequestArrived {
        request: RequestId(id),
        tenant: FLEET,
        model: MODEL,
        prompt_tokens: 10,
        max_tokens: 100,
        deadline: None,
        prompt_heads: scheduler::PromptHeads::default(),
        resumes: Some(Resume {
            committed,
            numerics,
        }),
    })
}

#[test]
fn work_moved_from_another_cell_is_first_placed_on_a_node_of_its_numerics() {
    let mut h = Harness::new();
    nodes_of_numerics(&mut h, &[(100_000, 7), (200_000, 9)]);
    assert_eq!(
        arrives_resuming(&mut h, 1, 40, 9),
        vec![assign(1, 1, 40)],
        "its tokens came from a node of numerics 9: the dearer node continues them bit for bit"
    );
    assert_eq!(
        arrives_resuming(&mut h, 2, 40, NUMERICS_UNKNOWN),
        vec![assign(2, 0, 40)],
        "from numerics no node here has: the usual preference, the cheaper node"
    );
}

#[test]
fn nodes_of_unknown_numerics_are_alike_to_none_not_to_each_other() {
    let mut h = Harness::new();
    // Nodes 0 and 2 share the driver's overflow id; node 1 is of known numerics and cheaper
    // than node 2.
    nodes_of_numerics(
        &mut h,
        &[
            (100_000, NUMERICS_UNKNOWN),
            (200_000, 9),
            (300_000, NUMERICS_UNKNOWN),
        ],
    );
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    let out = commit_then_unplug(&mut h, 1, 40, 0);
    assert_eq!(
        assigned(&out, 1),
        Some((NodeId(1), 40)),
        "a shared unknown id promises no bit-for-bit continuation: the usual preference, \
         the cheaper node: {out:?}"
    );
}
