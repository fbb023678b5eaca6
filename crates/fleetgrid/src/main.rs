//! `fleetgrid`: one binary for every role — coordinator, vehicle agent, demo,
//! and the operator's tools for models, tenants, nodes and benchmarks.

mod admin;
mod admin_owners;
mod bench;
mod bench_cluster;
mod bench_handover;
mod bench_verification;
mod cloud;
mod demo;
mod demo_cars;
mod demo_chaos;
mod demo_cluster;
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
mod serve_args;
mod sim_cmd;
mod sim_validate;

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
    Serve(serve_args::ServeArgs),
    /// Run a gateway of a cluster: the HTTP API, reaching its cells over NATS.
    Gateway(serve_args::GatewayArgs),
    /// Run a cell of a cluster: its vehicles' sessions and generations, served over NATS.
    Cell(serve_args::CellArgs),
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
    /// Simulate a fleet's day or month with the production scheduler and settlement: delivered
    /// tokens, latency, migrations, energy, owners' earnings and the margin.
    Sim(sim_cmd::SimArgs),
}

#[derive(clap::Args, Clone)]
pub struct AgentArgs {
    /// The coordinator's gRPC address: the one cell this node serves. Same as one `--cell`.
    #[arg(long, conflicts_with = "cells")]
    coordinator: Option<String>,
    /// A cell's gRPC address; repeat it or separate with commas, in order of preference: the
    /// node's own cell first, then those it fails over to when its session is lost. Overrides
    /// the cells of the enrolment. [default: the enrolment's cells, else https://127.0.0.1:7070,
    /// or http:// for a token without the authority's pin]
    #[arg(long = "cell", value_delimiter = ',')]
    cells: Vec<String>,
    /// This node's enrolled name.
    #[arg(long)]
    node_id: String,
    /// What `fleetgrid nodes add` printed: the node's credential, and in a cluster its cells
    /// (CREDENTIAL@URL,URL,…, its home cell first).
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
    /// Flash attention. `off`: a generation handed over to another `off` node continues bit
    /// for bit. `exact`: on, with ggml's reference kernels; bit for bit among `exact` nodes,
    /// faster to decode than `off`, slower to prefill models with Q5_0 or Q8_0 weights.
    /// `fast`: on, with the default kernels, the fastest; a handover continues from the
    /// committed tokens with no gap or duplicate, but later tokens may differ from an
    /// uninterrupted run. Reported in the node's registration (FLASH_ATTN, REFERENCE).
    #[arg(
        long,
        env = "FLEETGRID_FLASH_ATTENTION",
        default_value = "off",
        value_parser = ["off", "exact", "fast"]
    )]
    flash_attention: String,
    /// Where the node keeps its key and certificate for https:// cells (mTLS).
    /// [default: identity/PIN/NODE under fleetgrid's home]
    #[arg(long)]
    identity_dir: Option<std::path::PathBuf>,
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
            Command::Gateway(args) => run::gateway(args).await,
            Command::Cell(args) => run::cell(args).await,
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
            Command::Sim(args) => sim_cmd::run(args).await,
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
