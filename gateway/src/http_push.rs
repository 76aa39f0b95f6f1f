//! IoT-platform HTTP push source: `POST /v1/push` with an envelope JSON body, signed with
//! `X-Timestamp` and `X-Signature: hex(HMAC-SHA256(secret, "<timestamp>\n<body>"))`.
//!
//! Replies 202 after the readings are spooled, 401 for a bad or missing signature or a
//! timestamp outside the allowed skew, 400 for a body that is not a known envelope or whose
//! frames do not decode, 503 when the spool cannot take the readings.
//!
//! An envelope's payload may hold several CJ/T 188 frames back to back (a daily meter's hourly
//! history, oldest first); every frame's readings are spooled, all envelopes of a body in one
//! submit, before the 202. As on CoAP it is all or nothing: one bad frame anywhere in the body
//! refuses the whole body with 400 ([`crate::coap::UplinkError`], counted once), so a 202
//! never hides a dropped reading.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use decoders::{cjt188, envelope};
use hmac::{Hmac, Mac};
use model::{ClockSource, SourceKind};
use sha2::Sha256;
use time::OffsetDateTime;

use crate::coap::{error_kind, frame_clock, parse_uplink};
use crate::normalise::{self, FrameContext};
use crate::source::SourceContext;

/// HTTP push settings (from `edge_config::HttpPushSourceConfig`).
#[derive(Debug, Clone)]
pub struct HttpPushOptions {
    /// Shared secret of the HMAC.
    pub secret: String,
    /// Largest accepted |now − X-Timestamp|, seconds.
    pub max_skew_s: u64,
}

struct PushState {
    opts: HttpPushOptions,
    ctx: SourceContext,
}

/// Checks the signature headers of a push.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    opts: &HttpPushOptions,
    now: i64,
) -> Result<(), String> {
    let ts = headers
        .get("x-timestamp")
        .and_then(|v| v.to_str().ok())
        .ok_or("missing X-Timestamp")?;
    let ts_num: i64 = ts.parse().map_err(|_| "X-Timestamp is not unix seconds")?;
    if now.abs_diff(ts_num) > opts.max_skew_s {
        return Err(format!(
            "X-Timestamp {ts_num} is more than {} s from now",
            opts.max_skew_s
        ));
    }
    let sig = headers
        .get("x-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or("missing X-Signature")?;
    let sig = hex::decode(sig.trim()).map_err(|_| "X-Signature is not hex")?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(opts.secret.as_bytes()).map_err(|_| "unusable secret")?;
    mac.update(ts.as_bytes());
    mac.update(b"\n");
    mac.update(body);
    // Constant-time comparison.
    mac.verify_slice(&sig)
        .map_err(|_| "signature mismatch".to_owned())
}

async fn push(
    State(state): State<Arc<PushState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let source_id = state.ctx.source_id.as_str();
    let now = OffsetDateTime::now_utc();
    if let Err(why) = verify(&headers, &body, &state.opts, now.unix_timestamp()) {
        tracing::warn!(source = source_id, reason = %why, "refused unauthenticated push");
        return (StatusCode::UNAUTHORIZED, why);
    }
    let envelopes = match envelope::decode_envelopes(&body) {
        Ok(e) => e,
        Err(e) => {
            state.ctx.sink.frame_received(source_id);
            state
                .ctx
                .sink
                .decode_failed(source_id, &format!("envelope_{}", error_kind(&e)));
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
                state.ctx.sink.frame_received(source_id);
                state.ctx.sink.decode_failed(source_id, e.code());
                tracing::warn!(source = source_id, device = %env.device_id, error = %e, "undecodable CJ/T 188 payload in push");
                return (StatusCode::BAD_REQUEST, e.to_string());
            }
        };
        // The platform's receive time is closer to the measurement than ours; older frames of
        // a history are placed before it by their clocks.
        let (anchor, clock) = match env.received_at {
            Some(at) => (at, ClockSource::Platform),
            None => (now, ClockSource::Gateway),
        };
        let clocks: Vec<_> = frames.iter().map(|(f, _)| frame_clock(f)).collect();
        let timestamps = normalise::relative_timestamps(&clocks, anchor);
        let last = frames.len().saturating_sub(1);
        for (i, ((frame, range), ts)) in frames.into_iter().zip(timestamps).enumerate() {
            state.ctx.sink.frame_received(source_id);
            let mut decoded = cjt188::to_decoded(&frame);
            if i == last {
                // Radio figures describe this uplink: they go with its newest (last) frame.
                decoded.records.extend(env.signal_records());
            }
            let ctx = FrameContext {
                gateway: &state.ctx.gateway,
                source: SourceKind::HttpPush,
                source_id,
                channel: Some(&channel),
                received_at: now,
                raw: env.payload.get(range).unwrap_or(env.payload.as_slice()),
            };
            let mut rs = normalise::to_readings(&decoded, &meter, None, &ctx);
            for r in &mut rs {
                r.ts = ts;
                r.clock = clock;
            }
            readings.extend(rs);
        }
    }
    match state.ctx.sink.submit(readings).await {
        Ok(()) => (StatusCode::ACCEPTED, String::new()),
        Err(e) => {
            tracing::error!(source = source_id, error = %e, "could not spool pushed readings");
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Binds the listener (errors surface at start); returns it with its address.
pub async fn bind(listen: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    let addr = l.local_addr()?;
    Ok((l, addr))
}

/// Serves pushes until `ctx.shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    opts: HttpPushOptions,
    ctx: SourceContext,
) -> std::io::Result<()> {
    let shutdown = ctx.shutdown.clone();
    let app = Router::new()
        .route("/v1/push", post(push))
        .with_state(Arc::new(PushState { opts, ctx }));
    // The peer address is each pushed reading's channel.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_signature_and_skew() {
        let opts = HttpPushOptions {
            secret: "0123456789abcdef".into(),
            max_skew_s: 300,
        };
        let body = br#"{"device_id":"d","payload":"00"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"0123456789abcdef").unwrap();
        mac.update(b"1000\n");
        mac.update(body);
        let sig = hex::encode(mac.finalize().into_bytes());
        let mut h = HeaderMap::new();
        h.insert("x-timestamp", "1000".parse().unwrap());
        h.insert("x-signature", sig.parse().unwrap());
        assert_eq!(verify(&h, body, &opts, 1100), Ok(()));
        assert!(verify(&h, body, &opts, 1400).unwrap_err().contains("300"));
        assert!(verify(&h, b"tampered", &opts, 1100).is_err());
        h.remove("x-signature");
        assert_eq!(
            verify(&h, body, &opts, 1100),
            Err("missing X-Signature".into())
        );
    }
}
