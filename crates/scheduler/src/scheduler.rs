//! The `Scheduler` state machine: its state, the event dispatch, and the read-only views.

use crate::fxhash::FxHashMap;

use crate::config::SchedulerConfig;
use crate::event::{Command, Event};
use crate::nodes::NodeTable;
use crate::queues::WaitQueues;
use crate::requests::Request;
use crate::tenants::Tenants;
use crate::types::{Millis, ModelId, NodeId, RequestId, TenantClass};

/// Places requests on vehicles. Events in, commands out; see the crate documentation for the
/// contract.
#[derive(Debug)]
pub struct Scheduler {
    pub(crate) config: SchedulerConfig,
    pub(crate) nodes: NodeTable,
    pub(crate) requests: FxHashMap<RequestId, Request>,
    pub(crate) tenants: Tenants,
    pub(crate) waiting: WaitQueues,
    pub(crate) stale_events: u64,
    /// Reused buffers, so that handling an event allocates nothing once warmed up.
    pub(crate) scratch_requests: Vec<RequestId>,
    pub(crate) scratch_moves: Vec<(RequestId, crate::event::StopReason)>,
    pub(crate) scratch_keys: Vec<crate::types::ModelId>,
    pub(crate) scratch_stranded: Vec<(TenantClass, crate::types::ModelId)>,
    /// Since when each (class, model) with waiting requests has had no node that could ever
    /// serve it; bounded by the number of queues.
    pub(crate) stranded_since: FxHashMap<(TenantClass, crate::types::ModelId), Millis>,
    /// The reserved guarantees (in slots) as last seen; when they change, waiting work may be
    /// able to preempt work that was protected before.
    pub(crate) guarantee_signature: u64,
    /// What each node has shown of itself (`SchedulerConfig::trust`); kept across
    /// reconnections, at most one entry per node id.
    pub(crate) trust: FxHashMap<NodeId, crate::trust::NodeTrust>,
    pub(crate) scratch_stalled: Vec<(RequestId, NodeId)>,
    /// The prompt heads nodes hold, as modelled from assignments (`heads`); empty while
    /// `SchedulerConfig::prefix_affinity` is off.
    pub(crate) heads: crate::heads::HeldHeads,
}

impl Scheduler {
    /// A scheduler with no nodes, tenants or requests.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            nodes: NodeTable::default(),
            requests: FxHashMap::default(),
            tenants: Tenants::default(),
            waiting: WaitQueues::default(),
            stale_events: 0,
            scratch_requests: Vec::new(),
            scratch_moves: Vec::new(),
            scratch_keys: Vec::new(),
            scratch_stranded: Vec::new(),
            stranded_since: FxHashMap::default(),
            guarantee_signature: 0,
            trust: FxHashMap::default(),
            scratch_stalled: Vec::new(),
            heads: crate::heads::HeldHeads::default(),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Apply one event at time `now`; append the resulting commands to `out`.
    ///
    /// `now` must not go backwards between calls. Before the event itself, everything that time
    /// alone has changed up to `now` is applied (drains before departure, allowed hours, energy
    /// caps, deadlines are checked on `Tick`), so commands for those may precede the event's own.
    pub fn handle(&mut self, now: Millis, event: Event, out: &mut Vec<Command>) {
        self.run_due_timers(now, out);
        match event {
            Event::NodeRegistered {
                node,
                capacity,
                state,
                policy,
            } => self.on_node_registered(now, node, capacity, state, policy, out),
            Event::NodeStateChanged { node, state } => self.on_node_state(now, node, state, out),
            Event::NodePolicyChanged { node, policy } => {
                self.on_node_policy(now, node, policy, out)
            }
            Event::NodeEnergyUsed { node, wh } => self.on_node_energy(now, node, wh, out),
            Event::NodeSlotHeld { node } => self.on_node_slot(now, node, true, out),
            Event::NodeSlotReleased { node } => self.on_node_slot(now, node, false, out),
            Event::NodeLost { node } => self.on_node_lost(now, node, out),
            Event::TenantConfigured { tenant, config } => {
                if !self
                    .tenants
                    .configure(tenant, config, self.config.tenants_max)
                {
                    self.stale_events += 1;
                }
                self.dispatch_all(now, out);
            }
            Event::RequestArrived {
                request,
                tenant,
                model,
                prompt_tokens,
                max_tokens,
                deadline,
                prompt_heads,
                resumes,
            } => {
                let arrival = crate::request_events::Arrival {
                    request,
                    tenant,
                    model,
                    prompt_tokens,
                    max_tokens,
                    deadline,
                    prompt_heads,
                    resumes,
                };
                self.on_request_arrived(now, arrival, out)
            }
            Event::TokensCommitted {
                request,
                committed_total,
            } => self.on_tokens(now, request, committed_total),
            Event::RequestFinished { request } => self.on_request_done(now, request, false, out),
            Event::RequestCancelled { request } => self.on_request_done(now, request, true, out),
            Event::AttemptFailed { request, node } => {
                self.on_attempt_failed(now, request, node, out)
            }
            Event::Tick => self.on_tick(now, out),
        }
        self.check_guarantees(now, out);
    }

    /// When the fleet's size changes the reserved guarantees, retry waiting work.
    fn check_guarantees(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.waiting.is_empty() || !self.tenants.any_guarantee() {
            return;
        }
        let signature = self
            .tenants
            .guarantee_signature(self.nodes.available_slots());
        if signature != self.guarantee_signature {
            self.guarantee_signature = signature;
            self.dispatch_all(now, out);
        }
    }

    /// Connected nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Requests of `class` waiting for a slot, parked ones included.
    pub fn queued(&self, class: TenantClass) -> usize {
        self.waiting.queued(class) + self.waiting.parked(class)
    }

    /// Requests of `class` that were stopped mid-generation and wait to resume.
    pub fn parked(&self, class: TenantClass) -> usize {
        self.waiting.parked(class)
    }

    /// Admitted requests not yet finished, cancelled or rejected.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Requests running on `node` (none if it is not connected).
    pub fn running_on(&self, node: NodeId) -> impl Iterator<Item = RequestId> + '_ {
        self.nodes
            .get(node)
            .into_iter()
            .flat_map(|node| node.running.iter().map(|running| running.request))
    }

    /// The node `request` runs on, if it is running.
    pub fn placement_of(&self, request: RequestId) -> Option<NodeId> {
        self.requests
            .get(&request)
            .and_then(|request| request.node())
    }

    /// Whether `node` may start a new generation of `class` at `now`: connected, within all of
    /// its owner's limits, accepting the class, and with a free slot. (The model is checked per
    /// request.) Time-driven changes not yet applied by a `handle` call at `now` are included.
    pub fn is_eligible(&self, now: Millis, node: NodeId, class: TenantClass) -> bool {
        let Some(entry) = self.nodes.get(node) else {
            return false;
        };
        let blocker = crate::policy::blocker(
            now,
            &entry.state,
            &entry.policy,
            entry.battery_ok,
            entry.energy,
            self.config.departure_hard_stop_ms,
        );
        blocker.is_none() && entry.policy.allowed_classes.contains(class) && entry.free_slots() > 0
    }

    /// Events ignored because they named unknown or no longer matching nodes or requests.
    pub fn stale_events(&self) -> u64 {
        self.stale_events
    }

    /// Estimated bytes held by the scheduler's per-node state (node table, indexes, timers).
    pub fn memory_estimate_bytes(&self) -> u64 {
        self.nodes.memory_estimate_bytes() + self.heads.memory_estimate_bytes()
    }

    /// Whether some connected node holds the prompt head `hash` of `model`, as far as the
    /// scheduler knows (see `heads`); always false while prefix affinity is off.
    pub fn holds_prompt_head(&self, model: ModelId, hash: u64) -> bool {
        !self.heads.holders(model, hash).is_empty()
    }

    /// Sum of slots over nodes that take work now.
    pub fn available_slots(&self) -> u64 {
        self.nodes.available_slots()
    }
}
