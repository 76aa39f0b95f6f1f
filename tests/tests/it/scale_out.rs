//! Scale-out of the pipeline: workers on disjoint partitions of one broker and one database,
//! with redeliveries, duplicates and a crash; no reading lost, none stored twice.

use std::time::Duration;

use model::{BatchEntry, GatewayId, Reading, ReadingBatch, SourceKind, WIRE_VERSION};
use pipeline::ingest::IngestMetrics;
use pipeline::worker::{self, WorkerConfig};
use rumqttc::{AsyncClient, QoS};
use testkit::TestDatabase;
use time::OffsetDateTime;

use crate::common::{RunningWorker, spawn_worker};

const PARTITIONS: u16 = 8;

fn start_worker(
    db: &TestDatabase,
    root: &str,
    w: u16,
    workers: u16,
    client_id: &str,
) -> RunningWorker {
    start_worker_with(db.pool.clone(), root, w, workers, client_id, |_| {})
}

fn start_worker_with(
    pool: sqlx::PgPool,
    root: &str,
    w: u16,
    workers: u16,
    client_id: &str,
    configure: impl FnOnce(&mut WorkerConfig),
) -> RunningWorker {
    let mut config =
        WorkerConfig::new(&pipeline::config::mqtt_url(), root, w, workers, PARTITIONS).unwrap();
    config.client_id = client_id.to_owned();
    config.max_batch_readings = 200;
    configure(&mut config);
    spawn_worker(config, pool)
}

fn publisher(name: &str) -> AsyncClient {
    let (client, mut eventloop) = wm_tests::mqtt_client(name);
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    client
}

/// Publishes a probe of an unknown wire version on `partition` until `worker` has counted one:
/// from then on its subscription (and persistent session) exists.
async fn wait_subscribed(client: &AsyncClient, root: &str, partition: u16, worker: &RunningWorker) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while IngestMetrics::get(&worker.metrics.unknown_version) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never subscribed"
        );
        client
            .publish(
                format!("{root}/readings/{partition}"),
                QoS::AtLeastOnce,
                false,
                br#"{"v":99}"#.to_vec(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reading(meter: &str, gateway: &str, hour: i64, start: OffsetDateTime) -> Reading {
    let ts = start + time::Duration::hours(hour);
    testkit::reading(meter)
        .ts(ts)
        .milli(1000 + hour * 25)
        .gateway(gateway)
        .source(SourceKind::Coap, "nb")
        .frame_hash("cd".repeat(32))
        .received_at(ts + time::Duration::seconds(2))
        .build()
}

/// Builds one message per (round, partition): `meters` meters, `rounds` hourly reads each.
/// Returns (partition, payload) in publish order and the number of distinct readings.
fn messages(gateway: &str, meters: usize, rounds: i64) -> (Vec<(u16, Vec<u8>)>, usize) {
    messages_from(gateway, meters, rounds, hours_ago(rounds + 1))
}

/// Whole seconds, so two gateways built from the same start hear the very same reads.
fn hours_ago(hours: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::hours(hours)
}

/// Like [`messages`], from an explicit first read time.
fn messages_from(
    gateway: &str,
    meters: usize,
    rounds: i64,
    start: OffsetDateTime,
) -> (Vec<(u16, Vec<u8>)>, usize) {
    let ids: Vec<String> = (0..meters)
        .map(|i| format!("cjt188:{:014}", 5_000 + i))
        .collect();
    let mut seq = 1u64;
    let mut out = Vec::new();
    let mut distinct = 0;
    for hour in 0..rounds {
        for p in 0..PARTITIONS {
            let entries: Vec<BatchEntry> = ids
                .iter()
                .filter(|m| model::partition_of(m, PARTITIONS) == p)
                .map(|m| {
                    seq += 1;
                    BatchEntry {
                        seq,
                        reading: reading(m, gateway, hour, start),
                    }
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            distinct += entries.len();
            let batch = ReadingBatch {
                v: WIRE_VERSION,
                gateway: GatewayId::new(gateway).unwrap(),
                partition: p,
                sent_at: OffsetDateTime::now_utc(),
                incarnation: None,
                prev: None,
                entries,
            };
            out.push((p, serde_json::to_vec(&batch).unwrap()));
        }
    }
    (out, distinct)
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

async fn counts(db: &TestDatabase) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT (meter_id, ts, quantity, tariff, subunit)) FROM readings",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn wait_for_rows(db: &TestDatabase, expected: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (n, _) = counts(db).await;
        if n as usize >= expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {n} of {expected} readings"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_workers_store_every_reading_exactly_once() {
    let db = TestDatabase::create().await;
    let root = wm_tests::unique_prefix("scale-out");
    let ids = wm_tests::unique_prefix("w").replace('/', "-");
    let w0 = start_worker(&db, &root, 0, 2, &format!("{ids}-0"));
    let w1 = start_worker(&db, &root, 1, 2, &format!("{ids}-1"));
    let client = publisher("scale-out-pub");
    wait_subscribed(&client, &root, 0, &w0).await;
    wait_subscribed(&client, &root, 1, &w1).await;

    // One start for both gateways: built a second apart, they would be different reads.
    let start = hours_ago(5);
    let (msgs, distinct) = messages_from("gw-a", 60, 4, start);
    // Every message, then every message again (lost PUBACKs), then the same reads heard by a
    // second gateway with its own spool sequence (a meter in range of two gateways).
    publish_all(&client, &root, &msgs).await;
    publish_all(&client, &root, &msgs).await;
    let (msgs_b, _) = messages_from("gw-b", 60, 4, start);
    publish_all(&client, &root, &msgs_b).await;
    wait_for_rows(&db, distinct, "two workers").await;
    // Let the duplicates drain too, then check nothing extra appeared.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while IngestMetrics::get(&w0.metrics.messages) + IngestMetrics::get(&w1.metrics.messages)
        < (3 * msgs.len()) as u64
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "duplicates not consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (n, distinct_rows) = counts(&db).await;
    assert_eq!(n as usize, distinct, "no loss, no duplicate");
    assert_eq!(distinct_rows, n);
    // Both workers did work, and only on their own partitions.
    assert!(IngestMetrics::get(&w0.metrics.stored) > 0);
    assert!(IngestMetrics::get(&w1.metrics.stored) > 0);
    assert_eq!(
        (IngestMetrics::get(&w0.metrics.stored) + IngestMetrics::get(&w1.metrics.stored)) as usize,
        distinct
    );
    testkit::wait_folded(&[&w0.metrics, &w1.metrics], Duration::from_secs(10)).await;
    let consumption: String = sqlx::query_scalar("SELECT sum(consumption)::text FROM rollup_daily")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(consumption, "4.500000", "60 meters x 3 spans x 0.025 m3");
    // A gateway with a wrong partition count puts a meter of worker 1 on partition 0: worker 0
    // refuses it instead of forking that meter's state.
    let foreign = (0..)
        .map(|i| format!("cjt188:{:014}", 90_000 + i))
        .find(|m| model::partition_of(m, PARTITIONS) % 2 == 1)
        .unwrap();
    let stray = ReadingBatch {
        v: WIRE_VERSION,
        gateway: GatewayId::new("gw-c").unwrap(),
        partition: 0,
        sent_at: OffsetDateTime::now_utc(),
        incarnation: None,
        prev: None,
        entries: vec![BatchEntry {
            seq: 1,
            reading: reading(
                &foreign,
                "gw-c",
                0,
                OffsetDateTime::now_utc() - time::Duration::hours(1),
            ),
        }],
    };
    publish_all(&client, &root, &[(0, serde_json::to_vec(&stray).unwrap())]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let refused: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ingest_rejects WHERE kind = 'wrong_partition'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if refused == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stray reading not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(IngestMetrics::get(&w0.metrics.wrong_partition), 1);
    assert_eq!(counts(&db).await.0 as usize, distinct);
    for w in [w0, w1] {
        w.stop.send(true).unwrap();
        w.task.await.unwrap().unwrap();
    }
    for i in 0..2 {
        worker::forget_session(&pipeline::config::mqtt_url(), &format!("{ids}-{i}"))
            .await
            .unwrap();
    }
    db.drop_database().await;
}

#[tokio::test]
async fn killed_worker_resumes_from_its_persistent_session() {
    let db = TestDatabase::create().await;
    let root = wm_tests::unique_prefix("crash");
    let client_id = wm_tests::unique_prefix("crash-w").replace('/', "-");
    // This worker never folds its journal before it dies: everything it committed is left for
    // the next one to read back.
    // Its own connections, as a process has: a task aborted mid-statement leaves its connection
    // mid-protocol, and nobody else may use it afterwards.
    let own_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await
        .unwrap();
    let first = start_worker_with(own_pool.clone(), &root, 0, 1, &client_id, |c| {
        c.max_batch_readings = 100;
        c.flush_interval = Duration::from_secs(3600);
        c.flush_idle = Duration::from_secs(3600);
        c.state_checkpoint_interval = Duration::from_secs(3600);
    });
    let client = publisher("crash-pub");
    wait_subscribed(&client, &root, 0, &first).await;

    let (msgs, distinct) = messages("gw-a", 80, 6);
    publish_all(&client, &root, &msgs).await;
    // Kill the worker mid-stream: as soon as it has stored a batch, before it is done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while IngestMetrics::get(&first.metrics.stored) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never consumed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.task.abort();
    assert!(first.task.await.unwrap_err().is_cancelled());
    drop(own_pool);
    let (after_crash, _) = counts(&db).await;
    assert!(
        after_crash > 0 && (after_crash as usize) < distinct,
        "the crash happened mid-stream"
    );
    let journal = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM ingest_journal")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(journal().await > 0, "committed batches wait in the journal");
    let folded: i64 = sqlx::query_scalar("SELECT count(*) FROM rollup_daily")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(folded, 0, "nothing was folded before the crash");
    // While it is down, the broker queues for its session; a gateway also resends everything.
    publish_all(&client, &root, &msgs).await;

    let second = start_worker(&db, &root, 0, 1, &client_id);
    wait_for_rows(&db, distinct, "after restart").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while IngestMetrics::get(&second.metrics.seq_duplicates) < after_crash as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "resent batches not consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n, distinct_rows) = counts(&db).await;
    assert_eq!(
        n as usize, distinct,
        "no loss, no duplicate after the crash"
    );
    assert_eq!(distinct_rows, n);
    second.stop.send(true).unwrap();
    second.task.await.unwrap().unwrap();
    // Rollups and meter states are journalled with their readings: after the crash and the
    // resends every span is counted once and every meter's state is kept.
    let states: i64 = sqlx::query_scalar("SELECT count(*) FROM meter_state")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(states, 80);
    let consumption: String = sqlx::query_scalar("SELECT sum(consumption)::text FROM rollup_daily")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(consumption, "10.000000", "80 meters x 5 spans x 0.025 m3");
    assert_eq!(
        journal().await,
        0,
        "the restarted worker folded the dead one's journal"
    );
    worker::forget_session(&pipeline::config::mqtt_url(), &client_id)
        .await
        .unwrap();
    db.drop_database().await;
}
