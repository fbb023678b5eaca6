//! The basic life of requests: placed, queued, rejected, moved when a node is lost.

mod common;

use common::*;
use scheduler::{
    Command, Event, NodeId, RejectReason, RequestId, SchedulerConfig, StopReason, TenantClass,
};

#[test]
fn request_runs_on_a_plugged_in_node_with_a_free_slot() {
    let mut h = Harness::new();
    h.plain_node(0, 2);
    assert_eq!(h.request(1, FLEET, 100), vec![assign(1, 0, 0)]);
    assert_eq!(h.scheduler.placement_of(RequestId(1)), Some(NodeId(0)));
    assert_eq!(
        h.scheduler.running_on(NodeId(0)).collect::<Vec<_>>(),
        vec![RequestId(1)]
    );
}

#[test]
fn request_waits_when_all_slots_are_busy_and_starts_when_one_frees() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    h.request(1, FLEET, 100);
    assert_eq!(h.request(2, FLEET, 100), vec![]);
    assert_eq!(h.scheduler.queued(TenantClass::Fleet), 1);
    assert_eq!(
        h.send(Event::RequestFinished {
            request: RequestId(1)
        }),
        vec![assign(2, 0, 0)]
    );
    assert_eq!(h.scheduler.queued(TenantClass::Fleet), 0);
}

#[test]
fn full_queue_rejects_with_retry_after() {
    let config = SchedulerConfig {
        queue_max_per_class: [1, 1, 1],
        ..Default::default()
    };
    let mut h = Harness::with_config(config);
    h.plain_node(0, 1);
    h.request(1, FLEET, 100);
    assert_eq!(h.request(2, FLEET, 100), vec![]);
    let refused = h.request(3, FLEET, 100);
    assert_eq!(
        refused,
        vec![Command::Reject {
            request: RequestId(3),
            reason: RejectReason::QueueFull,
            retry_after_ms: Some(1_000)
        }]
    );
}

#[test]
fn request_for_a_model_no_node_has_is_rejected_at_once() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    let out = h.send(Event::RequestArrived {
        request: RequestId(1),
        tenant: FLEET,
        model: OTHER_MODEL,
        prompt_tokens: 1,
        max_tokens: 1,
        deadline: None,
        prompt_heads: scheduler::PromptHeads::default(),
        resumes: None,
    });
    assert!(matches!(
        out.as_slice(),
        [Command::Reject {
            reason: RejectReason::NoEligibleNode,
            retry_after_ms: Some(_),
            ..
        }]
    ));
}

#[test]
fn lost_node_work_resumes_elsewhere_from_the_committed_token() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    h.request(1, FLEET, 100);
    h.plain_node(1, 1);
    h.send(Event::TokensCommitted {
        request: RequestId(1),
        committed_total: 37,
    });
    let out = h.send(Event::NodeLost { node: NodeId(0) });
    assert_eq!(
        out,
        vec![
            Command::Stop {
                request: RequestId(1),
                node: NodeId(0),
                reason: StopReason::NodeLost
            },
            assign(1, 1, 37),
        ]
    );
    assert_eq!(h.scheduler.node_count(), 1);
}
