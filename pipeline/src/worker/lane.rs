//! The priority lane: readings of meters whose readings can trigger a command (a valve with the
//! `auto_close_on_burst` policy) are validated and committed in small transactions of their
//! own, on a second connection, instead of waiting behind the bulk ingest transaction in
//! progress (and behind the broker's queue for the bulk session, whose in-flight window is
//! full of messages waiting for that transaction).
//!
//! The lane is an accelerator, not a second system of record. It has its own MQTT client
//! (`{client_id}-lane`, clean session, QoS 0) subscribed to the same partitions, so it sees
//! every message at once, however long the bulk session's queue is; it finds the meter ids of
//! a message with a byte search (no JSON parse, [`may_hold_lane_meter`]) and decodes the
//! message only when a lane meter is in it. The bulk session still receives, filters (spool
//! progress), commits and acknowledges every message as before, except that it never
//! validates a lane meter's reading itself: it hands them to the lane ([`Handoff`]), which
//! validates those it has not taken from its own session yet ([`Book`] remembers what it
//! took). So one meter is always validated by one task, in order,
//! and its states reach the journal in order; a message the lane's session never delivers
//! (QoS 0 dropped, lane busy, lane meter added meanwhile) still reaches the lane this way.
//!
//! Why a session of its own rather than the bulk session's event loop handing lane meters'
//! readings over as they arrive: the bulk session is QoS 1 with acknowledgements sent only
//! after the commit, so while a bulk transaction runs the broker's in-flight window for it
//! (Mosquitto's `max_inflight_messages`, 20 by default) is full and a new message waits in the
//! broker's queue until that commit; a QoS 0 session has no such window. The price is that the
//! broker sends every message of these partitions twice while the lane has meters.
//!
//! Durability: a bulk job is not committed before the lane has committed the readings handed
//! over with it ([`super::writer`]), so the spool progress and the MQTT acknowledgements of a
//! bulk commit never cover a lane reading that is not committed. The lane never waits for the
//! bulk path. Its journal records go to the bulk writer, which folds them with its own.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{Event, Packet, QoS};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Mutex, mpsc, watch};

use super::{Engines, Outbound, RefusedSpans, WorkerConfig, WorkerError, WriteJob, commit};
use crate::db::journal::{self, JournalEntry};
use crate::db::rejects::RejectRecord;
use crate::ingest::{self, Decoded, IngestMetrics};

/// Identity of a reading (its row key in `readings`).
pub(super) type ReadingKey = (model::MeterId, i128, model::Quantity, u32, u16, u16);

/// The key of `r`.
pub(super) fn key(r: &model::Reading) -> ReadingKey {
    (
        r.meter.clone(),
        r.ts.unix_timestamp_nanos(),
        r.quantity,
        r.storage,
        r.tariff,
        r.subunit,
    )
}

/// A set of reading keys that forgets its oldest entries beyond a capacity: an entry the other
/// path never comes to claim (its message filtered out as a spool duplicate, or dropped before
/// the lane saw it) must not be kept forever.
#[derive(Debug, Default)]
pub(super) struct Recent {
    set: HashSet<ReadingKey>,
    order: VecDeque<ReadingKey>,
}

impl Recent {
    const CAPACITY: usize = 1 << 16;

    fn insert(&mut self, k: ReadingKey) {
        if self.set.insert(k.clone()) {
            self.order.push_back(k);
            while self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// The lane meters and the readings the lane took; lives with the VEE state, under its lock.
#[derive(Debug, Default)]
pub(super) struct Book {
    /// Meters of the lane (owned by this worker).
    pub(super) meters: HashSet<Box<str>>,
    /// Readings the lane validated recently (from its session or handed over).
    taken: Recent,
}

impl Book {
    /// Takes the lane meters' readings out of `readings` (the bulk path's batch).
    pub(super) fn split_off(&self, readings: &mut Vec<model::Reading>) -> Vec<model::Reading> {
        // Most batches hold no lane meter: looked up without moving any reading.
        if self.meters.is_empty()
            || !readings
                .iter()
                .any(|r| self.meters.contains(r.meter.as_str()))
        {
            return Vec::new();
        }
        let (lane, bulk) = std::mem::take(readings)
            .into_iter()
            .partition(|r| self.meters.contains(r.meter.as_str()));
        *readings = bulk;
        lane
    }

    /// Drops from `readings` those the lane took before, and records the others as taken.
    fn not_taken(&mut self, readings: &mut Vec<model::Reading>) {
        readings.retain(|r| {
            let k = key(r);
            if self.taken.set.contains(&k) {
                return false;
            }
            self.taken.insert(k);
            true
        });
    }
}

/// Lane meters' readings of a bulk batch, handed to the lane.
pub(super) struct Handoff {
    /// The readings.
    pub(super) readings: Vec<model::Reading>,
    /// Completed once they are committed (by this or an earlier lane job); dropped when the
    /// lane stops before.
    pub(super) done: tokio::sync::oneshot::Sender<()>,
}

/// What the lane shares with the bulk writer: the journal records of committed lane jobs
/// (with their ids), for the writer's fold.
pub(super) struct LaneLink {
    pub(super) done: mpsc::UnboundedReceiver<Vec<(i64, JournalEntry)>>,
}

impl LaneLink {
    /// Takes the journal records of lane jobs committed so far into `pending`.
    pub(super) fn take_done(&mut self, pending: &mut journal::Pending) {
        while let Ok(done) = self.done.try_recv() {
            pending.add(done);
        }
    }
}

/// The lane's ends of the [`LaneLink`] and of the bulk processor's [`Handoff`]s.
pub(super) struct LaneEnds {
    done: mpsc::UnboundedSender<Vec<(i64, JournalEntry)>>,
    handoffs: mpsc::UnboundedReceiver<Handoff>,
}

/// Connects the lane: its ends, the writer's, and the processor's sender of handoffs.
pub(super) fn link() -> (LaneEnds, LaneLink, mpsc::UnboundedSender<Handoff>) {
    let (done_tx, done) = mpsc::unbounded_channel();
    let (handoff_tx, handoffs) = mpsc::unbounded_channel();
    (
        LaneEnds {
            done: done_tx,
            handoffs,
        },
        LaneLink { done },
        handoff_tx,
    )
}

/// The lane meters of this worker: meters with a valve and the `auto_close_on_burst` policy
/// (what `control::rules::burst_auto_close` acts on).
async fn load_meters(
    pool: &PgPool,
    config: &WorkerConfig,
) -> Result<HashSet<Box<str>>, sqlx::Error> {
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT meter_id FROM meters WHERE has_valve AND auto_close_on_burst")
            .fetch_all(pool)
            .await?;
    Ok(ids
        .into_iter()
        .filter(|m| config.owns(m))
        .map(String::into_boxed_str)
        .collect())
}

/// The key every reading's meter id is stored under in the wire form (`docs/wire-format.md`).
static METER_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"meter\""));

/// Returns whether `payload` may hold a reading of one of `meters`, without parsing the JSON:
/// a byte search for each `"meter"` key and a set look-up of the id after it. Most messages
/// hold no lane meter, and this is all the lane spends on them (one pass of `memmem` over the
/// bytes and a look-up per reading, instead of a JSON parse of the whole message).
///
/// Never a false "no" for a well-formed wire batch as the gateways write it: an id that is
/// escaped (meter ids need no escapes, `model::MeterId`) answers "maybe". Whitespace around
/// the colon is allowed. A key written with escapes (`"\u006deter"`) is not found: such a
/// reading still reaches the lane through the bulk path's handoff, later. A false "yes" (the
/// key in another object) only costs the full decode that follows.
fn may_hold_lane_meter(payload: &[u8], meters: &HashSet<Box<str>>) -> bool {
    fn skip_ws(b: &[u8]) -> &[u8] {
        let n = b
            .iter()
            .take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
        b.get(n..).unwrap_or_default()
    }
    if meters.is_empty() {
        return false;
    }
    for at in METER_KEY.find_iter(payload) {
        let rest = skip_ws(payload.get(at + b"\"meter\"".len()..).unwrap_or_default());
        // `"meter"` as a string value (a unit, a source id) is followed by `,` `}` or `]`.
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let Some(rest) = skip_ws(rest).strip_prefix(b"\"") else {
            // Not a string: no reading's meter.
            continue;
        };
        let Some(end) = memchr::memchr2(b'"', b'\\', rest) else {
            return true;
        };
        match (rest.get(end), rest.get(..end).map(std::str::from_utf8)) {
            (Some(b'"'), Some(Ok(id))) => {
                if meters.contains(id) {
                    return true;
                }
            }
            // An escape or invalid UTF-8 in the id: let the decoder judge.
            _ => return true,
        }
    }
    false
}

/// How the lane finds lane meters in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// [`may_hold_lane_meter`]'s byte search (the default).
    Bytes,
    /// A JSON parse of every message's meter ids ([`ids_hold_lane_meter`]): the way before,
    /// kept to measure the difference (`WM_LANE_SCAN=parse`, `docs/benchmarks.md`).
    Parse,
}

impl Scan {
    fn from_env() -> Self {
        match std::env::var("WM_LANE_SCAN") {
            Ok(v) if v == "parse" => Self::Parse,
            _ => Self::Bytes,
        }
    }
}

/// Only the meter ids of a batch ([`Scan::Parse`]): the rest of each entry is skipped without
/// being built, but the whole message is still parsed.
#[derive(serde::Deserialize)]
struct Light<'a> {
    #[serde(borrow)]
    entries: Vec<LightEntry<'a>>,
}

#[derive(serde::Deserialize)]
struct LightEntry<'a> {
    #[serde(borrow)]
    reading: LightReading<'a>,
}

#[derive(serde::Deserialize)]
struct LightReading<'a> {
    #[serde(borrow)]
    meter: std::borrow::Cow<'a, str>,
}

/// [`Scan::Parse`]: whether a JSON parse of the meter ids finds one of `meters`.
fn ids_hold_lane_meter(payload: &[u8], meters: &HashSet<Box<str>>) -> bool {
    serde_json::from_slice::<Light<'_>>(payload).is_ok_and(|light| {
        light
            .entries
            .iter()
            .any(|e| meters.contains(&*e.reading.meter))
    })
}

/// The lane meters' storable readings of one message.
fn lane_readings(
    payload: &[u8],
    scan: Scan,
    meters: &HashSet<Box<str>>,
    config: &WorkerConfig,
    now: OffsetDateTime,
    into: &mut Vec<model::Reading>,
) {
    let maybe = match scan {
        Scan::Bytes => may_hold_lane_meter(payload, meters),
        Scan::Parse => ids_hold_lane_meter(payload, meters),
    };
    if !maybe {
        return;
    }
    // Unknown versions and malformed batches are the bulk path's to refuse and record.
    let Decoded::Batch(batch) = ingest::decode_payload(payload) else {
        return;
    };
    into.extend(
        batch
            .entries
            .into_iter()
            .map(|e| e.reading)
            .filter(|r| meters.contains(r.meter.as_str()))
            .filter(|r| config.owns(r.meter.as_str()))
            .filter(|r| ingest::check_storable(r, now).is_ok()),
    );
}

/// The lane task's context.
pub(super) struct Lane<'a> {
    pub(super) config: &'a WorkerConfig,
    pub(super) pool: &'a PgPool,
    pub(super) metrics: &'a IngestMetrics,
    pub(super) engines: Arc<Mutex<Engines>>,
    pub(super) out: mpsc::UnboundedSender<Outbound>,
    pub(super) ends: LaneEnds,
    pub(super) shutdown: watch::Receiver<bool>,
}

impl Lane<'_> {
    /// Runs the lane until shutdown; the job in progress is committed first.
    pub(super) async fn run(mut self) -> Result<(), WorkerError> {
        let mut changes = crate::registry::live::spawn_listener(self.pool.clone());
        let mut meters = self.reload().await;
        let scan = Scan::from_env();
        let (tx, mut rx) = mpsc::channel::<Bytes>(4096);
        let (client, mut eventloop) = crate::config::mqtt_client(
            &self.config.broker,
            format!("{}-lane", self.config.client_id),
            64,
            |o| {
                o.set_keep_alive(Duration::from_secs(30))
                    .set_clean_session(true)
                    .set_max_packet_size(16 << 20, 16 << 20);
            },
        )
        .map_err(|e| WorkerError::Config(e.to_string()))?;
        let topics: Vec<rumqttc::SubscribeFilter> = ingest::owned_partitions(
            self.config.worker,
            self.config.workers,
            self.config.partitions,
        )
        .into_iter()
        .map(|p| {
            rumqttc::SubscribeFilter::new(
                ingest::readings_topic(&self.config.topic_root, p),
                QoS::AtMostOnce,
            )
        })
        .collect();
        // Subscribed only while the lane has meters: otherwise every message would cross the
        // broker twice and be parsed twice for nothing. Correctness never depends on it (the
        // bulk path hands every lane meter's reading over), only the lane's head start does.
        let subscribed = Arc::new(AtomicBool::new(!meters.is_empty()));
        let lane_topics = topics.clone();
        let sub_client = client.clone();
        let sub_wanted = Arc::clone(&subscribed);
        let event_loop = async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if !sub_wanted.load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Err(e) = sub_client.try_subscribe_many(topics.clone()) {
                            tracing::warn!(error = %e, "lane: mqtt subscribe failed");
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // Never waits: what the lane cannot take now the bulk path handles.
                        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(p.payload) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "lane: mqtt connection failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        let work = async {
            let mut owed = RefusedSpans::default();
            let mut readings = Vec::new();
            let mut stopping = false;
            loop {
                let first = tokio::select! {
                    biased;
                    // Handed-over readings first: a bulk commit waits for them.
                    h = self.ends.handoffs.recv() => match h {
                        Some(h) => {
                            self.handle(h.readings, &mut owed).await?;
                            h.done.send(()).ok();
                            continue;
                        }
                        // The processor is gone (it stops first): nothing more to wait for.
                        None => return Ok(()),
                    },
                    changed = self.shutdown.changed(), if !stopping => {
                        // From now on only handoffs, until the processor is gone.
                        stopping = changed.is_err() || *self.shutdown.borrow();
                        continue;
                    }
                    Some(_) = changes.recv() => {
                        // Any change may add or remove a valve or the policy: reload all.
                        while changes.try_recv().is_ok() {}
                        meters = self.reload().await;
                        let want = !meters.is_empty();
                        if subscribed.swap(want, Ordering::Relaxed) != want {
                            let r = if want {
                                client.try_subscribe_many(lane_topics.clone())
                            } else {
                                lane_topics
                                    .iter()
                                    .try_for_each(|t| client.try_unsubscribe(t.path.clone()))
                            };
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "lane: mqtt (un)subscribe failed");
                            }
                        }
                        continue;
                    }
                    Some(p) = rx.recv(), if !stopping => p,
                };
                let now = OffsetDateTime::now_utc();
                lane_readings(&first, scan, &meters, self.config, now, &mut readings);
                while let Ok(p) = rx.try_recv() {
                    lane_readings(&p, scan, &meters, self.config, now, &mut readings);
                }
                if readings.is_empty() {
                    continue;
                }
                self.handle(std::mem::take(&mut readings), &mut owed)
                    .await?;
            }
        };
        let r = tokio::select! {
            () = event_loop => Err(WorkerError::Mqtt("running the lane's connection")),
            r = work => r,
        };
        client.disconnect().await.ok();
        r
    }

    /// Loads the lane meters and hands them to the bulk path too; on error keeps none (the
    /// bulk path handles everything meanwhile) until the next registry change.
    async fn reload(&self) -> HashSet<Box<str>> {
        let meters = match load_meters(self.pool, self.config).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "lane: cannot load the lane meters; the bulk path takes their readings");
                HashSet::new()
            }
        };
        tracing::info!(meters = meters.len(), "priority lane meters loaded");
        self.engines.lock().await.book.meters = meters.clone();
        meters
    }

    /// Validates, commits and announces the lane's share of `readings`.
    async fn handle(
        &mut self,
        mut readings: Vec<model::Reading>,
        owed: &mut RefusedSpans,
    ) -> Result<(), WorkerError> {
        let mut job = {
            let mut guard = self.engines.lock().await;
            let eng = &mut *guard;
            eng.book.not_taken(&mut readings);
            if readings.is_empty() {
                return Ok(());
            }
            // A register that went down may be a replaced meter (rare; as on the bulk path).
            let decreasing = eng.vee.decreasing_meters(readings.iter());
            if !decreasing.is_empty() {
                match crate::db::meter_state::load_replacements(self.pool, &decreasing).await {
                    Ok(reps) => {
                        for (m, r) in reps {
                            eng.vee.add_replacement(&m, r);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "lane: cannot load meter replacements"),
                }
            }
            validate(eng, readings, self.config.partitions)
        };
        let Some(stats) = commit(
            self.config,
            self.pool,
            self.metrics,
            &mut job,
            owed,
            &mut self.shutdown,
        )
        .await
        else {
            // Stopping while the database refuses: the bulk path sees these readings again
            // after the restart (nothing of them was acknowledged: a bulk job waiting for
            // them is not committed either, its handoff is dropped).
            tracing::warn!(
                readings = job.readings.len(),
                "lane: stopping with an uncommitted job"
            );
            return Err(WorkerError::Mqtt("committing a lane job"));
        };
        let spans: usize = job.entries.iter().map(|e| e.usage.len()).sum();
        IngestMetrics::add(&self.metrics.pending_spans, spans as u64);
        IngestMetrics::add(&self.metrics.commits, 1);
        IngestMetrics::add(&self.metrics.stored, stats.inserted);
        IngestMetrics::add(&self.metrics.lane_stored, stats.inserted);
        let [duplicates, conflicts, estimated, rejected] = job.counts;
        IngestMetrics::add(&self.metrics.duplicates, duplicates);
        IngestMetrics::add(&self.metrics.conflicts, conflicts);
        IngestMetrics::add(&self.metrics.estimated, estimated);
        IngestMetrics::add(&self.metrics.rejected, rejected);
        for payload in crate::detect::alarm_messages(&job.alarms.events) {
            if let Some(tap) = &self.config.alarm_tap {
                tap.send(payload.clone()).ok();
            }
            self.out
                .send(Outbound::Publish {
                    topic: crate::detect::alarms_topic(&self.config.topic_root),
                    payload,
                })
                .map_err(|_| WorkerError::Mqtt("publishing an alarm"))?;
        }
        // Before any handoff is answered: a writer that has its answer finds the records.
        self.ends
            .done
            .send(stats.journal_ids.into_iter().zip(job.entries).collect())
            .ok();
        Ok(())
    }
}

/// Validates `readings` (all of lane meters) into a job of their own: no spool progress, no
/// messages to acknowledge (the bulk path does both).
fn validate(eng: &mut Engines, readings: Vec<model::Reading>, partitions: u16) -> WriteJob {
    let out = eng.vee.validate(readings, OffsetDateTime::now_utc());
    let rejects: Vec<RejectRecord> = out.conflicts.iter().map(RejectRecord::conflict).collect();
    eng.vee.commit(&out.states);
    let mut alarms = crate::detect::batch_write(eng.detectors.on(&mut eng.vee), &out.readings);
    let detect_states = std::mem::take(&mut alarms.states);
    WriteJob {
        counts: [
            out.duplicates,
            out.conflicts.len() as u64,
            out.estimated,
            out.rejected,
        ],
        readings: out.readings,
        entries: journal::split(out.usage, out.states, detect_states, partitions),
        progress: Vec::new(),
        acks: Vec::new(),
        rejects,
        out_of_order: out.out_of_order,
        publishes: Vec::new(),
        alarms,
        announce: Vec::new(),
        lane_done: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_json(meters: &[&str], pretty: bool) -> Vec<u8> {
        let batch = model::ReadingBatch {
            v: model::WIRE_VERSION,
            gateway: model::GatewayId::new("gw-1").unwrap(),
            partition: 0,
            sent_at: testkit::reading::DEFAULT_TS,
            incarnation: None,
            prev: None,
            entries: meters
                .iter()
                .enumerate()
                .map(|(i, m)| model::BatchEntry {
                    seq: i as u64 + 1,
                    // A source id "meter" puts the word as a string value into the message.
                    reading: testkit::reading(m)
                        .source(model::SourceKind::Coap, "meter")
                        .build(),
                })
                .collect(),
        };
        if pretty {
            serde_json::to_vec_pretty(&batch).unwrap()
        } else {
            serde_json::to_vec(&batch).unwrap()
        }
    }

    fn lane(ids: &[&str]) -> HashSet<Box<str>> {
        ids.iter().map(|m| Box::from(*m)).collect()
    }

    #[test]
    fn scan_finds_a_lane_meter_among_others_compact_and_pretty() {
        let meters = lane(&["cjt188:77000000000001"]);
        for pretty in [false, true] {
            let with = batch_json(
                &[
                    "cjt188:99000000000001",
                    "cjt188:77000000000001",
                    "cjt188:99000000000002",
                ],
                pretty,
            );
            assert!(may_hold_lane_meter(&with, &meters), "pretty={pretty}");
            let without = batch_json(&["cjt188:99000000000001", "cjt188:99000000000002"], pretty);
            assert!(!may_hold_lane_meter(&without, &meters), "pretty={pretty}");
        }
    }

    #[test]
    fn scan_matches_whole_ids_only() {
        // A longer id that starts with a lane meter's id, and one that is a prefix of it.
        let meters = lane(&["cjt188:7700000000000"]);
        let payload = batch_json(&["cjt188:77000000000001", "cjt188:770000000000"], false);
        assert!(!may_hold_lane_meter(&payload, &meters));
        assert!(!may_hold_lane_meter(&payload, &HashSet::new()));
    }

    #[test]
    fn scan_answers_maybe_for_an_escaped_id_and_skips_non_string_values() {
        let meters = lane(&["cjt188:1"]);
        assert!(may_hold_lane_meter(
            br#"{"entries":[{"reading":{"meter":"cjt\u0031"}}]}"#,
            &meters
        ));
        assert!(!may_hold_lane_meter(
            br#"{"x":{"meter":7},"y":"meter","z":["meter"]}"#,
            &meters
        ));
        assert!(may_hold_lane_meter(
            br#"{"x":{"meter":7},"reading":{"meter" : "cjt188:1"}}"#,
            &meters
        ));
        // Cut off inside the id: the decoder refuses it, the scan may say either.
        assert!(may_hold_lane_meter(
            br#"{"reading":{"meter":"cjt188:1"#,
            &meters
        ));
    }

    #[test]
    fn lane_readings_are_the_lane_meters_readings_of_the_message() {
        let config = WorkerConfig::new("mqtt://127.0.0.1:1883", "wm/v1", 0, 1, 4).unwrap();
        let ids = [
            "cjt188:99000000000001",
            "cjt188:77000000000001",
            "cjt188:99000000000002",
            "cjt188:77000000000002",
        ];
        let meters = lane(&["cjt188:77000000000001", "cjt188:77000000000002"]);
        let now = testkit::reading::DEFAULT_TS + time::Duration::minutes(1);
        // Both ways of finding them agree.
        for scan in [Scan::Bytes, Scan::Parse] {
            let mut got = Vec::new();
            lane_readings(
                &batch_json(&ids, false),
                scan,
                &meters,
                &config,
                now,
                &mut got,
            );
            let got: Vec<&str> = got.iter().map(|r| r.meter.as_str()).collect();
            assert_eq!(
                got,
                ["cjt188:77000000000001", "cjt188:77000000000002"],
                "{scan:?}"
            );

            let mut none = Vec::new();
            let others = batch_json(&ids[..1], false);
            lane_readings(&others, scan, &meters, &config, now, &mut none);
            assert!(none.is_empty(), "{scan:?}");
            // A batch of another wire version is the bulk path's to refuse, even with a lane
            // meter in it.
            let v2 = String::from_utf8(batch_json(&ids, false))
                .unwrap()
                .replacen("\"v\":1", "\"v\":2", 1);
            assert!(v2.contains("\"v\":2"));
            lane_readings(v2.as_bytes(), scan, &meters, &config, now, &mut none);
            assert!(none.is_empty(), "{scan:?}");
        }
    }
}
