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
//!
//! A cell records itself in the database while it runs (`store::cells`: its
//! id and the address its agents dial, renewed every `CELL_SEEN_INTERVAL`),
//! so that `fleetgrid nodes add` can give a new vehicle a home cell and the
//! cells it fails over to. With `--metrics-listen` it serves its Prometheus
//! metrics on `/metrics`, as the single process does beside its API.

use std::net::SocketAddr;
use std::sync::Arc;

use cell_api::Cell;
use tokio_util::sync::CancellationToken;

use crate::store::cells::CELL_SEEN_INTERVAL;
use crate::store::Store;
use crate::{
    billing_idempotency, bind_http, cell_config, load_models, CoordinatorConfig, CoordinatorError,
    Gateway, SHUTDOWN_GRACE,
};

/// The name a gateway's NATS connection carries.
pub const NATS_GATEWAY_NAME: &str = "fleetgrid-gateway";

/// A cell's NATS connection carries this and the cell's id as its name.
pub const NATS_CELL_NAME_PREFIX: &str = "fleetgrid-cell-";

/// A cell as a member of its cluster, beside the shared parts.
#[derive(Clone, Debug)]
pub struct CellRole {
    /// This cell's name, unique in the cluster: gateways address it by it.
    pub id: String,
    /// The address agents dial (`HOST:PORT` or `http://HOST:PORT`), as
    /// enrolment hands it out; `None`: the address the cell listens on.
    pub advertise: Option<String>,
    /// Where to serve the cell's Prometheus metrics; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

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
    Gateway {
        http: SocketAddr,
    },
    Cell {
        grpc: SocketAddr,
        cell: String,
        /// Where its `/metrics` is served, if anywhere.
        metrics: Option<SocketAddr>,
    },
}

impl Listening {
    const GATEWAY_PREFIX: &'static str = "fleetgrid gateway listening ";
    const CELL_PREFIX: &'static str = "fleetgrid cell listening ";

    pub fn announcement(&self) -> String {
        match self {
            Listening::Gateway { http } => format!("{}http={http}", Self::GATEWAY_PREFIX),
            Listening::Cell {
                grpc,
                cell,
                metrics,
            } => {
                let mut line = format!("{}grpc={grpc} cell={cell}", Self::CELL_PREFIX);
                if let Some(metrics) = metrics {
                    line.push_str(&format!(" metrics={metrics}"));
                }
                line
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
        let mut metrics = None;
        for field in rest.split_whitespace() {
            match field.split_once('=')? {
                ("grpc", addr) => grpc = addr.parse().ok(),
                ("cell", name) => cell = Some(name.to_owned()),
                ("metrics", addr) => metrics = Some(addr.parse().ok()?),
                _ => {}
            }
        }
        Some(Listening::Cell {
            grpc: grpc?,
            cell: cell?,
            metrics,
        })
    }
}

/// A NATS client of every server `urls` lists (comma-separated); it
/// reconnects to another of them when its server is lost. `name` is how
/// the servers' monitoring (`/connz`) names the connection.
async fn connect_nats(urls: &str, name: &str) -> Result<async_nats::Client, CoordinatorError> {
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
        .name(name)
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
    let idempotency =
        billing_idempotency::IdempotencyStore::for_store_with(&store, &config.idempotency)
            .await
            .map_err(CoordinatorError::Idempotency)?;
    if config.billing.ledger_url.is_none() {
        config.billing.ledger_url = Some(cluster.database_url.clone());
    }
    let gateway = Gateway::open(&config, store, Arc::clone(&models), idempotency).await?;
    let listener = bind_http(config.http_listen).await?;
    let nats = connect_nats(&cluster.nats, NATS_GATEWAY_NAME).await?;
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
/// the cluster's database, answering gateways over NATS as `role.id`,
/// recorded in the database for enrolment while it runs.
pub async fn serve_cell(
    config: CoordinatorConfig,
    cluster: Cluster,
    role: CellRole,
    shutdown: CancellationToken,
    ready: impl FnOnce(Listening),
) -> Result<(), CoordinatorError> {
    let cell_name = bus::CellId::new(role.id.clone()).map_err(bus_error)?;
    let store = Store::connect(&cluster.database_url).await?;
    let models = Arc::new(load_models(&config).await?);
    let metrics_listener = match role.metrics_listen {
        Some(addr) => Some(bind_http(addr).await?),
        None => None,
    };
    let cell = cell::start(
        cell_config(&config),
        store.clone(),
        models,
        shutdown.clone(),
    )
    .await?;
    let advertised = advertised_url(
        role.advertise.as_deref(),
        cell.grpc,
        config.agent_tls.is_some(),
    )
    .map_err(CoordinatorError::Advertise)?;
    let nats = connect_nats(
        &cluster.nats,
        &format!("{NATS_CELL_NAME_PREFIX}{}", role.id),
    )
    .await?;
    let bus = bus::serve_cell(
        nats,
        cell_name,
        Arc::clone(&cell.core) as Arc<dyn Cell>,
        bus::ServeConfig::default(),
        shutdown.clone(),
    )
    .await
    .map_err(bus_error)?;
    let metrics = match metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr().map_err(CoordinatorError::Http)?;
            let render = Arc::clone(&cell.metrics);
            crate::cell_metrics::serve(
                listener,
                Arc::new(move || render.render()),
                store.clone(),
                shutdown.clone(),
            );
            Some(addr)
        }
        None => None,
    };
    // Recorded once it answers the bus, so that no vehicle is sent to a
    // cell gateways cannot reach yet.
    store
        .cell_seen(&role.id, &advertised, crate::core::now_ms().0)
        .await?;
    let recorded = tokio::spawn(keep_cell_recorded(
        store.clone(),
        role.id.clone(),
        advertised.clone(),
        shutdown.clone(),
    ));
    ready(Listening::Cell {
        grpc: cell.grpc,
        cell: role.id.clone(),
        metrics,
    });
    tracing::info!(grpc = %cell.grpc, advertised = %advertised, cell = %role.id, "cell listening");
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = recorded.await;
        let _ = cell.task.await;
        let _ = bus.await;
    })
    .await;
    Ok(())
}

/// The URL agents dial for a cell listening on `grpc`: `advertise` when
/// given, else the address it listens on, which must then be one another
/// machine can dial; `https://` when agents come over mTLS (`secure`).
fn advertised_url(
    advertise: Option<&str>,
    grpc: SocketAddr,
    secure: bool,
) -> Result<String, String> {
    let scheme = if secure { "https://" } else { "http://" };
    let Some(advertise) = advertise.map(str::trim) else {
        if grpc.ip().is_unspecified() {
            return Err(format!(
                "the cell listens on {grpc}, which no agent can dial: give --advertise HOST:PORT"
            ));
        }
        return Ok(format!("{scheme}{grpc}"));
    };
    let host_port = advertise.strip_prefix(scheme).unwrap_or(advertise);
    let valid = host_port
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        && !host_port.contains(['/', '@', ',', ' ', '#']);
    if !valid {
        return Err(format!(
            "--advertise {advertise:?}: expected HOST:PORT or {scheme}HOST:PORT"
        ));
    }
    Ok(format!("{scheme}{host_port}"))
}

/// Renews the cell's record every `CELL_SEEN_INTERVAL` until `shutdown`,
/// then records that it stopped, so that enrolment passes it over.
async fn keep_cell_recorded(store: Store, id: String, url: String, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(CELL_SEEN_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let seen = store.cell_seen(&id, &url, crate::core::now_ms().0);
        match tokio::time::timeout(CELL_SEEN_INTERVAL, seen).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, cell = %id, "record the cell as live"),
            Err(_) => {
                tracing::warn!(cell = %id, "record the cell as live: the database did not answer")
            }
        }
    }
    if let Ok(Err(error)) = tokio::time::timeout(CELL_SEEN_INTERVAL, store.cell_stopped(&id)).await
    {
        tracing::warn!(%error, cell = %id, "record the cell as stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::{advertised_url, Listening};

    #[test]
    fn the_cluster_announcements_round_trip() {
        let gateway = Listening::Gateway {
            http: "127.0.0.1:8080".parse().expect("addr"),
        };
        let cell = Listening::Cell {
            grpc: "[::1]:7070".parse().expect("addr"),
            cell: "cell-a".to_owned(),
            metrics: None,
        };
        let measured = Listening::Cell {
            grpc: "127.0.0.1:7070".parse().expect("addr"),
            cell: "cell-b".to_owned(),
            metrics: Some("127.0.0.1:9090".parse().expect("addr")),
        };
        for listening in [gateway, cell, measured] {
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

    #[test]
    fn a_cell_advertises_what_agents_can_dial() {
        let loopback = "127.0.0.1:7070".parse().expect("addr");
        let anywhere = "0.0.0.0:7070".parse().expect("addr");
        let url = |advertise: Option<&str>, grpc| advertised_url(advertise, grpc, false).ok();
        assert_eq!(
            url(None, loopback).as_deref(),
            Some("http://127.0.0.1:7070")
        );
        assert_eq!(url(None, anywhere), None, "0.0.0.0 is no address to dial");
        assert_eq!(
            url(Some("cell-a.fleet.internal:7070"), anywhere).as_deref(),
            Some("http://cell-a.fleet.internal:7070")
        );
        assert_eq!(
            url(Some("http://10.0.0.7:7070"), anywhere).as_deref(),
            Some("http://10.0.0.7:7070")
        );
        for bad in [
            "10.0.0.7",
            "https://10.0.0.7:7070",
            "a:b",
            "x:7070,y:7070",
            ":7070",
        ] {
            assert_eq!(url(Some(bad), loopback), None, "{bad}");
        }
        let secure = |advertise: Option<&str>| advertised_url(advertise, loopback, true).ok();
        assert_eq!(secure(None).as_deref(), Some("https://127.0.0.1:7070"));
        assert_eq!(
            secure(Some("https://10.0.0.7:7070")).as_deref(),
            Some("https://10.0.0.7:7070")
        );
        assert_eq!(secure(Some("http://10.0.0.7:7070")), None);
    }
}
