//! A whole answer: waits for the end of each of its choices, settles each, and answers with
//! one JSON body, or with the error as the HTTP response.

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::envelope::{self, ChoiceBody, LogprobEntries, ResponseMeta};
use super::reading::Reading;
use super::source::Source;
use super::{AnswerUsage, Ending, Event};
use crate::api::error::ApiError;

/// One generation read to its end.
struct Read {
    reading: Reading,
    logprobs: Value,
    ending: Box<Ending>,
    /// The mean log-probability of its tokens, for `best_of`.
    mean_logprob: f64,
}

/// Reads one generation's events to its end.
async fn read_whole(meta: &ResponseMeta, mut source: Source) -> (Source, Result<Read, ApiError>) {
    let mut reading = Reading::new(meta);
    if let Some(prompt) = &meta.echo_prompt {
        reading.text(prompt);
    }
    let mut logprobs = LogprobEntries::new(meta);
    let (mut sum, mut tokens) = (0.0_f64, 0_u32);
    let ending = loop {
        match source.next().await {
            Event::Text { text, token } => {
                if let Some(token) = &token {
                    sum += f64::from(token.logprob);
                    tokens += 1;
                }
                logprobs.push(meta, token.as_ref());
                reading.text(&text);
            }
            Event::PromptScores(scores) => logprobs.push_prompt(meta, &scores),
            Event::Call(delta) => {
                reading.call(delta);
            }
            Event::Start { .. } | Event::Handoff(_) => {}
            Event::Finished(ending) => break ending,
            Event::Failed(error) => return (source, Err(error)),
        }
    };
    reading.text(&ending.rest);
    reading.finish();
    let read = Read {
        logprobs: logprobs.take(meta),
        reading,
        ending,
        mean_logprob: if tokens == 0 {
            f64::NEG_INFINITY
        } else {
            sum / f64::from(tokens)
        },
    };
    (source, Ok(read))
}

/// Collects every choice's text, settles each, and answers with the body. With `best_of`
/// the `n` choices of highest mean log-probability per token are given; all are billed.
pub(super) async fn collect(
    meta: ResponseMeta,
    sources: Vec<Source>,
) -> Result<Response, ApiError> {
    let read =
        futures::future::join_all(sources.into_iter().map(|source| read_whole(&meta, source)))
            .await;
    let mut sources = Vec::with_capacity(read.len());
    let mut reads = Vec::with_capacity(read.len());
    let mut failure = None;
    for (source, result) in read {
        sources.push(source);
        match result {
            Ok(read) => reads.push(read),
            // The others still settle: what they made is paid for.
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    let usage = reads.iter().fold(AnswerUsage::default(), |sum, read| {
        sum.plus(&read.ending.usage)
    });
    let mut chosen: Vec<&Read> = reads.iter().collect();
    if chosen.len() > meta.choices {
        chosen.sort_by(|a, b| b.mean_logprob.total_cmp(&a.mean_logprob));
        chosen.truncate(meta.choices);
    }
    let summary = reads.first().and_then(|read| read.ending.route.as_ref());
    let body = envelope::body(
        &meta,
        chosen
            .iter()
            .map(|read| ChoiceBody {
                said: read.reading.said(),
                logprobs: read.logprobs.clone(),
                finish_reason: read.reading.finish_reason(read.ending.finish_reason),
            })
            .collect(),
        &usage,
        summary,
    );
    let headers = envelope::body_headers(&meta, summary);
    for source in &mut sources {
        if let Err(error) = source.settle(Some(&body)).await {
            failure = failure.or(Some(error));
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    Ok((headers, Json(body)).into_response())
}
