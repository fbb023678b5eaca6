//! The coordinator's core: the scheduler plus what the scheduler does not
//! know — the prompt and committed tokens of every in-flight generation, the
//! channel to each connected node, and the channel to each waiting client.
//!
//! Everything here runs under one `std::sync::Mutex`: no `.await` happens
//! while it is held (sending uses `try_send` on bounded channels), so holding
//! it is always short. The scheduler decides; this module carries its
//! commands out and feeds it the events that nodes and clients cause.
//!
//! **Invariant:** a token reaches a client only once it is committed here, in
//! order, from the node that currently runs the generation. Tokens from a
//! stale attempt (a node that was stopped or lost) are dropped, so a migrated
//! generation shows the client no gap and no duplicate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::future::BoxFuture;
use scheduler::{Command, Event, Millis, NodeId, RequestId, Scheduler, TenantId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::metrics::Metrics;
use crate::nodes::{ConnectedNode, NodeSession};
use cell_api::metering::Metering;
use cell_api::served::{ServedModel, ServedModels};
use cell_api::{Capacity, CapacityListing, Cell, ModelTotals, NodeSummary};
use store::{RequestRecord, TenantClass};

// What the gateway and the core say to each other lives at the seam; the
// core's callers keep naming it here.
pub use cell_api::{
    Admitted, CommittedToken, FinishReason, GenerationError, NewGeneration, Rejection, TenantRef,
    Update, Usage,
};

struct InFlight {
    public_id: String,
    tenant: TenantRef,
    model: Arc<ServedModel>,
    prompt: Arc<Vec<i32>>,
    /// The prompt's head hashes, computed once (prefix affinity).
    prompt_heads: scheduler::PromptHeads,
    sampling: proto::Sampling,
    max_tokens: u32,
    stop: Vec<String>,
    /// The answer's text as its stop sequences see it (`None` without any),
    /// fed with every committed token as a vehicle's engine is: an answer
    /// ends with the token that completes a stop sequence, and a vehicle
    /// that sends one after it breaks the protocol (the client never sees
    /// such tokens, but would pay for them).
    stop_text: Option<engine::TextAssembler>,
    top_logprobs: u32,
    /// The prompt's scores while they are asked for and not all in
    /// (`NewGeneration::prompt_logprobs`): the current attempt's so far.
    /// They reach the client in one update once complete, before any token.
    prompt_scores: Option<Vec<CommittedToken>>,
    /// The tenant's prediction of the answer (`NewGeneration::draft`), offered to an attempt
    /// that starts from the prompt alone.
    draft: Vec<i32>,
    committed: Vec<i32>,
    /// The log-probability each committed token came with, from the first
    /// token committed here: what a verifier checks.
    logprobs: Vec<f32>,
    /// Tokens committed on another cell before this one took the generation.
    inherited: usize,
    /// Structured output: the grammar's state after `committed`, which every
    /// token a vehicle sends must follow (a vehicle is not trusted to have
    /// applied it).
    grammar: Option<engine::Constrained>,
    node: Option<NodeId>,
    /// The numerics (`nodes::Numerics`) of the vehicle it last ran on.
    numerics: Option<u32>,
    attempt: u32,
    /// One entry per attempt, in order: what billing meters.
    segments: Vec<cell_api::metering::SegmentTrack>,
    updates: mpsc::Sender<Update>,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    created_ms: i64,
}

impl InFlight {
    /// Whether the committed text holds one of the answer's stop sequences:
    /// the answer ended there.
    fn reached_a_stop_sequence(&self) -> bool {
        self.stop_text
            .as_ref()
            .is_some_and(engine::TextAssembler::stopped)
    }
}

struct CoreState {
    scheduler: Scheduler,
    nodes: HashMap<NodeId, ConnectedNode>,
    node_ids_by_name: HashMap<String, NodeId>,
    requests: HashMap<RequestId, InFlight>,
    configured_tenants: HashSet<i64>,
    next_request: u64,
    next_session: u64,
    /// Reused between calls so that steady-state handling does not allocate.
    commands: Vec<Command>,
    /// Events caused while carrying out commands (e.g. a node whose channel
    /// is closed), handled before the lock is released.
    follow_up: Vec<Event>,
    /// Each node's share clock, which a segment's compute time is measured
    /// with: every attempt that starts running on a node is started here and
    /// every one that ends is stopped (`CoreState::remove_request` stops the
    /// attempts that end with their request).
    shares: cell_api::metering::NodeShares,
    /// Prompt KV caches kept for handovers.
    checkpoints: checkpoints::Checkpoints,
    /// The prompt heads assigned lately, for the capacity's `prompt_heads`.
    recent_heads: heads::RecentHeads,
    /// Each vehicle's electricity price, given to the scheduler when it
    /// connects.
    energy_prices: crate::nodes::EnergyPrices,
    /// Which nodes compute the same numbers, for the scheduler.
    numerics: crate::nodes::Numerics,
    /// Which answers are verified, by whom, and the nodes' trust.
    verifications: verification::Verifications,
}

pub struct Core {
    state: Mutex<CoreState>,
    /// The models this cell serves; a generation names one of them.
    models: Arc<ServedModels>,
    pub metrics: Arc<Metrics>,
    request_log: mpsc::Sender<RequestRecord>,
    /// Every reading of the time in the core goes through here.
    clock: Arc<dyn Clock>,
}

/// The system clock's wall time, for code outside the core that has no
/// clock of its own (the gateway, the command line). The core never calls it.
pub fn now_ms() -> Millis {
    SystemClock.now()
}

impl Core {
    pub fn new(
        scheduler: Scheduler,
        models: Arc<ServedModels>,
        metrics: Arc<Metrics>,
        request_log: mpsc::Sender<RequestRecord>,
        clock: Arc<dyn Clock>,
    ) -> Core {
        Core {
            state: Mutex::new(CoreState {
                scheduler,
                nodes: HashMap::new(),
                node_ids_by_name: HashMap::new(),
                requests: HashMap::new(),
                configured_tenants: HashSet::new(),
                next_request: 1,
                next_session: 1,
                commands: Vec::new(),
                follow_up: Vec::new(),
                shares: cell_api::metering::NodeShares::default(),
                checkpoints: checkpoints::Checkpoints::default(),
                recent_heads: heads::RecentHeads::default(),
                energy_prices: crate::nodes::EnergyPrices::default(),
                numerics: crate::nodes::Numerics::default(),
                verifications: verification::Verifications::new(
                    trust::VerificationPolicy::default(),
                    random_secret(),
                ),
            }),
            models,
            metrics,
            request_log,
            clock,
        }
    }

    /// The vehicles' electricity prices, for those that connect from now on.
    pub fn set_energy_prices(&self, prices: crate::nodes::EnergyPrices) {
        self.lock().energy_prices = prices;
    }

    /// The verification policy and the secret its draws are keyed with, for
    /// the nodes that connect from now on (a test fixes the secret; a cell
    /// draws a random one when it starts).
    pub fn set_verification(&self, policy: trust::VerificationPolicy, secret: trust::Secret) {
        self.lock().verifications = verification::Verifications::new(policy, secret);
    }

    fn lock(&self) -> MutexGuard<'_, CoreState> {
        // A panic while holding the lock is a bug that already aborted one
        // task; the state itself stays consistent between events, so carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a generation: the scheduler either places it, queues it, or
    /// refuses it (returned as a `Rejection`, nothing kept). A generation
    /// with a deadline must start within it, or fail with `DeadlineExpired`.
    pub fn submit(&self, generation: NewGeneration) -> Result<Admitted, Rejection> {
        let Some(model) = self.models.lookup(&generation.model) else {
            return Err(Rejection::Other {
                message: format!("this cell does not serve the model `{}`", generation.model),
            });
        };
        let grammar = match generation.sampling.grammar.as_str() {
            "" => None,
            grammar => Some(
                model
                    .grammar_state(grammar, &generation.committed)
                    .map_err(|error| Rejection::Other {
                        message: format!("the generation's grammar cannot be used: {error}"),
                    })?,
            ),
        };
        let now = self.clock.now();
        let mut state = self.lock();
        let request = RequestId(state.next_request);
        state.next_request += 1;
        let tenant = TenantId(u32::try_from(generation.tenant.id).unwrap_or(u32::MAX));
        if state.configured_tenants.insert(generation.tenant.id) {
            let config = tenant_config(generation.tenant.class);
            self.handle(&mut state, now, Event::TenantConfigured { tenant, config });
        }
        let (sender, updates) = mpsc::channel(limits::CLIENT_UPDATES_CAPACITY);
        let prompt_tokens = u32::try_from(generation.prompt.len()).unwrap_or(u32::MAX);
        let committed_total = u32::try_from(generation.committed.len()).unwrap_or(u32::MAX);
        let prompt_heads = scheduler::PromptHeads::of(&generation.prompt);
        // Tokens committed on a cell that was lost: the scheduler places the generation as a
        // move, on a node computing what the last of them was computed with where one is free.
        // A key no node here registered is alike to none (`NUMERICS_OTHER`); without a key
        // nothing is known of where the tokens came from.
        let moved_from = generation
            .numerics
            .as_ref()
            .filter(|_| committed_total > 0)
            .map(|key| state.numerics.find(key));
        let resumes = (committed_total > 0).then(|| scheduler::Resume {
            committed: committed_total,
            numerics: moved_from.unwrap_or(crate::nodes::NUMERICS_OTHER),
        });
        // A prompt of one token has nothing to score: its (empty) scores are complete now.
        let prompt_scores = generation.prompt_logprobs.then(Vec::new);
        let prompt_scores = match prompt_scores {
            Some(scores) if generation.prompt.len() <= 1 => {
                let _ = sender.try_send(Update::PromptLogprobs(scores));
                None
            }
            scores => scores,
        };
        let stop_text = generation
            .stop
            .iter()
            .any(|stop| !stop.is_empty())
            .then(|| {
                let mut text = engine::TextAssembler::new(generation.stop.clone());
                for &token in &generation.committed {
                    text.push(model.pieces.piece(token).unwrap_or_default());
                }
                text
            });
        state.requests.insert(
            request,
            InFlight {
                public_id: generation.public_id,
                tenant: generation.tenant,
                model: Arc::clone(&model),
                prompt: Arc::new(generation.prompt),
                prompt_heads,
                sampling: generation.sampling,
                max_tokens: generation.max_tokens,
                stop: generation.stop,
                stop_text,
                top_logprobs: generation.top_logprobs,
                prompt_scores,
                draft: generation.draft,
                inherited: generation.committed.len(),
                committed: generation.committed,
                logprobs: Vec::new(),
                grammar,
                node: None,
                numerics: moved_from,
                attempt: 0,
                segments: Vec::new(),
                updates: sender,
                admitted_at: self.clock.instant(),
                first_token_at: None,
                created_ms: now.0,
            },
        );
        let arrived = Event::RequestArrived {
            request,
            tenant,
            model: model.id,
            prompt_tokens,
            max_tokens: generation.max_tokens,
            deadline: generation.deadline_ms.map(|ms| now.plus(ms)),
            prompt_heads,
            resumes,
        };
        let rejection = self.handle(&mut state, now, arrived);
        match rejection.into_iter().find(|(id, _)| *id == request) {
            Some((_, rejection)) => {
                state.remove_request(request, now);
                Err(rejection)
            }
            None => {
                self.metrics.requests_accepted.fetch_add(1, ORDER);
                self.metrics
                    .prompt_tokens
                    .fetch_add(u64::from(prompt_tokens), ORDER);
                self.metrics.generations_active.fetch_add(1, ORDER);
                Ok(Admitted { request, updates })
            }
        }
    }

    /// The client went away, or a routed request hands off or discards its
    /// edge part: stops the generation wherever it runs and returns what was
    /// metered of it so far (no node report), or `None` if it had already
    /// ended.
    pub fn cancel_metered(&self, request: RequestId) -> Option<Metering> {
        let now = self.clock.now();
        let mut state = self.lock();
        let metering = metered_so_far(&state, request, now)?;
        self.record(&mut state, request, "cancelled", None);
        self.metrics.requests_cancelled.fetch_add(1, ORDER);
        self.handle(&mut state, now, Event::RequestCancelled { request });
        // A running generation was removed by the scheduler's `Cancel`; a
        // queued one has nothing to cancel on a node.
        if state.remove_request(request, now).is_some() {
            self.metrics.generations_active.fetch_sub(1, ORDER);
        }
        Some(metering)
    }

    /// A node passed the handshake. Returns its session, whose receiver feeds
    /// the node's outbound stream, and the token cancelled when the core
    /// drops the session (the read loop stops on it). `owner` is its owner's
    /// name, which decides who may verify its answers; "" for none: the
    /// platform's own node, whose answers are not verified.
    pub fn node_connected(
        &self,
        name: &str,
        owner: &str,
        hello: &proto::Hello,
        outbound: mpsc::Sender<proto::CoordinatorMessage>,
        policy: scheduler::OwnerPolicy,
    ) -> (NodeSession, CancellationToken) {
        let now = self.clock.now();
        let mut state = self.lock();
        let next_id = NodeId(u32::try_from(state.node_ids_by_name.len()).unwrap_or(u32::MAX));
        let node = *state
            .node_ids_by_name
            .entry(name.to_string())
            .or_insert(next_id);
        if state.nodes.contains_key(&node) {
            // The same vehicle connected again before its old stream was
            // noticed dead: the old session's work moves first.
            self.drop_node(&mut state, now, node);
        }
        // Of a registration only: no node runs "mixed".
        let attention = match hello.hardware.as_ref().map(proto::Hardware::attention) {
            Some(proto::Attention::Mixed) | None => proto::Attention::Off,
            Some(attention) => attention,
        };
        let numerics_key = crate::nodes::numerics_key(hello.hardware.as_ref(), attention);
        let numerics = state.numerics.id_of(numerics_key.clone());
        if numerics == crate::nodes::NUMERICS_OTHER {
            self.metrics
                .registrations_of_unknown_numerics
                .fetch_add(1, ORDER);
            tracing::warn!(
                node_id = %name,
                "the cell tells no more numerics apart; this node's answers get the wider tolerance"
            );
        }
        state
            .verifications
            .connected(node, name, owner, (attention, numerics));
        let session = state.next_session;
        state.next_session += 1;
        let mut connected =
            ConnectedNode::new(name, session, outbound, hello, (numerics, numerics_key));
        connected.last_heard = self.clock.instant();
        let disconnect = connected.disconnect.clone();
        let price = state.energy_prices.of(name);
        let registered = connected.registration(node, &self.models, policy, price);
        state.nodes.insert(node, connected);
        self.metrics.nodes_connected.fetch_add(1, ORDER);
        self.handle(&mut state, now, registered);
        (NodeSession { node, session }, disconnect)
    }

    /// The node's stream ended or it stopped heartbeating.
    pub fn node_lost(&self, session: NodeSession) {
        let now = self.clock.now();
        let mut state = self.lock();
        let current = state
            .nodes
            .get(&session.node)
            .is_some_and(|node| node.session == session.session);
        if current {
            self.drop_node(&mut state, now, session.node);
        }
    }

    /// A node broke the protocol (`node_input::Violation`, a bad KV
    /// checkpoint): it is counted, logged and disconnected — marked lost, so
    /// that its generations continue elsewhere from their committed tokens,
    /// and its read loop stops reading. An owned node is quarantined for it
    /// too (no honest agent breaks the protocol). A session that is no
    /// longer current was already dropped and is left alone.
    fn protocol_violation(&self, state: &mut CoreState, session: NodeSession, what: &str) {
        let Some(node) = state.nodes.get(&session.node) else {
            return;
        };
        if node.session != session.session {
            return;
        }
        self.metrics.node_protocol_violations.fetch_add(1, ORDER);
        tracing::warn!(node_id = %node.name, violation = %what, "node broke the protocol; disconnecting it");
        let now = self.clock.now();
        if !self.broke_the_rules(state, now, session.node, None, what) {
            self.drop_node(state, now, session.node);
        }
    }

    /// `protocol_violation` for a caller that does not hold the lock.
    pub fn node_protocol_violation(&self, session: NodeSession, what: &str) {
        let mut state = self.lock();
        self.protocol_violation(&mut state, session, what);
    }

    fn drop_node(&self, state: &mut CoreState, now: Millis, node: NodeId) {
        if let Some(removed) = state.nodes.remove(&node) {
            removed.disconnect.cancel();
            tracing::warn!(node_id = %removed.name, "node gone");
            self.metrics.nodes_connected.fetch_sub(1, ORDER);
            self.metrics.nodes_lost.fetch_add(1, ORDER);
            self.handle(state, now, Event::NodeLost { node });
            self.verifier_lost(state, node);
        }
    }

    pub fn heartbeat(&self, session: NodeSession, heartbeat: &proto::Heartbeat) {
        let now = self.clock.now();
        let mut state = self.lock();
        let Some(node) = state.nodes.get_mut(&session.node) else {
            return;
        };
        if node.session != session.session {
            return;
        }
        let changed = node.observe_heartbeat(heartbeat);
        node.last_heard = self.clock.instant();
        if let Some(changed) = changed {
            self.metrics.node_state_changes.add(&node.name);
            self.handle(
                &mut state,
                now,
                Event::NodeStateChanged {
                    node: session.node,
                    state: changed,
                },
            );
        }
    }

    /// Marks nodes gone whose heartbeats stopped and ticks the scheduler.
    pub fn tick(&self, heartbeat_timeout: std::time::Duration) {
        let now = self.clock.now();
        let now_instant = self.clock.instant();
        let mut state = self.lock();
        let silent: Vec<NodeId> = state
            .nodes
            .iter()
            .filter(|(_, node)| {
                now_instant.saturating_duration_since(node.last_heard) > heartbeat_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for node in silent {
            tracing::warn!(node_id = %state.nodes[&node].name, "heartbeat timeout");
            self.drop_node(&mut state, now, node);
        }
        self.handle(&mut state, now, Event::Tick);
        self.tick_checks(&mut state, now);
        state.drop_finished_checkpoints();
    }

    /// Names of connected nodes, sorted.
    pub fn connected_nodes(&self) -> Vec<String> {
        self.capacity().node_names()
    }

    /// Every connected node: what it serves, its slots and what it runs.
    pub fn capacity(&self) -> Capacity {
        self.capacity_listing(usize::MAX).capacity
    }

    /// `capacity` naming at most `listed` nodes (see `cell_api::keep_listed`):
    /// one pass over the nodes that builds a summary only for those named,
    /// with each model's generations waiting for a vehicle.
    pub fn capacity_listing(&self, listed: usize) -> CapacityListing {
        let state = self.lock();
        let mut models: Vec<ModelTotals> = Vec::new();
        let mut order: Vec<(&str, u32, NodeId)> = Vec::with_capacity(state.nodes.len());
        for (id, node) in &state.nodes {
            let running = state.shares.running(*id);
            for model in node.served(&self.models) {
                ModelTotals::entry(&mut models, &model.name).add(node.slots(), running);
            }
            order.push((node.name.as_str(), running, *id));
        }
        // Waiting generations, for the models some vehicle here serves.
        for inflight in state
            .requests
            .values()
            .filter(|inflight| inflight.node.is_none())
        {
            if let Some(totals) = models
                .iter_mut()
                .find(|totals| totals.model == inflight.model.name)
            {
                totals.queued = totals.queued.saturating_add(1);
            }
        }
        models.sort_by(|a, b| a.model.cmp(&b.model));
        let unlisted =
            cell_api::keep_listed(&mut order, listed, |&(name, running, _)| (name, running));
        let nodes = order
            .iter()
            .map(|&(name, running, id)| NodeSummary {
                name: name.to_owned(),
                models: state.nodes[&id].served_models(&self.models),
                slots: state.nodes[&id].slots(),
                running,
            })
            .collect();
        let prompt_heads = state.recent_heads.published(&state.scheduler, &self.models);
        CapacityListing {
            capacity: Capacity {
                nodes,
                unlisted,
                prompt_heads,
            },
            models,
        }
    }

    /// Which node runs a request now, by name.
    pub fn node_of(&self, request: RequestId) -> Option<String> {
        let state = self.lock();
        let node = state.requests.get(&request)?.node?;
        state.nodes.get(&node).map(|node| node.name.clone())
    }
}

impl Cell for Core {
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>> {
        Box::pin(futures::future::ready(Core::submit(self, generation)))
    }

    fn cancel(&self, request: RequestId) -> Option<Metering> {
        self.cancel_metered(request)
    }

    fn metered(&self, request: RequestId) -> Option<Metering> {
        let now = self.clock.now();
        metered_so_far(&self.lock(), request, now)
    }

    fn numerics(&self, request: RequestId) -> Option<cell_api::Numerics> {
        let state = self.lock();
        let node = state.requests.get(&request)?.node?;
        Some(state.nodes.get(&node)?.numerics_key.clone())
    }

    fn capacity(&self) -> Capacity {
        Core::capacity(self)
    }

    fn capacity_listing(&self, listed: usize) -> CapacityListing {
        Core::capacity_listing(self, listed)
    }

    fn owner_policy_changed(&self, node: &str, policy: scheduler::OwnerPolicy) {
        self.node_policy_changed(node, policy);
    }
}

/// A secret for the verification draws from the operating system's
/// generator: nobody outside this process can predict them.
fn random_secret() -> trust::Secret {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    trust::Secret::new(bytes)
}

/// What was metered of `request` by `now`, as a cancel hands it back, or
/// `None` if it is not in flight.
fn metered_so_far(state: &CoreState, request: RequestId, now: Millis) -> Option<Metering> {
    let inflight = state.requests.get(&request)?;
    Some(Metering {
        prompt_tokens: u32::try_from(inflight.prompt.len()).unwrap_or(u32::MAX),
        segments: inflight.segments.clone(),
        node_report: None,
        finished_ms: now.0,
    })
}

pub(crate) const ORDER: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

/// Scheduler settings for a tenant of a class until tenant contracts exist.
fn tenant_config(class: TenantClass) -> scheduler::TenantConfig {
    scheduler::TenantConfig {
        class,
        weight: 1,
        max_concurrency: store::contracts::TENANT_CONCURRENT_REQUESTS_DEFAULT,
        tokens_per_minute: None,
        reserved_min_share_permille: 0,
    }
}

mod checkpoints;
mod clock;
mod contracts;
mod dispatch;
mod heads;
mod verification;

pub use clock::{Clock, ManualClock, SystemClock};
pub use verification::{NodeTrust, QuarantineNotice};

#[cfg(test)]
mod tests;
