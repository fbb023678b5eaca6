//! `fleetgrid bench cluster`: what the scaled-out shape costs and how it
//! behaves, on real processes (`fleetgrid gateway`, `fleetgrid cell`,
//! Debian's `nats-server`, PostgreSQL) on this machine.
//!
//! Five parts, each runnable alone (`--only`):
//!
//! - `sessions` (`bench_cluster_sessions`): vehicle sessions one cell
//!   process holds, its memory per session and CPU per 1,000 heartbeats/s;
//! - `latency` (`bench_cluster_latency`): what NATS adds per token batch,
//!   against the in-process `Cell` path in the same run;
//! - `throughput` (`bench_cluster_throughput`): tokens/s and requests/s
//!   through one gateway with 1, 2 and 4 cells, and the CPU of each part;
//! - `failover` (`bench_cluster_failover`): kill -9 of a cell to the next
//!   token at the client;
//! - `affinity` (`bench_cluster_affinity`): placement with prefix affinity
//!   against without, on real-model vehicles.
//!
//! Simulated vehicles come from the `loadgen` crate, a **load generator,
//! not a vehicle**, run in a child process of this binary
//! (`bench_cluster_load`) so that every part's CPU is counted where it is
//! spent. Each part gets a fresh PostgreSQL database and its own NATS
//! cluster; everything it starts is stopped when it ends.

#[path = "bench_cluster_affinity.rs"]
mod affinity;
#[path = "bench_cluster_client.rs"]
pub mod client;
#[path = "bench_cluster_failover.rs"]
mod failover;
#[path = "bench_cluster_latency.rs"]
mod latency;
#[path = "bench_cluster_load.rs"]
mod load;
#[path = "bench_cluster_sessions.rs"]
mod sessions;
#[path = "bench_cluster_stats.rs"]
pub mod stats;
#[path = "bench_cluster_throughput.rs"]
mod throughput;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use coordinator::store::{Store, TenantClass};
use sqlx::Connection;
use stack::nats::NatsCluster;
use stack::{ClusterCell, ClusterGateway, ClusterSpec, Fleetgrid, LogFile, MemberSpec};

use crate::home;

/// Servers in each part's NATS cluster, as `demo --cluster` runs it.
const NATS_SERVERS: usize = 3;

/// How long a member may take to start, or vehicles to connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// The parts of the benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Sessions,
    Latency,
    Throughput,
    Failover,
    Affinity,
}

#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// The parts to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values = ["sessions", "latency", "throughput", "failover", "affinity"]
    )]
    only: Vec<Part>,
    /// The cluster's PostgreSQL database; it is dropped and created afresh for each part.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/fleetgrid_bench"
    )]
    database: String,
    /// The model cells and gateways serve (and simulated vehicles claim).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    #[command(flatten)]
    sessions: sessions::SessionsArgs,
    #[command(flatten)]
    latency: latency::LatencyArgs,
    #[command(flatten)]
    throughput: throughput::ThroughputArgs,
    #[command(flatten)]
    failover: failover::FailoverArgs,
    #[command(flatten)]
    affinity: affinity::AffinityArgs,
    /// Runs as the load generator's child process, as the file says (used by the benchmark).
    #[arg(long, hide = true)]
    load_spec: Option<PathBuf>,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.load_spec {
        return load::run_child(spec).await;
    }
    let bench = Bench::new(&args)?;
    println!(
        "fleetgrid bench cluster: {} cores, parts {:?}",
        std::thread::available_parallelism().map_or(0, usize::from),
        args.only
    );
    for part in &args.only {
        let report = match part {
            Part::Sessions => sessions::run(&bench, &args.sessions).await.map(text),
            Part::Latency => latency::run(&bench, &args.latency).await.map(text),
            Part::Throughput => throughput::run(&bench, &args.throughput).await.map(text),
            Part::Failover => failover::run(&bench, &args.failover).await.map(text),
            Part::Affinity => affinity::run(&bench, &args.affinity).await.map(text),
        };
        match report {
            Ok(report) => println!("\n{report}"),
            // One part failing does not hide the figures of the others.
            Err(error) => println!("\n{part:?}: not measured: {error:#}"),
        }
    }
    Ok(())
}

fn text(report: impl std::fmt::Display) -> String {
    report.to_string()
}

/// What every part shares: the binary, the model, where files go and the database.
pub(crate) struct Bench {
    fleetgrid: Fleetgrid,
    root: PathBuf,
    database: String,
    model: String,
}

/// One part's cluster infrastructure: a fresh database, its store, a NATS
/// cluster and the tenant key clients use.
pub(crate) struct Shared {
    pub store: Store,
    /// For PostgreSQL's statistics of the database.
    pub stats_pool: sqlx::PgPool,
    pub nats: NatsCluster,
    pub spec: ClusterSpec,
    pub api_key: String,
    pub dir: PathBuf,
}

impl Bench {
    fn new(args: &ClusterArgs) -> anyhow::Result<Bench> {
        let exe = std::env::current_exe().context("find the fleetgrid executable")?;
        Ok(Bench {
            fleetgrid: Fleetgrid::new(exe),
            root: home::root().join("bench-cluster"),
            database: args.database.clone(),
            model: args.model.clone(),
        })
    }

    pub fn fleetgrid(&self) -> &Fleetgrid {
        &self.fleetgrid
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The served model's name and digest, as simulated vehicles claim it.
    pub fn model_identity(&self) -> anyhow::Result<(String, String)> {
        let model = home::model_store()?
            .resolve(&self.model)
            .with_context(|| format!("resolve the model {}", self.model))?;
        Ok((model.name.clone(), model.digest.to_string()))
    }

    /// A fresh directory, database and NATS cluster for the part `name`.
    pub async fn shared(&self, name: &str) -> anyhow::Result<Shared> {
        let dir = self.root.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
        }
        let nats_dir = dir.join("nats");
        std::fs::create_dir_all(&nats_dir)
            .with_context(|| format!("create {}", nats_dir.display()))?;
        recreate_database(&self.database).await?;
        let store = Store::connect(&self.database)
            .await
            .context("open the benchmark's database")?;
        let stats_pool = sqlx::PgPool::connect(&self.database)
            .await
            .context("connect to the benchmark's database")?;
        let now = coordinator::core::now_ms().0;
        let (_, api_key) = store
            .create_tenant("bench", TenantClass::Fleet, now)
            .await
            .context("create the benchmark's tenant")?;
        let nats = NatsCluster::start(NATS_SERVERS, &nats_dir, STARTUP_TIMEOUT)
            .await
            .context("start the NATS cluster")?;
        let spec = ClusterSpec {
            nats: nats.urls(),
            database: self.database.clone(),
            data_dir: dir.clone(),
            models: vec![self.model.clone()],
        };
        Ok(Shared {
            store,
            stats_pool,
            nats,
            spec,
            api_key,
            dir,
        })
    }
}

impl Shared {
    /// Starts `fleetgrid cell` named `cell_id` with `args`, logging to `<cell_id>.log`
    /// (appended, so that a restarted cell keeps one log).
    pub async fn start_cell(
        &self,
        fleetgrid: &Fleetgrid,
        cell_id: &str,
        member: MemberSpec,
    ) -> anyhow::Result<ClusterCell> {
        let (fleetgrid, spec, cell_id) = (fleetgrid.clone(), self.spec.clone(), cell_id.to_owned());
        tokio::task::spawn_blocking(move || {
            ClusterCell::start_blocking(&fleetgrid, &spec, &cell_id, &member, STARTUP_TIMEOUT)
        })
        .await
        .context("start task")?
        .context("start a cell")
    }

    /// Starts `fleetgrid gateway` with `args`.
    pub async fn start_gateway(
        &self,
        fleetgrid: &Fleetgrid,
        args: Vec<std::ffi::OsString>,
    ) -> anyhow::Result<ClusterGateway> {
        let mut member = MemberSpec::new(LogFile::create(self.dir.join("gateway.log")));
        member.args = args;
        let (fleetgrid, spec) = (fleetgrid.clone(), self.spec.clone());
        tokio::task::spawn_blocking(move || {
            ClusterGateway::start_blocking(&fleetgrid, &spec, "gateway", &member, STARTUP_TIMEOUT)
        })
        .await
        .context("start task")?
        .context("start the gateway")
    }

    /// A member spec logging to `<name>.log` in this part's directory, appended.
    pub fn member(&self, name: &str) -> MemberSpec {
        MemberSpec::new(LogFile::append(self.dir.join(format!("{name}.log"))))
    }

    /// The process ids of the NATS servers, found by their configuration files.
    pub fn nats_pids(&self) -> Vec<u32> {
        let configs: Vec<String> = (1..=self.nats.servers.len())
            .map(|index| {
                self.dir
                    .join("nats")
                    .join(format!("nats-{index}.conf"))
                    .display()
                    .to_string()
            })
            .collect();
        stats::pids_with_argument(&configs)
    }
}

/// Drops the database `url` names, if it exists, and creates it empty.
async fn recreate_database(url: &str) -> anyhow::Result<()> {
    let options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .with_context(|| format!("--database is not a PostgreSQL URL: {url}"))?;
    let name = options
        .get_database()
        .context("--database names no database")?
        .to_owned();
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .with_context(|| format!("connect to PostgreSQL: {url}"))?;
    let quoted = name.replace('"', "\"\"");
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{quoted}\" WITH (FORCE)"
    ))
    .execute(&mut admin)
    .await
    .with_context(|| format!("drop the database {name}"))?;
    sqlx::query(&format!("CREATE DATABASE \"{quoted}\""))
        .execute(&mut admin)
        .await
        .with_context(|| format!("create the database {name}"))?;
    Ok(())
}

/// Writes in the benchmark's database so far: committed transactions and
/// rows inserted, updated or deleted (PostgreSQL's statistics, which lag
/// by up to a second).
pub(crate) async fn database_writes(pool: &sqlx::PgPool) -> anyhow::Result<stats::DatabaseWrites> {
    let (commits,): (i64,) = sqlx::query_as(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .context("read pg_stat_database")?;
    let (rows,): (Option<i64>,) = sqlx::query_as(
        "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del)::bigint FROM pg_stat_user_tables",
    )
    .fetch_one(pool)
    .await
    .context("read pg_stat_user_tables")?;
    Ok(stats::DatabaseWrites {
        commits: u64::try_from(commits).unwrap_or(0),
        rows: u64::try_from(rows.unwrap_or(0)).unwrap_or(0),
    })
}
