//! The long-running roles: `fleetgrid serve` (a gateway and a cell in one
//! process), `gateway` and `cell` (the halves of a cluster) and `agent`.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::serve_args::{CellArgs, GatewayArgs, ServeArgs};
use crate::{home, AgentArgs};

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
    let mut config = args.common.config()?;
    args.gateway.apply(&mut config)?;
    args.cell.apply(&mut config);
    let shutdown = shutdown_token(args.common.exit_with_parent)?;
    coordinator::serve(config, shutdown, |bound| {
        // Parsed by `demo`, the benchmarks and the tests: keep it on stdout.
        println!("{}", bound.announcement());
    })
    .await
    .context("run the coordinator")
}

pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let mut config = args.common.config()?;
    args.gateway.apply(&mut config)?;
    let shutdown = shutdown_token(args.common.exit_with_parent)?;
    coordinator::serve_gateway(config, args.cluster.cluster(), shutdown, |listening| {
        // Parsed by `demo --cluster` and the tests: keep it on stdout.
        println!("{}", listening.announcement());
    })
    .await
    .context("run the gateway")
}

pub async fn cell(args: CellArgs) -> anyhow::Result<()> {
    let mut config = args.common.config()?;
    args.cell.apply(&mut config);
    config.billing.prices =
        std::sync::Arc::new(crate::ledger_cmd::price_config(args.prices.as_deref())?);
    let shutdown = shutdown_token(args.common.exit_with_parent)?;
    let role = coordinator::CellRole {
        id: args.cell_id,
        advertise: args.advertise,
        metrics_listen: args.metrics_listen,
    };
    coordinator::serve_cell(
        config,
        args.cluster.cluster(),
        role,
        shutdown,
        |listening| {
            // Parsed by `demo --cluster` and the tests: keep it on stdout.
            println!("{}", listening.announcement());
        },
    )
    .await
    .context("run the cell")
}

/// The cell an agent dials when none is given: a coordinator on this machine, over mTLS when the
/// agent's token carries the node authority's pin (as every token of a TLS deployment does).
const AGENT_CELL_DEFAULT: &str = "https://127.0.0.1:7070";

/// [`AGENT_CELL_DEFAULT`] for a token without the authority's pin: a cell taking plain gRPC.
const AGENT_CELL_DEFAULT_PLAINTEXT: &str = "http://127.0.0.1:7070";

/// The agent's cells in order of preference: `--coordinator` is a list of one; without either
/// flag, the cells of its enrolment, and without those the local default (`https://` when the
/// token has a pin).
fn agent_cells(
    coordinator: Option<String>,
    cells: Vec<String>,
    enrolled: Vec<String>,
    pinned: bool,
) -> Vec<String> {
    let cells: Vec<String> = coordinator
        .into_iter()
        .chain(cells)
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    if !cells.is_empty() {
        return cells;
    }
    if !enrolled.is_empty() {
        return enrolled;
    }
    let default = if pinned {
        AGENT_CELL_DEFAULT
    } else {
        AGENT_CELL_DEFAULT_PLAINTEXT
    };
    vec![default.to_owned()]
}

/// The identity folder of one deployment's authority: its pin's first hex digits.
fn pin_folder(pin: Option<&str>) -> String {
    let hex = pin
        .and_then(|pin| pin.strip_prefix("sha256:"))
        .unwrap_or("none");
    hex.chars().take(16).collect()
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
    let enrolment = agent::Enrolment::parse(&args.credential).context("read --credential")?;
    let mut config = agent::AgentConfig::new(
        String::new(),
        args.node_id,
        enrolment.credential,
        vehicle_state,
        model,
    );
    config.cells = agent_cells(
        args.coordinator,
        args.cells,
        enrolment.cells,
        enrolment.authority_pin.is_some(),
    );
    config.identity_dir = Some(args.identity_dir.unwrap_or_else(|| {
        home::root()
            .join("identity")
            .join(pin_folder(enrolment.authority_pin.as_deref()))
            .join(&config.node_id)
    }));
    config.authority_pin = enrolment.authority_pin;
    config.engine.parallel_sequences = args.parallel;
    config.engine.context_tokens_per_sequence = args.context_tokens;
    config.engine.memory_budget_bytes = args.memory_budget_mib * 1024 * 1024;
    if let Some(threads) = args.threads {
        config.engine.threads = threads;
    }
    args.flash_attention
        .parse::<engine::FlashAttention>()
        .map_err(anyhow::Error::msg)
        .context("read --flash-attention")?
        .apply(&mut config.engine);
    let shutdown = shutdown_token(args.exit_with_parent)?;
    agent::run(config, shutdown).await.context("run the agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_dials_its_flags_then_its_enrolment_then_the_local_cell_over_mtls_if_pinned() {
        let given = |coordinator: Option<&str>, cells: &[&str], enrolled: &[&str], pinned| {
            agent_cells(
                coordinator.map(str::to_owned),
                cells.iter().map(|cell| (*cell).to_owned()).collect(),
                enrolled.iter().map(|cell| (*cell).to_owned()).collect(),
                pinned,
            )
        };
        let enrolled = ["https://cell-a:7070", "https://cell-b:7070"];
        assert_eq!(
            given(Some("https://here:7070"), &[], &enrolled, true),
            ["https://here:7070"]
        );
        assert_eq!(
            given(None, &["http://x:1", " "], &enrolled, true),
            ["http://x:1"]
        );
        assert_eq!(given(None, &[], &enrolled, true), enrolled);
        assert_eq!(given(None, &[], &[], true), ["https://127.0.0.1:7070"]);
        assert_eq!(given(None, &[], &[], false), ["http://127.0.0.1:7070"]);
    }
}
