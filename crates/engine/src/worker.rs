//! The engine thread: the only owner of the llama.cpp context, running continuous batching.
//!
//! **Architecture invariant:** nothing outside this thread touches the context. The world talks
//! to it through the bounded submission channel, and it answers through each generation's
//! bounded event channel without ever blocking on a consumer.
//!
//! Each step, like llama-server's slots: free slots admit queued generations; one `llama_decode`
//! prefills chunks (up to `batch_tokens` in all) of the waiting prompts, and a second one feeds
//! every decoding sequence, a prompt finished just before included, its one next token; logits
//! are requested only where a token will be sampled. Sequence ids are the slot indices, and each
//! has its own KV cache stream (non-unified cache), so a sequence's numbers do not depend on
//! where its neighbours' cells are.
//!
//! Why two calls rather than one mixed batch: llama.cpp splits a batch over separate KV streams
//! into equal per-sequence shares, which would hand a prefilling sequence a single-token share
//! next to the decoding ones, and a single query is computed by different kernels than a chunk
//! of queries. Keeping prompts in chunks of two or more and completion tokens alone makes every
//! token's numbers independent of what else runs (see `slot.rs`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::LlamaStateSeqFlags;

use crate::checkpoint::{Section, Shape, TAIL_DISTANCE_MAX};
use crate::sampler::Sampler;
use crate::slot::{Admission, Slot, SlotFate};
use crate::{
    EngineConfig, EngineError, FinishReason, GenerationEvent, SequenceCheckpoint, TokenId,
    Tokenizer,
};

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
    /// Scratch copy of one position's logits with those tokens masked.
    masked_logits: Vec<f32>,
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
            masked_logits: Vec::new(),
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
                }));
            return;
        }
        let seq_id = i32::try_from(index).unwrap_or(i32::MAX);
        self.cached[index].clear();
        self.admissions += 1;
        let restore = admission.generation.restore.take();
        let (mut slot, already_over) =
            Slot::start(seq_id, self.admissions, admission, &self.tokenizer);
        // Keep the cells of the prompt's head the previous occupant left, if that is all there
        // is to load: they are the cells prefilling would compute again.
        let keep = if already_over.is_none() && restore.is_none() {
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

    /// Loads the head of `checkpoint` into `slot`'s (empty) sequence: every cell but the
    /// prompt's last [`RESTORE_CHECKED_TOKENS`], which the slot then prefills itself and compares
    /// (see [`Worker::check_restored_tail`]). The checkpoint is parsed and checked here first
    /// (cell count, positions `0..tokens`, one sequence per cell, this context's layers, types
    /// and sizes), and llama.cpp only sees metadata written here; anything wrong leaves the
    /// sequence empty and the prompt to be prefilled.
    fn restore_prompt_head(&mut self, slot: &mut Slot, checkpoint: Arc<SequenceCheckpoint>) {
        let prompt_len = slot.prompt_len();
        if prompt_len < RESTORE_PROMPT_TOKENS_MIN || checkpoint.data.len() > CHECKPOINT_BYTES_MAX {
            // Too short to be worth checking, or more than this engine ever exports: prefill.
            return;
        }
        let Some(shape) = self.state_shape(slot.seq_id) else {
            return;
        };
        if checkpoint.tokens as usize != prompt_len {
            tracing::warn!(
                seq_id = slot.seq_id,
                tokens = checkpoint.tokens,
                prompt_len,
                "a checkpoint does not cover the prompt; prefilling it"
            );
            slot.checkpoint_rejected();
            return;
        }
        let section = match Section::parse(&checkpoint.data, prompt_len, Some(&shape)) {
            Ok(section) => section,
            Err(malformed) => {
                tracing::warn!(
                    seq_id = slot.seq_id,
                    ?malformed,
                    "a malformed checkpoint was refused; prefilling the prompt"
                );
                slot.checkpoint_rejected();
                return;
            }
        };
        let head = prompt_len - RESTORE_CHECKED_TOKENS;
        let streams = self.config.parallel_sequences;
        let state = with_streams(&section.head(head), streams as usize);
        if load_sequence(&mut self.context, slot.seq_id, &state, head) {
            slot.restored_head(head, checkpoint);
        } else {
            // Metadata written here, shape checked: llama.cpp should not refuse it.
            release_sequence(&mut self.context, slot.seq_id);
            slot.checkpoint_rejected();
        }
    }

    /// The shape of this context's sequence sections, probed once: two tokens decoded into the
    /// (empty) sequence `seq_id`, exported, parsed, and removed again.
    fn state_shape(&mut self, seq_id: i32) -> Option<Shape> {
        if let Some(shape) = &self.state_shape {
            return shape.clone();
        }
        let streams = self.config.parallel_sequences;
        self.batch.clear();
        let fed = add_token(&mut self.batch, 0, 0, seq_id, false)
            && add_token(&mut self.batch, 0, 1, seq_id, true);
        let probed = (fed && self.context.decode(&mut self.batch).is_ok())
            .then(|| export_sequence(&self.context, seq_id, streams))
            .flatten();
        self.batch.clear();
        release_sequence(&mut self.context, seq_id);
        let shape = probed
            .as_deref()
            .and_then(|section| Section::parse(section, 2, None).ok())
            .map(|section| section.shape());
        if shape.is_none() {
            tracing::warn!("this model's kv cells are not in the layout checkpoints are checked in; prompts are always prefilled");
        }
        self.state_shape = Some(shape.clone());
        shape
    }

    /// The prompt of `slot` is all in its cells, the head loaded from a checkpoint and the rest
    /// prefilled here: true when the cells computed here for the rest agree with the
    /// checkpoint's for the same positions (computed on top of the same head, they differ by
    /// rounding at most, unless the checkpoint was made for other tokens).
    fn check_restored_tail(
        context: &LlamaContext<'_>,
        shape: Option<&Shape>,
        seq_id: i32,
        streams: u32,
        checkpoint: &SequenceCheckpoint,
        head: usize,
    ) -> bool {
        let tokens = checkpoint.tokens as usize;
        let Some(ours) = export_sequence(context, seq_id, streams) else {
            return false;
        };
        let (Ok(ours), Ok(theirs)) = (
            Section::parse(&ours, tokens, shape),
            Section::parse(&checkpoint.data, tokens, shape),
        ) else {
            return false;
        };
        let distance = ours.tail_distance(&theirs, head);
        let agrees = distance <= TAIL_DISTANCE_MAX;
        if !agrees {
            tracing::warn!(
                seq_id,
                distance,
                "a checkpoint's cells are not this prompt's; prefilling it instead"
            );
        }
        agrees
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
        let context_tokens = self.config.context_tokens_per_sequence;
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
            let Some(batch_index) = entry.logits_at else {
                continue;
            };
            let mut logits = self.context.get_logits_ith(batch_index);
            if slot.ignores_eos() {
                let masked = &mut self.masked_logits;
                masked.clear();
                masked.extend_from_slice(logits);
                for &token in &self.end_of_generation {
                    if let Some(logit) = usize::try_from(token).ok().and_then(|i| masked.get_mut(i))
                    {
                        *logit = f32::NEG_INFINITY;
                    }
                }
                logits = masked;
            }
            let (params, position, top_logprobs) = slot.sampling();
            let sampled = self.sampler.sample(logits, params, position, top_logprobs);
            if let Some(reason) = slot.accept(&sampled, &self.tokenizer, context_tokens) {
                slot.finish(reason);
                retire_sequence(&mut self.context, &mut self.cached[entry.slot], slot);
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

    /// Every runnable sequence past its prompt contributes its one next token, in sequence id
    /// order (llama.cpp groups runs of consecutive ids into one micro-batch).
    fn fill_decode_batch(&mut self) -> Vec<BatchEntry> {
        let batch = &mut self.batch;
        batch.clear();
        let mut entries = Vec::with_capacity(self.slots.len());
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot.as_ref().filter(|slot| slot.is_runnable()) else {
                continue;
            };
            let Some((token, wants_logits)) = slot.decode_token() else {
                continue;
            };
            let logits_at = batch.n_tokens();
            // With more sequences than batch room, the last ones wait a step (and keep their token).
            if add_token(batch, token, slot.kv_tokens, slot.seq_id, wants_logits) {
                let logits_at = wants_logits.then_some(logits_at);
                entries.push(BatchEntry {
                    slot: index,
                    kind: Fed::Decode,
                    logits_at,
                });
            }
        }
        entries
    }

    /// Chunks of the waiting prompts, the oldest first, as [`plan_prefill`] groups them: one
    /// llama.cpp call prefills several prompts when that feeds more tokens than the oldest alone.
    fn fill_prefill_batch(&mut self) -> Vec<BatchEntry> {
        let batch = &mut self.batch;
        batch.clear();
        let mut waiting: Vec<(usize, &Slot)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| Some((index, slot.as_ref()?)))
            .filter(|(_, slot)| slot.is_runnable() && !slot.prefill_remaining().is_empty())
            .collect();
        waiting.sort_by_key(|(_, slot)| slot.admitted);
        let remaining: Vec<usize> = waiting
            .iter()
            .map(|(_, slot)| slot.prefill_remaining().len())
            .collect();
        let (members, chunk) = plan_prefill(&remaining, self.config.batch_tokens as usize);
        let mut group: Vec<_> = members.into_iter().map(|member| waiting[member]).collect();
        // Ascending sequence ids: llama.cpp puts a run of consecutive ids in one micro-batch.
        group.sort_by_key(|(_, slot)| slot.seq_id);
        let mut entries = Vec::with_capacity(group.len());
        for (index, slot) in group {
            let remaining = slot.prefill_remaining();
            let completes_prompt = chunk == remaining.len();
            let samples = completes_prompt && slot.samples_after_prompt();
            for (offset, &token) in remaining[..chunk].iter().enumerate() {
                let wants_logits = samples && offset + 1 == chunk;
                let position = slot
                    .kv_tokens
                    .saturating_add(u32::try_from(offset).unwrap_or(u32::MAX));
                if !add_token(batch, token, position, slot.seq_id, wants_logits) {
                    // Cannot happen: the plan fits the batch capacity. Feed nothing rather than
                    // a partial chunk whose bookkeeping would be wrong.
                    batch.clear();
                    return Vec::new();
                }
            }
            entries.push(BatchEntry {
                slot: index,
                kind: Fed::Prefill(chunk),
                logits_at: samples.then(|| batch.n_tokens() - 1),
            });
        }
        entries
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

/// Which work of a slot went into the batch.
#[derive(Clone, Copy, Debug)]
enum Fed {
    Prefill(usize),
    Decode,
}

#[derive(Clone, Copy, Debug)]
struct BatchEntry {
    slot: usize,
    kind: Fed,
    /// Index in the batch whose logits are this slot's next token distribution.
    logits_at: Option<i32>,
}

/// How many of `remaining` prompt tokens to prefill now, with `capacity` room: as many as fit,
/// but never leaving a single token for the next chunk, because a one-token chunk is computed
/// like a decode and would round differently from the same prompt chunked otherwise.
fn prefill_chunk_len(remaining: usize, capacity: usize) -> usize {
    if remaining <= capacity {
        return remaining;
    }
    if remaining - capacity == 1 && capacity > 2 {
        return capacity - 1;
    }
    capacity
}

/// Which waiting prompts one prefill call takes and how many tokens of each: given the tokens
/// each still has to prefill, oldest first, returns the indices of the prompts taken (the oldest
/// always among them, in age order) and the chunk each of them gets.
///
/// Every member gets the same chunk, so that llama.cpp (which, with one KV stream per sequence,
/// cuts a batch into micro-batches of an equal share per sequence) computes each member's tokens
/// in one piece, exactly as if it were alone. A group's chunk is at least 2 tokens and leaves no
/// member a single token for later (see [`prefill_chunk_len`]); prompts with one token left go
/// alone. The plan is the one that feeds the most tokens within `capacity`; the oldest alone wins
/// ties, so a long prompt is not slowed down by short ones that arrived after it.
fn plan_prefill(remaining: &[usize], capacity: usize) -> (Vec<usize>, usize) {
    let Some(&oldest) = remaining.first() else {
        return (Vec::new(), 0);
    };
    let fits = |left: usize, chunk: usize| left == chunk || left >= chunk + 2;
    let mut best = (vec![0], prefill_chunk_len(oldest, capacity));
    for chunk in (2..=oldest.min(capacity / 2)).filter(|&chunk| fits(oldest, chunk)) {
        if (capacity / chunk) * chunk <= best.0.len() * best.1 {
            continue;
        }
        let members: Vec<usize> = (0..remaining.len())
            .filter(|&index| fits(remaining[index], chunk))
            .take(capacity / chunk)
            .collect();
        if members.len() * chunk > best.0.len() * best.1 {
            best = (members, chunk);
        }
    }
    best
}

/// Add one token to `batch`; false when the batch is full (or the position is out of range).
pub(crate) fn add_token(
    batch: &mut LlamaBatch<'_>,
    token: i32,
    position: u32,
    seq_id: i32,
    logits: bool,
) -> bool {
    let Ok(position) = i32::try_from(position) else {
        return false;
    };
    batch
        .add(LlamaToken(token), position, &[seq_id], logits)
        .is_ok()
}

/// The largest sequence checkpoint exported or loaded; a longer context is re-prefilled instead.
pub const CHECKPOINT_BYTES_MAX: usize = 64 << 20;

/// A copy of a sequence's KV cells in the portable form of [`SequenceCheckpoint`], or `None`
/// (logged) when it is empty, too large or not shaped as expected.
fn export_sequence(context: &LlamaContext<'_>, seq_id: i32, streams: u32) -> Option<Vec<u8>> {
    let flags = LlamaStateSeqFlags::empty();
    let size = context.state_seq_get_size_ext(seq_id, flags);
    if size == 0 || size > CHECKPOINT_BYTES_MAX {
        tracing::warn!(
            seq_id,
            size,
            "sequence checkpoint not exported: empty or too large"
        );
        return None;
    }
    let mut data = vec![0_u8; size];
    // SAFETY: `data` holds the `size` bytes llama.cpp just said this sequence's state needs, and
    // nothing else touches the context meanwhile (this thread owns it).
    let written = unsafe { context.state_seq_get_data_ext(data.as_mut_ptr(), seq_id, flags) };
    if written == 0 || written > size {
        tracing::warn!(seq_id, written, "sequence checkpoint export failed");
        return None;
    }
    data.truncate(written);
    let stream = usize::try_from(seq_id).ok()?;
    let section = own_stream_section(&data, stream, streams as usize);
    if section.is_none() {
        tracing::warn!(
            seq_id,
            "sequence checkpoint not exported: unexpected layout"
        );
    }
    section
}

/// Prompt tokens a restoring engine prefills itself, after a checkpoint's other cells, and
/// compares with the checkpoint's cells for them. Two would keep the invariant that a prompt's
/// last two tokens are always prefilled; sixteen also reach past a chat template's closing
/// tokens (the same in every chat prompt) into the tokens that tell prompts apart.
pub const RESTORE_CHECKED_TOKENS: usize = 16;

/// Shortest prompt restored from a checkpoint (a head of at least two cells is loaded); shorter
/// ones are prefilled whole.
const RESTORE_PROMPT_TOKENS_MIN: usize = RESTORE_CHECKED_TOKENS + 2;

/// Loads `state` (a sequence state whose metadata this engine wrote: positions `0..cells`) into
/// the empty sequence `seq_id`. True only when llama.cpp accepted it and the sequence then holds
/// exactly positions `0..cells`.
fn load_sequence(context: &mut LlamaContext<'_>, seq_id: i32, state: &[u8], cells: usize) -> bool {
    // SAFETY: llama.cpp reads at most `state.len()` bytes and checks the format as it goes
    // (stream and cell counts against this context, tensor types and sizes against the model),
    // failing with 0 rather than reading past the buffer. The cell metadata in `state` was
    // written by this engine, so a failed load leaves no cell that `seq_rm` cannot remove.
    let loaded =
        unsafe { context.state_seq_set_data_ext(state, seq_id, LlamaStateSeqFlags::empty()) };
    let last = i64::try_from(cells).unwrap_or(i64::MAX) - 1;
    let shaped = context.kv_cache_seq_pos_min(seq_id) == 0
        && i64::from(context.kv_cache_seq_pos_max(seq_id)) == last;
    if !(loaded && shaped) {
        tracing::warn!(
            seq_id,
            cells,
            loaded,
            "a sequence checkpoint did not load; prefilling the prompt instead"
        );
        return false;
    }
    true
}

/// The magic number llama.cpp puts at the head of a sequence state.
const SEQUENCE_STATE_MAGIC: u32 = 0xaf14_3cd8;

/// The bytes of one stream's section in llama.cpp's sequence state, which is laid out as
/// `u32 magic`, `i32 seq_id`, `u32 n_stream`, then per stream `u32 cell_count` and, when it is
/// not 0, the cells. With one KV stream per sequence only the sequence's own stream has cells;
/// keeping just its section makes a checkpoint loadable by an engine with another number of
/// sequences, into any sequence.
fn own_stream_section(state: &[u8], stream: usize, streams: usize) -> Option<Vec<u8>> {
    const WORD: usize = std::mem::size_of::<u32>();
    if stream >= streams {
        return None;
    }
    let before = WORD * (3 + stream);
    let after = WORD * (streams - stream - 1);
    if state.len() < before + WORD + after {
        return None;
    }
    let word = |at: usize| state[at..at + WORD].try_into().ok().map(u32::from_ne_bytes);
    let empty = |bytes: &[u8]| bytes.iter().all(|&byte| byte == 0);
    let section = &state[before..state.len() - after];
    let shaped = word(0)? == SEQUENCE_STATE_MAGIC
        && word(2 * WORD)? as usize == streams
        && empty(&state[3 * WORD..before])
        && empty(&state[state.len() - after..])
        && !empty(&section[..WORD]);
    shaped.then(|| section.to_vec())
}

/// A section from [`own_stream_section`] as the sequence state of a context with `streams`
/// streams: llama.cpp loads a non-empty section into the destination sequence's own stream,
/// whichever place it has, so the others follow as empty.
fn with_streams(section: &[u8], streams: usize) -> Vec<u8> {
    const WORD: usize = std::mem::size_of::<u32>();
    let mut state = Vec::with_capacity(section.len() + WORD * (streams + 2));
    state.extend_from_slice(&SEQUENCE_STATE_MAGIC.to_ne_bytes());
    // The sequence it was saved from; llama.cpp reads and ignores it.
    state.extend_from_slice(&0_u32.to_ne_bytes());
    state.extend_from_slice(&u32::try_from(streams).unwrap_or(u32::MAX).to_ne_bytes());
    state.extend_from_slice(section);
    state.resize(state.len() + WORD * streams.saturating_sub(1), 0);
    state
}

/// How many leading tokens of `prompt` a sequence holding the cells of `cached` can keep: their
/// common head, but leaving at least two prompt tokens to prefill (the last one's logits are
/// needed, and a one-token chunk is computed like a decode; see [`prefill_chunk_len`]).
fn reusable_head(cached: &[TokenId], prompt: &[TokenId]) -> usize {
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(cached, prompt)| cached == prompt)
        .count();
    common.min(prompt.len().saturating_sub(2))
}

/// Frees a sequence's cells from position `keep` on, leaving its first `keep` tokens. False when
/// llama.cpp cannot cut the sequence there; the caller then empties it.
fn keep_sequence_head(context: &mut LlamaContext<'_>, seq_id: i32, keep: usize) -> bool {
    let (Ok(seq), Ok(keep)) = (u32::try_from(seq_id), u32::try_from(keep)) else {
        return false;
    };
    let kept = matches!(
        context.clear_kv_cache_seq(Some(seq), Some(keep), None),
        Ok(true)
    ) && context.kv_cache_seq_pos_min(seq_id) == 0
        && i64::from(context.kv_cache_seq_pos_max(seq_id)) == i64::from(keep) - 1;
    if !kept {
        tracing::warn!(
            seq_id,
            keep,
            "could not keep a sequence's prompt head; prefilling it"
        );
    }
    kept
}

/// The occupant of `slot`'s sequence is done: keep the cells of its prefilled prompt for a
/// next prompt with the same head (remembered in `cached`), free the rest.
fn retire_sequence(context: &mut LlamaContext<'_>, cached: &mut Vec<TokenId>, slot: &Slot) {
    cached.clear();
    let head = slot.prefilled_prompt();
    if !head.is_empty() && keep_sequence_head(context, slot.seq_id, head.len()) {
        cached.extend_from_slice(head);
    } else {
        release_sequence(context, slot.seq_id);
    }
}

/// Free a sequence's KV cells so the next occupant of the slot starts empty.
pub(crate) fn release_sequence(context: &mut LlamaContext<'_>, seq_id: i32) {
    let Ok(seq) = u32::try_from(seq_id) else {
        return;
    };
    if let Err(error) = context.clear_kv_cache_seq(Some(seq), None, None) {
        tracing::error!(%error, seq_id, "could not clear a sequence's kv cache");
    }
}

#[cfg(test)]
mod tests {
    use super::{own_stream_section, plan_prefill, prefill_chunk_len, reusable_head, with_streams};

    fn words(values: &[u32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|value| value.to_ne_bytes())
            .collect()
    }

    #[test]
    fn a_sequence_state_moves_between_contexts_with_different_stream_counts() {
        const MAGIC: u32 = super::SEQUENCE_STATE_MAGIC;
        // Sequence 1 of three streams: its own stream holds 2 cells and their data.
        let exported = words(&[MAGIC, 1, 3, 0, 2, 0xAAAA, 0xBBBB, 0]);
        let section = own_stream_section(&exported, 1, 3).unwrap();
        assert_eq!(section, words(&[2, 0xAAAA, 0xBBBB]));
        assert_eq!(
            with_streams(&section, 1),
            words(&[MAGIC, 0, 1, 2, 0xAAAA, 0xBBBB])
        );
        assert_eq!(
            with_streams(&section, 2),
            words(&[MAGIC, 0, 2, 2, 0xAAAA, 0xBBBB, 0])
        );
        // Anything else is not what this engine exports.
        assert!(
            own_stream_section(&exported, 0, 3).is_none(),
            "another stream's cells"
        );
        assert!(
            own_stream_section(&exported, 1, 2).is_none(),
            "stream count"
        );
        let no_magic = words(&[7, 1, 3, 0, 2, 0xAAAA, 0xBBBB, 0]);
        assert!(own_stream_section(&no_magic, 1, 3).is_none(), "magic");
        let no_cells = words(&[MAGIC, 1, 3, 0, 0, 0]);
        assert!(own_stream_section(&no_cells, 1, 3).is_none(), "no cells");
        assert!(
            own_stream_section(&words(&[MAGIC]), 0, 1).is_none(),
            "too short"
        );
    }

    #[test]
    fn prefill_chunks_never_leave_a_single_token_behind() {
        assert_eq!(prefill_chunk_len(10, 512), 10);
        assert_eq!(prefill_chunk_len(512, 512), 512);
        assert_eq!(prefill_chunk_len(513, 512), 511);
        assert_eq!(prefill_chunk_len(514, 512), 512);
        assert_eq!(prefill_chunk_len(1, 512), 1);
        assert_eq!(prefill_chunk_len(3, 2), 2);
    }

    #[test]
    fn waiting_prompts_are_prefilled_together_in_equal_chunks() {
        let plan = |remaining: &[usize], capacity| {
            let (members, chunk) = plan_prefill(remaining, capacity);
            (members.len(), chunk)
        };
        assert_eq!(plan_prefill(&[], 512), (vec![], 0));
        // Alone, a prompt is chunked as before.
        assert_eq!(plan(&[1000], 512), (1, 512));
        assert_eq!(plan(&[513], 512), (1, 511));
        // Eight short prompts that arrived together go in one call.
        assert_eq!(plan(&[50; 8], 512), (8, 50));
        // A long prompt is not slowed down by a short one behind it.
        assert_eq!(plan(&[1000, 50], 512), (1, 512));
        // 50 would leave the second prompt one token, 49 the first: 48 each.
        assert_eq!(plan(&[50, 51], 512), (2, 48));
        // Two chunks of 32 feed more than three of 21.
        assert_eq!(plan(&[40, 40, 40], 64), (2, 32));
        // A prompt with one token left goes alone; two tokens still group, and a group never
        // leaves one token behind: the prompt that would be left one waits for the next call.
        assert_eq!(plan(&[1, 40], 512), (1, 1));
        assert_eq!(plan(&[2, 2], 512), (2, 2));
        assert_eq!(plan_prefill(&[2, 3, 2], 512), (vec![0, 2], 2));
        assert_eq!(plan_prefill(&[40, 1, 40], 512), (vec![0, 2], 40));
    }

    #[test]
    fn a_prefill_plan_fits_the_batch_and_leaves_no_single_token() {
        // A small deterministic generator: the plan must hold for any mix of waiting prompts.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound).unwrap()
        };
        for _ in 0..20_000 {
            let capacity = 2 + next(600);
            let remaining: Vec<usize> = (0..1 + next(8)).map(|_| 1 + next(1200)).collect();
            let (members, chunk) = plan_prefill(&remaining, capacity);
            assert_eq!(members.first(), Some(&0), "{remaining:?}");
            assert!(members.windows(2).all(|pair| pair[0] < pair[1]));
            assert!(
                members.len() * chunk <= capacity,
                "{remaining:?} {capacity}"
            );
            let alone = prefill_chunk_len(remaining[0], capacity);
            if members.len() > 1 {
                assert!(chunk >= 2);
                for &member in &members {
                    let left = remaining[member];
                    assert!(left == chunk || left >= chunk + 2, "{remaining:?} {chunk}");
                }
                assert!(members.len() * chunk > alone);
            } else {
                assert_eq!(chunk, alone);
            }
        }
    }

    #[test]
    fn a_cached_head_is_reused_up_to_two_tokens_before_the_prompt_ends() {
        assert_eq!(reusable_head(&[], &[1, 2, 3, 4]), 0);
        assert_eq!(reusable_head(&[1, 2, 9, 9], &[1, 2, 3, 4, 5]), 2);
        // The same prompt, or one that the cache covers: the last two tokens are prefilled.
        assert_eq!(reusable_head(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5]), 3);
        assert_eq!(reusable_head(&[1, 2, 3, 4, 5, 6], &[1, 2, 3, 4]), 2);
        assert_eq!(reusable_head(&[1, 2], &[1, 2]), 0);
        assert_eq!(reusable_head(&[7, 2, 3], &[1, 2, 3, 4]), 0);
    }
}
