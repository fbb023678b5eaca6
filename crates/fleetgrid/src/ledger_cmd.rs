//! The operator's money tools: `fleetgrid billing` (tenants' prepaid
//! balances, credit limits and daily caps) and `fleetgrid ledger` (verify,
//! balances, owner statements, payouts, invoices, meter flags).
//!
//! Both open the same ledger as `fleetgrid serve` (`--ledger-url`, default
//! `ledger.db` in the data directory) and may run while it serves. The
//! ledger keys accounts by tenant, owner and node ids; these commands take
//! and show the names the coordinator's database gives them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use coordinator::billing::{self, BillingConfig};
use coordinator::billing_accounts::{self, AccountNames};
use coordinator::store::Store;
use ledger::core::{
    AccountId, Instrument, MicroUsd, NodeId, Outcome, RequestId, TenantId, TimestampMs,
};
use ledger::payout::{PayoutAmount, PayoutOrder};
use ledger::price_file::{PriceConfig, PRICE_FILE_BYTES_MAX};
use ledger::pricing::TenantClass;
use ledger::statement::Period;
use ledger::store::Store as Ledger;

use crate::home;

/// Where the ledger is.
#[derive(Args, Clone)]
pub struct LedgerArgs {
    /// The coordinator's data directory [default: $FLEETGRID_HOME/coordinator].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A SQLite file or postgres://USER@HOST/DB [default: ledger.db in the data directory].
    #[arg(long, env = "FLEETGRID_LEDGER_URL")]
    ledger_url: Option<String>,
}

impl LedgerArgs {
    /// Opens the ledger, first moving a ledger keyed by names to id keys
    /// (once; see `billing_accounts`).
    pub(crate) async fn open(&self) -> anyhow::Result<Ledger> {
        let dir = home::coordinator_dir(self.data_dir.clone());
        let ledger = billing::open_ledger(self.ledger_url.as_deref(), &dir).await?;
        let store = self.coordinator_store().await?;
        billing_accounts::migrate_ledger(&store, &ledger, now()).await?;
        Ok(ledger)
    }

    /// The names of the ledger's accounts, from the coordinator's database.
    async fn names(&self) -> anyhow::Result<AccountNames> {
        let store = self.coordinator_store().await?;
        Ok(AccountNames::load(&store).await?)
    }

    pub(crate) async fn coordinator_store(&self) -> anyhow::Result<Store> {
        crate::admin::open_store(self.data_dir.clone()).await
    }

    /// The ledger's id and class of a tenant named in the coordinator.
    async fn tenant(&self, name: &str) -> anyhow::Result<(TenantId, TenantClass)> {
        let store = self.coordinator_store().await?;
        let record = store
            .tenant_by_name(name)
            .await?
            .with_context(|| format!("no tenant named {name:?} (see 'fleetgrid tenants list')"))?;
        Ok((billing::ledger_tenant(&record), record.class))
    }
}

#[derive(Subcommand)]
pub enum BillingCommand {
    /// Credit a tenant's prepaid balance (idempotent per --reference).
    Topup {
        #[arg(long)]
        tenant: String,
        /// Dollars, e.g. 25.00.
        #[arg(long)]
        amount: String,
        /// The payment's reference (receipt number); a repeat credits once.
        #[arg(long)]
        reference: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Let a tenant owe up to a limit (0 makes it prepaid), or without limit.
    Credit {
        #[arg(long)]
        tenant: String,
        /// Dollars the tenant may owe.
        #[arg(long, required_unless_present = "unlimited")]
        limit: Option<String>,
        #[arg(long, conflicts_with = "limit")]
        unlimited: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Set a tenant's daily spend cap (UTC days), or remove it.
    Cap {
        #[arg(long)]
        tenant: String,
        /// Dollars per day.
        #[arg(long, required_unless_present = "none")]
        daily: Option<String>,
        #[arg(long, conflicts_with = "daily")]
        none: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// A tenant's balance, credit, daily cap and spend today.
    Show {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
}

fn dollars(text: &str, what: &str) -> anyhow::Result<MicroUsd> {
    match MicroUsd::parse_usd(text) {
        Some(amount) => Ok(amount),
        None => bail!("{what} must be dollars with at most six decimals, e.g. 12.50; got {text:?}"),
    }
}

fn now() -> TimestampMs {
    coordinator::core::now_ms()
}

pub async fn billing(command: BillingCommand) -> anyhow::Result<()> {
    match command {
        BillingCommand::Topup {
            tenant,
            amount,
            reference,
            ledger,
        } => {
            let amount = dollars(&amount, "--amount")?;
            let (tenant_id, class) = ledger.tenant(&tenant).await?;
            let store = ledger.open().await?;
            store
                .ensure_tenant(&tenant_id, class == TenantClass::Fleet)
                .await?;
            let reference = RequestId::new(format!("top-up:{reference}"))
                .context("--reference may hold ascii letters, digits and -_.@:/")?;
            let outcome = store.top_up(&tenant_id, amount, &reference, now()).await?;
            let state = store
                .account(&AccountId::Tenant(tenant_id.clone()))
                .await?
                .context("the tenant's account vanished")?;
            let what = match outcome {
                Outcome::Created => "credited",
                Outcome::Exists => "already credited (same reference)",
            };
            println!("{what} ${amount} to {tenant}; balance ${}", state.balance());
        }
        BillingCommand::Credit {
            tenant,
            limit,
            unlimited,
            ledger,
        } => {
            let (tenant_id, class) = ledger.tenant(&tenant).await?;
            let store = ledger.open().await?;
            store
                .ensure_tenant(&tenant_id, class == TenantClass::Fleet)
                .await?;
            if unlimited {
                store.set_unlimited_credit(&tenant_id).await?;
                println!("{tenant} may now owe without limit");
            } else {
                let limit = dollars(limit.as_deref().unwrap_or_default(), "--limit")?;
                store.set_credit_limit(&tenant_id, limit).await?;
                println!("{tenant} may now owe up to ${limit}");
            }
        }
        BillingCommand::Cap {
            tenant,
            daily,
            none,
            ledger,
        } => {
            let (tenant_id, _) = ledger.tenant(&tenant).await?;
            let store = ledger.open().await?;
            let cap = match (daily, none) {
                (_, true) => None,
                (Some(daily), false) => Some(dollars(&daily, "--daily")?),
                (None, false) => bail!("give --daily DOLLARS or --none"),
            };
            store.set_daily_cap(&tenant_id, cap).await?;
            match cap {
                Some(cap) => println!("{tenant} may spend up to ${cap} per UTC day"),
                None => println!("{tenant} has no daily cap"),
            }
        }
        BillingCommand::Show { tenant, ledger } => {
            let (tenant_id, class) = ledger.tenant(&tenant).await?;
            let store = ledger.open().await?;
            let state = store
                .ensure_tenant(&tenant_id, class == TenantClass::Fleet)
                .await?;
            let today = Period {
                from: now().utc_day_start(),
                until: TimestampMs(now().utc_day_start().0 + TimestampMs::PER_DAY),
            };
            println!("tenant      {tenant} (class {class})");
            println!("balance     ${}", state.balance());
            match state.floor {
                Some(floor) => println!("credit      ${}", MicroUsd(-floor.0)),
                None => println!("credit      unlimited"),
            }
            match store.daily_cap(&tenant_id).await? {
                Some(cap) => println!("daily cap   ${cap}"),
                None => println!("daily cap   none"),
            }
            println!(
                "spent today ${}",
                store.tenant_spent(&tenant_id, today).await?
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Check that debits equal credits and every balance is explained by its
    /// transfers; exits non-zero on any problem.
    Verify {
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Every account's balance.
    Balances {
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// What a vehicle did and earned in a period.
    Statement {
        #[arg(long)]
        node: String,
        /// First UTC day, YYYY-MM-DD.
        #[arg(long)]
        from: String,
        /// UTC day after the last, YYYY-MM-DD.
        #[arg(long)]
        to: String,
        #[arg(long)]
        csv: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Pay an owner's balance out in an instrument; never beyond the balance,
    /// and a repeated --id pays once.
    Payout {
        /// The owner to pay (or --node for the owner of a vehicle).
        #[arg(long, required_unless_present = "node")]
        owner: Option<String>,
        #[arg(long, conflicts_with = "owner")]
        node: Option<String>,
        /// cash, charging-kwh, subscription or ride.
        #[arg(long)]
        instrument: String,
        /// Dollars of balance to convert, or "all".
        #[arg(long)]
        amount: String,
        /// The payout's id; retrying with the same id pays once.
        #[arg(long)]
        id: String,
        /// The price sheet holding the payout rates [default: the shipped sheet].
        #[arg(long)]
        prices: Option<PathBuf>,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// A tenant's invoice for a month, matching the ledger to the micro-dollar.
    Invoice {
        #[arg(long)]
        tenant: String,
        /// YYYY-MM (UTC).
        #[arg(long)]
        month: String,
        /// One line per request instead of per model.
        #[arg(long)]
        csv: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Node reports that disagreed with the coordinator's count.
    Flags {
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
}

pub async fn ledger(command: LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Verify { ledger } => {
            let store = ledger.open().await?;
            let report = ledger::store::verify(&store).await?;
            for problem in &report.problems {
                println!("PROBLEM {problem}");
            }
            println!(
                "{} accounts, {} transfers, volume ${}",
                report.accounts,
                report.transfers,
                volume(report.volume_micro_usd)
            );
            for (owner, owed) in &report.owed_by_owners {
                println!("owed by owner {owner}: ${owed} (clawed back after a payout)");
            }
            if !report.is_ok() {
                bail!(
                    "the ledger failed verification with {} problem(s)",
                    report.problems.len()
                );
            }
            println!("ok: debits equal credits and every balance is explained by its transfers");
        }
        LedgerCommand::Balances { ledger } => {
            let store = ledger.open().await?;
            let names = ledger.names().await?;
            println!(
                "{:<48} {:>18} {:>18}",
                "account", "balance usd", "floor usd"
            );
            for (account, state) in store.accounts().await? {
                let floor = state
                    .floor
                    .map_or_else(|| "none".to_string(), |floor| floor.to_string());
                println!(
                    "{:<48} {:>18} {:>18}",
                    names.label(&account),
                    state.balance().to_string(),
                    floor
                );
            }
        }
        LedgerCommand::Statement {
            node,
            from,
            to,
            csv,
            ledger,
        } => {
            let period = period(&from, &to)?;
            let node = NodeId::new(node.as_str()).context("--node")?;
            let store = ledger.open().await?;
            let statement = store.statement(&node, period).await?;
            let mut out = std::io::stdout().lock();
            if csv {
                let names = ledger.names().await?;
                statement.write_csv_named(&mut out, &|owner| names.owner(owner))?;
            } else {
                let t = &statement.totals;
                println!("statement of {node} from {from} until {to}");
                println!("requests              {}", t.requests);
                println!("prompt tokens         {}", t.prompt_tokens);
                println!("completion tokens     {}", t.completion_tokens);
                println!("compute hours         {}", t.compute.hours_string());
                println!("energy kwh            {}", t.energy.kwh_string());
                println!("revenue share         ${}", t.revenue_share);
                println!("energy reimbursement  ${}", t.energy_reimbursement);
                println!("checks of others      {}", t.checks);
                println!(
                    "verification pay      ${}",
                    ledger::core::MicroUsd(t.verification_pay.0 + t.verification_energy.0)
                );
                println!("earnings              ${}", t.earnings);
                println!("clawed back           ${}", t.clawed_back);
                println!("net earnings          ${}", t.net_earnings);
            }
        }
        LedgerCommand::Payout {
            owner,
            node,
            instrument,
            amount,
            id,
            prices,
            ledger,
        } => payout(owner, node, &instrument, &amount, &id, prices, &ledger).await?,
        LedgerCommand::Invoice {
            tenant,
            month,
            csv,
            ledger,
        } => {
            let (tenant_id, _) = ledger.tenant(&tenant).await?;
            let store = ledger.open().await?;
            let invoice = store.invoice(&tenant_id, &month).await?;
            let mut out = std::io::stdout().lock();
            if csv {
                let period = ledger::invoice::month_period(&month)?;
                let requests = store.tenant_requests(&tenant_id, period).await?;
                ledger::invoice::write_csv(&mut out, &invoice, &requests)?;
            } else {
                ledger::invoice::write_text(&mut out, &invoice, &tenant)?;
            }
        }
        LedgerCommand::Flags { node, ledger } => {
            let node = node.map(NodeId::new).transpose().context("--node")?;
            let store = ledger.open().await?;
            println!("request_id,segment,node,field,coordinator,node_reported,at_ms");
            for flag in store.meter_flags(node.as_ref()).await? {
                println!(
                    "{},{},{},{},{},{},{}",
                    flag.request_id,
                    flag.segment,
                    flag.node,
                    flag.field,
                    flag.coordinator,
                    flag.node_value,
                    flag.at.0
                );
            }
        }
    }
    Ok(())
}

fn volume(micro: i128) -> String {
    i64::try_from(micro).map_or_else(
        |_| format!("{micro} micro-usd"),
        |v| MicroUsd(v).to_string(),
    )
}

fn period(from: &str, to: &str) -> anyhow::Result<Period> {
    let day = |text: &str, flag: &str| {
        ledger::invoice::day_start(text)
            .with_context(|| format!("{flag} must be a date as YYYY-MM-DD, got {text:?}"))
    };
    let period = Period {
        from: day(from, "--from")?,
        until: day(to, "--to")?,
    };
    if period.until <= period.from {
        bail!("--to must be after --from");
    }
    Ok(period)
}

fn instrument(name: &str) -> anyhow::Result<Instrument> {
    Ok(match name {
        "cash" => Instrument::Cash,
        "charging-kwh" | "charging" | "charging-credit" => Instrument::ChargingCredit,
        "subscription" | "subscription-credit" => Instrument::SubscriptionCredit,
        "ride" | "ride-credit" => Instrument::RideCredit,
        other => {
            bail!("unknown instrument {other:?}; use cash, charging-kwh, subscription or ride")
        }
    })
}

async fn payout(
    owner: Option<String>,
    node: Option<String>,
    instrument_name: &str,
    amount: &str,
    id: &str,
    prices: Option<PathBuf>,
    ledger: &LedgerArgs,
) -> anyhow::Result<()> {
    let instrument = instrument(instrument_name)?;
    let store = ledger.coordinator_store().await?;
    let owner = match (owner, node) {
        (Some(owner), _) => {
            let record = store.owner_by_name(&owner).await?.with_context(|| {
                format!("no owner named {owner:?} (see 'fleetgrid owners list')")
            })?;
            billing_accounts::owner_key(record.id)
        }
        (None, Some(node)) => {
            let record = store
                .list_nodes()
                .await?
                .into_iter()
                .find(|record| record.name == node)
                .with_context(|| format!("no node named {node:?}"))?;
            billing_accounts::node_owner_key(&record)?
        }
        (None, None) => bail!("give --owner or --node"),
    };
    let owner_name = AccountNames::load(&store).await?.owner(&owner);
    let amount = match amount {
        "all" => PayoutAmount::All,
        dollars_text => PayoutAmount::UpTo(dollars(dollars_text, "--amount")?),
    };
    let config = price_config(prices.as_deref())?;
    let order = PayoutOrder {
        payout_id: RequestId::new(format!("payout:{id}"))
            .context("--id may hold ascii letters, digits and -_.@:/")?,
        owner: owner.clone(),
        instrument,
        amount,
        at: now(),
    };
    let store = ledger.open().await?;
    let receipt = store.pay_out(&order, &config.payout_rates).await?;
    let delivered = match instrument {
        Instrument::ChargingCredit => format!(
            "{}.{:03} kWh of charging credit",
            receipt.units / 1000,
            receipt.units % 1000
        ),
        Instrument::Cash => format!("${}.{:02} cash", receipt.units / 100, receipt.units % 100),
        Instrument::SubscriptionCredit => format!("{} cents of subscription credit", receipt.units),
        Instrument::RideCredit => format!("{} cents of ride credit", receipt.units),
    };
    let what = match receipt.outcome {
        Outcome::Created => "paid",
        Outcome::Exists => "already paid (same --id)",
    };
    let balance = store
        .account(&AccountId::Owner(owner.clone()))
        .await?
        .map_or(MicroUsd::ZERO, |state| state.balance());
    println!(
        "{what} {delivered} to {owner_name} for ${}; balance ${balance}",
        receipt.amount
    );
    Ok(())
}

/// The price sheet a file names, or the shipped one.
pub fn price_config(path: Option<&Path>) -> anyhow::Result<PriceConfig> {
    let Some(path) = path else {
        return Ok(PriceConfig::default_sheet()?);
    };
    let text = read_at_most(path, PRICE_FILE_BYTES_MAX, "price file")?;
    PriceConfig::parse_json(&text).with_context(|| format!("price file {}", path.display()))
}

/// A configuration file's text, refused unread when it is over `max` bytes.
pub fn read_at_most(path: &Path, max: usize, what: &str) -> anyhow::Result<String> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("read {what} {}", path.display()))?
        .len();
    if size > max as u64 {
        bail!("{what} {} is larger than {max} bytes", path.display());
    }
    std::fs::read_to_string(path).with_context(|| format!("read {what} {}", path.display()))
}

/// The billing configuration `fleetgrid serve` runs with.
pub fn billing_config(
    ledger_url: Option<String>,
    prices: Option<&Path>,
    owner_share_bps: Option<u32>,
) -> anyhow::Result<BillingConfig> {
    let mut config = price_config(prices)?;
    if let Some(share) = owner_share_bps {
        if share > 10_000 {
            bail!("--owner-share-bps must be at most 10000 (100 %)");
        }
        config.sheet.owner_share = ledger::core::BasisPoints(share);
    }
    Ok(BillingConfig {
        ledger_url,
        prices: Arc::new(config),
        holds: Default::default(),
    })
}
