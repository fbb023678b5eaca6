//! Reconnect delays: exponential backoff with full jitter.
//!
//! A fleet of cars that lost their coordinator at the same moment (a cell restarted) must not all dial
//! back in the same instant, so each delay is drawn uniformly from `[0, cap]` where the cap grows
//! exponentially from `initial` up to `max` ("full jitter"). The number of attempts is deliberately
//! unbounded: an agent has nothing better to do than to reconnect, and the bound that matters — how
//! long a car waits between attempts — is `max`.

use std::time::Duration;

use rand::Rng;

/// The shortest delay after a failed attempt that followed another failure: at most this many
/// attempts per second however unlucky the draws. Capped by the current cap, so every delay still
/// lies within `[0, cap]`.
pub const RETRY_DELAY_FLOOR: Duration = Duration::from_millis(10);

/// How the delay between reconnect attempts grows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Cap of the first delay.
    pub initial: Duration,
    /// Upper bound of every delay, however many attempts failed.
    pub max: Duration,
    /// Growth of the cap per failed attempt.
    pub factor: u32,
}

/// The cap of the first delay after a lost session (the base of the exponential).
pub const RECONNECT_DELAY_BASE: Duration = Duration::from_millis(200);

/// The cap every delay stays under: the longest a vehicle waits between two attempts.
pub const RECONNECT_DELAY_CAP: Duration = Duration::from_secs(10);

/// Growth of the cap per failed attempt.
pub const RECONNECT_DELAY_FACTOR: u32 = 2;

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: RECONNECT_DELAY_BASE,
            max: RECONNECT_DELAY_CAP,
            factor: RECONNECT_DELAY_FACTOR,
        }
    }
}

/// The delay state of one reconnect loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    /// Failed attempts since the last success; saturates, so it never overflows.
    failures: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff {
            config,
            failures: 0,
        }
    }

    /// The upper bound of the next delay: `min(max, initial * factor^failures)`.
    pub fn cap(&self) -> Duration {
        let mut cap = self.config.initial.min(self.config.max);
        // The loop ends after at most ~64 rounds whenever the cap grows, because it doubles or more
        // towards `max`; a factor of 1 would never grow, so it is cut short.
        for _ in 0..self.failures {
            if cap >= self.config.max || self.config.factor <= 1 || cap.is_zero() {
                break;
            }
            cap = cap.saturating_mul(self.config.factor).min(self.config.max);
        }
        cap
    }

    /// Draws the delay before the next attempt and counts one more failure: uniform in
    /// `[0, cap]` for the first failure since a success, in `[min(RETRY_DELAY_FLOOR, cap), cap]`
    /// after that.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let cap = self.cap();
        let floor = if self.failures == 0 {
            Duration::ZERO
        } else {
            RETRY_DELAY_FLOOR.min(cap)
        };
        self.failures = self.failures.saturating_add(1);
        let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        let floor_nanos = u64::try_from(floor.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(floor_nanos..=cap_nanos))
    }

    /// Forgets past failures, after the coordinator welcomed the node.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn config() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            factor: 2,
        }
    }

    #[test]
    fn cap_doubles_from_initial_and_stops_at_max() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(7);
        let mut caps = Vec::new();
        for _ in 0..10 {
            caps.push(backoff.cap().as_millis());
            backoff.next_delay(&mut rng);
        }
        assert_eq!(
            caps,
            [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn every_delay_lies_within_zero_and_the_cap() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(42);
        let mut longest = Duration::ZERO;
        for _ in 0..10_000 {
            let cap = backoff.cap();
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= cap, "delay {delay:?} above cap {cap:?}");
            assert!(delay <= config().max);
            longest = longest.max(delay);
        }
        // Full jitter spreads the draws over the whole range, so some get close to the cap.
        assert!(
            longest > Duration::from_secs(9),
            "longest delay {longest:?}"
        );
    }

    #[test]
    fn delays_are_jittered_not_constant() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..20)
            .map(|_| Backoff::new(config()).next_delay(&mut rng))
            .collect();
        let first = delays[0];
        assert!(delays.iter().any(|delay| *delay != first));
        assert!(delays.iter().all(|delay| *delay <= config().initial));
    }

    #[test]
    fn reset_returns_to_the_initial_cap() {
        let mut backoff = Backoff::new(config());
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.cap(), config().max);
        backoff.reset();
        assert_eq!(backoff.cap(), config().initial);
    }

    /// A generator that always draws the smallest value: the worst case for spinning.
    struct Zeros;

    impl rand::RngCore for Zeros {
        fn next_u32(&mut self) -> u32 {
            0
        }
        fn next_u64(&mut self) -> u64 {
            0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            dest.fill(0);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
            dest.fill(0);
            Ok(())
        }
    }

    #[test]
    fn seeded_delays_stay_within_zero_and_min_of_cap_and_base_times_two_to_the_n() {
        let base = Duration::from_millis(50);
        let max = Duration::from_secs(3);
        for seed in 0..20 {
            let mut backoff = Backoff::new(BackoffConfig {
                initial: base,
                max,
                factor: 2,
            });
            let mut rng = StdRng::seed_from_u64(seed);
            for n in 0..40_u32 {
                let bound = base.saturating_mul(2_u32.saturating_pow(n)).min(max);
                let delay = backoff.next_delay(&mut rng);
                assert!(delay <= bound, "attempt {n}: {delay:?} above {bound:?}");
            }
        }
    }

    #[test]
    fn only_the_first_delay_after_a_success_may_be_zero() {
        let mut backoff = Backoff::new(config());
        let mut rng = Zeros;
        assert_eq!(backoff.next_delay(&mut rng), Duration::ZERO);
        for _ in 0..100 {
            assert!(backoff.next_delay(&mut rng) >= RETRY_DELAY_FLOOR);
        }
        // A success (the cell welcomed the node) allows one immediate retry again.
        backoff.reset();
        assert_eq!(backoff.next_delay(&mut rng), Duration::ZERO);
        assert!(backoff.next_delay(&mut rng) >= RETRY_DELAY_FLOOR);
    }

    #[test]
    fn the_floor_never_lifts_a_delay_above_a_small_cap() {
        let tiny = BackoffConfig {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
            factor: 2,
        };
        let mut backoff = Backoff::new(tiny.clone());
        let mut rng = Zeros;
        for _ in 0..10 {
            let cap = backoff.cap();
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= cap && delay <= tiny.max);
        }
        assert_eq!(backoff.next_delay(&mut rng), tiny.max);
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::MAX,
            factor: 1000,
        });
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            backoff.next_delay(&mut rng);
        }
        assert_eq!(backoff.cap(), Duration::MAX);
    }
}
