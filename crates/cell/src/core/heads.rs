//! The prompt heads a cell publishes in its capacity (`Capacity::prompt_heads`):
//! per model, the head hashes of the most recently assigned prompts, so that
//! a gateway can send a prompt to the cell whose vehicle holds its head.
//!
//! Which heads a vehicle holds is the scheduler's model (`scheduler`'s
//! `heads`); this keeps only recency, and what it publishes is filtered by
//! that model, so a head no vehicle holds any more is not offered.

use std::collections::{HashMap, VecDeque};

use cell_api::limits::PROMPT_HEADS_PUBLISHED_MAX;
use cell_api::served::ServedModels;
use cell_api::ModelHeads;
use scheduler::{ModelId, PromptHeads, Scheduler};

/// Per model, head hashes by recency, at most `PROMPT_HEADS_PUBLISHED_MAX`
/// each (the most recent at the back).
#[derive(Default)]
pub(super) struct RecentHeads {
    by_model: HashMap<ModelId, VecDeque<u64>>,
}

impl RecentHeads {
    /// A prompt with `heads` was assigned to a vehicle serving `model`.
    pub(super) fn touch(&mut self, model: ModelId, heads: &PromptHeads) {
        if heads.is_empty() {
            return;
        }
        let recent = self.by_model.entry(model).or_default();
        for hash in heads.hashes() {
            if let Some(at) = recent.iter().position(|held| held == hash) {
                recent.remove(at);
            }
            if recent.len() >= PROMPT_HEADS_PUBLISHED_MAX {
                recent.pop_front();
            }
            recent.push_back(*hash);
        }
    }

    /// What the capacity publishes: per model served, the recent heads some
    /// vehicle still holds, most recent first; nothing while the scheduler
    /// does not track heads.
    pub(super) fn published(
        &self,
        scheduler: &Scheduler,
        models: &ServedModels,
    ) -> Vec<ModelHeads> {
        if !scheduler.config().prefix_affinity {
            return Vec::new();
        }
        let mut published: Vec<ModelHeads> = models
            .all()
            .iter()
            .filter_map(|model| {
                let recent = self.by_model.get(&model.id)?;
                let hashes: Vec<u64> = recent
                    .iter()
                    .rev()
                    .copied()
                    .filter(|hash| scheduler.holds_prompt_head(model.id, *hash))
                    .collect();
                if hashes.is_empty() {
                    return None;
                }
                Some(ModelHeads {
                    model: model.name.clone(),
                    hashes,
                })
            })
            .collect();
        published.sort_by(|a, b| a.model.cmp(&b.model));
        published
    }
}
