//! The gateway's slots for a request: one of `INFLIGHT_REQUESTS_MAX` over
//! all tenants, and one of the tenant's own (`tenant_requests`). Both are
//! held for as long as the request's response lives; either being full is
//! a 429 with `Retry-After`, the tenant's naming its limit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::{ApiError, AppState};
use crate::limits;
use crate::store::TenantRecord;
use crate::tenant_requests::TenantSlot;

/// A request's hold on the gateway; dropping it frees both slots.
#[derive(Debug)]
pub struct RequestSlot {
    _gateway: OwnedSemaphorePermit,
    _tenant: TenantSlot,
}

/// Takes the tenant's slot, then the gateway's, or answers 429.
pub(super) fn admit(state: &AppState, tenant: &TenantRecord) -> Result<RequestSlot, ApiError> {
    let tenant_slot = state
        .tenant_requests
        .try_acquire(tenant.id)
        .map_err(|over| {
            (state.metrics.http.requests_rejected_tenant_limit).fetch_add(1, Ordering::Relaxed);
            let mut error = ApiError::too_many(
                format!(
                    "this tenant already has its limit of concurrent requests in flight \
                     (max_concurrency {}); retry when one of them has finished",
                    over.limit
                ),
                limits::RETRY_AFTER_DEFAULT_SECONDS,
            );
            error.code = Some("concurrency_limit_exceeded");
            error
        })?;
    let gateway = Arc::clone(&state.inflight)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::too_many(
                "the gateway is holding as many requests as it can; retry shortly",
                limits::RETRY_AFTER_DEFAULT_SECONDS,
            )
        })?;
    Ok(RequestSlot {
        _gateway: gateway,
        _tenant: tenant_slot,
    })
}
