//! Property tests: random sequences of requests (some migrating between
//! vehicles, some escalated), price changes, top-ups, payouts and retries.
//!
//! After every step: debits equal credits and every balance is explained by
//! its transfers, no owner balance is negative, no payout exceeds the balance
//! it came from, a retry never creates a transfer, and a migrated request
//! costs the customer exactly what it would have cost unmigrated. The same
//! sequences also run against SQLite and PostgreSQL, whose outcomes and
//! balances must equal the in-memory ledger's.

mod common;

use std::collections::BTreeMap;

use ledger::core::{
    verify_ledger, AccountId, Instrument, Ledger, MicroUsd, Outcome, OwnerId, RequestId, Segment,
    TenantId, TimestampMs, Transfer, TransferKind, TransferSpec,
};
use ledger::metering::UsageSegment;
use ledger::payout::{self, PayoutAmount, PayoutOrder, PayoutRates};
use ledger::pricing::{PriceBook, TenantClass};
use ledger::settlement::{settle, CompletedRequest};
use ledger::store::Store;
use proptest::prelude::*;

const TENANTS: usize = 3;
const OWNERS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A request; one entry per segment: (owner, completion tokens), or
    /// `None` for a cloud segment (escalation).
    Request {
        tenant: usize,
        class: TenantClass,
        prompt: u64,
        segments: Vec<(Option<usize>, u64)>,
    },
    RetryRequest(usize),
    PriceChange {
        owner_share_bps: u32,
        margin_bps: u32,
    },
    TopUp {
        tenant: usize,
        amount: i64,
    },
    Payout {
        owner: usize,
        instrument: usize,
        up_to: Option<i64>,
    },
    RetryPayout(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let class = prop_oneof![
        Just(TenantClass::Spot),
        Just(TenantClass::Reserved),
        Just(TenantClass::Fleet)
    ];
    let segment = (prop::option::weighted(0.85, 0..OWNERS), 0_u64..4_000);
    prop_oneof![
        5 => (0..TENANTS, class, 1_u64..8_000, prop::collection::vec(segment, 1..4))
            .prop_map(|(tenant, class, prompt, segments)| Op::Request { tenant, class, prompt, segments }),
        2 => (0_usize..1_000).prop_map(Op::RetryRequest),
        1 => (0_u32..=10_000, 0_u32..5_000)
            .prop_map(|(owner_share_bps, margin_bps)| Op::PriceChange { owner_share_bps, margin_bps }),
        1 => (0..TENANTS, 1_i64..20_000).prop_map(|(tenant, amount)| Op::TopUp { tenant, amount }),
        2 => (0..OWNERS, 0_usize..4, prop::option::of(0_i64..3_000))
            .prop_map(|(owner, instrument, up_to)| Op::Payout { owner, instrument, up_to }),
        1 => (0_usize..1_000).prop_map(Op::RetryPayout),
    ]
}

fn tenant(index: usize) -> TenantId {
    TenantId::new(format!("tenant-{index}")).unwrap()
}

fn owner(index: usize) -> OwnerId {
    OwnerId::new(format!("owner-{index}")).unwrap()
}

fn rates() -> PayoutRates {
    PayoutRates::new([
        (Instrument::Cash, MicroUsd(10_000)),
        (Instrument::ChargingCredit, MicroUsd(180)),
        (Instrument::SubscriptionCredit, MicroUsd(8_000)),
        (Instrument::RideCredit, MicroUsd(9_000)),
    ])
    .unwrap()
}

/// What a step asks the ledger to do, in a form every backend can replay.
#[derive(Debug, Clone)]
enum Step {
    Batch(Vec<Transfer>),
    Settle(CompletedRequest),
    Payout(PayoutOrder),
}

/// The reference model: the in-memory ledger plus what the sequence produced.
struct Model {
    ledger: Ledger,
    book: PriceBook,
    now: i64,
    requests: Vec<CompletedRequest>,
    payouts: Vec<PayoutOrder>,
}

impl Model {
    fn new() -> Model {
        let mut ledger = Ledger::new();
        for index in 0..TENANTS {
            ledger.open_account(AccountId::Tenant(tenant(index)));
        }
        // Tenant 0 is prepaid; the others have credit.
        ledger.set_credit_limit(&tenant(1), MicroUsd(5_000));
        ledger.set_credit_limit(&tenant(2), MicroUsd(50_000));
        for index in 0..OWNERS {
            ledger.open_account(AccountId::Owner(owner(index)));
        }
        Model {
            ledger,
            book: common::book(),
            now: 1_000,
            requests: Vec::new(),
            payouts: Vec::new(),
        }
    }

    fn request(
        &mut self,
        tenant_index: usize,
        class: TenantClass,
        prompt: u64,
        segments: &[(Option<usize>, u64)],
    ) -> CompletedRequest {
        let id = format!("req-{}", self.requests.len());
        let mut generated = 0;
        let usage: Vec<UsageSegment> = segments
            .iter()
            .enumerate()
            .map(|(index, (owner_index, completion))| {
                // Later segments re-prefill the prompt and what was generated.
                let prefill = prompt + if index == 0 { 0 } else { generated };
                generated += completion;
                let position = u32::try_from(index).unwrap();
                match owner_index {
                    Some(o) => common::node_segment(
                        &id,
                        position,
                        &format!("car-{o}"),
                        owner(*o).as_str(),
                        prefill,
                        *completion,
                        self.now,
                    ),
                    None => common::cloud_segment(&id, position, prefill, *completion),
                }
            })
            .collect();
        CompletedRequest {
            request_id: RequestId::new(id).unwrap(),
            tenant: tenant(tenant_index),
            class,
            admitted_at: TimestampMs(self.now),
            completed_at: TimestampMs(self.now + 1),
            segments: usage,
        }
    }

    /// Turns an op into a step, updating the model's bookkeeping.
    fn step(&mut self, op: &Op) -> Option<Step> {
        self.now += 10;
        match op {
            Op::Request {
                tenant,
                class,
                prompt,
                segments,
            } => {
                let request = self.request(*tenant, *class, *prompt, segments);
                self.requests.push(request.clone());
                Some(Step::Settle(request))
            }
            Op::RetryRequest(pick) => {
                let count = self.requests.len();
                (count > 0).then(|| Step::Settle(self.requests[pick % count].clone()))
            }
            Op::PriceChange {
                owner_share_bps,
                margin_bps,
            } => {
                let sheet = common::sheet(*owner_share_bps, *margin_bps);
                self.book.publish(TimestampMs(self.now), sheet).unwrap();
                None
            }
            Op::TopUp {
                tenant: index,
                amount,
            } => {
                let transfer = Transfer::new(TransferSpec {
                    kind: TransferKind::TopUp,
                    debit: AccountId::TenantDeposits,
                    credit: AccountId::Tenant(tenant(*index)),
                    amount: MicroUsd(*amount),
                    request_id: RequestId::new(format!("topup-{}", self.now)).unwrap(),
                    segment: Segment(0),
                    quantity: 0,
                    at: TimestampMs(self.now),
                })
                .unwrap();
                Some(Step::Batch(vec![transfer]))
            }
            Op::Payout {
                owner: index,
                instrument,
                up_to,
            } => {
                let order = PayoutOrder {
                    payout_id: RequestId::new(format!("payout-{}", self.payouts.len())).unwrap(),
                    owner: owner(*index),
                    instrument: Instrument::ALL[*instrument],
                    amount: up_to.map_or(PayoutAmount::All, |amount| {
                        PayoutAmount::UpTo(MicroUsd(amount))
                    }),
                    at: TimestampMs(self.now),
                };
                self.payouts.push(order.clone());
                Some(Step::Payout(order))
            }
            Op::RetryPayout(pick) => {
                let count = self.payouts.len();
                (count > 0).then(|| Step::Payout(self.payouts[pick % count].clone()))
            }
        }
    }
}

/// Turns ops into replayable steps and the price book they were priced with.
fn plan(ops: &[Op]) -> (Vec<Step>, PriceBook) {
    let mut model = Model::new();
    let steps = ops.iter().filter_map(|op| model.step(op)).collect();
    (steps, model.book)
}

/// What a step did, comparable across backends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Applied(Vec<Outcome>),
    Refused,
}

fn apply_in_memory(ledger: &mut Ledger, book: &PriceBook, step: &Step) -> Effect {
    let result = match step {
        Step::Batch(batch) => ledger.commit(batch).map_err(drop),
        Step::Settle(request) => settle(request, book)
            .map_err(drop)
            .and_then(|settlement| ledger.commit(&settlement.transfers).map_err(drop)),
        Step::Payout(order) => payout::pay(ledger, order, &rates())
            .map(|receipt| vec![receipt.outcome])
            .map_err(drop),
    };
    result.map_or(Effect::Refused, Effect::Applied)
}

fn owner_balance(ledger: &Ledger, owner: &OwnerId) -> i64 {
    ledger
        .account(&AccountId::Owner(owner.clone()))
        .unwrap()
        .balance()
        .0
}

/// The charge the same request would have cost had it never migrated.
fn unmigrated_charge(request: &CompletedRequest, book: &PriceBook) -> Option<MicroUsd> {
    let first = &request.segments[0];
    if request.segments.iter().any(|s| s.model != first.model) {
        return None;
    }
    let mut single = first.clone();
    single.completion_tokens.0 = request.segments.iter().map(|s| s.completion_tokens.0).sum();
    let unmigrated = CompletedRequest {
        segments: vec![single],
        ..request.clone()
    };
    Some(settle(&unmigrated, book).ok()?.charge)
}

/// Applies one step to the in-memory ledger and checks every invariant.
fn check_step(ledger: &mut Ledger, book: &PriceBook, step: &Step, settled: &mut Vec<RequestId>) {
    let transfers_before = ledger.transfers().count();
    let payout_balance_before = match step {
        Step::Payout(order) => owner_balance(ledger, &order.owner),
        _ => 0,
    };
    let effect = apply_in_memory(ledger, book, step);
    let created = match &effect {
        Effect::Applied(outcomes) => outcomes.iter().filter(|o| **o == Outcome::Created).count(),
        Effect::Refused => 0,
    };
    assert_eq!(ledger.transfers().count(), transfers_before + created);

    let report = verify_ledger(ledger);
    assert!(report.is_ok(), "{:?}", report.problems);
    match step {
        Step::Settle(request) => {
            let retry = settled.contains(&request.request_id);
            if retry {
                assert_eq!(created, 0, "a retried settlement created transfers");
            } else if created > 0 {
                settled.push(request.request_id.clone());
                let charged: i64 = ledger
                    .transfers()
                    .filter(|t| {
                        t.request_id() == &request.request_id
                            && t.kind() == TransferKind::TokenCharge
                    })
                    .map(|t| t.amount().0)
                    .sum();
                if let Some(unmigrated) = unmigrated_charge(request, book) {
                    assert_eq!(
                        charged, unmigrated.0,
                        "migration changed what the customer pays"
                    );
                }
            }
        }
        Step::Payout(order) => {
            let after = owner_balance(ledger, &order.owner);
            assert!(after >= 0);
            let paid = payout_balance_before - after;
            assert!(paid <= payout_balance_before, "payout beyond the balance");
            if let Some(transfer) = ledger.transfer(order.transfer_id()) {
                assert!(transfer.amount().0 <= payout_balance_before || paid == 0);
            }
        }
        Step::Batch(_) => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_invariant_holds_over_random_sequences(ops in prop::collection::vec(op(), 1..80)) {
        let (steps, book) = plan(&ops);
        let mut ledger = Model::new().ledger;
        let mut settled = Vec::new();
        for step in &steps {
            check_step(&mut ledger, &book, step, &mut settled);
        }
    }
}

/// Replays steps on a store and checks outcomes and balances equal the model's.
async fn differential(store: &Store, steps: &[Step], book: &PriceBook) {
    let mut ledger = Model::new().ledger;
    for index in 0..TENANTS {
        store
            .open_account(&AccountId::Tenant(tenant(index)))
            .await
            .unwrap();
    }
    store
        .set_credit_limit(&tenant(1), MicroUsd(5_000))
        .await
        .unwrap();
    store
        .set_credit_limit(&tenant(2), MicroUsd(50_000))
        .await
        .unwrap();
    for index in 0..OWNERS {
        store
            .open_account(&AccountId::Owner(owner(index)))
            .await
            .unwrap();
    }
    for step in steps {
        let expected = apply_in_memory(&mut ledger, book, step);
        let actual = match step {
            Step::Batch(batch) => store.commit(batch).await.ok(),
            Step::Settle(request) => store.settle(request, book).await.ok().map(|r| r.outcomes),
            Step::Payout(order) => store
                .pay_out(order, &rates())
                .await
                .ok()
                .map(|r| vec![r.outcome]),
        };
        let actual = actual.map_or(Effect::Refused, Effect::Applied);
        assert_eq!(
            actual,
            expected,
            "{} disagrees with the model on {step:?}",
            store.backend_name()
        );
    }
    let stored: BTreeMap<_, _> = store.accounts().await.unwrap().into_iter().collect();
    let modelled: BTreeMap<_, _> = ledger
        .accounts()
        .map(|(id, state)| (id.clone(), *state))
        .collect();
    assert_eq!(stored, modelled);
    let report = ledger::store::verify(store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.transfers, ledger.transfers().count() as u64);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_agrees_with_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let (steps, book) = plan(&ops);
        runtime().block_on(async {
            let (store, _dir) = common::sqlite_store().await;
            differential(&store, &steps, &book).await;
            store.close().await;
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn postgres_agrees_with_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let (steps, book) = plan(&ops);
        runtime().block_on(async {
            let pg = common::postgres_store().await;
            differential(&pg.store, &steps, &book).await;
            pg.drop_schema().await;
        });
    }
}
