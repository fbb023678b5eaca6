//! How long a token takes from a served cell to a gateway's `Cells` over a
//! local NATS server: a cell that stamps each token with the time it sent
//! it, one token per millisecond, and the gateway side's receive time.
//!
//! Run against a running server: `cargo run -p bus --example batch_latency
//! -- nats://127.0.0.1:4222` (the default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{CellId, Cells, CellsConfig, ServeConfig};
use cell_api::metering::Metering;
use cell_api::{
    Admitted, Capacity, Cell, CommittedToken, FinishReason, NewGeneration, NodeSummary, Rejection,
    TenantRef, Update, Usage,
};
use domain::{RequestId, TenantClass};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// Tokens measured.
const TOKENS: u32 = 2_000;

/// A cell whose tokens carry the microseconds since `epoch` at sending.
struct StampingCell {
    epoch: Instant,
}

impl Cell for StampingCell {
    fn submit(&self, generation: NewGeneration) -> BoxFuture<'_, Result<Admitted, Rejection>> {
        let (sender, updates) = mpsc::channel(generation.max_tokens as usize + 16);
        let epoch = self.epoch;
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(1));
            for position in 0..generation.max_tokens {
                pace.tick().await;
                let stamp = epoch.elapsed().as_micros().to_string();
                let token = CommittedToken {
                    token_id: i32::try_from(position).unwrap_or(i32::MAX),
                    piece: stamp.into_bytes(),
                    logprob: 0.0,
                    top_logprobs: Vec::new(),
                };
                if sender.send(Update::Token(token)).await.is_err() {
                    return;
                }
            }
            let _ = sender
                .send(Update::Finished {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: 1,
                        completion_tokens: generation.max_tokens,
                        cached_prompt_tokens: 0,
                    },
                    metering: Metering {
                        prompt_tokens: 1,
                        segments: Vec::new(),
                        node_report: None,
                        finished_ms: 0,
                    },
                })
                .await;
        });
        Box::pin(futures::future::ready(Ok(Admitted {
            request: RequestId(1),
            updates,
        })))
    }

    fn cancel(&self, _request: RequestId) -> Option<Metering> {
        None
    }

    fn capacity(&self) -> Capacity {
        Capacity {
            nodes: vec![NodeSummary {
                name: "bench-car".to_string(),
                models: vec!["bench".to_string()],
                slots: 1,
                running: 0,
            }],
            ..Capacity::default()
        }
    }

    fn owner_policy_changed(&self, _node: &str, _policy: scheduler::OwnerPolicy) {}
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string());
    let epoch = Instant::now();
    let shutdown = tokio_util::sync::CancellationToken::new();
    bus::serve_cell(
        async_nats::connect(&url).await?,
        CellId::new("bench")?,
        Arc::new(StampingCell { epoch }),
        ServeConfig::default(),
        shutdown.clone(),
    )
    .await?;
    let cells = Cells::connect(async_nats::connect(&url).await?, CellsConfig::default()).await?;
    while cells.cells().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut admitted = cells
        .submit(NewGeneration {
            public_id: "bench".to_string(),
            tenant: TenantRef {
                id: 1,
                class: TenantClass::Fleet,
            },
            model: "bench".to_string(),
            prompt: vec![1],
            committed: Vec::new(),
            sampling: proto::Sampling::default(),
            max_tokens: TOKENS,
            stop: Vec::new(),
            top_logprobs: 0,
            deadline_ms: None,
        })
        .await
        .map_err(|rejection| format!("refused: {rejection:?}"))?;
    let mut latencies_us = Vec::new();
    while let Some(Update::Token(token)) = admitted.updates.recv().await {
        let sent_us: u128 = String::from_utf8(token.piece)?.parse()?;
        latencies_us.push(epoch.elapsed().as_micros().saturating_sub(sent_us));
    }
    if latencies_us.is_empty() {
        return Err("no token arrived".into());
    }
    latencies_us.sort_unstable();
    let at = |quantile: f64| latencies_us[((latencies_us.len() - 1) as f64 * quantile) as usize];
    println!(
        "{} tokens, cell to gateway: p50 {} µs, p99 {} µs, max {} µs",
        latencies_us.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    shutdown.cancel();
    Ok(())
}
