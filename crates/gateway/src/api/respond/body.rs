//! A whole answer: waits for its end, settles it, and answers with one JSON
//! body, or with the error as the HTTP response.

use axum::response::{IntoResponse, Response};
use axum::Json;

use super::envelope::{self, LogprobEntries, ResponseMeta};
use super::reading::Reading;
use super::source::Source;
use super::Event;
use crate::api::error::ApiError;

/// Collects the answer's text, settles it, and answers with its body.
pub(super) async fn collect(meta: ResponseMeta, mut source: Source) -> Result<Response, ApiError> {
    let mut reading = Reading::new(&meta);
    if let Some(prompt) = &meta.echo_prompt {
        reading.text(prompt);
    }
    let mut logprobs = LogprobEntries::default();
    let ending = loop {
        match source.next().await {
            Event::Text { text: piece, token } => {
                logprobs.push(&meta, token.as_ref());
                reading.text(&piece);
            }
            Event::Call(delta) => {
                reading.call(delta);
            }
            Event::Start { .. } | Event::Handoff(_) => {}
            Event::Finished(ending) => break ending,
            Event::Failed(error) => return Err(error),
        }
    };
    reading.text(&ending.rest);
    reading.finish();
    let finish_reason = reading.finish_reason(ending.finish_reason);
    let body = envelope::body(
        &meta,
        reading.said(),
        logprobs.take(&meta),
        &ending,
        finish_reason,
    );
    source.settle(Some(&body)).await?;
    Ok((envelope::body_headers(&meta, &ending), Json(body)).into_response())
}
