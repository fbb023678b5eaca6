//! The pure half of `fleetgrid sim --validate`: the scenario as one machine's
//! real processes can run it, the vehicle traces and requests they replay
//! (recorded from the simulator's own run of the same window), the figures
//! both sides are compared on, and the tolerances.
//!
//! The real half (processes, clients, the ledger) is in the `fleetgrid`
//! binary; docs/SIM.md describes the run and why each tolerance is what it
//! is.

use domain::TenantClass;
use serde::Serialize;
use serde_json::{json, Value};

use crate::fleet::{DAY_MS, HOUR_MS};
use crate::run::{Outcome, Recorded, Recording};
use crate::scenario::{CurvePoint, OwnerPolicySpec, ReferenceCurve, Scenario, VehicleClass};

/// What the real processes measured of one vehicle alone, before the
/// window: the speeds the simulator is given, and the prompt each class's
/// requests carry (in tokens of the model's chat template).
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub decode_tokens_per_second: f64,
    pub prefill_tokens_per_second: f64,
    pub prompt_tokens: [u32; 3],
    /// The machine and command, in words.
    pub measured_on: String,
}

/// The scenario as a validation run on one machine runs it, and what was
/// changed, in words.
pub struct ValidationScenario {
    pub scenario: Scenario,
    /// The factor applied to every class's requests per vehicle.
    pub demand_factor: f64,
    pub changes: Vec<String>,
}

/// `base` with what one machine's processes cannot do replaced: one vehicle
/// class (an agent with one slot, at the calibrated speed), one owner policy
/// (the production default), no grid events, no escalation, fixed tariffs,
/// and demand scaled so that `busy` generations run at once on average at
/// the window's hour (the machine's cores are shared by every agent).
pub fn scenario(
    base: &Scenario,
    model: &str,
    calibration: &Calibration,
    vehicles: u32,
    start_minute: u32,
    busy: f64,
) -> ValidationScenario {
    let mut scenario = base.clone();
    let watts = base.vehicle_classes[0].watts_one_stream;
    scenario.model = model.to_owned();
    scenario.reference = ReferenceCurve {
        measured_on: calibration.measured_on.clone(),
        points: vec![CurvePoint {
            batch: 1,
            decode_tokens_per_second: calibration.decode_tokens_per_second,
            prefill_tokens_per_second: calibration.prefill_tokens_per_second,
        }],
    };
    scenario.vehicle_classes = vec![VehicleClass {
        name: "agent".into(),
        share: 1.0,
        speed_vs_reference: 1.0,
        max_batch: 1,
        memory_gb: 1.0,
        watts_one_stream: watts,
        watts_full_batch: watts,
    }];
    scenario.owner_policies = vec![OwnerPolicySpec {
        share: 1.0,
        allowed_classes: TenantClass::ALL
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        allowed_hours: Vec::new(),
        max_energy_per_day_wh: None,
        stop_before_departure_minutes: 15,
    }];
    scenario.grid_events.clear();
    for tariff in &mut scenario.tariffs {
        tariff.daily_sd = 0.0;
    }
    scenario.demand.escalation_share = 0.0;
    scenario.demand.lease_requests = 1;
    let hour = (i64::from(start_minute) * 60_000).rem_euclid(DAY_MS) / HOUR_MS;
    let mut offered = 0.0;
    for demand in &mut scenario.demand.classes {
        let class: TenantClass = demand.class.parse().expect("validated");
        demand.prompt_tokens = calibration.prompt_tokens[class.index()];
        let total: f64 = demand.hourly_shape.iter().sum();
        let share = demand
            .hourly_shape
            .get(hour as usize)
            .map_or(0.0, |w| w / total.max(f64::MIN_POSITIVE));
        let per_second =
            demand.requests_per_vehicle_per_day * f64::from(vehicles) * share / 3_600.0;
        let service = f64::from(demand.prompt_tokens) / calibration.prefill_tokens_per_second
            + f64::from(demand.answer_tokens) / calibration.decode_tokens_per_second;
        offered += per_second * service;
    }
    let demand_factor = if offered > 0.0 { busy / offered } else { 1.0 };
    for demand in &mut scenario.demand.classes {
        demand.requests_per_vehicle_per_day *= demand_factor;
    }
    let changes = vec![
        format!(
            "model {model}, one vehicle class: an agent with one slot at the calibrated speed ({:.1} decode / {:.0} prefill tokens/s), {watts} W while serving",
            calibration.decode_tokens_per_second, calibration.prefill_tokens_per_second
        ),
        "one owner policy for every vehicle: the production default (every class, every hour, no energy cap, stop 15 min before an announced departure)".into(),
        "no grid events, no escalation to the cloud, tariffs without daily noise".into(),
        format!(
            "demand scaled by {demand_factor:.4} so that {busy} generations run at once on average (the machine's cores are shared by every agent); prompts of {:?} tokens as the model's chat template counts them",
            calibration.prompt_tokens
        ),
    ];
    ValidationScenario {
        scenario,
        demand_factor,
        changes,
    }
}

/// One vehicle's `sim:` trace: its recorded plug-ins and unplugs, at
/// seconds after its agent starts (`lead_s` is when the window starts).
pub fn trace(recording: &Recording, vehicle: u32, lead_s: f64) -> Value {
    let at = |ms: i64| lead_s + (ms - recording.start_ms) as f64 / 1_000.0;
    let events: Vec<Value> = recording
        .events
        .iter()
        .filter_map(|event| match *event {
            Recorded::PlugIn {
                at_ms,
                vehicle: v,
                departure_ms,
            } if v == vehicle => {
                let mut step = json!({
                    "at_s": at(at_ms), "plugged_in": true, "charging": true, "soc": 0.6,
                });
                if let Some(departure) = departure_ms {
                    step["departure_in_s"] = json!(at(departure).max(0.0));
                }
                Some(step)
            }
            Recorded::Unplug { at_ms, vehicle: v } if v == vehicle => {
                Some(json!({"at_s": at(at_ms), "plugged_in": false, "charging": false}))
            }
            _ => None,
        })
        .collect();
    json!({"start_soc": 0.6, "events": events})
}

/// The recorded requests: (ms after the window starts, tenant class).
pub fn arrivals(recording: &Recording) -> Vec<(u64, TenantClass)> {
    recording
        .events
        .iter()
        .filter_map(|event| match *event {
            Recorded::Arrival { at_ms, class } => Some((
                (at_ms - recording.start_ms).max(0) as u64,
                TenantClass::ALL[usize::from(class)],
            )),
            _ => None,
        })
        .collect()
}

/// The figures both sides are compared on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// Requests served to the end, per class (fleet, reserved, spot).
    pub served: [u64; 3],
    pub prompt_tokens: [u64; 3],
    pub completion_tokens: [u64; 3],
    /// Generations moved from one vehicle to another.
    pub migrations: u64,
    /// Energy the vehicles drew for compute, Wh.
    pub energy_wh: f64,
    /// Micro-dollars, all owners together.
    pub revenue_share: i64,
    pub energy_reimbursed: i64,
    /// Per vehicle: revenue share plus energy reimbursed, micro-dollars.
    pub owner_earnings: Vec<i64>,
}

impl Figures {
    /// The simulator's figures of a window run.
    pub fn of_outcome(outcome: &Outcome) -> Figures {
        Figures {
            served: outcome.classes.each_ref().map(|c| c.served),
            prompt_tokens: outcome.classes.each_ref().map(|c| c.fleet_prompt_tokens),
            completion_tokens: outcome
                .classes
                .each_ref()
                .map(|c| c.fleet_completion_tokens),
            migrations: outcome.migrations.total(),
            energy_wh: outcome.energy_wh,
            revenue_share: outcome.money.revenue_share,
            energy_reimbursed: outcome.money.energy_reimbursed,
            owner_earnings: outcome
                .earnings
                .iter()
                .map(|e| e.revenue_share + e.energy_reimbursed)
                .collect(),
        }
    }

    pub fn earnings(&self) -> i64 {
        self.revenue_share + self.energy_reimbursed
    }
}

/// One comparison and whether it is within its tolerance.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub figure: &'static str,
    pub simulated: f64,
    /// For a figure that follows the generations' time: the simulated figure
    /// at the speeds the machine had after the window. The real figure is
    /// within when it is within the tolerance of either end or between them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simulated_at_speeds_after: Option<f64>,
    pub real: f64,
    pub tolerance: String,
    pub within: bool,
}

/// Relative tolerances. Tokens and revenue differ only by requests one
/// side served and the other did not and by a prompt's token or two.
pub const TOKENS_TOLERANCE: f64 = 0.05;
pub const REVENUE_TOLERANCE: f64 = 0.05;
/// Energy follows each generation's time, which on the real side depends
/// on how many agents share the machine's cores at each moment and on the
/// calibration's own noise.
pub const ENERGY_WH_TOLERANCE: f64 = 0.20;
/// Energy money adds which vehicle served what: among idle vehicles the
/// two runs break ties differently, and tariffs differ up to 3.75× between
/// vehicles.
pub const ENERGY_TOLERANCE: f64 = 0.35;
pub const EARNINGS_TOLERANCE: f64 = 0.15;

/// Migrations are counts of rare events (a higher class arriving while
/// every slot is busy, a car leaving mid-answer) that two runs of the same
/// window hit at different moments: they agree when the difference is
/// within two Poisson standard deviations of the larger count, plus
/// `MIGRATIONS_SLACK`.
pub const MIGRATIONS_SLACK: f64 = 2.0;

/// `|real - simulated| <= tolerance × |simulated|`; two zeros agree.
fn within_share(simulated: f64, real: f64, tolerance: f64) -> bool {
    (real - simulated).abs() <= tolerance * simulated.abs()
}

/// Within the tolerance of either end of `[one, other]`, or between them.
fn within_band(one: f64, other: f64, real: f64, tolerance: f64) -> bool {
    let between = one.min(other) <= real && real <= one.max(other);
    between || within_share(one, real, tolerance) || within_share(other, real, tolerance)
}

/// The migrations' band: `2 √max + MIGRATIONS_SLACK`.
pub fn migrations_allowed(simulated: u64, real: u64) -> f64 {
    2.0 * (simulated.max(real) as f64).sqrt() + MIGRATIONS_SLACK
}

/// How much longer (above 1) or shorter the simulated window's work takes
/// at the speeds `after` gives than at those `before` gives: its prompt
/// tokens at the prefill rate plus its completion tokens at the decode rate.
/// A shared machine's speed drifts while a validation runs (other work on the
/// host); the real generations run at the speed of their moment, not the
/// calibration's. Re-prefills after migrations are left out: they are rare.
pub fn service_time_ratio(simulated: &Figures, before: &Calibration, after: &Calibration) -> f64 {
    let prompt = simulated.prompt_tokens.iter().sum::<u64>() as f64;
    let completion = simulated.completion_tokens.iter().sum::<u64>() as f64;
    let seconds = |speeds: &Calibration| {
        prompt / speeds.prefill_tokens_per_second.max(f64::MIN_POSITIVE)
            + completion / speeds.decode_tokens_per_second.max(f64::MIN_POSITIVE)
    };
    let at_before = seconds(before);
    if at_before > 0.0 {
        seconds(after) / at_before
    } else {
        1.0
    }
}

/// The simulator's figures against the real processes'. `time_after` is the
/// `service_time_ratio` of the machine's speeds after the window to those the
/// simulator was given: energy and the money that follows it are compared
/// with the band between the simulated figure and that figure scaled by it.
pub fn compare(simulated: &Figures, time_after: f64, real: &Figures) -> Vec<Check> {
    let relative = |figure, sim: f64, real: f64, tolerance: f64| Check {
        figure,
        simulated: sim,
        simulated_at_speeds_after: None,
        real,
        tolerance: format!("±{:.0} %", tolerance * 100.0),
        within: within_share(sim, real, tolerance),
    };
    let banded = |figure, sim: f64, after: f64, real: f64, tolerance: f64| Check {
        simulated_at_speeds_after: Some(after),
        within: within_band(sim, after, real, tolerance),
        ..relative(figure, sim, real, tolerance)
    };
    let reimbursed_after = simulated.energy_reimbursed as f64 * time_after;
    let sum = |values: &[u64; 3]| values.iter().sum::<u64>() as f64;
    let allowed = migrations_allowed(simulated.migrations, real.migrations);
    vec![
        relative(
            "completion tokens delivered",
            sum(&simulated.completion_tokens),
            sum(&real.completion_tokens),
            TOKENS_TOLERANCE,
        ),
        relative(
            "prompt tokens delivered",
            sum(&simulated.prompt_tokens),
            sum(&real.prompt_tokens),
            TOKENS_TOLERANCE,
        ),
        Check {
            figure: "migrations",
            simulated: simulated.migrations as f64,
            simulated_at_speeds_after: None,
            real: real.migrations as f64,
            tolerance: format!("±(2 √larger + {MIGRATIONS_SLACK:.0}) = ±{allowed:.1}"),
            within: (real.migrations as f64 - simulated.migrations as f64).abs() <= allowed,
        },
        banded(
            "energy drawn for compute, Wh",
            simulated.energy_wh,
            simulated.energy_wh * time_after,
            real.energy_wh,
            ENERGY_WH_TOLERANCE,
        ),
        relative(
            "owners' revenue share, USD",
            dollars(simulated.revenue_share),
            dollars(real.revenue_share),
            REVENUE_TOLERANCE,
        ),
        banded(
            "owners' energy reimbursed, USD",
            dollars(simulated.energy_reimbursed),
            reimbursed_after / 1e6,
            dollars(real.energy_reimbursed),
            ENERGY_TOLERANCE,
        ),
        banded(
            "owners' earnings, USD",
            dollars(simulated.earnings()),
            (simulated.revenue_share as f64 + reimbursed_after) / 1e6,
            dollars(real.earnings()),
            EARNINGS_TOLERANCE,
        ),
    ]
}

fn dollars(micro: i64) -> f64 {
    micro as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{Options, Run, Window};

    fn calibration() -> Calibration {
        Calibration {
            decode_tokens_per_second: 40.0,
            prefill_tokens_per_second: 400.0,
            prompt_tokens: [420, 610, 1_010],
            measured_on: "a test".into(),
        }
    }

    #[test]
    fn the_window_is_recorded_and_its_traces_and_arrivals_replay_it() {
        let base = Scenario::default_scenario();
        let start_minute = 19 * 60;
        let validation = scenario(
            &base,
            "smollm2-135m-instruct",
            &calibration(),
            20,
            start_minute,
            1.0,
        );
        validation.scenario.validate().expect("a valid scenario");
        let prices = ledger::price_file::PriceConfig::default_sheet().expect("prices");
        let options = Options {
            window: Some(Window {
                start_minute,
                arrival_minutes: 15,
                drain_minutes: 5,
            }),
            ..Options::days(20, 1, 5)
        };
        let outcome = Run::new(&validation.scenario, &prices, options)
            .expect("starts")
            .run();
        let recording = outcome.recording.clone().expect("a window is recorded");
        let arrivals = arrivals(&recording);
        // Poisson arrivals at about `busy` generations' worth of work: a
        // generation of this demand takes some seconds, so hundreds arrive.
        assert!(arrivals.len() > 50, "{}", arrivals.len());
        assert!(arrivals.iter().all(|(at, _)| *at < 15 * 60_000));
        assert!(arrivals.windows(2).all(|pair| pair[0].0 <= pair[1].0));
        let figures = Figures::of_outcome(&outcome);
        assert_eq!(
            figures.served.iter().sum::<u64>(),
            arrivals.len() as u64,
            "every request of a lightly loaded window is served by its end"
        );
        // Every vehicle plugged in during the window has a trace that
        // starts plugged in at its plug-in, `lead` seconds after the agent.
        let plugged: Vec<u32> = recording
            .events
            .iter()
            .filter_map(|e| match e {
                Recorded::PlugIn { vehicle, .. } => Some(*vehicle),
                _ => None,
            })
            .collect();
        assert!(!plugged.is_empty());
        let trace = trace(&recording, plugged[0], 30.0);
        let first = &trace["events"][0];
        assert_eq!(first["plugged_in"], true);
        assert!(first["at_s"].as_f64().expect("at_s") >= 30.0);
        let text = trace.to_string();
        agent_trace_is_valid(&text);
        // The simulator's figures agree with themselves and disagree with
        // a run that lost work.
        assert!(compare(&figures, 1.0, &figures).iter().all(|c| c.within));
        let mut lost = figures.clone();
        lost.completion_tokens[0] /= 2;
        lost.migrations = figures.migrations * 4 + 10;
        let checks = compare(&figures, 1.0, &lost);
        assert!(!checks[0].within);
        assert!(!checks[2].within);
    }

    /// A machine faster after the calibration than during it: the real
    /// energy follows the later speed, and is compared with the band between
    /// the simulated energy at both; what is outside both stays outside, and
    /// the money not drawn from energy is not widened.
    #[test]
    fn energy_is_compared_with_the_band_between_the_speeds_before_and_after_the_window() {
        let simulated = Figures {
            served: [1, 1, 0],
            prompt_tokens: [400, 800, 0],
            completion_tokens: [200, 200, 0],
            energy_wh: 0.5,
            revenue_share: 100,
            energy_reimbursed: 80,
            owner_earnings: vec![180],
            ..Figures::default()
        };
        let before = calibration();
        let after = Calibration {
            decode_tokens_per_second: 2.0 * before.decode_tokens_per_second,
            prefill_tokens_per_second: 2.0 * before.prefill_tokens_per_second,
            ..calibration()
        };
        assert_eq!(service_time_ratio(&simulated, &before, &after), 0.5);
        assert_eq!(service_time_ratio(&simulated, &before, &before), 1.0);
        let ratio = service_time_ratio(&simulated, &before, &after);
        let energy = |checks: &[Check]| checks[3].within;
        let real = |wh: f64, reimbursed: i64, revenue: i64| Figures {
            energy_wh: wh,
            energy_reimbursed: reimbursed,
            revenue_share: revenue,
            ..simulated.clone()
        };
        // 0.29 Wh: 42 % under the calibration's figure, 16 % over the later one.
        let faster = real(0.29, 48, 100);
        assert!(!energy(&compare(&simulated, 1.0, &faster)));
        let checks = compare(&simulated, ratio, &faster);
        assert!(checks.iter().all(|c| c.within), "{checks:#?}");
        assert_eq!(checks[3].simulated_at_speeds_after, Some(0.25));
        assert_eq!(checks[4].simulated_at_speeds_after, None);
        // Between the two ends, and beyond either end's tolerance.
        assert!(energy(&compare(&simulated, ratio, &real(0.4, 60, 100))));
        assert!(!energy(&compare(&simulated, ratio, &real(0.19, 38, 100))));
        assert!(!energy(&compare(&simulated, ratio, &real(0.61, 80, 100))));
        // The revenue share follows tokens, whatever the speeds.
        assert!(!compare(&simulated, ratio, &real(0.29, 48, 80))[4].within);
    }

    /// The trace format's own rules, as the agent checks them: sorted times
    /// and a plug-in state in every event.
    fn agent_trace_is_valid(text: &str) {
        let value: Value = serde_json::from_str(text).expect("JSON");
        let events = value["events"].as_array().expect("events");
        let mut last = f64::MIN;
        for event in events {
            let at = event["at_s"].as_f64().expect("at_s");
            assert!(at >= last);
            last = at;
            assert!(event["plugged_in"].is_boolean());
        }
    }

    #[test]
    fn demand_is_scaled_to_the_busy_target_at_the_window_hour() {
        let base = Scenario::default_scenario();
        let one = scenario(&base, "m", &calibration(), 20, 19 * 60, 1.0);
        let two = scenario(&base, "m", &calibration(), 20, 19 * 60, 2.0);
        assert!((two.demand_factor / one.demand_factor - 2.0).abs() < 1e-9);
        assert_eq!(one.scenario.vehicle_classes.len(), 1);
        assert_eq!(one.scenario.demand.escalation_share, 0.0);
        assert_eq!(one.scenario.demand.classes[0].prompt_tokens, 420);
    }
}
