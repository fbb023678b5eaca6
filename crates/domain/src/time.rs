//! Points in time, in milliseconds since the Unix epoch.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, negative before it.
///
/// Signed because the stores and the wire keep signed 64-bit integers; a
/// time before 1970 never comes from a clock but may come from a peer, and
/// must not wrap into the far future. Every conversion from or to another
/// integer is checked or saturating; spans are unsigned milliseconds.
///
/// Deciding code never reads a clock: the time is passed in by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimestampMs(pub i64);

impl TimestampMs {
    pub const PER_DAY: i64 = 86_400_000;
    pub const PER_HOUR: i64 = 3_600_000;

    /// The instant `time` names, saturating at the ends of the range.
    pub fn from_system_time(time: SystemTime) -> TimestampMs {
        let saturating = |ms: u128| i64::try_from(ms).unwrap_or(i64::MAX);
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => TimestampMs(saturating(after.as_millis())),
            Err(before) => TimestampMs(saturating(before.duration().as_millis()).saturating_neg()),
        }
    }

    /// An unsigned count of milliseconds since the epoch, or `None` when it
    /// is past the end of the range.
    pub fn from_u64(ms: u64) -> Option<TimestampMs> {
        i64::try_from(ms).ok().map(TimestampMs)
    }

    /// Milliseconds since the epoch as an unsigned count, or `None` before it.
    pub fn to_u64(self) -> Option<u64> {
        u64::try_from(self.0).ok()
    }

    /// `self + ms`, saturating at the end of time rather than wrapping.
    #[inline]
    pub fn plus(self, ms: u64) -> TimestampMs {
        match i64::try_from(ms) {
            Ok(ms) => TimestampMs(self.0.saturating_add(ms)),
            Err(_) => TimestampMs(i64::MAX),
        }
    }

    /// `self - ms`, saturating at the start of time rather than wrapping.
    #[inline]
    pub fn minus(self, ms: u64) -> TimestampMs {
        match i64::try_from(ms) {
            Ok(ms) => TimestampMs(self.0.saturating_sub(ms)),
            Err(_) => TimestampMs(i64::MIN),
        }
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: TimestampMs) -> u64 {
        // `i128` because the span between two `i64`s needs 65 bits.
        let span = i128::from(self.0) - i128::from(earlier.0);
        u64::try_from(span.max(0)).unwrap_or(u64::MAX)
    }

    /// Start of the UTC day containing this instant (daily caps reset here).
    pub fn utc_day_start(self) -> TimestampMs {
        TimestampMs(self.0.div_euclid(Self::PER_DAY) * Self::PER_DAY)
    }
}

/// `x.ceil() as i64`, for a duration in milliseconds computed in floating point: saturating as
/// the cast does (NaN is 0). Written out because on x86-64 CPUs before SSE4.1 `f64::ceil` is a
/// library call, and the scheduler and the simulator ask this for every placement and finish.
#[inline]
pub fn ceil_ms(x: f64) -> i64 {
    let whole = x as i64;
    if (whole as f64) < x {
        whole.saturating_add(1)
    } else {
        whole
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ceil_ms_is_the_librarys_ceiling_cast() {
        let values = [
            0.0,
            -0.0,
            0.2,
            0.5,
            1.0,
            1.000_000_1,
            41.999_999,
            1e15 + 0.5,
            4.5e15,
            -0.5,
            -3.7,
            -1e300,
            9.3e18,
            1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
        ];
        for x in values {
            assert_eq!(ceil_ms(x), x.ceil() as i64, "{x}");
        }
    }

    #[test]
    fn day_start_handles_times_before_the_epoch() {
        assert_eq!(
            TimestampMs(86_400_001).utc_day_start(),
            TimestampMs(86_400_000)
        );
        assert_eq!(TimestampMs(-1).utc_day_start(), TimestampMs(-86_400_000));
    }

    #[test]
    fn arithmetic_saturates_instead_of_wrapping() {
        let start = TimestampMs(1_000);
        assert_eq!(start.plus(500), TimestampMs(1_500));
        assert_eq!(start.minus(1_500), TimestampMs(-500));
        assert_eq!(TimestampMs(i64::MAX - 1).plus(10), TimestampMs(i64::MAX));
        assert_eq!(start.plus(u64::MAX), TimestampMs(i64::MAX));
        assert_eq!(start.minus(u64::MAX), TimestampMs(i64::MIN));
        assert_eq!(start.plus(250).since(start), 250);
        assert_eq!(start.since(start.plus(250)), 0);
        assert_eq!(TimestampMs(i64::MAX).since(TimestampMs(i64::MIN)), u64::MAX);
    }

    #[test]
    fn conversions_refuse_what_does_not_fit() {
        assert_eq!(TimestampMs::from_u64(42), Some(TimestampMs(42)));
        assert_eq!(TimestampMs::from_u64(u64::MAX), None);
        assert_eq!(TimestampMs(42).to_u64(), Some(42));
        assert_eq!(TimestampMs(-1).to_u64(), None);
    }

    #[test]
    fn system_times_before_and_after_the_epoch() {
        let after = UNIX_EPOCH + Duration::from_millis(1_704_067_200_000);
        assert_eq!(
            TimestampMs::from_system_time(after),
            TimestampMs(1_704_067_200_000)
        );
        let before = UNIX_EPOCH - Duration::from_millis(1_500);
        assert_eq!(TimestampMs::from_system_time(before), TimestampMs(-1_500));
    }
}
