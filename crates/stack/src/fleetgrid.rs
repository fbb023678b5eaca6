//! The command lines of one `fleetgrid` binary, kept in one place so that they
//! follow the CLI when it changes: `serve` (the coordinator), `agent`,
//! `cloud serve` (the local cloud) and one-shot commands such as `tenants
//! create`.
//!
//! Every long-running process is started with `--exit-with-parent`, so that
//! even a parent killed with SIGKILL, which runs no `Drop`, leaves nothing
//! behind for long.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use coordinator::Bound;

use crate::lines::Lines;
use crate::process::{LogFile, Process, Stdout};
use crate::StackError;

/// The variable through which an agent gets its node credential (kept off
/// its command line, which every local user can read).
pub const NODE_CREDENTIAL_ENV: &str = "FLEETGRID_NODE_CREDENTIAL";

/// A simulated vehicle plugged in and charging for a whole day, so that the
/// owner's rules never take it away while a stack runs.
pub const ALWAYS_PLUGGED_IN_TRACE: &str = r#"{"start_soc": 0.8, "events": [
  {"at_s": 0, "plugged_in": true, "charging": true, "soc": 0.8, "departure_in_s": 86400, "temperature_c": 20.0}
]}"#;

/// The field of the local cloud's announcement that carries its API key.
const CLOUD_API_KEY_FIELD: &str = "api_key=";

/// One `fleetgrid` binary, and the environment every command gets.
#[derive(Clone, Debug)]
pub struct Fleetgrid {
    binary: PathBuf,
    env: Vec<(OsString, OsString)>,
}

impl Fleetgrid {
    pub fn new(binary: impl Into<PathBuf>) -> Fleetgrid {
        Fleetgrid {
            binary: binary.into(),
            env: Vec::new(),
        }
    }

    /// Sets `key` for every command, e.g. `FLEETGRID_HOME`.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Fleetgrid {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The binary with the common environment and no arguments yet.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        command
    }

    /// Runs `fleetgrid ARGS --data-dir DATA_DIR` to its end and returns the
    /// last non-empty line it printed, where `tenants create` and `nodes add`
    /// print the secret.
    pub fn cli(&self, args: &[&str], data_dir: &Path) -> Result<String, StackError> {
        let described = format!("fleetgrid {}", args.join(" "));
        let output = self
            .command()
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .output()
            .map_err(|source| StackError::Spawn {
                name: described.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(StackError::CommandFailed {
                command: described,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        last_line(&String::from_utf8_lossy(&output.stdout))
            .map(str::to_owned)
            .ok_or(StackError::NoOutput { command: described })
    }

    /// `fleetgrid serve` as `spec` says.
    pub fn serve_command(&self, spec: &CoordinatorSpec) -> Command {
        let mut command = self.command();
        command
            .arg("serve")
            .args(["--http-listen", &spec.http_listen.to_string()])
            .args(["--grpc-listen", &spec.grpc_listen.to_string()]);
        for model in &spec.models {
            command.args(["--model", model]);
        }
        command
            .arg("--exit-with-parent")
            .args(&spec.args)
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .envs(spec.env.iter().map(|(key, value)| (key, value)));
        command
    }

    /// `fleetgrid agent` as `spec` says, dialling the coordinator at `grpc` over mTLS (it enrols
    /// with `spec`'s token the first time).
    pub fn agent_command(&self, grpc: SocketAddr, spec: &AgentSpec) -> Command {
        self.agent_command_dialling(&["--coordinator".to_owned(), agent_url(grpc)], spec)
    }

    /// `fleetgrid agent` as `spec` says, with `dial` naming where it connects. It keeps its key and
    /// certificate beside its log, in `identity/NODE`, so that a restart reuses them.
    pub(crate) fn agent_command_dialling(&self, dial: &[String], spec: &AgentSpec) -> Command {
        let mut command = self.command();
        command
            .arg("agent")
            .args(dial)
            .arg("--identity-dir")
            .arg(spec.identity_dir())
            .args(["--node-id", &spec.node_id])
            .args(["--vehicle-state", &spec.vehicle_state])
            .args(["--model", &spec.model])
            .args(["--parallel", &spec.parallel.to_string()])
            .args(["--threads", &spec.threads.to_string()])
            .args(&spec.args)
            .arg("--exit-with-parent")
            .env(NODE_CREDENTIAL_ENV, &spec.credential);
        command
    }

    /// Starts an agent dialling `grpc` over mTLS; it is ready once the coordinator reports it
    /// connected ([`crate::probe`]).
    pub fn agent(&self, grpc: SocketAddr, spec: &AgentSpec) -> Result<Process, StackError> {
        self.agent_at(&agent_url(grpc), spec)
    }

    /// Starts an agent dialling the cell at `url` (`https://` for mTLS, `http://` for a cell
    /// started with `--agent-plaintext`).
    pub fn agent_at(&self, url: &str, spec: &AgentSpec) -> Result<Process, StackError> {
        Process::spawn(
            spec.node_id.clone(),
            self.agent_command_dialling(&["--coordinator".to_owned(), url.to_owned()], spec),
            &spec.log,
            Stdout::Null,
        )
    }

    /// `fleetgrid cloud serve` as `spec` says.
    pub fn cloud_command(&self, spec: &CloudSpec) -> Command {
        let mut command = self.command();
        command
            .args([
                "cloud",
                "serve",
                "--http-listen",
                &spec.http_listen.to_string(),
            ])
            .args(["--threads", &spec.threads.to_string()])
            .args(&spec.args)
            .arg("--exit-with-parent")
            .arg("--data-dir")
            .arg(&spec.data_dir);
        command
    }
}

/// Starts a process that announces itself on its first line of stdout.
pub(crate) fn spawn_announcing(
    name: &str,
    command: Command,
    log: &LogFile,
) -> Result<(Process, Lines), StackError> {
    let mut process = Process::spawn(name, command, log, Stdout::Lines)?;
    let lines = process.lines().ok_or(StackError::ReaderLost {
        name: name.to_owned(),
    })?;
    Ok((process, lines))
}

/// The URL an agent dials for a cell listening on `grpc`: mTLS, as cells take agents unless
/// started with `--agent-plaintext`.
pub fn agent_url(grpc: SocketAddr) -> String {
    format!("https://{grpc}")
}

/// The last non-empty line of a command's output.
fn last_line(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty())
}

/// What `fleetgrid serve` is started with.
#[derive(Clone, Debug)]
pub struct CoordinatorSpec {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    /// `--model` for each.
    pub models: Vec<String>,
    /// Further `serve` flags.
    pub args: Vec<OsString>,
    /// Environment of the coordinator alone (a cloud key it reads from a variable).
    pub env: Vec<(OsString, OsString)>,
    pub log: LogFile,
}

impl CoordinatorSpec {
    /// A coordinator on `data_dir` listening on free loopback ports, serving
    /// the models its data directory's configuration names.
    pub fn new(data_dir: impl Into<PathBuf>, log: LogFile) -> CoordinatorSpec {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        CoordinatorSpec {
            data_dir: data_dir.into(),
            http_listen: any_port,
            grpc_listen: any_port,
            models: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            log,
        }
    }
}

/// A running coordinator and the addresses it announced.
pub struct Coordinator {
    pub process: Process,
    pub bound: Bound,
}

impl Coordinator {
    /// Starts `fleetgrid serve` and waits until it announces its addresses.
    pub fn start_blocking(
        fleetgrid: &Fleetgrid,
        spec: &CoordinatorSpec,
        timeout: Duration,
    ) -> Result<Coordinator, StackError> {
        let (process, lines) =
            spawn_announcing("coordinator", fleetgrid.serve_command(spec), &spec.log)?;
        let bound = lines.first_blocking(timeout, Bound::parse_announcement)?;
        Ok(Coordinator { process, bound })
    }

    /// [`Coordinator::start_blocking`] on a blocking thread, for async callers.
    pub async fn start(
        fleetgrid: &Fleetgrid,
        spec: &CoordinatorSpec,
        timeout: Duration,
    ) -> Result<Coordinator, StackError> {
        let (fleetgrid, spec) = (fleetgrid.clone(), spec.clone());
        tokio::task::spawn_blocking(move || Coordinator::start_blocking(&fleetgrid, &spec, timeout))
            .await
            .map_err(|_| StackError::ReaderLost {
                name: "coordinator".to_owned(),
            })?
    }
}

/// What one `fleetgrid agent` is started with.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub node_id: String,
    pub credential: String,
    /// `--vehicle-state`: `sim:TRACE`, `file:FEED`, `datacenter`.
    pub vehicle_state: String,
    pub model: String,
    /// Sequences decoded together.
    pub parallel: u32,
    /// Engine threads.
    pub threads: u32,
    /// Further `agent` flags.
    pub args: Vec<OsString>,
    pub log: LogFile,
}

impl AgentSpec {
    /// Where the agent keeps its key and certificate: beside its log.
    pub fn identity_dir(&self) -> PathBuf {
        let beside = self.log.path().parent().unwrap_or(Path::new("."));
        beside.join("identity").join(&self.node_id)
    }
}

/// What `fleetgrid cloud serve` is started with.
#[derive(Clone, Debug)]
pub struct CloudSpec {
    pub data_dir: PathBuf,
    pub http_listen: SocketAddr,
    /// Engine threads of its node.
    pub threads: u32,
    /// Further `cloud serve` flags.
    pub args: Vec<OsString>,
    pub log: LogFile,
}

/// The local cloud, serving: announced once its node is connected.
pub struct LocalCloud {
    pub process: Process,
    pub http: SocketAddr,
    pub api_key: String,
}

impl LocalCloud {
    /// Starts `fleetgrid cloud serve` and waits until it serves.
    pub fn start_blocking(
        fleetgrid: &Fleetgrid,
        spec: &CloudSpec,
        timeout: Duration,
    ) -> Result<LocalCloud, StackError> {
        let (process, lines) =
            spawn_announcing("local cloud", fleetgrid.cloud_command(spec), &spec.log)?;
        let (http, api_key) = lines.first_blocking(timeout, LocalCloud::parse_announcement)?;
        Ok(LocalCloud {
            process,
            http,
            api_key,
        })
    }

    /// The address and API key in the line `fleetgrid cloud serve` prints:
    /// the coordinator's announcement and its `api_key=` field.
    pub fn parse_announcement(line: &str) -> Option<(SocketAddr, String)> {
        let bound = Bound::parse_announcement(line)?;
        let key = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix(CLOUD_API_KEY_FIELD))?;
        Some((bound.http, key.to_owned()))
    }

    /// Its OpenAI-compatible base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.http)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &Command) -> String {
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_last_non_empty_line_is_the_secret() {
        assert_eq!(
            last_line("created tenant bench\nsk-abc123\n\n"),
            Some("sk-abc123")
        );
        assert_eq!(last_line("  \n"), None);
    }

    #[test]
    fn the_always_plugged_in_trace_keeps_the_vehicle_plugged_in() {
        let trace: serde_json::Value =
            serde_json::from_str(ALWAYS_PLUGGED_IN_TRACE).expect("valid json");
        assert_eq!(trace["events"][0]["plugged_in"], true);
        assert_eq!(trace["events"][0]["charging"], true);
        assert_eq!(trace["events"][0]["departure_in_s"], 86400);
    }

    #[test]
    fn the_agent_command_names_node_model_parallelism_and_credential() {
        let fleetgrid = Fleetgrid::new("fleetgrid").env("FLEETGRID_HOME", "home");
        let spec = AgentSpec {
            node_id: "bench-node-1".into(),
            credential: "cred".into(),
            vehicle_state: "sim:trace.json".into(),
            model: "smollm2-135m-instruct".into(),
            parallel: 8,
            threads: 2,
            args: Vec::new(),
            log: LogFile::create("agent.log"),
        };
        let command = fleetgrid.agent_command(SocketAddr::from(([127, 0, 0, 1], 7000)), &spec);
        let joined = args(&command);
        for expected in [
            "agent --coordinator https://127.0.0.1:7000 --identity-dir identity/bench-node-1",
            "--node-id bench-node-1",
            "--vehicle-state sim:trace.json",
            "--model smollm2-135m-instruct --parallel 8 --threads 2 --exit-with-parent",
        ] {
            assert!(
                joined.contains(expected),
                "{expected} missing from {joined}"
            );
        }
        assert!(
            !joined.contains("cred"),
            "the credential is on the command line"
        );
        let env: Vec<(String, String)> = command
            .get_envs()
            .filter_map(|(key, value)| {
                Some((
                    key.to_string_lossy().into(),
                    value?.to_string_lossy().into(),
                ))
            })
            .collect();
        assert!(env.contains(&(NODE_CREDENTIAL_ENV.into(), "cred".into())));
        assert!(env.contains(&("FLEETGRID_HOME".into(), "home".into())));
    }

    #[test]
    fn the_serve_command_listens_where_asked_and_serves_every_model() {
        let mut spec = CoordinatorSpec::new("data", LogFile::create("coordinator.log"));
        spec.models = vec!["a".into(), "b".into()];
        spec.args = vec!["--heartbeat-interval-ms".into(), "500".into()];
        let joined = args(&Fleetgrid::new("fleetgrid").serve_command(&spec));
        assert_eq!(
            joined,
            "serve --http-listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 --model a --model b \
             --exit-with-parent --heartbeat-interval-ms 500 --data-dir data"
        );
    }

    #[test]
    fn the_cloud_announcement_gives_address_and_key() {
        let line = "fleetgrid listening http=127.0.0.1:9 grpc=127.0.0.1:8 api_key=fg-abc";
        let (http, key) = LocalCloud::parse_announcement(line).expect("parse");
        assert_eq!(http, SocketAddr::from(([127, 0, 0, 1], 9)));
        assert_eq!(key, "fg-abc");
        let without_key = "fleetgrid listening http=127.0.0.1:9 grpc=127.0.0.1:8";
        assert!(LocalCloud::parse_announcement(without_key).is_none());
        assert!(LocalCloud::parse_announcement("api_key=fg-abc").is_none());
    }
}
