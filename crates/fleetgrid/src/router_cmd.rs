//! `fleetgrid router`: calibrate the router's thresholds from evaluation
//! records, and show what it decides for a prompt.

use std::path::PathBuf;

use anyhow::{bail, Context};
use router::calibrate::{calibrate, cross_validate, CalibrationItem, Evidence};
use router::{Router, RouterConfig};

use crate::eval_data::{Dataset, Half};
use crate::eval_records;

#[derive(clap::Subcommand)]
pub enum RouterCommand {
    /// Choose thresholds that keep the target share of cloud-only quality at the lowest cost.
    Calibrate(CalibrateArgs),
    /// Show the pre-route decision for a prompt.
    Route(RouteArgs),
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// Data sets whose records to calibrate on (repeatable; each class gets its own policy).
    #[arg(long = "dataset", required = true)]
    datasets: Vec<PathBuf>,
    /// The share of cloud-only accuracy to keep, in (0, 1].
    #[arg(long, default_value_t = 0.95)]
    target_quality: f64,
    /// Records from `fleetgrid eval --policy edge` and `--policy cloud`.
    #[arg(long, default_value = "eval-results/records.jsonl")]
    records: PathBuf,
    /// The half to calibrate on.
    #[arg(long, value_enum, default_value = "calibrate")]
    half: Half,
    /// A configuration to start from (its prices, limits and classes without data) [default: built-in].
    #[arg(long)]
    base: Option<PathBuf>,
    /// Items of a class needed before any of its answers may stay at the edge; a class with
    /// fewer goes to the cloud, one with none keeps the base configuration's policy.
    #[arg(long, default_value_t = Evidence::DEFAULT.min_class_items)]
    min_class_items: u32,
    /// Credit the answers kept at the edge with their count, not with the lower bound of their
    /// accuracy's Wilson 95% interval.
    #[arg(long)]
    point_estimates: bool,
    /// Folds of the cross-validation reported beside the calibration (0: none).
    #[arg(long, default_value_t = 5)]
    folds: u32,
    /// Where to write the configuration.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct RouteArgs {
    /// The prompt to route.
    #[arg(long)]
    prompt: String,
    /// Router configuration [default: built-in].
    #[arg(long)]
    router_config: Option<PathBuf>,
}

pub async fn run(command: RouterCommand) -> anyhow::Result<()> {
    match command {
        RouterCommand::Calibrate(args) => run_calibrate(args),
        RouterCommand::Route(args) => {
            let config = read_config(args.router_config.as_ref())?;
            let decision = Router::new(config)?.pre_route(&args.prompt);
            println!("{}", decision.reason);
            Ok(())
        }
    }
}

fn read_config(path: Option<&PathBuf>) -> anyhow::Result<RouterConfig> {
    let Some(path) = path else {
        return Ok(RouterConfig::default());
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    RouterConfig::from_json(&text).with_context(|| format!("load {}", path.display()))
}

fn run_calibrate(args: CalibrateArgs) -> anyhow::Result<()> {
    let mut config = read_config(args.base.as_ref())?;
    let mut items: Vec<CalibrationItem> = Vec::new();
    let mut names = Vec::new();
    for path in &args.datasets {
        let dataset = Dataset::load(path)?;
        let records = eval_records::load(&args.records, &dataset.name)?;
        let (found, incomplete) =
            eval_records::calibration_items(&records, args.half, &config.prices);
        if found.is_empty() {
            bail!(
                "{} has no item of its {} with both tiers' answers in {}; run \
                 `fleetgrid eval --policy edge` and `--policy cloud` with --half {} first",
                dataset.name,
                args.half.describe(),
                args.records.display(),
                args.half.as_str()
            );
        }
        let expected = dataset.select(args.half, None).len();
        eprintln!(
            "fleetgrid router calibrate: {}: {} of {expected} items of the {} have both answers{}",
            dataset.name,
            found.len(),
            args.half.describe(),
            if incomplete > 0 {
                format!(" ({incomplete} recorded items lack one)")
            } else {
                String::new()
            }
        );
        names.push(format!("{} ({} items)", dataset.name, found.len()));
        items.extend(found);
    }
    let source = format!("{}, {}", names.join(" + "), args.half.describe());
    let evidence = Evidence {
        min_class_items: args.min_class_items,
        lower_bound: !args.point_estimates,
    };
    let mut outcome = calibrate(
        &items,
        args.target_quality,
        &config.policies,
        &source,
        evidence,
    )
    .context("calibrate")?;
    if args.folds > 0 && items.len() >= 2 {
        let checked = cross_validate(
            &items,
            args.target_quality,
            &config.policies,
            evidence,
            args.folds,
        )
        .context("cross-validate")?;
        outcome.summary.cross_validated = Some(checked);
    }
    config.policies = outcome.policies;
    config.calibration = Some(outcome.summary.clone());
    if let Some(parent) = args
        .out
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(&args.out, config.to_json())
        .with_context(|| format!("write {}", args.out.display()))?;
    let summary = &outcome.summary;
    println!(
        "calibrated on {source}; target {:.0}% of cloud-only quality",
        args.target_quality * 100.0
    );
    for class in router::TaskClass::ALL {
        let policy = match config.policies.get(class) {
            router::ClassPolicy::Edge => "edge".to_string(),
            router::ClassPolicy::Cloud => "cloud".to_string(),
            router::ClassPolicy::Cascade(rule) => {
                format!("cascade: accept if {} >= {}", rule.feature, rule.threshold)
            }
        };
        println!("  {class:<16} {policy}");
    }
    println!(
        "  routed: {}/{} correct ({:.1}% of cloud-only {}), {:.1}% at the edge, cost saving vs cloud-only {:.1}%",
        summary.routed.correct,
        summary.routed.items,
        summary.quality_vs_cloud * 100.0,
        summary.cloud_only.correct,
        summary.routed.edge_share() * 100.0,
        summary.cost_saving_vs_cloud * 100.0
    );
    if let Some(checked) = &summary.cross_validated {
        println!(
            "  held out ({}-fold): {}/{} correct ({:.1}% of cloud-only {}), {:.1}% at the edge, cost saving vs cloud-only {:.1}%",
            checked.folds,
            checked.routed.correct,
            checked.routed.items,
            checked.quality_vs_cloud * 100.0,
            checked.cloud_only.correct,
            checked.routed.edge_share() * 100.0,
            checked.cost_saving_vs_cloud * 100.0
        );
    }
    println!(
        "  evidence: {} items per class before the edge may serve it, {}",
        evidence.min_class_items,
        if evidence.lower_bound {
            "edge answers credited at their accuracy's Wilson 95% lower bound"
        } else {
            "edge answers credited at their count"
        }
    );
    println!("  wrote {}", args.out.display());
    Ok(())
}
