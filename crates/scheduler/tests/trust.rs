//! Nodes are not believed: claimed slots are capped by completed work, a claimed decode speed
//! by the pace delivered, and a generation that makes no progress within its node's stall bound
//! moves, counting against the node.

mod common;

use common::*;
use scheduler::{
    Command, Event, NodeId, OwnerPolicy, RejectReason, RequestId, SchedulerConfig, StopReason,
    TenantClass, TrustConfig, VehicleState,
};

const FLOOR_MS: u64 = 1_000;
const CEILING_MS: u64 = 5_000;
const PREFILL_TOKENS_PER_SECOND: u32 = 10;
/// The bound of an attempt's first token: the ceiling, plus the harness's 10-token prompt at the
/// prefill pace.
const FIRST_TOKEN_MS: u64 = CEILING_MS + 10 * 1000 / PREFILL_TOKENS_PER_SECOND as u64;

fn trusting_little() -> Harness {
    Harness::with_config(SchedulerConfig {
        trust: Some(TrustConfig {
            unproven_slots_max: 2,
            completed_per_slot: 1,
            stalls_max: 2,
            stall_floor_ms: FLOOR_MS,
            stall_ceiling_ms: CEILING_MS,
            stall_prefill_tokens_per_second: PREFILL_TOKENS_PER_SECOND,
            stall_interval_multiple: 10,
            unproven_decode_tokens_per_second: 20,
        }),
        ..Default::default()
    })
}

fn stop(request: u64, node: u32, reason: StopReason) -> Command {
    Command::Stop {
        request: RequestId(request),
        node: NodeId(node),
        reason,
    }
}

fn tokens(h: &mut Harness, request: u64, committed_total: u32) -> Vec<Command> {
    h.send(Event::TokensCommitted {
        request: RequestId(request),
        committed_total,
    })
}

#[test]
fn a_new_node_gets_few_slots_whatever_it_claims_and_earns_more_by_finishing() {
    let mut h = trusting_little();
    h.plain_node(0, 64);
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    assert_eq!(h.request(2, FLEET, 100), vec![assign(2, 0, 0)]);
    assert_eq!(h.request(3, FLEET, 100), vec![]);
    assert_eq!(h.request(4, FLEET, 100), vec![]);
    assert_eq!(h.scheduler.queued(TenantClass::Fleet), 2);
    // One completed generation earns one slot: two free now.
    let finished = h.send(Event::RequestFinished {
        request: RequestId(1),
    });
    assert_eq!(finished, vec![assign(3, 0, 0), assign(4, 0, 0)]);
}

#[test]
fn a_node_claiming_many_slots_gets_only_its_capped_share() {
    let mut h = trusting_little();
    h.plain_node(0, 64);
    h.plain_node(1, 1);
    let mut placed = Vec::new();
    for request in 1..=8 {
        for command in h.request(request, FLEET, 100) {
            if let Command::Assign { node, .. } = command {
                placed.push(node);
            }
        }
    }
    let on_claimer = placed.iter().filter(|node| **node == NodeId(0)).count();
    assert_eq!(on_claimer, 2, "placed: {placed:?}");
    assert_eq!(placed.len(), 3);
}

#[test]
fn the_simulator_default_believes_claims() {
    let mut h = Harness::new();
    h.plain_node(0, 64);
    for request in 1..=8 {
        assert_eq!(h.request(request, FLEET, 100), vec![assign(request, 0, 0)]);
    }
    assert!(h.advance(10 * 60_000).is_empty(), "no stall detection");
}

#[test]
fn a_generation_without_tokens_moves_after_the_conservative_bound() {
    let mut h = trusting_little();
    h.plain_node(0, 4);
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    h.plain_node(1, 1);
    // The first token of an attempt may take the ceiling and its prompt's prefill.
    assert_eq!(h.advance(FIRST_TOKEN_MS), vec![]);
    assert_eq!(
        h.advance(1),
        vec![stop(1, 0, StopReason::Stalled), assign(1, 1, 0)]
    );
}

#[test]
fn the_bound_between_tokens_follows_the_measured_pace() {
    let mut h = trusting_little();
    h.plain_node(0, 4);
    h.request(1, FLEET, 1_000);
    h.plain_node(1, 1);
    h.advance(500);
    tokens(&mut h, 1, 1);
    // 100 ms per token measured: 10 x 100 ms = 1 s, the floor.
    for step in 1..=5 {
        h.advance(500);
        assert_eq!(tokens(&mut h, 1, 1 + 5 * step), vec![]);
    }
    assert_eq!(h.advance(FLOOR_MS), vec![]);
    assert_eq!(
        h.advance(1),
        vec![stop(1, 0, StopReason::Stalled), assign(1, 1, 26)]
    );
}

#[test]
fn a_stall_counts_against_the_node_and_repeated_stalls_take_it_out_of_placement() {
    let mut h = trusting_little();
    h.plain_node(0, 4);
    h.request(1, FLEET, 100);
    h.request(2, FLEET, 100);
    assert_eq!(h.scheduler.placement_of(RequestId(2)), Some(NodeId(0)));
    h.plain_node(1, 1);
    // Both stall at once: two stalls, the node's limit. One moves to the free node, the other
    // waits rather than going back to the node that stalled it.
    let moved = h.advance(FIRST_TOKEN_MS + 1);
    assert_eq!(
        moved,
        vec![
            stop(1, 0, StopReason::Stalled),
            assign(1, 1, 0),
            stop(2, 0, StopReason::Stalled),
        ]
    );
    assert_eq!(h.scheduler.queued(TenantClass::Fleet), 1);
    // The node that stalled twice gets nothing new, though it has free slots.
    assert_eq!(h.request(3, FLEET, 100), vec![]);
    assert_eq!(
        h.send(Event::RequestFinished {
            request: RequestId(1)
        }),
        vec![assign(2, 1, 0)]
    );
}

#[test]
fn a_stall_record_survives_reconnecting() {
    let mut h = trusting_little();
    h.plain_node(0, 4);
    h.request(1, FLEET, 100);
    h.request(2, FLEET, 100);
    h.advance(FIRST_TOKEN_MS + 1);
    h.send(Event::NodeLost { node: NodeId(0) });
    h.plain_node(0, 4);
    assert_eq!(h.scheduler.placement_of(RequestId(1)), None);
    // Back with its record, it still may not serve: nothing can, so a new request is refused.
    assert!(refused_for_want_of_a_node(&h.request(3, FLEET, 100), 3));
}

#[test]
fn work_only_a_node_out_of_placement_could_serve_is_refused_not_left_waiting() {
    let mut h = trusting_little();
    h.plain_node(0, 4);
    h.request(1, FLEET, 100);
    h.request(2, FLEET, 100);
    // Both stall: the node's limit. It stays connected, but no other node can take its work.
    assert_eq!(
        h.advance(FIRST_TOKEN_MS + 1),
        vec![
            stop(1, 0, StopReason::Stalled),
            stop(2, 0, StopReason::Stalled),
        ]
    );
    assert!(refused_for_want_of_a_node(&h.request(3, FLEET, 100), 3));
    // The moved work waits the grace a node gets to appear, then is refused with a retry time.
    let grace = SchedulerConfig::default().no_node_grace_ms;
    assert_eq!(h.advance(1), vec![]);
    assert_eq!(h.advance(grace - 1), vec![]);
    let refused = h.advance(1);
    assert_eq!(refused.len(), 2);
    assert!(refused_for_want_of_a_node(&refused[..1], 1));
    assert!(refused_for_want_of_a_node(&refused[1..], 2));
    assert_eq!(h.scheduler.queued(TenantClass::Fleet), 0);
}

/// Whether `commands` is one refusal of `request` because no node could serve it, with a time to
/// retry.
fn refused_for_want_of_a_node(commands: &[Command], request: u64) -> bool {
    matches!(
        commands,
        [Command::Reject {
            request: refused,
            reason: RejectReason::NoEligibleNode,
            retry_after_ms: Some(_),
        }] if *refused == RequestId(request)
    )
}

#[test]
fn a_car_about_to_leave_is_believed_only_as_fast_as_it_has_delivered() {
    let mut h = trusting_little();
    // Node 0 claims 5,000 tokens/s and is otherwise preferred (cheaper, model loaded), but
    // leaves in 17 minutes: new work for 2 more minutes, all of it done a minute before.
    let mut claims = capacity(4);
    claims.decode_tokens_per_second = 5_000.0;
    claims.energy_price_micro_usd_per_kwh = 1;
    let leaving = VehicleState {
        departure_at: Some(h.now.plus(17 * MINUTE_MS)),
        ..Default::default()
    };
    h.node(0, claims, leaving, OwnerPolicy::default());
    let mut staying = capacity(4);
    staying.loaded.clear();
    h.node(1, staying, VehicleState::default(), OwnerPolicy::default());
    assert_eq!(h.request(2, FLEET, 20), vec![assign(2, 0, 0)]);
    // 30,000 tokens take 9 s at the 5,000 tokens/s it claims, but 37.5 minutes at the 20
    // believed of a node that has delivered nothing: they go to the car that stays.
    assert_eq!(h.request(1, FLEET, 30_000), vec![assign(1, 1, 0)]);
    // It delivers 5 tokens in 10 ms after the first (500 tokens/s): 30,000 take 90 s.
    h.advance(100);
    tokens(&mut h, 2, 1);
    h.advance(10);
    tokens(&mut h, 2, 6);
    h.send(Event::RequestFinished {
        request: RequestId(2),
    });
    assert_eq!(h.request(3, FLEET, 30_000), vec![assign(3, 0, 0)]);
}
