//! The ingest worker's metrics-only HTTP listener (`pipeline run --metrics-listen ADDR`):
//! `GET /metrics` answers the worker's counters in Prometheus text; nothing else is served.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ingest::IngestMetrics;

/// Serves `/metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<IngestMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.wait_for(|stop| *stop).await.ok();
        })
        .await
}
