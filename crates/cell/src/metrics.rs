//! Prometheus metrics of a cell, rendered by hand in the text format: its
//! generations, its nodes, its KV checkpoints.
//!
//! A handful of atomics is all a cell needs; a metrics crate would add a
//! registry and global state for no gain.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use scheduler::StopReason;

/// Upper bounds of the time-to-first-token histogram buckets, milliseconds.
const TTFT_BUCKETS_MS: [u64; 10] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

#[derive(Default)]
pub struct Metrics {
    pub requests_accepted: AtomicU64,
    pub requests_completed: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_rejected_queue_full: AtomicU64,
    pub requests_rejected_no_node: AtomicU64,
    pub requests_rejected_other: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub generations_active: AtomicI64,
    pub generations_cancelled_on_node: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub reassignments: AtomicU64,
    /// Generations moved with committed tokens to a vehicle of other numerics.
    pub moves_across_numerics: AtomicU64,
    /// Registrations past the cell's distinct numerics (`nodes::NUMERICS_MAX`).
    pub registrations_of_unknown_numerics: AtomicU64,
    pub kv_checkpoints_kept: AtomicU64,
    pub kv_checkpoints_refused: AtomicU64,
    pub kv_checkpoint_handovers: AtomicU64,
    pub kv_checkpoints_rejected_by_nodes: AtomicU64,
    pub nodes_connected: AtomicI64,
    pub nodes_lost: AtomicU64,
    pub nodes_refused: AtomicU64,
    /// Node certificates issued by `Enrol` and `Renew`.
    pub node_certificates_issued: AtomicU64,
    /// Sessions closed because their certificate was revoked or expired.
    pub node_sessions_closed_by_certificate: AtomicU64,
    pub node_protocol_violations: AtomicU64,
    /// Agent streams whose first message was longer than `HELLO_BYTES_MAX`.
    pub node_hellos_oversized: AtomicU64,
    /// Agent streams refused because `UNAUTHENTICATED_SESSIONS_MAX` were waiting.
    pub node_sessions_refused_busy: AtomicU64,
    /// Generations moved off a node that sent no token within its stall bound.
    pub generations_stalled: AtomicU64,
    pub request_log_dropped: AtomicU64,
    /// Delivered answers drawn for verification.
    pub verifications_opened: AtomicU64,
    /// Answers sent to a verifier (a check may go to several).
    pub verifications_sent: AtomicU64,
    /// Verifiers' verdicts: passed, failed.
    pub verifications_passed: AtomicU64,
    pub verifications_failed: AtomicU64,
    /// Checks given up for want of a verifier (counted unverified).
    pub verifications_undecided: AtomicU64,
    pub nodes_quarantined: AtomicU64,
    /// Compute time nodes reported for verifying, and for generating.
    pub verification_compute_ms: AtomicU64,
    pub generation_compute_ms: AtomicU64,
    /// Generations assigned to each node (first attempts and handovers alike).
    pub node_assignments: LabelledCounter,
    /// Vehicle states received from each node that differ from the one before.
    pub node_state_changes: LabelledCounter,
    /// Running generations stopped on their node, by the scheduler's reason.
    generations_stopped: LabelledCounter,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS_MS.len()],
    ttft_count: AtomicU64,
    ttft_sum_ms: AtomicU64,
}

impl Metrics {
    /// Counts a running generation the scheduler stopped on its node.
    pub fn count_stop(&self, reason: StopReason) {
        let label = match reason {
            StopReason::Preempted => "preempted",
            StopReason::Draining => "draining",
            StopReason::Departed => "departed",
            StopReason::NodeLost => "node_lost",
            StopReason::Stalled => "stalled",
        };
        self.generations_stopped.add(label);
    }

    pub fn observe_time_to_first_token_ms(&self, value_ms: u64) {
        for (bound, bucket) in TTFT_BUCKETS_MS.iter().zip(&self.ttft_buckets) {
            if value_ms <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
        self.ttft_sum_ms.fetch_add(value_ms, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 34] = [
            (
                "fleetgrid_requests_accepted_total",
                "Requests admitted by the gateway.",
                &self.requests_accepted,
            ),
            (
                "fleetgrid_requests_completed_total",
                "Requests answered in full.",
                &self.requests_completed,
            ),
            (
                "fleetgrid_requests_failed_total",
                "Accepted requests that ended in an error.",
                &self.requests_failed,
            ),
            (
                "fleetgrid_requests_rejected_queue_full_total",
                "Requests refused with 429.",
                &self.requests_rejected_queue_full,
            ),
            (
                "fleetgrid_requests_rejected_no_node_total",
                "Requests refused with 503 (no eligible node).",
                &self.requests_rejected_no_node,
            ),
            (
                "fleetgrid_requests_rejected_other_total",
                "Requests refused by the scheduler for other reasons.",
                &self.requests_rejected_other,
            ),
            (
                "fleetgrid_requests_cancelled_total",
                "Requests whose client went away.",
                &self.requests_cancelled,
            ),
            (
                "fleetgrid_generations_cancelled_on_node_total",
                "Generations a node confirmed cancelled.",
                &self.generations_cancelled_on_node,
            ),
            (
                "fleetgrid_completion_tokens_total",
                "Completion tokens committed.",
                &self.completion_tokens,
            ),
            (
                "fleetgrid_prompt_tokens_total",
                "Prompt tokens of admitted requests.",
                &self.prompt_tokens,
            ),
            (
                "fleetgrid_reassignments_total",
                "Generations moved to another node.",
                &self.reassignments,
            ),
            (
                "fleetgrid_moves_across_numerics_total",
                "Generations moved with committed tokens to a vehicle computing other numbers (engine build, CPU kernels or attention setting), none like the last being free: they continue from their committed tokens, not bit for bit.",
                &self.moves_across_numerics,
            ),
            (
                "fleetgrid_registrations_of_unknown_numerics_total",
                "Node registrations past the 256 engine builds, CPU kernels and attention settings a cell tells apart: their answers are verified at the wider tolerance and their generations move without the bit-for-bit preference. A rise means the table is full, possibly of made-up kernels reports.",
                &self.registrations_of_unknown_numerics,
            ),
            (
                "fleetgrid_kv_checkpoints_kept_total",
                "Prompt KV caches received from nodes and kept for a handover.",
                &self.kv_checkpoints_kept,
            ),
            (
                "fleetgrid_kv_checkpoints_refused_total",
                "Prompt KV cache pieces refused: unasked, malformed, out of order, too large, or over the memory budget.",
                &self.kv_checkpoints_refused,
            ),
            (
                "fleetgrid_kv_checkpoint_handovers_total",
                "Generations handed over with their prompt's KV cache instead of a re-prefill.",
                &self.kv_checkpoint_handovers,
            ),
            (
                "fleetgrid_kv_checkpoints_rejected_by_nodes_total",
                "Prompt KV caches a node was handed and refused: malformed, or not the prompt's.",
                &self.kv_checkpoints_rejected_by_nodes,
            ),
            (
                "fleetgrid_nodes_lost_total",
                "Node sessions that ended or timed out.",
                &self.nodes_lost,
            ),
            (
                "fleetgrid_nodes_refused_total",
                "Agent connections refused.",
                &self.nodes_refused,
            ),
            (
                "fleetgrid_node_certificates_issued_total",
                "Node certificates issued, at enrolment and at renewal (mTLS).",
                &self.node_certificates_issued,
            ),
            (
                "fleetgrid_node_sessions_closed_by_certificate_total",
                "Node sessions closed because their certificate was revoked or expired (mTLS).",
                &self.node_sessions_closed_by_certificate,
            ),
            (
                "fleetgrid_node_protocol_violations_total",
                "Messages from nodes that broke the protocol.",
                &self.node_protocol_violations,
            ),
            (
                "fleetgrid_node_hellos_oversized_total",
                "Agent streams ended because their first message was over the size allowed before authentication.",
                &self.node_hellos_oversized,
            ),
            (
                "fleetgrid_node_sessions_refused_busy_total",
                "Agent streams refused because too many were waiting to authenticate.",
                &self.node_sessions_refused_busy,
            ),
            (
                "fleetgrid_generations_stalled_total",
                "Generations moved off a node that sent no token within its stall bound.",
                &self.generations_stalled,
            ),
            (
                "fleetgrid_request_log_dropped_total",
                "Request-log records dropped because the writer was behind.",
                &self.request_log_dropped,
            ),
            (
                "fleetgrid_verifications_opened_total",
                "Delivered answers drawn for verification by recomputation.",
                &self.verifications_opened,
            ),
            (
                "fleetgrid_verifications_sent_total",
                "Answers sent to a verifier node (a failure or an audit sends one again).",
                &self.verifications_sent,
            ),
            (
                "fleetgrid_verifications_passed_total",
                "Verifiers' verdicts that an answer was the sampler's.",
                &self.verifications_passed,
            ),
            (
                "fleetgrid_verifications_failed_total",
                "Verifiers' verdicts that an answer was not the sampler's.",
                &self.verifications_failed,
            ),
            (
                "fleetgrid_verifications_undecided_total",
                "Drawn answers left unverified: no verifier could be found in time.",
                &self.verifications_undecided,
            ),
            (
                "fleetgrid_nodes_quarantined_total",
                "Nodes quarantined: a failed answer, or a verdict the decision contradicted.",
                &self.nodes_quarantined,
            ),
            (
                "fleetgrid_verification_compute_ms_total",
                "Compute time nodes reported for verifying others' answers, paid by the platform.",
                &self.verification_compute_ms,
            ),
            (
                "fleetgrid_generation_compute_ms_total",
                "Compute time nodes reported for the generations they finished.",
                &self.generation_compute_ms,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let gauges: [(&str, &str, &AtomicI64); 2] = [
            (
                "fleetgrid_generations_active",
                "Generations admitted and not yet finished.",
                &self.generations_active,
            ),
            (
                "fleetgrid_nodes_connected",
                "Agents connected now.",
                &self.nodes_connected,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let verifying = self.verification_compute_ms.load(Ordering::Relaxed) as f64;
        let generating = self.generation_compute_ms.load(Ordering::Relaxed) as f64;
        let share = if verifying + generating > 0.0 {
            verifying / (verifying + generating)
        } else {
            0.0
        };
        let name = "fleetgrid_verification_compute_share";
        let _ = writeln!(
            out,
            "# HELP {name} Share of the fleet's compute spent verifying answers.\n# TYPE {name} gauge\n{name} {share}"
        );
        self.render_ttft(&mut out);
        self.node_assignments.render(
            &mut out,
            "fleetgrid_node_assignments_total",
            "Generations assigned to a node, by node.",
            "node_id",
        );
        self.node_state_changes.render(
            &mut out,
            "fleetgrid_node_state_changes_total",
            "Vehicle states received from a node that differ from its previous one, by node.",
            "node_id",
        );
        self.generations_stopped.render(
            &mut out,
            "fleetgrid_generations_stopped_total",
            "Running generations stopped on their node, by reason: preempted, draining, departed, node_lost or stalled.",
            "reason",
        );
        out
    }

    fn render_ttft(&self, out: &mut String) {
        let name = "fleetgrid_time_to_first_token_milliseconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from admission to the first committed token."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, bucket) in TTFT_BUCKETS_MS.iter().zip(&self.ttft_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.ttft_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.ttft_sum_ms.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A counter per value of one label. Its values are few and known: node names
/// (one per enrolled vehicle, so the map is bounded by the nodes table) or
/// the scheduler's stop reasons. A value is rendered once it was counted.
#[derive(Default)]
pub struct LabelledCounter {
    // A `std` mutex: it is held only to add or copy counts, never across an `.await`.
    counts: Mutex<BTreeMap<String, u64>>,
}

impl LabelledCounter {
    pub fn add(&self, label_value: &str) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match counts.get_mut(label_value) {
            Some(count) => *count += 1,
            None => {
                counts.insert(label_value.to_owned(), 1);
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for (value, count) in counts.iter() {
            let value = value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {count}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_labelled_counter_renders_one_series_per_value_counted() {
        let metrics = Metrics::default();
        metrics.node_assignments.add("car-1");
        metrics.node_assignments.add("car-1");
        metrics.node_assignments.add("car-\"2\"");
        metrics.count_stop(StopReason::NodeLost);
        let text = metrics.render();
        assert!(text.contains("\nfleetgrid_node_assignments_total{node_id=\"car-1\"} 2\n"));
        assert!(text.contains("\nfleetgrid_node_assignments_total{node_id=\"car-\\\"2\\\"\"} 1\n"));
        assert!(text.contains("\nfleetgrid_generations_stopped_total{reason=\"node_lost\"} 1\n"));
        // A family is declared before anything is counted in it.
        assert!(text.contains("# TYPE fleetgrid_node_state_changes_total counter\n"));
        assert!(!text.contains("fleetgrid_node_state_changes_total{"));
    }
}
