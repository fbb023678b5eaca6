//! Tool calls: `tools`, `tool_choice` and `parallel_tool_calls` checked once, the conversation
//! rendered with the model's own chat template (`engine::ChatTemplate`), the grammar that keeps
//! a call valid, and (`calls`) the answer's text read back into OpenAI's `tool_calls`.
//!
//! How a model writes calls is its template's business (`engine::ToolCallFormat`):
//! - **Hermes** (Qwen 2.5 and kin): the template lists the tools; calls are
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. With `required` or a named
//!   function the answer is grammar-constrained to such calls; with `auto` the model is free
//!   and what it wrote is parsed.
//! - **Generic** (a template that knows nothing of tools): the system message lists the tools
//!   and the two shapes an answer may take, and the answer is always grammar-constrained JSON:
//!   `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or `{"response": "..."}` (the
//!   latter only with `auto`).
//!
//! A call's arguments always follow its function's `parameters` where a grammar applies, so
//! that a client can parse them; a schema the grammar compiler cannot follow is refused with a
//! 400 naming the tool.

pub mod calls;

use serde_json::{json, Value};

use super::error::ApiError;
use crate::cloud::UpstreamTools;
use engine::ToolCallFormat;

/// Most tools one request may offer (OpenAI's limit).
pub const TOOLS_MAX: usize = 128;

/// Most calls a grammar lets one answer make when `parallel_tool_calls` is on.
pub const PARALLEL_CALLS_MAX: usize = 8;

/// Which tools the model may or must call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer without calling a tool; the tools are not shown to the model.
    None,
    /// Call tools or answer, as the model decides.
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this function.
    Named(String),
}

/// One function on offer.
#[derive(Clone, Debug)]
pub struct Function {
    pub name: String,
    /// The JSON schema of its arguments.
    pub parameters: Value,
    /// The tool object as the client sent it, for the template and the cloud.
    pub offered: Value,
}

/// A request's tools, checked.
#[derive(Clone, Debug)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    /// Whether the model sees the tools and may call them.
    pub fn callable(&self) -> bool {
        self.choice != ToolChoice::None && !self.functions.is_empty()
    }

    /// The tools as the template renders them (OpenAI's tool objects).
    pub fn offered(&self) -> Value {
        Value::Array(
            self.functions
                .iter()
                .map(|function| function.offered.clone())
                .collect(),
        )
    }

    /// The functions the model may call under this choice.
    fn allowed(&self) -> impl Iterator<Item = &Function> {
        self.functions
            .iter()
            .filter(move |function| match &self.choice {
                ToolChoice::Named(name) => &function.name == name,
                _ => true,
            })
    }

    /// The grammar an answer follows, if any (see the module's documentation).
    pub fn grammar(&self, format: ToolCallFormat) -> Option<String> {
        if !self.callable() {
            return None;
        }
        let calls: Vec<Value> = self.allowed().map(call_schema).collect();
        let call = one_of(calls);
        let max_calls = if self.parallel { PARALLEL_CALLS_MAX } else { 1 };
        match format {
            ToolCallFormat::Generic => {
                let calls = json!({
                    "type": "object",
                    "properties": {"tool_calls": {
                        "type": "array", "items": call, "minItems": 1, "maxItems": max_calls,
                    }},
                    "required": ["tool_calls"],
                    "additionalProperties": false,
                });
                let schema = if self.choice == ToolChoice::Auto {
                    json!({"anyOf": [calls, {
                        "type": "object",
                        "properties": {"response": {"type": "string"}},
                        "required": ["response"],
                        "additionalProperties": false,
                    }]})
                } else {
                    calls
                };
                Some(engine::json_schema_grammar(&schema))
            }
            ToolCallFormat::Hermes if self.choice == ToolChoice::Auto => None,
            ToolCallFormat::Hermes => Some(engine::tool_call_grammar(&call, max_calls)),
        }
    }

    /// The tools as the cloud upstream gets them: as the client sent them.
    pub fn upstream(&self) -> UpstreamTools {
        let tool_choice = match &self.choice {
            ToolChoice::None => json!("none"),
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
        };
        UpstreamTools {
            tools: self.offered(),
            tool_choice,
            parallel_tool_calls: self.parallel,
        }
    }

    /// The system text a generic-format model reads: the tools and the JSON it answers in.
    fn generic_instructions(&self) -> String {
        let tools = serde_json::to_string_pretty(&self.offered()).unwrap_or_default();
        let shape = match &self.choice {
            ToolChoice::Auto => "Answer with one JSON object: either {\"tool_calls\": [{\"name\": <a tool's name>, \"arguments\": <its arguments>}]} to call tools, or {\"response\": <your answer>} to answer the user directly.".to_string(),
            ToolChoice::Named(name) => format!("Call the tool {name}, answering with one JSON object: {{\"tool_calls\": [{{\"name\": \"{name}\", \"arguments\": <its arguments>}}]}}."),
            _ => "Call one or more tools, answering with one JSON object: {\"tool_calls\": [{\"name\": <a tool's name>, \"arguments\": <its arguments>}]}.".to_string(),
        };
        format!(
            "You can call the following tools to satisfy the user's request:\n{tools}\n\n{shape}"
        )
    }
}

/// A call of `function`: its name and arguments, nothing else.
fn call_schema(function: &Function) -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"const": function.name},
            "arguments": function.parameters,
        },
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

fn one_of(mut schemas: Vec<Value>) -> Value {
    if schemas.len() == 1 {
        schemas.remove(0)
    } else {
        json!({ "anyOf": schemas })
    }
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(message, Some(param), "invalid_value")
}

/// Whether `name` is a function name OpenAI accepts: 1 to 64 letters, digits, `_` or `-`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the request offers no
/// tools (`tool_choice: "none"` alone is accepted, as OpenAI accepts it).
pub fn check(
    tools: Option<Value>,
    choice: Option<Value>,
    parallel: Option<Value>,
) -> Result<Option<Tools>, ApiError> {
    let parallel = match parallel {
        None => None,
        Some(Value::Bool(flag)) => Some(flag),
        Some(_) => {
            return Err(invalid(
                "'parallel_tool_calls' must be a boolean",
                "parallel_tool_calls",
            ))
        }
    };
    let Some(tools) = tools else {
        return match (choice.as_ref().map(Value::as_str), parallel) {
            (None | Some(Some("none")), None) => Ok(None),
            (Some(_), _) => Err(invalid(
                "'tool_choice' is only allowed when 'tools' are specified",
                "tool_choice",
            )),
            (None, Some(_)) => Err(invalid(
                "'parallel_tool_calls' is only allowed when 'tools' are specified",
                "parallel_tool_calls",
            )),
        };
    };
    let Value::Array(tools) = tools else {
        return Err(invalid("'tools' must be an array of tools", "tools"));
    };
    if tools.len() > TOOLS_MAX {
        return Err(invalid(
            format!(
                "'tools' has {} entries; the limit is {TOOLS_MAX}",
                tools.len()
            ),
            "tools",
        ));
    }
    let mut functions: Vec<Function> = Vec::with_capacity(tools.len());
    for (index, tool) in tools.into_iter().enumerate() {
        let function = function(tool, index)?;
        if functions.iter().any(|known| known.name == function.name) {
            return Err(invalid(
                format!("two tools are named '{}'", function.name),
                &format!("tools[{index}].function.name"),
            ));
        }
        functions.push(function);
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(choice) => tool_choice(choice, &functions)?,
    };
    if functions.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
        return Err(invalid(
            "'tool_choice' asks for a tool call but 'tools' is empty",
            "tool_choice",
        ));
    }
    Ok(Some(Tools {
        functions,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// One tool: `{"type": "function", "function": {"name", "description", "parameters",
/// "strict"}}`.
fn function(tool: Value, index: usize) -> Result<Function, ApiError> {
    let param = format!("tools[{index}]");
    let Value::Object(object) = &tool else {
        return Err(invalid("each tool must be an object", &param));
    };
    if let Some(extra) = object
        .keys()
        .find(|key| !["type", "function"].contains(&key.as_str()))
    {
        return Err(invalid(
            format!("'{extra}' is not a field of a tool"),
            &format!("{param}.{extra}"),
        ));
    }
    if object.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(
            "only tools of type 'function' are supported",
            &format!("{param}.type"),
        ));
    }
    let Some(Value::Object(function)) = object.get("function") else {
        return Err(ApiError::invalid(
            "a tool of type 'function' needs its 'function'",
            Some(&format!("{param}.function")),
            "missing_required_parameter",
        ));
    };
    if let Some(extra) = function
        .keys()
        .find(|key| !["name", "description", "parameters", "strict"].contains(&key.as_str()))
    {
        return Err(invalid(
            format!("'{extra}' is not a field of a function"),
            &format!("{param}.function.{extra}"),
        ));
    }
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|name| valid_name(name))
        .ok_or_else(|| {
            invalid(
                "a function's 'name' must be 1 to 64 letters, digits, '_' or '-'",
                &format!("{param}.function.name"),
            )
        })?
        .to_string();
    /// An optional field of a function: its name, whether a value has its type, and what
    /// that type is called.
    type Typed = (&'static str, fn(&Value) -> bool, &'static str);
    const TYPED: [Typed; 2] = [
        ("description", Value::is_string, "a string"),
        ("strict", Value::is_boolean, "a boolean"),
    ];
    for (key, is_kind, kind) in TYPED {
        if function
            .get(key)
            .is_some_and(|value| !is_kind(value) && !value.is_null())
        {
            return Err(invalid(
                format!("a function's '{key}' must be {kind}"),
                &format!("{param}.function.{key}"),
            ));
        }
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(_) => {
            return Err(invalid(
                "a function's 'parameters' must be a JSON schema object",
                &format!("{param}.function.parameters"),
            ))
        }
    };
    Ok(Function {
        name,
        parameters,
        offered: tool,
    })
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type": "function", "function":
/// {"name": ...}}` naming one of the tools.
fn tool_choice(choice: Value, functions: &[Function]) -> Result<ToolChoice, ApiError> {
    const PARAM: &str = "tool_choice";
    match &choice {
        Value::String(word) => match word.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(invalid(
                format!("'tool_choice' is '{other}'; it must be 'none', 'auto', 'required' or a function"),
                PARAM,
            )),
        },
        Value::Object(object) => {
            let name = (object.get("type").and_then(Value::as_str) == Some("function"))
                .then(|| object.get("function")?.get("name")?.as_str())
                .flatten()
                .ok_or_else(|| {
                    invalid(
                        "a 'tool_choice' object must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        PARAM,
                    )
                })?;
            if !functions.iter().any(|function| function.name == name) {
                return Err(invalid(
                    format!("'tool_choice' names '{name}', which is not one of the tools"),
                    PARAM,
                ));
            }
            Ok(ToolChoice::Named(name.to_string()))
        }
        _ => Err(invalid(
            "'tool_choice' must be a string or an object",
            PARAM,
        )),
    }
}

/// A chat message of a conversation with tools, as the template renders it: OpenAI's message
/// with each call's `arguments` as a JSON value (as transformers passes them) where they parse.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolMessage {
    pub role: String,
    pub content: Option<String>,
    /// `(id, name, arguments as sent)` of each call an assistant message made.
    pub calls: Vec<(String, String, String)>,
    /// The call a `tool` message answers.
    pub call_id: Option<String>,
}

impl ToolMessage {
    /// The message in OpenAI's shape, as an upstream reads it.
    pub fn openai(&self) -> Value {
        self.shaped(|arguments| Value::String(arguments.to_string()))
    }

    /// The message in OpenAI's shape, each call's arguments as `arguments` gives them.
    fn shaped(&self, arguments: fn(&str) -> Value) -> Value {
        let mut message = json!({"role": self.role, "content": self.content});
        if !self.calls.is_empty() {
            message["tool_calls"] = self
                .calls
                .iter()
                .map(|(id, name, sent)| {
                    json!({"id": id, "type": "function",
                           "function": {"name": name, "arguments": arguments(sent)}})
                })
                .collect();
        }
        if let Some(id) = &self.call_id {
            message["tool_call_id"] = json!(id);
        }
        message
    }

    /// The message as its template (for `format`) expects it.
    fn rendered(&self, format: ToolCallFormat, names: &[(String, String)]) -> Value {
        match format {
            ToolCallFormat::Hermes => {
                // Arguments as JSON values, as transformers passes them; a result names its
                // function.
                let mut message = self.shaped(arguments_value);
                if let Some(id) = &self.call_id {
                    if let Some((_, name)) = names.iter().find(|(known, _)| known == id) {
                        message["name"] = json!(name);
                    }
                }
                message
            }
            ToolCallFormat::Generic if !self.calls.is_empty() => {
                // The JSON the model itself writes when it calls a tool.
                let calls: Vec<Value> = self
                    .calls
                    .iter()
                    .map(|(_, name, arguments)| {
                        json!({"name": name, "arguments": arguments_value(arguments)})
                    })
                    .collect();
                let text = engine::json_dumps(&json!({ "tool_calls": calls }));
                json!({"role": self.role, "content": text})
            }
            ToolCallFormat::Generic => match &self.call_id {
                Some(id) => {
                    let name = names
                        .iter()
                        .find(|(known, _)| known == id)
                        .map(|(_, name)| name.as_str());
                    let response = json!({"tool_response": {
                        "tool": name, "tool_call_id": id, "content": self.content,
                    }});
                    json!({"role": "tool", "content": engine::json_dumps(&response)})
                }
                None => {
                    json!({"role": self.role, "content": self.content.clone().unwrap_or_default()})
                }
            },
        }
    }
}

/// A call's arguments as the template sees them: the JSON value, or the text itself when it
/// is not JSON.
fn arguments_value(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()))
}

/// The messages and tools the template renders for a conversation with tools, in `format`.
pub fn template_input(
    messages: &[ToolMessage],
    tools: Option<&Tools>,
    format: ToolCallFormat,
) -> (Value, Option<Value>) {
    let names: Vec<(String, String)> = messages
        .iter()
        .flat_map(|message| message.calls.iter())
        .map(|(id, name, _)| (id.clone(), name.clone()))
        .collect();
    let mut rendered: Vec<Value> = messages
        .iter()
        .map(|message| message.rendered(format, &names))
        .collect();
    let callable = tools.filter(|tools| tools.callable());
    match (format, callable) {
        (ToolCallFormat::Hermes, Some(tools)) => (Value::Array(rendered), Some(tools.offered())),
        (ToolCallFormat::Generic, Some(tools)) => {
            let instructions = tools.generic_instructions();
            match rendered.first_mut() {
                Some(first) if first["role"] == "system" => {
                    let content = first["content"].as_str().unwrap_or_default();
                    first["content"] = json!(format!("{content}\n\n{instructions}"));
                }
                _ => rendered.insert(0, json!({"role": "system", "content": instructions})),
            }
            (Value::Array(rendered), None)
        }
        (_, None) => (Value::Array(rendered), None),
    }
}
