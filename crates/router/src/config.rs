//! The router's configuration: one policy per task class, the cascade's
//! thresholds, the incremental scorer's limits, the tiers' prices and the
//! optional neighbour index. Stored as JSON (`--router-config FILE`); the
//! caller reads and writes the file, this module only (de)serialises and
//! validates.

use serde::{Deserialize, Serialize};

use crate::calibrate::CalibrationSummary;
use crate::confidence::{ConfidenceFeature, WINDOW_TOKENS};
use crate::cost::Prices;
use crate::features::TaskClass;
use crate::knn::NeighbourConfig;

/// The configuration format's version; a file with another is refused.
pub const CONFIG_VERSION: u32 = 1;

/// The most tokens the incremental scorer may hold back at the start.
pub const HOLDBACK_TOKENS_MAX: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("parse router configuration: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("router configuration version {found} is not supported (expected {expected})")]
    Version { found: u32, expected: u32 },
    #[error("invalid router configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub version: u32,
    /// What to do with each class of prompt.
    pub policies: ClassPolicies,
    /// Prompts with at least this many characters go to the cloud at once:
    /// the edge model's context is small and long prompts are slow on it.
    #[serde(default)]
    pub cloud_prompt_chars_min: Option<usize>,
    pub incremental: IncrementalConfig,
    pub prices: Prices,
    /// Prompts with known outcomes; when the nearest agree, they decide.
    #[serde(default)]
    pub neighbours: Option<NeighbourConfig>,
    /// How these thresholds were chosen, when `router calibrate` wrote them.
    #[serde(default)]
    pub calibration: Option<CalibrationSummary>,
}

/// One policy per [`TaskClass`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassPolicies {
    pub multiple_choice: ClassPolicy,
    pub math: ClassPolicy,
    pub code: ClassPolicy,
    pub open: ClassPolicy,
}

impl ClassPolicies {
    pub fn get(&self, class: TaskClass) -> &ClassPolicy {
        match class {
            TaskClass::MultipleChoice => &self.multiple_choice,
            TaskClass::Math => &self.math,
            TaskClass::Code => &self.code,
            TaskClass::Open => &self.open,
        }
    }

    pub fn get_mut(&mut self, class: TaskClass) -> &mut ClassPolicy {
        match class {
            TaskClass::MultipleChoice => &mut self.multiple_choice,
            TaskClass::Math => &mut self.math,
            TaskClass::Code => &mut self.code,
            TaskClass::Open => &mut self.open,
        }
    }
}

/// Where a class of prompt goes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "route", rename_all = "snake_case")]
pub enum ClassPolicy {
    /// Always the edge, never judged.
    Edge,
    /// Always the cloud.
    Cloud,
    /// The edge first; escalate when the answer's confidence is below the rule.
    Cascade(AcceptRule),
}

/// Accept an edge answer when `feature >= threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptRule {
    pub feature: ConfidenceFeature,
    pub threshold: f32,
}

/// Limits of the streamed cascade (see [`crate::IncrementalScorer`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// Tokens held back at the start of a streamed cascade before the first
    /// judgement; an answer that ends within them is judged whole.
    pub holdback_tokens: u32,
    /// After the hold-back, a token is released only once this many newer
    /// tokens have been seen, so a collapse can still drop it.
    pub release_lag_tokens: u32,
    /// Confidence has collapsed when the mean log-probability of the last
    /// [`WINDOW_TOKENS`] tokens falls below this.
    pub collapse_window_mean: f32,
}

impl Default for IncrementalConfig {
    fn default() -> IncrementalConfig {
        IncrementalConfig {
            holdback_tokens: 16,
            release_lag_tokens: WINDOW_TOKENS as u32,
            collapse_window_mean: -2.5,
        }
    }
}

impl Default for RouterConfig {
    /// Hand-set starting points; `fleetgrid router calibrate` replaces them
    /// with thresholds chosen on data.
    fn default() -> RouterConfig {
        let cascade = |threshold| {
            ClassPolicy::Cascade(AcceptRule {
                feature: ConfidenceFeature::MeanLogprob,
                threshold,
            })
        };
        RouterConfig {
            version: CONFIG_VERSION,
            policies: ClassPolicies {
                multiple_choice: cascade(-0.5),
                math: cascade(-0.3),
                code: ClassPolicy::Cloud,
                open: cascade(-1.0),
            },
            cloud_prompt_chars_min: Some(8_000),
            incremental: IncrementalConfig::default(),
            prices: Prices::default(),
            neighbours: None,
            calibration: None,
        }
    }
}

impl RouterConfig {
    pub fn from_json(text: &str) -> Result<RouterConfig, ConfigError> {
        let config: RouterConfig = serde_json::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                found: self.version,
                expected: CONFIG_VERSION,
            });
        }
        for class in TaskClass::ALL {
            if let ClassPolicy::Cascade(rule) = self.policies.get(class) {
                if !rule.threshold.is_finite() {
                    return Err(ConfigError::Invalid(format!(
                        "the {class} threshold must be a finite number"
                    )));
                }
            }
        }
        let incremental = &self.incremental;
        if incremental.holdback_tokens == 0 || incremental.holdback_tokens > HOLDBACK_TOKENS_MAX {
            return Err(ConfigError::Invalid(format!(
                "incremental.holdback_tokens must be between 1 and {HOLDBACK_TOKENS_MAX}"
            )));
        }
        if incremental.release_lag_tokens > incremental.holdback_tokens {
            return Err(ConfigError::Invalid(
                "incremental.release_lag_tokens must not exceed holdback_tokens".into(),
            ));
        }
        if !incremental.collapse_window_mean.is_finite() {
            return Err(ConfigError::Invalid(
                "incremental.collapse_window_mean must be a finite number".into(),
            ));
        }
        if let Some(neighbours) = &self.neighbours {
            neighbours.validate().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_round_trips_through_json() {
        let config = RouterConfig::default();
        let text = config.to_json();
        assert!(text.contains("\"route\": \"cascade\""), "{text}");
        assert_eq!(RouterConfig::from_json(&text).expect("parse"), config);
    }

    #[test]
    fn bad_files_are_refused_with_a_clear_error() {
        let config = RouterConfig {
            version: 99,
            ..RouterConfig::default()
        };
        let error = RouterConfig::from_json(&config.to_json()).expect_err("version");
        assert!(error.to_string().contains("version 99"), "{error}");

        let mut config = RouterConfig::default();
        config.incremental.holdback_tokens = 0;
        let error = RouterConfig::from_json(&config.to_json()).expect_err("holdback");
        assert!(error.to_string().contains("holdback_tokens"), "{error}");

        let unknown = RouterConfig::default().to_json().replacen(
            "\"version\"",
            "\"versoin\": 1, \"version\"",
            1,
        );
        assert!(RouterConfig::from_json(&unknown).is_err());
        assert!(RouterConfig::from_json("not json").is_err());
    }
}
