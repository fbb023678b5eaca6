//! Engine configuration, the facts reported about a started engine, and speed reports.

use std::path::PathBuf;

/// Default context window of one sequence, in tokens.
pub const DEFAULT_CONTEXT_TOKENS_PER_SEQUENCE: u32 = 2048;
/// Default number of sequences decoded together.
pub const DEFAULT_PARALLEL_SEQUENCES: u32 = 4;
/// Default llama.cpp logical batch size (`n_batch`), also the prefill chunk size.
pub const DEFAULT_BATCH_TOKENS: u32 = 512;
/// Default memory budget: half of a 16 GiB vehicle computer.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 8 << 30;
/// Default bound of the submission queue (generations waiting for a free sequence slot).
pub const DEFAULT_QUEUE_CAPACITY: usize = 64;
/// Upper bound on parallel sequences; llama.cpp's own limit (`LLAMA_MAX_SEQ`) is 256, and a
/// vehicle computer has no use for more than this.
pub const PARALLEL_SEQUENCES_MAX: u32 = 64;

/// How to run one model. Construct with [`EngineConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Context window of each sequence: prompt, committed and new tokens together.
    pub context_tokens_per_sequence: u32,
    /// Sequences decoded together (continuous batching); each has its own KV cache stream.
    pub parallel_sequences: u32,
    /// CPU threads for both decode and prefill.
    pub threads: u32,
    /// llama.cpp `n_batch` and `n_ubatch`: most tokens per decode call, and the prefill chunk.
    pub batch_tokens: u32,
    /// Weights + KV cache + compute buffers must fit in this, or start-up is refused.
    pub memory_budget_bytes: u64,
    /// Generations that may wait for a free slot before `submit` answers `Busy`.
    pub queue_capacity: usize,
    /// Use llama.cpp's flash attention (off by default). It prefills faster on CPU, but it
    /// computes a query with kernels chosen by batch shape, context length and thread count, so
    /// a generation resumed on a node with other threads would no longer continue bit for bit;
    /// with `reference_kernels` as well it takes one kernel for every query, and does.
    pub flash_attention: bool,
    /// Compute with ggml's reference kernels (off by default): no llamafile `sgemm`, no fused
    /// operations, one row at a time. A chunk of queries then gets the numbers each query gets
    /// alone, attention included, so a draft checked in one prefill scores as its decode did
    /// (the exact cascade's cloud). It costs prefill speed where llamafile would have run.
    pub reference_kernels: bool,
}

/// How attention is computed, and so what a generation handed over between nodes of this
/// setting keeps (`fleetgrid agent --flash-attention`). Sets [`EngineConfig::flash_attention`]
/// and [`EngineConfig::reference_kernels`] together; `docs/BENCHMARKS.md` holds the measurements
/// behind each guarantee and each cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FlashAttention {
    /// Flash attention off, default kernels (the default). A token's numbers depend on its own
    /// sequence alone: not on the batch, the thread count, the prompt's chunking or a handover.
    /// A generation resumed on another node of this setting continues bit for bit.
    #[default]
    Off,
    /// Flash attention on ggml's reference kernels: one kernel for every query, one reduction
    /// order, so the same independence as `Off` holds among nodes of this setting (they compute
    /// other numbers than `Off` nodes). It decodes faster than `Off`; it prefills about as fast
    /// where the model's weights never reach llamafile's `sgemm` (SmolLM2's Q4_1), and a third
    /// slower where they do (Qwen2.5-Coder-0.5B's Q5_0 and Q8_0).
    Exact,
    /// Flash attention on the default kernels: the fastest, with a weaker guarantee. Its kernel
    /// depends on the micro-batch's row count and, past 512 cached cells, on the thread count,
    /// so a generation handed over continues from its committed tokens with no gap and no
    /// duplicate, but its later tokens may differ from the uninterrupted run's. Verification
    /// tolerates it (`docs/VERIFICATION.md`).
    Fast,
}

impl FlashAttention {
    /// Every setting, in the order of the option's help.
    pub const ALL: [FlashAttention; 3] = [
        FlashAttention::Off,
        FlashAttention::Exact,
        FlashAttention::Fast,
    ];

    /// The option's value: `off`, `exact` or `fast`.
    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttention::Off => "off",
            FlashAttention::Exact => "exact",
            FlashAttention::Fast => "fast",
        }
    }

    /// The setting `config` runs: flash attention with reference kernels is `Exact`; reference
    /// kernels alone (the exact cascade's cloud) count as `Off`, whose guarantee they keep.
    pub fn of(config: &EngineConfig) -> FlashAttention {
        match (config.flash_attention, config.reference_kernels) {
            (false, _) => FlashAttention::Off,
            (true, true) => FlashAttention::Exact,
            (true, false) => FlashAttention::Fast,
        }
    }

    /// Sets `config`'s attention and kernels to this setting.
    pub fn apply(self, config: &mut EngineConfig) {
        config.flash_attention = self != FlashAttention::Off;
        config.reference_kernels = self == FlashAttention::Exact;
    }
}

impl std::fmt::Display for FlashAttention {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl std::str::FromStr for FlashAttention {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        FlashAttention::ALL
            .into_iter()
            .find(|setting| setting.as_str() == value)
            .ok_or_else(|| format!("unknown flash attention setting {value:?}: off, exact or fast"))
    }
}

impl EngineConfig {
    /// A configuration with the defaults above and all available CPU threads.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        Self {
            model_path: model_path.into(),
            context_tokens_per_sequence: DEFAULT_CONTEXT_TOKENS_PER_SEQUENCE,
            parallel_sequences: DEFAULT_PARALLEL_SEQUENCES,
            threads,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            flash_attention: false,
            reference_kernels: false,
        }
    }

    /// Reject settings llama.cpp would crash on or that cannot do any work.
    pub(crate) fn validate(&self) -> Result<(), crate::EngineError> {
        let invalid = |reason: &str| Err(crate::EngineError::InvalidConfig(reason.to_owned()));
        if self.context_tokens_per_sequence < 2 {
            return invalid("context_tokens_per_sequence must be at least 2");
        }
        if self.parallel_sequences == 0 || self.parallel_sequences > PARALLEL_SEQUENCES_MAX {
            return invalid("parallel_sequences must be between 1 and 64");
        }
        if self.threads == 0 || i32::try_from(self.threads).is_err() {
            return invalid("threads must be at least 1");
        }
        if self.batch_tokens == 0 || i32::try_from(self.batch_tokens).is_err() {
            return invalid("batch_tokens must be at least 1");
        }
        if self.queue_capacity == 0 {
            return invalid("queue_capacity must be at least 1");
        }
        if self
            .context_tokens_per_sequence
            .checked_mul(self.parallel_sequences)
            .is_none_or(|total| i32::try_from(total).is_err())
        {
            return invalid("context_tokens_per_sequence × parallel_sequences is too large");
        }
        Ok(())
    }
}

/// What a started engine runs, as reported to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    pub model_path: PathBuf,
    pub context_tokens_per_sequence: u32,
    pub parallel_sequences: u32,
    pub threads: u32,
    /// Size of the model's tensors.
    pub weights_bytes: u64,
    /// Estimated KV cache size over all sequences (f16 keys and values).
    pub kv_cache_bytes: u64,
    pub vocab_size: u32,
    /// The inference library, e.g. "llama.cpp (ggml) via llama-cpp-2 0.1.160".
    pub engine_version: String,
    /// The CPU kernels it runs ([`crate::cpu_kernels`]).
    pub cpu_kernels: String,
    /// Its attention setting: against an answer's, it decides the tolerance of a verification
    /// ([`crate::tolerance`]).
    pub flash_attention: FlashAttention,
}

/// A quick self-measurement of the engine's speed, in tokens per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpeedReport {
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
}
