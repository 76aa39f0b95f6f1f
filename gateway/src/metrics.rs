//! Prometheus text endpoint: `GET /metrics` on the configured listener.
//!
//! Served by [`crate::listener::serve_http`] on its own listener with its own small connection
//! limit and short timeouts, outside the push listeners' budget, so misbehaving push clients
//! cannot make it unreachable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::downlink::Downlink;
use crate::sink::SourceCounters;
use crate::sources::Health;
use crate::spool::Spool;
use crate::uplink::UplinkStats;

/// Device health of the polling sources (Modbus, M-Bus) by source id.
pub type HealthRegistry = Arc<Mutex<BTreeMap<String, Health>>>;

/// Readiness of every running source by source id.
pub type ReadinessRegistry = Arc<Mutex<BTreeMap<String, crate::sources::Readiness>>>;

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
    /// Per-device health of polling sources.
    pub health: HealthRegistry,
    /// Readiness of the sources (`wm_gateway_source_ready`).
    pub readiness: ReadinessRegistry,
    /// Listener counters (connections, timeouts, CoAP cache, security refusals).
    pub listeners: crate::listener::ListenerRegistry,
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
             # TYPE wm_gateway_spool_next_seq gauge\nwm_gateway_spool_next_seq {}\n\
             # TYPE wm_gateway_spool_write_errors_total counter\nwm_gateway_spool_write_errors_total {}\n",
            s.depth, s.bytes, s.segments, s.evicted, s.truncated, s.next_seq, s.write_errors
        ));
        self.uplink.render_prometheus(&mut out, s.depth);
        self.downlink.render_prometheus(&mut out);
        self.listeners.render_prometheus(&mut out);
        out.push_str("# TYPE wm_gateway_source_ready gauge\n");
        for (source, r) in self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let ready = u8::from(r.state() == crate::sources::SourceState::Ready);
            out.push_str(&format!(
                "wm_gateway_source_ready{{source=\"{source}\"}} {ready}\n"
            ));
        }
        // Each source renders whole families; merge them so every `# TYPE` appears once.
        let mut families: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let registry = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        for (source, health) in registry.iter() {
            let mut text = String::new();
            health.render_prometheus(source, &mut text);
            let mut family = String::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    family = rest.to_owned();
                    families.entry(family.clone()).or_default();
                } else if !line.is_empty() {
                    families
                        .entry(family.clone())
                        .or_default()
                        .push(line.to_owned());
                }
            }
        }
        for (family, lines) in families {
            out.push_str(&format!("# TYPE {family}\n"));
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
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
    let limits = crate::listener::HttpLimits::metrics_defaults();
    let stats = metrics.listeners.register("metrics");
    // Its own permit pool: the push listeners' budget never starves it.
    let budget = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let app = Router::new()
        .route("/metrics", get(handler))
        .with_state(metrics);
    tokio::spawn(crate::listener::serve_http(
        listener, app, limits, budget, stats, shutdown,
    ));
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_of_several_sources_renders_one_family_each() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _w) = Spool::open(crate::spool::SpoolConfig::new(dir.path(), 1 << 20)).unwrap();
        let (downlink, _acks) =
            Downlink::open(model::GatewayId::new("gw-1").unwrap(), dir.path()).unwrap();
        let health = HealthRegistry::default();
        for (source, device) in [("bus-a", "fm-1"), ("bus-b", "pt-2")] {
            let h = Health::default();
            h.update(device, |d| d.consecutive_failures = 3);
            health.lock().unwrap().insert(source.into(), h);
        }
        let m = Metrics {
            sources: Arc::default(),
            spool,
            uplink: Arc::default(),
            downlink,
            health,
            readiness: Default::default(),
            listeners: Default::default(),
        };
        let ready = crate::sources::Readiness::default();
        m.readiness
            .lock()
            .unwrap()
            .insert("bus-a".into(), ready.clone());
        assert!(
            m.render()
                .contains("wm_gateway_source_ready{source=\"bus-a\"} 0")
        );
        ready.set_ready();
        let text = m.render();
        assert_eq!(
            text.matches("# TYPE wm_gateway_device_consecutive_failures gauge")
                .count(),
            1,
            "{text}"
        );
        assert!(text.contains(
            "wm_gateway_device_consecutive_failures{source=\"bus-a\",device=\"fm-1\"} 3"
        ));
        assert!(text.contains(
            "wm_gateway_device_consecutive_failures{source=\"bus-b\",device=\"pt-2\"} 3"
        ));
        assert!(text.contains("wm_gateway_spool_depth 0"));
        assert!(
            text.contains("wm_gateway_source_ready{source=\"bus-a\"} 1"),
            "{text}"
        );
    }
}
