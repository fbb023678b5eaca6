//! Eligibility: may a node take work right now, and if not, why. Pure functions of the node's
//! reported state, its owner's policy and the injected time.

use crate::event::StopReason;
use crate::types::{Millis, NodeCapacity, OwnerPolicy, VehicleState, ALL_HOURS};

const MS_PER_MINUTE: i64 = 60_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;

/// Decode/prefill speeds below this are treated as this, so estimates stay finite when a node
/// reports zero or garbage.
const SPEED_MIN_TOKENS_PER_SECOND: f64 = 0.1;

/// Why a node takes no new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocker {
    /// Not plugged in, and either the owner does not allow unplugged work or the battery is
    /// below the resume threshold (hysteresis).
    Unplugged,
    /// Within `departure_hard_stop_ms` of the scheduled departure: nothing may run.
    DepartureImminent,
    /// Within `stop_before_departure_ms`: no new work; running work that finishes in time stays.
    DepartureWindow,
    /// Chip above the owner's temperature limit.
    Temperature,
    /// Outside the owner's allowed hours.
    Hours,
    /// The owner's daily energy cap is used up.
    EnergyCap,
}

impl Blocker {
    /// Whether running work must stop at once (all but the departure window, where work that
    /// finishes in time may stay).
    pub(crate) fn stops_everything(self) -> bool {
        self != Blocker::DepartureWindow
    }

    /// The reason given to the driver when this blocker stops a generation.
    pub(crate) fn stop_reason(self) -> StopReason {
        match self {
            Blocker::Unplugged => StopReason::Departed,
            _ => StopReason::Draining,
        }
    }
}

/// The node's record of energy used today, in the owner's local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct EnergyToday {
    pub(crate) local_day: i64,
    pub(crate) used_wh: u32,
}

impl EnergyToday {
    /// Energy used on the local day containing `now`.
    pub(crate) fn used_on(self, now: Millis, policy: &OwnerPolicy) -> u32 {
        if local_day(now, policy) == self.local_day {
            self.used_wh
        } else {
            0
        }
    }

    /// Add `wh` used at `now`, starting a new day when the local date changed.
    pub(crate) fn add(&mut self, now: Millis, policy: &OwnerPolicy, wh: u32) {
        let day = local_day(now, policy);
        if day != self.local_day {
            *self = EnergyToday {
                local_day: day,
                used_wh: 0,
            };
        }
        self.used_wh = self.used_wh.saturating_add(wh);
    }
}

/// Unplugged-work hysteresis: may the battery be used, given the previous answer? Below (or at)
/// the stop threshold: no; at or above the resume threshold: yes; in between: unchanged.
pub(crate) fn battery_allows(previous: bool, state: &VehicleState, policy: &OwnerPolicy) -> bool {
    let soc = state.state_of_charge_permille;
    if soc <= policy.unplugged_stop_soc_permille {
        false
    } else if soc >= policy.unplugged_resume_soc_permille {
        true
    } else {
        previous
    }
}

/// The first reason the node may take no new work at `now`, or `None` when it may.
pub(crate) fn blocker(
    now: Millis,
    state: &VehicleState,
    policy: &OwnerPolicy,
    battery_ok: bool,
    energy: EnergyToday,
    departure_hard_stop_ms: u64,
) -> Option<Blocker> {
    if !(state.plugged_in || (policy.allow_unplugged && battery_ok)) {
        return Some(Blocker::Unplugged);
    }
    if let Some(departure) = state.departure_at {
        if now >= departure.minus(departure_hard_stop_ms) {
            return Some(Blocker::DepartureImminent);
        }
    }
    if state.chip_temperature_decicelsius > policy.max_chip_temperature_decicelsius {
        return Some(Blocker::Temperature);
    }
    if policy.allowed_hours_utc & (1 << local_hour(now, policy)) == 0 {
        return Some(Blocker::Hours);
    }
    if let Some(cap) = policy.max_energy_per_day_wh {
        if energy.used_on(now, policy) >= cap {
            return Some(Blocker::EnergyCap);
        }
    }
    if let Some(departure) = state.departure_at {
        if now >= departure.minus(policy.stop_before_departure_ms) {
            return Some(Blocker::DepartureWindow);
        }
    }
    None
}

/// The earliest time after `now` at which the passage of time alone may change the node's
/// blocker (departure window, hard stop, an hour boundary, a new day for the energy cap).
pub(crate) fn next_time_change(
    now: Millis,
    state: &VehicleState,
    policy: &OwnerPolicy,
    departure_hard_stop_ms: u64,
) -> Option<Millis> {
    let mut next: Option<Millis> = None;
    let mut consider = |at: Millis| {
        if at > now && next.is_none_or(|n| at < n) {
            next = Some(at);
        }
    };
    if let Some(departure) = state.departure_at {
        consider(departure.minus(policy.stop_before_departure_ms));
        consider(departure.minus(departure_hard_stop_ms));
    }
    if policy.allowed_hours_utc & ALL_HOURS != ALL_HOURS {
        consider(next_local_boundary(now, policy, MS_PER_HOUR));
    }
    if policy.max_energy_per_day_wh.is_some() {
        consider(next_local_boundary(now, policy, MS_PER_DAY));
    }
    next
}

/// Milliseconds a generation is expected to take on a node with `capacity` decoding at
/// `decode_tokens_per_second` (what the scheduler believes of it), margin included.
pub(crate) fn expected_generation_ms(
    prompt_tokens: u32,
    remaining_tokens: u32,
    capacity: &NodeCapacity,
    decode_tokens_per_second: f32,
    margin_permille: u32,
) -> u64 {
    let prefill = f64::from(capacity.prefill_tokens_per_second).max(SPEED_MIN_TOKENS_PER_SECOND);
    let decode = f64::from(decode_tokens_per_second).max(SPEED_MIN_TOKENS_PER_SECOND);
    let seconds = f64::from(prompt_tokens) / prefill + f64::from(remaining_tokens) / decode;
    let ms = seconds * 1000.0 * f64::from(margin_permille) / 1000.0;
    // A float-to-int cast saturates, so an absurd estimate becomes "forever", not garbage.
    u64::try_from(domain::ceil_ms(ms)).unwrap_or(0)
}

fn local_ms(now: Millis, policy: &OwnerPolicy) -> i64 {
    now.0
        .saturating_add(i64::from(policy.utc_offset_minutes) * MS_PER_MINUTE)
}

fn local_hour(now: Millis, policy: &OwnerPolicy) -> u32 {
    // rem_euclid keeps the hour in 0..24 even before the epoch in local time.
    (local_ms(now, policy).rem_euclid(MS_PER_DAY) / MS_PER_HOUR) as u32
}

fn local_day(now: Millis, policy: &OwnerPolicy) -> i64 {
    local_ms(now, policy).div_euclid(MS_PER_DAY)
}

fn next_local_boundary(now: Millis, policy: &OwnerPolicy, period_ms: i64) -> Millis {
    let local = local_ms(now, policy);
    // Saturating: a time at the end of the range has no next boundary to wrap to.
    let next_local = local
        .div_euclid(period_ms)
        .saturating_add(1)
        .saturating_mul(period_ms);
    Millis(next_local.saturating_sub(i64::from(policy.utc_offset_minutes) * MS_PER_MINUTE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ClassSet, TenantClass};

    /// 2024-01-01T10:30:00Z.
    const NOW: Millis = Millis(1_704_105_000_000);
    const MINUTE: u64 = 60_000;
    const HARD_STOP_MS: u64 = MINUTE;

    struct Row {
        name: &'static str,
        state: VehicleState,
        policy: OwnerPolicy,
        battery_ok: bool,
        energy_used_wh: u32,
        expect: Option<Blocker>,
    }

    fn row(name: &'static str, expect: Option<Blocker>) -> Row {
        Row {
            name,
            state: VehicleState::default(),
            policy: OwnerPolicy::default(),
            battery_ok: true,
            energy_used_wh: 0,
            expect,
        }
    }

    fn check(rows: Vec<Row>) {
        for row in rows {
            let energy = EnergyToday {
                local_day: local_day(NOW, &row.policy),
                used_wh: row.energy_used_wh,
            };
            let got = blocker(
                NOW,
                &row.state,
                &row.policy,
                row.battery_ok,
                energy,
                HARD_STOP_MS,
            );
            assert_eq!(got, row.expect, "{}", row.name);
        }
    }

    #[test]
    fn eligibility_table() {
        let unplugged = VehicleState {
            plugged_in: false,
            ..VehicleState::default()
        };
        let departs_in = |minutes: u64| VehicleState {
            departure_at: Some(NOW.plus(minutes * MINUTE)),
            ..VehicleState::default()
        };
        let battery_allowed = OwnerPolicy {
            allow_unplugged: true,
            ..OwnerPolicy::default()
        };
        let hour = |h: u32| OwnerPolicy {
            allowed_hours_utc: 1 << h,
            ..OwnerPolicy::default()
        };
        let capped = OwnerPolicy {
            max_energy_per_day_wh: Some(100),
            ..OwnerPolicy::default()
        };
        let spot_only = OwnerPolicy {
            allowed_classes: ClassSet::only(TenantClass::Spot),
            ..OwnerPolicy::default()
        };
        check(vec![
            row("plugged in, defaults", None),
            Row {
                state: unplugged,
                ..row("unplugged, not allowed", Some(Blocker::Unplugged))
            },
            Row {
                state: unplugged,
                policy: battery_allowed,
                ..row("unplugged, allowed, battery ok", None)
            },
            Row {
                state: unplugged,
                policy: battery_allowed,
                battery_ok: false,
                ..row("unplugged, battery low", Some(Blocker::Unplugged))
            },
            Row {
                state: departs_in(16),
                ..row("departure in 16 min, window 15", None)
            },
            Row {
                state: departs_in(15),
                ..row(
                    "departure in 15 min: window",
                    Some(Blocker::DepartureWindow),
                )
            },
            Row {
                state: departs_in(1),
                ..row(
                    "departure in 1 min: hard stop",
                    Some(Blocker::DepartureImminent),
                )
            },
            Row {
                state: VehicleState {
                    chip_temperature_decicelsius: 851,
                    ..VehicleState::default()
                },
                ..row("85.1 C over 85.0", Some(Blocker::Temperature))
            },
            Row {
                state: VehicleState {
                    chip_temperature_decicelsius: 850,
                    ..VehicleState::default()
                },
                ..row("85.0 C at the limit", None)
            },
            Row {
                policy: hour(10),
                ..row("10:30 UTC, hour 10 allowed", None)
            },
            Row {
                policy: hour(11),
                ..row("10:30 UTC, only hour 11", Some(Blocker::Hours))
            },
            Row {
                policy: OwnerPolicy {
                    utc_offset_minutes: 60,
                    ..hour(11)
                },
                ..row("11:30 local at UTC+1, hour 11 allowed", None)
            },
            Row {
                policy: OwnerPolicy {
                    utc_offset_minutes: -660,
                    ..hour(23)
                },
                ..row("23:30 local the day before at UTC-11", None)
            },
            Row {
                policy: capped,
                energy_used_wh: 99,
                ..row("99 of 100 Wh", None)
            },
            Row {
                policy: capped,
                energy_used_wh: 100,
                ..row("100 of 100 Wh", Some(Blocker::EnergyCap))
            },
            Row {
                policy: spot_only,
                ..row("class filter is per request, not a blocker", None)
            },
        ]);
    }

    #[test]
    fn battery_hysteresis_keeps_its_answer_between_thresholds() {
        let policy = OwnerPolicy {
            unplugged_stop_soc_permille: 400,
            unplugged_resume_soc_permille: 600,
            ..OwnerPolicy::default()
        };
        let soc = |permille| VehicleState {
            state_of_charge_permille: permille,
            ..VehicleState::default()
        };
        assert!(!battery_allows(true, &soc(400), &policy));
        assert!(battery_allows(true, &soc(500), &policy));
        assert!(!battery_allows(false, &soc(599), &policy));
        assert!(battery_allows(false, &soc(600), &policy));
    }

    #[test]
    fn time_alone_changes_at_the_window_the_hard_stop_and_hour_boundaries() {
        let state = VehicleState {
            departure_at: Some(NOW.plus(60 * MINUTE)),
            ..VehicleState::default()
        };
        let policy = OwnerPolicy::default();
        assert_eq!(
            next_time_change(NOW, &state, &policy, HARD_STOP_MS),
            Some(NOW.plus(45 * MINUTE))
        );
        let later = NOW.plus(45 * MINUTE);
        assert_eq!(
            next_time_change(later, &state, &policy, HARD_STOP_MS),
            Some(NOW.plus(59 * MINUTE))
        );
        let hours = OwnerPolicy {
            allowed_hours_utc: 0b1111,
            utc_offset_minutes: 30,
            ..OwnerPolicy::default()
        };
        // 10:30 UTC is 11:00 local: the next local hour starts at 12:00 local, 11:30 UTC.
        assert_eq!(
            next_time_change(NOW, &VehicleState::default(), &hours, HARD_STOP_MS),
            Some(NOW.plus(60 * MINUTE))
        );
    }
}
