//! Helpers shared by the integration tests: a scheduler with a few tenants, node builders, and
//! a wrapper that returns each event's commands.

#![allow(dead_code)]

use scheduler::{
    Command, Event, Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, RequestId, Scheduler,
    SchedulerConfig, TenantClass, TenantConfig, TenantId, VehicleState,
};

pub const MODEL: ModelId = ModelId(1);
pub const OTHER_MODEL: ModelId = ModelId(2);
pub const FLEET: TenantId = TenantId(1);
pub const RESERVED: TenantId = TenantId(2);
pub const SPOT: TenantId = TenantId(3);
/// 2024-01-01T00:00:00Z, a Monday at midnight UTC.
pub const T0: Millis = Millis(1_704_067_200_000);
pub const MINUTE_MS: u64 = 60_000;
pub const HOUR_MS: u64 = 3_600_000;

pub fn tenant(class: TenantClass) -> TenantConfig {
    TenantConfig {
        class,
        weight: 1,
        max_concurrency: 1_000,
        tokens_per_minute: None,
        reserved_min_share_permille: 0,
    }
}

pub fn capacity(slots: u16) -> NodeCapacity {
    NodeCapacity {
        slots,
        decode_tokens_per_second: 20.0,
        prefill_tokens_per_second: 200.0,
        models: vec![MODEL],
        loaded: vec![MODEL],
        energy_price_micro_usd_per_kwh: 200_000,
        numerics: 0,
    }
}

/// Drives a scheduler and returns each event's commands.
pub struct Harness {
    pub scheduler: Scheduler,
    pub now: Millis,
}

impl Harness {
    /// A scheduler with the default config and one tenant per class.
    pub fn new() -> Self {
        Self::with_config(SchedulerConfig::default())
    }

    pub fn with_config(config: SchedulerConfig) -> Self {
        let mut harness = Harness {
            scheduler: Scheduler::new(config),
            now: T0,
        };
        harness.send(Event::TenantConfigured {
            tenant: FLEET,
            config: tenant(TenantClass::Fleet),
        });
        harness.send(Event::TenantConfigured {
            tenant: RESERVED,
            config: tenant(TenantClass::Reserved),
        });
        harness.send(Event::TenantConfigured {
            tenant: SPOT,
            config: tenant(TenantClass::Spot),
        });
        harness
    }

    pub fn send(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        self.scheduler.handle(self.now, event, &mut out);
        out
    }

    pub fn advance(&mut self, ms: u64) -> Vec<Command> {
        self.now = self.now.plus(ms);
        self.send(Event::Tick)
    }

    pub fn node(
        &mut self,
        id: u32,
        capacity: NodeCapacity,
        state: VehicleState,
        policy: OwnerPolicy,
    ) -> Vec<Command> {
        self.send(Event::NodeRegistered {
            node: NodeId(id),
            capacity,
            state,
            policy,
        })
    }

    /// A plugged-in node with default policy and `slots` slots of `MODEL`.
    pub fn plain_node(&mut self, id: u32, slots: u16) -> Vec<Command> {
        self.node(
            id,
            capacity(slots),
            VehicleState::default(),
            OwnerPolicy::default(),
        )
    }

    pub fn request(&mut self, id: u64, tenant: TenantId, max_tokens: u32) -> Vec<Command> {
        self.send(Event::RequestArrived {
            request: RequestId(id),
            tenant,
            model: MODEL,
            prompt_tokens: 10,
            max_tokens,
            deadline: None,
            prompt_heads: scheduler::PromptHeads::default(),
            resumes: None,
        })
    }
}

pub fn assign(request: u64, node: u32, resume_from: u32) -> Command {
    Command::Assign {
        request: RequestId(request),
        node: NodeId(node),
        resume_from,
    }
}
