//! Reading tool calls out of an answer's text as it arrives, in OpenAI's shapes: the text the
//! client reads as `content`, each call opened once its name is known, and its `arguments`
//! streamed as the model writes them (the deltas OpenAI streams).
//!
//! The reader is fed the answer's text piece by piece ([`CallReader::push`]) and says what
//! became certain; [`CallReader::finish`] says what the whole answer was. Feeding the whole
//! text at once or a character at a time gives the same content and calls.

use engine::ToolCallFormat;
use serde_json::Value;

/// What became certain about the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// Text of the answer's `content`.
    Content(String),
    /// Call `index` starts: its id and function's name.
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s `arguments`.
    Arguments { index: usize, text: String },
}

/// One call of a finished answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// The arguments' JSON text.
    pub arguments: String,
}

/// Where Hermes calls start and end.
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

/// Reads calls out of one answer.
pub struct CallReader {
    format: ToolCallFormat,
    /// Makes call ids: `call_<id_stem>_<index>`.
    id_stem: String,
    /// Text not yet read through.
    pending: String,
    /// Hermes: outside a call (`None`), or reading one's JSON.
    hermes_call: Option<Scan>,
    /// Generic: the whole answer is one JSON value.
    generic: Scan,
    calls: Vec<Call>,
    content: String,
    /// A Hermes block that did not hold a call, kept as content.
    broken: bool,
}

impl CallReader {
    /// A reader of an answer written in `format`; `id_stem` makes the calls' ids unique.
    pub fn new(format: ToolCallFormat, id_stem: &str) -> CallReader {
        CallReader {
            format,
            id_stem: id_stem.to_string(),
            pending: String::new(),
            hermes_call: None,
            generic: Scan::new(CallPaths::Generic),
            calls: Vec::new(),
            content: String::new(),
            broken: false,
        }
    }

    /// Reads `text`, the answer's next piece; returns what became certain.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut deltas = Vec::new();
        match self.format {
            ToolCallFormat::Generic => {
                let mut scan = std::mem::replace(&mut self.generic, Scan::new(CallPaths::Generic));
                for character in text.chars() {
                    scan.step(character, self, &mut deltas);
                }
                self.generic = scan;
            }
            ToolCallFormat::Hermes => {
                self.pending.push_str(text);
                self.hermes(&mut deltas);
            }
        }
        deltas
    }

    /// The answer has ended: what is left, and its content and calls.
    pub fn finish(mut self) -> (Vec<Delta>, Option<String>, Vec<Call>) {
        let mut deltas = Vec::new();
        if self.format == ToolCallFormat::Hermes {
            // A held-back `<tool_c`, or a call cut short before its name, is text after all;
            // a call whose name was read stays a call, its arguments cut where the answer was.
            let mut rest = std::mem::take(&mut self.pending);
            if let Some(scan) = self.hermes_call.take() {
                let opened = scan.call.as_ref().is_some_and(|call| call.index.is_some());
                rest = if opened {
                    String::new()
                } else {
                    format!("{HERMES_OPEN}{}{rest}", scan.text)
                };
            }
            if !rest.is_empty() {
                self.content.push_str(&rest);
                deltas.push(Delta::Content(rest));
            }
        }
        let content = (!self.content.is_empty()).then_some(self.content);
        (deltas, content, self.calls)
    }

    fn hermes(&mut self, deltas: &mut Vec<Delta>) {
        loop {
            match self.hermes_call.take() {
                None => {
                    if let Some(start) = self.pending.find(HERMES_OPEN) {
                        let before: String = self.pending.drain(..start).collect();
                        self.pending.drain(..HERMES_OPEN.len());
                        self.text(before, deltas);
                        self.hermes_call = Some(Scan::new(CallPaths::Hermes));
                        continue;
                    }
                    // Hold back what may be the start of `<tool_call>`.
                    let keep = held_prefix(&self.pending, HERMES_OPEN);
                    let release: String = self.pending.drain(..self.pending.len() - keep).collect();
                    self.text(release, deltas);
                    return;
                }
                Some(mut scan) => {
                    let Some(end) = self.pending.find(HERMES_CLOSE) else {
                        // Feed all but what may be the start of `</tool_call>`.
                        let keep = held_prefix(&self.pending, HERMES_CLOSE);
                        let feed: String =
                            self.pending.drain(..self.pending.len() - keep).collect();
                        for character in feed.chars() {
                            scan.step(character, self, deltas);
                        }
                        self.hermes_call = Some(scan);
                        return;
                    };
                    let feed: String = self.pending.drain(..end).collect();
                    self.pending.drain(..HERMES_CLOSE.len());
                    for character in feed.chars() {
                        scan.step(character, self, deltas);
                    }
                    if !scan.finished_call() {
                        // Not a call after all: the block is text.
                        self.broken = true;
                        let text = format!("{HERMES_OPEN}{}{HERMES_CLOSE}", scan.text);
                        self.text(text, deltas);
                    }
                    // A line break between calls is the template's, not content.
                    if self.pending.starts_with('\n') {
                        self.pending.remove(0);
                    }
                }
            }
        }
    }

    /// Content text, except the blank lines around calls.
    fn text(&mut self, text: String, deltas: &mut Vec<Delta>) {
        let text = if self.calls.is_empty() && !self.broken {
            text
        } else {
            text.trim_start_matches('\n').to_string()
        };
        if text.is_empty() {
            return;
        }
        self.content.push_str(&text);
        deltas.push(Delta::Content(text));
    }

    fn open_call(&mut self, name: String, deltas: &mut Vec<Delta>) -> usize {
        let index = self.calls.len();
        let id = format!("call_{}_{index}", self.id_stem);
        self.calls.push(Call {
            id: id.clone(),
            name: name.clone(),
            arguments: String::new(),
        });
        deltas.push(Delta::Call { index, id, name });
        index
    }

    fn arguments(&mut self, index: usize, text: &str, deltas: &mut Vec<Delta>) {
        if text.is_empty() {
            return;
        }
        if let Some(call) = self.calls.get_mut(index) {
            call.arguments.push_str(text);
        }
        match deltas.last_mut() {
            Some(Delta::Arguments {
                index: last,
                text: pending,
            }) if *last == index => pending.push_str(text),
            _ => deltas.push(Delta::Arguments {
                index,
                text: text.to_string(),
            }),
        }
    }
}

/// How many bytes at the end of `text` may be the start of `marker`.
fn held_prefix(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&length| text.ends_with(&marker[..length]))
        .unwrap_or(0)
}

/// Which values of the JSON being scanned are calls' parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallPaths {
    /// The value is one call: `{"name": ..., "arguments": ...}`.
    Hermes,
    /// `{"tool_calls": [call, ...]}` or `{"response": "..."}`.
    Generic,
}

impl CallPaths {
    /// How many containers hold a call's parts (the call object included).
    fn call_depth(self) -> usize {
        match self {
            CallPaths::Hermes => 1,
            CallPaths::Generic => 3,
        }
    }
}

/// One step of the path to the value being read.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Frame {
    /// In an object: the key whose value is being read, once its `:` is past.
    Object {
        key: Option<String>,
        value: bool,
    },
    Array,
}

impl Frame {
    /// The key whose value is being read here.
    fn key(&self) -> Option<&str> {
        match self {
            Frame::Object {
                key: Some(key),
                value: true,
            } => Some(key),
            _ => None,
        }
    }
}

/// What part of a call (or answer) a value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Name,
    Arguments,
    Response,
    Other,
}

/// A JSON scanner that knows, character by character, which value it is in.
struct Scan {
    paths: CallPaths,
    /// Every character read: a Hermes block that is not a call becomes text again, and a
    /// call's arguments are a span of it.
    text: String,
    stack: Vec<Frame>,
    /// Inside a string: whether a backslash is pending, and where its inside starts.
    string: Option<(bool, usize)>,
    /// The string being read is a key.
    key: bool,
    /// Inside a number or literal: the part it is.
    scalar: Option<Part>,
    /// The call being read.
    call: Option<CallState>,
    /// Generic `response`: where its string's inside starts, and how much of its raw text
    /// was sent as content.
    response_start: Option<usize>,
    response_sent: usize,
}

/// A call being read.
#[derive(Default)]
struct CallState {
    /// The reader's index, once its name opened it.
    index: Option<usize>,
    /// The span of its arguments in the scanned text: start, and end once known.
    arguments: Option<(usize, Option<usize>)>,
    /// How many bytes of the arguments were sent.
    sent: usize,
    done: bool,
}

impl Scan {
    fn new(paths: CallPaths) -> Scan {
        Scan {
            paths,
            text: String::new(),
            stack: Vec::new(),
            string: None,
            key: false,
            scalar: None,
            call: None,
            response_start: None,
            response_sent: 0,
        }
    }

    /// Whether a whole call was read (Hermes).
    fn finished_call(&self) -> bool {
        self.call
            .as_ref()
            .is_some_and(|call| call.done && call.index.is_some())
    }

    /// Whether the containers open now hold a generic answer's calls.
    fn in_calls(&self) -> bool {
        self.stack.first().and_then(Frame::key) == Some("tool_calls")
            && self.stack.get(1) == Some(&Frame::Array)
    }

    /// The part a value starting now is.
    fn part(&self) -> Part {
        if self.paths == CallPaths::Generic
            && self.stack.len() == 1
            && self.stack[0].key() == Some("response")
        {
            return Part::Response;
        }
        let depth = self.paths.call_depth();
        if self.stack.len() != depth || (self.paths == CallPaths::Generic && !self.in_calls()) {
            return Part::Other;
        }
        match self.stack[depth - 1].key() {
            Some("name") => Part::Name,
            Some("arguments") => Part::Arguments,
            _ => Part::Other,
        }
    }

    /// Whether a value starting now is a call.
    fn call_starts(&self) -> bool {
        match self.paths {
            CallPaths::Hermes => self.stack.is_empty(),
            CallPaths::Generic => self.stack.len() == 2 && self.in_calls(),
        }
    }

    fn step(&mut self, character: char, reader: &mut CallReader, deltas: &mut Vec<Delta>) {
        let at = self.text.len();
        self.text.push(character);
        if let Some((escaped, start)) = &mut self.string {
            if *escaped {
                *escaped = false;
            } else if character == '\\' {
                *escaped = true;
            } else if character == '"' {
                let start = *start;
                self.string = None;
                self.string_ended(start, at, reader, deltas);
            }
            if self.string.is_some() && self.part() == Part::Response {
                self.release_response(false, reader, deltas);
            }
            self.send_arguments(reader, deltas);
            return;
        }
        if let Some(part) = self.scalar {
            if !matches!(character, '0'..='9' | '-' | '+' | '.' | 'a'..='z' | 'A'..='Z') {
                self.scalar = None;
                self.value_ended(part, at, reader, deltas);
            }
        }
        match character {
            '{' | '[' => {
                self.value_starts(character, at);
                self.stack.push(if character == '{' {
                    Frame::Object {
                        key: None,
                        value: false,
                    }
                } else {
                    Frame::Array
                });
            }
            '}' | ']' => {
                self.stack.pop();
                let part = self.part();
                self.value_ended(part, at + 1, reader, deltas);
            }
            '"' => {
                self.key = matches!(self.stack.last(), Some(Frame::Object { value: false, .. }));
                if !self.key {
                    self.value_starts(character, at);
                }
                self.string = Some((false, at + 1));
            }
            ':' => {
                if let Some(Frame::Object { value, .. }) = self.stack.last_mut() {
                    *value = true;
                }
            }
            ',' => {
                if let Some(Frame::Object { key, value }) = self.stack.last_mut() {
                    *key = None;
                    *value = false;
                }
            }
            character if character.is_whitespace() => {}
            _ if self.scalar.is_none() => {
                self.scalar = Some(self.part());
                self.value_starts(character, at);
            }
            _ => {}
        }
        self.send_arguments(reader, deltas);
    }

    /// A value starts at byte `at` with `character`.
    fn value_starts(&mut self, character: char, at: usize) {
        if self.call_starts() {
            self.call = (character == '{').then(CallState::default);
        }
        match self.part() {
            Part::Arguments => {
                if let Some(call) = &mut self.call {
                    call.arguments = Some((at, None));
                }
            }
            Part::Response if character == '"' => self.response_start = Some(at + 1),
            _ => {}
        }
    }

    /// A value of `part` ended before byte `end`; a call ends with its object.
    fn value_ended(
        &mut self,
        part: Part,
        end: usize,
        reader: &mut CallReader,
        deltas: &mut Vec<Delta>,
    ) {
        if part == Part::Arguments {
            if let Some(CallState {
                arguments: Some((_, stop @ None)),
                ..
            }) = &mut self.call
            {
                *stop = Some(end);
            }
        }
        if self.call_starts() {
            if let Some(call) = &mut self.call {
                call.done = true;
            }
        }
        self.send_arguments(reader, deltas);
    }

    /// A string value (or key) whose inside started at `start` closed at `end`.
    fn string_ended(
        &mut self,
        start: usize,
        end: usize,
        reader: &mut CallReader,
        deltas: &mut Vec<Delta>,
    ) {
        let raw = &self.text[start..end];
        if self.key {
            self.key = false;
            let key = decode_string(raw).unwrap_or_else(|| raw.to_string());
            if let Some(Frame::Object { key: slot, .. }) = self.stack.last_mut() {
                *slot = Some(key);
            }
            return;
        }
        match self.part() {
            Part::Name => {
                let name = decode_string(raw).unwrap_or_else(|| raw.to_string());
                if let Some(call) = &mut self.call {
                    if call.index.is_none() {
                        call.index = Some(reader.open_call(name, deltas));
                    }
                }
            }
            Part::Response => self.release_response(true, reader, deltas),
            Part::Arguments => self.value_ended(Part::Arguments, end + 1, reader, deltas),
            Part::Other => {}
        }
    }

    /// Sends the current call's arguments read so far, once its name opened it.
    fn send_arguments(&mut self, reader: &mut CallReader, deltas: &mut Vec<Delta>) {
        let Some(call) = &mut self.call else {
            return;
        };
        let (Some(index), Some((start, end))) = (call.index, call.arguments) else {
            return;
        };
        let end = end.unwrap_or(self.text.len());
        let from = start + call.sent;
        if from < end {
            reader.arguments(index, &self.text[from..end], deltas);
            call.sent = end - start;
        }
    }

    /// Sends as much of the `response` string as is whole as content; `closed` when the
    /// string has ended (its closing quote is the text's last character).
    fn release_response(&mut self, closed: bool, reader: &mut CallReader, deltas: &mut Vec<Delta>) {
        let Some(start) = self.response_start else {
            return;
        };
        let end = if closed {
            self.text.len() - 1
        } else {
            self.text.len()
        };
        let from = (start + self.response_sent).min(end);
        let raw = &self.text[from..end];
        // A raw string cut inside an escape waits for the escape's end.
        let whole = match decode_string(raw) {
            Some(_) => raw.len(),
            None => raw.rfind('\\').unwrap_or(0),
        };
        if let Some(text) = decode_string(&raw[..whole]) {
            self.response_sent += whole;
            reader.text(text, deltas);
        }
    }
}

/// The text of a JSON string literal's inside, `None` when it is not whole.
fn decode_string(raw: &str) -> Option<String> {
    serde_json::from_str::<String>(&format!("\"{raw}\"")).ok()
}

/// The arguments text a client gets: a JSON string holding JSON is its inside.
pub fn arguments_text(arguments: &str) -> String {
    match serde_json::from_str::<Value>(arguments) {
        Ok(Value::String(inner)) => inner,
        _ => arguments.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `text` in pieces of `step` characters: the deltas, the content and the calls.
    fn read(
        format: ToolCallFormat,
        text: &str,
        step: usize,
    ) -> (Vec<Delta>, Option<String>, Vec<Call>) {
        let mut reader = CallReader::new(format, "t");
        let characters: Vec<char> = text.chars().collect();
        let mut deltas = Vec::new();
        for piece in characters.chunks(step) {
            deltas.extend(reader.push(&piece.iter().collect::<String>()));
        }
        let (rest, content, calls) = reader.finish();
        deltas.extend(rest);
        (deltas, content, calls)
    }

    /// What the deltas say, put back together: content and each call's arguments.
    fn streamed(deltas: &[Delta]) -> (String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for delta in deltas {
            match delta {
                Delta::Content(text) => content.push_str(text),
                Delta::Call { index, id, name } => {
                    assert_eq!(*index, calls.len(), "calls open in order");
                    calls.push((id.clone(), name.clone(), String::new()));
                }
                Delta::Arguments { index, text } => calls[*index].2.push_str(text),
            }
        }
        (content, calls)
    }

    fn call(index: usize, name: &str, arguments: &str) -> Call {
        Call {
            id: format!("call_t_{index}"),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    /// Every split of the text reads the same, and the stream says what the whole says.
    fn read_every_way(format: ToolCallFormat, text: &str) -> (Option<String>, Vec<Call>) {
        let (deltas, content, calls) = read(format, text, usize::MAX);
        for step in [1, 2, 3, 5, 8] {
            let (pieces, split_content, split_calls) = read(format, text, step);
            assert_eq!(split_content, content, "content, read {step} at a time");
            assert_eq!(split_calls, calls, "calls, read {step} at a time");
            let (streamed_content, streamed_calls) = streamed(&pieces);
            assert_eq!(streamed_content, content.clone().unwrap_or_default());
            let expected: Vec<_> = calls
                .iter()
                .map(|call| (call.id.clone(), call.name.clone(), call.arguments.clone()))
                .collect();
            assert_eq!(streamed_calls, expected, "streamed calls, {step} at a time");
        }
        assert_eq!(streamed(&deltas).0, content.clone().unwrap_or_default());
        (content, calls)
    }

    #[test]
    fn generic_calls_are_read_with_their_arguments_as_written() {
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, {"name": "now", "arguments": {}}]}"#;
        let (content, calls) = read_every_way(ToolCallFormat::Generic, text);
        assert_eq!(content, None);
        assert_eq!(
            calls,
            [
                call(0, "get_weather", r#"{"city": "Paris", "days": 3}"#),
                call(1, "now", "{}"),
            ]
        );
    }

    #[test]
    fn a_generic_response_is_content_with_its_escapes_decoded() {
        let text = r#"{"response": "Say \"hi\" \u00e9t\u00e9\nand \\ bye"}"#;
        let (content, calls) = read_every_way(ToolCallFormat::Generic, text);
        assert_eq!(content.as_deref(), Some("Say \"hi\" été\nand \\ bye"));
        assert!(calls.is_empty());
    }

    #[test]
    fn hermes_calls_follow_text_and_may_name_their_function_last() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa}ris\"}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"a\": [1, 2]}, \"name\": \"sum\"}\n</tool_call>";
        let (content, calls) = read_every_way(ToolCallFormat::Hermes, text);
        assert_eq!(content.as_deref(), Some("Let me look.\n"));
        assert_eq!(
            calls,
            [
                call(0, "get_weather", r#"{"city": "Pa}ris"}"#),
                call(1, "sum", r#"{"a": [1, 2]}"#),
            ]
        );
    }

    #[test]
    fn hermes_text_that_only_looks_like_a_call_stays_text() {
        let text = "a <tool here> <tool_call>\nnot json\n</tool_call> end <tool_c";
        let (content, calls) = read_every_way(ToolCallFormat::Hermes, text);
        assert_eq!(content.as_deref(), Some(text));
        assert!(calls.is_empty());
    }

    #[test]
    fn a_hermes_call_cut_short_after_its_name_stays_a_call() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"ci";
        let (content, calls) = read_every_way(ToolCallFormat::Hermes, text);
        assert_eq!(content, None);
        assert_eq!(calls, [call(0, "get_weather", "{\"ci")]);
    }

    #[test]
    fn arguments_sent_as_a_json_string_are_given_as_their_inside() {
        assert_eq!(arguments_text(r#""{\"a\": 1}""#), r#"{"a": 1}"#);
        assert_eq!(arguments_text(r#"{"a": 1}"#), r#"{"a": 1}"#);
    }
}
