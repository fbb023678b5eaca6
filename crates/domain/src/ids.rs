//! The ids the parts of fleetgrid pass between them. Each is a plain number,
//! assigned by whoever owns the thing it names; none carries meaning beyond
//! identity and order.

/// A vehicle (node). Ids are dense, assigned by the cell that holds the
/// vehicle's session, and index the scheduler's node table directly, so they
/// stay small (the table grows to the largest id seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// One generation, unique for the lifetime of the cell that admitted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// An API customer, as the scheduler knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(pub u32);
