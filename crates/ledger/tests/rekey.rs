//! Re-keying accounts from user-chosen names to immutable ids, on SQLite and
//! PostgreSQL: balances, usage, invoices and statements follow the account,
//! ids may be swapped, and a second run changes nothing.

#[macro_use]
mod common;

use common::node_segment;
use ledger::core::{
    AccountId, MicroUsd, NodeId, OwnerId, RequestId, TenantId, TimestampMs, TokenCount,
};
use ledger::pricing::TenantClass;
use ledger::settlement::CompletedRequest;
use ledger::statement::Period;
use ledger::store::{verify, Rekey, RekeyOutcome, Store};

fn tenant(name: &str) -> AccountId {
    AccountId::Tenant(TenantId::new(name).unwrap())
}

fn owner(name: &str) -> AccountId {
    AccountId::Owner(OwnerId::new(name).unwrap())
}

async fn balance(store: &Store, account: &AccountId) -> Option<i64> {
    let state = store.account(account).await.unwrap();
    state.map(|state| state.balance().0)
}

fn request(id: &str, tenant: &str, owner: &str, at_ms: i64) -> CompletedRequest {
    CompletedRequest {
        request_id: RequestId::new(id).unwrap(),
        tenant: TenantId::new(tenant).unwrap(),
        class: TenantClass::Spot,
        admitted_at: TimestampMs(at_ms - 1_000),
        completed_at: TimestampMs(at_ms),
        segments: vec![node_segment(
            id,
            0,
            "car-a",
            owner,
            1_000,
            300,
            at_ms - 1_000,
        )],
    }
}

/// A ledger written with names as keys: tenant `acme` (who will be id 2)
/// and tenant `2` (a tenant literally named "2", who will be id 9), each
/// topped up and charged once; owner `alice` (id 7) earned from car-a.
async fn write_named_ledger(store: &Store) {
    for (name, amount) in [("acme", 1_000_000), ("2", 2_000_000)] {
        let id = TenantId::new(name).unwrap();
        store.ensure_tenant(&id, false).await.unwrap();
        let reference = RequestId::new(format!("top-up:{name}")).unwrap();
        store
            .top_up(&id, MicroUsd(amount), &reference, TimestampMs(1))
            .await
            .unwrap();
    }
    store
        .set_daily_cap(&TenantId::new("acme").unwrap(), Some(MicroUsd(500_000)))
        .await
        .unwrap();
    store.open_account(&owner("alice")).await.unwrap();
    let book = common::book();
    store
        .settle(&request("r-acme", "acme", "alice", 10_000), &book)
        .await
        .unwrap();
    store
        .settle(&request("r-two", "2", "alice", 20_000), &book)
        .await
        .unwrap();
}

fn id_keys() -> Vec<Rekey> {
    vec![
        Rekey {
            from: tenant("acme"),
            to: tenant("2"),
        },
        Rekey {
            from: tenant("2"),
            to: tenant("9"),
        },
        Rekey {
            from: owner("alice"),
            to: owner("7"),
        },
        // Listed but never written: skipped.
        Rekey {
            from: owner("nobody"),
            to: owner("8"),
        },
    ]
}

async fn names_move_to_ids_once(store: &Store) {
    write_named_ledger(store).await;
    let acme_before = balance(store, &tenant("acme")).await.unwrap();
    let two_before = balance(store, &tenant("2")).await.unwrap();
    let alice_before = balance(store, &owner("alice")).await.unwrap();
    assert_ne!(
        acme_before, two_before,
        "the two tenants must be told apart"
    );
    let transfers = store.transfer_count().await.unwrap();

    let outcome = store
        .rekey_accounts("names-to-ids", &id_keys(), TimestampMs(30_000))
        .await
        .unwrap();
    assert_eq!(outcome, RekeyOutcome::Applied { accounts: 3 });
    // acme's money is now on id 2, and tenant "2"'s on id 9: a swap.
    assert_eq!(balance(store, &tenant("2")).await, Some(acme_before));
    assert_eq!(balance(store, &tenant("9")).await, Some(two_before));
    assert_eq!(balance(store, &tenant("acme")).await, None);
    assert_eq!(balance(store, &owner("7")).await, Some(alice_before));
    assert_eq!(balance(store, &owner("alice")).await, None);
    assert_eq!(balance(store, &owner("8")).await, None);
    assert_eq!(store.transfer_count().await.unwrap(), transfers);

    // Usage, caps and statements follow the ids.
    let all = Period {
        from: TimestampMs(0),
        until: TimestampMs(100_000),
    };
    let usage = store
        .tenant_usage(&TenantId::new("2").unwrap(), all)
        .await
        .unwrap();
    assert_eq!(usage.totals.requests, 1);
    let lines = store
        .tenant_requests(&TenantId::new("2").unwrap(), all)
        .await
        .unwrap();
    assert_eq!(lines[0].request_id.as_str(), "r-acme");
    assert_eq!(
        store.daily_cap(&TenantId::new("2").unwrap()).await.unwrap(),
        Some(MicroUsd(500_000))
    );
    assert_eq!(
        store.daily_cap(&TenantId::new("9").unwrap()).await.unwrap(),
        None
    );
    let statement = store
        .statement(&NodeId::new("car-a").unwrap(), all)
        .await
        .unwrap();
    assert_eq!(statement.lines.len(), 2);
    assert!(statement
        .lines
        .iter()
        .all(|line| line.owner.as_str() == "7"));
    assert_eq!(statement.totals.completion_tokens, TokenCount(600));
    let report = verify(store).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);

    // A second run, even with other keys, changes nothing.
    let again = store
        .rekey_accounts("names-to-ids", &id_keys()[..1], TimestampMs(40_000))
        .await
        .unwrap();
    assert_eq!(again, RekeyOutcome::AlreadyApplied);
    assert_eq!(balance(store, &tenant("2")).await, Some(acme_before));
    assert_eq!(balance(store, &tenant("9")).await, Some(two_before));

    // New charges land on the ids.
    store
        .settle(&request("r-after", "2", "7", 50_000), &common::book())
        .await
        .unwrap();
    assert!(balance(store, &tenant("2")).await.unwrap() < acme_before);
    assert!(verify(store).await.unwrap().is_ok());
}

/// A move onto an account that exists outside the re-keying adds up.
async fn a_move_onto_an_existing_account_merges(store: &Store) {
    write_named_ledger(store).await;
    store.open_account(&owner("7")).await.unwrap();
    let alice = balance(store, &owner("alice")).await.unwrap();
    let rekeys = [Rekey {
        from: owner("alice"),
        to: owner("7"),
    }];
    store
        .rekey_accounts("owners", &rekeys, TimestampMs(30_000))
        .await
        .unwrap();
    assert_eq!(balance(store, &owner("7")).await, Some(alice));
    assert_eq!(balance(store, &owner("alice")).await, None);
    assert!(verify(store).await.unwrap().is_ok());
}

on_both_backends!(
    names_move_to_ids_once,
    a_move_onto_an_existing_account_merges
);
