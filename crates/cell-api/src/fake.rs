//! A cell that runs no model: it answers each submitted generation from a
//! script, so that a gateway's API shapes, refusals and billing decisions
//! can be tested in-process, in milliseconds. Enabled by the `fake`
//! feature; only tests use it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use domain::{RequestId, TimestampMs};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::metering::{Metering, NodeReport, PaidSpeed, SegmentTrack};
use crate::{
    Admitted, Capacity, Cell, CommittedToken, FinishReason, GenerationError, NewGeneration,
    NodeSummary, Rejection, Update, Usage,
};

/// What the fake cell does with the next generation submitted to it.
#[derive(Clone, Debug)]
pub enum Script {
    /// Refuses it at admission.
    Refuse(Rejection),
    /// Runs it on `node`: sends these pieces as tokens (ids from 1, each
    /// with log-probability -0.5), then finishes with `reason`.
    Answer {
        node: String,
        pieces: Vec<String>,
        reason: FinishReason,
    },
    /// Runs it on `car-1`: sends these tokens (id and piece, each with log-probability
    /// -0.5), then stops by itself.
    AnswerTokens(Vec<(i32, String)>),
    /// Sends these pieces, then fails it.
    FailAfter {
        pieces: Vec<String>,
        error: GenerationError,
    },
    /// Admits it and sends nothing until it is cancelled.
    Hang,
}

impl Script {
    /// An answer of `pieces` from `car-1` that stops by itself.
    pub fn answer(pieces: &[&str]) -> Script {
        Script::Answer {
            node: "car-1".to_string(),
            pieces: pieces.iter().map(|piece| piece.to_string()).collect(),
            reason: FinishReason::Stop,
        }
    }
}

/// Every submission and cancel it saw, for the test to read back.
#[derive(Default)]
struct Seen {
    scripts: VecDeque<Script>,
    submitted: Vec<NewGeneration>,
    cancelled: Vec<RequestId>,
    /// Generations admitted and not yet ended or cancelled, with the
    /// metering a cancel hands back.
    running: Vec<(RequestId, Metering, mpsc::Sender<Update>)>,
    next: u64,
}

/// A scripted `Cell`: each submission takes the next script (an empty
/// script list refuses with `NoEligibleNode`).
#[derive(Default)]
pub struct FakeCell {
    seen: Mutex<Seen>,
    capacity: Mutex<Capacity>,
    /// How prompt tokens are rendered when a generation asks for the
    /// prompt's scores; without it their text is empty.
    pieces: Mutex<Option<crate::served::PieceTable>>,
}

impl FakeCell {
    pub fn new() -> FakeCell {
        FakeCell::default()
    }

    /// Queues what the next submissions get, in order.
    pub fn script(&self, scripts: impl IntoIterator<Item = Script>) {
        self.lock().scripts.extend(scripts);
    }

    /// Reports these vehicles as connected.
    pub fn connect(&self, nodes: &[&str]) {
        let mut capacity = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        capacity.nodes = nodes
            .iter()
            .map(|name| NodeSummary {
                name: name.to_string(),
                models: Vec::new(),
                slots: 1,
                running: 0,
            })
            .collect();
    }

    /// Renders prompt tokens with `pieces` (the model's vocabulary) when a
    /// generation asks for the prompt's scores.
    pub fn render_with(&self, pieces: crate::served::PieceTable) {
        *self.pieces.lock().unwrap_or_else(|p| p.into_inner()) = Some(pieces);
    }

    /// The scores a generation that asked for them gets: prompt token `i`
    /// (from 1) scored -0.25·i, itself the only alternative if any are asked.
    fn prompt_scores(&self, generation: &NewGeneration) -> Option<Update> {
        if !generation.prompt_logprobs {
            return None;
        }
        let pieces = self.pieces.lock().unwrap_or_else(|p| p.into_inner());
        let piece_of = |id: i32| {
            pieces
                .as_ref()
                .and_then(|table| table.piece(id))
                .unwrap_or_default()
                .to_vec()
        };
        let scores = generation
            .prompt
            .iter()
            .zip(0_u16..)
            .skip(1)
            .map(|(&token_id, index)| {
                let logprob = -0.25 * f32::from(index);
                CommittedToken {
                    token_id,
                    piece: piece_of(token_id),
                    logprob,
                    top_logprobs: if generation.top_logprobs > 0 {
                        vec![(token_id, piece_of(token_id), logprob)]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        Some(Update::PromptLogprobs(scores))
    }

    /// Every generation submitted so far, in order.
    pub fn submitted(&self) -> Vec<NewGeneration> {
        self.lock().submitted.clone()
    }

    /// Every generation cancelled so far, in order.
    pub fn cancelled(&self) -> Vec<RequestId> {
        self.lock().cancelled.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The metering of an attempt on `node` that produced `completion` tokens
/// in 10 ms per token, ending now.
fn metering(prompt_tokens: u32, node: &str, completion: u32, report: bool) -> Metering {
    let elapsed_ms = 10 * i64::from(completion);
    let now_ms = TimestampMs::from_system_time(SystemTime::now()).0;
    let mut segment = SegmentTrack::started(
        node.to_string(),
        prompt_tokens,
        now_ms - elapsed_ms,
        0,
        PaidSpeed::declared(1e3, 1e2),
    );
    segment.completion_tokens = completion;
    segment.active(now_ms, u64::try_from(elapsed_ms).unwrap_or(0) * 1_000);
    Metering {
        prompt_tokens,
        node_report: report.then(|| NodeReport {
            prompt_tokens,
            completion_tokens: completion,
            compute_ms: segment.compute_ms(),
        }),
        segments: vec![segment],
        finished_ms: now_ms,
    }
}

fn tokens(pieces: &[String]) -> impl Iterator<Item = Update> + '_ {
    pieces.iter().zip(1..).map(|(piece, id)| token(id, piece))
}

fn token(id: i32, piece: &str) -> Update {
    Update::Token(CommittedToken {
        token_id: id,
        piece: piece.as_bytes().to_vec(),
        logprob: -0.5,
        top_logprobs: Vec::new(),
    })
}

/// Sends `answer`'s tokens (cut at `max_tokens`, which makes the end `Length`) and the end.
fn send_answer(
    sender: &mpsc::Sender<Update>,
    answer: &[(i32, String)],
    node: &str,
    reason: FinishReason,
    generation: &NewGeneration,
) {
    let prompt_tokens = u32::try_from(generation.prompt.len()).unwrap_or(u32::MAX);
    let answer = &answer[..answer.len().min(generation.max_tokens as usize)];
    let reason = if answer.len() < generation.max_tokens as usize {
        reason
    } else {
        FinishReason::Length
    };
    let completion = u32::try_from(answer.len()).unwrap_or(u32::MAX);
    for (id, piece) in answer {
        let _ = sender.try_send(token(*id, piece));
    }
    let _ = sender.try_send(Update::Finished {
        reason,
        usage: Usage {
            prompt_tokens,
            completion_tokens: completion,
            cached_prompt_tokens: 0,
        },
        metering: metering(prompt_tokens, node, completion, true),
    });
}

impl FakeCell {
    /// Takes the next script for `generation` and carries it out at once.
    fn admit(&self, generation: NewGeneration) -> Result<Admitted, Rejection> {
        let prompt_scores = self.prompt_scores(&generation);
        let mut seen = self.lock();
        let script =
            seen.scripts
                .pop_front()
                .unwrap_or(Script::Refuse(Rejection::NoEligibleNode {
                    retry_after_seconds: 1,
                }));
        seen.submitted.push(generation.clone());
        seen.next += 1;
        let request = RequestId(seen.next);
        let prompt_tokens = u32::try_from(generation.prompt.len()).unwrap_or(u32::MAX);
        let (sender, updates) = mpsc::channel(generation.max_tokens as usize + 16);
        if let Some(scores) = prompt_scores.filter(|_| !matches!(script, Script::Refuse(_))) {
            let _ = sender.try_send(scores);
        }
        match script {
            Script::Refuse(rejection) => return Err(rejection),
            Script::Answer {
                node,
                pieces,
                reason,
            } => {
                let answer: Vec<(i32, String)> = (1..).zip(pieces).collect();
                send_answer(&sender, &answer, &node, reason, &generation);
            }
            Script::AnswerTokens(answer) => {
                send_answer(&sender, &answer, "car-1", FinishReason::Stop, &generation);
            }
            Script::FailAfter { pieces, error } => {
                for update in tokens(&pieces) {
                    let _ = sender.try_send(update);
                }
                let _ = sender.try_send(Update::Failed(error));
            }
            Script::Hang => {
                let running = metering(prompt_tokens, "car-1", 0, false);
                seen.running.push((request, running, sender));
            }
        }
        Ok(Admitted { request, updates })
    }
}

impl Cell for FakeCell {
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>> {
        Box::pin(futures::future::ready(self.admit(generation)))
    }

    fn cancel(&self, request: RequestId) -> Option<Metering> {
        let mut seen = self.lock();
        seen.cancelled.push(request);
        let at = seen.running.iter().position(|(id, ..)| *id == request)?;
        Some(seen.running.swap_remove(at).1)
    }

    fn capacity(&self) -> Capacity {
        self.capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn owner_policy_changed(&self, _node: &str, _policy: scheduler::OwnerPolicy) {}
}
