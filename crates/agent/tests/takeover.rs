//! A cell that takes a vehicle over applies the rules the database holds for it: two in-process
//! cells (`cell::start`), each with its own handle on one store (SQLite, and PostgreSQL as a
//! cluster has it), and the agent's own session loop with a model-free executor. The owner's
//! policy and a tenant's contract are stored once, through neither cell; the vehicle starts on
//! the first cell, which is shut down, and the second, which never held it, must refuse the work
//! the policy and the contract refuse, and take the rest.
//!
//! Needs the tokenizer of the test model (SmolLM2-135M-Instruct Q4_1, `cargo xtask test` fetches
//! it; or `FLEETGRID_TEST_MODEL`), so that the cells serve a model; no model runs. The PostgreSQL
//! half needs a server (`FLEETGRID_TEST_POSTGRES_URL`, see `store::testing`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agent::{
    serve_cells, BackoffConfig, CellLink, Execution, Executor, GenerationTask, Node, NodeIdentity,
    VehicleStateSource,
};
use cell_api::served::{PieceTable, ServedModels};
use cell_api::{Cell, NewGeneration, Rejection, TenantRef};
use engine::testing::{test_model_path, TEST_MODEL_NAME, TEST_MODEL_SHA256};
use rand::rngs::StdRng;
use rand::SeedableRng;
use scheduler::{ClassSet, OwnerPolicy};
use store::contracts::TenantContract;
use store::testing::TestStore;
use store::{Store, TenantClass};
use tokio_util::sync::CancellationToken;

const NODE: &str = "car-taken-over";
const MODEL: &str = TEST_MODEL_NAME;
/// The fleet tenant's contract: fewer tokens a minute than one large request asks.
const TOKENS_PER_MINUTE: u32 = 40;
/// How long the vehicle may take to reach a cell.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

store::on_each_backend!(a_cell_that_takes_a_vehicle_over_applies_its_stored_policy_and_contracts);

/// Fails every assignment as retryable: only admission is looked at here.
struct NoModel;

impl Executor for NoModel {
    fn execute(&self, _assign: proto::Assign, task: GenerationTask) -> Execution {
        Box::pin(async move { task.fail("no model here".to_owned(), true).await })
    }
}

fn served_models() -> Arc<ServedModels> {
    let tokenizer = engine::Tokenizer::load(&test_model_path()).expect("load the tokenizer");
    let pieces = PieceTable::build(&tokenizer);
    let mut served = ServedModels::default();
    served.add(
        MODEL.to_owned(),
        TEST_MODEL_SHA256.to_owned(),
        tokenizer,
        pieces,
        2048,
        0,
    );
    Arc::new(served)
}

struct TestCell {
    running: cell::Running,
    shutdown: CancellationToken,
}

impl TestCell {
    async fn start(store: Store, models: &Arc<ServedModels>) -> TestCell {
        let shutdown = CancellationToken::new();
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let running = cell::start(
            cell::CellConfig::new(listen),
            store,
            Arc::clone(models),
            shutdown.clone(),
        )
        .await
        .expect("cell starts");
        TestCell { running, shutdown }
    }

    fn url(&self) -> String {
        format!("http://{}", self.running.grpc)
    }

    async fn wait_for(&self, node: &str) {
        let started = Instant::now();
        while !self
            .running
            .core
            .connected_nodes()
            .iter()
            .any(|n| n == node)
        {
            assert!(
                started.elapsed() < CONNECT_WITHIN,
                "{node} never reached {}",
                self.url()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn submit(&self, tenant: &store::TenantRecord, max_tokens: u32) -> Result<(), Rejection> {
        let generation = NewGeneration {
            public_id: format!("chatcmpl-{}-{max_tokens}", tenant.id),
            tenant: TenantRef {
                id: tenant.id,
                class: tenant.class,
            },
            model: MODEL.to_owned(),
            prompt: vec![1, 2, 3, 4],
            committed: Vec::new(),
            numerics: None,
            sampling: proto::Sampling::default(),
            max_tokens,
            stop: Vec::new(),
            top_logprobs: 0,
            prompt_logprobs: false,
            draft: Vec::new(),
            deadline_ms: None,
        };
        let admitted = Cell::submit(self.running.core.as_ref(), generation).await?;
        Cell::cancel(self.running.core.as_ref(), admitted.request);
        Ok(())
    }
}

fn node(credential: &str) -> Node {
    let identity = NodeIdentity {
        node_id: NODE.to_owned(),
        credential: credential.to_owned(),
        hardware: proto::Hardware {
            memory_budget_bytes: 1 << 30,
            threads: 1,
            decode_tokens_per_second: 10.0,
            prefill_tokens_per_second: 100.0,
            parallel_sequences: 1,
            engine_version: "none".to_owned(),
            cpu_kernels: String::new(),
            attention: proto::Attention::Off as i32,
        },
        models: vec![proto::CachedModel {
            name: MODEL.to_owned(),
            sha256: TEST_MODEL_SHA256.to_owned(),
            size_bytes: 1,
            loaded: true,
        }],
    };
    let vehicle = VehicleStateSource::Datacenter
        .open(SystemTime::now())
        .expect("adapter");
    Node::new(
        identity,
        Arc::new(NoModel),
        vehicle,
        Duration::from_millis(200),
    )
}

async fn a_cell_that_takes_a_vehicle_over_applies_its_stored_policy_and_contracts(
    test: &TestStore,
) {
    let store = &test.store;
    let credential = store.add_node(NODE, "", 0).await.expect("enrol");
    let (fleet, _) = store
        .create_tenant("fleet-tenant", TenantClass::Fleet, 0)
        .await
        .expect("tenant");
    let (spot, _) = store
        .create_tenant("spot-tenant", TenantClass::Spot, 0)
        .await
        .expect("tenant");
    // A contract the operator set before the cells started.
    let contract = TenantContract {
        tokens_per_minute: Some(TOKENS_PER_MINUTE),
        ..TenantContract::default()
    };
    store
        .set_tenant_contract("fleet-tenant", &contract)
        .await
        .expect("contract");
    let models = served_models();
    let first = TestCell::start(test.another_handle().await, &models).await;
    let second = TestCell::start(test.another_handle().await, &models).await;

    let cells: Vec<CellLink> = [first.url(), second.url()]
        .iter()
        .map(|url| CellLink::dial(url).expect("valid url"))
        .collect();
    let node = node(&credential);
    let stop_agent = CancellationToken::new();
    let agent_stop = stop_agent.clone();
    let backoff = BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        factor: 2,
    };
    let agent = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(3);
        serve_cells(&node, &cells, backoff, &mut rng, &agent_stop).await
    });
    first.wait_for(NODE).await;
    // The owner's policy, written while the vehicle is on the first cell:
    // the second hears of it for a vehicle it does not hold, so only the
    // database can give it the policy when it takes the vehicle over.
    let policy = OwnerPolicy {
        allowed_classes: ClassSet::only(TenantClass::Fleet),
        ..OwnerPolicy::default()
    };
    store
        .set_node_policy(NODE, &policy, 0)
        .await
        .expect("policy");
    first.shutdown.cancel();
    second.wait_for(NODE).await;

    assert!(
        matches!(second.submit(&fleet, 8).await, Ok(())),
        "work the rules allow runs on the vehicle"
    );
    assert!(
        matches!(
            second.submit(&spot, 8).await,
            Err(Rejection::NoEligibleNode { .. })
        ),
        "the owner's stored policy keeps spot work off the vehicle"
    );
    assert!(
        matches!(
            second.submit(&fleet, 200).await,
            Err(Rejection::OverQuota { .. })
        ),
        "the tenant's stored contract bounds its tokens per minute"
    );

    stop_agent.cancel();
    let _ = tokio::time::timeout(CONNECT_WITHIN, agent).await;
    second.shutdown.cancel();
}
