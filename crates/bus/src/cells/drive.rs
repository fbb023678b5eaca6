//! One task per admitted generation: receives its cell's batches,
//! forwards each position once, in order, and moves the generation to
//! another cell when the one it runs on goes quiet, disappears or loses a
//! batch.
//!
//! **Invariant:** the consumer sees every position from the first
//! committed one up to the end exactly once, whichever cells produced
//! them; a resubmission carries every position forwarded so far as
//! `committed`, so the next cell continues after them.

use std::sync::Arc;
use std::time::Instant;

use async_nats::Message;
use bytes::Bytes;
use cell_api::{GenerationError, NewGeneration, Rejection, Update};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metering::{clamped, merged};
use super::{lock, Attempt, Shared};
use crate::wire::{self, Batch, End};

/// What the task does next.
enum Step {
    /// Keep receiving.
    Continue,
    /// Leave the cell it runs on, for this reason.
    Move(&'static str),
    /// It ended with this update, the consumer's last.
    End(Update),
    /// It was cancelled: `cancel` took it, and told its cell.
    Cancelled,
    /// The consumer went away without cancelling.
    Abandoned,
}

/// One generation's task state.
struct Run {
    request: u64,
    generation: NewGeneration,
    attempt: Attempt,
    /// Every position known: the committed tokens it was submitted with,
    /// then each token forwarded.
    positions: Vec<i32>,
    /// Positions beyond which a cell is misbehaving.
    positions_max: usize,
    /// The prompt's scores from the current attempt so far, while they are
    /// asked for (`generation.prompt_logprobs`) and not yet forwarded.
    prompt_scores: Vec<cell_api::CommittedToken>,
    /// Tokens forwarded from the current attempt.
    forwarded_here: u32,
    /// What the current attempt's cell last said it metered.
    metering: Option<cell_api::metering::Metering>,
    moves: u32,
    last_heard: Instant,
    updates: mpsc::Sender<Update>,
    stop: CancellationToken,
}

impl Shared {
    pub(super) async fn drive(
        self: Arc<Self>,
        request: u64,
        generation: NewGeneration,
        attempt: Attempt,
        updates: mpsc::Sender<Update>,
        stop: CancellationToken,
    ) {
        let positions = generation.committed.clone();
        let positions_max = positions.len() + generation.max_tokens as usize;
        let mut run = Run {
            request,
            generation,
            attempt,
            positions,
            positions_max,
            prompt_scores: Vec::new(),
            forwarded_here: 0,
            metering: None,
            moves: 0,
            last_heard: Instant::now(),
            updates,
            stop,
        };
        loop {
            let step = match run.next_message(&self).await {
                Ok(message) if message.payload.is_empty() => {
                    // The cell asking whether anyone still listens
                    // (`serve`'s listener probe); batches are never empty.
                    if let Some(reply) = message.reply {
                        if let Err(error) = self.nats.publish(reply, Bytes::new()).await {
                            tracing::debug!(%error, "answer a listener probe");
                        }
                    }
                    Step::Continue
                }
                Ok(message) => run.received(&self, &message),
                Err(step) => step,
            };
            let step = match step {
                Step::Continue => continue,
                Step::Move(reason) => match run.relocate(&self, reason).await {
                    Ok(()) => continue,
                    Err(step) => step,
                },
                step => step,
            };
            self.ended(&run, step).await;
            return;
        }
    }

    /// Settles how the generation ended: the consumer's last update, and
    /// the cell told to stop where it may still run.
    async fn ended(&self, run: &Run, step: Step) {
        match step {
            Step::End(update) => {
                // A cancel that came first took the generation (and its
                // metering); nothing more reaches the consumer then.
                let Some(running) = lock(&self.generations).remove(&run.request) else {
                    return;
                };
                let update = match update {
                    Update::Finished {
                        reason,
                        usage,
                        metering,
                    } => Update::Finished {
                        reason,
                        usage,
                        metering: merged(running.earlier, metering),
                    },
                    Update::Failed(error) => {
                        self.publish_cancel(&run.attempt.cell, run.attempt.remote)
                            .await;
                        Update::Failed(error)
                    }
                    token => token,
                };
                // The channel holds every update a generation can have.
                let _ = run.updates.try_send(update);
            }
            Step::Abandoned => {
                lock(&self.generations).remove(&run.request);
                self.publish_cancel(&run.attempt.cell, run.attempt.remote)
                    .await;
            }
            Step::Cancelled | Step::Continue | Step::Move(_) => {}
        }
    }
}

impl Run {
    /// The next message of the current attempt, or why there is none.
    async fn next_message(&mut self, shared: &Shared) -> Result<Message, Step> {
        let silent_at = self.last_heard + shared.config.silence_timeout;
        // How often to look whether the cell still publishes its capacity
        // while its batches are quiet.
        let check = shared.config.capacity_stale_after / 2;
        tokio::select! {
            _ = self.stop.cancelled() => Err(Step::Cancelled),
            _ = self.updates.closed() => Err(Step::Abandoned),
            _ = tokio::time::sleep(check) => Err(if shared.is_fresh(&self.attempt.cell) {
                Step::Continue
            } else {
                Step::Move("its cell stopped publishing its capacity")
            }),
            message = tokio::time::timeout_at(silent_at.into(), self.attempt.batches.next()) => {
                match message {
                    Err(_) => Err(Step::Move("its cell fell silent")),
                    Ok(None) => Err(Step::End(Update::Failed(GenerationError::Failed(
                        "the bus connection closed".to_string(),
                    )))),
                    Ok(Some(message)) => Ok(message),
                }
            }
        }
    }

    /// Forwards the new positions of a batch and records its metering,
    /// under the lock `cancel` takes: a cancel sees all of a batch
    /// forwarded and metered, or none of it.
    fn received(&mut self, shared: &Shared, message: &Message) -> Step {
        let batch: Batch = match wire::decode(&message.payload) {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(request_id = %self.generation.public_id, %error, "bad batch dropped");
                return Step::Continue;
            }
        };
        if batch.request != self.attempt.remote {
            return Step::Continue;
        }
        self.last_heard = Instant::now();
        let next = self.positions.len();
        let first = batch.first_position as usize;
        if first > next {
            return Step::Move("a batch was lost");
        }
        if let Some(piece) = batch.prompt_scores {
            return self.prompt_scores(piece);
        }
        let mut generations = lock(&shared.generations);
        let Some(running) = generations.get_mut(&self.request) else {
            return Step::Cancelled;
        };
        if self.generation.prompt_logprobs && !batch.tokens.is_empty() {
            return Step::Move("tokens came before the prompt's scores");
        }
        if batch.numerics.is_some() {
            // A move to another cell asks it to continue on nodes alike to this one.
            self.generation.numerics = batch.numerics;
        }
        for token in batch.tokens.into_iter().skip(next - first) {
            if self.positions.len() >= self.positions_max {
                return Step::End(Update::Failed(GenerationError::Failed(
                    "the cell sent more tokens than asked for".to_string(),
                )));
            }
            self.positions.push(token.token_id);
            self.forwarded_here = self.forwarded_here.saturating_add(1);
            // The channel holds every token a generation can have
            // (`max_tokens` is bounded at submission), so it is never full.
            if self.updates.try_send(Update::Token(token)).is_err() {
                return Step::Abandoned;
            }
        }
        if batch.metering.is_some() {
            self.metering = batch.metering;
        }
        if let Some(current) = running.current.as_mut() {
            current.metering.clone_from(&self.metering);
            current.forwarded = self.forwarded_here;
        }
        drop(generations);
        match batch.end {
            None => Step::Continue,
            Some(End::Finished {
                reason,
                usage,
                metering,
            }) => Step::End(Update::Finished {
                reason,
                usage,
                metering,
            }),
            Some(End::Failed(error)) => Step::End(Update::Failed(error)),
        }
    }

    /// Keeps a piece of the prompt's scores, and forwards them all once the
    /// last is in; a resubmission after that does not ask for them again.
    fn prompt_scores(&mut self, piece: wire::PromptScoresPiece) -> Step {
        if !self.generation.prompt_logprobs {
            return Step::Continue;
        }
        let next = self.prompt_scores.len() + 1;
        let first = piece.first_index as usize;
        if first > next {
            return Step::Move("a batch was lost");
        }
        let total = (piece.total as usize).min(self.generation.prompt.len().saturating_sub(1));
        self.prompt_scores
            .extend(piece.tokens.into_iter().skip(next - first));
        self.prompt_scores.truncate(total);
        if self.prompt_scores.len() < total {
            return Step::Continue;
        }
        self.generation.prompt_logprobs = false;
        let scores = std::mem::take(&mut self.prompt_scores);
        // The channel holds a whole generation and this one update more.
        if self
            .updates
            .try_send(Update::PromptLogprobs(scores))
            .is_err()
        {
            return Step::Abandoned;
        }
        Step::Continue
    }

    /// Stops the current attempt (best effort), keeps its metering and
    /// resubmits the generation, continuing after every known position,
    /// preferably to another cell.
    async fn relocate(&mut self, shared: &Shared, reason: &'static str) -> Result<(), Step> {
        let left = self.attempt.cell.clone();
        tracing::info!(
            request_id = %self.generation.public_id,
            cell = %left,
            position = self.positions.len(),
            reason,
            "moving a generation to another cell"
        );
        shared.publish_cancel(&left, self.attempt.remote).await;
        {
            let mut generations = lock(&shared.generations);
            let running = generations.get_mut(&self.request).ok_or(Step::Cancelled)?;
            if let Some(metering) = self.metering.take() {
                running
                    .earlier
                    .extend(clamped(&metering, self.forwarded_here));
            }
            running.current = None;
        }
        self.forwarded_here = 0;
        // The next cell scores the prompt again, from its first token.
        self.prompt_scores.clear();
        self.generation.committed.clone_from(&self.positions);
        let mut refusal: Option<Rejection> = None;
        loop {
            self.moves += 1;
            if self.moves > shared.config.moves_max {
                return Err(Step::End(Update::Failed(gave_up(refusal))));
            }
            if self.stop.is_cancelled() {
                return Err(Step::Cancelled);
            }
            match shared.place(&self.generation, Some(&left)).await {
                Ok(attempt) => return self.resumed(shared, attempt).await,
                Err(rejection) => refusal = Some(rejection),
            }
            let pause = shared.config.move_retry_delay * self.moves;
            tokio::select! {
                _ = self.stop.cancelled() => return Err(Step::Cancelled),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The generation was admitted again as `attempt`.
    async fn resumed(&mut self, shared: &Shared, attempt: Attempt) -> Result<(), Step> {
        if self.stop.is_cancelled() || !shared.record_attempt(self.request, &attempt) {
            // Cancelled while it was being placed: the cancel could not
            // name this attempt.
            shared.publish_cancel(&attempt.cell, attempt.remote).await;
            return Err(Step::Cancelled);
        }
        self.attempt = attempt;
        self.last_heard = Instant::now();
        Ok(())
    }
}

/// Why a generation that could not be placed again failed.
fn gave_up(refusal: Option<Rejection>) -> GenerationError {
    let retry_after_seconds = cell_api::limits::RETRY_AFTER_DEFAULT_SECONDS;
    match refusal {
        Some(
            Rejection::NoEligibleNode {
                retry_after_seconds,
            }
            | Rejection::QueueFull {
                retry_after_seconds,
            },
        ) => GenerationError::Rejected {
            reason: "no cell could take the generation over".to_string(),
            retry_after_seconds,
        },
        Some(Rejection::OverQuota {
            message,
            retry_after_seconds,
        }) => GenerationError::Rejected {
            reason: message,
            retry_after_seconds,
        },
        Some(Rejection::Other { message }) => GenerationError::Failed(message),
        None => GenerationError::Rejected {
            reason: "no cell could take the generation over".to_string(),
            retry_after_seconds,
        },
    }
}
