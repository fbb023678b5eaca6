//! Speed measurement on the engine thread, shaped like llama.cpp's `llama-bench` so the two can
//! be compared on the same file and thread count.
//!
//! Prefill (pp): one prompt of N tokens into an empty sequence, decoded in `batch_tokens`
//! chunks, logits for the last token only. Decode (tg): N single-token decodes starting from an
//! empty sequence, each followed by our greedy sampling of the logits (argmax + log-sum-exp), so
//! the number includes the per-token work a real generation does.

use std::time::Instant;

use crate::sampler::SamplingParams;
use crate::worker::batch::add_token;
use crate::worker::sequence::release_sequence;
use crate::worker::Worker;
use crate::{EngineError, TokenId};

/// The sequence the bench runs in; it only runs when no sequence is live.
pub(crate) const BENCH_SEQ_ID: i32 = 0;

/// Tokens of the warm-up prefill that pages the weights in before timing, as llama-bench warms up.
const WARMUP_PREFILL_TOKENS: u32 = 16;

/// Run pp then tg; returns (prefill tokens/s, decode tokens/s).
pub(crate) fn run(
    worker: &mut Worker<'_>,
    prefill_tokens: u32,
    decode_tokens: u32,
) -> Result<(f64, f64), EngineError> {
    let vocab_size = worker.tokenizer.vocab_size().max(1);
    // Deterministic "random" tokens, as llama-bench feeds random ids.
    let tokens: Vec<TokenId> = (0..prefill_tokens)
        .map(|index| {
            TokenId::try_from((u64::from(index) * 2_654_435_761) % u64::from(vocab_size))
                .unwrap_or(0)
        })
        .collect();
    let warmup = &tokens[..tokens.len().min(WARMUP_PREFILL_TOKENS as usize)];
    prefill(worker, warmup)?;
    release_sequence(&mut worker.context, BENCH_SEQ_ID);
    decode(worker, 1)?;
    release_sequence(&mut worker.context, BENCH_SEQ_ID);

    let started = Instant::now();
    prefill(worker, &tokens)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    release_sequence(&mut worker.context, BENCH_SEQ_ID);

    let started = Instant::now();
    decode(worker, decode_tokens)?;
    let decode_seconds = started.elapsed().as_secs_f64();
    release_sequence(&mut worker.context, BENCH_SEQ_ID);

    Ok((
        f64::from(prefill_tokens) / prefill_seconds.max(f64::MIN_POSITIVE),
        f64::from(decode_tokens) / decode_seconds.max(f64::MIN_POSITIVE),
    ))
}

/// Decode `tokens` into the empty bench sequence in `batch_tokens` chunks.
fn prefill(worker: &mut Worker<'_>, tokens: &[TokenId]) -> Result<(), EngineError> {
    let chunk_size = worker.config.batch_tokens as usize;
    let mut position = 0_u32;
    for (chunk_index, chunk) in tokens.chunks(chunk_size).enumerate() {
        let is_last_chunk = (chunk_index + 1) * chunk_size >= tokens.len();
        worker.batch.clear();
        for (offset, &token) in chunk.iter().enumerate() {
            let wants_logits = is_last_chunk && offset + 1 == chunk.len();
            if !add_token(
                &mut worker.batch,
                token,
                position,
                BENCH_SEQ_ID,
                wants_logits,
            ) {
                return Err(EngineError::Decode("bench batch overflow".to_owned()));
            }
            position += 1;
        }
        worker
            .context
            .decode(&mut worker.batch)
            .map_err(|error| EngineError::Decode(error.to_string()))?;
    }
    Ok(())
}

/// `count` single-token decodes from an empty sequence, sampling greedily after each.
fn decode(worker: &mut Worker<'_>, count: u32) -> Result<(), EngineError> {
    let greedy = SamplingParams::greedy();
    let mut token = 0;
    for position in 0..count {
        worker.batch.clear();
        if !add_token(&mut worker.batch, token, position, BENCH_SEQ_ID, true) {
            return Err(EngineError::Decode("bench batch overflow".to_owned()));
        }
        worker
            .context
            .decode(&mut worker.batch)
            .map_err(|error| EngineError::Decode(error.to_string()))?;
        let logits = worker.context.get_logits_ith(0);
        token = worker.sampler.sample(logits, &greedy, position, 0).token;
    }
    Ok(())
}
