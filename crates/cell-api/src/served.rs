//! The models served, with the tokenizer of each. The gateway and the cell
//! load the same files: the gateway tokenizes every prompt itself (vocab-only
//! load of the same GGUF file the nodes run) so that token counts, context
//! checks and usage never depend on what a node reports, and the cell turns
//! committed token ids into text with the same vocabulary.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use scheduler::ModelId;

/// Prefix that pins a request to the fleet (system-1) tier.
pub const FLEET_PREFIX: &str = "fleet/";

/// Every token's bytes, looked up without calling into llama.cpp: the
/// cell turns committed token ids into text itself (a node's own
/// `piece` bytes are never used), under the core's lock, where no FFI may
/// run. Built once per model at start-up, on a blocking thread.
pub struct PieceTable {
    /// All pieces, one after the other.
    bytes: Vec<u8>,
    /// `ends[id]` is where token `id`'s bytes end in `bytes`.
    ends: Vec<u32>,
}

impl PieceTable {
    /// Renders every token of `tokenizer`'s vocabulary (FFI: call it off
    /// the async runtime).
    pub fn build(tokenizer: &engine::Tokenizer) -> PieceTable {
        let vocab_size = tokenizer.vocab_size();
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(vocab_size as usize);
        for id in 0..vocab_size {
            let id = i32::try_from(id).expect("vocabulary ids fit in i32");
            bytes.extend_from_slice(&tokenizer.piece(id));
            ends.push(u32::try_from(bytes.len()).expect("vocabulary text below 4 GiB"));
        }
        PieceTable { bytes, ends }
    }

    /// A table of the given pieces, token `i` being `pieces[i]` (tests).
    pub fn from_pieces(pieces: &[&[u8]]) -> PieceTable {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(pieces.len());
        for piece in pieces {
            bytes.extend_from_slice(piece);
            ends.push(u32::try_from(bytes.len()).expect("test pieces below 4 GiB"));
        }
        PieceTable { bytes, ends }
    }

    /// Number of tokens; valid ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> u32 {
        u32::try_from(self.ends.len()).unwrap_or(u32::MAX)
    }

    /// The bytes of `token`, `None` for an id outside the vocabulary.
    pub fn piece(&self, token: i32) -> Option<&[u8]> {
        let index = usize::try_from(token).ok()?;
        let end = *self.ends.get(index)? as usize;
        let start = match index {
            0 => 0,
            _ => self.ends[index - 1] as usize,
        };
        self.bytes.get(start..end)
    }
}

pub struct ServedModel {
    pub id: ModelId,
    /// Public name, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// Lowercase hex SHA-256 of the GGUF file; nodes announce models by it.
    pub digest: String,
    pub tokenizer: engine::Tokenizer,
    /// The text of every token, for detokenizing what nodes commit.
    pub pieces: PieceTable,
    /// Context window of one sequence on a node, in tokens.
    pub context_tokens: u32,
    pub created_unix_s: i64,
    /// The vocabulary as grammars see it, built the first time a request
    /// asks for structured output.
    grammars: OnceLock<Result<engine::GrammarCompiler, String>>,
}

impl ServedModel {
    /// Checks that `grammar` compiles for this model, as a vehicle will
    /// compile it; the error says what is wrong or unsupported.
    pub fn check_grammar(&self, grammar: &str) -> Result<(), String> {
        self.grammar_compiler()?.check(grammar)
    }

    /// The state of `grammar` after `committed`, to check what vehicles
    /// send against.
    pub fn grammar_state(
        &self,
        grammar: &str,
        committed: &[i32],
    ) -> Result<engine::Constrained, String> {
        engine::Constrained::start(self.grammar_compiler()?, grammar, committed)
    }

    fn grammar_compiler(&self) -> Result<&engine::GrammarCompiler, String> {
        self.grammars
            .get_or_init(|| engine::GrammarCompiler::new(&self.tokenizer))
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[derive(Default)]
pub struct ServedModels {
    by_name: HashMap<String, Arc<ServedModel>>,
    ordered: Vec<Arc<ServedModel>>,
}

impl ServedModels {
    /// Adds a model; ids are dense in insertion order.
    pub fn add(
        &mut self,
        name: String,
        digest: String,
        tokenizer: engine::Tokenizer,
        pieces: PieceTable,
        context_tokens: u32,
        created_unix_s: i64,
    ) -> Arc<ServedModel> {
        let id = ModelId(u16::try_from(self.ordered.len()).expect("fewer than 65536 models"));
        let model = Arc::new(ServedModel {
            id,
            name: name.clone(),
            digest,
            tokenizer,
            pieces,
            context_tokens,
            created_unix_s,
            grammars: OnceLock::new(),
        });
        self.by_name.insert(name, Arc::clone(&model));
        self.ordered.push(Arc::clone(&model));
        model
    }

    /// Resolves a requested model name: `NAME` or `fleet/NAME`.
    pub fn lookup(&self, requested: &str) -> Option<Arc<ServedModel>> {
        let name = requested.strip_prefix(FLEET_PREFIX).unwrap_or(requested);
        self.by_name.get(name).cloned()
    }

    pub fn by_digest(&self, digest: &str) -> Option<&Arc<ServedModel>> {
        self.ordered
            .iter()
            .find(|model| model.digest.eq_ignore_ascii_case(digest))
    }

    pub fn all(&self) -> &[Arc<ServedModel>] {
        &self.ordered
    }
}
