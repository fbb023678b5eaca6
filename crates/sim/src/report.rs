//! What a run says: every figure in one serialisable [`Report`] (written as
//! JSON, byte-identical for equal seeds), and the Markdown page with its
//! SVG charts made from it.

use serde::Serialize;

use domain::TenantClass;

use crate::run::Outcome;
use crate::scenario::Scenario;
use crate::stats::{percentile, round3, Percentiles};
use crate::svg::{bar_chart, line_chart, Line};

/// Vehicles the premise speaks of.
const PREMISE_VEHICLES: f64 = 100_000_000.0;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run: RunFigures,
    pub fleet: Vec<FleetClass>,
    pub classes: Vec<ClassFigures>,
    pub delivered_tokens_per_day: Delivered,
    pub escalated_share: f64,
    pub migrations: MigrationFigures,
    pub utilisation: Utilisation,
    pub energy: Energy,
    pub money: MoneyFigures,
    pub owners_per_month: OwnerEarnings,
    pub cost_per_million_tokens: CostPerMillion,
    pub premise: Premise,
    /// The average day, hour by hour.
    pub day_profile: Vec<HourFigures>,
    /// Every simulated hour.
    pub hours: Vec<HourFigures>,
    pub checks: Checks,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub about: String,
    pub model: String,
    pub cloud_model: String,
    pub vehicles: u32,
    pub days: u32,
    pub seed: u64,
    /// Requests one scheduled lease stands for.
    pub lease_requests: u32,
    pub step_seconds: u32,
    pub scheduler_events: u64,
    pub world_events: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetClass {
    pub name: String,
    pub vehicles: u64,
    pub slots: u16,
    pub completion_tokens_per_second_at_full_batch: f64,
    pub watts_at_full_batch: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassFigures {
    pub class: String,
    pub arrived: u64,
    pub escalated: u64,
    pub served: u64,
    pub refused: u64,
    /// `refused`, by the scheduler's reason (`queue_full`, `no_eligible_node`, …).
    pub refused_by_reason: std::collections::BTreeMap<&'static str, u64>,
    pub deadline_missed: u64,
    pub unfinished: u64,
    pub fleet_completion_tokens: u64,
    pub fleet_prompt_tokens: u64,
    pub cloud_completion_tokens: u64,
    /// Arrival to the end of the answer, queueing and handovers included.
    pub latency_seconds: Percentiles,
    /// Arrival to the start of service.
    pub queueing_seconds: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Delivered {
    pub fleet: f64,
    pub reserved: f64,
    pub spot: f64,
    pub all_classes_on_vehicles: f64,
    pub cloud: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MigrationFigures {
    pub departed: u64,
    pub draining: u64,
    pub preempted: u64,
    pub other: u64,
    pub total: u64,
    /// Per 1,000 requests served by the fleet.
    pub per_1000_requests: f64,
    pub departed_per_1000: f64,
    pub draining_per_1000: f64,
    pub preempted_per_1000: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Utilisation {
    pub total_slots: u64,
    /// Mean over the run of busy slots over slots that take work.
    pub busy_of_available: f64,
    /// Mean over the run of busy slots over every slot of the fleet.
    pub busy_of_all: f64,
    /// Mean and peak share of the fleet's slots that take work.
    pub available_mean: f64,
    pub available_peak: f64,
    pub available_low: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Energy {
    pub kwh: f64,
    pub cost_dollars: f64,
    pub kwh_per_million_tokens: f64,
    pub cost_per_million_tokens: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MoneyFigures {
    pub charged_fleet: f64,
    pub charged_reserved: f64,
    pub charged_spot: f64,
    pub charged_total: f64,
    /// The part of the charges escalations earned.
    pub charged_for_cloud: f64,
    pub owners_revenue_share: f64,
    pub owners_energy_reimbursed: f64,
    pub cloud_upstream_cost: f64,
    /// Charges less what owners and the cloud were paid.
    pub platform_margin: f64,
    pub platform_margin_share: f64,
    /// Paid by grid programmes to owners, outside the platform's books.
    pub grid_payments: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub mean: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OwnerEarnings {
    pub revenue_share: Spread,
    pub energy_reimbursed: Spread,
    pub grid_payments: Spread,
    /// What the compute's electricity cost them at their tariff.
    pub energy_cost: Spread,
    /// Revenue share plus grid payments: what they keep.
    pub net: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostPerMillion {
    /// What the platform paid owners (share and energy) per million fleet
    /// completion tokens.
    pub fleet_paid_to_owners: f64,
    /// The electricity alone, at the owners' tariffs.
    pub fleet_electricity: f64,
    /// What tenants paid per million fleet completion tokens.
    pub fleet_price_charged: f64,
    pub baseline: f64,
    pub baseline_name: String,
    /// Fleet electricity over the baseline (below 1: cheaper).
    pub electricity_vs_baseline: f64,
    pub paid_to_owners_vs_baseline: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Premise {
    /// At 100 million vehicles of this fleet's mix.
    pub vehicles: f64,
    pub compute_gw_installed: f64,
    pub compute_gw_available_mean: f64,
    pub compute_gw_available_peak: f64,
    pub compute_gw_drawn_mean: f64,
    pub tokens_per_day: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HourFigures {
    pub hour: u32,
    pub plugged_share: f64,
    pub available_share: f64,
    pub busy_share: f64,
    pub waiting_requests: f64,
    pub tokens_per_second: [f64; 3],
    pub kw: f64,
    pub energy_cost_per_hour: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Checks {
    /// Scheduler promises the world saw broken, by kind (none: empty).
    pub anomalies: std::collections::BTreeMap<String, u64>,
    pub stale_events: u64,
    pub settlement_failures: u64,
    pub first_settlement_failure: Option<String>,
    pub scheduler_memory_bytes: u64,
}

fn dollars(micro: i64) -> f64 {
    micro as f64 / 1e6
}

fn spread(values: &mut [f64]) -> Spread {
    let mean = if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    };
    Spread {
        p10: round3(percentile(values, 100)),
        p50: round3(percentile(values, 500)),
        p90: round3(percentile(values, 900)),
        mean: round3(mean),
    }
}

fn per_1000(count: u64, served: u64) -> f64 {
    if served == 0 {
        0.0
    } else {
        round3(count as f64 * 1_000.0 / served as f64)
    }
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

impl Report {
    pub fn new(scenario: &Scenario, outcome: &Outcome) -> Report {
        let options = outcome.options;
        let days = f64::from(options.days);
        let vehicles = f64::from(options.vehicles);
        let classes: Vec<ClassFigures> = TenantClass::ALL
            .iter()
            .map(|class| {
                let counts = &outcome.classes[class.index()];
                ClassFigures {
                    class: class.as_str().to_owned(),
                    arrived: counts.arrived,
                    escalated: counts.escalated,
                    served: counts.served,
                    refused: counts.refused_by_reason.values().sum(),
                    refused_by_reason: counts.refused_by_reason.clone(),
                    deadline_missed: counts.deadline_missed,
                    unfinished: counts.unfinished,
                    fleet_completion_tokens: counts.fleet_completion_tokens,
                    fleet_prompt_tokens: counts.fleet_prompt_tokens,
                    cloud_completion_tokens: counts.cloud_completion_tokens,
                    latency_seconds: counts.latency.summary(),
                    queueing_seconds: counts.queueing.summary(),
                }
            })
            .collect();
        let fleet_tokens: u64 = classes.iter().map(|c| c.fleet_completion_tokens).sum();
        let cloud_tokens: u64 = classes.iter().map(|c| c.cloud_completion_tokens).sum();
        let per_day = |tokens: u64| round3(tokens as f64 / days);
        let delivered = Delivered {
            fleet: per_day(classes[0].fleet_completion_tokens),
            reserved: per_day(classes[1].fleet_completion_tokens),
            spot: per_day(classes[2].fleet_completion_tokens),
            all_classes_on_vehicles: per_day(fleet_tokens),
            cloud: per_day(cloud_tokens),
        };
        let arrived: u64 = classes.iter().map(|c| c.arrived).sum();
        let escalated: u64 = classes.iter().map(|c| c.escalated).sum();
        let served: u64 = classes.iter().map(|c| c.served).sum();
        let m = outcome.migrations;
        let migrations = MigrationFigures {
            departed: m.departed,
            draining: m.draining,
            preempted: m.preempted,
            other: m.node_lost + m.stalled,
            total: m.total(),
            per_1000_requests: per_1000(m.total(), served),
            departed_per_1000: per_1000(m.departed, served),
            draining_per_1000: per_1000(m.draining, served),
            preempted_per_1000: per_1000(m.preempted, served),
        };
        let hours = hourly(outcome);
        let day_profile = day_profile(&hours);
        let total_slots = outcome.total_slots as f64;
        let points = outcome.series.len().max(1) as f64;
        let busy_of_available = outcome
            .series
            .iter()
            .map(|p| {
                ratio(
                    p.busy_slots as f64,
                    p.available_slots.max(p.busy_slots) as f64,
                )
            })
            .sum::<f64>()
            / points;
        let busy_of_all = outcome
            .series
            .iter()
            .map(|p| ratio(p.busy_slots as f64, total_slots))
            .sum::<f64>()
            / points;
        let available: Vec<f64> = outcome
            .series
            .iter()
            .map(|p| ratio(p.available_slots as f64, total_slots))
            .collect();
        let available_mean = available.iter().sum::<f64>() / points;
        let utilisation = Utilisation {
            total_slots: outcome.total_slots,
            busy_of_available: round3(busy_of_available),
            busy_of_all: round3(busy_of_all),
            available_mean: round3(available_mean),
            available_peak: round3(available.iter().cloned().fold(0.0, f64::max)),
            available_low: round3(
                available
                    .iter()
                    .cloned()
                    .fold(f64::INFINITY, f64::min)
                    .min(1.0),
            ),
        };
        let million = fleet_tokens as f64 / 1e6;
        let energy = Energy {
            kwh: round3(outcome.energy_wh / 1_000.0),
            cost_dollars: round3(outcome.energy_cost),
            kwh_per_million_tokens: round3(ratio(outcome.energy_wh / 1_000.0, million)),
            cost_per_million_tokens: round3(ratio(outcome.energy_cost, million)),
        };
        let money = &outcome.money;
        let charged_total: i64 = money.charged.iter().sum();
        let margin =
            charged_total - money.revenue_share - money.energy_reimbursed - money.cloud_cost;
        let money_figures = MoneyFigures {
            charged_fleet: dollars(money.charged[0]),
            charged_reserved: dollars(money.charged[1]),
            charged_spot: dollars(money.charged[2]),
            charged_total: dollars(charged_total),
            charged_for_cloud: dollars(money.cloud_charged),
            owners_revenue_share: dollars(money.revenue_share),
            owners_energy_reimbursed: dollars(money.energy_reimbursed),
            cloud_upstream_cost: dollars(money.cloud_cost),
            platform_margin: dollars(margin),
            platform_margin_share: round3(ratio(margin as f64, charged_total as f64)),
            grid_payments: dollars(money.grid_payments),
        };
        let month = 30.0 / days;
        let column = |f: &dyn Fn(&crate::stats::Earnings) -> f64| {
            let mut values: Vec<f64> = outcome.earnings.iter().map(|e| f(e) * month).collect();
            spread(&mut values)
        };
        let owners_per_month = OwnerEarnings {
            revenue_share: column(&|e| dollars(e.revenue_share)),
            energy_reimbursed: column(&|e| dollars(e.energy_reimbursed)),
            grid_payments: column(&|e| dollars(e.grid_payments)),
            energy_cost: column(&|e| e.energy_cost),
            net: column(&|e| dollars(e.revenue_share + e.grid_payments)),
        };
        let baseline = scenario.baseline.dollars_per_hour
            / (scenario.baseline.tokens_per_second * 3_600.0)
            * 1e6;
        let paid_to_owners = ratio(
            dollars(money.revenue_share + money.energy_reimbursed),
            million,
        );
        let electricity = ratio(outcome.energy_cost, million);
        let fleet_charged = dollars(charged_total - money.cloud_charged);
        let cost = CostPerMillion {
            fleet_paid_to_owners: round3(paid_to_owners),
            fleet_electricity: round3(electricity),
            fleet_price_charged: round3(ratio(fleet_charged, million)),
            baseline: round3(baseline),
            baseline_name: scenario.baseline.name.clone(),
            electricity_vs_baseline: round3(ratio(electricity, baseline)),
            paid_to_owners_vs_baseline: round3(ratio(paid_to_owners, baseline)),
        };
        let full_watts: f64 = outcome
            .vehicle_classes
            .iter()
            .zip(&outcome.class_of_vehicle_counts)
            .map(|(class, count)| class.watts[usize::from(class.slots)] * *count as f64)
            .sum();
        let scale = PREMISE_VEHICLES / vehicles;
        let installed_gw = full_watts * scale / 1e9;
        let mean_kw = day_profile.iter().map(|h| h.kw).sum::<f64>() / 24.0;
        let premise = Premise {
            vehicles: PREMISE_VEHICLES,
            compute_gw_installed: round3(installed_gw),
            compute_gw_available_mean: round3(installed_gw * available_mean),
            compute_gw_available_peak: round3(installed_gw * utilisation.available_peak),
            compute_gw_drawn_mean: round3(mean_kw * 1_000.0 * scale / 1e9),
            tokens_per_day: round3(fleet_tokens as f64 / days * scale),
        };
        let fleet = outcome
            .vehicle_classes
            .iter()
            .zip(&outcome.class_of_vehicle_counts)
            .map(|(class, count)| FleetClass {
                name: class.name.clone(),
                vehicles: *count,
                slots: class.slots,
                completion_tokens_per_second_at_full_batch: round3(
                    class.decode_tokens_per_second as f64 * f64::from(class.slots),
                ),
                watts_at_full_batch: class.watts[usize::from(class.slots)],
            })
            .collect();
        Report {
            run: RunFigures {
                about: scenario.about.clone(),
                model: scenario.model.clone(),
                cloud_model: scenario.cloud_model.clone(),
                vehicles: options.vehicles,
                days: options.days,
                seed: options.seed,
                lease_requests: outcome.lease_requests,
                step_seconds: scenario.step_seconds,
                scheduler_events: outcome.scheduler_events,
                world_events: outcome.world_events,
            },
            fleet,
            classes,
            delivered_tokens_per_day: delivered,
            escalated_share: round3(ratio(escalated as f64, arrived as f64)),
            migrations,
            utilisation,
            energy,
            money: money_figures,
            owners_per_month,
            cost_per_million_tokens: cost,
            premise,
            day_profile,
            hours,
            checks: Checks {
                anomalies: outcome
                    .anomalies
                    .iter()
                    .map(|(kind, count)| (kind.to_string(), *count))
                    .collect(),
                stale_events: outcome.stale_events,
                settlement_failures: outcome.settlement_failures,
                first_settlement_failure: outcome.first_settlement_failure.clone(),
                scheduler_memory_bytes: outcome.scheduler_memory_bytes,
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises") + "\n"
    }

    /// The charts, as (file name, SVG).
    pub fn charts(&self) -> Vec<(&'static str, String)> {
        let hours: Vec<String> = (0..24).map(|h| format!("{h:02}")).collect();
        let profile = &self.day_profile;
        let series = |f: &dyn Fn(&HourFigures) -> f64| profile.iter().map(f).collect::<Vec<_>>();
        let capacity = line_chart(
            "Fleet slots over the day (share of all slots)",
            &hours,
            &[
                Line::new("plugged in", series(&|h| h.plugged_share)),
                Line::new("taking work", series(&|h| h.available_share)),
                Line::new("busy", series(&|h| h.busy_share)),
            ],
        );
        let tokens = line_chart(
            "Completion tokens per second delivered by the fleet, by class",
            &hours,
            &TenantClass::ALL
                .iter()
                .map(|class| {
                    Line::new(
                        class.as_str(),
                        series(&|h| h.tokens_per_second[class.index()]),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let energy = line_chart(
            "Compute power drawn (kW) and its cost ($ per hour)",
            &hours,
            &[
                Line::new("kW", series(&|h| h.kw)),
                Line::new("$ per hour", series(&|h| h.energy_cost_per_hour)),
            ],
        );
        let o = &self.owners_per_month;
        let earnings = bar_chart(
            "An owner's month ($): p10, p50, p90 across vehicles",
            &["p10", "p50", "p90"],
            &[
                (
                    "revenue share",
                    [
                        o.revenue_share.p10,
                        o.revenue_share.p50,
                        o.revenue_share.p90,
                    ],
                ),
                (
                    "energy reimbursed",
                    [
                        o.energy_reimbursed.p10,
                        o.energy_reimbursed.p50,
                        o.energy_reimbursed.p90,
                    ],
                ),
                (
                    "grid payments",
                    [
                        o.grid_payments.p10,
                        o.grid_payments.p50,
                        o.grid_payments.p90,
                    ],
                ),
            ],
        );
        vec![
            ("capacity.svg", capacity),
            ("tokens.svg", tokens),
            ("energy.svg", energy),
            ("earnings.svg", earnings),
        ]
    }

    /// The Markdown page.
    pub fn markdown(&self) -> String {
        crate::page::markdown(self)
    }
}

/// Every simulated hour from the step series.
fn hourly(outcome: &Outcome) -> Vec<HourFigures> {
    let per_hour = (3_600_000 / outcome.step_ms).max(1) as usize;
    let total_slots = outcome.total_slots.max(1) as f64;
    let vehicles = f64::from(outcome.options.vehicles).max(1.0);
    outcome
        .series
        .chunks(per_hour)
        .enumerate()
        .map(|(hour, points)| {
            let n = points.len() as f64;
            let mean =
                |f: &dyn Fn(&crate::stats::StepPoint) -> f64| points.iter().map(f).sum::<f64>() / n;
            let seconds = n * outcome.step_ms as f64 / 1_000.0;
            let tokens = [0, 1, 2]
                .map(|class| round3(points.iter().map(|p| p.tokens[class]).sum::<f64>() / seconds));
            HourFigures {
                hour: hour as u32,
                plugged_share: round3(mean(&|p| f64::from(p.plugged_vehicles)) / vehicles),
                available_share: round3(mean(&|p| p.available_slots as f64) / total_slots),
                busy_share: round3(mean(&|p| p.busy_slots as f64) / total_slots),
                waiting_requests: round3(mean(&|p| p.waiting_requests as f64)),
                tokens_per_second: tokens,
                kw: round3(points.iter().map(|p| p.energy_wh).sum::<f64>() / seconds * 3.6),
                energy_cost_per_hour: round3(
                    points.iter().map(|p| p.energy_cost).sum::<f64>() / seconds * 3_600.0,
                ),
            }
        })
        .collect()
}

/// The average day: hour `h` of every simulated day, averaged.
fn day_profile(hours: &[HourFigures]) -> Vec<HourFigures> {
    (0..24u32)
        .map(|hour| {
            let same: Vec<&HourFigures> = hours.iter().filter(|h| h.hour % 24 == hour).collect();
            let n = same.len().max(1) as f64;
            let mean = |f: &dyn Fn(&HourFigures) -> f64| {
                round3(same.iter().map(|h| f(h)).sum::<f64>() / n)
            };
            HourFigures {
                hour,
                plugged_share: mean(&|h| h.plugged_share),
                available_share: mean(&|h| h.available_share),
                busy_share: mean(&|h| h.busy_share),
                waiting_requests: mean(&|h| h.waiting_requests),
                tokens_per_second: [0, 1, 2].map(|c| mean(&|h| h.tokens_per_second[c])),
                kw: mean(&|h| h.kw),
                energy_cost_per_hour: mean(&|h| h.energy_cost_per_hour),
            }
        })
        .collect()
}
