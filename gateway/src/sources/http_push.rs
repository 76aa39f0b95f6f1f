//! IoT-platform HTTP push source: `POST /v1/push` with an envelope JSON body, signed with
//! `X-Timestamp`, `X-Nonce` and `X-Signature: hex(HMAC-SHA256(secret, canonical))` where the
//! canonical string ([`model::auth::canonical_request`], the one the API uses for IF-METER-004)
//! covers method, path, timestamp, nonce and the body's SHA-256.
//!
//! Replies 202 after the readings are spooled, 401 for a bad or missing signature, a
//! timestamp outside the allowed skew, or a nonce already used within the replay window
//! (`model::auth::NonceWindow`), 400 for a body that is not a known envelope or whose frames
//! do not decode, 503 when the spool cannot take the readings or the replay window is full.
//!
//! Replays: the nonce window refuses a replay while its timestamp is accepted, the skew check
//! afterwards. If the platform gives no receive time, the readings are placed at the signed
//! `X-Timestamp`, never at our receive time, so even a replay the window cannot see (after a
//! restart) produces the same reading keys and the pipeline deduplicates it.
//!
//! An envelope's payload may hold several CJ/T 188 frames back to back (a daily meter's hourly
//! history, oldest first); every frame's readings are spooled, all envelopes of a body in one
//! submit, before the 202. As on CoAP it is all or nothing: one bad frame anywhere in the body
//! refuses the whole body with 400 ([`super::coap::UplinkError`], counted once), so a 202
//! never hides a dropped reading.
//!
//! Connection limits, header and body timeouts and the bounded shutdown are
//! [`crate::listener`]'s.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::post;
use decoders::{cjt188, envelope};
use model::auth::{NonceWindow, RequestAuthError, SignedHeaders};
use model::{ClockSource, SourceKind};
use time::OffsetDateTime;

use super::coap::{frame_clock, parse_uplink};
use super::{Commands, Received, Source, SourceContext, SourceEnv, SourceError};
use crate::listener::{HttpLimits, ListenerStats};
use crate::normalise;

/// HTTP push settings (from `edge_config::HttpPushSourceConfig`).
#[derive(Debug, Clone)]
pub struct HttpPushOptions {
    /// Shared secret of the HMAC (`Debug` shows `***`).
    pub secret: edge_config::Secret,
    /// Largest accepted |now − X-Timestamp|, seconds.
    pub max_skew_s: u64,
    /// Most nonces held in the replay window.
    pub nonce_window: usize,
    /// Connection limits and timeouts.
    pub limits: HttpLimits,
    /// Counters shown on `/metrics`.
    pub stats: Arc<ListenerStats>,
}

impl HttpPushOptions {
    /// Options from a source's configuration, with fresh counters.
    pub fn from_config(c: &edge_config::Valid<edge_config::HttpPushSourceConfig>) -> Self {
        Self {
            secret: c.secret.clone(),
            max_skew_s: c.max_skew_s,
            nonce_window: c.nonce_window,
            limits: HttpLimits {
                max_connections: c.max_connections,
                header_timeout: c.header_timeout(),
                body_timeout: c.body_timeout(),
                max_body_bytes: c.max_body_bytes,
                ..HttpLimits::push_defaults()
            },
            stats: Arc::default(),
        }
    }
}

struct PushState {
    opts: HttpPushOptions,
    ctx: SourceContext,
    nonces: Mutex<NonceWindow>,
}

/// Checks the signature headers of a push to `method path` and, if they verify, records the
/// nonce in `nonces`; returns the signed timestamp.
///
/// # Errors
/// [`RequestAuthError`] for the first problem (replays included).
pub fn verify(
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    opts: &HttpPushOptions,
    nonces: &Mutex<NonceWindow>,
    now: i64,
) -> Result<i64, RequestAuthError> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = SignedHeaders {
        timestamp: get("x-timestamp"),
        nonce: get("x-nonce"),
        signature: get("x-signature"),
    };
    let ts = model::auth::verify_request(
        opts.secret.expose().as_bytes(),
        method,
        path,
        signed,
        body,
        now,
        opts.max_skew_s,
    )?;
    // Only a verified request may take a place in the window (else anyone could fill it).
    let nonce = signed.nonce.unwrap_or_default();
    nonces
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .check_and_insert(nonce, ts, now)?;
    Ok(ts)
}

async fn push(
    State(state): State<Arc<PushState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let source_id = state.ctx.source_id.as_str();
    let now = OffsetDateTime::now_utc();
    let signed_at = match verify(
        method.as_str(),
        uri.path(),
        &headers,
        &body,
        &state.opts,
        &state.nonces,
        now.unix_timestamp(),
    ) {
        Ok(ts) => ts,
        Err(why) => {
            state.opts.stats.refuse(why.code());
            tracing::warn!(source = source_id, %peer, reason = %why, "refused a push");
            let status = if why == RequestAuthError::WindowFull {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::UNAUTHORIZED
            };
            return (status, why.to_string());
        }
    };
    // The signed timestamp, checked within the skew: a replay carries the same one.
    let signed_at = OffsetDateTime::from_unix_timestamp(signed_at).unwrap_or(now);
    let envelopes = match envelope::decode_envelopes(&body) {
        Ok(e) => e,
        Err(e) => {
            state.ctx.count_frames(1);
            state.ctx.reject(&e);
            tracing::warn!(source = source_id, error = %e, "undecodable push envelope");
            return (StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let channel = peer.to_string();
    let mut readings = Vec::new();
    for env in &envelopes {
        let (meter, frames) = match parse_uplink(&env.payload) {
            Ok(p) => p,
            Err(e) => {
                state.ctx.count_frames(1);
                state.ctx.reject(&e);
                tracing::warn!(source = source_id, device = %env.device_id, error = %e, "undecodable CJ/T 188 payload in push");
                return (StatusCode::BAD_REQUEST, e.to_string());
            }
        };
        // The platform's receive time is closer to the measurement than ours; older frames of
        // a history are placed before it by their clocks.
        // Without one, the signed X-Timestamp (the platform's send time) anchors the frames,
        // not our receive time, so a replayed push yields the same reading keys.
        let (anchor, clock) = match env.received_at {
            Some(at) => (at, ClockSource::Platform),
            None => (signed_at, ClockSource::Platform),
        };
        let clocks: Vec<_> = frames.iter().map(|(f, _)| frame_clock(f)).collect();
        let timestamps = normalise::relative_timestamps(&clocks, anchor);
        let last = frames.len().saturating_sub(1);
        state.ctx.count_frames(frames.len());
        for (i, ((frame, range), ts)) in frames.into_iter().zip(timestamps).enumerate() {
            let mut decoded = cjt188::to_decoded(&frame);
            if i == last {
                // Radio figures describe this uplink: they go with its newest (last) frame.
                decoded.records.extend(env.signal_records());
            }
            let ctx = state.ctx.frame_context(&Received {
                raw: env.payload.get(range).unwrap_or(env.payload.as_slice()),
                channel: Some(&channel),
                received_at: now,
            });
            let mut rs = normalise::to_readings(&decoded, &meter, None, &ctx);
            for r in &mut rs {
                r.ts = ts;
                r.clock = clock;
            }
            readings.extend(rs);
        }
    }
    // 202 only once every frame of every envelope is durable.
    match state.ctx.submit(readings).await {
        Ok(()) => (StatusCode::ACCEPTED, String::new()),
        Err(e) => {
            tracing::error!(source = source_id, error = %e, "could not spool pushed readings");
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// The signed HTTP push listener: bound at build.
#[derive(Debug)]
pub struct HttpPushSource {
    listener: tokio::net::TcpListener,
    opts: HttpPushOptions,
}

impl Source for HttpPushSource {
    type Config = edge_config::Valid<edge_config::HttpPushSourceConfig>;
    const KIND: SourceKind = SourceKind::HttpPush;

    async fn build(c: &Self::Config, env: &SourceEnv) -> Result<Self, SourceError> {
        let listener = tokio::net::TcpListener::bind(c.listen)
            .await
            .map_err(|source| SourceError::Socket {
                what: "HTTP push listener",
                addr: c.listen.to_string(),
                source,
            })?;
        let mut opts = HttpPushOptions::from_config(c);
        opts.stats = env.listener_stats();
        Ok(Self { listener, opts })
    }

    fn commands(&self) -> Commands {
        Commands::Unavailable(
            "(HTTP push) has no downlink; send commands through the IoT platform".into(),
        )
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves pushes until `ctx.shutdown`; returns within the shutdown grace whatever the
    /// clients do.
    async fn run(self, ctx: SourceContext) -> Result<(), SourceError> {
        let Self { listener, opts } = self;
        let shutdown = ctx.shutdown.clone();
        let (limits, stats) = (opts.limits.clone(), Arc::clone(&opts.stats));
        let nonces = Mutex::new(NonceWindow::new(opts.nonce_window, opts.max_skew_s));
        ctx.readiness.set_ready();
        let app = Router::new()
            .route("/v1/push", post(push))
            .with_state(Arc::new(PushState { opts, ctx, nonces }));
        crate::listener::serve_http(
            listener,
            app,
            limits,
            crate::listener::tcp_budget(),
            stats,
            shutdown,
        )
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_push_verifies_once() {
        let mut config = edge_config::HttpPushSourceConfig::new(
            "p",
            "127.0.0.1:0".parse().unwrap(),
            "0123456789abcdef",
        );
        (config.max_connections, config.header_timeout_s) = (4, 1);
        (
            config.body_timeout_s,
            config.max_body_bytes,
            config.nonce_window,
        ) = (1, 1024, 10);
        let mut opts = HttpPushOptions::from_config(&edge_config::Valid::new(config).unwrap());
        opts.max_skew_s = 300;
        let nonces = Mutex::new(NonceWindow::new(10, 300));
        let body = br#"{"device_id":"d","payload":"00"}"#;
        let nonce = "0123456789abcdef-n1";
        let sig =
            model::auth::sign_request(b"0123456789abcdef", "POST", "/v1/push", 1000, nonce, body);
        let mut h = HeaderMap::new();
        h.insert("x-timestamp", "1000".parse().unwrap());
        h.insert("x-nonce", nonce.parse().unwrap());
        h.insert("x-signature", sig.parse().unwrap());
        let check = |h: &HeaderMap, body: &[u8], now| {
            verify("POST", "/v1/push", h, body, &opts, &nonces, now)
        };
        assert_eq!(check(&h, body, 1100), Ok(1000));
        assert_eq!(check(&h, body, 1101), Err(RequestAuthError::Replay));
        assert_eq!(
            check(&h, body, 1400).map_err(|e| e.code()),
            Err("clock_skew")
        );
        assert_eq!(
            check(&h, b"tampered", 1100),
            Err(RequestAuthError::Mismatch)
        );
        h.remove("x-signature");
        assert_eq!(
            check(&h, body, 1100),
            Err(RequestAuthError::Missing("X-Signature"))
        );
    }
}
