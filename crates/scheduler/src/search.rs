//! Finding a node: the best free slot for a request, or the running work to preempt for it,
//! through the indexes in `index`.

use crate::index::{node_of_key, FreeEntry, VictimGroup, BUCKET_UNBOUNDED};
use crate::requests::Request;
use crate::scheduler::Scheduler;
use crate::types::{Millis, NodeId, RequestId, TenantClass};

/// Nodes of one availability bucket checked for covering a request's expected generation time,
/// best first. Within a bucket, nodes differ in availability by less than a factor of two, so
/// only differences in speed make a better-ranked node fail where a worse one passes; a fleet of
/// a few hardware kinds needs a few probes. Past this, the bucket counts as not covering, which
/// can only make the choice more conservative, never unsafe.
const COVER_PROBES_PER_BUCKET: usize = 8;

/// Holders of a prompt's heads looked at, at most, for one placement by prefix affinity (a node
/// holding several levels is met once per level). Past this, affinity settles for the best found
/// so far, or for none: placement stays fast however popular a head is.
const AFFINITY_PROBES_MAX: usize = 64;

impl Scheduler {
    /// The best node with a free slot that may start `request` now. Preference, in order: the
    /// expected generation ends before the node must stop; for a generation that has committed
    /// tokens, a node of the numerics it last ran on, where it continues bit for bit (elsewhere
    /// it continues from its committed tokens, but later tokens may differ from an
    /// uninterrupted run's); the model is already loaded; fewer slots in use (as a fraction);
    /// cheaper electricity; lower node id.
    pub(crate) fn best_free_node(&self, now: Millis, request: &Request) -> Option<NodeId> {
        let continues_on = request.continues_on();
        // Over every free node, and over those of the numerics the request continues on.
        let mut all = Best::default();
        let mut alike = Best::default();
        for (bucket, numerics, set) in self.nodes.free.sets(request.model, request.class) {
            let Some(first) = set.first().copied() else {
                continue;
            };
            let is_alike = continues_on == Some(numerics);
            let bound = if is_alike {
                alike.covering
            } else {
                all.covering
            };
            let covering = if bucket == BUCKET_UNBOUNDED {
                Some(first)
            } else {
                set.iter()
                    .take(COVER_PROBES_PER_BUCKET)
                    .copied()
                    .take_while(|key| bound.is_none_or(|best| *key < best))
                    .find(|key| self.covers(now, request, node_of_key(*key)))
            };
            all.add(first, covering);
            if is_alike {
                alike.add(first, covering);
            }
        }
        if let Some(node) = self.affinity_node(now, request, all.covering.is_some()) {
            let alike = |entry: &crate::nodes::Node| Some(entry.capacity.numerics) == continues_on;
            if continues_on.is_none() || self.nodes.get(node).is_some_and(alike) {
                return Some(node);
            }
        }
        alike
            .covering
            .or(all.covering)
            .or(alike.any)
            .or(all.any)
            .map(node_of_key)
    }

    /// Prefix affinity: of the free nodes placement accepts for `request` (covering its expected
    /// generation time when some node does), the one whose free sequence holds the longest head
    /// of its prompt, then the usual preference. `None` when no such node holds a whole block.
    fn affinity_node(&self, now: Millis, request: &Request, must_cover: bool) -> Option<NodeId> {
        if !self.config.prefix_affinity {
            return None;
        }
        let heads = request.prompt_heads.get()?;
        let class_bit = 1u8 << request.class.index();
        let mut best: Option<(usize, u128)> = None;
        let hashes = heads.hashes();
        let mut probes = 0;
        for (at, hash) in hashes.iter().enumerate().rev() {
            let level = at + 1;
            if best.is_some_and(|(levels, _)| levels >= level) || probes >= AFFINITY_PROBES_MAX {
                break;
            }
            for &node in self.heads.holders(request.model, *hash) {
                probes += 1;
                if probes > AFFINITY_PROBES_MAX {
                    break;
                }
                let Some(entry) = self.nodes.get(node) else {
                    continue;
                };
                let Some(free) = FreeEntry::of(entry) else {
                    continue;
                };
                if free.classes() & class_bit == 0
                    || !entry.capacity.models.contains(&request.model)
                {
                    continue;
                }
                let levels = self.heads.free_levels(node, request.model, heads);
                if levels == 0 || (must_cover && !self.covers(now, request, node)) {
                    continue;
                }
                let key = free.key(entry.has_loaded(request.model), node);
                let better = best
                    .is_none_or(|(most, least)| levels > most || (levels == most && key < least));
                if better {
                    best = Some((levels, key));
                }
            }
        }
        best.map(|(_, key)| node_of_key(key))
    }

    /// Running work that `request` may take the slot of: on a node that accepts the request's
    /// class and has its model, of strictly higher rank (lower priority) than the request. The
    /// highest rank is taken first (spot, then reserved work above its tenant's guarantee, then
    /// fleet work for a reserved tenant below its guarantee), then the lowest node id, then the
    /// latest request.
    pub(crate) fn find_victim(&self, request: &Request) -> Option<(NodeId, RequestId)> {
        let requester = self.requester_rank(request);
        let (model, class) = (request.model, request.class);
        let victims = &self.nodes.victims;
        if requester < 3 {
            if let Some(node) = victims.first(model, VictimGroup::Spot, class) {
                return self.victim_on(node, requester);
            }
        }
        if requester < 2 {
            let node = victims
                .reserved_tenants(model)
                .filter(|tenant| !self.reserved_protected(*tenant))
                .filter_map(|tenant| victims.first(model, VictimGroup::Reserved(tenant), class))
                .min();
            if let Some(node) = node {
                return self.victim_on(node, requester);
            }
        }
        if requester < 1 {
            if let Some(node) = victims.first(model, VictimGroup::Fleet, class) {
                return self.victim_on(node, requester);
            }
        }
        None
    }

    /// The highest-ranked, then latest, running request on `node` ranked above `requester`.
    fn victim_on(&self, node: NodeId, requester: u8) -> Option<(NodeId, RequestId)> {
        let entry = self.nodes.get(node)?;
        entry
            .running
            .iter()
            .filter_map(|running| {
                let victim = self.requests.get(&running.request)?;
                let rank = self.victim_rank(victim);
                (rank > requester).then_some((rank, running.request))
            })
            .max()
            .map(|(_, request)| (node, request))
    }

    /// Whether a reserved tenant's running work is within its guarantee (not preemptable).
    fn reserved_protected(&self, tenant: crate::types::TenantId) -> bool {
        self.tenants.get(tenant).is_none_or(|entry| {
            entry.config.class == TenantClass::Reserved
                && u64::from(entry.running) <= entry.guaranteed_slots(self.nodes.available_slots())
        })
    }
}

/// The best free-index keys found so far: of any node, and of a node whose expected generation
/// ends before it must stop.
#[derive(Debug, Default, Clone, Copy)]
struct Best {
    any: Option<u128>,
    covering: Option<u128>,
}

impl Best {
    fn add(&mut self, first: u128, covering: Option<u128>) {
        self.any = Some(self.any.map_or(first, |best| best.min(first)));
        if let Some(key) = covering {
            self.covering = Some(self.covering.map_or(key, |best| best.min(key)));
        }
    }
}

/// Slots in use per thousand slots.
pub(crate) fn load_permille(running: usize, slots: u16) -> u32 {
    (running as u64 * 1000 / u64::from(slots.max(1))) as u32
}
