//! Wireless M-Bus receiver: raw telegrams (L field first, no CRCs) as UDP datagrams from a
//! USB receiver, decoded with per-meter keys and a per-source format cache.
//!
//! The same telegram often arrives several times (the meter's own transmission and one or more
//! repeaters); copies within `dedup_window` are dropped before decoding. Copies are recognised
//! by the bytes after the L and C fields, since repeaters may change the C field.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use decoders::wmbus::{FormatCache, WmbusError};
use edge_config::wmbus::WmbusUdpSourceConfig;
use model::SourceKind;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::SourceContext;
use crate::normalise::{FrameContext, meter_id, to_readings};

/// Why the receiver stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration is invalid.
    #[error("invalid wmbus source config: {0:?}")]
    Config(Vec<edge_config::wmbus::WmbusConfigError>),
    /// The UDP socket could not be bound.
    #[error("bind {listen}: {reason}")]
    Bind {
        /// Address.
        listen: String,
        /// Why.
        reason: String,
    },
}

/// Receiver counters beyond the sink's frames and decode errors.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Copies dropped as duplicates.
    pub duplicates: AtomicU64,
    /// Telegrams decoded and submitted.
    pub decoded: AtomicU64,
}

/// The decode-error label of a wM-Bus error.
pub fn error_kind(e: &WmbusError) -> &'static str {
    match e {
        WmbusError::Truncated { .. } => "truncated",
        WmbusError::LengthMismatch { .. } => "length",
        WmbusError::BadCrc { .. } => "crc",
        WmbusError::UnsupportedCi { .. } => "unsupported_ci",
        WmbusError::UnsupportedSecurityMode { .. } => "unsupported_security_mode",
        WmbusError::MissingKey { .. } => "missing_key",
        WmbusError::WrongKey { .. } => "wrong_key",
        WmbusError::BadEncryptedLength { .. } => "encrypted_length",
        WmbusError::UnknownCompactFormat { .. } => "unknown_compact_format",
        WmbusError::CompactMismatch { .. } => "compact_mismatch",
        WmbusError::Fragmented { .. } => "fragmented",
        WmbusError::ManufacturerSpecific { .. } => "manufacturer_specific",
        WmbusError::Application { .. } => "records",
        WmbusError::Wired(_) => "wired_frame",
    }
}

/// Remembers telegram fingerprints for a time window.
#[derive(Debug)]
struct Dedup {
    window: Duration,
    seen: HashMap<[u8; 32], Instant>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl Dedup {
    fn new(window: Duration) -> Self {
        Self {
            window,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// True if the telegram is new (and remembers it).
    fn first_time(&mut self, raw: &[u8], now: Instant) -> bool {
        while let Some((key, at)) = self.order.front().copied() {
            if now.duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&key) == Some(&at) {
                self.seen.remove(&key);
            }
        }
        let key: [u8; 32] = Sha256::digest(raw.get(2..).unwrap_or(raw)).into();
        if self.seen.contains_key(&key) {
            return false;
        }
        self.seen.insert(key, now);
        self.order.push_back((key, now));
        true
    }
}

/// Runs the receiver until shutdown.
pub async fn run(config: WmbusUdpSourceConfig, ctx: SourceContext) -> Result<(), SourceError> {
    run_with_stats(config, ctx, Arc::default()).await
}

/// Runs the receiver until shutdown, counting into `stats`.
pub async fn run_with_stats(
    config: WmbusUdpSourceConfig,
    ctx: SourceContext,
    stats: Arc<ReceiverStats>,
) -> Result<(), SourceError> {
    config.validate().map_err(SourceError::Config)?;
    let socket = UdpSocket::bind(&config.listen)
        .await
        .map_err(|e| SourceError::Bind {
            listen: config.listen.clone(),
            reason: e.to_string(),
        })?;
    let keys = config.key_map();
    let mut cache = FormatCache::new();
    let mut dedup = Dedup::new(config.dedup_window);
    let SourceContext {
        gateway,
        source_id,
        sink,
        mut commands,
        shutdown,
    } = ctx;
    // wM-Bus meters are receive-only here (no bidirectional mode): commands are refused.
    let refuse = tokio::spawn(async move {
        while let Some(req) = commands.recv().await {
            let _gone = req.reply.send(crate::CommandOutcome::Failed(
                "wM-Bus meters take no commands through this receiver".into(),
            ));
        }
    });
    let mut buf = vec![0u8; 1024];
    loop {
        let (n, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(source = %source_id, error = %e, "wmbus receive failed");
                    continue;
                }
            },
        };
        let raw = buf.get(..n).unwrap_or(&[]);
        sink.frame_received(&source_id);
        if !dedup.first_time(raw, Instant::now()) {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let frame = match decoders::wmbus::decode(raw, &keys, &mut cache) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(source = %source_id, %peer, error = %e, "wmbus telegram not decodable");
                sink.decode_failed(&source_id, error_kind(&e));
                continue;
            }
        };
        let meter = match meter_id(&frame) {
            Ok(m) => m,
            Err(_) => {
                sink.decode_failed(&source_id, "meter_id");
                continue;
            }
        };
        // No downgrade: a meter with a key accepts only telegrams encrypted under it.
        if keys.contains_key(meter.as_str())
            && let Err(e) = keyed_protection(raw, &keys, &mut cache)
        {
            tracing::warn!(source = %source_id, %peer, %meter, error = %e, "refused a wM-Bus downgrade");
            sink.decode_failed(&source_id, "security_downgrade");
            continue;
        }
        let channel = peer.to_string();
        let fctx = FrameContext {
            gateway: &gateway,
            source: SourceKind::Wmbus,
            source_id: &source_id,
            channel: Some(&channel),
            received_at: OffsetDateTime::now_utc(),
            raw,
        };
        let readings = to_readings(&frame, &meter, None, &fctx);
        stats.decoded.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = sink.submit(readings).await {
            tracing::warn!(source = %source_id, error = %e, "spool refused wmbus readings");
        }
    }
    refuse.abort();
    Ok(())
}

/// The no-downgrade check of a telegram of a meter with a key (issue 16): parsed again for its
/// protection (only keyed meters pay for it), which must be decryption under the key. A
/// telegram that decodes but does not parse as wireless (a wired frame) is plaintext too.
fn keyed_protection(
    raw: &[u8],
    keys: &std::collections::HashMap<String, [u8; 16]>,
    cache: &mut FormatCache,
) -> Result<(), String> {
    match decoders::wmbus::parse(raw, keys, cache) {
        Ok(t) => decoders::wmbus::downgrade::check_keyed(&t).map_err(|e| e.to_string()),
        Err(_) => Err("not a wireless telegram".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_ignores_c_field_and_expires() {
        let mut d = Dedup::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(d.first_time(&[5, 0x44, 1, 2, 3, 4], t0));
        assert!(!d.first_time(&[5, 0x46, 1, 2, 3, 4], t0 + Duration::from_secs(1)));
        assert!(d.first_time(&[5, 0x44, 1, 2, 3, 5], t0 + Duration::from_secs(1)));
        assert!(d.first_time(&[5, 0x44, 1, 2, 3, 4], t0 + Duration::from_secs(11)));
        assert_eq!(d.seen.len(), 1);
    }
}
