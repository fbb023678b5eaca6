//! A generation as the gateway submits it and as the cell reports on it.

use domain::{RequestId, TenantClass};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::metering::Metering;

/// One token the cell has committed for a generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommittedToken {
    pub token_id: i32,
    pub piece: Vec<u8>,
    pub logprob: f32,
    pub top_logprobs: Vec<(i32, Vec<u8>, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens the node that finished the generation did not prefill because it still
    /// held their KV cells (OpenAI's `prompt_tokens_details.cached_tokens`); the node's claim,
    /// capped at `prompt_tokens`, shown to the client and never billed differently.
    pub cached_prompt_tokens: u32,
}

/// Why an admitted generation failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GenerationError {
    /// The scheduler refused it after admission (e.g. a deadline passed).
    Rejected {
        reason: String,
        retry_after_seconds: u64,
    },
    /// A node failed it in a way that no other node would fix.
    Failed(String),
    /// It was moved too many times.
    TooManyAttempts,
}

/// Which numbers a node computes: nodes alike in all three continue each other's
/// generations bit for bit. A node's own claim (its registration), so a hint for placement,
/// never a proof.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Numerics {
    /// The engine's version (`proto::Hardware::engine_version`).
    pub engine_version: String,
    /// The CPU kernels it runs, instruction-set variant included (`proto::Hardware::cpu_kernels`).
    pub cpu_kernels: String,
    /// Its attention setting (`proto::Attention` as a number).
    pub attention: i32,
}

/// What the client's handler receives.
#[derive(Debug)]
pub enum Update {
    /// The prompt's tokens from the second on, each with its log-probability given the tokens
    /// before it (`NewGeneration::prompt_logprobs`): once, before the first token.
    PromptLogprobs(Vec<CommittedToken>),
    Token(CommittedToken),
    Finished {
        reason: FinishReason,
        usage: Usage,
        metering: Metering,
    },
    Failed(GenerationError),
}

/// Why a request was refused at admission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    NoEligibleNode {
        retry_after_seconds: u64,
    },
    QueueFull {
        retry_after_seconds: u64,
    },
    OverQuota {
        message: String,
        retry_after_seconds: u64,
    },
    Other {
        message: String,
    },
}

/// Who a generation is for, as far as a cell needs to know: the scheduler
/// places by class, and the request log names the tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantRef {
    pub id: i64,
    pub class: TenantClass,
}

/// A validated, tokenized generation, ready for a cell.
#[derive(Clone, Debug)]
pub struct NewGeneration {
    pub public_id: String,
    pub tenant: TenantRef,
    /// The served model's name; a cell that does not serve it refuses.
    pub model: String,
    pub prompt: Vec<i32>,
    /// Tokens already committed for this generation elsewhere (a cell that
    /// was lost): the cell continues after them, and sampling keyed by
    /// (seed, position) makes the continuation the one the first cell would
    /// have made. Their text is not sent again; usage counts them.
    pub committed: Vec<i32>,
    /// The numbers the node that committed the last of `committed` computes
    /// (`Cell::numerics`), if known: the cell places the continuation on a
    /// node computing the same where one is free, so that it goes on bit for bit.
    pub numerics: Option<Numerics>,
    pub sampling: proto::Sampling,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub top_logprobs: u32,
    /// Score the prompt: send `Update::PromptLogprobs` (with `top_logprobs` alternatives per
    /// token) before the first token. Not asked again for a generation that continues after
    /// committed tokens whose prompt was scored already.
    pub prompt_logprobs: bool,
    /// A prediction of the answer (OpenAI's predicted outputs, the exact cascade's draft): a
    /// node whose engine computes prefilled tokens as decoded ones prefills it after the
    /// prompt and takes its tokens while each is the sampler's own pick (`engine::Generation::
    /// draft`). The answer is the one without it; only its speed differs. Not sent to an
    /// attempt that resumes after committed tokens.
    pub draft: Vec<i32>,
    /// The generation must start within this many ms, or fail with
    /// `Rejected` (`x-fleetgrid-deadline-ms`).
    pub deadline_ms: Option<u64>,
}

pub struct Admitted {
    pub request: RequestId,
    pub updates: mpsc::Receiver<Update>,
}
