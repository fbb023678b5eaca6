//! Money in integer micro-dollars: never a float, every rounding explicit.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One millionth of a US dollar; fleetgrid's only unit of money.
///
/// Signed because balances are signed (a tenant on credit owes the platform);
/// prices, charges and transfer amounts are never negative. Arithmetic that
/// books money is checked (`checked_add`, `checked_sub`): an overflow is an
/// error, not a rounding. Saturating arithmetic is for estimates only.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsd(pub i64);

impl MicroUsd {
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// Micro-dollars in one dollar.
    pub const PER_USD: i64 = 1_000_000;

    /// Digits after the decimal point of a dollar amount.
    const DECIMALS: usize = 6;

    /// Whole dollars, or `None` when the amount does not fit.
    pub fn from_usd(usd: i64) -> Option<MicroUsd> {
        usd.checked_mul(Self::PER_USD).map(MicroUsd)
    }

    /// Parses a non-negative decimal dollar amount such as `1.25`, `$12` or
    /// `0.000002`: digits before the point, at most six after it, so that
    /// nothing is rounded; anything else (a sign, an exponent, a comma) is
    /// refused rather than guessed at.
    pub fn parse_usd(text: &str) -> Option<MicroUsd> {
        let text = text.trim();
        let text = text.strip_prefix('$').unwrap_or(text);
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
        if whole.is_empty()
            || fraction.len() > Self::DECIMALS
            || !all_digits(whole)
            || !all_digits(fraction)
        {
            return None;
        }
        let whole: i64 = whole.parse().ok()?;
        let fraction_micro: i64 = format!("{fraction:0<width$}", width = Self::DECIMALS)
            .parse()
            .ok()?;
        whole
            .checked_mul(Self::PER_USD)?
            .checked_add(fraction_micro)
            .map(MicroUsd)
    }

    pub fn checked_add(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_add(other.0).map(MicroUsd)
    }

    pub fn checked_sub(self, other: MicroUsd) -> Option<MicroUsd> {
        self.0.checked_sub(other.0).map(MicroUsd)
    }

    /// `self + other`, pinned at the largest or smallest amount: for
    /// estimates and totals in reports, never for what the ledger books.
    pub fn saturating_add(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(other.0))
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// The amount in dollars, for display and ratios only.
    #[allow(clippy::cast_precision_loss)] // An approximation is the point.
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / Self::PER_USD as f64
    }
}

impl std::iter::Sum for MicroUsd {
    /// A saturating total, like [`MicroUsd::saturating_add`]: for estimates.
    fn sum<I: Iterator<Item = MicroUsd>>(iter: I) -> MicroUsd {
        iter.fold(MicroUsd::ZERO, MicroUsd::saturating_add)
    }
}

impl fmt::Display for MicroUsd {
    /// Dollars with all six decimals and no currency sign, e.g. `-1.250000`,
    /// so that a statement shows exactly what the ledger holds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let magnitude = self.0.unsigned_abs();
        let per_usd = Self::PER_USD.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:0width$}",
            magnitude / per_usd,
            magnitude % per_usd,
            width = Self::DECIMALS
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_prints_exact_dollars() {
        assert_eq!(MicroUsd(1_250_000).to_string(), "1.250000");
        assert_eq!(MicroUsd(-5).to_string(), "-0.000005");
        assert_eq!(MicroUsd(0).to_string(), "0.000000");
        assert_eq!(MicroUsd(i64::MIN).to_string(), "-9223372036854.775808");
    }

    #[test]
    fn dollar_amounts_parse_exactly_or_not_at_all() {
        assert_eq!(MicroUsd::parse_usd("1.25"), Some(MicroUsd(1_250_000)));
        assert_eq!(MicroUsd::parse_usd("0.000002"), Some(MicroUsd(2)));
        assert_eq!(MicroUsd::parse_usd("3"), Some(MicroUsd(3_000_000)));
        assert_eq!(MicroUsd::parse_usd("$12"), Some(MicroUsd(12_000_000)));
        assert_eq!(MicroUsd::parse_usd(" 2. "), Some(MicroUsd(2_000_000)));
        for bad in [
            "",
            ".",
            ".5",
            "-1",
            "+1",
            "abc",
            "0.0000001",
            "1e3",
            "0x10",
            "1,5",
            "$-1",
            "9223372036855",
        ] {
            assert_eq!(MicroUsd::parse_usd(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_printed_amount_parses_back_to_itself() {
        for micro in [0, 1, 999_999, 1_000_000, 123_456_789, i64::MAX] {
            let amount = MicroUsd(micro);
            assert_eq!(MicroUsd::parse_usd(&amount.to_string()), Some(amount));
        }
    }

    #[test]
    fn booking_arithmetic_is_checked_and_estimates_saturate() {
        assert_eq!(MicroUsd(1).checked_add(MicroUsd(2)), Some(MicroUsd(3)));
        assert_eq!(MicroUsd(i64::MAX).checked_add(MicroUsd(1)), None);
        assert_eq!(MicroUsd(i64::MIN).checked_sub(MicroUsd(1)), None);
        assert_eq!(MicroUsd::from_usd(2), Some(MicroUsd(2_000_000)));
        assert_eq!(MicroUsd::from_usd(i64::MAX), None);
        let total: MicroUsd = [MicroUsd(i64::MAX), MicroUsd(5)].into_iter().sum();
        assert_eq!(total, MicroUsd(i64::MAX));
    }

    #[test]
    fn money_serializes_as_a_bare_integer() {
        assert_eq!(serde_json::to_string(&MicroUsd(42)).unwrap(), "42");
        let parsed: MicroUsd = serde_json::from_str("-7").unwrap();
        assert_eq!(parsed, MicroUsd(-7));
    }
}
