//! `fleetgrid serve` and `fleetgrid agent`: the two long-running roles.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::{home, AgentArgs, ServeArgs};

/// How often a child started with `--exit-with-parent` checks its parent.
const PARENT_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// A token cancelled on SIGINT or SIGTERM, and — when asked — when the
/// process that started us is gone, so that no child outlives a demo.
pub fn shutdown_token(exit_with_parent: bool) -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let on_signal = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    if exit_with_parent {
        let parent = std::os::unix::process::parent_id();
        let on_orphan = token.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PARENT_CHECK_INTERVAL).await;
                if std::os::unix::process::parent_id() != parent {
                    tracing::warn!("parent process gone; shutting down");
                    on_orphan.cancel();
                    return;
                }
            }
        });
    }
    Ok(token)
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = home::model_store()?;
    let mut models = Vec::new();
    for name in &args.models {
        let verified = store.resolve(name).with_context(|| {
            format!("resolve model {name:?} (fetch it with 'fleetgrid models fetch {name}')")
        })?;
        models.push(coordinator::ModelToServe {
            name: verified.name.clone(),
            path: verified.path.clone(),
            digest: verified.digest.to_string(),
        });
    }
    let mut config =
        coordinator::CoordinatorConfig::new(home::coordinator_dir(args.data_dir), models);
    config.http_listen = args.http_listen;
    config.grpc_listen = args.grpc_listen;
    config.context_tokens = args.context_tokens;
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms);
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    if let Some(queue_max) = args.queue_max_per_class {
        config.scheduler.queue_max_per_class = [queue_max; 3];
    }
    if let Some(trust) = config.scheduler.trust.as_mut() {
        trust.unproven_slots_max = args.unproven_node_slots;
        trust.stall_floor_ms = args.stall_floor_ms;
        trust.stall_ceiling_ms = args.stall_ceiling_ms.max(args.stall_floor_ms);
    }
    config.billing = crate::ledger_cmd::billing_config(
        args.ledger_url.clone(),
        args.prices.as_deref(),
        args.owner_share_bps,
    )?;
    config.cloud = args.cloud.config()?;
    config.kv_checkpoint_budget_bytes = args.kv_checkpoint_budget_mib.saturating_mul(1 << 20);
    config.http = args.http_limits.limits()?;
    let shutdown = shutdown_token(args.exit_with_parent)?;
    coordinator::serve(config, shutdown, |bound| {
        // Parsed by `demo`, the benchmarks and the tests: keep it on stdout.
        println!("{}", bound.announcement());
    })
    .await
    .context("run the coordinator")
}

/// The cell an agent dials when none is given: a coordinator on this machine.
const AGENT_CELL_DEFAULT: &str = "http://127.0.0.1:7070";

/// The agent's cells in order of preference: `--coordinator` is a list of one, and without
/// either flag the local default.
fn agent_cells(coordinator: Option<String>, cells: Vec<String>) -> Vec<String> {
    let cells: Vec<String> = coordinator
        .into_iter()
        .chain(cells)
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    if cells.is_empty() {
        return vec![AGENT_CELL_DEFAULT.to_owned()];
    }
    cells
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let store = home::model_store()?;
    let model = store.resolve(&args.model).with_context(|| {
        format!(
            "resolve model {:?} (fetch it with 'fleetgrid models fetch {}')",
            args.model, args.model
        )
    })?;
    let vehicle_state = args
        .vehicle_state
        .parse::<agent::VehicleStateSource>()
        .context("parse --vehicle-state")?;
    let mut config = agent::AgentConfig::new(
        String::new(),
        args.node_id,
        args.credential,
        vehicle_state,
        model,
    );
    config.cells = agent_cells(args.coordinator, args.cells);
    config.engine.parallel_sequences = args.parallel;
    config.engine.context_tokens_per_sequence = args.context_tokens;
    config.engine.memory_budget_bytes = args.memory_budget_mib * 1024 * 1024;
    if let Some(threads) = args.threads {
        config.engine.threads = threads;
    }
    let shutdown = shutdown_token(args.exit_with_parent)?;
    agent::run(config, shutdown).await.context("run the agent")
}
