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
    Admitted, CommittedToken, FinishReason, GenerationError, NewGeneration, Rejection, TenantRef,
    Update, Usage,
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

    /// The vehicles this cell holds now, for placement and health.
    fn capacity(&self) -> Capacity;

    /// An owner changed a vehicle's policy; it applies from the next
    /// decision. (The cell also follows stored policy changes by itself;
    /// this makes an owner API write take effect at once.)
    fn owner_policy_changed(&self, node: &str, policy: scheduler::OwnerPolicy);
}

/// A cell's vehicles, as a gateway sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Every connected vehicle, by name.
    pub nodes: Vec<NodeSummary>,
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
    /// The connected vehicles' names, sorted.
    pub fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.iter().map(|node| node.name.clone()).collect();
        names.sort();
        names
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
