//! Carrying out the scheduler's commands, and turning what nodes send into
//! scheduler events and client updates.

use scheduler::{Command, Event, Millis, NodeId, RejectReason, RequestId};

use super::{
    verification, CommittedToken, Core, CoreState, FinishReason, GenerationError, InFlight,
    Rejection, Update, Usage, ORDER,
};
use crate::limits;
use crate::node_input::{self, BatchBounds};
use crate::nodes::NodeSession;
use cell_api::metering::{Metering, NodeReport, SegmentTrack};
use store::RequestRecord;

impl Core {
    /// Feeds one event to the scheduler and carries out the commands, then
    /// any follow-up events those caused. Returns the rejections issued, so
    /// that `submit` can answer its caller directly.
    pub(super) fn handle(
        &self,
        state: &mut CoreState,
        now: Millis,
        event: Event,
    ) -> Vec<(RequestId, Rejection)> {
        let mut rejections = Vec::new();
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let mut commands = std::mem::take(&mut state.commands);
            commands.clear();
            state.scheduler.handle(now, event, &mut commands);
            for command in commands.drain(..) {
                self.execute(state, now, command, &mut rejections);
            }
            state.commands = commands;
            next = state.follow_up.pop();
        }
        rejections
    }

    fn execute(
        &self,
        state: &mut CoreState,
        now: Millis,
        command: Command,
        rejections: &mut Vec<(RequestId, Rejection)>,
    ) {
        match command {
            Command::Assign {
                request,
                node,
                resume_from,
            } => self.assign(state, now, request, node, resume_from),
            Command::Stop {
                request,
                node,
                reason,
            } => {
                self.metrics.count_stop(reason);
                if reason == scheduler::StopReason::Stalled {
                    self.metrics.generations_stalled.fetch_add(1, ORDER);
                    let node_id = state.nodes.get(&node).map(|node| node.name.as_str());
                    tracing::warn!(
                        request_id = request.0,
                        node_id = node_id.unwrap_or("?"),
                        "no token within the node's stall bound; moving the generation"
                    );
                }
                tracing::info!(
                    request_id = request.0,
                    ?reason,
                    "stopping generation on node"
                );
                if let Some(inflight) = state.requests.get_mut(&request) {
                    if inflight.node == Some(node) {
                        inflight.node = None;
                        state.shares.stop(request, now.0);
                    }
                }
                self.send_cancel(state, request, node, &format!("{reason:?}"));
            }
            Command::Cancel { request, node } => {
                self.send_cancel(state, request, node, "cancelled by client");
                state.remove_request(request, now);
                self.metrics.generations_active.fetch_sub(1, ORDER);
            }
            Command::Reject {
                request,
                reason,
                retry_after_ms,
            } => {
                let rejection = rejection_of(reason, retry_after_ms);
                if let Some(inflight) = state.requests.get(&request) {
                    if inflight.attempt == 0 && inflight.committed.is_empty() {
                        // Never started: the caller of `submit` may still be
                        // waiting for its answer.
                        rejections.push((request, rejection.clone()));
                    }
                }
                self.count_rejection(&rejection);
                self.fail(state, now, request, generation_error_of(rejection));
            }
        }
    }

    fn assign(
        &self,
        state: &mut CoreState,
        now: Millis,
        request: RequestId,
        node: NodeId,
        resume_from: u32,
    ) {
        let Some(inflight) = state.requests.get_mut(&request) else {
            tracing::error!(
                request_id = request.0,
                "scheduler assigned an unknown request"
            );
            return;
        };
        // The core's own committed tokens are what the node continues after.
        debug_assert!(resume_from as usize <= inflight.committed.len());
        if inflight.attempt >= limits::ATTEMPTS_PER_REQUEST_MAX {
            self.fail(state, now, request, GenerationError::TooManyAttempts);
            return;
        }
        if inflight.attempt > 0 {
            self.metrics.reassignments.fetch_add(1, ORDER);
        }
        let numerics = state.nodes.get(&node).map(|connected| connected.numerics);
        if !inflight.committed.is_empty()
            && inflight.numerics.is_some()
            && !crate::nodes::numerics_alike(numerics, inflight.numerics)
        {
            self.metrics.moves_across_numerics.fetch_add(1, ORDER);
        }
        inflight.numerics = numerics;
        inflight.attempt += 1;
        inflight.node = Some(node);
        state
            .recent_heads
            .touch(inflight.model.id, &inflight.prompt_heads);
        // A checkpoint the previous attempt did not finish sending never will.
        state.checkpoints.abandon(request);
        // Neither will its part of the prompt's scores: this attempt scores
        // the whole prompt, which it prefills for that (no checkpoint).
        let scores_prompt = match inflight.prompt_scores.as_mut() {
            Some(scores) => {
                scores.clear();
                true
            }
            None => false,
        };
        let restore = if scores_prompt {
            None
        } else {
            state.checkpoints.for_resume(request)
        };
        let report_checkpoint = restore.is_none()
            && inflight.committed.is_empty()
            && state.checkpoints.wanted(request, inflight.prompt.len());
        if report_checkpoint {
            state.checkpoints.ask(request, inflight.attempt);
        }
        if restore.is_some() {
            self.metrics.kv_checkpoint_handovers.fetch_add(1, ORDER);
        }
        let (restore_tokens, restore_state) = restore.unwrap_or_default();
        let message = proto::CoordinatorMessage {
            kind: Some(proto::coordinator_message::Kind::Assign(proto::Assign {
                generation_id: generation_id(request, inflight.attempt),
                model_sha256: inflight.model.digest.clone(),
                prompt_tokens: inflight.prompt.as_ref().clone(),
                committed_tokens: inflight.committed.clone(),
                sampling: Some(inflight.sampling.clone()),
                max_tokens: inflight.max_tokens,
                stop: inflight.stop.clone(),
                top_logprobs: inflight.top_logprobs,
                report_checkpoint,
                restore_tokens,
                restore_state,
                prompt_logprobs: scores_prompt,
                verify: None,
                // A draft follows the prompt; an attempt after committed tokens goes without.
                draft_tokens: if inflight.committed.is_empty() && !scores_prompt {
                    inflight.draft.clone()
                } else {
                    Vec::new()
                },
            })),
        };
        let Some(target) = state.nodes.get(&node) else {
            tracing::error!(
                request_id = request.0,
                "scheduler assigned to a node that is gone"
            );
            state.follow_up.push(Event::AttemptFailed { request, node });
            return;
        };
        let name = target.name.clone();
        let speed = target.paid_speed();
        if target.outbound.try_send(message).is_err() {
            tracing::warn!(node_id = %name, "node not draining its stream; treating it as lost");
            state.follow_up.push(Event::AttemptFailed { request, node });
            return;
        }
        tracing::info!(request_id = request.0, node_id = %name, resume_from, "assigned");
        self.metrics.node_assignments.add(&name);
        // The attempt runs on the node from now: it takes its share of the
        // node's time, and the others running there give up some of theirs.
        let share_us = state.shares.start(request, node, now.0);
        if let Some(inflight) = state.requests.get_mut(&request) {
            let prefilled = inflight.prompt.len() + inflight.committed.len();
            let prefilled = u32::try_from(prefilled).unwrap_or(u32::MAX);
            inflight.segments.push(SegmentTrack::started(
                name, prefilled, now.0, share_us, speed,
            ));
        }
    }

    fn send_cancel(&self, state: &CoreState, request: RequestId, node: NodeId, reason: &str) {
        let (Some(target), Some(attempt)) = (
            state.nodes.get(&node),
            state
                .requests
                .get(&request)
                .map(|inflight| inflight.attempt),
        ) else {
            return;
        };
        let message = proto::CoordinatorMessage {
            kind: Some(proto::coordinator_message::Kind::Cancel(proto::Cancel {
                generation_id: generation_id(request, attempt),
                reason: reason.to_string(),
            })),
        };
        // A node that cannot take a cancel is stuck; the heartbeat reaper
        // will mark it lost, and its work is already elsewhere.
        let _ = target.outbound.try_send(message);
    }

    /// Ends a request with an error, telling the client and the scheduler.
    fn fail(&self, state: &mut CoreState, now: Millis, request: RequestId, error: GenerationError) {
        let Some(inflight) = state.requests.get(&request) else {
            return;
        };
        let admitted = inflight.attempt > 0 || !inflight.committed.is_empty();
        let _ = inflight.updates.try_send(Update::Failed(error.clone()));
        if let Some(node) = inflight.node {
            self.send_cancel(state, request, node, "request failed");
        }
        self.record(state, request, "failed", Some(format!("{error:?}")));
        state.remove_request(request, now);
        if admitted {
            self.metrics.requests_failed.fetch_add(1, ORDER);
        }
        self.metrics.generations_active.fetch_sub(1, ORDER);
        state.follow_up.push(Event::RequestCancelled { request });
    }

    fn count_rejection(&self, rejection: &Rejection) {
        let counter = match rejection {
            Rejection::QueueFull { .. } | Rejection::OverQuota { .. } => {
                &self.metrics.requests_rejected_queue_full
            }
            Rejection::NoEligibleNode { .. } => &self.metrics.requests_rejected_no_node,
            Rejection::Other { .. } => &self.metrics.requests_rejected_other,
        };
        counter.fetch_add(1, ORDER);
    }

    /// Tokens from a node. Only the current attempt's tokens, in order, count.
    pub fn node_tokens(&self, session: NodeSession, batch: proto::TokenBatch) {
        let now = self.clock.now();
        let mut state = self.lock();
        self.heard_from(&mut state, session);
        let Some(request) = self.current_attempt(&state, session, &batch.generation_id) else {
            return;
        };
        let Some(inflight) = state.requests.get(&request) else {
            return;
        };
        if inflight.prompt_scores.is_some() && !batch.tokens.is_empty() {
            self.protocol_violation(&mut state, session, "tokens before the prompt's scores");
            return;
        }
        let committed = u32::try_from(inflight.committed.len()).unwrap_or(u32::MAX);
        let bounds = BatchBounds {
            next_position: committed,
            tokens_left: inflight.max_tokens.saturating_sub(committed),
            top_logprobs: inflight.top_logprobs,
        };
        let checked = node_input::check_batch(&batch.tokens, &bounds, &inflight.model.pieces);
        if let Err(violation) = checked {
            tracing::warn!(
                request_id = request.0,
                "a node's tokens broke the protocol; moving the generation"
            );
            self.protocol_violation(&mut state, session, &violation.to_string());
            return;
        }
        // Both checks before either state moves: a refused batch leaves
        // neither the grammar nor the stop text past the committed tokens,
        // which the next vehicle resumes from.
        let ids: Vec<i32> = batch.tokens.iter().map(|token| token.token_id).collect();
        let Some(inflight) = state.requests.get_mut(&request) else {
            return;
        };
        let stop_text = inflight
            .stop_text
            .as_ref()
            .map(|text| text_after(text, &inflight.model.pieces, &batch.tokens));
        let broken = match stop_text {
            Some(None) => Some("tokens after a stop sequence"),
            after => {
                if inflight
                    .grammar
                    .as_mut()
                    .is_some_and(|grammar| !grammar.follows(&ids))
                {
                    Some("tokens outside the answer's grammar")
                } else {
                    if let Some(Some(after)) = after {
                        inflight.stop_text = Some(after);
                    }
                    None
                }
            }
        };
        if let Some(what) = broken {
            tracing::warn!(
                request_id = request.0,
                violation = what,
                "a node's tokens broke the answer's end or grammar; moving the generation"
            );
            self.protocol_violation(&mut state, session, what);
            return;
        }
        let share_us = state.shares.read(request, now.0);
        let Some(inflight) = state.requests.get_mut(&request) else {
            return;
        };
        for token in batch.tokens {
            inflight.committed.push(token.token_id);
            inflight.logprobs.push(token.logprob);
            if let Some(segment) = inflight.segments.last_mut() {
                segment.completion_tokens += 1;
                let share_us = share_us.unwrap_or(segment.share_last_active_us);
                segment.active(now.0, share_us);
            }
            if inflight.first_token_at.is_none() {
                let first_token_at = self.clock.instant();
                inflight.first_token_at = Some(first_token_at);
                let waited = first_token_at
                    .saturating_duration_since(inflight.admitted_at)
                    .as_millis();
                self.metrics
                    .observe_time_to_first_token_ms(u64::try_from(waited).unwrap_or(u64::MAX));
            }
            self.metrics.completion_tokens.fetch_add(1, ORDER);
            let committed = committed_token(token, &inflight.model.pieces);
            // The channel holds a whole generation; a failed send means the
            // client is gone, which its drop guard reports separately.
            let _ = inflight.updates.try_send(Update::Token(committed));
        }
        let committed_total = u32::try_from(inflight.committed.len()).unwrap_or(u32::MAX);
        self.handle(
            &mut state,
            now,
            Event::TokensCommitted {
                request,
                committed_total,
            },
        );
    }

    /// A node's generation message is a sign of life too: a busy agent may
    /// skip a heartbeat while its outbound queue is full, and must not be
    /// reaped for it.
    pub(super) fn heard_from(&self, state: &mut CoreState, session: NodeSession) {
        if let Some(node) = state.nodes.get_mut(&session.node) {
            if node.session == session.session {
                node.last_heard = self.clock.instant();
            }
        }
    }

    /// A piece of a prompt's scores from a node: kept while the current
    /// attempt sends them, sent on to the client once the last prompt token's
    /// is in.
    pub fn node_prompt_logprobs(&self, session: NodeSession, scores: proto::PromptLogprobs) {
        let mut state = self.lock();
        self.heard_from(&mut state, session);
        let Some(request) = self.current_attempt(&state, session, &scores.generation_id) else {
            return;
        };
        let Some(inflight) = state.requests.get_mut(&request) else {
            return;
        };
        let Some(kept) = inflight.prompt_scores.as_mut() else {
            let violation = node_input::Violation::Unasked("prompt scores");
            self.protocol_violation(&mut state, session, &violation.to_string());
            return;
        };
        let checked = node_input::check_prompt_scores(
            &scores.tokens,
            &inflight.prompt,
            kept.len() + 1,
            inflight.top_logprobs,
            &inflight.model.pieces,
        );
        if let Err(violation) = checked {
            tracing::warn!(
                request_id = request.0,
                "a node's prompt scores broke the protocol; moving the generation"
            );
            self.protocol_violation(&mut state, session, &violation.to_string());
            return;
        }
        let pieces = &inflight.model.pieces;
        kept.extend(
            scores
                .tokens
                .into_iter()
                .map(|token| committed_token(token, pieces)),
        );
        if kept.len() + 1 >= inflight.prompt.len() {
            let complete = inflight.prompt_scores.take().unwrap_or_default();
            // The channel holds a whole generation and this one update more.
            let _ = inflight.updates.try_send(Update::PromptLogprobs(complete));
        }
    }

    /// A node finished (or confirmed cancelling) a generation.
    pub fn node_done(&self, session: NodeSession, done: proto::GenerationDone) {
        let now = self.clock.now();
        let mut state = self.lock();
        let reason = proto::FinishReason::try_from(done.reason).unwrap_or_default();
        if reason == proto::FinishReason::Cancelled {
            self.metrics
                .generations_cancelled_on_node
                .fetch_add(1, ORDER);
        }
        let Some(request) = self.current_attempt(&state, session, &done.generation_id) else {
            return;
        };
        if done.checkpoint_rejected {
            self.checkpoint_rejected_by_node(&mut state, request);
        }
        let share_us = state.shares.read(request, now.0);
        let Some(inflight) = state.requests.get_mut(&request) else {
            return;
        };
        let finish = match reason {
            proto::FinishReason::Stop => FinishReason::Stop,
            proto::FinishReason::Length => FinishReason::Length,
            proto::FinishReason::Cancelled | proto::FinishReason::Unspecified => {
                // The node gave up on its own (its owner needs the car):
                // the generation continues elsewhere.
                self.retry_elsewhere(&mut state, now, request, session.node);
                return;
            }
        };
        if inflight.prompt_scores.is_some() {
            self.protocol_violation(&mut state, session, "an answer without the prompt's scores");
            return;
        }
        // A structured answer ends where its grammar lets it, or at a stop
        // sequence of the client's, or at its length: a vehicle that says it
        // stopped anywhere else cut the answer short.
        let cut_short = finish == FinishReason::Stop
            && !inflight.reached_a_stop_sequence()
            && inflight
                .grammar
                .as_mut()
                .is_some_and(|grammar| !grammar.is_accepting());
        if cut_short {
            tracing::warn!(
                request_id = request.0,
                "a node ended a structured answer its grammar had not finished; moving the generation"
            );
            self.protocol_violation(&mut state, session, "an unfinished structured answer");
            return;
        }
        let ours = u32::try_from(inflight.committed.len()).unwrap_or(u32::MAX);
        let mut misreported = None;
        if let Some(segment) = inflight.segments.last_mut() {
            let share_us = share_us.unwrap_or(segment.share_last_active_us);
            segment.active(now.0, share_us);
            let bound = limits::compute_report_max_ms(segment.wall_ms());
            if done.compute_ms > bound {
                misreported = Some(format!(
                    "it reported {} ms of compute for an attempt that ran {} ms",
                    done.compute_ms,
                    segment.wall_ms()
                ));
            }
        }
        // The node's own counts go to billing, which checks them against
        // ours and flags the node; settlement always uses our counts.
        let prompt_tokens = u32::try_from(inflight.prompt.len()).unwrap_or(u32::MAX);
        let metering = Metering {
            prompt_tokens,
            segments: inflight.segments.clone(),
            node_report: Some(NodeReport {
                prompt_tokens: done.prompt_tokens,
                completion_tokens: done.completion_tokens,
                compute_ms: done.compute_ms,
            }),
            finished_ms: now.0,
        };
        let usage = Usage {
            prompt_tokens,
            completion_tokens: ours,
            cached_prompt_tokens: done.prompt_reused_tokens.min(prompt_tokens),
        };
        let _ = inflight.updates.try_send(Update::Finished {
            reason: finish,
            usage,
            metering,
        });
        self.metrics
            .generation_compute_ms
            .fetch_add(done.compute_ms, ORDER);
        self.record(&mut state, request, "completed", None);
        let finished = state.remove_request(request, now);
        self.metrics.requests_completed.fetch_add(1, ORDER);
        self.metrics.generations_active.fetch_sub(1, ORDER);
        self.handle(&mut state, now, Event::RequestFinished { request });
        if let Some(delivered) =
            finished.and_then(|inflight| delivered(&state, request, inflight, finish))
        {
            self.verify_delivered(&mut state, now, delivered);
        }
        if let Some(what) = misreported {
            // The answer stands (the tenant's counts are ours); the node
            // that lied about its time does not.
            self.broke_the_rules(&mut state, now, session.node, Some(request), &what);
        }
    }

    /// A node could not run (or finish) a generation.
    pub fn node_failed(&self, session: NodeSession, failed: proto::GenerationFailed) {
        let now = self.clock.now();
        let mut state = self.lock();
        if let Some(check) = verification::parse_check_id(&failed.generation_id) {
            return self.check_refused(&mut state, session, check);
        }
        let Some(request) = self.current_attempt(&state, session, &failed.generation_id) else {
            return;
        };
        let message = node_input::bounded_node_text(failed.message);
        tracing::warn!(request_id = request.0, %message, retryable = failed.retryable, "node failed a generation");
        if failed.retryable {
            self.retry_elsewhere(&mut state, now, request, session.node);
        } else {
            if let Some(inflight) = state.requests.get_mut(&request) {
                inflight.node = None;
            }
            self.fail(&mut state, now, request, GenerationError::Failed(message));
            while let Some(event) = state.follow_up.pop() {
                self.handle(&mut state, now, event);
            }
        }
    }

    /// Detaches the current attempt from `node` and lets the scheduler place
    /// the generation again; it resumes from its committed tokens.
    fn retry_elsewhere(
        &self,
        state: &mut CoreState,
        now: Millis,
        request: RequestId,
        node: NodeId,
    ) {
        if let Some(inflight) = state.requests.get_mut(&request) {
            inflight.node = None;
        }
        state.shares.stop(request, now.0);
        self.handle(state, now, Event::AttemptFailed { request, node });
    }

    /// The request a generation id names, if it is the current attempt on
    /// this node's current session.
    pub(super) fn current_attempt(
        &self,
        state: &CoreState,
        session: NodeSession,
        generation_id: &str,
    ) -> Option<RequestId> {
        let (request, attempt) = parse_generation_id(generation_id)?;
        let node = state.nodes.get(&session.node)?;
        let inflight = state.requests.get(&request)?;
        let current = node.session == session.session
            && inflight.node == Some(session.node)
            && inflight.attempt == attempt;
        current.then_some(request)
    }

    /// Queues the request's record for the request log.
    pub(super) fn record(
        &self,
        state: &mut CoreState,
        request: RequestId,
        status: &'static str,
        error: Option<String>,
    ) {
        let Some(inflight) = state.requests.get(&request) else {
            return;
        };
        let record = RequestRecord {
            id: inflight.public_id.clone(),
            tenant_id: inflight.tenant.id,
            model: inflight.model.name.clone(),
            status,
            prompt_tokens: u32::try_from(inflight.prompt.len()).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(inflight.committed.len()).unwrap_or(u32::MAX),
            nodes: inflight
                .segments
                .iter()
                .map(|segment| format!("{}:{}", segment.node, segment.completion_tokens))
                .collect(),
            created_ms: inflight.created_ms,
            finished_ms: self.clock.now().0,
            error,
        };
        if self.request_log.try_send(record).is_err() {
            self.metrics.request_log_dropped.fetch_add(1, ORDER);
        }
    }
}

impl CoreState {
    /// Forgets a request that ended (finished, failed or cancelled), after
    /// stopping its attempt on its node's share clock. Every removal goes
    /// through here, so no ended attempt keeps a share of a node's time.
    pub(super) fn remove_request(&mut self, request: RequestId, now: Millis) -> Option<InFlight> {
        self.shares.stop(request, now.0);
        self.requests.remove(&request)
    }
}

/// A finished generation as verification takes it, or `None` when a node
/// that produced part of it is no longer known here. Tokens committed on
/// another cell before this one took the generation are given to the
/// verifier as context, not checked: their producer is unknown here.
fn delivered(
    state: &CoreState,
    request: RequestId,
    inflight: InFlight,
    finish: FinishReason,
) -> Option<verification::Delivered> {
    let segments = inflight
        .segments
        .iter()
        .map(|segment| {
            let node = state.node_ids_by_name.get(&segment.node).copied();
            node.map(|node| (node, segment.completion_tokens))
        })
        .collect::<Option<Vec<_>>>()?;
    // An answer that stopped ended by end-of-generation, which the verifier
    // checks, or at one of the client's stop sequences, which its text shows
    // (the token that completes one is the answer's last).
    let ended_by_eos = finish == FinishReason::Stop && !inflight.reached_a_stop_sequence();
    Some(verification::Delivered {
        generation: request,
        given: u32::try_from(inflight.inherited).unwrap_or(u32::MAX),
        public_id: inflight.public_id,
        model: inflight.model,
        prompt: inflight.prompt,
        sampling: inflight.sampling,
        max_tokens: inflight.max_tokens,
        completion: inflight.committed,
        logprobs: inflight.logprobs,
        ended_by_eos,
        segments,
    })
}

/// `text` after `tokens`, or `None` when one of them comes after the token
/// that completed a stop sequence (the answer had ended there).
fn text_after(
    text: &engine::TextAssembler,
    pieces: &cell_api::served::PieceTable,
    tokens: &[proto::Token],
) -> Option<engine::TextAssembler> {
    let mut after = text.clone();
    for token in tokens {
        if after.stopped() {
            return None;
        }
        after.push(pieces.piece(token.token_id).unwrap_or_default());
    }
    Some(after)
}

fn generation_id(request: RequestId, attempt: u32) -> String {
    format!("{}.{attempt}", request.0)
}

fn parse_generation_id(text: &str) -> Option<(RequestId, u32)> {
    let (request, attempt) = text.split_once('.')?;
    Some((RequestId(request.parse().ok()?), attempt.parse().ok()?))
}

fn retry_seconds(retry_after_ms: Option<u64>) -> u64 {
    retry_after_ms
        .map(|ms| ms.div_ceil(1000).max(1))
        .unwrap_or(limits::RETRY_AFTER_DEFAULT_SECONDS)
}

fn rejection_of(reason: RejectReason, retry_after_ms: Option<u64>) -> Rejection {
    let retry_after_seconds = retry_seconds(retry_after_ms);
    match reason {
        RejectReason::NoEligibleNode => Rejection::NoEligibleNode {
            retry_after_seconds,
        },
        RejectReason::QueueFull => Rejection::QueueFull {
            retry_after_seconds,
        },
        RejectReason::OverConcurrency => Rejection::OverQuota {
            message: "too many concurrent requests for this tenant".into(),
            retry_after_seconds,
        },
        RejectReason::OverTokensPerMinute => Rejection::OverQuota {
            message: "tokens-per-minute quota of this tenant reached".into(),
            retry_after_seconds,
        },
        RejectReason::DeadlineExpired => Rejection::Other {
            message: "the request's deadline passed before it could run".into(),
        },
        RejectReason::UnknownTenant => Rejection::Other {
            message: "tenant unknown to the scheduler".into(),
        },
        RejectReason::AttemptsExhausted => Rejection::Other {
            message: "the generation was interrupted too many times".into(),
        },
    }
}

fn generation_error_of(rejection: Rejection) -> GenerationError {
    match rejection {
        Rejection::NoEligibleNode {
            retry_after_seconds,
        } => GenerationError::Rejected {
            reason: "no eligible node is available".into(),
            retry_after_seconds,
        },
        Rejection::QueueFull {
            retry_after_seconds,
        } => GenerationError::Rejected {
            reason: "the queue is full".into(),
            retry_after_seconds,
        },
        Rejection::OverQuota {
            message,
            retry_after_seconds,
        } => GenerationError::Rejected {
            reason: message,
            retry_after_seconds,
        },
        Rejection::Other { message } => GenerationError::Rejected {
            reason: message,
            retry_after_seconds: limits::RETRY_AFTER_DEFAULT_SECONDS,
        },
    }
}

/// A token a node sent, as the client gets it: the text is ours, the node's
/// `piece` bytes are never used.
fn committed_token(token: proto::Token, pieces: &cell_api::served::PieceTable) -> CommittedToken {
    let piece_of = |id: i32| pieces.piece(id).unwrap_or_default().to_vec();
    CommittedToken {
        token_id: token.token_id,
        piece: piece_of(token.token_id),
        logprob: token.logprob,
        top_logprobs: token
            .top_logprobs
            .into_iter()
            .map(|top| (top.token_id, piece_of(top.token_id), top.logprob))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_ids_round_trip() {
        let id = generation_id(RequestId(42), 3);
        assert_eq!(parse_generation_id(&id), Some((RequestId(42), 3)));
        assert_eq!(parse_generation_id("42"), None);
        assert_eq!(parse_generation_id("x.1"), None);
    }
}
