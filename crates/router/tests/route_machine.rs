//! Every path of a routed request through `RouteMachine`, without a model or
//! a network: each test feeds the events a driver would see and asserts the
//! actions, which are what the client sees (announcements, text, the end)
//! and what is booked (edge attempts served, partly served or discarded, the
//! cloud's usage, settlement).

mod common;

use common::*;
use router::machine::reason;
use router::{Action, Budget, CloudPrompt, EdgeText, Event, Failure, Target, Tier};

#[test]
fn a_prompt_pre_routed_to_the_edge_is_served_by_the_fleet_as_it_comes() {
    let mut machine = machine(Target::Auto);
    assert_eq!(machine.start(), vec![Action::PreRoute]);
    assert_eq!(
        machine.handle(Event::PreRouted(decision_edge())),
        vec![start_edge()]
    );
    assert_eq!(machine.handle(edge_started()), vec![]);
    assert_eq!(
        machine.handle(token(1, "Hel", SURE)),
        vec![
            announce(Tier::Fleet, reason::PRE_ROUTE_EDGE, "edge: small talk"),
            release("Hel"),
        ]
    );
    assert_eq!(machine.handle(token(2, "lo", SURE)), vec![release("lo")]);
    assert_eq!(
        machine.handle(finished_with("!")),
        vec![
            release("!"),
            Action::StopEdge(EdgeText::Served),
            finish_fleet(
                reason::PRE_ROUTE_EDGE,
                "edge: small talk",
                "stop",
                edge_part(2, 0)
            ),
        ]
    );
    assert!(machine.is_done());
    // A client gone while the end is sent is settled as cancelled, once.
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![Action::SettleCancelled]
    );
    assert_eq!(machine.handle(Event::ClientGone), vec![]);
}

#[test]
fn a_stop_sequence_ends_the_fleet_answer_with_stop_even_at_its_length() {
    let mut machine = edge_answering(Target::Auto);
    machine.handle(token(1, "a", SURE));
    let actions = machine.handle(Event::EdgeFinished {
        end: router::EdgeEnd::Length,
        stop_sequence: true,
        rest: String::new(),
    });
    let Some(Action::Finish(outcome)) = actions.last() else {
        panic!("{actions:?}");
    };
    assert_eq!(outcome.finish_reason, "stop");
}

#[test]
fn when_no_vehicle_can_take_it_the_cloud_answers() {
    let mut machine = machine(Target::Auto);
    machine.start();
    machine.handle(Event::PreRouted(decision_edge()));
    assert_eq!(
        machine.handle(edge_unavailable()),
        vec![Action::CheckBudget]
    );
    assert_eq!(
        machine.handle(Event::Budget(Budget::Allows)),
        vec![Action::ReserveCloud]
    );
    assert_eq!(
        machine.handle(slot(true)),
        vec![start_cloud_whole(MAX_TOKENS)]
    );
    assert_eq!(machine.handle(Event::CloudStarted), vec![]);
    let why = "edge: small talk; but no vehicle can serve the model";
    assert_eq!(
        machine.handle(chunk("Hi")),
        vec![
            announce(Tier::Cloud, reason::EDGE_UNAVAILABLE, why),
            release("Hi")
        ]
    );
    assert_eq!(machine.handle(chunk_with_usage("", 12, 3)), vec![]);
    assert_eq!(
        machine.handle(Event::CloudFinished),
        vec![finish_cloud(
            Tier::Cloud,
            reason::EDGE_UNAVAILABLE,
            why,
            None,
            usage(12, 3)
        )]
    );
}

#[test]
fn when_no_vehicle_can_take_it_and_the_budget_is_spent_the_request_fails() {
    let mut machine = machine(Target::Auto);
    machine.start();
    machine.handle(Event::PreRouted(decision_edge()));
    machine.handle(edge_unavailable());
    assert_eq!(
        machine.handle(spent()),
        vec![Action::Fail(Failure::EdgeUnavailable)]
    );
}

#[test]
fn when_the_cloud_is_down_the_fleet_answers() {
    let mut machine = cloud_called(Target::Auto, decision_cloud());
    let why = "cloud: long prompt; the cloud model could not be reached, so the fleet answered";
    assert_eq!(
        machine.handle(cloud_failed("the cloud model could not be reached")),
        vec![start_edge()]
    );
    machine.handle(edge_started());
    assert_eq!(
        machine.handle(token(1, "ok", SURE)),
        vec![
            announce(Tier::Fleet, reason::CLOUD_UNAVAILABLE, why),
            release("ok")
        ]
    );
    assert_eq!(
        machine.handle(finished()),
        vec![
            Action::StopEdge(EdgeText::Served),
            finish_fleet(reason::CLOUD_UNAVAILABLE, why, "stop", edge_part(1, 0)),
        ]
    );
}

#[test]
fn when_the_cloud_is_at_its_limit_auto_is_served_by_the_fleet() {
    let mut machine = machine(Target::Auto);
    machine.start();
    machine.handle(Event::PreRouted(decision_cloud()));
    machine.handle(Event::Budget(Budget::Allows));
    assert_eq!(machine.handle(slot(false)), vec![start_edge()]);
    machine.handle(edge_started());
    let actions = machine.handle(token(1, "x", SURE));
    assert_eq!(
        actions[0],
        announce(
            Tier::Fleet,
            reason::CLOUD_UNAVAILABLE,
            "cloud: long prompt; the cloud model is at its concurrency limit, so the fleet answered"
        )
    );
}

#[test]
fn an_explicit_cloud_request_is_answered_by_the_cloud() {
    let mut machine = cloud_called(
        Target::Cloud {
            fleet_fallback: true,
        },
        decision_cloud(),
    );
    let why = "the request named cloud/big";
    assert_eq!(
        machine.handle(Event::CloudChunk {
            text: "Yes".into(),
            finish_reason: Some("length".into()),
            usage: None,
        }),
        vec![
            announce(Tier::Cloud, reason::EXPLICIT_CLOUD, why),
            release("Yes")
        ]
    );
    // No usage reported: the prompt by the gateway's count, a token a chunk.
    assert_eq!(
        machine.handle(Event::CloudFinished),
        vec![Action::Finish(router::Outcome {
            tier: Tier::Cloud,
            reason: reason_of(reason::EXPLICIT_CLOUD, why),
            finish_reason: "length",
            edge: None,
            cloud: Some(usage(PROMPT_TOKENS, 1)),
        })]
    );
}

#[test]
fn an_explicit_cloud_request_falls_back_to_the_fleet_when_the_cloud_fails() {
    let mut machine = cloud_called(
        Target::Cloud {
            fleet_fallback: true,
        },
        decision_cloud(),
    );
    assert_eq!(
        machine.handle(cloud_failed("the cloud model did not answer")),
        vec![start_edge()]
    );
    machine.handle(edge_started());
    assert_eq!(
        machine.handle(token(1, "x", SURE))[0],
        announce(
            Tier::Fleet,
            reason::CLOUD_FALLBACK,
            "the cloud model did not answer; the fleet answered"
        )
    );
}

#[test]
fn an_explicit_cloud_request_at_the_limit_falls_back_or_is_refused() {
    let mut fallback = machine(Target::Cloud {
        fleet_fallback: true,
    });
    assert_eq!(fallback.start(), vec![Action::CheckBudget]);
    assert_eq!(
        fallback.handle(Event::Budget(Budget::Allows)),
        vec![Action::ReserveCloud]
    );
    assert_eq!(fallback.handle(slot(false)), vec![start_edge()]);
    fallback.handle(edge_started());
    assert_eq!(
        fallback.handle(token(1, "x", SURE))[0],
        announce(
            Tier::Fleet,
            reason::CLOUD_FALLBACK,
            "the cloud model is at its concurrency limit; the fleet answered"
        )
    );

    let mut no_fallback = machine(Target::Cloud {
        fleet_fallback: false,
    });
    no_fallback.start();
    no_fallback.handle(Event::Budget(Budget::Allows));
    assert_eq!(
        no_fallback.handle(slot(false)),
        vec![Action::Fail(Failure::CloudBusy)]
    );
}

#[test]
fn an_explicit_cloud_request_fails_when_the_fleet_may_not_or_cannot_answer() {
    let mut no_fallback = cloud_called(
        Target::Cloud {
            fleet_fallback: false,
        },
        decision_cloud(),
    );
    assert_eq!(
        no_fallback.handle(cloud_failed("down")),
        vec![Action::Fail(Failure::Cloud)]
    );
    // A request the upstream refused is the client's error, not the cloud's.
    let mut refused = cloud_called(
        Target::Cloud {
            fleet_fallback: true,
        },
        decision_cloud(),
    );
    assert_eq!(
        refused.handle(Event::CloudFailed {
            detail: "400".into(),
            fleet_could_serve: false,
        }),
        vec![Action::Fail(Failure::Cloud)]
    );
    // After text, nothing is taken back: the request fails.
    let mut after_text = cloud_called(
        Target::Cloud {
            fleet_fallback: true,
        },
        decision_cloud(),
    );
    after_text.handle(chunk("par"));
    assert_eq!(
        after_text.handle(cloud_failed("reset")),
        vec![Action::Fail(Failure::Cloud)]
    );
}

#[test]
fn a_spent_budget_refuses_an_explicit_cloud_request_and_sends_auto_to_the_fleet() {
    let mut explicit = machine(Target::Cloud {
        fleet_fallback: true,
    });
    explicit.start();
    assert_eq!(
        explicit.handle(spent()),
        vec![Action::Fail(Failure::BudgetSpent)]
    );

    let mut auto = machine(Target::Auto);
    auto.start();
    assert_eq!(
        auto.handle(Event::PreRouted(decision_cascade())),
        vec![Action::CheckBudget]
    );
    assert_eq!(auto.handle(spent()), vec![start_edge()]);
    auto.handle(edge_started());
    // Served unjudged: even an unsure token is released at once.
    assert_eq!(
        auto.handle(token(1, "x", UNSURE)),
        vec![
            announce(
                Tier::Fleet,
                reason::BUDGET_EXHAUSTED,
                "the tenant's cloud budget is spent ($1.00 of $1.00); the fleet answered instead (cascade: math)"
            ),
            release("x")
        ]
    );
}

#[test]
fn a_cascade_whose_vehicle_is_unavailable_goes_to_the_cloud_without_a_second_budget_check() {
    let mut machine = machine(Target::Auto);
    machine.start();
    machine.handle(Event::PreRouted(decision_cascade()));
    machine.handle(Event::Budget(Budget::Allows));
    assert_eq!(
        machine.handle(edge_unavailable()),
        vec![Action::ReserveCloud]
    );
    machine.handle(slot(true));
    machine.handle(Event::CloudStarted);
    assert_eq!(
        machine.handle(chunk("A"))[0],
        announce(
            Tier::Cloud,
            reason::EDGE_UNAVAILABLE,
            "cascade: math; but no vehicle can serve the model"
        )
    );
}

#[test]
fn deadline_fails_the_request_wherever_it_is() {
    let mut edge = cascading();
    edge.handle(token(1, "a", SURE));
    assert_eq!(
        edge.handle(Event::Deadline),
        vec![Action::Fail(Failure::TimedOut)]
    );
    assert!(edge.is_done());
    let mut cloud = cloud_called(Target::Auto, decision_cloud());
    cloud.handle(chunk("a"));
    assert_eq!(
        cloud.handle(Event::Deadline),
        vec![Action::Fail(Failure::TimedOut)]
    );
}

#[test]
fn an_event_out_of_turn_fails_the_request_and_nothing_follows_the_end() {
    let mut machine = machine(Target::Auto);
    machine.start();
    assert_eq!(
        machine.handle(token(1, "a", SURE)),
        vec![Action::Fail(Failure::Internal)]
    );
    assert_eq!(machine.handle(Event::CloudFinished), vec![]);

    let mut cloud = cloud_called(Target::Auto, decision_cloud());
    assert_eq!(
        cloud.handle(slot(true)),
        vec![Action::Fail(Failure::Internal)]
    );
}

#[test]
fn the_cloud_prompt_of_a_whole_answer_is_the_request() {
    let mut machine = machine(Target::Auto);
    machine.start();
    machine.handle(Event::PreRouted(decision_cloud()));
    machine.handle(Event::Budget(Budget::Allows));
    assert_eq!(
        machine.handle(slot(true)),
        vec![Action::StartCloud {
            prompt: CloudPrompt::Whole,
            max_tokens: MAX_TOKENS
        }]
    );
}
