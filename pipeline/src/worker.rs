//! The ingest worker: MQTT (QoS 1, persistent session, manual acks) → VEE → PostgreSQL.
//!
//! Worker `i` of `W` subscribes `{root}/readings/{p}` for the partitions with `p % W == i`,
//! with a stable client id and `clean_session = false`, so the broker keeps its subscriptions
//! and unacknowledged messages while it is down. Messages are gathered into a batch (up to
//! [`WorkerConfig::max_batch_readings`], until the queue runs empty while the writer has room,
//! or [`WorkerConfig::max_batch_delay`] while it has none), validated, written
//! in one transaction, and acknowledged only after the commit: a crash before the commit means
//! redelivery, and redelivery is harmless (spool-sequence progress and the row key dedupe).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Event, Packet, Publish, QoS};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::db::journal::{self, JournalEntry, Pending};
use crate::db::rejects::RejectRecord;
use crate::db::{self, StoreOptions, WriteMode, WriteSet, retry};
use crate::ingest::{self, Decoded, IngestMetrics, Progress, ProgressKey};
use crate::vee::{Vee, VeeConfig};

mod lane;

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The broker (`mqtts://` connects over TLS).
    pub broker: model::BrokerUrl,
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
    /// ... or, while the writer is still busy with the previous batch, this long after its
    /// first message arrived. A batch whose queue runs empty while the writer has room is
    /// handed over at once (adaptive batching: no wait when nothing else is arriving).
    pub max_batch_delay: Duration,
    /// Adaptive batching (the default): hand a batch over once the queue runs empty while the
    /// writer has room. `false`: the fixed batching of before, every batch waits
    /// `max_batch_delay` for company (kept to compare the two in benches).
    pub adaptive_batching: bool,
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
    /// What the sweep takes as "now": the wall clock (default) or the newest event time this
    /// worker has validated.
    pub sweep_now: crate::detect::SweepNow,
    /// How often worker 0 judges the DMA water balance (`detect::dma`).
    pub dma_interval: Duration,
    /// Alarms committed by this worker are also handed here (the JSON published on
    /// `{root}/alarms`), for a control service in the same process: it acts on them without
    /// waiting for the broker round trip. `None`: only published.
    pub alarm_tap: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// The priority lane (`worker/lane.rs`): readings of meters with a valve and the
    /// `auto_close_on_burst` policy are committed in small transactions of their own instead of
    /// waiting behind the bulk transaction. `false`: every reading takes the bulk path.
    pub priority_lane: bool,
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
        let broker = crate::config::broker_url(broker_url)
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        if workers == 0 || worker >= workers || partitions == 0 {
            return Err(WorkerError::Config(format!(
                "worker {worker} of {workers} over {partitions} partitions: need worker < workers and partitions > 0"
            )));
        }
        Ok(Self {
            broker,
            client_id: format!("wm-pipeline-{worker}"),
            topic_root: topic_root.to_owned(),
            worker,
            workers,
            partitions,
            max_batch_readings: 40_000,
            max_batch_delay: Duration::from_millis(50),
            adaptive_batching: true,
            flush_interval: Duration::from_secs(5),
            flush_idle: Duration::from_millis(250),
            flush_max_spans: 500_000,
            state_checkpoint_interval: Duration::from_secs(30),
            vee: VeeConfig::default(),
            store: StoreOptions::default(),
            detect: crate::detect::DetectConfig::default(),
            sweep_interval: Duration::from_secs(60),
            sweep_now: crate::detect::SweepNow::Wall,
            dma_interval: Duration::from_secs(3600),
            alarm_tap: None,
            priority_lane: true,
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
    Start(#[source] db::StoreError),
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
    // Not fatal: the default partition stores whatever falls outside the prepared months, and
    // a worker that cannot start stores nothing at all.
    if let Err(e) = db::partitions::ensure_partitions(&pool, 3).await {
        tracing::error!(alarm = "partition_maintenance", error = %e, source = ?std::error::Error::source(&e), "cannot prepare reading partitions; starting anyway");
    }
    let started = Instant::now();
    let mut vee = db::meter_state::load_vee(&pool, config.vee.clone(), |m| config.owns(m))
        .await
        .map_err(WorkerError::Start)?;
    // Journal records a stopped or crashed worker left on these partitions: their states are
    // newer than `meter_state`, and the writer folds them before anything else.
    let owned = ingest::owned_partitions(config.worker, config.workers, config.partitions);
    let recovered = {
        let mut conn = pool.acquire().await.map_err(|source| {
            WorkerError::Start(db::StoreError::Stage {
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
    // Detector states still in the journal are newer than `detector_state`.
    // Their slots are kept in VEE's meter states (`Detectors::on`).
    let detectors = crate::detect::store::load_on(
        &pool,
        config.detect.clone(),
        |m| config.owns(m),
        recovered.detector_states(),
        &mut vee,
    )
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

    let (client, mut eventloop) =
        crate::config::mqtt_client(&config.broker, config.client_id.clone(), 1024, |o| {
            o.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_max_packet_size(16 << 20, 16 << 20);
        })
        .map_err(|e| WorkerError::Config(e.to_string()))?;
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
    // Acknowledgements (MQTT PUBACKs and end-to-end ingest acks) leave through their own
    // unbounded queue and task: the writer must never wait on the client's request channel,
    // because the event loop that drains that channel may itself be waiting for the
    // processor (full `tx`), which waits for the writer. The queue is bounded in practice by
    // the broker's in-flight window (unacknowledged messages are all it can hold).
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outbound>();
    let out_client = client.clone();
    let outbound = async move {
        while let Some(o) = out_rx.recv().await {
            let sent = match o {
                Outbound::Ack(p) => out_client.ack(&p).await,
                Outbound::Publish { topic, payload } => {
                    out_client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await
                }
            };
            if sent.is_err() {
                // The event loop is gone: nothing more can leave.
                break;
            }
        }
    };

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
    let engines = Arc::new(tokio::sync::Mutex::new(Engines {
        vee,
        detectors,
        book: lane::Book::default(),
    }));
    let (lane_ends, lane_link, handoffs) = lane::link();
    let lane = config.priority_lane.then(|| lane::Lane {
        config: &config,
        pool: &pool,
        metrics: &metrics,
        engines: Arc::clone(&engines),
        out: out_tx.clone(),
        ends: lane_ends,
        shutdown: shutdown.clone(),
    });
    let (lane_link, handoffs) = match lane {
        Some(_) => (Some(lane_link), Some(handoffs)),
        None => (None, None),
    };
    let lane = async move {
        match lane {
            Some(l) => l.run().await,
            None => Ok(()),
        }
    };
    let processor = Processor {
        config: &config,
        pool: &pool,
        metrics: &metrics,
        engines,
        handoffs,
        progress,
        registry: crate::registry::live::spawn_listener(pool.clone()),
        frames: crate::registry::sync::FrameSink::spawn(pool.clone(), Duration::from_secs(5)),
        newest_ts: None,
    };
    // One batch may be validated while the previous one is being written: the writer commits
    // batches strictly in order and retries until each succeeds, so the processor may apply a
    // batch's meter states as soon as it has validated it (they become durable in order, and
    // nothing is acknowledged before its commit).
    let (jobs_tx, jobs_rx) = mpsc::channel::<WriteJob>(1);
    let shutdown_for_writer = shutdown.clone();
    let process = processor.run(rx, jobs_tx, &mut shutdown);
    let write = writer(
        &config,
        &pool,
        out_tx,
        &metrics,
        jobs_rx,
        recovered,
        lane_link,
        shutdown_for_writer,
    );
    let work = async {
        let (p, w, l, ()) = tokio::join!(process, write, lane, outbound);
        p.and(w).and(l)
    };
    tokio::select! {
        () = event_loop => {}
        r = work => r?,
    }
    client.disconnect().await.ok();
    Ok(())
}

/// The per-meter state of the worker's meters, shared by the bulk path and the priority lane
/// (each holds the lock only while it filters and validates, never while it commits).
struct Engines {
    vee: Vee,
    detectors: crate::detect::Detectors,
    /// Which path handled which reading of a lane meter.
    book: lane::Book,
}

async fn load_progress(pool: &PgPool, config: &WorkerConfig) -> Result<Progress, db::StoreError> {
    let mut progress = Progress::default();
    for (gateway, incarnation, partition, s) in db::progress::load_all(pool).await? {
        if partition % config.workers == config.worker {
            progress.set(
                ProgressKey {
                    gateway,
                    incarnation,
                    partition,
                },
                s,
            );
        }
    }
    Ok(progress)
}

/// Something to send to the broker once a transaction is committed.
enum Outbound {
    /// The PUBACK of a consumed message.
    Ack(Publish),
    /// An end-to-end acknowledgement (`{root}/{gateway}/ingest-ack`).
    Publish {
        /// Topic.
        topic: String,
        /// [`model::IngestAck`] JSON.
        payload: Vec<u8>,
    },
}

/// Resolves once shutdown is asked for (or can no longer be asked for).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// A validated batch waiting for its transaction, and the messages to acknowledge after it.
struct WriteJob {
    readings: Vec<model::Reading>,
    /// Consumption spans and meter states, by partition, for the journal.
    entries: Vec<JournalEntry>,
    progress: Vec<(String, String, u16, i64)>,
    /// End-to-end acknowledgements to publish after the commit: (key, committed seq).
    acks: Vec<(ProgressKey, i64)>,
    rejects: Vec<RejectRecord>,
    out_of_order: Vec<(model::MeterId, OffsetDateTime)>,
    publishes: Vec<Publish>,
    counts: [u64; 4],
    /// Alarm events and detector states, written in the same transaction.
    alarms: crate::detect::store::AlarmWrite,
    /// Alarm events committed elsewhere (the DMA balance), only to publish after this job.
    announce: Vec<crate::detect::AlarmEvent>,
    /// Completed once the lane has committed the readings handed to it from this batch.
    lane_done: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// Writes jobs in order, retrying each until it commits, then acknowledges its messages;
/// folds the journal into the rollups and meter state when due, when idle and at the end.
// The writer's inputs are its whole context (no struct of them is used anywhere else).
#[allow(clippy::too_many_arguments)]
async fn writer(
    config: &WorkerConfig,
    pool: &PgPool,
    out: mpsc::UnboundedSender<Outbound>,
    metrics: &IngestMetrics,
    mut jobs: mpsc::Receiver<WriteJob>,
    mut pending: Pending,
    mut lane: Option<lane::LaneLink>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    // What a stopped or crashed worker left: folded before the first new batch is written.
    flush(
        config,
        pool,
        metrics,
        &mut pending,
        true,
        u32::MAX,
        &shutdown,
    )
    .await;
    let mut owed = RefusedSpans::default();
    loop {
        if let Some(l) = &mut lane {
            l.take_done(&mut pending);
        }
        let checkpoint = pending.states_due(config.state_checkpoint_interval);
        if checkpoint || pending.due(config.flush_interval, config.flush_max_spans) {
            flush(
                config,
                pool,
                metrics,
                &mut pending,
                checkpoint,
                u32::MAX,
                &shutdown,
            )
            .await;
        }
        // The lane's committed records are taken in while waiting, so an idle bulk path still
        // folds them.
        let idle = pending.is_empty();
        let next = async {
            match &mut lane {
                Some(l) => tokio::select! {
                    job = jobs.recv() => Some(job),
                    Some(done) = l.done.recv() => {
                        pending.add(done);
                        None
                    }
                },
                None => Some(jobs.recv().await),
            }
        };
        let waited = if idle {
            Ok(next.await)
        } else {
            tokio::time::timeout(config.flush_idle, next).await
        };
        let job = match waited {
            Ok(Some(job)) => job,
            Ok(None) => continue,
            Err(_) => {
                // Idle: bring everything up to date, states included.
                flush(
                    config,
                    pool,
                    metrics,
                    &mut pending,
                    true,
                    u32::MAX,
                    &shutdown,
                )
                .await;
                continue;
            }
        };
        let Some(mut job) = job else { break };
        if let Some(done) = job.lane_done.take() {
            // The readings this batch handed to the lane must be committed first: its spool
            // progress and acknowledgements cover them. The lane never waits for this writer;
            // it drops the handoff only when stopping while the database refuses, and then
            // this batch is not committed either.
            if done.await.is_err() {
                tracing::warn!(
                    messages = job.publishes.len(),
                    "stopping before the lane committed; the batch will be delivered again"
                );
                break;
            }
            if let Some(l) = &mut lane {
                l.take_done(&mut pending);
            }
        }
        let Some(stats) = commit(config, pool, metrics, &mut job, &mut owed, &mut shutdown).await
        else {
            // Shutdown while the database refuses: nothing of this job is acknowledged, so
            // the broker (and the gateways' spools) still hold it for the next start.
            tracing::warn!(
                messages = job.publishes.len(),
                "stopping with an uncommitted batch; it will be delivered again"
            );
            // What is committed is still checkpointed below.
            break;
        };
        // Pending before stored: whoever sees every reading stored and nothing pending knows
        // the rollups are complete.
        let spans: usize = job.entries.iter().map(|e| e.usage.len()).sum();
        IngestMetrics::add(&metrics.pending_spans, spans as u64);
        pending.add(stats.journal_ids.into_iter().zip(job.entries).collect());
        IngestMetrics::add(&metrics.commits, 1);
        IngestMetrics::add(&metrics.stored, stats.inserted);
        // The merge's ON CONFLICT DO NOTHING drops a reading whose key is already stored
        // without a word; counted so a summary can account for every reading it was handed.
        let merged = stats.inserted + stats.superseded;
        IngestMetrics::add(
            &metrics.already_stored,
            (job.readings.len() as u64).saturating_sub(merged),
        );
        let [duplicates, conflicts, estimated, rejected] = job.counts;
        IngestMetrics::add(&metrics.duplicates, duplicates);
        IngestMetrics::add(&metrics.conflicts, conflicts);
        IngestMetrics::add(&metrics.estimated, estimated);
        IngestMetrics::add(&metrics.rejected, rejected);
        for payload in crate::detect::alarm_messages(&job.alarms.events)
            .into_iter()
            .chain(crate::detect::alarm_messages(&job.announce))
        {
            if let Some(tap) = &config.alarm_tap {
                // A gone control service is not this worker's failure: the broker copy stays.
                tap.send(payload.clone()).ok();
            }
            out.send(Outbound::Publish {
                topic: crate::detect::alarms_topic(&config.topic_root),
                payload,
            })
            .map_err(|_| WorkerError::Mqtt("publishing an alarm"))?;
        }
        for p in job.publishes {
            out.send(Outbound::Ack(p))
                .map_err(|_| WorkerError::Mqtt("acknowledging"))?;
        }
        for (key, seq) in job.acks {
            let Ok(seq) = u64::try_from(seq) else {
                continue;
            };
            let ack = model::IngestAck {
                v: model::WIRE_VERSION,
                incarnation: key.incarnation,
                partition: key.partition,
                seq,
            };
            let payload = serde_json::to_vec(&ack).unwrap_or_default();
            out.send(Outbound::Publish {
                topic: ingest::ack_topic(&config.topic_root, &key.gateway),
                payload,
            })
            .map_err(|_| WorkerError::Mqtt("publishing an ingest acknowledgement"))?;
            IngestMetrics::add(&metrics.acks_published, 1);
        }
    }
    if let Some(l) = &mut lane {
        l.take_done(&mut pending);
    }
    // At shutdown: a few attempts; whatever is left stays in the journal for the next start.
    flush(config, pool, metrics, &mut pending, true, 3, &shutdown).await;
    Ok(())
}

/// Commits one job, retrying until it succeeds; `None` when shutdown came first.
///
/// A transaction the database refuses for its data (see [`db::retry::classify`]) is split:
/// the refused readings are found by bisection, moved to `ingest_rejects`
/// (`database_refused`) and the rest is committed, so one poison reading never blocks its
/// partition. Any other failure (database down) is retried with backoff; after a few attempts
/// the worker reports itself stuck (metric [`ingest::metric::STUCK`], an error log with
/// `alarm = "ingest_stuck"`) until a commit succeeds.
async fn commit(
    config: &WorkerConfig,
    pool: &PgPool,
    metrics: &IngestMetrics,
    job: &mut WriteJob,
    owed: &mut RefusedSpans,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<db::WriteStats> {
    let mut attempt = 0u32;
    let mut isolated = false;
    owed.settle(&mut job.entries);
    loop {
        let set = WriteSet {
            readings: &job.readings,
            mode: WriteMode::Journal(&job.entries),
            progress: &job.progress,
            rejects: &job.rejects,
            out_of_order: &job.out_of_order,
            alarms: Some(&job.alarms),
        };
        let attempt_write = async {
            match pool.acquire().await {
                Ok(mut conn) => db::write_batch(&mut conn, &set, config.store).await,
                Err(source) => Err(db::StoreError::Stage {
                    stage: "acquiring a connection",
                    source,
                }),
            }
        };
        // The first attempt runs to its end even when a stop is asked for meanwhile (a
        // batch handed over just before the stop is committed, not dropped); only the
        // retries of a refusing database give way to the stop.
        let result = if attempt == 0 {
            attempt_write.await
        } else {
            tokio::select! {
                r = attempt_write => r,
                () = stopped(shutdown) => return None,
            }
        };
        let e = match result {
            Ok(stats) => {
                if retry::INGEST.was_stuck(attempt) {
                    tracing::info!(
                        attempt,
                        "ingest transaction committed again; no longer stuck"
                    );
                }
                metrics.stuck.store(0, std::sync::atomic::Ordering::Relaxed);
                return Some(stats);
            }
            Err(e) => e,
        };
        IngestMetrics::add(&metrics.commit_failures, 1);
        if !isolated && retry::classify(&e) == retry::Failure::Data {
            isolated = true;
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "database refused a batch's data; isolating the readings it refuses");
            let refused = match pool.acquire().await {
                Ok(mut conn) => db::readings::find_refused(&mut conn, &job.readings).await,
                Err(source) => Err(db::StoreError::Stage {
                    stage: "acquiring a connection",
                    source,
                }),
            };
            match refused {
                Ok(refused) if !refused.is_empty() => {
                    let mut drop = vec![false; job.readings.len()];
                    for (i, message) in &refused {
                        if let (Some(flag), Some(r)) = (drop.get_mut(*i), job.readings.get(*i)) {
                            *flag = true;
                            job.rejects.push(RejectRecord {
                                kind: "database_refused",
                                topic: None,
                                meter: Some(r.meter.as_str().to_owned()),
                                ts: Some(r.ts),
                                detail: serde_json::json!({
                                    "error": message,
                                    "reading": serde_json::to_value(r).unwrap_or_default(),
                                }),
                            });
                        }
                    }
                    let gone: Vec<(model::MeterId, OffsetDateTime)> = job
                        .readings
                        .iter()
                        .zip(&drop)
                        .filter(|(_, d)| **d)
                        .map(|(r, _)| (r.meter.clone(), r.ts))
                        .collect();
                    owed.remove(&mut job.entries, &gone);
                    let mut flags = drop.into_iter();
                    job.readings.retain(|_| !flags.next().unwrap_or(false));
                    IngestMetrics::add(&metrics.isolated, refused.len() as u64);
                    tracing::error!(
                        refused = refused.len(),
                        "readings refused by the database moved to ingest_rejects; committing the rest"
                    );
                    continue;
                }
                Ok(_) => {
                    tracing::error!(error = %e, "the database refuses the batch but no single reading: not a poison reading, retrying");
                }
                Err(pe) => tracing::warn!(error = %pe, "could not probe the refused batch"),
            }
        }
        attempt += 1;
        if retry::INGEST.becomes_stuck(attempt) {
            metrics.stuck.store(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(alarm = "ingest_stuck", error = %e, source = ?std::error::Error::source(&e), attempt, "ingest worker cannot commit; nothing is acknowledged until it can");
        } else {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), attempt, "ingest transaction failed; retrying");
        }
        let wait = retry::INGEST.backoff(attempt);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(shutdown) => return None,
        }
    }
}

/// Consumption of reads the database refused (isolated by bisection), owed to the next span
/// of their meter.
///
/// VEE measured each span from the read before it, so a refused read closes one span and
/// opens the next. Its span must not reach the journal (the rollups would count a read that
/// is not stored), but its consumption belongs to the meter: it is added to the meter's next
/// span, in this batch or a later one, so the rollups still sum to the stored reads (the
/// deltas telescope). What is owed lives in memory: a worker restart in between forgets it.
#[derive(Debug, Default)]
struct RefusedSpans {
    /// Per meter: consumption owed and the time of the refused read it ends at.
    owed: std::collections::HashMap<model::MeterId, (rust_decimal::Decimal, OffsetDateTime)>,
}

impl RefusedSpans {
    /// Takes the spans closed by the `refused` reads out of `entries`, then settles what
    /// they owe against later spans of `entries`.
    fn remove(
        &mut self,
        entries: &mut [JournalEntry],
        refused: &[(model::MeterId, OffsetDateTime)],
    ) {
        let refused: HashSet<(&model::MeterId, OffsetDateTime)> =
            refused.iter().map(|(m, ts)| (m, *ts)).collect();
        for e in entries.iter_mut() {
            let mut kept = Vec::with_capacity(e.usage.len());
            for u in std::mem::take(&mut e.usage) {
                if refused.contains(&(&u.meter, u.ts)) {
                    let slot = self
                        .owed
                        .entry(u.meter.clone())
                        .or_insert((rust_decimal::Decimal::ZERO, u.ts));
                    slot.0 += u.delta;
                    slot.1 = slot.1.max(u.ts);
                } else {
                    kept.push(u);
                }
            }
            e.usage = kept;
        }
        self.settle(entries);
    }

    /// Adds what each meter owes to its earliest span in `entries` after the refused read.
    fn settle(&mut self, entries: &mut [JournalEntry]) {
        if self.owed.is_empty() {
            return;
        }
        for e in entries.iter_mut() {
            for meter in e
                .usage
                .iter()
                .map(|u| u.meter.clone())
                .collect::<HashSet<_>>()
            {
                let Some(&(delta, after)) = self.owed.get(&meter) else {
                    continue;
                };
                let next = e
                    .usage
                    .iter_mut()
                    .filter(|u| u.meter == meter && u.ts > after)
                    .min_by_key(|u| u.ts);
                if let Some(u) = next {
                    u.delta += delta;
                    self.owed.remove(&meter);
                }
            }
        }
    }
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
    shutdown: &watch::Receiver<bool>,
) {
    let mut shutdown = shutdown.clone();
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
            Err(source) => Err(db::StoreError::Stage {
                stage: "acquiring a connection",
                source,
            }),
        };
        match result {
            Ok(stats) => {
                if retry::INGEST.was_stuck(attempt - 1) {
                    tracing::info!(attempt, "journal folded again; no longer stuck");
                    metrics.stuck.store(0, std::sync::atomic::Ordering::Relaxed);
                }
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
                // A fold that keeps failing blocks the writer as much as a commit that does
                // (nothing is committed or acknowledged meanwhile): reported the same way.
                if retry::INGEST.becomes_stuck(attempt) {
                    metrics.stuck.store(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(alarm = "ingest_stuck", error = %e, source = ?std::error::Error::source(&e), attempt, "ingest worker cannot fold its journal; nothing is committed or acknowledged until it can");
                }
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), attempt, "journal fold failed; retrying");
                // The journal keeps what is not folded: a stop between attempts loses nothing.
                tokio::select! {
                    () = tokio::time::sleep(retry::INGEST.backoff(attempt)) => {}
                    () = stopped(&mut shutdown) => return,
                }
            }
        }
    }
}

struct Processor<'a> {
    config: &'a WorkerConfig,
    pool: &'a PgPool,
    metrics: &'a IngestMetrics,
    /// VEE and detector state, shared with the priority lane.
    engines: Arc<tokio::sync::Mutex<Engines>>,
    /// Where the lane meters' readings of a batch go (`None`: no lane).
    handoffs: Option<mpsc::UnboundedSender<lane::Handoff>>,
    progress: Progress,
    /// Registry changes (LISTEN wm_registry), applied between batches.
    registry: mpsc::Receiver<crate::registry::live::Change>,
    /// Last frame per meter, written behind to `meter_last_frame`.
    frames: crate::registry::sync::FrameSink,
    /// The newest event time (unix seconds) of a reading this worker validated and did not
    /// reject; the sweep's "now" with [`crate::detect::SweepNow::EventTime`].
    newest_ts: Option<i64>,
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
        // The first tick is immediate: a restarted worker 0 judges the balance at once.
        let mut dma = tokio::time::interval(self.config.dma_interval);
        dma.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                changed = shutdown.changed() => {
                    // A dropped sender can never ask for shutdown again: treat it as one
                    // (instead of spinning on the closed channel).
                    if changed.is_err() || *shutdown.borrow() { return Ok(()); }
                    continue;
                }
                Some(change) = self.registry.recv() => {
                    let owns = |m: &str| self.config.owns(m);
                    let mut guard = self.engines.lock().await;
                    let eng = &mut *guard;
                    if let Err(e) = crate::registry::live::refresh(self.pool, &mut eng.vee, &change, owns).await {
                        tracing::error!(error = %e, "applying a registry change failed");
                    }
                    // The detectors' profiles (class, Q3, role, zone, status-bit model) too.
                    let ids: Option<Vec<String>> = match &change {
                        crate::registry::live::Change::Meters(ids) if !ids.contains("*") => {
                            Some(ids.iter().filter(|m| owns(m)).cloned().collect())
                        }
                        _ => None,
                    };
                    if ids.as_ref().is_none_or(|i| !i.is_empty())
                        && let Err(e) = crate::detect::store::refresh_profiles(self.pool, eng.detectors.on(&mut eng.vee), ids.as_deref(), owns).await
                    {
                        tracing::error!(error = %e, "reloading detector profiles failed");
                    }
                    continue;
                }
                _ = sweep.tick() => {
                    // Silence has no reading to trigger on: judged against the wall clock, or
                    // against the newest event time when the fleet's time runs faster (a
                    // replayed or simulated fleet); before any reading there is nothing to judge.
                    let mut guard = self.engines.lock().await;
                    let eng = &mut *guard;
                    let alarms = match self.config.sweep_now {
                        crate::detect::SweepNow::Wall => crate::detect::sweep_write(eng.detectors.on(&mut eng.vee)),
                        crate::detect::SweepNow::EventTime => match self.newest_ts {
                            Some(now) => crate::detect::sweep_write_at(eng.detectors.on(&mut eng.vee), now, crate::detect::SweepClock::Event),
                            None => continue,
                        },
                    };
                    drop(guard);
                    if !alarms.is_empty() && jobs.send(WriteJob::alarms_only(alarms, self.config.partitions)).await.is_err() {
                        return Err(WorkerError::Mqtt("handing a batch to the writer"));
                    }
                    continue;
                }
                _ = dma.tick(), if self.config.worker == 0 => {
                    match crate::detect::dma::run(self.pool, &self.config.detect.dma, self.config.store.day_offset, OffsetDateTime::now_utc()).await {
                        Ok(events) if !events.is_empty() => {
                            // Already committed; the writer only announces them, in order.
                            let mut job = WriteJob::alarms_only(Default::default(), self.config.partitions);
                            job.announce = events;
                            if jobs.send(job).await.is_err() {
                                return Err(WorkerError::Mqtt("handing a batch to the writer"));
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, source = ?std::error::Error::source(&e), "judging the DMA balance failed"),
                    }
                    continue;
                }
                _ = maintenance.tick() => {
                    if let Err(e) = db::partitions::ensure_partitions(self.pool, 3).await {
                        tracing::error!(error = %e, "partition maintenance failed");
                    }
                    continue;
                }
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return Ok(()),
                },
            };
            // Adaptive batching: take what is already queued; once the queue is empty, hand the
            // batch over at once if the writer has room for it (nothing waits for company when
            // nothing else is arriving: a lone message costs no batch delay), else keep
            // gathering while the writer is busy with the previous batch — up to
            // `max_batch_delay` or until the writer's slot frees. Under load the batch grows
            // with the writer's commit time, as before; idle, the latency floor is gone.
            let deadline = tokio::time::Instant::now() + self.config.max_batch_delay;
            let mut batch = vec![first];
            let mut estimate = estimate_readings(&batch);
            while estimate < self.config.max_batch_readings {
                match rx.try_recv() {
                    Ok(p) => {
                        batch.push(p);
                        estimate = estimate_readings(&batch);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                if !self.config.adaptive_batching {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(p)) => {
                            batch.push(p);
                            estimate = estimate_readings(&batch);
                            continue;
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                if jobs.capacity() > 0 {
                    break;
                }
                tokio::select! {
                    biased;
                    p = rx.recv() => match p {
                        Some(p) => {
                            batch.push(p);
                            estimate = estimate_readings(&batch);
                        }
                        None => break,
                    },
                    // The writer took the previous job: its slot is free for this one. The
                    // permit is dropped unused; this task is the only sender, so the slot
                    // stays free for the send below.
                    permit = jobs.reserve() => {
                        drop(permit);
                        break;
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            let job = self.process(batch).await;
            if jobs.send(job).await.is_err() {
                // The writer stops early only when asked to (mid-retry): not an error then.
                if *shutdown.borrow() {
                    return Ok(());
                }
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
        let mut touched: HashSet<ProgressKey> = HashSet::new();
        let now = OffsetDateTime::now_utc();
        for p in &publishes {
            match ingest::decode_payload(&p.payload) {
                Decoded::Batch(batch) => {
                    let key = ProgressKey::of(&batch);
                    if !progress.knows(&key) {
                        let seq = self.lookup_progress(&key).await;
                        progress.set(key.clone(), seq);
                    }
                    let filtered = progress.filter(batch);
                    if filtered.gap {
                        IngestMetrics::add(&self.metrics.gaps, 1);
                        tracing::debug!(gateway = %key.gateway, partition = key.partition, "batch after a missing one held back");
                    } else {
                        IngestMetrics::add(&self.metrics.seq_duplicates, filtered.dropped);
                    }
                    touched.insert(key);
                    for e in filtered.entries {
                        // Anything the database would refuse is refused here, alone, instead
                        // of failing the whole COPY (and with it the partition).
                        if let Err(why) = ingest::check_storable(&e.reading, now) {
                            IngestMetrics::add(&self.metrics.unstorable, 1);
                            tracing::warn!(meter = %e.reading.meter.as_str(), seq = e.seq, reason = why.code(), error = %why, "reading refused before storage");
                            rejects.push(RejectRecord {
                                kind: why.code(),
                                topic: Some(p.topic.clone()),
                                meter: Some(e.reading.meter.as_str().to_owned()),
                                ts: Some(e.reading.ts),
                                detail: serde_json::json!({
                                    "error": why.to_string(),
                                    "seq": e.seq,
                                    "reading": serde_json::to_value(&e.reading).unwrap_or_default(),
                                }),
                            });
                            continue;
                        }
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
        self.frames.note(&readings);
        // Held until the states are applied: the lane validates nothing in between.
        let mut guard = self.engines.lock().await;
        let eng = &mut *guard;
        let handed = eng.book.split_off(&mut readings);
        let decreasing = eng.vee.decreasing_meters(readings.iter());
        if !decreasing.is_empty() {
            match db::meter_state::load_replacements(self.pool, &decreasing).await {
                Ok(reps) => {
                    for (m, r) in reps {
                        eng.vee.add_replacement(&m, r);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot load meter replacements"),
            }
        }
        let out = eng.vee.validate(readings, OffsetDateTime::now_utc());
        rejects.extend(out.conflicts.iter().map(RejectRecord::conflict));
        let progress_rows: Vec<(String, String, u16, i64)> = touched
            .iter()
            .filter_map(|k| {
                progress
                    .get(k)
                    .map(|s| (k.gateway.clone(), k.incarnation.clone(), k.partition, s))
            })
            .filter(|(_, _, _, s)| *s >= 0)
            .collect();
        // Gateways that send an incarnation wait for these before dropping spooled readings.
        let acks: Vec<(ProgressKey, i64)> = touched
            .into_iter()
            .filter(|k| !k.incarnation.is_empty())
            .filter_map(|k| progress.get(&k).filter(|s| *s >= 0).map(|s| (k, s)))
            .collect();
        let counts = [
            out.duplicates,
            out.conflicts.len() as u64,
            out.estimated,
            out.rejected,
        ];
        eng.vee.commit(&out.states);
        // The event clock follows the meters' (and carrier platforms') own timestamps: not a
        // gateway's receive time (polled instruments are stamped when read, i.e. by the wall
        // clock, which would put a simulated fleet hours behind at once), not estimates, not
        // rejected reads (a meter clock far ahead among them), nothing after the wall clock.
        let wall = OffsetDateTime::now_utc().unix_timestamp();
        let newest = out
            .readings
            .iter()
            .filter(|r| {
                matches!(
                    r.clock,
                    model::ClockSource::Meter | model::ClockSource::Platform
                )
            })
            .filter(|r| !matches!(r.quality, model::Quality::Rejected { .. }))
            .map(|r| r.ts.unix_timestamp().min(wall))
            .max();
        self.newest_ts = self.newest_ts.max(newest);
        let mut alarms = crate::detect::batch_write(eng.detectors.on(&mut eng.vee), &out.readings);
        drop(guard);
        // The lane validates the lane meters' readings (so each meter's state is changed by
        // one task, in order); this batch is committed after them.
        let lane_done = match (&self.handoffs, handed.is_empty()) {
            (Some(tx), false) => {
                let (done, rx) = tokio::sync::oneshot::channel();
                tx.send(lane::Handoff {
                    readings: handed,
                    done,
                })
                .ok();
                Some(rx)
            }
            _ => None,
        };
        // Detector states go behind with the meter states (journal, checkpoint); the events
        // stay in the ingest transaction.
        let detect_states = std::mem::take(&mut alarms.states);
        self.progress = progress;
        tracing::debug!(
            messages = publishes.len(),
            readings = out.readings.len(),
            ms = started.elapsed().as_millis() as u64,
            "batch validated"
        );
        WriteJob {
            readings: out.readings,
            entries: journal::split(out.usage, out.states, detect_states, self.config.partitions),
            progress: progress_rows,
            acks,
            rejects,
            out_of_order: out.out_of_order,
            publishes,
            counts,
            alarms,
            announce: Vec::new(),
            lane_done,
        }
    }

    /// The stored progress of `key`; `-1` (nothing known) when there is none or the lookup
    /// fails, as before the query moved to `db::progress` (the failure is now logged).
    async fn lookup_progress(&self, key: &ProgressKey) -> i64 {
        match db::progress::max_seq(self.pool, &key.gateway, &key.incarnation, key.partition).await
        {
            Ok(seq) => seq.unwrap_or(-1),
            Err(e) => {
                tracing::warn!(gateway = %key.gateway, partition = key.partition, error = %e, "spool progress lookup failed");
                -1
            }
        }
    }
}

impl WriteJob {
    /// A job that only writes alarms (the communication-loss sweep), with the detector states
    /// they changed journalled like a batch's.
    fn alarms_only(mut alarms: crate::detect::store::AlarmWrite, partitions: u16) -> Self {
        let states = std::mem::take(&mut alarms.states);
        Self {
            readings: Vec::new(),
            entries: journal::split(Vec::new(), Default::default(), states, partitions),
            progress: Vec::new(),
            rejects: Vec::new(),
            out_of_order: Vec::new(),
            publishes: Vec::new(),
            acks: Vec::new(),
            counts: [0; 4],
            alarms,
            announce: Vec::new(),
            lane_done: None,
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
    let broker =
        crate::config::broker_url(broker_url).map_err(|e| WorkerError::Config(e.to_string()))?;
    let (client, mut eventloop) = crate::config::mqtt_client(&broker, client_id, 8, |o| {
        o.set_clean_session(true);
    })
    .map_err(|e| WorkerError::Config(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vee::Usage;
    use rust_decimal::Decimal;
    use time::macros::datetime;

    fn span(meter: &str, minute: u8, value: i64, delta: i64) -> Usage {
        Usage {
            meter: model::MeterId::new(meter).unwrap(),
            ts: datetime!(2026-11-24 10:00 UTC)
                .replace_minute(minute)
                .unwrap(),
            value: Decimal::new(value, 0),
            delta: Decimal::new(delta, 0),
            estimated: false,
        }
    }

    fn entry(usage: Vec<Usage>) -> Vec<JournalEntry> {
        vec![JournalEntry {
            partition: 0,
            usage,
            states: Vec::new(),
            detect: Vec::new(),
        }]
    }

    #[test]
    fn a_refused_reads_span_moves_to_the_next_span_of_its_meter() {
        let mut owed = RefusedSpans::default();
        // Reads 10, 999 (refused), 12: spans +999-10 and 12-999 become one span of +2.
        let mut entries = entry(vec![
            span("m-a", 1, 10, 0),
            span("m-b", 2, 5, 1),
            span("m-a", 3, 999, 989),
            span("m-a", 5, 12, -987),
        ]);
        let refused = [(model::MeterId::new("m-a").unwrap(), entries[0].usage[2].ts)];
        owed.remove(&mut entries, &refused);
        let spans: Vec<(&str, u8, i64)> = entries[0]
            .usage
            .iter()
            .map(|u| {
                (
                    u.meter.as_str(),
                    u.ts.minute(),
                    i64::try_from(u.delta).unwrap(),
                )
            })
            .collect();
        assert_eq!(spans, vec![("m-a", 1, 0), ("m-b", 2, 1), ("m-a", 5, 2)]);
        assert!(owed.owed.is_empty());
    }

    #[test]
    fn a_refused_last_read_is_owed_to_the_next_batch() {
        let mut owed = RefusedSpans::default();
        let mut first = entry(vec![span("m-a", 1, 10, 0), span("m-a", 3, 999, 989)]);
        let refused = [(model::MeterId::new("m-a").unwrap(), first[0].usage[1].ts)];
        owed.remove(&mut first, &refused);
        assert_eq!(first[0].usage.len(), 1);
        // An earlier span of the meter (an out-of-order read) does not settle it.
        let mut next = entry(vec![span("m-a", 2, 11, 1), span("m-a", 7, 15, -984)]);
        owed.settle(&mut next);
        let deltas: Vec<i64> = next[0]
            .usage
            .iter()
            .map(|u| i64::try_from(u.delta).unwrap())
            .collect();
        assert_eq!(deltas, vec![1, 5]);
        assert!(owed.owed.is_empty());
    }
}
