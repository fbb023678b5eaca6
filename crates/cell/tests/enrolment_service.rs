//! The `Enrolment` service in process: a token buys one certificate, bound
//! to the node it was issued for and recorded in the store; a renewal needs
//! the current certificate; and the calls served at once are bounded.

use std::sync::Arc;

use cell::tls::{AgentTlsConfig, CellTls, EnrolmentService};
use proto::enrolment_server::Enrolment;
use store::testing::{Backend, TestStore};
use tonic::{Code, Request};

fn enrol_request(node: &str, token: &str) -> Request<proto::EnrolRequest> {
    let csr_pem = pki::NodeKey::generate()
        .expect("key")
        .csr_pem(node)
        .expect("csr");
    Request::new(proto::EnrolRequest {
        node_id: node.to_owned(),
        token: token.to_owned(),
        csr_pem,
    })
}

#[tokio::test]
async fn a_token_buys_one_certificate_for_its_node_and_calls_at_once_are_bounded() {
    let test = TestStore::new(Backend::Sqlite).await;
    let store = test.store.clone();
    let token = store.add_node("car-1", "", 1).await.expect("enrol car-1");
    store.add_node("car-2", "", 1).await.expect("enrol car-2");
    let tls = CellTls::prepare(&store, &AgentTlsConfig::default(), Arc::default())
        .await
        .expect("the cell's TLS");
    let service = EnrolmentService::new(store.clone(), Arc::new(tls));

    // Every place taken: refused before anything is read.
    let taken = Arc::clone(&service.at_once)
        .acquire_many_owned(cell::limits::ENROLMENTS_AT_ONCE_MAX as u32)
        .await
        .expect("take every place");
    let refused = service
        .enrol(enrol_request("car-1", &token))
        .await
        .expect_err("no place");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    drop(taken);

    // Another node's token, or a wrong one, buys nothing.
    for (node, offered) in [("car-2", token.as_str()), ("car-1", "fgn-wrong")] {
        let refused = service
            .enrol(enrol_request(node, offered))
            .await
            .expect_err("not this node's token");
        assert_eq!(refused.code(), Code::Unauthenticated);
    }

    let issued = service
        .enrol(enrol_request("car-1", &token))
        .await
        .expect("the token buys a certificate")
        .into_inner();
    let presented = pki::presented_pem(&issued.certificate_pem).expect("a node certificate");
    assert_eq!(presented.node_id, "car-1");
    assert_eq!(presented.not_after_ms, issued.not_after_unix_ms);
    let authority = store.node_authority().await.expect("read").expect("kept");
    assert_eq!(issued.authority_pem, authority.0);
    let recorded = store.certificate(&presented.serial).await.expect("read");
    assert_eq!(recorded.map(|record| record.node), Some("car-1".to_owned()));

    // Spent.
    let refused = service
        .enrol(enrol_request("car-1", &token))
        .await
        .expect_err("a spent token");
    assert_eq!(refused.code(), Code::Unauthenticated);

    // A renewal over no certificate renews nothing.
    let csr_pem = pki::NodeKey::generate()
        .expect("key")
        .csr_pem("car-1")
        .expect("csr");
    let refused = service
        .renew(Request::new(proto::RenewRequest { csr_pem }))
        .await
        .expect_err("no certificate presented");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(
        store.node_certificates("car-1").await.expect("read").len(),
        1
    );
    test.finish().await;
}
