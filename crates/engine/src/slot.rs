//! One live sequence on the engine thread: its tokens, its place in the KV cache, its stop
//! conditions and its outgoing events.
//!
//! A slot's tokens reach the model in two ways. The prompt is prefilled in chunks of at least
//! two tokens. Every completion token, sampled here or committed elsewhere and replayed on
//! resumption, is fed alone, one per decode step. llama.cpp computes attention for a single query
//! differently from a chunk of queries (different kernels, different rounding), so this is what
//! makes a resumed generation's KV cache, and so its continuation, identical to the original's.
//!
//! A slot never blocks on its consumer. Events that do not fit the consumer's bounded channel
//! wait in a tiny outbox, and while the outbox is not empty the slot is not decoded (it pauses).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::adjust::Penalised;
use crate::constraint::Constrained;
use crate::generation::CONSUMER_STALL_TIMEOUT;
use crate::sampler::{Sampled, Sampler};
use crate::text::TextAssembler;
use crate::verify::{check_end, check_token, Tolerance, Verification};
use crate::{
    CancelHandle, FinishReason, Generation, GenerationDone, GenerationEvent, SamplingParams,
    SequenceCheckpoint, TokenEvent, TokenId, Tokenizer, TopLogprob,
};

/// Most events a slot ever holds back: a checkpoint, the prompt's scores, the tokens and the final
/// event of the same step (a slot with a non-empty outbox is not decoded or prefilled, so nothing
/// more can pile up). A step gives one token, or, following a draft, one per draft token of a
/// prefill chunk and then the one after it.
const OUTBOX_CAPACITY: usize = 4 + crate::PROMPT_SCORE_CHUNK_TOKENS;

/// A generation admitted to the engine thread, waiting for (or occupying) a slot.
#[derive(Debug)]
pub(crate) struct Admission {
    pub generation: Generation,
    pub events: Sender<GenerationEvent>,
    pub cancel: CancelHandle,
}

/// What the scheduler should do with a slot after looking at its consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotFate {
    /// Keep it: it is decoding, or still delivering its last events.
    Keep,
    /// Free it: its events are all delivered (or nobody will ever read them).
    Free,
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub seq_id: i32,
    /// Admission order, so prompts are prefilled first come, first served.
    pub admitted: u64,
    prompt: Vec<TokenId>,
    /// How many prompt tokens are in the KV cache.
    prefilled: usize,
    /// Completion tokens produced elsewhere, replayed one per step after the prompt.
    committed: Vec<TokenId>,
    /// How many committed tokens are in the KV cache.
    replayed: usize,
    /// Tokens in this sequence's KV cache; also the position of the next token fed.
    pub kv_tokens: u32,
    /// Sampled and emitted, not yet fed back into the model.
    pending_token: Option<TokenId>,
    /// Completion position of the next sampled token.
    position: u32,
    prompt_tokens: u32,
    max_tokens: u32,
    sampling: SamplingParams,
    top_logprobs: u32,
    /// Penalties, bias and the end-of-generation mask, with the completion so far.
    adjust: Penalised,
    /// The grammar the completion follows, if any.
    grammar: Option<Constrained>,
    text: TextAssembler,
    events: Sender<GenerationEvent>,
    cancel: CancelHandle,
    outbox: VecDeque<GenerationEvent>,
    /// When the outbox last went from empty to non-empty.
    stalled_since: Option<Instant>,
    /// The final event has been produced; the KV cells are already released.
    finished: bool,
    /// This sequence's share of the decode calls since it was admitted (see
    /// `Worker::share_compute`).
    compute: Duration,
    /// A checkpoint of the prompt's KV cache is still to be reported.
    export_checkpoint: bool,
    /// The prompt's KV cache was loaded from a checkpoint and its check passed.
    prompt_restored: bool,
    /// The sequence holds cells loaded from a checkpoint (checked or not): never kept for reuse.
    restored_cells: bool,
    /// The checkpoint whose head was loaded and how many cells that head has: once this engine
    /// has prefilled the rest of the prompt, its cells are compared with the checkpoint's.
    restore_check: Option<(Arc<SequenceCheckpoint>, usize)>,
    /// A checkpoint was offered and refused: malformed, or its cells were not this prompt's.
    checkpoint_rejected: bool,
    /// Leading prompt tokens found in the sequence's cells from its previous occupant.
    prompt_reused: u32,
    /// The prompt is scored (`Generation::prompt_logprobs`): the scores so far, until they are
    /// reported once the whole prompt is prefilled.
    prompt_scores: Option<Vec<TokenEvent>>,
    /// Whether the prompt was prefilled to be scored (its cells are not kept for reuse).
    scored: bool,
    /// A reported completion being checked (`Generation::verify`); its tokens follow the
    /// prompt's in `prompt`.
    verifying: Option<Box<Verifying>>,
    /// While a draft is followed (`Generation::draft`): the index in `prompt` of its first
    /// token, the draft's tokens following the prompt's there.
    drafting: Option<usize>,
    /// Draft tokens the completion took as they were prefilled.
    draft_taken: u32,
}

/// The state of a verification: the completion's place in the prefilled tokens, what was
/// reported with it, and what the checks found so far.
#[derive(Debug)]
struct Verifying {
    /// Index in `Slot::prompt` of the first completion token.
    start: usize,
    /// Leading completion tokens taken as given: replayed, not checked.
    given: usize,
    /// The reported log-probability of each checked completion token.
    logprobs: Vec<f32>,
    ended_by_eos: bool,
    tolerance: Tolerance,
    /// Penalties and bias after the completion tokens checked so far.
    adjust: Penalised,
    outcome: Verification,
}

impl Slot {
    /// Start `admission` in sequence `seq_id`. Returns the slot, and the finish reason when the
    /// generation is already over before any decoding (`max_tokens` reached by committed tokens,
    /// or a stop sequence inside them).
    pub fn start(
        seq_id: i32,
        admitted: u64,
        admission: Admission,
        tokenizer: &Tokenizer,
    ) -> (Self, Option<FinishReason>) {
        let Admission {
            generation,
            events,
            cancel,
        } = admission;
        let mut generation = generation;
        let mut text = TextAssembler::new(generation.stop);
        for &token in &generation.committed {
            text.push(&tokenizer.piece(token));
        }
        let position = saturating_u32(generation.committed.len());
        let verifying = generation.verify.take().map(|verify| {
            let start = generation.prompt.len();
            let adjust = Penalised::new(
                generation.adjustments.clone(),
                generation.ignore_eos,
                &generation.prompt,
                &[],
            );
            generation.prompt.extend_from_slice(&verify.completion);
            Box::new(Verifying {
                start,
                given: usize::try_from(verify.given).unwrap_or(usize::MAX),
                logprobs: verify.logprobs,
                ended_by_eos: verify.ended_by_eos,
                tolerance: verify.tolerance,
                adjust,
                outcome: Verification::default(),
            })
        });
        let already_over = if verifying.is_some() {
            None
        } else if text.stopped() {
            Some(FinishReason::Stop)
        } else if position >= generation.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let adjust = Penalised::new(
            generation.adjustments,
            generation.ignore_eos,
            &generation.prompt,
            &generation.committed,
        );
        let prompt_tokens = verifying
            .as_ref()
            .map_or(generation.prompt.len(), |verifying| verifying.start);
        // The draft follows the prompt in the prefill; the penalties above saw the prompt alone.
        let drafting = (verifying.is_none() && !generation.draft.is_empty()).then(|| {
            generation.prompt.extend_from_slice(&generation.draft);
            prompt_tokens
        });
        if drafting.is_some() {
            // A checkpoint covers a prompt, and the cells hold the draft's tokens after it.
            generation.export_checkpoint = false;
        }
        let scored = generation.prompt_logprobs || verifying.is_some() || drafting.is_some();
        let slot = Self {
            seq_id,
            admitted,
            prompt_tokens: saturating_u32(prompt_tokens),
            prompt: generation.prompt,
            prefilled: 0,
            committed: generation.committed,
            replayed: 0,
            kv_tokens: 0,
            pending_token: None,
            position,
            max_tokens: generation.max_tokens,
            sampling: generation.sampling,
            top_logprobs: generation.top_logprobs,
            adjust,
            grammar: None,
            text,
            events,
            cancel,
            outbox: VecDeque::with_capacity(OUTBOX_CAPACITY),
            stalled_since: None,
            finished: false,
            compute: Duration::ZERO,
            export_checkpoint: generation.export_checkpoint,
            prompt_restored: false,
            restored_cells: false,
            restore_check: None,
            checkpoint_rejected: false,
            prompt_reused: 0,
            prompt_scores: generation.prompt_logprobs.then(Vec::new),
            scored,
            verifying,
            drafting,
            draft_taken: 0,
        };
        (slot, already_over)
    }

    /// Whether the slot can take part in the next decode step.
    pub fn is_runnable(&self) -> bool {
        !self.finished && self.outbox.is_empty()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The token to feed alone in the next decode step, and whether its logits are needed:
    /// the next committed token to replay (logits only after the last one), else the token
    /// sampled last. None while the prompt is not fully prefilled.
    pub fn decode_token(&self) -> Option<(TokenId, bool)> {
        if self.prefilled < self.prompt.len() {
            return None;
        }
        if let Some(&token) = self.committed.get(self.replayed) {
            return Some((token, self.replayed + 1 == self.committed.len()));
        }
        self.pending_token.map(|token| (token, true))
    }

    /// The prompt tokens not yet prefilled.
    pub fn prefill_remaining(&self) -> &[TokenId] {
        &self.prompt[self.prefilled..]
    }

    /// Whether the last prompt token's logits give the first completion token (nothing to replay).
    pub fn samples_after_prompt(&self) -> bool {
        self.committed.is_empty()
    }

    pub fn sampling(&self) -> (&SamplingParams, u32, u32) {
        (&self.sampling, self.position, self.top_logprobs)
    }

    /// The logits to sample from: `raw` itself, or `raw` adjusted into `scratch` by the
    /// generation's penalties, bias and end-of-generation mask.
    ///
    /// # Errors
    ///
    /// When the grammar cannot say which tokens may come next.
    pub fn logits<'a>(
        &mut self,
        raw: &'a [f32],
        end_of_generation: &[TokenId],
        scratch: &'a mut Vec<f32>,
    ) -> Result<&'a [f32], String> {
        if self.adjust.is_identity() && self.grammar.is_none() {
            return Ok(raw);
        }
        self.adjust.apply(raw, end_of_generation, scratch);
        if let Some(grammar) = &mut self.grammar {
            grammar.mask(scratch)?;
        }
        Ok(scratch)
    }

    /// Starts following `grammar`, whose state already includes the committed tokens. Returns
    /// true when they complete it: the generation is over.
    pub fn follow(&mut self, grammar: Constrained) -> bool {
        let complete = grammar.is_complete();
        self.grammar = Some(grammar);
        complete
    }

    /// Moves the grammar past a sampled `token` (end-of-generation tokens end the answer and
    /// are not part of it).
    ///
    /// # Errors
    ///
    /// When the grammar does not allow `token`.
    pub fn advance_grammar(&mut self, token: TokenId, tokenizer: &Tokenizer) -> Result<(), String> {
        match &mut self.grammar {
            Some(grammar) if !tokenizer.is_end_of_generation(token) => grammar.accept(token),
            _ => Ok(()),
        }
    }

    /// The prompt's length in tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    /// The first `head` prompt tokens' cells were loaded from `checkpoint`; the rest of the
    /// prompt is prefilled here, and then its cells are compared with the checkpoint's
    /// ([`Slot::take_restore_check`]).
    pub fn restored_head(&mut self, head: usize, checkpoint: Arc<SequenceCheckpoint>) {
        debug_assert!(self.prefilled == 0 && head + 2 <= self.prompt.len());
        // That checkpoint exists already.
        self.export_checkpoint = false;
        self.restored_cells = true;
        self.prefilled = head;
        self.kv_tokens = saturating_u32(head);
        self.restore_check = Some((checkpoint, head));
    }

    /// Once the whole prompt is in the cells: the checkpoint to compare them with, and where
    /// the cells this engine computed start.
    pub fn take_restore_check(&mut self) -> Option<(Arc<SequenceCheckpoint>, usize)> {
        if self.prefilled < self.prompt.len() {
            return None;
        }
        self.restore_check.take()
    }

    /// The cells this engine computed agree with the checkpoint's: the prompt counts as restored.
    pub fn restore_confirmed(&mut self) {
        self.prompt_restored = true;
    }

    /// The checkpoint's cells are not this prompt's: the caller emptied the sequence, and the
    /// whole prompt is prefilled again.
    pub fn restore_refuted(&mut self) {
        self.restored_cells = false;
        self.restore_check = None;
        self.prefilled = 0;
        self.kv_tokens = 0;
        self.checkpoint_rejected = true;
    }

    /// The checkpoint offered was refused before anything was loaded.
    pub fn checkpoint_rejected(&mut self) {
        self.checkpoint_rejected = true;
    }

    /// The first `tokens` prompt tokens are in the sequence's cells already (its previous
    /// occupant prefilled the same head): prefilling starts after them.
    pub fn reused_prompt_head(&mut self, tokens: usize) {
        debug_assert!(self.prefilled == 0 && tokens < self.prompt.len());
        self.prefilled = tokens;
        self.kv_tokens = saturating_u32(tokens);
        self.prompt_reused = saturating_u32(tokens);
    }

    /// The prompt tokens in the sequence's cells, all computed by prefilling here: what a next
    /// occupant of the sequence may reuse. Nothing when some cells came from a checkpoint, whose
    /// content another node chose: those never reach another generation.
    pub fn prefilled_prompt(&self) -> &[TokenId] {
        if self.restored_cells {
            return &[];
        }
        &self.prompt[..self.prefilled]
    }

    /// True once, when the prompt is fully in the KV cache and a checkpoint was asked for.
    pub fn take_checkpoint_request(&mut self) -> bool {
        let due = self.export_checkpoint && self.prefilled == self.prompt.len() && !self.finished;
        if due {
            self.export_checkpoint = false;
        }
        due
    }

    /// Report a checkpoint of the prompt's KV cache, ahead of the first token.
    pub fn report_checkpoint(&mut self, data: Vec<u8>) {
        let tokens = saturating_u32(self.prompt.len());
        self.send(GenerationEvent::Checkpoint(SequenceCheckpoint {
            tokens,
            data,
        }));
    }

    /// Whether the prompt is being scored or a completion verified: prompt tokens from
    /// [`Slot::scored_from`] on need the logits of the token before them.
    pub fn scores_prompt(&self) -> bool {
        self.prompt_scores.is_some() || self.verifying.is_some() || self.drafting.is_some()
    }

    /// The first prompt token whose logits are asked for: the second of a scored prompt, the
    /// first completion token of a verification or of a draft.
    pub fn scored_from(&self) -> usize {
        self.verifying
            .as_ref()
            .map(|verifying| verifying.start)
            .or(self.drafting)
            .map_or(1, |start| start.max(1))
    }

    /// Whether this slot follows a draft: the logits before each draft token give the
    /// completion's next token ([`Slot::follow_draft`]).
    pub fn drafts(&self) -> bool {
        self.drafting.is_some()
    }

    /// The completion took `token` from the logits before the draft token at `index` of the
    /// prefilled tokens. True when it is that draft token: it is in the cells already, and the
    /// draft goes on. False when the answer parts from the draft there: the draft's tokens from
    /// `index` on are dropped (the caller drops their cells), and `token` is fed next, as a
    /// decoded token is.
    pub fn follow_draft(&mut self, index: usize, token: TokenId) -> bool {
        if self.prompt.get(index) == Some(&token) {
            self.pending_token = None;
            self.draft_taken += 1;
            return true;
        }
        self.prompt.truncate(index);
        self.prefilled = index;
        self.kv_tokens = saturating_u32(index);
        self.drafting = None;
        false
    }

    /// Samples the next token from `raw`, the logits after the last token fed: adjusted,
    /// masked by the grammar, picked at the slot's position, and then taken
    /// ([`Slot::accept`]). Returns the token and the finish reason if the generation ends.
    ///
    /// # Errors
    ///
    /// When the grammar cannot say which tokens may come next, or does not allow the pick.
    pub fn sample_next(
        &mut self,
        raw: &[f32],
        tools: &mut SamplingTools<'_>,
    ) -> Result<(TokenId, Option<FinishReason>), String> {
        let logits = self.logits(raw, tools.end_of_generation, tools.scratch)?;
        let sampled =
            tools
                .sampler
                .sample(logits, &self.sampling, self.position, self.top_logprobs);
        self.advance_grammar(sampled.token, tools.tokenizer)?;
        let finish = self.accept(&sampled, tools.tokenizer, tools.context_tokens);
        Ok((sampled.token, finish))
    }

    /// Whether this slot checks a reported completion rather than generating one.
    pub fn verifies(&self) -> bool {
        self.verifying.is_some()
    }

    /// Checks the completion token at `index` of the prefilled tokens against `raw`, the
    /// logits after the token before it, masked by the answer's grammar when it has one. A given
    /// token is only replayed.
    pub fn verify_token(
        &mut self,
        index: usize,
        raw: &[f32],
        end_of_generation: &[TokenId],
        sampler: &mut Sampler,
        scratch: &mut Vec<f32>,
    ) {
        let (Some(verifying), Some(&token)) = (self.verifying.as_mut(), self.prompt.get(index))
        else {
            return;
        };
        let Some(offset) = index.checked_sub(verifying.start) else {
            return;
        };
        if let Some(checked) = offset.checked_sub(verifying.given) {
            let logits = masked(
                &verifying.adjust,
                self.grammar.as_mut(),
                raw,
                end_of_generation,
                scratch,
            );
            let reported = verifying.logprobs.get(checked).copied().unwrap_or(f32::NAN);
            let outcome = check_token(
                sampler,
                logits,
                &self.sampling,
                saturating_u32(offset),
                token,
                reported,
                &verifying.tolerance,
            );
            verifying.outcome.record(outcome);
        }
        verifying.adjust.record(token);
        // A token the grammar does not allow failed its check (its logit was masked); past it the
        // grammar says nothing, and the rest is checked unmasked.
        if let Some(grammar) = &mut self.grammar {
            if grammar.accept(token).is_err() {
                self.grammar = None;
            }
        }
    }

    /// Once prompt and completion are prefilled: checks the end against `raw`, the logits after
    /// the last token, when the node said an end-of-generation token came there, then reports
    /// the outcome and finishes.
    pub fn finish_verification(
        &mut self,
        raw: &[f32],
        end_of_generation: &[TokenId],
        sampler: &mut Sampler,
        scratch: &mut Vec<f32>,
    ) {
        let Some(mut verifying) = self.verifying.take() else {
            return;
        };
        let position = saturating_u32(self.prompt.len() - verifying.start);
        if verifying.ended_by_eos {
            let logits = masked(
                &verifying.adjust,
                self.grammar.as_mut(),
                raw,
                end_of_generation,
                scratch,
            );
            let checked = check_end(
                sampler,
                logits,
                &self.sampling,
                position,
                end_of_generation,
                &verifying.tolerance,
            );
            verifying.outcome.record(checked);
        }
        self.position = position;
        self.send(GenerationEvent::Verified(verifying.outcome));
        self.finish(FinishReason::Length);
    }

    /// Whether the prompt was prefilled to be scored, once scored too.
    pub fn prompt_was_scored(&self) -> bool {
        self.scored
    }

    /// Record the score of the prompt token at `index` (from 1): `sampled` is its
    /// log-probability and alternatives under the logits of the token before it.
    pub fn score_prompt_token(&mut self, index: usize, sampled: &Sampled, tokenizer: &Tokenizer) {
        let Some(scores) = self.prompt_scores.as_mut() else {
            return;
        };
        debug_assert_eq!(scores.len() + 1, index, "prompt tokens are scored in order");
        scores.push(token_event(saturating_u32(index), sampled, tokenizer));
    }

    /// The prompt token at `index`.
    pub fn prompt_token(&self, index: usize) -> Option<TokenId> {
        self.prompt.get(index).copied()
    }

    /// Once the whole prompt is prefilled, report its scores, ahead of the first token.
    pub fn report_prompt_scores(&mut self) {
        if self.prefilled < self.prompt.len() || self.finished {
            return;
        }
        if let Some(scores) = self.prompt_scores.take() {
            self.send(GenerationEvent::PromptLogprobs(scores));
        }
    }

    /// Add this sequence's share of a decode call's time.
    pub fn add_compute(&mut self, share: Duration) {
        self.compute += share;
    }

    /// Record that `count` prompt tokens were decoded.
    pub fn advance_prefill(&mut self, count: usize) {
        self.prefilled += count;
        self.kv_tokens += saturating_u32(count);
    }

    /// Record that the token from [`Slot::decode_token`] was decoded.
    pub fn advance_decode(&mut self) {
        if self.replayed < self.committed.len() {
            self.replayed += 1;
        } else {
            self.pending_token = None;
        }
        self.kv_tokens += 1;
    }

    /// Handle the token sampled for this slot. Returns the finish reason if the generation ends.
    pub fn accept(
        &mut self,
        sampled: &Sampled,
        tokenizer: &Tokenizer,
        context_tokens: u32,
    ) -> Option<FinishReason> {
        if tokenizer.is_end_of_generation(sampled.token) {
            return Some(FinishReason::Stop);
        }
        self.adjust.record(sampled.token);
        let event = token_event(self.position, sampled, tokenizer);
        self.text.push(&event.piece);
        self.send(GenerationEvent::Token(event));
        self.position += 1;
        if self.text.stopped() || self.grammar.as_ref().is_some_and(Constrained::is_complete) {
            return Some(FinishReason::Stop);
        }
        if self.position >= self.max_tokens {
            return Some(FinishReason::Length);
        }
        // Feeding the token takes one more cell of this sequence's context.
        if self.kv_tokens + 1 > context_tokens {
            return Some(FinishReason::Length);
        }
        self.pending_token = Some(sampled.token);
        None
    }

    /// Produce the final `Done` event. The caller releases the KV cells.
    pub fn finish(&mut self, reason: FinishReason) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.pending_token = None;
        let done = GenerationDone {
            reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.position,
            compute: self.compute,
            prompt_restored: self.prompt_restored,
            checkpoint_rejected: self.checkpoint_rejected,
            prompt_reused: self.prompt_reused,
            draft_taken: self.draft_taken,
        };
        self.send(GenerationEvent::Done(done));
    }

    /// End the generation with an error event. The caller releases the KV cells.
    pub fn fail(&mut self, error: crate::EngineError) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.pending_token = None;
        self.send(GenerationEvent::Failed(error));
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Deliver held-back events and decide whether the slot can be freed.
    pub fn flush(&mut self, now: Instant) -> SlotFate {
        while let Some(event) = self.outbox.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    let since = *self.stalled_since.get_or_insert(now);
                    if now.duration_since(since) >= CONSUMER_STALL_TIMEOUT {
                        tracing::warn!(
                            seq_id = self.seq_id,
                            "consumer stalled; cancelling its generation"
                        );
                        return SlotFate::Free;
                    }
                    return SlotFate::Keep;
                }
                Err(TrySendError::Closed(_)) => return SlotFate::Free,
            }
        }
        self.stalled_since = None;
        if self.finished || self.events.is_closed() {
            SlotFate::Free
        } else {
            SlotFate::Keep
        }
    }

    /// Queue an event behind any held-back ones, so that order is kept.
    fn send(&mut self, event: GenerationEvent) {
        debug_assert!(
            self.outbox.len() < OUTBOX_CAPACITY,
            "outbox grows only while paused"
        );
        self.outbox.push_back(event);
    }
}

/// What sampling a slot's next token needs besides the slot: the worker's sampler and scratch
/// space, the model's vocabulary, and the context each sequence has.
pub(crate) struct SamplingTools<'a> {
    pub end_of_generation: &'a [TokenId],
    pub sampler: &'a mut Sampler,
    pub scratch: &'a mut Vec<f32>,
    pub tokenizer: &'a Tokenizer,
    pub context_tokens: u32,
}

/// `sampled` as the event reporting it at `position`, with its text and its alternatives'.
fn token_event(position: u32, sampled: &Sampled, tokenizer: &Tokenizer) -> TokenEvent {
    TokenEvent {
        position,
        token: sampled.token,
        piece: tokenizer.piece(sampled.token),
        logprob: sampled.logprob,
        top_logprobs: sampled
            .top
            .iter()
            .map(|candidate| TopLogprob {
                token: candidate.token,
                piece: tokenizer.piece(candidate.token),
                logprob: candidate.logprob,
            })
            .collect(),
    }
}

/// `raw` as `adjust` leaves it: `raw` itself, or the adjusted logits in `scratch`.
fn adjusted<'a>(
    adjust: &Penalised,
    raw: &'a [f32],
    end_of_generation: &[TokenId],
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    if adjust.is_identity() {
        return raw;
    }
    adjust.apply(raw, end_of_generation, scratch);
    scratch
}

/// [`adjusted`], then every token `grammar` does not allow next set to `-inf`: the logits the
/// generating engine sampled from. A grammar that cannot say what comes next allows nothing, as
/// the generating engine would have failed there.
fn masked<'a>(
    adjust: &Penalised,
    grammar: Option<&mut Constrained>,
    raw: &'a [f32],
    end_of_generation: &[TokenId],
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    let Some(grammar) = grammar else {
        return adjusted(adjust, raw, end_of_generation, scratch);
    };
    adjust.apply(raw, end_of_generation, scratch);
    if grammar.mask(scratch).is_err() {
        scratch.fill(f32::NEG_INFINITY);
    }
    scratch
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}
