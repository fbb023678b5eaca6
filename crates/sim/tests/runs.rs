//! Whole runs of the simulator on small fleets: what a user of its numbers
//! relies on — equal seeds agree byte for byte, every request is accounted
//! for, money balances, and the scheduler's promises (owners' classes,
//! departures, grid events) show in the figures.

use ledger::price_file::PriceConfig;
use sim::{simulate, Options, Report, Scenario};

fn options(vehicles: u32, seed: u64) -> Options {
    Options::days(vehicles, 1, seed)
}

fn run(scenario: &Scenario, options: Options) -> Report {
    let prices = PriceConfig::default_sheet().expect("the shipped prices");
    simulate(scenario, &prices, options).expect("the run starts")
}

fn small() -> Scenario {
    let mut scenario = Scenario::default_scenario();
    // One request per lease, so that request-level figures are exact.
    scenario.demand.lease_requests = 1;
    scenario
}

#[test]
fn equal_seeds_give_the_same_report_byte_for_byte_and_other_seeds_do_not() {
    let scenario = small();
    let first = run(&scenario, options(300, 7)).to_json();
    let again = run(&scenario, options(300, 7)).to_json();
    assert_eq!(first, again);
    let other = run(&scenario, options(300, 8)).to_json();
    assert_ne!(first, other);
}

#[test]
fn every_request_is_accounted_for_and_the_money_balances() {
    let report = run(&small(), options(400, 3));
    assert!(
        report.checks.anomalies.is_empty(),
        "{:?}",
        report.checks.anomalies
    );
    assert_eq!(report.checks.settlement_failures, 0, "{:?}", report.checks);
    let mut served = 0;
    for class in &report.classes {
        assert!(class.arrived > 0, "{} had no demand", class.class);
        assert_eq!(
            class.arrived,
            class.escalated
                + class.served
                + class.refused
                + class.deadline_missed
                + class.unfinished,
            "{} requests unaccounted for: {class:?}",
            class.class
        );
        assert_eq!(
            class.refused,
            class.refused_by_reason.values().sum::<u64>(),
            "{} refusals not split by reason: {class:?}",
            class.class
        );
        served += class.served;
    }
    assert!(served > 0);
    // The small fleet is short of slots at its peak: some work is refused, so the split by
    // reason above had something to split.
    assert!(
        report.classes.iter().any(|class| class.refused > 0),
        "{:?}",
        report.classes
    );
    // The page says why: each refusing class with its reasons and counts.
    let page = report.markdown();
    for class in report.classes.iter().filter(|class| class.refused > 0) {
        let (reason, count) = class.refused_by_reason.iter().next().expect("split");
        assert!(
            page.contains(&format!("{}: {reason} {count}", class.class)),
            "{page}"
        );
    }
    let money = &report.money;
    assert!(money.charged_total > 0.0);
    let margin = money.charged_total
        - money.owners_revenue_share
        - money.owners_energy_reimbursed
        - money.cloud_upstream_cost;
    assert!((margin - money.platform_margin).abs() < 1e-6);
    // Owners get 70 % of what the fleet's tokens earned (rounded down per
    // settlement, so at most a micro-dollar less each).
    let fleet_charged = money.charged_total - money.charged_for_cloud;
    assert!(money.owners_revenue_share <= 0.7 * fleet_charged + 1e-6);
    assert!(money.owners_revenue_share > 0.69 * fleet_charged);
    assert!(report.energy.kwh > 0.0 && report.energy.cost_dollars > 0.0);
}

#[test]
fn owners_who_refuse_spot_work_never_serve_it() {
    let mut scenario = small();
    for policy in &mut scenario.owner_policies {
        policy.allowed_classes = vec!["fleet".into(), "reserved".into()];
    }
    let report = run(&scenario, options(200, 1));
    let spot = &report.classes[2];
    assert_eq!(spot.class, "spot");
    assert!(spot.arrived > 0);
    assert_eq!(spot.served, 0);
    assert_eq!(spot.fleet_completion_tokens, 0);
    assert!(report.classes[0].served > 0);
}

#[test]
fn announced_departures_drain_ahead_and_surprises_hand_over() {
    let mut announced = small();
    announced.departures.announced_share = 1.0;
    announced.departures.error_sd_minutes = 0.0;
    let report = run(&announced, options(300, 2));
    assert_eq!(report.migrations.departed, 0, "{:?}", report.migrations);
    assert!(report.migrations.draining > 0, "{:?}", report.migrations);

    let mut surprise = small();
    surprise.departures.announced_share = 0.0;
    let report = run(&surprise, options(300, 2));
    assert!(report.migrations.departed > 0, "{:?}", report.migrations);
    assert!(
        report.checks.anomalies.is_empty(),
        "{:?}",
        report.checks.anomalies
    );
}

#[test]
fn a_grid_event_pauses_the_enrolled_fleet_in_its_window_and_pays_them() {
    let mut scenario = small();
    let event = &mut scenario.grid_events[0];
    event.probability_per_day = 1.0;
    event.enrolled_share = 1.0;
    let report = run(&scenario, options(200, 4));
    for hour in 16..21 {
        let figures = &report.day_profile[hour];
        assert_eq!(figures.busy_share, 0.0, "busy at {hour}:00");
        assert_eq!(figures.tokens_per_second, [0.0; 3], "tokens at {hour}:00");
    }
    assert!(report.day_profile[15].busy_share > 0.0);
    assert!(report.money.grid_payments > 0.0);
    assert!(report.owners_per_month.grid_payments.p90 > 0.0);
}

#[test]
fn without_demand_nothing_is_served_or_paid() {
    let mut scenario = small();
    for class in &mut scenario.demand.classes {
        class.requests_per_vehicle_per_day = 0.0;
    }
    let report = run(&scenario, options(100, 1));
    assert!(report.classes.iter().all(|c| c.arrived == 0));
    assert_eq!(report.money.charged_total, 0.0);
    assert_eq!(report.energy.kwh, 0.0);
    assert!(report.utilisation.available_mean > 0.0);
}

#[test]
fn a_lease_of_many_requests_keeps_the_totals_of_single_requests() {
    let single = run(&small(), options(300, 5));
    let mut scenario = small();
    scenario.demand.lease_requests = 8;
    let leased = run(&scenario, options(300, 5));
    let arrived = |r: &Report| r.classes.iter().map(|c| c.arrived).sum::<u64>() as f64;
    let tokens = |r: &Report| r.delivered_tokens_per_day.all_classes_on_vehicles;
    assert!((arrived(&leased) / arrived(&single) - 1.0).abs() < 0.1);
    assert!((tokens(&leased) / tokens(&single) - 1.0).abs() < 0.15);
}

#[test]
fn the_world_reports_nothing_about_work_the_scheduler_has_ended() {
    // Long leases and short deadlines: leases are moved off departing cars long after their
    // deadline to start. They started, so they go on elsewhere, and everything the world
    // reports of their stopped attempts reaches a scheduler that still knows them.
    let mut scenario = Scenario::default_scenario();
    scenario.demand.lease_requests = 200;
    for class in &mut scenario.demand.classes {
        class.deadline_seconds = 120;
    }
    let report = run(&scenario, options(500, 3));
    assert!(report.migrations.departed > 0, "{:?}", report.migrations);
    assert_eq!(report.checks.stale_events, 0, "{:?}", report.checks);
}
