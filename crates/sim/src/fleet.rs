//! The simulated vehicles: what each one is (class, owner segment, policy,
//! tariff, demand-response enrolment) and when it is plugged in on each day.
//!
//! Every vehicle's traits and every day's sessions are drawn from their own
//! random stream (`model::substream`), so a run is the same whatever order
//! things are drawn in, and a vehicle behaves alike in a fleet of 10,000 or
//! of 1,000,000.

use scheduler::{ClassSet, Millis, OwnerPolicy, ALL_HOURS};

use crate::model::{pick, standard_normal, substream, unit};
use crate::scenario::{Days, Scenario};

/// Streams of randomness, one per kind of draw.
const TRAITS: u64 = 1;
const SESSIONS: u64 = 2;

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// What a vehicle is; fixed for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traits {
    pub class: u8,
    pub segment: u8,
    pub policy: u8,
    pub tariff: u8,
    /// Enrolled in grid event programme `i` when bit `i` is set.
    pub grid_events: u8,
}

/// One plug-in: from `plug_in` to `unplug`, with the departure the owner
/// announced, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub plug_in: Millis,
    pub unplug: Millis,
    pub announced_departure: Option<Millis>,
}

/// Draws vehicles' traits.
pub fn traits(scenario: &Scenario, seed: u64, vehicle: u32) -> Traits {
    let mut rng = substream(seed, TRAITS, u64::from(vehicle));
    let class = pick(&mut rng, scenario.vehicle_classes.iter().map(|c| c.share));
    let segment = pick(&mut rng, scenario.segments.iter().map(|s| s.share));
    let policy = pick(&mut rng, scenario.owner_policies.iter().map(|p| p.share));
    let tariff = pick(&mut rng, scenario.tariffs.iter().map(|t| t.share));
    let mut grid_events = 0u8;
    for (index, event) in scenario.grid_events.iter().enumerate().take(8) {
        if unit(&mut rng) < event.enrolled_share {
            grid_events |= 1 << index;
        }
    }
    Traits {
        class: class as u8,
        segment: segment as u8,
        policy: policy as u8,
        tariff: tariff as u8,
        grid_events,
    }
}

/// The sessions vehicle `vehicle` of `segment` starts on day `day` (days
/// since the run's first, which may be -1 for the night before it), in
/// order; `day_start` is that day's midnight in simulated time.
pub fn sessions(
    scenario: &Scenario,
    seed: u64,
    vehicle: u32,
    segment: usize,
    day: i64,
    day_start: Millis,
    out: &mut Vec<Session>,
) {
    out.clear();
    let mut rng = substream(
        seed,
        SESSIONS,
        (u64::from(vehicle) << 16) ^ (day as u64 & 0xFFFF),
    );
    let weekday = (scenario.start_day + day).rem_euclid(7);
    // 1970-01-01 was a Thursday: days since then modulo 7 give 0 = Thursday,
    // so Saturday is 2 and Sunday 3.
    let weekend = weekday == 2 || weekday == 3;
    let departures = &scenario.departures;
    for spec in &scenario.segments[segment].sessions {
        let today = match spec.days {
            Days::All => true,
            Days::Weekdays => !weekend,
            Days::Weekends => weekend,
        };
        // Every draw is made whether or not the session happens, so that
        // one session's outcome does not shift the next one's numbers.
        let happens = unit(&mut rng) < spec.probability;
        let plug_hour = spec.plug_in_hour.mean + spec.plug_in_hour.sd * standard_normal(&mut rng);
        let unplug_hour = spec.unplug_hour.mean + spec.unplug_hour.sd * standard_normal(&mut rng);
        let announced = unit(&mut rng) < departures.announced_share;
        let error_minutes = departures.error_sd_minutes * standard_normal(&mut rng);
        if !(today && happens) {
            continue;
        }
        let plug_in = day_start.0 + (plug_hour.max(0.0) * HOUR_MS as f64) as i64;
        // At least a quarter of an hour plugged in.
        let unplug =
            (day_start.0 + (unplug_hour * HOUR_MS as f64) as i64).max(plug_in + HOUR_MS / 4);
        if out.last().is_some_and(|last| last.unplug.0 > plug_in) {
            continue;
        }
        let announced_departure = announced
            .then(|| Millis(unplug + (error_minutes * 60_000.0) as i64).max(Millis(plug_in)));
        out.push(Session {
            plug_in: Millis(plug_in),
            unplug: Millis(unplug),
            announced_departure,
        });
    }
}

/// The production owner policy of policy group `index`.
pub fn owner_policy(scenario: &Scenario, index: usize) -> OwnerPolicy {
    let spec = &scenario.owner_policies[index];
    let mut classes = ClassSet::NONE;
    for class in &spec.allowed_classes {
        if let Ok(class) = class.parse() {
            classes = classes.with(class);
        }
    }
    let hours = if spec.allowed_hours.is_empty() {
        ALL_HOURS
    } else {
        spec.allowed_hours
            .iter()
            .fold(0u32, |mask, hour| mask | (1 << hour))
    };
    OwnerPolicy {
        allowed_hours_utc: hours,
        max_energy_per_day_wh: spec.max_energy_per_day_wh,
        stop_before_departure_ms: u64::from(spec.stop_before_departure_minutes) * 60_000,
        allowed_classes: classes,
        ..OwnerPolicy::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_follow_the_shares_and_do_not_depend_on_the_fleet_size() {
        let scenario = Scenario::default_scenario();
        let drawn: Vec<Traits> = (0..20_000).map(|v| traits(&scenario, 3, v)).collect();
        assert_eq!(drawn[17], traits(&scenario, 3, 17));
        let hw3 = drawn.iter().filter(|t| t.class == 0).count() as f64 / 20_000.0;
        assert!((hw3 - 0.6).abs() < 0.02, "hw3 share {hw3}");
        let enrolled = drawn.iter().filter(|t| t.grid_events & 1 == 1).count() as f64 / 20_000.0;
        assert!((enrolled - 0.2).abs() < 0.02, "enrolled share {enrolled}");
    }

    #[test]
    fn home_chargers_plug_in_on_about_the_studied_share_of_days_and_stay_overnight() {
        let scenario = Scenario::default_scenario();
        let mut out = Vec::new();
        let mut plugged_days = 0;
        let mut hours = 0.0;
        for vehicle in 0..2_000 {
            for day in 0..7 {
                sessions(
                    &scenario,
                    5,
                    vehicle,
                    0,
                    day,
                    Millis(day * DAY_MS),
                    &mut out,
                );
                plugged_days += out.len();
                for session in &out {
                    assert!(session.unplug > session.plug_in);
                    hours += (session.unplug.0 - session.plug_in.0) as f64 / HOUR_MS as f64;
                }
            }
        }
        let per_day = plugged_days as f64 / 14_000.0;
        assert!((per_day - 0.42).abs() < 0.02, "sessions per day {per_day}");
        let mean_hours = hours / plugged_days as f64;
        assert!(
            (mean_hours - 13.0).abs() < 0.5,
            "mean session {mean_hours} h"
        );
    }

    #[test]
    fn workplace_sessions_happen_on_weekdays_only() {
        let scenario = Scenario::default_scenario();
        let mut out = Vec::new();
        // Day 5 of a run starting on a Monday is a Saturday.
        for vehicle in 0..500 {
            sessions(&scenario, 1, vehicle, 1, 5, Millis(5 * DAY_MS), &mut out);
            assert!(out.iter().all(|s| s.plug_in.0 >= 5 * DAY_MS + 12 * HOUR_MS));
        }
    }
}
