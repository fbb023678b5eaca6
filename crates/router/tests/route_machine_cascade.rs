//! The cascade through `RouteMachine`: judged edge tokens, escalation before
//! any text, handoff mid-answer, the cloud failing after either, and a client
//! that goes away at each step.

mod common;

use common::*;
use router::machine::reason;
use router::{Action, Budget, CloudPrompt, EdgeText, Event, Failure, Target, Tier};

/// Feeds `t1`, `t2`, … with these log-probabilities, ids from 1.
fn tokens(logprobs: &[f32]) -> Vec<Event> {
    logprobs
        .iter()
        .enumerate()
        .map(|(index, &logprob)| token(index as i32 + 1, &format!("t{}", index + 1), logprob))
        .collect()
}

const CONFIDENT: &str = "cascade: math; confident so far";

#[test]
fn a_confident_cascade_is_held_back_then_released_with_a_lag() {
    let mut machine = cascading();
    assert_eq!(feed(&mut machine, tokens(&[SURE; 3])), vec![]);
    // The hold-back fills: judged, then released but for the last two.
    assert_eq!(
        machine.handle(token(4, "t4", SURE)),
        vec![
            announce(Tier::Fleet, reason::CASCADE_ACCEPTED, CONFIDENT),
            release("t1t2"),
        ]
    );
    assert_eq!(machine.handle(token(5, "t5", SURE)), vec![release("t3")]);
    let actions = machine.handle(finished_with("."));
    assert_eq!(
        actions[..2],
        [release("t4t5."), Action::StopEdge(EdgeText::Served)]
    );
    let Some(Action::Finish(outcome)) = actions.get(2) else {
        panic!("{actions:?}");
    };
    assert_eq!(outcome.tier, Tier::Fleet);
    assert_eq!(outcome.reason.code, reason::CASCADE_ACCEPTED);
    assert!(
        outcome
            .reason
            .detail
            .starts_with(&format!("{CONFIDENT}; mean_logprob ")),
        "{}",
        outcome.reason.detail
    );
    assert_eq!(outcome.edge, Some(edge_part(5, 0)));
    assert_eq!(outcome.cloud, None);
}

#[test]
fn an_unsure_start_escalates_to_the_cloud_before_any_text_and_the_edge_is_discarded() {
    let mut machine = cascading();
    assert_eq!(feed(&mut machine, tokens(&[UNSURE; 3])), vec![]);
    assert_eq!(
        machine.handle(token(4, "t4", UNSURE)),
        vec![Action::ReserveCloud]
    );
    assert_eq!(
        machine.handle(slot(true)),
        vec![
            Action::StopEdge(EdgeText::Discarded),
            start_cloud_whole(MAX_TOKENS)
        ]
    );
    machine.handle(Event::CloudStarted);
    let actions = machine.handle(chunk("Four"));
    let why = announced(&actions).expect("announced").clone();
    assert_eq!(why.code, reason::CASCADE_ESCALATED);
    assert!(why.detail.starts_with("first 4 tokens: "), "{}", why.detail);
    assert_eq!(
        actions,
        vec![
            Action::Announce {
                tier: Tier::Cloud,
                reason: why.clone()
            },
            release("Four")
        ]
    );
    assert_eq!(
        machine.handle(Event::CloudFinished),
        vec![finish_cloud(
            Tier::Cloud,
            reason::CASCADE_ESCALATED,
            &why.detail,
            Some(router::EdgePart {
                prompt_tokens: 0,
                completion_tokens: 0,
                discarded_tokens: 4
            }),
            usage(PROMPT_TOKENS, 1),
        )]
    );
}

/// A short unsure answer, finished and escalated with a cloud slot granted.
fn escalated_finished_answer() -> (router::RouteMachine, String) {
    let mut machine = cascading();
    assert_eq!(feed(&mut machine, tokens(&[UNSURE; 2])), vec![]);
    assert_eq!(machine.handle(finished()), vec![Action::ReserveCloud]);
    // The finished answer is kept, not discarded yet.
    assert_eq!(
        machine.handle(slot(true)),
        vec![start_cloud_whole(MAX_TOKENS)]
    );
    machine.handle(Event::CloudStarted);
    let escalated = "mean_logprob -3.000 < -1 over 2 tokens".to_string();
    (machine, escalated)
}

#[test]
fn an_escalated_answer_that_finished_is_served_when_the_cloud_then_fails() {
    let (mut machine, escalated) = escalated_finished_answer();
    let why = format!("{escalated}; down, so the fleet answered");
    assert_eq!(
        machine.handle(cloud_failed("down")),
        vec![
            announce(Tier::Fleet, reason::CLOUD_UNAVAILABLE, &why),
            release("t1t2"),
            Action::StopEdge(EdgeText::Served),
            finish_fleet(reason::CLOUD_UNAVAILABLE, &why, "stop", edge_part(2, 0)),
        ]
    );
}

#[test]
fn an_escalated_answer_that_finished_is_discarded_when_the_cloud_answers() {
    let (mut machine, escalated) = escalated_finished_answer();
    machine.handle(chunk("4"));
    assert_eq!(
        machine.handle(Event::CloudFinished),
        vec![
            Action::StopEdge(EdgeText::Discarded),
            finish_cloud(
                Tier::Cloud,
                reason::CASCADE_ESCALATED,
                &escalated,
                Some(router::EdgePart {
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    discarded_tokens: 2
                }),
                usage(PROMPT_TOKENS, 1),
            ),
        ]
    );
}

#[test]
fn an_escalation_with_the_cloud_at_its_limit_is_answered_by_the_fleet_unjudged() {
    let mut machine = cascading();
    feed(&mut machine, tokens(&[UNSURE; 3]));
    assert_eq!(
        machine.handle(token(4, "t4", UNSURE)),
        vec![Action::ReserveCloud]
    );
    let actions = machine.handle(slot(false));
    let why = announced(&actions).expect("announced").clone();
    assert_eq!(why.code, reason::CLOUD_UNAVAILABLE);
    assert!(
        why.detail
            .ends_with("; the cloud model is at its concurrency limit, so the fleet answered"),
        "{}",
        why.detail
    );
    assert_eq!(actions[1..], [release("t1t2t3t4")]);
    assert_eq!(machine.handle(token(5, "t5", UNSURE)), vec![release("t5")]);
    let actions = machine.handle(finished());
    assert_eq!(
        actions,
        vec![
            Action::StopEdge(EdgeText::Served),
            finish_fleet(
                reason::CLOUD_UNAVAILABLE,
                &why.detail,
                "stop",
                edge_part(5, 0)
            ),
        ]
    );
}

/// Six sure tokens, then two lost ones: the window collapses at the eighth,
/// with five tokens released. Returns the machine waiting for a cloud slot.
fn collapsing(can_hand_off: bool) -> router::RouteMachine {
    let mut machine = router::RouteMachine::new(router::Setup {
        can_hand_off,
        ..setup(Target::Auto)
    });
    machine.start();
    machine.handle(Event::PreRouted(decision_cascade()));
    machine.handle(Event::Budget(Budget::Allows));
    machine.handle(edge_started());
    let sent = feed(
        &mut machine,
        tokens(&[SURE, SURE, SURE, SURE, SURE, SURE, LOST]),
    );
    assert_eq!(
        sent,
        vec![
            announce(Tier::Fleet, reason::CASCADE_ACCEPTED, CONFIDENT),
            release("t1t2"),
            release("t3"),
            release("t4"),
            release("t5"),
        ]
    );
    machine
}

/// A handoff after five released tokens, the cloud's stream open.
fn handed_off() -> (router::RouteMachine, router::RouteReason) {
    let mut machine = collapsing(true);
    assert_eq!(
        machine.handle(token(8, "t8", LOST)),
        vec![Action::ReserveCloud]
    );
    assert_eq!(
        machine.handle(slot(true)),
        vec![
            Action::StopEdge(EdgeText::PartlyServed { released_tokens: 5 }),
            Action::StartCloud {
                prompt: CloudPrompt::Continue {
                    sent: "t1t2t3t4t5".into()
                },
                max_tokens: MAX_TOKENS - 5,
            },
        ]
    );
    assert_eq!(machine.handle(Event::CloudStarted), vec![]);
    let why = router::RouteReason::new(
        reason::HANDOFF,
        "confidence collapsed at token 8: last 8 tokens mean logprob -2.537 < -2.5",
    );
    (machine, why)
}

#[test]
fn a_collapse_mid_answer_hands_off_to_the_cloud_keeping_the_released_text() {
    let (mut machine, why) = handed_off();
    assert_eq!(
        machine.handle(chunk(" and more")),
        vec![
            Action::AnnounceHandoff {
                reason: why.clone()
            },
            release(" and more")
        ]
    );
    machine.handle(chunk_with_usage("", 20, 3));
    assert_eq!(
        machine.handle(Event::CloudFinished),
        vec![finish_cloud(
            Tier::FleetThenCloud,
            reason::HANDOFF,
            &why.detail,
            Some(edge_part(5, 3)),
            usage(20, 3),
        )]
    );
}

#[test]
fn a_cloud_that_fails_after_a_handoff_before_any_text_is_replaced_by_the_fleet_continuing() {
    let (mut machine, why) = handed_off();
    assert_eq!(
        machine.handle(cloud_failed("down")),
        vec![Action::StartEdge {
            continue_from: vec![1, 2, 3, 4, 5],
            max_tokens: Some(MAX_TOKENS - 5),
        }]
    );
    machine.handle(Event::EdgeStarted {
        max_tokens: MAX_TOKENS - 5,
    });
    // Unjudged, and already announced: the text flows at once.
    assert_eq!(
        machine.handle(token(9, " end", LOST)),
        vec![release(" end")]
    );
    let detail = format!("{}; down, so the fleet continued", why.detail);
    assert_eq!(
        machine.handle(finished()),
        vec![
            Action::StopEdge(EdgeText::Served),
            finish_fleet(reason::CLOUD_UNAVAILABLE, &detail, "stop", edge_part(6, 3)),
        ]
    );
}

#[test]
fn a_cloud_that_fails_after_a_handoff_and_its_own_text_fails_the_request() {
    let (mut machine, _) = handed_off();
    machine.handle(chunk(" and"));
    assert_eq!(
        machine.handle(cloud_failed("reset")),
        vec![Action::Fail(Failure::Cloud)]
    );
}

#[test]
fn a_collapse_that_cannot_be_handed_off_is_finished_by_the_fleet() {
    let mut machine = collapsing(false);
    assert_eq!(
        machine.handle(token(8, "t8", LOST)),
        vec![release("t6t7t8")]
    );
    let actions = machine.handle(finished());
    let Some(Action::Finish(outcome)) = actions.last() else {
        panic!("{actions:?}");
    };
    assert_eq!(outcome.reason.code, reason::CLOUD_UNAVAILABLE);
    assert!(outcome
        .reason
        .detail
        .ends_with("; no handoff was possible, so the fleet finished"));
    assert_eq!(outcome.edge, Some(edge_part(8, 0)));
}

#[test]
fn a_collapse_with_the_cloud_at_its_limit_is_finished_by_the_fleet() {
    let mut machine = collapsing(true);
    machine.handle(token(8, "t8", LOST));
    assert_eq!(machine.handle(slot(false)), vec![release("t6t7t8")]);
}

#[test]
fn a_failed_edge_before_any_text_escalates_and_after_text_fails() {
    let mut early = cascading();
    early.handle(token(1, "t1", SURE));
    let failed = Event::EdgeFailed {
        detail: "node lost".into(),
    };
    assert_eq!(early.handle(failed.clone()), vec![Action::ReserveCloud]);
    assert_eq!(
        early.handle(slot(true)),
        vec![
            Action::StopEdge(EdgeText::Discarded),
            start_cloud_whole(MAX_TOKENS)
        ]
    );
    early.handle(Event::CloudStarted);
    assert_eq!(
        early.handle(chunk("x"))[0],
        announce(
            Tier::Cloud,
            reason::CASCADE_ESCALATED,
            "the fleet failed: node lost"
        )
    );

    let mut busy = cascading();
    busy.handle(failed.clone());
    assert_eq!(busy.handle(slot(false)), vec![Action::Fail(Failure::Edge)]);

    let mut late = collapsing(true);
    assert_eq!(late.handle(failed), vec![Action::Fail(Failure::Edge)]);
}

#[test]
fn a_client_gone_before_any_work_is_settled_with_nothing_to_book() {
    let mut machine = machine(Target::Auto);
    machine.start();
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![Action::SettleCancelled]
    );
    assert!(machine.is_done());
    assert_eq!(machine.handle(Event::PreRouted(decision_edge())), vec![]);
}

#[test]
fn a_client_gone_during_the_edge_pays_for_all_it_made() {
    let mut machine = edge_answering(Target::Auto);
    machine.handle(token(1, "a", SURE));
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![Action::StopEdge(EdgeText::Served), Action::SettleCancelled]
    );
}

#[test]
fn a_client_gone_during_a_cascade_hold_pays_for_the_tokens_made() {
    let mut machine = cascading();
    assert_eq!(feed(&mut machine, tokens(&[SURE; 3])), vec![]);
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![Action::StopEdge(EdgeText::Served), Action::SettleCancelled]
    );
}

#[test]
fn a_client_gone_while_a_cloud_slot_is_awaited_still_stops_the_edge() {
    let mut machine = collapsing(true);
    machine.handle(token(8, "t8", LOST));
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![Action::StopEdge(EdgeText::Served), Action::SettleCancelled]
    );
}

#[test]
fn a_client_gone_during_the_cloud_pays_for_the_prompt_and_the_text_streamed() {
    let mut machine = cloud_called(Target::Auto, decision_cloud());
    feed(&mut machine, [chunk("a"), chunk(""), chunk("b")]);
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![
            Action::CutCloud {
                usage: usage(PROMPT_TOKENS, 2)
            },
            Action::SettleCancelled
        ]
    );
}

#[test]
fn a_client_gone_after_a_handoff_pays_for_the_cloud_reading_the_released_text() {
    let (mut machine, _) = handed_off();
    machine.handle(chunk(" more"));
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![
            Action::CutCloud {
                usage: usage(PROMPT_TOKENS + 5, 1)
            },
            Action::SettleCancelled
        ]
    );
}

#[test]
fn a_client_gone_while_the_cloud_replaces_a_finished_answer_discards_it() {
    let (mut machine, _) = escalated_finished_answer();
    assert_eq!(
        machine.handle(Event::ClientGone),
        vec![
            Action::StopEdge(EdgeText::Discarded),
            Action::CutCloud {
                usage: usage(PROMPT_TOKENS, 0)
            },
            Action::SettleCancelled
        ]
    );
}
