//! The system-1 / system-2 router: decides whether a request is served by the
//! small model on the fleet (the *edge*) or by a large model in a datacenter
//! (the *cloud*), and judges the edge model's answers by its own token
//! probabilities.
//!
//! **Architecture invariant:** the router does no I/O, reads no clock and owns
//! no random number generator. Every function is a pure computation over its
//! arguments, so the same prompt, tokens and configuration always give the
//! same decision, and a calibration run replays exactly. (Reading and writing
//! the configuration file is [`RouterConfig::from_json`] / [`RouterConfig::to_json`]
//! on strings; the caller owns the file. The benchmark example is the one
//! place that reads a clock, to time the router from outside.)
//!
//! # The decision API (what the gateway calls)
//!
//! 1. **Pre-route.** [`Router::pre_route`] looks at the prompt alone — its
//!    length, its task signals ([`PromptFeatures`]: multiple choice, math,
//!    code, multi-step cues, question type) and, when the configuration has
//!    them, the nearest prompts with known outcomes ([`knn`]) — and returns a
//!    [`Decision`]: [`Route::Edge`] (serve on the fleet, do not judge),
//!    [`Route::Cloud`] (send to the cloud model now) or [`Route::Cascade`]
//!    (generate on the edge, judge the answer, escalate if unsure), with a
//!    human-readable reason for the response header and body.
//! 2. **Cascade, whole answer.** After a non-streamed edge generation,
//!    [`Router::judge`] scores the answer's tokens ([`ConfidenceScores`]) and
//!    says [`Judgement::Accept`] or [`Judgement::Escalate`], with a reason.
//! 3. **Cascade, streaming and mid-generation handoff.** For a streamed
//!    generation the gateway asks [`Router::scorer`] for an
//!    [`IncrementalScorer`] and feeds it every edge token as it is committed.
//!    Each [`IncrementalScorer::push`] returns a [`Step`]:
//!    * [`Step::Continue`] — keep generating; the first
//!      [`IncrementalScorer::releasable_tokens`] tokens may now be sent to the
//!      client (tokens are held back at the start until the scorer has seen
//!      enough of the answer, and always by a short lag after that, so that
//!      text which a later collapse would discard never reaches the client);
//!    * [`Step::Escalate`] — nothing has been released yet and the answer is
//!      unsure: discard the edge text, serve the whole request in the cloud;
//!    * [`Step::Handoff`] — confidence collapsed after text was released: keep
//!      exactly `keep_tokens` edge tokens (all already sent), drop the rest,
//!      and let the cloud model continue from the kept text.
//!
//!    At the end of the edge generation the gateway calls
//!    [`IncrementalScorer::finish`], which judges a short answer that never
//!    left the hold-back (like [`Router::judge`]) and checks the held tail.
//!
//! 4. **The whole policy of a routed request.** [`RouteMachine`] runs the
//!    above for one `auto` or `cloud/<model>` request: pre-route, cascade,
//!    escalation, handoff and every fallback, as events in and actions out,
//!    so the gateway's driver only carries the actions out.
//!
//! For an answer that ends inside the hold-back the scorer's verdict is
//! exactly [`Router::judge`]'s on the same tokens; a longer answer is judged
//! on its first `holdback_tokens` tokens, so an operator who wants streamed
//! answers judged like whole ones sets the hold-back to the answer length.
//!
//! # Calibration, grading, curves
//!
//! [`calibrate()`] chooses, per task class, Edge, Cloud or Cascade with a
//! confidence threshold so that the share of cloud-only quality kept is at
//! least the target at the lowest cost. [`grade`] holds the answer graders
//! used by the evaluation harness, and [`curve`] the cost–quality curve and its
//! SVG rendering.

pub mod calibrate;
pub mod confidence;
pub mod config;
pub mod cost;
pub mod curve;
pub mod exact;
pub mod features;
pub mod grade;
pub mod incremental;
pub mod knn;
pub mod machine;
mod router;

pub use calibrate::{
    calibrate, cross_validate, wilson_interval, CalibrationItem, CalibrationOutcome,
    CrossValidation, Evidence,
};
pub use confidence::{ConfidenceFeature, ConfidenceScores, TokenLogprob};
pub use config::{
    AcceptRule, ClassPolicies, ClassPolicy, ConfigError, IncrementalConfig, RouterConfig,
};
pub use cost::{MicroUsd, Price, Prices};
pub use features::{PromptFeatures, QuestionKind, TaskClass};
pub use incremental::{IncrementalScorer, Step};
pub use machine::{
    Action, Budget, CloudPrompt, CloudUsage, EdgeEnd, EdgePart, EdgeText, Event, Failure, Outcome,
    RouteMachine, RouteReason, Setup, Target, Tier,
};
pub use router::{judge_scores, Decision, Judgement, Route, Router};
