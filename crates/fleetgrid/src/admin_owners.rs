//! The operator's tools for vehicle owners: `owners` (create, keys, list)
//! and `policy` (show or change a vehicle's owner policy).
//!
//! Like `tenants` and `nodes`, these write the coordinator's database
//! directly; a running coordinator picks policy changes up within a second
//! (`store::changes`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use coordinator::owner_policy::{self, PolicyUpdate, PolicyView};
use coordinator::{billing, billing_accounts};
use ledger::core::AccountId;

use crate::admin::{now_ms, open_store};
use crate::home;

#[derive(Subcommand)]
pub enum OwnersCommand {
    /// Create a vehicle owner and their ledger account; prints their owner
    /// API key (shown once) on the last line.
    Create {
        name: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The ledger: a SQLite file or postgres://USER@HOST/DB [default: ledger.db in the data directory].
        #[arg(long, env = "FLEETGRID_LEDGER_URL")]
        ledger_url: Option<String>,
    },
    /// Issue another owner API key.
    Key {
        name: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Owners and how many vehicles each owns.
    List {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

pub async fn owners(command: OwnersCommand) -> anyhow::Result<()> {
    match command {
        OwnersCommand::Create {
            name,
            data_dir,
            ledger_url,
        } => {
            let store = open_store(data_dir.clone()).await?;
            let (owner, key) = store.create_owner(&name, now_ms()).await?;
            // The owner's vehicles' earnings are credited to this account,
            // keyed by the owner's id (the name may change, the id not).
            let ledger =
                billing::open_ledger(ledger_url.as_deref(), &home::coordinator_dir(data_dir))
                    .await?;
            let now = ledger::core::TimestampMs(now_ms());
            billing_accounts::migrate_ledger(&store, &ledger, now).await?;
            ledger
                .open_account(&AccountId::Owner(billing_accounts::owner_key(owner.id)))
                .await
                .context("open the owner's ledger account")?;
            eprintln!(
                "created owner {}; their owner API key, shown once:",
                owner.name
            );
            println!("{key}");
        }
        OwnersCommand::Key { name, data_dir } => {
            let store = open_store(data_dir).await?;
            let key = store.create_owner_key(&name, now_ms()).await?;
            println!("{key}");
        }
        OwnersCommand::List { data_dir } => {
            let store = open_store(data_dir).await?;
            println!("{:<6} {:<24} vehicles", "id", "name");
            for (owner, vehicles) in store.list_owners().await? {
                println!("{:<6} {:<24} {vehicles}", owner.id, owner.name);
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Print a vehicle's owner policy as JSON.
    Show {
        #[arg(long)]
        node: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Change a vehicle's owner policy; options left out keep their value.
    Set(PolicySetArgs),
}

#[derive(clap::Args)]
pub struct PolicySetArgs {
    #[arg(long)]
    node: String,
    /// Also compute while unplugged, above the state-of-charge thresholds.
    #[arg(long)]
    compute_when_unplugged: Option<bool>,
    /// Unplugged: stop at or below this state of charge, percent.
    #[arg(long)]
    stop_soc: Option<f64>,
    /// Unplugged: resume at or above this state of charge, percent.
    #[arg(long)]
    resume_soc: Option<f64>,
    /// Allowed hours of the owner's local day: all, none, or e.g. 22-6,12.
    #[arg(long)]
    hours: Option<String>,
    /// The owner's local time minus UTC, minutes.
    #[arg(long, allow_negative_numbers = true)]
    utc_offset_minutes: Option<i64>,
    /// Energy the compute may use per local day, kWh, or "none".
    #[arg(long)]
    max_kwh_per_day: Option<String>,
    /// No work above this chip temperature, °C.
    #[arg(long)]
    max_temperature_c: Option<f64>,
    /// No new work this many minutes before a scheduled departure.
    #[arg(long)]
    stop_before_departure_min: Option<i64>,
    /// Tenant classes the car works for, comma-separated: fleet,reserved,spot (or none).
    #[arg(long)]
    classes: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl PolicySetArgs {
    fn update(&self) -> anyhow::Result<PolicyUpdate> {
        let energy = match self.max_kwh_per_day.as_deref() {
            None => None,
            Some("none") => Some(None),
            Some(kwh) => Some(Some(kwh.parse::<f64>().with_context(|| {
                format!("--max-kwh-per-day {kwh:?} is not a number or \"none\"")
            })?)),
        };
        let classes = self.classes.as_deref().map(|text| match text.trim() {
            "none" | "" => Vec::new(),
            list => list
                .split(',')
                .map(|name| name.trim().to_string())
                .collect(),
        });
        Ok(PolicyUpdate {
            compute_when_unplugged: self.compute_when_unplugged,
            unplugged_stop_soc_percent: self.stop_soc,
            unplugged_resume_soc_percent: self.resume_soc,
            allowed_hours: self
                .hours
                .as_deref()
                .map(owner_policy::parse_hours)
                .transpose()?,
            utc_offset_minutes: self.utc_offset_minutes,
            max_energy_per_day_kwh: energy,
            max_chip_temperature_c: self.max_temperature_c,
            stop_before_departure_minutes: self.stop_before_departure_min,
            allowed_classes: classes,
        })
    }
}

pub async fn policy(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Show { node, data_dir } => {
            let store = open_store(data_dir).await?;
            let policy = store.node_policy(&node).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&PolicyView::of(&policy))?
            );
        }
        PolicyCommand::Set(args) => {
            let update = args.update()?;
            if update == PolicyUpdate::default() {
                bail!("nothing to change; see 'fleetgrid policy set --help'");
            }
            let store = open_store(args.data_dir.clone()).await?;
            let current = store.node_policy(&args.node).await?;
            let policy = owner_policy::apply(&current, &update)?;
            store.set_node_policy(&args.node, &policy, now_ms()).await?;
            eprintln!("policy of {} changed:", args.node);
            println!(
                "{}",
                serde_json::to_string_pretty(&PolicyView::of(&policy))?
            );
        }
    }
    Ok(())
}
