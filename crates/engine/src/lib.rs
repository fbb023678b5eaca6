//! The inference engine of a vehicle node: llama.cpp through `llama-cpp-2`.
//!
//! One OS thread owns the llama.cpp context and decodes up to `parallel_sequences` generations
//! together (continuous batching). Callers talk to it through a bounded submission queue
//! ([`Engine::submit`]) and read each generation's tokens, with log-probabilities, from a bounded
//! event channel ([`GenerationStream`]).
//!
//! Sampling is plain Rust ([`sampler`]) keyed by `(seed, position)`, so a generation resumed on
//! another node from its committed tokens continues exactly as it would have. [`text`] turns
//! token pieces into client text with stop sequences; the coordinator reuses it.
//!
//! **Architecture invariant:** this is the only crate with `unsafe`-adjacent FFI; nothing here
//! blocks an async runtime except the documented blocking calls (`start`, `measure_speed`,
//! `bench_prefill_decode`).

mod adjust;
mod bench;
mod budget;
mod checkpoint;
mod config;
mod constraint;
mod cpu;
mod engine;
mod error;
mod generation;
mod jinja;
pub mod sampler;
mod slot;
pub mod testing;
pub mod text;
mod tokenizer;
pub mod verify;
mod worker;

/// A token id of the model's vocabulary.
pub type TokenId = i32;

pub use adjust::{Adjustments, LOGIT_BIAS_ENTRIES_MAX, LOGIT_BIAS_MAX};
pub use budget::{estimate_memory, MemoryEstimate};
pub use config::{
    EngineConfig, EngineInfo, FlashAttention, SpeedReport, DEFAULT_BATCH_TOKENS,
    DEFAULT_CONTEXT_TOKENS_PER_SEQUENCE, DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_PARALLEL_SEQUENCES,
    DEFAULT_QUEUE_CAPACITY, PARALLEL_SEQUENCES_MAX,
};
pub use constraint::{
    json_schema_grammar, tool_call_grammar, Constrained, GrammarCompiler, GRAMMAR_BYTES_MAX,
};
pub use cpu::cpu_kernels;
#[cfg(feature = "cpu-dispatch")]
pub use cpu::dispatch;
pub use engine::{Engine, ENGINE_VERSION};
pub use error::EngineError;
pub use generation::{
    CancelHandle, FinishReason, Generation, GenerationDone, GenerationEvent, GenerationStream,
    SequenceCheckpoint, TokenEvent, TopLogprob, CONSUMER_STALL_TIMEOUT, EVENT_CHANNEL_CAPACITY,
};
pub use jinja::{json_dumps, ChatTemplate, ToolCallFormat, CHAT_TEMPLATE_BYTES_MAX};
pub use sampler::SamplingParams;
pub use text::TextAssembler;
pub use tokenizer::{
    ChatMessage, Tokenizer, LLAMA_LOG_ENV, TILED_MATMUL_ENV, TOKENIZE_TEXT_BYTES_MAX,
};
pub use verify::{
    tolerance, Mismatch, Tolerance, Verification, Verify, DEFAULT_TOLERANCE,
    FLASH_ATTENTION_TOLERANCE,
};
pub use worker::{CHECKPOINT_BYTES_MAX, PROMPT_SCORE_CHUNK_TOKENS, RESTORE_CHECKED_TOKENS};
