//! Uplink: publishes spooled readings as `model::ReadingBatch` JSON on
//! `{topic_root}/readings/{partition}` with QoS 1, and acknowledges them in the spool only after
//! the broker's PUBACK.
//!
//! Each connection starts reading the spool from its oldest record, so everything not
//! acknowledged before a disconnect is sent again (at-least-once). At most `window` batches are
//! in flight. Packet ids are matched to batches through rumqttc's `Outgoing::Publish` events,
//! which it emits in request order (a pkid collision is announced by `AwaitAck` and published
//! later, before any newer request).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use model::{GatewayId, partition_of};
use rumqttc::{Event, Outgoing, Packet, QoS};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, MqttEndpoint};
use crate::spool::{Cursor, Spool, SpooledEntry};

/// Uplink settings.
#[derive(Debug, Clone)]
pub struct UplinkOptions {
    /// Broker.
    pub endpoint: MqttEndpoint,
    /// MQTT client id (unique per gateway).
    pub client_id: String,
    /// Topic root, e.g. `wm/v1`.
    pub topic_root: String,
    /// This gateway.
    pub gateway: GatewayId,
    /// Number of partitions P.
    pub partitions: u16,
    /// Most readings per batch.
    pub batch_size: usize,
    /// Most batches awaiting PUBACK.
    pub window: u16,
}

/// Uplink counters for metrics and tests.
#[derive(Debug, Default)]
pub struct UplinkStats {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Batches published (including re-sends).
    pub batches_sent: AtomicU64,
    /// Readings acknowledged by the broker.
    pub readings_acked: AtomicU64,
    /// Connections established.
    pub connects: AtomicU64,
    /// Unix time of the last PUBACK (0 = never).
    pub last_ack_unix: AtomicI64,
}

impl UplinkStats {
    /// Appends the uplink metrics in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String, depth: u64) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let last = self.last_ack_unix.load(Ordering::Relaxed);
        // Lag: how long the oldest pending data may have waited; 0 when nothing is pending.
        let lag = if depth == 0 || last == 0 {
            0
        } else {
            now - last
        };
        out.push_str(&format!(
            "# TYPE wm_gateway_uplink_connected gauge\nwm_gateway_uplink_connected {}\n\
             # TYPE wm_gateway_uplink_batches_total counter\nwm_gateway_uplink_batches_total {}\n\
             # TYPE wm_gateway_uplink_acked_readings_total counter\nwm_gateway_uplink_acked_readings_total {}\n\
             # TYPE wm_gateway_uplink_connects_total counter\nwm_gateway_uplink_connects_total {}\n\
             # TYPE wm_gateway_uplink_lag_seconds gauge\nwm_gateway_uplink_lag_seconds {}\n",
            u8::from(self.connected.load(Ordering::Relaxed)),
            self.batches_sent.load(Ordering::Relaxed),
            self.readings_acked.load(Ordering::Relaxed),
            self.connects.load(Ordering::Relaxed),
            lag
        ));
    }
}

/// A batch ready to publish.
struct Staged {
    topic: String,
    payload: Vec<u8>,
    seqs: Vec<u64>,
}

/// Splices spooled entries (already `BatchEntry` JSON) into `ReadingBatch` payloads.
fn stage(
    opts: &UplinkOptions,
    gateway_json: &str,
    entries: Vec<SpooledEntry>,
    out: &mut VecDeque<Staged>,
) {
    let mut by_partition: BTreeMap<u16, Vec<SpooledEntry>> = BTreeMap::new();
    for e in entries {
        by_partition
            .entry(partition_of(&e.meter, opts.partitions))
            .or_default()
            .push(e);
    }
    let sent_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into());
    for (partition, entries) in by_partition {
        for chunk in entries.chunks(opts.batch_size.max(1)) {
            let size: usize = chunk.iter().map(|e| e.json.len() + 1).sum();
            let mut payload = Vec::with_capacity(size + 128);
            payload.extend_from_slice(
                format!(
                    r#"{{"v":{},"gateway":{gateway_json},"partition":{partition},"sent_at":"{sent_at}","entries":["#,
                    model::WIRE_VERSION
                )
                .as_bytes(),
            );
            for (i, e) in chunk.iter().enumerate() {
                if i > 0 {
                    payload.push(b',');
                }
                payload.extend_from_slice(&e.json);
            }
            payload.extend_from_slice(b"]}");
            out.push_back(Staged {
                topic: format!("{}/readings/{partition}", opts.topic_root),
                payload,
                seqs: chunk.iter().map(|e| e.seq).collect(),
            });
        }
    }
}

/// Runs the uplink until `shutdown` is cancelled, reconnecting with backoff.
pub async fn run(
    opts: UplinkOptions,
    spool: Spool,
    stats: Arc<UplinkStats>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match session(&opts, &spool, &stats, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                stats.connected.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "uplink connection lost; will replay unacknowledged readings");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection: returns `Ok` on shutdown, `Err` when the connection failed.
async fn session(
    opts: &UplinkOptions,
    spool: &Spool,
    stats: &UplinkStats,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let window = usize::from(opts.window.max(1));
    let mut options = opts.endpoint.options(&opts.client_id, None);
    // rumqttc's own limit sits above ours so it never reports a collision in normal operation.
    options.set_inflight(opts.window.max(1).saturating_mul(2));
    let (client, mut events) = mqtt::connect(options, window + 8);
    let gateway_json = serde_json::to_string(&opts.gateway).map_err(|e| e.to_string())?;
    let read_chunk = (opts.batch_size.max(1) * usize::from(opts.partitions.max(1))).min(50_000);
    let mut cursor = Cursor::start();
    let mut staged: VecDeque<Staged> = VecDeque::new();
    // Published in order, waiting for their `Outgoing::Publish(pkid)` event.
    let mut requested: VecDeque<Vec<u64>> = VecDeque::new();
    let mut collided: Option<Vec<u64>> = None;
    let mut inflight: HashMap<u16, Vec<u64>> = HashMap::new();
    let mut connected = false;
    loop {
        if connected {
            while requested.len() + inflight.len() + usize::from(collided.is_some()) < window {
                if staged.is_empty() {
                    let entries = spool
                        .read(&mut cursor, read_chunk)
                        .map_err(|e| e.to_string())?;
                    if entries.is_empty() {
                        break;
                    }
                    stage(opts, &gateway_json, entries, &mut staged);
                }
                let Some(batch) = staged.pop_front() else {
                    break;
                };
                client
                    .try_publish(batch.topic, QoS::AtLeastOnce, false, batch.payload)
                    .map_err(|e| format!("queueing a publish: {e}"))?;
                requested.push_back(batch.seqs);
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        let idle = staged.is_empty() && requested.len() + inflight.len() < window;
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Best effort: unacknowledged batches stay in the spool for the next start.
                let _unused = client.try_disconnect();
                return Ok(());
            }
            ev = events.recv() => match ev {
                None => return Err("event loop ended".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    connected = true;
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(host = %opts.endpoint.host, port = opts.endpoint.port, "uplink connected");
                }
                Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    let seqs = match collided.take() {
                        Some(seqs) => Some(seqs),
                        None => requested.pop_front(),
                    };
                    if let Some(seqs) = seqs {
                        inflight.insert(pkid, seqs);
                    }
                }
                Some(Ok(Event::Outgoing(Outgoing::AwaitAck(_)))) => {
                    collided = requested.pop_front();
                }
                Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    if let Some(seqs) = inflight.remove(&ack.pkid) {
                        spool.ack(&seqs);
                        stats.readings_acked.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                        stats.last_ack_unix.store(OffsetDateTime::now_utc().unix_timestamp(), Ordering::Relaxed);
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = spool.wait_for_data(), if connected && idle => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_payload_is_a_reading_batch() {
        let opts = UplinkOptions {
            endpoint: MqttEndpoint::parse("localhost").unwrap(),
            client_id: "x".into(),
            topic_root: "wm/v1".into(),
            gateway: GatewayId::new("gw-1").unwrap(),
            partitions: 4,
            batch_size: 2,
            window: 4,
        };
        let reading = |meter: &str, seq: u64| {
            let r: model::Reading = serde_json::from_value(serde_json::json!({
                "meter": meter, "ts": "2026-11-24T10:43:00Z", "clock": "meter",
                "quantity": "volume", "value": "1.5", "unit": "m3", "quality": {"status": "actual"},
                "provenance": {"gateway": "gw-1", "source": "coap", "source_id": "s",
                    "frame_hash": "00", "received_at": "2026-11-24T10:43:05Z"}}))
            .unwrap();
            SpooledEntry {
                seq,
                meter: meter.into(),
                json: serde_json::to_vec(&model::BatchEntry { seq, reading: r }).unwrap(),
            }
        };
        let entries = vec![
            reading("m:a", 1),
            reading("m:a", 2),
            reading("m:a", 3),
            reading("m:b", 4),
        ];
        let mut out = VecDeque::new();
        stage(&opts, "\"gw-1\"", entries, &mut out);
        let mut seen = Vec::new();
        for s in &out {
            let batch: model::ReadingBatch = serde_json::from_slice(&s.payload).unwrap();
            assert_eq!(s.topic, format!("wm/v1/readings/{}", batch.partition));
            assert!(batch.entries.len() <= 2);
            for e in &batch.entries {
                assert_eq!(partition_of(e.reading.meter.as_str(), 4), batch.partition);
            }
            assert_eq!(
                batch.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
                s.seqs
            );
            seen.extend(s.seqs.iter().copied());
        }
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 2, 3, 4]);
        // Per meter, batches keep sequence order.
        let a: Vec<u64> = out
            .iter()
            .flat_map(|s| s.seqs.iter().copied())
            .filter(|s| *s <= 3)
            .collect();
        assert_eq!(a, vec![1, 2, 3]);
    }
}
