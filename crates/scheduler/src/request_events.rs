//! Handling request events: admission, progress, completion, cancellation, failures, and the
//! deadline sweep on `Tick`.

use crate::event::{Command, RejectReason, StopReason};
use crate::requests::{Heads, Placement, Request};
use crate::scheduler::Scheduler;
use crate::types::{Millis, ModelId, NodeId, PromptHeads, RequestId, Resume, TenantId};

/// The fields of `Event::RequestArrived`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    pub(crate) request: RequestId,
    pub(crate) tenant: TenantId,
    pub(crate) model: ModelId,
    pub(crate) prompt_tokens: u32,
    pub(crate) max_tokens: u32,
    pub(crate) deadline: Option<Millis>,
    pub(crate) prompt_heads: PromptHeads,
    pub(crate) resumes: Option<Resume>,
}

impl Scheduler {
    pub(crate) fn on_request_arrived(
        &mut self,
        now: Millis,
        arrival: Arrival,
        out: &mut Vec<Command>,
    ) {
        let request = arrival.request;
        if self.requests.contains_key(&request) {
            self.stale_events += 1;
            return;
        }
        let reject = |reason, retry_after_ms| Command::Reject {
            request,
            reason,
            retry_after_ms,
        };
        if arrival.deadline.is_some_and(|deadline| deadline <= now) {
            out.push(reject(RejectReason::DeadlineExpired, None));
            return;
        }
        let Some(class) = self
            .tenants
            .get(arrival.tenant)
            .map(|tenant| tenant.config.class)
        else {
            out.push(reject(RejectReason::UnknownTenant, None));
            return;
        };
        if self.nodes.servable(arrival.model, class) == 0 {
            out.push(reject(
                RejectReason::NoEligibleNode,
                Some(self.config.no_eligible_node_retry_after_ms),
            ));
            return;
        }
        // Whoever waits for the same thing goes first; a full queue refuses early.
        let must_wait = self.waiting.has_waiting(class, arrival.model);
        let queue_full = self.waiting.queued(class) >= self.config.queue_max(class) as usize;
        if must_wait && queue_full {
            out.push(reject(
                RejectReason::QueueFull,
                Some(self.config.queue_full_retry_after_ms),
            ));
            return;
        }
        let tokens = u64::from(arrival.prompt_tokens) + u64::from(arrival.max_tokens);
        if let Err((reason, retry_after_ms)) = self.tenants.admit(
            now,
            arrival.tenant,
            tokens,
            self.config.over_concurrency_retry_after_ms,
        ) {
            out.push(reject(reason, retry_after_ms));
            return;
        }
        let entry = Request {
            tenant: arrival.tenant,
            class,
            model: arrival.model,
            prompt_tokens: arrival.prompt_tokens,
            max_tokens: arrival.max_tokens,
            deadline: arrival.deadline,
            committed: arrival.resumes.map_or(0, |resume| resume.committed),
            attempts_failed: 0,
            placement: Placement::Waiting {
                parked: false,
                seq: 0,
            },
            progress_at: now,
            attempt_tokens: 0,
            prompt_heads: Heads::new(arrival.prompt_heads),
            numerics: arrival.resumes.map_or(0, |resume| resume.numerics),
        };
        self.requests.insert(request, entry);
        if must_wait {
            self.enqueue(request, false);
            self.dispatch_model(now, arrival.model, out);
            return;
        }
        if self.try_start(now, request, 0, out) {
            return;
        }
        if queue_full {
            self.forget(request);
            out.push(reject(
                RejectReason::QueueFull,
                Some(self.config.queue_full_retry_after_ms),
            ));
            return;
        }
        self.enqueue(request, false);
    }

    /// Tokens reported after a `Stop` (the node was still streaming) count too: the coordinator
    /// kept them, so the next attempt resumes after them.
    /// Progress of a running attempt restarts its stall clock and, after its first token,
    /// measures its node's pace.
    pub(crate) fn on_tokens(&mut self, now: Millis, request: RequestId, committed_total: u32) {
        let Some(entry) = self.requests.get_mut(&request) else {
            self.stale_events += 1;
            return;
        };
        let delivered = committed_total.saturating_sub(entry.committed);
        entry.committed = entry.committed.max(committed_total);
        let Placement::Running { node } = entry.placement else {
            return;
        };
        if delivered == 0 || self.config.trust.is_none() {
            return;
        }
        if entry.attempt_tokens > 0 {
            let elapsed_ms = now.since(entry.progress_at);
            self.trust
                .entry(node)
                .or_default()
                .observe_tokens(delivered, elapsed_ms);
        }
        entry.attempt_tokens = entry.attempt_tokens.saturating_add(delivered);
        entry.progress_at = now;
    }

    /// Finished (`cancelled == false`) or cancelled by the client.
    pub(crate) fn on_request_done(
        &mut self,
        now: Millis,
        request: RequestId,
        cancelled: bool,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.requests.get(&request) else {
            self.stale_events += 1;
            return;
        };
        match entry.placement {
            Placement::Running { node } => {
                self.detach(request, node);
                if cancelled {
                    out.push(Command::Cancel { request, node });
                } else if self.config.trust.is_some() {
                    self.trust.entry(node).or_default().completed();
                    self.refresh_slots(node);
                }
                self.forget(request);
                self.dispatch_node(now, node, out);
            }
            Placement::Waiting { .. } => {
                if let Some(waiter) = self.waiter_of(request) {
                    self.waiting.remove(&waiter);
                }
                self.forget(request);
            }
        }
    }

    pub(crate) fn on_attempt_failed(
        &mut self,
        now: Millis,
        request: RequestId,
        node: NodeId,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.requests.get_mut(&request) else {
            self.stale_events += 1;
            return;
        };
        if entry.node() != Some(node) {
            self.stale_events += 1;
            return;
        }
        self.fail_attempt(now, request, node, false, out);
        self.dispatch_node(now, node, out);
    }

    /// Ends a running attempt that failed (`stalled`: the scheduler stops it; otherwise the
    /// node reported it) and places the request again, or rejects it once it has failed
    /// `attempts_max` times.
    fn fail_attempt(
        &mut self,
        now: Millis,
        request: RequestId,
        node: NodeId,
        stalled: bool,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.requests.get_mut(&request) else {
            return;
        };
        entry.attempts_failed = entry.attempts_failed.saturating_add(1);
        let exhausted = entry.attempts_failed >= self.config.attempts_max;
        self.detach(request, node);
        if stalled {
            out.push(Command::Stop {
                request,
                node,
                reason: StopReason::Stalled,
            });
        }
        if exhausted {
            self.forget(request);
            out.push(Command::Reject {
                request,
                reason: RejectReason::AttemptsExhausted,
                retry_after_ms: None,
            });
        } else {
            self.place_or_wait(now, request, true, out);
        }
    }

    pub(crate) fn on_tick(&mut self, now: Millis, out: &mut Vec<Command>) {
        self.expire_deadlines(now, out);
        self.reject_stranded(now, out);
        self.move_stalled(now, out);
    }

    /// Move every running generation that made no progress within its node's stall bound, as
    /// a failed attempt. Each stall counts against its node, and the moved work is placed while
    /// the node has no free slot, so that it goes elsewhere when anywhere else can take it.
    fn move_stalled(&mut self, now: Millis, out: &mut Vec<Command>) {
        let Some(config) = &self.config.trust else {
            return;
        };
        let mut stalled = std::mem::take(&mut self.scratch_stalled);
        stalled.clear();
        for (id, entry) in &self.requests {
            let Placement::Running { node } = entry.placement else {
                continue;
            };
            let trust = self.trust.get(&node).copied().unwrap_or_default();
            let first_token = (entry.attempt_tokens == 0)
                .then(|| entry.prompt_tokens.saturating_add(entry.committed));
            if config.has_stalled(now, entry.progress_at, &trust, first_token) {
                stalled.push((*id, node));
            }
        }
        // Map order is not part of the contract; move in a fixed order.
        stalled.sort_unstable();
        for (_, node) in &stalled {
            self.trust.entry(*node).or_default().stalled();
            self.nodes.update(*node, |entry| entry.capacity.slots = 0);
        }
        for (request, node) in &stalled {
            self.fail_attempt(now, *request, *node, true, out);
        }
        for (_, node) in &stalled {
            self.refresh_slots(*node);
            self.dispatch_node(now, *node, out);
        }
        self.scratch_stalled = stalled;
    }

    /// Gives a node the slots its record allows (`TrustConfig::slots_allowed`).
    pub(crate) fn refresh_slots(&mut self, node: NodeId) {
        let Some(config) = &self.config.trust else {
            return;
        };
        let trust = self.trust.get(&node).copied().unwrap_or_default();
        self.nodes.update(node, |entry| {
            entry.capacity.slots = config.slots_allowed(entry.claimed_slots, &trust);
        });
    }

    /// Reject waiting requests that no connected node could serve for `no_node_grace_ms`.
    fn reject_stranded(&mut self, now: Millis, out: &mut Vec<Command>) {
        let mut stranded = std::mem::take(&mut self.scratch_stranded);
        stranded.clear();
        for (class, model) in self.waiting.keys() {
            if self.nodes.servable(model, class) > 0 {
                continue;
            }
            let since = *self.stranded_since.entry((class, model)).or_insert(now);
            if now.since(since) >= self.config.no_node_grace_ms {
                stranded.push((class, model));
            }
        }
        // Map order is not part of the contract; reject in a fixed order.
        stranded.sort_unstable();
        let nodes = &self.nodes;
        let waiting = &self.waiting;
        self.stranded_since.retain(|(class, model), _| {
            nodes.servable(*model, *class) == 0 && waiting.has_waiting(*class, *model)
        });
        let retry_after_ms = Some(self.config.no_eligible_node_retry_after_ms);
        for (class, model) in &stranded {
            while let Some(request) = self.waiting.head(*class, *model, |_| 0) {
                let Some(waiter) = self.waiter_of(request) else {
                    debug_assert!(false, "waiting request {request:?} has no record");
                    break;
                };
                self.waiting.remove(&waiter);
                self.forget(request);
                out.push(Command::Reject {
                    request,
                    reason: RejectReason::NoEligibleNode,
                    retry_after_ms,
                });
            }
        }
        self.scratch_stranded = stranded;
    }

    fn expire_deadlines(&mut self, now: Millis, out: &mut Vec<Command>) {
        while let Some(request) = self.waiting.pop_expired(now) {
            // Only waiting requests have deadline entries; anything else is not expired.
            let Some(waiter) = self.waiter_of(request) else {
                continue;
            };
            self.waiting.remove(&waiter);
            self.forget(request);
            out.push(Command::Reject {
                request,
                reason: RejectReason::DeadlineExpired,
                retry_after_ms: None,
            });
        }
    }

    /// Drop a request that is neither running nor waiting, releasing its tenant's quota.
    pub(crate) fn forget(&mut self, request: RequestId) {
        let Some(entry) = self.requests.remove(&request) else {
            return;
        };
        debug_assert!(entry.node().is_none(), "forget a running request");
        if let Some(tenant) = self.tenants.get_mut(entry.tenant) {
            tenant.in_flight = tenant.in_flight.saturating_sub(1);
        }
    }
}
