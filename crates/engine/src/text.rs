//! Client text from token pieces: UTF-8 safe and stop-sequence aware.
//!
//! Tokens carry raw bytes, and a multi-byte character may be split across tokens; a stop
//! sequence may be split across tokens too. [`TextAssembler`] releases text only when it is
//! certain: it holds back an incomplete UTF-8 sequence, and any suffix that could still grow
//! into a stop sequence. Once a stop sequence is complete, neither it nor anything after it is
//! ever released. The engine uses it to decide when to stop; the coordinator uses it to build
//! the text it streams to clients.

/// Turns a stream of token pieces into releasable text. See the module documentation.
#[derive(Debug, Clone, Default)]
pub struct TextAssembler {
    /// Stop sequences, empty strings removed (an empty stop would match before any text).
    stops: Vec<String>,
    /// Trailing bytes of an incomplete UTF-8 character.
    partial_utf8: Vec<u8>,
    /// Complete text not yet released because it might be the start of a stop sequence.
    held: String,
    stopped: bool,
}

impl TextAssembler {
    #[must_use]
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stops: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Feed one token's bytes; returns the text that may be released to the client now.
    pub fn push(&mut self, piece: &[u8]) -> String {
        if self.stopped {
            return String::new();
        }
        self.partial_utf8.extend_from_slice(piece);
        let complete = take_complete_utf8(&mut self.partial_utf8);
        self.held.push_str(&complete);
        if let Some(stop_at) = self.earliest_stop() {
            self.stopped = true;
            self.partial_utf8.clear();
            let released = self.held[..stop_at].to_owned();
            self.held.clear();
            return released;
        }
        let keep = self.longest_stop_prefix_suffix();
        let release_len = self.held.len() - keep;
        let rest = self.held.split_off(release_len);
        std::mem::replace(&mut self.held, rest)
    }

    /// Whether a stop sequence has been seen.
    #[must_use]
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// End of stream: release whatever is held back (unless stopped); broken UTF-8 becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let mut released = std::mem::take(&mut self.held);
        released.push_str(&String::from_utf8_lossy(&self.partial_utf8));
        self.partial_utf8.clear();
        released
    }

    /// Byte offset in `held` of the earliest complete stop sequence, if any.
    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop sequence.
    /// Always on a character boundary, because stop sequences are valid UTF-8.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            let max_len = (stop.len() - 1).min(self.held.len());
            for len in (longest + 1..=max_len).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start)
                    && stop.as_bytes().starts_with(&self.held.as_bytes()[start..])
                {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

/// Remove and return the longest decodable prefix of `bytes`, leaving only an incomplete
/// trailing character. Invalid bytes in the middle become U+FFFD, as a lossy decoder would.
fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                rest = &[];
                break;
            }
            Err(error) => {
                let (valid, after) = rest.split_at(error.valid_up_to());
                // `valid_up_to` marks a valid prefix, so the fallback is never taken.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match error.error_len() {
                    Some(invalid_len) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[invalid_len..];
                    }
                    // An incomplete character at the end: wait for the next piece.
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let leftover = rest.to_vec();
    *bytes = leftover;
    out
}

#[cfg(test)]
#[path = "text_tests.rs"]
mod tests;
