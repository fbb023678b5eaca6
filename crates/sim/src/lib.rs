//! `fleetgrid sim`: a fleet of simulated vehicles, a day or a month of their
//! owners' parking and charging, tenants' demand, tariffs and grid events,
//! placed by the production `scheduler` in simulated time and paid through
//! the production settlement code; and the report that answers what the
//! fleet delivers, costs and pays.
//!
//! - `scenario`: the inputs, read from JSON, every default with its source;
//! - `model`: speed, power, work and tariffs as the run uses them;
//! - `fleet`: each vehicle's traits and daily plug-in sessions;
//! - `world`: vehicles, leases and the event agenda;
//! - `run`: the event loop around `scheduler::Scheduler`;
//! - `settle`: money through `ledger::settlement::settle`;
//! - `stats`, `report`, `page`, `svg`: what is counted and how it is shown;
//! - `sweep`: the grid of `--sweep`;
//! - `validate`: the scenario, traces, requests and comparison of
//!   `--validate`, the run through real processes.
//!
//! **Invariant:** the same scenario, vehicles, days and seed give the same
//! report, byte for byte. Nothing here reads a clock or the environment;
//! timing and memory of a run are measured by the caller.

pub mod fleet;
pub mod model;
mod page;
pub mod report;
pub mod run;
pub mod scenario;
mod settle;
pub mod stats;
mod svg;
pub mod sweep;
pub mod validate;
pub mod world;

pub use report::Report;
pub use run::{Options, Outcome, Recorded, Recording, Run, RunError, Window};
pub use scenario::{Scenario, ScenarioError, DEFAULT_SCENARIO_JSON};

/// Runs `scenario` and reports it.
pub fn simulate(
    scenario: &Scenario,
    prices: &ledger::price_file::PriceConfig,
    options: Options,
) -> Result<Report, RunError> {
    let outcome = Run::new(scenario, prices, options)?.run();
    Ok(Report::new(scenario, &outcome))
}
