//! Structured output: a grammar the answer must follow (a JSON schema, a tool call), enforced
//! in the sampler with llguidance.
//!
//! A grammar travels as the JSON of llguidance's `TopLevelGrammar` ([`json_schema_grammar`]
//! builds one from a JSON schema). [`GrammarCompiler`] holds the vocabulary as llguidance sees
//! it, built once per model; the gateway uses it to refuse a grammar it cannot compile before
//! any work, the engine to start a [`Constrained`] state per generation.
//!
//! **Invariant:** which tokens a grammar allows at a position depends only on the grammar and
//! the completion tokens before it. llguidance bounds its work by counted fuel, not by time, so
//! every machine computes the same mask; a generation resumed on another node replays its
//! committed tokens into a fresh state ([`Constrained::start`]) and continues identically.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;
use crate::TokenId;

/// Longest grammar accepted, in bytes of its JSON.
pub const GRAMMAR_BYTES_MAX: usize = 256 * 1024;

/// The JSON grammar of `schema` in llguidance's form: compact output (no whitespace between
/// tokens of JSON beyond `", "` and `": "`), so that a small model cannot wander off into
/// endless blank space inside an object.
#[must_use]
pub fn json_schema_grammar(schema: &serde_json::Value) -> String {
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut() {
        object.insert("x-guidance".to_string(), compact_json_options());
    }
    let grammar = TopLevelGrammar::from_json_schema(schema);
    serde_json::to_string(&grammar).unwrap_or_default()
}

/// The grammar of an answer that is one to `max_calls` Hermes-style tool calls, each
/// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` with the JSON following
/// `call_schema` (compact, as [`json_schema_grammar`]), one call per line.
#[must_use]
pub fn tool_call_grammar(call_schema: &serde_json::Value, max_calls: usize) -> String {
    let mut schema = call_schema.clone();
    if let Some(object) = schema.as_object_mut() {
        object.insert("x-guidance".to_string(), compact_json_options());
    }
    let start = match max_calls.saturating_sub(1) {
        0 => "start: call".to_string(),
        more => format!("start: call (\"\\n\" call){{0,{more}}}"),
    };
    let lark = format!(
        "{start}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {schema}\n"
    );
    let grammar = TopLevelGrammar::from_lark(lark);
    serde_json::to_string(&grammar).unwrap_or_default()
}

/// llguidance's JSON options for the layout our grammars ask for.
fn compact_json_options() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// The vocabulary of one model as llguidance sees it, and the grammar compiler built on it.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// Builds the token trie of `tokenizer`'s vocabulary: control tokens are marked special (a
    /// grammar never produces them as text), the end of an answer is the end-of-turn token
    /// where the model has one.
    ///
    /// # Errors
    ///
    /// When llguidance refuses the vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, String> {
        let (words, end) = tokenizer.grammar_vocabulary();
        let vocab_size = u32::try_from(words.len()).map_err(|error| error.to_string())?;
        let end = u32::try_from(end).map_err(|error| error.to_string())?;
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size, end), &words);
        let environment = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&(environment as _)).map_err(|error| error.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh matcher of `grammar` (the JSON of a `TopLevelGrammar`).
    ///
    /// # Errors
    ///
    /// What is wrong with the grammar, or what of it llguidance does not support.
    pub fn matcher(&self, grammar: &str) -> Result<Matcher, String> {
        if grammar.len() > GRAMMAR_BYTES_MAX {
            return Err(format!(
                "the grammar is {} bytes; at most {GRAMMAR_BYTES_MAX}",
                grammar.len()
            ));
        }
        let grammar: TopLevelGrammar =
            serde_json::from_str(grammar).map_err(|error| format!("not a grammar: {error}"))?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|error| error.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(error) => Err(error),
            None => Ok(matcher),
        }
    }

    /// Whether `grammar` compiles for this vocabulary; the error says why not.
    ///
    /// # Errors
    ///
    /// As [`GrammarCompiler::matcher`].
    pub fn check(&self, grammar: &str) -> Result<(), String> {
        self.matcher(grammar).map(drop)
    }
}

/// One generation's grammar state: which tokens may come next. The engine masks the logits
/// with it; a cell keeps one per structured generation to check that the tokens a vehicle
/// sends follow the grammar ([`Constrained::follows`]).
pub struct Constrained {
    matcher: Matcher,
}

impl std::fmt::Debug for Constrained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constrained")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constrained {
    /// The state after the completion tokens `committed`.
    ///
    /// # Errors
    ///
    /// When the grammar does not compile, or does not allow `committed`.
    pub fn start(
        compiler: &GrammarCompiler,
        grammar: &str,
        committed: &[TokenId],
    ) -> Result<Self, String> {
        let mut state = Self {
            matcher: compiler.matcher(grammar)?,
        };
        for &token in committed {
            state.accept(token)?;
        }
        Ok(state)
    }

    /// Sets every token the grammar does not allow next to `-inf` in `logits`.
    pub(crate) fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|error| error.to_string())?;
        for (index, logit) in logits.iter_mut().enumerate() {
            let allowed = u32::try_from(index).is_ok_and(|token| allowed.is_allowed(token));
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Moves the state past `token`.
    pub(crate) fn accept(&mut self, token: TokenId) -> Result<(), String> {
        let token = u32::try_from(token).map_err(|error| error.to_string())?;
        self.matcher
            .consume_token(token)
            .map_err(|error| error.to_string())
    }

    /// Whether the grammar allows nothing more: the answer is complete.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the answer may end here.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Moves the state past `tokens` if the grammar allows every one of them in turn; else
    /// leaves it where it was and returns false.
    pub fn follows(&mut self, tokens: &[TokenId]) -> bool {
        let Ok(tokens) = tokens
            .iter()
            .map(|&token| u32::try_from(token))
            .collect::<Result<Vec<u32>, _>>()
        else {
            return false;
        };
        // Checked whole first, so that a refused batch leaves no trace in the state.
        let allowed = self.matcher.validate_tokens(&tokens);
        allowed.is_ok_and(|allowed| allowed == tokens.len())
            && self.matcher.consume_tokens(&tokens).is_ok()
    }
}
