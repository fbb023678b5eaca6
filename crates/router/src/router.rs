//! [`Router`]: the decisions the gateway asks for, built from a validated
//! [`RouterConfig`].

use serde::{Deserialize, Serialize};

use crate::confidence::{ConfidenceScores, TokenLogprob};
use crate::config::{AcceptRule, ClassPolicy, ConfigError, RouterConfig};
use crate::features::PromptFeatures;
use crate::incremental::IncrementalScorer;
use crate::knn::{NeighbourIndex, Vote};

/// Where a request goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Serve on the edge; the answer is not judged.
    Edge,
    /// Serve in the cloud.
    Cloud,
    /// Generate on the edge, judge the answer with `rule`, escalate if unsure.
    Cascade,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Edge => "edge",
            Route::Cloud => "cloud",
            Route::Cascade => "cascade",
        }
    }
}

/// A pre-route decision and why it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub route: Route,
    /// The rule to judge the edge answer by; `Some` exactly when the route is
    /// [`Route::Cascade`].
    pub rule: Option<AcceptRule>,
    /// Human-readable, for the response header and body, e.g.
    /// `"cascade: class=math words=52 numbers=4 multi_step=3"`.
    pub reason: String,
    pub features: PromptFeatures,
}

/// The verdict on a complete edge answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    Accept { reason: String },
    Escalate { reason: String },
}

impl Judgement {
    pub fn is_accept(&self) -> bool {
        matches!(self, Judgement::Accept { .. })
    }

    pub fn reason(&self) -> &str {
        match self {
            Judgement::Accept { reason } | Judgement::Escalate { reason } => reason,
        }
    }
}

/// The router: a configuration and the neighbour index built from it.
/// Cheap to share (`&Router` everywhere); it holds no mutable state.
#[derive(Debug, Clone)]
pub struct Router {
    config: RouterConfig,
    neighbours: Option<NeighbourIndex>,
}

impl Router {
    pub fn new(config: RouterConfig) -> Result<Router, ConfigError> {
        config.validate()?;
        let neighbours = config.neighbours.clone().map(NeighbourIndex::new);
        Ok(Router { config, neighbours })
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Decides from the prompt alone (for a chat, the last user message).
    pub fn pre_route(&self, prompt: &str) -> Decision {
        let features = PromptFeatures::of(prompt);
        let summary = features.summary();
        let decision = |route: Route, rule: Option<AcceptRule>, why: String| Decision {
            route,
            rule,
            reason: format!("{}: {why}", route.as_str()),
            features: features.clone(),
        };
        if let Some(chars_min) = self.config.cloud_prompt_chars_min {
            if features.chars >= chars_min {
                let why = format!("prompt of {} chars >= {chars_min}", features.chars);
                return decision(Route::Cloud, None, why);
            }
        }
        if let Some(index) = &self.neighbours {
            match index.vote(prompt) {
                Vote::Edge { agreeing, k } => {
                    let why = format!(
                        "{agreeing} of {k} similar prompts answered well at the edge; {summary}"
                    );
                    return decision(Route::Edge, None, why);
                }
                Vote::Cloud { agreeing, k } => {
                    let why =
                        format!("{agreeing} of {k} similar prompts needed the cloud; {summary}");
                    return decision(Route::Cloud, None, why);
                }
                Vote::Abstain => {}
            }
        }
        match *self.config.policies.get(features.class) {
            ClassPolicy::Edge => decision(Route::Edge, None, summary.clone()),
            ClassPolicy::Cloud => decision(Route::Cloud, None, summary.clone()),
            ClassPolicy::Cascade(rule) => {
                let why = format!(
                    "{summary}; accept if {} >= {}",
                    rule.feature, rule.threshold
                );
                decision(Route::Cascade, Some(rule), why)
            }
        }
    }

    /// Judges a complete edge answer from its tokens.
    pub fn judge(&self, rule: &AcceptRule, tokens: &[TokenLogprob]) -> Judgement {
        judge_scores(rule, &ConfidenceScores::of(tokens))
    }

    /// A scorer for one streamed cascade generation.
    pub fn scorer(&self, rule: AcceptRule) -> IncrementalScorer {
        IncrementalScorer::new(rule, self.config.incremental)
    }
}

/// Judges precomputed scores: accept when the rule's feature reaches its threshold.
pub fn judge_scores(rule: &AcceptRule, scores: &ConfidenceScores) -> Judgement {
    let value = scores.get(rule.feature);
    let detail = format!(
        "{} {value:.3} {} {} over {} tokens",
        rule.feature,
        if value >= rule.threshold { ">=" } else { "<" },
        rule.threshold,
        scores.tokens
    );
    if value >= rule.threshold {
        Judgement::Accept { reason: detail }
    } else {
        Judgement::Escalate { reason: detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClassPolicies;
    use crate::features::TaskClass;
    use crate::knn::{KnownPrompt, NeighbourConfig};
    use crate::ConfidenceFeature;

    fn rule(threshold: f32) -> AcceptRule {
        AcceptRule {
            feature: ConfidenceFeature::MeanLogprob,
            threshold,
        }
    }

    fn config() -> RouterConfig {
        RouterConfig {
            policies: ClassPolicies {
                multiple_choice: ClassPolicy::Cascade(rule(-0.5)),
                math: ClassPolicy::Cloud,
                code: ClassPolicy::Cloud,
                open: ClassPolicy::Edge,
            },
            cloud_prompt_chars_min: Some(200),
            ..RouterConfig::default()
        }
    }

    #[test]
    fn pre_route_follows_the_class_policy_and_says_why() {
        let router = Router::new(config()).expect("router");
        let math = router.pre_route("Sam has 3 boxes of 12 eggs. How many eggs in total?");
        assert_eq!(math.route, Route::Cloud);
        assert_eq!(math.features.class, TaskClass::Math);
        assert!(
            math.reason.starts_with("cloud: class=math"),
            "{}",
            math.reason
        );

        let choice = router.pre_route("Pick one:\nA. red\nB. blue\nC. green");
        assert_eq!(choice.route, Route::Cascade);
        assert_eq!(choice.rule, Some(rule(-0.5)));
        assert!(choice.reason.contains("accept if mean_logprob >= -0.5"));

        let open = router.pre_route("Say hello.");
        assert_eq!((open.route, open.rule), (Route::Edge, None));
    }

    #[test]
    fn long_prompts_go_to_the_cloud() {
        let router = Router::new(config()).expect("router");
        let decision = router.pre_route(&"word ".repeat(100));
        assert_eq!(decision.route, Route::Cloud);
        assert!(decision.reason.contains("500 chars"), "{}", decision.reason);
    }

    #[test]
    fn neighbours_override_the_class_policy_when_they_agree() {
        let mut config = config();
        config.neighbours = Some(NeighbourConfig {
            k: 1,
            min_similarity: 0.5,
            min_agreement: 1.0,
            prompts: vec![KnownPrompt {
                text: "Say hello to the nice people.".into(),
                edge_correct: false,
                cloud_correct: true,
            }],
        });
        let router = Router::new(config).expect("router");
        let decision = router.pre_route("Say hello to the people.");
        assert_eq!(decision.route, Route::Cloud);
        assert!(
            decision.reason.contains("similar prompts"),
            "{}",
            decision.reason
        );
    }

    #[test]
    fn judge_accepts_at_the_threshold_and_escalates_below() {
        let router = Router::new(config()).expect("router");
        let tokens = [TokenLogprob::new(-0.5, []), TokenLogprob::new(-0.5, [])];
        assert!(router.judge(&rule(-0.5), &tokens).is_accept());
        let judgement = router.judge(&rule(-0.4), &tokens);
        assert!(!judgement.is_accept());
        assert!(
            judgement.reason().contains("-0.500 < -0.4"),
            "{judgement:?}"
        );
        assert!(!router.judge(&rule(-0.4), &[]).is_accept());
    }
}
