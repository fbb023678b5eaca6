//! Handling node events: registration, state and policy changes, energy use, loss, and the
//! time-driven re-evaluations. Whenever a node stops being fit for work it runs, that work is
//! stopped and placed elsewhere (or parked) in the same call.

use crate::event::{Command, StopReason};
use crate::index;
use crate::nodes::Node;
use crate::policy::{self, Blocker};
use crate::scheduler::Scheduler;
use crate::types::{ClassSet, Millis, NodeCapacity, NodeId, OwnerPolicy, RequestId, VehicleState};

impl Scheduler {
    pub(crate) fn on_node_registered(
        &mut self,
        now: Millis,
        id: NodeId,
        mut capacity: NodeCapacity,
        state: VehicleState,
        policy: OwnerPolicy,
        out: &mut Vec<Command>,
    ) {
        if id.0 >= self.config.nodes_max {
            self.stale_events += 1;
            return;
        }
        // A re-registration means the old connection is gone: its work moves first.
        if self.nodes.get(id).is_some() {
            self.on_node_lost(now, id, out);
        }
        capacity.models.sort_unstable();
        capacity.models.dedup();
        capacity
            .loaded
            .retain(|model| capacity.models.contains(model));
        // A fresh node starts on the safe side of the hysteresis: battery work only once charged
        // to the resume threshold.
        let battery_ok = state.state_of_charge_permille >= policy.unplugged_resume_soc_permille;
        let claimed_slots = capacity.slots;
        if let Some(trust) = &self.config.trust {
            let earned = self.trust.get(&id).copied().unwrap_or_default();
            capacity.slots = trust.slots_allowed(claimed_slots, &earned);
        }
        let node = Node {
            running: Vec::with_capacity(usize::from(capacity.slots)),
            held: 0,
            claimed_slots,
            capacity,
            state,
            policy,
            battery_ok,
            energy: Default::default(),
            blocker: None,
            timer: None,
            availability_bucket: crate::index::BUCKET_UNBOUNDED,
        };
        self.nodes.insert(id, node);
        self.reevaluate(now, id, out);
    }

    pub(crate) fn on_node_state(
        &mut self,
        now: Millis,
        id: NodeId,
        state: VehicleState,
        out: &mut Vec<Command>,
    ) {
        let known = self.reevaluate_with(now, id, out, |node| {
            node.battery_ok = policy::battery_allows(node.battery_ok, &state, &node.policy);
            node.state = state;
        });
        if !known {
            self.stale_events += 1;
        }
    }

    pub(crate) fn on_node_policy(
        &mut self,
        now: Millis,
        id: NodeId,
        policy: OwnerPolicy,
        out: &mut Vec<Command>,
    ) {
        let known = self.nodes.update(id, |node| {
            node.battery_ok = policy::battery_allows(node.battery_ok, &node.state, &policy);
            node.policy = policy;
        });
        if known.is_none() {
            self.stale_events += 1;
            return;
        }
        self.reevaluate(now, id, out);
    }

    pub(crate) fn on_node_energy(
        &mut self,
        now: Millis,
        id: NodeId,
        wh: u32,
        out: &mut Vec<Command>,
    ) {
        let known = self
            .nodes
            .update(id, |node| node.energy.add(now, &node.policy, wh));
        if known.is_none() {
            self.stale_events += 1;
            return;
        }
        self.reevaluate(now, id, out);
    }

    /// The driver took one of the node's slots for work of its own (`held`), or gave one back.
    pub(crate) fn on_node_slot(
        &mut self,
        now: Millis,
        id: NodeId,
        held: bool,
        out: &mut Vec<Command>,
    ) {
        let mut applied = true;
        let known = self.reevaluate_with(now, id, out, |node| {
            if held {
                node.held = node.held.saturating_add(1);
            } else if let Some(left) = node.held.checked_sub(1) {
                node.held = left;
            } else {
                applied = false;
            }
        });
        if !known || !applied {
            self.stale_events += 1;
        }
    }

    pub(crate) fn on_node_lost(&mut self, now: Millis, id: NodeId, out: &mut Vec<Command>) {
        let Some(node) = self.nodes.get(id) else {
            self.stale_events += 1;
            return;
        };
        let mut moving = std::mem::take(&mut self.scratch_requests);
        moving.clear();
        moving.extend(node.running.iter().map(|running| running.request));
        for request in &moving {
            self.detach(*request, id);
            out.push(Command::Stop {
                request: *request,
                node: id,
                reason: StopReason::NodeLost,
            });
        }
        self.nodes.remove(id);
        self.heads.forget(id);
        for request in &moving {
            self.place_or_wait(now, *request, true, out);
        }
        self.scratch_requests = moving;
    }

    /// Re-evaluate everything that time alone changes, up to `now`.
    pub(crate) fn run_due_timers(&mut self, now: Millis, out: &mut Vec<Command>) {
        while let Some(id) = self.nodes.pop_due_timer(now) {
            self.reevaluate(now, id, out);
        }
    }

    /// Recompute a node's blocker and timer; move work it may no longer run; start waiting
    /// work if it has room.
    pub(crate) fn reevaluate(&mut self, now: Millis, id: NodeId, out: &mut Vec<Command>) {
        self.reevaluate_with(now, id, out, |_| ());
    }

    /// Apply `change` to a node and re-evaluate it in one step (one pass over the indexes);
    /// false if the node is not connected.
    fn reevaluate_with(
        &mut self,
        now: Millis,
        id: NodeId,
        out: &mut Vec<Command>,
        change: impl FnOnce(&mut Node),
    ) -> bool {
        let hard_stop_ms = self.config.departure_hard_stop_ms;
        let evaluated = self.nodes.update(id, |node| {
            change(node);
            node.blocker = policy::blocker(
                now,
                &node.state,
                &node.policy,
                node.battery_ok,
                node.energy,
                hard_stop_ms,
            );
            let stop_at = node
                .state
                .departure_at
                .map(|departure| departure.minus(hard_stop_ms));
            let (bucket, bucket_changes_at) = index::availability_bucket(now, stop_at);
            node.availability_bucket = bucket;
            let policy_changes_at =
                policy::next_time_change(now, &node.state, &node.policy, hard_stop_ms);
            node.timer = match (policy_changes_at, bucket_changes_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            node.blocker
        });
        let Some(blocker) = evaluated else {
            return false;
        };
        let mut moving = std::mem::take(&mut self.scratch_moves);
        moving.clear();
        self.work_to_move(now, id, blocker, &mut moving);
        for (request, reason) in &moving {
            self.detach(*request, id);
            out.push(Command::Stop {
                request: *request,
                node: id,
                reason: *reason,
            });
        }
        for (request, _) in &moving {
            self.place_or_wait(now, *request, true, out);
        }
        self.scratch_moves = moving;
        self.dispatch_node(now, id, out);
        true
    }

    /// The running requests a node must give up, and why.
    fn work_to_move(
        &self,
        now: Millis,
        id: NodeId,
        blocker: Option<Blocker>,
        moving: &mut Vec<(RequestId, StopReason)>,
    ) {
        let Some(node) = self.nodes.get(id) else {
            return;
        };
        // The common case: a node fit for work of every class keeps all it runs.
        if blocker.is_none() && node.policy.allowed_classes == ClassSet::ALL {
            return;
        }
        for running in &node.running {
            let request = &running.request;
            let Some(entry) = self.requests.get(request) else {
                continue;
            };
            let must_move = match blocker {
                Some(blocker) if blocker.stops_everything() => Some(blocker.stop_reason()),
                // In the departure window work may stay only if it ends before the hard stop.
                Some(_) if !self.finishes_in_time(now, entry, id) => Some(StopReason::Draining),
                _ if !node.policy.allowed_classes.contains(entry.class) => {
                    Some(StopReason::Draining)
                }
                _ => None,
            };
            if let Some(reason) = must_move {
                moving.push((*request, reason));
            }
        }
    }

    fn finishes_in_time(
        &self,
        now: Millis,
        request: &crate::requests::Request,
        node: NodeId,
    ) -> bool {
        // Running work has done its prefill; only the remaining tokens count.
        let Some(entry) = self.nodes.get(node) else {
            return false;
        };
        let Some(departure) = entry.state.departure_at else {
            return true;
        };
        let expected = policy::expected_generation_ms(
            0,
            request.remaining_tokens(),
            &entry.capacity,
            self.decode_believed(node, entry),
            self.config.generation_time_margin_permille,
        );
        now.plus(expected) <= departure.minus(self.config.departure_hard_stop_ms)
    }
}
