//! Runs the coordinator's assignments and streams their results back.
//!
//! [`Runner`] keeps a session's running generations (one task each, cancelled through a token);
//! what a task does is its [`Executor`]'s business. On a vehicle that is [`EngineExecutor`]: it
//! submits the assignment to the engine and forwards its events as wire messages: tokens that are
//! ready together go out as one `TokenBatch` (a token is never held back waiting for company), then
//! one `GenerationDone` or `GenerationFailed`. A `Cancel` stops the engine's sequence and answers
//! `GenerationDone { CANCELLED }` at once.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{
    Adjustments, Engine, EngineError, FinishReason, FlashAttention, Generation, GenerationEvent,
    GenerationStream, Mismatch, SamplingParams, SequenceCheckpoint, TokenEvent, Verification,
    Verify,
};
use proto::agent_message::Kind as AgentKind;
use proto::AgentMessage;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

/// The most tokens put into one `TokenBatch`; more that are ready go into the next one.
pub const TOKENS_PER_BATCH_MAX: usize = 64;

/// The coordinator's id of one generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GenerationId(String);

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The future that runs one assignment.
pub type Execution = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where a session's assignments run: the engine on a vehicle ([`EngineExecutor`]), or a
/// model-free token source in a load generator or a test. The session code around it (handshake,
/// heartbeats, cancellation, reconnecting) is the same for all of them.
pub trait Executor: Send + Sync + 'static {
    /// The future that runs `assign` to its end: it sends the assignment's tokens and exactly one
    /// `GenerationDone` or `GenerationFailed` through `task`, and answers `CANCELLED` soon after
    /// `task.cancelled()` fires. It is dropped without a word when the session ends.
    fn execute(&self, assign: proto::Assign, task: GenerationTask) -> Execution;
}

/// The generations running in one session.
///
/// Their number is bounded by the executor (the engine refuses submissions beyond its slots and
/// queue with `Busy`), so the maps here cannot grow past that bound plus the failures being
/// reported.
pub(crate) struct Runner {
    executor: Arc<dyn Executor>,
    outbound: mpsc::Sender<AgentMessage>,
    running: HashMap<GenerationId, CancellationToken>,
    tasks: JoinSet<()>,
    task_generations: HashMap<tokio::task::Id, GenerationId>,
}

impl Runner {
    pub(crate) fn new(executor: Arc<dyn Executor>, outbound: mpsc::Sender<AgentMessage>) -> Runner {
        Runner {
            executor,
            outbound,
            running: HashMap::new(),
            tasks: JoinSet::new(),
            task_generations: HashMap::new(),
        }
    }

    pub(crate) fn active_generations(&self) -> u32 {
        u32::try_from(self.running.len()).unwrap_or(u32::MAX)
    }

    pub(crate) fn assign(&mut self, assign: proto::Assign) {
        let id = GenerationId(assign.generation_id.clone());
        if id.0.is_empty() {
            tracing::warn!("ignoring an assignment without a generation id");
            return;
        }
        if self.running.contains_key(&id) {
            // The first copy is running and will answer; a second answer would confuse the books.
            tracing::warn!(generation_id = %id, "ignoring a duplicate assignment");
            return;
        }
        tracing::info!(
            generation_id = %id,
            prompt_tokens = assign.prompt_tokens.len(),
            committed_tokens = assign.committed_tokens.len(),
            max_tokens = assign.max_tokens,
            "assignment received"
        );
        let cancelled = CancellationToken::new();
        let task = GenerationTask {
            id: id.clone(),
            outbound: self.outbound.clone(),
            cancelled: cancelled.clone(),
        };
        let handle = self.tasks.spawn(self.executor.execute(assign, task));
        self.task_generations.insert(handle.id(), id.clone());
        self.running.insert(id, cancelled);
    }

    pub(crate) fn cancel(&mut self, cancel: &proto::Cancel) {
        let id = GenerationId(cancel.generation_id.clone());
        match self.running.get(&id) {
            Some(cancelled) => {
                tracing::info!(generation_id = %id, reason = %cancel.reason, "cancelling");
                cancelled.cancel();
            }
            // It finished while the cancellation was on its way; its result has been sent.
            None => tracing::debug!(generation_id = %id, "cancel for a generation not running"),
        }
    }

    /// The next finished task; `None` (at once) when none is running.
    pub(crate) async fn join_next(&mut self) -> Option<Result<tokio::task::Id, JoinError>> {
        self.tasks
            .join_next_with_id()
            .await
            .map(|joined| joined.map(|(task, ())| task))
    }

    /// Forgets a finished task; a task that panicked has its generation reported as failed.
    pub(crate) fn finished(&mut self, joined: Result<tokio::task::Id, JoinError>) {
        let task = match &joined {
            Ok(task) => *task,
            Err(join_error) => join_error.id(),
        };
        let Some(id) = self.task_generations.remove(&task) else {
            return;
        };
        self.running.remove(&id);
        if let Err(join_error) = joined {
            tracing::error!(generation_id = %id, error = %join_error, "generation task failed");
            let failed = failed_message(&id, "the node's generation task failed".to_owned(), true);
            if self.outbound.try_send(failed).is_err() {
                tracing::warn!(generation_id = %id, "could not report the failed generation");
            }
        }
    }

    /// Cancels every running generation and waits until their tasks are gone.
    ///
    /// Nothing is reported for them: the end of the stream tells the coordinator to move them, and
    /// a `GenerationDone { CANCELLED }` would wrongly say that someone asked for it.
    pub(crate) async fn shutdown(mut self) {
        // Aborting drops each task's engine stream, which cancels its sequence in the engine.
        self.tasks.shutdown().await;
    }
}

/// Runs assignments on the local engine: the vehicle's executor.
pub(crate) struct EngineExecutor {
    pub(crate) engine: Engine,
    /// The digest of the model this node serves, lowercase hex.
    pub(crate) model_digest: String,
}

impl Executor for EngineExecutor {
    fn execute(&self, mut assign: proto::Assign, task: GenerationTask) -> Execution {
        let engine = self.engine.clone();
        let restore_state = std::mem::take(&mut assign.restore_state);
        let info = engine.info();
        let checked = check_assignment(
            &assign,
            &self.model_digest,
            info.vocab_size,
            info.flash_attention,
        )
        .map(|mut generation| {
            // The engine checks that it fits the prompt and loads; otherwise it prefills.
            generation.restore = (!restore_state.is_empty()).then(|| {
                Arc::new(SequenceCheckpoint {
                    tokens: assign.restore_tokens,
                    data: restore_state.to_vec(),
                })
            });
            generation
        });
        Box::pin(async move {
            match checked {
                Ok(request) => task.run(&engine, request).await,
                Err(refusal) => task.fail(refusal.message, refusal.retryable).await,
            }
        })
    }
}

/// An engine's attention setting as a registration carries it.
pub(crate) fn attention_on_the_wire(setting: FlashAttention) -> proto::Attention {
    match setting {
        FlashAttention::Off => proto::Attention::Off,
        FlashAttention::Exact => proto::Attention::Exact,
        FlashAttention::Fast => proto::Attention::Fast,
    }
}

/// The setting an answer's producers shared; `None` when they ran different ones.
fn attention_off_the_wire(attention: proto::Attention) -> Option<FlashAttention> {
    match attention {
        proto::Attention::Off => Some(FlashAttention::Off),
        proto::Attention::Exact => Some(FlashAttention::Exact),
        proto::Attention::Fast => Some(FlashAttention::Fast),
        proto::Attention::Mixed => None,
    }
}

/// Why an assignment was not even submitted.
#[derive(Debug)]
struct Refusal {
    message: String,
    retryable: bool,
}

/// Turns an assignment into an engine request, refusing one this node cannot or must not run.
/// `attention`: this node's engine's setting, which with the answer's decides a verification's
/// tolerance.
fn check_assignment(
    assign: &proto::Assign,
    model_digest: &str,
    vocab_size: u32,
    attention: FlashAttention,
) -> Result<Generation, Refusal> {
    if !assign.model_sha256.eq_ignore_ascii_case(model_digest) {
        // Retryable: another node may hold the model; this one never will during this session.
        return Err(Refusal {
            message: format!(
                "this node does not have model {}; it serves only {model_digest}, try another node",
                assign.model_sha256
            ),
            retryable: true,
        });
    }
    let verified = assign
        .verify
        .iter()
        .flat_map(|answer| &answer.completion_tokens);
    let tokens = assign
        .prompt_tokens
        .iter()
        .chain(&assign.committed_tokens)
        .chain(verified);
    // llama.cpp aborts the whole process on an out-of-range token, so check before submitting.
    if let Some(bad) = tokens
        .copied()
        .find(|&t| u32::try_from(t).map_or(true, |t| t >= vocab_size))
    {
        return Err(Refusal {
            message: format!("token id {bad} is outside the model's vocabulary of {vocab_size}"),
            retryable: false,
        });
    }
    let sampling = assign.sampling.clone().unwrap_or_default();
    let adjustments = Adjustments {
        presence_penalty: sampling.presence_penalty,
        frequency_penalty: sampling.frequency_penalty,
        // Unset is 0 on the wire; a penalty of 1 is none.
        repetition_penalty: if sampling.repetition_penalty == 0.0 {
            1.0
        } else {
            sampling.repetition_penalty
        },
        logit_bias: sampling
            .logit_bias
            .iter()
            .map(|entry| (entry.token, entry.bias))
            .collect(),
    };
    // Checked like the tokens: a bias for a token outside the vocabulary would index past the
    // logits, and no number here may be NaN.
    let vocab = usize::try_from(vocab_size).unwrap_or(usize::MAX);
    if let Some(problem) = adjustments.problem(vocab) {
        return Err(Refusal {
            message: format!("the assignment's sampling is invalid: {problem}"),
            retryable: false,
        });
    }
    Ok(Generation {
        prompt: assign.prompt_tokens.clone(),
        committed: assign.committed_tokens.clone(),
        sampling: SamplingParams {
            temperature: sampling.temperature.max(0.0),
            // Protocol buffers cannot tell "unset" from 0, and a top-p of 0 would keep nothing, so
            // anything outside (0, 1] means "no cut".
            top_p: if sampling.top_p > 0.0 && sampling.top_p <= 1.0 {
                sampling.top_p
            } else {
                1.0
            },
            top_k: sampling.top_k,
            seed: sampling.seed,
            // Anything outside (0, 1] is no cut, as for top-p.
            min_p: if sampling.min_p > 0.0 && sampling.min_p <= 1.0 {
                sampling.min_p
            } else {
                0.0
            },
        },
        max_tokens: assign.max_tokens,
        stop: assign.stop.clone(),
        top_logprobs: assign.top_logprobs,
        ignore_eos: sampling.ignore_eos,
        adjustments,
        grammar: (!sampling.grammar.is_empty()).then(|| sampling.grammar.clone()),
        restore: None,
        export_checkpoint: assign.report_checkpoint,
        prompt_logprobs: assign.prompt_logprobs,
        // The engine refuses a verification that also asks to resume, restore, export or score.
        verify: assign.verify.as_ref().map(|answer| Verify {
            completion: answer.completion_tokens.clone(),
            logprobs: answer.logprobs.clone(),
            ended_by_eos: answer.ended_by_eos,
            given: answer.given_tokens,
            tolerance: engine::tolerance(attention, attention_off_the_wire(answer.attention())),
        }),
        // An engine on the default kernels, or resuming, does not use it (`Generation::draft`).
        draft: assign.draft_tokens.clone(),
    })
}

/// One assignment's task: its id, the session's outbound queue and its cancellation.
pub struct GenerationTask {
    id: GenerationId,
    outbound: mpsc::Sender<AgentMessage>,
    cancelled: CancellationToken,
}

impl GenerationTask {
    /// The coordinator's id of the generation.
    pub fn id(&self) -> &str {
        &self.id.0
    }

    /// Fires when the coordinator cancels the generation.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }

    async fn run(self, engine: &Engine, generation: Generation) {
        let started = Instant::now();
        // Counted like the engine counts: committed tokens are completion, not prompt.
        let prompt_tokens = u32::try_from(generation.prompt.len()).unwrap_or(u32::MAX);
        let mut completion_tokens = u32::try_from(generation.committed.len()).unwrap_or(u32::MAX);
        let mut stream = match engine.submit(generation) {
            Ok(stream) => stream,
            Err(error) => return self.fail(error.to_string(), is_retryable(&error)).await,
        };
        loop {
            let event = tokio::select! {
                biased;
                () = self.cancelled.cancelled() => None,
                event = stream.events.recv() => Some(event),
            };
            let Some(event) = event else {
                stream.cancel_handle().cancel();
                let cancelled = proto::GenerationDone {
                    generation_id: self.id.0.clone(),
                    reason: proto::FinishReason::Cancelled.into(),
                    prompt_tokens,
                    completion_tokens,
                    compute_ms: millis(started.elapsed()),
                    prompt_reused_tokens: 0,
                    checkpoint_rejected: false,
                };
                return self.send_done(cancelled).await;
            };
            let (tokens, last) = match event {
                Some(GenerationEvent::Checkpoint(checkpoint)) => {
                    if !self.send_checkpoint(checkpoint).await {
                        return;
                    }
                    continue;
                }
                Some(GenerationEvent::PromptLogprobs(scores)) => {
                    if !self.send_prompt_logprobs(scores).await {
                        return;
                    }
                    continue;
                }
                Some(GenerationEvent::Token(token)) => collect_ready(token, &mut stream),
                Some(other) => (Vec::new(), Some(other)),
                None => {
                    let message = "the engine ended the generation without a result".to_owned();
                    return self.fail(message, true).await;
                }
            };
            if !tokens.is_empty() {
                completion_tokens = completion_tokens
                    .saturating_add(u32::try_from(tokens.len()).unwrap_or(u32::MAX));
                if !self.send(tokens_message(&self.id, tokens)).await {
                    return;
                }
            }
            match last {
                None | Some(GenerationEvent::Token(_)) => {}
                Some(GenerationEvent::Checkpoint(checkpoint)) => {
                    if !self.send_checkpoint(checkpoint).await {
                        return;
                    }
                }
                Some(GenerationEvent::PromptLogprobs(scores)) => {
                    if !self.send_prompt_logprobs(scores).await {
                        return;
                    }
                }
                Some(GenerationEvent::Done(done)) => return self.finish(done).await,
                Some(GenerationEvent::Failed(error)) => {
                    return self.fail(error.to_string(), is_retryable(&error)).await;
                }
                Some(GenerationEvent::Verified(verification)) => {
                    let verified = verified_message(&self.id, &verification, started.elapsed());
                    self.send(verified).await;
                    return;
                }
            }
        }
    }

    async fn finish(self, done: engine::GenerationDone) {
        let reason = match done.reason {
            FinishReason::Stop => proto::FinishReason::Stop,
            FinishReason::Length => proto::FinishReason::Length,
            FinishReason::Cancelled if self.cancelled.is_cancelled() => {
                proto::FinishReason::Cancelled
            }
            FinishReason::Cancelled => {
                // Nobody here asked for it: the engine gave up on the sequence (its consumer fell
                // behind). The coordinator must move it, not treat it as a client's cancellation.
                let message = "the engine cancelled the generation".to_owned();
                return self.fail(message, true).await;
            }
        };
        tracing::info!(
            generation_id = %self.id,
            reason = reason.as_str_name(),
            completion_tokens = done.completion_tokens,
            prompt_restored = done.prompt_restored,
            checkpoint_rejected = done.checkpoint_rejected,
            prompt_reused = done.prompt_reused,
            "generation done"
        );
        let done = proto::GenerationDone {
            generation_id: self.id.0.clone(),
            reason: reason.into(),
            prompt_tokens: done.prompt_tokens,
            completion_tokens: done.completion_tokens,
            compute_ms: millis(done.compute),
            prompt_reused_tokens: done.prompt_reused,
            checkpoint_rejected: done.checkpoint_rejected,
        };
        self.send_done(done).await;
    }

    /// Sends the generation's `GenerationDone`, its last message.
    pub async fn send_done(self, done: proto::GenerationDone) {
        let message = AgentMessage {
            kind: Some(AgentKind::Done(done)),
        };
        self.send(message).await;
    }

    /// Sends the generation's `GenerationFailed`, its last message.
    pub async fn fail(self, message: String, retryable: bool) {
        tracing::warn!(generation_id = %self.id, %message, retryable, "generation failed");
        self.send(failed_message(&self.id, message, retryable))
            .await;
    }

    /// Sends a checkpoint in pieces, so that other generations' tokens go out between them.
    /// `false` when the session is gone.
    async fn send_checkpoint(&self, checkpoint: SequenceCheckpoint) -> bool {
        let total_bytes = checkpoint.data.len() as u64;
        tracing::info!(
            generation_id = %self.id,
            tokens = checkpoint.tokens,
            bytes = total_bytes,
            "sending the prompt's kv checkpoint"
        );
        let mut offset = 0_u64;
        for piece in checkpoint.data.chunks(proto::KV_CHECKPOINT_CHUNK_BYTES_MAX) {
            let message = AgentMessage {
                kind: Some(AgentKind::Checkpoint(proto::KvCheckpoint {
                    generation_id: self.id.0.clone(),
                    tokens: checkpoint.tokens,
                    total_bytes,
                    offset,
                    data: piece.to_vec(),
                })),
            };
            if !self.send(message).await {
                return false;
            }
            offset += piece.len() as u64;
        }
        true
    }

    /// Sends the prompt's scores in pieces of `PROMPT_LOGPROBS_PER_MESSAGE` tokens. `false` when
    /// the session is gone.
    async fn send_prompt_logprobs(&self, scores: Vec<TokenEvent>) -> bool {
        let mut scores = scores.into_iter().map(wire_token).peekable();
        while scores.peek().is_some() {
            let tokens = scores
                .by_ref()
                .take(proto::PROMPT_LOGPROBS_PER_MESSAGE)
                .collect();
            let message = AgentMessage {
                kind: Some(AgentKind::PromptLogprobs(proto::PromptLogprobs {
                    generation_id: self.id.0.clone(),
                    tokens,
                })),
            };
            if !self.send(message).await {
                return false;
            }
        }
        true
    }

    /// Queues one message, waiting while the session's queue is full; `false` when the session is
    /// gone (nobody to tell any more).
    pub async fn send(&self, message: AgentMessage) -> bool {
        self.outbound.send(message).await.is_ok()
    }
}

/// The token just received plus every event already waiting behind it, up to the first non-token
/// event (returned separately) or the batch limit. Never waits.
fn collect_ready(
    first: TokenEvent,
    stream: &mut GenerationStream,
) -> (Vec<TokenEvent>, Option<GenerationEvent>) {
    let mut tokens = vec![first];
    while tokens.len() < TOKENS_PER_BATCH_MAX {
        match stream.events.try_recv() {
            Ok(GenerationEvent::Token(token)) => tokens.push(token),
            Ok(other) => return (tokens, Some(other)),
            Err(_) => break,
        }
    }
    (tokens, None)
}

fn wire_token(token: TokenEvent) -> proto::Token {
    proto::Token {
        position: token.position,
        token_id: token.token,
        piece: token.piece,
        logprob: token.logprob,
        top_logprobs: token
            .top_logprobs
            .into_iter()
            .map(|top| proto::TokenLogprob {
                token_id: top.token,
                piece: top.piece,
                logprob: top.logprob,
            })
            .collect(),
    }
}

fn tokens_message(id: &GenerationId, tokens: Vec<TokenEvent>) -> AgentMessage {
    let tokens = tokens.into_iter().map(wire_token).collect();
    AgentMessage {
        kind: Some(AgentKind::Tokens(proto::TokenBatch {
            generation_id: id.0.clone(),
            tokens,
        })),
    }
}

/// A verification's outcome as the coordinator gets it: the counts and the first failure.
fn verified_message(
    id: &GenerationId,
    verification: &Verification,
    compute: Duration,
) -> AgentMessage {
    let first = verification.mismatches.first();
    AgentMessage {
        kind: Some(AgentKind::Verified(proto::Verified {
            generation_id: id.0.clone(),
            checked: verification.checked,
            mismatches: verification.mismatch_count,
            first_mismatch_position: first.map_or(0, Mismatch::position),
            first_mismatch: first.map(ToString::to_string).unwrap_or_default(),
            compute_ms: millis(compute),
        })),
    }
}

fn failed_message(id: &GenerationId, message: String, retryable: bool) -> AgentMessage {
    AgentMessage {
        kind: Some(AgentKind::Failed(proto::GenerationFailed {
            generation_id: id.0.clone(),
            message,
            retryable,
        })),
    }
}

/// Whether another node might succeed where this one failed. A prompt that is too long or invalid
/// fails the same way everywhere; everything else (busy, decode errors, a stopped engine) is this
/// node's problem.
fn is_retryable(error: &EngineError) -> bool {
    !matches!(
        error,
        EngineError::PromptTooLong { .. }
            | EngineError::InvalidGeneration(_)
            | EngineError::Tokenize(_)
    )
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

    fn assign() -> proto::Assign {
        proto::Assign {
            generation_id: "g1".to_owned(),
            model_sha256: DIGEST.to_owned(),
            prompt_tokens: vec![1, 2, 3],
            committed_tokens: vec![4],
            sampling: None,
            max_tokens: 16,
            stop: vec!["\n".to_owned()],
            top_logprobs: 2,
            ..proto::Assign::default()
        }
    }

    #[test]
    fn accepts_an_assignment_for_our_model() {
        let upper = proto::Assign {
            model_sha256: DIGEST.to_uppercase(),
            ..assign()
        };
        let generation =
            check_assignment(&upper, DIGEST, 1000, FlashAttention::Off).expect("accepted");
        assert_eq!(generation.prompt, [1, 2, 3]);
        assert_eq!(generation.committed, [4]);
        assert_eq!(generation.max_tokens, 16);
        assert_eq!(generation.top_logprobs, 2);
        assert_eq!(
            generation.sampling.temperature, 0.0,
            "unset sampling is greedy"
        );
        assert_eq!(generation.sampling.top_p, 1.0, "unset top_p is no cut");
    }

    /// A verification keeps the calibrated default tolerance when this node runs the attention
    /// setting the answer was computed with, and takes the wider one across settings or when the
    /// answer's producers ran different ones.
    #[test]
    fn a_verification_widens_its_tolerance_across_attention_settings() {
        use proto::Attention;
        let (same, across) = (engine::DEFAULT_TOLERANCE, engine::FLASH_ATTENTION_TOLERANCE);
        for (verifier, producers, expected) in [
            (FlashAttention::Off, Attention::Off, same),
            (FlashAttention::Exact, Attention::Exact, same),
            (FlashAttention::Fast, Attention::Fast, same),
            (FlashAttention::Off, Attention::Fast, across),
            (FlashAttention::Fast, Attention::Off, across),
            (FlashAttention::Exact, Attention::Fast, across),
            (FlashAttention::Off, Attention::Mixed, across),
        ] {
            let verifying = proto::Assign {
                committed_tokens: Vec::new(),
                verify: Some(proto::VerifyAnswer {
                    completion_tokens: vec![5, 6],
                    logprobs: vec![-0.5, -0.25],
                    attention: producers as i32,
                    ..proto::VerifyAnswer::default()
                }),
                ..assign()
            };
            let generation =
                check_assignment(&verifying, DIGEST, 1000, verifier).expect("accepted");
            let verify = generation.verify.expect("a verification");
            assert_eq!(
                verify.tolerance, expected,
                "{verifier} verifying {producers:?}"
            );
        }
        assert_ne!(same, across);
        for setting in FlashAttention::ALL {
            let wire = attention_on_the_wire(setting);
            assert_eq!(attention_off_the_wire(wire), Some(setting));
        }
    }

    #[test]
    fn refuses_another_model_as_retryable_elsewhere() {
        let other = proto::Assign {
            model_sha256: "00".repeat(32),
            ..assign()
        };
        let refusal =
            check_assignment(&other, DIGEST, 1000, FlashAttention::Off).expect_err("refused");
        assert!(refusal.retryable);
        assert!(
            refusal.message.contains("another node"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn refuses_tokens_outside_the_vocabulary() {
        for bad in [-1, 1000] {
            let bad_prompt = proto::Assign {
                committed_tokens: vec![bad],
                ..assign()
            };
            let refusal = check_assignment(&bad_prompt, DIGEST, 1000, FlashAttention::Off)
                .expect_err("refused");
            assert!(!refusal.retryable);
            assert!(refusal.message.contains(&bad.to_string()));
        }
    }
}
