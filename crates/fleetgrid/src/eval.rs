//! `fleetgrid eval`: answer quality, cost and latency of the edge model, the
//! cloud model, or the router between them, on a data set with known answers.
//!
//! Against a running gateway (`--gateway URL --api-key K`), or a stack of its
//! own when none is given (a coordinator and one vehicle per model). The edge
//! and cloud tiers may be different endpoints (`--cloud-gateway`), so a real
//! provider works as the cloud. `--policy auto` runs the gateway's own routing
//! policy, `router::RouteMachine`, here between the two endpoints
//! (`--auto-via client`, the default; see [`route`]: pre-route,
//! the streamed cascade with its hold-back, escalation and handoff), or asks
//! the gateway for model `auto` (`--auto-via gateway`). `--replay` drives the
//! same machine from recorded answers without calling any model.
//!
//! Every answer a tier gives is appended to the records file (JSONL), which
//! `fleetgrid router calibrate` and the cost–quality curve read.

// The route driver and its tiers are parts of `eval`, kept in files of their
// own beside the others.
#[path = "eval_exact.rs"]
mod exact;
#[path = "eval_likelihood.rs"]
mod likelihood;
#[path = "eval_route.rs"]
mod route;
#[path = "eval_tiers.rs"]
mod route_tiers;

use std::path::PathBuf;

use anyhow::{bail, Context};
use router::{Router, RouterConfig};

use crate::eval_client::{Client, Endpoint};
use crate::eval_data::{Dataset, Half, Item};
use crate::eval_records::{self, Record, Tier};
use crate::eval_report::{self, ItemResult, Served};
use crate::eval_stack::EvalStack;
use route::{RouteItem, RouteTiers, Routed};
use route_tiers::{LiveTiers, ReplayTiers, Templates};

/// The model name that asks the gateway to route.
const AUTO_MODEL: &str = "auto";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Every item on the edge model.
    Edge,
    /// Every item on the cloud model.
    Cloud,
    /// The router decides per item.
    Auto,
    /// The exact speculative cascade (`auto` with `quality: "exact"`) against cloud-only, on
    /// a gateway whose cloud shares the fleet model's vocabulary (`--gateway`).
    Exact,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Edge => "edge",
            Policy::Cloud => "cloud",
            Policy::Auto => "auto",
            Policy::Exact => "exact",
        }
    }
}

/// How an answer is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scoring {
    /// The model writes its answer, which the item's grader reads.
    Generate,
    /// Multiple-choice options ranked by their log-likelihood (edge or cloud policy).
    Loglikelihood,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AutoVia {
    /// This command runs the gateway's routing machine between the two endpoints.
    Client,
    /// The gateway routes requests for model `auto`.
    Gateway,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The data set: CommonsenseQA, GSM8K or generic JSONL (see data/eval/README.md).
    #[arg(long)]
    dataset: PathBuf,
    #[arg(long, value_enum)]
    policy: Policy,
    /// How answers are judged: the written answer, or multiple-choice options by likelihood.
    #[arg(long, value_enum, default_value = "generate")]
    scoring: Scoring,
    /// Which half: calibrate (even items), report (odd items) or all.
    #[arg(long, value_enum, default_value = "report")]
    half: Half,
    /// Only the first N items of the half.
    #[arg(long)]
    limit: Option<usize>,
    /// The gateway's URL (the edge tier); without it the command starts its own stack.
    #[arg(long)]
    gateway: Option<String>,
    /// API key for the gateway.
    #[arg(long, env = "FLEETGRID_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The edge model's name at the gateway.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    edge_model: String,
    /// The cloud tier's URL [default: the gateway].
    #[arg(long)]
    cloud_gateway: Option<String>,
    /// API key for the cloud tier [default: --api-key].
    #[arg(long, env = "FLEETGRID_CLOUD_API_KEY", hide_env_values = true)]
    cloud_api_key: Option<String>,
    /// The cloud model's name at the cloud tier: by default the 1.5B system-2 (an own stack
    /// fetches it, 1.1 GB, the first time); the demo's faster 0.5B is
    /// `qwen2.5-coder-0.5b-instruct`.
    #[arg(long, default_value = "qwen2.5-coder-1.5b-instruct")]
    cloud_model: String,
    /// Where `auto` is decided.
    #[arg(long, value_enum, default_value = "client")]
    auto_via: AutoVia,
    /// Router configuration (JSON, from `fleetgrid router calibrate`) [default: built-in].
    #[arg(long)]
    router_config: Option<PathBuf>,
    /// `auto` from the records file, without calling any model.
    #[arg(long)]
    replay: bool,
    /// Folder for the report, the curve and (by default) the records.
    #[arg(long, default_value = "eval-results")]
    out: PathBuf,
    /// The records file [default: OUT/records.jsonl].
    #[arg(long)]
    records: Option<PathBuf>,
    /// Where an own stack keeps its database and logs [default: $FLEETGRID_HOME/eval].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Engine threads per vehicle of an own stack.
    #[arg(long, default_value_t = 2)]
    threads_per_vehicle: u32,
    /// `--policy exact` only: sample both answers of an item at this temperature, with the
    /// item's index as the seed (the sampled cascade) [default: 0, greedy].
    #[arg(long)]
    temperature: Option<f32>,
}

/// Both tiers' endpoints, and the router.
struct Tiers {
    edge: Endpoint,
    cloud: Endpoint,
    router: Router,
    via: AutoVia,
    /// For a handoff; loaded only when this command routes.
    templates: Templates,
}

pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    let dataset = Dataset::load(&args.dataset)?;
    let items = dataset.select(args.half, args.limit);
    if items.is_empty() {
        bail!(
            "the {} of {} holds no items",
            args.half.describe(),
            dataset.name
        );
    }
    let config = load_router_config(args.router_config.as_deref())?;
    let router = Router::new(config.clone()).context("build the router")?;
    let records_path = args
        .records
        .clone()
        .unwrap_or_else(|| args.out.join("records.jsonl"));
    eprintln!(
        "fleetgrid eval: {} items of {}, {}, policy {}",
        items.len(),
        dataset.name,
        args.half.describe(),
        args.policy.as_str()
    );
    if args.policy == Policy::Exact {
        if args.gateway.is_none() || args.replay || args.scoring != Scoring::Generate {
            bail!(
                "--policy exact measures a gateway's exact cascade against its cloud model: give \
                 --gateway (e.g. `fleetgrid demo --model qwen2.5-coder-0.5b-instruct \
                 --cloud-model qwen2.5-coder-1.5b-instruct`) and no --replay or --scoring"
            );
        }
        let (tiers, _stack) = connect(&args, router).await?;
        return exact::run(
            &dataset.name,
            &items,
            &tiers.edge,
            &args.cloud_model,
            args.temperature.unwrap_or(0.0),
            &args.out,
        )
        .await;
    }
    if args.temperature.is_some() {
        bail!("--temperature is for --policy exact; the other policies answer at temperature 0");
    }
    if args.scoring == Scoring::Loglikelihood {
        if args.policy == Policy::Auto || args.replay {
            bail!("--scoring loglikelihood ranks options on one tier: use --policy edge or cloud");
        }
        let (tiers, _stack) = connect(&args, router).await?;
        let (endpoint, tier) = match args.policy {
            Policy::Edge => (&tiers.edge, "edge"),
            _ => (&tiers.cloud, "cloud"),
        };
        return likelihood::run(&dataset.name, &items, endpoint, tier, &args.out).await;
    }
    let results = if args.replay {
        if args.policy != Policy::Auto {
            bail!("--replay computes --policy auto from records; run edge and cloud for real");
        }
        replay(&dataset.name, &items, &router, &records_path).await?
    } else {
        let (mut tiers, _stack) = connect(&args, router).await?;
        if args.policy == Policy::Auto && args.auto_via == AutoVia::Client {
            tiers.templates = Templates::load(&args.edge_model, &args.cloud_model).await?;
            if tiers.templates.cloud.is_none() {
                eprintln!(
                    "fleetgrid eval: no chat template for {} in the local store: a collapsing edge \
                     answer is finished by the edge instead of handed off, as the gateway does",
                    args.cloud_model
                );
            }
        }
        evaluate(&dataset.name, &items, args.policy, &tiers, &records_path).await?
    };
    let records = eval_records::load(&records_path, &dataset.name)?;
    let subset = args
        .limit
        .map(|_| items.iter().map(|item| item.index).collect());
    eval_report::finish(eval_report::ReportInput {
        dataset: &dataset.name,
        half: args.half,
        policy: args.policy,
        replayed: args.replay,
        config: &config,
        results: &results,
        records: &records,
        subset,
        out: &args.out,
    })
}

fn load_router_config(path: Option<&std::path::Path>) -> anyhow::Result<RouterConfig> {
    let Some(path) = path else {
        return Ok(RouterConfig::default());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    RouterConfig::from_json(&text).with_context(|| format!("load {}", path.display()))
}

async fn connect(args: &EvalArgs, router: Router) -> anyhow::Result<(Tiers, Option<EvalStack>)> {
    let (gateway, api_key, stack) = match &args.gateway {
        Some(gateway) => {
            let api_key = args
                .api_key
                .clone()
                .context("--gateway needs --api-key (or FLEETGRID_API_KEY)")?;
            (gateway.clone(), api_key, None)
        }
        None => {
            let mut models = Vec::new();
            if args.policy != Policy::Cloud {
                models.push(args.edge_model.clone());
            }
            if args.policy != Policy::Edge && !models.contains(&args.cloud_model) {
                models.push(args.cloud_model.clone());
            }
            let data_dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| crate::home::root().join("eval"));
            eprintln!("fleetgrid eval: starting a stack serving {models:?}");
            let stack = EvalStack::start(&models, &data_dir, args.threads_per_vehicle).await?;
            let gateway = format!("http://{}", stack.http);
            let key = stack.api_key.clone();
            (gateway, key, Some(stack))
        }
    };
    let cloud_url = args
        .cloud_gateway
        .clone()
        .unwrap_or_else(|| gateway.clone());
    let cloud_key = args
        .cloud_api_key
        .clone()
        .unwrap_or_else(|| api_key.clone());
    let tiers = Tiers {
        edge: Endpoint::new(&gateway, &api_key, &args.edge_model),
        cloud: Endpoint::new(&cloud_url, &cloud_key, &args.cloud_model),
        router,
        via: args.auto_via,
        templates: Templates::default(),
    };
    Ok((tiers, stack))
}

async fn evaluate(
    dataset: &str,
    items: &[Item],
    policy: Policy,
    tiers: &Tiers,
    records_path: &std::path::Path,
) -> anyhow::Result<Vec<ItemResult>> {
    let client = Client::new()?;
    let mut results = Vec::with_capacity(items.len());
    for (number, item) in items.iter().enumerate() {
        let (result, records) = match policy {
            Policy::Edge => run_tier(&client, dataset, item, Tier::Edge, tiers).await,
            Policy::Cloud => run_tier(&client, dataset, item, Tier::Cloud, tiers).await,
            Policy::Auto if tiers.via == AutoVia::Gateway => {
                run_gateway_auto(&client, item, tiers).await
            }
            Policy::Auto => run_auto(&client, dataset, item, tiers).await,
            Policy::Exact => bail!("--policy exact runs on its own path"),
        }
        .with_context(|| format!("item {} ({})", item.index, item.id))?;
        eval_records::append(records_path, &records)?;
        eprintln!(
            "  [{}/{}] item {:>3} {:<11} {} {:>6} ms  {}",
            number + 1,
            items.len(),
            item.index,
            result.served.as_str(),
            if result.correct { "✓" } else { "✗" },
            result.latency_ms,
            result.reason
        );
        results.push(result);
    }
    Ok(results)
}

async fn run_tier(
    client: &Client,
    dataset: &str,
    item: &Item,
    tier: Tier,
    tiers: &Tiers,
) -> anyhow::Result<(ItemResult, Vec<Record>)> {
    let endpoint = match tier {
        Tier::Edge => &tiers.edge,
        _ => &tiers.cloud,
    };
    // Log-probabilities from the edge model are the router's input; the
    // cloud's are not needed, and not every provider returns them.
    let completion = client
        .complete(endpoint, &item.prompt, item.max_tokens, tier == Tier::Edge)
        .await?;
    let answer = route_tiers::record(dataset, item, tier, &endpoint.model, &completion);
    let prices = &tiers.router.config().prices;
    let (price, served) = match tier {
        Tier::Edge => (prices.edge, Served::Edge),
        _ => (prices.cloud, Served::Cloud),
    };
    let result = ItemResult {
        index: item.index,
        served,
        correct: answer.correct,
        cost: price.cost(answer.prompt_tokens, answer.completion_tokens),
        latency_ms: answer.latency_ms,
        router_us: None,
        reason: format!("{} tier", tier_name(tier)),
    };
    Ok((result, vec![answer]))
}

fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Edge => "edge",
        _ => "cloud",
    }
}

/// The gateway's policy run here, between the two endpoints.
async fn run_auto(
    client: &Client,
    dataset: &str,
    item: &Item,
    tiers: &Tiers,
) -> anyhow::Result<(ItemResult, Vec<Record>)> {
    let mut live = LiveTiers {
        client,
        dataset,
        item,
        edge: &tiers.edge,
        cloud: &tiers.cloud,
        templates: &tiers.templates,
        records: Vec::new(),
    };
    let can_hand_off = tiers.templates.cloud.is_some();
    let routed = route_item(
        &tiers.router,
        item,
        &tiers.cloud.model,
        can_hand_off,
        &mut live,
    )
    .await?;
    Ok((item_result(item, &routed), live.records))
}

async fn route_item<T: RouteTiers>(
    router: &Router,
    item: &Item,
    cloud_model: &str,
    can_hand_off: bool,
    tiers: &mut T,
) -> anyhow::Result<Routed> {
    let route_item = RouteItem {
        prompt: &item.prompt,
        max_tokens: item.max_tokens,
        can_hand_off,
        cloud_model,
    };
    route::route(router, &route_item, tiers).await
}

fn item_result(item: &Item, routed: &Routed) -> ItemResult {
    let router_ms = u64::try_from(routed.router_time.as_millis()).unwrap_or(u64::MAX);
    ItemResult {
        index: item.index,
        served: routed.served(),
        correct: item.grader.grade(&routed.text).correct,
        cost: routed.cost,
        latency_ms: routed.latency_ms.saturating_add(router_ms),
        router_us: Some(routed.router_time.as_secs_f64() * 1e6),
        reason: routed.reason(),
    }
}

/// The gateway routes: model `auto`.
async fn run_gateway_auto(
    client: &Client,
    item: &Item,
    tiers: &Tiers,
) -> anyhow::Result<(ItemResult, Vec<Record>)> {
    let endpoint = Endpoint {
        model: AUTO_MODEL.to_string(),
        ..tiers.edge.clone()
    };
    let completion = client
        .complete(&endpoint, &item.prompt, item.max_tokens, false)
        .await?;
    let prices = &tiers.router.config().prices;
    let tier = completion.tier.clone().unwrap_or_default();
    let served = match tier.as_str() {
        "fleet" => Served::Edge,
        "cloud" if completion.edge_usage.is_some() => Served::Escalated,
        "cloud" => Served::Cloud,
        _ => Served::Handoff,
    };
    let (edge_usage, cloud_usage) = match (completion.edge_usage, completion.cloud_usage) {
        (None, None) if served == Served::Edge => (
            Some((completion.prompt_tokens, completion.completion_tokens)),
            None,
        ),
        (None, None) => (
            None,
            Some((completion.prompt_tokens, completion.completion_tokens)),
        ),
        usages => usages,
    };
    let cost = edge_usage
        .map(|(prompt, completion)| prices.edge.cost(prompt, completion))
        .unwrap_or_default()
        .saturating_add(
            cloud_usage
                .map(|(prompt, completion)| prices.cloud.cost(prompt, completion))
                .unwrap_or_default(),
        );
    let result = ItemResult {
        index: item.index,
        served,
        correct: item.grader.grade(&completion.text).correct,
        cost,
        latency_ms: completion.latency_ms,
        router_us: None,
        reason: completion.route_reason.unwrap_or(tier),
    };
    Ok((result, Vec::new()))
}

/// `auto` from recorded answers: the same machine fed the recorded tokens
/// and answers (temperature 0 answers do not change), no model calls. A
/// handoff is replayed only where a live run recorded the cloud's
/// continuation of the same text; the cloud's template is taken to exist.
async fn replay(
    dataset: &str,
    items: &[Item],
    router: &Router,
    records_path: &std::path::Path,
) -> anyhow::Result<Vec<ItemResult>> {
    let records = eval_records::load(records_path, dataset)?;
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let mut tiers = ReplayTiers {
            records: records.get(&item.index),
            index: item.index,
            path: records_path,
        };
        let cloud_model = tiers
            .records
            .and_then(|records| records.cloud.as_ref())
            .map_or("cloud", |record| record.model.as_str())
            .to_string();
        let routed = route_item(router, item, &cloud_model, true, &mut tiers).await?;
        results.push(item_result(item, &routed));
    }
    Ok(results)
}
