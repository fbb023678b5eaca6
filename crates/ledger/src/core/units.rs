//! Quantities the ledger counts: money, tokens, energy, time.
//!
//! Every quantity is an integer in a named minor unit so that no amount is ever
//! a float and every rounding step is explicit (see `crate::pricing` for the
//! rounding rules).

use std::fmt;

/// One millionth of a US dollar; the ledger's only unit of money.
///
/// Signed because balances are signed (a tenant on credit owes the platform);
/// transfer amounts are always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MicroUsd(pub i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// Micro-dollars in one dollar.
    pub const PER_USD: i64 = 1_000_000;

    pub fn from_usd(usd: i64) -> Option<MicroUsd> {
        usd.checked_mul(Self::PER_USD).map(MicroUsd)
    }

    pub fn checked_add(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_add(other.0).map(MicroUsd)
    }

    pub fn checked_sub(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_sub(other.0).map(MicroUsd)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for MicroUsd {
    /// Dollars with all six decimals, e.g. `-1.250000`, so that a statement
    /// shows exactly what the ledger holds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", fixed_point(i128::from(self.0), 6))
    }
}

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

/// Milliseconds since the Unix epoch, always passed in by the caller: the core
/// never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimestampMs(pub i64);

impl TimestampMs {
    pub const PER_DAY: i64 = 86_400_000;
    pub const PER_HOUR: i64 = 3_600_000;

    /// Start of the UTC day containing this instant (daily spend caps reset here).
    pub fn utc_day_start(self) -> TimestampMs {
        TimestampMs(self.0.div_euclid(Self::PER_DAY) * Self::PER_DAY)
    }
}

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
    fn money_prints_exact_dollars() {
        assert_eq!(MicroUsd(1_250_000).to_string(), "1.250000");
        assert_eq!(MicroUsd(-5).to_string(), "-0.000005");
        assert_eq!(MicroUsd(0).to_string(), "0.000000");
    }

    #[test]
    fn energy_and_hours_print_in_user_units() {
        assert_eq!(MicroWh(1_500_000_000).kwh_string(), "1.500000000");
        assert_eq!(MicroWh(833).kwh_string(), "0.000000833");
        assert_eq!(DurationMs(5_400_000).hours_string(), "1.500000");
    }

    #[test]
    fn day_start_handles_times_before_the_epoch() {
        assert_eq!(
            TimestampMs(86_400_001).utc_day_start(),
            TimestampMs(86_400_000)
        );
        assert_eq!(TimestampMs(-1).utc_day_start(), TimestampMs(-86_400_000));
    }
}
