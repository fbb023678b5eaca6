//! fleetgrid's ledger: double-entry accounting of what tenants pay, what
//! vehicle owners earn and what the platform keeps.
//!
//! Money moves only through immutable transfers in integer micro-dollars.
//! Transfer ids are derived from (request id, segment, kind), so settling a
//! request twice is harmless: identical transfers are reported as existing,
//! different ones under the same id are refused.
//!
//! Layout: [`core`] is the pure model (ids, units, transfers, the in-memory
//! [`core::Ledger`] and the invariant check); [`pricing`], [`admission`],
//! [`metering`], [`settlement`], [`clawback`], [`verification`], [`payout`] and [`statement`]
//! are the pure business rules on top of it; [`store`] persists the same operations in
//! SQLite or PostgreSQL; [`bench`] measures commit throughput.

pub mod admission;
pub mod bench;
pub mod clawback;
pub mod core;
pub mod invoice;
pub mod metering;
pub mod payout;
pub mod price_file;
pub mod pricing;
pub mod settlement;
pub mod statement;
pub mod store;
pub mod verification;
