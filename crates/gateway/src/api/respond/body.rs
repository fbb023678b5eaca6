//! A whole answer: waits for its end, settles it, and answers with one JSON
//! body, or with the error as the HTTP response.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::envelope::{self, LogprobEntries, ResponseMeta};
use super::source::Source;
use super::Event;
use crate::api::error::ApiError;

/// Collects the answer's text, settles it, and answers with its body.
pub(super) async fn collect(meta: ResponseMeta, mut source: Source) -> Result<Response, ApiError> {
    let mut text = meta.echo_prompt.clone().unwrap_or_default();
    let mut logprobs = LogprobEntries::default();
    let ending = loop {
        match source.next().await {
            Event::Text { text: piece, token } => {
                logprobs.push(&meta, token.as_ref());
                text.push_str(&piece);
            }
            Event::Start { .. } | Event::Handoff(_) => {}
            Event::Finished(ending) => break ending,
            Event::Failed(error) => return Err(error),
        }
    };
    text.push_str(&ending.rest);
    let body = envelope::body(&meta, &text, logprobs.take(&meta), &ending);
    source.settle(Some(&body)).await?;
    Ok((envelope::body_headers(&meta, &ending), Json(body)).into_response())
}
