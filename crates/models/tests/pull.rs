//! `pull` against a real HTTP server on 127.0.0.1 that honours Range requests and can drop the
//! connection half-way through a transfer.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use models::{ModelError, ModelStore, Sha256Digest};

const MODEL_BYTES: usize = 3 * 1024 * 1024;

/// The served file and a log of the Range header of every request it received.
#[derive(Clone)]
struct Server {
    data: Arc<Vec<u8>>,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
    drop_first_transfer: bool,
}

impl Server {
    fn ranges(&self) -> Vec<Option<String>> {
        // No `.await` happens while the lock is held, so a std mutex is right here.
        self.ranges.lock().expect("ranges lock").clone()
    }
}

fn model_bytes() -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..MODEL_BYTES)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 56) as u8
        })
        .collect()
}

async fn serve_model(State(server): State<Server>, headers: HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let request_number = {
        let mut ranges = server.ranges.lock().expect("ranges lock");
        ranges.push(range.clone());
        ranges.len()
    };
    let total = server.data.len();
    let start = range
        .as_deref()
        .and_then(|range| range.strip_prefix("bytes="))
        .and_then(|range| range.strip_suffix('-'))
        .and_then(|start| start.parse::<usize>().ok())
        .unwrap_or(0);
    if start >= total {
        return Response::builder()
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{total}"))
            .body(Body::empty())
            .expect("response");
    }
    let body = Bytes::copy_from_slice(&server.data[start..]);
    let length = body.len();
    let builder = if range.is_some() {
        Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", total - 1),
            )
    } else {
        Response::builder().status(StatusCode::OK)
    }
    .header(header::CONTENT_LENGTH, length);
    if server.drop_first_transfer && request_number == 1 {
        // Send the first half, then fail the body so the connection is cut mid-transfer.
        let first_half = body.slice(..length / 2);
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(first_half)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(std::io::Error::other("connection dropped on purpose"))
            }),
        );
        return builder.body(Body::from_stream(stream)).expect("response");
    }
    builder.body(Body::from(body)).expect("response")
}

async fn start_server(drop_first_transfer: bool) -> (Server, SocketAddr) {
    let server = Server {
        data: Arc::new(model_bytes()),
        ranges: Arc::default(),
        drop_first_transfer,
    };
    let app = axum::Router::new()
        .route("/model.gguf", axum::routing::get(serve_model))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, address)
}

#[tokio::test]
async fn pulls_a_whole_file_and_then_serves_it_from_the_store() {
    let (server, address) = start_server(false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path()).expect("open");
    let digest = Sha256Digest::of_bytes(&server.data);
    let url = format!("http://{address}/model.gguf");

    let model = store.pull("tiny", &url, &digest).await.expect("pull");
    let again = store.pull("tiny", &url, &digest).await.expect("pull again");

    assert_eq!(model.size_bytes, MODEL_BYTES as u64);
    assert_eq!(std::fs::read(&model.path).expect("read"), *server.data);
    assert_eq!(again, model);
    assert_eq!(
        server.ranges(),
        vec![None],
        "the second pull must not download"
    );
    assert_eq!(store.resolve("tiny").expect("resolve").path, model.path);
}

#[tokio::test]
async fn resumes_an_interrupted_download_with_a_range_request() {
    let (server, address) = start_server(true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path()).expect("open");
    let digest = Sha256Digest::of_bytes(&server.data);
    let url = format!("http://{address}/model.gguf");

    let model = store.pull("tiny", &url, &digest).await.expect("pull");

    let ranges = server.ranges();
    assert_eq!(ranges.len(), 2, "one interrupted and one resumed request");
    assert_eq!(ranges[0], None);
    let resumed_from = ranges[1]
        .as_deref()
        .and_then(|range| range.strip_prefix("bytes="))
        .and_then(|range| range.strip_suffix('-'))
        .and_then(|start| start.parse::<usize>().ok())
        .expect("the second request carries a Range header");
    assert!(
        resumed_from > 0 && resumed_from < MODEL_BYTES,
        "{resumed_from}"
    );
    assert_eq!(Sha256Digest::of_file(&model.path).expect("hash"), digest);
    assert!(std::fs::read_dir(dir.path().join("partial"))
        .expect("partial dir")
        .next()
        .is_none());
}

#[tokio::test]
async fn refuses_a_download_with_the_wrong_checksum() {
    let (server, address) = start_server(false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path()).expect("open");
    let wrong = Sha256Digest::of_bytes(b"not the served file");
    let url = format!("http://{address}/model.gguf");

    let error = store.pull("tiny", &url, &wrong).await.expect_err("refused");

    match error {
        ModelError::ChecksumMismatch { actual, .. } => {
            assert_eq!(actual, Sha256Digest::of_bytes(&server.data));
        }
        other => panic!("expected a checksum mismatch, got {other}"),
    }
    assert!(!store.blob_path(&wrong).exists());
    assert!(matches!(
        store.resolve("tiny"),
        Err(ModelError::NotFound(_))
    ));
    assert!(std::fs::read_dir(dir.path().join("partial"))
        .expect("partial dir")
        .next()
        .is_none());
}

#[tokio::test]
async fn does_not_retry_a_missing_file() {
    let (server, address) = start_server(false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path()).expect("open");
    let digest = Sha256Digest::of_bytes(&server.data);
    let url = format!("http://{address}/no-such-model.gguf");

    let error = store.pull("tiny", &url, &digest).await.expect_err("404");

    assert!(
        matches!(&error, ModelError::Http { message, .. } if message.contains("404")),
        "{error}"
    );
}
