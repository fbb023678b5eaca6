//! The agent ↔ coordinator wire protocol, generated from `proto/fleetgrid.proto`.
//!
//! Both sides depend on this crate only; nothing else defines wire types.

#![allow(clippy::all, clippy::pedantic)]

/// Bumped on every change that an older peer could misread.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest piece of a `KvCheckpoint` an agent sends.
pub const KV_CHECKPOINT_CHUNK_BYTES_MAX: usize = 1 << 20;

/// Most prompt tokens one `PromptLogprobs` message carries: with 20 alternatives each, well
/// below [`AGENT_MESSAGE_BYTES_MAX`].
pub const PROMPT_LOGPROBS_PER_MESSAGE: usize = 128;

/// Largest message either side accepts: an `Assign` with the biggest KV checkpoint the engine
/// exports, plus room for its prompt.
pub const MESSAGE_BYTES_MAX: usize = (64 << 20) + (4 << 20);

pub mod v1 {
    tonic::include_proto!("fleetgrid.v1");
}

pub use v1::*;

/// Largest message an agent sends once it is authenticated: a `KvCheckpoint` piece of
/// `KV_CHECKPOINT_CHUNK_BYTES_MAX` plus room for its other fields. A `TokenBatch` of the agent's
/// largest batch with 20 alternatives per token is well below it. The coordinator decodes no
/// larger agent message.
pub const AGENT_MESSAGE_BYTES_MAX: usize = KV_CHECKPOINT_CHUNK_BYTES_MAX + (64 << 10);
