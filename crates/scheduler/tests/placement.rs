//! Placement preferences: time to finish before departure, then model loaded, then load, then
//! electricity price, then node id.

mod common;

use common::*;
use scheduler::{
    Command, Event, NodeCapacity, NodeId, OwnerPolicy, RejectReason, RequestId, VehicleState,
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
