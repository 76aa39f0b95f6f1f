//! Uplink: publishes spooled readings as `model::ReadingBatch` JSON on
//! `{topic_root}/readings/{partition}` with QoS 1, and acknowledges them in the spool only after
//! the pipeline has committed them (end-to-end, the default) or, with `ack_timeout = None`,
//! after the broker's PUBACK.
//!
//! End to end (issue 25, `docs/reliability.md`): the uplink subscribes
//! `{topic_root}/{gateway}/ingest-ack`, where the pipeline publishes per partition the highest
//! sequence it committed ([`model::IngestAck`]). A broker's PUBACK only frees the window; the
//! readings stay spooled until that acknowledgement covers them. Each batch names the
//! sequence sent before it in its partition (`prev`) so the pipeline never acknowledges past
//! a batch that a broker dropped. When no acknowledgement makes progress for `ack_timeout`,
//! everything unacknowledged is sent again from the oldest record, with the timeout doubling
//! up to [`MAX_ACK_TIMEOUT`] while nothing moves. An acknowledgement above any number the
//! spool issued (a corrupt or forged progress record in the pipeline) starts a new spool
//! incarnation so new readings are not discarded as old.
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
    /// End-to-end: how long sent readings may wait for the pipeline's acknowledgement before
    /// they are sent again. `None`: the broker's PUBACK acknowledges (a pipeline that does not
    /// publish ingest acknowledgements).
    pub ack_timeout: Option<Duration>,
    /// End-to-end: most readings sent and not yet acknowledged by the pipeline; the uplink
    /// waits (or re-sends after the timeout) beyond it.
    pub max_unacked: usize,
}

/// Upper bound of the re-send timeout's backoff.
pub const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(300);

/// Uplink counters for metrics and tests.
#[derive(Debug, Default)]
pub struct UplinkStats {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Batches published (including re-sends).
    pub batches_sent: AtomicU64,
    /// Distinct readings acknowledged (by the pipeline end to end, else by the broker): a
    /// re-sent reading acknowledged again is not counted again.
    pub readings_acked: AtomicU64,
    /// Connections established.
    pub connects: AtomicU64,
    /// Unix time of the last acknowledgement (0 = never).
    pub last_ack_unix: AtomicI64,
    /// End-to-end acknowledgements received from the pipeline.
    pub ingest_acks: AtomicU64,
    /// Times unacknowledged readings were sent again after the timeout.
    pub resends: AtomicU64,
    /// Incarnations started because the pipeline acknowledged a number never issued.
    pub incarnation_rotations: AtomicU64,
}

impl UplinkStats {
    /// Uplink lag in seconds with `depth` readings in the spool: how long the oldest pending
    /// data may have waited (time since the last acknowledgement); 0 when nothing is pending
    /// or nothing was ever acknowledged.
    pub fn lag_seconds(&self, depth: u64) -> i64 {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let last = self.last_ack_unix.load(Ordering::Relaxed);
        if depth == 0 || last == 0 {
            0
        } else {
            (now - last).max(0)
        }
    }

    /// Appends the uplink metrics in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String, depth: u64) {
        let lag = self.lag_seconds(depth);
        out.push_str(&format!(
            "# TYPE wm_gateway_uplink_connected gauge\nwm_gateway_uplink_connected {}\n\
             # TYPE wm_gateway_uplink_batches_total counter\nwm_gateway_uplink_batches_total {}\n\
             # TYPE wm_gateway_uplink_acked_readings_total counter\nwm_gateway_uplink_acked_readings_total {}\n\
             # TYPE wm_gateway_uplink_connects_total counter\nwm_gateway_uplink_connects_total {}\n\
             # TYPE wm_gateway_uplink_lag_seconds gauge\nwm_gateway_uplink_lag_seconds {}\n\
             # TYPE wm_gateway_uplink_ingest_acks_total counter\nwm_gateway_uplink_ingest_acks_total {}\n\
             # TYPE wm_gateway_uplink_resends_total counter\nwm_gateway_uplink_resends_total {}\n\
             # TYPE wm_gateway_spool_incarnation_rotations_total counter\nwm_gateway_spool_incarnation_rotations_total {}\n",
            u8::from(self.connected.load(Ordering::Relaxed)),
            self.batches_sent.load(Ordering::Relaxed),
            self.readings_acked.load(Ordering::Relaxed),
            self.connects.load(Ordering::Relaxed),
            lag,
            self.ingest_acks.load(Ordering::Relaxed),
            self.resends.load(Ordering::Relaxed),
            self.incarnation_rotations.load(Ordering::Relaxed),
        ));
    }
}

/// A batch ready to publish.
struct Staged {
    topic: String,
    payload: Vec<u8>,
    partition: u16,
    seqs: Vec<u64>,
}

/// Splices spooled entries (already `BatchEntry` JSON) into `ReadingBatch` payloads. With an
/// `incarnation` (end-to-end mode) each batch carries it and its `prev`, the last sequence
/// staged before it in its partition (`last`, updated here; absent at a pass's start).
fn stage(
    opts: &UplinkOptions,
    gateway_json: &str,
    incarnation: Option<&str>,
    last: &mut HashMap<u16, u64>,
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
            let mut payload = Vec::with_capacity(size + 160);
            let mut identity = String::new();
            if let Some(inc) = incarnation {
                // The id is hex (the spool makes it), so it needs no JSON escaping.
                identity.push_str(&format!(r#""incarnation":"{inc}","#));
                if let Some(prev) = last.get(&partition) {
                    identity.push_str(&format!(r#""prev":{prev},"#));
                }
                if let Some(e) = chunk.last() {
                    last.insert(partition, e.seq);
                }
            }
            payload.extend_from_slice(
                format!(
                    r#"{{"v":{},"gateway":{gateway_json},"partition":{partition},"sent_at":"{sent_at}",{identity}"entries":["#,
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
                topic: model::topic::readings(&opts.topic_root, partition),
                payload,
                partition,
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

/// End-to-end bookkeeping of one connection: what was sent and awaits the pipeline.
struct Pending {
    /// Per partition, sequences sent in order and not yet acknowledged by the pipeline.
    sent: HashMap<u16, VecDeque<u64>>,
    /// Total of `sent`.
    count: usize,
    /// Per partition, the last sequence staged in this pass (the next batch's `prev`).
    last: HashMap<u16, u64>,
    /// When an acknowledgement last made progress (or the pass started).
    progress_at: tokio::time::Instant,
    /// Current re-send timeout (doubles while nothing moves).
    timeout: Duration,
}

impl Pending {
    fn new(timeout: Duration) -> Self {
        Self {
            sent: HashMap::new(),
            count: 0,
            last: HashMap::new(),
            progress_at: tokio::time::Instant::now(),
            timeout,
        }
    }

    /// Starts a new pass from the oldest unacknowledged record.
    fn restart(&mut self) {
        self.sent.clear();
        self.count = 0;
        self.last.clear();
        self.progress_at = tokio::time::Instant::now();
    }

    fn record(&mut self, partition: u16, seqs: &[u64]) {
        if self.count == 0 {
            // The timeout runs from the first unacknowledged send, not from idle time.
            self.progress_at = tokio::time::Instant::now();
        }
        self.sent
            .entry(partition)
            .or_default()
            .extend(seqs.iter().copied());
        self.count += seqs.len();
    }

    /// Removes and returns the sequences of `partition` up to `seq`.
    fn acknowledge(&mut self, partition: u16, seq: u64) -> Vec<u64> {
        let mut done = Vec::new();
        if let Some(q) = self.sent.get_mut(&partition) {
            while q.front().is_some_and(|s| *s <= seq) {
                if let Some(s) = q.pop_front() {
                    done.push(s);
                }
            }
        }
        self.count -= done.len();
        done
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
    let end_to_end = opts.ack_timeout.is_some();
    let base_timeout = opts.ack_timeout.unwrap_or(MAX_ACK_TIMEOUT);
    let ack_topic = model::topic::ingest_ack(&opts.topic_root, opts.gateway.as_str());
    let max_unacked = opts.max_unacked.max(opts.batch_size.max(1));
    let mut incarnation = spool.incarnation();
    let mut pending = Pending::new(base_timeout);
    let mut cursor = Cursor::start();
    let mut staged: VecDeque<Staged> = VecDeque::new();
    // Published in order, waiting for their `Outgoing::Publish(pkid)` event.
    let mut requested: VecDeque<Vec<u64>> = VecDeque::new();
    let mut collided: Option<Vec<u64>> = None;
    let mut inflight: HashMap<u16, Vec<u64>> = HashMap::new();
    let mut connected = false;
    loop {
        if connected {
            while requested.len() + inflight.len() + usize::from(collided.is_some()) < window
                && (!end_to_end || pending.count < max_unacked)
            {
                if staged.is_empty() {
                    let entries = spool
                        .read(&mut cursor, read_chunk)
                        .map_err(|e| e.to_string())?;
                    if entries.is_empty() {
                        break;
                    }
                    let inc = end_to_end.then_some(incarnation.as_str());
                    stage(
                        opts,
                        &gateway_json,
                        inc,
                        &mut pending.last,
                        entries,
                        &mut staged,
                    );
                }
                let Some(batch) = staged.pop_front() else {
                    break;
                };
                client
                    .try_publish(batch.topic, QoS::AtLeastOnce, false, batch.payload)
                    .map_err(|e| format!("queueing a publish: {e}"))?;
                if end_to_end {
                    pending.record(batch.partition, &batch.seqs);
                }
                requested.push_back(batch.seqs);
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        let idle = staged.is_empty()
            && requested.len() + inflight.len() < window
            && (!end_to_end || pending.count < max_unacked);
        let resend_at = pending.progress_at + pending.timeout;
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Best effort: unacknowledged batches stay in the spool for the next start.
                let _unused = client.try_disconnect();
                return Ok(());
            }
            () = tokio::time::sleep_until(resend_at), if connected && end_to_end && pending.count > 0 => {
                stats.resends.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    unacknowledged = pending.count,
                    timeout_s = pending.timeout.as_secs(),
                    "no ingest acknowledgement in time; sending every unacknowledged reading again"
                );
                pending.timeout = (pending.timeout * 2).min(MAX_ACK_TIMEOUT.max(base_timeout));
                pending.restart();
                cursor = Cursor::start();
                staged.clear();
            }
            ev = events.recv() => match ev {
                None => return Err("event loop ended".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    connected = true;
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.connects.fetch_add(1, Ordering::Relaxed);
                    if end_to_end {
                        client
                            .try_subscribe(ack_topic.clone(), QoS::AtLeastOnce)
                            .map_err(|e| format!("subscribing to acknowledgements: {e}"))?;
                    }
                    tracing::info!(host = %opts.endpoint.host, port = opts.endpoint.port, "uplink connected");
                }
                Some(Ok(Event::Incoming(Packet::Publish(p)))) if end_to_end && p.topic == ack_topic => {
                    let ack = match serde_json::from_slice::<model::IngestAck>(&p.payload) {
                        Ok(a) if a.v == model::WIRE_VERSION => a,
                        Ok(a) => {
                            tracing::warn!(version = a.v, "ingest acknowledgement of unknown version ignored");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "malformed ingest acknowledgement ignored");
                            continue;
                        }
                    };
                    if ack.incarnation != incarnation {
                        // For a former incarnation: what it covered is sent again anyway.
                        continue;
                    }
                    stats.ingest_acks.fetch_add(1, Ordering::Relaxed);
                    if ack.seq >= spool.stats().next_seq {
                        // The pipeline claims a number this spool never issued: its progress
                        // record is corrupt or forged and would discard every new reading.
                        tracing::error!(
                            alarm = "ingest_progress_ahead",
                            partition = ack.partition,
                            acknowledged = ack.seq,
                            issued_below = spool.stats().next_seq,
                            "pipeline acknowledged a sequence this spool never issued; starting a new incarnation"
                        );
                        incarnation = spool.rotate_incarnation().map_err(|e| e.to_string())?;
                        stats.incarnation_rotations.fetch_add(1, Ordering::Relaxed);
                        pending.restart();
                        cursor = Cursor::start();
                        staged.clear();
                        continue;
                    }
                    let done = pending.acknowledge(ack.partition, ack.seq);
                    if !done.is_empty() {
                        // Counted by the spool: a reading staged again after a re-send
                        // started, and acknowledged for its first copy before the second went
                        // out, comes back here a second time (issue 23's acked > stored gap).
                        let fresh = spool.ack(&done);
                        stats.readings_acked.fetch_add(fresh, Ordering::Relaxed);
                        stats.last_ack_unix.store(OffsetDateTime::now_utc().unix_timestamp(), Ordering::Relaxed);
                        pending.progress_at = tokio::time::Instant::now();
                        pending.timeout = base_timeout;
                    }
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
                    if let Some(seqs) = inflight.remove(&ack.pkid)
                        && !end_to_end
                    {
                        let fresh = spool.ack(&seqs);
                        stats.readings_acked.fetch_add(fresh, Ordering::Relaxed);
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
            ack_timeout: None,
            max_unacked: 100,
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
        let mut last = HashMap::new();
        stage(
            &opts,
            "\"gw-1\"",
            Some("ab12"),
            &mut last,
            entries,
            &mut out,
        );
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
            assert_eq!(batch.incarnation.as_deref(), Some("ab12"));
            seen.extend(s.seqs.iter().copied());
        }
        // `prev` chains the batches of a partition: the first has none, the next names the
        // last sequence of the one before.
        let mut prev_of: HashMap<u16, Option<u64>> = HashMap::new();
        for s in &out {
            let batch: model::ReadingBatch = serde_json::from_slice(&s.payload).unwrap();
            let expected = prev_of.get(&batch.partition).copied().flatten();
            assert_eq!(batch.prev, expected);
            prev_of.insert(batch.partition, s.seqs.last().copied());
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
