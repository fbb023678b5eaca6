//! The cloud (system-2) tier from the command line: the `--cloud-*` options
//! of `fleetgrid serve`, `fleetgrid cloud serve` (a local OpenAI-compatible
//! "cloud" built on our own engine) and `fleetgrid cloud budget` (per-tenant
//! caps on cloud spend).
//!
//! The local cloud is the coordinator itself serving the cloud model, with
//! one in-process `datacenter` node that is always plugged in and never
//! leaves. Clients (and a gateway's cloud upstream) reach it over HTTP
//! exactly as they would reach a hosted provider.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use coordinator::cloud::{CloudBudgets, CloudConfig, Fallback, MicroUsd};
use coordinator::store::{Store, StoreError, TenantClass};

use crate::{home, run};

/// The model the local cloud serves unless told otherwise.
pub const LOCAL_CLOUD_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// The tenant whose key the local cloud prints, for the gateway that calls it.
const CLOUD_TENANT: &str = "cloud-client";

/// The local cloud's one node.
const CLOUD_NODE: &str = "datacenter";

/// How long the local cloud waits for its node to load the model.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// What the local cloud prints after its announcement, then the key.
const API_KEY_FIELD: &str = "api_key=";

/// The `--cloud-*` options of `fleetgrid serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct CloudArgs {
    /// The cloud model's OpenAI-compatible API root (e.g. https://api.example.com/v1);
    /// enables the models `auto` and `cloud/<model>`.
    #[arg(long)]
    cloud_url: Option<String>,
    /// The upstream's name for its model; clients ask for `cloud/<model>`, and the price
    /// sheet's `upstream` section must price it under that name.
    #[arg(long, default_value = LOCAL_CLOUD_MODEL)]
    cloud_model: String,
    /// Environment variable that holds the upstream's API key.
    #[arg(long)]
    cloud_key_env: Option<String>,
    /// Longest wait for the upstream's answer, and between chunks of its stream.
    #[arg(long, default_value_t = 30_000)]
    cloud_timeout_ms: u64,
    /// Upstream calls in flight at once; beyond it `cloud/...` gets 429 and `auto` stays on the fleet.
    #[arg(long, default_value_t = coordinator::limits::CLOUD_CONCURRENCY_DEFAULT)]
    cloud_concurrency: usize,
    /// What `cloud/...` does when the upstream fails: answer with an error, or let the fleet answer.
    #[arg(long, value_parser = ["error", "edge"], default_value = "error")]
    cloud_fallback: String,
    /// The model (catalog name or sha256 in the local store) whose chat template renders
    /// handoff prompts [default: the cloud model, if the local store has it].
    #[arg(long)]
    cloud_chat_template: Option<String>,
    /// The router's configuration (thresholds) as written by `fleetgrid router calibrate`.
    #[arg(long)]
    router_config: Option<PathBuf>,
    /// The upstream follows a `prediction` of token ids exactly, as `fleetgrid cloud serve`
    /// does: the exact cascade then checks a greedy draft in the call that answers, instead of
    /// scoring it (`echo`) and continuing in a second call.
    #[arg(long)]
    cloud_follows_predictions: bool,
}

impl CloudArgs {
    /// The coordinator's cloud configuration, or `None` without `--cloud-url`.
    pub fn config(&self) -> anyhow::Result<Option<CloudConfig>> {
        let Some(url) = &self.cloud_url else {
            return Ok(None);
        };
        let mut config = CloudConfig::new(url.clone(), self.cloud_model.clone());
        config.api_key_env = self.cloud_key_env.clone();
        config.timeout = Duration::from_millis(self.cloud_timeout_ms);
        config.concurrency_max = self.cloud_concurrency;
        config.fallback = match self.cloud_fallback.as_str() {
            "edge" => Fallback::Edge,
            _ => Fallback::Error,
        };
        config.router_config_file = self.router_config.clone();
        config.follows_predictions = self.cloud_follows_predictions;
        let store = home::model_store()?;
        config.chat_template_model = match &self.cloud_chat_template {
            Some(name) => Some(
                store
                    .resolve(name)
                    .with_context(|| format!("resolve the chat template model {name:?}"))?
                    .path,
            ),
            None => store
                .resolve(&self.cloud_model)
                .ok()
                .map(|model| model.path),
        };
        Ok(Some(config))
    }
}

#[derive(Subcommand)]
pub enum CloudCommand {
    /// Serve a cloud model on this machine as an OpenAI-compatible endpoint (a coordinator
    /// with one always-on datacenter node); prints its address and an API key.
    Serve(CloudServeArgs),
    /// Per-tenant caps on cloud spend.
    #[command(subcommand)]
    Budget(BudgetCommand),
}

#[derive(clap::Args, Clone)]
pub struct CloudServeArgs {
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:9090")]
    http_listen: SocketAddr,
    /// Where the local cloud keeps its database [default: $FLEETGRID_HOME/cloud].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The model to serve, by catalog name or sha256.
    #[arg(long, default_value = LOCAL_CLOUD_MODEL)]
    model: String,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 2)]
    parallel: u32,
    /// CPU threads for the engine [default: all cores].
    #[arg(long)]
    threads: Option<u32>,
    /// Context window of one sequence, in tokens.
    #[arg(long, default_value_t = coordinator::limits::CONTEXT_TOKENS_DEFAULT)]
    context_tokens: u32,
    /// The price sheet, JSON, whose `fleet` section prices the model served
    /// [default: the shipped sheet; see crates/ledger/prices/default.json].
    #[arg(long)]
    prices: Option<PathBuf>,
    /// Exit when the parent process goes away (used by `demo` and tests).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(Subcommand)]
pub enum BudgetCommand {
    /// Caps a tenant's cloud spend, in USD (what the tenant is charged, margin included).
    Set {
        tenant: String,
        #[arg(long)]
        cap_usd: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Removes a tenant's cap.
    Clear {
        tenant: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Starts a tenant's cloud spend from zero (a new period).
    Reset {
        tenant: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Every tenant's cap and cloud spend.
    List {
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

pub async fn run(command: CloudCommand) -> anyhow::Result<()> {
    match command {
        CloudCommand::Serve(args) => serve(args).await,
        CloudCommand::Budget(command) => budget(command).await,
    }
}

async fn budget(command: BudgetCommand) -> anyhow::Result<()> {
    let now = coordinator::core::now_ms().0;
    let open = |dir: Option<PathBuf>| async move {
        let store = crate::admin::open_store(dir).await?;
        Ok::<_, anyhow::Error>(CloudBudgets::new(store))
    };
    match command {
        BudgetCommand::Set {
            tenant,
            cap_usd,
            data_dir,
        } => {
            let cap = MicroUsd::parse_usd(&cap_usd).with_context(|| {
                format!("--cap-usd {cap_usd:?} is not a dollar amount with at most six decimals")
            })?;
            open(data_dir)
                .await?
                .set_cap(&tenant, Some(cap), now)
                .await?;
            println!("cloud budget of {tenant}: ${cap}");
        }
        BudgetCommand::Clear { tenant, data_dir } => {
            open(data_dir).await?.set_cap(&tenant, None, now).await?;
            println!("cloud budget of {tenant}: no cap");
        }
        BudgetCommand::Reset { tenant, data_dir } => {
            open(data_dir).await?.reset_spent(&tenant, now).await?;
            println!("cloud spend of {tenant}: reset to $0");
        }
        BudgetCommand::List { data_dir } => {
            println!("{:<24} {:>14} {:>14}", "tenant", "cap", "spent");
            for row in open(data_dir).await?.list().await? {
                let cap = row
                    .status
                    .cap
                    .map_or_else(|| "none".to_string(), |cap| format!("${cap}"));
                let spent = format!("${}", row.status.spent);
                println!("{:<24} {:>14} {:>14}", row.tenant, cap, spent);
            }
        }
    }
    Ok(())
}

async fn serve(args: CloudServeArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| home::root().join("cloud"));
    let model = home::model_store()?.resolve(&args.model).with_context(|| {
        format!(
            "resolve model {:?} (fetch it with 'fleetgrid models fetch {}')",
            args.model, args.model
        )
    })?;
    let (api_key, credential) = credentials(&data_dir).await?;
    let mut config = coordinator::CoordinatorConfig::new(
        data_dir,
        vec![coordinator::ModelToServe {
            name: model.name.clone(),
            path: model.path.clone(),
            digest: model.digest.to_string(),
        }],
    );
    config.http_listen = args.http_listen;
    config.grpc_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.billing = crate::ledger_cmd::billing_config(None, args.prices.as_deref(), None)?;
    config.context_tokens = args.context_tokens;
    // The one node is the operator's own engine in this process: the rules that keep untrusted
    // vehicles honest (slots earned by finished work, work moved and the node taken out of
    // placement after stalls) would only take the cloud from its tenants when it is slow.
    config.scheduler.trust = None;
    let shutdown = run::shutdown_token(args.exit_with_parent)?;
    let (bound_sender, bound_receiver) = tokio::sync::oneshot::channel();
    let mut coordinator = tokio::spawn(coordinator::serve(config, shutdown.clone(), |bound| {
        let _ = bound_sender.send(bound);
    }));
    let Ok(bound) = bound_receiver.await else {
        let outcome = (&mut coordinator).await.context("coordinator task")?;
        outcome.context("run the cloud's coordinator")?;
        bail!("the cloud's coordinator stopped before listening");
    };
    let mut node = agent::AgentConfig::new(
        format!("http://{}", bound.grpc),
        CLOUD_NODE,
        credential,
        agent::VehicleStateSource::Datacenter,
        model,
    );
    // The exact cascade checks a draft in one prefill and must score it as this engine would
    // decode it; only ggml's reference kernels compute a chunk of queries as each alone.
    node.engine.reference_kernels = true;
    node.engine.parallel_sequences = args.parallel;
    node.engine.context_tokens_per_sequence = args.context_tokens;
    if let Some(threads) = args.threads {
        node.engine.threads = threads;
    }
    let mut node_task = tokio::spawn(agent::run(node, shutdown.clone()));
    wait_for_node(bound.http, &mut node_task).await?;
    // Parsed by `demo` and the tests: keep it on stdout, on one line.
    println!("{} {API_KEY_FIELD}{api_key}", bound.announcement());
    tokio::select! {
        outcome = &mut coordinator => outcome.context("coordinator task")?.context("run the cloud's coordinator")?,
        outcome = &mut node_task => outcome.context("node task")?.context("run the cloud's node")?,
    }
    shutdown.cancel();
    Ok(())
}

/// A fresh API key for the cloud's client tenant and a fresh credential for
/// its node (both are stored hashed, so each start issues new ones).
async fn credentials(data_dir: &Path) -> anyhow::Result<(String, String)> {
    let database = Store::open(data_dir)
        .await
        .context("open the cloud's database")?;
    let now = coordinator::core::now_ms().0;
    let api_key = match database
        .create_tenant(CLOUD_TENANT, TenantClass::Fleet, now)
        .await
    {
        Ok((_, key)) => key,
        Err(StoreError::TenantExists(_)) => database.create_api_key(CLOUD_TENANT, now).await?,
        Err(error) => return Err(error.into()),
    };
    let credential = match database.add_node(CLOUD_NODE, "", now).await {
        Ok(credential) => credential,
        Err(StoreError::NodeExists(_)) => database
            .rotate_node_credential(CLOUD_NODE)
            .await?
            .context("the cloud's node vanished")?,
        Err(error) => return Err(error.into()),
    };
    Ok((api_key, credential))
}

async fn wait_for_node(
    http: SocketAddr,
    node: &mut tokio::task::JoinHandle<Result<(), agent::AgentError>>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if node.is_finished() {
            let outcome = node.await.context("node task")?;
            outcome.context("start the cloud's node")?;
            bail!("the cloud's node stopped during start-up");
        }
        let connected = crate::demo::nodes_connected(&client, http).await;
        if connected >= 1 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the cloud's node did not connect within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
