//! The worker's priority lane (issue 21, `pipeline/src/worker/lane.rs`): readings of meters
//! with a valve and `auto_close_on_burst` are committed, and their alarms raised, while the
//! bulk transaction is still waiting; per-meter order and exactly-once storage hold across a
//! crash.

use std::sync::Arc;
use std::time::Duration;

use model::{BatchEntry, GatewayId, Reading, ReadingBatch, WIRE_VERSION};
use pipeline::ingest::IngestMetrics;
use rumqttc::{AsyncClient, QoS};
use rust_decimal::Decimal;
use sqlx::PgPool;
use testkit::{TestDatabase, volume_read};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

const VALVE: &str = "cjt188:77000000000001";

/// Numbers entries of partition 0 of one gateway, as its spool does.
struct Spool {
    gateway: GatewayId,
    next: u64,
}

impl Spool {
    fn new(gateway: &str) -> Self {
        Self {
            gateway: GatewayId::new(gateway).unwrap(),
            next: 1,
        }
    }

    fn payload(&mut self, readings: Vec<Reading>) -> Vec<u8> {
        let entries = readings
            .into_iter()
            .map(|reading| {
                self.next += 1;
                BatchEntry {
                    seq: self.next - 1,
                    reading,
                }
            })
            .collect();
        serde_json::to_vec(&ReadingBatch {
            v: WIRE_VERSION,
            gateway: self.gateway.clone(),
            partition: 0,
            sent_at: OffsetDateTime::now_utc(),
            incarnation: None,
            prev: None,
            entries,
        })
        .unwrap()
    }
}

struct Worker {
    handle: tokio::task::JoinHandle<Result<(), pipeline::worker::WorkerError>>,
    stop: watch::Sender<bool>,
    metrics: Arc<IngestMetrics>,
    alarms: mpsc::UnboundedReceiver<Vec<u8>>,
}

fn start(pool: &PgPool, root: &str, client_id: &str) -> Worker {
    let url = pipeline::config::mqtt_url();
    let mut config = pipeline::worker::WorkerConfig::new(&url, root, 0, 1, 1).unwrap();
    config.client_id = client_id.to_owned();
    let (tap, alarms) = mpsc::unbounded_channel();
    config.alarm_tap = Some(tap);
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = watch::channel(false);
    let handle = tokio::spawn(pipeline::worker::run(
        config,
        pool.clone(),
        Arc::clone(&metrics),
        shutdown,
    ));
    Worker {
        handle,
        stop,
        metrics,
        alarms,
    }
}

async fn publisher() -> AsyncClient {
    let (client, mut el) = testkit::mqtt::connect("lane-pub");
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
}

async fn publish(client: &AsyncClient, root: &str, payload: Vec<u8>) {
    client
        .publish(
            format!("{root}/readings/0"),
            QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn wait_for(pool: &PgPool, sql: &str, want: i64, within: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = count(pool, sql).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {n}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register_valve(pool: &PgPool) {
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, gateway_id, has_valve, auto_close_on_burst) \
         VALUES ($1, 'cjt188', 'gw-1', true, true)",
    )
    .bind(VALVE)
    .execute(pool)
    .await
    .unwrap();
}

/// Publishes flat reads of the valve meter (one a minute from `from`) until the lane has
/// stored one: both of the worker's connections are subscribed then. Returns the next minute.
async fn until_lane_runs(
    client: &AsyncClient,
    root: &str,
    spool: &mut Spool,
    metrics: &IngestMetrics,
    from: OffsetDateTime,
    value: Decimal,
) -> OffsetDateTime {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut ts = from;
    while IngestMetrics::get(&metrics.lane_stored) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lane stored nothing"
        );
        publish(
            client,
            root,
            spool.payload(vec![volume_read(VALVE, ts, value)]),
        )
        .await;
        ts += time::Duration::minutes(1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ts
}

#[tokio::test]
async fn a_lane_reading_commits_and_raises_its_alarm_while_the_bulk_transaction_waits() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    register_valve(pool).await;
    let root = format!("wm-test-lane-{}", rand::random::<u32>());
    let client_id = format!("lane-{}", rand::random::<u32>());
    let mut w = start(pool, &root, &client_id);
    let client = publisher().await;
    let mut spool = Spool::new("gw-1");
    // History: flat until two hours before now, then 1.5 m³/h (over 0.4 × Q3 of 2.5 m³/h).
    let h2 = OffsetDateTime::now_utc()
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .unwrap();
    let (h0, h1) = (h2 - time::Duration::hours(2), h2 - time::Duration::hours(1));
    until_lane_runs(
        &client,
        &root,
        &mut spool,
        &w.metrics,
        h0 - time::Duration::hours(3),
        Decimal::new(100_000, 3),
    )
    .await;
    publish(
        &client,
        &root,
        spool.payload(vec![
            volume_read(VALVE, h0, Decimal::new(100_000, 3)),
            volume_read(VALVE, h1, Decimal::new(101_500, 3)),
        ]),
    )
    .await;
    let valve_at = |ts: OffsetDateTime| {
        format!(
            "SELECT count(*) FROM readings WHERE meter_id = '{VALVE}' AND ts = '{}'",
            ts.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        )
    };
    wait_for(pool, &valve_at(h1), 1, Duration::from_secs(20), "history").await;

    // Hold the bulk path: its transaction records spool progress, which this lock blocks
    // (the lane's writes none).
    let mut hold = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ingest_progress IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let bulk: Vec<Reading> = (0..2_000)
        .map(|i| {
            volume_read(
                &format!("cjt188:99{i:012}"),
                h0,
                Decimal::new(i64::from(i), 3),
            )
        })
        .collect();
    publish(&client, &root, spool.payload(bulk)).await;
    // The bulk transaction is waiting for the lock.
    wait_for(
        pool,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%ingest_progress%'",
        1,
        Duration::from_secs(20),
        "bulk transactions waiting for ingest_progress",
    )
    .await;
    // The burst-confirming reading, in a message of its own.
    publish(
        &client,
        &root,
        spool.payload(vec![volume_read(VALVE, h2, Decimal::new(103_000, 3))]),
    )
    .await;
    wait_for(
        pool,
        &valve_at(h2),
        1,
        Duration::from_secs(10),
        "lane reading",
    )
    .await;
    let alarm = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let payload = w.alarms.recv().await.unwrap();
            let a: model::Alarm = serde_json::from_slice(&payload).unwrap();
            if a.meter.as_str() == VALVE && a.kind == model::AlarmKind::Burst {
                return a;
            }
        }
    })
    .await
    .expect("the burst alarm, handed over while the bulk transaction waits");
    assert!(alarm.cleared_at.is_none());
    assert_eq!(
        count(
            pool,
            &format!("SELECT count(*) FROM alarms WHERE meter_id = '{VALVE}' AND kind = 'burst'")
        )
        .await,
        1
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM readings WHERE meter_id LIKE 'cjt188:99%'"
        )
        .await,
        0,
        "the bulk batch is still waiting"
    );
    hold.rollback().await.unwrap();
    wait_for(
        pool,
        "SELECT count(*) FROM readings WHERE meter_id LIKE 'cjt188:99%'",
        2_000,
        Duration::from_secs(30),
        "bulk readings",
    )
    .await;
    w.stop.send(true).unwrap();
    w.handle.await.unwrap().unwrap();
    pipeline::worker::forget_session(&pipeline::config::mqtt_url(), &client_id)
        .await
        .unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn lane_readings_stay_in_order_and_are_stored_once_across_a_crash() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    register_valve(pool).await;
    let root = format!("wm-test-lane-{}", rand::random::<u32>());
    let client_id = format!("lane-{}", rand::random::<u32>());
    // The worker aborted below gets a pool of its own: the abort can leave a connection
    // mid-exchange, which must not be handed to this test's own queries.
    let crash_pool = db.separate_pool().await;
    let w = start(&crash_pool, &root, &client_id);
    let client = publisher().await;
    let mut spool = Spool::new("gw-1");
    let t0 = OffsetDateTime::now_utc().replace_time(time::Time::MIDNIGHT) - time::Duration::days(3);
    let first = until_lane_runs(
        &client,
        &root,
        &mut spool,
        &w.metrics,
        t0,
        Decimal::new(10_000, 3),
    )
    .await;
    // 120 reads of the valve meter, +10 L each, interleaved with bulk meters' reads, one
    // message each; the worker crashes (task aborted) in the middle and starts again.
    let valve_read = |i: i64| {
        volume_read(
            VALVE,
            first + time::Duration::minutes(15 * i),
            Decimal::new(10_000 + 10 * i, 3),
        )
    };
    let bulk_read = |m: i64, i: i64| {
        volume_read(
            &format!("cjt188:99{m:012}"),
            first + time::Duration::minutes(15 * i),
            Decimal::new(i, 3),
        )
    };
    let mut payloads = Vec::new();
    for i in 0..120 {
        let mut readings: Vec<Reading> = (0..50).map(|m| bulk_read(m, i)).collect();
        readings.insert(25, valve_read(i));
        payloads.push(spool.payload(readings));
    }
    for p in &payloads[..60] {
        publish(&client, &root, p.clone()).await;
    }
    // Crash once some of them are stored (the lane and bulk paths mid-way).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(
        pool,
        "SELECT count(*) FROM readings WHERE meter_id LIKE 'cjt188:99%'",
    )
    .await
        < 500
    {
        assert!(tokio::time::Instant::now() < deadline, "nothing stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.handle.abort();
    w.handle.await.ok();
    drop(crash_pool);
    // A gateway whose batches were not acknowledged sends them again.
    let w = start(pool, &root, &client_id);
    for p in &payloads {
        publish(&client, &root, p.clone()).await;
    }
    let valve_after_first = format!(
        "SELECT count(*) FROM readings WHERE meter_id = '{VALVE}' AND ts >= '{}' \
         AND quality <> 'estimated'",
        first
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    wait_for(
        pool,
        &valve_after_first,
        120,
        Duration::from_secs(60),
        "valve reads",
    )
    .await;
    wait_for(
        pool,
        "SELECT count(*) FROM readings WHERE meter_id LIKE 'cjt188:99%'",
        6_000,
        Duration::from_secs(60),
        "bulk reads",
    )
    .await;
    w.stop.send(true).unwrap();
    w.handle.await.unwrap().unwrap();
    // In order: none was validated after a later one of its meter.
    assert_eq!(
        count(
            pool,
            &format!(
                "SELECT count(*) FROM readings WHERE meter_id = '{VALVE}' \
                 AND 'out_of_order' = ANY(flags)"
            )
        )
        .await,
        0
    );
    // Once: the rollups sum to the register's rise (1.190 m³), nothing counted twice.
    let rise: Decimal = sqlx::query_scalar(&format!(
        "SELECT COALESCE(sum(consumption), 0) FROM rollup_hourly WHERE meter_id = '{VALVE}'"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(rise.normalize(), Decimal::new(1_190, 3));
    let state: Decimal = sqlx::query_scalar(&format!(
        "SELECT last_value FROM meter_state WHERE meter_id = '{VALVE}'"
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(state.normalize(), Decimal::new(11_190, 3));
    // Cleanup only (the broker may be slow to drop the aborted worker's session).
    pipeline::worker::forget_session(&pipeline::config::mqtt_url(), &client_id)
        .await
        .ok();
    db.drop_database().await;
}
