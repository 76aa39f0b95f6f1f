//! Prometheus text endpoint: `GET /metrics` on the configured listener.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::downlink::Downlink;
use crate::sink::SourceCounters;
use crate::spool::Spool;
use crate::uplink::UplinkStats;

/// What the metrics endpoint reads.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Frames and decode errors per source.
    pub sources: Arc<SourceCounters>,
    /// Spool gauges.
    pub spool: Spool,
    /// Uplink counters.
    pub uplink: Arc<UplinkStats>,
    /// Command states.
    pub downlink: Arc<Downlink>,
}

impl Metrics {
    /// Renders every metric in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.sources.render_prometheus(&mut out);
        let s = self.spool.stats();
        out.push_str(&format!(
            "# TYPE wm_gateway_spool_depth gauge\nwm_gateway_spool_depth {}\n\
             # TYPE wm_gateway_spool_bytes gauge\nwm_gateway_spool_bytes {}\n\
             # TYPE wm_gateway_spool_segments gauge\nwm_gateway_spool_segments {}\n\
             # TYPE wm_gateway_spool_evicted_total counter\nwm_gateway_spool_evicted_total {}\n\
             # TYPE wm_gateway_spool_truncated_total counter\nwm_gateway_spool_truncated_total {}\n\
             # TYPE wm_gateway_spool_next_seq gauge\nwm_gateway_spool_next_seq {}\n",
            s.depth, s.bytes, s.segments, s.evicted, s.truncated, s.next_seq
        ));
        self.uplink.render_prometheus(&mut out, s.depth);
        self.downlink.render_prometheus(&mut out);
        out
    }
}

async fn handler(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}

/// Binds the listener and serves `/metrics` until `shutdown`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(handler))
        .with_state(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(addr)
}
