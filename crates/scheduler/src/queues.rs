//! Requests waiting for a slot, one queue per (class, model): a request can only wait behind
//! others that need exactly what it needs, so the head of a queue not fitting anywhere means no
//! one in that queue fits. Parked requests (stopped mid-generation) come first, in the order they
//! were parked; then tenants take turns by weighted fair share, each tenant first-in first-out.

use std::collections::{BTreeMap, BTreeSet};

use crate::fxhash::FxHashMap;

use crate::types::{Millis, ModelId, RequestId, TenantClass, TenantId};

/// One (class, model) queue.
#[derive(Debug, Default)]
struct ModelQueue {
    parked: BTreeMap<u64, RequestId>,
    by_tenant: BTreeMap<TenantId, BTreeMap<u64, RequestId>>,
}

/// Identifies a waiting request's position, as stored in its `Placement::Waiting`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waiter {
    pub(crate) request: RequestId,
    pub(crate) class: TenantClass,
    pub(crate) model: ModelId,
    pub(crate) tenant: TenantId,
    pub(crate) parked: bool,
    pub(crate) seq: u64,
    pub(crate) deadline: Option<Millis>,
}

/// All waiting requests.
#[derive(Debug, Default)]
pub(crate) struct WaitQueues {
    queues: FxHashMap<(TenantClass, ModelId), ModelQueue>,
    /// Waiting and not parked, per class: what `queue_max_per_class` bounds.
    queued: [usize; 3],
    parked: [usize; 3],
    deadlines: BTreeSet<(Millis, RequestId)>,
    next_seq: u64,
}

impl WaitQueues {
    /// Add a waiter; returns its sequence number (also its place in line).
    pub(crate) fn push(&mut self, mut waiter: Waiter) -> u64 {
        self.next_seq += 1;
        waiter.seq = self.next_seq;
        let queue = self.queues.entry((waiter.class, waiter.model)).or_default();
        if waiter.parked {
            queue.parked.insert(waiter.seq, waiter.request);
            self.parked[waiter.class.index()] += 1;
        } else {
            queue
                .by_tenant
                .entry(waiter.tenant)
                .or_default()
                .insert(waiter.seq, waiter.request);
            self.queued[waiter.class.index()] += 1;
        }
        if let Some(deadline) = waiter.deadline {
            self.deadlines.insert((deadline, waiter.request));
        }
        waiter.seq
    }

    /// Remove a waiter (started, cancelled, expired or rejected).
    pub(crate) fn remove(&mut self, waiter: &Waiter) {
        if let Some(deadline) = waiter.deadline {
            self.deadlines.remove(&(deadline, waiter.request));
        }
        let key = (waiter.class, waiter.model);
        let Some(queue) = self.queues.get_mut(&key) else {
            return;
        };
        if waiter.parked {
            if queue.parked.remove(&waiter.seq).is_some() {
                self.parked[waiter.class.index()] -= 1;
            }
        } else if let Some(line) = queue.by_tenant.get_mut(&waiter.tenant) {
            if line.remove(&waiter.seq).is_some() {
                self.queued[waiter.class.index()] -= 1;
            }
            if line.is_empty() {
                queue.by_tenant.remove(&waiter.tenant);
            }
        }
        if queue.parked.is_empty() && queue.by_tenant.is_empty() {
            self.queues.remove(&key);
        }
    }

    /// The request that should start next in (class, model): the oldest parked one, else the
    /// oldest of the tenant with the lowest fair-share key (ties to the lower tenant id).
    pub(crate) fn head(
        &self,
        class: TenantClass,
        model: ModelId,
        fair_share_key: impl Fn(TenantId) -> u64,
    ) -> Option<RequestId> {
        let queue = self.queues.get(&(class, model))?;
        if let Some((_, request)) = queue.parked.first_key_value() {
            return Some(*request);
        }
        let (_, line) = queue
            .by_tenant
            .iter()
            .min_by_key(|(tenant, _)| (fair_share_key(**tenant), **tenant))?;
        line.first_key_value().map(|(_, request)| *request)
    }

    /// Whether anything waits in (class, model).
    pub(crate) fn has_waiting(&self, class: TenantClass, model: ModelId) -> bool {
        self.queues.contains_key(&(class, model))
    }

    /// Whether anything waits at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Waiting, not parked, in `class`.
    pub(crate) fn queued(&self, class: TenantClass) -> usize {
        self.queued[class.index()]
    }

    /// Parked in `class`.
    pub(crate) fn parked(&self, class: TenantClass) -> usize {
        self.parked[class.index()]
    }

    /// Take the waiter with the earliest deadline off the deadline list, if that deadline is at
    /// or before `now`. The caller removes it from its queue.
    pub(crate) fn pop_expired(&mut self, now: Millis) -> Option<RequestId> {
        let (deadline, request) = *self.deadlines.first()?;
        if deadline > now {
            return None;
        }
        self.deadlines.pop_first();
        Some(request)
    }

    /// Every (class, model) with waiters, for sweeps.
    pub(crate) fn keys(&self) -> impl Iterator<Item = (TenantClass, ModelId)> + '_ {
        self.queues.keys().copied()
    }
}
