//! The core's only source of time.
//!
//! The core reads the time through the [`Clock`] it was built with, never
//! from the operating system, so that a test can drive it with a
//! [`ManualClock`] and see a timeout happen without waiting for it.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use domain::TimestampMs;

/// Wall-clock time for what is recorded and scheduled (epoch milliseconds),
/// and monotonic time for what is measured (heartbeat silence, latency).
pub trait Clock: Send + Sync {
    fn now(&self) -> TimestampMs;
    fn instant(&self) -> Instant;
}

/// The operating system's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> TimestampMs {
        TimestampMs::from_system_time(SystemTime::now())
    }

    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to: both readings advance together.
#[derive(Debug)]
pub struct ManualClock {
    start: TimestampMs,
    origin: Instant,
    // A std mutex: held for one read or add, never across an `.await`.
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock that reads `start` until it is advanced.
    pub fn new(start: TimestampMs) -> ManualClock {
        ManualClock {
            start,
            origin: Instant::now(),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut elapsed = self.elapsed();
        *elapsed = elapsed.saturating_add(by);
    }

    fn elapsed(&self) -> std::sync::MutexGuard<'_, Duration> {
        self.elapsed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> TimestampMs {
        let elapsed_ms = u64::try_from(self.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.start.plus(elapsed_ms)
    }

    fn instant(&self) -> Instant {
        let elapsed = *self.elapsed();
        self.origin.checked_add(elapsed).unwrap_or(self.origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(TimestampMs(1_000));
        let before = clock.instant();
        assert_eq!(clock.now(), TimestampMs(1_000));
        assert_eq!(clock.instant(), before);
        clock.advance(Duration::from_millis(2_500));
        assert_eq!(clock.now(), TimestampMs(3_500));
        assert_eq!(clock.instant() - before, Duration::from_millis(2_500));
    }
}
