//! A cell process's `/metrics`: its Prometheus families in the text format,
//! the same text the single process adds to its gateway's `/metrics`.
//!
//! Served from the gateway's own accept loop (`http_serve`), so that the
//! scrape port keeps every connection bound the API keeps: header and body
//! timeouts, a stalled reader closed, connections capped.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::MetricsSource;
use crate::limits::HttpLimits;
use crate::metrics::Metrics;
use crate::store::Store;

/// The Prometheus text format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The router: `GET /metrics` renders `source`; anything else is 404.
pub fn router(source: MetricsSource) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let source = Arc::clone(&source);
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], source()).into_response() }
        }),
    )
}

/// Serves `source` on `listener` until `shutdown`. `store` is the
/// connection bounds' (they tell authenticated clients apart; a scraper
/// needs no key).
pub fn serve(
    listener: TcpListener,
    source: MetricsSource,
    store: Store,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(crate::http_serve::serve(
        listener,
        router(source),
        store,
        HttpLimits::default(),
        crate::http_serve::Cors::Off,
        Arc::new(Metrics::default()),
        shutdown,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape of a running cell shows its families, with live values.
    #[tokio::test]
    async fn a_cells_metrics_are_served_on_their_own_port() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("store");
        let shutdown = CancellationToken::new();
        let cell = cell::start(
            cell::CellConfig::new("127.0.0.1:0".parse().expect("addr")),
            store.clone(),
            Arc::new(crate::served::ServedModels::default()),
            shutdown.clone(),
        )
        .await
        .expect("cell");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let render = Arc::clone(&cell.metrics);
        let server = serve(
            listener,
            Arc::new(move || render.render()),
            store,
            shutdown.clone(),
        );

        let scrape = |path: &'static str| async move {
            let client = reqwest::Client::new();
            let response = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .expect("scrape");
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (status, content_type, response.text().await.expect("body"))
        };
        let (status, content_type, text) = scrape("/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, CONTENT_TYPE);
        assert!(text.contains("\nfleetgrid_nodes_connected 0\n"), "{text}");
        assert!(
            text.contains("\nfleetgrid_nodes_refused_total 0\n"),
            "{text}"
        );

        cell.metrics
            .nodes_refused
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let (_, _, text) = scrape("/metrics").await;
        assert!(
            text.contains("\nfleetgrid_nodes_refused_total 2\n"),
            "{text}"
        );
        assert_eq!(scrape("/v1/models").await.0, 404);

        shutdown.cancel();
        server.await.expect("server ends after shutdown");
    }
}
