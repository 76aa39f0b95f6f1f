//! The ingest worker: MQTT (QoS 1, persistent session, manual acks) → VEE → PostgreSQL.
//!
//! Worker `i` of `W` subscribes `{root}/readings/{p}` for the partitions with `p % W == i`,
//! with a stable client id and `clean_session = false`, so the broker keeps its subscriptions
//! and unacknowledged messages while it is down. Messages are gathered into a batch (up to
//! [`WorkerConfig::max_batch_readings`] or [`WorkerConfig::max_batch_delay`]), validated, written
//! in one transaction, and acknowledged only after the commit: a crash before the commit means
//! redelivery, and redelivery is harmless (spool-sequence progress and the row key dedupe).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::ingest::{self, Decoded, IngestMetrics, Progress};
use crate::journal::{self, JournalEntry, Pending};
use crate::store::{self, RejectRecord, StoreOptions, WriteSet};
use crate::vee::{Vee, VeeConfig};

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker host.
    pub broker_host: String,
    /// Broker port.
    pub broker_port: u16,
    /// MQTT client id: must be stable across restarts (the persistent session is keyed by it)
    /// and unique per worker.
    pub client_id: String,
    /// Topic root (`wm/v1`).
    pub topic_root: String,
    /// This worker's index, `0..workers`.
    pub worker: u16,
    /// Number of workers.
    pub workers: u16,
    /// Number of partitions (gateways' `partitions` setting).
    pub partitions: u16,
    /// A batch is written once it holds this many readings...
    pub max_batch_readings: usize,
    /// ... or this long after its first message arrived.
    pub max_batch_delay: Duration,
    /// Consumption spans are folded from the journal into the rollups at most this long after
    /// their readings commit...
    pub flush_interval: Duration,
    /// ... or once no batch has arrived for this long ...
    pub flush_idle: Duration,
    /// ... or once this many consumption spans wait (bounds the memory they hold).
    pub flush_max_spans: usize,
    /// Meter states are checkpointed to `meter_state` (and their journal records deleted) at
    /// most this long after their readings commit, and whenever the worker is idle.
    pub state_checkpoint_interval: Duration,
    /// VEE thresholds.
    pub vee: VeeConfig,
    /// Storage options.
    pub store: StoreOptions,
    /// Detector thresholds (`docs/detectors.md`).
    pub detect: crate::detect::DetectConfig,
    /// How often the communication-loss sweep runs.
    pub sweep_interval: Duration,
}

impl WorkerConfig {
    /// Returns a configuration with defaults for everything but identity and partitioning.
    pub fn new(
        broker_url: &str,
        topic_root: &str,
        worker: u16,
        workers: u16,
        partitions: u16,
    ) -> Result<Self, WorkerError> {
        let (broker_host, broker_port) = crate::config::parse_mqtt_url(broker_url)
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        if workers == 0 || worker >= workers || partitions == 0 {
            return Err(WorkerError::Config(format!(
                "worker {worker} of {workers} over {partitions} partitions: need worker < workers and partitions > 0"
            )));
        }
        Ok(Self {
            broker_host,
            broker_port,
            client_id: format!("wm-pipeline-{worker}"),
            topic_root: topic_root.to_owned(),
            worker,
            workers,
            partitions,
            max_batch_readings: 40_000,
            max_batch_delay: Duration::from_millis(50),
            flush_interval: Duration::from_secs(5),
            flush_idle: Duration::from_millis(250),
            flush_max_spans: 500_000,
            state_checkpoint_interval: Duration::from_secs(30),
            vee: VeeConfig::default(),
            store: StoreOptions::default(),
            detect: crate::detect::DetectConfig::default(),
            sweep_interval: Duration::from_secs(60),
        })
    }

    /// Returns true when this worker owns `meter`.
    pub fn owns(&self, meter: &str) -> bool {
        ingest::owns_meter(meter, self.worker, self.workers, self.partitions)
    }
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is unusable.
    #[error("bad worker configuration: {0}")]
    Config(String),
    /// Loading state or maintaining partitions failed at start.
    #[error("cannot start the worker")]
    Start(#[source] store::StoreError),
    /// The MQTT client's request channel closed (the event loop ended).
    #[error("mqtt client closed while {0}")]
    Mqtt(&'static str),
}

/// Runs a worker until `shutdown` becomes true. Returns after in-flight work is committed.
///
/// # Errors
/// Returns [`WorkerError`] when it cannot start; database errors while running are retried.
pub async fn run(
    config: WorkerConfig,
    pool: PgPool,
    metrics: Arc<IngestMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    store::ensure_partitions(&pool, 3)
        .await
        .map_err(WorkerError::Start)?;
    let started = Instant::now();
    let mut vee = store::load_vee(&pool, config.vee.clone(), |m| config.owns(m))
        .await
        .map_err(WorkerError::Start)?;
    // Journal records a stopped or crashed worker left on these partitions: their states are
    // newer than `meter_state`, and the writer folds them before anything else.
    let owned = ingest::owned_partitions(config.worker, config.workers, config.partitions);
    let recovered = {
        let mut conn = pool.acquire().await.map_err(|source| {
            WorkerError::Start(store::StoreError::Stage {
                stage: "acquiring a connection",
                source,
            })
        })?;
        journal::recover(&mut conn, &owned)
            .await
            .map_err(WorkerError::Start)?
    };
    for (m, s) in recovered.states() {
        vee.insert_state(m, *s);
    }
    IngestMetrics::add(&metrics.pending_spans, recovered.spans() as u64);
    tracing::info!(
        worker = config.worker,
        workers = config.workers,
        meters = vee.meters(),
        state_bytes = vee.state_bytes(),
        journal_spans = recovered.spans(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "meter state rebuilt"
    );
    let detectors = crate::detect::store::load(&pool, config.detect.clone(), |m| config.owns(m))
        .await
        .map_err(WorkerError::Start)?;
    tracing::info!(
        meters = detectors.meters(),
        state_bytes = detectors.state_bytes(),
        "detector state rebuilt"
    );
    let progress = load_progress(&pool, &config)
        .await
        .map_err(WorkerError::Start)?;

    let mut options = MqttOptions::new(
        config.client_id.clone(),
        config.broker_host.clone(),
        config.broker_port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let topics: Vec<rumqttc::SubscribeFilter> = owned
        .into_iter()
        .map(|p| {
            rumqttc::SubscribeFilter::new(
                ingest::readings_topic(&config.topic_root, p),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    let (tx, rx) = mpsc::channel::<Publish>(4096);

    // The event loop, the processor and the writer run in this one task (not spawned), so
    // aborting the task stops all of them: exactly what a crash does. The event loop runs until
    // the work is done (shutdown ends the processor, which lets the writer drain), so the last
    // batch is committed before the connection drops.
    let sub_client = client.clone();
    let event_loop = async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(session_present = ack.session_present, "mqtt connected");
                    // Subscribing again on a present session is harmless and covers a broker
                    // that lost it.
                    if let Err(e) = sub_client.try_subscribe_many(topics.clone()) {
                        tracing::warn!(error = %e, "mqtt subscribe failed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt connection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    let processor = Processor {
        config: &config,
        pool: &pool,
        metrics: &metrics,
        vee,
        detectors,
        progress,
    };
    // One batch may be validated while the previous one is being written: the writer commits
    // batches strictly in order and retries until each succeeds, so the processor may apply a
    // batch's meter states as soon as it has validated it (they become durable in order, and
    // nothing is acknowledged before its commit).
    let (jobs_tx, jobs_rx) = mpsc::channel::<WriteJob>(1);
    let process = processor.run(rx, jobs_tx, &mut shutdown);
    let write = writer(&config, &pool, &client, &metrics, jobs_rx, recovered);
    let work = async {
        let (p, w) = tokio::join!(process, write);
        p.and(w)
    };
    tokio::select! {
        () = event_loop => {}
        r = work => r?,
    }
    client.disconnect().await.ok();
    Ok(())
}

async fn load_progress(
    pool: &PgPool,
    config: &WorkerConfig,
) -> Result<Progress, store::StoreError> {
    let rows: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT gateway_id, partition, max_seq FROM ingest_progress")
            .fetch_all(pool)
            .await
            .map_err(|source| store::StoreError::Stage {
                stage: "loading spool progress",
                source,
            })?;
    let mut progress = Progress::default();
    for (g, p, s) in rows {
        if let Ok(p) = u16::try_from(p)
            && p % config.workers == config.worker
        {
            progress.set(&g, p, s);
        }
    }
    Ok(progress)
}

/// A validated batch waiting for its transaction, and the messages to acknowledge after it.
struct WriteJob {
    readings: Vec<model::Reading>,
    /// Consumption spans and meter states, by partition, for the journal.
    entries: Vec<JournalEntry>,
    progress: Vec<(String, u16, i64)>,
    rejects: Vec<RejectRecord>,
    out_of_order: Vec<(model::MeterId, OffsetDateTime)>,
    publishes: Vec<Publish>,
    counts: [u64; 4],
    /// Alarm events and detector states, written in the same transaction.
    alarms: crate::detect::store::AlarmWrite,
}

/// Writes jobs in order, retrying each until it commits, then acknowledges its messages;
/// folds the journal into the rollups and meter state when due, when idle and at the end.
async fn writer(
    config: &WorkerConfig,
    pool: &PgPool,
    client: &AsyncClient,
    metrics: &IngestMetrics,
    mut jobs: mpsc::Receiver<WriteJob>,
    mut pending: Pending,
) -> Result<(), WorkerError> {
    // What a stopped or crashed worker left: folded before the first new batch is written.
    flush(config, pool, metrics, &mut pending, true, u32::MAX).await;
    loop {
        let checkpoint = pending.states_due(config.state_checkpoint_interval);
        if checkpoint || pending.due(config.flush_interval, config.flush_max_spans) {
            flush(config, pool, metrics, &mut pending, checkpoint, u32::MAX).await;
        }
        let job = if pending.is_empty() {
            jobs.recv().await
        } else {
            match tokio::time::timeout(config.flush_idle, jobs.recv()).await {
                Ok(job) => job,
                Err(_) => {
                    // Idle: bring everything up to date, states included.
                    flush(config, pool, metrics, &mut pending, true, u32::MAX).await;
                    continue;
                }
            }
        };
        let Some(job) = job else { break };
        let set = WriteSet {
            readings: &job.readings,
            usage: &[],
            states: None,
            progress: &job.progress,
            rejects: &job.rejects,
            out_of_order: &job.out_of_order,
            journal: Some(&job.entries),
            alarms: Some(&job.alarms),
        };
        let mut attempt = 0u32;
        let stats = loop {
            let result = match pool.acquire().await {
                Ok(mut conn) => store::write_batch(&mut conn, &set, config.store).await,
                Err(source) => Err(store::StoreError::Stage {
                    stage: "acquiring a connection",
                    source,
                }),
            };
            match result {
                Ok(stats) => break stats,
                Err(e) => {
                    IngestMetrics::add(&metrics.commit_failures, 1);
                    attempt += 1;
                    tracing::error!(error = %e, source = ?std::error::Error::source(&e), attempt, "ingest transaction failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25))))
                        .await;
                }
            }
        };
        // Pending before stored: whoever sees every reading stored and nothing pending knows
        // the rollups are complete.
        let spans: usize = job.entries.iter().map(|e| e.usage.len()).sum();
        IngestMetrics::add(&metrics.pending_spans, spans as u64);
        pending.add(stats.journal_ids.into_iter().zip(job.entries).collect());
        IngestMetrics::add(&metrics.commits, 1);
        IngestMetrics::add(&metrics.stored, stats.inserted);
        let [duplicates, conflicts, estimated, rejected] = job.counts;
        IngestMetrics::add(&metrics.duplicates, duplicates);
        IngestMetrics::add(&metrics.conflicts, conflicts);
        IngestMetrics::add(&metrics.estimated, estimated);
        IngestMetrics::add(&metrics.rejected, rejected);
        crate::detect::publish(client, &config.topic_root, &job.alarms.events).await;
        for p in &job.publishes {
            client
                .ack(p)
                .await
                .map_err(|_| WorkerError::Mqtt("acknowledging"))?;
        }
    }
    // At shutdown: a few attempts; whatever is left stays in the journal for the next start.
    flush(config, pool, metrics, &mut pending, true, 3).await;
    Ok(())
}

/// Folds `pending` into the rollups (and with `checkpoint` the meter states), retrying up to
/// `attempts` times.
async fn flush(
    config: &WorkerConfig,
    pool: &PgPool,
    metrics: &IngestMetrics,
    pending: &mut Pending,
    checkpoint: bool,
    attempts: u32,
) {
    if pending.is_empty() {
        return;
    }
    let spans = pending.spans() as u64;
    for attempt in 1..=attempts {
        let started = Instant::now();
        let result = match pool.acquire().await {
            Ok(mut conn) => {
                journal::flush(
                    &mut conn,
                    pending,
                    config.store,
                    |m| config.owns(m),
                    checkpoint,
                )
                .await
            }
            Err(source) => Err(store::StoreError::Stage {
                stage: "acquiring a connection",
                source,
            }),
        };
        match result {
            Ok(stats) => {
                IngestMetrics::add(&metrics.flushes, 1);
                metrics
                    .pending_spans
                    .fetch_sub(spans, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(
                    records = stats.records,
                    deleted = stats.deleted,
                    spans = stats.spans,
                    skipped = stats.skipped,
                    states = stats.states,
                    checkpoint,
                    rollups_ms = stats.rollups_ms,
                    records_ms = stats.records_ms,
                    ms = started.elapsed().as_millis() as u64,
                    "journal folded"
                );
                return;
            }
            Err(e) => {
                IngestMetrics::add(&metrics.flush_failures, 1);
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), attempt, "journal fold failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(25)))).await;
            }
        }
    }
}

struct Processor<'a> {
    config: &'a WorkerConfig,
    pool: &'a PgPool,
    metrics: &'a IngestMetrics,
    vee: Vee,
    detectors: crate::detect::Detectors,
    progress: Progress,
}

impl Processor<'_> {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Publish>,
        jobs: mpsc::Sender<WriteJob>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), WorkerError> {
        let mut maintenance = tokio::time::interval(Duration::from_secs(24 * 3600));
        maintenance.tick().await;
        let mut sweep = tokio::time::interval(self.config.sweep_interval);
        sweep.tick().await;
        loop {
            let first = tokio::select! {
                changed = shutdown.changed() => {
                    // A dropped sender can never ask for shutdown again: treat it as one
                    // (instead of spinning on the closed channel).
                    if changed.is_err() || *shutdown.borrow() { return Ok(()); }
                    continue;
                }
                _ = sweep.tick() => {
                    // Silence has no reading to trigger on: judged against the wall clock.
                    let alarms = crate::detect::sweep_write(&mut self.detectors);
                    if !alarms.is_empty() && jobs.send(WriteJob::alarms_only(alarms)).await.is_err() {
                        return Err(WorkerError::Mqtt("handing a batch to the writer"));
                    }
                    continue;
                }
                _ = maintenance.tick() => {
                    if let Err(e) = store::ensure_partitions(self.pool, 3).await {
                        tracing::error!(error = %e, "partition maintenance failed");
                    }
                    continue;
                }
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return Ok(()),
                },
            };
            let deadline = tokio::time::Instant::now() + self.config.max_batch_delay;
            let mut batch = vec![first];
            let mut estimate = estimate_readings(&batch);
            while estimate < self.config.max_batch_readings {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => {
                        batch.push(p);
                        estimate = estimate_readings(&batch);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let job = self.process(batch).await;
            if jobs.send(job).await.is_err() {
                return Err(WorkerError::Mqtt("handing a batch to the writer"));
            }
        }
    }

    async fn process(&mut self, publishes: Vec<Publish>) -> WriteJob {
        let started = Instant::now();
        IngestMetrics::add(&self.metrics.messages, publishes.len() as u64);
        let mut readings = Vec::new();
        let mut rejects = Vec::new();
        let mut progress = self.progress.clone();
        let mut touched: HashSet<(String, u16)> = HashSet::new();
        for p in &publishes {
            match ingest::decode_payload(&p.payload) {
                Decoded::Batch(batch) => {
                    let key = (batch.gateway.as_str().to_owned(), batch.partition);
                    if !progress.knows(&key.0, key.1) {
                        let seq = self.lookup_progress(&key.0, key.1).await;
                        progress.set(&key.0, key.1, seq);
                    }
                    let (entries, dropped) = progress.filter(batch);
                    IngestMetrics::add(&self.metrics.seq_duplicates, dropped);
                    touched.insert(key);
                    for e in entries {
                        // A gateway configured with another partition count would send meters
                        // this worker does not own; validating them here would fork their state.
                        if self.config.owns(e.reading.meter.as_str()) {
                            readings.push(e.reading);
                        } else {
                            IngestMetrics::add(&self.metrics.wrong_partition, 1);
                            rejects.push(RejectRecord {
                                kind: "wrong_partition",
                                topic: Some(p.topic.clone()),
                                meter: Some(e.reading.meter.as_str().to_owned()),
                                ts: Some(e.reading.ts),
                                detail: serde_json::to_value(&e.reading).unwrap_or_default(),
                            });
                        }
                    }
                }
                Decoded::UnknownVersion { version } => {
                    IngestMetrics::add(&self.metrics.unknown_version, 1);
                    tracing::warn!(topic = %p.topic, version, "batch of unknown wire version refused");
                    rejects.push(RejectRecord {
                        kind: "unknown_version",
                        topic: Some(p.topic.clone()),
                        meter: None,
                        ts: None,
                        detail: serde_json::json!({
                            "version": version,
                            "payload": String::from_utf8_lossy(&p.payload),
                        }),
                    });
                }
                Decoded::Malformed { error } => {
                    IngestMetrics::add(&self.metrics.malformed, 1);
                    tracing::warn!(topic = %p.topic, %error, "malformed batch refused");
                    rejects.push(RejectRecord {
                        kind: "malformed",
                        topic: Some(p.topic.clone()),
                        meter: None,
                        ts: None,
                        detail: serde_json::json!({
                            "error": error,
                            "payload": String::from_utf8_lossy(&p.payload),
                        }),
                    });
                }
            }
        }
        let decreasing = self.vee.decreasing_meters(readings.iter());
        if !decreasing.is_empty() {
            match store::load_replacements(self.pool, &decreasing).await {
                Ok(reps) => {
                    for (m, r) in reps {
                        self.vee.add_replacement(&m, r);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot load meter replacements"),
            }
        }
        let out = self.vee.validate(readings, OffsetDateTime::now_utc());
        rejects.extend(out.conflicts.iter().map(RejectRecord::conflict));
        let progress_rows: Vec<(String, u16, i64)> = touched
            .iter()
            .filter_map(|(g, p)| progress.get(g, *p).map(|s| (g.clone(), *p, s)))
            .filter(|(_, _, s)| *s >= 0)
            .collect();
        let counts = [
            out.duplicates,
            out.conflicts.len() as u64,
            out.estimated,
            out.rejected,
        ];
        self.vee.commit(&out.states);
        let alarms = crate::detect::batch_write(&mut self.detectors, &out.readings);
        self.progress = progress;
        tracing::debug!(
            messages = publishes.len(),
            readings = out.readings.len(),
            ms = started.elapsed().as_millis() as u64,
            "batch validated"
        );
        WriteJob {
            readings: out.readings,
            entries: journal::split(out.usage, out.states, self.config.partitions),
            progress: progress_rows,
            rejects,
            out_of_order: out.out_of_order,
            publishes,
            counts,
            alarms,
        }
    }

    async fn lookup_progress(&self, gateway: &str, partition: u16) -> i64 {
        sqlx::query_scalar::<_, i64>(
            "SELECT max_seq FROM ingest_progress WHERE gateway_id = $1 AND partition = $2",
        )
        .bind(gateway)
        .bind(i32::from(partition))
        .fetch_optional(self.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(-1)
    }
}

impl WriteJob {
    /// A job that only writes alarms (the communication-loss sweep).
    fn alarms_only(alarms: crate::detect::store::AlarmWrite) -> Self {
        Self {
            readings: Vec::new(),
            entries: Vec::new(),
            progress: Vec::new(),
            rejects: Vec::new(),
            out_of_order: Vec::new(),
            publishes: Vec::new(),
            counts: [0; 4],
            alarms,
        }
    }
}

/// Rough reading count of pending payloads (about 330 bytes of JSON per entry), so a batch can
/// be cut without decoding twice.
fn estimate_readings(batch: &[Publish]) -> usize {
    batch.iter().map(|p| p.payload.len() / 330 + 1).sum()
}

/// Removes a worker's persistent session from the broker (connects once with
/// `clean_session = true`): after a partition move, or after tests and benchmarks.
///
/// # Errors
/// Returns [`WorkerError::Config`] for a bad URL and [`WorkerError::Mqtt`] when the broker
/// cannot be reached within five seconds.
pub async fn forget_session(broker_url: &str, client_id: &str) -> Result<(), WorkerError> {
    let (host, port) = crate::config::parse_mqtt_url(broker_url)
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err(()),
            }
        }
    })
    .await;
    if !matches!(connected, Ok(Ok(()))) {
        return Err(WorkerError::Mqtt("forgetting a session"));
    }
    client.disconnect().await.ok();
    // Drive the disconnect out.
    tokio::time::timeout(Duration::from_millis(500), eventloop.poll())
        .await
        .ok();
    Ok(())
}
