//! The Markdown report of a run.

use std::fmt::Write;

use crate::report::Report;

fn money(value: f64) -> String {
    if value.abs() >= 1_000.0 {
        format!("${:.0}", value)
    } else {
        format!("${:.2}", value)
    }
}

fn big(value: f64) -> String {
    if value >= 1e12 {
        format!("{:.2} T", value / 1e12)
    } else if value >= 1e9 {
        format!("{:.2} G", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1} k", value / 1e3)
    } else {
        format!("{value:.1}")
    }
}

fn share(value: f64) -> String {
    format!("{:.1} %", value * 100.0)
}

/// The page, chart images by their file names beside it.
pub fn markdown(report: &Report) -> String {
    let mut page = String::new();
    let run = &report.run;
    let _ = writeln!(
        page,
        "# fleetgrid sim: {} vehicles × {} days\n",
        run.vehicles, run.days
    );
    let _ = writeln!(page, "{}\n", run.about);
    let _ = writeln!(
        page,
        "Model `{}` on the vehicles, `{}` for escalations. Seed {}. One scheduled lease stands for \
         {} request(s) of its class served back to back (see docs/SIM.md); {} scheduler events, \
         {} world events.\n",
        run.model, run.cloud_model, run.seed, run.lease_requests, run.scheduler_events, run.world_events
    );
    page.push_str("## The fleet\n\n| class | vehicles | slots | tokens/s at full batch | W at full batch |\n|---|---|---|---|---|\n");
    for class in &report.fleet {
        let _ = writeln!(
            page,
            "| {} | {} | {} | {:.1} | {:.0} |",
            class.name,
            class.vehicles,
            class.slots,
            class.completion_tokens_per_second_at_full_batch,
            class.watts_at_full_batch
        );
    }
    page.push_str("\n## Delivered work\n\n| class | arrived | escalated | served by the fleet | refused | deadline missed | unfinished at the end | completion tokens/day | latency p50 / p90 / p99 (s) | queueing p50 / p99 (s) |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for class in &report.classes {
        let l = class.latency_seconds;
        let q = class.queueing_seconds;
        let _ = writeln!(
            page,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} / {} |",
            class.class,
            class.arrived,
            class.escalated,
            class.served,
            class.refused,
            class.deadline_missed,
            class.unfinished,
            big(class.fleet_completion_tokens as f64 / f64::from(run.days)),
            l.p50,
            l.p90,
            l.p99,
            q.p50,
            q.p99
        );
    }
    let refusals: Vec<String> = report
        .classes
        .iter()
        .filter(|class| class.refused > 0)
        .map(|class| {
            let reasons: Vec<String> = class
                .refused_by_reason
                .iter()
                .map(|(reason, count)| format!("{reason} {count}"))
                .collect();
            format!("{}: {}", class.class, reasons.join(", "))
        })
        .collect();
    if !refusals.is_empty() {
        let _ = writeln!(page, "\nRefused, by reason: {}.", refusals.join("; "));
    }
    let d = &report.delivered_tokens_per_day;
    let _ = writeln!(
        page,
        "\nCompletion tokens per day: {} on the vehicles, {} in the cloud; {} of requests escalated.\n",
        big(d.all_classes_on_vehicles),
        big(d.cloud),
        share(report.escalated_share)
    );
    let m = &report.migrations;
    let _ =
        writeln!(
        page,
        "**Migrations:** {:.2} per 1,000 requests ({} in all): departures {:.2}, draining before \
         a departure or an owner's limit {:.2}, preemption by a higher class {:.2}.\n",
        m.per_1000_requests, m.total, m.departed_per_1000, m.draining_per_1000, m.preempted_per_1000
    );
    let u = &report.utilisation;
    let _ = writeln!(
        page,
        "## Capacity and utilisation\n\n{} slots in the fleet. Taking work: {} on average \
         (from {} to {}). Busy: {} of the slots taking work, {} of all slots.\n\n\
         ![slots over the day](capacity.svg)\n\n![tokens by class](tokens.svg)\n",
        u.total_slots,
        share(u.available_mean),
        share(u.available_low),
        share(u.available_peak),
        share(u.busy_of_available),
        share(u.busy_of_all)
    );
    let e = &report.energy;
    let _ = writeln!(
        page,
        "## Energy\n\n{:.1} kWh of compute, {} at the owners' tariffs: {:.3} kWh and {} per \
         million completion tokens.\n\n![power and its cost](energy.svg)\n",
        e.kwh,
        money(e.cost_dollars),
        e.kwh_per_million_tokens,
        money(e.cost_per_million_tokens)
    );
    let mf = &report.money;
    let _ = writeln!(
        page,
        "## Money (production settlement)\n\n| | $ |\n|---|---|\n\
         | tenants charged (fleet / reserved / spot) | {} / {} / {} |\n\
         | of which for escalations | {} |\n\
         | owners' revenue share | {} |\n\
         | owners' energy reimbursed | {} |\n\
         | cloud upstream cost | {} |\n\
         | **platform margin** | **{}** ({}) |\n\
         | grid programme payments to owners | {} |\n",
        money(mf.charged_fleet),
        money(mf.charged_reserved),
        money(mf.charged_spot),
        money(mf.charged_for_cloud),
        money(mf.owners_revenue_share),
        money(mf.owners_energy_reimbursed),
        money(mf.cloud_upstream_cost),
        money(mf.platform_margin),
        share(mf.platform_margin_share),
        money(mf.grid_payments)
    );
    let o = &report.owners_per_month;
    page.push_str("## An owner's month\n\n| per vehicle and month | p10 | p50 | p90 | mean |\n|---|---|---|---|---|\n");
    for (name, spread) in [
        ("revenue share", &o.revenue_share),
        ("energy reimbursed", &o.energy_reimbursed),
        ("grid payments", &o.grid_payments),
        ("electricity cost at their tariff", &o.energy_cost),
        ("**kept** (revenue share + grid)", &o.net),
    ] {
        let _ = writeln!(
            page,
            "| {name} | {} | {} | {} | {} |",
            money(spread.p10),
            money(spread.p50),
            money(spread.p90),
            money(spread.mean)
        );
    }
    page.push_str("\n![owner earnings](earnings.svg)\n\n");
    let c = &report.cost_per_million_tokens;
    let _ = writeln!(
        page,
        "## Against the datacenter\n\nPer million completion tokens served by the fleet: \
         electricity {}, paid to owners (share and energy) {}, charged to tenants {}. Baseline: {} \
         at {} per million tokens. Electricity alone is {:.2}× the baseline; what owners are paid \
         is {:.2}× it.\n",
        money(c.fleet_electricity),
        money(c.fleet_paid_to_owners),
        money(c.fleet_price_charged),
        c.baseline_name,
        money(c.baseline),
        c.electricity_vs_baseline,
        c.paid_to_owners_vs_baseline
    );
    let p = &report.premise;
    let _ = writeln!(
        page,
        "## At {} vehicles of this mix\n\nCompute installed {:.1} GW; taking work {:.1} GW on \
         average (peak {:.1} GW); drawn {:.2} GW on average; {} completion tokens a day at this \
         demand per vehicle.\n",
        big(p.vehicles),
        p.compute_gw_installed,
        p.compute_gw_available_mean,
        p.compute_gw_available_peak,
        p.compute_gw_drawn_mean,
        big(p.tokens_per_day)
    );
    let k = &report.checks;
    let _ = writeln!(
        page,
        "## Checks\n\nScheduler anomalies seen by the world: {}. Stale events: {}. Settlement \
         failures: {}. Scheduler memory: {:.1} MiB.",
        if k.anomalies.is_empty() {
            "none".to_owned()
        } else {
            format!("{:?}", k.anomalies)
        },
        k.stale_events,
        k.settlement_failures,
        k.scheduler_memory_bytes as f64 / (1024.0 * 1024.0)
    );
    page
}
