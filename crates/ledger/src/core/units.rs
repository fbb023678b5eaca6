//! Quantities the ledger counts: money, tokens, energy, time.
//!
//! Every quantity is an integer in a named minor unit so that no amount is ever
//! a float and every rounding step is explicit (see `crate::pricing` for the
//! rounding rules). Money and points in time are fleetgrid-wide types,
//! defined once in `domain` and re-exported here.

use std::fmt;

pub use domain::MicroUsd;

/// A number of tokens (prompt or completion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TokenCount(pub u64);

impl fmt::Display for TokenCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Energy in micro-watt-hours: a 30 W board busy for 100 ms uses 833 µWh, so
/// anything coarser would round a short segment to nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MicroWh(pub u64);

impl MicroWh {
    /// Micro-watt-hours in one kilowatt-hour.
    pub const PER_KWH: u64 = 1_000_000_000;

    /// Kilowatt-hours with nine decimals (exact).
    pub fn kwh_string(self) -> String {
        fixed_point(i128::from(self.0), 9)
    }
}

/// A span of time in milliseconds (compute time of a segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationMs(pub u64);

impl DurationMs {
    pub const PER_HOUR: u64 = 3_600_000;

    /// Hours with six decimals, truncated.
    pub fn hours_string(self) -> String {
        let micro_hours = i128::from(self.0) * 1_000_000 / i128::from(Self::PER_HOUR);
        fixed_point(micro_hours, 6)
    }
}

pub use domain::TimestampMs;

/// A fraction in basis points: 10,000 bps is 100 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BasisPoints(pub u32);

impl BasisPoints {
    pub const WHOLE: u32 = 10_000;
}

/// Formats `value / 10^scale` with exactly `scale` decimals.
fn fixed_point(value: i128, scale: u32) -> String {
    let divisor = 10_i128.pow(scale);
    let sign = if value < 0 { "-" } else { "" };
    let magnitude = value.unsigned_abs();
    let whole = magnitude / divisor.unsigned_abs();
    let fraction = magnitude % divisor.unsigned_abs();
    format!("{sign}{whole}.{fraction:0width$}", width = scale as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_and_hours_print_in_user_units() {
        assert_eq!(MicroWh(1_500_000_000).kwh_string(), "1.500000000");
        assert_eq!(MicroWh(833).kwh_string(), "0.000000833");
        assert_eq!(DurationMs(5_400_000).hours_string(), "1.500000");
    }
}
