//! Fixtures shared by the integration tests: a price book, metered segments,
//! and a throw-away PostgreSQL schema.
//!
//! The PostgreSQL tests need a server: `LEDGER_TEST_POSTGRES_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test`. They fail with a clear message
//! when it is unreachable; they never skip.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use ledger::core::{
    AccountId, BasisPoints, DurationMs, MicroUsd, ModelId, NodeId, OwnerId, RequestId, Segment,
    TenantId, TimestampMs, TokenCount, Transfer, TransferKind, TransferSpec,
};
use ledger::metering::{
    meter_node_segment, NodeObservation, PowerProfile, Server, TimeOfUseTariff, UsageSegment,
};
use ledger::pricing::{Price, PriceBook, PriceSheet, TenantClass};
use ledger::settlement::CompletedRequest;
use ledger::store::Store;
use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;

pub const FLEET_MODEL: &str = "smollm2-135m-instruct";
pub const CLOUD_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

pub fn model(name: &str) -> ModelId {
    ModelId::new(name).unwrap()
}

pub fn price(prompt: i64, completion: i64) -> Price {
    Price {
        prompt_per_million: MicroUsd(prompt),
        completion_per_million: MicroUsd(completion),
    }
}

/// Spot $0.10/$0.20 per million, reserved $0.15/$0.30, fleet $0.12/$0.24;
/// the cloud model costs $1/$2 upstream plus `margin_bps`; owners get
/// `owner_share_bps` of the revenue.
pub fn sheet(owner_share_bps: u32, margin_bps: u32) -> PriceSheet {
    let mut fleet = BTreeMap::new();
    fleet.insert(
        (model(FLEET_MODEL), TenantClass::Spot),
        price(100_000, 200_000),
    );
    fleet.insert(
        (model(FLEET_MODEL), TenantClass::Reserved),
        price(150_000, 300_000),
    );
    fleet.insert(
        (model(FLEET_MODEL), TenantClass::Fleet),
        price(120_000, 240_000),
    );
    let mut upstream = BTreeMap::new();
    upstream.insert(model(CLOUD_MODEL), price(1_000_000, 2_000_000));
    PriceSheet {
        fleet,
        upstream,
        cloud_margin: BasisPoints(margin_bps),
        owner_share: BasisPoints(owner_share_bps),
    }
}

pub fn book() -> PriceBook {
    PriceBook::new(sheet(7_000, 2_000)).unwrap()
}

pub const POWER: PowerProfile = PowerProfile {
    watts_idle: 20,
    watts_busy: 72,
};

/// 30 cents per kWh all day.
pub fn tariff() -> TimeOfUseTariff {
    TimeOfUseTariff::flat(MicroUsd(300_000))
}

/// A fleet segment as the coordinator meters it.
pub fn node_segment(
    request: &str,
    segment: u32,
    node: &str,
    owner: &str,
    prompt: u64,
    completion: u64,
    started_ms: i64,
) -> UsageSegment {
    meter_node_segment(
        NodeObservation {
            request_id: RequestId::new(request).unwrap(),
            segment: Segment(segment),
            node: NodeId::new(node).unwrap(),
            owner: OwnerId::new(owner).unwrap(),
            model: model(FLEET_MODEL),
            prompt_tokens: TokenCount(prompt),
            completion_tokens: TokenCount(completion),
            compute: DurationMs(20 * (prompt + completion)),
            started_at: TimestampMs(started_ms),
        },
        &POWER,
        &tariff(),
    )
}

pub fn cloud_segment(request: &str, segment: u32, prompt: u64, completion: u64) -> UsageSegment {
    UsageSegment {
        request_id: RequestId::new(request).unwrap(),
        segment: Segment(segment),
        server: Server::Cloud,
        model: model(CLOUD_MODEL),
        prompt_tokens: TokenCount(prompt),
        completion_tokens: TokenCount(completion),
        compute: DurationMs(0),
        started_at: TimestampMs(0),
    }
}

/// A fresh SQLite ledger in a temporary directory (kept alive by the guard).
pub async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    (store, dir)
}

fn postgres_url() -> String {
    std::env::var("LEDGER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A PostgreSQL ledger in a schema of its own, dropped by `drop_schema`.
pub struct PgLedger {
    pub store: Store,
    schema: String,
    options: PgConnectOptions,
}

static SCHEMA_COUNTER: AtomicU64 = AtomicU64::new(0);

pub async fn postgres_store() -> PgLedger {
    let url = postgres_url();
    let options: PgConnectOptions = url.parse().unwrap();
    let mut admin = sqlx::PgConnection::connect_with(&options)
        .await
        .unwrap_or_else(|error| {
            panic!(
            "the ledger's PostgreSQL tests need a server at {url} (set LEDGER_TEST_POSTGRES_URL \
             to use another): {error}"
        )
        });
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!(
        "ledger_test_{}_{nanos}_{}",
        std::process::id(),
        SCHEMA_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    let store = Store::connect_postgres_with(options.clone().options([("search_path", &schema)]))
        .await
        .unwrap();
    PgLedger {
        store,
        schema,
        options,
    }
}

impl PgLedger {
    /// Another connection pool on the same schema: another process sharing
    /// the ledger.
    pub async fn connect_again(&self) -> Store {
        Store::connect_postgres_with(
            self.options
                .clone()
                .options([("search_path", self.schema.as_str())]),
        )
        .await
        .unwrap()
    }

    pub async fn drop_schema(self) {
        self.store.close().await;
        let mut admin = sqlx::PgConnection::connect_with(&self.options)
            .await
            .unwrap();
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

/// Runs each named `async fn scenario(&Store)` of the test file on a fresh
/// SQLite store and on a fresh PostgreSQL schema (not every test file uses it).
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let (store, _dir) = crate::common::sqlite_store().await;
                    super::$scenario(&store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let ledger = crate::common::postgres_store().await;
                    super::$scenario(&ledger.store).await;
                    ledger.drop_schema().await;
                }
            )*
        }
    };
}

/// The tenant of the two-owner fixture.
pub fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

pub fn owner(name: &str) -> OwnerId {
    OwnerId::new(name).unwrap()
}

pub async fn balance(store: &Store, account: AccountId) -> i64 {
    store.account(&account).await.unwrap().unwrap().balance().0
}

/// Opens the tenant's account, topped up with `top_up`, and those of the
/// owners alice (car-a) and bob (car-b).
pub async fn open_parties(store: &Store, top_up: i64) {
    store
        .open_account(&AccountId::Tenant(tenant()))
        .await
        .unwrap();
    for name in ["alice", "bob"] {
        store
            .open_account(&AccountId::Owner(owner(name)))
            .await
            .unwrap();
    }
    let top_up = Transfer::new(TransferSpec {
        kind: TransferKind::TopUp,
        debit: AccountId::TenantDeposits,
        credit: AccountId::Tenant(tenant()),
        amount: MicroUsd(top_up),
        request_id: RequestId::new("topup-1").unwrap(),
        segment: Segment(0),
        quantity: 0,
        at: TimestampMs(0),
    })
    .unwrap();
    store.commit(&[top_up]).await.unwrap();
}

/// A request of the tenant that ran on car-a, then moved to car-b (a
/// re-prefill of 1,300 tokens there, then 700 more tokens), completed at
/// `completed_ms`.
pub fn migrated_request(id: &str, completed_ms: i64) -> CompletedRequest {
    CompletedRequest {
        request_id: RequestId::new(id).unwrap(),
        tenant: tenant(),
        class: TenantClass::Spot,
        admitted_at: TimestampMs(completed_ms - 5_000),
        completed_at: TimestampMs(completed_ms),
        segments: vec![
            node_segment(id, 0, "car-a", "alice", 1_000, 300, completed_ms - 5_000),
            node_segment(id, 1, "car-b", "bob", 1_300, 700, completed_ms - 2_000),
        ],
    }
}
