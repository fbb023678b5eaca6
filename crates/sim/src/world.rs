//! The simulated world's state: vehicles as the run sees them (plugged in or
//! not, what they run, their clocks of progress and energy), leases, and
//! the event queue.
//!
//! A *lease* is what the scheduler places: `requests` requests of one tenant
//! class served back to back in one slot. At small scale a lease is one
//! request; at a million vehicles it stands for many (see `Run::lease_requests`),
//! since a fleet that size serves billions of requests a day. Placement,
//! priority, draining, departures and migrations are the production
//! scheduler's decisions on leases; a lease that moves hands over the one
//! request it was serving, which is prefilled again on the next vehicle.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use crate::fleet::Traits;

/// No vehicle.
pub const NONE: u32 = u32::MAX;

/// A vehicle during the run.
#[derive(Debug, Clone)]
pub struct Vehicle {
    pub traits: Traits,
    pub plugged: bool,
    /// Bumped at every plug-in, so a stale unplug is ignored.
    pub session: u32,
    /// When its queued finish and energy-cap events are due (`i64::MAX`:
    /// none queued). Only an event due then is acted on; when the due time
    /// moves later, the queued one fires early and finds nothing to do.
    pub due_finish: i64,
    pub due_cap: i64,
    /// Reference seconds each running lease has advanced since the start.
    pub progress: f64,
    /// Wh each running lease has drawn since the start.
    pub energy_per_stream: f64,
    /// When the clocks were last brought up to date.
    pub last: i64,
    /// Leases running here, in the order they started.
    pub running: Vec<Running>,
    /// How many of them are of each tenant class.
    pub running_by_class: [u16; 3],
    /// Compute energy of the owner's current local day, Wh, and that day.
    pub energy_today: f64,
    pub energy_day: i64,
    /// Wh drawn and not yet reported to the scheduler (capped owners only).
    pub energy_unreported: f64,
}

impl Vehicle {
    pub fn new(traits: Traits) -> Vehicle {
        Vehicle {
            traits,
            plugged: false,
            session: 0,
            due_finish: i64::MAX,
            due_cap: i64::MAX,
            progress: 0.0,
            energy_per_stream: 0.0,
            last: 0,
            running: Vec::new(),
            running_by_class: [0; 3],
            energy_today: 0.0,
            energy_day: 0,
            energy_unreported: 0.0,
        }
    }

    pub fn active(&self) -> usize {
        self.running.len()
    }
}

/// A lease running on a vehicle.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    pub lease: u32,
    /// Its `Lease::target`: fixed while it runs, and read at every finish
    /// and reschedule (kept beside the index, so that one cache line holds both).
    pub target: f64,
}

/// One lease.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The scheduler's id of its current admission (a retry gets a new one).
    pub request: u64,
    /// Numbers its settlements.
    pub serial: u64,
    pub class: u8,
    pub requests: u32,
    pub arrived: i64,
    pub deadline: i64,
    /// Reference seconds of all its requests.
    pub work: f64,
    /// Reference seconds of its requests done.
    pub done: f64,
    /// Re-prefill its next start owes (after a move).
    pub reprefill_due: f64,
    pub vehicle: u32,
    /// The vehicle's progress clock when this segment started.
    pub segment_progress: f64,
    pub segment_energy: f64,
    pub segment_start: i64,
    /// The re-prefill this segment does before fresh work.
    pub segment_reprefill: f64,
    /// Settlements so far.
    pub segments: u32,
    pub first_start: i64,
    pub stopped_at: i64,
    /// Time spent stopped between segments, ms.
    pub gaps_ms: i64,
    pub moves: u32,
    /// Retries after refusals so far.
    pub retries: u32,
    /// Tokens settled so far.
    pub prompt_settled: u64,
    pub completion_settled: u64,
}

impl Lease {
    /// The vehicle progress clock value at which this segment is done.
    pub fn target(&self) -> f64 {
        self.segment_progress + self.segment_reprefill + (self.work - self.done)
    }

    pub fn running(&self) -> bool {
        self.vehicle != NONE
    }

    /// Share of its requests done.
    pub fn fraction_done(&self) -> f64 {
        if self.work <= 0.0 {
            1.0
        } else {
            (self.done / self.work).clamp(0.0, 1.0)
        }
    }
}

/// Leases by index, reusing freed slots.
#[derive(Debug, Default)]
pub struct Leases {
    slots: Vec<Option<Lease>>,
    free: Vec<u32>,
}

impl Leases {
    pub fn insert(&mut self, lease: Lease) -> u32 {
        match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = Some(lease);
                index
            }
            None => {
                self.slots.push(Some(lease));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub fn get(&self, index: u32) -> Option<&Lease> {
        self.slots.get(index as usize).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, index: u32) -> Option<&mut Lease> {
        self.slots.get_mut(index as usize).and_then(Option::as_mut)
    }

    pub fn remove(&mut self, index: u32) -> Option<Lease> {
        let lease = self.slots.get_mut(index as usize)?.take()?;
        self.free.push(index);
        Some(lease)
    }

    /// Indexes of the leases alive, in order.
    pub fn indexes(&self) -> Vec<u32> {
        (0..self.slots.len() as u32)
            .filter(|index| self.slots[*index as usize].is_some())
            .collect()
    }
}

/// The scheduler's request id of lease `index` at admission `serial`.
pub fn request_id(serial: u64, index: u32) -> u64 {
    (serial << 32) | u64::from(index)
}

/// The lease index in a request id.
pub fn lease_of(request: u64) -> u32 {
    request as u32
}

/// Something due at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Due {
    /// The scheduler's tick and a point of the series.
    Tick,
    /// Midnight: the day's sessions, grid events and prices are drawn.
    DayStart {
        day: i64,
    },
    PlugIn {
        vehicle: u32,
        unplug: i64,
        /// The departure the owner announced, or -1.
        departure: i64,
    },
    Unplug {
        vehicle: u32,
        session: u32,
    },
    /// The next lease of a tenant class arrives.
    Arrival {
        class: u8,
    },
    /// A lease refused with a retry-after asks again.
    Retry {
        lease: u32,
        request: u64,
    },
    /// The first lease running on a vehicle ends.
    Finish {
        vehicle: u32,
    },
    /// A capped vehicle reaches its owner's daily energy cap.
    EnergyCap {
        vehicle: u32,
    },
    GridStart {
        programme: u8,
    },
    GridEnd {
        programme: u8,
    },
}

/// Events in time order; equal times in the order they were queued.
///
/// A calendar: events of later minutes wait unsorted in their minute's
/// bucket, so a million vehicles' queued events cost a push onto a vector
/// each. A minute's bucket is sorted once when its turn comes; events queued
/// for that minute while it runs go into a small heap, and the two are drained
/// together. The buckets of the next `HORIZON_MINUTES` are a ring indexed by
/// minute; later ones (rare) wait in a sorted map.
#[derive(Debug, Default)]
pub struct Agenda {
    /// The current minute's events queued before it began, the next one last.
    sorted: Vec<Entry>,
    /// The current minute's events queued while it runs.
    current: BinaryHeap<Entry>,
    /// The minute `sorted` and `current` hold; earlier events go to `current` too.
    current_minute: i64,
    /// `soon[i]` holds minute `current_minute + 1 + i`.
    soon: VecDeque<Vec<Entry>>,
    later: BTreeMap<i64, Vec<Entry>>,
    sequence: u64,
    len: usize,
}

const BUCKET_MS: i64 = 60_000;
/// Minutes ahead kept in the ring (about 45 days).
const HORIZON_MINUTES: i64 = 1 << 16;

/// `(due at, queued as, what)`, smallest first.
type Entry = Reverse<(i64, u64, Due)>;

impl Agenda {
    /// The bucket of minute `current_minute + 1 + index`, made (with those before it) if missing.
    fn soon_bucket(&mut self, index: usize) -> &mut Vec<Entry> {
        if self.soon.len() <= index {
            self.soon.resize_with(index + 1, Vec::new);
        }
        &mut self.soon[index]
    }

    pub fn push(&mut self, at: i64, due: Due) {
        self.sequence += 1;
        self.len += 1;
        let entry = Reverse((at, self.sequence, due));
        let minute = at.div_euclid(BUCKET_MS);
        let ahead = minute - self.current_minute;
        if ahead <= 0 {
            self.current.push(entry);
        } else if ahead <= HORIZON_MINUTES {
            self.soon_bucket((ahead - 1) as usize).push(entry);
        } else {
            self.later.entry(minute).or_default().push(entry);
        }
    }

    /// The next event before `end`.
    pub fn pop_before(&mut self, end: i64) -> Option<(i64, Due)> {
        while self.sorted.is_empty() && self.current.is_empty() {
            if !self.next_minute() {
                return None;
            }
        }
        // `Reverse`: the greater entry is the earlier event.
        let from_sorted = match (self.sorted.last(), self.current.peek()) {
            (Some(sorted), Some(queued)) => sorted > queued,
            (sorted, _) => sorted.is_some(),
        };
        let next = if from_sorted {
            self.sorted.last()
        } else {
            self.current.peek()
        };
        let Reverse((at, _, _)) = next?;
        if *at >= end {
            return None;
        }
        self.len -= 1;
        let entry = if from_sorted {
            self.sorted.pop()
        } else {
            self.current.pop()
        };
        entry.map(|Reverse((at, _, due))| (at, due))
    }

    /// Makes the next minute's bucket the current one (the current is
    /// drained); false when nothing is queued.
    fn next_minute(&mut self) -> bool {
        let bucket = if let Some(bucket) = self.soon.pop_front() {
            self.current_minute += 1;
            bucket
        } else if let Some((minute, bucket)) = self.later.pop_first() {
            self.current_minute = minute;
            bucket
        } else {
            return false;
        };
        // Minutes the ring has not reached yet join it as they come within
        // its horizon.
        while let Some(entry) = self.later.first_entry() {
            if *entry.key() - self.current_minute > HORIZON_MINUTES {
                break;
            }
            let (minute, entries) = entry.remove_entry();
            let index = (minute - self.current_minute - 1) as usize;
            self.soon_bucket(index).extend(entries);
        }
        // The emptied vector's allocation is freed with it: a busy minute's would otherwise be
        // kept. Entries differ in their queue number, so the order is total and the same as a
        // heap's.
        self.sorted = bucket;
        self.sorted.sort_unstable();
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agenda_gives_events_in_time_then_queue_order_across_minutes() {
        let mut agenda = Agenda::default();
        agenda.push(190_000, Due::Tick);
        agenda.push(5, Due::Arrival { class: 1 });
        agenda.push(5, Due::Arrival { class: 0 });
        agenda.push(61_000, Due::Arrival { class: 2 });
        let (at, due) = agenda.pop_before(i64::MAX).unwrap();
        assert_eq!((at, due), (5, Due::Arrival { class: 1 }));
        // Pushed into the minute being drained, and earlier than the rest.
        agenda.push(7, Due::GridEnd { programme: 0 });
        let order: Vec<i64> = std::iter::from_fn(|| agenda.pop_before(190_000))
            .map(|(at, _)| at)
            .collect();
        assert_eq!(order, vec![5, 7, 61_000]);
        assert_eq!(agenda.len(), 1);
        assert_eq!(agenda.pop_before(i64::MAX), Some((190_000, Due::Tick)));
        assert!(agenda.is_empty());
    }

    #[test]
    fn events_queued_into_the_running_minute_interleave_with_those_queued_before_it() {
        let mut agenda = Agenda::default();
        agenda.push(40_000, Due::Arrival { class: 0 });
        agenda.push(5, Due::Arrival { class: 1 });
        agenda.push(20_000, Due::Arrival { class: 2 });
        assert_eq!(
            agenda.pop_before(i64::MAX),
            Some((5, Due::Arrival { class: 1 }))
        );
        // Queued while its minute runs: before, between and (at an equal time) after the
        // minute's earlier entries.
        agenda.push(40_000, Due::GridEnd { programme: 1 });
        agenda.push(7, Due::GridStart { programme: 0 });
        agenda.push(30_000, Due::GridEnd { programme: 0 });
        let order: Vec<(i64, Due)> = std::iter::from_fn(|| agenda.pop_before(i64::MAX)).collect();
        assert_eq!(
            order,
            vec![
                (7, Due::GridStart { programme: 0 }),
                (20_000, Due::Arrival { class: 2 }),
                (30_000, Due::GridEnd { programme: 0 }),
                (40_000, Due::Arrival { class: 0 }),
                (40_000, Due::GridEnd { programme: 1 }),
            ]
        );
        assert!(agenda.is_empty());
    }

    #[test]
    fn events_beyond_the_rings_horizon_come_in_order_with_the_rest() {
        let mut agenda = Agenda::default();
        let far = (HORIZON_MINUTES + 5) * BUCKET_MS;
        agenda.push(far + 1, Due::Arrival { class: 0 });
        agenda.push(2 * far, Due::Arrival { class: 1 });
        agenda.push(far, Due::Arrival { class: 2 });
        agenda.push(30_000, Due::Tick);
        assert_eq!(agenda.pop_before(i64::MAX), Some((30_000, Due::Tick)));
        // Queued once the ring has moved: before the far ones, and between them.
        agenda.push(far - BUCKET_MS, Due::GridStart { programme: 0 });
        assert_eq!(
            agenda.pop_before(far),
            Some((far - BUCKET_MS, Due::GridStart { programme: 0 }))
        );
        assert_eq!(agenda.pop_before(far), None);
        agenda.push(far + 2 * BUCKET_MS, Due::GridEnd { programme: 0 });
        let order: Vec<i64> = std::iter::from_fn(|| agenda.pop_before(i64::MAX))
            .map(|(at, _)| at)
            .collect();
        assert_eq!(order, vec![far, far + 1, far + 2 * BUCKET_MS, 2 * far]);
        assert!(agenda.is_empty());
    }
}
