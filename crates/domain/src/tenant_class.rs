//! The priority class of a tenant.

use std::fmt;
use std::str::FromStr;

/// Tenant priority classes. Declaration order is priority order, so the
/// derived `Ord` ranks `Fleet < Reserved < Spot`: a smaller class is served
/// first, and spot is preempted first and is the cheapest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TenantClass {
    /// The operator's own workloads; served first.
    Fleet,
    /// Contracted capacity; may carry a guaranteed minimum share of the fleet's slots.
    Reserved,
    /// Best effort on idle capacity; preempted first.
    Spot,
}

/// A class name that is none of `fleet`, `reserved` or `spot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tenant class {0:?} (expected fleet, reserved or spot)")]
pub struct UnknownTenantClass(pub String);

impl TenantClass {
    /// Every class, highest priority first.
    pub const ALL: [TenantClass; 3] =
        [TenantClass::Fleet, TenantClass::Reserved, TenantClass::Spot];

    /// The name used in configuration, storage and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TenantClass::Fleet => "fleet",
            TenantClass::Reserved => "reserved",
            TenantClass::Spot => "spot",
        }
    }

    /// Dense index (0 = highest priority), for per-class arrays.
    pub fn index(self) -> usize {
        match self {
            TenantClass::Fleet => 0,
            TenantClass::Reserved => 1,
            TenantClass::Spot => 2,
        }
    }

    /// True when `self` is served before `other`.
    pub fn outranks(self, other: TenantClass) -> bool {
        self < other
    }
}

impl FromStr for TenantClass {
    type Err = UnknownTenantClass;

    fn from_str(text: &str) -> Result<Self, UnknownTenantClass> {
        TenantClass::ALL
            .into_iter()
            .find(|class| class.as_str() == text)
            .ok_or_else(|| UnknownTenantClass(text.to_owned()))
    }
}

impl fmt::Display for TenantClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for class in TenantClass::ALL {
            assert_eq!(class.as_str().parse::<TenantClass>(), Ok(class));
            assert_eq!(class.to_string(), class.as_str());
        }
        assert_eq!(
            "Fleet".parse::<TenantClass>(),
            Err(UnknownTenantClass("Fleet".to_owned()))
        );
    }

    #[test]
    fn fleet_outranks_reserved_outranks_spot() {
        assert!(TenantClass::Fleet.outranks(TenantClass::Reserved));
        assert!(TenantClass::Reserved.outranks(TenantClass::Spot));
        assert!(!TenantClass::Spot.outranks(TenantClass::Spot));
        let indices: Vec<usize> = TenantClass::ALL.iter().map(|c| c.index()).collect();
        assert_eq!(indices, [0, 1, 2]);
    }
}
