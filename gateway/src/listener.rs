//! Resource limits of the gateway's network listeners (HTTP push, `/metrics`, CoAP) and their
//! counters.
//!
//! Every TCP listener is served by [`serve_http`] instead of `axum::serve`, because that one
//! has no connection limit, no header or body timeout, and a graceful shutdown that waits for
//! every client: 300 slow clients once used up the gateway's file descriptors (the CoAP
//! source then answered 5.03, `/metrics` was unreachable) and a trickling body kept the
//! gateway from stopping on SIGTERM for 40 s. Here:
//! - a connection needs a permit of its listener (`max_connections`) *and* of the process-wide
//!   budget ([`tcp_budget`], the descriptor limit minus a reserve for the spool, MQTT and UDP
//!   sockets); without one it gets a `503` written without waiting and is closed, so a flood
//!   never holds more descriptors than the budget. `/metrics` has its own listener and limit,
//!   so push clients cannot crowd it out;
//! - request headers must arrive within `header_timeout` (hyper's timer), the body within
//!   `body_timeout` (else `408`) and be at most `max_body_bytes` (else `413`);
//! - a connection lives at most `max_connection_age` (an idle keep-alive connection cannot sit
//!   on a permit forever);
//! - on shutdown the listener stops accepting, every connection is asked to finish
//!   (`graceful_shutdown`) and is dropped after `shutdown_grace`, whatever the client does.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Limits of one HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time allowed for a request's headers.
    pub header_timeout: Duration,
    /// Time allowed for a request's body, from the end of its headers.
    pub body_timeout: Duration,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Longest life of a connection (keep-alive included).
    pub max_connection_age: Duration,
    /// How long connections may take to finish after shutdown is requested.
    pub shutdown_grace: Duration,
}

impl HttpLimits {
    /// Defaults of the HTTP push listener (`docs/gateway-config.md`).
    pub fn push_defaults() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: 1 << 20,
            max_connection_age: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(2),
        }
    }

    /// Limits of the `/metrics` listener: few connections, tiny requests, short timeouts.
    pub fn metrics_defaults() -> Self {
        Self {
            max_connections: METRICS_CONNECTIONS,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(5),
            max_body_bytes: 4096,
            max_connection_age: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

/// Connections of the `/metrics` listener (kept out of the shared budget).
const METRICS_CONNECTIONS: usize = 16;

/// Descriptors kept for everything that is not an HTTP connection: spool segments, command
/// log, MQTT connections, UDP sockets, serial ports, the runtime's own.
const RESERVED_DESCRIPTORS: u64 = 128;

/// The soft limit on open files (`RLIMIT_NOFILE`) from `/proc/self/limits`, `None` if unknown.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_files_limit(&text)
}

fn parse_open_files_limit(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// HTTP connections the whole process may hold (push listeners together), from a descriptor
/// limit: the limit minus the reserve and the metrics listener, at least 8.
pub fn budget_for(open_files: u64) -> usize {
    let budget = open_files
        .saturating_sub(RESERVED_DESCRIPTORS)
        .saturating_sub(METRICS_CONNECTIONS as u64)
        .max(8);
    usize::try_from(budget)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// The process-wide permit pool of push connections, sized once from the descriptor limit.
pub fn tcp_budget() -> Arc<Semaphore> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    Arc::clone(BUDGET.get_or_init(|| {
        let limit = open_files_limit().unwrap_or(1024);
        let budget = budget_for(limit);
        tracing::info!(open_files = limit, budget, "HTTP connection budget");
        Arc::new(Semaphore::new(budget))
    }))
}

/// Counters of one listener, shown on `/metrics`.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Open connections (HTTP).
    pub open: AtomicU64,
    /// Connections accepted (HTTP).
    pub accepted: AtomicU64,
    /// Connections refused for lack of a permit (HTTP).
    pub refused_full: AtomicU64,
    /// Requests whose body did not arrive in time (HTTP).
    pub body_timeouts: AtomicU64,
    /// Requests whose body was too large (HTTP).
    pub body_too_large: AtomicU64,
    /// Connections closed because they reached their maximum age or the shutdown grace (HTTP).
    pub closed_forcibly: AtomicU64,
    /// Entries in the CoAP retransmission cache.
    pub cache_entries: AtomicU64,
    /// CoAP retransmission cache entries dropped because the cache was full.
    pub cache_evicted: AtomicU64,
    /// Requests refused by the security checks, by reason (`bad_signature`, `replay`...).
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl ListenerStats {
    /// Counts a request refused for `reason` (a stable snake_case code).
    pub fn refuse(&self, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// Requests refused for `reason` so far.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(reason)
            .copied()
            .unwrap_or(0)
    }
}

/// Every listener's counters by listener name (source id, or `metrics`).
#[derive(Debug, Default, Clone)]
pub struct ListenerRegistry(Arc<Mutex<BTreeMap<String, Arc<ListenerStats>>>>);

impl ListenerRegistry {
    /// Fresh counters for `name` (replacing those of a previous run of the same source).
    pub fn register(&self, name: &str) -> Arc<ListenerStats> {
        let stats = Arc::new(ListenerStats::default());
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::clone(&stats));
        stats
    }

    /// Appends the listener families in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        type Get = fn(&ListenerStats) -> u64;
        let families: [(&str, &str, Get); 8] = [
            ("wm_gateway_listener_connections_open", "gauge", |s| {
                s.open.load(Ordering::Relaxed)
            }),
            ("wm_gateway_listener_connections_total", "counter", |s| {
                s.accepted.load(Ordering::Relaxed)
            }),
            ("wm_gateway_listener_refused_full_total", "counter", |s| {
                s.refused_full.load(Ordering::Relaxed)
            }),
            ("wm_gateway_listener_body_timeouts_total", "counter", |s| {
                s.body_timeouts.load(Ordering::Relaxed)
            }),
            ("wm_gateway_listener_body_too_large_total", "counter", |s| {
                s.body_too_large.load(Ordering::Relaxed)
            }),
            (
                "wm_gateway_listener_closed_forcibly_total",
                "counter",
                |s| s.closed_forcibly.load(Ordering::Relaxed),
            ),
            ("wm_gateway_coap_exchange_cache_entries", "gauge", |s| {
                s.cache_entries.load(Ordering::Relaxed)
            }),
            (
                "wm_gateway_coap_exchange_cache_evicted_total",
                "counter",
                |s| s.cache_evicted.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, get) in families {
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            for (listener, s) in all.iter() {
                out.push_str(&format!("{name}{{listener=\"{listener}\"}} {}\n", get(s)));
            }
        }
        out.push_str("# TYPE wm_gateway_security_refused_total counter\n");
        for (listener, s) in all.iter() {
            let refused = s.refused.lock().unwrap_or_else(PoisonError::into_inner);
            for (reason, n) in refused.iter() {
                out.push_str(&format!(
                    "wm_gateway_security_refused_total{{listener=\"{listener}\",reason=\"{reason}\"}} {n}\n"
                ));
            }
        }
    }
}

/// Decrements the open-connection gauge when a connection task ends, however it ends.
struct OpenGuard(Arc<ListenerStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r
}

/// Reads the body within the limits, then hands the request to `app`.
async fn handle(
    mut app: Router,
    req: Request<Incoming>,
    peer: SocketAddr,
    limits: Arc<HttpLimits>,
    stats: Arc<ListenerStats>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        stats.body_too_large.fetch_add(1, Ordering::Relaxed);
        return Ok(plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
    }
    let read = axum::body::to_bytes(Body::new(body), limits.max_body_bytes);
    let bytes = match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            // Chunked bodies have no Content-Length: the limit shows up here.
            stats.body_too_large.fetch_add(1, Ordering::Relaxed);
            return Ok(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or broken",
            ));
        }
        Err(_) => {
            stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "request body not received in time");
            return Ok(plain(
                StatusCode::REQUEST_TIMEOUT,
                "body not received in time",
            ));
        }
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    // A Router is always ready, so `call` without `poll_ready` is fine.
    tower_service::Service::call(&mut app, req).await
}

/// Serves one accepted connection until it ends, reaches its age, or shutdown (then within
/// the grace period).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Arc<HttpLimits>,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    stats.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(Arc::clone(&stats));
    let svc = {
        let (limits, stats) = (Arc::clone(&limits), Arc::clone(&stats));
        hyper::service::service_fn(move |req| {
            handle(
                app.clone(),
                req,
                peer,
                Arc::clone(&limits),
                Arc::clone(&stats),
            )
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(limits.max_connection_age) => {}
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(limits.shutdown_grace, conn.as_mut())
        .await
        .is_err()
    {
        stats.closed_forcibly.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`; returns once every connection
/// is closed (at most `shutdown_grace` plus a moment after `shutdown`). `budget` is the shared
/// permit pool ([`tcp_budget`] for push listeners, a private one for `/metrics`).
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    budget: Arc<Semaphore>,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
) {
    let own = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let limits = Arc::new(limits);
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permits = match (
            Arc::clone(&own).try_acquire_owned(),
            Arc::clone(&budget).try_acquire_owned(),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                stats.refused_full.fetch_add(1, Ordering::Relaxed);
                // Best effort, never waits: the client learns why, and the descriptor is
                // released at once.
                stream
                    .try_write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .ok();
                drop(stream);
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        conns.spawn(connection(
            stream,
            peer,
            app.clone(),
            Arc::clone(&limits),
            Arc::clone(&stats),
            shutdown.clone(),
            permits,
        ));
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace + Duration::from_millis(500), drain)
        .await
        .is_err()
    {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63451                63451                processes \n\
                    Max open files            256                  524288               files     \n";
        assert_eq!(parse_open_files_limit(text), Some(256));
        assert_eq!(
            parse_open_files_limit("Max open files unlimited unlimited files"),
            Some(u64::MAX)
        );
        assert_eq!(parse_open_files_limit("nothing"), None);
        assert!(open_files_limit().is_some());
    }

    #[test]
    fn budget_stays_below_the_descriptor_limit() {
        assert_eq!(budget_for(1024), 1024 - 128 - 16);
        assert_eq!(budget_for(256), 112);
        // A tiny limit still serves a few connections.
        assert_eq!(budget_for(100), 8);
        assert!(budget_for(u64::MAX) <= Semaphore::MAX_PERMITS);
    }
}
