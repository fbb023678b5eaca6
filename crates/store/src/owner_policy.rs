//! The owner's policy for a vehicle as people read and write it: percent,
//! kWh, °C, minutes and local hours, checked field by field and turned into
//! the scheduler's `OwnerPolicy` (permille, Wh, tenths of °C, milliseconds,
//! an hour bit mask).
//!
//! The owner API (`PUT /owner/v1/vehicles/{node}/policy`) and the operator's
//! `fleetgrid policy set` both send a [`PolicyUpdate`]: fields left out keep
//! their current value, so a change of one limit does not reset the others.
//! The merged policy is validated as a whole (a resume threshold below the
//! stop threshold is refused even when only one of them changed).

use scheduler::{ClassSet, OwnerPolicy, TenantClass, ALL_HOURS};
use serde::{Deserialize, Deserializer, Serialize};

/// Hours in a day; allowed hours are `0..HOURS_PER_DAY`.
const HOURS_PER_DAY: u8 = 24;

/// The widest UTC offsets in use (UTC-12:00 to UTC+14:00), minutes.
pub const UTC_OFFSET_MINUTES_MIN: i16 = -720;
pub const UTC_OFFSET_MINUTES_MAX: i16 = 840;

/// The longest stop-before-departure an owner may set: one day, minutes.
pub const STOP_BEFORE_DEPARTURE_MINUTES_MAX: u32 = 24 * 60;

/// The largest daily energy cap, kWh: far above what any car computer draws
/// in a day, so a larger number is a typo (Wh for kWh).
pub const ENERGY_PER_DAY_KWH_MAX: f64 = 1000.0;

/// Chip temperature limits an owner may set, °C.
pub const CHIP_TEMPERATURE_C_MIN: f64 = 0.0;
pub const CHIP_TEMPERATURE_C_MAX: f64 = 150.0;

/// A policy as the owner API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    /// Work is also allowed while unplugged, above the state-of-charge thresholds.
    pub compute_when_unplugged: bool,
    /// Unplugged: stop at or below this state of charge, percent.
    pub unplugged_stop_soc_percent: f64,
    /// Unplugged: start again at or above this state of charge, percent.
    pub unplugged_resume_soc_percent: f64,
    /// Hours of the owner's local day (0..=23) in which the car may work.
    pub allowed_hours: Vec<u8>,
    /// The owner's local time minus UTC, minutes.
    pub utc_offset_minutes: i16,
    /// Energy the compute may use per local day; `null` = no cap.
    pub max_energy_per_day_kwh: Option<f64>,
    /// No work above this chip temperature, °C.
    pub max_chip_temperature_c: f64,
    /// No new work this many minutes before a scheduled departure.
    pub stop_before_departure_minutes: u32,
    /// Tenant classes whose work the car takes: `fleet`, `reserved`, `spot`.
    pub allowed_classes: Vec<String>,
}

/// A change to a policy; absent fields keep their value. Unknown fields are
/// refused so that a misspelt limit is not silently ignored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    pub compute_when_unplugged: Option<bool>,
    pub unplugged_stop_soc_percent: Option<f64>,
    pub unplugged_resume_soc_percent: Option<f64>,
    pub allowed_hours: Option<Vec<i64>>,
    pub utc_offset_minutes: Option<i64>,
    /// `Some(None)` (JSON `null`) removes the cap; absent keeps it.
    #[serde(default, deserialize_with = "present")]
    pub max_energy_per_day_kwh: Option<Option<f64>>,
    pub max_chip_temperature_c: Option<f64>,
    pub stop_before_departure_minutes: Option<i64>,
    pub allowed_classes: Option<Vec<String>>,
}

/// Tells "absent" (`None`, from `default`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(deserializer).map(Some)
}

/// A value the policy cannot take; `field` is the API's field name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        field,
        message: message.into(),
    }
}

impl PolicyView {
    pub fn of(policy: &OwnerPolicy) -> PolicyView {
        PolicyView {
            compute_when_unplugged: policy.allow_unplugged,
            unplugged_stop_soc_percent: f64::from(policy.unplugged_stop_soc_permille) / 10.0,
            unplugged_resume_soc_percent: f64::from(policy.unplugged_resume_soc_permille) / 10.0,
            allowed_hours: (0..HOURS_PER_DAY)
                .filter(|hour| policy.allowed_hours_utc & (1 << hour) != 0)
                .collect(),
            utc_offset_minutes: policy.utc_offset_minutes,
            max_energy_per_day_kwh: policy
                .max_energy_per_day_wh
                .map(|wh| f64::from(wh) / 1000.0),
            max_chip_temperature_c: f64::from(policy.max_chip_temperature_decicelsius) / 10.0,
            stop_before_departure_minutes: u32::try_from(policy.stop_before_departure_ms / 60_000)
                .unwrap_or(u32::MAX),
            allowed_classes: TenantClass::ALL
                .iter()
                .filter(|class| policy.allowed_classes.contains(**class))
                .map(|class| class.as_str().to_string())
                .collect(),
        }
    }
}

/// `current` with `update` applied, or the first field that is out of range.
pub fn apply(current: &OwnerPolicy, update: &PolicyUpdate) -> Result<OwnerPolicy, PolicyError> {
    let mut policy = *current;
    if let Some(allow) = update.compute_when_unplugged {
        policy.allow_unplugged = allow;
    }
    if let Some(percent) = update.unplugged_stop_soc_percent {
        policy.unplugged_stop_soc_permille = soc_permille("unplugged_stop_soc_percent", percent)?;
    }
    if let Some(percent) = update.unplugged_resume_soc_percent {
        policy.unplugged_resume_soc_permille =
            soc_permille("unplugged_resume_soc_percent", percent)?;
    }
    if let Some(hours) = &update.allowed_hours {
        policy.allowed_hours_utc = hours_mask(hours)?;
    }
    if let Some(minutes) = update.utc_offset_minutes {
        policy.utc_offset_minutes = i16::try_from(minutes)
            .ok()
            .filter(|m| (UTC_OFFSET_MINUTES_MIN..=UTC_OFFSET_MINUTES_MAX).contains(m))
            .ok_or_else(|| {
                bad(
                    "utc_offset_minutes",
                    format!(
                        "{minutes} is not between {UTC_OFFSET_MINUTES_MIN} and {UTC_OFFSET_MINUTES_MAX}"
                    ),
                )
            })?;
    }
    if let Some(cap) = update.max_energy_per_day_kwh {
        policy.max_energy_per_day_wh = cap.map(energy_wh).transpose()?;
    }
    if let Some(celsius) = update.max_chip_temperature_c {
        if !(CHIP_TEMPERATURE_C_MIN..=CHIP_TEMPERATURE_C_MAX).contains(&celsius) {
            return Err(bad(
                "max_chip_temperature_c",
                format!("{celsius} is not between {CHIP_TEMPERATURE_C_MIN} and {CHIP_TEMPERATURE_C_MAX} °C"),
            ));
        }
        policy.max_chip_temperature_decicelsius = (celsius * 10.0).round() as i16;
    }
    if let Some(minutes) = update.stop_before_departure_minutes {
        let minutes = u32::try_from(minutes)
            .ok()
            .filter(|m| *m <= STOP_BEFORE_DEPARTURE_MINUTES_MAX)
            .ok_or_else(|| {
                bad(
                    "stop_before_departure_minutes",
                    format!("{minutes} is not between 0 and {STOP_BEFORE_DEPARTURE_MINUTES_MAX}"),
                )
            })?;
        policy.stop_before_departure_ms = u64::from(minutes) * 60_000;
    }
    if let Some(classes) = &update.allowed_classes {
        let mut set = ClassSet::NONE;
        for name in classes {
            let class = name.parse::<TenantClass>().map_err(|_| {
                bad(
                    "allowed_classes",
                    format!("unknown class {name:?} (expected fleet, reserved or spot)"),
                )
            })?;
            set = set.with(class);
        }
        policy.allowed_classes = set;
    }
    if policy.unplugged_resume_soc_permille < policy.unplugged_stop_soc_permille {
        return Err(bad(
            "unplugged_resume_soc_percent",
            format!(
                "the resume threshold ({}%) must not be below the stop threshold ({}%)",
                f64::from(policy.unplugged_resume_soc_permille) / 10.0,
                f64::from(policy.unplugged_stop_soc_permille) / 10.0
            ),
        ));
    }
    Ok(policy)
}

fn soc_permille(field: &'static str, percent: f64) -> Result<u16, PolicyError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(bad(field, format!("{percent} is not between 0 and 100")));
    }
    Ok((percent * 10.0).round() as u16)
}

fn energy_wh(kwh: f64) -> Result<u32, PolicyError> {
    let field = "max_energy_per_day_kwh";
    if !(kwh > 0.0 && kwh <= ENERGY_PER_DAY_KWH_MAX) {
        return Err(bad(
            field,
            format!("{kwh} is not above 0 and at most {ENERGY_PER_DAY_KWH_MAX} kWh (use null for no cap)"),
        ));
    }
    let wh = (kwh * 1000.0).round() as u32;
    if wh == 0 {
        return Err(bad(field, format!("{kwh} kWh is less than one watt-hour")));
    }
    Ok(wh)
}

fn hours_mask(hours: &[i64]) -> Result<u32, PolicyError> {
    let mut mask = 0u32;
    for hour in hours {
        if !(0..i64::from(HOURS_PER_DAY)).contains(hour) {
            return Err(bad(
                "allowed_hours",
                format!("{hour} is not an hour of the day (0 to 23)"),
            ));
        }
        mask |= 1 << hour;
    }
    debug_assert_eq!(mask & !ALL_HOURS, 0);
    Ok(mask)
}

/// Parses hours as people write them on a command line: `all`, `none`, or
/// comma-separated hours and ranges, where a range may wrap midnight
/// (`22-6` is 22:00 to 06:59).
pub fn parse_hours(text: &str) -> Result<Vec<i64>, PolicyError> {
    let text = text.trim();
    match text {
        "all" => return Ok((0..i64::from(HOURS_PER_DAY)).collect()),
        "none" | "" => return Ok(Vec::new()),
        _ => {}
    }
    let hour = |part: &str| {
        part.trim().parse::<i64>().map_err(|_| {
            bad(
                "allowed_hours",
                format!("{part:?} is not an hour (expected e.g. 8, 22-6 or all)"),
            )
        })
    };
    let mut hours = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            None => hours.push(hour(part)?),
            Some((from, to)) => {
                let (from, to) = (hour(from)?, hour(to)?);
                hours_mask(&[from, to])?;
                let mut at = from;
                loop {
                    hours.push(at);
                    if at == to {
                        break;
                    }
                    at = (at + 1) % i64::from(HOURS_PER_DAY);
                }
            }
        }
    }
    hours_mask(&hours)?;
    Ok(hours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> PolicyUpdate {
        serde_json::from_str(json).expect("update json")
    }

    #[test]
    fn the_default_policy_reads_as_the_issue_describes_it() {
        let view = PolicyView::of(&OwnerPolicy::default());
        assert!(!view.compute_when_unplugged);
        assert_eq!(view.stop_before_departure_minutes, 15);
        assert_eq!(view.allowed_hours.len(), 24);
        assert_eq!(view.allowed_classes, ["fleet", "reserved", "spot"]);
        assert_eq!(view.max_energy_per_day_kwh, None);
        assert_eq!(view.max_chip_temperature_c, 85.0);
    }

    #[test]
    fn an_update_changes_only_what_it_names_and_round_trips() {
        let current = OwnerPolicy::default();
        let changed = apply(
            &current,
            &update(
                r#"{"compute_when_unplugged": true, "unplugged_stop_soc_percent": 40,
                    "unplugged_resume_soc_percent": 55.5, "allowed_hours": [22, 23, 0, 1],
                    "utc_offset_minutes": 60, "max_energy_per_day_kwh": 2.5,
                    "max_chip_temperature_c": 80, "stop_before_departure_minutes": 30,
                    "allowed_classes": ["fleet", "reserved"]}"#,
            ),
        )
        .expect("valid");
        assert!(changed.allow_unplugged);
        assert_eq!(changed.unplugged_stop_soc_permille, 400);
        assert_eq!(changed.unplugged_resume_soc_permille, 555);
        assert_eq!(
            changed.allowed_hours_utc,
            (1 << 22) | (1 << 23) | 1 | (1 << 1)
        );
        assert_eq!(changed.max_energy_per_day_wh, Some(2500));
        assert_eq!(changed.max_chip_temperature_decicelsius, 800);
        assert_eq!(changed.stop_before_departure_ms, 30 * 60_000);
        assert!(!changed.allowed_classes.contains(TenantClass::Spot));

        let untouched = apply(&changed, &PolicyUpdate::default()).expect("valid");
        assert_eq!(untouched, changed);
        let uncapped =
            apply(&changed, &update(r#"{"max_energy_per_day_kwh": null}"#)).expect("valid");
        assert_eq!(uncapped.max_energy_per_day_wh, None);

        let view = PolicyView::of(&changed);
        let back: PolicyUpdate = serde_json::from_value(serde_json::json!({
            "compute_when_unplugged": view.compute_when_unplugged,
            "unplugged_stop_soc_percent": view.unplugged_stop_soc_percent,
            "unplugged_resume_soc_percent": view.unplugged_resume_soc_percent,
            "allowed_hours": view.allowed_hours,
            "utc_offset_minutes": view.utc_offset_minutes,
            "max_energy_per_day_kwh": view.max_energy_per_day_kwh,
            "max_chip_temperature_c": view.max_chip_temperature_c,
            "stop_before_departure_minutes": view.stop_before_departure_minutes,
            "allowed_classes": view.allowed_classes,
        }))
        .expect("view reads back as an update");
        assert_eq!(apply(&OwnerPolicy::default(), &back), Ok(changed));
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                r#"{"unplugged_resume_soc_percent": 30}"#,
                "unplugged_resume_soc_percent",
            ),
            (
                r#"{"unplugged_stop_soc_percent": 101}"#,
                "unplugged_stop_soc_percent",
            ),
            (r#"{"allowed_hours": [24]}"#, "allowed_hours"),
            (r#"{"utc_offset_minutes": 900}"#, "utc_offset_minutes"),
            (r#"{"max_energy_per_day_kwh": 0}"#, "max_energy_per_day_kwh"),
            (
                r#"{"max_energy_per_day_kwh": 5000}"#,
                "max_energy_per_day_kwh",
            ),
            (
                r#"{"max_chip_temperature_c": -5}"#,
                "max_chip_temperature_c",
            ),
            (
                r#"{"stop_before_departure_minutes": -1}"#,
                "stop_before_departure_minutes",
            ),
            (r#"{"allowed_classes": ["gold"]}"#, "allowed_classes"),
        ];
        for (json, field) in cases {
            let error = apply(&OwnerPolicy::default(), &update(json)).expect_err(json);
            assert_eq!(error.field, field, "{json}: {error}");
        }
        assert!(serde_json::from_str::<PolicyUpdate>(r#"{"stop_soc": 5}"#).is_err());
    }

    #[test]
    fn hours_parse_from_ranges_that_may_wrap_midnight() {
        assert_eq!(parse_hours("22-2"), Ok(vec![22, 23, 0, 1, 2]));
        assert_eq!(parse_hours("8,12-13"), Ok(vec![8, 12, 13]));
        assert_eq!(parse_hours("all").map(|h| h.len()), Ok(24));
        assert_eq!(parse_hours("none"), Ok(vec![]));
        assert!(parse_hours("7-25").is_err());
        assert!(parse_hours("noon").is_err());
    }
}
