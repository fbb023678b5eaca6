//! The model's own chat template (`tokenizer.chat_template`, a Jinja template written for
//! Hugging Face's `transformers`), rendered with `minijinja` as llama-server's `--jinja` renders
//! it: with the conversation's tool calls and tool results, and the tools on offer.
//!
//! llama.cpp's built-in renderer (`Tokenizer::apply_chat_template`) knows a fixed list of
//! template families by their text and renders plain role/content turns only; a conversation
//! with tools needs the template itself.

use std::sync::Arc;

use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};
use serde::Serialize;

use crate::EngineError;

/// Longest chat template accepted, in bytes.
pub const CHAT_TEMPLATE_BYTES_MAX: usize = 64 * 1024;

/// The name the template is kept under in its environment.
const TEMPLATE_NAME: &str = "chat";

/// How a model writes a tool call, as its template shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// Hermes 2 Pro, Qwen 2.5 and their kin: the template offers the tools itself and the model
    /// writes each call as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
    Hermes,
    /// A template that knows nothing of tools: the tools and the answer's JSON shape are
    /// described in the system message, and the answer is grammar-constrained JSON,
    /// `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}`, as
    /// llama-server's generic format.
    Generic,
}

/// A model's chat template, compiled once; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    environment: Arc<Environment<'static>>,
    format: ToolCallFormat,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts templates may write.
    ///
    /// # Errors
    ///
    /// `ChatTemplate` when the template is too long or is not a template minijinja compiles.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, EngineError> {
        if source.len() > CHAT_TEMPLATE_BYTES_MAX {
            return Err(EngineError::ChatTemplate(format!(
                "the chat template is {} bytes; at most {CHAT_TEMPLATE_BYTES_MAX}",
                source.len()
            )));
        }
        let mut environment = Environment::new();
        // Python's methods (`.strip()`, `.items()`, `.startswith()`, ...) that templates use.
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // As in transformers: an undefined value is falsy and renders as nothing, but using one
        // as a mapping is an error.
        environment.set_undefined_behavior(UndefinedBehavior::Lenient);
        // As transformers configures Jinja for chat templates.
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.add_filter("tojson", tojson);
        environment.add_function("raise_exception", raise_exception);
        environment.add_function("strftime_now", strftime_now);
        environment
            .add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| EngineError::ChatTemplate(error.to_string()))?;
        let format = if source.contains("<tool_call>") {
            ToolCallFormat::Hermes
        } else {
            ToolCallFormat::Generic
        };
        Ok(Self {
            environment: Arc::new(environment),
            format,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// How the model writes tool calls.
    #[must_use]
    pub fn tool_call_format(&self) -> ToolCallFormat {
        self.format
    }

    /// Renders `messages` (OpenAI's message objects, tool calls' `arguments` as JSON values as
    /// transformers passes them) with `tools` (OpenAI's tool objects) on offer;
    /// `add_generation_prompt` opens the assistant's turn.
    ///
    /// # Errors
    ///
    /// `ChatTemplate` when the template fails on these messages (it raised an exception,
    /// indexed something that is not there, ...).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .environment
            .get_template(TEMPLATE_NAME)
            .map_err(|error| EngineError::ChatTemplate(error.to_string()))?;
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template
            .render(context)
            .map_err(|error| EngineError::ChatTemplate(error_text(&error)))
    }
}

/// An error's text with its causes, as a client reads it.
fn error_text(error: &minijinja::Error) -> String {
    match error.kind() {
        ErrorKind::InvalidOperation if error.detail().is_some() => {
            error.detail().unwrap_or_default().to_string()
        }
        _ => error.to_string(),
    }
}

/// `raise_exception(message)`: a template refusing its input.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: templates that write today's date get a fixed one, so that a prompt
/// (and its cached head) does not change with the clock.
fn strftime_now(_format: String) -> String {
    "26 Jul 2024".to_string()
}

/// `tojson` as transformers defines it (`json.dumps` with `ensure_ascii=False`): `", "` and
/// `": "` between items, keys in their order, no HTML escaping; `indent` for nested lines.
fn tojson(value: &Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|error| minijinja::Error::new(ErrorKind::InvalidOperation, error.to_string()))?;
    let mut out = Vec::new();
    let formatter = PythonJson {
        indent: indent.map(|width| vec![b' '; width]),
        open: Vec::new(),
    };
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    json.serialize(&mut serializer)
        .map_err(|error| minijinja::Error::new(ErrorKind::InvalidOperation, error.to_string()))?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).unwrap_or_default(),
    ))
}

/// `value` as Python's `json.dumps` writes it: `", "` and `": "` between items, keys in their
/// order. It is the layout [`crate::json_schema_grammar`] makes a model write, so a call the
/// model made, sent back in a conversation, reads as the model wrote it.
#[must_use]
pub fn json_dumps(value: &serde_json::Value) -> String {
    let mut out = Vec::new();
    let formatter = PythonJson {
        indent: None,
        open: Vec::new(),
    };
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    match value.serialize(&mut serializer) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Python's `json.dumps` layout: `", "` and `": "` without `indent`, one item per line with it.
struct PythonJson {
    indent: Option<Vec<u8>>,
    /// Per open container, whether it holds an item yet.
    open: Vec<bool>,
}

impl PythonJson {
    fn new_line<W: ?Sized + std::io::Write>(&self, writer: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.open.len() {
                writer.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn separator<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if let Some(holds) = self.open.last_mut() {
            *holds = true;
        }
        match (first, &self.indent) {
            (true, _) => self.new_line(writer),
            (false, None) => writer.write_all(b", "),
            (false, Some(_)) => {
                writer.write_all(b",")?;
                self.new_line(writer)
            }
        }
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.open.push(false);
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        if self.open.pop().unwrap_or(false) {
            self.new_line(writer)?;
        }
        writer.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(writer, first)
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}
