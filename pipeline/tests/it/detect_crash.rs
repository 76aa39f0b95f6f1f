//! A worker killed in the middle of its work, restarted and fed everything again (the broker's
//! redelivery plus a gateway replaying its spool) writes each alarm exactly once, and ends with
//! the same detector state as one uninterrupted pass. Detector state is journalled with the
//! meter states (not upserted per batch), so the first worker is configured never to checkpoint:
//! what the second one knows comes from the journal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use model::{BatchEntry, GatewayId, Reading, ReadingBatch, WIRE_VERSION};
use pipeline::detect::{self, DetectConfig, Detectors};
use pipeline::ingest::IngestMetrics;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use rust_decimal::Decimal;
use testkit::{TestDatabase, volume_read};
use time::OffsetDateTime;

const PARTITIONS: u16 = 4;
const HOURS: i64 = 48;

fn meter(i: usize) -> String {
    format!("cjt188:{i:014}")
}

/// Litres used by meter `i` in hour `h`: meters 0 and 1 burst (1.2 m³ in hours 22 and 23),
/// meters 2 and 3 leak (20 L every hour), the others use water in the morning only.
fn litres(i: usize, h: i64) -> i64 {
    match i {
        0 | 1 if h == 22 || h == 23 => 1_200,
        2 | 3 => 20 + if h % 24 == 8 { 100 } else { 0 },
        _ if h % 24 == 7 || h % 24 == 8 => 60,
        _ => 0,
    }
}

/// Every meter's hourly reads, by hour.
fn series(t0: OffsetDateTime) -> Vec<Vec<Reading>> {
    let mut registers = [Decimal::from(100); 8];
    (0..=HOURS)
        .map(|h| {
            (0..8)
                .map(|i| {
                    if h > 0 {
                        registers[i] += Decimal::new(litres(i, h - 1), 3);
                    }
                    volume_read(&meter(i), t0 + time::Duration::hours(h), registers[i])
                })
                .collect()
        })
        .collect()
}

/// One message per (hour, partition), with spool sequence numbers per partition, as one gateway
/// sends them.
fn messages(hours: &[Vec<Reading>]) -> Vec<(u16, Vec<u8>)> {
    let mut seq = [1u64; PARTITIONS as usize];
    let mut out = Vec::new();
    for readings in hours {
        for p in 0..PARTITIONS {
            let entries: Vec<BatchEntry> = readings
                .iter()
                .filter(|r| model::partition_of(r.meter.as_str(), PARTITIONS) == p)
                .map(|r| {
                    let s = &mut seq[usize::from(p)];
                    *s += 1;
                    BatchEntry {
                        seq: *s - 1,
                        reading: r.clone(),
                    }
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let batch = ReadingBatch {
                v: WIRE_VERSION,
                gateway: GatewayId::new("gw-crash").unwrap(),
                partition: p,
                sent_at: readings[0].ts,
                incarnation: None,
                prev: None,
                entries,
            };
            out.push((p, serde_json::to_vec(&batch).unwrap()));
        }
    }
    out
}

fn start(
    pool: &sqlx::PgPool,
    config: &pipeline::worker::WorkerConfig,
) -> (
    tokio::task::JoinHandle<Result<(), pipeline::worker::WorkerError>>,
    Arc<IngestMetrics>,
    tokio::sync::watch::Sender<bool>,
) {
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let handle = tokio::spawn(pipeline::worker::run(
        config.clone(),
        pool.clone(),
        Arc::clone(&metrics),
        shutdown,
    ));
    (handle, metrics, stop)
}

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

async fn publish_all(client: &AsyncClient, root: &str, msgs: &[(u16, Vec<u8>)]) {
    for (p, payload) in msgs {
        client
            .publish(
                format!("{root}/readings/{p}"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
    }
}

/// Waits (generously: the machine is loaded) until `sql` returns at least `want`.
async fn wait_count(db: &TestDatabase, sql: &str, want: i64, within: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = count(db, sql).await;
        if n >= want {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sql}: {n} < {want} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_are_written_exactly_once_across_a_crash_mid_batch_and_a_replay() {
    // Another test of this binary may have installed one already.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_test_writer()
        .try_init()
        .ok();
    let db = TestDatabase::create().await;
    let url = pipeline::config::mqtt_url();
    let root = format!(
        "test/detect-crash/{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let now = OffsetDateTime::now_utc();
    let t0 = now.replace_minute(0).unwrap().replace_second(0).unwrap()
        - time::Duration::hours(HOURS + 1);
    let hours = series(t0);
    let msgs = messages(&hours);
    let total: i64 = hours.iter().map(|h| h.len() as i64).sum();

    // The reference: one uninterrupted pass of the detectors over every read.
    let mut reference = Detectors::new(DetectConfig::default());
    let all: Vec<Reading> = hours.iter().flatten().cloned().collect();
    let expected_events = detect::batch_write(&mut reference, &all).events;
    let mut expected: BTreeMap<(String, String), (OffsetDateTime, bool)> = BTreeMap::new();
    let mut book = detect::replay::AlarmBook::default();
    for e in expected_events {
        book.apply(e);
    }
    for r in book.into_records() {
        expected.insert(
            (r.meter_id.clone(), r.kind.as_str().to_owned()),
            (r.first_seen, r.cleared_at.is_some()),
        );
    }
    let kinds: Vec<&str> = expected.keys().map(|(_, k)| k.as_str()).collect();
    assert!(
        kinds.contains(&"burst") && kinds.contains(&"leak"),
        "the scenario raises bursts and leaks: {expected:?}"
    );

    let mut config = pipeline::worker::WorkerConfig::new(&url, &root, 0, 1, PARTITIONS).unwrap();
    config.client_id = format!("wk-crash-{}", rand::random::<u32>());
    // One message per transaction: many commits, so the kill lands between and inside them.
    config.max_batch_readings = 1;
    // Nothing reaches `detector_state` before the kill: the restart must use the journal.
    config.flush_idle = Duration::from_secs(3600);
    config.state_checkpoint_interval = Duration::from_secs(3600);
    config.sweep_interval = Duration::from_secs(24 * 3600);
    config.dma_interval = Duration::from_secs(24 * 3600);

    let broker = pipeline::config::broker_url(&url).unwrap();
    let (host, port) = (broker.host.clone(), broker.port);
    let mut opts = MqttOptions::new(format!("pub-{}", rand::random::<u32>()), host, port);
    opts.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut el) = AsyncClient::new(opts, 1024);
    // Keeps polling through connection errors (a loaded broker may refuse or time out once):
    // the client reconnects instead of failing every later publish.
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    // First worker: wait until it is subscribed (its persistent session then queues for it).
    // The worker killed below gets a pool of its own: the abort can leave a connection
    // mid-exchange, which must not be handed to this test's own queries.
    let crash_pool = db.separate_pool().await;
    let (worker, metrics, _stop) = start(&crash_pool, &config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while IngestMetrics::get(&metrics.commits) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never consumed"
        );
        client
            .publish(
                format!("{root}/readings/0"),
                QoS::AtLeastOnce,
                false,
                b"{\"v\":99}".to_vec(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publish_all(&client, &root, &msgs).await;
    // Kill it once the burst and leak hours are partly stored: mid-stream, whatever batch it
    // is in (the abort drops an open transaction like a crash does).
    let stored = wait_count(
        &db,
        "SELECT count(*) FROM readings",
        total / 2,
        Duration::from_secs(120),
    )
    .await;
    worker.abort();
    assert!(
        worker.await.is_err_and(|e| e.is_cancelled()),
        "the worker was still running when killed"
    );
    drop(crash_pool);
    assert!(
        stored < total,
        "the kill came before the end ({stored} of {total})"
    );
    let raised = count(&db, "SELECT count(*) FROM alarms").await;
    let journalled = count(&db, "SELECT count(*) FROM ingest_journal").await;
    let checkpointed = count(&db, "SELECT count(*) FROM detector_state").await;
    assert!(
        journalled > 0 && checkpointed == 0,
        "state only in the journal"
    );

    // Restart (the broker redelivers what was not acknowledged) and replay everything again
    // (a gateway re-sending its spool after reconnecting).
    let (worker, metrics, stop) = start(&db.pool, &config);
    publish_all(&client, &root, &msgs).await;
    wait_count(
        &db,
        "SELECT count(*) FROM readings",
        total,
        Duration::from_secs(180),
    )
    .await;
    // Every re-sent message counted (so nothing of the replay is still to be judged).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while (IngestMetrics::get(&metrics.seq_duplicates) as i64) < stored {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay not consumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
    pipeline::worker::forget_session(&url, &config.client_id)
        .await
        .unwrap();

    let rows: Vec<(String, String, i32, OffsetDateTime, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT meter_id, kind, occurrences, first_seen, cleared_at FROM alarms
             ORDER BY meter_id, kind",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut got: BTreeMap<(String, String), (OffsetDateTime, bool)> = BTreeMap::new();
    for (m, k, occurrences, first_seen, cleared) in rows {
        assert_eq!(occurrences, 1, "{m} {k} raised more than once");
        assert!(
            got.insert((m.clone(), k.clone()), (first_seen, cleared.is_some()))
                .is_none(),
            "{m} {k}: two rows"
        );
    }
    assert_eq!(
        got, expected,
        "{raised} alarms were written before the kill"
    );

    // The shutdown checkpointed the detector state: what a third start loads equals the
    // uninterrupted pass, field by field.
    assert_eq!(count(&db, "SELECT count(*) FROM ingest_journal").await, 0);
    let loaded = detect::store::load(&db.pool, DetectConfig::default(), |_| true)
        .await
        .unwrap();
    for i in 0..8 {
        assert_eq!(
            loaded.state(&meter(i)),
            reference.state(&meter(i)),
            "detector state of {}",
            meter(i)
        );
    }
    db.drop_database().await;
}

/// A running worker picks up a meter's new device model (`NOTIFY wm_registry`) between batches:
/// a status bit that meant nothing under the default map raises `tamper` once the model says
/// so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_reads_status_words_with_the_model_the_registry_assigns() {
    let db = TestDatabase::create().await;
    let url = pipeline::config::mqtt_url();
    let root = format!(
        "test/detect-model/{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let m = meter(0);
    sqlx::query("INSERT INTO meters (meter_id, protocol) VALUES ($1, 'cjt188')")
        .bind(&m)
        .execute(&db.pool)
        .await
        .unwrap();
    pipeline::registry::save_model(
        &db.pool,
        &pipeline::registry::MeterModel {
            code: "acme-x2".into(),
            manufacturer: "Acme".into(),
            description: String::new(),
            status_bits: vec![(3, "magnetic_tamper".into())],
        },
        "ops:test",
    )
    .await
    .unwrap();
    let mut config = pipeline::worker::WorkerConfig::new(&url, &root, 0, 1, PARTITIONS).unwrap();
    config.client_id = format!("wk-model-{}", rand::random::<u32>());
    config.sweep_interval = Duration::from_secs(24 * 3600);
    let (worker, _metrics, stop) = start(&db.pool, &config);
    let broker = pipeline::config::broker_url(&url).unwrap();
    let (host, port) = (broker.host.clone(), broker.port);
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new(format!("pub-{}", rand::random::<u32>()), host, port),
        64,
    );
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let t0 = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let p = model::partition_of(&m, PARTITIONS);
    let mut seq = 1u64;
    // One status word with bit 3 set, as a message of its own.
    let publish = async |seq: u64| {
        let mut r = volume_read(
            &m,
            t0 + time::Duration::seconds(seq as i64),
            Decimal::from(8),
        );
        r.quantity = model::Quantity::StatusWord;
        r.unit = model::Unit::Dimensionless;
        let batch = ReadingBatch {
            v: WIRE_VERSION,
            gateway: GatewayId::new("gw-model").unwrap(),
            partition: p,
            sent_at: r.ts,
            incarnation: None,
            prev: None,
            entries: vec![BatchEntry { seq, reading: r }],
        };
        client
            .publish(
                format!("{root}/readings/{p}"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&batch).unwrap(),
            )
            .await
            .unwrap();
    };
    let tamper = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM alarms WHERE kind = 'tamper'")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    // Under the default map (no model yet) the worker stores such words and raises nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(&db, "SELECT count(*) FROM readings").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never consumed"
        );
        publish(seq).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(tamper().await, 0, "0x08 means nothing without the model");
    // The registry assigns the model while the worker runs.
    sqlx::query("UPDATE meters SET model_code = 'acme-x2' WHERE meter_id = $1")
        .bind(&m)
        .execute(&db.pool)
        .await
        .unwrap();
    // A new word every 300 ms until one is judged with the model (the change is applied
    // between batches, as soon as the notification reaches the worker).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tamper().await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no tamper alarm from the model's bit"
        );
        publish(seq).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(tamper().await, 1);
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
    pipeline::worker::forget_session(&url, &config.client_id)
        .await
        .unwrap();
    db.drop_database().await;
}
