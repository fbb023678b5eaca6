//! The money of a routed request: its one admission, each tier's work
//! booked as the machine ends it, the one settlement, the cloud budget, and
//! the client's errors for a spent budget or a failed upstream.
//!
//! The cloud spend reaches the tenant's budget from the ledger: the
//! settlement records it in its own transaction, and `record_cloud` counts
//! it (`CloudBudgets::count_settled`). If counting fails, the spend stays
//! uncounted in the ledger and the next start counts it.

use std::sync::Arc;

use axum::http::StatusCode;
use router::{Budget, CloudUsage, EdgeText};

use super::{Flow, Routing, Stop};
use crate::api::error::ApiError;
use crate::api::route::{CloudPart, Target};
use crate::billing_finish::RoutedBooking;
use crate::billing_meter::Metering;
use crate::cloud::{BudgetStatus, Fallback, UpstreamError};
use crate::limits;
use crate::store::RequestRecord;

impl Routing {
    /// Admits the request once, before any work, for every model that may
    /// serve it, assuming the dearest for the whole prompt and `max_tokens`:
    /// 402 if the tenant cannot pay (fleet-class tenants never get it).
    ///
    /// The prompt is counted by the edge model's tokenizer (the coordinator's
    /// own count) and, where the cloud model's chat template is loaded, by
    /// the cloud model's too, which bills by its own; the larger count is
    /// admitted.
    pub(super) async fn admit(&mut self, target: Target) -> Result<(), ApiError> {
        let prompt_tokens = self.prompt.admitted_tokens();
        let config = self.cloud.upstream.config();
        let cloud_model = config.public_name();
        let edge_model = self.request.model.name.as_str();
        let edge_may_serve = match target {
            Target::Cloud => config.fallback == Fallback::Edge,
            Target::Auto => true,
        };
        let mut models = vec![cloud_model.as_str()];
        if edge_may_serve {
            models.insert(0, edge_model);
        }
        let charge = self
            .state
            .billing
            .admit_any(
                &self.tenant,
                &models,
                prompt_tokens,
                self.request_max_tokens(),
                &self.public_id,
            )
            .await?;
        self.booking = Some(RoutedBooking::new(Arc::clone(&self.state.billing), charge));
        Ok(())
    }

    /// Reads the tenant's cloud budget for the machine.
    pub(super) async fn check_budget(&mut self) -> Flow<Budget> {
        let status = self
            .cloud
            .budgets
            .status(self.tenant.id)
            .await
            .map_err(|error| {
                tracing::error!(%error, tenant_id = self.tenant.id, "read cloud budget");
                Stop::Failed(ApiError::internal())
            })?;
        let budget = if status.allows_cloud() {
            Budget::Allows
        } else {
            Budget::Spent {
                spent: status.spent.to_string(),
                cap: status.cap.unwrap_or_default().to_string(),
            }
        };
        self.last_budget = Some(status);
        Ok(budget)
    }

    /// Ends the edge attempt and books its work as the machine says.
    pub(super) async fn stop_edge(&mut self, text: EdgeText) -> Flow<()> {
        let metering = self.edge.take().and_then(|mut run| run.stop());
        match (text, metering) {
            (EdgeText::Served, Some(metering)) => self.book_edge(&metering, None).await,
            (EdgeText::PartlyServed { released_tokens }, Some(metering)) => {
                // The sent text is served whatever follows: book exactly it.
                self.book_edge(&metering, Some(released_tokens)).await
            }
            (EdgeText::PartlyServed { .. }, None) => {
                tracing::error!(request_id = %self.public_id, "a handed-off edge generation has no metering");
                Err(Stop::Failed(ApiError::internal()))
            }
            (EdgeText::Discarded, Some(metering)) => {
                // Booked when the request settles, if it does.
                self.discarded_edge.push(metering);
                Ok(())
            }
            // A generation that failed made nothing to book.
            (EdgeText::Served | EdgeText::Discarded, None) => Ok(()),
        }
    }

    fn booking(&mut self) -> Flow<&mut RoutedBooking> {
        self.booking.as_mut().ok_or_else(|| {
            tracing::error!("a routed request is booked before admission or after settling");
            Stop::Failed(ApiError::internal())
        })
    }

    /// Books an edge generation whose text reached the client: all of it,
    /// or only `released_tokens` (a handoff).
    async fn book_edge(&mut self, metering: &Metering, released_tokens: Option<u32>) -> Flow<()> {
        let model = self.request.model.name.clone();
        self.booking()?
            .add_edge(&model, metering, released_tokens)
            .await
            .map_err(|error| Stop::Failed(error.into()))
    }

    /// Books the cloud's part of the request and returns it with its cost.
    pub(super) fn book_cloud(&mut self, usage: CloudUsage, started_ms: i64) -> Flow<CloudPart> {
        let finished_ms = crate::core::now_ms().0;
        let public_name = self.cloud.upstream.config().public_name();
        let charge = self
            .booking()?
            .add_cloud(
                &public_name,
                usage.prompt_tokens,
                usage.completion_tokens,
                started_ms,
                finished_ms,
            )
            .map_err(|error| Stop::Failed(error.into()))?;
        Ok(CloudPart {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost: crate::cloud::MicroUsd(charge.customer.0),
            upstream_cost: crate::cloud::MicroUsd(charge.upstream.0),
        })
    }

    /// Counts a settled cloud part in the tenant's cloud spend (what the
    /// ledger charged for it, as the settlement recorded it) and logs it as
    /// `<request id>/cloud`. A failure to count is logged: the spend stays
    /// uncounted in the ledger, and the next start counts it.
    pub(super) async fn record_cloud(&self, part: CloudPart) {
        let config = self.cloud.upstream.config();
        let now_ms = crate::core::now_ms().0;
        let counted = match ledger::core::RequestId::new(self.public_id.as_str()) {
            Ok(request) => self
                .cloud
                .budgets
                .count_settled(self.state.billing.ledger(), &request, now_ms)
                .await
                .map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = counted {
            tracing::error!(%error, request_id = %self.public_id, tenant_id = self.tenant.id, "count cloud spend");
        }
        let record = RequestRecord {
            id: format!("{}/cloud", self.public_id),
            tenant_id: self.tenant.id,
            model: config.public_name(),
            status: "finished",
            prompt_tokens: part.prompt_tokens,
            completion_tokens: part.completion_tokens,
            nodes: vec!["cloud".to_string()],
            created_ms: self.created_ms,
            finished_ms: now_ms,
            error: None,
        };
        if let Err(error) = self.state.store.log_request(&record).await {
            tracing::error!(%error, request_id = %self.public_id, "log cloud request");
        }
    }

    /// Settles a request the client went away from, for the work done
    /// until then, like a cancelled fleet request (`CancelCharge`): the
    /// machine booked every edge generation cut short with all its tokens
    /// (the client asked for them) and the cloud's prompt and streamed text;
    /// discarded attempts are reimbursed. A request that made no vehicle or
    /// upstream work yet is not charged. A failure is logged: the client is
    /// gone.
    pub(super) async fn settle_cancelled(&mut self) {
        let Some(booking) = self.booking.as_ref() else {
            // Settled before the client left.
            return;
        };
        if booking.is_empty() && self.discarded_edge.is_empty() {
            // Dropping the booking releases its hold.
            self.booking = None;
            return;
        }
        match self.settle().await {
            Ok(charged) => {
                tracing::info!(request_id = %self.public_id, %charged, "cancelled routed request settled");
                if let Some(part) = self.cut_cloud.take() {
                    self.record_cloud(part).await;
                }
            }
            Err(_) => {
                tracing::error!(request_id = %self.public_id, "settle a cancelled routed request");
            }
        }
    }

    /// Settles the request once, with every discarded edge attempt; a
    /// failure withholds the successful end from the client (it was not
    /// charged). Returns what the tenant was charged.
    pub(super) async fn settle(&mut self) -> Flow<crate::cloud::MicroUsd> {
        let model = self.request.model.name.clone();
        let mut booking = self.booking.take().ok_or_else(|| {
            tracing::error!("a routed request is settled twice");
            Stop::Failed(ApiError::internal())
        })?;
        for metering in std::mem::take(&mut self.discarded_edge) {
            booking
                .add_discarded_edge(&model, &metering)
                .await
                .map_err(|error| Stop::Failed(error.into()))?;
        }
        let completed_ms = crate::core::now_ms().0;
        let charged = booking
            .settle(completed_ms)
            .await
            .map_err(|error| Stop::Failed(error.into()))?;
        Ok(crate::cloud::MicroUsd(charged.0))
    }
}

/// 402: the tenant's cloud budget is spent.
pub(super) fn budget_spent(budget: &BudgetStatus) -> ApiError {
    ApiError {
        status: StatusCode::PAYMENT_REQUIRED,
        message: format!(
            "this tenant's cloud budget is spent ({} of a {} cap); ask for model 'auto' to be served by the fleet, or have the operator raise the cap",
            budget.spent,
            budget.cap.unwrap_or_default()
        ),
        kind: "insufficient_quota",
        param: None,
        code: Some("cloud_budget_exceeded"),
        retry_after_seconds: None,
    }
}

/// The client's view of an upstream failure: 504 for a timeout, 429/503 when
/// full, the upstream's own 400 for a request it refused, otherwise 502.
pub(super) fn upstream_error(error: &UpstreamError) -> ApiError {
    let gateway = |status: StatusCode, code: &'static str| ApiError {
        status,
        message: error.to_string(),
        kind: "server_error",
        param: None,
        code: Some(code),
        retry_after_seconds: None,
    };
    match error {
        UpstreamError::Busy => ApiError::too_many(
            "the cloud model has as many requests in flight as this gateway allows; retry shortly",
            limits::RETRY_AFTER_DEFAULT_SECONDS,
        ),
        UpstreamError::Timeout(_) => gateway(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        UpstreamError::Unreachable(_) => gateway(StatusCode::BAD_GATEWAY, "upstream_unreachable"),
        UpstreamError::Protocol(_) => gateway(StatusCode::BAD_GATEWAY, "upstream_error"),
        UpstreamError::Status {
            status,
            message,
            retry_after_seconds,
        } => match status {
            429 | 503 => ApiError::unavailable(
                format!("the cloud model is overloaded: {message}"),
                retry_after_seconds.unwrap_or(limits::RETRY_AFTER_DEFAULT_SECONDS),
            ),
            400 | 404 | 413 | 422 => ApiError::invalid(
                format!("the cloud model refused the request: {message}"),
                None,
                "upstream_rejected",
            ),
            _ => gateway(StatusCode::BAD_GATEWAY, "upstream_error"),
        },
    }
}
