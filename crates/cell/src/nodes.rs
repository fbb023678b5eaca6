//! What the coordinator keeps about each connected node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use scheduler::{Event, Millis, NodeCapacity, NodeId, OwnerPolicy, VehicleState};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cell_api::metering::PaidSpeed;
use cell_api::served::{ServedModel, ServedModels};

/// What electricity costs each vehicle, micro-dollars per kWh, averaged
/// over the day (the scheduler's placement prefers the cheaper of otherwise
/// equal vehicles). Vehicles not listed cost `default`; all zero (the
/// default) leaves placement to the node ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnergyPrices {
    pub default: u32,
    pub by_node: HashMap<String, u32>,
}

impl EnergyPrices {
    pub fn of(&self, node: &str) -> u32 {
        self.by_node.get(node).copied().unwrap_or(self.default)
    }
}

/// Distinct numerics a cell tells apart; nodes registering further ones
/// share `NUMERICS_OTHER`. Registrations are untrusted, so the table is
/// bounded: its keys come from hellos of at most `limits::HELLO_BYTES_MAX`.
pub const NUMERICS_MAX: usize = 256;
/// The numerics of nodes past `NUMERICS_MAX`: alike to no node, each other
/// included, so that a flood of made-up kernels can only cost later builds
/// their bit-for-bit moves and the default tolerance (they are verified at
/// the wider one), never make unlike nodes count as alike.
pub const NUMERICS_OTHER: u32 = scheduler::NUMERICS_UNKNOWN;

/// Whether two nodes' numerics (none: not known here) compute the same numbers: the same id,
/// and not `NUMERICS_OTHER`.
pub fn numerics_alike(a: Option<u32>, b: Option<u32>) -> bool {
    a == b && a.is_some_and(|id| id != NUMERICS_OTHER)
}

/// Small ids for the numbers nodes compute (`scheduler::NodeCapacity::numerics`):
/// nodes registering the same engine version, CPU kernels (the instruction-set
/// variant included) and attention setting get the same id, and a generation
/// moved between two of them continues bit for bit.
#[derive(Debug, Default)]
pub struct Numerics {
    ids: HashMap<cell_api::Numerics, u32>,
}

/// What a node registering `hardware` (none: an engine that says nothing)
/// with `attention` computes, as cells and gateways name it.
pub fn numerics_key(
    hardware: Option<&proto::Hardware>,
    attention: proto::Attention,
) -> cell_api::Numerics {
    let (version, kernels) = hardware.map_or(("", ""), |h| {
        (h.engine_version.as_str(), h.cpu_kernels.as_str())
    });
    cell_api::Numerics {
        engine_version: version.to_owned(),
        cpu_kernels: kernels.to_owned(),
        attention: attention as i32,
    }
}

impl Numerics {
    /// The id of what a node registering `hardware` (none: an engine that
    /// says nothing) with `attention` computes (the tests' shorthand; a
    /// registration keeps the key too, `numerics_key` then `id_of`).
    #[cfg(test)]
    pub fn of(&mut self, hardware: Option<&proto::Hardware>, attention: proto::Attention) -> u32 {
        self.id_of(numerics_key(hardware, attention))
    }

    /// The id of `key` if a node here registered it, else `NUMERICS_OTHER`:
    /// a look-up only, so a key from elsewhere (a generation moved from
    /// another cell) never takes a place in the table.
    pub fn find(&self, key: &cell_api::Numerics) -> u32 {
        self.ids.get(key).copied().unwrap_or(NUMERICS_OTHER)
    }

    /// The id of `key`, given one if there is room.
    pub fn id_of(&mut self, key: cell_api::Numerics) -> u32 {
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        if self.ids.len() >= NUMERICS_MAX {
            return NUMERICS_OTHER;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(key, id);
        id
    }
}

/// Identifies one connection of a node: a reconnecting vehicle gets a new
/// session, so events from its old stream are recognised and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSession {
    pub node: NodeId,
    pub session: u64,
}

pub struct ConnectedNode {
    pub name: String,
    pub session: u64,
    pub outbound: mpsc::Sender<proto::CoordinatorMessage>,
    pub last_heard: Instant,
    /// Cancelled when the core drops this session (lost, replaced or
    /// disconnected for a protocol violation): its gRPC read loop stops
    /// reading at once.
    pub disconnect: CancellationToken,
    /// Which numbers it computes (`Numerics::id_of`), and what they are
    /// called beyond this cell.
    pub numerics: u32,
    pub numerics_key: cell_api::Numerics,
    state: VehicleState,
    hardware: proto::Hardware,
    models: Vec<proto::CachedModel>,
}

impl ConnectedNode {
    /// A node that said `hello`, computing `numerics` (`Numerics::id_of` of
    /// `numerics_key`).
    pub fn new(
        name: &str,
        session: u64,
        outbound: mpsc::Sender<proto::CoordinatorMessage>,
        hello: &proto::Hello,
        (numerics, numerics_key): (u32, cell_api::Numerics),
    ) -> ConnectedNode {
        ConnectedNode {
            name: name.to_string(),
            session,
            outbound,
            last_heard: Instant::now(),
            disconnect: CancellationToken::new(),
            state: vehicle_state(hello.state.as_ref()),
            hardware: hello.hardware.clone().unwrap_or_default(),
            models: hello.models.clone(),
            numerics,
            numerics_key,
        }
    }

    /// The served models this node holds, by name.
    pub fn served_models(&self, served: &ServedModels) -> Vec<String> {
        self.served(served)
            .map(|model| model.name.clone())
            .collect()
    }

    /// The served models this node holds.
    pub fn served<'a>(
        &'a self,
        served: &'a ServedModels,
    ) -> impl Iterator<Item = &'a Arc<ServedModel>> + 'a {
        self.models
            .iter()
            .filter_map(|model| served.by_digest(&model.sha256))
    }

    /// The generations it declared it may run at once.
    pub fn slots(&self) -> u32 {
        self.hardware.parallel_sequences.max(1)
    }

    /// The scheduler event that registers this node under its owner's
    /// policy, its electricity at `energy_price` micro-dollars per kWh.
    pub fn registration(
        &self,
        node: NodeId,
        served: &ServedModels,
        policy: OwnerPolicy,
        energy_price: u32,
    ) -> Event {
        let on_disk = || {
            self.models
                .iter()
                .filter_map(|model| served.by_digest(&model.sha256))
                .map(|model| model.id)
        };
        let loaded = self
            .models
            .iter()
            .filter(|model| model.loaded)
            .filter_map(|model| served.by_digest(&model.sha256))
            .map(|model| model.id)
            .collect();
        Event::NodeRegistered {
            node,
            capacity: NodeCapacity {
                slots: u16::try_from(self.hardware.parallel_sequences.max(1)).unwrap_or(u16::MAX),
                decode_tokens_per_second: self.hardware.decode_tokens_per_second as f32,
                prefill_tokens_per_second: self.hardware.prefill_tokens_per_second as f32,
                models: on_disk().collect(),
                loaded,
                energy_price_micro_usd_per_kwh: energy_price,
                numerics: self.numerics,
            },
            state: self.state,
            policy,
        }
    }

    /// The speeds its segments' paid compute time is bounded by: those it
    /// declared when it connected, never below the floors.
    pub fn paid_speed(&self) -> PaidSpeed {
        PaidSpeed::declared(
            self.hardware.prefill_tokens_per_second,
            self.hardware.decode_tokens_per_second,
        )
    }

    /// Records a heartbeat; returns the new vehicle state when it changed.
    pub fn observe_heartbeat(&mut self, heartbeat: &proto::Heartbeat) -> Option<VehicleState> {
        self.last_heard = Instant::now();
        let state = vehicle_state(heartbeat.state.as_ref());
        if state == self.state {
            return None;
        }
        self.state = state;
        Some(state)
    }
}

/// Converts the wire form of a vehicle's state into the scheduler's.
pub fn vehicle_state(state: Option<&proto::VehicleState>) -> VehicleState {
    let Some(state) = state else {
        // No state reported: the safe side is "not available".
        return VehicleState {
            plugged_in: false,
            charging: false,
            state_of_charge_permille: 0,
            departure_at: None,
            chip_temperature_decicelsius: 0,
        };
    };
    let soc = (state.state_of_charge.clamp(0.0, 1.0) * 1000.0).round() as u16;
    let temperature = if state.temperature_c.is_finite() {
        (state.temperature_c * 10.0).clamp(-2000.0, 2000.0).round() as i16
    } else {
        0
    };
    VehicleState {
        plugged_in: state.plugged_in,
        charging: state.charging,
        state_of_charge_permille: soc,
        departure_at: u64::try_from(state.departure_unix_ms)
            .ok()
            .filter(|ms| *ms > 0)
            .and_then(Millis::from_u64),
        chip_temperature_decicelsius: temperature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hardware(version: &str, kernels: &str) -> proto::Hardware {
        proto::Hardware {
            engine_version: version.into(),
            cpu_kernels: kernels.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nodes_share_numerics_only_with_the_same_engine_kernels_and_attention() {
        use proto::Attention::{Exact, Fast, Off};
        let mut numerics = Numerics::default();
        let avx2 = hardware("b1", "CPU : AVX2 = 1 | VARIANT = haswell |");
        let avx512 = hardware("b1", "CPU : AVX512 = 1 | VARIANT = zen4 |");
        let newer = hardware("b2", "CPU : AVX2 = 1 | VARIANT = haswell |");
        let first = numerics.of(Some(&avx2), Off);
        assert_eq!(numerics.of(Some(&avx2.clone()), Off), first);
        let others = [
            numerics.of(Some(&avx2), Exact),
            numerics.of(Some(&avx2), Fast),
            numerics.of(Some(&avx512), Off),
            numerics.of(Some(&newer), Off),
            numerics.of(None, Off),
        ];
        let mut all = vec![first];
        all.extend(others);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6, "each differs from the others: {all:?}");
        assert_eq!(numerics.of(None, Off), others[4]);
    }

    #[test]
    fn a_flood_of_made_up_kernels_shares_one_id_past_the_bound() {
        let mut numerics = Numerics::default();
        let honest = numerics.of(
            Some(&hardware("b1", "CPU : AVX2 = 1 |")),
            proto::Attention::Off,
        );
        for n in 0..NUMERICS_MAX + 10 {
            let id = numerics.of(
                Some(&hardware("b1", &format!("made up {n}"))),
                proto::Attention::Off,
            );
            assert_eq!(
                id == NUMERICS_OTHER,
                n + 1 >= NUMERICS_MAX,
                "registration {n}"
            );
        }
        assert_eq!(numerics.ids.len(), NUMERICS_MAX);
        let again = numerics.of(
            Some(&hardware("b1", "CPU : AVX2 = 1 |")),
            proto::Attention::Off,
        );
        assert_eq!(again, honest, "a known build keeps its id");
    }
}
