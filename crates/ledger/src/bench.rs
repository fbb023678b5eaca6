//! Commit throughput: how many transfers per second a store commits durably
//! in batches, on a settlement-like mix of transfers.
//!
//! The transfers are built before the clock starts, so the figure is the
//! store's: planning, SQL and the durable commit.

use std::time::Instant;

use crate::core::{
    AccountId, MicroUsd, OwnerId, RequestId, Segment, TenantId, TimestampMs, Transfer,
    TransferKind, TransferSpec, BATCH_TRANSFERS_MAX,
};
use crate::store::{Store, StoreError};

/// Tenants the benchmark charges, round robin.
pub const TENANTS: usize = 100;

/// Owners the benchmark credits, round robin.
pub const OWNERS: usize = 1_000;

/// Commits `n` transfers in batches of `batch` and returns transfers per
/// second. Every third transfer is a tenant charge, the others an owner's
/// revenue share and energy reimbursement, as a settled request produces.
/// Runs on a store that already holds transfers are told apart by its
/// transfer count, so the benchmark never collides with its own past runs.
pub async fn transfers(store: &Store, n: usize, batch: usize) -> Result<f64, StoreError> {
    let batch = batch.clamp(1, BATCH_TRANSFERS_MAX);
    let run = store.transfer_count().await?;
    let tenants = prepare_tenants(store).await?;
    let owners = prepare_owners(store).await?;
    let transfers = (0..n)
        .map(|index| settlement_like(run, index, &tenants, &owners))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    for chunk in transfers.chunks(batch) {
        store.commit(chunk).await?;
    }
    let seconds = started.elapsed().as_secs_f64().max(f64::EPSILON);
    Ok(n as f64 / seconds)
}

async fn prepare_tenants(store: &Store) -> Result<Vec<TenantId>, StoreError> {
    let mut tenants = Vec::with_capacity(TENANTS);
    for index in 0..TENANTS {
        let tenant = TenantId::new(format!("bench-tenant-{index}"))?;
        store
            .open_account(&AccountId::Tenant(tenant.clone()))
            .await?;
        // Credit large enough for any run, so no charge is refused.
        store
            .set_credit_limit(&tenant, MicroUsd(i64::MAX / 4))
            .await?;
        tenants.push(tenant);
    }
    Ok(tenants)
}

async fn prepare_owners(store: &Store) -> Result<Vec<OwnerId>, StoreError> {
    let mut owners = Vec::with_capacity(OWNERS);
    for index in 0..OWNERS {
        let owner = OwnerId::new(format!("bench-owner-{index}"))?;
        store.open_account(&AccountId::Owner(owner.clone())).await?;
        owners.push(owner);
    }
    Ok(owners)
}

fn settlement_like(
    run: u64,
    index: usize,
    tenants: &[TenantId],
    owners: &[OwnerId],
) -> Result<Transfer, StoreError> {
    let request = index / 3;
    let tenant = AccountId::Tenant(tenants[request % tenants.len()].clone());
    let owner = AccountId::Owner(owners[request % owners.len()].clone());
    let (kind, debit, credit, amount) = match index % 3 {
        0 => (
            TransferKind::TokenCharge,
            tenant,
            AccountId::PlatformRevenue,
            300,
        ),
        1 => (
            TransferKind::RevenueShare,
            AccountId::PlatformRevenue,
            owner,
            200,
        ),
        _ => (
            TransferKind::EnergyReimbursement,
            AccountId::EnergyReimbursement,
            owner,
            50,
        ),
    };
    Ok(Transfer::new(TransferSpec {
        kind,
        debit,
        credit,
        amount: MicroUsd(amount),
        request_id: RequestId::new(format!("bench-{run}-{request}"))?,
        segment: Segment(0),
        quantity: 100,
        at: TimestampMs(i64::try_from(request).unwrap_or(i64::MAX)),
    })?)
}
