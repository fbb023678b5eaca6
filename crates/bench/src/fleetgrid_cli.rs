//! The `fleetgrid` command lines the serving benchmark runs, kept in one place so that they follow
//! the CLI when it changes.
//!
//! The benchmark stands up one coordinator (`fleetgrid serve`) and one agent, with a tenant and a
//! node enrolled through the CLI, all under one scratch data directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The catalog name of the system-1 model the agent serves and the client asks for.
pub const MODEL_NAME: &str = "smollm2-135m-instruct";
/// The tenant the load generator authenticates as.
pub const TENANT_NAME: &str = "bench";
/// The node id of the single agent.
pub const NODE_ID: &str = "bench-node-1";
/// A simulated vehicle that is plugged in and charging for a whole day, so that the owner's rules
/// never take it away during a benchmark.
pub const ALWAYS_AVAILABLE_TRACE_JSON: &str = r#"{
  "start_soc": 0.8,
  "events": [
    { "at_s": 0, "plugged_in": true, "charging": true, "soc": 0.8,
      "departure_in_s": 86400, "temperature_c": 20.0 }
  ]
}
"#;

/// How to invoke one `fleetgrid` binary for the benchmark.
#[derive(Clone, Debug)]
pub struct FleetgridCli {
    pub binary: PathBuf,
    /// `--data-dir` of every command.
    pub data_dir: PathBuf,
    /// `FLEETGRID_HOME` of every command; the model store lives in its `models` folder.
    pub home_dir: PathBuf,
}

impl FleetgridCli {
    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.env("FLEETGRID_HOME", &self.home_dir);
        command
    }

    /// `fleetgrid tenants create NAME --class fleet --data-dir DIR`; prints the API key on its
    /// last line. A fleet tenant is metered but never refused for money, so the benchmark needs
    /// no top-up.
    pub fn create_tenant(&self) -> Command {
        let mut command = self.command();
        command
            .args([
                "tenants",
                "create",
                TENANT_NAME,
                "--class",
                "fleet",
                "--data-dir",
            ])
            .arg(&self.data_dir);
        command
    }

    /// `fleetgrid nodes add ID --data-dir DIR`; prints the node credential on its last line.
    pub fn add_node(&self) -> Command {
        let mut command = self.command();
        command
            .args(["nodes", "add", NODE_ID, "--data-dir"])
            .arg(&self.data_dir);
        command
    }

    /// `fleetgrid serve`: the gateway on `http_port`, the agents' endpoint on `grpc_port`.
    pub fn serve(&self, http_port: u16, grpc_port: u16) -> Command {
        let mut command = self.command();
        command
            .args(["serve", "--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .arg("--data-dir")
            .arg(&self.data_dir);
        command
    }

    /// `fleetgrid agent` for [`NODE_ID`] with `parallel` sequences and `threads` CPU threads.
    pub fn agent(
        &self,
        grpc_port: u16,
        credential: &str,
        trace_path: &Path,
        parallel: u32,
        threads: u32,
    ) -> Command {
        let mut command = self.command();
        command
            .args([
                "agent",
                "--coordinator",
                &format!("http://127.0.0.1:{grpc_port}"),
            ])
            .args(["--node-id", NODE_ID, "--credential", credential])
            .arg("--vehicle-state")
            .arg(format!("sim:{}", trace_path.display()))
            .args(["--model", MODEL_NAME])
            .args(["--parallel", &parallel.to_string()])
            .args(["--threads", &threads.to_string()]);
        command
    }
}

/// The last non-empty line of a command's stdout, where `tenants create` and `nodes add` print
/// the secret.
pub(crate) fn last_line(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|line| !line.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_the_last_non_empty_line() {
        assert_eq!(
            last_line("created tenant bench\nsk-abc123\n\n"),
            Some("sk-abc123")
        );
        assert_eq!(last_line("  \n"), None);
    }

    #[test]
    fn trace_keeps_the_vehicle_plugged_in() {
        let trace: serde_json::Value =
            serde_json::from_str(ALWAYS_AVAILABLE_TRACE_JSON).expect("valid json");
        assert_eq!(trace["events"][0]["plugged_in"], true);
        assert_eq!(trace["events"][0]["charging"], true);
    }

    #[test]
    fn agent_command_names_node_model_and_parallelism() {
        let cli = FleetgridCli {
            binary: PathBuf::from("fleetgrid"),
            data_dir: PathBuf::from("data"),
            home_dir: PathBuf::from("home"),
        };
        let command = cli.agent(7000, "cred", Path::new("trace.json"), 8, 2);
        let args: Vec<String> = command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for expected in [
            "agent --coordinator http://127.0.0.1:7000",
            "--node-id bench-node-1 --credential cred",
            "--vehicle-state sim:trace.json",
            "--model smollm2-135m-instruct --parallel 8 --threads 2",
        ] {
            assert!(
                joined.contains(expected),
                "{expected} missing from {joined}"
            );
        }
    }
}
