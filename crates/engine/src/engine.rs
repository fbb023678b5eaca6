//! The public handle of a running engine: start it, submit generations, measure its speed.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::model::params::LlamaModelParams;

use crate::budget::{check_budget, estimate_with_model};
use crate::generation::EVENT_CHANNEL_CAPACITY;
use crate::slot::Admission;
use crate::tokenizer::{backend, load_model};
use crate::worker::{Command, Worker};
use crate::{
    CancelHandle, EngineConfig, EngineError, EngineInfo, Generation, GenerationStream, SpeedReport,
    Tokenizer,
};

/// The engine's own description in [`EngineInfo::engine_version`].
pub const ENGINE_VERSION: &str =
    "llama.cpp (vendored by llama-cpp-sys-2 0.1.161) via llama-cpp-2 0.1.160";

/// Stack of the engine thread; llama.cpp's graph building recurses more than Rust's 2 MiB default
/// is comfortable with.
const ENGINE_THREAD_STACK_BYTES: usize = 8 << 20;

/// Prompt tokens of [`Engine::measure_speed`]'s prefill.
const MEASURE_PREFILL_TOKENS: u32 = 64;
/// Tokens of [`Engine::measure_speed`]'s decode.
const MEASURE_DECODE_TOKENS: u32 = 32;

/// A running engine; cheap to clone (`Arc` inside), `Send + Sync`. Dropping the last clone
/// cancels what is still running and waits until the engine thread has stopped (the llama.cpp
/// call under way finishes first).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

struct Shared {
    tokenizer: Tokenizer,
    info: EngineInfo,
    submissions: SyncSender<Command>,
    shutdown: Arc<AtomicBool>,
    /// Sequences occupying a slot, as last published by the engine thread.
    live: Arc<AtomicU32>,
    /// Joined when the last handle goes: llama.cpp must not be mid-call on the engine thread
    /// while the process exits and its C++ statics are torn down (that crashes the process).
    thread: Option<JoinHandle<()>>,
}

impl Drop for Shared {
    /// Stops the engine thread and waits for it: at most the decode call under way plus one
    /// poll interval (the thread checks the flag between calls).
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.shared.info)
            .finish_non_exhaustive()
    }
}

type Ready = Result<(Tokenizer, EngineInfo), EngineError>;

impl Engine {
    /// Blocking: loads the model on the engine's own OS thread and waits until it is ready.
    ///
    /// # Errors
    ///
    /// `OverBudget` when weights + KV cache + compute buffers do not fit `memory_budget_bytes`
    /// (checked before the weights are loaded), `ModelLoad` for a missing or unusable file,
    /// `InvalidConfig` for impossible settings.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        config.validate()?;
        let (submit_tx, submit_rx) = sync_channel(config.queue_capacity);
        let (ready_tx, ready_rx) = sync_channel::<Ready>(1);
        let shutdown = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicU32::new(0));
        let thread_state = (Arc::clone(&shutdown), Arc::clone(&live));
        let thread = std::thread::Builder::new()
            .name("engine".to_owned())
            .stack_size(ENGINE_THREAD_STACK_BYTES)
            .spawn(move || engine_thread(config, submit_rx, ready_tx, thread_state))
            .map_err(|error| EngineError::ModelLoad(format!("spawn engine thread: {error}")))?;
        match ready_rx.recv() {
            Ok(Ok((tokenizer, info))) => Ok(Engine {
                shared: Arc::new(Shared {
                    tokenizer,
                    info,
                    submissions: submit_tx,
                    shutdown,
                    live,
                    thread: Some(thread),
                }),
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Stopped)
            }
        }
    }

    #[must_use]
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    #[must_use]
    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    /// Sequences currently occupying a slot (decoding, or delivering their last events).
    #[must_use]
    pub fn live_sequences(&self) -> u32 {
        self.shared.live.load(Ordering::Acquire)
    }

    /// Non-blocking: queue a generation and return its event stream.
    ///
    /// # Errors
    ///
    /// `Busy` when the bounded queue is full, `PromptTooLong` when prompt + committed + 1 does
    /// not fit a sequence's context, `InvalidGeneration` for an empty prompt or unknown token ids,
    /// `Stopped` when the engine thread is gone.
    pub fn submit(&self, generation: Generation) -> Result<GenerationStream, EngineError> {
        self.validate(&generation)?;
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let cancel = CancelHandle::default();
        let admission = Admission {
            generation,
            events: events_tx,
            cancel: cancel.clone(),
        };
        match self
            .shared
            .submissions
            .try_send(Command::Generate(Box::new(admission)))
        {
            Ok(()) => Ok(GenerationStream {
                events: events_rx,
                cancel,
            }),
            Err(TrySendError::Full(_)) => Err(EngineError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped),
        }
    }

    fn validate(&self, generation: &Generation) -> Result<(), EngineError> {
        if generation.prompt.is_empty() {
            return Err(EngineError::InvalidGeneration("prompt is empty".to_owned()));
        }
        if let Some(verify) = &generation.verify {
            validate_verification(generation, verify)?;
        }
        if !generation.draft.is_empty()
            && (generation.prompt_logprobs || generation.verify.is_some())
        {
            return Err(EngineError::InvalidGeneration(
                "a draft cannot be combined with prompt scores or a verification".to_owned(),
            ));
        }
        let tokenizer = &self.shared.tokenizer;
        let verified = generation
            .verify
            .iter()
            .flat_map(|verify| &verify.completion);
        let all_tokens = generation
            .prompt
            .iter()
            .chain(&generation.committed)
            .chain(verified);
        // The draft is cut to the context, so it is checked but not counted against it.
        if let Some(bad) = all_tokens
            .clone()
            .chain(&generation.draft)
            .find(|&&token| !tokenizer.is_valid(token))
        {
            return Err(EngineError::InvalidGeneration(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                tokenizer.vocab_size()
            )));
        }
        let context_tokens = self.shared.info.context_tokens_per_sequence;
        let prompt_tokens = u32::try_from(all_tokens.count()).unwrap_or(u32::MAX);
        if prompt_tokens.saturating_add(1) > context_tokens {
            return Err(EngineError::PromptTooLong {
                prompt_tokens,
                context_tokens,
            });
        }
        Ok(())
    }

    /// Blocking: a quick self-measurement (prefill 64 tokens, decode 32) for the agent to report.
    /// Waits for live sequences to finish first, and holds new ones back while it runs.
    ///
    /// # Errors
    ///
    /// `Busy` when the queue is full, `Stopped` when the engine is gone, `Decode` on failure.
    pub fn measure_speed(&self) -> Result<SpeedReport, EngineError> {
        let (prefill, decode) =
            self.bench_prefill_decode(MEASURE_PREFILL_TOKENS, MEASURE_DECODE_TOKENS)?;
        Ok(SpeedReport {
            prefill_tokens_per_second: prefill,
            decode_tokens_per_second: decode,
        })
    }

    /// Blocking: measure like `llama-bench` through the engine thread: pp = one prompt of
    /// `prefill_tokens` decoded in `batch_tokens` chunks, tg = `decode_tokens` single-token
    /// decodes. Returns (prefill tokens/s, decode tokens/s).
    ///
    /// # Errors
    ///
    /// `InvalidGeneration` when either count is 0 or they do not fit a sequence's context,
    /// `Busy`, `Stopped` or `Decode` as for [`Engine::measure_speed`].
    pub fn bench_prefill_decode(
        &self,
        prefill_tokens: u32,
        decode_tokens: u32,
    ) -> Result<(f64, f64), EngineError> {
        let context_tokens = self.shared.info.context_tokens_per_sequence;
        if prefill_tokens == 0
            || decode_tokens == 0
            || prefill_tokens.max(decode_tokens) > context_tokens
        {
            return Err(EngineError::InvalidGeneration(format!(
                "bench needs 1..={context_tokens} prefill and decode tokens"
            )));
        }
        let (reply_tx, reply_rx) = sync_channel(1);
        let command = Command::Bench {
            prefill_tokens,
            decode_tokens,
            reply: reply_tx,
        };
        match self.shared.submissions.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EngineError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::Stopped),
        }
        reply_rx.recv().map_err(|_| EngineError::Stopped)?
    }
}

/// The engine thread's body: load, report readiness, then serve until shut down.
fn engine_thread(
    config: EngineConfig,
    submissions: Receiver<Command>,
    ready: SyncSender<Ready>,
    (shutdown, live): (Arc<AtomicBool>, Arc<AtomicU32>),
) {
    let model = match load_checked(&config) {
        Ok(model) => Arc::new(model),
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let tokenizer = Tokenizer::from_model(Arc::clone(&model));
    let context = match backend().and_then(|backend| {
        crate::cpu::with_reference_kernels(config.reference_kernels, || {
            model.new_context(backend, context_params(&config))
        })
        .map_err(EngineError::ModelLoad)?
        .map_err(|error| EngineError::ModelLoad(format!("create llama context: {error}")))
    }) {
        Ok(context) => context,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let info = engine_info(&config, &tokenizer);
    if ready.send(Ok((tokenizer.clone(), info))).is_err() {
        return;
    }
    Worker::new(context, tokenizer, config, submissions, shutdown, live).run();
}

/// Check the memory budget from metadata alone, then load the weights.
fn load_checked(config: &EngineConfig) -> Result<llama_cpp_2::model::LlamaModel, EngineError> {
    let metadata_only = Tokenizer::load(&config.model_path)?;
    let estimate = estimate_with_model(config, metadata_only.model())?;
    tracing::info!(
        cpu_kernels = crate::cpu_kernels(),
        weights_bytes = estimate.weights_bytes,
        kv_cache_bytes = estimate.kv_cache_bytes,
        compute_bytes = estimate.compute_bytes,
        budget_bytes = config.memory_budget_bytes,
        "engine memory estimate"
    );
    check_budget(&estimate, config.memory_budget_bytes)?;
    drop(metadata_only);
    load_model(&config.model_path, &LlamaModelParams::default())
}

fn context_params(config: &EngineConfig) -> LlamaContextParams {
    let threads = i32::try_from(config.threads).unwrap_or(1);
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(
            config.context_tokens_per_sequence * config.parallel_sequences,
        ))
        .with_n_batch(config.batch_tokens)
        .with_n_ubatch(config.batch_tokens)
        .with_n_seq_max(config.parallel_sequences)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        // One KV stream per sequence: a sequence's cells sit at the same places whatever its
        // neighbours do, which keeps its logits independent of them (and of resumption).
        .with_kv_unified(false)
        // Flash attention on CPU picks its kernels by query count, context length and thread
        // count; without it, a token's numbers depend on none of these (see `slot.rs`).
        .with_flash_attention_policy(i32::from(config.flash_attention))
        .with_no_perf(true)
}

fn engine_info(config: &EngineConfig, tokenizer: &Tokenizer) -> EngineInfo {
    let model = tokenizer.model();
    let kv_cache_bytes = estimate_with_model(config, model).map_or(0, |e| e.kv_cache_bytes);
    EngineInfo {
        model_path: config.model_path.clone(),
        context_tokens_per_sequence: config.context_tokens_per_sequence,
        parallel_sequences: config.parallel_sequences,
        threads: config.threads,
        weights_bytes: model.size(),
        kv_cache_bytes,
        vocab_size: tokenizer.vocab_size(),
        engine_version: ENGINE_VERSION.to_owned(),
        cpu_kernels: kernels_report(config),
        flash_attention: crate::FlashAttention::of(config),
    }
}

/// ggml's CPU features report, then what this engine's settings add to it: the reference
/// kernels and flash attention, both of which change its numbers.
fn kernels_report(config: &EngineConfig) -> String {
    let mut report = crate::cpu_kernels().to_owned();
    if config.reference_kernels {
        report.push_str(" REFERENCE = 1 |");
    }
    if config.flash_attention {
        report.push_str(" FLASH_ATTN = 1 |");
    }
    report
}

/// A verification checks a completion as it was generated: from the prompt alone, with nothing
/// reported back but the outcome.
fn validate_verification(
    generation: &Generation,
    verify: &crate::Verify,
) -> Result<(), EngineError> {
    let refuse = |what: &str| {
        Err(EngineError::InvalidGeneration(format!(
            "a verification {what}"
        )))
    };
    if !generation.committed.is_empty() {
        return refuse("cannot resume from committed tokens");
    }
    if generation.restore.is_some() || generation.export_checkpoint {
        return refuse("takes no checkpoint");
    }
    if generation.prompt_logprobs {
        return refuse("does not score its prompt");
    }
    let given = usize::try_from(verify.given).unwrap_or(usize::MAX);
    if given > verify.completion.len() {
        return refuse("cannot take more tokens as given than the completion has");
    }
    if verify.logprobs.len() != verify.completion.len() - given {
        return refuse("needs one reported log-probability per checked completion token");
    }
    Ok(())
}
