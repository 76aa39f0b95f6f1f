//! The hand-off from sources to the spool.
//!
//! A source calls [`IngestSink::submit`] and acknowledges its device (CoAP reply, HTTP 202,
//! MQTT PUBACK, M-Bus poll done) only after it returns `Ok`: by then the readings are durable
//! in the spool. The spool writer owns the receiving end and answers each request after its
//! group commit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use model::Reading;
use tokio::sync::{mpsc, oneshot};

/// Why readings could not be handed to the spool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The spool writer has stopped (the gateway is shutting down).
    #[error("spool is closed: the gateway is shutting down")]
    Closed,
    /// The spool could not write or sync the readings.
    #[error("spool write failed: {0}")]
    Spool(String),
}

/// One request to the spool writer: readings and where to report their durability.
#[derive(Debug)]
pub struct SubmitRequest {
    /// Readings of one frame (or one poll), in order.
    pub readings: Vec<Reading>,
    /// Answered once the readings are durable (or could not be made so).
    pub done: oneshot::Sender<Result<(), SinkError>>,
    /// For a pipelining submitter ([`IngestSink::enqueue_in`]): the write failures it had seen
    /// when its session began. Once a write has failed since, the writer refuses the request
    /// unwritten, so nothing of that session lands after the failed readings.
    pub epoch: Option<Epoch>,
}

/// The spool's failed writes as a submitter saw them when its session began.
#[derive(Debug, Clone)]
pub struct Epoch {
    seen: u64,
    failures: Arc<AtomicU64>,
}

impl Epoch {
    /// True when a write has failed since this epoch began.
    pub fn is_stale(&self) -> bool {
        self.failures.load(Ordering::SeqCst) > self.seen
    }

    /// Records a failed write (by the spool writer).
    pub fn count_failure(&self) {
        self.failures.fetch_add(1, Ordering::SeqCst);
    }
}

/// Readings handed to the spool by [`IngestSink::enqueue`], not yet known to be durable.
#[derive(Debug)]
pub struct Durable(Option<oneshot::Receiver<Result<(), SinkError>>>);

impl Durable {
    /// Nothing to wait for (no readings, or nothing to store).
    pub fn ready() -> Self {
        Self(None)
    }

    /// Waits until the readings are durable, or the spool says why they are not.
    pub async fn wait(self) -> Result<(), SinkError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| SinkError::Closed)?,
        }
    }
}

/// Per-source counters, rendered in Prometheus text format by the gateway's metrics endpoint.
#[derive(Debug, Default)]
pub struct SourceCounters {
    frames: Mutex<BTreeMap<String, u64>>,
    decode_errors: Mutex<BTreeMap<(String, String), u64>>,
    kernel_drops: Mutex<BTreeMap<String, u64>>,
    compact: Mutex<BTreeMap<(String, CompactOutcome), u64>>,
}

/// What became of a compact wM-Bus telegram whose format was unknown when it arrived
/// (`wm_gateway_wmbus_compact_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CompactOutcome {
    /// Held until a full frame teaches its format.
    Held,
    /// Decoded after the full frame arrived; its readings were submitted.
    Decoded,
    /// Dropped: older than `compact_hold_max_age` before its full frame came.
    Expired,
    /// Dropped: the hold was full (`compact_hold_frames`), the oldest made room.
    Evicted,
    /// The full frame came but the held telegram did not decode with it (counted under its
    /// decode error code as well).
    Failed,
}

impl CompactOutcome {
    /// The Prometheus label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Decoded => "decoded",
            Self::Expired => "expired",
            Self::Evicted => "evicted",
            Self::Failed => "failed",
        }
    }
}

impl SourceCounters {
    /// Frames received by `source_id` so far.
    pub fn frames(&self, source_id: &str) -> u64 {
        lock(&self.frames).get(source_id).copied().unwrap_or(0)
    }

    /// Decode errors of `kind` seen by `source_id` so far.
    pub fn decode_errors(&self, source_id: &str, kind: &str) -> u64 {
        lock(&self.decode_errors)
            .get(&(source_id.to_owned(), kind.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Datagrams the kernel dropped for `source_id`'s socket (receive buffer full).
    pub fn kernel_drops(&self, source_id: &str) -> u64 {
        lock(&self.kernel_drops)
            .get(source_id)
            .copied()
            .unwrap_or(0)
    }

    /// Counts `n` more datagrams the kernel dropped for `source_id`'s socket (the source
    /// passes the growth of the socket's own drop counter, so a restart adds up).
    pub fn add_kernel_drops(&self, source_id: &str, n: u64) {
        *lock(&self.kernel_drops)
            .entry(source_id.to_owned())
            .or_default() += n;
    }

    /// Compact wM-Bus telegrams of `source_id` with `outcome` so far.
    pub fn compact(&self, source_id: &str, outcome: CompactOutcome) -> u64 {
        lock(&self.compact)
            .get(&(source_id.to_owned(), outcome))
            .copied()
            .unwrap_or(0)
    }

    /// Counts `n` more compact wM-Bus telegrams of `source_id` with `outcome`.
    pub fn add_compact(&self, source_id: &str, outcome: CompactOutcome, n: u64) {
        if n > 0 {
            *lock(&self.compact)
                .entry((source_id.to_owned(), outcome))
                .or_default() += n;
        }
    }

    /// Appends `wm_gateway_frames_total`, `wm_gateway_decode_errors_total`,
    /// `wm_gateway_udp_kernel_drops_total` and `wm_gateway_wmbus_compact_total` to `out`.
    pub fn render_prometheus(&self, out: &mut String) {
        out.push_str("# TYPE wm_gateway_frames_total counter\n");
        for (source, n) in lock(&self.frames).iter() {
            out.push_str(&format!(
                "wm_gateway_frames_total{{source=\"{source}\"}} {n}\n"
            ));
        }
        out.push_str("# TYPE wm_gateway_decode_errors_total counter\n");
        for ((source, kind), n) in lock(&self.decode_errors).iter() {
            out.push_str(&format!(
                "wm_gateway_decode_errors_total{{source=\"{source}\",kind=\"{kind}\"}} {n}\n"
            ));
        }
        out.push_str("# TYPE wm_gateway_udp_kernel_drops_total counter\n");
        for (source, n) in lock(&self.kernel_drops).iter() {
            out.push_str(&format!(
                "wm_gateway_udp_kernel_drops_total{{source=\"{source}\"}} {n}\n"
            ));
        }
        out.push_str("# TYPE wm_gateway_wmbus_compact_total counter\n");
        for ((source, outcome), n) in lock(&self.compact).iter() {
            out.push_str(&format!(
                "wm_gateway_wmbus_compact_total{{source=\"{source}\",outcome=\"{}\"}} {n}\n",
                outcome.as_str()
            ));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A counter map stays consistent even if a holder panicked, so poisoning is ignored.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Cloneable handle every source gets: submit readings, count frames and decode errors.
#[derive(Debug, Clone)]
pub struct IngestSink {
    tx: mpsc::Sender<SubmitRequest>,
    counters: Arc<SourceCounters>,
    failures: Arc<AtomicU64>,
}

impl IngestSink {
    /// Creates a sink and the receiver the spool writer (or a test) drains.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<SubmitRequest>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = IngestSink {
            tx,
            counters: Arc::new(SourceCounters::default()),
            failures: Arc::new(AtomicU64::new(0)),
        };
        (sink, rx)
    }

    /// Hands readings to the spool and waits until they are durable.
    pub async fn submit(&self, readings: Vec<Reading>) -> Result<(), SinkError> {
        self.enqueue(readings).await?.wait().await
    }

    /// Hands readings to the spool without waiting for their group commit: the spool appends
    /// them in the order of `enqueue` calls, and [`Durable::wait`] says when they are on disk.
    /// A source with many messages in flight (the concentrator MQTT source) keeps decoding
    /// while earlier ones are being synced, so they share one `fsync`.
    pub async fn enqueue(&self, readings: Vec<Reading>) -> Result<Durable, SinkError> {
        self.send(readings, None).await
    }

    /// The current epoch, for a session of [`IngestSink::enqueue_in`] calls.
    pub fn epoch(&self) -> Epoch {
        Epoch {
            seen: self.failures.load(Ordering::SeqCst),
            failures: Arc::clone(&self.failures),
        }
    }

    /// [`IngestSink::enqueue`] within a session that began at `epoch`: after any failed write
    /// the rest of the session is refused, not written, so the messages re-delivered after the
    /// failure keep their order.
    pub async fn enqueue_in(
        &self,
        epoch: &Epoch,
        readings: Vec<Reading>,
    ) -> Result<Durable, SinkError> {
        self.send(readings, Some(epoch.clone())).await
    }

    async fn send(
        &self,
        readings: Vec<Reading>,
        epoch: Option<Epoch>,
    ) -> Result<Durable, SinkError> {
        if readings.is_empty() {
            return Ok(Durable(None));
        }
        let (done, wait) = oneshot::channel();
        self.tx
            .send(SubmitRequest {
                readings,
                done,
                epoch,
            })
            .await
            .map_err(|_| SinkError::Closed)?;
        Ok(Durable(Some(wait)))
    }

    /// Counts one frame received by `source_id`.
    pub fn frame_received(&self, source_id: &str) {
        *lock(&self.counters.frames)
            .entry(source_id.to_owned())
            .or_default() += 1;
    }

    /// Counts one frame `source_id` could not decode, by error kind (`checksum`, `length`...).
    pub fn decode_failed(&self, source_id: &str, kind: &str) {
        *lock(&self.counters.decode_errors)
            .entry((source_id.to_owned(), kind.to_owned()))
            .or_default() += 1;
    }

    /// The counters shared by all clones of this sink.
    pub fn counters(&self) -> &Arc<SourceCounters> {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn submit_waits_for_the_writer_and_counters_render() {
        let (sink, mut rx) = IngestSink::new(4);
        let writer = tokio::spawn(async move {
            let req = rx.recv().await.expect("one request");
            let n = req.readings.len();
            req.done.send(Ok(())).expect("submitter waits");
            n
        });
        // An empty submit never reaches the writer.
        sink.submit(vec![]).await.expect("empty is fine");
        let reading: Reading = serde_json::from_str(SAMPLE).expect("sample reading");
        sink.submit(vec![reading]).await.expect("durable");
        assert_eq!(writer.await.expect("writer"), 1);
        sink.frame_received("coap");
        sink.frame_received("coap");
        sink.decode_failed("coap", "checksum");
        assert_eq!(sink.counters().frames("coap"), 2);
        assert_eq!(sink.counters().decode_errors("coap", "checksum"), 1);
        let mut text = String::new();
        sink.counters().render_prometheus(&mut text);
        assert!(text.contains("wm_gateway_frames_total{source=\"coap\"} 2"));
        assert!(
            text.contains("wm_gateway_decode_errors_total{source=\"coap\",kind=\"checksum\"} 1")
        );
    }

    #[tokio::test]
    async fn submit_after_writer_stopped_is_closed() {
        let (sink, rx) = IngestSink::new(1);
        drop(rx);
        let reading: Reading = serde_json::from_str(SAMPLE).expect("sample reading");
        assert_eq!(sink.submit(vec![reading]).await, Err(SinkError::Closed));
    }

    const SAMPLE: &str = r#"{"meter":"cjt188:78330011223344","ts":"2026-11-24T10:43:00Z","clock":"meter",
        "quantity":"volume","value":"556677.00","unit":"m3","quality":{"status":"actual"},
        "provenance":{"gateway":"gw-1","source":"coap","source_id":"nbiot",
        "frame_hash":"00","received_at":"2026-11-24T10:43:05Z"}}"#;
}
