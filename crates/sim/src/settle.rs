//! Money through the production settlement code: every segment a lease ran
//! on a vehicle, and every batch of escalated requests, is settled by
//! `ledger::settlement::settle` against the price book, and its transfers
//! are summed by kind and by owner.

use ledger::core::{
    DurationMs, MicroUsd, MicroWh, ModelId, NodeId, OwnerId, RequestId, Segment, TenantId,
    TimestampMs, TokenCount, TransferKind,
};
use ledger::metering::{Server, UsageSegment};
use ledger::pricing::PriceBook;
use ledger::settlement::{settle, CompletedRequest};

use domain::TenantClass;

use crate::stats::Money;

/// What one settlement is about.
#[derive(Debug, Clone, Copy)]
pub struct Work {
    /// The lease (or escalation batch) and its segment, which name the
    /// settled request; segment 0 is an escalation batch.
    pub serial: u64,
    pub segment: u32,
    pub class: TenantClass,
    pub admitted_at: i64,
    pub completed_at: i64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The vehicle it ran on, with its energy (Wh), compute time and the
    /// owner's tariff ($/kWh) when it started; `None`: the cloud.
    pub vehicle: Option<(u32, f64, i64, f64)>,
    pub started_at: i64,
}

/// What the settlement thread hands back.
pub struct Settled {
    pub money: Money,
    /// Per vehicle: revenue share and energy reimbursed, micro-dollars.
    pub owners: Vec<(i64, i64)>,
    pub failures: u64,
    pub first_failure: Option<String>,
}

/// Work settled in batches on a thread of its own (the production
/// settlement hashes every transfer's id), in the order it was sent; the
/// sums do not depend on when it runs.
pub struct SettlementThread {
    sender: std::sync::mpsc::SyncSender<Vec<Work>>,
    batch: Vec<Work>,
    handle: std::thread::JoinHandle<Settled>,
}

const BATCH: usize = 4_096;

impl SettlementThread {
    pub fn start(settler: Settler, vehicles: usize) -> SettlementThread {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<Work>>(16);
        let handle = std::thread::spawn(move || {
            let mut settler = settler;
            let mut settled = Settled {
                money: Money::default(),
                owners: vec![(0, 0); vehicles],
                failures: 0,
                first_failure: None,
            };
            for batch in receiver {
                for work in &batch {
                    settler.settle(work, &mut settled);
                }
            }
            settled
        });
        SettlementThread {
            sender,
            batch: Vec::with_capacity(BATCH),
            handle,
        }
    }

    pub fn send(&mut self, work: Work) {
        self.batch.push(work);
        if self.batch.len() >= BATCH {
            let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
            // The thread only stops when this side hangs up.
            let _ = self.sender.send(batch);
        }
    }

    /// Settles what is left and waits for the sums.
    pub fn finish(self) -> Settled {
        let SettlementThread {
            sender,
            batch,
            handle,
        } = self;
        let _ = sender.send(batch);
        drop(sender);
        handle.join().expect("the settlement thread does not panic")
    }
}

/// Settles work and books its transfers.
pub struct Settler {
    book: PriceBook,
    fleet_model: ModelId,
    cloud_model: ModelId,
    tenants: [TenantId; 3],
}

impl Settler {
    pub fn new(book: PriceBook, fleet_model: &str, cloud_model: &str) -> Result<Settler, String> {
        let model = |name: &str| ModelId::new(name).map_err(|error| format!("{name}: {error}"));
        let tenant = |class: TenantClass| {
            TenantId::new(format!("sim-{}", class.as_str())).expect("a valid tenant id")
        };
        let settler = Settler {
            fleet_model: model(fleet_model)?,
            cloud_model: model(cloud_model)?,
            tenants: TenantClass::ALL.map(tenant),
            book,
        };
        for class in TenantClass::ALL {
            let sheet = settler.book.sheet_at(TimestampMs(0));
            sheet
                .rate(&settler.fleet_model, class)
                .map_err(|error| format!("the price sheet: {error}"))?;
            sheet
                .rate(&settler.cloud_model, class)
                .map_err(|error| format!("the price sheet: {error}"))?;
        }
        Ok(settler)
    }

    /// Settles `work` into `settled`.
    fn settle(&mut self, work: &Work, settled: &mut Settled) {
        if work.prompt_tokens == 0
            && work.completion_tokens == 0
            && work.vehicle.is_none_or(|(_, wh, _, _)| wh <= 0.0)
        {
            return;
        }
        let name = match work.vehicle {
            Some(_) => format!("lease-{}-{}", work.serial, work.segment),
            None => format!("cloud-{}", work.serial),
        };
        let request_id = match RequestId::new(name) {
            Ok(id) => id,
            Err(error) => return failed(settled, error.to_string()),
        };
        let (server, model) = match work.vehicle {
            Some((vehicle, wh, _, tariff)) => {
                let node = NodeId::new(format!("v{vehicle}"));
                let owner = OwnerId::new(format!("o{vehicle}"));
                let (Ok(node), Ok(owner)) = (node, owner) else {
                    return failed(settled, "a vehicle id".into());
                };
                let server = Server::Node {
                    node,
                    owner,
                    energy: MicroWh((wh * 1e6) as u64),
                    tariff_per_kwh: MicroUsd((tariff * 1e6).round() as i64),
                };
                (server, self.fleet_model.clone())
            }
            None => (Server::Cloud, self.cloud_model.clone()),
        };
        let compute = work.vehicle.map_or(0, |(_, _, ms, _)| ms.max(0) as u64);
        let completed = CompletedRequest {
            request_id: request_id.clone(),
            tenant: self.tenants[work.class.index()].clone(),
            class: work.class,
            admitted_at: TimestampMs(work.admitted_at),
            completed_at: TimestampMs(work.completed_at),
            segments: vec![UsageSegment {
                request_id,
                segment: Segment(0),
                server,
                model,
                prompt_tokens: TokenCount(work.prompt_tokens),
                completion_tokens: TokenCount(work.completion_tokens),
                compute: DurationMs(compute),
                started_at: TimestampMs(work.started_at),
            }],
        };
        let settlement = match settle(&completed, &self.book) {
            Ok(settlement) => settlement,
            Err(error) => return failed(settled, error.to_string()),
        };
        let money = &mut settled.money;
        money.charged[work.class.index()] += settlement.charge.0;
        money.cloud_charged += settlement.cloud_charge.0;
        for transfer in &settlement.transfers {
            let amount = transfer.amount().0;
            let owner = work.vehicle.map(|(vehicle, ..)| vehicle as usize);
            match transfer.kind() {
                TransferKind::RevenueShare => {
                    money.revenue_share += amount;
                    if let Some(owner) = owner {
                        settled.owners[owner].0 += amount;
                    }
                }
                TransferKind::EnergyReimbursement => {
                    money.energy_reimbursed += amount;
                    if let Some(owner) = owner {
                        settled.owners[owner].1 += amount;
                    }
                }
                TransferKind::CloudCost => money.cloud_cost += amount,
                // A settlement posts reversals only for a clawback ordered
                // before it; the simulation orders none, and verification is
                // paid outside settlement.
                TransferKind::TokenCharge
                | TransferKind::TopUp
                | TransferKind::Payout
                | TransferKind::RevenueClawback
                | TransferKind::EnergyClawback
                | TransferKind::Refund
                | TransferKind::VerificationPay
                | TransferKind::VerificationEnergy
                | TransferKind::VerificationPayClawback
                | TransferKind::VerificationEnergyClawback => {}
            }
        }
    }
}

fn failed(settled: &mut Settled, reason: String) {
    settled.failures += 1;
    settled.first_failure.get_or_insert(reason);
}
