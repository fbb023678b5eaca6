//! `fleetgrid demo --cluster`: the product's scaled-out shape on one machine.
//! A 3-server NATS cluster, PostgreSQL, two gateways, two cells and four
//! simulated vehicles (two per cell, each allowed to fail over to the other
//! cell), and the local cloud, until Ctrl-C.
//!
//! PostgreSQL must answer at `--database` (`cargo xtask demo --cluster`
//! installs and starts it); the demo's database is created there if it does
//! not exist. Everything else is started here, as children that stop with
//! the demo.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::store::Store;
use sqlx::Connection;
use stack::nats::NatsCluster;
use stack::{
    AgentSpec, ClusterCell, ClusterGateway, ClusterSpec, Fleetgrid, LogFile, MemberSpec, Process,
};
use tokio_util::sync::CancellationToken;

use crate::demo::DemoArgs;

/// Servers in the demo's NATS cluster.
const NATS_SERVERS: usize = 3;

/// The cells, by name; each holds half the vehicles.
const CELLS: [&str; 2] = ["cell-a", "cell-b"];

/// Gateways in front of the cells.
const GATEWAYS: usize = 2;

/// Vehicles per cell.
const VEHICLES_PER_CELL: usize = 2;

/// How long the demo waits for each member to start and its vehicles to connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// How often the demo looks at its processes.
const TICK: Duration = Duration::from_millis(250);

/// The members of the running cluster, stopped together.
struct Members {
    gateways: Vec<ClusterGateway>,
    cells: Vec<ClusterCell>,
    agents: Vec<Process>,
    beside: Vec<Process>,
}

impl Members {
    fn processes_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        self.gateways
            .iter_mut()
            .map(|gateway| &mut gateway.process)
            .chain(self.cells.iter_mut().map(|cell| &mut cell.process))
            .chain(&mut self.agents)
            .chain(&mut self.beside)
    }

    /// The first member that exited, as an error naming it.
    fn check_running(&self) -> Result<(), stack::StackError> {
        for process in self
            .gateways
            .iter()
            .map(|gateway| &gateway.process)
            .chain(self.cells.iter().map(|cell| &cell.process))
            .chain(&self.beside)
        {
            process.check_running()?;
        }
        Ok(())
    }
}

pub async fn run(args: &DemoArgs, data_dir: &Path, logs: &Path) -> anyhow::Result<()> {
    let database = ensure_database(&args.database).await?;
    let store = Store::connect(&database)
        .await
        .context("open the demo's cluster database")?;
    let api_key = crate::demo::demo_key(&store).await?;
    let stop = crate::run::shutdown_token(false)?;
    let exe = std::env::current_exe().context("find the fleetgrid executable")?;
    let fleetgrid = Fleetgrid::new(&exe);

    eprintln!("fleetgrid demo: starting {NATS_SERVERS} NATS servers");
    let nats_dir = data_dir.join("nats");
    std::fs::create_dir_all(&nats_dir).with_context(|| format!("create {}", nats_dir.display()))?;
    let nats = NatsCluster::start(NATS_SERVERS, &nats_dir, STARTUP_TIMEOUT)
        .await
        .context("start the NATS cluster")?;
    let spec = ClusterSpec {
        nats: nats.urls(),
        database: database.clone(),
        data_dir: data_dir.to_path_buf(),
        models: vec![args.model.clone()],
    };
    let mut members = Members {
        gateways: Vec::new(),
        cells: Vec::new(),
        agents: Vec::new(),
        beside: Vec::new(),
    };
    let result = async {
        let (cloud_args, cloud_env) =
            match crate::demo::start_local_cloud(&fleetgrid, args, data_dir, logs).await? {
                Some(cloud) => {
                    let (flags, env) =
                        crate::demo::cloud_flags(cloud.http, &cloud.api_key, &args.cloud_model);
                    members.beside.push(cloud.process);
                    (flags, Some(env))
                }
                None => (Vec::new(), None),
            };
        for cell_id in CELLS {
            eprintln!("fleetgrid demo: starting {cell_id}");
            let member = MemberSpec::new(LogFile::create(logs.join(format!("{cell_id}.log"))));
            let cell = start_member(&fleetgrid, &spec, move |fleetgrid, spec| {
                ClusterCell::start_blocking(fleetgrid, spec, cell_id, &member, STARTUP_TIMEOUT)
            })
            .await?;
            members.cells.push(cell);
        }
        for index in 0..GATEWAYS {
            let name = format!("gateway-{}", index + 1);
            eprintln!("fleetgrid demo: starting {name}");
            let mut member = MemberSpec::new(LogFile::create(logs.join(format!("{name}.log"))));
            if index == 0 {
                member.listen = args.http_listen;
            }
            member.args = cloud_args.clone();
            let env = cloud_env.clone();
            let gateway = start_member(&fleetgrid, &spec, move |fleetgrid, spec| {
                let mut fleetgrid = fleetgrid.clone();
                if let Some((key, value)) = env {
                    fleetgrid = fleetgrid.env(key, value);
                }
                ClusterGateway::start_blocking(&fleetgrid, spec, &name, &member, STARTUP_TIMEOUT)
            })
            .await?;
            members.gateways.push(gateway);
        }
        let cells: Vec<SocketAddr> = members.cells.iter().map(|cell| cell.grpc).collect();
        let feeds = data_dir.join("feeds");
        std::fs::create_dir_all(&feeds).with_context(|| format!("create {}", feeds.display()))?;
        crate::demo::ensure_demo_owner(&store).await?;
        let mut names = Vec::new();
        for (cell_index, cell_id) in CELLS.iter().enumerate() {
            for vehicle in 0..VEHICLES_PER_CELL {
                let name = format!("{cell_id}-car-{}", vehicle + 1);
                let index = names.len();
                let credential = crate::demo::node_credential(&store, &name, index).await?;
                let trace = feeds.join(format!("{name}.json"));
                std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE)
                    .with_context(|| format!("write {}", trace.display()))?;
                let spec = AgentSpec {
                    node_id: name.clone(),
                    credential,
                    vehicle_state: format!("sim:{}", trace.display()),
                    model: args.model.clone(),
                    parallel: args.parallel,
                    threads: args.threads_per_vehicle,
                    args: Vec::new(),
                    log: LogFile::create(logs.join(format!("{name}.log"))),
                };
                // Its own cell first, then the other.
                let mut endpoints = cells.clone();
                endpoints.rotate_left(cell_index);
                members
                    .agents
                    .push(fleetgrid.cluster_agent(&endpoints, &spec)?);
                names.push(name);
            }
        }
        supervise(&members, &names, &api_key, logs, &spec, &stop).await
    }
    .await;
    stack::stop_all(members.processes_mut()).await;
    drop(nats);
    eprintln!("fleetgrid demo: stopped");
    result
}

/// Starts one member on a blocking thread.
async fn start_member<T: Send + 'static>(
    fleetgrid: &Fleetgrid,
    spec: &ClusterSpec,
    start: impl FnOnce(&Fleetgrid, &ClusterSpec) -> Result<T, stack::StackError> + Send + 'static,
) -> anyhow::Result<T> {
    let (fleetgrid, spec) = (fleetgrid.clone(), spec.clone());
    Ok(
        tokio::task::spawn_blocking(move || start(&fleetgrid, &spec))
            .await
            .context("start task")??,
    )
}

/// Waits for the vehicles, prints the instructions, then runs until Ctrl-C
/// (`Ok`) or until a gateway, a cell or the local cloud exits (`Err`).
async fn supervise(
    members: &Members,
    names: &[String],
    api_key: &str,
    logs: &Path,
    spec: &ClusterSpec,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    eprintln!(
        "fleetgrid demo: waiting for {} vehicles to connect (loading the model)",
        names.len()
    );
    let http = members.gateways[0].http;
    let client = stack::probe::client();
    let started = Instant::now();
    let mut ready = false;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(exited) = members.check_running() {
            if stop.is_cancelled() {
                return Ok(());
            }
            bail!(
                "{exited}\nstopping the demo (see the logs in {})",
                logs.display()
            );
        }
        if ready {
            continue;
        }
        let connected = stack::probe::connected_nodes(&client, http, api_key)
            .await
            .unwrap_or_default();
        if names.iter().all(|name| connected.contains(name)) {
            ready = true;
            print_instructions(members, api_key, logs, spec);
        } else if started.elapsed() > STARTUP_TIMEOUT {
            bail!(
                "only {} of {} vehicles connected in time; see the logs in {}",
                connected.len(),
                names.len(),
                logs.display()
            );
        }
    }
}

fn print_instructions(members: &Members, api_key: &str, logs: &Path, spec: &ClusterSpec) {
    let http = members.gateways[0].http;
    println!();
    println!(
        "fleetgrid demo --cluster is running: {GATEWAYS} gateways and {} cells on a {NATS_SERVERS}-server NATS cluster and PostgreSQL, {} simulated vehicles serving {}.",
        CELLS.len(),
        members.agents.len(),
        spec.models.join(", ")
    );
    println!();
    let model = spec.models.first().map_or("", String::as_str);
    crate::demo::print_client_lines(http, api_key, model);
    for gateway in &members.gateways {
        println!("Gateway: http://{}/v1", gateway.http);
    }
    for cell in &members.cells {
        println!(
            "Cell {}: agents dial https://{} over mTLS (pid {}; kill -9 it and its vehicles move to the other cell)",
            cell.cell_id,
            cell.grpc,
            cell.process.pid()
        );
    }
    println!("NATS: {}", spec.nats);
    println!();
    println!("Logs: {}", logs.display());
    println!("Press Ctrl-C to stop.");
}

/// Creates the database `url` names if the server does not have it yet, and
/// returns `url`.
async fn ensure_database(url: &str) -> anyhow::Result<String> {
    let options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .with_context(|| format!("--database is not a PostgreSQL URL: {url}"))?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .with_context(|| {
            format!("connect to PostgreSQL for the demo (start it with `cargo xtask demo --cluster`): {url}")
        })?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await
        .context("look for the demo's database")?;
    if exists.is_none() {
        let quoted = name.replace('"', "\"\"");
        sqlx::query(&format!("CREATE DATABASE \"{quoted}\""))
            .execute(&mut admin)
            .await
            .with_context(|| format!("create the database {name}"))?;
    }
    Ok(url.to_owned())
}
