//! The coordinator model's side of each command, and the invariants checked after every event.
//! Eligibility is re-derived here from the world's own view of each vehicle, independently of
//! the scheduler's bookkeeping.

use super::Sim;
use crate::event::{Command, RejectReason, StopReason};
use crate::types::{Millis, NodeId, OwnerPolicy, RequestId, TenantClass};

const MS_PER_MINUTE: i64 = 60_000;
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;

impl Sim {
    /// Carry out one command, checking that it is allowed. `arriving` is the request whose
    /// arrival is being handled, if any.
    pub(super) fn apply(
        &mut self,
        command: Command,
        arriving: Option<RequestId>,
    ) -> Result<(), String> {
        match command {
            Command::Assign {
                request,
                node,
                resume_from,
            } => self.apply_assign(request, node, resume_from),
            Command::Stop {
                request,
                node,
                reason,
            } => {
                let entry = self
                    .requests
                    .get(&request)
                    .ok_or(format!("stop of unknown {request:?}"))?;
                if entry.node != Some(node) {
                    return Err(format!(
                        "stop of {request:?} on {node:?}, but it runs on {:?}",
                        entry.node
                    ));
                }
                let connected = self.vehicle(node).is_some_and(|vehicle| vehicle.connected);
                if reason == StopReason::NodeLost && connected && self.reconnecting != Some(node) {
                    return Err(format!(
                        "{request:?} stopped as NodeLost on connected {node:?}"
                    ));
                }
                self.report.stops += 1;
                if reason == StopReason::Preempted {
                    self.report.preemptions += 1;
                }
                self.release(request);
                Ok(())
            }
            Command::Cancel { request, node } => {
                let entry = self
                    .requests
                    .get(&request)
                    .ok_or(format!("cancel of unknown {request:?}"))?;
                if !entry.cancel_pending || entry.node != Some(node) {
                    return Err(format!(
                        "unexpected cancel of {request:?} on {node:?}: {entry:?}"
                    ));
                }
                self.release(request);
                if let Some(entry) = self.requests.get_mut(&request) {
                    entry.cancel_pending = false;
                }
                Ok(())
            }
            Command::Reject {
                request,
                reason,
                retry_after_ms,
            } => {
                let entry = self
                    .requests
                    .get_mut(&request)
                    .ok_or(format!("reject of unknown {request:?}"))?;
                if entry.ended || entry.node.is_some() {
                    return Err(format!(
                        "reject of {request:?} that is not waiting: {entry:?}"
                    ));
                }
                if retry_after_ms.is_some() != reason.is_retryable() {
                    return Err(format!(
                        "reject {reason:?} with retry_after_ms {retry_after_ms:?}"
                    ));
                }
                let admission_only = matches!(
                    reason,
                    RejectReason::UnknownTenant
                        | RejectReason::OverConcurrency
                        | RejectReason::OverTokensPerMinute
                );
                if admission_only && arriving != Some(request) {
                    return Err(format!("{reason:?} for {request:?} after admission"));
                }
                entry.ended = true;
                self.report.rejected += 1;
                Ok(())
            }
        }
    }

    fn apply_assign(
        &mut self,
        request: RequestId,
        node: NodeId,
        resume_from: u32,
    ) -> Result<(), String> {
        let entry = self
            .requests
            .get(&request)
            .ok_or(format!("assign of unknown {request:?}"))?;
        if entry.ended {
            return Err(format!("assign of ended {request:?}"));
        }
        if let Some(running_on) = entry.node {
            return Err(format!(
                "{request:?} assigned to {node:?} while running on {running_on:?}"
            ));
        }
        if resume_from != entry.committed {
            return Err(format!(
                "{request:?} resumes from {resume_from}, but {} tokens are committed",
                entry.committed
            ));
        }
        let class = entry
            .class
            .ok_or(format!("assign of {request:?} from an unknown tenant"))?;
        let model = entry.model;
        let vehicle = self
            .vehicle(node)
            .ok_or(format!("assign to unknown {node:?}"))?;
        if let Some(why) = self.blocked(node, true) {
            return Err(format!("{request:?} assigned to {node:?}, which is {why}"));
        }
        if !vehicle.policy.allowed_classes.contains(class) {
            return Err(format!(
                "{request:?} of {class:?} assigned to {node:?}, whose owner excludes it"
            ));
        }
        if !vehicle.capacity.models.contains(&model) {
            return Err(format!(
                "{request:?} assigned to {node:?}, which lacks {model:?}"
            ));
        }
        if vehicle.running.len() >= usize::from(vehicle.capacity.slots) {
            return Err(format!("{request:?} assigned to full {node:?}"));
        }
        let numerics = vehicle.capacity.numerics;
        let continues_on = entry.numerics.filter(|_| resume_from > 0);
        if let Some(alike) = continues_on.filter(|alike| *alike != numerics) {
            if let Some(free) = self.free_without_departure(class, model, alike) {
                return Err(format!(
                    "{request:?} with {resume_from} tokens of numerics {alike} moved to {node:?} \
                     of numerics {numerics}, while {free:?} of its own was free"
                ));
            }
        }
        if let Some(entry) = self.requests.get_mut(&request) {
            entry.node = Some(node);
            entry.numerics = Some(numerics);
        }
        if let Some(vehicle) = self.vehicle_mut(node) {
            vehicle.running.push(request);
        }
        self.report.assigns += 1;
        Ok(())
    }

    /// A node of `numerics` that may start work of `class` on `model` now, has a free slot and
    /// no departure (so any generation ends on it in time), if any. A node re-registering is not
    /// one yet: the scheduler places its old work before it registers the new connection.
    fn free_without_departure(
        &self,
        class: TenantClass,
        model: crate::types::ModelId,
        numerics: u32,
    ) -> Option<NodeId> {
        self.vehicles
            .iter()
            .enumerate()
            .find_map(|(index, vehicle)| {
                let vehicle = vehicle.as_ref()?;
                let node = NodeId(index as u32);
                let free = self.reconnecting != Some(node)
                    && vehicle.capacity.numerics == numerics
                    && vehicle.state.departure_at.is_none()
                    && vehicle.policy.allowed_classes.contains(class)
                    && vehicle.capacity.models.contains(&model)
                    && vehicle.running.len() < usize::from(vehicle.capacity.slots)
                    && self.blocked(node, true).is_none();
                free.then_some(node)
            })
    }

    /// After an arrival: if admitted, the tenant's quotas must hold.
    pub(super) fn admitted(&mut self, request: RequestId) -> Result<(), String> {
        let Some(entry) = self.requests.get(&request) else {
            return Ok(());
        };
        // Ended within its own arrival: rejected, nothing admitted.
        if entry.ended {
            return Ok(());
        }
        let tenant = entry.tenant;
        let tokens = u64::from(entry.prompt_tokens) + u64::from(entry.max_tokens);
        let config = self
            .tenants
            .get(&tenant)
            .copied()
            .ok_or(format!("{request:?} of unknown tenant admitted"))?;
        let in_flight = self
            .requests
            .values()
            .filter(|r| r.tenant == tenant && !r.ended)
            .count();
        if in_flight > config.max_concurrency as usize {
            return Err(format!(
                "{tenant:?} has {in_flight} in flight, over its max {}",
                config.max_concurrency
            ));
        }
        let minute = self.now.to_u64().unwrap_or(0) / 60_000;
        let used = self.tokens_per_minute.entry(tenant).or_insert((minute, 0));
        if used.0 != minute {
            *used = (minute, 0);
        }
        used.1 += tokens;
        if let Some(limit) = config.tokens_per_minute {
            if used.1 > u64::from(limit) {
                return Err(format!(
                    "{tenant:?} admitted {} tokens this minute, over its {limit}",
                    used.1
                ));
            }
        }
        Ok(())
    }
}

impl Sim {
    /// Why a vehicle may not run work at `now` (`new_work`: may not start new work), derived from
    /// the world's view; `None` when it may.
    pub(super) fn blocked(&self, node: NodeId, new_work: bool) -> Option<&'static str> {
        let Some(vehicle) = self.vehicle(node) else {
            return Some("unknown");
        };
        if !vehicle.connected {
            return Some("disconnected");
        }
        let (state, policy, now) = (&vehicle.state, &vehicle.policy, self.now);
        if !(state.plugged_in || (policy.allow_unplugged && vehicle.battery_ok)) {
            return Some("unplugged");
        }
        if let Some(departure) = state.departure_at {
            if now.plus(self.config.scheduler.departure_hard_stop_ms) >= departure {
                return Some("about to depart");
            }
            if new_work && now.plus(policy.stop_before_departure_ms) >= departure {
                return Some("inside its departure window");
            }
        }
        if state.chip_temperature_decicelsius > policy.max_chip_temperature_decicelsius {
            return Some("too hot");
        }
        let local = local_ms(now, policy);
        let hour = local.rem_euclid(MS_PER_DAY) / MS_PER_HOUR;
        if policy.allowed_hours_utc & (1 << hour) == 0 {
            return Some("outside its allowed hours");
        }
        if let Some(cap) = policy.max_energy_per_day_wh {
            if vehicle.energy_day == local_day(now, policy) && vehicle.energy_wh >= cap {
                return Some("over its energy cap");
            }
        }
        None
    }

    /// The invariants that hold after every event.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        for (id, request) in &self.requests {
            let placed = self.scheduler.placement_of(*id);
            let expected = if request.cancel_pending {
                None
            } else {
                request.node
            };
            if placed != expected && !(request.ended && placed.is_none()) {
                return Err(format!(
                    "{id:?}: scheduler places it on {placed:?}, the world on {:?}",
                    request.node
                ));
            }
            if request.cancel_pending {
                return Err(format!(
                    "{id:?} was cancelled while running but never got a Cancel"
                ));
            }
        }
        for (index, vehicle) in self.vehicles.iter().enumerate() {
            let Some(vehicle) = vehicle else {
                continue;
            };
            let node = NodeId(index as u32);
            if vehicle.running.len() > usize::from(vehicle.capacity.slots) {
                return Err(format!(
                    "{node:?} runs {} in {} slots",
                    vehicle.running.len(),
                    vehicle.capacity.slots
                ));
            }
            if vehicle.running.is_empty() {
                continue;
            }
            if let Some(why) = self.blocked(node, false) {
                return Err(format!(
                    "{node:?} is {why} but still runs {:?}",
                    vehicle.running
                ));
            }
            for id in &vehicle.running {
                let class = self.requests.get(id).and_then(|request| request.class);
                if class.is_some_and(|class| !vehicle.policy.allowed_classes.contains(class)) {
                    return Err(format!(
                        "{node:?} runs {id:?} of {class:?}, which its owner excludes"
                    ));
                }
            }
        }
        for class in TenantClass::ALL {
            let queued = self.scheduler.queued(class) - self.scheduler.parked(class);
            if queued > self.config.scheduler.queue_max(class) as usize {
                return Err(format!(
                    "{queued} {class:?} requests queued, over the bound"
                ));
            }
        }
        if let Some(differs) = self.scheduler.nodes.index_drift() {
            return Err(format!(
                "the node indexes differ from ones rebuilt from the nodes: {differs}"
            ));
        }
        self.check_priority()
    }

    /// No request waits while a free slot, or lower-class preemptable work, sits on a node that
    /// could run it.
    fn check_priority(&self) -> Result<(), String> {
        let available_slots: u64 = (0..self.vehicles.len())
            .filter(|index| self.blocked(NodeId(*index as u32), true).is_none())
            .filter_map(|index| self.vehicles[index].as_ref())
            .map(|vehicle| u64::from(vehicle.capacity.slots))
            .sum();
        for (id, waiting) in self
            .requests
            .iter()
            .filter(|(_, request)| !request.ended && request.node.is_none())
        {
            let Some(class) = waiting.class else {
                continue;
            };
            for (index, vehicle) in self.vehicles.iter().enumerate() {
                let node = NodeId(index as u32);
                let Some(vehicle) = vehicle else {
                    continue;
                };
                let fits = self.blocked(node, true).is_none()
                    && vehicle.policy.allowed_classes.contains(class)
                    && vehicle.capacity.models.contains(&waiting.model);
                if !fits {
                    continue;
                }
                if vehicle.running.len() < usize::from(vehicle.capacity.slots) {
                    return Err(format!("{id:?} waits while {node:?} has a free slot"));
                }
                for running in &vehicle.running {
                    if self.preemptable_by(*running, class, available_slots) {
                        return Err(format!(
                            "{id:?} of {class:?} waits while {node:?} runs preemptable {running:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn preemptable_by(&self, running: RequestId, class: TenantClass, available_slots: u64) -> bool {
        let Some(request) = self.requests.get(&running) else {
            return false;
        };
        let Some(running_class) = request.class else {
            return false;
        };
        if !class.outranks(running_class) {
            return false;
        }
        if running_class != TenantClass::Reserved {
            return true;
        }
        let Some(config) = self.tenants.get(&request.tenant) else {
            return true;
        };
        let guaranteed =
            available_slots * u64::from(config.reserved_min_share_permille.min(1000)) / 1000;
        let running_count = self
            .requests
            .values()
            .filter(|r| r.tenant == request.tenant && r.node.is_some())
            .count();
        running_count as u64 > guaranteed
    }
}

fn local_ms(now: Millis, policy: &OwnerPolicy) -> i64 {
    now.0 + i64::from(policy.utc_offset_minutes) * MS_PER_MINUTE
}

/// The owner's local day number at `now`.
pub(super) fn local_day(now: Millis, policy: &OwnerPolicy) -> i64 {
    local_ms(now, policy).div_euclid(MS_PER_DAY)
}
