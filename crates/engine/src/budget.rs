//! Memory needed by an engine, estimated from the model's metadata before anything is allocated.
//!
//! The estimate is weights (the file size; weights are memory-mapped but will be touched on
//! every token) + the KV cache (f16 keys and values for every layer and every cell of every
//! sequence) + an allowance for llama.cpp's compute and output buffers.

use std::path::Path;

use llama_cpp_2::model::LlamaModel;

use crate::{EngineConfig, EngineError, Tokenizer};

/// llama.cpp rounds each sequence's context up to a multiple of this many cells.
const KV_CELLS_PER_SEQUENCE_ALIGN: u64 = 256;

/// Bytes per cached key or value element: the KV cache is f16.
const KV_ELEMENT_BYTES: u64 = 2;

/// Fixed part of the compute allowance: graph metadata, scratch and allocator slack.
const COMPUTE_BASE_BYTES: u64 = 32 << 20;

/// Bytes per f32 activation.
const F32_BYTES: u64 = 4;

/// The parts of an engine's memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub compute_bytes: u64,
}

impl MemoryEstimate {
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.compute_bytes)
    }
}

/// The shape facts the estimate needs, read from GGUF metadata.
#[derive(Clone, Copy, Debug)]
struct ModelShape {
    layers: u64,
    embedding: u64,
    heads: u64,
    key_value_heads: u64,
    key_length: u64,
    value_length: u64,
    feed_forward: u64,
    vocab: u64,
}

/// Estimate the memory `config` needs, reading only the model's metadata and vocabulary.
///
/// # Errors
///
/// `ModelLoad` when the file is missing or not a usable GGUF model.
pub fn estimate_memory(config: &EngineConfig) -> Result<MemoryEstimate, EngineError> {
    let tokenizer = Tokenizer::load(&config.model_path)?;
    estimate_with_model(config, tokenizer.model())
}

pub(crate) fn estimate_with_model(
    config: &EngineConfig,
    model: &LlamaModel,
) -> Result<MemoryEstimate, EngineError> {
    let weights_bytes = file_size(&config.model_path)?;
    let shape = read_shape(model)?;
    let cells_per_sequence =
        u64::from(config.context_tokens_per_sequence).next_multiple_of(KV_CELLS_PER_SEQUENCE_ALIGN);
    let cells = cells_per_sequence * u64::from(config.parallel_sequences);
    let kv_element_per_cell = shape.key_value_heads * (shape.key_length + shape.value_length);
    let kv_cache_bytes = shape.layers * cells * kv_element_per_cell * KV_ELEMENT_BYTES;
    // llama.cpp's graph allocator reuses buffers, so its compute buffer is about one
    // micro-batch of attention scores (every head against a whole sequence, f32) plus the widest
    // activations; the output buffer holds one row of logits per sequence. For SmolLM2-135M
    // with 4 × 2048 cells and 512-token micro-batches llama.cpp reports 46 MiB + 0.75 MiB, and
    // this gives 81 MiB: an allowance, not a prediction.
    let micro_batch = u64::from(config.batch_tokens);
    let per_token = shape.heads * cells_per_sequence + 4 * shape.feed_forward.max(shape.embedding);
    let output_rows = u64::from(config.parallel_sequences) * shape.vocab;
    let compute_bytes = COMPUTE_BASE_BYTES + F32_BYTES * (micro_batch * per_token + output_rows);
    Ok(MemoryEstimate {
        weights_bytes,
        kv_cache_bytes,
        compute_bytes,
    })
}

fn file_size(path: &Path) -> Result<u64, EngineError> {
    std::fs::metadata(path)
        .map(|metadata| metadata.len())
        .map_err(|error| EngineError::ModelLoad(format!("read {}: {error}", path.display())))
}

/// Read the shape from the GGUF key/values. Only these work on a vocabulary-only model (whose
/// llama.cpp hyper-parameters are never filled in), which is what the estimate runs on.
fn read_shape(model: &LlamaModel) -> Result<ModelShape, EngineError> {
    let required = |key: &str| {
        architecture_value(model, key)
            .ok_or_else(|| EngineError::ModelLoad(format!("gguf metadata has no usable {key}")))
    };
    let embedding = required("embedding_length")?;
    let heads = required("attention.head_count")?.max(1);
    let head_width = embedding / heads;
    Ok(ModelShape {
        layers: required("block_count")?,
        embedding,
        heads,
        // Some architectures store per-layer head counts as arrays; assume every head then.
        key_value_heads: architecture_value(model, "attention.head_count_kv").unwrap_or(heads),
        key_length: architecture_value(model, "attention.key_length").unwrap_or(head_width),
        value_length: architecture_value(model, "attention.value_length").unwrap_or(head_width),
        feed_forward: architecture_value(model, "feed_forward_length").unwrap_or(4 * embedding),
        vocab: u64::try_from(model.n_vocab()).unwrap_or(0),
    })
}

/// A scalar `{general.architecture}.{key}` GGUF value, if present and numeric.
pub(crate) fn architecture_value(model: &LlamaModel, key: &str) -> Option<u64> {
    let architecture = model.meta_val_str("general.architecture").ok()?;
    model
        .meta_val_str(&format!("{architecture}.{key}"))
        .ok()
        .and_then(|value| value.trim().parse().ok())
}

/// Refuse `estimate` if it exceeds the budget.
pub(crate) fn check_budget(
    estimate: &MemoryEstimate,
    budget_bytes: u64,
) -> Result<(), EngineError> {
    let needed_bytes = estimate.total_bytes();
    if needed_bytes > budget_bytes {
        return Err(EngineError::OverBudget {
            needed_bytes,
            budget_bytes,
        });
    }
    Ok(())
}
