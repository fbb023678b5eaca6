//! `fleetgrid gateway` and `fleetgrid cell`: the two halves of a coordinator
//! as processes of their own, any number of each, meeting on NATS and sharing
//! one PostgreSQL database.
//!
//! A gateway holds no vehicle and no generation that outlives its client's
//! connection: it authenticates, admits against holds in PostgreSQL, and
//! reaches the cells through `bus::Cells`, which places each generation on a
//! cell and moves it to another, with its committed tokens, when that cell
//! goes silent. A cell holds its vehicles' agent streams, runs the scheduler
//! for them and answers the bus; it loads policies and contracts from the
//! shared database, so a cell that takes over vehicles knows their rules.

use std::net::SocketAddr;
use std::sync::Arc;

use cell_api::Cell;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::{
    billing_idempotency, bind_http, cell_config, load_models, CoordinatorConfig, CoordinatorError,
    Gateway, SHUTDOWN_GRACE,
};

/// Where a cluster's shared parts are.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// NATS servers, comma-separated; the client fails over among them.
    pub nats: String,
    /// `postgres://…`: the store, the ledger, idempotency keys and billing holds.
    pub database_url: String,
}

/// What a gateway or a cell prints once it listens, for `demo --cluster`
/// and the tests to read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listening {
    Gateway { http: SocketAddr },
    Cell { grpc: SocketAddr, cell: String },
}

impl Listening {
    const GATEWAY_PREFIX: &'static str = "fleetgrid gateway listening ";
    const CELL_PREFIX: &'static str = "fleetgrid cell listening ";

    pub fn announcement(&self) -> String {
        match self {
            Listening::Gateway { http } => format!("{}http={http}", Self::GATEWAY_PREFIX),
            Listening::Cell { grpc, cell } => {
                format!("{}grpc={grpc} cell={cell}", Self::CELL_PREFIX)
            }
        }
    }

    pub fn parse_announcement(line: &str) -> Option<Listening> {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix(Self::GATEWAY_PREFIX) {
            let http = rest.strip_prefix("http=")?.parse().ok()?;
            return Some(Listening::Gateway { http });
        }
        let rest = line.strip_prefix(Self::CELL_PREFIX)?;
        let mut grpc = None;
        let mut cell = None;
        for field in rest.split_whitespace() {
            match field.split_once('=')? {
                ("grpc", addr) => grpc = addr.parse().ok(),
                ("cell", name) => cell = Some(name.to_owned()),
                _ => {}
            }
        }
        Some(Listening::Cell {
            grpc: grpc?,
            cell: cell?,
        })
    }
}

/// A NATS client of every server `urls` lists (comma-separated); it
/// reconnects to another of them when its server is lost.
async fn connect_nats(urls: &str) -> Result<async_nats::Client, CoordinatorError> {
    let mut addresses = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|url| !url.is_empty()) {
        let address: async_nats::ServerAddr = url
            .parse()
            .map_err(|error| CoordinatorError::Nats(format!("server address {url:?}: {error}")))?;
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(CoordinatorError::Nats("no NATS server given".to_owned()));
    }
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(addresses)
        .await
        .map_err(|error| CoordinatorError::Nats(format!("connect to {urls}: {error}")))
}

fn bus_error(error: bus::BusError) -> CoordinatorError {
    CoordinatorError::Nats(error.to_string())
}

/// Runs a gateway until `shutdown`: the HTTP API on the cluster's database,
/// its generations placed on the cells over NATS.
pub async fn serve_gateway(
    mut config: CoordinatorConfig,
    cluster: Cluster,
    shutdown: CancellationToken,
    ready: impl FnOnce(Listening),
) -> Result<(), CoordinatorError> {
    let store = Store::connect(&cluster.database_url).await?;
    let models = Arc::new(load_models(&config).await?);
    let idempotency = billing_idempotency::IdempotencyStore::for_store(&store)
        .await
        .map_err(CoordinatorError::Idempotency)?;
    if config.billing.ledger_url.is_none() {
        config.billing.ledger_url = Some(cluster.database_url.clone());
    }
    let gateway = Gateway::open(&config, store, Arc::clone(&models), idempotency).await?;
    let listener = bind_http(config.http_listen).await?;
    let nats = connect_nats(&cluster.nats).await?;
    let cells = Arc::new(
        bus::Cells::connect(
            nats,
            bus::CellsConfig {
                prefix_affinity: config.prefix_affinity,
                ..bus::CellsConfig::default()
            },
        )
        .await
        .map_err(bus_error)?,
    );
    let http_addr = listener.local_addr().map_err(CoordinatorError::Http)?;
    let http = gateway
        .serve(listener, cells as Arc<dyn Cell>, None, shutdown.clone())
        .await?;
    ready(Listening::Gateway { http: http_addr });
    tracing::info!(http = %http_addr, "gateway listening");
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, http).await;
    Ok(())
}

/// Runs a cell until `shutdown`: its agents' gRPC service and scheduler on
/// the cluster's database, answering gateways over NATS as `cell_id`.
pub async fn serve_cell(
    config: CoordinatorConfig,
    cluster: Cluster,
    cell_id: String,
    shutdown: CancellationToken,
    ready: impl FnOnce(Listening),
) -> Result<(), CoordinatorError> {
    let cell_name = bus::CellId::new(cell_id.clone()).map_err(bus_error)?;
    let store = Store::connect(&cluster.database_url).await?;
    let models = Arc::new(load_models(&config).await?);
    let cell = cell::start(cell_config(&config), store, models, shutdown.clone()).await?;
    let nats = connect_nats(&cluster.nats).await?;
    let bus = bus::serve_cell(
        nats,
        cell_name,
        Arc::clone(&cell.core) as Arc<dyn Cell>,
        bus::ServeConfig::default(),
        shutdown.clone(),
    )
    .await
    .map_err(bus_error)?;
    ready(Listening::Cell {
        grpc: cell.grpc,
        cell: cell_id.clone(),
    });
    tracing::info!(grpc = %cell.grpc, cell = %cell_id, "cell listening");
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = cell.task.await;
        let _ = bus.await;
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Listening;

    #[test]
    fn the_cluster_announcements_round_trip() {
        let gateway = Listening::Gateway {
            http: "127.0.0.1:8080".parse().expect("addr"),
        };
        let cell = Listening::Cell {
            grpc: "[::1]:7070".parse().expect("addr"),
            cell: "cell-a".to_owned(),
        };
        for listening in [gateway, cell] {
            assert_eq!(
                Listening::parse_announcement(&listening.announcement()),
                Some(listening)
            );
        }
        assert_eq!(
            Listening::parse_announcement("fleetgrid cell listening grpc=x cell=y"),
            None
        );
        assert_eq!(
            Listening::parse_announcement("fleetgrid listening http=1"),
            None
        );
    }
}
