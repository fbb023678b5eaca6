//! The two tiers as the driver runs them: an edge generation through the
//! core (its updates turned into the machine's events), and a cloud call
//! through the upstream, with the prompts each is given: rendered and
//! tokenized once, before admission (`RoutedPrompt`).

use std::sync::Arc;

use engine::TextAssembler;
use rand::Rng;
use router::{CloudPrompt, EdgeEnd, Event, TokenLogprob};
use scheduler::RequestId;
use serde_json::json;
use tokio::sync::mpsc;

use super::{Flow, Routing, Stop};
use crate::api::error::ApiError;
use crate::api::generate;
use crate::api::tools::calls::Delta;
use crate::api::tools::{ToolMessage, Tools};
use crate::api::validate::{PromptSource, ValidatedRequest};
use crate::billing_meter::Metering;
use crate::cloud::upstream::{UpstreamCall, UpstreamPrompt, UpstreamRequest, UpstreamStream};
use crate::cloud::{CloudTier, UpstreamError};
use crate::limits;
use cell_api::{
    Cell, CommittedToken, FinishReason, GenerationError, NewGeneration, TenantRef, Update,
};

/// Alternatives asked for each edge token, so the router can score margins.
const ROUTING_TOP_LOGPROBS: u32 = 2;

/// A routed request's prompt, rendered and tokenized once by each model's
/// tokenizer: counted for the admission, given to the edge generation, and
/// continued by the cloud after a handoff.
pub(in crate::api) struct RoutedPrompt {
    /// The prompt as the edge model tokenizes it (the coordinator's count).
    pub(super) edge_tokens: Vec<i32>,
    /// The prompt as the cloud model's own tokenizer renders and counts it,
    /// where that tokenizer is loaded (it bills by its own count) and the
    /// prompt rendered.
    cloud: Option<CloudRendering>,
}

/// A prompt rendered by the cloud model's chat template.
struct CloudRendering {
    /// A chat with the assistant's turn open, or the text prompt itself.
    text: String,
    /// Its tokens, as the cloud model counts and prefills them.
    ids: Vec<i32>,
}

impl RoutedPrompt {
    /// Renders and tokenizes the prompt for the edge model and, where its
    /// tokenizer is loaded, for the cloud model, in one task off the async
    /// threads. A prompt the edge model cannot prepare is a 400; one the
    /// cloud's template cannot render only leaves the cloud without its
    /// count and the request without handoffs.
    pub(in crate::api) async fn prepare(
        request: &ValidatedRequest,
        cloud: &Arc<CloudTier>,
    ) -> Result<RoutedPrompt, ApiError> {
        let model = Arc::clone(&request.model);
        let cloud = Arc::clone(cloud);
        let source = request.prompt.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let (edge_tokens, _) = generate::render_and_tokenize(&model.tokenizer, source.clone())?;
            let cloud = cloud.chat_template.as_ref().and_then(|tokenizer| {
                match generate::render_and_tokenize(tokenizer, source) {
                    Ok((ids, text)) => Some(CloudRendering { text, ids }),
                    Err(error) => {
                        tracing::warn!(%error, "render the prompt with the cloud model's template");
                        None
                    }
                }
            });
            Ok(RoutedPrompt { edge_tokens, cloud })
        })
        .await;
        match joined {
            Ok(prepared) => prepared.map_err(generate::prompt_error),
            Err(error) => {
                tracing::error!(%error, "prompt task");
                Err(ApiError::internal())
            }
        }
    }

    /// The prompt tokens admitted: the larger of the two models' counts.
    pub(super) fn admitted_tokens(&self) -> usize {
        let cloud_tokens = self.cloud.as_ref().map_or(0, |cloud| cloud.ids.len());
        self.edge_tokens.len().max(cloud_tokens)
    }

    /// The prompt's tokens as the cloud model's own template and tokenizer make them, where
    /// that tokenizer is loaded.
    pub(in crate::api) fn cloud_ids(&self) -> Option<&[i32]> {
        self.cloud.as_ref().map(|cloud| cloud.ids.as_slice())
    }
}

/// An edge generation. Dropped while it runs (the request failed, or the
/// driver stopped), it is cancelled.
pub(super) struct EdgeRun {
    updates: mpsc::Receiver<Update>,
    cell: Arc<dyn Cell>,
    request: RequestId,
    /// Whether the generation may still be running here (not finished,
    /// failed or stopped).
    armed: bool,
    assembler: TextAssembler,
    /// What the core metered of it, once it finished by itself.
    finished: Option<Metering>,
    /// Why it failed, once it did.
    error: Option<GenerationError>,
}

impl EdgeRun {
    pub(super) fn is_running(&self) -> bool {
        self.armed
    }

    /// The next update of the generation, as the machine's event; `None`
    /// when the core dropped it without an answer.
    pub(super) async fn next(&mut self) -> Option<Event> {
        let event = match self.updates.recv().await? {
            // Never asked for (`prompt_logprobs: false`).
            Update::PromptLogprobs(_) => return Box::pin(self.next()).await,
            Update::Token(token) => Event::EdgeToken {
                id: token.token_id,
                text: self.assembler.push(&token.piece),
                logprob: token_logprob(&token),
            },
            Update::Finished {
                reason, metering, ..
            } => {
                self.armed = false;
                self.finished = Some(metering);
                let rest = self.assembler.finish();
                Event::EdgeFinished {
                    end: match reason {
                        FinishReason::Stop => EdgeEnd::Stop,
                        FinishReason::Length => EdgeEnd::Length,
                    },
                    stop_sequence: self.assembler.stopped(),
                    rest,
                }
            }
            Update::Failed(error) => {
                self.armed = false;
                let detail = format!("{error:?}");
                self.error = Some(error);
                Event::EdgeFailed { detail }
            }
        };
        Some(event)
    }

    pub(super) fn take_error(&mut self) -> Option<GenerationError> {
        self.error.take()
    }

    /// Stops the generation if it still runs and returns what the core
    /// metered of it; `None` if it failed.
    pub(super) fn stop(&mut self) -> Option<Metering> {
        if self.armed {
            self.armed = false;
            if let Some(metering) = self.cell.cancel(self.request) {
                return Some(metering);
            }
        }
        if let Some(metering) = self.finished.take() {
            return Some(metering);
        }
        // It ended before the cancel: its metering may still be queued.
        while let Ok(update) = self.updates.try_recv() {
            if let Update::Finished { metering, .. } = update {
                return Some(metering);
            }
        }
        None
    }
}

impl Drop for EdgeRun {
    fn drop(&mut self) {
        if self.armed {
            // Nothing is booked for a request that stops this way: a client
            // that went away had the generation stopped by the machine.
            let _ = self.cell.cancel(self.request);
        }
    }
}

/// A cloud call whose upstream accepted it.
pub(super) struct CloudCall {
    pub(super) stream: UpstreamStream,
    started_ms: i64,
    /// The tool calls the cloud streams, as the client reads them.
    pub(super) calls: CloudCalls,
}

/// Turns the parts of tool calls a cloud streams into the response's deltas: each call
/// opened once its name came, numbered in the order calls open, its arguments after.
#[derive(Default)]
pub(super) struct CloudCalls {
    /// The upstream's index of each call opened, in the client's order.
    opened: Vec<usize>,
    /// Arguments of calls not opened yet, by the upstream's index.
    waiting: Vec<(usize, String)>,
}

impl CloudCalls {
    /// The deltas of `parts`; `id_stem` names calls the upstream gave no id.
    pub(super) fn read(&mut self, parts: Vec<UpstreamCall>, id_stem: &str) -> Vec<Delta> {
        let mut deltas = Vec::new();
        for part in parts {
            let mut arguments = part.arguments;
            let index = match self.opened.iter().position(|&opened| opened == part.index) {
                Some(index) => index,
                None => match part.name {
                    Some(name) => {
                        let index = self.opened.len();
                        self.opened.push(part.index);
                        let id = part.id.unwrap_or_else(|| format!("call_{id_stem}_{index}"));
                        deltas.push(Delta::Call { index, id, name });
                        if let Some(at) = self.waiting.iter().position(|(i, _)| *i == part.index) {
                            let (_, early) = self.waiting.remove(at);
                            arguments = early + &arguments;
                        }
                        index
                    }
                    None => {
                        match self.waiting.iter_mut().find(|(i, _)| *i == part.index) {
                            Some((_, early)) => early.push_str(&arguments),
                            None => self.waiting.push((part.index, arguments)),
                        }
                        continue;
                    }
                },
            };
            if !arguments.is_empty() {
                deltas.push(Delta::Arguments {
                    index,
                    text: arguments,
                });
            }
        }
        deltas
    }
}

impl Routing {
    /// Starts an edge generation of the prompt followed by `prefix` tokens:
    /// `EdgeStarted`, or `EdgeUnavailable` when the core refuses it.
    pub(super) async fn start_edge(&mut self, prefix: &[i32], max_tokens: Option<u32>) -> Event {
        self.edge = None;
        match self.submit_edge(prefix, max_tokens).await {
            Ok((run, max_tokens)) => {
                self.edge = Some(run);
                Event::EdgeStarted { max_tokens }
            }
            Err(error) => {
                let detail = error.message.clone();
                self.last_edge_refusal = Some(error);
                Event::EdgeUnavailable { detail }
            }
        }
    }

    async fn submit_edge(
        &self,
        prefix: &[i32],
        max_tokens: Option<u32>,
    ) -> Result<(EdgeRun, u32), ApiError> {
        let mut prompt = self.prompt.edge_tokens.clone();
        prompt.extend_from_slice(prefix);
        let budget = generate::completion_budget(&self.request, prompt.len())?;
        let max_tokens = max_tokens.map_or(budget, |asked| asked.min(budget));
        let seed = self
            .request
            .seed
            .unwrap_or_else(|| rand::thread_rng().gen());
        // The request was admitted (`admit`) before any of its work started.
        let admitted = self
            .state
            .cell
            .submit(NewGeneration {
                public_id: self.public_id.clone(),
                tenant: TenantRef {
                    id: self.tenant.id,
                    class: self.tenant.class,
                },
                model: self.request.model.name.clone(),
                prompt,
                committed: Vec::new(),
                numerics: None,
                sampling: self.request.vehicle_sampling(seed),
                max_tokens,
                stop: self.request.stop.clone(),
                top_logprobs: ROUTING_TOP_LOGPROBS,
                prompt_logprobs: false,
                draft: Vec::new(),
                deadline_ms: None,
            })
            .await
            .map_err(generate::rejection_error)?;
        let run = EdgeRun {
            updates: admitted.updates,
            cell: Arc::clone(&self.state.cell),
            request: admitted.request,
            armed: true,
            assembler: TextAssembler::new(self.request.stop.clone()),
            finished: None,
            error: None,
        };
        Ok((run, max_tokens))
    }

    /// Calls the cloud with the reserved slot: `CloudStarted`, or
    /// `CloudFailed` when the upstream did not accept the call.
    pub(super) async fn start_cloud(
        &mut self,
        prompt: CloudPrompt,
        max_tokens: u32,
    ) -> Flow<Event> {
        let Some(permit) = self.cloud_slot.take() else {
            tracing::error!(request_id = %self.public_id, "a cloud call without a reserved slot");
            return Err(Stop::Failed(ApiError::internal()));
        };
        let prompt = match prompt {
            CloudPrompt::Whole => self.cloud_prompt(),
            CloudPrompt::Continue { sent } => match self.handoff_prompt(&sent) {
                Some(prompt) => prompt,
                None => return Err(Stop::Failed(ApiError::internal())),
            },
        };
        let request = self.upstream_request(prompt, max_tokens);
        let started_ms = crate::core::now_ms().0;
        match self.cloud.upstream.start(&request, permit).await {
            Ok(stream) => {
                self.cloud_call = Some(CloudCall {
                    stream,
                    started_ms,
                    calls: CloudCalls::default(),
                });
                Ok(Event::CloudStarted)
            }
            Err(error) => Ok(self.cloud_failed(error)),
        }
    }

    pub(super) fn cloud_failed(&mut self, error: UpstreamError) -> Event {
        self.cloud_call = None;
        let event = Event::CloudFailed {
            detail: error.to_string(),
            fleet_could_serve: error.edge_could_serve(),
        };
        self.last_cloud_error = Some(error);
        event
    }

    /// When the current cloud call started (now, if there is none).
    pub(super) fn cloud_started_ms(&mut self) -> i64 {
        self.cloud_call
            .take()
            .map_or_else(|| crate::core::now_ms().0, |call| call.started_ms)
    }

    pub(super) fn request_max_tokens(&self) -> u32 {
        self.request
            .max_tokens
            .unwrap_or(limits::COMPLETION_TOKENS_DEFAULT)
    }

    pub(super) fn upstream_request(
        &self,
        prompt: UpstreamPrompt,
        max_tokens: u32,
    ) -> UpstreamRequest {
        UpstreamRequest {
            prompt,
            max_tokens,
            seed: self.request.seed,
            stop: self.request.stop.clone(),
            sampling: self.request.sampling.clone(),
            response_format: self.request.response_format.clone(),
            tools: self.request.tools.as_deref().map(Tools::upstream),
            scores: None,
            prediction: Vec::new(),
        }
    }

    pub(super) fn cloud_prompt(&self) -> UpstreamPrompt {
        match &self.request.prompt {
            PromptSource::Chat(messages) => UpstreamPrompt::Chat(
                messages
                    .iter()
                    .map(|message| json!({"role": message.role, "content": message.content}))
                    .collect(),
            ),
            PromptSource::Conversation { messages, .. } => {
                UpstreamPrompt::Chat(messages.iter().map(ToolMessage::openai).collect())
            }
            PromptSource::Text(text) => UpstreamPrompt::Text(text.clone()),
            // Refused before routing (`route::serve`): token ids are one model's.
            PromptSource::Tokens(_) => {
                tracing::error!(request_id = %self.public_id, "a routed prompt of token ids");
                UpstreamPrompt::Text(String::new())
            }
        }
    }

    /// Whether the cloud can continue a started answer of this request. A
    /// structured answer cannot be continued as plain text: the cloud
    /// answers it afresh instead.
    pub(super) fn can_hand_off(&self) -> bool {
        if self.request.grammar.is_some() {
            return false;
        }
        match &self.request.prompt {
            PromptSource::Chat(_) => self.prompt.cloud.is_some(),
            PromptSource::Conversation { .. } | PromptSource::Tokens(_) => false,
            PromptSource::Text(_) => true,
        }
    }

    /// The prompt that makes the cloud model continue `sent`: the chat as
    /// its own template rendered it, with the assistant turn open, then the
    /// answer so far.
    fn handoff_prompt(&self, sent: &str) -> Option<UpstreamPrompt> {
        let opened = match &self.request.prompt {
            PromptSource::Text(text) => text,
            PromptSource::Tokens(_) => return None,
            PromptSource::Chat(_) | PromptSource::Conversation { .. } => match &self.prompt.cloud {
                Some(rendered) => &rendered.text,
                None => {
                    tracing::error!(request_id = %self.public_id, "a handoff without the cloud's rendering of the chat");
                    return None;
                }
            },
        };
        Some(UpstreamPrompt::Text(format!("{opened}{sent}")))
    }

    /// What the pre-route reads: the last user message of a chat, or the prompt.
    pub(super) fn router_prompt(&self) -> String {
        match &self.request.prompt {
            PromptSource::Text(text) => text.clone(),
            PromptSource::Tokens(_) => String::new(),
            PromptSource::Chat(messages) => last_user(
                messages
                    .iter()
                    .map(|message| (message.role.as_str(), Some(message.content.as_str()))),
            ),
            PromptSource::Conversation { messages, .. } => last_user(
                messages
                    .iter()
                    .map(|message| (message.role.as_str(), message.content.as_deref())),
            ),
        }
    }
}

/// The text of the last user message of `(role, content)`s, else of the last message.
fn last_user<'a>(messages: impl DoubleEndedIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let messages: Vec<_> = messages.collect();
    messages
        .iter()
        .rev()
        .find(|(role, _)| *role == "user")
        .or(messages.last())
        .and_then(|(_, content)| *content)
        .unwrap_or_default()
        .to_string()
}

fn token_logprob(token: &CommittedToken) -> TokenLogprob {
    let alternatives = token
        .top_logprobs
        .iter()
        .filter(|(id, _, _)| *id != token.token_id)
        .map(|(_, _, logprob)| *logprob);
    TokenLogprob::new(token.logprob, alternatives.collect::<Vec<_>>())
}
