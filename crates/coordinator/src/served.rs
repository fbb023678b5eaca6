//! The models this coordinator serves, with the tokenizer of each.
//!
//! The coordinator tokenizes every prompt itself (vocab-only load of the same
//! GGUF file the nodes run) so that token counts, context checks and usage
//! never depend on what a node reports.

use std::collections::HashMap;
use std::sync::Arc;

use scheduler::ModelId;

/// Prefix that pins a request to the fleet (system-1) tier.
pub const FLEET_PREFIX: &str = "fleet/";

pub struct ServedModel {
    pub id: ModelId,
    /// Public name, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// Lowercase hex SHA-256 of the GGUF file; nodes announce models by it.
    pub digest: String,
    pub tokenizer: engine::Tokenizer,
    /// Context window of one sequence on a node, in tokens.
    pub context_tokens: u32,
    pub created_unix_s: i64,
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
        context_tokens: u32,
        created_unix_s: i64,
    ) -> Arc<ServedModel> {
        let id = ModelId(u16::try_from(self.ordered.len()).expect("fewer than 65536 models"));
        let model = Arc::new(ServedModel {
            id,
            name: name.clone(),
            digest,
            tokenizer,
            context_tokens,
            created_unix_s,
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
