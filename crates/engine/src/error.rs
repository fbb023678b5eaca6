//! The one error type of the engine, shared by start-up, submission and the event stream.

/// Everything that can go wrong in the engine, from loading a model to decoding a token.
///
/// Messages are lowercase and never include anything a client should not see beyond the
/// model path, which is the operator's own configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The bounded submission queue is full; the caller should retry later (HTTP 429/503).
    #[error("engine queue is full")]
    Busy,
    /// The model and its KV cache would not fit the memory budget; nothing was allocated.
    /// The breakdown (weights, KV cache, compute) is logged at start-up and can be computed with
    /// [`crate::estimate_memory`].
    #[error(
        "model needs {needed_bytes} bytes (weights + kv cache + compute buffers) but the memory \
         budget is {budget_bytes} bytes; lower context_tokens_per_sequence or parallel_sequences"
    )]
    OverBudget {
        needed_bytes: u64,
        budget_bytes: u64,
    },
    /// Prompt plus committed tokens leave no room for a single new token in a sequence's context.
    #[error(
        "prompt of {prompt_tokens} tokens (committed included) leaves no room for a new token \
         in a context of {context_tokens} tokens"
    )]
    PromptTooLong {
        prompt_tokens: u32,
        context_tokens: u32,
    },
    /// A generation request that can never run (empty prompt, token id outside the vocabulary, ...).
    #[error("invalid generation: {0}")]
    InvalidGeneration(String),
    /// The configuration cannot work (zero threads, zero sequences, ...).
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// The model file is missing, unreadable or not a usable GGUF model.
    #[error("load model: {0}")]
    ModelLoad(String),
    /// The model carries no `tokenizer.chat_template`.
    #[error("model has no chat template")]
    NoChatTemplate,
    /// The chat template could not be applied to the messages.
    #[error("apply chat template: {0}")]
    ChatTemplate(String),
    /// Text could not be turned into tokens.
    #[error("tokenize: {0}")]
    Tokenize(String),
    /// llama.cpp refused a batch.
    #[error("decode: {0}")]
    Decode(String),
    /// The engine thread has stopped (shut down or crashed); no more work is accepted.
    #[error("engine has stopped")]
    Stopped,
}
