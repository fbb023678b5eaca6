//! The store's own tests: tenants, keys, nodes and the request log.

use super::*;
use crate::testing::{PgSchema, TestStore};

/// Attempts at a race between two processes creating the same name.
const RACES: usize = 20;

crate::on_each_backend!(
    tenants_keys_and_nodes_round_trip,
    two_handles_see_each_others_writes,
    concurrent_creates_of_one_name_have_one_winner,
    a_quarantine_holds_until_released_and_its_clawbacks_until_applied,
    answered_checks_wait_for_the_books_once_each,
    an_enrolment_token_is_spent_once_and_revoking_a_node_revokes_its_certificates,
    kept_completions_are_the_tenants_own_and_rerun_once_clawed_back,
);

/// The node authority is kept once; an enrolment token buys one
/// certificate, however many try it; revoking a node revokes its
/// certificates and its token, and only unexpired revocations are listed.
async fn an_enrolment_token_is_spent_once_and_revoking_a_node_revokes_its_certificates(
    test: &TestStore,
) {
    let store = &test.store;
    assert_eq!(store.node_authority().await.unwrap(), None);
    let kept = store
        .keep_node_authority("cert-a", "key-a", 1)
        .await
        .unwrap();
    assert_eq!(kept, ("cert-a".to_owned(), "key-a".to_owned()));
    // A second process's authority loses to the one kept first.
    let kept = store
        .keep_node_authority("cert-b", "key-b", 2)
        .await
        .unwrap();
    assert_eq!(kept, ("cert-a".to_owned(), "key-a".to_owned()));

    let token = store.add_node("car-1", "", 1).await.unwrap();
    assert!(!store.consume_enrolment("car-1", "fgn-wrong").await.unwrap());
    assert!(!store.consume_enrolment("car-2", &token).await.unwrap());
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..RACES {
        let (store, token) = (store.clone(), token.clone());
        racing.spawn(async move { store.consume_enrolment("car-1", &token).await.unwrap() });
    }
    let winners = racing
        .join_all()
        .await
        .into_iter()
        .filter(|spent| *spent)
        .count();
    assert_eq!(winners, 1, "the token bought more than one certificate");
    assert!(!store.consume_enrolment("car-1", &token).await.unwrap());

    store
        .record_certificate("01", "car-1", 10, 1_000)
        .await
        .unwrap();
    store
        .record_certificate("02", "car-1", 20, 2_000)
        .await
        .unwrap();
    store
        .revoke_certificate("01", certificates::ROTATED, 30)
        .await
        .unwrap();
    assert_eq!(
        store.revoked_certificates(500).await.unwrap(),
        vec![("01".to_owned(), certificates::ROTATED.to_owned())]
    );
    // Expired, it is no longer anything to refuse.
    assert_eq!(store.revoked_certificates(1_000).await.unwrap(), vec![]);

    let token = store
        .rotate_node_credential("car-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.revoke_node("car-1", "stolen", 40).await.unwrap(), 1);
    let all = store.node_certificates("car-1").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[0].revoked_reason.as_deref(),
        Some(certificates::ROTATED)
    );
    assert_eq!(all[1].revoked_reason.as_deref(), Some("stolen"));
    assert_eq!(all[1].revoked_ms, Some(40));
    assert!(
        !store.consume_enrolment("car-1", &token).await.unwrap(),
        "a revoked node's token still enrols"
    );
    // A new token after the revocation enrols again.
    let token = store
        .rotate_node_credential("car-1")
        .await
        .unwrap()
        .unwrap();
    assert!(store.consume_enrolment("car-1", &token).await.unwrap());
}

/// A cell records a vehicle's trust as it changes; a quarantine outlasts
/// later trust records until the operator releases it, and its clawbacks
/// wait for the books, once each.
async fn a_quarantine_holds_until_released_and_its_clawbacks_until_applied(test: &TestStore) {
    use crate::trust::TrustRecord;
    let store = &test.store;
    assert_eq!(store.node_trust("car-1").await.unwrap(), None);
    let record = |state: &str, verified, passed, updated_ms| TrustRecord {
        node: "car-1".into(),
        state: state.into(),
        verified,
        passed,
        reason: None,
        quarantined_ms: None,
        updated_ms,
    };
    store
        .record_trust(&record("probation", 3, 3, 10))
        .await
        .unwrap();
    assert_eq!(
        store.node_trust("car-1").await.unwrap(),
        Some(record("probation", 3, 3, 10))
    );
    assert!(!store.is_quarantined("car-1").await.unwrap());

    let suspects = ["chatcmpl-a".to_owned(), "chatcmpl-b".to_owned()];
    for _ in 0..2 {
        store
            .quarantine_node("car-1", "generation 7 failed verification", &suspects, 20)
            .await
            .unwrap();
    }
    // A cell's later record of its counts does not lift the quarantine.
    store
        .record_trust(&record("probation", 4, 3, 30))
        .await
        .unwrap();
    let trust = store.node_trust("car-1").await.unwrap().unwrap();
    assert_eq!(trust.state, "quarantined");
    assert_eq!(
        trust.reason.as_deref(),
        Some("generation 7 failed verification")
    );
    assert_eq!((trust.verified, trust.passed), (4, 3));
    assert!(store.is_quarantined("car-1").await.unwrap());

    let pending = store.pending_clawbacks(10).await.unwrap();
    let ids: Vec<&str> = pending.iter().map(|p| p.request_id.as_str()).collect();
    assert_eq!(ids, ["chatcmpl-a", "chatcmpl-b"], "each once");
    store
        .clawback_applied("car-1", "chatcmpl-a", 40)
        .await
        .unwrap();
    let pending = store.pending_clawbacks(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].request_id, "chatcmpl-b");

    // Its checks' pay waits to be taken back once per quarantine.
    let checks = store.pending_check_clawbacks(10).await.unwrap();
    assert_eq!(
        checks
            .iter()
            .map(|pending| (pending.node.as_str(), pending.quarantined_ms))
            .collect::<Vec<_>>(),
        [("car-1", 20)]
    );
    store.check_clawback_applied("car-1", 20, 45).await.unwrap();
    assert_eq!(store.pending_check_clawbacks(10).await.unwrap(), []);

    assert!(store.release_node("car-1", 50).await.unwrap());
    assert!(!store.is_quarantined("car-1").await.unwrap());
    assert_eq!(
        store.pending_check_clawbacks(10).await.unwrap(),
        [],
        "released"
    );
    store
        .quarantine_node("car-1", "again", &[], 55)
        .await
        .unwrap();
    let again = store.pending_check_clawbacks(10).await.unwrap();
    assert_eq!(
        (again[0].reason.as_str(), again[0].quarantined_ms),
        ("again", 55)
    );
    assert!(store.release_node("car-1", 58).await.unwrap());
    assert!(
        !store.release_node("car-1", 60).await.unwrap(),
        "not quarantined now"
    );
}

/// A cell records the checks its vehicles answered; each waits for the
/// books until paid, and recording one again changes nothing.
async fn answered_checks_wait_for_the_books_once_each(test: &TestStore) {
    use crate::checks::CheckRecord;
    let store = &test.store;
    let check = |name: &str, at_ms| CheckRecord {
        check: name.into(),
        node: "car-2".into(),
        model: "smollm2-135m-instruct".into(),
        tokens: 120,
        compute_ms: 800,
        started_ms: at_ms - 900,
        at_ms,
    };
    store
        .record_checks(&[
            check("check:chatcmpl-b:1", 20),
            check("check:chatcmpl-a:1", 10),
        ])
        .await
        .unwrap();
    let mut again = check("check:chatcmpl-a:1", 10);
    again.tokens = 999;
    store.record_checks(&[again]).await.unwrap();
    // A gateway claims the oldest for a lease; another claiming at the same
    // time gets the rest, and nothing while both leases run.
    let first = store.claim_unpaid_checks(1, 100, 50).await.unwrap();
    assert_eq!(
        first,
        [check("check:chatcmpl-a:1", 10)],
        "the oldest, as first recorded"
    );
    let second = store.claim_unpaid_checks(10, 100, 50).await.unwrap();
    assert_eq!(second, [check("check:chatcmpl-b:1", 20)]);
    assert_eq!(store.claim_unpaid_checks(10, 149, 50).await.unwrap(), []);
    // Once paid, a check is nobody's to claim; an unpaid one is claimed
    // again when its lease has lapsed.
    store.check_paid("check:chatcmpl-a:1", 120).await.unwrap();
    let lapsed = store.claim_unpaid_checks(10, 150, 50).await.unwrap();
    assert_eq!(lapsed, [check("check:chatcmpl-b:1", 20)]);
    assert_eq!(store.claim_unpaid_checks(0, 500, 50).await.unwrap(), []);

    // Gateways claiming at once never get the same check.
    let many: Vec<CheckRecord> = (0..40)
        .map(|index| check(&format!("check:chatcmpl-r{index}:1"), 1_000 + index))
        .collect();
    store.record_checks(&many).await.unwrap();
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..RACES {
        let store = store.clone();
        racing.spawn(async move { store.claim_unpaid_checks(10, 2_000, 50).await.unwrap() });
    }
    let mut claimed: Vec<String> = racing
        .join_all()
        .await
        .into_iter()
        .flatten()
        .map(|record| record.check)
        .collect();
    let count = claimed.len();
    claimed.sort();
    claimed.dedup();
    assert_eq!(claimed.len(), count, "a check was claimed twice");
    assert_eq!(count, 41, "the 40 and the unpaid one whose lease lapsed");
}

async fn tenants_keys_and_nodes_round_trip(test: &TestStore) {
    let store = &test.store;
    let (tenant, key) = store
        .create_tenant("acme", TenantClass::Spot, 1)
        .await
        .expect("create");
    assert_eq!(
        store.tenant_for_api_key(&key).await.expect("lookup"),
        Some(tenant.clone())
    );
    assert_eq!(
        store.tenant_for_api_key("fg-nope").await.expect("lookup"),
        None
    );
    assert!(matches!(
        store.create_tenant("acme", TenantClass::Fleet, 2).await,
        Err(StoreError::TenantExists(_))
    ));
    let second = store.create_api_key("acme", 3).await.expect("second key");
    assert_ne!(second, key);
    assert_eq!(
        store.tenant_for_api_key(&second).await.expect("lookup"),
        Some(tenant)
    );

    store.ensure_owner("alice", 4).await.expect("owner");
    let credential = store.add_node("car-1", "alice", 4).await.expect("add node");
    let stored = store.node_credential_hash("car-1").await.expect("hash");
    assert_eq!(stored, Some(secrets::hash(&credential)));
    assert!(matches!(
        store.add_node("car-1", "alice", 5).await,
        Err(StoreError::NodeExists(_))
    ));
    let rotated = store
        .rotate_node_credential("car-1")
        .await
        .expect("rotate")
        .expect("enrolled");
    assert_eq!(
        store.node_credential_hash("car-1").await.expect("hash"),
        Some(secrets::hash(&rotated))
    );
    assert_eq!(
        store.rotate_node_credential("car-9").await.expect("rotate"),
        None
    );
    store.touch_node("car-1", 9).await.expect("touch");
    let nodes = store.list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].owner, "alice");
    assert_eq!(nodes[0].last_seen_ms, Some(9));
    assert!(nodes[0].owner_id.is_some());

    let record = RequestRecord {
        id: "chatcmpl-1".to_string(),
        tenant_id: 1,
        model: "m".to_string(),
        status: "ok",
        prompt_tokens: 3,
        completion_tokens: u32::MAX,
        nodes: vec!["car-1".to_string()],
        created_ms: 1,
        finished_ms: 2,
        error: None,
    };
    store.log_request(&record).await.expect("log");
    store.log_request(&record).await.expect("log twice");
    assert_eq!(store.count_requests("ok").await.expect("count"), 1);

    // A second open of the same database sees the same data (the CLI does this).
    let again = test.another_handle().await;
    assert_eq!(again.list_tenants().await.expect("list").len(), 1);
    again.close().await;
}

/// Two handles with pools of their own, as two processes have.
async fn two_handles_see_each_others_writes(test: &TestStore) {
    let first = &test.store;
    let second = test.another_handle().await;
    let (tenant, key) = first
        .create_tenant("acme", TenantClass::Reserved, 1)
        .await
        .expect("tenant");
    assert_eq!(
        second.tenant_for_api_key(&key).await.expect("lookup"),
        Some(tenant)
    );
    let (owner, owner_key) = second.create_owner("alice", 2).await.expect("owner");
    assert_eq!(
        first.owner_for_key(&owner_key).await.expect("lookup"),
        Some(owner.clone())
    );
    first.add_node("car-1", "alice", 3).await.expect("node");
    assert!(second.owns(owner.id, "car-1").await.expect("owns"));
    assert!(matches!(
        second.add_node("car-1", "", 4).await,
        Err(StoreError::NodeExists(_))
    ));
    // Ids come from the database, whichever handle asks.
    let (other, _) = second
        .create_tenant("globex", TenantClass::Spot, 5)
        .await
        .expect("tenant");
    let ids: Vec<i64> = first
        .list_tenants()
        .await
        .expect("list")
        .iter()
        .map(|tenant| tenant.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&other.id));
    second.close().await;
}

/// Two processes create the same tenant, owner and node at once: one
/// wins each, the other gets the name's `…Exists` error.
async fn concurrent_creates_of_one_name_have_one_winner(test: &TestStore) {
    let first = &test.store;
    let second = test.another_handle().await;
    for race in 0..RACES {
        let name = format!("tenant-{race}");
        let (left, right) = tokio::join!(
            first.create_tenant(&name, TenantClass::Spot, 1),
            second.create_tenant(&name, TenantClass::Fleet, 1),
        );
        let exists = |result: &Result<_, StoreError>| matches!(result, Err(StoreError::TenantExists(taken)) if *taken == name);
        assert!(
            (left.is_ok() && exists(&right)) || (right.is_ok() && exists(&left)),
            "race {race}: {:?} / {:?}",
            left.map(|(tenant, _)| tenant),
            right.map(|(tenant, _)| tenant)
        );

        let owner = format!("owner-{race}");
        let (left, right) = tokio::join!(
            first.create_owner(&owner, 1),
            second.create_owner(&owner, 1)
        );
        let owner_exists = |result: &Result<_, StoreError>| matches!(result, Err(StoreError::OwnerExists(taken)) if *taken == owner);
        assert!((left.is_ok() && owner_exists(&right)) || (right.is_ok() && owner_exists(&left)));

        let node = format!("car-{race}");
        let (left, right) = tokio::join!(
            first.add_node(&node, &owner, 1),
            second.add_node(&node, "", 1)
        );
        let node_exists = |result: &Result<_, StoreError>| matches!(result, Err(StoreError::NodeExists(taken)) if *taken == node);
        assert!((left.is_ok() && node_exists(&right)) || (right.is_ok() && node_exists(&left)));
    }
    assert_eq!(first.list_tenants().await.expect("list").len(), RACES);
    assert_eq!(second.list_owners().await.expect("list").len(), RACES);
    assert_eq!(first.list_nodes().await.expect("list").len(), RACES);
    second.close().await;
}

#[tokio::test]
async fn connect_picks_the_backend_from_the_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let by_directory = Store::connect(&dir.path().display().to_string())
        .await
        .expect("directory");
    assert_eq!(by_directory.backend_name(), "sqlite");
    by_directory
        .create_tenant("acme", TenantClass::Spot, 1)
        .await
        .expect("tenant");
    let url = format!("sqlite://{}", dir.path().join(DATABASE_FILE).display());
    let by_url = Store::connect(&url).await.expect("sqlite url");
    assert_eq!(by_url.list_tenants().await.expect("list").len(), 1);

    let schema = PgSchema::create().await;
    let by_url = Store::connect(&schema.url()).await.expect("postgres url");
    assert_eq!(by_url.backend_name(), "postgres");
    by_url
        .create_tenant("acme", TenantClass::Spot, 1)
        .await
        .expect("tenant in the schema");
    by_url.close().await;
    assert!(is_postgres_url("postgresql://db.example/fleet"));
    assert!(!is_postgres_url("sqlite://fleet.db"));
    schema.remove().await;
}

/// A kept completion is its tenant's alone (read, listed in pages, updated,
/// deleted); one that asked for a re-run is claimed once the books clawed
/// its answer back, by one gateway at a time, and its answer is replaced
/// only while the clawed-back one is still current.
async fn kept_completions_are_the_tenants_own_and_rerun_once_clawed_back(test: &TestStore) {
    use crate::stored_completions::{NewStoredCompletion, OnClawback, StoredQuery};
    let store = &test.store;
    let kept = |id: &str, tenant_id, created_ms, on_clawback| NewStoredCompletion {
        id: id.into(),
        tenant_id,
        model: if created_ms % 2 == 0 { "a" } else { "b" }.into(),
        created_ms,
        metadata: "{}".into(),
        request: format!("{{\"seed\":{created_ms}}}"),
        response: format!("{{\"id\":\"{id}\"}}"),
        on_clawback,
    };
    for (id, tenant, at, on) in [
        ("chatcmpl-1", 1, 10, OnClawback::Rerun),
        ("chatcmpl-2", 1, 11, OnClawback::Refund),
        ("chatcmpl-3", 2, 12, OnClawback::Rerun),
        ("chatcmpl-4", 1, 13, OnClawback::Refund),
    ] {
        store
            .keep_completion(&kept(id, tenant, at, on))
            .await
            .unwrap();
    }
    assert!(
        store
            .keep_completion(&kept("chatcmpl-1", 1, 10, OnClawback::Refund))
            .await
            .is_err(),
        "an id is kept once"
    );
    assert_eq!(
        store.stored_completion(2, "chatcmpl-1").await.unwrap(),
        None
    );
    let first = store
        .stored_completion(1, "chatcmpl-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            first.answered_by.as_str(),
            first.reruns,
            first.clawed_back.as_deref()
        ),
        ("chatcmpl-1", 0, None)
    );
    let ids = |list: Vec<crate::stored_completions::StoredCompletion>| {
        list.into_iter().map(|kept| kept.id).collect::<Vec<_>>()
    };
    let page = |after: Option<&str>, limit, descending, model: Option<&str>| StoredQuery {
        after: after.map(str::to_owned),
        limit,
        descending,
        model: model.map(str::to_owned),
    };
    let list = |query| async move { ids(store.list_stored_completions(1, &query).await.unwrap()) };
    assert_eq!(
        list(page(None, 2, false, None)).await,
        ["chatcmpl-1", "chatcmpl-2"]
    );
    assert_eq!(
        list(page(Some("chatcmpl-2"), 2, false, None)).await,
        ["chatcmpl-4"]
    );
    assert_eq!(
        list(page(None, 10, true, None)).await,
        ["chatcmpl-4", "chatcmpl-2", "chatcmpl-1"]
    );
    assert_eq!(
        list(page(Some("chatcmpl-4"), 1, true, None)).await,
        ["chatcmpl-2"]
    );
    assert_eq!(list(page(None, 10, false, Some("a"))).await, ["chatcmpl-1"]);
    assert_eq!(
        list(page(Some("chatcmpl-3"), 10, false, None)).await,
        Vec::<String>::new(),
        "another tenant's cursor"
    );

    assert!(store
        .update_stored_metadata(1, "chatcmpl-2", r#"{"k":"v"}"#)
        .await
        .unwrap());
    assert!(!store
        .update_stored_metadata(2, "chatcmpl-2", "{}")
        .await
        .unwrap());
    assert_eq!(
        store
            .stored_completion(1, "chatcmpl-2")
            .await
            .unwrap()
            .unwrap()
            .metadata,
        r#"{"k":"v"}"#
    );
    assert!(!store
        .delete_stored_completion(2, "chatcmpl-2")
        .await
        .unwrap());
    assert!(store
        .delete_stored_completion(1, "chatcmpl-2")
        .await
        .unwrap());
    assert_eq!(
        store.stored_completion(1, "chatcmpl-2").await.unwrap(),
        None
    );

    // Nothing to re-run until the books applied a clawback of a current
    // answer that asked for one.
    let suspects = [
        "chatcmpl-1".to_owned(),
        "chatcmpl-3".to_owned(),
        "chatcmpl-4".to_owned(),
    ];
    store
        .quarantine_node("car-9", "random tokens", &suspects, 20)
        .await
        .unwrap();
    assert_eq!(store.claim_reruns(10, 100, 50).await.unwrap(), []);
    let shown = store
        .stored_completion(1, "chatcmpl-4")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shown.clawed_back.as_deref(), Some("random tokens"));
    for id in &suspects {
        store.clawback_applied("car-9", id, 30).await.unwrap();
    }
    let claims = store.claim_reruns(10, 100, 50).await.unwrap();
    let claimed: Vec<&str> = claims.iter().map(|claim| claim.id.as_str()).collect();
    assert_eq!(
        claimed,
        ["chatcmpl-1", "chatcmpl-3"],
        "those that asked, of every tenant"
    );
    assert_eq!(claims[0].reason, "random tokens");
    assert_eq!(claims[0].request, r#"{"seed":10}"#);
    assert_eq!(
        store.claim_reruns(10, 149, 50).await.unwrap(),
        [],
        "claimed"
    );
    assert!(store
        .rerun_done(&claims[0], "chatcmpl-1r", r#"{"id":"new"}"#)
        .await
        .unwrap());
    assert!(
        !store
            .rerun_done(&claims[0], "chatcmpl-1s", "{}")
            .await
            .unwrap(),
        "a second finisher of the same claim replaces nothing"
    );
    let rerun = store
        .stored_completion(1, "chatcmpl-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            rerun.answered_by.as_str(),
            rerun.reruns,
            rerun.response.as_str()
        ),
        ("chatcmpl-1r", 1, r#"{"id":"new"}"#)
    );
    assert_eq!(
        (rerun.rerun_reason.as_deref(), rerun.clawed_back),
        (Some("random tokens"), None)
    );
    // The unfinished one is claimed again once its lease lapsed, until its
    // attempts are spent.
    let mut attempts = 1;
    while !store
        .claim_reruns(10, 150 + attempts * 100, 50)
        .await
        .unwrap()
        .is_empty()
    {
        attempts += 1;
    }
    assert_eq!(attempts, crate::stored_completions::RERUN_ATTEMPTS_MAX);

    assert_eq!(store.forget_stored_before(13).await.unwrap(), 2);
    assert_eq!(list(page(None, 10, false, None)).await, ["chatcmpl-4"]);
}
