//! The node table: every connected vehicle, indexed by its dense `NodeId`, with the timers that
//! re-check nodes when time alone changes their eligibility, and the fleet-wide counts derived
//! from nodes (available slots, which models each class can be served).
//!
//! Derived counts are kept exact by routing every change to a node through
//! [`NodeTable::update`], which takes the node out of the counts, applies the change, and puts it
//! back.

use std::collections::BTreeSet;

use crate::fxhash::FxHashMap;

use crate::index::{FreeEntry, FreeIndex, VictimGroup, VictimIndex};
use crate::policy::{Blocker, EnergyToday};
use crate::types::{
    ClassSet, Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, RequestId, TenantClass,
    VehicleState,
};

/// A connected node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// What the node claims, except `slots`: those it is given (`trust`), at most its claim.
    pub(crate) capacity: NodeCapacity,
    /// The slots the node claims.
    pub(crate) claimed_slots: u16,
    pub(crate) state: VehicleState,
    pub(crate) policy: OwnerPolicy,
    /// Unplugged-work hysteresis (see `policy::battery_allows`).
    pub(crate) battery_ok: bool,
    pub(crate) energy: EnergyToday,
    /// Requests running here, at most `capacity.slots`.
    pub(crate) running: Vec<Running>,
    /// Slots taken by work the driver runs here outside the scheduler (a verification check):
    /// not free, and never preempted.
    pub(crate) held: u16,
    /// Why the node takes no new work, as of the last evaluation.
    pub(crate) blocker: Option<Blocker>,
    /// When the node is next re-evaluated because of time alone.
    pub(crate) timer: Option<Millis>,
    /// Time left before the node must stop work, as a free-index bucket (see `index`).
    pub(crate) availability_bucket: u8,
}

/// A generation running on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Running {
    pub(crate) request: RequestId,
    pub(crate) group: VictimGroup,
}

impl Node {
    pub(crate) fn has_loaded(&self, model: ModelId) -> bool {
        self.capacity.loaded.contains(&model)
    }

    pub(crate) fn free_slots(&self) -> u16 {
        self.capacity
            .slots
            .saturating_sub(self.running.len() as u16)
            .saturating_sub(self.held)
    }
}

/// All connected nodes.
#[derive(Debug, Default)]
pub(crate) struct NodeTable {
    nodes: Vec<Option<Node>>,
    count: usize,
    timers: BTreeSet<(Millis, NodeId)>,
    /// Sum of `slots` over nodes without a blocker: the fleet's capacity right now, which the
    /// reserved minimum shares are fractions of.
    available_slots: u64,
    /// Per model, per class: connected nodes that have the model, whose owner accepts the class
    /// and that are allowed a slot, whatever their state. Zero means nothing could serve such a
    /// request: a node whose record took all its slots (`TrustConfig::slots_allowed`) is out of
    /// placement until it earns one back, and waiting for it would strand the request.
    servable: FxHashMap<ModelId, [u32; 3]>,
    pub(crate) free: FreeIndex,
    pub(crate) victims: VictimIndex,
    /// Reused buffers for a node's victim groups before and after a change.
    groups_before: Vec<VictimGroup>,
    groups_after: Vec<VictimGroup>,
}

impl NodeTable {
    pub(crate) fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn available_slots(&self) -> u64 {
        self.available_slots
    }

    /// Connected nodes that have `model` and accept `class`.
    pub(crate) fn servable(&self, model: ModelId, class: TenantClass) -> u32 {
        self.servable
            .get(&model)
            .map_or(0, |counts| counts[class.index()])
    }

    /// Every connected node, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (NodeId, &Node)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(index, node)| node.as_ref().map(|node| (NodeId(index as u32), node)))
    }

    /// Add a node that is not present.
    pub(crate) fn insert(&mut self, id: NodeId, node: Node) {
        let index = id.0 as usize;
        if index >= self.nodes.len() {
            self.nodes.resize_with(index + 1, || None);
        }
        debug_assert!(self.nodes[index].is_none(), "insert over a connected node");
        self.account(&node, 1);
        self.account_servable(&node, 1);
        self.set_timer_entry(id, None, node.timer);
        self.index(id, &node, true);
        self.nodes[index] = Some(node);
        self.count += 1;
    }

    /// Remove a node, returning it.
    pub(crate) fn remove(&mut self, id: NodeId) -> Option<Node> {
        let node = self.nodes.get_mut(id.0 as usize)?.take()?;
        self.account(&node, -1);
        self.account_servable(&node, -1);
        self.set_timer_entry(id, node.timer, None);
        self.index(id, &node, false);
        self.count -= 1;
        Some(node)
    }

    /// Change a node, keeping the derived counts and timers exact.
    ///
    /// The node is changed where it lies: this runs for every state event of every vehicle, and
    /// with a million nodes each call is a cache miss on the node; moving it out and back in
    /// would double the memory traffic. Indexes are touched only when the node's entry in them
    /// changes.
    pub(crate) fn update<R>(
        &mut self,
        id: NodeId,
        change: impl FnOnce(&mut Node) -> R,
    ) -> Option<R> {
        let NodeTable {
            nodes,
            timers,
            available_slots,
            servable,
            free,
            victims,
            groups_before,
            groups_after,
            ..
        } = self;
        let node = nodes.get_mut(id.0 as usize)?.as_mut()?;
        let available_before = node.blocker.is_none().then_some(node.capacity.slots);
        let timer_before = node.timer;
        let free_before = FreeEntry::of(node);
        let victim_classes_before = victim_classes(node);
        let classes_before = servable_classes(node);
        // Groups matter only to a node filed in the victim index; most changes are to nodes
        // that run nothing.
        groups_if_filed(node, victim_classes_before, groups_before);

        let result = change(node);

        if let Some(slots) = available_before {
            *available_slots -= u64::from(slots);
        }
        if node.blocker.is_none() {
            *available_slots += u64::from(node.capacity.slots);
        }
        let classes_after = servable_classes(node);
        if classes_after != classes_before {
            count_servable(servable, &node.capacity.models, classes_before, -1);
            count_servable(servable, &node.capacity.models, classes_after, 1);
        }
        set_timer_entry(timers, id, timer_before, node.timer);
        free.refile(id, node, free_before);
        let victim_classes_after = victim_classes(node);
        groups_if_filed(node, victim_classes_after, groups_after);
        if victim_classes_before != victim_classes_after || groups_before != groups_after {
            if let Some(classes) = victim_classes_before {
                victims.apply(id, node, classes, groups_before, false);
            }
            if let Some(classes) = victim_classes_after {
                victims.apply(id, node, classes, groups_after, true);
            }
        }
        Some(result)
    }

    /// Change which work runs on a node, where `change` adds or removes only generations of
    /// `group`: what assignment and detaching do, most of the scheduler's changes to a node.
    ///
    /// It does what [`NodeTable::update`] would, touching less: nothing but the running list
    /// changes, so the counts, the timer and the node's other victim groups stay as they are;
    /// only its free entry (its load) and its victim entry for `group` can move.
    pub(crate) fn change_running<R>(
        &mut self,
        id: NodeId,
        group: VictimGroup,
        change: impl FnOnce(&mut Vec<Running>) -> R,
    ) -> Option<(R, &Node)> {
        let NodeTable {
            nodes,
            free,
            victims,
            ..
        } = self;
        let node = nodes.get_mut(id.0 as usize)?.as_mut()?;
        let free_before = FreeEntry::of(node);
        let classes_before = victim_classes(node);
        let had_group = node.running.iter().any(|running| running.group == group);

        let result = change(&mut node.running);

        free.refile(id, node, free_before);
        let classes_after = victim_classes(node);
        let has_group = node.running.iter().any(|running| running.group == group);
        // The accepted classes do not change here; a node is filed or not by whether it runs
        // anything, and when that flips, `group` was or is all it runs.
        if classes_before != classes_after || had_group != has_group {
            if let Some(classes) = classes_before.filter(|_| had_group) {
                victims.apply(id, node, classes, &[group], false);
            }
            if let Some(classes) = classes_after.filter(|_| has_group) {
                victims.apply(id, node, classes, &[group], true);
            }
        }
        Some((result, node))
    }

    /// Which derived state, if any, differs from what rebuilding it from the nodes gives: the
    /// indexes and counts are kept by changes, and a change that forgot one would place work
    /// wrongly without failing. For checks (the `sim` harness runs it after every event).
    pub(crate) fn index_drift(&self) -> Option<&'static str> {
        let mut rebuilt = NodeTable::default();
        for (id, node) in self.iter() {
            rebuilt.insert(id, node.clone());
        }
        if rebuilt.free != self.free {
            Some("free index")
        } else if rebuilt.victims != self.victims {
            Some("victim index")
        } else if rebuilt.timers != self.timers {
            Some("timers")
        } else if rebuilt.available_slots != self.available_slots {
            Some("available slots")
        } else if counted(&rebuilt.servable) != counted(&self.servable) {
            Some("servable counts")
        } else {
            None
        }
    }

    /// Add (`insert == true`) or remove all of a node's index entries.
    fn index(&mut self, id: NodeId, node: &Node, insert: bool) {
        if let Some(entry) = FreeEntry::of(node) {
            if insert {
                self.free.insert(id, node, entry);
            } else {
                self.free.remove(id, node, entry);
            }
        }
        if let Some(classes) = victim_classes(node) {
            let mut groups = std::mem::take(&mut self.groups_before);
            groups_of(node, &mut groups);
            self.victims.apply(id, node, classes, &groups, insert);
            self.groups_before = groups;
        }
    }

    /// A node whose timer is due at `now`, with its timer cleared.
    pub(crate) fn pop_due_timer(&mut self, now: Millis) -> Option<NodeId> {
        if self.timers.first()?.0 > now {
            return None;
        }
        let (_, id) = self.timers.pop_first()?;
        // The timer is not part of any index or count, so no full update is needed.
        if let Some(node) = self.nodes.get_mut(id.0 as usize).and_then(Option::as_mut) {
            node.timer = None;
        }
        Some(id)
    }

    fn set_timer_entry(&mut self, id: NodeId, before: Option<Millis>, after: Option<Millis>) {
        set_timer_entry(&mut self.timers, id, before, after);
    }

    fn account(&mut self, node: &Node, sign: i64) {
        if node.blocker.is_none() {
            let slots = u64::from(node.capacity.slots);
            self.available_slots = if sign > 0 {
                self.available_slots + slots
            } else {
                self.available_slots - slots
            };
        }
    }

    /// Count a node's (model, class) pairs in or out of `servable`; only registration, loss,
    /// policy changes and a change between no slot and some alter them.
    fn account_servable(&mut self, node: &Node, sign: i64) {
        count_servable(
            &mut self.servable,
            &node.capacity.models,
            servable_classes(node),
            sign,
        );
    }
}

fn set_timer_entry(
    timers: &mut BTreeSet<(Millis, NodeId)>,
    id: NodeId,
    before: Option<Millis>,
    after: Option<Millis>,
) {
    if before == after {
        return;
    }
    if let Some(at) = before {
        timers.remove(&(at, id));
    }
    if let Some(at) = after {
        timers.insert((at, id));
    }
}

/// `servable`'s counts other than none (a model no node serves any more keeps its zeros).
fn counted(
    servable: &FxHashMap<ModelId, [u32; 3]>,
) -> std::collections::BTreeMap<ModelId, [u32; 3]> {
    servable
        .iter()
        .filter(|(_, counts)| **counts != [0; 3])
        .map(|(model, counts)| (*model, *counts))
        .collect()
}

/// The classes a node counts as able to serve in `servable`: its owner's, or none while it is
/// allowed no slot.
fn servable_classes(node: &Node) -> ClassSet {
    if node.capacity.slots == 0 {
        ClassSet::NONE
    } else {
        node.policy.allowed_classes
    }
}

/// Count (model, class) pairs in or out of `servable`.
fn count_servable(
    servable: &mut FxHashMap<ModelId, [u32; 3]>,
    models: &[ModelId],
    classes: ClassSet,
    sign: i64,
) {
    for model in models {
        let counts = servable.entry(*model).or_default();
        for class in TenantClass::ALL {
            if classes.contains(class) {
                let count = &mut counts[class.index()];
                *count = if sign > 0 { *count + 1 } else { *count - 1 };
            }
        }
    }
}

/// The classes a node's victim-index entries are filed under, or `None` if it has none (takes no
/// new work, so nothing there can be preempted in favour of a newcomer).
fn victim_classes(node: &Node) -> Option<u8> {
    let classes = node.policy.allowed_classes.bits();
    (node.blocker.is_none() && classes != 0 && !node.running.is_empty()).then_some(classes)
}

/// The node's victim groups if it is filed in the victim index under `classes`, else none.
fn groups_if_filed(node: &Node, classes: Option<u8>, groups: &mut Vec<VictimGroup>) {
    if classes.is_some() {
        groups_of(node, groups);
    } else {
        groups.clear();
    }
}

/// The distinct victim groups of a node's running work, sorted.
///
/// A node runs a few groups (fleet, spot, a reserved tenant or two) over many slots, so each
/// group is found in or put into the short sorted list, rather than every slot's group sorted
/// and deduplicated; this runs twice for every change to a busy node.
fn groups_of(node: &Node, groups: &mut Vec<VictimGroup>) {
    groups.clear();
    for running in &node.running {
        let group = running.group;
        if groups.last() == Some(&group) {
            continue;
        }
        if let Err(at) = groups.binary_search(&group) {
            groups.insert(at, group);
        }
    }
}

/// Bytes a B-tree set spends per entry beyond the key: std's B-tree nodes hold up to 11 keys
/// and are about two-thirds full, plus child pointers and headers; this is an estimate.
const BTREE_OVERHEAD_PERCENT: u64 = 60;
/// Bytes the allocator adds to each heap block (header and rounding), an estimate for glibc.
const HEAP_BLOCK_OVERHEAD_BYTES: u64 = 16;

impl NodeTable {
    /// Estimated bytes held by the node table and its indexes.
    pub(crate) fn memory_estimate_bytes(&self) -> u64 {
        use std::mem::size_of;
        let btree = |entries: usize, key_bytes: usize| {
            entries as u64 * key_bytes as u64 * (100 + BTREE_OVERHEAD_PERCENT) / 100
        };
        let heap = |bytes: usize| {
            if bytes == 0 {
                0
            } else {
                bytes as u64 + HEAP_BLOCK_OVERHEAD_BYTES
            }
        };
        let mut bytes = (self.nodes.capacity() * size_of::<Option<Node>>()) as u64;
        for (_, node) in self.iter() {
            bytes += heap(node.capacity.models.capacity() * size_of::<ModelId>());
            bytes += heap(node.capacity.loaded.capacity() * size_of::<ModelId>());
            bytes += heap(node.running.capacity() * size_of::<Running>());
        }
        bytes += btree(self.timers.len(), size_of::<(Millis, NodeId)>());
        let (_, free_entries) = self.free.entries();
        bytes += btree(free_entries, size_of::<u128>());
        let (_, victim_entries) = self.victims.entries();
        bytes += btree(victim_entries, size_of::<NodeId>());
        bytes
    }
}
