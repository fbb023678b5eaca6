//! The core driven by a manual clock: what depends on time happens when the
//! clock says so, without a test waiting for it.

use std::sync::Arc;
use std::time::Duration;

use domain::TimestampMs;
use scheduler::OwnerPolicy;
use tokio::sync::mpsc;

use super::{Core, ManualClock, ORDER};
use crate::metrics::Metrics;
use crate::nodes::NodeSession;
use cell_api::served::ServedModels;

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

struct Harness {
    clock: Arc<ManualClock>,
    core: Core,
    /// Kept open so that what the core sends a node is not refused.
    _to_nodes: Vec<mpsc::Receiver<proto::CoordinatorMessage>>,
}

impl Harness {
    fn new() -> Harness {
        Harness::serving(ServedModels::default())
    }

    /// A core serving the test model (its tokenizer is loaded; nothing runs).
    fn serving_the_test_model() -> Harness {
        let path = engine::testing::test_model_path();
        let tokenizer = engine::Tokenizer::load(&path).expect("load the tokenizer");
        let pieces = cell_api::served::PieceTable::build(&tokenizer);
        let mut served = ServedModels::default();
        served.add(
            engine::testing::TEST_MODEL_NAME.to_owned(),
            engine::testing::TEST_MODEL_SHA256.to_owned(),
            tokenizer,
            pieces,
            2048,
            0,
        );
        Harness::serving(served)
    }

    fn serving(served: ServedModels) -> Harness {
        let clock = Arc::new(ManualClock::new(TimestampMs(1_704_067_200_000)));
        let scheduler = scheduler::Scheduler::new(scheduler::SchedulerConfig::default());
        let (request_log, _) = mpsc::channel(16);
        let core = Core::new(
            scheduler,
            Arc::new(served),
            Arc::new(Metrics::default()),
            request_log,
            Arc::clone(&clock) as Arc<dyn super::Clock>,
        );
        Harness {
            clock,
            core,
            _to_nodes: Vec::new(),
        }
    }

    fn connect(&mut self, name: &str) -> NodeSession {
        self.connect_with(name, &proto::Hello::default())
    }

    /// Connects a plugged-in vehicle with one slot and the test model loaded.
    fn connect_serving(&mut self, name: &str) -> NodeSession {
        let hello = proto::Hello {
            hardware: Some(proto::Hardware {
                parallel_sequences: 1,
                decode_tokens_per_second: 20.0,
                prefill_tokens_per_second: 200.0,
                ..proto::Hardware::default()
            }),
            models: vec![proto::CachedModel {
                name: engine::testing::TEST_MODEL_NAME.to_owned(),
                sha256: engine::testing::TEST_MODEL_SHA256.to_owned(),
                size_bytes: 1,
                loaded: true,
            }],
            state: Some(proto::VehicleState {
                plugged_in: true,
                charging: true,
                state_of_charge: 0.8,
                temperature_c: 30.0,
                ..proto::VehicleState::default()
            }),
            ..proto::Hello::default()
        };
        self.connect_with(name, &hello)
    }

    fn connect_with(&mut self, name: &str, hello: &proto::Hello) -> NodeSession {
        let (outbound, to_node) = mpsc::channel(16);
        self._to_nodes.push(to_node);
        let (session, _disconnect) =
            self.core
                .node_connected(name, hello, outbound, OwnerPolicy::default());
        session
    }

    fn after(&self, elapsed: Duration) {
        self.clock.advance(elapsed);
        self.core.tick(HEARTBEAT_TIMEOUT);
    }
}

#[test]
fn a_silent_node_is_dropped_only_once_the_heartbeat_timeout_has_passed() {
    let mut harness = Harness::new();
    harness.connect("car-1");

    harness.after(HEARTBEAT_TIMEOUT);
    assert_eq!(harness.core.connected_nodes(), ["car-1"]);

    harness.after(Duration::from_millis(1));
    assert!(harness.core.connected_nodes().is_empty());
    assert_eq!(harness.core.metrics.nodes_lost.load(ORDER), 1);
}

#[test]
fn a_heartbeat_restarts_the_timeout() {
    let mut harness = Harness::new();
    let session = harness.connect("car-1");

    harness.after(Duration::from_secs(8));
    harness
        .core
        .heartbeat(session, &proto::Heartbeat::default());
    harness.after(Duration::from_secs(8));
    assert_eq!(harness.core.connected_nodes(), ["car-1"]);

    harness.after(Duration::from_secs(3));
    assert!(harness.core.connected_nodes().is_empty());
}

#[test]
fn a_bounded_listing_names_what_the_full_capacity_would_and_counts_the_rest() {
    let mut harness = Harness::new();
    for name in ["car-5", "car-2", "car-4", "car-1", "car-3"] {
        harness.connect(name);
    }
    let full = harness.core.capacity();
    for listed in [0, 3, 5, 9] {
        assert_eq!(
            harness.core.capacity_listing(listed),
            cell_api::CapacityListing::of(full.clone(), listed),
            "naming at most {listed}"
        );
    }
    let listing = harness.core.capacity_listing(3);
    assert_eq!(listing.capacity.node_names(), ["car-1", "car-2", "car-3"]);
    assert_eq!(listing.capacity.nodes_connected(), 5);
    assert_eq!(listing.capacity.holds("car-5"), None);
}

#[test]
fn a_listing_counts_each_models_generations_waiting_for_a_vehicle() {
    let mut harness = Harness::serving_the_test_model();
    harness.connect_serving("car-1");
    let mut admitted = Vec::new();
    for index in 0..3 {
        let generation = cell_api::NewGeneration {
            public_id: format!("chatcmpl-{index}"),
            tenant: cell_api::TenantRef {
                id: 1,
                class: store::TenantClass::Spot,
            },
            model: engine::testing::TEST_MODEL_NAME.to_owned(),
            prompt: vec![1, 2, 3, index],
            committed: Vec::new(),
            sampling: proto::Sampling::default(),
            max_tokens: 8,
            stop: Vec::new(),
            top_logprobs: 0,
            prompt_logprobs: false,
            deadline_ms: None,
        };
        admitted.push(harness.core.submit(generation).expect("admitted"));
    }
    let listing = harness.core.capacity_listing(10);
    let totals = &listing.models[0];
    assert_eq!(totals.model, engine::testing::TEST_MODEL_NAME);
    // One slot runs the first; the other two wait for it.
    assert_eq!(
        (
            totals.nodes,
            totals.running,
            totals.free_slots,
            totals.queued
        ),
        (1, 1, 0, 2)
    );
}

/// The generation id of the first `Assign` waiting on node `index`'s channel, if any.
fn assigned(harness: &mut Harness, index: usize) -> Option<String> {
    while let Ok(message) = harness._to_nodes[index].try_recv() {
        if let Some(proto::coordinator_message::Kind::Assign(assign)) = message.kind {
            return Some(assign.generation_id);
        }
    }
    None
}

/// A spot tenant's generation of the test model, prompt [1, 2, 3].
fn spot_generation(
    public_id: &str,
    sampling: proto::Sampling,
    max_tokens: u32,
) -> cell_api::NewGeneration {
    cell_api::NewGeneration {
        public_id: public_id.to_owned(),
        tenant: cell_api::TenantRef {
            id: 1,
            class: store::TenantClass::Spot,
        },
        model: engine::testing::TEST_MODEL_NAME.to_owned(),
        prompt: vec![1, 2, 3],
        committed: Vec::new(),
        sampling,
        max_tokens,
        stop: Vec::new(),
        top_logprobs: 0,
        prompt_logprobs: false,
        deadline_ms: None,
    }
}

fn tokens(ids: &[i32], from: u32) -> Vec<proto::Token> {
    ids.iter()
        .zip(from..)
        .map(|(&token_id, position)| proto::Token {
            position,
            token_id,
            logprob: -0.5,
            ..proto::Token::default()
        })
        .collect()
}

/// A vehicle is not trusted to have applied a structured answer's grammar:
/// tokens it allows are committed, a token it forbids ends the vehicle's
/// session and the generation moves on from what was committed, and a
/// vehicle saying it stopped before the grammar let the answer end is
/// treated the same.
#[test]
fn tokens_outside_a_structured_answers_grammar_move_it_to_another_vehicle() {
    let mut harness = Harness::serving_the_test_model();
    let cars = [
        harness.connect_serving("car-1"),
        harness.connect_serving("car-2"),
        harness.connect_serving("car-3"),
    ];
    let tokenizer = engine::Tokenizer::load(&engine::testing::test_model_path()).unwrap();
    let encode = |text: &str| tokenizer.tokenize(text, false).unwrap();
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}},
        "required": ["a"], "additionalProperties": false});
    let generation = spot_generation(
        "chatcmpl-structured",
        proto::Sampling {
            grammar: engine::json_schema_grammar(&schema),
            ..proto::Sampling::default()
        },
        32,
    );
    let mut admitted = harness.core.submit(generation).expect("admitted");
    let placed = |harness: &mut Harness| {
        (0..cars.len())
            .find_map(|index| assigned(harness, index).map(|id| (index, id)))
            .expect("an assignment")
    };

    let (first, id) = placed(&mut harness);
    let opening = encode("{\"a\": ");
    harness.core.node_tokens(
        cars[first],
        proto::TokenBatch {
            generation_id: id.clone(),
            tokens: tokens(&opening, 0),
        },
    );
    let mut committed = 0;
    while let Ok(cell_api::Update::Token(_)) = admitted.updates.try_recv() {
        committed += 1;
    }
    assert_eq!(
        committed,
        opening.len(),
        "tokens the grammar allows are committed"
    );
    // Letters where the grammar wants an integer.
    harness.core.node_tokens(
        cars[first],
        proto::TokenBatch {
            generation_id: id,
            tokens: tokens(&encode("seven"), committed as u32),
        },
    );
    assert!(
        admitted.updates.try_recv().is_err(),
        "nothing of it reaches the client"
    );
    let (second, id) = placed(&mut harness);
    assert_ne!(second, first, "the generation moved to another vehicle");

    // The next vehicle writes the number and claims the answer is complete
    // without closing the object.
    let seven = encode("7");
    harness.core.node_tokens(
        cars[second],
        proto::TokenBatch {
            generation_id: id.clone(),
            tokens: tokens(&seven, committed as u32),
        },
    );
    // The refused batch left the grammar where it was: the digit is taken.
    for _ in &seven {
        assert!(matches!(
            admitted.updates.try_recv(),
            Ok(cell_api::Update::Token(_))
        ));
    }
    harness.core.node_done(
        cars[second],
        proto::GenerationDone {
            generation_id: id,
            reason: proto::FinishReason::Stop as i32,
            ..proto::GenerationDone::default()
        },
    );
    let (third, _) = placed(&mut harness);
    assert!(third != first && third != second, "moved again");
    while let Ok(update) = admitted.updates.try_recv() {
        assert!(
            matches!(update, cell_api::Update::Token(_)),
            "the answer is not over: {update:?}"
        );
    }
}

/// Of two vehicles alike but for their electricity, the cheaper serves,
/// though it connected second (a lower node id breaks only a full tie).
#[test]
fn of_two_equal_vehicles_the_one_with_cheaper_electricity_serves() {
    let mut harness = Harness::serving_the_test_model();
    harness.core.set_energy_prices(crate::nodes::EnergyPrices {
        default: 160_000,
        by_node: [("peak-tariff".to_owned(), 600_000)].into(),
    });
    harness.connect_serving("peak-tariff");
    harness.connect_serving("flat-tariff");
    let generation = spot_generation("chatcmpl-cheaper", proto::Sampling::default(), 8);
    let _admitted = harness.core.submit(generation).expect("admitted");
    assert_eq!(assigned(&mut harness, 0), None);
    assert!(assigned(&mut harness, 1).is_some());
}
