//! Unit tests of the in-memory ledger's batch rules.

use super::*;

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn owner() -> OwnerId {
    OwnerId::new("alice").unwrap()
}

fn request(name: &str) -> RequestId {
    RequestId::new(name).unwrap()
}

fn transfer(kind: TransferKind, debit: AccountId, credit: AccountId, amount: i64) -> Transfer {
    transfer_for("r1", kind, debit, credit, amount)
}

fn transfer_for(
    request_id: &str,
    kind: TransferKind,
    debit: AccountId,
    credit: AccountId,
    amount: i64,
) -> Transfer {
    Transfer::new(TransferSpec {
        kind,
        debit,
        credit,
        amount: MicroUsd(amount),
        request_id: request(request_id),
        segment: Segment(0),
        quantity: 0,
        at: TimestampMs(1_000),
    })
    .unwrap()
}

fn top_up(request_id: &str, amount: i64) -> Transfer {
    transfer_for(
        request_id,
        TransferKind::TopUp,
        AccountId::TenantDeposits,
        AccountId::Tenant(tenant()),
        amount,
    )
}

fn charge(amount: i64) -> Transfer {
    transfer(
        TransferKind::TokenCharge,
        AccountId::Tenant(tenant()),
        AccountId::PlatformRevenue,
        amount,
    )
}

fn ledger() -> Ledger {
    let mut ledger = Ledger::new();
    ledger.open_account(AccountId::Tenant(tenant()));
    ledger.open_account(AccountId::Owner(owner()));
    ledger
}

fn balance(ledger: &Ledger, account: &AccountId) -> i64 {
    ledger.account(account).unwrap().balance().0
}

#[test]
fn a_retry_with_the_same_fields_exists_and_moves_nothing() {
    let mut ledger = ledger();
    assert_eq!(
        ledger.commit(&[top_up("t1", 500)]),
        Ok(vec![Outcome::Created])
    );
    assert_eq!(
        ledger.commit(&[top_up("t1", 500)]),
        Ok(vec![Outcome::Exists])
    );
    assert_eq!(balance(&ledger, &AccountId::Tenant(tenant())), 500);
    assert_eq!(ledger.transfers().count(), 1);
}

#[test]
fn a_retry_with_different_fields_is_a_conflict() {
    let mut ledger = ledger();
    ledger.commit(&[top_up("t1", 500)]).unwrap();
    let error = ledger.commit(&[top_up("t1", 501)]).unwrap_err();
    assert!(
        matches!(error, LedgerError::Conflict { index: 0, .. }),
        "{error}"
    );
    assert!(error
        .to_string()
        .contains("already exists with different fields"));
}

#[test]
fn a_prepaid_tenant_cannot_spend_more_than_its_balance() {
    let mut ledger = ledger();
    ledger.commit(&[top_up("t1", 100)]).unwrap();
    let error = ledger.commit(&[charge(101)]).unwrap_err();
    assert!(matches!(
        error,
        LedgerError::InsufficientFunds {
            balance_after: MicroUsd(-1),
            floor: MicroUsd(0),
            ..
        }
    ));
    assert_eq!(ledger.commit(&[charge(100)]), Ok(vec![Outcome::Created]));
    assert_eq!(balance(&ledger, &AccountId::Tenant(tenant())), 0);
}

#[test]
fn a_credit_limit_lets_the_balance_go_negative_up_to_the_limit() {
    let mut ledger = ledger();
    assert!(ledger.set_credit_limit(&tenant(), MicroUsd(1_000)));
    assert!(ledger.commit(&[charge(1_001)]).is_err());
    assert!(ledger.commit(&[charge(1_000)]).is_ok());
    assert_eq!(balance(&ledger, &AccountId::Tenant(tenant())), -1_000);
}

#[test]
fn a_failing_transfer_leaves_the_whole_batch_unapplied() {
    let mut ledger = ledger();
    let batch = [top_up("t1", 100), charge(150)];
    assert!(ledger.commit(&batch).is_err());
    assert_eq!(balance(&ledger, &AccountId::Tenant(tenant())), 0);
    assert_eq!(ledger.transfers().count(), 0);
    // In order, a top-up large enough makes the same charge pass.
    assert!(ledger.commit(&[top_up("t2", 200), charge(150)]).is_ok());
    assert_eq!(balance(&ledger, &AccountId::Tenant(tenant())), 50);
}

#[test]
fn a_duplicate_inside_one_batch_is_applied_once() {
    let mut ledger = ledger();
    let outcomes = ledger
        .commit(&[top_up("t1", 70), top_up("t1", 70)])
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Created, Outcome::Exists]);
    assert_eq!(balance(&ledger, &AccountId::Tenant(tenant())), 70);
    assert!(ledger
        .commit(&[top_up("t2", 70), top_up("t2", 71)])
        .is_err());
}

#[test]
fn an_owner_is_never_paid_out_beyond_its_balance() {
    let mut ledger = ledger();
    let owner_account = AccountId::Owner(owner());
    let share = transfer(
        TransferKind::RevenueShare,
        AccountId::PlatformRevenue,
        owner_account.clone(),
        40,
    );
    ledger.commit(&[share]).unwrap();
    let payout = |amount| {
        transfer_for(
            "p1",
            TransferKind::Payout,
            owner_account.clone(),
            AccountId::Payouts(Instrument::Cash),
            amount,
        )
    };
    assert!(matches!(
        ledger.commit(&[payout(41)]),
        Err(LedgerError::InsufficientFunds { .. })
    ));
    assert!(ledger.commit(&[payout(40)]).is_ok());
    assert_eq!(balance(&ledger, &owner_account), 0);
}

#[test]
fn transfers_to_unknown_accounts_are_refused() {
    let mut ledger = Ledger::new();
    let error = ledger.commit(&[top_up("t1", 5)]).unwrap_err();
    assert_eq!(
        error,
        LedgerError::AccountNotFound {
            index: 0,
            account: AccountId::Tenant(tenant())
        }
    );
}

#[test]
fn verify_accepts_a_consistent_ledger_and_reports_tampering() {
    let mut ledger = ledger();
    ledger.commit(&[top_up("t1", 300), charge(120)]).unwrap();
    let report = verify_ledger(&ledger);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!((report.transfers, report.volume_micro_usd), (2, 420));

    // An account whose posted totals were edited no longer matches its transfers.
    let mut verifier = Verifier::default();
    for transfer in ledger.transfers() {
        verifier.add_transfer(transfer);
    }
    let mut accounts: Vec<(AccountId, AccountState)> = ledger
        .accounts()
        .map(|(id, state)| (id.clone(), *state))
        .collect();
    for (id, state) in &mut accounts {
        if *id == AccountId::PlatformRevenue {
            state.credits_posted = MicroUsd(121);
        }
    }
    let no_reversals = std::collections::HashMap::new();
    let report = verifier.finish(
        accounts.iter().map(|(id, state)| (id, state)),
        &no_reversals,
    );
    assert!(report
        .problems
        .iter()
        .any(|p| matches!(p, Problem::AccountMismatch { .. })));
    assert!(report
        .problems
        .iter()
        .any(|p| matches!(p, Problem::TotalsUnbalanced { .. })));
}

#[test]
fn the_batch_size_is_bounded() {
    let mut ledger = ledger();
    let batch = vec![top_up("t1", 1); ledger::BATCH_TRANSFERS_MAX + 1];
    assert!(matches!(
        ledger.commit(&batch),
        Err(LedgerError::BatchTooLarge { .. })
    ));
}

fn owner_transfer(kind: TransferKind, amount: i64) -> Transfer {
    let owner_account = AccountId::Owner(owner());
    match kind {
        TransferKind::RevenueShare => {
            transfer(kind, AccountId::PlatformRevenue, owner_account, amount)
        }
        TransferKind::RevenueClawback => {
            transfer(kind, owner_account, AccountId::PlatformRevenue, amount)
        }
        TransferKind::Payout => transfer_for(
            "p1",
            kind,
            owner_account,
            AccountId::Payouts(Instrument::Cash),
            amount,
        ),
        _ => unreachable!("not an owner transfer in these tests: {kind}"),
    }
}

#[test]
fn a_clawback_of_what_was_paid_out_leaves_the_owner_owing() {
    let mut ledger = ledger();
    ledger
        .commit(&[owner_transfer(TransferKind::RevenueShare, 40)])
        .unwrap();
    ledger
        .commit(&[owner_transfer(TransferKind::Payout, 30)])
        .unwrap();
    let plan = plan_batch(
        &[owner_transfer(TransferKind::RevenueClawback, 40)],
        &std::collections::HashMap::new(),
        &ledger
            .accounts()
            .map(|(id, state)| (id.clone(), *state))
            .collect(),
    )
    .unwrap();
    assert_eq!(plan.shortfall, MicroUsd(30));
    ledger
        .commit(&[owner_transfer(TransferKind::RevenueClawback, 40)])
        .unwrap();
    let owner_account = AccountId::Owner(owner());
    assert_eq!(balance(&ledger, &owner_account), -30);
    let report = verify_ledger(&ledger);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.owed_by_owners, vec![(owner(), MicroUsd(30))]);
    // Nothing more can be paid out until later earnings repay the debt.
    let payout = transfer_for(
        "p2",
        TransferKind::Payout,
        owner_account,
        AccountId::Payouts(Instrument::Cash),
        1,
    );
    assert!(matches!(
        ledger.commit(&[payout]),
        Err(LedgerError::InsufficientFunds { .. })
    ));
}

#[test]
fn verify_refuses_a_reversal_that_does_not_mirror_its_original() {
    let mut ledger = ledger();
    ledger
        .commit(&[
            top_up("t1", 100),
            charge(50),
            owner_transfer(TransferKind::RevenueShare, 40),
            owner_transfer(TransferKind::RevenueClawback, 41),
        ])
        .unwrap();
    let refund = |request_id: &str, amount| {
        transfer_for(
            request_id,
            TransferKind::Refund,
            AccountId::PlatformRevenue,
            AccountId::Tenant(tenant()),
            amount,
        )
    };
    // A refund of a request that was never charged, and a clawback of one
    // more than was paid.
    ledger.commit(&[refund("r2", 5)]).unwrap();
    let problems = verify_ledger(&ledger).problems;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems
        .iter()
        .all(|problem| matches!(problem, Problem::BadReversal { .. })));
}

#[test]
fn verify_refuses_refunds_beyond_the_charge() {
    let mut ledger = ledger();
    ledger.commit(&[top_up("t1", 100), charge(50)]).unwrap();
    let refund = |segment: u32, amount| {
        let mut spec = charge(1).spec().clone();
        spec.kind = TransferKind::Refund;
        (spec.debit, spec.credit) = (spec.credit, spec.debit);
        spec.segment = Segment(segment);
        spec.amount = MicroUsd(amount);
        Transfer::new(spec).unwrap()
    };
    ledger.commit(&[refund(0, 30), refund(1, 20)]).unwrap();
    assert!(verify_ledger(&ledger).is_ok());
    ledger.commit(&[refund(2, 1)]).unwrap();
    let problems = verify_ledger(&ledger).problems;
    assert!(
        matches!(
            problems.as_slice(),
            [Problem::OverRefunded {
                charged: 50,
                refunded: 51,
                ..
            }]
        ),
        "{problems:?}"
    );
}

#[test]
fn verify_refuses_an_owner_below_zero_by_more_than_clawbacks_took() {
    // A payout beyond the balance, which a ledger would refuse, fed to the
    // verifier directly: the clawback explains 10 of the 50 owed.
    let share = owner_transfer(TransferKind::RevenueShare, 10);
    let clawback = owner_transfer(TransferKind::RevenueClawback, 10);
    let payout = owner_transfer(TransferKind::Payout, 10);
    let mut verifier = Verifier::default();
    for transfer in [&share, &payout, &clawback] {
        verifier.add_transfer(transfer);
    }
    let owner_state = AccountState {
        debits_posted: MicroUsd(20),
        credits_posted: MicroUsd(10),
        floor: Some(MicroUsd::ZERO),
    };
    let revenue = AccountState {
        debits_posted: MicroUsd(10),
        credits_posted: MicroUsd(10),
        floor: None,
    };
    let cash = AccountState {
        debits_posted: MicroUsd(0),
        credits_posted: MicroUsd(10),
        floor: None,
    };
    let accounts = [
        (AccountId::Owner(owner()), owner_state),
        (AccountId::PlatformRevenue, revenue),
        (AccountId::Payouts(Instrument::Cash), cash),
    ];
    let originals = std::collections::HashMap::from([(share.id(), share.clone())]);
    // Owed 10 after a clawback of 10: explained.
    let report = verifier.finish(accounts.iter().map(|(id, state)| (id, state)), &originals);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.owed_by_owners, vec![(owner(), MicroUsd(10))]);

    // The same with the payout 10 larger: 20 below zero, 10 unexplained.
    let mut verifier = Verifier::default();
    let bigger = transfer_for(
        "p1",
        TransferKind::Payout,
        AccountId::Owner(owner()),
        AccountId::Payouts(Instrument::Cash),
        20,
    );
    for transfer in [&share, &bigger, &clawback] {
        verifier.add_transfer(transfer);
    }
    let mut accounts = accounts;
    accounts[0].1.debits_posted = MicroUsd(30);
    accounts[2].1.credits_posted = MicroUsd(20);
    let report = verifier.finish(accounts.iter().map(|(id, state)| (id, state)), &originals);
    assert!(
        matches!(
            report.problems.as_slice(),
            [Problem::NegativeOwnerBalance { balance: -20, .. }]
        ),
        "{:?}",
        report.problems
    );
}
