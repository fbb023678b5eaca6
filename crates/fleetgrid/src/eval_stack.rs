//! The evaluation's own stack, when no gateway is given: a coordinator and
//! one simulated, always-plugged-in vehicle per model, as child processes of
//! this one (started with `--exit-with-parent`, stopped when dropped).
//!
//! The stand-in "cloud" model is served as a second fleet model of the same
//! coordinator, so that both tiers are reached over the same OpenAI API.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use coordinator::store::{Store, StoreError, TenantClass};
use stack::{AgentSpec, Coordinator, CoordinatorSpec, Fleetgrid, LogFile, Stack};

/// How long the stack may take to load its models and connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(300);

/// The tenant the evaluation authenticates as (class `fleet`: metered, never refused for money).
const EVAL_TENANT: &str = "eval";

/// The owner of the evaluation's simulated vehicles (settlement credits an owner).
const EVAL_OWNER: &str = "eval-owner";

pub struct EvalStack {
    pub http: SocketAddr,
    pub api_key: String,
    /// Its processes, stopped when the evaluation's stack is dropped.
    _processes: Stack,
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
        for name in models {
            crate::home::ensure_model(name, "fleetgrid eval").await?;
        }
        let database = Store::open(data_dir)
            .await
            .context("open the evaluation database")?;
        let api_key = tenant_key(&database).await?;
        let exe = std::env::current_exe().context("find the fleetgrid executable")?;
        let fleetgrid = Fleetgrid::new(exe);
        let mut spec =
            CoordinatorSpec::new(data_dir, LogFile::create(logs.join("coordinator.log")));
        spec.models = models.to_vec();
        let coordinator = Coordinator::start(&fleetgrid, &spec, STARTUP_TIMEOUT)
            .await
            .context("start the coordinator")?;
        let mut running = Stack::new(fleetgrid, coordinator);
        let trace = data_dir.join("plugged-in.json");
        std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE)
            .with_context(|| format!("write {}", trace.display()))?;
        for (number, model) in models.iter().enumerate() {
            let node = format!("eval-vehicle-{}", number + 1);
            let credential = node_credential(&database, &node).await?;
            let agent = AgentSpec {
                node_id: node.clone(),
                credential,
                vehicle_state: format!("sim:{}", trace.display()),
                model: model.clone(),
                parallel: 2,
                threads: threads_per_vehicle,
                args: Vec::new(),
                log: LogFile::create(logs.join(format!("{node}.log"))),
            };
            running
                .add_agent(&agent)
                .with_context(|| format!("start agent {node}"))?;
        }
        let vehicles = u64::try_from(models.len()).context("count the models")?;
        running
            .wait_for_vehicles(vehicles, STARTUP_TIMEOUT)
            .await
            .with_context(|| format!("start the evaluation's vehicles; see {}", logs.display()))?;
        Ok(EvalStack {
            http: running.http(),
            api_key,
            _processes: running,
        })
    }
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
    crate::demo::enrolled_credential(database, name, EVAL_OWNER).await
}
