//! A server-sent events parser for upstream responses: bytes in, the `data`
//! payload of each complete event out.
//!
//! OpenAI-compatible servers send one JSON object per event and end with
//! `data: [DONE]`. Lines may arrive split across network reads, with `\n` or
//! `\r\n` endings; comments (`: keep-alive`) and other fields are ignored. A
//! line longer than `SSE_LINE_BYTES_MAX` is refused rather than buffered
//! without end.

use crate::limits::SSE_LINE_BYTES_MAX;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event line is longer than {SSE_LINE_BYTES_MAX} bytes")]
    LineTooLong,
    #[error("an event is not UTF-8")]
    NotUtf8,
}

#[derive(Default)]
pub struct SseParser {
    /// Bytes of the line being received.
    line: Vec<u8>,
    /// `data` lines of the event being received, joined by `\n`.
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; complete events' payloads are appended to `events`.
    pub fn push(&mut self, bytes: &[u8], events: &mut Vec<String>) -> Result<(), SseError> {
        for &byte in bytes {
            if byte != b'\n' {
                if self.line.len() >= SSE_LINE_BYTES_MAX {
                    return Err(SseError::LineTooLong);
                }
                self.line.push(byte);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.end_line(&line, events)?;
        }
        Ok(())
    }

    /// The end of the stream: an event without its closing blank line still counts.
    pub fn finish(&mut self, events: &mut Vec<String>) -> Result<(), SseError> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.end_line(&line, events)?;
        }
        if let Some(data) = self.data.take() {
            events.push(data);
        }
        Ok(())
    }

    fn end_line(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), SseError> {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        let Some(value) = line.strip_prefix("data:") else {
            // Comments, `event:`, `id:` and `retry:` carry nothing we use.
            return Ok(());
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut self.data {
            Some(data) => {
                if data.len() + value.len() >= SSE_LINE_BYTES_MAX {
                    return Err(SseError::LineTooLong);
                }
                data.push('\n');
                data.push_str(value);
            }
            None => self.data = Some(value.to_string()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Result<Vec<String>, SseError> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for chunk in chunks {
            parser.push(chunk, &mut events)?;
        }
        parser.finish(&mut events)?;
        Ok(events)
    }

    #[test]
    fn events_split_across_reads_are_reassembled() {
        let events = parse(&[b"data: {\"a\"", b":1}\n", b"\ndata: [DONE]\n\n"]).unwrap();
        assert_eq!(events, vec!["{\"a\":1}".to_string(), "[DONE]".to_string()]);
    }

    #[test]
    fn crlf_comments_and_other_fields_are_handled() {
        let events = parse(&[b": keep-alive\r\n\r\nevent: x\r\ndata:{}\r\n\r\n"]).unwrap();
        assert_eq!(events, vec!["{}".to_string()]);
    }

    #[test]
    fn multi_line_data_is_joined_and_a_missing_final_blank_line_is_tolerated() {
        let events = parse(&[b"data: a\ndata: b\n\ndata: c"]).unwrap();
        assert_eq!(events, vec!["a\nb".to_string(), "c".to_string()]);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let long = vec![b'x'; SSE_LINE_BYTES_MAX + 1];
        assert_eq!(parse(&[&long]), Err(SseError::LineTooLong));
    }
}
