//! A running stack: one coordinator, the processes beside it that it
//! depends on (the local cloud), and its agents, stopped together.

use std::net::SocketAddr;
use std::time::Duration;

use crate::fleetgrid::{AgentSpec, Coordinator, Fleetgrid};
use crate::process::{stop_all, stop_all_blocking, Process};
use crate::{probe, StackError};

/// A coordinator and what runs with it; every member is stopped when the
/// stack is stopped or dropped, all at once with one grace.
pub struct Stack {
    fleetgrid: Fleetgrid,
    coordinator: Coordinator,
    beside: Vec<Process>,
    agents: Vec<Process>,
}

impl Stack {
    pub fn new(fleetgrid: Fleetgrid, coordinator: Coordinator) -> Stack {
        Stack {
            fleetgrid,
            coordinator,
            beside: Vec::new(),
            agents: Vec::new(),
        }
    }

    /// Makes `process` a member: one the coordinator depends on (the local
    /// cloud), which is watched and stopped with it.
    pub fn add_beside(&mut self, process: Process) {
        self.beside.push(process);
    }

    pub fn fleetgrid(&self) -> &Fleetgrid {
        &self.fleetgrid
    }

    /// The coordinator's HTTP address (the gateway).
    pub fn http(&self) -> SocketAddr {
        self.coordinator.bound.http
    }

    /// The coordinator's gRPC address (where agents dial).
    pub fn grpc(&self) -> SocketAddr {
        self.coordinator.bound.grpc
    }

    pub fn coordinator(&self) -> &Process {
        &self.coordinator.process
    }

    /// Starts an agent dialling this stack's coordinator; returns its index.
    pub fn add_agent(&mut self, spec: &AgentSpec) -> Result<usize, StackError> {
        let agent = self.fleetgrid.agent(self.grpc(), spec)?;
        self.agents.push(agent);
        Ok(self.agents.len() - 1)
    }

    /// Starts agent `index` again as `spec` says, once its process has ended.
    pub fn restart_agent(&mut self, index: usize, spec: &AgentSpec) -> Result<(), StackError> {
        let agent = self.fleetgrid.agent(self.grpc(), spec)?;
        let previous = std::mem::replace(&mut self.agents[index], agent);
        debug_assert!(
            previous.exit().is_some(),
            "agent {index} restarted while running"
        );
        Ok(())
    }

    pub fn agents(&self) -> &[Process] {
        &self.agents
    }

    pub fn agent_mut(&mut self, index: usize) -> &mut Process {
        &mut self.agents[index]
    }

    /// Every member: the coordinator, those beside it, the agents.
    pub fn members(&self) -> Vec<&Process> {
        let core = std::iter::once(&self.coordinator.process).chain(&self.beside);
        core.chain(&self.agents).collect()
    }

    pub fn members_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        let core = std::iter::once(&mut self.coordinator.process).chain(&mut self.beside);
        core.chain(&mut self.agents)
    }

    /// An error naming the first member that exited, with its log's end.
    pub fn check_running(&self) -> Result<(), StackError> {
        self.members()
            .into_iter()
            .try_for_each(Process::check_running)
    }

    /// Waits until the coordinator reports at least `count` vehicles
    /// connected; fails as soon as a member exits.
    pub async fn wait_for_vehicles(&self, count: u64, timeout: Duration) -> Result<(), StackError> {
        let client = probe::client();
        let http = self.http();
        probe::wait_until(
            &self.members(),
            &format!("{count} vehicles did not connect"),
            timeout,
            || async { probe::nodes_connected(&client, http).await >= count },
        )
        .await
    }

    /// Stops every agent as `stop` does and drops them from the stack; the
    /// coordinator and what runs beside it go on.
    pub async fn stop_agents(&mut self) {
        let mut agents = std::mem::take(&mut self.agents);
        stop_all(agents.iter_mut()).await;
    }

    /// Stops every member: SIGTERM to all, the grace, then SIGKILL.
    pub async fn stop(&mut self) {
        stop_all(self.members_mut()).await;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        stop_all_blocking(self.members_mut());
    }
}
