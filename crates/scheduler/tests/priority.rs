//! Class priority, lending idle capacity and reclaiming it, reserved guarantees.

mod common;

use common::*;
use scheduler::{
    Command, Event, NodeId, RequestId, StopReason, TenantClass, TenantConfig, TenantId,
};

fn stop(request: u64, node: u32, reason: StopReason) -> Command {
    Command::Stop {
        request: RequestId(request),
        node: NodeId(node),
        reason,
    }
}

#[test]
fn idle_capacity_serves_spot_and_fleet_takes_it_back_without_dropping_spot_work() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    assert_eq!(h.request(1, SPOT, 500), vec![assign(1, 0, 0)]);
    h.send(Event::TokensCommitted {
        request: RequestId(1),
        committed_total: 120,
    });
    // Fleet needs the slot: spot is stopped and parked (nowhere else to go).
    assert_eq!(
        h.request(2, FLEET, 100),
        vec![stop(1, 0, StopReason::Preempted), assign(2, 0, 0)]
    );
    assert_eq!(h.scheduler.parked(TenantClass::Spot), 1);
    // Parked spot work goes before new spot work and resumes where it stopped.
    h.request(3, SPOT, 10);
    assert_eq!(
        h.send(Event::RequestFinished {
            request: RequestId(2)
        }),
        vec![assign(1, 0, 120)]
    );
}

#[test]
fn preempted_work_moves_to_a_free_slot_elsewhere_in_the_same_batch() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    h.request(1, SPOT, 500);
    // Node 1 only takes spot work, so the fleet request must reclaim node 0.
    let spot_only = scheduler::OwnerPolicy {
        allowed_classes: scheduler::ClassSet::only(TenantClass::Spot),
        ..Default::default()
    };
    h.node(
        1,
        capacity(1),
        scheduler::VehicleState::default(),
        spot_only,
    );
    let out = h.request(2, FLEET, 100);
    assert_eq!(
        out,
        vec![
            stop(1, 0, StopReason::Preempted),
            assign(2, 0, 0),
            assign(1, 1, 0)
        ]
    );
}

#[test]
fn lowest_class_is_preempted_first_and_equal_class_never() {
    let mut h = Harness::new();
    h.plain_node(0, 2);
    h.request(1, RESERVED, 500);
    h.request(2, SPOT, 500);
    assert_eq!(
        h.request(3, FLEET, 100),
        vec![stop(2, 0, StopReason::Preempted), assign(3, 0, 0)]
    );
    assert_eq!(
        h.request(4, FLEET, 100),
        vec![stop(1, 0, StopReason::Preempted), assign(4, 0, 0)]
    );
    // Fleet never preempts fleet.
    assert_eq!(h.request(5, FLEET, 100), vec![]);
    assert_eq!(h.scheduler.queued(TenantClass::Fleet), 1);
}

#[test]
fn reserved_tenant_keeps_its_guaranteed_share() {
    let mut h = Harness::new();
    let guaranteed = TenantConfig {
        reserved_min_share_permille: 500,
        ..tenant(TenantClass::Reserved)
    };
    h.send(Event::TenantConfigured {
        tenant: RESERVED,
        config: guaranteed,
    });
    h.plain_node(0, 2);
    h.plain_node(1, 2);
    // The fleet fills everything.
    for id in 1..=4 {
        h.request(id, FLEET, 500);
    }
    // Below its guarantee (2 of 4 slots), the reserved tenant takes fleet slots back: the lowest
    // node id first, the latest request there first (requests 1 and 3 went to node 0).
    assert_eq!(
        h.request(10, RESERVED, 100),
        vec![stop(3, 0, StopReason::Preempted), assign(10, 0, 0)]
    );
    assert_eq!(
        h.request(11, RESERVED, 100),
        vec![stop(1, 0, StopReason::Preempted), assign(11, 0, 0)]
    );
    // At its guarantee it waits like any reserved tenant.
    assert_eq!(h.request(12, RESERVED, 100), vec![]);
    // And the fleet cannot take the guaranteed slots back.
    let other_fleet = TenantId(7);
    h.send(Event::TenantConfigured {
        tenant: other_fleet,
        config: tenant(TenantClass::Fleet),
    });
    let out = h.send(Event::RequestArrived {
        request: RequestId(20),
        tenant: other_fleet,
        model: MODEL,
        prompt_tokens: 1,
        max_tokens: 1,
        deadline: None,
        prompt_heads: scheduler::PromptHeads::default(),
        resumes: None,
    });
    assert_eq!(out, vec![]);
}

#[test]
fn tenants_of_a_class_share_by_weight() {
    let mut h = Harness::new();
    let heavy = TenantId(10);
    let light = TenantId(11);
    h.send(Event::TenantConfigured {
        tenant: heavy,
        config: TenantConfig {
            weight: 3,
            ..tenant(TenantClass::Spot)
        },
    });
    h.send(Event::TenantConfigured {
        tenant: light,
        config: TenantConfig {
            weight: 1,
            ..tenant(TenantClass::Spot)
        },
    });
    // Both tenants queue four requests each while no node exists that takes work.
    h.node(
        0,
        capacity(4),
        scheduler::VehicleState {
            plugged_in: false,
            ..Default::default()
        },
        Default::default(),
    );
    for id in 0..8 {
        let tenant = if id < 4 { heavy } else { light };
        h.send(Event::RequestArrived {
            request: RequestId(100 + id),
            tenant,
            model: MODEL,
            prompt_tokens: 1,
            max_tokens: 10,
            deadline: None,
            prompt_heads: scheduler::PromptHeads::default(),
            resumes: None,
        });
    }
    // Plugging in opens four slots; they go three to one by weight.
    let out = h.send(Event::NodeStateChanged {
        node: NodeId(0),
        state: scheduler::VehicleState::default(),
    });
    let heavy_started = out
        .iter()
        .filter(|c| matches!(c, Command::Assign { request, .. } if request.0 < 104))
        .count();
    let light_started = out
        .iter()
        .filter(|c| matches!(c, Command::Assign { request, .. } if request.0 >= 104))
        .count();
    assert_eq!((heavy_started, light_started), (3, 1), "{out:?}");
}
