//! Prometheus metrics of the gateway, rendered by hand in the text format:
//! its connections, the per-tenant bound, and the node reports billing
//! disagreed with. A cell renders its own (`cell::metrics`); `/metrics`
//! of a process that runs both shows both.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub http: HttpMetrics,
    /// Node usage reports that disagree with the cell's count
    /// (`billing_flags`).
    pub node_report_mismatches: AtomicU64,
}

impl Metrics {
    /// The Prometheus text exposition of every gateway metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 4] = [
            (
                "fleetgrid_node_report_mismatches_total",
                "Node usage reports that disagree with the cell's count.",
                &self.node_report_mismatches,
            ),
            (
                "fleetgrid_http_connections_refused_total",
                "Connections refused on arrival: too many in all, from one address, or unauthenticated.",
                &self.http.connections_refused,
            ),
            (
                "fleetgrid_http_connections_closed_slow_total",
                "Connections closed because the client did not send its headers (or its next request) in time, or read nothing of its response.",
                &self.http.connections_closed_slow,
            ),
            (
                "fleetgrid_requests_rejected_tenant_limit_total",
                "Requests refused with 429 because their tenant was at its limit of concurrent requests.",
                &self.http.requests_rejected_tenant_limit,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "fleetgrid_http_connections_open";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP connections open now.\n# TYPE {name} gauge"
        );
        let _ = writeln!(
            out,
            "{name} {}",
            self.http.connections_open.load(Ordering::Relaxed)
        );
        out
    }
}

/// The gateway's connection counts (`http_serve`) and the per-tenant bound.
#[derive(Default)]
pub struct HttpMetrics {
    pub connections_open: AtomicI64,
    pub connections_refused: AtomicU64,
    pub connections_closed_slow: AtomicU64,
    pub requests_rejected_tenant_limit: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gateway_family_is_declared_before_anything_is_counted() {
        let metrics = Metrics::default();
        metrics
            .http
            .connections_refused
            .fetch_add(2, Ordering::Relaxed);
        let text = metrics.render();
        assert!(text.contains("\nfleetgrid_http_connections_refused_total 2\n"));
        assert!(text.contains("\nfleetgrid_node_report_mismatches_total 0\n"));
        assert!(text.contains("# TYPE fleetgrid_http_connections_open gauge\n"));
    }
}
