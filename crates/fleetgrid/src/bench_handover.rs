//! `fleetgrid bench handover`: how long a client waits for its next token
//! when the vehicle running its generation is lost.
//!
//! A coordinator and two agents (one slot each) run as child processes. Each
//! round streams a generation with a long prompt (`--context-tokens`),
//! SIGKILLs the agent running it after a few tokens, and measures from the
//! kill to the arrival at the client of the first token the other agent
//! produced (the token at the position the coordinator resumed from). The
//! killed agent is then restarted for the next round.
//!
//! The reference, measured in the same run on the same stack, is the time to
//! first token of a fresh request with the same prompt on an idle node. A
//! handover that re-prefills the prompt (`--kv-checkpoint-budget-mib 0`)
//! cannot be much faster than that; one that loads the prompt's KV cache kept
//! by the coordinator only prefills the prompt's last few tokens (which check
//! the checkpoint) and replays the committed ones, and should be a small
//! fraction of it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use stack::{AgentSpec, Coordinator, CoordinatorSpec, Fleetgrid, LogFile, Stack};

use crate::bench_cluster::client::TokenStream;
use crate::bench_cluster::stats::percentile;
use crate::home;

/// Completion tokens per round; enough to kill mid-stream and see it resume.
const MAX_TOKENS: u32 = 48;
/// Tokens the client must have seen before the agent is killed.
const TOKENS_BEFORE_KILL: usize = 6;
/// How long a stack start, an agent restart or one round may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// The sentence repeated to build the long prompt.
const FILLER: &str = "Parked cars charge at night and lend their computers to the fleet. ";

#[derive(clap::Args, Clone)]
pub struct HandoverArgs {
    /// Agents killed (one per round).
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Prompt length in tokens (at least).
    #[arg(long, default_value_t = 1000)]
    context_tokens: u32,
    /// CPU threads per agent.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// The coordinator's memory for prompt KV caches, in MiB; 0 measures handover by re-prefill.
    #[arg(long, default_value_t = coordinator::limits::KV_CHECKPOINT_BYTES_BUDGET >> 20)]
    kv_checkpoint_budget_mib: usize,
}

struct Bench {
    root: PathBuf,
    args: HandoverArgs,
    http: String,
    api_key: String,
    client: reqwest::Client,
    /// How each agent is started, in the order of the stack's agents.
    agents: Vec<AgentSpec>,
    stack: Stack,
}

pub async fn run(args: HandoverArgs) -> anyhow::Result<()> {
    if args.kills == 0 {
        bail!("--kills must be at least 1");
    }
    let mut bench = Bench::start(args).await?;
    let prompt = bench.calibrate_prompt().await?;
    let mut reference_ms = Vec::new();
    let mut handover_ms = Vec::new();
    for round in 0..bench.args.kills {
        // Each request starts differently, so that no node answers it from
        // the prompt head it kept of the one before: both the reference and
        // the handover prefill their whole prompt, as a fresh request does.
        let fresh = |label: &str| (format!("{label} {}. {}", round + 1, prompt.0), prompt.1);
        reference_ms.push(bench.fresh_first_token_ms(&fresh("Reference")).await?);
        let latency = bench.handover_round(&fresh("Handover")).await?;
        eprintln!("round {}: handover {latency:.0} ms", round + 1);
        handover_ms.push(latency);
    }
    print_report(&bench.args, &prompt.1, &handover_ms, &reference_ms);
    Ok(())
}

impl Bench {
    async fn start(args: HandoverArgs) -> anyhow::Result<Bench> {
        let exe = std::env::current_exe().context("find the fleetgrid executable")?;
        let fleetgrid = Fleetgrid::new(exe);
        let root = home::root().join("bench-handover");
        if root.exists() {
            std::fs::remove_dir_all(&root).with_context(|| format!("clear {}", root.display()))?;
        }
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let api_key = fleetgrid.cli(&["tenants", "create", "bench", "--class", "fleet"], &root)?;
        let trace = root.join("trace.json");
        std::fs::write(&trace, stack::ALWAYS_PLUGGED_IN_TRACE).context("write trace")?;
        let mut agents = Vec::new();
        for name in ["handover-1", "handover-2"] {
            agents.push(AgentSpec {
                node_id: name.to_string(),
                credential: fleetgrid.cli(&["nodes", "add", name], &root)?,
                vehicle_state: format!("sim:{}", trace.display()),
                model: args.model.clone(),
                parallel: 1,
                threads: args.threads,
                args: Vec::new(),
                // Appended: every restart of the agent keeps one log.
                log: LogFile::append(root.join(format!("{name}.log"))),
            });
        }
        let mut spec = CoordinatorSpec::new(&root, LogFile::create(root.join("coordinator.log")));
        spec.models = vec![args.model.clone()];
        spec.args = vec![
            "--kv-checkpoint-budget-mib".into(),
            args.kv_checkpoint_budget_mib.to_string().into(),
        ];
        let coordinator = Coordinator::start(&fleetgrid, &spec, STEP_TIMEOUT)
            .await
            .with_context(|| format!("start the coordinator; see {}", root.display()))?;
        let mut stack = Stack::new(fleetgrid, coordinator);
        for agent in &agents {
            stack.add_agent(agent)?;
        }
        let bench = Bench {
            root,
            args,
            http: format!("http://{}", stack.http()),
            api_key,
            client: reqwest::Client::new(),
            agents,
            stack,
        };
        bench.wait_for_nodes().await?;
        Ok(bench)
    }

    /// Waits until both agents are connected.
    async fn wait_for_nodes(&self) -> anyhow::Result<()> {
        let count = u64::try_from(self.agents.len()).context("count the agents")?;
        self.stack
            .wait_for_vehicles(count, STEP_TIMEOUT)
            .await
            .with_context(|| format!("see {}", self.root.display()))
    }

    fn body(&self, prompt: &str, max_tokens: u32) -> Value {
        json!({
            "model": self.args.model, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": true, "logprobs": true,
            "messages": [{"role": "user", "content": prompt}],
        })
    }

    /// A prompt of at least `--context-tokens` tokens, with its token count.
    async fn calibrate_prompt(&self) -> anyhow::Result<(String, u32)> {
        let target = self.args.context_tokens;
        let mut repeats = 8usize;
        for _ in 0..4 {
            let prompt = FILLER.repeat(repeats);
            let tokens = self.prompt_tokens(&prompt).await?;
            if tokens >= target {
                return Ok((prompt, tokens));
            }
            let per_repeat = f64::from(tokens) / repeats as f64;
            repeats = (f64::from(target) / per_repeat).ceil() as usize + 1;
        }
        bail!("could not build a prompt of {target} tokens")
    }

    async fn prompt_tokens(&self, prompt: &str) -> anyhow::Result<u32> {
        let mut body = self.body(prompt, 1);
        body["stream"] = json!(false);
        let answer: Value = self
            .client
            .post(format!("{}/v1/chat/completions", self.http))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        answer["usage"]["prompt_tokens"]
            .as_u64()
            .and_then(|tokens| u32::try_from(tokens).ok())
            .with_context(|| format!("no usage in {answer}"))
    }

    /// Time to the first token of a fresh request with the same prompt.
    async fn fresh_first_token_ms(&self, prompt: &(String, u32)) -> anyhow::Result<f64> {
        let sent = Instant::now();
        let mut stream = self.open_stream(&prompt.0, 1).await?;
        while stream.arrivals.is_empty() {
            if !stream.read_more().await? {
                bail!("the reference request ended without a token");
            }
        }
        while stream.read_more().await? {}
        Ok(stream.arrivals[0].0.duration_since(sent).as_secs_f64() * 1000.0)
    }

    async fn open_stream(&self, prompt: &str, max_tokens: u32) -> anyhow::Result<TokenStream> {
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.http))
            .bearer_auth(&self.api_key)
            .json(&self.body(prompt, max_tokens))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!(
                "request failed: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(TokenStream::new(response))
    }

    /// One round: stream, kill the agent running it, measure, restart it.
    async fn handover_round(&mut self, prompt: &(String, u32)) -> anyhow::Result<f64> {
        let log_before = self.coordinator_log().len();
        let mut stream = self.open_stream(&prompt.0, MAX_TOKENS).await?;
        while stream.tokens < TOKENS_BEFORE_KILL {
            if !stream.read_more().await? {
                bail!("the generation ended before {TOKENS_BEFORE_KILL} tokens");
            }
        }
        let log = self.coordinator_log();
        let running = assignments(&log[log_before..])
            .last()
            .map(|(node, _)| node.clone())
            .context("no assignment in the coordinator's log")?;
        let index = self
            .agents
            .iter()
            .position(|agent| agent.node_id == running)
            .with_context(|| format!("unknown node {running}"))?;
        let killed_at = Instant::now();
        self.stack.agent_mut(index).kill();
        let deadline = Instant::now() + STEP_TIMEOUT;
        while stream.read_more().await? {
            if Instant::now() > deadline {
                bail!("the stream did not finish after the kill");
            }
        }
        let log = self.coordinator_log();
        let resumed_from = assignments(&log[log_before..])
            .into_iter()
            .find(|(node, resume_from)| *node != running && *resume_from > 0)
            .map(|(_, resume_from)| resume_from)
            .context("the generation was not resumed on the other node")?;
        let first_new = stream
            .arrivals
            .iter()
            .find(|(_, tokens_so_far)| *tokens_so_far > resumed_from)
            .map(|(at, _)| *at)
            .context("no token after the handover reached the client")?;
        self.stack.restart_agent(index, &self.agents[index])?;
        self.wait_for_nodes().await?;
        Ok(first_new.duration_since(killed_at).as_secs_f64() * 1000.0)
    }

    fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.root.join("coordinator.log")).unwrap_or_default()
    }
}

/// `(node, resume_from)` of every assignment in a piece of the coordinator's log.
fn assignments(log: &str) -> Vec<(String, usize)> {
    log.lines()
        .filter(|line| line.contains(" assigned "))
        .filter_map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|field| field.strip_prefix(name))
                    .map(str::to_string)
            };
            Some((field("node_id=")?, field("resume_from=")?.parse().ok()?))
        })
        .collect()
}

fn print_report(args: &HandoverArgs, prompt_tokens: &u32, handover: &[f64], reference: &[f64]) {
    let summary = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        (
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.95),
            sorted[sorted.len() - 1],
        )
    };
    let (h50, h95, hmax) = summary(handover);
    let (r50, r95, rmax) = summary(reference);
    println!(
        "handover after SIGKILL: {} kills, prompt {prompt_tokens} tokens, {} threads per agent, \
         kv checkpoints {}",
        handover.len(),
        args.threads,
        if args.kv_checkpoint_budget_mib > 0 {
            "on"
        } else {
            "off (re-prefill)"
        }
    );
    println!("{:<44} {:>8} {:>8} {:>8}", "", "p50 ms", "p95 ms", "max ms");
    println!(
        "{:<44} {h50:>8.0} {h95:>8.0} {hmax:>8.0}",
        "kill -> next token at the client"
    );
    println!(
        "{:<44} {r50:>8.0} {r95:>8.0} {rmax:>8.0}",
        "reference: first token of a fresh request"
    );
    println!(
        "p95 handover / p95 fresh first token: {:.2}; target p95 <= 1000 ms: {}",
        h95 / r95,
        if h95 <= 1000.0 { "met" } else { "not met" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_are_read_from_the_coordinators_log() {
        let log = "2026-01-01T00:00:00Z  INFO coordinator::core::dispatch: assigned request_id=3 node_id=handover-1 resume_from=0\n\
                   2026-01-01T00:00:01Z  WARN coordinator::core: node gone node_id=handover-1\n\
                   2026-01-01T00:00:01Z  INFO coordinator::core::dispatch: assigned request_id=3 node_id=handover-2 resume_from=9\n";
        assert_eq!(
            assignments(log),
            vec![("handover-1".to_string(), 0), ("handover-2".to_string(), 9)]
        );
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 10.0);
        assert_eq!(percentile(&values, 0.95), 19.0);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
    }
}
