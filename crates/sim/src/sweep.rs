//! `--sweep`: the same scenario over a grid of batching, power draw, tariff
//! and plug-in behaviour, to draw where the fleet's cost per million tokens
//! crosses the datacenter baseline.

use std::fmt::Write;

use serde::Serialize;

use crate::run::{Options, RunError};
use crate::scenario::Scenario;
use crate::stats::round3;
use crate::svg::{line_chart, Line};

/// Largest batch per vehicle class: 1 (no batching), 4, or the scenario's.
const BATCHES: [Option<u16>; 3] = [Some(1), Some(4), None];
/// Power draw relative to the scenario's.
const POWER: [f64; 3] = [0.5, 1.0, 2.0];
/// Every owner on one flat tariff, $/kWh: super-off-peak, US average,
/// California.
const TARIFFS: [f64; 4] = [0.05, 0.10, 0.16, 0.295];
/// Plug-in probability of every session relative to the scenario's.
const PLUG_INS: [f64; 2] = [0.5, 1.0];

/// One point of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// The largest batch, or 0 for the scenario's own.
    pub max_batch: u16,
    pub power_factor: f64,
    pub tariff_per_kwh: f64,
    pub plug_in_factor: f64,
    pub busy_of_all_slots: f64,
    pub completion_tokens_per_day: f64,
    pub electricity_per_million: f64,
    pub paid_to_owners_per_million: f64,
    pub baseline_per_million: f64,
    /// Electricity alone below the baseline's whole cost.
    pub beats_baseline: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub vehicles: u32,
    pub days: u32,
    pub seed: u64,
    pub points: Vec<SweepPoint>,
}

/// `base` with one grid point's changes.
fn varied(base: &Scenario, batch: Option<u16>, power: f64, tariff: f64, plug_in: f64) -> Scenario {
    let mut scenario = base.clone();
    for class in &mut scenario.vehicle_classes {
        if let Some(batch) = batch {
            class.max_batch = batch;
        }
        class.watts_one_stream *= power;
        class.watts_full_batch *= power;
    }
    for segment in &mut scenario.segments {
        for session in &mut segment.sessions {
            session.probability = (session.probability * plug_in).min(1.0);
        }
    }
    scenario.tariffs.truncate(1);
    scenario.tariffs[0].name = format!("flat-{tariff}");
    scenario.tariffs[0].share = 1.0;
    scenario.tariffs[0].per_kwh_by_hour = vec![tariff];
    scenario.tariffs[0].daily_sd = 0.0;
    scenario
}

/// Runs the grid.
pub fn sweep(
    base: &Scenario,
    prices: &ledger::price_file::PriceConfig,
    options: Options,
) -> Result<Sweep, RunError> {
    let mut points = Vec::new();
    for batch in BATCHES {
        for power in POWER {
            for tariff in TARIFFS {
                for plug_in in PLUG_INS {
                    let scenario = varied(base, batch, power, tariff, plug_in);
                    let report = crate::simulate(&scenario, prices, options)?;
                    let cost = &report.cost_per_million_tokens;
                    points.push(SweepPoint {
                        max_batch: batch.unwrap_or(0),
                        power_factor: power,
                        tariff_per_kwh: tariff,
                        plug_in_factor: plug_in,
                        busy_of_all_slots: report.utilisation.busy_of_all,
                        completion_tokens_per_day: report
                            .delivered_tokens_per_day
                            .all_classes_on_vehicles,
                        electricity_per_million: cost.fleet_electricity,
                        paid_to_owners_per_million: cost.fleet_paid_to_owners,
                        baseline_per_million: cost.baseline,
                        beats_baseline: cost.fleet_electricity < cost.baseline,
                    });
                }
            }
        }
    }
    Ok(Sweep {
        vehicles: options.vehicles,
        days: options.days,
        seed: options.seed,
        points,
    })
}

impl Sweep {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a sweep serialises") + "\n"
    }

    /// Electricity per million tokens against the tariff, a line per batch
    /// and power setting at the scenario's plug-in behaviour, with the
    /// baseline.
    pub fn chart(&self) -> String {
        let labels: Vec<String> = TARIFFS.iter().map(|t| format!("${t}/kWh")).collect();
        let mut lines = Vec::new();
        for batch in BATCHES {
            for power in POWER {
                let values: Vec<f64> = TARIFFS
                    .iter()
                    .map(|tariff| {
                        self.point(batch.unwrap_or(0), power, *tariff, 1.0)
                            .map_or(0.0, |p| p.electricity_per_million)
                    })
                    .collect();
                let name = match batch {
                    Some(batch) => format!("batch {batch}, {power}x W"),
                    None => format!("scenario batch, {power}x W"),
                };
                lines.push(Line::new(&name, values));
            }
        }
        let baseline = self.points.first().map_or(0.0, |p| p.baseline_per_million);
        lines.push(Line::new(
            "datacenter baseline",
            vec![baseline; TARIFFS.len()],
        ));
        line_chart(
            "Fleet electricity per million tokens against the tariff",
            &labels,
            &lines,
        )
    }

    fn point(&self, batch: u16, power: f64, tariff: f64, plug_in: f64) -> Option<&SweepPoint> {
        self.points.iter().find(|p| {
            p.max_batch == batch
                && p.power_factor == power
                && p.tariff_per_kwh == tariff
                && p.plug_in_factor == plug_in
        })
    }

    pub fn markdown(&self) -> String {
        let mut page = String::new();
        let _ = writeln!(
            page,
            "# fleetgrid sim --sweep: {} vehicles × {} days, seed {}\n\n\
             Every owner on one flat tariff; batching, power draw and plug-in probability varied. \
             A point beats the baseline when the fleet's electricity alone costs less per million \
             completion tokens than the datacenter baseline's whole cost.\n\n\
             ![the frontier](frontier.svg)\n\n\
             | max batch | power × | $/kWh | plug-in × | busy | tokens/day | electricity $/M | paid to owners $/M | baseline $/M | beats it |\n\
             |---|---|---|---|---|---|---|---|---|---|",
            self.vehicles, self.days, self.seed
        );
        for p in &self.points {
            let batch = if p.max_batch == 0 {
                "scenario".to_owned()
            } else {
                p.max_batch.to_string()
            };
            let _ = writeln!(
                page,
                "| {batch} | {} | {} | {} | {:.1} % | {:.0} | {} | {} | {} | {} |",
                p.power_factor,
                p.tariff_per_kwh,
                p.plug_in_factor,
                p.busy_of_all_slots * 100.0,
                p.completion_tokens_per_day,
                round3(p.electricity_per_million),
                round3(p.paid_to_owners_per_million),
                round3(p.baseline_per_million),
                if p.beats_baseline { "yes" } else { "no" }
            );
        }
        page
    }
}
