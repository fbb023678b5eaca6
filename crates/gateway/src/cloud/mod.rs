//! The cloud (system-2) tier: an OpenAI-compatible upstream the gateway sends
//! what the fleet should not answer, and the per-tenant caps on what a
//! tenant may spend there.
//!
//! The cloud model is priced by the price sheet like every model: its
//! `upstream` section, keyed by the public name `cloud/<model>`, says what
//! the upstream charges, and `cloud_margin_bps` what the tenant pays on top.
//! A gateway whose sheet has no such price refuses to start.
//!
//! `upstream` is the HTTP client (bounded concurrency, timeouts, streaming
//! parsed from server-sent events), `sse` the event parser, `budget` the caps
//! and spend kept in the coordinator's database; settled spend a failure or
//! a crash kept from the budgets is counted when the tier loads. Which tier serves a request
//! is decided in `api::route` with the `router` crate's pure functions and
//! the thresholds that `fleetgrid router calibrate` writes.

pub mod budget;
pub mod sse;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use crate::store::Store;

pub use budget::{BudgetStatus, CloudBudgets, CountError};
pub use upstream::{
    Upstream, UpstreamCall, UpstreamError, UpstreamEvent, UpstreamRequest, UpstreamTools,
};

/// Prefix that pins a request to the cloud tier.
pub const CLOUD_PREFIX: &str = "cloud/";

/// The model name that lets the router pick the tier.
pub const AUTO_MODEL: &str = "auto";

/// Money in micro-dollars; the one definition is in `domain`.
pub use domain::MicroUsd;

/// What `cloud/...` does when the upstream fails or is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Answer with a clear error (502, 503 or 504).
    Error,
    /// Serve the request on the fleet instead, and say so in the response.
    Edge,
}

/// How to reach the cloud model and what it costs.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// The OpenAI-compatible API root, e.g. `https://api.example.com/v1`.
    pub base_url: String,
    /// The upstream's name for its model; clients ask for `cloud/<model>`.
    pub model: String,
    /// Environment variable holding the upstream API key, if it needs one.
    pub api_key_env: Option<String>,
    /// Longest wait for the upstream's response headers, and for each chunk after.
    pub timeout: Duration,
    /// Upstream requests in flight at once; beyond it `cloud/...` gets 429
    /// (or the fallback) and `auto` stays on the fleet.
    pub concurrency_max: usize,
    pub fallback: Fallback,
    /// A GGUF file whose chat template renders the prompt for a mid-generation
    /// handoff (the cloud continues the answer through `/v1/completions`).
    /// Without one, a handoff is not possible and the fleet finishes.
    pub chat_template_model: Option<PathBuf>,
    /// The router's configuration file (thresholds; `fleetgrid router
    /// calibrate` writes it); the router's defaults without one.
    pub router_config_file: Option<PathBuf>,
    /// The upstream follows a `prediction` of token ids exactly, as `fleetgrid cloud serve`
    /// does: its answer is the one it gives without, and it prefills the predicted tokens it
    /// keeps instead of decoding them. The exact cascade then checks a greedy draft in the
    /// call that answers (one call); otherwise it scores the draft with `echo` and continues in
    /// a second call, which any upstream with `echo` and token-id `logprobs` can do.
    pub follows_predictions: bool,
}

impl CloudConfig {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> CloudConfig {
        CloudConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            timeout: crate::limits::CLOUD_TIMEOUT_DEFAULT,
            concurrency_max: crate::limits::CLOUD_CONCURRENCY_DEFAULT,
            fallback: Fallback::Error,
            chat_template_model: None,
            router_config_file: None,
            follows_predictions: false,
        }
    }

    /// The public name clients use, `cloud/<model>`; the price sheet's
    /// `upstream` section prices the model under this name.
    pub fn public_name(&self) -> String {
        format!("{CLOUD_PREFIX}{}", self.model)
    }
}

/// Everything the gateway needs to route between the fleet and the cloud.
pub struct CloudTier {
    pub upstream: Upstream,
    pub router: router::Router,
    pub budgets: CloudBudgets,
    /// The cloud model's chat template, for handoff prompts.
    pub chat_template: Option<engine::Tokenizer>,
    /// Whether the cloud model's tokenizer names every token as the fleet model's does, once
    /// asked (one fleet model serves `auto`).
    shared_vocabulary: std::sync::OnceLock<bool>,
}

impl CloudTier {
    /// Checks that the price sheet prices the cloud model, builds the client,
    /// reads the router's configuration, loads the handoff template and
    /// counts settled cloud spend the budgets miss; every problem that stops
    /// the tier is reported as a sentence.
    pub async fn load(
        config: CloudConfig,
        store: Store,
        billing: &crate::billing::Billing,
    ) -> Result<CloudTier, String> {
        billing.check_cloud_priced(&config.public_name())?;
        let router_config = match &config.router_config_file {
            None => router::RouterConfig::default(),
            Some(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|error| format!("read {}: {error}", path.display()))?;
                router::RouterConfig::from_json(&text)
                    .map_err(|error| format!("{}: {error}", path.display()))?
            }
        };
        let router = router::Router::new(router_config).map_err(|error| error.to_string())?;
        let chat_template = match config.chat_template_model.clone() {
            None => {
                tracing::warn!(
                    model = %config.model,
                    "no chat template for the cloud model: a collapsing edge answer is finished by the fleet instead of handed off"
                );
                None
            }
            Some(path) => {
                let loaded = tokio::task::spawn_blocking(move || engine::Tokenizer::load(&path))
                    .await
                    .map_err(|error| format!("load the cloud chat template: {error}"))?;
                Some(loaded.map_err(|error| format!("load the cloud chat template: {error}"))?)
            }
        };
        let upstream = Upstream::new(config)?;
        let budgets = CloudBudgets::new(store);
        let now_ms = crate::core::now_ms().0;
        // Counting is retried at every start: a failure here must not keep
        // the gateway from serving.
        match budgets.count_uncounted(billing.ledger(), now_ms).await {
            Ok(0) => {}
            Ok(counted) => tracing::info!(counted, "counted settled cloud spend"),
            Err(error) => tracing::error!(%error, "count settled cloud spend"),
        }
        Ok(CloudTier {
            upstream,
            router,
            budgets,
            chat_template,
            shared_vocabulary: std::sync::OnceLock::new(),
        })
    }

    /// Whether the cloud model's tokenizer (`chat_template`) has `edge`'s vocabulary: the
    /// same size and every token the same bytes, so that a token id means the same to both
    /// (what the exact cascade needs). Compared once; `false` without the cloud's tokenizer.
    pub fn shares_vocabulary(&self, edge: &engine::Tokenizer) -> bool {
        *self.shared_vocabulary.get_or_init(|| {
            let Some(cloud) = &self.chat_template else {
                return false;
            };
            let size = cloud.vocab_size();
            let same = size == edge.vocab_size()
                && (0..size).all(|id| {
                    let id = i32::try_from(id).unwrap_or(i32::MAX);
                    cloud.piece(id) == edge.piece(id)
                        && cloud.is_end_of_generation(id) == edge.is_end_of_generation(id)
                });
            tracing::info!(
                same_vocabulary = same,
                "compared the fleet's and the cloud's vocabularies"
            );
            same
        })
    }
}
