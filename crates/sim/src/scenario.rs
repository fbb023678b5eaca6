//! A scenario: everything the simulated world is made of, read from JSON.
//!
//! Every field has a default (the shipped `scenarios/default.json` holds them
//! all, with the source of each under `sources`), and a field the simulator
//! does not know is refused rather than ignored. Amounts of money here are
//! model inputs in dollars; the simulator converts them to the ledger's
//! micro-dollars where the production settlement code takes them.

use serde::{Deserialize, Serialize};

use domain::TenantClass;

/// The shipped default scenario, with the source of every default.
pub const DEFAULT_SCENARIO_JSON: &str = include_str!("../scenarios/default.json");

/// The largest scenario file read.
pub const SCENARIO_BYTES_MAX: usize = 1024 * 1024;

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("the scenario is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the scenario is not valid: {0}")]
    Invalid(String),
}

/// The whole simulated world.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario is for, in words.
    #[serde(default)]
    pub about: String,
    /// The first simulated day, as days since 1970-01-01 (a Monday by default,
    /// so weekdays and weekends fall as in a calendar).
    pub start_day: i64,
    /// Simulated seconds between the scheduler's ticks and the series' points.
    pub step_seconds: u32,
    /// The fleet model served, as the price sheet names it.
    pub model: String,
    /// The cloud model escalated requests go to, as the price sheet's
    /// `upstream` names it.
    pub cloud_model: String,
    /// Decode and prefill speed of the fleet model on the reference machine,
    /// by batch size; every vehicle class scales it.
    pub reference: ReferenceCurve,
    pub vehicle_classes: Vec<VehicleClass>,
    pub segments: Vec<Segment>,
    pub departures: Departures,
    pub owner_policies: Vec<OwnerPolicySpec>,
    pub tariffs: Vec<TariffSpec>,
    pub grid_events: Vec<GridEvent>,
    pub demand: Demand,
    pub baseline: Baseline,
    /// Where each default came from, keyed by the field it sets.
    #[serde(default)]
    pub sources: std::collections::BTreeMap<String, String>,
}

/// A measured throughput curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceCurve {
    /// The machine and command the figures come from.
    pub measured_on: String,
    /// Points in increasing batch size; the first must be batch 1.
    pub points: Vec<CurvePoint>,
}

/// Throughput at one batch size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurvePoint {
    /// Generations decoded together.
    pub batch: u16,
    /// Completion tokens per second, all generations together.
    pub decode_tokens_per_second: f64,
    /// Prompt tokens per second (prefill is compute-bound and not batched).
    pub prefill_tokens_per_second: f64,
}

/// Vehicles of one kind of onboard computer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VehicleClass {
    pub name: String,
    /// Share of the fleet (shares of a list are normalised).
    pub share: f64,
    /// Throughput relative to the reference machine.
    pub speed_vs_reference: f64,
    /// Generations decoded at once, at most (the scheduler's slots).
    pub max_batch: u16,
    /// Memory for the model and its KV cache, GB.
    pub memory_gb: f64,
    /// The computer's draw while it serves one generation, W (it sleeps,
    /// drawing nothing for compute, while it serves none).
    pub watts_one_stream: f64,
    /// Its draw at full batch, W; linear in the batch in between.
    pub watts_full_batch: f64,
}

/// Owners who park and charge alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub name: String,
    pub share: f64,
    /// The plug-in sessions a day of this segment may hold.
    pub sessions: Vec<SessionSpec>,
}

/// Which days a session can happen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Days {
    All,
    Weekdays,
    Weekends,
}

/// One plug-in session of a day: when the car is plugged in and when it
/// leaves, as hours of the local day (an end past 24 is the next morning).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    pub days: Days,
    /// Chance the session happens on a day it can.
    pub probability: f64,
    pub plug_in_hour: Normal,
    pub unplug_hour: Normal,
}

/// A normal distribution, truncated to three standard deviations.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normal {
    pub mean: f64,
    pub sd: f64,
}

/// How departures are announced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Departures {
    /// Share of sessions whose owner told the car when they will leave.
    pub announced_share: f64,
    /// Minutes by which the real departure differs from the announced one
    /// (normal, mean 0): leaving earlier than announced is a surprise the
    /// scheduler sees only as an unplug.
    pub error_sd_minutes: f64,
}

/// What a share of owners allow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerPolicySpec {
    pub share: f64,
    /// Classes whose work the owner accepts.
    pub allowed_classes: Vec<String>,
    /// Local hours (0–23) work is allowed in; empty: every hour.
    #[serde(default)]
    pub allowed_hours: Vec<u8>,
    /// Compute energy per local day, Wh, at most.
    #[serde(default)]
    pub max_energy_per_day_wh: Option<u32>,
    /// No new work this long before an announced departure.
    pub stop_before_departure_minutes: u32,
}

/// An electricity tariff a share of owners pay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TariffSpec {
    pub name: String,
    pub share: f64,
    /// Dollars per kWh for each local hour (one value: every hour).
    pub per_kwh_by_hour: Vec<f64>,
    /// For a dynamic tariff: each day's prices are the hourly ones times
    /// `1 + sd × N(0,1)` drawn per hour and day (0: fixed prices).
    #[serde(default)]
    pub daily_sd: f64,
}

/// A demand-response programme: on event days compute pauses in a window,
/// and the owners who take part are paid for the load they did not draw.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridEvent {
    pub name: String,
    pub probability_per_day: f64,
    pub start_hour: u8,
    pub end_hour: u8,
    /// Share of vehicles enrolled.
    pub enrolled_share: f64,
    /// What the programme pays per kWh not drawn.
    pub pays_per_kwh: f64,
}

/// What tenants ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demand {
    pub classes: Vec<ClassDemand>,
    /// Share of requests the router sends to the cloud model.
    pub escalation_share: f64,
    /// Requests one simulated lease stands for (0: chosen so that a run has
    /// at most `leases_max` leases, which bounds its time).
    pub lease_requests: u32,
    pub leases_max: u64,
    /// The scheduler's waiting queue per class, in requests per vehicle of
    /// the fleet (the production bound is 10,000 for a cell of ~10,000).
    pub queue_requests_per_vehicle: f64,
    /// Times a client asks again after a retryable refusal (429/503),
    /// waiting the `Retry-After` it was given.
    pub client_retries: u32,
}

/// One class's demand.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassDemand {
    pub class: String,
    /// Requests per vehicle of the fleet per day, on average.
    pub requests_per_vehicle_per_day: f64,
    /// Weight of each hour of the day (normalised).
    pub hourly_shape: Vec<f64>,
    pub prompt_tokens: u32,
    pub answer_tokens: u32,
    /// A request not started this long after it arrived is refused.
    pub deadline_seconds: u32,
}

/// What the fleet is measured against.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub name: String,
    pub dollars_per_hour: f64,
    pub tokens_per_second: f64,
}

impl Scenario {
    /// The shipped default.
    pub fn default_scenario() -> Scenario {
        Scenario::parse(DEFAULT_SCENARIO_JSON).expect("the shipped scenario is valid")
    }

    /// Reads and checks a scenario.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        if text.len() > SCENARIO_BYTES_MAX {
            return Err(ScenarioError::Invalid(format!(
                "the file is over {SCENARIO_BYTES_MAX} bytes"
            )));
        }
        let scenario: Scenario = serde_json::from_str(text)?;
        scenario.validate().map_err(ScenarioError::Invalid)?;
        Ok(scenario)
    }

    /// Every rule a scenario must keep, naming the field that breaks one.
    pub fn validate(&self) -> Result<(), String> {
        if self.step_seconds == 0 || self.step_seconds > 3_600 {
            return Err("step_seconds must be 1..=3600".into());
        }
        let points = &self.reference.points;
        if points.first().map(|point| point.batch) != Some(1) {
            return Err("reference.points must start at batch 1".into());
        }
        for pair in points.windows(2) {
            if pair[1].batch <= pair[0].batch {
                return Err("reference.points must grow in batch".into());
            }
        }
        for point in points {
            if !(positive(point.decode_tokens_per_second)
                && positive(point.prefill_tokens_per_second))
            {
                return Err("reference.points: speeds must be positive".into());
            }
        }
        shares(
            "vehicle_classes",
            self.vehicle_classes.iter().map(|c| c.share),
        )?;
        for class in &self.vehicle_classes {
            let at = format!("vehicle_classes.{}", class.name);
            if class.max_batch == 0 || class.max_batch > 64 {
                return Err(format!("{at}.max_batch must be 1..=64"));
            }
            if !positive(class.speed_vs_reference) {
                return Err(format!("{at}.speed_vs_reference must be positive"));
            }
            if !(non_negative(class.watts_one_stream)
                && class.watts_full_batch >= class.watts_one_stream)
            {
                return Err(format!(
                    "{at}: watts_full_batch must be at least watts_one_stream >= 0"
                ));
            }
        }
        shares("segments", self.segments.iter().map(|s| s.share))?;
        for segment in &self.segments {
            for session in &segment.sessions {
                probability(
                    &format!("segments.{}.probability", segment.name),
                    session.probability,
                )?;
                if session.unplug_hour.mean <= session.plug_in_hour.mean {
                    return Err(format!(
                        "segments.{}: a session must end after it starts",
                        segment.name
                    ));
                }
            }
        }
        probability(
            "departures.announced_share",
            self.departures.announced_share,
        )?;
        shares(
            "owner_policies",
            self.owner_policies.iter().map(|p| p.share),
        )?;
        for policy in &self.owner_policies {
            for class in &policy.allowed_classes {
                class
                    .parse::<TenantClass>()
                    .map_err(|error| format!("owner_policies: {error}"))?;
            }
            if policy.allowed_hours.iter().any(|hour| *hour > 23) {
                return Err("owner_policies.allowed_hours are 0..=23".into());
            }
        }
        shares("tariffs", self.tariffs.iter().map(|t| t.share))?;
        for tariff in &self.tariffs {
            if tariff.per_kwh_by_hour.len() != 1 && tariff.per_kwh_by_hour.len() != 24 {
                return Err(format!(
                    "tariffs.{}.per_kwh_by_hour holds 1 or 24 prices",
                    tariff.name
                ));
            }
            if tariff
                .per_kwh_by_hour
                .iter()
                .any(|price| !non_negative(*price))
            {
                return Err(format!("tariffs.{}: a negative price", tariff.name));
            }
        }
        for event in &self.grid_events {
            probability("grid_events.probability_per_day", event.probability_per_day)?;
            probability("grid_events.enrolled_share", event.enrolled_share)?;
            if event.start_hour >= event.end_hour || event.end_hour > 24 {
                return Err(format!(
                    "grid_events.{}: start_hour < end_hour <= 24",
                    event.name
                ));
            }
        }
        probability("demand.escalation_share", self.demand.escalation_share)?;
        if !non_negative(self.demand.queue_requests_per_vehicle) {
            return Err("demand.queue_requests_per_vehicle must be >= 0".into());
        }
        if self.demand.leases_max == 0 {
            return Err("demand.leases_max must be positive".into());
        }
        let mut seen = Vec::new();
        for class in &self.demand.classes {
            let parsed = class
                .class
                .parse::<TenantClass>()
                .map_err(|error| format!("demand.classes: {error}"))?;
            if seen.contains(&parsed) {
                return Err(format!("demand.classes: {} twice", class.class));
            }
            seen.push(parsed);
            if class.hourly_shape.len() != 24
                || class.hourly_shape.iter().any(|w| !non_negative(*w))
            {
                return Err(format!(
                    "demand.classes.{}.hourly_shape holds 24 weights >= 0",
                    class.class
                ));
            }
            if class.answer_tokens == 0 {
                return Err(format!(
                    "demand.classes.{}.answer_tokens must be positive",
                    class.class
                ));
            }
        }
        if !positive(self.baseline.tokens_per_second) {
            return Err("baseline.tokens_per_second must be positive".into());
        }
        Ok(())
    }
}

/// False for NaN too.
fn positive(value: f64) -> bool {
    value > 0.0
}

/// False for NaN too.
fn non_negative(value: f64) -> bool {
    value >= 0.0
}

fn probability(what: &str, value: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{what} must be in 0..=1"))
    }
}

fn shares(what: &str, shares: impl Iterator<Item = f64>) -> Result<(), String> {
    let mut total = 0.0;
    let mut count = 0;
    for share in shares {
        if !non_negative(share) {
            return Err(format!("{what}: a share is negative"));
        }
        total += share;
        count += 1;
    }
    if count == 0 || total <= 0.0 {
        return Err(format!(
            "{what}: needs at least one entry with a positive share"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenario_is_valid_and_names_a_source_for_its_defaults() {
        let scenario = Scenario::default_scenario();
        for key in [
            "reference",
            "vehicle_classes",
            "segments",
            "departures",
            "tariffs",
            "grid_events",
            "demand",
            "baseline",
        ] {
            assert!(
                scenario.sources.contains_key(key),
                "no source for {key} in the shipped scenario"
            );
        }
    }

    #[test]
    fn an_unknown_field_is_refused_by_name() {
        let mut value: serde_json::Value = serde_json::from_str(DEFAULT_SCENARIO_JSON).unwrap();
        value["demand"]["surge_pricing"] = serde_json::json!(true);
        let error = Scenario::parse(&value.to_string()).unwrap_err().to_string();
        assert!(error.contains("surge_pricing"), "{error}");
    }

    #[test]
    fn a_broken_rule_names_its_field() {
        let mut value: serde_json::Value = serde_json::from_str(DEFAULT_SCENARIO_JSON).unwrap();
        value["demand"]["classes"][0]["class"] = serde_json::json!("premium");
        let error = Scenario::parse(&value.to_string()).unwrap_err().to_string();
        assert!(
            error.contains("demand.classes") && error.contains("premium"),
            "{error}"
        );
        let mut value: serde_json::Value = serde_json::from_str(DEFAULT_SCENARIO_JSON).unwrap();
        value["tariffs"][0]["per_kwh_by_hour"] = serde_json::json!([0.1, 0.2]);
        let error = Scenario::parse(&value.to_string()).unwrap_err().to_string();
        assert!(error.contains("per_kwh_by_hour"), "{error}");
    }
}
