//! The gateway/cell seam carried over NATS, so that gateways become
//! stateless HTTP front ends and reach any number of cells in other
//! processes.
//!
//! Two halves, each an ordinary [`cell_api::Cell`] user or implementor:
//!
//! - [`serve_cell`] runs beside a cell (the `cell` crate's `Core`, or any
//!   other `Cell`): it answers submissions on the cell's own subject,
//!   streams each admitted generation's tokens to the gateway that asked,
//!   in batches that carry their first position and the cell's metering so
//!   far, applies cancels and owner policy changes, and publishes the
//!   cell's capacity every [`limits::CAPACITY_INTERVAL`].
//! - [`Cells`] runs in a gateway and implements `Cell` over every cell it
//!   hears of: it places each generation by the power of two choices on
//!   free slots, forwards each token position once, and when a cell goes
//!   quiet, disappears or loses a batch, moves the generation to another
//!   cell with the tokens already forwarded as `committed` (sampling keyed
//!   by (seed, position) makes the continuation the one the first cell
//!   would have made).
//!
//! Everything that crosses is in [`wire`], under the subjects in
//! [`subjects`] (all prefixed `fleetgrid.v1.`, the wire's version).
//!
//! **Money:** `Cell::cancel` is called from drop guards and cannot wait on
//! the network, so [`Cells`] answers it from the latest metering the cell
//! sent with a batch, clamped to the tokens forwarded downstream: a
//! cancelled generation is charged for what the client was sent. A
//! generation that moved keeps every cell's attempt in its final metering,
//! each abandoned attempt clamped the same way.

mod cells;
pub mod limits;
mod serve;
pub mod subjects;
pub mod wire;

pub use cells::{Cells, CellsConfig};
pub use serve::{serve_cell, ServeConfig};
pub use subjects::CellId;

/// What can go wrong setting up either half of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A cell id must be one NATS subject token.
    #[error(
        "cell id {0:?} is not usable in a subject (empty, or has `.`, `*`, `>` or whitespace)"
    )]
    InvalidCellId(String),
    #[error("subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("flush the NATS connection: {0}")]
    Flush(#[from] async_nats::client::FlushError),
    #[error("encode a bus message: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("decode a bus message: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("bus message of {bytes} bytes is over the {max} byte bound")]
    TooLarge { bytes: usize, max: usize },
}
