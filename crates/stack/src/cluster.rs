//! The members of a cluster: `fleetgrid gateway` and `fleetgrid cell`
//! processes on one NATS cluster and one PostgreSQL database, started and
//! waited for like the single-process coordinator.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use coordinator::Listening;

use crate::fleetgrid::{spawn_announcing, AgentSpec, Fleetgrid};
use crate::process::{LogFile, Process, Stdout};
use crate::StackError;

/// Where a cluster's members find its shared parts.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// NATS client URLs, comma-separated.
    pub nats: String,
    /// `postgres://…`.
    pub database: String,
    /// Where members keep their files (model tokenizers come from `FLEETGRID_HOME`).
    pub data_dir: PathBuf,
    /// `--model` for each member.
    pub models: Vec<String>,
}

/// One gateway or cell to start.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    /// The gateway's HTTP address or the cell's gRPC address.
    pub listen: SocketAddr,
    /// Further flags of its command.
    pub args: Vec<OsString>,
    pub log: LogFile,
}

impl MemberSpec {
    /// A member on a free loopback port, logging to `log`.
    pub fn new(log: LogFile) -> MemberSpec {
        MemberSpec {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            args: Vec::new(),
            log,
        }
    }
}

impl Fleetgrid {
    /// `fleetgrid gateway` of `cluster` as `spec` says.
    pub fn gateway_command(&self, cluster: &ClusterSpec, spec: &MemberSpec) -> Command {
        let mut command = self.member_command("gateway", cluster);
        command
            .args(["--http-listen", &spec.listen.to_string()])
            .args(&spec.args);
        command
    }

    /// `fleetgrid cell` named `cell_id` of `cluster` as `spec` says.
    pub fn cell_command(&self, cluster: &ClusterSpec, cell_id: &str, spec: &MemberSpec) -> Command {
        let mut command = self.member_command("cell", cluster);
        command
            .args(["--cell-id", cell_id])
            .args(["--grpc-listen", &spec.listen.to_string()])
            .args(&spec.args);
        command
    }

    /// Starts an agent that dials `cells` in order: its own cell first, then
    /// those it fails over to when its session is lost.
    pub fn cluster_agent(
        &self,
        cells: &[SocketAddr],
        spec: &AgentSpec,
    ) -> Result<Process, StackError> {
        let cells: Vec<String> = cells.iter().map(|cell| crate::agent_url(*cell)).collect();
        let dial = ["--cell".to_owned(), cells.join(",")];
        Process::spawn(
            spec.node_id.clone(),
            self.agent_command_dialling(&dial, spec),
            &spec.log,
            Stdout::Null,
        )
    }

    /// Starts an agent that dials the cells of its enrolment: `spec`'s
    /// credential is the token `fleetgrid nodes add` printed.
    pub fn enrolled_agent(&self, spec: &AgentSpec) -> Result<Process, StackError> {
        Process::spawn(
            spec.node_id.clone(),
            self.agent_command_dialling(&[], spec),
            &spec.log,
            Stdout::Null,
        )
    }

    fn member_command(&self, role: &str, cluster: &ClusterSpec) -> Command {
        let mut command = self.command();
        command
            .arg(role)
            .args(["--nats", &cluster.nats])
            .args(["--database", &cluster.database])
            .arg("--data-dir")
            .arg(&cluster.data_dir)
            .arg("--exit-with-parent");
        for model in &cluster.models {
            command.args(["--model", model]);
        }
        command
    }
}

/// A running gateway and the address it announced.
pub struct ClusterGateway {
    pub process: Process,
    pub http: SocketAddr,
}

impl ClusterGateway {
    /// Starts `fleetgrid gateway` and waits until it announces its address.
    pub fn start_blocking(
        fleetgrid: &Fleetgrid,
        cluster: &ClusterSpec,
        name: &str,
        spec: &MemberSpec,
        timeout: Duration,
    ) -> Result<ClusterGateway, StackError> {
        let command = fleetgrid.gateway_command(cluster, spec);
        let (process, lines) = spawn_announcing(name, command, &spec.log)?;
        let http =
            lines.first_blocking(timeout, |line| match Listening::parse_announcement(line) {
                Some(Listening::Gateway { http }) => Some(http),
                _ => None,
            })?;
        Ok(ClusterGateway { process, http })
    }
}

/// A running cell and the address its agents dial.
pub struct ClusterCell {
    pub process: Process,
    pub grpc: SocketAddr,
    pub cell_id: String,
    /// Where it serves `/metrics` (`--metrics-listen`), if anywhere.
    pub metrics: Option<SocketAddr>,
}

impl ClusterCell {
    /// Starts `fleetgrid cell` named `cell_id` and waits until it announces
    /// its address.
    pub fn start_blocking(
        fleetgrid: &Fleetgrid,
        cluster: &ClusterSpec,
        cell_id: &str,
        spec: &MemberSpec,
        timeout: Duration,
    ) -> Result<ClusterCell, StackError> {
        let command = fleetgrid.cell_command(cluster, cell_id, spec);
        let (process, lines) = spawn_announcing(cell_id, command, &spec.log)?;
        let (grpc, metrics) =
            lines.first_blocking(timeout, |line| match Listening::parse_announcement(line) {
                Some(Listening::Cell { grpc, metrics, .. }) => Some((grpc, metrics)),
                _ => None,
            })?;
        Ok(ClusterCell {
            process,
            grpc,
            cell_id: cell_id.to_owned(),
            metrics,
        })
    }
}
