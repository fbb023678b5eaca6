//! A NATS cluster of Debian's `nats-server` on loopback ports: one process
//! per server, each with its own configuration file, client port, route port
//! and monitoring port, routed to every other. `fleetgrid demo --cluster`,
//! the cluster benchmark and the end-to-end tests start theirs here.
//!
//! The servers carry work between gateways and cells with plain NATS (at
//! most once); nothing here enables JetStream, since no state that matters
//! rides on the broker.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::probe;
use crate::process::{LogFile, Process, Stdout};
use crate::StackError;

/// The server binary, as Debian's `nats-server` package installs it on `PATH`.
pub const NATS_SERVER_BINARY: &str = "nats-server";

/// The prefix of a cluster's name in its servers' configuration; the rest
/// tells this cluster from any other on the machine.
const CLUSTER_NAME: &str = "fleetgrid";

/// How many times [`NatsCluster::start`] tries fresh ports.
const START_ATTEMPTS: u32 = 3;

/// Clusters started by this process, for their names.
static CLUSTERS: AtomicU64 = AtomicU64::new(0);

/// One server of the cluster.
pub struct NatsServer {
    pub name: String,
    /// Where clients connect.
    pub client: SocketAddr,
    /// Where the other servers route to it.
    pub route: SocketAddr,
    /// Its monitoring endpoint (`/varz`, `/routez`).
    pub monitor: SocketAddr,
    process: Option<Process>,
    config: PathBuf,
    log: LogFile,
}

impl NatsServer {
    /// `nats://HOST:PORT` of its client port.
    pub fn url(&self) -> String {
        format!("nats://{}", self.client)
    }

    /// Whether its process is running.
    pub fn running(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|process| process.exit().is_none())
    }

    /// The names of the clients connected to it now (as they named their
    /// connections), from its monitoring endpoint; empty while it does not
    /// answer.
    pub async fn client_names(&self) -> Vec<String> {
        let url = format!("http://{}/connz", self.monitor);
        let Ok(response) = probe::client().get(url).send().await else {
            return Vec::new();
        };
        let Ok(body) = response.json::<serde_json::Value>().await else {
            return Vec::new();
        };
        body["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|connection| connection["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// Kills it with SIGKILL, as a crashed machine would stop.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    fn start(&mut self) -> Result<(), StackError> {
        let mut command = Command::new(NATS_SERVER_BINARY);
        command.arg("--config").arg(&self.config);
        self.process = Some(Process::spawn(
            self.name.clone(),
            command,
            &self.log,
            Stdout::Log,
        )?);
        Ok(())
    }
}

/// Servers routed to each other; stopped when dropped.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers whose configuration and logs live in `dir`, and
    /// waits until each answers and holds a route to every other.
    ///
    /// The ports are chosen free but only taken when the servers start, so
    /// another process may take one in between; a server that cannot bind
    /// exits, and the whole cluster is then started again on fresh ports, up
    /// to [`START_ATTEMPTS`] times.
    pub async fn start(
        size: usize,
        dir: &Path,
        timeout: Duration,
    ) -> Result<NatsCluster, StackError> {
        let mut attempt = 1;
        loop {
            match NatsCluster::start_once(size, dir, timeout, attempt).await {
                Err(StackError::Exited { .. }) if attempt < START_ATTEMPTS => attempt += 1,
                started => return started,
            }
        }
    }

    async fn start_once(
        size: usize,
        dir: &Path,
        timeout: Duration,
        attempt: u32,
    ) -> Result<NatsCluster, StackError> {
        let mut servers = Vec::with_capacity(size);
        for index in 0..size {
            let name = format!("nats-{}", index + 1);
            let file = match attempt {
                1 => name.clone(),
                _ => format!("{name}.{attempt}"),
            };
            servers.push(NatsServer {
                client: free_port()?,
                route: free_port()?,
                monitor: free_port()?,
                process: None,
                config: dir.join(format!("{file}.conf")),
                log: LogFile::create(dir.join(format!("{file}.log"))),
                name,
            });
        }
        let routes: Vec<String> = servers
            .iter()
            .map(|server| format!("nats-route://{}", server.route))
            .collect();
        // A name of its own, so that a route port some other cluster took
        // in the meantime is refused rather than joined.
        let cluster_name = format!(
            "{CLUSTER_NAME}-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = NatsCluster {
            servers: Vec::new(),
        };
        for mut server in servers {
            let config = server_config(&server, &cluster_name, &routes);
            std::fs::write(&server.config, config).map_err(|source| StackError::Log {
                path: server.config.clone(),
                source,
            })?;
            server.start()?;
            // Kept as they start, so that a failure stops those started.
            cluster.servers.push(server);
        }
        cluster.wait_routed(timeout).await?;
        Ok(cluster)
    }

    /// Every server's client URL, comma-separated, as clients take a list.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of a running server that a client named `name` is
    /// connected to, if any.
    pub async fn server_of(&self, name: &str) -> Option<usize> {
        for (index, server) in self.servers.iter().enumerate() {
            if server.running() && server.client_names().await.iter().any(|n| n == name) {
                return Some(index);
            }
        }
        None
    }

    async fn wait_routed(&self, timeout: Duration) -> Result<(), StackError> {
        let client = probe::client();
        let peers = self.servers.len().saturating_sub(1) as u64;
        // Every server is watched while any is waited for: one that exits
        // (its port taken) would otherwise leave the others waiting for a
        // route to it until the timeout.
        let members: Vec<&Process> = self
            .servers
            .iter()
            .filter_map(|server| server.process.as_ref())
            .collect();
        for server in &self.servers {
            let url = format!("http://{}/routez", server.monitor);
            let what = format!("{} routed to {peers} other servers", server.name);
            probe::wait_until(&members, &what, timeout, || async {
                routes(&client, &url).await >= peers
            })
            .await?;
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(process) = server.process.take() {
                process.terminate();
            }
        }
    }
}

/// The number of routes a server's monitoring endpoint reports, 0 while it
/// does not answer.
async fn routes(client: &reqwest::Client, url: &str) -> u64 {
    let Ok(response) = client.get(url).send().await else {
        return 0;
    };
    let Ok(body) = response.json::<serde_json::Value>().await else {
        return 0;
    };
    body["num_routes"].as_u64().unwrap_or(0)
}

fn server_config(server: &NatsServer, cluster_name: &str, routes: &[String]) -> String {
    let routes = routes
        .iter()
        .filter(|route| !route.ends_with(&server.route.to_string()))
        .map(|route| format!("    {route}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "server_name: {name}\nlisten: {client}\nhttp: {monitor}\n\ncluster {{\n  name: {cluster_name}\n  listen: {route}\n  routes: [\n{routes}\n  ]\n}}\n",
        name = server.name,
        client = server.client,
        monitor = server.monitor,
        route = server.route,
    )
}

/// A loopback port nothing listens on now.
pub(crate) fn free_port() -> Result<SocketAddr, StackError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|source| StackError::Spawn {
            name: "a free loopback port".to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_TIMEOUT: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn three_servers_route_to_each_other_and_one_can_be_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cluster = NatsCluster::start(3, dir.path(), START_TIMEOUT)
            .await
            .expect("a 3-server cluster starts");
        assert_eq!(cluster.urls().split(',').count(), 3);
        let client = probe::client();
        for server in &cluster.servers {
            let url = format!("http://{}/routez", server.monitor);
            assert_eq!(routes(&client, &url).await, 2, "{} routes", server.name);
        }
        cluster.servers[0].kill();
        assert!(!cluster.servers[0].running());
        let survivor = format!("http://{}/routez", cluster.servers[1].monitor);
        probe::wait_until(
            &[],
            "the survivors drop the dead route",
            START_TIMEOUT,
            || async { routes(&client, &survivor).await == 1 },
        )
        .await
        .expect("the survivors keep their route to each other");
    }
}
