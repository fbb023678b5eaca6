//! The random world: vehicles arriving, leaving, crashing, changing state and policy; tenants
//! bursting requests, cancelling, and changing contracts.

use super::{Sim, SimRequest, Vehicle};
use crate::event::Event;
use crate::types::{
    ClassSet, Millis, ModelId, NodeCapacity, NodeId, OwnerPolicy, RequestId, TenantClass,
    TenantConfig, TenantId, VehicleState, ALL_HOURS,
};

const MINUTE_MS: u64 = 60_000;

/// A tenant id that is never configured, for `UnknownTenant`.
const UNKNOWN_TENANT: TenantId = TenantId(99);

impl Sim {
    pub(super) fn setup(&mut self) -> Result<(), String> {
        let tenants = [
            (1, TenantClass::Fleet, 2, None, 0),
            (2, TenantClass::Reserved, 1, None, 250),
            (3, TenantClass::Reserved, 1, Some(4_000), 0),
            (4, TenantClass::Spot, 1, None, 0),
            (5, TenantClass::Spot, 3, Some(3_000), 0),
        ];
        for (id, class, weight, tokens_per_minute, share) in tenants {
            let max_concurrency = self.rng.between(3, 12) as u32;
            let config = TenantConfig {
                class,
                weight,
                max_concurrency,
                tokens_per_minute,
                reserved_min_share_permille: share,
            };
            self.configure_tenant(TenantId(id), config)?;
        }
        let initial = self.rng.between(2, u64::from(self.config.vehicles_max));
        for index in 0..initial as usize {
            self.register(index, true)?;
        }
        Ok(())
    }

    /// One random happening.
    pub(super) fn chaos(&mut self) -> Result<(), String> {
        let vehicle = self.rng.below(self.vehicles.len() as u64) as usize;
        match self.rng.below(100) {
            0..=21 => self.burst(),
            22..=29 => {
                let all_models = self.rng.chance(700);
                self.register(vehicle, all_models)
            }
            30..=34 => self.crash(vehicle),
            35..=42 => {
                self.change_state(vehicle, |rng, _, state| state.plugged_in = rng.chance(600))
            }
            43..=50 => self.change_state(vehicle, |rng, now, state| {
                state.departure_at = rng
                    .chance(800)
                    .then(|| now.plus(rng.between(MINUTE_MS, 90 * MINUTE_MS)));
            }),
            51..=56 => self.change_policy(vehicle),
            57..=61 => self.change_state(vehicle, |rng, _, state| {
                state.chip_temperature_decicelsius = rng.between(300, 900) as i16;
            }),
            62..=66 => self.change_state(vehicle, |rng, _, state| {
                state.state_of_charge_permille = rng.between(200, 1000) as u16;
            }),
            67..=70 => self.use_energy(vehicle),
            71..=76 => self.cancel_random(),
            77..=80 => self.fail_random(),
            81..=84 => self.reconfigure_tenant(),
            _ => Ok(()),
        }
    }

    /// Make the world friendly so that every request can end: every vehicle connected, plugged
    /// in, cool, with no departure and a permissive policy, holding every model.
    pub(super) fn calm(&mut self) -> Result<(), String> {
        for index in 0..self.vehicles.len() {
            let connected = self.vehicles[index]
                .as_ref()
                .is_some_and(|vehicle| vehicle.connected);
            let has_all = self.vehicles[index].as_ref().is_some_and(|vehicle| {
                vehicle.capacity.models.len() == usize::from(self.config.models)
            });
            if !connected || !has_all {
                self.register(index, true)?;
            }
            let state = VehicleState::default();
            self.set_state(index, state)?;
            let node = NodeId(index as u32);
            if let Some(vehicle) = self.vehicle_mut(node) {
                vehicle.policy = OwnerPolicy::default();
                vehicle.battery_ok = true;
            }
            self.send(Event::NodePolicyChanged {
                node,
                policy: OwnerPolicy::default(),
            })?;
        }
        Ok(())
    }

    fn configure_tenant(&mut self, tenant: TenantId, config: TenantConfig) -> Result<(), String> {
        self.tenants.insert(tenant, config);
        self.send(Event::TenantConfigured { tenant, config })
    }

    fn reconfigure_tenant(&mut self) -> Result<(), String> {
        let tenant = TenantId(self.rng.between(1, 5) as u32);
        let Some(mut config) = self.tenants.get(&tenant).copied() else {
            return Ok(());
        };
        config.weight = self.rng.between(1, 4) as u32;
        config.max_concurrency = self.rng.between(1, 12) as u32;
        if config.class == TenantClass::Reserved {
            config.reserved_min_share_permille = [0, 100, 300, 600][self.rng.below(4) as usize];
        }
        self.configure_tenant(tenant, config)
    }

    /// A vehicle connects (or reconnects). `all_models` gives it every model.
    pub(super) fn register(&mut self, index: usize, all_models: bool) -> Result<(), String> {
        let models: Vec<ModelId> = (0..self.config.models)
            .filter(|model| all_models || *model == 0 || self.rng.chance(500))
            .map(ModelId)
            .collect();
        let loaded = models
            .iter()
            .copied()
            .filter(|_| self.rng.chance(500))
            .collect();
        let capacity = NodeCapacity {
            slots: self.rng.between(1, 3) as u16,
            decode_tokens_per_second: [5.0, 12.0, 30.0][self.rng.below(3) as usize],
            prefill_tokens_per_second: 200.0,
            models,
            loaded,
            energy_price_micro_usd_per_kwh: self.rng.between(50_000, 400_000) as u32,
            // A fleet of two engine builds, so that moved work meets nodes of both.
            numerics: index as u32 % 2,
        };
        let state = VehicleState {
            plugged_in: self.rng.chance(900),
            ..VehicleState::default()
        };
        let policy = OwnerPolicy::default();
        let node = NodeId(index as u32);
        // A reconnect replaces the old connection; the scheduler stops what ran there, and those
        // stops find the requests still marked as on this node.
        let battery_ok = state.state_of_charge_permille >= policy.unplugged_resume_soc_permille;
        let vehicle = Vehicle {
            connected: true,
            capacity: capacity.clone(),
            state,
            policy,
            battery_ok,
            speed_permille: self.rng.between(300, 1_200) as u32,
            energy_day: 0,
            energy_wh: 0,
            running: Vec::new(),
        };
        self.vehicles[index] = Some(vehicle);
        self.reconnecting = Some(node);
        let result = self.send(Event::NodeRegistered {
            node,
            capacity,
            state,
            policy,
        });
        self.reconnecting = None;
        result
    }

    fn crash(&mut self, index: usize) -> Result<(), String> {
        let node = NodeId(index as u32);
        match self.vehicle_mut(node) {
            Some(vehicle) if vehicle.connected => vehicle.connected = false,
            _ => return Ok(()),
        }
        self.send(Event::NodeLost { node })
    }

    fn change_state(
        &mut self,
        index: usize,
        change: impl FnOnce(&mut super::SimRng, Millis, &mut VehicleState),
    ) -> Result<(), String> {
        let Some(vehicle) = self
            .vehicle(NodeId(index as u32))
            .filter(|vehicle| vehicle.connected)
        else {
            return Ok(());
        };
        let mut state = vehicle.state;
        change(&mut self.rng, self.now, &mut state);
        self.set_state(index, state)
    }

    pub(super) fn set_state(&mut self, index: usize, state: VehicleState) -> Result<(), String> {
        let node = NodeId(index as u32);
        let Some(vehicle) = self.vehicle_mut(node) else {
            return Ok(());
        };
        if !vehicle.connected {
            return Ok(());
        }
        vehicle.battery_ok = world_battery_rule(vehicle.battery_ok, &state, &vehicle.policy);
        vehicle.state = state;
        self.send(Event::NodeStateChanged { node, state })
    }

    fn change_policy(&mut self, index: usize) -> Result<(), String> {
        let node = NodeId(index as u32);
        let mut policy = OwnerPolicy::default();
        if self.rng.chance(300) {
            let bits = self.rng.between(1, 7);
            policy.allowed_classes = TenantClass::ALL
                .into_iter()
                .filter(|class| bits & (1 << class.index()) != 0)
                .fold(ClassSet::NONE, ClassSet::with);
        }
        if self.rng.chance(250) {
            policy.allowed_hours_utc = (self.rng.next_u64() as u32) & ALL_HOURS;
            policy.utc_offset_minutes = [0, 60, -300, 330][self.rng.below(4) as usize];
        }
        if self.rng.chance(250) {
            policy.allow_unplugged = true;
            policy.unplugged_stop_soc_permille = self.rng.between(200, 500) as u16;
            policy.unplugged_resume_soc_permille =
                policy.unplugged_stop_soc_permille + self.rng.between(0, 300) as u16;
        }
        if self.rng.chance(200) {
            policy.max_energy_per_day_wh = Some(self.rng.between(5, 60) as u32);
        }
        policy.max_chip_temperature_decicelsius = self.rng.between(600, 900) as i16;
        policy.stop_before_departure_ms = self.rng.between(2, 20) * MINUTE_MS;
        let Some(vehicle) = self.vehicle_mut(node).filter(|vehicle| vehicle.connected) else {
            return Ok(());
        };
        vehicle.battery_ok = world_battery_rule(vehicle.battery_ok, &vehicle.state, &policy);
        vehicle.policy = policy;
        self.send(Event::NodePolicyChanged { node, policy })
    }

    fn use_energy(&mut self, index: usize) -> Result<(), String> {
        let node = NodeId(index as u32);
        let wh = self.rng.between(1, 20) as u32;
        let now = self.now;
        let Some(vehicle) = self.vehicle_mut(node).filter(|vehicle| vehicle.connected) else {
            return Ok(());
        };
        let day = super::check::local_day(now, &vehicle.policy);
        if day != vehicle.energy_day {
            vehicle.energy_day = day;
            vehicle.energy_wh = 0;
        }
        vehicle.energy_wh = vehicle.energy_wh.saturating_add(wh);
        self.send(Event::NodeEnergyUsed { node, wh })
    }

    /// A few requests from one tenant at once.
    fn burst(&mut self) -> Result<(), String> {
        let tenant = if self.rng.chance(30) {
            UNKNOWN_TENANT
        } else {
            TenantId(self.rng.between(1, 5) as u32)
        };
        for _ in 0..self.rng.between(1, 5) {
            let request = RequestId(self.next_request);
            self.next_request += 1;
            // Model 0..models, and now and then one nobody has.
            let model = ModelId(self.rng.below(u64::from(self.config.models) + 1) as u16);
            let prompt_tokens = self.rng.between(1, 300) as u32;
            let max_tokens = self.rng.between(1, 400) as u32;
            let deadline = self
                .rng
                .chance(250)
                .then(|| self.now.plus(self.rng.between(0, 120_000)));
            let class = self.tenants.get(&tenant).map(|config| config.class);
            let entry = SimRequest {
                tenant,
                class,
                model,
                prompt_tokens,
                max_tokens,
                committed: 0,
                node: None,
                numerics: None,
                ended: false,
                cancel_pending: false,
            };
            self.requests.insert(request, entry);
            self.report.requests += 1;
            self.send(Event::RequestArrived {
                request,
                tenant,
                model,
                prompt_tokens,
                max_tokens,
                deadline,
                prompt_heads: crate::PromptHeads::default(),
                resumes: None,
            })?;
        }
        Ok(())
    }

    fn pick_request(&mut self, running_only: bool) -> Option<RequestId> {
        let candidates: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, request)| !request.ended && (!running_only || request.node.is_some()))
            .map(|(id, _)| *id)
            .collect();
        let index = self.rng.below(candidates.len() as u64) as usize;
        candidates.get(index).copied()
    }

    fn cancel_random(&mut self) -> Result<(), String> {
        let Some(id) = self.pick_request(false) else {
            return Ok(());
        };
        if let Some(request) = self.requests.get_mut(&id) {
            request.ended = true;
            request.cancel_pending = request.node.is_some();
        }
        self.report.cancelled += 1;
        self.send(Event::RequestCancelled { request: id })
    }

    fn fail_random(&mut self) -> Result<(), String> {
        let Some(id) = self.pick_request(true) else {
            return Ok(());
        };
        let Some(node) = self.requests.get(&id).and_then(|request| request.node) else {
            return Ok(());
        };
        self.release(id);
        self.send(Event::AttemptFailed { request: id, node })
    }
}

/// The owner's battery hysteresis, as the world applies it (stop at or below the stop
/// threshold, resume at or above the resume threshold).
fn world_battery_rule(previous: bool, state: &VehicleState, policy: &OwnerPolicy) -> bool {
    let soc = state.state_of_charge_permille;
    match (
        soc <= policy.unplugged_stop_soc_permille,
        soc >= policy.unplugged_resume_soc_permille,
    ) {
        (true, _) => false,
        (false, true) => true,
        (false, false) => previous,
    }
}
