//! `fleetgrid sim`: runs the fleet simulator (crate `sim`) and writes its
//! report, JSON and charts; `--sweep` runs its grid instead.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

use sim::scenario::SCENARIO_BYTES_MAX;
use sim::{Options, Report, Scenario};

/// Vehicles simulated unless `--vehicles` says.
const VEHICLES_DEFAULT: u32 = 10_000;
/// Vehicles of a validation run unless `--vehicles` says (each may start an
/// agent on this machine).
const VALIDATION_VEHICLES_DEFAULT: u32 = 20;

#[derive(clap::Args)]
pub struct SimArgs {
    /// The scenario (JSON) [default: the shipped one; `--show-scenario` prints it].
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Simulated vehicles [default: 10,000; 20 with --validate].
    #[arg(long)]
    vehicles: Option<u32>,
    /// Simulated days.
    #[arg(long, default_value_t = 1)]
    days: u32,
    /// The seed of every random draw; the same seed gives the same sim.json.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where report.md, sim.json and the charts are written.
    #[arg(long, required_unless_present = "show_scenario")]
    out: Option<PathBuf>,
    /// A price file [default: the shipped price sheet].
    #[arg(long)]
    prices: Option<PathBuf>,
    /// Run the grid of batching, power draw, tariff and plug-in behaviour
    /// instead (sweep.md, sweep.json, frontier.svg).
    #[arg(long)]
    sweep: bool,
    /// Print the shipped scenario, with the source of every default, and exit.
    #[arg(long)]
    show_scenario: bool,
    /// Run a window of the scenario through real processes (a coordinator,
    /// one agent per vehicle replaying its sessions, a client replaying the
    /// requests) beside the simulator, and compare delivered tokens,
    /// migrations and owner earnings (validation.md, validation.json).
    #[arg(long, conflicts_with = "sweep")]
    validate: bool,
    /// With --validate: minutes of requests.
    #[arg(long, requires = "validate", default_value_t = 15)]
    minutes: u32,
    /// With --validate: minutes after the last request for work to end.
    #[arg(long, requires = "validate", default_value_t = 3)]
    drain_minutes: u32,
    /// With --validate: the window's start, as minutes after midnight of the scenario's day.
    #[arg(long, requires = "validate", default_value_t = 19 * 60)]
    start_minute: u32,
    /// With --validate: generations running at once on average; demand is scaled to it, since
    /// every agent shares this machine's cores.
    #[arg(long, requires = "validate", default_value_t = 1.0)]
    busy: f64,
    /// With --validate: the model the agents serve.
    #[arg(long, requires = "validate", default_value = "smollm2-135m-instruct")]
    model: String,
    /// With --validate: engine threads per agent.
    #[arg(long, requires = "validate", default_value_t = 1)]
    threads: u32,
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    if args.show_scenario {
        print!("{}", sim::DEFAULT_SCENARIO_JSON);
        return Ok(());
    }
    let out = args.out.clone().expect("clap requires --out");
    let scenario = read_scenario(args.scenario.as_deref())?;
    if args.validate {
        if args.days != 1 {
            bail!("--validate runs a window of one day (--minutes); --days does not apply");
        }
        let validate = crate::sim_validate::ValidateArgs {
            vehicles: args.vehicles.unwrap_or(VALIDATION_VEHICLES_DEFAULT),
            seed: args.seed,
            out,
            model: args.model,
            threads: args.threads,
            start_minute: args.start_minute,
            minutes: args.minutes,
            drain_minutes: args.drain_minutes,
            busy: args.busy,
            prices: args.prices,
        };
        return crate::sim_validate::run(scenario, validate).await;
    }
    let prices = crate::ledger_cmd::price_config(args.prices.as_deref())?;
    let vehicles = args.vehicles.unwrap_or(VEHICLES_DEFAULT);
    let options = Options::days(vehicles, args.days, args.seed);
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let sweep = args.sweep;
    tokio::task::spawn_blocking(move || {
        if sweep {
            run_sweep(&scenario, &prices, options, &out)
        } else {
            run_once(&scenario, &prices, options, &out)
        }
    })
    .await
    .context("the simulation task")?
}

fn read_scenario(path: Option<&Path>) -> anyhow::Result<Scenario> {
    let Some(path) = path else {
        return Ok(Scenario::default_scenario());
    };
    let text = crate::ledger_cmd::read_at_most(path, SCENARIO_BYTES_MAX, "scenario")?;
    Scenario::parse(&text).with_context(|| format!("scenario {}", path.display()))
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
}

fn run_once(
    scenario: &Scenario,
    prices: &ledger::price_file::PriceConfig,
    options: Options,
    out: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let outcome = sim::Run::new(scenario, prices, options)?.run();
    let seconds = started.elapsed().as_secs_f64();
    let report = Report::new(scenario, &outcome);
    write(out, "sim.json", &report.to_json())?;
    write(out, "report.md", &report.markdown())?;
    for (name, svg) in report.charts() {
        write(out, name, &svg)?;
    }
    let events = report.run.scheduler_events + report.run.world_events;
    let peak_rss = peak_rss_bytes();
    // Timing and memory differ from run to run, so they stay out of sim.json.
    let timing = serde_json::json!({
        "vehicles": options.vehicles,
        "days": options.days,
        "seconds": seconds,
        "scheduler_events": report.run.scheduler_events,
        "world_events": report.run.world_events,
        "events_per_second": events as f64 / seconds.max(1e-9),
        "peak_rss_bytes": peak_rss,
    });
    write(out, "timing.json", &format!("{timing:#}\n"))?;
    println!(
        "simulated {} vehicles x {} days in {seconds:.1} s ({events} events, {:.0} events/s, peak memory {:.0} MiB)",
        options.vehicles,
        options.days,
        events as f64 / seconds.max(1e-9),
        peak_rss.unwrap_or(0) as f64 / (1024.0 * 1024.0),
    );
    let cost = &report.cost_per_million_tokens;
    println!(
        "fleet tokens/day {:.0}; electricity ${:.3}/M tokens against {} ${:.3}/M; owner p50 ${:.2}/month; migrations {:.2} per 1,000 requests",
        report.delivered_tokens_per_day.all_classes_on_vehicles,
        cost.fleet_electricity,
        cost.baseline_name,
        cost.baseline,
        report.owners_per_month.net.p50,
        report.migrations.per_1000_requests,
    );
    if !report.checks.anomalies.is_empty() || report.checks.settlement_failures > 0 {
        bail!(
            "the run saw scheduler anomalies {:?} and {} settlement failures ({}); see {}",
            report.checks.anomalies,
            report.checks.settlement_failures,
            report
                .checks
                .first_settlement_failure
                .as_deref()
                .unwrap_or("none"),
            out.join("report.md").display()
        );
    }
    println!("report: {}", out.join("report.md").display());
    Ok(())
}

fn run_sweep(
    scenario: &Scenario,
    prices: &ledger::price_file::PriceConfig,
    options: Options,
    out: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let sweep = sim::sweep::sweep(scenario, prices, options)?;
    write(out, "sweep.json", &sweep.to_json())?;
    write(out, "sweep.md", &sweep.markdown())?;
    write(out, "frontier.svg", &sweep.chart())?;
    let beating = sweep.points.iter().filter(|p| p.beats_baseline).count();
    println!(
        "{} grid points in {:.1} s; {beating} beat the baseline on electricity; report: {}",
        sweep.points.len(),
        started.elapsed().as_secs_f64(),
        out.join("sweep.md").display()
    );
    Ok(())
}

/// The process's peak resident memory (Linux `VmHWM`), if known.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
