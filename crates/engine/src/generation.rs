//! What a caller submits (a [`Generation`]) and what it gets back (a [`GenerationStream`] of
//! [`GenerationEvent`]s).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{Adjustments, EngineError, SamplingParams, TokenId, Verification, Verify};

/// Bound of each generation's event channel. A consumer that lets it stay full for
/// [`CONSUMER_STALL_TIMEOUT`] gets its sequence cancelled; until then the sequence pauses, so a
/// slow consumer costs one slot, never memory.
pub const EVENT_CHANNEL_CAPACITY: usize = 64;

/// How long a generation's event channel may stay full before its sequence is cancelled.
pub const CONSUMER_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One generation request: a tokenized prompt, optionally resumed after `committed` tokens.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Already tokenized by the caller, special tokens included.
    pub prompt: Vec<TokenId>,
    /// Completion tokens already produced elsewhere (a resumed generation); may be empty.
    /// They are prefilled with the prompt and never emitted again.
    pub committed: Vec<TokenId>,
    pub sampling: SamplingParams,
    /// Total completion tokens, committed ones included.
    pub max_tokens: u32,
    /// Stop sequences (text); the token completing one is emitted, then the generation stops.
    pub stop: Vec<String>,
    /// Alternatives reported per token; 0 = none, capped at [`crate::sampler::TOP_LOGPROBS_MAX`].
    pub top_logprobs: u32,
    /// Never sample an end-of-generation token (their logits count as -inf, in the reported
    /// log-probabilities too), so that only `max_tokens`, a stop sequence or the context ends it.
    pub ignore_eos: bool,
    /// Penalties and `logit_bias`; rebuilt from `committed` on a resumed generation.
    pub adjustments: Adjustments,
    /// A grammar the completion must follow (the JSON of llguidance's `TopLevelGrammar`, see
    /// [`crate::json_schema_grammar`]); its state is rebuilt from `committed` on a resumed
    /// generation. A grammar that does not compile fails the generation before any token.
    pub grammar: Option<String>,
    /// The prompt's KV cache as another node computed it (a handover). It must cover exactly the
    /// prompt, and its cell metadata and sizes are checked before llama.cpp sees any of it; then
    /// all but the prompt's last [`crate::RESTORE_CHECKED_TOKENS`] cells are loaded, those last
    /// tokens prefilled here, and the cells computed for them compared with the checkpoint's.
    /// Anything wrong means the whole prompt is prefilled: slower, never different. Cells loaded
    /// from a checkpoint are never reused by another generation.
    pub restore: Option<Arc<SequenceCheckpoint>>,
    /// Report the sequence's KV cache once the prompt is in it, as a
    /// [`GenerationEvent::Checkpoint`] before the first token.
    pub export_checkpoint: bool,
    /// Score the prompt: report the log-probability of every prompt token after the first, given
    /// the tokens before it, with `top_logprobs` alternatives, as one
    /// [`GenerationEvent::PromptLogprobs`] before the first token. The whole prompt is prefilled
    /// for it (no cells kept from an earlier prompt, no `restore`), in chunks of at most
    /// [`crate::PROMPT_SCORE_CHUNK_TOKENS`].
    pub prompt_logprobs: bool,
    /// Check a completion another engine reported for this prompt instead of generating one:
    /// prompt and completion are prefilled together (alone, in chunks of at most
    /// [`crate::PROMPT_SCORE_CHUNK_TOKENS`]), every completion token is checked against the
    /// sampler's pick from the logits before it ([`crate::verify`]), and the outcome is reported
    /// as one [`GenerationEvent::Verified`] before `Done`. Nothing is sampled or emitted.
    /// `committed`, `restore`, `prompt_logprobs` and `grammar` must be empty.
    pub verify: Option<Verify>,
    /// A prediction of the completion (OpenAI's predicted outputs; the exact cascade's draft).
    /// On an engine with [`crate::EngineConfig::reference_kernels`], prompt and draft are
    /// prefilled together (alone, in chunks of at most [`crate::PROMPT_SCORE_CHUNK_TOKENS`]);
    /// at each draft position the sampler picks from the logits before it, as decoding would,
    /// and the completion takes the draft's token while it is that pick. At the first position
    /// where the pick differs the completion takes the pick, the draft's cells from there are
    /// dropped, and decoding goes on. The reference kernels compute a chunk of queries as each
    /// alone, so the answer is token for token the one without a draft: a draft changes how
    /// fast, never what.
    ///
    /// On the default kernels a prefilled token's numbers differ from a decoded one's, so the
    /// draft is not used there (the same answer, decoded), nor on a generation resumed after
    /// `committed` tokens. It is cut to `max_tokens` and to the context, takes no checkpoint,
    /// and cannot be combined with `prompt_logprobs` or `verify`.
    pub draft: Vec<TokenId>,
}

/// A sequence's KV cache covering its first `tokens` tokens: the sequence's own stream section
/// of llama.cpp's sequence state, so that engines with different numbers of parallel sequences
/// exchange it. Only an engine of the same build, model and attention settings can load it.
#[derive(Clone, PartialEq, Eq)]
pub struct SequenceCheckpoint {
    pub tokens: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for SequenceCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceCheckpoint")
            .field("tokens", &self.tokens)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// One new completion token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    /// Index in the completion (0-based, committed tokens counted).
    pub position: u32,
    pub token: TokenId,
    /// The token's raw bytes; may be part of a UTF-8 character.
    pub piece: Vec<u8>,
    /// Log-probability of the token under the model's raw distribution; <= 0.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative at a position.
#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    pub token: TokenId,
    pub piece: Vec<u8>,
    pub logprob: f32,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or stop sequence.
    Stop,
    /// `max_tokens` reached, or the sequence's context is full.
    Length,
    /// Cancelled by the caller (or by the engine for a stalled consumer).
    Cancelled,
}

/// The last event of a successful generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationDone {
    pub reason: FinishReason,
    /// Prompt tokens of the request (committed tokens not included).
    pub prompt_tokens: u32,
    /// Completion tokens, committed ones included (end-of-generation tokens are not counted).
    pub completion_tokens: u32,
    /// This generation's share of the engine's time: each decode call's duration divided
    /// equally among the sequences running then, from admission into a slot to the end. The
    /// coordinator divides a node's time among its generations the same way, so the two agree.
    pub compute: Duration,
    /// The prompt's KV cache was loaded from a checkpoint (all but its last
    /// [`crate::RESTORE_CHECKED_TOKENS`] cells) instead of prefilled, and passed the check.
    pub prompt_restored: bool,
    /// A checkpoint was offered and refused: its metadata or sizes were wrong, llama.cpp would
    /// not load it, or the cells this engine computed for the prompt's last tokens disagreed
    /// with it. The prompt was prefilled instead. (A checkpoint merely unusable here, say for a
    /// prompt too short to check, is not counted.)
    pub checkpoint_rejected: bool,
    /// Leading prompt tokens whose KV cells were still in the sequence from its previous
    /// occupant's identical prompt head, and so were not prefilled again.
    pub prompt_reused: u32,
    /// Completion tokens taken from the draft (`Generation::draft`) as they were prefilled,
    /// instead of decoded one by one.
    pub draft_taken: u32,
}

/// Everything a generation reports, in order: at most one `Checkpoint` and at most one
/// `PromptLogprobs` (when asked for), tokens, then exactly one `Done` or `Failed`. A
/// verification reports one `Verified` and then `Done`, and no tokens.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerationEvent {
    Checkpoint(SequenceCheckpoint),
    /// The prompt's tokens from the second on, each scored given the tokens before it; a
    /// [`TokenEvent`]'s `position` is then its index in the prompt.
    PromptLogprobs(Vec<TokenEvent>),
    Token(TokenEvent),
    /// What checking a reported completion found (`Generation::verify`).
    Verified(Verification),
    Done(GenerationDone),
    Failed(EngineError),
}

/// Cancels one generation; cheap to clone and send anywhere.
#[derive(Clone, Debug, Default)]
pub struct CancelHandle {
    cancelled: Arc<AtomicBool>,
}

impl CancelHandle {
    /// Ask the engine to stop the generation. It ends with `FinishReason::Cancelled` (if the
    /// stream is still read) and its sequence slot is freed before the next decode step.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// The receiving end of a submitted generation. Dropping it (its receiver) cancels the
/// generation promptly, like [`CancelHandle::cancel`].
#[derive(Debug)]
pub struct GenerationStream {
    pub events: tokio::sync::mpsc::Receiver<GenerationEvent>,
    pub(crate) cancel: CancelHandle,
}

impl GenerationStream {
    #[must_use]
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}
