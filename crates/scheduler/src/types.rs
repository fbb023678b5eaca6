//! Domain types shared by every part of the scheduler: ids, time, tenant classes, and what the
//! coordinator knows about a vehicle (its capacity, its state, its owner's policy).

/// A point in time: Unix epoch milliseconds (the one definition is in `domain`). The scheduler
/// never reads a clock; every event carries the time at which it is applied.
pub use domain::TimestampMs as Millis;

/// Vehicles, requests and tenants are named by the ids in `domain`.
pub use domain::{NodeId, RequestId, TenantId};

/// The chained hashes of a prompt's head blocks (the one definition is in `domain`).
pub use domain::PromptHeads;

/// A model, as a small id the coordinator maps to a model digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelId(pub u16);

/// Priority class of a tenant. Declaration order is priority order: `Fleet > Reserved > Spot`.
pub use domain::TenantClass;

/// A set of tenant classes (a 3-bit mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassSet(u8);

impl ClassSet {
    /// No class.
    pub const NONE: ClassSet = ClassSet(0);
    /// Every class.
    pub const ALL: ClassSet = ClassSet(0b111);

    /// The set holding only `class`.
    pub fn only(class: TenantClass) -> ClassSet {
        ClassSet(1 << class.index())
    }

    /// The set with `class` added.
    pub fn with(self, class: TenantClass) -> ClassSet {
        ClassSet(self.0 | (1 << class.index()))
    }

    /// The set with `class` removed.
    pub fn without(self, class: TenantClass) -> ClassSet {
        ClassSet(self.0 & !(1 << class.index()))
    }

    /// Whether `class` is in the set.
    pub fn contains(self, class: TenantClass) -> bool {
        self.0 & (1 << class.index()) != 0
    }

    /// The raw mask (bit i = `TenantClass::ALL[i]`).
    pub fn bits(self) -> u8 {
        self.0
    }
}

impl Default for ClassSet {
    fn default() -> Self {
        ClassSet::ALL
    }
}

/// What the vehicle reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VehicleState {
    /// Connected to a charger.
    pub plugged_in: bool,
    /// Energy is flowing in right now.
    pub charging: bool,
    /// Battery state of charge, 0..=1000.
    pub state_of_charge_permille: u16,
    /// When the owner plans to drive off, if a departure is scheduled.
    pub departure_at: Option<Millis>,
    /// AI computer temperature in tenths of a degree Celsius.
    pub chip_temperature_decicelsius: i16,
}

impl Default for VehicleState {
    /// A parked, plugged-in, full, cool car with no departure scheduled.
    fn default() -> Self {
        VehicleState {
            plugged_in: true,
            charging: false,
            state_of_charge_permille: 1000,
            departure_at: None,
            chip_temperature_decicelsius: 400,
        }
    }
}

/// The owner's limits on what the car may be used for. `Default` is the safe setting: only while
/// plugged in, any hour, no energy cap, at most 85.0 °C, stop 15 minutes before departure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerPolicy {
    /// Allow work while unplugged, as long as the battery stays above the thresholds below.
    pub allow_unplugged: bool,
    /// Unplugged: stop working when the state of charge falls to this (permille).
    pub unplugged_stop_soc_permille: u16,
    /// Unplugged: start again only once the state of charge is back at this (permille). Keeping
    /// it above the stop threshold stops the node flapping in and out of service.
    pub unplugged_resume_soc_permille: u16,
    /// Bit `i` set = work allowed during hour `i` (0..24) of the owner's local day, where local
    /// time is UTC shifted by `utc_offset_minutes`.
    pub allowed_hours_utc: u32,
    /// Offset of the owner's local time from UTC, minutes; used for allowed hours and for the
    /// day on which the energy cap resets.
    pub utc_offset_minutes: i16,
    /// Energy the compute may use per local day, watt-hours; `None` = no cap.
    pub max_energy_per_day_wh: Option<u32>,
    /// Above this chip temperature (tenths of °C) the node takes and keeps no work.
    pub max_chip_temperature_decicelsius: i16,
    /// Take no new work this long before a scheduled departure, milliseconds.
    pub stop_before_departure_ms: u64,
    /// Tenant classes whose work the owner accepts.
    pub allowed_classes: ClassSet,
}

/// Every hour of the day allowed.
pub const ALL_HOURS: u32 = (1 << 24) - 1;

impl Default for OwnerPolicy {
    fn default() -> Self {
        OwnerPolicy {
            allow_unplugged: false,
            unplugged_stop_soc_permille: 500,
            unplugged_resume_soc_permille: 600,
            allowed_hours_utc: ALL_HOURS,
            utc_offset_minutes: 0,
            max_energy_per_day_wh: None,
            max_chip_temperature_decicelsius: 850,
            stop_before_departure_ms: 15 * 60 * 1000,
            allowed_classes: ClassSet::ALL,
        }
    }
}

/// What a node can do, reported at registration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCapacity {
    /// Generations the node runs at once (continuous-batching slots).
    pub slots: u16,
    /// Decode speed of one generation, tokens per second.
    pub decode_tokens_per_second: f32,
    /// Prompt processing speed, tokens per second.
    pub prefill_tokens_per_second: f32,
    /// Models on the node's disk; it can serve only these.
    pub models: Vec<ModelId>,
    /// Models already loaded in memory (a subset of `models`); no load delay.
    pub loaded: Vec<ModelId>,
    /// The owner's electricity tariff, micro-USD per kWh.
    pub energy_price_micro_usd_per_kwh: u32,
    /// Which numbers the node computes: nodes of equal `numerics` compute the same numbers for
    /// the same sequence (the same engine, CPU kernels and attention setting), so a generation
    /// moved between them continues bit for bit. A moved generation is placed on a node of the
    /// numerics it last ran on where one is free (see `Scheduler::best_free_node`). A fleet that
    /// is all alike gives every node the same value. [`NUMERICS_UNKNOWN`] is alike to no node,
    /// itself included.
    pub numerics: u32,
}

/// The numerics of a node whose numbers cannot be told apart from others' (a driver that ran
/// out of distinct ids): no generation counts on continuing bit for bit on such a node, or from
/// one.
pub const NUMERICS_UNKNOWN: u32 = u32::MAX;

/// A generation that arrives with tokens committed elsewhere (a cell that was lost): placed
/// from the start as a move, on a node that continues it bit for bit where one is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Tokens committed before it arrived here.
    pub committed: u32,
    /// The numerics (`NodeCapacity::numerics`, in this scheduler's ids) of the node that
    /// committed the last of them; [`NUMERICS_UNKNOWN`] when no node here computes the same.
    pub numerics: u32,
}

/// A tenant's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantConfig {
    /// Priority class.
    pub class: TenantClass,
    /// Weight for fair sharing among tenants of the same class (0 is treated as 1).
    pub weight: u32,
    /// Requests admitted and not yet finished (running, queued or parked) at most.
    pub max_concurrency: u32,
    /// Prompt plus maximum completion tokens admitted per minute; `None` = no limit.
    pub tokens_per_minute: Option<u32>,
    /// Reserved class only: share of the fleet's available slots (permille) this tenant is
    /// guaranteed; higher classes do not preempt it below this share.
    pub reserved_min_share_permille: u16,
}
