//! `fleetgrid`: one binary for every role — coordinator, vehicle agent, demo,
//! and the operator's tools for models, tenants, nodes and benchmarks.

mod admin;
mod admin_owners;
mod bench;
mod bench_handover;
mod cloud;
mod demo;
mod demo_cars;
mod demo_chaos;
mod eval;
mod eval_client;
mod eval_data;
mod eval_records;
mod eval_report;
mod eval_stack;
mod home;
mod http_limits;
mod ledger_cmd;
mod router_cmd;
mod run;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetgrid",
    version,
    about = "An LLM inference cloud made of parked, charging vehicles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: OpenAI-compatible gateway, agent gRPC service, scheduler, store.
    Serve(ServeArgs),
    /// Run a vehicle's agent: dial the coordinator and serve generations on this machine.
    Agent(AgentArgs),
    /// Start a coordinator with three simulated vehicles serving a real model.
    Demo(demo::DemoArgs),
    /// List, fetch, verify and pull model files.
    #[command(subcommand)]
    Models(admin::ModelsCommand),
    /// Create and list tenants and their API keys.
    #[command(subcommand)]
    Tenants(admin::TenantsCommand),
    /// Enrol and list vehicle nodes.
    #[command(subcommand)]
    Nodes(admin::NodesCommand),
    /// Create and list vehicle owners and their owner API keys.
    #[command(subcommand)]
    Owners(admin_owners::OwnersCommand),
    /// Show or change a vehicle's owner policy.
    #[command(subcommand)]
    Policy(admin_owners::PolicyCommand),
    /// Tenants' money: prepaid top-ups, credit limits, daily spend caps.
    #[command(subcommand)]
    Billing(ledger_cmd::BillingCommand),
    /// The ledger: verify, balances, owner statements, payouts, invoices.
    #[command(subcommand)]
    Ledger(ledger_cmd::LedgerCommand),
    /// The cloud tier: a local OpenAI-compatible cloud model, per-tenant cloud budgets.
    #[command(subcommand)]
    Cloud(cloud::CloudCommand),
    /// Answer quality, cost and latency of the edge, the cloud or the router on a data set.
    Eval(eval::EvalArgs),
    /// Calibrate the router and inspect its decisions.
    #[command(subcommand)]
    Router(router_cmd::RouterCommand),
    /// Benchmarks against reference implementations measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Address agents dial (gRPC).
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc_listen: SocketAddr,
    /// Where the coordinator keeps its database [default: $FLEETGRID_HOME/coordinator].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Models to serve, by catalog name or sha256 (repeatable).
    #[arg(long = "model", default_value = "smollm2-135m-instruct")]
    models: Vec<String>,
    /// Context window of one sequence on a node, in tokens.
    #[arg(long, default_value_t = coordinator::limits::CONTEXT_TOKENS_DEFAULT)]
    context_tokens: u32,
    /// How often agents heartbeat, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// A node silent for this long is marked gone, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    heartbeat_timeout_ms: u64,
    /// Slots a node gets before it has completed any generation, whatever it claims; it earns
    /// one more per completed generation, up to its claim.
    #[arg(long, default_value_t = scheduler::TrustConfig::default().unproven_slots_max)]
    unproven_node_slots: u16,
    /// A running generation is never moved for making no progress sooner than this, in
    /// milliseconds (its bound follows its node's measured pace between floor and ceiling).
    #[arg(long, default_value_t = scheduler::TrustConfig::default().stall_floor_ms)]
    stall_floor_ms: u64,
    /// A running generation with no token for this long is moved to another node, in
    /// milliseconds; also the bound for a node with no measured pace and for a first token.
    #[arg(long, default_value_t = scheduler::TrustConfig::default().stall_ceiling_ms)]
    stall_ceiling_ms: u64,
    /// Requests that may wait per tenant class before new ones get 429.
    #[arg(long)]
    queue_max_per_class: Option<u32>,
    /// The ledger: a SQLite file or postgres://USER@HOST/DB [default: ledger.db in the data directory].
    #[arg(long, env = "FLEETGRID_LEDGER_URL")]
    ledger_url: Option<String>,
    /// The price sheet, JSON [default: the shipped sheet; see crates/ledger/prices/default.json].
    #[arg(long)]
    prices: Option<PathBuf>,
    /// Owners' share of the token revenue, in basis points (7000 = 70 %), overriding the sheet.
    #[arg(long)]
    owner_share_bps: Option<u32>,
    /// Memory for the prompt KV caches of long prompts, kept so that a generation handed over to
    /// another node loads its prompt instead of prefilling it again, in MiB (0: always re-prefill).
    #[arg(long, default_value_t = coordinator::limits::KV_CHECKPOINT_BYTES_BUDGET >> 20)]
    kv_checkpoint_budget_mib: usize,
    /// The cloud upstream and the router (`auto`, `cloud/<model>`).
    #[command(flatten)]
    cloud: cloud::CloudArgs,
    /// The gateway's bounds on slow and numerous clients.
    #[command(flatten)]
    http_limits: http_limits::HttpLimitArgs,
    /// Exit when the parent process goes away (used by `demo` and tests).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(clap::Args, Clone)]
pub struct AgentArgs {
    /// The coordinator's gRPC address: the one cell this node serves. Same as one `--cell`.
    #[arg(long, conflicts_with = "cells")]
    coordinator: Option<String>,
    /// A cell's gRPC address; repeat it or separate with commas, in order of preference: the
    /// node's own cell first, then those it fails over to when its session is lost.
    /// [default: http://127.0.0.1:7070]
    #[arg(long = "cell", value_delimiter = ',')]
    cells: Vec<String>,
    /// This node's enrolled name.
    #[arg(long)]
    node_id: String,
    /// The node's credential from `fleetgrid nodes add`.
    #[arg(long, env = "FLEETGRID_NODE_CREDENTIAL", hide_env_values = true)]
    credential: String,
    /// Where vehicle state comes from: sim:TRACE, linux-power[:ROOT] or file:PATH.
    #[arg(long, default_value = "linux-power")]
    vehicle_state: String,
    /// The model to serve, by catalog name or sha256.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 4)]
    parallel: u32,
    /// CPU threads for the engine [default: all cores].
    #[arg(long)]
    threads: Option<u32>,
    /// Context window of one sequence, in tokens.
    #[arg(long, default_value_t = coordinator::limits::CONTEXT_TOKENS_DEFAULT)]
    context_tokens: u32,
    /// Memory the engine may use, in MiB (weights plus KV cache).
    #[arg(long, default_value_t = 8192)]
    memory_budget_mib: u64,
    /// Exit when the parent process goes away (used by `demo` and tests).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => run::serve(args).await,
            Command::Agent(args) => run::agent(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Models(command) => admin::models(command).await,
            Command::Tenants(command) => admin::tenants(command).await,
            Command::Nodes(command) => admin::nodes(command).await,
            Command::Owners(command) => admin_owners::owners(command).await,
            Command::Policy(command) => admin_owners::policy(command).await,
            Command::Billing(command) => ledger_cmd::billing(command).await,
            Command::Ledger(command) => ledger_cmd::ledger(command).await,
            Command::Cloud(command) => cloud::run(command).await,
            Command::Eval(args) => eval::run(args).await,
            Command::Router(command) => router_cmd::run(command).await,
            Command::Bench(command) => bench::run(command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
