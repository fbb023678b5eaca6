//! `auto` with `quality: "exact"`: speculative decoding with the draft model on a vehicle and
//! the target in the cloud. The fleet drafts the whole answer, then the cloud checks it and
//! the client gets the cloud model's own answer: at temperature 0 token for token what
//! `cloud/<model>` gives; sampled, what it gives with the same seed, so the cloud's own
//! distribution. The draft decides only how much the cloud decodes. There are two ways to ask
//! the cloud:
//!
//! - **One call, the draft as the `prediction`** (token ids): for an upstream that follows a
//!   prediction exactly (`CloudConfig::follows_predictions`, as `fleetgrid cloud serve` does),
//!   and for every sampled request. The cloud's engine prefills prompt and draft, takes each
//!   draft token while it is its own pick there (greedy: the top token; sampled: its draw,
//!   keyed by seed and position), then its own pick, and decodes on
//!   (`engine::Generation::draft`). The draft is sampled on the vehicle with the same seed, so
//!   where the two models' distributions are close, their keyed draws agree. An upstream that
//!   ignores the prediction still gives the same answer, only without the saving.
//! - **Check, then continue** (greedy, any upstream with `echo` and token-id `logprobs`): the
//!   cloud scores prompt and draft in one prefill (`/completions` with the prompt as token
//!   ids, `echo`, `logprobs: 1`), `router::exact` keeps the longest prefix it agrees with and
//!   the cloud's own token where they part, and a second call continues from there.
//!
//! Only a same-vocabulary pair can do this (the cloud checks the fleet's token ids), so the
//! request is refused before it gets here unless the cloud model's tokenizer is loaded and
//! names every token as the fleet model's does (`CloudTier::shares_vocabulary`).
//!
//! Nothing reaches the client before the cloud has checked the draft, and all text is
//! assembled here from token ids (the answer's bytes, stop sequences held back and cut across
//! the draft and the continuation alike).
//!
//! Money: admitted like any `auto` request; the fleet's attempt is booked for the draft
//! tokens the answer kept (the vehicle's owner earns their share; the rest of the draft is
//! reimbursed as discarded work), then the cloud's part with the upstream's counts of both
//! calls: its prefills are the platform's cost at the upstream's price, its generated tokens
//! the tenant's at the cloud price. In the one call, the kept draft tokens count as prefilled
//! (with the rest of the draft), not generated.

use engine::TextAssembler;
use router::exact::{verify_greedy, DraftScores, Verdict};
use router::{CloudUsage, EdgeText, Event, RouteReason, Tier};

use super::money::{budget_spent, upstream_error};
use super::{len_u32, Flow, Routing, Stop};
use crate::api::error::ApiError;
use crate::api::respond::{self, Ending, Event as Reply, Followed};
use crate::api::route::{AnswerTokens, RouteSummary, Target};
use crate::cloud::upstream::{UpstreamPrompt, UpstreamScores, UpstreamStream, UpstreamToken};
use crate::cloud::UpstreamError;

/// The fleet's draft: its tokens.
#[derive(Default)]
struct Draft {
    tokens: Vec<i32>,
    /// The generation failed part-way: what it drafted is used, but a failed generation has
    /// no metering to book, so nothing of it is served.
    failed: bool,
}

/// The answer as it is built and sent: its tokens, its text and the cloud's counts.
struct Answer {
    assembler: TextAssembler,
    tokens: u32,
    max_tokens: u32,
    /// Whether the answer ended: an end-of-generation token or a stop sequence.
    stopped: bool,
    /// The cloud's counts of the calls that reported them.
    cloud: CloudUsage,
    /// The call running now: the prompt it was sent and the answer tokens it made, counted
    /// here in case it is cut before it reports its own counts.
    running: Option<CloudUsage>,
    cloud_started_ms: i64,
}

impl Answer {
    fn full(&self) -> bool {
        self.tokens >= self.max_tokens
    }

    fn finish_reason(&self) -> &'static str {
        if self.stopped || !self.full() {
            "stop"
        } else {
            "length"
        }
    }

    fn count(&mut self, usage: Option<crate::cloud::upstream::UpstreamUsage>) {
        if let Some(usage) = usage {
            self.cloud.prompt_tokens += usage.prompt_tokens;
            self.cloud.completion_tokens += usage.completion_tokens;
            self.running = None;
        }
    }

    /// The cloud's work so far, a call cut short counted by the gateway.
    fn cloud_so_far(&self) -> CloudUsage {
        let running = self.running.unwrap_or_default();
        CloudUsage {
            prompt_tokens: self.cloud.prompt_tokens + running.prompt_tokens,
            completion_tokens: self.cloud.completion_tokens + running.completion_tokens,
        }
    }
}

impl Routing {
    /// Runs an exact cascade from admission to the settled end.
    pub(super) async fn drive_exact(&mut self) -> Result<(), ApiError> {
        let deadline = self.deadline;
        let mut answer = Answer {
            assembler: TextAssembler::new(self.request.stop.clone()),
            tokens: 0,
            max_tokens: self.request_max_tokens(),
            stopped: false,
            cloud: CloudUsage::default(),
            running: None,
            cloud_started_ms: crate::core::now_ms().0,
        };
        match tokio::time::timeout_at(deadline, self.exact(&mut answer)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Stop::Failed(error))) => Err(error),
            Ok(Err(Stop::ClientGone)) => {
                // Settled like a cancelled request: the draft generation for all it made, the
                // cloud for what it processed.
                if self.edge.is_some() {
                    let _ = self.stop_edge(EdgeText::Served).await;
                }
                let cloud = answer.cloud_so_far();
                if cloud != CloudUsage::default() && self.booking.is_some() {
                    self.cut_cloud = self.book_cloud(cloud, answer.cloud_started_ms).ok();
                }
                self.settle_cancelled().await;
                Ok(())
            }
            Err(_) => Err(respond::request_timed_out()),
        }
    }

    async fn exact(&mut self, answer: &mut Answer) -> Flow<()> {
        self.admit(Target::Auto).await.map_err(Stop::Failed)?;
        if let router::Budget::Spent { .. } = self.check_budget().await? {
            let error = self
                .last_budget
                .as_ref()
                .map_or_else(ApiError::internal, budget_spent);
            return Err(Stop::Failed(error));
        }
        let Some(prompt) = self.prompt.cloud_ids().map(<[i32]>::to_vec) else {
            tracing::error!(request_id = %self.public_id, "an exact cascade without the cloud's prompt tokens");
            return Err(Stop::Failed(ApiError::internal()));
        };
        let draft = self.draft(answer.max_tokens).await?;
        answer.cloud_started_ms = crate::core::now_ms().0;
        if self.request.sampling.temperature != 0.0
            || self.cloud.upstream.config().follows_predictions
        {
            return self.exact_predicted(prompt, &draft, answer).await;
        }
        let verdict = if draft.tokens.is_empty() {
            Verdict {
                accepted: 0,
                next: None,
                ends: false,
            }
        } else {
            self.verify(&prompt, &draft, answer).await?
        };
        let accepted = u32::try_from(verdict.accepted).unwrap_or(u32::MAX);
        self.book_draft(accepted, &draft).await?;
        let reason = self.start_exact(accepted, &draft).await?;
        let kept = verdict.tokens(&draft.tokens);
        self.send_tokens(&kept, answer).await?;
        answer.stopped |= verdict.ends;
        if !answer.stopped && !answer.full() {
            let mut continued = prompt;
            continued.extend_from_slice(&kept);
            self.continue_in_cloud(continued, answer).await?;
        }
        self.finish_exact(answer, accepted, len_u32(&draft.tokens), reason)
            .await
    }

    /// Books the fleet's part: the draft tokens the answer keeps are served, the rest
    /// discarded.
    async fn book_draft(&mut self, accepted: u32, draft: &Draft) -> Flow<()> {
        let edge_text = if accepted > 0 && !draft.failed {
            EdgeText::PartlyServed {
                released_tokens: accepted,
            }
        } else {
            EdgeText::Discarded
        };
        self.stop_edge(edge_text).await
    }

    /// Starts the answer, saying how much of the draft it keeps.
    async fn start_exact(&mut self, accepted: u32, draft: &Draft) -> Flow<RouteReason> {
        let reason = RouteReason::new(
            router::machine::reason::EXACT_CASCADE,
            format!(
                "the cloud model's own answer; it kept {accepted} of the fleet's {} draft tokens",
                draft.tokens.len()
            ),
        );
        let model = self.cloud.upstream.config().public_name();
        self.emit(Reply::Start {
            tier: Tier::Cloud,
            reason: reason.clone(),
            model,
        })
        .await?;
        Ok(reason)
    }

    /// The cascade in one cloud call, the draft as its prediction. Its tokens are
    /// the answer; they are held back until the answer parts from the draft, passes its end or
    /// ends, when the draft's kept share is known, then sent as they come. At the end the
    /// fleet is booked for the kept tokens the answer holds (a stop sequence may end it inside
    /// them), and the cloud for what it did: it prefilled the prompt and the whole draft, and
    /// decoded the answer's tokens after the kept ones.
    async fn exact_predicted(
        &mut self,
        prompt: Vec<i32>,
        draft: &Draft,
        answer: &mut Answer,
    ) -> Flow<()> {
        let scores = UpstreamScores {
            echo: false,
            top_logprobs: 0,
        };
        let mut stream = self
            .exact_call(
                prompt,
                answer.max_tokens,
                scores,
                draft.tokens.clone(),
                answer,
            )
            .await?;
        let mut followed = Followed::new(draft.tokens.clone());
        let mut held: Option<Vec<i32>> = Some(Vec::new());
        let mut reason = None;
        while let Some(event) = self.next_exact(&mut stream).await? {
            let ids: Vec<i32> = event.tokens.iter().map(|token| token.id).collect();
            if let Some(running) = answer.running.as_mut() {
                running.completion_tokens += len_u32(&ids);
            }
            answer.count(event.usage);
            for &id in &ids {
                followed.push(id);
            }
            match held.as_mut() {
                Some(held) => held.extend_from_slice(&ids),
                None => self.send_tokens(&ids, answer).await?,
            }
            if held.is_some() && followed.settled() {
                reason = Some(self.start_exact(followed.taken(), draft).await?);
                let tokens = held.take().unwrap_or_default();
                self.send_tokens(&tokens, answer).await?;
            }
            if answer.stopped || answer.full() {
                // Dropping the stream stops the cloud's generation.
                break;
            }
        }
        let reason = match (reason, held) {
            (Some(reason), _) => reason,
            (None, held) => {
                let reason = self.start_exact(followed.taken(), draft).await?;
                self.send_tokens(&held.unwrap_or_default(), answer).await?;
                reason
            }
        };
        let accepted = followed.taken().min(answer.tokens);
        self.book_draft(accepted, draft).await?;
        // The kept draft tokens were prefilled, not generated: the cloud's prompt has the whole
        // draft, its generated tokens are the answer's after the kept ones.
        let cloud = answer.cloud_so_far();
        answer.cloud = CloudUsage {
            prompt_tokens: cloud.prompt_tokens + len_u32(&draft.tokens),
            completion_tokens: cloud.completion_tokens.saturating_sub(accepted),
        };
        answer.running = None;
        self.finish_exact(answer, accepted, len_u32(&draft.tokens), reason)
            .await
    }

    /// Generates the draft on the fleet; no vehicle, or a failed one, leaves what was drafted
    /// (nothing, at worst, and the cloud answers alone).
    async fn draft(&mut self, max_tokens: u32) -> Flow<Draft> {
        let mut draft = Draft::default();
        if let Event::EdgeUnavailable { detail } = self.start_edge(&[], Some(max_tokens)).await {
            tracing::info!(request_id = %self.public_id, %detail, "no draft for an exact cascade");
            return Ok(draft);
        }
        let out = &self.out;
        while let Some(edge) = self.edge.as_mut().filter(|edge| edge.is_running()) {
            let event = tokio::select! {
                () = out.closed() => return Err(Stop::ClientGone),
                event = edge.next() => event,
            };
            match event {
                Some(Event::EdgeToken { id, .. }) => draft.tokens.push(id),
                Some(Event::EdgeFinished { .. }) => {}
                Some(Event::EdgeFailed { detail }) => {
                    tracing::info!(request_id = %self.public_id, %detail, "an exact cascade's draft failed");
                    draft.failed = true;
                }
                _ => break,
            }
        }
        Ok(draft)
    }

    /// Has the cloud score the prompt and `draft` in one prefill, and says what it keeps.
    async fn verify(
        &mut self,
        prompt: &[i32],
        draft: &Draft,
        answer: &mut Answer,
    ) -> Flow<Verdict> {
        let mut scored = prompt.to_vec();
        scored.extend_from_slice(&draft.tokens);
        let scores = UpstreamScores {
            echo: true,
            top_logprobs: 1,
        };
        let mut stream = self
            .exact_call(scored, 1, scores, Vec::new(), answer)
            .await?;
        let mut tokens: Vec<UpstreamToken> = Vec::new();
        let mut finish_reason = None;
        while let Some(event) = self.next_exact(&mut stream).await? {
            tokens.extend(event.tokens);
            finish_reason = event.finish_reason.or(finish_reason);
            answer.count(event.usage);
        }
        let echoed = prompt.len() + draft.tokens.len();
        let protocol = |what: String| Stop::Failed(upstream_error(&UpstreamError::Protocol(what)));
        if tokens.len() < echoed
            || tokens[..prompt.len()]
                .iter()
                .zip(prompt)
                .any(|(token, id)| token.id != *id)
        {
            return Err(protocol(format!(
                "the cloud echoed {} tokens that are not the {echoed} of the prompt and draft",
                tokens.len()
            )));
        }
        let choices = tokens[prompt.len()..echoed]
            .iter()
            .map(|token| token.top.first().map(|(id, _)| *id))
            .collect();
        let after = tokens.get(echoed).map(|token| token.id);
        let scores = DraftScores {
            choices,
            after,
            ended: after.is_none() && finish_reason.as_deref() == Some("stop"),
        };
        let tokenizer = &self.request.model.tokenizer;
        Ok(verify_greedy(&draft.tokens, &scores, |token| {
            tokenizer.is_end_of_generation(token)
        }))
    }

    /// The cloud continues the answer from `prompt` (the cloud's prompt and the answer so
    /// far), its tokens sent as they come.
    async fn continue_in_cloud(&mut self, prompt: Vec<i32>, answer: &mut Answer) -> Flow<()> {
        let left = answer.max_tokens - answer.tokens;
        let scores = UpstreamScores {
            echo: false,
            top_logprobs: 0,
        };
        let mut stream = self
            .exact_call(prompt, left, scores, Vec::new(), answer)
            .await?;
        while let Some(event) = self.next_exact(&mut stream).await? {
            let ids: Vec<i32> = event.tokens.iter().map(|token| token.id).collect();
            if let Some(running) = answer.running.as_mut() {
                running.completion_tokens += len_u32(&ids);
            }
            answer.count(event.usage);
            self.send_tokens(&ids, answer).await?;
            if answer.stopped || answer.full() {
                // Dropping the stream stops the cloud's generation.
                break;
            }
        }
        Ok(())
    }

    /// Sends the text of answer tokens, up to a stop sequence or `max_tokens`.
    async fn send_tokens(&mut self, tokens: &[i32], answer: &mut Answer) -> Flow<()> {
        let tokenizer = &self.request.model.tokenizer;
        let mut text = String::new();
        for &token in tokens {
            if answer.stopped || answer.full() {
                break;
            }
            if tokenizer.is_end_of_generation(token) {
                answer.stopped = true;
                break;
            }
            answer.tokens += 1;
            text.push_str(&answer.assembler.push(&tokenizer.piece(token)));
            answer.stopped |= answer.assembler.stopped();
        }
        if text.is_empty() {
            return Ok(());
        }
        self.emit(Reply::Text { text, token: None }).await
    }

    /// One upstream call of the cascade, with a slot of its own; `prediction` is the draft
    /// offered to the cloud in the one-call cascade (empty for none).
    async fn exact_call(
        &mut self,
        prompt: Vec<i32>,
        max_tokens: u32,
        scores: UpstreamScores,
        prediction: Vec<i32>,
        answer: &mut Answer,
    ) -> Flow<UpstreamStream> {
        answer.running = Some(CloudUsage {
            prompt_tokens: len_u32(&prompt),
            completion_tokens: 0,
        });
        let failed = |error: UpstreamError| Stop::Failed(upstream_error(&error));
        let permit = self
            .cloud
            .upstream
            .try_permit()
            .ok_or_else(|| failed(UpstreamError::Busy))?;
        let mut request = self.upstream_request(UpstreamPrompt::Tokens(prompt), max_tokens);
        // The prompt and draft are the cloud's tokens: stop sequences are cut here, across both.
        request.stop = Vec::new();
        request.scores = Some(scores);
        request.prediction = prediction;
        self.cloud
            .upstream
            .start(&request, permit)
            .await
            .map_err(failed)
    }

    async fn next_exact(
        &mut self,
        stream: &mut UpstreamStream,
    ) -> Flow<Option<crate::cloud::UpstreamEvent>> {
        let next = tokio::select! {
            () = self.out.closed() => return Err(Stop::ClientGone),
            next = stream.next() => next,
        };
        next.map_err(|error| Stop::Failed(upstream_error(&error)))
    }

    /// Sends the text held back at the end (a stop sequence's possible start), books the
    /// cloud's part, settles and sends the end.
    async fn finish_exact(
        &mut self,
        answer: &mut Answer,
        accepted: u32,
        drafted: u32,
        reason: RouteReason,
    ) -> Flow<()> {
        let rest = answer.assembler.finish();
        if !rest.is_empty() {
            self.emit(Reply::Text {
                text: rest,
                token: None,
            })
            .await?;
        }
        let cloud = self.book_cloud(answer.cloud_so_far(), answer.cloud_started_ms)?;
        let charged = self.settle().await?;
        self.record_cloud(cloud).await;
        let summary = RouteSummary {
            tier: Tier::Cloud,
            reason,
            finish_reason: answer.finish_reason(),
            edge: Some(router::EdgePart {
                prompt_tokens: len_u32(&self.prompt.edge_tokens),
                completion_tokens: accepted,
                discarded_tokens: drafted - accepted,
            }),
            cloud: Some(cloud),
            charged,
            answer_tokens: Some(AnswerTokens {
                prompt: self.prompt.cloud_ids().map_or(0, len_u32),
                completion: answer.tokens,
            }),
        };
        self.emit(Reply::Finished(Box::new(Ending::routed(summary))))
            .await
    }
}
