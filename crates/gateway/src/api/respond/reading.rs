//! An answer's text as the client reads it: its `content`, and where the request offered
//! tools, the tool calls read out of the text (`tools::calls`). Bodies and streams both read
//! through one [`Reading`], so a streamed answer says exactly what its body would.

use engine::ToolCallFormat;

use super::envelope::ResponseMeta;
use crate::api::tools::calls::{Call, CallReader, Delta};

/// What an answer said so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Said {
    pub content: String,
    pub calls: Vec<Call>,
}

/// Reads one answer's text.
pub(super) struct Reading {
    reader: Option<CallReader>,
    said: Said,
}

impl Reading {
    pub(super) fn new(meta: &ResponseMeta) -> Reading {
        Reading {
            reader: meta
                .tool_format
                .map(|format: ToolCallFormat| CallReader::new(format, &meta.call_id_stem())),
            said: Said::default(),
        }
    }

    /// Text the answer released: what the client reads of it.
    pub(super) fn text(&mut self, text: &str) -> Vec<Delta> {
        let deltas = match &mut self.reader {
            Some(reader) => reader.push(text),
            None if text.is_empty() => Vec::new(),
            None => vec![Delta::Content(text.to_string())],
        };
        self.record(&deltas);
        deltas
    }

    /// A part of a tool call the answer's source read itself (a cloud's call).
    pub(super) fn call(&mut self, delta: Delta) -> Vec<Delta> {
        let deltas = vec![delta];
        self.record(&deltas);
        deltas
    }

    /// The answer ended: what the reader still held.
    pub(super) fn finish(&mut self) -> Vec<Delta> {
        let deltas = match self.reader.take() {
            Some(reader) => reader.finish().0,
            None => Vec::new(),
        };
        self.record(&deltas);
        deltas
    }

    fn record(&mut self, deltas: &[Delta]) {
        for delta in deltas {
            match delta {
                Delta::Content(text) => self.said.content.push_str(text),
                Delta::Call { id, name, .. } => self.said.calls.push(Call {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                }),
                Delta::Arguments { index, text } => {
                    if let Some(call) = self.said.calls.get_mut(*index) {
                        call.arguments.push_str(text);
                    }
                }
            }
        }
    }

    pub(super) fn said(&self) -> &Said {
        &self.said
    }

    /// The `finish_reason` of an answer that ended for `reason`: an answer that called tools
    /// and ended on its own says so.
    pub(super) fn finish_reason(&self, reason: &'static str) -> &'static str {
        if reason == "stop" && !self.said.calls.is_empty() {
            "tool_calls"
        } else {
            reason
        }
    }
}
