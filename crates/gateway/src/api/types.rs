//! The OpenAI request bodies the gateway accepts, as sent by clients.
//!
//! These are only what arrives on the wire; `validate` turns them into a
//! `ValidatedRequest`, the only thing the rest of the coordinator sees. Keys
//! that none of these types hold are refused before they are parsed
//! (`fields`), so nothing a client sends is dropped unseen.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// Keep the answer for retrieval (`stored`); checked there, as are the
    /// two below.
    pub store: Option<serde_json::Value>,
    pub metadata: Option<serde_json::Value>,
    /// fleetgrid's extension: what a stored answer gets if clawed back.
    pub on_clawback: Option<serde_json::Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptField>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    /// llama-server's and vLLM's extension.
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    /// llama-server's and vLLM's extension: never end at an end-of-generation token.
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Chat: a boolean. Completions: a number of alternatives.
    pub logprobs: Option<serde_json::Value>,
    pub top_logprobs: Option<i64>,
    pub n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// llama-server's and vLLM's extension.
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    pub response_format: Option<serde_json::Value>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<serde_json::Value>,
    /// vLLM's extension: logprobs name each token `token_id:<id>` instead of its text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// fleetgrid's extension for `auto`: `"routed"` (the default) or `"exact"`, the
    /// speculative cascade whose answer is the cloud model's own.
    pub quality: Option<String>,
    /// OpenAI's predicted outputs: `{"type": "content", "content": ...}`.
    pub prediction: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
    /// Token ids of the named model.
    Tokens(Vec<i64>),
    ManyTokens(Vec<Vec<i64>>),
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: Option<String>,
    pub content: Option<MessageContent>,
    /// An assistant message's calls, as a previous answer gave them.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}
