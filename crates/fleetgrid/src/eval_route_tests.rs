//! The route driver on canned answers: what the machine does with them, as
//! an evaluation reports it, without a model.

use std::collections::VecDeque;

use router::calibrate::all;
use router::machine::reason;
use router::{
    AcceptRule, ClassPolicy, CloudPrompt, ConfidenceFeature, Router, RouterConfig, TokenLogprob,
};

use super::{route, RouteItem, RouteTiers, Routed, TierAnswer, TierCall};
use crate::eval_report::Served;

const MAX_TOKENS: u32 = 64;

/// Canned answers, and what the driver asked for.
#[derive(Default)]
struct Canned {
    edge: VecDeque<TierAnswer>,
    cloud: VecDeque<TierCall>,
    /// The edge cannot be reached at all (a replay without the record).
    edge_missing: bool,
    edge_asked: Vec<(String, u32)>,
    cloud_asked: Vec<(CloudPrompt, u32)>,
}

impl RouteTiers for Canned {
    async fn edge(&mut self, sent: &str, max_tokens: u32) -> anyhow::Result<TierCall> {
        self.edge_asked.push((sent.to_string(), max_tokens));
        if self.edge_missing {
            anyhow::bail!("no recorded edge answer");
        }
        let answer = self.edge.pop_front();
        Ok(answer.ok_or_else(|| "no edge answer".to_string()))
    }

    async fn cloud(&mut self, prompt: &CloudPrompt, max_tokens: u32) -> anyhow::Result<TierCall> {
        self.cloud_asked.push((prompt.clone(), max_tokens));
        let answer = self.cloud.pop_front();
        Ok(answer.unwrap_or_else(|| Err("no cloud answer".to_string())))
    }
}

/// An edge answer of one token per logprob, "t0 t1 ...", ending by itself.
fn edge_answer(logprobs: &[f32]) -> TierAnswer {
    let tokens: Vec<(String, TokenLogprob)> = logprobs
        .iter()
        .enumerate()
        .map(|(index, logprob)| (format!("t{index} "), TokenLogprob::new(*logprob, [])))
        .collect();
    TierAnswer {
        text: tokens.iter().map(|(text, _)| text.as_str()).collect(),
        completion_tokens: u32::try_from(tokens.len()).expect("short"),
        tokens,
        finish_reason: Some("stop".into()),
        prompt_tokens: 40,
        latency_ms: 100,
    }
}

fn cloud_answer(text: &str) -> TierAnswer {
    TierAnswer {
        text: text.into(),
        tokens: Vec::new(),
        finish_reason: Some("stop".into()),
        prompt_tokens: 50,
        completion_tokens: 3,
        latency_ms: 300,
    }
}

/// Every class on `policy`, the default hold-back (16 tokens, released 8
/// behind) and collapse window.
fn router(policy: ClassPolicy) -> Router {
    let config = RouterConfig {
        policies: all(policy),
        ..RouterConfig::default()
    };
    Router::new(config).expect("router")
}

fn cascade(threshold: f32) -> ClassPolicy {
    ClassPolicy::Cascade(AcceptRule {
        feature: ConfidenceFeature::MeanLogprob,
        threshold,
    })
}

async fn run(router: &Router, tiers: &mut Canned, can_hand_off: bool) -> Routed {
    let item = RouteItem {
        prompt: "Which is heavier, a kilogram of iron or a kilogram of feathers?",
        max_tokens: MAX_TOKENS,
        can_hand_off,
        cloud_model: "big",
    };
    route(router, &item, tiers).await.expect("routed")
}

#[tokio::test]
async fn a_confident_edge_answer_is_served_at_the_edge_without_the_cloud() {
    let router = router(cascade(-0.5));
    let mut tiers = Canned::default();
    tiers.edge.push_back(edge_answer(&[-0.1; 5]));
    let routed = run(&router, &mut tiers, true).await;

    assert_eq!(routed.served(), Served::Edge);
    assert_eq!(routed.outcome.reason.code, reason::CASCADE_ACCEPTED);
    assert_eq!(routed.text, "t0 t1 t2 t3 t4 ");
    assert_eq!(tiers.edge_asked, [(String::new(), MAX_TOKENS)]);
    assert!(tiers.cloud_asked.is_empty());
    let prices = &router.config().prices;
    assert_eq!(routed.cost, prices.edge.cost(40, 5));
    assert_eq!(routed.latency_ms, 100);
}

#[tokio::test]
async fn a_prompt_pre_routed_to_the_cloud_never_reaches_the_edge() {
    let router = router(ClassPolicy::Cloud);
    let mut tiers = Canned::default();
    tiers
        .cloud
        .push_back(Ok(cloud_answer("feathers weigh the same")));
    let routed = run(&router, &mut tiers, true).await;

    assert_eq!(routed.served(), Served::Cloud);
    assert_eq!(routed.outcome.reason.code, reason::PRE_ROUTE_CLOUD);
    assert_eq!(routed.text, "feathers weigh the same");
    assert!(tiers.edge_asked.is_empty());
    assert_eq!(tiers.cloud_asked, [(CloudPrompt::Whole, MAX_TOKENS)]);
    assert_eq!(routed.cost, router.config().prices.cloud.cost(50, 3));
}

#[tokio::test]
async fn an_unsure_answer_escalates_before_any_edge_text_is_released() {
    let router = router(cascade(-0.5));
    let mut tiers = Canned::default();
    tiers.edge.push_back(edge_answer(&[-1.5; 4]));
    tiers.cloud.push_back(Ok(cloud_answer("the same")));
    let routed = run(&router, &mut tiers, true).await;

    assert_eq!(routed.served(), Served::Escalated);
    assert_eq!(routed.outcome.reason.code, reason::CASCADE_ESCALATED);
    assert!(
        routed.reason().contains("mean_logprob"),
        "{}",
        routed.reason()
    );
    // Nothing of the edge's answer reached the client.
    assert_eq!(routed.text, "the same");
    assert_eq!(tiers.cloud_asked, [(CloudPrompt::Whole, MAX_TOKENS)]);
    let prices = &router.config().prices;
    assert_eq!(
        routed.cost,
        prices
            .edge
            .cost(40, 4)
            .saturating_add(prices.cloud.cost(50, 3))
    );
    assert_eq!(routed.latency_ms, 400);
}

/// 24 confident tokens, then a collapse: released up to 8 behind, the
/// scorer hands off when the last 8 tokens' mean falls below -2.5.
fn collapsing_answer() -> TierAnswer {
    let mut logprobs = vec![-0.1; 24];
    logprobs.extend([-6.0; 16]);
    edge_answer(&logprobs)
}

#[tokio::test]
async fn a_collapse_mid_answer_hands_the_released_text_to_the_cloud() {
    let router = router(cascade(-0.5));
    let mut tiers = Canned::default();
    tiers.edge.push_back(collapsing_answer());
    tiers
        .cloud
        .push_back(Ok(cloud_answer("and the cloud's end.")));
    let routed = run(&router, &mut tiers, true).await;

    assert_eq!(routed.served(), Served::Handoff);
    assert_eq!(routed.outcome.reason.code, reason::HANDOFF);
    let [(CloudPrompt::Continue { sent }, max_tokens)] = tiers.cloud_asked.as_slice() else {
        panic!("one continuation: {:?}", tiers.cloud_asked);
    };
    // The cloud continues exactly the confident start the client has, and
    // nothing of the collapse.
    let kept = sent.split_whitespace().count();
    assert!(kept > 0 && kept <= 24, "{sent:?}");
    assert_eq!(
        *sent,
        (0..kept)
            .map(|index| format!("t{index} "))
            .collect::<String>()
    );
    assert_eq!(
        *max_tokens,
        MAX_TOKENS - u32::try_from(kept).expect("short")
    );
    assert_eq!(routed.text, format!("{sent}and the cloud's end."));
    // The edge is charged for what it generated until the collapse, not
    // for the 40 tokens its whole answer had.
    let fed = routed.outcome.edge.expect("edge part");
    let generated = fed.completion_tokens + fed.discarded_tokens;
    assert!(generated < 40, "{fed:?}");
    let prices = &router.config().prices;
    assert_eq!(
        routed.cost,
        prices
            .edge
            .cost(40, generated)
            .saturating_add(prices.cloud.cost(50, 3))
    );
}

#[tokio::test]
async fn without_the_clouds_template_the_edge_finishes_a_collapsing_answer() {
    let router = router(cascade(-0.5));
    let mut tiers = Canned::default();
    let answer = collapsing_answer();
    let whole = answer.text.clone();
    tiers.edge.push_back(answer);
    let routed = run(&router, &mut tiers, false).await;

    assert_eq!(routed.served(), Served::Edge);
    assert_eq!(routed.outcome.reason.code, reason::CLOUD_UNAVAILABLE);
    assert_eq!(routed.text, whole);
    assert!(tiers.cloud_asked.is_empty());
}

#[tokio::test]
async fn a_failed_handoff_is_continued_on_the_edge_from_the_released_text() {
    let router = router(cascade(-0.5));
    let mut tiers = Canned::default();
    tiers.edge.push_back(collapsing_answer());
    tiers
        .cloud
        .push_back(Err("upstream answered 502".to_string()));
    let mut rest = cloud_answer("the edge's own end.");
    rest.tokens = vec![(rest.text.clone(), TokenLogprob::new(0.0, []))];
    tiers.edge.push_back(rest);
    let routed = run(&router, &mut tiers, true).await;

    let [(CloudPrompt::Continue { sent }, _)] = tiers.cloud_asked.as_slice() else {
        panic!("one continuation: {:?}", tiers.cloud_asked);
    };
    assert_eq!(tiers.edge_asked.len(), 2);
    assert_eq!(&tiers.edge_asked[1].0, sent);
    assert_eq!(routed.served(), Served::Edge);
    assert_eq!(routed.text, format!("{sent}the edge's own end."));
}

#[tokio::test]
async fn an_edge_answer_the_driver_cannot_get_fails_the_item_instead_of_escalating() {
    let router = router(cascade(-0.5));
    let mut tiers = Canned {
        edge_missing: true,
        ..Canned::default()
    };
    tiers.cloud.push_back(Ok(cloud_answer("the same")));
    let item = RouteItem {
        prompt: "Which is heavier?",
        max_tokens: MAX_TOKENS,
        can_hand_off: true,
        cloud_model: "big",
    };
    let error = route(&router, &item, &mut tiers)
        .await
        .expect_err("no edge answer, no route");
    assert!(
        error.to_string().contains("no recorded edge answer"),
        "{error}"
    );
    assert!(tiers.cloud_asked.is_empty());
}
