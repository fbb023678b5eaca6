//! The two tiers of `fleetgrid eval --policy auto` as the route driver
//! ([`super::route`]) reaches them: over the OpenAI-compatible API in a
//! live run, recording every answer, or from those records in a replay.
//!
//! A handoff is continued as the gateway continues it (`route_drive/tiers`):
//! the item's chat rendered by the continuing model's own chat template with
//! the assistant turn open, then the text the client already has, sent to
//! that model's `/completions`. The templates come from the local model
//! store; without the cloud model's, a handoff is not possible and the
//! machine lets the fleet finish, as the gateway does.

use std::path::Path;

use anyhow::{bail, Context};
use router::{CloudPrompt, ConfidenceScores};

use super::route::{RouteTiers, TierAnswer, TierCall};
use crate::eval_client::{Client, Completion, Endpoint};
use crate::eval_data::{Half, Item};
use crate::eval_records::{ItemRecords, Record, RecordedToken, Tier};

/// The record of one tier's answer to an item.
pub fn record(
    dataset: &str,
    item: &Item,
    tier: Tier,
    model: &str,
    completion: &Completion,
) -> Record {
    let graded = item.grader.grade(&completion.text);
    let tokens = (completion.token_texts.len() == completion.tokens.len()
        && !completion.tokens.is_empty())
    .then(|| {
        completion
            .token_texts
            .iter()
            .zip(&completion.tokens)
            .map(|(text, logprob)| RecordedToken {
                text: text.clone(),
                logprob: logprob.logprob,
                best_alternative: logprob.best_alternative,
            })
            .collect()
    });
    Record {
        dataset: dataset.to_string(),
        item: item.id.clone(),
        index: item.index,
        half: Half::of_index(item.index),
        class: router::PromptFeatures::of(&item.prompt).class,
        tier,
        model: model.to_string(),
        answer: completion.text.clone(),
        extracted: graded.extracted,
        correct: graded.correct,
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
        latency_ms: completion.latency_ms,
        confidence: (!completion.tokens.is_empty())
            .then(|| ConfidenceScores::of(&completion.tokens)),
        tokens,
        finish_reason: completion.finish_reason.clone(),
        continued: None,
    }
}

/// The chat templates that continue a started answer, per tier.
#[derive(Default)]
pub struct Templates {
    pub edge: Option<engine::Tokenizer>,
    pub cloud: Option<engine::Tokenizer>,
}

impl Templates {
    /// Each model's chat template from the local store, when it has the model.
    pub async fn load(edge_model: &str, cloud_model: &str) -> anyhow::Result<Templates> {
        Ok(Templates {
            edge: load_template(edge_model).await?,
            cloud: load_template(cloud_model).await?,
        })
    }
}

async fn load_template(model: &str) -> anyhow::Result<Option<engine::Tokenizer>> {
    let Ok(resolved) = crate::home::model_store()?.resolve(model) else {
        return Ok(None);
    };
    let path = resolved.path;
    let loaded = tokio::task::spawn_blocking(move || engine::Tokenizer::load(&path))
        .await
        .context("template task")?;
    Ok(Some(loaded.with_context(|| {
        format!("load the chat template of {model}")
    })?))
}

/// The item's chat rendered by `template` with the assistant turn open, then `sent`.
fn continuation_prompt(
    template: Option<&engine::Tokenizer>,
    prompt: &str,
    sent: &str,
) -> anyhow::Result<String> {
    let template = template.context("no chat template to continue an answer with")?;
    let messages = [engine::ChatMessage::new("user", prompt)];
    let rendered = template
        .apply_chat_template(&messages, true)
        .context("render the continuation prompt")?;
    Ok(format!("{rendered}{sent}"))
}

fn answer_of(completion: &Completion) -> TierAnswer {
    TierAnswer {
        text: completion.text.clone(),
        tokens: completion
            .token_texts
            .iter()
            .cloned()
            .zip(completion.tokens.iter().copied())
            .collect(),
        finish_reason: completion.finish_reason.clone(),
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
        latency_ms: completion.latency_ms,
    }
}

/// Both tiers over HTTP; every answer to the item is kept as a record.
pub struct LiveTiers<'a> {
    pub client: &'a Client,
    pub dataset: &'a str,
    pub item: &'a Item,
    pub edge: &'a Endpoint,
    pub cloud: &'a Endpoint,
    pub templates: &'a Templates,
    pub records: Vec<Record>,
}

impl RouteTiers for LiveTiers<'_> {
    async fn edge(&mut self, sent: &str, max_tokens: u32) -> anyhow::Result<TierCall> {
        if sent.is_empty() {
            let completion = match self
                .client
                .complete(self.edge, &self.item.prompt, max_tokens, true)
                .await
            {
                Ok(completion) => completion,
                Err(error) => return Ok(Err(format!("{error:#}"))),
            };
            let record = record(
                self.dataset,
                self.item,
                Tier::Edge,
                &self.edge.model,
                &completion,
            );
            self.records.push(record);
            return Ok(Ok(answer_of(&completion)));
        }
        // The fleet continues what the cloud could not: unjudged, so its
        // log-probabilities are not needed, and not the item's own answer.
        let text = continuation_prompt(self.templates.edge.as_ref(), &self.item.prompt, sent)?;
        let completion = match self
            .client
            .continue_text(self.edge, &text, max_tokens)
            .await
        {
            Ok(completion) => completion,
            Err(error) => return Ok(Err(format!("{error:#}"))),
        };
        let mut answer = answer_of(&completion);
        answer.tokens = vec![(completion.text.clone(), router::TokenLogprob::new(0.0, []))];
        Ok(Ok(answer))
    }

    async fn cloud(&mut self, prompt: &CloudPrompt, max_tokens: u32) -> anyhow::Result<TierCall> {
        let (completion, continued) = match prompt {
            CloudPrompt::Whole => {
                let completion = self
                    .client
                    .complete(self.cloud, &self.item.prompt, max_tokens, false)
                    .await;
                (completion, None)
            }
            CloudPrompt::Continue { sent } => {
                let text =
                    continuation_prompt(self.templates.cloud.as_ref(), &self.item.prompt, sent)?;
                let completion = self
                    .client
                    .continue_text(self.cloud, &text, max_tokens)
                    .await;
                (completion, Some(sent.clone()))
            }
        };
        let completion = match completion {
            Ok(completion) => completion,
            Err(error) => return Ok(Err(format!("{error:#}"))),
        };
        let tier = if continued.is_some() {
            Tier::Handoff
        } else {
            Tier::Cloud
        };
        let mut record = record(
            self.dataset,
            self.item,
            tier,
            &self.cloud.model,
            &completion,
        );
        if let Some(sent) = continued {
            // Graded as the client reads it: the edge's start and the cloud's rest.
            let graded = self
                .item
                .grader
                .grade(&format!("{sent}{}", completion.text));
            record.extracted = graded.extracted;
            record.correct = graded.correct;
            record.continued = Some(sent);
        }
        self.records.push(record);
        Ok(Ok(answer_of(&completion)))
    }
}

/// Both tiers from the records of one item.
pub struct ReplayTiers<'a> {
    pub records: Option<&'a ItemRecords>,
    pub index: usize,
    pub path: &'a Path,
}

impl ReplayTiers<'_> {
    fn missing(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "item {} lacks a recorded {what} in {}; run --policy edge and --policy cloud on it first",
            self.index,
            self.path.display()
        )
    }
}

impl RouteTiers for ReplayTiers<'_> {
    async fn edge(&mut self, sent: &str, _max_tokens: u32) -> anyhow::Result<TierCall> {
        if !sent.is_empty() {
            // A replayed cloud never fails, so the fleet never continues.
            bail!(
                "item {}: a replay cannot continue an edge answer",
                self.index
            );
        }
        let edge = self
            .records
            .and_then(|records| records.edge.as_ref())
            .ok_or_else(|| self.missing("edge answer"))?;
        let Some(tokens) = &edge.tokens else {
            bail!(
                "item {}'s edge answer in {} was recorded without its tokens, which the router's \
                 machine replays; re-record it with --policy edge",
                self.index,
                self.path.display()
            );
        };
        Ok(Ok(TierAnswer {
            text: edge.answer.clone(),
            tokens: tokens
                .iter()
                .map(|token| (token.text.clone(), token.logprob()))
                .collect(),
            finish_reason: edge.finish_reason.clone(),
            prompt_tokens: edge.prompt_tokens,
            completion_tokens: edge.completion_tokens,
            latency_ms: edge.latency_ms,
        }))
    }

    async fn cloud(&mut self, prompt: &CloudPrompt, _max_tokens: u32) -> anyhow::Result<TierCall> {
        let record = match prompt {
            CloudPrompt::Whole => self
                .records
                .and_then(|records| records.cloud.as_ref())
                .ok_or_else(|| self.missing("cloud answer"))?,
            CloudPrompt::Continue { sent } => self
                .records
                .and_then(|records| records.handoff(sent))
                .with_context(|| {
                    format!(
                        "item {} hands off after {} characters of edge text, and {} holds no cloud \
                         continuation of that text; a live run with this router configuration \
                         (--policy auto without --replay) records it",
                        self.index,
                        sent.len(),
                        self.path.display()
                    )
                })?,
        };
        Ok(Ok(TierAnswer {
            text: record.answer.clone(),
            tokens: Vec::new(),
            finish_reason: record.finish_reason.clone(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            latency_ms: record.latency_ms,
        }))
    }
}
