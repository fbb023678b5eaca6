//! Placement: choosing a node for a request, preempting lower-ranked work when none is free,
//! queueing when neither works, and starting waiting requests when capacity appears.

use crate::event::{Command, StopReason};
use crate::index::VictimGroup;
use crate::nodes::Running;
use crate::policy::expected_generation_ms;
use crate::queues::Waiter;
use crate::requests::{Placement, Request};
use crate::scheduler::Scheduler;
use crate::types::{Millis, ModelId, NodeId, RequestId, TenantClass};

/// Preemption chains (a displaced request preempting one of lower rank in turn) are at most this
/// long. Ranks strictly increase along a chain and there are four, so this is never reached; it
/// bounds the recursion should that reasoning ever break.
const PREEMPTION_CHAIN_MAX: u8 = 4;

impl Scheduler {
    /// Try to start `request` now (free slot, else preemption); queue it if neither works.
    pub(crate) fn place_or_wait(
        &mut self,
        now: Millis,
        request: RequestId,
        parked: bool,
        out: &mut Vec<Command>,
    ) {
        self.place_or_wait_chained(now, request, parked, 0, out);
    }

    fn place_or_wait_chained(
        &mut self,
        now: Millis,
        request: RequestId,
        parked: bool,
        depth: u8,
        out: &mut Vec<Command>,
    ) {
        if !self.try_start(now, request, depth, out) {
            self.enqueue(request, parked);
        }
    }

    /// Put an admitted request (not running, not waiting) in its queue.
    pub(crate) fn enqueue(&mut self, request: RequestId, parked: bool) {
        let Some(entry) = self.requests.get(&request) else {
            return;
        };
        let waiter = Waiter {
            request,
            class: entry.class,
            model: entry.model,
            tenant: entry.tenant,
            parked,
            seq: 0,
            deadline: entry.deadline,
        };
        let seq = self.waiting.push(waiter);
        if let Some(entry) = self.requests.get_mut(&request) {
            entry.placement = Placement::Waiting { parked, seq };
        }
    }

    /// Start `request` on the best free node, else on a slot taken from lower-ranked work.
    /// The request must not be running; a waiting one stays in its queue, for the caller to take
    /// out once it has started.
    pub(crate) fn try_start(
        &mut self,
        now: Millis,
        request: RequestId,
        depth: u8,
        out: &mut Vec<Command>,
    ) -> bool {
        let Some(entry) = self.requests.get(&request) else {
            return false;
        };
        if let Some(node) = self.best_free_node(now, entry) {
            self.assign(now, request, node, out);
            return true;
        }
        if depth >= PREEMPTION_CHAIN_MAX {
            return false;
        }
        let Some((node, victim)) = self.find_victim(entry) else {
            return false;
        };
        self.detach(victim, node);
        out.push(Command::Stop {
            request: victim,
            node,
            reason: StopReason::Preempted,
        });
        self.assign(now, request, node, out);
        self.place_or_wait_chained(now, victim, true, depth + 1, out);
        true
    }

    /// Record `request` as running on `node` and tell the driver.
    pub(crate) fn assign(
        &mut self,
        now: Millis,
        request: RequestId,
        node: NodeId,
        out: &mut Vec<Command>,
    ) {
        let Some(entry) = self.requests.get_mut(&request) else {
            return;
        };
        entry.placement = Placement::Running { node };
        entry.progress_at = now;
        entry.attempt_tokens = 0;
        // A deadline is the time to start by: met now. Work moved later (a departure, a
        // preemption, a stall) waits for a node without one, as work that has begun.
        entry.deadline = None;
        let resume_from = entry.committed;
        let tenant = entry.tenant;
        let group = VictimGroup::of(entry.class, tenant);
        let model = entry.model;
        let (sequences, numerics) = self
            .nodes
            .change_running(node, group, |running| {
                running.push(Running { request, group })
            })
            .map(|((), node)| (node.claimed_slots, node.capacity.numerics))
            .unwrap_or_default();
        // What it commits here continues exactly on nodes like this one, and so does its KV
        // checkpoint; a generation that already crossed to other numerics follows its latest.
        entry.numerics = numerics;
        if self.config.prefix_affinity {
            // A resumed generation may load its prompt from a checkpoint, and restored cells
            // are never kept for reuse: count on nothing kept then.
            let heads = if resume_from == 0 {
                entry.prompt_heads.hashes()
            } else {
                &[]
            };
            self.heads.started(node, sequences, request, model, heads);
        }
        if let Some(tenant) = self.tenants.get_mut(tenant) {
            tenant.running += 1;
        }
        out.push(Command::Assign {
            request,
            node,
            resume_from,
        });
    }

    /// Take a running request off its node (no command); the caller decides what happens next.
    pub(crate) fn detach(&mut self, request: RequestId, node: NodeId) {
        let Some(entry) = self.requests.get_mut(&request) else {
            return;
        };
        debug_assert_eq!(
            entry.node(),
            Some(node),
            "detach from a node the request is not on"
        );
        // Not waiting either until the caller queues or forgets it; seq 0 is never a real place.
        entry.placement = Placement::Waiting {
            parked: true,
            seq: 0,
        };
        let tenant = entry.tenant;
        let group = VictimGroup::of(entry.class, tenant);
        self.nodes.change_running(node, group, |running| {
            running.retain(|running| running.request != request)
        });
        self.heads.left(node, request);
        if let Some(tenant) = self.tenants.get_mut(tenant) {
            tenant.running = tenant.running.saturating_sub(1);
        }
    }

    /// Start waiting requests for every model `node` has, highest class first.
    pub(crate) fn dispatch_node(&mut self, now: Millis, node: NodeId, out: &mut Vec<Command>) {
        if self.waiting.is_empty() {
            return;
        }
        let Some(entry) = self.nodes.get(node) else {
            return;
        };
        // A full node still matters: waiting higher-ranked work may preempt what runs there.
        if entry.blocker.is_some() {
            return;
        }
        // By position rather than a copy of the list: this runs on every end of work, and
        // starting work changes no node's models.
        for index in 0..entry.capacity.models.len() {
            let Some(model) = self
                .nodes
                .get(node)
                .and_then(|entry| entry.capacity.models.get(index).copied())
            else {
                break;
            };
            self.dispatch_model(now, model, out);
        }
    }

    /// Start waiting requests for `model` while they fit, highest class first.
    ///
    /// A head is tried where it waits and taken out of its queue only once it has started:
    /// placement does not look at the queues, and a head that fits nowhere, the usual case
    /// when a slot frees in a busy fleet, then costs no queue changes at all.
    pub(crate) fn dispatch_model(&mut self, now: Millis, model: ModelId, out: &mut Vec<Command>) {
        for class in TenantClass::ALL {
            while let Some(request) = self.head_of(class, model) {
                let Some(waiter) = self.waiter_of(request) else {
                    break;
                };
                if !self.try_start(now, request, 0, out) {
                    break;
                }
                self.waiting.remove(&waiter);
            }
        }
    }

    fn head_of(&self, class: TenantClass, model: ModelId) -> Option<RequestId> {
        let tenants = &self.tenants;
        let available_slots = self.nodes.available_slots();
        self.waiting.head(class, model, |tenant| {
            let Some(tenant) = tenants.get(tenant) else {
                return u64::MAX;
            };
            // A reserved tenant below its guarantee goes first: it may take slots that others
            // of its class may not.
            let below_guarantee =
                u64::from(tenant.running) < tenant.guaranteed_slots(available_slots);
            let penalty = if below_guarantee { 0 } else { 1 << 62 };
            penalty | tenant.fair_share_key().min((1 << 62) - 1)
        })
    }

    /// Retry every waiting request: after changes that may let waiting work preempt running work
    /// without freeing a slot (a reserved guarantee shrinking, a tenant contract changing).
    pub(crate) fn dispatch_all(&mut self, now: Millis, out: &mut Vec<Command>) {
        let mut keys = std::mem::take(&mut self.scratch_keys);
        keys.clear();
        keys.extend(self.waiting.keys().map(|(_, model)| model));
        keys.sort_unstable();
        keys.dedup();
        for model in &keys {
            self.dispatch_model(now, *model, out);
        }
        self.scratch_keys = keys;
    }

    /// The queue position of a waiting request.
    pub(crate) fn waiter_of(&self, request: RequestId) -> Option<Waiter> {
        let entry = self.requests.get(&request)?;
        let Placement::Waiting { parked, seq } = entry.placement else {
            return None;
        };
        Some(Waiter {
            request,
            class: entry.class,
            model: entry.model,
            tenant: entry.tenant,
            parked,
            seq,
            deadline: entry.deadline,
        })
    }

    /// Preference rank of a request asking for a slot: 0 = reserved tenant below its guaranteed
    /// share, 1 = fleet, 2 = reserved, 3 = spot. Lower is served first.
    pub(crate) fn requester_rank(&self, request: &Request) -> u8 {
        self.rank(request, false)
    }

    /// Rank of running work as a preemption victim; a reserved tenant at or below its guaranteed
    /// share is protected (rank 0).
    pub(crate) fn victim_rank(&self, request: &Request) -> u8 {
        self.rank(request, true)
    }

    fn rank(&self, request: &Request, running: bool) -> u8 {
        match request.class {
            TenantClass::Fleet => 1,
            TenantClass::Spot => 3,
            TenantClass::Reserved => {
                let Some(tenant) = self.tenants.get(request.tenant) else {
                    return 2;
                };
                let guaranteed = tenant.guaranteed_slots(self.nodes.available_slots());
                let count = u64::from(tenant.running);
                let protected = if running {
                    count <= guaranteed
                } else {
                    count < guaranteed
                };
                if protected {
                    0
                } else {
                    2
                }
            }
        }
    }

    /// The decode speed believed of `node` (`TrustConfig::decode_believed`); its claim where
    /// nodes are trusted.
    pub(crate) fn decode_believed(&self, node: NodeId, entry: &crate::nodes::Node) -> f32 {
        let claimed = entry.capacity.decode_tokens_per_second;
        match &self.config.trust {
            Some(config) => {
                let trust = self.trust.get(&node).copied().unwrap_or_default();
                config.decode_believed(claimed, &trust)
            }
            None => claimed,
        }
    }

    /// Whether `request`'s expected generation on `node` ends before the node must stop work.
    pub(crate) fn covers(&self, now: Millis, request: &Request, node: NodeId) -> bool {
        let Some(entry) = self.nodes.get(node) else {
            return false;
        };
        let Some(departure) = entry.state.departure_at else {
            return true;
        };
        let expected = expected_generation_ms(
            request.prompt_tokens,
            request.remaining_tokens(),
            &entry.capacity,
            self.decode_believed(node, entry),
            self.config.generation_time_margin_permille,
        );
        now.plus(expected) <= departure.minus(self.config.departure_hard_stop_ms)
    }
}
