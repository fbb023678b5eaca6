//! The evaluation's own stack, when no gateway is given: a coordinator and
//! one simulated, always-plugged-in vehicle per model, as child processes of
//! this one (started with `--exit-with-parent`, killed when dropped).
//!
//! The stand-in "cloud" model is served as a second fleet model of the same
//! coordinator, so that both tiers are reached over the same OpenAI API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use coordinator::store::{Store, StoreError, TenantClass};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long the stack may take to load its models and connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);

/// How often start-up polls the coordinator's health.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(300);

/// The tenant the evaluation authenticates as (class `fleet`: metered, never refused for money).
const EVAL_TENANT: &str = "eval";

/// The owner of the evaluation's simulated vehicles (settlement credits an owner).
const EVAL_OWNER: &str = "eval-owner";

/// A vehicle plugged in and charging for a whole day.
const PLUGGED_IN_TRACE: &str = r#"{"start_soc": 0.8, "events": [
  {"at_s": 0, "plugged_in": true, "charging": true, "soc": 0.8, "departure_in_s": 86400, "temperature_c": 20.0}
]}"#;

pub struct EvalStack {
    pub http: SocketAddr,
    pub api_key: String,
    children: Vec<(String, Child)>,
    pub logs: PathBuf,
}

impl Drop for EvalStack {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.start_kill();
        }
    }
}

impl EvalStack {
    /// Starts a coordinator serving `models` and one agent per model.
    pub async fn start(
        models: &[String],
        data_dir: &Path,
        threads_per_vehicle: u32,
    ) -> anyhow::Result<EvalStack> {
        let logs = data_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
        let store = crate::home::model_store()?;
        for name in models {
            if store.resolve(name).is_ok() {
                continue;
            }
            let entry = models::find(name)
                .with_context(|| format!("model {name:?} is not in the catalog"))?;
            eprintln!("fleetgrid eval: fetching {name}");
            let store = crate::home::model_store()?;
            tokio::task::spawn_blocking(move || store.fetch(entry))
                .await
                .context("fetch task")?
                .with_context(|| format!("fetch {name}"))?;
        }
        let database = Store::open(data_dir)
            .await
            .context("open the evaluation database")?;
        let api_key = tenant_key(&database).await?;
        let exe = std::env::current_exe().context("find the fleetgrid executable")?;
        let mut stack = EvalStack {
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key,
            children: Vec::new(),
            logs: logs.clone(),
        };
        let grpc = stack.start_coordinator(&exe, models, data_dir).await?;
        let trace = data_dir.join("plugged-in.json");
        std::fs::write(&trace, PLUGGED_IN_TRACE)
            .with_context(|| format!("write {}", trace.display()))?;
        for (number, model) in models.iter().enumerate() {
            let node = format!("eval-vehicle-{}", number + 1);
            let credential = node_credential(&database, &node).await?;
            let child = Command::new(&exe)
                .args(["agent", "--coordinator", &format!("http://{grpc}")])
                .args(["--node-id", &node, "--model", model])
                .args(["--vehicle-state", &format!("sim:{}", trace.display())])
                .args(["--threads", &threads_per_vehicle.to_string()])
                .args(["--parallel", "2", "--exit-with-parent"])
                .env("FLEETGRID_NODE_CREDENTIAL", credential)
                .stdout(Stdio::null())
                .stderr(log_file(&logs, &node)?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start agent {node}"))?;
            stack.children.push((node, child));
        }
        stack.wait_for_vehicles(models.len()).await?;
        Ok(stack)
    }

    async fn start_coordinator(
        &mut self,
        exe: &Path,
        models: &[String],
        data_dir: &Path,
    ) -> anyhow::Result<SocketAddr> {
        let mut command = Command::new(exe);
        command.args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ]);
        for model in models {
            command.args(["--model", model]);
        }
        let mut child = command
            .args(["--exit-with-parent", "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(log_file(&self.logs, "coordinator")?)
            .kill_on_drop(true)
            .spawn()
            .context("start the coordinator")?;
        let stdout = child.stdout.take().context("coordinator stdout")?;
        self.children.push(("coordinator".into(), child));
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(STARTUP_TIMEOUT, lines.next_line())
            .await
            .context("the coordinator did not start in time")??
            .with_context(|| {
                format!(
                    "the coordinator exited; see {}",
                    self.logs.join("coordinator.log").display()
                )
            })?;
        let bound = coordinator::Bound::parse_announcement(&line)
            .with_context(|| format!("unexpected coordinator output {line:?}"))?;
        self.http = bound.http;
        Ok(bound.grpc)
    }

    async fn wait_for_vehicles(&mut self, expected: usize) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            for (name, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{name} exited ({status}) during start-up; see {}",
                        self.logs.join(format!("{name}.log")).display()
                    );
                }
            }
            let connected = crate::demo::nodes_connected(&client, self.http).await;
            if connected as usize >= expected {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {connected} of {expected} evaluation vehicles connected in time");
            }
            tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
        }
    }
}

fn log_file(logs: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = logs.join(format!("{name}.log"));
    std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))
}

/// A fresh key for the evaluation tenant (keys are stored hashed).
async fn tenant_key(database: &Store) -> anyhow::Result<String> {
    let now = coordinator::core::now_ms().0;
    match database
        .create_tenant(EVAL_TENANT, TenantClass::Fleet, now)
        .await
    {
        Ok((_, key)) => Ok(key),
        Err(StoreError::TenantExists(_)) => Ok(database.create_api_key(EVAL_TENANT, now).await?),
        Err(error) => Err(error.into()),
    }
}

async fn node_credential(database: &Store, name: &str) -> anyhow::Result<String> {
    let now = coordinator::core::now_ms().0;
    database.ensure_owner(EVAL_OWNER, now).await?;
    match database.add_node(name, EVAL_OWNER, now).await {
        Ok(credential) => Ok(credential),
        Err(StoreError::NodeExists(_)) => database
            .rotate_node_credential(name)
            .await?
            .with_context(|| format!("node {name} vanished")),
        Err(error) => Err(error.into()),
    }
}
