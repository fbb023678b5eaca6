//! `fleetgrid demo --chaos`: what goes wrong, and when.
//!
//! At random intervals the demo unplugs a car, makes one leave, or kills one,
//! so that a user can watch handovers happen in the demo's log and in
//! `fleetgrid_reassignments_total` on `/metrics`. This module only decides
//! (a seeded draw, time passed in); `demo_cars` carries the decisions out
//! through the cars' vehicle-state feeds and processes.
//!
//! The same seed draws the same sequence of disruptions; which car each one
//! hits also depends on which cars are serving at that moment.

use std::time::{Duration, Instant};

use scheduler::sim::SimRng;

/// Shortest pause between two disruptions (keep `--chaos`'s help in step).
pub const INTERVAL_MIN: Duration = Duration::from_secs(15);

/// Longest pause between two disruptions.
pub const INTERVAL_MAX: Duration = Duration::from_secs(45);

/// Shortest time a disrupted car stays away (unplugged, or gone).
pub const AWAY_MIN: Duration = Duration::from_secs(10);

/// Longest time a disrupted car stays away.
pub const AWAY_MAX: Duration = Duration::from_secs(30);

/// How long before driving off the owner schedules the departure: inside the
/// scheduler's one-minute hard stop, so that the car's work moves at once.
pub const DEPARTURE_NOTICE: Duration = Duration::from_secs(20);

/// The fewest cars that must be serving for one of them to be disrupted, so
/// that at least one always stays.
pub const SERVING_MIN: usize = 2;

/// What happens to a car.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disruption {
    /// The owner unplugs the car (it stays connected, takes no work) and plugs it in again later.
    Unplug,
    /// The owner schedules a departure `DEPARTURE_NOTICE` ahead, then drives off; the car comes
    /// home later.
    Depart,
    /// The car's agent is killed with SIGKILL; the car comes home later.
    Kill,
}

const DISRUPTIONS: [Disruption; 3] = [Disruption::Unplug, Disruption::Depart, Disruption::Kill];

/// One decision: which car, what, and how long it stays away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChaosEvent {
    /// The car's index in the demo's list of cars.
    pub car: usize,
    pub disruption: Disruption,
    pub away: Duration,
}

/// The seeded source of disruptions.
pub struct Chaos {
    rng: SimRng,
    next_at: Instant,
}

impl Chaos {
    /// A planner whose first disruption comes one interval after `now`.
    pub fn new(seed: u64, now: Instant) -> Chaos {
        let mut rng = SimRng::new(seed);
        let next_at = now + draw(&mut rng, INTERVAL_MIN, INTERVAL_MAX);
        Chaos { rng, next_at }
    }

    /// The disruption due at `now`, if any, among the cars `serving` now (indices, in order).
    ///
    /// Nothing is drawn while fewer than [`SERVING_MIN`] cars serve: the disruption waits for
    /// them, so that a car is never the last one taken away.
    pub fn poll(&mut self, now: Instant, serving: &[usize]) -> Option<ChaosEvent> {
        if now < self.next_at || serving.len() < SERVING_MIN {
            return None;
        }
        let car = serving[self.rng.below(serving.len() as u64) as usize];
        let disruption = DISRUPTIONS[self.rng.below(DISRUPTIONS.len() as u64) as usize];
        let away = draw(&mut self.rng, AWAY_MIN, AWAY_MAX);
        self.next_at = now + draw(&mut self.rng, INTERVAL_MIN, INTERVAL_MAX);
        Some(ChaosEvent {
            car,
            disruption,
            away,
        })
    }
}

/// A whole number of seconds in `low..=high`.
fn draw(rng: &mut SimRng, low: Duration, high: Duration) -> Duration {
    Duration::from_secs(rng.between(low.as_secs(), high.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls every second for `seconds`, with `serving` cars, and returns what happened when.
    fn run(seed: u64, serving: &[usize], seconds: u64) -> Vec<(u64, ChaosEvent)> {
        let start = Instant::now();
        let mut chaos = Chaos::new(seed, start);
        (0..=seconds)
            .filter_map(|second| {
                chaos
                    .poll(start + Duration::from_secs(second), serving)
                    .map(|event| (second, event))
            })
            .collect()
    }

    #[test]
    fn the_same_seed_draws_the_same_disruptions() {
        assert_eq!(run(7, &[0, 1, 2], 600), run(7, &[0, 1, 2], 600));
        assert_ne!(run(7, &[0, 1, 2], 600), run(8, &[0, 1, 2], 600));
    }

    #[test]
    fn disruptions_come_within_the_documented_bounds() {
        let events = run(42, &[0, 1, 2], 3600);
        assert!(events.len() >= (3600 / INTERVAL_MAX.as_secs()) as usize - 1);
        let mut previous = 0;
        for (second, event) in &events {
            let gap = Duration::from_secs(second - previous);
            assert!(gap >= INTERVAL_MIN && gap <= INTERVAL_MAX, "gap {gap:?}");
            assert!(event.away >= AWAY_MIN && event.away <= AWAY_MAX);
            assert!(event.car < 3);
            previous = *second;
        }
        for disruption in DISRUPTIONS {
            assert!(
                events
                    .iter()
                    .any(|(_, event)| event.disruption == disruption),
                "{disruption:?} never drawn in an hour"
            );
        }
    }

    #[test]
    fn only_serving_cars_are_disrupted() {
        let events = run(3, &[1, 4], 1800);
        assert!(!events.is_empty());
        assert!(events.iter().all(|(_, event)| [1, 4].contains(&event.car)));
    }

    #[test]
    fn the_last_serving_car_is_never_disrupted() {
        assert!(run(5, &[2], 3600).is_empty());
        assert!(run(5, &[], 3600).is_empty());
    }

    #[test]
    fn a_disruption_held_back_comes_as_soon_as_a_second_car_serves() {
        let start = Instant::now();
        let mut chaos = Chaos::new(9, start);
        let late = start + INTERVAL_MAX + Duration::from_secs(100);
        assert_eq!(chaos.poll(late, &[0]), None);
        assert!(chaos.poll(late, &[0, 1]).is_some());
    }
}
