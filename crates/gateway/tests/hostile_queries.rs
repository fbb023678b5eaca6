//! Arbitrary query strings and path segments thrown at every GET endpoint of
//! the gateway, driven in-process through `api::router` with `oneshot`: the
//! answer is always well formed (never a 5xx, never a panic that drops the
//! connection), and every refusal is an OpenAI-shaped error.
//!
//! No model is needed: a gateway without served models still answers every
//! GET route.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gateway::served::ServedModels;
use gateway::store::TenantClass;
use proptest::prelude::*;

struct Gateway {
    runtime: tokio::runtime::Runtime,
    gateway: support::Gateway,
}

impl Gateway {
    fn start() -> Gateway {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let gateway = runtime.block_on(support::Gateway::start_with(
            TenantClass::Spot,
            ServedModels::default(),
        ));
        Gateway { runtime, gateway }
    }

    /// GETs `uri` with `key` (if any) and returns the status and body.
    fn get(&self, uri: &str, key: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut request = Request::builder().method("GET").uri(uri);
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request.body(Body::empty()).expect("request");
        self.runtime.block_on(async {
            let answer = support::send(self.gateway.router(), request).await;
            (answer.status, answer.body)
        })
    }

    /// Asserts a well-formed answer: no 5xx, and an OpenAI-shaped error
    /// body for every 4xx.
    fn assert_well_formed(&self, uri: &str, key: Option<&str>) -> StatusCode {
        let (status, body) = self.get(uri, key);
        assert!(
            !status.is_server_error(),
            "GET {uri} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        if status.is_client_error() {
            let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                panic!(
                    "GET {uri} answered {status} with a body that is not JSON: {}",
                    String::from_utf8_lossy(&body)
                )
            });
            assert!(
                error["error"]["message"].is_string() && error["error"]["type"].is_string(),
                "GET {uri} answered {status} with {error}"
            );
        }
        status
    }
}

/// Percent-encodes every byte but letters and digits, so that any bytes
/// (invalid UTF-8 included) make a valid URI.
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&byte| {
            if byte.is_ascii_alphanumeric() {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// Values a client might send for a time, a date, a format or anything.
fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        any::<i128>().prop_map(|n| n.to_string().into_bytes()),
        (-1_i64..=1, 0_i64..=i64::MAX / 1000)
            .prop_map(|(sign, n)| (sign * n).to_string().into_bytes()),
        (0_u32..=10_000, 0_u32..=99, 0_u32..=99)
            .prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}").into_bytes()),
        (any::<i16>(), 0_u32..=13).prop_map(|(y, m)| format!("{y}-{m:02}").into_bytes()),
        prop::sample::select(vec!["json", "csv", "xml", "", "acme", "tenant-1"])
            .prop_map(|text| text.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
        ".{0,40}".prop_map(String::into_bytes),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "start_time",
            "end_time",
            "from",
            "to",
            "format",
            "tenant",
        ])
        .prop_map(|key| key.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec((key, value()), 0..5).prop_map(|pairs| {
        pairs
            .iter()
            .map(|(key, value)| format!("{}={}", encode(key), encode(value)))
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// Cases per property: enough to reach the odd corners, few enough that
/// the whole file runs in seconds.
const CASES: u32 = 96;

#[test]
fn tenant_endpoints_answer_any_query() {
    let gateway = Gateway::start();
    proptest!(ProptestConfig::with_cases(CASES), |(query in query())| {
        for path in ["/v1/usage", "/v1/models", "/health", "/metrics", "/v1/invoices/2026-01"] {
            let uri = format!("{path}?{query}");
            gateway.assert_well_formed(&uri, Some(&gateway.gateway.key));
            gateway.assert_well_formed(&uri, None);
        }
    });
}

#[test]
fn usage_answers_any_period() {
    let gateway = Gateway::start();
    // Mostly Unix seconds whose milliseconds still fit in an i64, so that
    // both ends far apart (the probe that panicked) come up often.
    let bound = prop_oneof![
        3 => (i64::MIN / 1000..=i64::MAX / 1000).prop_map(|n| n.to_string().into_bytes()),
        1 => value(),
    ];
    let names = prop::sample::select(vec![
        ("start_time", "end_time"),
        ("start_time", "end_time"),
        ("from", "to"),
        ("from", "end_time"),
    ]);
    proptest!(ProptestConfig::with_cases(CASES), |(start in bound.clone(), end in bound, (first, second) in names)| {
        let uri = format!("/v1/usage?{first}={}&{second}={}", encode(&start), encode(&end));
        gateway.assert_well_formed(&uri, Some(&gateway.gateway.key));
    });
}

#[test]
fn invoices_answer_any_month() {
    let gateway = Gateway::start();
    proptest!(ProptestConfig::with_cases(CASES), |(month in value(), query in query())| {
        let uri = format!("/v1/invoices/{}?{query}", encode(&month));
        gateway.assert_well_formed(&uri, Some(&gateway.gateway.key));
    });
}

#[test]
fn a_model_is_retrieved_or_refused_by_any_id() {
    let gateway = Gateway::start();
    proptest!(ProptestConfig::with_cases(CASES), |(id in value(), query in query())| {
        let id = encode(&id);
        for uri in [format!("/v1/models/{id}?{query}"), format!("/v1/models/cloud/{id}/{id}")] {
            gateway.assert_well_formed(&uri, Some(&gateway.gateway.key));
            gateway.assert_well_formed(&uri, None);
        }
    });
}

#[test]
fn owner_endpoints_answer_any_vehicle_and_query() {
    let gateway = Gateway::start();
    proptest!(ProptestConfig::with_cases(CASES), |(node in value(), query in query())| {
        let node = encode(&node);
        for uri in [
            format!("/owner/v1/vehicles?{query}"),
            format!("/owner/v1/vehicles/{node}/policy?{query}"),
            format!("/owner/v1/vehicles/{node}/statement?{query}"),
            format!("/owner/v1/vehicles/car-1/statement?{query}"),
        ] {
            gateway.assert_well_formed(&uri, Some(&gateway.gateway.owner_key));
            gateway.assert_well_formed(&uri, Some(&gateway.gateway.key));
        }
    });
}

/// The probe that panicked the handler ("attempt to subtract with overflow").
#[test]
fn a_usage_period_too_long_for_an_i64_is_a_400_naming_the_parameter() {
    let gateway = Gateway::start();
    let (status, body) = gateway.get(
        "/v1/usage?start_time=-9223372036854775&end_time=9223372036854775",
        Some(&gateway.gateway.key),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(error["error"]["param"], "end_time", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error");
}

/// A path segment that is not UTF-8 is answered in the gateway's own shape.
#[test]
fn a_path_that_is_not_utf8_is_an_openai_shaped_400() {
    let gateway = Gateway::start();
    let status = gateway.assert_well_formed("/v1/invoices/%FF%FE", Some(&gateway.gateway.key));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let status = gateway.assert_well_formed(
        "/owner/v1/vehicles/%C3%28/policy",
        Some(&gateway.gateway.owner_key),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
