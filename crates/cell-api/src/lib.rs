//! The seam between the gateway and a cell: everything one says to the
//! other, and nothing else.
//!
//! A **cell** holds vehicles' sessions, runs the scheduler for them and
//! keeps their generations' committed tokens and KV checkpoints. A
//! **gateway** authenticates, validates, bills and shapes answers. The
//! gateway reaches a cell only through the [`Cell`] trait: submit a
//! generation (optionally continuing from committed tokens), cancel it,
//! receive its token and finish events, read the cell's capacity, and tell
//! it that an owner's policy changed. The cell may be in the same process
//! (the `cell` crate's `Core` implements the trait) or behind NATS (the
//! `bus` crate); the types here are plain data, serde-serializable, so that
//! a broker can carry them between processes.
//!
//! **Invariant:** the gateway never names a cell's internals (its nodes'
//! sessions, the scheduler, checkpoints), and a cell never reaches into the
//! gateway (billing, tenants' keys, HTTP).

#[cfg(feature = "fake")]
pub mod fake;
mod generation;
pub mod limits;
pub mod metering;
pub mod served;

use domain::RequestId;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use generation::{
    Admitted, CommittedToken, FinishReason, GenerationError, NewGeneration, Numerics, Rejection,
    TenantRef, Update, Usage,
};

use crate::metering::Metering;

/// What a gateway may ask of a cell.
pub trait Cell: Send + Sync {
    /// Admits a generation: the cell places it on a vehicle, queues it, or
    /// refuses it (nothing is kept then). Its events arrive on
    /// `Admitted::updates`, in order, ending with `Finished` or `Failed`.
    ///
    /// Asynchronous because a cell in another process needs a round trip to
    /// admit; a cell in this process answers with a ready future.
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>>;

    /// Stops a generation wherever it runs and hands back what was metered
    /// of it so far, or `None` if it had already ended. No further event
    /// arrives for it.
    fn cancel(&self, request: RequestId) -> Option<Metering>;

    /// What was metered of a generation so far, as `cancel` would hand it
    /// back, without stopping it; `None` if it ended or the cell cannot
    /// tell. A cell served over a broker sends this along with the tokens,
    /// so that the far side can answer a `cancel` (called from drop guards,
    /// so never waiting on the network) from the latest one it holds.
    fn metered(&self, _request: RequestId) -> Option<Metering> {
        None
    }

    /// The numbers the node running a generation computes, so that a gateway
    /// moving it to another cell can ask for a node that continues it bit for
    /// bit (`NewGeneration::numerics`); `None` when it runs nowhere or the
    /// cell cannot tell. A cell served over a broker sends it with the tokens
    /// when it changes.
    fn numerics(&self, _request: RequestId) -> Option<Numerics> {
        None
    }

    /// The vehicles this cell holds now, for placement and health.
    fn capacity(&self) -> Capacity;

    /// What `capacity` says, naming at most `listed` vehicles (see
    /// `CapacityListing::of`), with per-model totals over all of them. A
    /// cell with many vehicles answers it without building every vehicle's
    /// summary.
    fn capacity_listing(&self, listed: usize) -> CapacityListing {
        CapacityListing::of(self.capacity(), listed)
    }

    /// An owner changed a vehicle's policy; it applies from the next
    /// decision. (The cell also follows stored policy changes by itself;
    /// this makes an owner API write take effect at once.)
    fn owner_policy_changed(&self, node: &str, policy: scheduler::OwnerPolicy);
}

/// A cell's vehicles, as a gateway sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Connected vehicles, by name: every one, or, from cells over a broker,
    /// at most `limits::NODES_PUBLISHED_MAX` of each cell, those running
    /// something first.
    pub nodes: Vec<NodeSummary>,
    /// Connected vehicles left out of `nodes`.
    #[serde(default)]
    pub unlisted: u32,
    /// Per model, hashes of prompt heads (`domain::PromptHeads`) its vehicles
    /// hold, at most `limits::PROMPT_HEADS_PUBLISHED_MAX`, most recent first;
    /// a hint for placement, empty when prefix affinity is off.
    #[serde(default)]
    pub prompt_heads: Vec<ModelHeads>,
}

/// The prompt heads a cell's vehicles hold for one model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelHeads {
    pub model: String,
    pub hashes: Vec<u64>,
}

impl Capacity {
    /// Connected vehicles in all, listed or not.
    pub fn nodes_connected(&self) -> u64 {
        self.nodes.len() as u64 + u64::from(self.unlisted)
    }

    /// Whether the vehicle `name` is connected: `None` when it is not
    /// listed and some are not, so that the list cannot tell.
    pub fn holds(&self, name: &str) -> Option<bool> {
        if self.nodes.iter().any(|node| node.name == name) {
            Some(true)
        } else if self.unlisted == 0 {
            Some(false)
        } else {
            None
        }
    }

    /// The connected vehicles' names, sorted.
    pub fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.iter().map(|node| node.name.clone()).collect();
        names.sort();
        names
    }
}

/// A cell's capacity naming a bounded number of its vehicles, with what
/// all of them add up to per model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapacityListing {
    pub capacity: Capacity,
    /// Per served model, totals over every connected vehicle, named or
    /// not; sorted by model name.
    pub models: Vec<ModelTotals>,
}

impl CapacityListing {
    /// The totals of `capacity`'s vehicles per model, and `capacity` naming
    /// at most `listed` of them (see `keep_listed`), the rest counted in
    /// `unlisted`.
    pub fn of(mut capacity: Capacity, listed: usize) -> CapacityListing {
        let mut models = Vec::new();
        for node in &capacity.nodes {
            for model in &node.models {
                ModelTotals::entry(&mut models, model).add(node.slots, node.running);
            }
        }
        models.sort_by(|a, b| a.model.cmp(&b.model));
        let left_out = keep_listed(&mut capacity.nodes, listed, NodeSummary::listing_key);
        capacity.unlisted = capacity.unlisted.saturating_add(left_out);
        CapacityListing { capacity, models }
    }
}

/// Keeps the first `listed` of `items` in the order a bounded listing names
/// vehicles in (those running something first, then by name; `key` gives
/// each one's name and generations running), in that order, and says how
/// many it left out.
pub fn keep_listed<T>(items: &mut Vec<T>, listed: usize, key: impl Fn(&T) -> (&str, u32)) -> u32 {
    let order = |a: &T, b: &T| {
        let ((a_name, a_running), (b_name, b_running)) = (key(a), key(b));
        (a_running == 0)
            .cmp(&(b_running == 0))
            .then_with(|| a_name.cmp(b_name))
    };
    let mut left_out = 0;
    if items.len() > listed {
        items.select_nth_unstable_by(listed, order);
        left_out = u32::try_from(items.len() - listed).unwrap_or(u32::MAX);
        items.truncate(listed);
    }
    items.sort_by(order);
    left_out
}

/// A cell's vehicles that serve one model, added up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelTotals {
    pub model: String,
    pub nodes: u32,
    pub slots: u32,
    pub running: u32,
    /// Slots not running anything (a vehicle running more than it declared
    /// counts as none free).
    pub free_slots: u32,
    /// Generations for the model admitted and waiting for a vehicle (0
    /// from a cell that cannot tell: `Cell::capacity_listing`'s default).
    pub queued: u32,
}

impl ModelTotals {
    /// The totals for `model` among `models`, added if missing.
    pub fn entry<'a>(models: &'a mut Vec<ModelTotals>, model: &str) -> &'a mut ModelTotals {
        let at = match models.iter().position(|entry| entry.model == model) {
            Some(at) => at,
            None => {
                models.push(ModelTotals {
                    model: model.to_owned(),
                    ..ModelTotals::default()
                });
                models.len() - 1
            }
        };
        &mut models[at]
    }

    /// Counts a vehicle with `slots` that runs `running` generations.
    pub fn add(&mut self, slots: u32, running: u32) {
        self.nodes = self.nodes.saturating_add(1);
        self.slots = self.slots.saturating_add(slots);
        self.running = self.running.saturating_add(running);
        self.free_slots = self
            .free_slots
            .saturating_add(slots.saturating_sub(running));
    }
}

/// One connected vehicle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub name: String,
    /// The served models it holds, by name.
    pub models: Vec<String>,
    /// Generations it may run at once, as it declared them.
    pub slots: u32,
    /// Generations it runs now.
    pub running: u32,
}

impl NodeSummary {
    /// What `keep_listed` orders by: its name and generations running.
    pub fn listing_key(&self) -> (&str, u32) {
        (&self.name, self.running)
    }
}
