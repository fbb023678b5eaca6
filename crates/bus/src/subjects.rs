//! The NATS subjects of the bus. Every one starts with [`PREFIX`], which
//! names the wire's version: a gateway and a cell that speak different
//! versions do not hear each other at all.

use crate::BusError;

/// The version of the wire, as the first tokens of every subject.
pub const PREFIX: &str = "fleetgrid.v1";

/// Where every cell's capacity summary is published (one token per cell).
pub const CAPACITY_ALL: &str = "fleetgrid.v1.capacity.*";

/// Where owner policy changes are published; every cell hears them and a
/// cell that does not hold the vehicle ignores them.
pub const POLICY: &str = "fleetgrid.v1.policy";

/// A cell's name on the bus: one subject token.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellId(String);

impl CellId {
    /// Checks that `id` is one subject token: not empty, no `.`, `*`, `>`
    /// or whitespace.
    pub fn new(id: impl Into<String>) -> Result<CellId, BusError> {
        let id = id.into();
        let usable = !id.is_empty()
            && !id
                .chars()
                .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace());
        if usable {
            Ok(CellId(id))
        } else {
            Err(BusError::InvalidCellId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CellId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A cell's submissions (request/reply).
pub fn submit(cell: &CellId) -> String {
    format!("{PREFIX}.cell.{cell}.submit")
}

/// A cell's cancels.
pub fn cancel(cell: &CellId) -> String {
    format!("{PREFIX}.cell.{cell}.cancel")
}

/// A cell's capacity summaries.
pub fn capacity(cell: &CellId) -> String {
    format!("{PREFIX}.capacity.{cell}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_id_is_one_subject_token() {
        assert_eq!(
            submit(&CellId::new("eu-1").unwrap()),
            "fleetgrid.v1.cell.eu-1.submit"
        );
        for bad in ["", "a.b", "a*", ">", "a b", "a\tb"] {
            assert!(CellId::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
