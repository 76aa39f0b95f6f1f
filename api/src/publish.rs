//! Durable hand-off of readings to the pipeline: `ReadingBatch`es on the partition topics
//! `{root}/readings/{p}` at QoS 1, answered only after the broker's PUBACK of every batch —
//! the gateway's uplink path, so the workers deduplicate and acknowledge them alike.
//!
//! The API is one more "gateway" (`gateway` = the node id) whose spool incarnation is fresh
//! for every process and whose sequence numbers are issued and published in one critical
//! section, so on every partition they arrive in increasing order (the worker drops a
//! sequence at or below what it committed). Batches carry no `prev`: a batch the broker lost
//! was never acknowledged to the caller, who retries it under new numbers.
//!
//! After a connection error the MQTT client is rebuilt from scratch (rumqttc would otherwise
//! re-send its in-flight publishes and shift the pkid ↔ request matching); waiting callers get
//! an error and retry.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::{BatchEntry, GatewayId, Reading, ReadingBatch, WIRE_VERSION};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::error::ApiError;

/// Broker settings of the publisher.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id (unique per API node).
    pub client_id: String,
    /// Topic root (`wm/v1`).
    pub topic_root: String,
    /// Partitions P (the workers' and gateways' value).
    pub partitions: u16,
    /// This node's gateway id in batches and provenance.
    pub gateway: GatewayId,
    /// How long to wait for PUBACKs before answering 503.
    pub ack_timeout: Duration,
}

#[derive(Default)]
struct Waiters {
    /// Published, waiting for their `Outgoing::Publish(pkid)` event, in request order.
    requested: VecDeque<oneshot::Sender<()>>,
    collided: Option<oneshot::Sender<()>>,
    inflight: HashMap<u16, oneshot::Sender<()>>,
}

struct Shared {
    client: Mutex<Option<AsyncClient>>,
    waiters: Mutex<Waiters>,
    connected: AtomicBool,
    /// Held while sequence numbers are issued and their batches queued, and while a lost
    /// connection's waiters are cleared, so no stale waiter survives into the next connection.
    order: tokio::sync::Mutex<()>,
}

/// Publishes reading batches and waits for the broker's acknowledgement.
pub struct Publisher {
    config: PublisherConfig,
    shared: Arc<Shared>,
    incarnation: String,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("gateway", &self.config.gateway)
            .field("incarnation", &self.incarnation)
            .finish()
    }
}

/// What a publish handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Readings published.
    pub readings: usize,
    /// Batches (one per partition touched).
    pub batches: usize,
}

impl Publisher {
    /// Starts the connection task and returns the publisher.
    pub fn start(config: PublisherConfig) -> Arc<Self> {
        let shared = Arc::new(Shared {
            client: Mutex::new(None),
            waiters: Mutex::new(Waiters::default()),
            connected: AtomicBool::new(false),
            order: tokio::sync::Mutex::new(()),
        });
        let incarnation = format!("{:016x}", rand::random::<u64>());
        tokio::spawn(run(config.clone(), Arc::clone(&shared)));
        Arc::new(Self {
            config,
            shared,
            incarnation,
            next_seq: AtomicU64::new(1),
        })
    }

    /// Whether the broker connection is up (readiness).
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// The gateway id readings are published under.
    pub fn gateway(&self) -> &GatewayId {
        &self.config.gateway
    }

    /// Publishes `readings` grouped by partition and returns once the broker acknowledged
    /// every batch.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] when the broker is not connected, the connection drops or the
    /// acknowledgements do not come within the timeout: nothing may be considered accepted.
    pub async fn publish(&self, readings: Vec<Reading>) -> Result<Published, ApiError> {
        let total = readings.len();
        let mut by_partition: std::collections::BTreeMap<u16, Vec<Reading>> = Default::default();
        for r in readings {
            by_partition
                .entry(r.meter.partition(self.config.partitions))
                .or_default()
                .push(r);
        }
        let mut receivers = Vec::with_capacity(by_partition.len());
        {
            let _order = self.shared.order.lock().await;
            let client = self
                .shared
                .client
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .filter(|_| self.connected())
                .ok_or_else(|| ApiError::Unavailable("the MQTT broker is not connected".into()))?;
            for (partition, rs) in by_partition {
                let entries = rs
                    .into_iter()
                    .map(|reading| BatchEntry {
                        seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
                        reading,
                    })
                    .collect();
                let batch = ReadingBatch {
                    v: WIRE_VERSION,
                    gateway: self.config.gateway.clone(),
                    partition,
                    sent_at: OffsetDateTime::now_utc(),
                    entries,
                    incarnation: Some(self.incarnation.clone()),
                    prev: None,
                };
                let payload = serde_json::to_vec(&batch)
                    .map_err(|e| ApiError::Internal(format!("encoding a batch: {e}")))?;
                let (tx, rx) = oneshot::channel();
                if let Ok(mut w) = self.shared.waiters.lock() {
                    w.requested.push_back(tx);
                }
                let topic = model::topic::readings(&self.config.topic_root, partition);
                client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("cannot queue a publish: {e}")))?;
                receivers.push(rx);
            }
        }
        let batches = receivers.len();
        let all = futures_join(receivers);
        match tokio::time::timeout(self.config.ack_timeout, all).await {
            Ok(true) => Ok(Published {
                readings: total,
                batches,
            }),
            Ok(false) => Err(ApiError::Unavailable(
                "the broker connection dropped before every batch was acknowledged; retry".into(),
            )),
            Err(_) => Err(ApiError::Unavailable(format!(
                "the broker did not acknowledge within {} s; retry",
                self.config.ack_timeout.as_secs()
            ))),
        }
    }
}

async fn futures_join(receivers: Vec<oneshot::Receiver<()>>) -> bool {
    let mut ok = true;
    for rx in receivers {
        ok &= rx.await.is_ok();
    }
    ok
}

async fn run(config: PublisherConfig, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        options.set_inflight(1000);
        options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let (client, mut events) = AsyncClient::new(options, 1024);
        if let Ok(mut c) = shared.client.lock() {
            *c = Some(client);
        }
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    shared.connected.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(200);
                    tracing::info!(host = %config.host, port = config.port, "publisher connected");
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Ok(mut w) = shared.waiters.lock() {
                        let next = match w.collided.take() {
                            Some(tx) => Some(tx),
                            None => w.requested.pop_front(),
                        };
                        if let Some(tx) = next {
                            w.inflight.insert(pkid, tx);
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::AwaitAck(_))) => {
                    if let Ok(mut w) = shared.waiters.lock() {
                        w.collided = w.requested.pop_front();
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Ok(mut w) = shared.waiters.lock()
                        && let Some(tx) = w.inflight.remove(&ack.pkid)
                    {
                        let _unused = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "publisher connection lost; reconnecting");
                    break;
                }
            }
        }
        let _order = shared.order.lock().await;
        shared.connected.store(false, Ordering::Relaxed);
        if let Ok(mut c) = shared.client.lock() {
            *c = None;
        }
        // Dropping the senders fails every waiting request: none of them may count as accepted.
        if let Ok(mut w) = shared.waiters.lock() {
            *w = Waiters::default();
        }
        drop(events);
        drop(_order);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
