//! Nearest neighbours among prompts with known outcomes: a bag-of-words
//! TF-IDF index with cosine similarity, no embedding model.
//!
//! When the `k` most similar known prompts mostly had a correct edge answer,
//! the new prompt goes to the edge; when they mostly needed the cloud, to the
//! cloud; otherwise the neighbours abstain and the class policy decides.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The most prompts an index may hold; a lookup scans all of them.
pub const NEIGHBOUR_PROMPTS_MAX: usize = 10_000;

/// The most neighbours a vote may take.
pub const NEIGHBOURS_K_MAX: u32 = 32;

/// A prompt whose answers on both tiers were graded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownPrompt {
    pub text: String,
    pub edge_correct: bool,
    pub cloud_correct: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighbourConfig {
    /// Neighbours that vote.
    pub k: u32,
    /// Neighbours less similar than this (cosine, 0–1) do not vote.
    pub min_similarity: f32,
    /// The share of `k` votes one side needs to decide.
    pub min_agreement: f32,
    pub prompts: Vec<KnownPrompt>,
}

impl NeighbourConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.k == 0 || self.k > NEIGHBOURS_K_MAX {
            return Err(format!(
                "neighbours.k must be between 1 and {NEIGHBOURS_K_MAX}"
            ));
        }
        if self.prompts.len() > NEIGHBOUR_PROMPTS_MAX {
            return Err(format!(
                "neighbours.prompts holds at most {NEIGHBOUR_PROMPTS_MAX} prompts"
            ));
        }
        let in_unit = |value: f32| (0.0..=1.0).contains(&value);
        if !in_unit(self.min_similarity) || !in_unit(self.min_agreement) {
            return Err("neighbours.min_similarity and min_agreement must be in 0..=1".into());
        }
        Ok(())
    }
}

/// What the neighbours say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    /// Most similar prompts were answered correctly at the edge.
    Edge { agreeing: u32, k: u32 },
    /// Most similar prompts were wrong at the edge and right in the cloud.
    Cloud { agreeing: u32, k: u32 },
    /// No side has enough votes.
    Abstain,
}

/// A sparse, L2-normalised TF-IDF vector, sorted by term id.
type SparseVector = Vec<(u32, f32)>;

#[derive(Debug, Clone)]
pub struct NeighbourIndex {
    config: NeighbourConfig,
    vocabulary: HashMap<String, u32>,
    inverse_document_frequency: Vec<f32>,
    vectors: Vec<SparseVector>,
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
}

impl NeighbourIndex {
    pub fn new(config: NeighbourConfig) -> NeighbourIndex {
        let mut vocabulary: HashMap<String, u32> = HashMap::new();
        let mut document_frequency: Vec<u32> = Vec::new();
        let mut counts: Vec<Vec<(u32, f32)>> = Vec::with_capacity(config.prompts.len());
        for prompt in &config.prompts {
            let mut term_counts: HashMap<u32, f32> = HashMap::new();
            for word in words(&prompt.text) {
                let next_id = vocabulary.len() as u32;
                let id = *vocabulary.entry(word).or_insert(next_id);
                if id as usize == document_frequency.len() {
                    document_frequency.push(0);
                }
                *term_counts.entry(id).or_insert(0.0) += 1.0;
            }
            for id in term_counts.keys() {
                document_frequency[*id as usize] += 1;
            }
            counts.push(term_counts.into_iter().collect());
        }
        let documents = config.prompts.len() as f32;
        let inverse_document_frequency: Vec<f32> = document_frequency
            .iter()
            .map(|&frequency| ((1.0 + documents) / (1.0 + frequency as f32)).ln() + 1.0)
            .collect();
        let vectors = counts
            .into_iter()
            .map(|terms| weigh(terms, &inverse_document_frequency))
            .collect();
        NeighbourIndex {
            config,
            vocabulary,
            inverse_document_frequency,
            vectors,
        }
    }

    fn vector_of(&self, text: &str) -> SparseVector {
        let mut term_counts: HashMap<u32, f32> = HashMap::new();
        for word in words(text) {
            if let Some(&id) = self.vocabulary.get(&word) {
                *term_counts.entry(id).or_insert(0.0) += 1.0;
            }
        }
        weigh(
            term_counts.into_iter().collect(),
            &self.inverse_document_frequency,
        )
    }

    /// The `k` most similar known prompts: (index, similarity), most similar
    /// first, ties broken by the lower index.
    pub fn nearest(&self, text: &str) -> Vec<(usize, f32)> {
        let query = self.vector_of(text);
        let mut scored: Vec<(usize, f32)> = self
            .vectors
            .iter()
            .enumerate()
            .map(|(index, vector)| (index, dot(&query, vector)))
            .filter(|&(_, similarity)| similarity >= self.config.min_similarity)
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(self.config.k as usize);
        scored
    }

    pub fn vote(&self, text: &str) -> Vote {
        let nearest = self.nearest(text);
        let k = self.config.k;
        let needed = (self.config.min_agreement * k as f32).ceil().max(1.0) as u32;
        let prompts = &self.config.prompts;
        let edge = nearest
            .iter()
            .filter(|(index, _)| prompts[*index].edge_correct)
            .count() as u32;
        let cloud = nearest
            .iter()
            .filter(|(index, _)| !prompts[*index].edge_correct && prompts[*index].cloud_correct)
            .count() as u32;
        if edge >= needed && edge > cloud {
            return Vote::Edge { agreeing: edge, k };
        }
        if cloud >= needed && cloud > edge {
            return Vote::Cloud { agreeing: cloud, k };
        }
        Vote::Abstain
    }
}

fn weigh(mut terms: Vec<(u32, f32)>, inverse_document_frequency: &[f32]) -> SparseVector {
    terms.sort_by_key(|&(id, _)| id);
    for (id, weight) in &mut terms {
        *weight *= inverse_document_frequency[*id as usize];
    }
    let norm = terms
        .iter()
        .map(|(_, weight)| weight * weight)
        .sum::<f32>()
        .sqrt();
    if norm > 0.0 {
        for (_, weight) in &mut terms {
            *weight /= norm;
        }
    }
    terms
}

fn dot(a: &SparseVector, b: &SparseVector) -> f32 {
    let (mut i, mut j, mut sum) = (0, 0, 0.0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                sum += a[i].1 * b[j].1;
                i += 1;
                j += 1;
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(text: &str, edge_correct: bool, cloud_correct: bool) -> KnownPrompt {
        KnownPrompt {
            text: text.into(),
            edge_correct,
            cloud_correct,
        }
    }

    fn index() -> NeighbourIndex {
        NeighbourIndex::new(NeighbourConfig {
            k: 2,
            min_similarity: 0.2,
            min_agreement: 1.0,
            prompts: vec![
                known("what is the capital of france", true, true),
                known("what is the capital of spain", true, true),
                known(
                    "how many apples are left after selling twelve boxes",
                    false,
                    true,
                ),
                known(
                    "how many apples remain after selling boxes of pears",
                    false,
                    true,
                ),
                known("write a poem about the sea", false, false),
            ],
        })
    }

    #[test]
    fn similar_prompts_are_nearest_and_vote() {
        let index = index();
        let nearest = index.nearest("What is the capital of Italy?");
        assert_eq!(nearest.len(), 2);
        assert!(nearest.iter().all(|(i, _)| *i < 2), "{nearest:?}");
        assert_eq!(
            index.vote("What is the capital of Italy?"),
            Vote::Edge { agreeing: 2, k: 2 }
        );
        assert_eq!(
            index.vote("How many apples are left after selling boxes?"),
            Vote::Cloud { agreeing: 2, k: 2 }
        );
    }

    #[test]
    fn unrelated_prompts_abstain() {
        assert_eq!(index().vote("zebra quantum lullaby"), Vote::Abstain);
        assert_eq!(index().vote(""), Vote::Abstain);
    }
}
