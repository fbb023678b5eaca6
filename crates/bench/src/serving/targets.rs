//! Starting the two serving targets as child processes and waiting until they answer:
//! `llama-server`, and `fleetgrid serve` with one `fleetgrid agent`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{ServingConfig, CONTEXT_TOKENS_PER_SLOT};
use crate::fleetgrid_cli::{last_line, FleetgridCli, ALWAYS_AVAILABLE_TRACE_JSON, MODEL_NAME};
use crate::loadgen::{run_load, LoadSpec};
use crate::process::{free_local_port, remove_dir_if_present, run_logged, ChildGuard};
use crate::reference::{sha256_hex, ReferenceBinaries};
use crate::BenchError;
use models::{ModelStore, Sha256Digest};

/// llama-server loads a small model in seconds; this only catches one that never comes up.
const LLAMA_SERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Our stack must start the coordinator, connect the agent, load the model and measure it.
const FLEETGRID_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Pause between readiness probes.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A started target: where to send load, and the processes behind it, killed when this is dropped
/// (the last started first, so that an agent never outlives its coordinator).
pub(super) struct RunningTarget {
    pub(super) spec: LoadSpec,
    children: Vec<ChildGuard>,
}

impl Drop for RunningTarget {
    fn drop(&mut self) {
        while let Some(child) = self.children.pop() {
            drop(child);
        }
    }
}

fn base_spec(target_name: &str, port: u16, api_key: Option<String>) -> LoadSpec {
    LoadSpec {
        target_name: target_name.to_owned(),
        base_url: format!("http://127.0.0.1:{port}"),
        api_key,
        model: MODEL_NAME.to_owned(),
        concurrency: 1,
        requests: 1,
        first_request: 0,
        max_tokens: 1,
        ignore_eos: false,
    }
}

/// `llama-server -m MODEL -t THREADS -np SLOTS -c SLOTS×2048 -cb`, ready to serve.
pub(super) async fn start_llama_server(
    refs: &ReferenceBinaries,
    config: &ServingConfig,
) -> Result<RunningTarget, BenchError> {
    let port = free_local_port()?;
    let context_tokens = config.slots.saturating_mul(CONTEXT_TOKENS_PER_SLOT);
    let mut command = Command::new(&refs.llama_server);
    command
        .arg("-m")
        .arg(&config.model_path)
        .args(["-t", &config.threads.to_string()])
        .args(["-np", &config.slots.to_string()])
        .args(["-c", &context_tokens.to_string()])
        .arg("-cb")
        // Flash attention as our engine runs it (off: it keeps a moved generation bit-exact), so
        // that the two serving paths are compared on the same kernels.
        .args(["-fa", "off"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()]);
    let log_path = config.work_dir.join("llama-server.log");
    let child = ChildGuard::spawn("llama-server", &mut command, &log_path)?;
    let mut target = RunningTarget {
        spec: base_spec("llama-server", port, None),
        children: vec![child],
    };
    let health_url = format!("{}/health", target.spec.base_url);
    let client = reqwest::Client::new();
    wait_until(
        &mut target,
        "llama-server",
        LLAMA_SERVER_READY_TIMEOUT,
        || async {
            let response = client.get(&health_url).send().await;
            response.is_ok_and(|response| response.status().is_success())
        },
    )
    .await?;
    Ok(target)
}

/// `fleetgrid serve` and one `fleetgrid agent` with `config.slots` parallel sequences, in a fresh
/// data directory, ready to complete a chat request.
pub(super) async fn start_fleetgrid(
    binary: &Path,
    config: &ServingConfig,
) -> Result<RunningTarget, BenchError> {
    let root = config.work_dir.join("fleetgrid");
    remove_dir_if_present(&root)?;
    let cli = FleetgridCli {
        binary: binary.to_owned(),
        data_dir: root.join("data"),
        home_dir: root.join("home"),
    };
    for dir in [&cli.data_dir, &cli.home_dir] {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create", dir, e))?;
    }
    place_model_in_store(&config.model_path, &cli.home_dir)?;
    let trace_path = root.join("vehicle-trace.json");
    std::fs::write(&trace_path, ALWAYS_AVAILABLE_TRACE_JSON)
        .map_err(|e| BenchError::io("write", &trace_path, e))?;
    let api_key = secret_from(&mut cli.create_tenant(), "fleetgrid tenants create", &root)?;
    let credential = secret_from(&mut cli.add_node(), "fleetgrid nodes add", &root)?;
    let (http_port, grpc_port) = (free_local_port()?, free_local_port()?);
    let serve = ChildGuard::spawn(
        "fleetgrid serve",
        &mut cli.serve(http_port, grpc_port),
        &root.join("serve.log"),
    )?;
    let mut target = RunningTarget {
        spec: base_spec("fleetgrid", http_port, Some(api_key)),
        children: vec![serve],
    };
    let mut agent_command = cli.agent(
        grpc_port,
        &credential,
        &trace_path,
        config.slots,
        config.threads,
    );
    let agent = ChildGuard::spawn(
        "fleetgrid agent",
        &mut agent_command,
        &root.join("agent.log"),
    )?;
    target.children.push(agent);
    // The stack is ready once a request goes all the way to the agent's engine and back.
    let probe = target.spec.clone();
    wait_until(
        &mut target,
        "fleetgrid",
        FLEETGRID_READY_TIMEOUT,
        || async { run_load(&probe).await.is_ok() },
    )
    .await?;
    Ok(target)
}

/// Polls `ready` until it says yes, failing early with a child's own output if one exits.
async fn wait_until<F, Fut>(
    target: &mut RunningTarget,
    what: &str,
    timeout: Duration,
    ready: F,
) -> Result<(), BenchError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        for child in &mut target.children {
            child.check_running()?;
        }
        if ready().await {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(BenchError::NotReady {
                what: what.to_owned(),
                waited_seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(READY_POLL_INTERVAL).await;
    }
}

/// Runs a CLI command that prints a secret on its last line, and returns that line.
fn secret_from(command: &mut Command, program: &str, log_dir: &Path) -> Result<String, BenchError> {
    let log_name = program.replace(' ', "-") + ".log";
    let stdout = run_logged(command, program, &log_dir.join(log_name))?;
    last_line(&stdout)
        .map(str::to_owned)
        .ok_or_else(|| BenchError::Parse {
            what: "secret from the fleetgrid cli",
            reason: format!("{program} printed nothing"),
        })
}

/// Puts the model file into the model store under `FLEETGRID_HOME` as [`MODEL_NAME`]: the blob
/// as a hard link where possible, since the file is large (a copy otherwise), then the store's
/// own import, which verifies it and records the name the agent resolves.
fn place_model_in_store(model_path: &Path, home_dir: &Path) -> Result<PathBuf, BenchError> {
    let digest_hex = sha256_hex(model_path)?;
    let digest: Sha256Digest = digest_hex.parse().map_err(|_| BenchError::Parse {
        what: "model digest",
        reason: digest_hex.clone(),
    })?;
    let store = ModelStore::open(home_dir.join("models"))?;
    let blob = store.blob_path(&digest);
    if let Some(blobs) = blob.parent() {
        std::fs::create_dir_all(blobs).map_err(|e| BenchError::io("create", blobs, e))?;
    }
    if !blob.exists() {
        // A failed link leaves nothing behind; the import below then copies the file.
        let _ = std::fs::hard_link(model_path, &blob);
    }
    let model = store.import(MODEL_NAME, &[model_path.to_owned()], &digest)?;
    Ok(model.path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_resolvable_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, b"abc").expect("write");
        let home = dir.path().join("home");
        let blob = place_model_in_store(&model, &home).expect("place");
        assert!(blob.ends_with(
            "models/blobs/sha256/ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        ));
        assert_eq!(std::fs::read(&blob).expect("read blob"), b"abc");
        // The agent finds the model by its catalog name, as `--model` names it.
        let store = ModelStore::open(home.join("models")).expect("open store");
        let resolved = store.resolve(MODEL_NAME).expect("resolve by name");
        assert_eq!(resolved.path, blob);
    }
}
