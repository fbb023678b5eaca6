//! Everything that crosses the bus, as JSON. The subjects carry the wire's
//! version (`fleetgrid.v1.`); a change that an older peer could not read
//! takes a new prefix.
//!
//! The seam's own types (`cell_api`'s tokens, usage, metering, refusals and
//! capacity) cross as they are. Types that belong to other crates and carry
//! no serde derives cross as mirrors converted field by field: the sampling
//! settings (prost-generated), the tenant's class (by its name) and an
//! owner's policy (its class set by names).

use std::str::FromStr;

use bytes::Bytes;
use cell_api::metering::Metering;
use cell_api::{
    Capacity, CapacityListing, CommittedToken, FinishReason, GenerationError, NewGeneration,
    Numerics, Rejection, TenantRef, Usage,
};
use domain::TenantClass;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::limits::MESSAGE_BYTES_MAX;
use crate::BusError;

/// A gateway asks a cell to admit a generation (request/reply on the
/// cell's submit subject; the reply is a [`SubmitReply`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub generation: WireGeneration,
    /// Where the cell publishes the generation's [`Batch`]es.
    pub batches_to: String,
}

/// A cell's answer to a [`SubmitRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SubmitReply {
    /// Admitted under the cell's own request id, which cancels and batches
    /// name.
    Admitted {
        request: u64,
    },
    Rejected(Rejection),
}

/// `cell_api::NewGeneration` on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireGeneration {
    pub public_id: String,
    pub tenant_id: i64,
    /// `TenantClass` by its name (`fleet`, `reserved`, `spot`).
    pub tenant_class: String,
    pub model: String,
    pub prompt: Vec<i32>,
    pub committed: Vec<i32>,
    pub sampling: WireSampling,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub top_logprobs: u32,
    /// Came later: a message without it asks for none.
    #[serde(default)]
    pub prompt_logprobs: bool,
    /// Came later: a message without it has no prediction.
    #[serde(default)]
    pub draft: Vec<i32>,
    pub deadline_ms: Option<u64>,
    /// Came later: a message without it says nothing of the numbers `committed` came from.
    #[serde(default)]
    pub numerics: Option<Numerics>,
}

/// `proto::Sampling`, field by field. The fields after `ignore_eos` came later: a message
/// without them means none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    pub ignore_eos: bool,
    #[serde(default)]
    pub min_p: f32,
    #[serde(default)]
    pub presence_penalty: f32,
    #[serde(default)]
    pub frequency_penalty: f32,
    #[serde(default)]
    pub repetition_penalty: f32,
    /// (token, bias) pairs.
    #[serde(default)]
    pub logit_bias: Vec<(i32, f32)>,
    /// Empty: none.
    #[serde(default)]
    pub grammar: String,
}

impl From<&proto::Sampling> for WireSampling {
    fn from(sampling: &proto::Sampling) -> WireSampling {
        WireSampling {
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed: sampling.seed,
            ignore_eos: sampling.ignore_eos,
            min_p: sampling.min_p,
            presence_penalty: sampling.presence_penalty,
            frequency_penalty: sampling.frequency_penalty,
            repetition_penalty: sampling.repetition_penalty,
            logit_bias: sampling
                .logit_bias
                .iter()
                .map(|entry| (entry.token, entry.bias))
                .collect(),
            grammar: sampling.grammar.clone(),
        }
    }
}

impl From<WireSampling> for proto::Sampling {
    fn from(wire: WireSampling) -> proto::Sampling {
        proto::Sampling {
            temperature: wire.temperature,
            top_p: wire.top_p,
            top_k: wire.top_k,
            seed: wire.seed,
            ignore_eos: wire.ignore_eos,
            min_p: wire.min_p,
            presence_penalty: wire.presence_penalty,
            frequency_penalty: wire.frequency_penalty,
            repetition_penalty: wire.repetition_penalty,
            logit_bias: wire
                .logit_bias
                .into_iter()
                .map(|(token, bias)| proto::LogitBias { token, bias })
                .collect(),
            grammar: wire.grammar,
        }
    }
}

impl From<&NewGeneration> for WireGeneration {
    fn from(generation: &NewGeneration) -> WireGeneration {
        WireGeneration {
            public_id: generation.public_id.clone(),
            tenant_id: generation.tenant.id,
            tenant_class: generation.tenant.class.as_str().to_string(),
            model: generation.model.clone(),
            prompt: generation.prompt.clone(),
            committed: generation.committed.clone(),
            sampling: WireSampling::from(&generation.sampling),
            max_tokens: generation.max_tokens,
            stop: generation.stop.clone(),
            top_logprobs: generation.top_logprobs,
            prompt_logprobs: generation.prompt_logprobs,
            draft: generation.draft.clone(),
            deadline_ms: generation.deadline_ms,
            numerics: generation.numerics.clone(),
        }
    }
}

impl TryFrom<WireGeneration> for NewGeneration {
    type Error = domain::UnknownTenantClass;

    fn try_from(wire: WireGeneration) -> Result<NewGeneration, Self::Error> {
        Ok(NewGeneration {
            public_id: wire.public_id,
            tenant: TenantRef {
                id: wire.tenant_id,
                class: TenantClass::from_str(&wire.tenant_class)?,
            },
            model: wire.model,
            prompt: wire.prompt,
            committed: wire.committed,
            sampling: wire.sampling.into(),
            max_tokens: wire.max_tokens,
            stop: wire.stop,
            top_logprobs: wire.top_logprobs,
            prompt_logprobs: wire.prompt_logprobs,
            draft: wire.draft,
            deadline_ms: wire.deadline_ms,
            numerics: wire.numerics,
        })
    }
}

/// Tokens of one generation that were ready together, published by the
/// cell to the subject its [`SubmitRequest`] named. An empty batch with no
/// end is a keepalive.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    /// The cell's request id (from `SubmitReply::Admitted`).
    pub request: u64,
    /// The position of the first token in the generation's completion,
    /// counting the committed tokens it was submitted with: a receiver that
    /// expected a smaller position lost a batch.
    pub first_position: u32,
    /// A piece of the prompt's scores (`Update::PromptLogprobs`), which
    /// come before any token in batches of their own. Came later: a message
    /// without it has none.
    #[serde(default)]
    pub prompt_scores: Option<PromptScoresPiece>,
    pub tokens: Vec<CommittedToken>,
    /// What the cell has metered of the generation so far, if it can tell.
    pub metering: Option<Metering>,
    /// Set on the generation's last batch.
    pub end: Option<End>,
    /// The numbers this batch's tokens were computed with (`Cell::numerics`), on the first
    /// batch after a node took the generation. Came later: a message without it changes
    /// nothing.
    #[serde(default)]
    pub numerics: Option<Numerics>,
}

/// Consecutive prompt tokens' scores, in prompt order: a prompt's scores
/// travel in pieces of at most `limits::PROMPT_SCORES_PER_BATCH` tokens, so
/// that a long prompt with many alternatives stays within a bus message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptScoresPiece {
    /// Index in the prompt of the first token scored here (from 1: the
    /// prompt's first token is never scored).
    pub first_index: u32,
    /// Tokens scored in all: the prompt's length minus one.
    pub total: u32,
    pub tokens: Vec<CommittedToken>,
}

/// How a generation ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum End {
    Finished {
        reason: FinishReason,
        usage: Usage,
        metering: Metering,
    },
    Failed(GenerationError),
}

/// A gateway stops a generation on the cell that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelMessage {
    pub request: u64,
}

/// An owner changed a vehicle's policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyMessage {
    pub node: String,
    pub policy: WirePolicy,
}

/// `scheduler::OwnerPolicy`, field by field; the class set by names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WirePolicy {
    pub allow_unplugged: bool,
    pub unplugged_stop_soc_permille: u16,
    pub unplugged_resume_soc_permille: u16,
    pub allowed_hours_utc: u32,
    pub utc_offset_minutes: i16,
    pub max_energy_per_day_wh: Option<u32>,
    pub max_chip_temperature_decicelsius: i16,
    pub stop_before_departure_ms: u64,
    pub allowed_classes: Vec<String>,
}

impl From<&scheduler::OwnerPolicy> for WirePolicy {
    fn from(policy: &scheduler::OwnerPolicy) -> WirePolicy {
        WirePolicy {
            allow_unplugged: policy.allow_unplugged,
            unplugged_stop_soc_permille: policy.unplugged_stop_soc_permille,
            unplugged_resume_soc_permille: policy.unplugged_resume_soc_permille,
            allowed_hours_utc: policy.allowed_hours_utc,
            utc_offset_minutes: policy.utc_offset_minutes,
            max_energy_per_day_wh: policy.max_energy_per_day_wh,
            max_chip_temperature_decicelsius: policy.max_chip_temperature_decicelsius,
            stop_before_departure_ms: policy.stop_before_departure_ms,
            allowed_classes: TenantClass::ALL
                .into_iter()
                .filter(|class| policy.allowed_classes.contains(*class))
                .map(|class| class.as_str().to_string())
                .collect(),
        }
    }
}

impl TryFrom<WirePolicy> for scheduler::OwnerPolicy {
    type Error = domain::UnknownTenantClass;

    fn try_from(wire: WirePolicy) -> Result<scheduler::OwnerPolicy, Self::Error> {
        let mut allowed_classes = scheduler::ClassSet::NONE;
        for name in &wire.allowed_classes {
            allowed_classes = allowed_classes.with(TenantClass::from_str(name)?);
        }
        Ok(scheduler::OwnerPolicy {
            allow_unplugged: wire.allow_unplugged,
            unplugged_stop_soc_permille: wire.unplugged_stop_soc_permille,
            unplugged_resume_soc_permille: wire.unplugged_resume_soc_permille,
            allowed_hours_utc: wire.allowed_hours_utc,
            utc_offset_minutes: wire.utc_offset_minutes,
            max_energy_per_day_wh: wire.max_energy_per_day_wh,
            max_chip_temperature_decicelsius: wire.max_chip_temperature_decicelsius,
            stop_before_departure_ms: wire.stop_before_departure_ms,
            allowed_classes,
        })
    }
}

/// A cell's capacity, published every `CAPACITY_INTERVAL`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacitySummary {
    pub cell: String,
    /// Per served model, what placement compares.
    pub models: Vec<ModelCapacity>,
    /// The cell's vehicles, as `Cell::capacity_listing` names them (their
    /// prompt heads moved to `models`).
    pub capacity: Capacity,
    /// Generations the cell streams to gateways now (running or queued).
    pub streaming: u32,
}

/// A cell's vehicles that serve one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCapacity {
    pub model: String,
    pub nodes: u32,
    pub slots: u32,
    pub running: u32,
    /// Slots not running anything (a vehicle running more than it declared
    /// counts as none free).
    pub free_slots: u32,
    /// Generations for the model admitted and waiting for a vehicle.
    #[serde(default)]
    pub queued: u32,
    /// Hashes of prompt heads (`domain::PromptHeads`) the cell's vehicles
    /// hold, at most `cell_api::limits::PROMPT_HEADS_PUBLISHED_MAX`, most
    /// recent first (see `Capacity::prompt_heads`).
    #[serde(default)]
    pub prompt_heads: Vec<u64>,
}

impl CapacitySummary {
    /// The summary of `listing`, per model its vehicles serve, sorted by
    /// model name, each with the prompt heads the cell holds for it.
    pub fn of(cell: &str, listing: CapacityListing, streaming: u32) -> CapacitySummary {
        let CapacityListing {
            mut capacity,
            models,
        } = listing;
        let mut heads = std::mem::take(&mut capacity.prompt_heads);
        let models = models
            .into_iter()
            .map(|totals| {
                let prompt_heads = heads
                    .iter_mut()
                    .find(|heads| heads.model == totals.model)
                    .map(|heads| {
                        let mut hashes = std::mem::take(&mut heads.hashes);
                        hashes.truncate(cell_api::limits::PROMPT_HEADS_PUBLISHED_MAX);
                        hashes
                    })
                    .unwrap_or_default();
                ModelCapacity {
                    model: totals.model,
                    nodes: totals.nodes,
                    slots: totals.slots,
                    running: totals.running,
                    free_slots: totals.free_slots,
                    queued: totals.queued,
                    prompt_heads,
                }
            })
            .collect();
        CapacitySummary {
            cell: cell.to_string(),
            models,
            capacity,
            streaming,
        }
    }

    /// What this cell has for `model`, if it serves it.
    pub fn model(&self, model: &str) -> Option<&ModelCapacity> {
        self.models.iter().find(|entry| entry.model == model)
    }
}

/// `message` as bus bytes, refused over `MESSAGE_BYTES_MAX`.
pub fn encode<T: Serialize>(message: &T) -> Result<Bytes, BusError> {
    let bytes = serde_json::to_vec(message).map_err(BusError::Encode)?;
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(BusError::TooLarge {
            bytes: bytes.len(),
            max: MESSAGE_BYTES_MAX,
        });
    }
    Ok(Bytes::from(bytes))
}

/// A bus message from `payload`, refused over `MESSAGE_BYTES_MAX` before
/// it is parsed.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, BusError> {
    if payload.len() > MESSAGE_BYTES_MAX {
        return Err(BusError::TooLarge {
            bytes: payload.len(),
            max: MESSAGE_BYTES_MAX,
        });
    }
    serde_json::from_slice(payload).map_err(BusError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell_api::NodeSummary;

    fn generation() -> NewGeneration {
        NewGeneration {
            public_id: "chatcmpl-1".into(),
            tenant: TenantRef {
                id: 7,
                class: TenantClass::Reserved,
            },
            model: "tiny".into(),
            prompt: vec![1, 2, 3],
            committed: vec![9],
            numerics: Some(Numerics {
                engine_version: "0.1.0".into(),
                cpu_kernels: "x86-avx2".into(),
                attention: 2,
            }),
            sampling: proto::Sampling {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 40,
                seed: u64::MAX,
                ignore_eos: true,
                min_p: 0.05,
                presence_penalty: 0.5,
                frequency_penalty: -0.25,
                repetition_penalty: 1.1,
                logit_bias: vec![proto::LogitBias {
                    token: 2,
                    bias: -100.0,
                }],
                grammar: r#"{"grammars":[{"json_schema":{"type":"object"}}]}"#.into(),
            },
            max_tokens: 16,
            stop: vec!["\n".into()],
            top_logprobs: 2,
            prompt_logprobs: false,
            draft: vec![4, 5],
            deadline_ms: Some(1_500),
        }
    }

    #[test]
    fn a_generation_crosses_unchanged() {
        let sent = generation();
        let wire: WireGeneration = decode(&encode(&WireGeneration::from(&sent)).unwrap()).unwrap();
        let received = NewGeneration::try_from(wire).unwrap();
        assert_eq!(WireGeneration::from(&received), WireGeneration::from(&sent));
        assert_eq!(received.sampling, sent.sampling);
        assert_eq!(received.tenant, sent.tenant);
    }

    #[test]
    fn an_unknown_tenant_class_is_refused() {
        let mut wire = WireGeneration::from(&generation());
        wire.tenant_class = "gold".into();
        assert!(NewGeneration::try_from(wire).is_err());
    }

    #[test]
    fn an_owner_policy_crosses_unchanged() {
        let policy = scheduler::OwnerPolicy {
            allow_unplugged: true,
            max_energy_per_day_wh: Some(900),
            allowed_classes: scheduler::ClassSet::only(TenantClass::Fleet).with(TenantClass::Spot),
            ..scheduler::OwnerPolicy::default()
        };
        let wire: WirePolicy = decode(&encode(&WirePolicy::from(&policy)).unwrap()).unwrap();
        assert_eq!(scheduler::OwnerPolicy::try_from(wire).unwrap(), policy);
    }

    #[test]
    fn a_summary_counts_each_models_free_slots() {
        let node = |name: &str, models: &[&str], slots, running| NodeSummary {
            name: name.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            slots,
            running,
        };
        let capacity = Capacity {
            nodes: vec![
                node("car-1", &["b", "a"], 4, 1),
                node("car-2", &["a"], 2, 3),
            ],
            unlisted: 0,
            prompt_heads: vec![cell_api::ModelHeads {
                model: "b".into(),
                hashes: vec![7, 3],
            }],
        };
        let summary = CapacitySummary::of(
            "eu",
            CapacityListing::of(capacity, cell_api::limits::NODES_PUBLISHED_MAX),
            2,
        );
        assert_eq!(
            summary.model("a"),
            Some(&ModelCapacity {
                model: "a".into(),
                nodes: 2,
                slots: 6,
                running: 4,
                free_slots: 3,
                queued: 0,
                prompt_heads: vec![],
            })
        );
        assert_eq!(summary.model("b").map(|m| m.free_slots), Some(3));
        // Heads travel with their model, once.
        assert_eq!(
            summary.model("b").map(|m| m.prompt_heads.clone()),
            Some(vec![7, 3])
        );
        assert!(summary.capacity.prompt_heads.is_empty());
        assert_eq!(summary.model("c"), None);
    }

    #[test]
    fn a_hundred_thousand_vehicle_cell_publishes_a_bounded_summary() {
        let nodes = (0..100_000u32)
            .map(|i| NodeSummary {
                name: format!("car-{i:06}"),
                models: vec!["qwen2.5-0.5b-instruct".into()],
                slots: 2,
                running: u32::from(i % 1_000 == 999),
            })
            .collect();
        let capacity = Capacity {
            nodes,
            unlisted: 0,
            prompt_heads: Vec::new(),
        };
        let summary = CapacitySummary::of(
            "eu",
            CapacityListing::of(capacity, cell_api::limits::NODES_PUBLISHED_MAX),
            100,
        );
        let bytes = encode(&summary).expect("a summary within the message limit");
        assert!(bytes.len() <= 100 * 1024, "{} bytes", bytes.len());
        // Placement's totals count every vehicle.
        let model = summary.model("qwen2.5-0.5b-instruct").unwrap();
        assert_eq!(
            (model.nodes, model.slots, model.running),
            (100_000, 200_000, 100)
        );
        assert_eq!(model.free_slots, 199_900);
        // The busy vehicles are listed, then the idle ones by name.
        let listed = &summary.capacity.nodes;
        assert_eq!(listed.len(), cell_api::limits::NODES_PUBLISHED_MAX);
        assert!(listed[..100].iter().all(|node| node.running == 1));
        assert_eq!(listed[100].name, "car-000000");
        assert_eq!(summary.capacity.nodes_connected(), 100_000);
        assert_eq!(summary.capacity.holds("car-000999"), Some(true));
        assert_eq!(summary.capacity.holds("car-099998"), None);
    }

    #[test]
    fn a_small_cell_lists_every_vehicle() {
        let capacity = Capacity {
            nodes: vec![NodeSummary {
                name: "car-1".into(),
                models: vec!["a".into()],
                slots: 1,
                running: 0,
            }],
            unlisted: 0,
            prompt_heads: Vec::new(),
        };
        let summary = CapacitySummary::of(
            "eu",
            CapacityListing::of(capacity, cell_api::limits::NODES_PUBLISHED_MAX),
            0,
        );
        assert_eq!(summary.capacity.holds("car-1"), Some(true));
        assert_eq!(summary.capacity.holds("car-2"), Some(false));
    }

    #[test]
    fn an_oversized_message_is_refused_unparsed() {
        let payload = vec![b' '; MESSAGE_BYTES_MAX + 1];
        assert!(matches!(
            decode::<CancelMessage>(&payload),
            Err(BusError::TooLarge { .. })
        ));
    }
}
