//! The engine thread: the only owner of the llama.cpp context, running continuous batching.
//!
//! **Architecture invariant:** nothing outside this thread touches the context. The world talks
//! to it through the bounded submission channel, and it answers through each generation's
//! bounded event channel without ever blocking on a consumer.
//!
//! Each step, like llama-server's slots: free slots admit queued generations; one `llama_decode`
//! prefills chunks (up to `batch_tokens` in all) of the waiting prompts, and a second one feeds
//! every decoding sequence, a prompt finished just before included, its one next token; logits
//! are requested only where a token will be sampled, or a prompt token scored
//! (`Generation::prompt_logprobs`). Sequence ids are the slot indices, and each
//! has its own KV cache stream (non-unified cache), so a sequence's numbers do not depend on
//! where its neighbours' cells are.
//!
//! Why two calls rather than one mixed batch: llama.cpp splits a batch over separate KV streams
//! into equal per-sequence shares, which would hand a prefilling sequence a single-token share
//! next to the decoding ones, and a single query is computed by different kernels than a chunk
//! of queries. Keeping prompts in chunks of two or more and completion tokens alone makes every
//! token's numbers independent of what else runs (see `slot.rs`).
//!
//! That also needs every weight multiplication to compute a row the same way however many rows
//! share it. Two of llama.cpp's CPU kernels do not: the repacked weight layouts (one kernel
//! under four rows, another from four; llama.cpp is built without them, `.cargo/config.toml`)
//! and the tiled K-quant multiplication (from eight rows; switched off when the backend starts,
//! `tokenizer::backend`). What is left gives a row the bits of its own dot products: llamafile's
//! `sgemm` (two rows or more) and the dot product (one row) agree for weights, as the K-quant
//! tests on Qwen2.5-Coder-0.5B check (`tests/k_quants.rs`). They differ for attention over the
//! KV cache, hence the rule above.
//!
//! This module holds the thread's loop: admission, the step, sampling and the bench. Building
//! the step's two batches is in [`batch`], a sequence's KV cells in [`sequence`], and restoring a
//! prompt's head from a checkpoint in [`restore`].

pub(crate) mod batch;
mod restore;
pub(crate) mod sequence;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;

use crate::checkpoint::Shape;
use crate::constraint::{Constrained, GrammarCompiler};
use crate::sampler::Sampler;
use crate::slot::{Admission, SamplingTools, Slot, SlotFate};
use crate::{
    EngineConfig, EngineError, FinishReason, Generation, GenerationEvent, TokenId, Tokenizer,
};

use batch::{BatchEntry, Fed};
use sequence::{
    export_sequence, keep_sequence_head, release_sequence, retire_sequence, reusable_head,
};

pub use batch::PROMPT_SCORE_CHUNK_TOKENS;
pub use restore::RESTORE_CHECKED_TOKENS;
pub use sequence::CHECKPOINT_BYTES_MAX;

/// How long the thread sleeps when every live sequence is paused on a full consumer channel.
const PAUSED_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Work sent to the engine thread through the bounded submission channel.
pub(crate) enum Command {
    Generate(Box<Admission>),
    /// Measure speed like llama-bench; runs when no sequence is live.
    Bench {
        prefill_tokens: u32,
        decode_tokens: u32,
        reply: BenchReply,
    },
}

/// Where a bench's (prefill tokens/s, decode tokens/s) result goes.
pub(crate) type BenchReply = SyncSender<Result<(f64, f64), EngineError>>;

/// A bench request: prefill tokens, decode tokens, reply.
type PendingBench = (u32, u32, BenchReply);

/// Where the worker stands on new work.
enum Intake {
    Open,
    /// Every `Engine` handle is gone: finish what is live, then exit.
    Closed,
}

pub(crate) struct Worker<'model> {
    pub(crate) context: LlamaContext<'model>,
    pub(crate) batch: LlamaBatch<'static>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) sampler: Sampler,
    pub(crate) config: EngineConfig,
    /// Indexed by sequence id.
    slots: Vec<Option<Slot>>,
    /// Indexed by sequence id: the prompt head whose KV cells a free sequence still holds from
    /// its last occupant (all computed by prefilling), for a next prompt that starts the same
    /// way. Empty while the sequence is occupied.
    cached: Vec<Vec<TokenId>>,
    submissions: Receiver<Command>,
    shutdown: Arc<AtomicBool>,
    /// Live sequence count, published for [`crate::Engine::live_sequences`].
    live: Arc<AtomicU32>,
    /// A bench waiting for the live sequences to finish; no new work is admitted meanwhile.
    pending_bench: Option<PendingBench>,
    intake: Intake,
    /// Generations admitted so far; numbers them in arrival order.
    admissions: u64,
    /// The vocabulary's end-of-generation tokens, masked for generations that ignore them.
    end_of_generation: Vec<TokenId>,
    /// Scratch copy of one position's logits, adjusted by its generation's penalties, bias
    /// and end-of-generation mask.
    adjusted_logits: Vec<f32>,
    /// This model's vocabulary as grammars see it; built by the first generation with one.
    grammar_compiler: Option<GrammarCompiler>,
    /// The shape of this context's sequence state, learnt from a probe at the first restore;
    /// `Some(None)` when the probe failed (this model never restores, it prefills).
    state_shape: Option<Option<Shape>>,
}

impl<'model> Worker<'model> {
    pub fn new(
        context: LlamaContext<'model>,
        tokenizer: Tokenizer,
        config: EngineConfig,
        submissions: Receiver<Command>,
        shutdown: Arc<AtomicBool>,
        live: Arc<AtomicU32>,
    ) -> Self {
        let batch_capacity = config.batch_tokens as usize;
        let vocabulary = TokenId::try_from(tokenizer.vocab_size()).unwrap_or(TokenId::MAX);
        let end_of_generation = (0..vocabulary)
            .filter(|&token| tokenizer.is_end_of_generation(token))
            .collect();
        Self {
            context,
            batch: LlamaBatch::new(batch_capacity, 1),
            tokenizer,
            sampler: Sampler::new(),
            slots: (0..config.parallel_sequences).map(|_| None).collect(),
            cached: (0..config.parallel_sequences).map(|_| Vec::new()).collect(),
            config,
            submissions,
            shutdown,
            live,
            pending_bench: None,
            intake: Intake::Open,
            admissions: 0,
            end_of_generation,
            adjusted_logits: Vec::new(),
            grammar_compiler: None,
            state_shape: None,
        }
    }

    /// Serve until every `Engine` handle is dropped and the live sequences are done.
    pub fn run(mut self) {
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                self.cancel_everything();
                return;
            }
            self.tend_slots();
            self.publish_live();
            self.run_pending_bench();
            if !self.admit() {
                return;
            }
            self.publish_live();
            if !self.step() && self.live_count() > 0 {
                // Every live sequence is paused on its consumer (or just finished).
                std::thread::sleep(PAUSED_POLL_INTERVAL);
            }
        }
    }

    fn live_count(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    fn publish_live(&self) {
        let live = u32::try_from(self.live_count()).unwrap_or(u32::MAX);
        self.live.store(live, Ordering::Release);
    }

    /// Deliver held-back events, apply cancellations and free finished slots.
    fn tend_slots(&mut self) {
        let now = Instant::now();
        for index in 0..self.slots.len() {
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            if slot.is_cancelled() && !slot.is_finished() {
                slot.finish(FinishReason::Cancelled);
                retire_sequence(&mut self.context, &mut self.cached[index], slot);
            }
            if slot.flush(now) == SlotFate::Free {
                if !slot.is_finished() {
                    retire_sequence(&mut self.context, &mut self.cached[index], slot);
                }
                self.slots[index] = None;
            }
        }
    }

    /// Admit queued work into free slots. Returns false when the thread should exit.
    fn admit(&mut self) -> bool {
        while self.pending_bench.is_none() {
            if self.slots.iter().all(Option::is_some) {
                return true;
            }
            let command = match self.next_command() {
                Some(command) => command,
                None if matches!(self.intake, Intake::Closed) && self.live_count() == 0 => {
                    return false;
                }
                None => return true,
            };
            match command {
                Command::Generate(admission) => {
                    let (free, reusable) = self.best_free_slot(&admission.generation.prompt);
                    self.start_slot(free, reusable, *admission);
                }
                Command::Bench {
                    prefill_tokens,
                    decode_tokens,
                    reply,
                } => self.pending_bench = Some((prefill_tokens, decode_tokens, reply)),
            }
        }
        true
    }

    /// The next command: waits when nothing is live, otherwise only takes what is queued.
    fn next_command(&mut self) -> Option<Command> {
        if matches!(self.intake, Intake::Closed) {
            return None;
        }
        let received = if self.live_count() == 0 {
            // Wake up now and then to notice a shutdown even without a message.
            match self.submissions.recv_timeout(Duration::from_millis(100)) {
                Ok(command) => Ok(command),
                Err(RecvTimeoutError::Timeout) => Err(TryRecvError::Empty),
                Err(RecvTimeoutError::Disconnected) => Err(TryRecvError::Disconnected),
            }
        } else {
            self.submissions.try_recv()
        };
        match received {
            Ok(command) => Some(command),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.intake = Intake::Closed;
                None
            }
        }
    }

    /// The free sequence to start `prompt` in, and how many of its leading tokens that sequence
    /// holds already: the longest cached head shared with `prompt`, the lowest id among equals
    /// (llama.cpp batches runs of consecutive ids together). Only called with a free sequence.
    fn best_free_slot(&self, prompt: &[TokenId]) -> (usize, usize) {
        let free = (0..self.slots.len()).filter(|&index| self.slots[index].is_none());
        let reusable = |index: usize| reusable_head(&self.cached[index], prompt);
        free.map(|index| (index, reusable(index)))
            .min_by_key(|&(index, reusable)| (std::cmp::Reverse(reusable), index))
            .unwrap_or((0, 0))
    }

    fn start_slot(&mut self, index: usize, reusable: usize, mut admission: Admission) {
        if admission.cancel.is_cancelled() || admission.events.is_closed() {
            // Cancelled while queued: it never ran, so there is nothing to report but that.
            let _ = admission
                .events
                .try_send(GenerationEvent::Done(crate::GenerationDone {
                    reason: FinishReason::Cancelled,
                    prompt_tokens: u32::try_from(admission.generation.prompt.len())
                        .unwrap_or(u32::MAX),
                    completion_tokens: u32::try_from(admission.generation.committed.len())
                        .unwrap_or(u32::MAX),
                    compute: Duration::ZERO,
                    prompt_restored: false,
                    checkpoint_rejected: false,
                    prompt_reused: 0,
                    draft_taken: 0,
                }));
            return;
        }
        let seq_id = i32::try_from(index).unwrap_or(i32::MAX);
        self.cached[index].clear();
        self.admissions += 1;
        self.fit_draft(&mut admission.generation);
        // A scored prompt is prefilled whole: its tokens' logits are what is asked for. So is a
        // prompt followed by a draft.
        let scores_prompt = admission.generation.prompt_logprobs
            || admission.generation.verify.is_some()
            || !admission.generation.draft.is_empty();
        let restore = admission
            .generation
            .restore
            .take()
            .filter(|_| !scores_prompt);
        let grammar = admission
            .generation
            .grammar
            .take()
            .map(|grammar| self.constrained(&grammar, &admission.generation.committed));
        let (mut slot, mut already_over) =
            Slot::start(seq_id, self.admissions, admission, &self.tokenizer);
        match grammar {
            None => {}
            Some(Ok(grammar)) => {
                let complete = slot.follow(grammar);
                already_over = already_over.or(complete.then_some(FinishReason::Stop));
            }
            Some(Err(error)) => {
                release_sequence(&mut self.context, seq_id);
                slot.fail(EngineError::InvalidGeneration(format!("grammar: {error}")));
                self.slots[index] = Some(slot);
                return;
            }
        }
        // Keep the cells of the prompt's head the previous occupant left, if that is all there
        // is to load: they are the cells prefilling would compute again.
        let keep = if already_over.is_none() && restore.is_none() && !scores_prompt {
            reusable
        } else {
            0
        };
        if keep > 0 && keep_sequence_head(&mut self.context, seq_id, keep) {
            slot.reused_prompt_head(keep);
        } else {
            release_sequence(&mut self.context, seq_id);
        }
        if let Some(reason) = already_over {
            slot.finish(reason);
        } else if let Some(checkpoint) = restore {
            self.restore_prompt_head(&mut slot, checkpoint);
        }
        self.slots[index] = Some(slot);
    }

    /// Keeps of `generation`'s draft what this engine can follow: nothing on the default kernels
    /// (a prefilled token's numbers are not a decoded one's there) or after committed tokens,
    /// else what fits `max_tokens` and the context after the prompt and the token after it.
    fn fit_draft(&self, generation: &mut Generation) {
        if !self.config.reference_kernels || !generation.committed.is_empty() {
            generation.draft.clear();
            return;
        }
        let context = self.config.context_tokens_per_sequence as usize;
        let room = context.saturating_sub(generation.prompt.len() + 1);
        let fits = room.min(generation.max_tokens as usize);
        generation.draft.truncate(fits);
    }

    /// The state of `grammar` after `committed`, compiling for this model's vocabulary the first
    /// time a generation asks for a grammar.
    fn constrained(&mut self, grammar: &str, committed: &[TokenId]) -> Result<Constrained, String> {
        if self.grammar_compiler.is_none() {
            self.grammar_compiler = Some(GrammarCompiler::new(&self.tokenizer)?);
        }
        let compiler = self
            .grammar_compiler
            .as_ref()
            .ok_or("no grammar compiler")?;
        Constrained::start(compiler, grammar, committed)
    }

    /// One step: a prefill call for chunks of the waiting prompts, then a decode call for every
    /// sequence's next token. Returns false if there was nothing to do.
    ///
    /// Prefill goes first so that a prompt finished in this step decodes in this step's decode
    /// call: a sequence id missing from the middle of a decode batch makes llama.cpp cut it into
    /// two micro-batches (it only groups consecutive ids), each reading every weight.
    fn step(&mut self) -> bool {
        let prefilled = self.fill_prefill_batch();
        let did_prefill = !prefilled.is_empty();
        self.run_batch(&prefilled);
        // Hand a finished prompt's first token to its consumer before the decode call.
        if did_prefill {
            self.tend_slots();
        }
        let decoded = self.fill_decode_batch();
        let did_decode = !decoded.is_empty();
        self.run_batch(&decoded);
        did_decode || did_prefill
    }

    /// Decode the current batch, advance its sequences and sample where logits were asked for.
    fn run_batch(&mut self, entries: &[BatchEntry]) {
        if entries.is_empty() {
            return;
        }
        let decode_started = Instant::now();
        if let Err(error) = self.context.decode(&mut self.batch) {
            self.fail_batch(entries, &EngineError::Decode(error.to_string()));
            return;
        }
        self.share_compute(decode_started.elapsed());
        let mut tools = SamplingTools {
            end_of_generation: &self.end_of_generation,
            sampler: &mut self.sampler,
            scratch: &mut self.adjusted_logits,
            tokenizer: &self.tokenizer,
            context_tokens: self.config.context_tokens_per_sequence,
        };
        for entry in entries {
            let Some(slot) = self.slots[entry.slot].as_mut() else {
                continue;
            };
            match entry.kind {
                Fed::Prefill(count) => slot.advance_prefill(count),
                Fed::Decode => slot.advance_decode(),
            }
            // The prompt is complete over a checkpoint's head: check it before any logits count.
            if let Some((checkpoint, head)) = slot.take_restore_check() {
                let streams = self.config.parallel_sequences;
                let shape = self.state_shape.as_ref().and_then(Option::as_ref);
                if Self::check_restored_tail(
                    &self.context,
                    shape,
                    slot.seq_id,
                    streams,
                    &checkpoint,
                    head,
                ) {
                    slot.restore_confirmed();
                } else {
                    release_sequence(&mut self.context, slot.seq_id);
                    slot.restore_refuted();
                    continue;
                }
            }
            // Right after the prompt's last chunk, the cache holds the prompt and nothing else.
            if matches!(entry.kind, Fed::Prefill(_)) && slot.take_checkpoint_request() {
                let streams = self.config.parallel_sequences;
                if let Some(data) = export_sequence(&self.context, slot.seq_id, streams) {
                    slot.report_checkpoint(data);
                }
            }
            if let Some(scores) = entry.scores {
                let top_logprobs = slot.sampling().2;
                for offset in 0..scores.count {
                    let index = scores.first_token + offset;
                    let (Some(token), Ok(at)) = (
                        slot.prompt_token(index),
                        i32::try_from(offset).map(|offset| scores.first_logits + offset),
                    ) else {
                        break;
                    };
                    let raw = self.context.get_logits_ith(at);
                    if slot.drafts() {
                        match slot.sample_next(raw, &mut tools) {
                            Ok((token, finish)) => {
                                let followed = slot.follow_draft(index, token);
                                if let Some(reason) = finish {
                                    slot.finish(reason);
                                    retire_sequence(
                                        &mut self.context,
                                        &mut self.cached[entry.slot],
                                        slot,
                                    );
                                } else if followed {
                                    continue;
                                } else if !keep_sequence_head(&mut self.context, slot.seq_id, index)
                                {
                                    slot.fail(EngineError::Decode(
                                        "could not drop a draft's cells".to_owned(),
                                    ));
                                    release_sequence(&mut self.context, slot.seq_id);
                                }
                            }
                            Err(error) => {
                                slot.fail(EngineError::InvalidGeneration(format!(
                                    "grammar: {error}"
                                )));
                                release_sequence(&mut self.context, slot.seq_id);
                            }
                        }
                        // The answer ended or parted from the draft: the rest of the chunk's
                        // logits, the token after it included, are not its.
                        break;
                    }
                    if slot.verifies() {
                        slot.verify_token(
                            index,
                            raw,
                            tools.end_of_generation,
                            tools.sampler,
                            tools.scratch,
                        );
                    } else {
                        let scored = tools.sampler.score(raw, token, top_logprobs);
                        slot.score_prompt_token(index, &scored, tools.tokenizer);
                    }
                }
            }
            if matches!(entry.kind, Fed::Prefill(_)) {
                slot.report_prompt_scores();
            }
            let Some(batch_index) = entry.logits_at else {
                continue;
            };
            if slot.is_finished() || slot.decode_token().is_some() {
                // A draft ended the answer or parted from it inside this chunk: the chunk's last
                // logits follow a draft token the answer does not have.
                continue;
            }
            let raw = self.context.get_logits_ith(batch_index);
            if slot.verifies() {
                slot.finish_verification(
                    raw,
                    tools.end_of_generation,
                    tools.sampler,
                    tools.scratch,
                );
                retire_sequence(&mut self.context, &mut self.cached[entry.slot], slot);
                continue;
            }
            match slot.sample_next(raw, &mut tools) {
                Ok((_, None)) => {}
                Ok((_, Some(reason))) => {
                    slot.finish(reason);
                    retire_sequence(&mut self.context, &mut self.cached[entry.slot], slot);
                }
                Err(error) => {
                    slot.fail(EngineError::InvalidGeneration(format!("grammar: {error}")));
                    release_sequence(&mut self.context, slot.seq_id);
                }
            }
        }
    }

    /// Divides one decode call's time equally among the sequences running now (not finished,
    /// whether in this call or not), as the coordinator divides a node's time among the
    /// generations it runs, so that each reports its share and a batch's time is counted once.
    fn share_compute(&mut self, elapsed: Duration) {
        let running = self.slots.iter().flatten();
        let running = running.filter(|slot| !slot.is_finished()).count();
        let Ok(running @ 1..) = u32::try_from(running) else {
            return;
        };
        let share = elapsed / running;
        for slot in self.slots.iter_mut().flatten() {
            if !slot.is_finished() {
                slot.add_compute(share);
            }
        }
    }

    /// A failed decode leaves the affected sequences in an unknown state: end them all.
    fn fail_batch(&mut self, entries: &[BatchEntry], error: &EngineError) {
        tracing::error!(%error, "decode failed; failing the sequences in the batch");
        for entry in entries {
            if let Some(slot) = self.slots[entry.slot].as_mut() {
                slot.fail(error.clone());
                release_sequence(&mut self.context, slot.seq_id);
            }
        }
    }

    fn run_pending_bench(&mut self) {
        if self.live_count() > 0 {
            return;
        }
        if let Some((prefill_tokens, decode_tokens, reply)) = self.pending_bench.take() {
            // The bench uses a sequence of its own and leaves it empty.
            let bench_seq = crate::bench::BENCH_SEQ_ID;
            release_sequence(&mut self.context, bench_seq);
            if let Some(cached) = usize::try_from(bench_seq)
                .ok()
                .and_then(|i| self.cached.get_mut(i))
            {
                cached.clear();
            }
            let result = crate::bench::run(self, prefill_tokens, decode_tokens);
            // The caller may have given up waiting; nothing to do then.
            let _ = reply.send(result);
        }
    }

    /// The engine is being dropped: end every live and queued generation.
    fn cancel_everything(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            slot.finish(FinishReason::Cancelled);
            let _ = slot.flush(Instant::now());
        }
        self.slots.iter_mut().for_each(|slot| *slot = None);
        self.publish_live();
        self.context.clear_kv_cache();
        self.cached.iter_mut().for_each(Vec::clear);
        while let Ok(command) = self.submissions.try_recv() {
            match command {
                Command::Generate(admission) => {
                    let _ = admission
                        .events
                        .try_send(GenerationEvent::Failed(EngineError::Stopped));
                }
                Command::Bench { reply, .. } => {
                    let _ = reply.send(Err(EngineError::Stopped));
                }
            }
        }
    }
}
