//! `fleetgrid demo`: a coordinator and three simulated vehicles on this
//! machine, serving a real model, until Ctrl-C.
//!
//! Every process it starts is its child, started with `--exit-with-parent`,
//! and killed on the way out, so nothing outlives the demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use coordinator::store::{Store, StoreError, TenantClass};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::home;

/// The model the demo serves.
const DEMO_MODEL: &str = "smollm2-135m-instruct";

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

/// How long children get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Address of the OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Number of simulated vehicles.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    vehicles: u32,
    /// Engine threads per vehicle.
    #[arg(long, default_value_t = 1)]
    threads_per_vehicle: u32,
    /// Sequences each vehicle decodes together.
    #[arg(long, default_value_t = 2)]
    parallel: u32,
    /// Where the demo keeps its database, traces and logs [default: $FLEETGRID_HOME/demo].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Children that are killed when this is dropped, whatever the exit path.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| home::root().join("demo"));
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    for model in [DEMO_MODEL, crate::cloud::LOCAL_CLOUD_MODEL] {
        eprintln!("fleetgrid demo: fetching and verifying {model}");
        let store = home::model_store()?;
        let entry = models::find(model).context("demo model missing from the catalog")?;
        tokio::task::spawn_blocking(move || store.fetch(entry))
            .await
            .context("fetch task")?
            .with_context(|| format!("fetch {model}"))?;
    }

    let database = Store::open(&data_dir)
        .await
        .context("open the demo database")?;
    let api_key = demo_key(&database).await?;
    let mut children = Children(Vec::new());
    let exe = std::env::current_exe().context("find the fleetgrid executable")?;
    // The local "cloud" (system-2) the coordinator escalates to, over HTTP.
    eprintln!(
        "fleetgrid demo: starting the local cloud ({})",
        crate::cloud::LOCAL_CLOUD_MODEL
    );
    let cloud = crate::cloud::start_local_cloud(
        &exe,
        &data_dir.join("cloud"),
        log_file(&logs, "cloud")?,
        args.threads_per_vehicle,
    )
    .await?;
    let cloud_upstream = (cloud.http, cloud.api_key.clone());
    children.0.push(("cloud".into(), cloud.child));
    let (http, grpc) = start_coordinator(
        &exe,
        &args,
        &data_dir,
        &logs,
        &mut children,
        &cloud_upstream,
    )
    .await?;
    for index in 0..args.vehicles as usize {
        let (trace_name, trace) = TRACES[index % TRACES.len()];
        let name = if index < TRACES.len() {
            trace_name.to_string()
        } else {
            format!("car-{}", index + 1)
        };
        let credential = node_credential(&database, &name).await?;
        let trace_path = data_dir.join(format!("{trace_name}.json"));
        std::fs::write(&trace_path, trace)
            .with_context(|| format!("write {}", trace_path.display()))?;
        let child = Command::new(&exe)
            .args([
                "agent",
                "--coordinator",
                &format!("http://{grpc}"),
                "--node-id",
                &name,
            ])
            .args(["--vehicle-state", &format!("sim:{}", trace_path.display())])
            .args([
                "--model",
                DEMO_MODEL,
                "--parallel",
                &args.parallel.to_string(),
            ])
            .args([
                "--threads",
                &args.threads_per_vehicle.to_string(),
                "--exit-with-parent",
            ])
            .env("FLEETGRID_NODE_CREDENTIAL", credential)
            .stdout(Stdio::null())
            .stderr(log_file(&logs, &name)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start agent {name}"))?;
        children.0.push((name, child));
    }
    wait_for_vehicles(http, args.vehicles as usize, &mut children).await?;
    print_instructions(http, &api_key, &logs);
    wait_for_stop(&mut children).await;
    stop(&mut children).await;
    eprintln!("fleetgrid demo: stopped");
    Ok(())
}

fn log_file(logs: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = logs.join(format!("{name}.log"));
    std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))
}

/// The demo tenant's API key: a fresh key on every run (keys are stored hashed).
async fn demo_key(database: &Store) -> anyhow::Result<String> {
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

/// The owner of the demo's simulated vehicles.
const DEMO_OWNER: &str = "demo-owner";

async fn node_credential(database: &Store, name: &str) -> anyhow::Result<String> {
    let now = coordinator::core::now_ms().0;
    database.ensure_owner(DEMO_OWNER, now).await?;
    match database.add_node(name, DEMO_OWNER, now).await {
        Ok(credential) => Ok(credential),
        Err(StoreError::NodeExists(_)) => database
            .rotate_node_credential(name)
            .await?
            .with_context(|| format!("node {name} vanished")),
        Err(error) => Err(error.into()),
    }
}

async fn start_coordinator(
    exe: &Path,
    args: &DemoArgs,
    data_dir: &Path,
    logs: &Path,
    children: &mut Children,
    cloud: &(SocketAddr, String),
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--http-listen",
            &args.http_listen.to_string(),
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .args(["--model", DEMO_MODEL, "--exit-with-parent", "--data-dir"])
        .arg(data_dir)
        .args(["--cloud-url", &format!("http://{}/v1", cloud.0)])
        .args(["--cloud-key-env", DEMO_CLOUD_KEY_ENV])
        .env(DEMO_CLOUD_KEY_ENV, &cloud.1)
        .stdout(Stdio::piped())
        .stderr(log_file(logs, "coordinator")?)
        .kill_on_drop(true)
        .spawn()
        .context("start the coordinator")?;
    let stdout = child.stdout.take().context("coordinator stdout")?;
    children.0.push(("coordinator".into(), child));
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(STARTUP_TIMEOUT, lines.next_line())
        .await
        .context("the coordinator did not start in time")??
        .with_context(|| {
            format!(
                "the coordinator exited; see {}",
                logs.join("coordinator.log").display()
            )
        })?;
    let bound = coordinator::Bound::parse_announcement(&line)
        .with_context(|| format!("unexpected coordinator output {line:?}"))?;
    Ok((bound.http, bound.grpc))
}

/// How many nodes the coordinator at `http` reports connected (the `fleetgrid_nodes_connected`
/// gauge of `/metrics`; `/health` says only whether it is healthy); 0 while it does not answer.
pub(crate) async fn nodes_connected(client: &reqwest::Client, http: SocketAddr) -> u64 {
    let metrics = match client.get(format!("http://{http}/metrics")).send().await {
        Ok(response) => response.text().await.ok(),
        Err(_) => None,
    };
    metrics
        .as_deref()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("fleetgrid_nodes_connected ")
                    .and_then(|value| value.trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
}

async fn wait_for_vehicles(
    http: SocketAddr,
    expected: usize,
    children: &mut Children,
) -> anyhow::Result<()> {
    eprintln!("fleetgrid demo: waiting for {expected} vehicles to connect (loading the model)");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    loop {
        for (name, child) in &mut children.0 {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}) during start-up; see its log");
            }
        }
        let connected = nodes_connected(&client, http).await;
        if connected as usize >= expected {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {connected} of {expected} vehicles connected in time");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn print_instructions(http: SocketAddr, api_key: &str, logs: &Path) {
    println!();
    println!(
        "fleetgrid demo is running: a coordinator and simulated vehicles serving {DEMO_MODEL}."
    );
    println!();
    println!("API key (tenant 'demo'): {api_key}");
    println!();
    println!("curl:");
    println!("  curl -s http://{http}/v1/chat/completions \\");
    println!("    -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\");
    println!("    -d '{{\"model\": \"{DEMO_MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}], \"temperature\": 0.2}}'");
    println!();
    println!("Python (pip install openai):");
    println!("  from openai import OpenAI");
    println!("  client = OpenAI(base_url=\"http://{http}/v1\", api_key=\"{api_key}\")");
    println!("  stream = client.chat.completions.create(model=\"{DEMO_MODEL}\", stream=True, temperature=0.3,");
    println!("      messages=[{{\"role\": \"user\", \"content\": \"Write a haiku about electric cars.\"}}])");
    println!("  for chunk in stream: print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)");
    println!();
    println!(
        "Models: '{DEMO_MODEL}' (the fleet), 'cloud/{}' (the local cloud) or 'auto' (the router decides;",
        crate::cloud::LOCAL_CLOUD_MODEL
    );
    println!("the x-fleetgrid-tier and x-fleetgrid-route-reason headers say which tier answered and why).");
    println!();
    println!(
        "Health: http://{http}/health   Metrics: http://{http}/metrics   Logs: {}",
        logs.display()
    );
    println!("Press Ctrl-C to stop.");
}

/// Returns on Ctrl-C, SIGTERM, or when any child exits.
async fn wait_for_stop(children: &mut Children) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).ok();
    let child_exit = async {
        loop {
            for (name, child) in &mut children.0 {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("fleetgrid demo: {name} exited ({status}); stopping");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match terminate.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {}
        _ = child_exit => {}
    }
}

/// SIGTERM to every child, then SIGKILL to those still running after the grace.
async fn stop(children: &mut Children) {
    for (_, child) in &children.0 {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for (name, child) in &mut children.0 {
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            tracing::warn!(child = %name, "did not stop in time; killing");
            let _ = child.kill().await;
        }
    }
}
