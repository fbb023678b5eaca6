//! Admission: tenant quotas, unknown tenants, deadlines.

mod common;

use common::*;
use scheduler::{Command, Event, RejectReason, RequestId, TenantClass, TenantConfig, TenantId};

fn rejected(out: &[Command]) -> Option<(RejectReason, Option<u64>)> {
    match out {
        [Command::Reject {
            reason,
            retry_after_ms,
            ..
        }] => Some((*reason, *retry_after_ms)),
        _ => None,
    }
}

#[test]
fn over_concurrency_is_refused_until_a_request_ends() {
    let mut h = Harness::new();
    h.send(Event::TenantConfigured {
        tenant: SPOT,
        config: TenantConfig {
            max_concurrency: 2,
            ..tenant(TenantClass::Spot)
        },
    });
    h.plain_node(0, 1);
    h.request(1, SPOT, 10);
    h.request(2, SPOT, 10); // queued: counts as in flight too
    assert_eq!(
        rejected(&h.request(3, SPOT, 10)),
        Some((RejectReason::OverConcurrency, Some(1_000)))
    );
    h.send(Event::RequestCancelled {
        request: RequestId(2),
    });
    assert_eq!(rejected(&h.request(4, SPOT, 10)), None);
}

#[test]
fn tokens_per_minute_refuse_with_retry_after_until_the_minute_ends() {
    let mut h = Harness::new();
    h.send(Event::TenantConfigured {
        tenant: SPOT,
        config: TenantConfig {
            tokens_per_minute: Some(250),
            ..tenant(TenantClass::Spot)
        },
    });
    h.plain_node(0, 4);
    h.now = h.now.plus(15_000);
    // Each request costs 10 prompt + 100 max tokens.
    assert_eq!(rejected(&h.request(1, SPOT, 100)), None);
    assert_eq!(rejected(&h.request(2, SPOT, 100)), None);
    assert_eq!(
        rejected(&h.request(3, SPOT, 100)),
        Some((RejectReason::OverTokensPerMinute, Some(45_000)))
    );
    h.advance(45_000);
    assert_eq!(rejected(&h.request(4, SPOT, 100)), None);
}

#[test]
fn unknown_tenant_is_refused_without_retry() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    assert_eq!(
        rejected(&h.request(1, TenantId(42), 10)),
        Some((RejectReason::UnknownTenant, None))
    );
}

#[test]
fn waiting_request_past_its_deadline_is_rejected_on_tick() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    h.request(1, FLEET, 10);
    let deadline = Some(h.now.plus(5_000));
    let arrival = Event::RequestArrived {
        request: RequestId(2),
        tenant: SPOT,
        model: MODEL,
        prompt_tokens: 1,
        max_tokens: 1,
        deadline,
        prompt_heads: scheduler::PromptHeads::default(),
        resumes: None,
    };
    assert_eq!(h.send(arrival), vec![]);
    assert_eq!(h.advance(4_999), vec![]);
    assert_eq!(
        rejected(&h.advance(1)),
        Some((RejectReason::DeadlineExpired, None))
    );
    assert_eq!(h.scheduler.queued(TenantClass::Spot), 0);
    // Its quota is released.
    assert_eq!(h.scheduler.in_flight(), 1);
}

#[test]
fn waiting_for_a_model_whose_last_node_was_lost_ends_after_the_grace_period() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    h.request(1, FLEET, 10);
    h.request(2, FLEET, 10);
    h.send(Event::NodeLost {
        node: scheduler::NodeId(0),
    });
    assert_eq!(
        h.scheduler.queued(TenantClass::Fleet),
        2,
        "both wait for the node to come back"
    );
    assert_eq!(h.advance(1_000), vec![]);
    let out = h.advance(h.scheduler.config().no_node_grace_ms);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out.iter().all(|c| matches!(
        c,
        Command::Reject {
            reason: RejectReason::NoEligibleNode,
            retry_after_ms: Some(_),
            ..
        }
    )));
}

#[test]
fn work_that_started_by_its_deadline_is_not_refused_for_it_when_moved() {
    let mut h = Harness::new();
    h.plain_node(0, 1);
    let arrival = Event::RequestArrived {
        request: RequestId(1),
        tenant: SPOT,
        model: MODEL,
        prompt_tokens: 1,
        max_tokens: 10,
        deadline: Some(h.now.plus(5_000)),
        prompt_heads: scheduler::PromptHeads::default(),
        resumes: None,
    };
    assert_eq!(h.send(arrival), vec![assign(1, 0, 0)]);
    h.plain_node(1, 1);
    assert_eq!(h.request(2, FLEET, 10), vec![assign(2, 1, 0)]);
    h.advance(10_000);
    h.send(Event::TokensCommitted {
        request: RequestId(1),
        committed_total: 3,
    });
    // Its car is lost past the deadline: the answer it began waits for a slot, and is not
    // refused for a deadline it met.
    assert_eq!(
        h.send(Event::NodeLost {
            node: scheduler::NodeId(0)
        }),
        vec![Command::Stop {
            request: RequestId(1),
            node: scheduler::NodeId(0),
            reason: scheduler::StopReason::NodeLost,
        }]
    );
    assert_eq!(h.advance(1_000), vec![]);
    assert_eq!(h.scheduler.queued(TenantClass::Spot), 1);
    assert_eq!(
        h.send(Event::RequestFinished {
            request: RequestId(2)
        }),
        vec![assign(1, 1, 3)]
    );
}
