//! Re-running stored completions whose answer was clawed back, for tenants
//! that asked for it (`on_clawback: "rerun"`, see `stored`).
//!
//! Every gateway makes a pass every [`RERUN_INTERVAL`]: it claims one due
//! completion at a time (`store::stored_completions`: the books have
//! applied a clawback of its current answer, so the tenant is refunded),
//! runs its request again as its tenant through the same path a client's
//! request takes (admission, the tenant's money, the fleet, settlement), and
//! replaces the kept answer with the new one. The re-run is a new request,
//! charged as one: the tenant pays for the answer it keeps and got the
//! clawed-back one back. It runs with the seed the first run had, so an
//! honest vehicle gives the answer the first should have been. Should it
//! fail (no vehicle, the tenant cannot pay), the claim lapses and a later
//! pass tries again, up to `RERUN_ATTEMPTS_MAX` attempts in all. A re-run
//! is verified like any answer, and re-run again if it is clawed back too.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use tokio_util::sync::DropGuard;

use super::validate::Endpoint;
use super::AppState;
use store::stored_completions::RerunClaim;

/// How often a gateway looks for completions to re-run.
pub const RERUN_INTERVAL: Duration = Duration::from_secs(2);

/// Re-runs one gateway makes in one pass, one after the other.
const RERUNS_PER_PASS: usize = 8;

/// Largest re-run answer read back, in bytes.
const ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Fields of the kept request a re-run does not send: it is answered whole,
/// and not kept again (its answer replaces the kept one).
const NOT_SENT_AGAIN: [&str; 5] = [
    "store",
    "on_clawback",
    "metadata",
    "stream",
    "stream_options",
];

/// The gateway's re-runs of clawed-back stored completions.
#[derive(Clone)]
pub struct Reruns {
    state: AppState,
}

impl Reruns {
    pub fn new(state: AppState) -> Reruns {
        Reruns { state }
    }

    /// One pass: forgets stored completions past their retention, then
    /// re-runs due ones; returns how many answers it replaced.
    pub async fn pass(&self, now_ms: i64) -> Result<usize, store::StoreError> {
        let retention = super::stored::STORED_RETENTION.as_millis() as i64;
        self.state
            .store
            .forget_stored_before(now_ms - retention)
            .await?;
        let lease = self.state.request_timeout + Duration::from_secs(30);
        let mut replaced = 0;
        for _ in 0..RERUNS_PER_PASS {
            let now_ms = crate::core::now_ms().0;
            let claims = self
                .state
                .store
                .claim_reruns(1, now_ms, lease.as_millis() as i64)
                .await?;
            let Some(claim) = claims.into_iter().next() else {
                break;
            };
            if self.rerun(&claim).await? {
                replaced += 1;
            }
        }
        Ok(replaced)
    }

    /// Runs one claimed completion again; whether its answer was replaced.
    async fn rerun(&self, claim: &RerunClaim) -> Result<bool, store::StoreError> {
        let state = &self.state;
        let Some(tenant) = state.store.tenant_by_id(claim.tenant_id).await? else {
            tracing::warn!(stored = %claim.id, "the tenant of a stored completion is gone; not re-run");
            return Ok(false);
        };
        let Ok(Value::Object(mut request)) = serde_json::from_str::<Value>(&claim.request) else {
            tracing::error!(stored = %claim.id, "a stored completion's request is not an object");
            return Ok(false);
        };
        for field in NOT_SENT_AGAIN {
            request.remove(field);
        }
        let body = Bytes::from(Value::Object(request).to_string());
        let answer = match super::admission::admit(state, &tenant) {
            Ok(permit) => {
                super::generate::run_as(
                    state,
                    tenant,
                    permit,
                    &HeaderMap::new(),
                    body,
                    Endpoint::Chat,
                )
                .await
            }
            Err(error) => Err(error),
        };
        let response = match answer {
            Ok(response) if response.status() == StatusCode::OK => response,
            Ok(response) => {
                tracing::warn!(stored = %claim.id, status = %response.status(), "a re-run was refused; tried again later");
                return Ok(false);
            }
            Err(error) => {
                tracing::warn!(stored = %claim.id, error = %error.message, "a re-run failed; tried again later");
                return Ok(false);
            }
        };
        let bytes = match axum::body::to_bytes(response.into_body(), ANSWER_BYTES_MAX).await {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(stored = %claim.id, %error, "read a re-run's answer");
                return Ok(false);
            }
        };
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let Some(rerun_id) = answer.get("id").and_then(Value::as_str) else {
            tracing::error!(stored = %claim.id, "a re-run's answer has no id");
            return Ok(false);
        };
        let replaced = state
            .store
            .rerun_done(claim, rerun_id, &answer.to_string())
            .await?;
        tracing::info!(stored = %claim.id, rerun = %rerun_id, reason = %claim.reason, replaced, "re-ran a clawed-back answer");
        Ok(replaced)
    }

    /// Makes a pass every [`RERUN_INTERVAL`] until the guard is dropped.
    pub fn spawn(self) -> DropGuard {
        crate::billing_clawbacks::every(RERUN_INTERVAL, move |now| {
            let reruns = self.clone();
            async move {
                if let Err(error) = reruns.pass(now).await {
                    tracing::warn!(%error, "re-run stored completions");
                }
            }
        })
    }
}
