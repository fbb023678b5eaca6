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

/// A plugged-in vehicle with one slot and the test model loaded.
fn serving_hello() -> proto::Hello {
    crate::testing::serving_hello(1)
}

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
        Harness::serving(crate::testing::served_test_model())
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
        self.connect_with(name, &serving_hello())
    }

    fn connect_with(&mut self, name: &str, hello: &proto::Hello) -> NodeSession {
        self.connect_owned(name, "", hello)
    }

    /// Connects a node of `owner` ("" for the platform's own).
    fn connect_owned(&mut self, name: &str, owner: &str, hello: &proto::Hello) -> NodeSession {
        let (outbound, to_node) = mpsc::channel(16);
        self._to_nodes.push(to_node);
        let (session, _disconnect) =
            self.core
                .node_connected(name, owner, hello, outbound, OwnerPolicy::default());
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
            numerics: None,
            sampling: proto::Sampling::default(),
            max_tokens: 8,
            stop: Vec::new(),
            top_logprobs: 0,
            prompt_logprobs: false,
            draft: Vec::new(),
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
        numerics: None,
        sampling,
        max_tokens,
        stop: Vec::new(),
        top_logprobs: 0,
        prompt_logprobs: false,
        draft: Vec::new(),
        deadline_ms: None,
    }
}

/// A batch of `ids` for generation `id`, the first at position `from`.
fn batch(id: impl Into<String>, ids: &[i32], from: u32) -> proto::TokenBatch {
    proto::TokenBatch {
        generation_id: id.into(),
        tokens: tokens(ids, from),
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
    harness
        .core
        .node_tokens(cars[first], batch(&id, &opening, 0));
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
    harness
        .core
        .node_tokens(cars[first], batch(id, &encode("seven"), committed as u32));
    assert!(
        admitted.updates.try_recv().is_err(),
        "nothing of it reaches the client"
    );
    let (second, id) = placed(&mut harness);
    assert_ne!(second, first, "the generation moved to another vehicle");

    // The next vehicle writes the number and claims the answer is complete
    // without closing the object.
    let seven = encode("7");
    harness
        .core
        .node_tokens(cars[second], batch(&id, &seven, committed as u32));
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

/// A generation moved off a lost vehicle continues on a vehicle of the same
/// attention setting, where it continues bit for bit, though a vehicle of
/// another setting connected earlier (a lower node id) and is as free; moved
/// again with only that one left, it continues there and is counted.
#[test]
fn a_moved_generation_continues_on_a_vehicle_of_its_attention_setting() {
    let mut harness = Harness::serving_the_test_model();
    let mut fast = serving_hello();
    if let Some(hardware) = fast.hardware.as_mut() {
        hardware.attention = proto::Attention::Fast as i32;
    }
    let cars = [
        harness.connect_serving("off-1"),
        harness.connect_with("fast", &fast),
        harness.connect_serving("off-2"),
    ];
    let generation = spot_generation("chatcmpl-moved", proto::Sampling::default(), 16);
    let _admitted = harness.core.submit(generation).expect("admitted");
    let id = assigned(&mut harness, 0).expect("the first vehicle serves");
    harness.core.node_tokens(cars[0], batch(&id, &[5, 6, 7], 0));
    harness.core.node_lost(cars[0]);
    assert_eq!(assignment(&mut harness, 1), None, "not the fast vehicle");
    let moved = assignment(&mut harness, 2).expect("the other vehicle without flash attention");
    assert_eq!(moved.committed_tokens, vec![5, 6, 7]);
    let across = |harness: &Harness| harness.core.metrics.moves_across_numerics.load(ORDER);
    assert_eq!(across(&harness), 0);

    // Lost again with only the fast vehicle left: it continues there, and is counted.
    harness
        .core
        .node_tokens(cars[2], batch(&moved.generation_id, &[8], 3));
    harness.core.node_lost(cars[2]);
    let last = assignment(&mut harness, 1).expect("the fast vehicle, rather than waiting");
    assert_eq!(last.committed_tokens, vec![5, 6, 7, 8]);
    assert_eq!(across(&harness), 1);
}

/// Once made-up kernels reports have filled the cell's numerics table, two
/// vehicles of a later build share an id that promises nothing: work moved
/// between them is counted as moved across numerics, and operators see the
/// registrations counted.
#[test]
fn vehicles_registered_past_a_flood_of_made_up_kernels_are_counted_and_not_alike() {
    let mut harness = Harness::serving_the_test_model();
    let kernels = |hello: &mut proto::Hello, report: &str| {
        if let Some(hardware) = hello.hardware.as_mut() {
            hardware.cpu_kernels = report.to_owned();
        }
    };
    for n in 0..crate::nodes::NUMERICS_MAX {
        let mut hello = proto::Hello {
            hardware: Some(proto::Hardware::default()),
            ..proto::Hello::default()
        };
        kernels(&mut hello, &format!("made up {n}"));
        harness.connect_with(&format!("flood-{n}"), &hello);
    }
    let unknown = |harness: &Harness| {
        harness
            .core
            .metrics
            .registrations_of_unknown_numerics
            .load(ORDER)
    };
    assert_eq!(unknown(&harness), 0, "the flood filled the table exactly");
    let mut late = serving_hello();
    kernels(&mut late, "CPU : AVX2 = 1 | a later build |");
    let cars = [
        harness.connect_with("late-1", &late),
        harness.connect_with("late-2", &late),
    ];
    assert_eq!(unknown(&harness), 2);
    let first = crate::nodes::NUMERICS_MAX;
    let generation = spot_generation("chatcmpl-late", proto::Sampling::default(), 16);
    let _admitted = harness.core.submit(generation).expect("admitted");
    let id = assigned(&mut harness, first).expect("the first late vehicle serves");
    harness.core.node_tokens(cars[0], batch(&id, &[5, 6, 7], 0));
    harness.core.node_lost(cars[0]);
    let moved = assignment(&mut harness, first + 1).expect("the other late vehicle");
    assert_eq!(moved.committed_tokens, vec![5, 6, 7]);
    assert_eq!(
        harness.core.metrics.moves_across_numerics.load(ORDER),
        1,
        "the same build string past the table's bound promises no bit-for-bit continuation"
    );
}

/// A generation moved here from a lost cell names the numbers its tokens came
/// from: the cell places it at once on a vehicle computing the same, not on
/// the one a new generation would take, and names that vehicle's numbers on.
#[test]
fn a_generation_moved_from_another_cell_continues_on_a_vehicle_of_its_numerics() {
    let mut harness = Harness::serving_the_test_model();
    let built = |report: &str| {
        let mut hello = serving_hello();
        if let Some(hardware) = hello.hardware.as_mut() {
            hardware.cpu_kernels = report.to_owned();
        }
        hello
    };
    let (other, alike) = (built("CPU : AVX2 = 1 |"), built("CPU : AVX512 = 1 |"));
    harness.connect_with("car-1", &other);
    harness.connect_with("car-2", &alike);
    let key = crate::nodes::numerics_key(alike.hardware.as_ref(), proto::Attention::Off);
    let mut generation = spot_generation("chatcmpl-moved", proto::Sampling::default(), 16);
    generation.committed = vec![5, 6, 7];
    generation.numerics = Some(key.clone());
    let admitted = harness.core.submit(generation).expect("admitted");
    assert_eq!(assignment(&mut harness, 0), None, "not the first vehicle");
    let placed = assignment(&mut harness, 1).expect("the vehicle of its numerics");
    assert_eq!(placed.committed_tokens, vec![5, 6, 7]);
    assert_eq!(
        harness.core.metrics.moves_across_numerics.load(ORDER),
        0,
        "it continues bit for bit"
    );
    assert_eq!(
        cell_api::Cell::numerics(&harness.core, admitted.request),
        Some(key),
        "a later move to another cell names the numbers it runs on now"
    );

    // Numbers no vehicle here computes: the usual first choice, counted as a
    // move across numerics.
    let mut generation = spot_generation("chatcmpl-elsewhere", proto::Sampling::default(), 16);
    generation.committed = vec![5, 6, 7];
    generation.numerics = Some(cell_api::Numerics {
        cpu_kernels: "CPU : NEON = 1 |".to_owned(),
        ..cell_api::Numerics::default()
    });
    let _admitted = harness.core.submit(generation).expect("admitted");
    assert!(assignment(&mut harness, 0).is_some(), "the first vehicle");
    assert_eq!(harness.core.metrics.moves_across_numerics.load(ORDER), 1);
}

/// The first `Assign` waiting on node `index`'s channel, if any.
fn assignment(harness: &mut Harness, index: usize) -> Option<proto::Assign> {
    while let Ok(message) = harness._to_nodes[index].try_recv() {
        if let Some(proto::coordinator_message::Kind::Assign(assign)) = message.kind {
            return Some(assign);
        }
    }
    None
}

/// A core whose draws are fixed and whose vehicles' passes are never
/// audited, with `count` vehicles of different owners serving the test model.
fn verifying_fleet(count: usize) -> (Harness, Vec<crate::nodes::NodeSession>) {
    let mut harness = Harness::serving_the_test_model();
    let policy = trust::VerificationPolicy {
        audit: 0.0,
        ..trust::VerificationPolicy::default()
    };
    harness
        .core
        .set_verification(policy, trust::Secret::from_seed(7));
    let cars = (0..count)
        .map(|index| {
            let (name, owner) = (format!("car-{index}"), format!("owner-{index}"));
            harness.connect_owned(&name, &owner, &serving_hello())
        })
        .collect();
    (harness, cars)
}

/// Submits a generation, lets the vehicle it lands on answer `answer` and
/// finish; returns that vehicle's index.
fn serve(
    harness: &mut Harness,
    cars: &[crate::nodes::NodeSession],
    public_id: &str,
    answer: &[i32],
) -> usize {
    let mut generation = spot_generation(public_id, proto::Sampling::default(), 8);
    generation.prompt = vec![1, 2, 3, 4];
    serve_generation(harness, cars, generation, answer)
}

/// Submits `generation`, lets the vehicle it lands on answer `answer` after
/// the generation's committed tokens and finish; returns that vehicle's
/// index.
fn serve_generation(
    harness: &mut Harness,
    cars: &[crate::nodes::NodeSession],
    generation: cell_api::NewGeneration,
    answer: &[i32],
) -> usize {
    let from = u32::try_from(generation.committed.len()).expect("a short answer");
    let admitted = harness.core.submit(generation).expect("admitted");
    let (producer, id) = (0..cars.len())
        .find_map(|index| assigned(harness, index).map(|id| (index, id)))
        .expect("an assignment");
    harness
        .core
        .node_tokens(cars[producer], batch(&id, answer, from));
    harness.core.node_done(
        cars[producer],
        proto::GenerationDone {
            generation_id: id,
            reason: proto::FinishReason::Stop as i32,
            compute_ms: 100,
            ..proto::GenerationDone::default()
        },
    );
    drop(admitted);
    producer
}

/// The vehicle a check was sent to, and the check.
fn check_sent(harness: &mut Harness, count: usize) -> Option<(usize, proto::Assign)> {
    (0..count).find_map(|index| {
        assignment(harness, index)
            .filter(|assign| assign.verify.is_some())
            .map(|assign| (index, assign))
    })
}

fn verdict(generation_id: &str, failed_at: Option<u32>) -> proto::Verified {
    proto::Verified {
        generation_id: generation_id.to_owned(),
        checked: 3,
        mismatches: u32::from(failed_at.is_some()),
        first_mismatch_position: failed_at.unwrap_or(0),
        first_mismatch: failed_at
            .map(|_| "not the sampler's pick".to_owned())
            .unwrap_or_default(),
        compute_ms: 20,
    }
}

/// The check of an answer tells its verifier the attention setting the
/// vehicle that produced it registered with, so that a verifier of another
/// setting takes the wider tolerance.
#[test]
fn a_check_says_which_attention_setting_its_answer_was_computed_with() {
    for attention in [proto::Attention::Fast, proto::Attention::Off] {
        let mut harness = Harness::serving_the_test_model();
        harness.core.set_verification(
            trust::VerificationPolicy {
                audit: 0.0,
                ..trust::VerificationPolicy::default()
            },
            trust::Secret::from_seed(7),
        );
        let mut producing = serving_hello();
        if let Some(hardware) = producing.hardware.as_mut() {
            hardware.attention = attention as i32;
        }
        let cars = [
            harness.connect_owned("car-0", "owner-0", &producing),
            harness.connect_owned("car-1", "owner-1", &producing),
        ];
        let producer = serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
        let (verifier, check) = check_sent(&mut harness, 2).expect("a check was sent");
        assert_ne!(verifier, producer);
        let answer = check.verify.expect("an answer to verify");
        assert_eq!(answer.attention(), attention);
    }
}

/// A new vehicle's answer goes, once delivered, to a vehicle of another
/// owner with the same prompt, sampling and tokens; its pass counts towards
/// the producer's probation, and the verifier's time is the platform's share.
#[test]
fn a_delivered_answer_is_checked_by_another_owners_vehicle_and_its_pass_counts() {
    let (mut harness, cars) = verifying_fleet(2);
    let producer = serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    let (verifier, check) = check_sent(&mut harness, 2).expect("a check was sent");
    assert_ne!(verifier, producer);
    let answer = check.verify.expect("an answer to verify");
    assert_eq!(answer.completion_tokens, [5, 6, 7]);
    assert_eq!(answer.logprobs, [-0.5, -0.5, -0.5]);
    assert!(
        answer.ended_by_eos,
        "it said it stopped, with no stop sequences"
    );
    assert_eq!(check.prompt_tokens, [1, 2, 3, 4]);
    assert!(check.committed_tokens.is_empty());

    harness.clock.advance(Duration::from_millis(50));
    harness
        .core
        .node_verified(cars[verifier], &verdict(&check.generation_id, None));
    // The books pay the verifier's owner for the 7 tokens it prefilled.
    let checks = harness.core.take_checks();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert_eq!(checks[0].check, "check:chatcmpl-1:1");
    assert_eq!(checks[0].node, format!("car-{verifier}"));
    assert_eq!((checks[0].tokens, checks[0].compute_ms), (7, 20));
    assert_eq!(checks[0].at_ms - checks[0].started_ms, 50);
    assert!(harness.core.take_checks().is_empty());
    let producer_name = format!("car-{producer}");
    let trust = harness.core.trust();
    let record = trust.iter().find(|t| t.node == producer_name).unwrap();
    assert_eq!(
        record.state,
        trust::TrustState::Probation { passed: 1, of: 10 }
    );
    assert_eq!((record.verified, record.passed), (1, 1));
    assert!(harness.core.take_quarantines().is_empty());
    let metrics = harness.core.metrics.render();
    assert!(
        metrics.contains("fleetgrid_verification_compute_share 0.1666"),
        "20 ms of 120: {metrics}"
    );
    // The same verdict again is stale: nothing changes.
    harness
        .core
        .node_verified(cars[verifier], &verdict(&check.generation_id, Some(0)));
    assert_eq!(harness.core.trust(), trust);
}

/// Of an answer this cell took over from another, mid-answer, the tokens
/// committed before are given to the verifier as context, not checked, and
/// the verdict on the rest is the vehicle's that produced it.
#[test]
fn a_resumed_answer_is_checked_from_the_tokens_produced_here() {
    let (mut harness, cars) = verifying_fleet(2);
    let mut generation = spot_generation("chatcmpl-r", proto::Sampling::default(), 8);
    generation.committed = vec![9, 10];
    let producer = serve_generation(&mut harness, &cars, generation, &[5, 6, 7]);
    let (verifier, check) = check_sent(&mut harness, 2).expect("a check was sent");
    assert_ne!(verifier, producer);
    let answer = check.verify.expect("an answer to verify");
    assert_eq!(answer.completion_tokens, [9, 10, 5, 6, 7]);
    assert_eq!(answer.given_tokens, 2);
    assert_eq!(answer.logprobs, [-0.5, -0.5, -0.5], "the producer's own");
    assert!(check.committed_tokens.is_empty());

    // Its pass is the producer's.
    harness
        .core
        .node_verified(cars[verifier], &verdict(&check.generation_id, None));
    let trust = harness.core.trust();
    let record = trust
        .iter()
        .find(|t| t.node == format!("car-{producer}"))
        .expect("the producer's record");
    assert_eq!((record.verified, record.passed), (1, 1), "{record:?}");
}

/// An answer that stopped is checked for its end by end-of-generation unless
/// its text holds one of the client's stop sequences, where it ended.
#[test]
fn an_answer_ended_at_a_stop_sequence_is_not_checked_for_an_end_token() {
    let tokenizer = engine::Tokenizer::load(&engine::testing::test_model_path())
        .expect("the test model's tokenizer");
    let answer = tokenizer
        .tokenize(" one two three", false)
        .expect("tokenize");
    for (stop, ended_by_eos) in [("three", false), ("four", true), ("", true)] {
        let (mut harness, cars) = verifying_fleet(2);
        let mut generation = spot_generation("chatcmpl-s", proto::Sampling::default(), 8);
        generation.stop = vec![stop.to_owned()];
        serve_generation(&mut harness, &cars, generation, &answer);
        let (_, check) = check_sent(&mut harness, 2).expect("a check was sent");
        let verify = check.verify.expect("an answer to verify");
        assert_eq!(verify.ended_by_eos, ended_by_eos, "stop {stop:?}");
    }
}

/// An answer ends with the token that completes one of its stop sequences,
/// as a vehicle's engine ends it: a vehicle that sends tokens after it (the
/// client would never see them, but pay for them) broke the protocol.
#[test]
fn tokens_after_a_stop_sequence_are_a_protocol_violation() {
    let tokenizer = engine::Tokenizer::load(&engine::testing::test_model_path())
        .expect("the test model's tokenizer");
    let answer = tokenizer
        .tokenize(" one two three four", false)
        .expect("tokenize");
    let (mut harness, cars) = verifying_fleet(2);
    let mut generation = spot_generation("chatcmpl-past", proto::Sampling::default(), 8);
    generation.stop = vec!["two".to_owned()];
    let producer = serve_generation(&mut harness, &cars, generation, &answer);
    let notices = harness.core.take_quarantines();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].node, format!("car-{producer}"));
    assert!(
        notices[0].reason.contains("after a stop sequence"),
        "{}",
        notices[0].reason
    );
}

/// A batch refused for going past a stop sequence leaves a structured
/// answer's grammar where the committed tokens left it: the next vehicle,
/// resuming from them, is held to the grammar from there.
#[test]
fn a_batch_past_a_stop_sequence_leaves_the_grammar_at_the_committed_tokens() {
    let mut harness = Harness::serving_the_test_model();
    let cars = [
        harness.connect_serving("car-1"),
        harness.connect_serving("car-2"),
    ];
    let tokenizer = engine::Tokenizer::load(&engine::testing::test_model_path()).unwrap();
    let encode = |text: &str| tokenizer.tokenize(text, false).unwrap();
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}},
        "required": ["a"], "additionalProperties": false});
    let mut generation = spot_generation(
        "chatcmpl-structured-stop",
        proto::Sampling {
            grammar: engine::json_schema_grammar(&schema),
            ..proto::Sampling::default()
        },
        32,
    );
    generation.stop = vec!["two".to_owned()];
    let mut admitted = harness.core.submit(generation).expect("admitted");
    let placed = |harness: &mut Harness| {
        (0..cars.len())
            .find_map(|index| assigned(harness, index).map(|id| (index, id)))
            .expect("an assignment")
    };

    let (first, id) = placed(&mut harness);
    harness.core.node_tokens(
        cars[first],
        batch(id, &encode("{\"a\": \"one two three\"}"), 0),
    );
    assert!(
        admitted.updates.try_recv().is_err(),
        "nothing was committed"
    );
    let (second, id) = placed(&mut harness);
    assert_ne!(second, first, "the generation moved to another vehicle");

    // The next vehicle writes the answer up to the stop sequence: every token
    // is taken, as the grammar allows it from the start.
    let honest = encode("{\"a\": \"one two");
    harness
        .core
        .node_tokens(cars[second], batch(id, &honest, 0));
    for _ in &honest {
        assert!(matches!(
            admitted.updates.try_recv(),
            Ok(cell_api::Update::Token(_))
        ));
    }
    assert_eq!(
        harness.core.connected_nodes(),
        [format!("car-{}", second + 1)]
    );
}

/// With stop sequences, a structured answer still ends where its grammar
/// lets it or at one of them: a vehicle that says it stopped before either
/// cut the answer short.
#[test]
fn a_structured_answer_with_stop_sequences_is_not_cut_short_before_either() {
    let mut harness = Harness::serving_the_test_model();
    let cars = [
        harness.connect_serving("car-1"),
        harness.connect_serving("car-2"),
    ];
    let tokenizer = engine::Tokenizer::load(&engine::testing::test_model_path()).unwrap();
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "string"}},
        "required": ["a"], "additionalProperties": false});
    let mut generation = spot_generation(
        "chatcmpl-structured-cut",
        proto::Sampling {
            grammar: engine::json_schema_grammar(&schema),
            ..proto::Sampling::default()
        },
        32,
    );
    generation.stop = vec!["zzz".to_owned()];
    let _admitted = harness.core.submit(generation).expect("admitted");
    let (first, id) = (0..cars.len())
        .find_map(|index| assigned(&mut harness, index).map(|id| (index, id)))
        .expect("an assignment");
    let opening = tokenizer.tokenize("{\"a\": \"one", false).unwrap();
    harness
        .core
        .node_tokens(cars[first], batch(&id, &opening, 0));
    harness.core.node_done(
        cars[first],
        proto::GenerationDone {
            generation_id: id,
            reason: proto::FinishReason::Stop as i32,
            ..proto::GenerationDone::default()
        },
    );
    assert!(
        assigned(&mut harness, 1 - first).is_some(),
        "the generation moved to the other vehicle"
    );
    assert_eq!(
        harness.core.connected_nodes(),
        [format!("car-{}", 2 - first)]
    );
}

/// A check takes one of its verifier's slots until it is answered: a
/// one-slot vehicle verifying is given no tenant's work meanwhile.
#[test]
fn a_vehicle_verifying_is_given_no_work_in_the_checks_slot() {
    let (mut harness, cars) = verifying_fleet(2);
    let producer = serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    let (verifier, check) = check_sent(&mut harness, 2).expect("a check was sent");
    let _second = harness
        .core
        .submit(spot_generation("chatcmpl-2", proto::Sampling::default(), 8))
        .expect("admitted");
    let _third = harness
        .core
        .submit(spot_generation("chatcmpl-3", proto::Sampling::default(), 8))
        .expect("admitted");
    assert!(assigned(&mut harness, producer).is_some());
    assert!(
        assigned(&mut harness, verifier).is_none(),
        "the verifier's one slot is the check's"
    );

    harness
        .core
        .node_verified(cars[verifier], &verdict(&check.generation_id, None));
    assert!(
        assigned(&mut harness, verifier).is_some(),
        "answered, its slot takes the request that waited"
    );
}

/// A verifier that says it took longer than the check was out with it is
/// counted, and paid, for the time it was out.
#[test]
fn a_verifier_is_paid_for_no_more_time_than_its_check_was_out() {
    let (mut harness, cars) = verifying_fleet(2);
    serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    let (verifier, check) = check_sent(&mut harness, 2).expect("a check was sent");
    harness.clock.advance(Duration::from_millis(30));
    let inflated = proto::Verified {
        compute_ms: 3_600_000,
        ..verdict(&check.generation_id, None)
    };
    harness.core.node_verified(cars[verifier], &inflated);
    let checks = harness.core.take_checks();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].compute_ms, 30);
    assert_eq!(harness.core.metrics.verification_compute_ms.load(ORDER), 30);
}

/// A vehicle's failure is confirmed by a vehicle of a third owner; then the
/// producer is disconnected, refused from now on, and its suspect answers
/// go to the books.
#[test]
fn a_confirmed_failure_quarantines_the_producer_and_names_its_answers_for_clawback() {
    let (mut harness, cars) = verifying_fleet(3);
    let producer = serve(&mut harness, &cars, "chatcmpl-bad", &[5, 6, 7]);
    let (first, check) = check_sent(&mut harness, 3).expect("a first check");
    harness
        .core
        .node_verified(cars[first], &verdict(&check.generation_id, Some(1)));
    assert!(
        harness.core.take_quarantines().is_empty(),
        "not on one vehicle's word"
    );
    let (second, again) = check_sent(&mut harness, 3).expect("a second check");
    assert!(second != first && second != producer);
    assert_eq!(again.verify, check.verify);
    harness
        .core
        .node_verified(cars[second], &verdict(&again.generation_id, Some(1)));

    let producer_name = format!("car-{producer}");
    let notices = harness.core.take_quarantines();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].node, producer_name);
    assert_eq!(notices[0].suspects, ["chatcmpl-bad"]);
    assert!(
        notices[0].reason.contains("not the sampler's pick"),
        "{}",
        notices[0].reason
    );
    assert!(harness.core.is_quarantined(&producer_name));
    assert!(!harness.core.connected_nodes().contains(&producer_name));
    assert_eq!(harness.core.metrics.nodes_quarantined.load(ORDER), 1);
}

/// With no second verifier, one vehicle's failure quarantines no one: once
/// the check has waited its longest, the answer counts as unverified.
#[test]
fn one_vehicles_failure_alone_quarantines_no_one() {
    let (mut harness, cars) = verifying_fleet(2);
    let producer = serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    let (verifier, check) = check_sent(&mut harness, 2).expect("a check");
    harness
        .core
        .node_verified(cars[verifier], &verdict(&check.generation_id, Some(0)));
    for car in &cars {
        harness.core.heartbeat(*car, &proto::Heartbeat::default());
    }
    harness.clock.advance(super::verification::CHECK_WAIT_MAX);
    for car in &cars {
        harness.core.heartbeat(*car, &proto::Heartbeat::default());
    }
    harness.after(Duration::from_millis(1));
    assert!(harness.core.take_quarantines().is_empty());
    assert!(!harness.core.is_quarantined(&format!("car-{producer}")));
    assert_eq!(harness.core.metrics.verifications_undecided.load(ORDER), 1);
    assert_eq!(harness.core.connected_nodes().len(), 2);
}

/// A vehicle that fails an honest answer is outvoted by two that pass it,
/// and quarantined for its false verdict; the producer is not.
#[test]
fn a_verifier_outvoted_on_its_failure_is_quarantined_for_a_false_verdict() {
    let (mut harness, cars) = verifying_fleet(4);
    let producer = serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    let (liar, check) = check_sent(&mut harness, 4).expect("a check");
    harness
        .core
        .node_verified(cars[liar], &verdict(&check.generation_id, Some(0)));
    let (second, check) = check_sent(&mut harness, 4).expect("a second check");
    harness
        .core
        .node_verified(cars[second], &verdict(&check.generation_id, None));
    let (third, check) = check_sent(&mut harness, 4).expect("a third check");
    assert!(![producer, liar, second].contains(&third));
    harness
        .core
        .node_verified(cars[third], &verdict(&check.generation_id, None));

    let notices = harness.core.take_quarantines();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].node, format!("car-{liar}"));
    assert!(
        notices[0].reason.contains("contradicted"),
        "{}",
        notices[0].reason
    );
    assert!(!harness.core.is_quarantined(&format!("car-{producer}")));
    // The two whose verdicts stood are paid for their checks; the liar is not.
    let mut paid: Vec<String> = harness
        .core
        .take_checks()
        .into_iter()
        .map(|check| check.node)
        .collect();
    paid.sort();
    let mut honest = vec![format!("car-{second}"), format!("car-{third}")];
    honest.sort();
    assert_eq!(paid, honest);
}

/// A vehicle that reports more compute than its attempt could have taken is
/// quarantined at once; the answer itself reaches the client.
#[test]
fn a_vehicle_that_inflates_its_compute_is_quarantined() {
    let (mut harness, cars) = verifying_fleet(2);
    let mut generation = spot_generation("chatcmpl-inflated", proto::Sampling::default(), 8);
    generation.prompt = vec![1, 2, 3, 4];
    let mut admitted = harness.core.submit(generation).expect("admitted");
    let (producer, id) = (0..cars.len())
        .find_map(|index| assigned(&mut harness, index).map(|id| (index, id)))
        .expect("an assignment");
    harness.clock.advance(Duration::from_secs(1));
    harness
        .core
        .node_tokens(cars[producer], batch(&id, &[5, 6], 0));
    let bound = crate::limits::compute_report_max_ms(1_000);
    harness.core.node_done(
        cars[producer],
        proto::GenerationDone {
            generation_id: id,
            reason: proto::FinishReason::Stop as i32,
            compute_ms: bound + 1,
            ..proto::GenerationDone::default()
        },
    );
    let mut finished = false;
    while let Ok(update) = admitted.updates.try_recv() {
        finished |= matches!(update, cell_api::Update::Finished { .. });
    }
    assert!(finished, "the answer was delivered");
    let notices = harness.core.take_quarantines();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].node, format!("car-{producer}"));
    assert_eq!(notices[0].suspects, ["chatcmpl-inflated"]);
    assert!(
        notices[0].reason.contains("ms of compute"),
        "{}",
        notices[0].reason
    );
    assert!(harness.core.is_quarantined(&format!("car-{producer}")));
}

/// The platform's own nodes (enrolled without an owner) are not verified,
/// and a confirmation goes to one of them, whose verdict decides.
#[test]
fn a_platform_node_confirms_a_failure_and_its_verdict_decides() {
    let (mut harness, mut cars) = verifying_fleet(2);
    let producer = serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    let (first, check) = check_sent(&mut harness, 2).expect("a check");
    cars.push(harness.connect_with("datacenter-1", &serving_hello()));
    harness
        .core
        .node_verified(cars[first], &verdict(&check.generation_id, Some(2)));
    let (second, again) = check_sent(&mut harness, 3).expect("a confirmation");
    assert_eq!(second, 2, "the platform's node confirms");
    harness
        .core
        .node_verified(cars[second], &verdict(&again.generation_id, Some(2)));
    let notices = harness.core.take_quarantines();
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].node, format!("car-{producer}"));
    assert!(harness
        .core
        .trust()
        .iter()
        .all(|t| t.node != "datacenter-1"));
}

#[test]
fn the_platforms_own_nodes_answers_are_not_verified() {
    let mut harness = Harness::serving_the_test_model();
    let cars = [
        harness.connect_serving("datacenter-1"),
        harness.connect_serving("datacenter-2"),
    ];
    serve(&mut harness, &cars, "chatcmpl-1", &[5, 6, 7]);
    assert!(check_sent(&mut harness, 2).is_none());
    assert_eq!(harness.core.metrics.verifications_opened.load(ORDER), 0);
}

/// The owner first: a car that is unplugged verifies nothing; the check
/// waits and goes to it once it is back.
#[test]
fn an_unplugged_car_is_given_no_check_until_it_is_back() {
    let (mut harness, cars) = verifying_fleet(2);
    let mut generation = spot_generation("chatcmpl-1", proto::Sampling::default(), 8);
    generation.prompt = vec![1, 2, 3, 4];
    let _admitted = harness.core.submit(generation).expect("admitted");
    let (producer, id) = (0..cars.len())
        .find_map(|index| assigned(&mut harness, index).map(|id| (index, id)))
        .expect("an assignment");
    let other = 1 - producer;
    let plugged = |plugged_in: bool| proto::Heartbeat {
        state: Some(proto::VehicleState {
            plugged_in,
            charging: plugged_in,
            state_of_charge: 0.8,
            temperature_c: 30.0,
            ..proto::VehicleState::default()
        }),
        ..proto::Heartbeat::default()
    };
    harness.core.heartbeat(cars[other], &plugged(false));
    harness
        .core
        .node_tokens(cars[producer], batch(&id, &[5, 6], 0));
    harness.core.node_done(
        cars[producer],
        proto::GenerationDone {
            generation_id: id,
            reason: proto::FinishReason::Stop as i32,
            ..proto::GenerationDone::default()
        },
    );
    assert!(
        check_sent(&mut harness, 2).is_none(),
        "sent to an unplugged car"
    );

    harness.core.heartbeat(cars[other], &plugged(true));
    harness.after(Duration::from_millis(1));
    let (verifier, _) = check_sent(&mut harness, 2).expect("the check, once it is back");
    assert_eq!(verifier, other);
}

/// An owned vehicle that breaks the protocol is quarantined, with its
/// unverified answers; the platform's own node is only disconnected.
#[test]
fn an_owned_vehicle_that_breaks_the_protocol_is_quarantined() {
    let (mut harness, mut cars) = verifying_fleet(1);
    cars.push(harness.connect_with("datacenter-1", &serving_hello()));
    let second_hello = proto::AgentMessage {
        kind: Some(proto::agent_message::Kind::Hello(proto::Hello::default())),
    };
    let violation = crate::node_input::check_shape(&second_hello).unwrap_err();
    for car in &cars {
        harness
            .core
            .node_protocol_violation(*car, &violation.to_string());
    }
    let notices = harness.core.take_quarantines();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].node, "car-0");
    assert!(
        notices[0].reason.contains("a second Hello"),
        "{}",
        notices[0].reason
    );
    assert!(harness.core.is_quarantined("car-0"));
    assert!(!harness.core.is_quarantined("datacenter-1"));
    assert!(harness.core.connected_nodes().is_empty());
}
