//! The owner comes first: draining before departure, unplugging, owner limits.

mod common;

use common::*;
use scheduler::{Command, Event, NodeId, OwnerPolicy, RequestId, StopReason, VehicleState};

fn stop(request: u64, node: u32, reason: StopReason) -> Command {
    Command::Stop {
        request: RequestId(request),
        node: NodeId(node),
        reason,
    }
}

#[test]
fn departure_window_moves_long_work_keeps_short_work_and_stops_all_before_leaving() {
    let mut h = Harness::new();
    let departure = h.now.plus(HOUR_MS);
    h.node(
        0,
        capacity(2),
        VehicleState {
            departure_at: Some(departure),
            ..Default::default()
        },
        OwnerPolicy::default(),
    );
    h.plain_node(1, 2);
    let long = |h: &mut Harness, id| {
        // 60k tokens at 20 tokens/s, with the 1.5 margin: 75 minutes, longer than node 0 stays.
        let arrival = Event::RequestArrived {
            request: RequestId(id),
            tenant: FLEET,
            model: MODEL,
            prompt_tokens: 1,
            max_tokens: 60_000,
            deadline: None,
            prompt_heads: scheduler::PromptHeads::default(),
            resumes: None,
        };
        h.send(arrival)
    };
    assert_eq!(
        long(&mut h, 1),
        vec![assign(1, 1, 0)],
        "only node 1 stays long enough"
    );
    assert_eq!(
        h.request(2, FLEET, 10),
        vec![assign(2, 0, 0)],
        "short work fits before departure; node 0 is less loaded"
    );
    assert_eq!(long(&mut h, 3), vec![assign(3, 1, 0)]);
    // Only node 0 is free: long work still runs there rather than waiting.
    assert_eq!(long(&mut h, 6), vec![assign(6, 0, 0)]);
    h.send(Event::TokensCommitted {
        request: RequestId(6),
        committed_total: 99,
    });
    // Entering the window (15 min before): the long one moves, the short one stays.
    let out = h.advance(45 * MINUTE_MS);
    assert_eq!(out, vec![stop(6, 0, StopReason::Draining)]);
    assert_eq!(
        h.scheduler.queued(scheduler::TenantClass::Fleet),
        1,
        "parked until a slot frees"
    );
    assert_eq!(h.scheduler.placement_of(RequestId(2)), Some(NodeId(0)));
    // No new work in the window.
    assert!(!h
        .scheduler
        .is_eligible(h.now, NodeId(0), scheduler::TenantClass::Fleet));
    assert_eq!(
        h.send(Event::RequestFinished {
            request: RequestId(3)
        }),
        vec![assign(6, 1, 99)]
    );
    // The hard stop, one minute before departure, stops whatever is still there.
    assert_eq!(
        h.advance(14 * MINUTE_MS),
        vec![stop(2, 0, StopReason::Draining)]
    );
}

#[test]
fn unplugging_moves_work_at_once() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    h.plain_node(1, 1);
    h.request(1, FLEET, 100);
    h.send(Event::TokensCommitted {
        request: RequestId(1),
        committed_total: 5,
    });
    let out = h.send(Event::NodeStateChanged {
        node: NodeId(0),
        state: VehicleState {
            plugged_in: false,
            ..Default::default()
        },
    });
    assert_eq!(out, vec![stop(1, 0, StopReason::Departed), assign(1, 1, 5)]);
}

#[test]
fn owner_limits_stop_work_hours_temperature_and_energy() {
    let mut h = Harness::new();
    // Allowed from 00:00 to 01:00 only (T0 is midnight UTC), at most 10 Wh a day.
    let policy = OwnerPolicy {
        allowed_hours_utc: 1,
        max_energy_per_day_wh: Some(10),
        ..Default::default()
    };
    h.node(0, capacity(1), VehicleState::default(), policy);
    h.request(1, FLEET, 100_000);
    // Too hot: stop; cool again: resume.
    let hot = VehicleState {
        chip_temperature_decicelsius: 900,
        ..Default::default()
    };
    assert_eq!(
        h.send(Event::NodeStateChanged {
            node: NodeId(0),
            state: hot
        }),
        vec![stop(1, 0, StopReason::Draining)]
    );
    assert_eq!(
        h.send(Event::NodeStateChanged {
            node: NodeId(0),
            state: VehicleState::default()
        }),
        vec![assign(1, 0, 0)]
    );
    // Energy cap reached: stop until the next local day.
    assert_eq!(
        h.send(Event::NodeEnergyUsed {
            node: NodeId(0),
            wh: 10
        }),
        vec![stop(1, 0, StopReason::Draining)]
    );
    // The next hour is outside the allowed hours anyway; at midnight the day and the hours restart.
    assert_eq!(h.advance(HOUR_MS), vec![]);
    let until_midnight = 23 * HOUR_MS;
    assert_eq!(h.advance(until_midnight), vec![assign(1, 0, 0)]);
    // At 01:00 the allowed hour ends.
    assert_eq!(h.advance(HOUR_MS), vec![stop(1, 0, StopReason::Draining)]);
}

#[test]
fn unplugged_work_follows_the_battery_thresholds_without_flapping() {
    let mut h = Harness::new();
    let policy = OwnerPolicy {
        allow_unplugged: true,
        unplugged_stop_soc_permille: 400,
        unplugged_resume_soc_permille: 600,
        ..Default::default()
    };
    let unplugged = |soc| VehicleState {
        plugged_in: false,
        state_of_charge_permille: soc,
        ..Default::default()
    };
    h.node(0, capacity(1), unplugged(700), policy);
    assert_eq!(h.request(1, FLEET, 100_000), vec![assign(1, 0, 0)]);
    let soc = |h: &mut Harness, permille| {
        h.send(Event::NodeStateChanged {
            node: NodeId(0),
            state: unplugged(permille),
        })
    };
    assert_eq!(
        soc(&mut h, 500),
        vec![],
        "between the thresholds: keep going"
    );
    assert_eq!(soc(&mut h, 400), vec![stop(1, 0, StopReason::Departed)]);
    assert_eq!(
        soc(&mut h, 500),
        vec![],
        "between the thresholds: stay stopped"
    );
    assert_eq!(soc(&mut h, 600), vec![assign(1, 0, 0)]);
}
