//! `fleetgrid demo`: a coordinator and three simulated vehicles on this
//! machine, serving a real model, until Ctrl-C.
//!
//! Every process it starts is its child, in a process group of its own (a
//! Ctrl-C reaches only the demo), started with `--exit-with-parent`, and
//! stopped on the way out (`stack`), so nothing outlives the demo. A car that goes
//! away is a handover, not the end of the demo (`demo_cars`); `--chaos` makes
//! cars go away at random (`demo_chaos`). The coordinator or the local cloud
//! exiting stops the demo.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coordinator::store::{Store, StoreError, TenantClass};
use stack::{CloudSpec, Coordinator, CoordinatorSpec, Fleetgrid, LocalCloud, LogFile, Stack};
use tokio_util::sync::CancellationToken;

use crate::demo_cars::{Fleet, Launch};
use crate::demo_chaos::Chaos;
use crate::home;

/// The model the demo serves.
pub(crate) const DEMO_MODEL: &str = "smollm2-135m-instruct";

/// The variable that hands the local cloud's API key to the coordinator.
const DEMO_CLOUD_KEY_ENV: &str = "FLEETGRID_CLOUD_KEY";

/// Simulated vehicle traces, one per demo car (cycled if more cars are asked for).
const TRACES: [(&str, &str); 3] = [
    ("car-a", include_str!("../../agent/traces/car-a.json")),
    ("car-b", include_str!("../../agent/traces/car-b.json")),
    ("car-c", include_str!("../../agent/traces/car-c.json")),
];

/// How long the demo waits for its vehicles to connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// Longest the local cloud may take to load its model and connect its node.
const CLOUD_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the demo looks at its processes, the connected cars and the chaos plan.
const TICK: Duration = Duration::from_millis(250);

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Address of the OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) http_listen: SocketAddr,
    /// Number of simulated vehicles.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) vehicles: u32,
    /// Engine threads per vehicle.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads_per_vehicle: u32,
    /// Sequences each vehicle decodes together.
    #[arg(long, default_value_t = 2)]
    pub(crate) parallel: u32,
    /// Where the demo keeps its database, vehicle feeds and logs [default: $FLEETGRID_HOME/demo,
    /// or $FLEETGRID_HOME/demo-cluster with --cluster].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// The cars' model: SmolLM2-135M, or `qwen2.5-coder-0.5b-instruct`, which shares the
    /// 1.5B cloud model's vocabulary (what `auto` with `quality: "exact"` needs).
    #[arg(long, default_value = DEMO_MODEL)]
    pub(crate) model: String,
    /// Run without the local cloud: no `auto` or `cloud/...` models, a faster start.
    #[arg(long)]
    pub(crate) no_cloud: bool,
    /// The local cloud's model (system-2): the fast 0.5B, or `qwen2.5-coder-1.5b-instruct`,
    /// stronger and about three times slower (fetched, 1.1 GB, the first time).
    #[arg(long, default_value = crate::cloud::LOCAL_CLOUD_MODEL, conflicts_with = "no_cloud")]
    pub(crate) cloud_model: String,
    /// How long a car that went away by itself (crashed, killed) stays away before it comes
    /// home, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    come_home_secs: u64,
    /// Disrupt the fleet at random, every 15 to 45 s: unplug a car (for 10 to 30 s), make its
    /// owner leave (20 s notice, back 10 to 30 s after), or kill its agent with SIGKILL (back
    /// 10 to 30 s later). At least one car always stays serving. Watch the handovers in this
    /// log and in fleetgrid_reassignments_total on /metrics.
    #[arg(long)]
    chaos: bool,
    /// The seed of `--chaos`, to repeat a run's disruptions [default: drawn, and printed].
    #[arg(long, requires = "chaos")]
    chaos_seed: Option<u64>,
    /// Run the scaled-out shape instead: a 3-server NATS cluster, PostgreSQL, 2 gateways, 2
    /// cells and 2 vehicles per cell (`--vehicles`, `--chaos` and `--come-home-secs` do not
    /// apply). The first gateway listens on --http-listen.
    #[arg(long, conflicts_with_all = ["chaos", "vehicles"])]
    pub(crate) cluster: bool,
    /// The PostgreSQL database of `--cluster`, created if the server does not have it.
    #[arg(
        long,
        requires = "cluster",
        default_value = "postgres://postgres@127.0.0.1:5432/fleetgrid_demo"
    )]
    pub(crate) database: String,
}

/// What the demo hands out to its user.
struct Keys {
    api: String,
    /// Each owner of the demo's cars with a fresh owner key and the cars, in
    /// the order of [`DEMO_OWNERS`].
    owners: Vec<(String, String, Vec<String>)>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| home::root().join(if args.cluster { "demo-cluster" } else { "demo" }));
    let logs = data_dir.join("logs");
    let feeds = data_dir.join("feeds");
    for dir in [&logs, &feeds] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if args.chaos && args.vehicles < 2 {
        bail!("--chaos needs at least 2 vehicles, so that one always stays serving");
    }
    let mut wanted = vec![args.model.as_str()];
    if !args.no_cloud {
        wanted.push(args.cloud_model.as_str());
    }
    for model in wanted {
        eprintln!("fleetgrid demo: fetching and verifying {model}");
        let store = home::model_store()?;
        let entry = models::find(model).context("demo model missing from the catalog")?;
        tokio::task::spawn_blocking(move || store.fetch(entry))
            .await
            .context("fetch task")?
            .with_context(|| format!("fetch {model}"))?;
    }

    if args.cluster {
        return crate::demo_cluster::run(&args, &data_dir, &logs).await;
    }
    let database = Store::open(&data_dir)
        .await
        .context("open the demo database")?;
    let api = demo_key(&database).await?;
    let stop = crate::run::shutdown_token(false)?;
    let exe = std::env::current_exe().context("find the fleetgrid executable")?;
    let fleetgrid = Fleetgrid::new(&exe);
    let mut cloud = None;
    let cloud_upstream = match start_local_cloud(&fleetgrid, &args, &data_dir, &logs).await? {
        Some(started) => {
            cloud = Some(started.process);
            Some((started.http, started.api_key))
        }
        None => None,
    };
    let coordinator =
        start_coordinator(&fleetgrid, &args, &data_dir, &logs, cloud_upstream).await?;
    let mut running = Stack::new(fleetgrid.clone(), coordinator);
    if let Some(cloud) = cloud {
        running.add_beside(cloud);
    }
    let launch = Launch {
        fleetgrid,
        grpc: running.grpc(),
        model: args.model.clone(),
        parallel: args.parallel,
        threads: args.threads_per_vehicle,
        logs: logs.clone(),
        feeds,
    };
    let mut fleet = Fleet::new(launch, Duration::from_secs(args.come_home_secs));
    ensure_demo_owner(&database).await?;
    let mut names = Vec::new();
    for index in 0..args.vehicles as usize {
        let (trace_name, trace) = TRACES[index % TRACES.len()];
        let name = if index < TRACES.len() {
            trace_name.to_string()
        } else {
            format!("car-{}", index + 1)
        };
        let credential = node_credential(&database, &name, index).await?;
        names.push(name.clone());
        fleet.add(name, trace, credential)?;
    }
    let keys = Keys {
        api,
        owners: owner_keys(&database, names).await?,
    };
    let result = supervise(&args, &keys, &logs, &running, &mut fleet, &stop).await;
    stack::stop_all(fleet.processes_mut().chain(running.members_mut())).await;
    eprintln!("fleetgrid demo: stopped");
    result
}

/// Runs until Ctrl-C (`Ok`) or until the coordinator or the local cloud exits (`Err`): waits
/// for the cars, prints the instructions, brings cars home, and carries out `--chaos`.
async fn supervise(
    args: &DemoArgs,
    keys: &Keys,
    logs: &Path,
    running: &Stack,
    fleet: &mut Fleet,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    eprintln!(
        "fleetgrid demo: waiting for {} vehicles to connect (loading the model)",
        args.vehicles
    );
    let http = running.http();
    let client = stack::probe::client();
    let started = Instant::now();
    let mut ready = false;
    let mut chaos: Option<Chaos> = None;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(exited) = running.check_running() {
            if stop.is_cancelled() {
                return Ok(());
            }
            bail!(
                "{exited}\nstopping the demo (see the logs in {})",
                logs.display()
            );
        }
        // None while the coordinator does not answer: no car is connected then.
        let connected = stack::probe::connected_nodes(&client, http, &keys.api)
            .await
            .unwrap_or_default();
        let now = Instant::now();
        fleet.step(now, &connected)?;
        if !ready {
            if fleet.all_connected() {
                ready = true;
                print_instructions(http, keys, logs, args);
                if args.chaos {
                    chaos = Some(start_chaos(args.chaos_seed, now));
                }
            } else if now.duration_since(started) > STARTUP_TIMEOUT {
                bail!(
                    "only {} of {} vehicles connected in time; see the logs in {}",
                    fleet.connected_count(),
                    args.vehicles,
                    logs.display()
                );
            }
            continue;
        }
        if let Some(chaos) = chaos.as_mut() {
            if let Some(event) = chaos.poll(now, &fleet.serving(&connected)) {
                fleet.disrupt(event, now)?;
            }
        }
    }
}

fn start_chaos(seed: Option<u64>, now: Instant) -> Chaos {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64)
    });
    eprintln!("fleetgrid demo: chaos is on (seed {seed}; repeat it with --chaos-seed {seed})");
    Chaos::new(seed, now)
}

/// The demo tenant's API key: a fresh key on every run (keys are stored hashed).
pub(crate) async fn demo_key(database: &Store) -> anyhow::Result<String> {
    let now = coordinator::core::now_ms().0;
    match database
        .create_tenant("demo", TenantClass::Fleet, now)
        .await
    {
        Ok((_, key)) => Ok(key),
        Err(StoreError::TenantExists(_)) => Ok(database.create_api_key("demo", now).await?),
        Err(error) => Err(error.into()),
    }
}

/// The owners of the demo's simulated vehicles, which take turns: car-a is the first's, car-b the
/// second's, car-c the first's. Each owner's cars verify the other's answers (a car never checks
/// its own owner's), so the demo shows verification and the cars' trust.
pub(crate) const DEMO_OWNERS: [&str; 2] = ["demo-owner", "demo-neighbour"];

/// For each owner of the demo's cars (by their records, so that a data directory an older demo
/// enrolled shows its own), a fresh owner key and their cars among `cars`.
async fn owner_keys(
    database: &Store,
    cars: Vec<String>,
) -> anyhow::Result<Vec<(String, String, Vec<String>)>> {
    let mut owners: Vec<(String, String, Vec<String>)> = Vec::new();
    for car in cars {
        let record = database
            .node_record(&car)
            .await?
            .with_context(|| format!("node {car} vanished"))?;
        if let Some(entry) = owners.iter_mut().find(|(owner, ..)| *owner == record.owner) {
            entry.2.push(car);
            continue;
        }
        let now = coordinator::core::now_ms().0;
        let key = database.create_owner_key(&record.owner, now).await?;
        owners.push((record.owner, key, vec![car]));
    }
    owners.sort_by_key(|(owner, ..)| DEMO_OWNERS.iter().position(|demo| demo == owner));
    Ok(owners)
}

/// Creates the owners of the demo's vehicles if need be.
pub(crate) async fn ensure_demo_owner(database: &Store) -> anyhow::Result<()> {
    let now = coordinator::core::now_ms().0;
    for owner in DEMO_OWNERS {
        database.ensure_owner(owner, now).await?;
    }
    Ok(())
}

/// The enrolment token of the demo's `index`th vehicle, enrolled for its owner (the owners take
/// turns; they must exist) if need be.
pub(crate) async fn node_credential(
    database: &Store,
    name: &str,
    index: usize,
) -> anyhow::Result<String> {
    let owner = DEMO_OWNERS[index % DEMO_OWNERS.len()];
    enrolled_credential(database, name, owner).await
}

/// A fresh enrolment token for vehicle `name`, enrolled for `owner` (who must exist; "" for
/// none) if it is not yet: its credential and the node authority's pin, as `nodes add` prints
/// it, so that its agent enrols over mTLS.
pub(crate) async fn enrolled_credential(
    database: &Store,
    name: &str,
    owner: &str,
) -> anyhow::Result<String> {
    let now = coordinator::core::now_ms().0;
    let credential = match database.add_node(name, owner, now).await {
        Ok(credential) => credential,
        Err(StoreError::NodeExists(_)) => database
            .rotate_node_credential(name)
            .await?
            .with_context(|| format!("node {name} vanished"))?,
        Err(error) => return Err(error.into()),
    };
    let authority = cell::tls::authority(database, now).await?;
    Ok(agent::Enrolment {
        credential,
        cells: Vec::new(),
        authority_pin: Some(authority.pin()),
    }
    .token())
}

/// Starts the local cloud (system-2) the gateway escalates to over HTTP, unless `--no-cloud`.
pub(crate) async fn start_local_cloud(
    fleetgrid: &Fleetgrid,
    args: &DemoArgs,
    data_dir: &Path,
    logs: &Path,
) -> anyhow::Result<Option<LocalCloud>> {
    if args.no_cloud {
        return Ok(None);
    }
    eprintln!(
        "fleetgrid demo: starting the local cloud ({})",
        args.cloud_model
    );
    let spec = CloudSpec {
        data_dir: data_dir.join("cloud"),
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        threads: args.threads_per_vehicle,
        args: ["--model", args.cloud_model.as_str()]
            .map(OsString::from)
            .into(),
        log: LogFile::create(logs.join("cloud.log")),
    };
    let starting = fleetgrid.clone();
    let started = tokio::task::spawn_blocking(move || {
        LocalCloud::start_blocking(&starting, &spec, CLOUD_READY_TIMEOUT)
    })
    .await
    .context("start the local cloud")??;
    Ok(Some(started))
}

/// The gateway flags and environment that point it at the local cloud (which follows
/// predictions: the exact cascade asks it once).
pub(crate) fn cloud_flags(
    cloud_http: SocketAddr,
    cloud_key: &str,
    cloud_model: &str,
) -> (Vec<OsString>, (OsString, OsString)) {
    let cloud_url = format!("http://{cloud_http}/v1");
    let flags = [
        "--cloud-url",
        &cloud_url,
        "--cloud-model",
        cloud_model,
        "--cloud-key-env",
        DEMO_CLOUD_KEY_ENV,
        "--cloud-follows-predictions",
    ]
    .map(OsString::from)
    .into();
    (flags, (DEMO_CLOUD_KEY_ENV.into(), cloud_key.into()))
}

/// Starts the coordinator, pointed at the local cloud when there is one, and waits until it
/// listens.
async fn start_coordinator(
    fleetgrid: &Fleetgrid,
    args: &DemoArgs,
    data_dir: &Path,
    logs: &Path,
    cloud: Option<(SocketAddr, String)>,
) -> anyhow::Result<Coordinator> {
    let log = logs.join("coordinator.log");
    let mut spec = CoordinatorSpec::new(data_dir, LogFile::create(&log));
    spec.http_listen = args.http_listen;
    spec.models = vec![args.model.clone()];
    if let Some((cloud_http, cloud_key)) = cloud {
        let (flags, env) = cloud_flags(cloud_http, &cloud_key, &args.cloud_model);
        spec.args = flags;
        spec.env = vec![env];
    }
    Coordinator::start(fleetgrid, &spec, STARTUP_TIMEOUT)
        .await
        .with_context(|| format!("start the coordinator; see {}", log.display()))
}

// The local cloud (`cloud`) waits for its node with this.
pub(crate) use stack::probe::nodes_connected;

/// The API key, and a curl and a Python line a user can paste, against the gateway at `http`.
pub(crate) fn print_client_lines(http: SocketAddr, api_key: &str, model: &str) {
    println!("API key (tenant 'demo'): {api_key}");
    println!();
    println!("curl:");
    println!("  curl -s http://{http}/v1/chat/completions \\");
    println!("    -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\");
    println!("    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}], \"temperature\": 0.2}}'");
    println!();
    println!("Python (pip install openai):");
    println!("  from openai import OpenAI");
    println!("  client = OpenAI(base_url=\"http://{http}/v1\", api_key=\"{api_key}\")");
    println!("  stream = client.chat.completions.create(model=\"{model}\", stream=True, temperature=0.3,");
    println!("      messages=[{{\"role\": \"user\", \"content\": \"Write a haiku about electric cars.\"}}])");
    println!("  for chunk in stream: print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)");
    println!();
}

fn print_instructions(http: SocketAddr, keys: &Keys, logs: &Path, args: &DemoArgs) {
    let api_key = &keys.api;
    println!();
    println!(
        "fleetgrid demo is running: a coordinator and simulated vehicles serving {}.",
        args.model
    );
    println!();
    let model = &args.model;
    print_client_lines(http, api_key, model);
    if args.no_cloud {
        println!(
            "Models: '{model}' (the fleet; started with --no-cloud, so no 'auto' or 'cloud/...')."
        );
    } else {
        println!(
            "Models: '{model}' (the fleet), 'cloud/{}' (the local cloud) or 'auto' (the router decides;",
            args.cloud_model
        );
        println!("the x-fleetgrid-tier and x-fleetgrid-route-reason headers say which tier answered and why).");
    }
    println!();
    for (owner, key, cars) in &keys.owners {
        println!(
            "Owner key (owner '{owner}', whose cars are {}): {key}",
            cars.join(", ")
        );
    }
    if let Some((_, key, _)) = keys.owners.first() {
        println!("  curl -s http://{http}/owner/v1/vehicles -H 'Authorization: Bearer {key}'");
    }
    if keys.owners.len() > 1 {
        println!("Each owner's cars verify the other's answers: their trust is in that listing.");
    }
    println!();
    println!(
        "A car that goes away (try kill -9 on one of the agents) hands its work to the others and comes home after {} s.",
        args.come_home_secs
    );
    if args.chaos {
        println!("Chaos is on: cars are unplugged, leave and are killed at random; watch this log and fleetgrid_reassignments_total.");
    }
    println!();
    println!(
        "Health: http://{http}/health   Metrics: http://{http}/metrics   Logs: {}",
        logs.display()
    );
    println!("Press Ctrl-C to stop.");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::demo_chaos::{AWAY_MAX, AWAY_MIN, DEPARTURE_NOTICE, INTERVAL_MAX, INTERVAL_MIN};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        demo: super::DemoArgs,
    }

    #[test]
    fn the_help_of_chaos_states_the_bounds_in_force() {
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let away = format!("{} to {} s", AWAY_MIN.as_secs(), AWAY_MAX.as_secs());
        for stated in [
            format!(
                "every {} to {} s",
                INTERVAL_MIN.as_secs(),
                INTERVAL_MAX.as_secs()
            ),
            format!("unplug a car (for {away})"),
            format!(
                "({} s notice, back {away} after)",
                DEPARTURE_NOTICE.as_secs()
            ),
            format!("(back {away} later)"),
        ] {
            assert!(
                help.contains(&stated),
                "--help does not say {stated:?}:\n{help}"
            );
        }
    }
}
