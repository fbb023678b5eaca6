//! Starting the two serving targets as child processes and waiting until they answer:
//! `llama-server`, and `fleetgrid serve` with one `fleetgrid agent` (started with the `stack`
//! crate, as every fleetgrid stack is), in a scratch data directory with a tenant and a node
//! enrolled through the CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use models::{ModelStore, Sha256Digest};
use stack::{AgentSpec, Coordinator, CoordinatorSpec, Fleetgrid, LogFile, Process, Stack, Stdout};

use super::{ServingConfig, CONTEXT_TOKENS_PER_SLOT};
use crate::loadgen::LoadSpec;
use crate::process::{free_local_port, remove_dir_if_present};
use crate::reference::{sha256_hex, ReferenceBinaries};
use crate::BenchError;

/// The catalog name of the system-1 model the agent serves and the client asks for.
pub(crate) const MODEL_NAME: &str = "smollm2-135m-instruct";
/// The tenant the load generator authenticates as: fleet class, metered but never refused for
/// money, so that the benchmark needs no top-up.
const TENANT_NAME: &str = "bench";
/// The node id of the single agent.
const NODE_ID: &str = "bench-node-1";

/// llama-server loads a small model in seconds; this only catches one that never comes up.
const LLAMA_SERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Our stack must start the coordinator, connect the agent and load the model.
const FLEETGRID_READY_TIMEOUT: Duration = Duration::from_secs(300);

/// A started target: where to send load, and the processes behind it, stopped when this is
/// dropped.
pub(crate) struct RunningTarget {
    pub(crate) spec: LoadSpec,
    _llama_server: Option<Process>,
    _fleetgrid: Option<Stack>,
}

fn base_spec(target_name: &str, base_url: String, api_key: Option<String>) -> LoadSpec {
    LoadSpec {
        target_name: target_name.to_owned(),
        base_url,
        api_key,
        model: MODEL_NAME.to_owned(),
        concurrency: 1,
        requests: 1,
        first_request: 0,
        max_tokens: 1,
        ignore_eos: false,
        response_format: None,
    }
}

/// `llama-server -m MODEL -t THREADS -np SLOTS -c SLOTS×2048 -cb`, ready to serve.
pub(crate) async fn start_llama_server(
    refs: &ReferenceBinaries,
    config: &ServingConfig,
) -> Result<RunningTarget, BenchError> {
    let port = free_local_port()?;
    let context_tokens = config.slots.saturating_mul(CONTEXT_TOKENS_PER_SLOT);
    let mut command = Command::new(&refs.llama_server);
    command
        // The reference runs with llama.cpp's own defaults, not the switch our engine set.
        .env_remove(engine::TILED_MATMUL_ENV)
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
    let log = LogFile::create(config.work_dir.join("llama-server.log"));
    let process = Process::spawn("llama-server", command, &log, Stdout::Log)?;
    let base_url = format!("http://127.0.0.1:{port}");
    let health_url = format!("{base_url}/health");
    let client = stack::probe::client();
    stack::probe::wait_until(
        &[&process],
        "llama-server answered",
        LLAMA_SERVER_READY_TIMEOUT,
        || stack::probe::answers(&client, &health_url),
    )
    .await?;
    Ok(RunningTarget {
        spec: base_spec("llama-server", base_url, None),
        _llama_server: Some(process),
        _fleetgrid: None,
    })
}

/// `fleetgrid serve` and one `fleetgrid agent` with `config.slots` parallel sequences, in a fresh
/// data directory, ready once the agent is connected.
pub(crate) async fn start_fleetgrid(
    binary: &Path,
    config: &ServingConfig,
) -> Result<RunningTarget, BenchError> {
    let root = config.work_dir.join("fleetgrid");
    remove_dir_if_present(&root)?;
    let (data_dir, home_dir) = (root.join("data"), root.join("home"));
    for dir in [&data_dir, &home_dir] {
        std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create", dir, e))?;
    }
    place_model_in_store(&config.model_path, &home_dir)?;
    let trace_path = root.join("vehicle-trace.json");
    std::fs::write(&trace_path, stack::ALWAYS_PLUGGED_IN_TRACE)
        .map_err(|e| BenchError::io("write", &trace_path, e))?;
    // Every command finds the model store under this home.
    let fleetgrid = Fleetgrid::new(binary).env("FLEETGRID_HOME", &home_dir);
    let api_key = fleetgrid.cli(
        &["tenants", "create", TENANT_NAME, "--class", "fleet"],
        &data_dir,
    )?;
    let credential = fleetgrid.cli(&["nodes", "add", NODE_ID], &data_dir)?;
    let mut serve = CoordinatorSpec::new(&data_dir, LogFile::create(root.join("serve.log")));
    serve.models = vec![MODEL_NAME.to_owned()];
    let coordinator = Coordinator::start(&fleetgrid, &serve, FLEETGRID_READY_TIMEOUT).await?;
    let mut running = Stack::new(fleetgrid, coordinator);
    running.add_agent(&AgentSpec {
        node_id: NODE_ID.to_owned(),
        credential,
        vehicle_state: format!("sim:{}", trace_path.display()),
        model: MODEL_NAME.to_owned(),
        parallel: config.slots,
        threads: config.threads,
        args: Vec::new(),
        log: LogFile::create(root.join("agent.log")),
    })?;
    running
        .wait_for_vehicles(1, FLEETGRID_READY_TIMEOUT)
        .await?;
    Ok(RunningTarget {
        spec: base_spec(
            "fleetgrid",
            format!("http://{}", running.http()),
            Some(api_key),
        ),
        _llama_server: None,
        _fleetgrid: Some(running),
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
