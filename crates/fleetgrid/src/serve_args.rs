//! The flags of the long-running server roles: `serve` (a gateway and a cell
//! in one process), `gateway` and `cell` (the two halves in a cluster). Each
//! half's flags are declared once and flattened into every role that runs it,
//! so no role accepts a flag it would ignore.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::http_limits::millis;
use crate::{cloud, home, http_limits};

/// What every server role needs: where it keeps its files and what it serves.
#[derive(clap::Args, Clone)]
pub struct CommonArgs {
    /// Where the coordinator keeps its database [default: $FLEETGRID_HOME/coordinator].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Models to serve, by catalog name or sha256 (repeatable).
    #[arg(long = "model", default_value = "smollm2-135m-instruct")]
    pub models: Vec<String>,
    /// Context window of one sequence on a node, in tokens.
    #[arg(long, default_value_t = coordinator::limits::CONTEXT_TOKENS_DEFAULT)]
    pub context_tokens: u32,
    /// Exit when the parent process goes away (used by `demo` and tests).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
    /// Prefix affinity: send a prompt to the vehicle (in a cluster, first to the cell) holding
    /// the longest head of it in its KV cache, among those placement accepts anyway.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub prefix_affinity: OnOff,
}

/// A feature switch as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The gateway's flags: the HTTP API, billing and the cloud tier.
#[derive(clap::Args, Clone)]
pub struct GatewayFlags {
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// The ledger: a SQLite file or postgres://USER@HOST/DB [default: ledger.db in the data
    /// directory; in a cluster, the cluster's database].
    #[arg(long, env = "FLEETGRID_LEDGER_URL")]
    pub ledger_url: Option<String>,
    /// The price sheet, JSON [default: the shipped sheet; see crates/ledger/prices/default.json].
    #[arg(long)]
    pub prices: Option<PathBuf>,
    /// Owners' share of the token revenue, in basis points (7000 = 70 %), overriding the sheet.
    #[arg(long)]
    pub owner_share_bps: Option<u32>,
    /// How long a billing hold in a shared (PostgreSQL) ledger counts unless this gateway renews
    /// it, in milliseconds: the holds of a gateway that dies stop counting this long after its
    /// last renewal. At least 1000.
    #[arg(long, default_value_t = millis(coordinator::billing_holds::HOLD_LEASE_DEFAULT))]
    pub hold_lease_ms: u64,
    /// How long a running request's Idempotency-Key stays this gateway's unless it renews it, in
    /// milliseconds: a retry of it through another gateway gets 409 meanwhile, and one whose
    /// gateway died runs again this long after its last renewal. At least 500.
    #[arg(long, default_value_t = millis(coordinator::billing_idempotency::IDEMPOTENCY_LEASE_DEFAULT))]
    pub idempotency_lease_ms: u64,
    /// A browser origin allowed to call the API cross-origin (CORS), such as
    /// https://app.example.com; `*` allows any (repeatable) [default: none, no CORS headers].
    #[arg(long = "cors-allow-origin", value_name = "ORIGIN")]
    pub cors_allow_origins: Vec<String>,
    /// The cloud upstream and the router (`auto`, `cloud/<model>`).
    #[command(flatten)]
    pub cloud: cloud::CloudArgs,
    /// The gateway's bounds on slow and numerous clients.
    #[command(flatten)]
    pub http_limits: http_limits::HttpLimitArgs,
}

/// The cell's flags: the agents' gRPC service, heartbeats and the scheduler.
#[derive(clap::Args, Clone)]
pub struct CellFlags {
    /// Address agents dial (gRPC).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub grpc_listen: SocketAddr,
    /// How often agents heartbeat, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// A node silent for this long is marked gone, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_timeout_ms: u64,
    /// Answers of a new owned vehicle verified by recomputation before its rate starts to fall
    /// (then max(3 %, 1/n) after n passes in a row); a large value verifies every answer.
    #[arg(long, default_value_t = trust::VerificationPolicy::default().probation)]
    pub verification_probation: u32,
    /// Slots a node gets before it has completed any generation, whatever it claims; it earns
    /// one more per completed generation, up to its claim.
    #[arg(long, default_value_t = scheduler::TrustConfig::default().unproven_slots_max)]
    pub unproven_node_slots: u16,
    /// A running generation is never moved for making no progress sooner than this, in
    /// milliseconds (its bound follows its node's measured pace between floor and ceiling).
    #[arg(long, default_value_t = scheduler::TrustConfig::default().stall_floor_ms)]
    pub stall_floor_ms: u64,
    /// A running generation with no token for this long is moved to another node, in
    /// milliseconds; also the bound for a node with no measured pace, and, with its prefill
    /// added, for a first token.
    #[arg(long, default_value_t = scheduler::TrustConfig::default().stall_ceiling_ms)]
    pub stall_ceiling_ms: u64,
    /// The slowest prefill not taken for a stall: an attempt's first token may take the ceiling
    /// plus its prompt and committed tokens at this many per second.
    #[arg(long, default_value_t = scheduler::TrustConfig::default().stall_prefill_tokens_per_second)]
    pub stall_prefill_tokens_per_second: u32,
    /// Requests that may wait per tenant class before new ones get 429.
    #[arg(long)]
    pub queue_max_per_class: Option<u32>,
    /// Memory for the prompt KV caches of long prompts, kept so that a generation handed over to
    /// another node loads its prompt instead of prefilling it again, in MiB (0: always re-prefill).
    #[arg(long, default_value_t = coordinator::limits::KV_CHECKPOINT_BYTES_BUDGET >> 20)]
    pub kv_checkpoint_budget_mib: usize,
    /// Take agents in plain gRPC, each presenting its credential in its `Hello`, instead of
    /// over mTLS. Insecure: whoever reaches the port can read sessions and replay a credential.
    /// For load generators, whose simulated vehicles share connections [default: mTLS only:
    /// each node enrols once with the token 'nodes add' prints, which carries the node
    /// authority's pin, for a certificate bound to its node id, and dials https://].
    #[arg(long)]
    pub agent_plaintext: bool,
    /// How long a node certificate is valid, in seconds (at least 10); agents renew theirs after
    /// two thirds of it.
    #[arg(long, default_value_t = cell::tls::NODE_CERTIFICATE_LIFETIME_DEFAULT.as_secs(), conflicts_with = "agent_plaintext")]
    pub node_certificate_lifetime_s: u64,
}

/// Where a cluster's shared parts are.
#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// NATS servers, comma-separated (nats://HOST:PORT,...); the client fails over among them.
    #[arg(long, env = "FLEETGRID_NATS_URL")]
    pub nats: String,
    /// The cluster's PostgreSQL database (postgres://USER@HOST/DB): tenants, keys, nodes,
    /// policies, contracts, idempotency keys, billing holds and the ledger.
    #[arg(long, env = "FLEETGRID_DATABASE_URL")]
    pub database: String,
}

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub gateway: GatewayFlags,
    #[command(flatten)]
    pub cell: CellFlags,
}

#[derive(clap::Args, Clone)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub gateway: GatewayFlags,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(clap::Args, Clone)]
pub struct CellArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub cell: CellFlags,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// This cell's name, unique in the cluster: gateways address it by it.
    #[arg(long)]
    pub cell_id: String,
    /// The address agents dial, HOST:PORT, which `fleetgrid nodes add` hands out
    /// [default: the --grpc-listen address].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Serve the cell's Prometheus metrics on http://ADDR/metrics [default: not served].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The price sheet whose vehicles' tariffs placement prefers the cheaper electricity by,
    /// JSON; give the cluster's gateways the same [default: the shipped sheet].
    #[arg(long)]
    pub prices: Option<PathBuf>,
}

impl CommonArgs {
    /// The coordinator configuration with the models resolved and every
    /// other setting at its default.
    pub fn config(&self) -> anyhow::Result<coordinator::CoordinatorConfig> {
        use anyhow::Context;
        let store = home::model_store()?;
        let mut models = Vec::new();
        for name in &self.models {
            let verified = store.resolve(name).with_context(|| {
                format!("resolve model {name:?} (fetch it with 'fleetgrid models fetch {name}')")
            })?;
            models.push(coordinator::ModelToServe {
                name: verified.name.clone(),
                path: verified.path.clone(),
                digest: verified.digest.to_string(),
            });
        }
        let mut config = coordinator::CoordinatorConfig::new(
            home::coordinator_dir(self.data_dir.clone()),
            models,
        );
        config.context_tokens = self.context_tokens;
        config.prefix_affinity = self.prefix_affinity == OnOff::On;
        Ok(config)
    }
}

impl GatewayFlags {
    /// Sets the gateway's part of `config`.
    pub fn apply(&self, config: &mut coordinator::CoordinatorConfig) -> anyhow::Result<()> {
        use anyhow::Context;
        config.http_listen = self.http_listen;
        config.billing = crate::ledger_cmd::billing_config(
            self.ledger_url.clone(),
            self.prices.as_deref(),
            self.owner_share_bps,
        )?;
        config.billing.holds.lease = Duration::from_millis(self.hold_lease_ms);
        let idempotency_lease = Duration::from_millis(self.idempotency_lease_ms);
        let lease_min = coordinator::billing_idempotency::IDEMPOTENCY_LEASE_MIN;
        if idempotency_lease < lease_min {
            anyhow::bail!(
                "--idempotency-lease-ms must be at least {}, not {}",
                lease_min.as_millis(),
                self.idempotency_lease_ms
            );
        }
        config.idempotency.lease = idempotency_lease;
        config.cors = coordinator::http_serve::Cors::allow_origins(&self.cors_allow_origins)
            .context("--cors-allow-origin")?;
        config.cloud = self.cloud.config()?;
        config.http = self.http_limits.limits()?;
        Ok(())
    }
}

impl CellFlags {
    /// Sets the cell's part of `config`.
    pub fn apply(&self, config: &mut coordinator::CoordinatorConfig) {
        config.grpc_listen = self.grpc_listen;
        config.heartbeat_interval = Duration::from_millis(self.heartbeat_interval_ms);
        config.heartbeat_timeout = Duration::from_millis(self.heartbeat_timeout_ms);
        if let Some(queue_max) = self.queue_max_per_class {
            config.scheduler.queue_max_per_class = [queue_max; 3];
        }
        if let Some(trust) = config.scheduler.trust.as_mut() {
            trust.unproven_slots_max = self.unproven_node_slots;
            trust.stall_floor_ms = self.stall_floor_ms;
            trust.stall_ceiling_ms = self.stall_ceiling_ms.max(self.stall_floor_ms);
            trust.stall_prefill_tokens_per_second = self.stall_prefill_tokens_per_second;
        }
        config.kv_checkpoint_budget_bytes = self.kv_checkpoint_budget_mib.saturating_mul(1 << 20);
        config.verification_probation = self.verification_probation;
        config.agent_tls = (!self.agent_plaintext).then(|| cell::tls::AgentTlsConfig {
            node_certificate_lifetime: Duration::from_secs(self.node_certificate_lifetime_s),
        });
    }
}

impl ClusterArgs {
    pub fn cluster(&self) -> coordinator::Cluster {
        coordinator::Cluster {
            nats: self.nats.clone(),
            database_url: self.database.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Gateway {
        #[command(flatten)]
        gateway: GatewayFlags,
    }

    fn applied(args: &[&str]) -> anyhow::Result<coordinator::CoordinatorConfig> {
        let command =
            Gateway::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
                .expect("the flags parse");
        let mut config = coordinator::CoordinatorConfig::new(PathBuf::from("data"), Vec::new());
        command.gateway.apply(&mut config)?;
        Ok(config)
    }

    #[test]
    fn the_idempotency_lease_is_the_flags_and_one_too_short_is_refused() {
        assert_eq!(
            applied(&[]).unwrap().idempotency.lease,
            coordinator::billing_idempotency::IDEMPOTENCY_LEASE_DEFAULT
        );
        assert_eq!(
            applied(&["--idempotency-lease-ms", "2500"])
                .unwrap()
                .idempotency
                .lease,
            Duration::from_millis(2_500)
        );
        let refused = applied(&["--idempotency-lease-ms", "100"]).unwrap_err();
        assert!(
            refused.to_string().contains("--idempotency-lease-ms"),
            "{refused}"
        );
    }

    #[test]
    fn cors_is_off_unless_origins_are_allowed_and_a_path_is_refused() {
        use coordinator::http_serve::Cors;
        assert_eq!(applied(&[]).unwrap().cors, Cors::Off);
        assert_eq!(
            applied(&["--cors-allow-origin", "*"]).unwrap().cors,
            Cors::AnyOrigin
        );
        let Cors::Origins(origins) = applied(&[
            "--cors-allow-origin",
            "https://app.example",
            "--cors-allow-origin",
            "http://localhost:5173",
        ])
        .unwrap()
        .cors
        else {
            panic!("two origins allowed");
        };
        assert_eq!(origins, ["https://app.example", "http://localhost:5173"]);
        let refused = applied(&["--cors-allow-origin", "https://app.example/"]).unwrap_err();
        assert!(
            format!("{refused:#}").contains("--cors-allow-origin"),
            "{refused:#}"
        );
    }
}
