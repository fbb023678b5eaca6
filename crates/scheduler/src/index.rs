//! Indexes over the node table, so that placing a request or finding work to preempt touches a
//! handful of nodes however large the fleet is.
//!
//! * The **free index** holds every node that may start new work and has a free slot, once per
//!   model on its disk, in a set per (model, accepted classes, availability bucket, numerics),
//!   ordered by the placement preference (model loaded, load, electricity price, node id).
//!   Availability is
//!   bucketed by powers of two of the time left before the node must stop work, so a search
//!   looks at the best few nodes of each bucket rather than at every node.
//! * The **victim index** holds every node that takes work and runs something, once per model on
//!   its disk and per *victim group* it runs (fleet work, one reserved tenant's work, spot work),
//!   in a set per (model, group, accepted classes) ordered by node id.
//!
//! Both are maintained by `NodeTable::update`, which removes a node's entries before a change
//! and adds them back after it.

use std::collections::{BTreeMap, BTreeSet};

use crate::nodes::Node;
use crate::search::load_permille;
use crate::types::{ModelId, NodeId, TenantClass, TenantId};

/// Availability bucket of nodes with no scheduled departure: they always have time.
pub(crate) const BUCKET_UNBOUNDED: u8 = 0;
/// Largest finite bucket; bucket `b >= 1` holds nodes with at least `2^(b-1)` seconds left.
pub(crate) const BUCKET_MAX: u8 = 40;

/// Whose work a running generation is, for choosing what to preempt: a reserved tenant's work is
/// protected up to that tenant's guaranteed share, so each reserved tenant is its own group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum VictimGroup {
    Fleet,
    Reserved(TenantId),
    Spot,
}

impl VictimGroup {
    pub(crate) fn of(class: TenantClass, tenant: TenantId) -> VictimGroup {
        match class {
            TenantClass::Fleet => VictimGroup::Fleet,
            TenantClass::Reserved => VictimGroup::Reserved(tenant),
            TenantClass::Spot => VictimGroup::Spot,
        }
    }
}

/// A node's entry in the free index, apart from the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FreeEntry {
    classes: u8,
    bucket: u8,
    load_permille: u32,
    price: u32,
}

impl FreeEntry {
    /// The entry of `node`, or `None` if it may not start new work.
    pub(crate) fn of(node: &Node) -> Option<FreeEntry> {
        let classes = node.policy.allowed_classes.bits();
        if node.blocker.is_some() || node.free_slots() == 0 || classes == 0 {
            return None;
        }
        Some(FreeEntry {
            classes,
            bucket: node.availability_bucket,
            load_permille: load_permille(node.running.len(), node.capacity.slots),
            price: node.capacity.energy_price_micro_usd_per_kwh,
        })
    }

    /// The tenant classes the node accepts (bit i = `TenantClass::ALL[i]`).
    pub(crate) fn classes(self) -> u8 {
        self.classes
    }

    /// The node's rank in the free index for a model: lower is preferred.
    pub(crate) fn key(self, loaded: bool, node: NodeId) -> u128 {
        (u128::from(!loaded) << 75)
            | (u128::from(self.load_permille) << 64)
            | (u128::from(self.price) << 32)
            | u128::from(node.0)
    }
}

/// The node a free-index key belongs to.
pub(crate) fn node_of_key(key: u128) -> NodeId {
    NodeId((key & u128::from(u32::MAX)) as u32)
}

/// Sets keyed by (accepted classes, availability bucket, numerics).
type FreeSets = BTreeMap<(u8, u8, u32), BTreeSet<u128>>;

/// Nodes with a free slot, per model.
#[derive(Debug, Default)]
pub(crate) struct FreeIndex {
    by_model: Vec<FreeSets>,
}

/// Equal when the same nodes are filed alike: a model no node has any more may keep an empty
/// place in one.
impl PartialEq for FreeIndex {
    fn eq(&self, other: &FreeIndex) -> bool {
        let models = self.by_model.len().max(other.by_model.len());
        let empty = FreeSets::new();
        (0..models).all(|model| {
            self.by_model.get(model).unwrap_or(&empty)
                == other.by_model.get(model).unwrap_or(&empty)
        })
    }
}

impl FreeIndex {
    pub(crate) fn insert(&mut self, id: NodeId, node: &Node, entry: FreeEntry) {
        for model in &node.capacity.models {
            let index = usize::from(model.0);
            if index >= self.by_model.len() {
                self.by_model.resize_with(index + 1, Default::default);
            }
            let key = entry.key(node.has_loaded(*model), id);
            self.by_model[index]
                .entry((entry.classes, entry.bucket, node.capacity.numerics))
                .or_default()
                .insert(key);
        }
    }

    pub(crate) fn remove(&mut self, id: NodeId, node: &Node, entry: FreeEntry) {
        for model in &node.capacity.models {
            let Some(sets) = self.by_model.get_mut(usize::from(model.0)) else {
                continue;
            };
            let set_key = (entry.classes, entry.bucket, node.capacity.numerics);
            if let Some(set) = sets.get_mut(&set_key) {
                set.remove(&entry.key(node.has_loaded(*model), id));
                if set.is_empty() {
                    sets.remove(&set_key);
                }
            }
        }
    }

    /// Move a changed node's entries from `before` (its entry before the change) to what it
    /// is now, if they differ.
    pub(crate) fn refile(&mut self, id: NodeId, node: &Node, before: Option<FreeEntry>) {
        let after = FreeEntry::of(node);
        if before == after {
            return;
        }
        if let Some(entry) = before {
            self.remove(id, node, entry);
        }
        if let Some(entry) = after {
            self.insert(id, node, entry);
        }
    }

    /// The sets that may hold nodes for (model, class): (bucket, numerics, set).
    pub(crate) fn sets(
        &self,
        model: ModelId,
        class: TenantClass,
    ) -> impl Iterator<Item = (u8, u32, &BTreeSet<u128>)> + '_ {
        let class_bit = 1u8 << class.index();
        self.by_model
            .get(usize::from(model.0))
            .into_iter()
            .flat_map(|sets| sets.iter())
            .filter(move |((classes, _, _), _)| classes & class_bit != 0)
            .map(|((_, bucket, numerics), set)| (*bucket, *numerics, set))
    }

    /// Entries held, over all models (for the memory estimate).
    pub(crate) fn entries(&self) -> (usize, usize) {
        let sets = self.by_model.iter().map(BTreeMap::len).sum();
        let entries = self
            .by_model
            .iter()
            .flat_map(|sets| sets.values())
            .map(BTreeSet::len)
            .sum();
        (sets, entries)
    }
}

/// Nodes running work of a group, per (model, group, accepted classes).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct VictimIndex {
    sets: BTreeMap<(ModelId, VictimGroup, u8), BTreeSet<NodeId>>,
}

impl VictimIndex {
    /// Add (`insert == true`) or remove a node's entries for the given groups.
    pub(crate) fn apply(
        &mut self,
        id: NodeId,
        node: &Node,
        classes: u8,
        groups: &[VictimGroup],
        insert: bool,
    ) {
        for model in &node.capacity.models {
            for group in groups {
                let key = (*model, *group, classes);
                if insert {
                    self.sets.entry(key).or_default().insert(id);
                } else if let Some(set) = self.sets.get_mut(&key) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.sets.remove(&key);
                    }
                }
            }
        }
    }

    /// The lowest node id running `group` work that has `model` and accepts `class`.
    pub(crate) fn first(
        &self,
        model: ModelId,
        group: VictimGroup,
        class: TenantClass,
    ) -> Option<NodeId> {
        let class_bit = 1u8 << class.index();
        self.sets
            .range((model, group, 0)..=(model, group, u8::MAX))
            .filter(|((_, _, classes), _)| classes & class_bit != 0)
            .filter_map(|(_, set)| set.first().copied())
            .min()
    }

    /// Every reserved tenant with work on nodes that have `model`.
    pub(crate) fn reserved_tenants(&self, model: ModelId) -> impl Iterator<Item = TenantId> + '_ {
        let low = (model, VictimGroup::Reserved(TenantId(0)), 0);
        let high = (model, VictimGroup::Reserved(TenantId(u32::MAX)), u8::MAX);
        let mut last = None;
        self.sets
            .range(low..=high)
            .filter_map(move |((_, group, _), _)| match group {
                VictimGroup::Reserved(tenant) if last != Some(*tenant) => {
                    last = Some(*tenant);
                    Some(*tenant)
                }
                _ => None,
            })
    }

    /// Entries held (for the memory estimate).
    pub(crate) fn entries(&self) -> (usize, usize) {
        (self.sets.len(), self.sets.values().map(BTreeSet::len).sum())
    }
}

/// The availability bucket of a node that must stop work at `stop_at` (departure minus the hard
/// stop margin), seen at `now`, and when it next changes.
pub(crate) fn availability_bucket(
    now: crate::types::Millis,
    stop_at: Option<crate::types::Millis>,
) -> (u8, Option<crate::types::Millis>) {
    let Some(stop_at) = stop_at else {
        return (BUCKET_UNBOUNDED, None);
    };
    let left_s = stop_at.since(now) / 1000;
    if left_s == 0 {
        // Such a node is blocked anyway; the departure timers re-evaluate it.
        return (1, None);
    }
    // Bucket b holds [2^(b-1), 2^b) seconds: b is the bit length of the seconds left.
    let bucket = (u64::BITS - left_s.leading_zeros()) as u8;
    if bucket > BUCKET_MAX {
        return (
            BUCKET_MAX,
            Some(stop_at.minus((1u64 << (BUCKET_MAX - 1)) * 1000).plus(1)),
        );
    }
    let lower_s = 1u64 << (bucket - 1);
    // One millisecond after this the seconds left drop below the bucket's lower bound.
    (bucket, Some(stop_at.minus(lower_s * 1000).plus(1)))
}
