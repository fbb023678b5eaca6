//! Readiness as a coordinator reports it over HTTP: its health endpoint
//! answering, and the vehicles connected to it.
//!
//! A probe never fails: a coordinator that does not answer (yet) reads as
//! "not ready". [`wait_until`] polls a probe until it holds, ending early when
//! a member of the stack exits and with an error at its deadline.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::process::Process;
use crate::StackError;

/// How often [`wait_until`] asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The longest wait for one probe's answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The metric of `/metrics` that counts connected nodes.
const NODES_CONNECTED_METRIC: &str = "fleetgrid_nodes_connected";

/// A client whose requests give up after [`REQUEST_TIMEOUT`].
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        // Only a TLS back-end that fails to initialise makes the builder fail.
        .unwrap_or_default()
}

/// Whether `url` answers with a success status.
pub async fn answers(client: &reqwest::Client, url: &str) -> bool {
    client
        .get(url)
        .send()
        .await
        .is_ok_and(|response| response.status().is_success())
}

/// How many nodes the coordinator at `http` reports connected (the gauge on
/// `/metrics`, which needs no key); 0 while it does not answer.
pub async fn nodes_connected(client: &reqwest::Client, http: SocketAddr) -> u64 {
    let metrics = match client.get(format!("http://{http}/metrics")).send().await {
        Ok(response) => response.text().await.ok(),
        Err(_) => None,
    };
    metrics
        .as_deref()
        .and_then(parse_nodes_connected)
        .unwrap_or(0)
}

/// The nodes connected to the coordinator at `http` by name, from `/health`
/// as a fleet-class tenant with `key` sees it; `None` while it does not
/// answer or does not name them to that key.
pub async fn connected_nodes(
    client: &reqwest::Client,
    http: SocketAddr,
    key: &str,
) -> Option<BTreeSet<String>> {
    let response = client
        .get(format!("http://{http}/health"))
        .bearer_auth(key)
        .send()
        .await
        .ok()?;
    let health: serde_json::Value = response.json().await.ok()?;
    parse_connected_nodes(&health)
}

fn parse_nodes_connected(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line
            .strip_prefix(NODES_CONNECTED_METRIC)?
            .strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

fn parse_connected_nodes(health: &serde_json::Value) -> Option<BTreeSet<String>> {
    let nodes = health.get("nodes")?.as_array()?;
    Some(
        nodes
            .iter()
            .filter_map(|node| node.as_str().map(str::to_owned))
            .collect(),
    )
}

/// Asks `ready` every [`POLL_INTERVAL`] until it says yes. Fails at once,
/// with the end of its log, when one of `members` exits, and after `timeout`
/// saying that `what` did not happen.
pub async fn wait_until<F, Fut>(
    members: &[&Process],
    what: &str,
    timeout: Duration,
    mut ready: F,
) -> Result<(), StackError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        for member in members {
            member.check_running()?;
        }
        if ready().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StackError::Timeout {
                what: what.to_owned(),
                waited: timeout,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connected_count_is_read_from_its_gauge_alone() {
        let metrics = "# TYPE fleetgrid_nodes_connected gauge\n\
                       fleetgrid_nodes_connected_total 9\n\
                       fleetgrid_nodes_connected 2\n";
        assert_eq!(parse_nodes_connected(metrics), Some(2));
        assert_eq!(
            parse_nodes_connected("fleetgrid_nodes_connected_total 9\n"),
            None
        );
    }

    #[test]
    fn the_connected_nodes_are_read_from_health() {
        let health = serde_json::json!({"status": "ok", "nodes": ["car-b", "car-a"]});
        let nodes = parse_connected_nodes(&health).expect("nodes");
        assert_eq!(nodes.into_iter().collect::<Vec<_>>(), ["car-a", "car-b"]);
        // Without a fleet-class key, /health names no node: that is not "none connected".
        assert_eq!(
            parse_connected_nodes(&serde_json::json!({"status": "ok"})),
            None
        );
    }
}
