//! Fuzzing what a connected agent may send (issue 14, hostile messages): any
//! bytes that decode as an `AgentMessage`, in any order, go through the same
//! handler the gRPC session uses (`grpc::handle_agent_message`) into a cell
//! with live generations, and the cell neither panics nor lets anything
//! outside the protocol reach a client.
//!
//! Bounded: a fixed number of cases per run. It starts from the committed
//! corpus in `tests/corpus/agent_messages` (valid messages of every kind for
//! the live generations); `FLEETGRID_WRITE_CORPUS=1` rewrites those seeds.

use std::sync::Arc;

use cell::core::{Core, ManualClock};
use cell::metrics::Metrics;
use cell::nodes::NodeSession;
use cell_api::served::ServedModels;
use domain::TimestampMs;
use proptest::prelude::*;
use prost::Message;
use proto::agent_message::Kind;
use tokio::sync::mpsc;

const MAX_TOKENS: u32 = 6;

fn served() -> Arc<ServedModels> {
    static SERVED: std::sync::OnceLock<Arc<ServedModels>> = std::sync::OnceLock::new();
    Arc::clone(SERVED.get_or_init(|| Arc::new(cell::testing::served_test_model())))
}

fn hello() -> proto::Hello {
    cell::testing::serving_hello(2)
}

/// A cell with an owned vehicle and the platform's own node, and two
/// generations placed on them: one asking for alternatives, one for its
/// prompt's scores. Returns the core, the sessions, the clients' updates and
/// what the nodes were sent (kept open).
struct Cell {
    core: Core,
    sessions: Vec<NodeSession>,
    clients: Vec<mpsc::Receiver<cell_api::Update>>,
    _to_nodes: Vec<mpsc::Receiver<proto::CoordinatorMessage>>,
}

fn cell() -> Cell {
    let (request_log, _) = mpsc::channel(16);
    let core = Core::new(
        scheduler::Scheduler::new(scheduler::SchedulerConfig::default()),
        served(),
        Arc::new(Metrics::default()),
        request_log,
        Arc::new(ManualClock::new(TimestampMs(1_704_067_200_000))),
    );
    let mut sessions = Vec::new();
    let mut to_nodes = Vec::new();
    for (name, owner) in [("car-1", "owner-1"), ("datacenter-1", "")] {
        let (outbound, receiver) = mpsc::channel(64);
        let (session, _) = core.node_connected(
            name,
            owner,
            &hello(),
            outbound,
            scheduler::OwnerPolicy::default(),
        );
        sessions.push(session);
        to_nodes.push(receiver);
    }
    let clients = (0..2)
        .map(|index| {
            let generation = cell_api::NewGeneration {
                public_id: format!("chatcmpl-{index}"),
                tenant: cell_api::TenantRef {
                    id: 1,
                    class: store::TenantClass::Spot,
                },
                model: engine::testing::TEST_MODEL_NAME.to_owned(),
                prompt: vec![1, 2, 3, 4],
                committed: Vec::new(),
                numerics: None,
                sampling: proto::Sampling::default(),
                max_tokens: MAX_TOKENS,
                stop: Vec::new(),
                top_logprobs: if index == 0 { 2 } else { 0 },
                prompt_logprobs: index == 1,
                draft: Vec::new(),
                deadline_ms: None,
            };
            core.submit(generation).expect("admitted").updates
        })
        .collect();
    Cell {
        core,
        sessions,
        clients,
        _to_nodes: to_nodes,
    }
}

fn token(position: u32, token_id: i32, logprob: f32) -> proto::Token {
    proto::Token {
        position,
        token_id,
        logprob,
        ..proto::Token::default()
    }
}

/// Valid messages of every kind for the generations `cell` places first.
fn seeds() -> Vec<(&'static str, proto::AgentMessage)> {
    let message = |kind| proto::AgentMessage { kind: Some(kind) };
    vec![
        (
            "heartbeat",
            message(Kind::Heartbeat(proto::Heartbeat {
                state: hello().state,
                active_generations: 1,
            })),
        ),
        (
            "tokens",
            message(Kind::Tokens(proto::TokenBatch {
                generation_id: "1.1".into(),
                tokens: vec![token(0, 5, -0.5), token(1, 6, -1.0)],
            })),
        ),
        (
            "prompt-logprobs",
            message(Kind::PromptLogprobs(proto::PromptLogprobs {
                generation_id: "2.1".into(),
                tokens: vec![token(1, 2, -2.0), token(2, 3, -2.0), token(3, 4, -2.0)],
            })),
        ),
        (
            "done",
            message(Kind::Done(proto::GenerationDone {
                generation_id: "1.1".into(),
                reason: proto::FinishReason::Stop as i32,
                prompt_tokens: 4,
                completion_tokens: 2,
                compute_ms: 10,
                ..proto::GenerationDone::default()
            })),
        ),
        (
            "failed",
            message(Kind::Failed(proto::GenerationFailed {
                generation_id: "2.1".into(),
                message: "engine busy".into(),
                retryable: true,
            })),
        ),
        (
            "checkpoint",
            message(Kind::Checkpoint(proto::KvCheckpoint {
                generation_id: "2.1".into(),
                tokens: 4,
                total_bytes: 16,
                offset: 0,
                data: vec![0; 16],
            })),
        ),
        (
            "verified",
            message(Kind::Verified(proto::Verified {
                generation_id: "v1.1".into(),
                checked: 2,
                ..proto::Verified::default()
            })),
        ),
    ]
}

fn corpus() -> &'static [Vec<u8>] {
    static CORPUS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/agent_messages");
        if std::env::var_os("FLEETGRID_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, message) in seeds() {
                std::fs::write(dir.join(format!("{name}.bin")), message.encode_to_vec()).unwrap();
            }
        }
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .expect("the committed corpus")
            .map(|entry| entry.unwrap().path())
            .collect();
        paths.sort();
        let corpus: Vec<Vec<u8>> = paths
            .iter()
            .map(|path| std::fs::read(path).unwrap())
            .collect();
        assert!(
            corpus.len() >= 7,
            "the corpus is missing: {}",
            dir.display()
        );
        corpus
    })
}

/// What a client received is inside the protocol: known token ids, finite
/// log-probabilities not above zero, never more tokens than asked.
fn clients_saw_only_protocol(cell: &mut Cell) {
    let model = served().lookup(engine::testing::TEST_MODEL_NAME).unwrap();
    let pieces = &model.pieces;
    for client in &mut cell.clients {
        let mut tokens = 0;
        while let Ok(update) = client.try_recv() {
            if let cell_api::Update::Token(token) = update {
                tokens += 1;
                assert!(pieces.piece(token.token_id).is_some(), "{token:?}");
                assert!(
                    token.logprob.is_finite() && token.logprob <= 1e-3,
                    "{token:?}"
                );
            }
        }
        assert!(tokens <= MAX_TOKENS as usize);
    }
}

#[test]
fn the_corpus_is_handled_without_a_violation() {
    let mut cell = cell();
    for bytes in corpus() {
        let message = proto::AgentMessage::decode(bytes.as_slice()).expect("a seed decodes");
        let kept = cell::grpc::handle_agent_message(&cell.core, cell.sessions[0], message);
        assert!(kept, "a valid message ended the session");
    }
    clients_saw_only_protocol(&mut cell);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 5_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_sequence_of_mutated_messages_leaves_the_cell_whole(
        inputs in proptest::collection::vec(
            (0_usize..64, 0_usize..2, proptest::collection::vec((0_usize..512, any::<u8>()), 0..6), proptest::option::of(0_usize..512)),
            1..12,
        ),
    ) {
        let mut cell = cell();
        let corpus = corpus();
        for (seed, node, writes, cut) in inputs {
            let mut bytes = corpus[seed % corpus.len()].clone();
            for (at, byte) in writes {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = byte;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            // Bytes that do not decode never reach the cell: tonic refuses them.
            if let Ok(message) = proto::AgentMessage::decode(bytes.as_slice()) {
                cell::grpc::handle_agent_message(&cell.core, cell.sessions[node], message);
            }
        }
        clients_saw_only_protocol(&mut cell);
    }
}
