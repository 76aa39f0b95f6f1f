//! Alarm lifecycle in PostgreSQL: alarms written in the ingest transaction with the readings
//! that raised them, detector state rebuilt after a restart so a redelivered batch neither
//! repeats nor loses an alarm, auto-close, acknowledge and close by a person, and the
//! communication-loss sweep raising and clearing.

use model::Reading;
use pipeline::db::{StoreOptions, WriteSet, write_batch};
use pipeline::detect::{self, DetectConfig, Detectors, store};
use rust_decimal::Decimal;
use testkit::{TestDatabase, volume_read};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const METER: &str = "cjt188:00000000000042";

/// Hourly reads with the given hourly consumption (litres) from 2026-03-02 00:00 UTC.
fn reads(from_hour: i64, litres: &[i64], start_m3: i64) -> Vec<Reading> {
    let t0 = datetime!(2026-03-02 0:00 UTC);
    let mut reg = Decimal::from(start_m3);
    let mut out = Vec::new();
    for (i, l) in litres.iter().enumerate() {
        reg += Decimal::new(*l, 3);
        out.push(volume_read(
            METER,
            t0 + Duration::hours(from_hour + i as i64),
            reg,
        ));
    }
    out
}

/// Writes a batch the way the worker does: readings and alarms in one transaction.
async fn ingest(pool: &sqlx::PgPool, det: &mut Detectors, readings: &[Reading]) -> usize {
    let alarms = detect::batch_write(det, readings);
    let mut conn = pool.acquire().await.unwrap();
    write_batch(
        &mut conn,
        &WriteSet {
            readings,
            alarms: Some(&alarms),
            ..WriteSet::default()
        },
        StoreOptions::default(),
    )
    .await
    .unwrap();
    alarms.events.len()
}

async fn alarms(
    pool: &sqlx::PgPool,
) -> Vec<(String, String, i32, Option<OffsetDateTime>, Option<String>)> {
    sqlx::query_as(
        "SELECT kind, state, occurrences, cleared_at, closed_by FROM alarms ORDER BY alarm_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn burst_is_written_once_across_a_restart_and_auto_closes() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    sqlx::query("INSERT INTO meters (meter_id, protocol, nominal_flow_q3, role) VALUES ($1, 'cjt188', 2.5, 'customer')")
        .bind(METER)
        .execute(pool)
        .await
        .unwrap();
    let config = DetectConfig::default();
    let mut det = store::load(pool, config.clone(), |_| true).await.unwrap();
    // Two hours of 1.2 m³ (≥ 0.4 × Q3): a burst from 09:00 (read at 10:00 and 11:00).
    let series = reads(8, &[10, 20, 1200, 1200, 1300, 15, 0], 100);
    let (batch1, batch2) = series.split_at(4);
    assert_eq!(ingest(pool, &mut det, batch1).await, 1);
    let rows = alarms(pool).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].2),
        ("burst", "open", 1)
    );
    let first_seen: OffsetDateTime = sqlx::query_scalar("SELECT first_seen FROM alarms")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(first_seen, datetime!(2026-03-02 9:00 UTC));

    // A crash and a restart: the state comes back from the database, and the broker redelivers
    // the batch: nothing is raised twice.
    drop(det);
    let mut det = store::load(pool, config.clone(), |_| true).await.unwrap();
    ingest(pool, &mut det, batch1).await;
    assert_eq!(alarms(pool).await.len(), 1);

    // The next batch: the burst goes on, then stops: auto-close.
    ingest(pool, &mut det, batch2).await;
    let rows = alarms(pool).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "closed");
    assert_eq!(rows[0].3, Some(datetime!(2026-03-02 12:00 UTC)));
    assert_eq!(rows[0].4.as_deref(), Some("auto"));
    let last_seen: OffsetDateTime = sqlx::query_scalar("SELECT last_seen FROM alarms")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(last_seen, datetime!(2026-03-02 12:00 UTC));
    db.drop_database().await;
}

#[tokio::test]
async fn tamper_stays_until_a_person_closes_it() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    sqlx::query("INSERT INTO meters (meter_id, protocol) VALUES ($1, 'cjt188')")
        .bind(METER)
        .execute(pool)
        .await
        .unwrap();
    let mut det = store::load(pool, DetectConfig::default(), |_| true)
        .await
        .unwrap();
    let status = |h: i64, word: i64| {
        let mut r = volume_read(
            METER,
            datetime!(2026-03-02 0:00 UTC) + Duration::hours(h),
            Decimal::from(word),
        );
        r.quantity = model::Quantity::StatusWord;
        r.unit = model::Unit::Dimensionless;
        r
    };
    ingest(pool, &mut det, &[status(1, 0x20)]).await;
    ingest(pool, &mut det, &[status(2, 0x00), status(3, 0x20)]).await;
    let rows = alarms(pool).await;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].0.as_str(), rows[0].2), ("tamper", 1));
    let tampered: Option<OffsetDateTime> = sqlx::query_scalar("SELECT tampered_at FROM meters")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(tampered, Some(datetime!(2026-03-02 1:00 UTC)));
    let id: i64 = sqlx::query_scalar("SELECT alarm_id FROM alarms")
        .fetch_one(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert!(store::acknowledge(&mut conn, id, "li.wei").await.unwrap());
    assert!(!store::acknowledge(&mut conn, id, "li.wei").await.unwrap());
    assert!(store::close(&mut conn, id, "li.wei").await.unwrap());
    let (state, by, ack_by): (String, String, String) =
        sqlx::query_as("SELECT state, closed_by, acknowledged_by FROM alarms")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), by.as_str(), ack_by.as_str()),
        ("closed", "li.wei", "li.wei")
    );
    let tampered: Option<OffsetDateTime> = sqlx::query_scalar("SELECT tampered_at FROM meters")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(tampered, None);
    // After a restart the closed kind may be raised again.
    let mut det = store::load(pool, DetectConfig::default(), |_| true)
        .await
        .unwrap();
    ingest(pool, &mut det, &[status(4, 0x20)]).await;
    assert_eq!(alarms(pool).await.len(), 2);
    drop(conn);
    db.drop_database().await;
}

// This test hung for 300 s in 2 of 5 full runs (issue 20): not in the sweep's write but in
// `TestDatabase::drop_database`, which waited on the connection the test still held (see
// `a_test_database_is_dropped_while_a_connection_is_held`).
#[tokio::test]
async fn sweep_raises_communication_loss_and_a_report_clears_it() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let mut det = Detectors::new(DetectConfig::default());
    // Hourly reads received until five hours ago, then silence.
    let now = OffsetDateTime::now_utc();
    let t0 = now - Duration::hours(15);
    let batch: Vec<Reading> = (0..10)
        .map(|h| volume_read(METER, t0 + Duration::hours(h), Decimal::new(1000 + h, 3)))
        .collect();
    ingest(pool, &mut det, &batch).await;
    let sweep = detect::sweep_write(&mut det);
    assert_eq!(sweep.events.len(), 1);
    let mut conn = pool.acquire().await.unwrap();
    write_batch(
        &mut conn,
        &WriteSet {
            alarms: Some(&sweep),
            ..WriteSet::default()
        },
        StoreOptions::default(),
    )
    .await
    .unwrap();
    let rows = alarms(pool).await;
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("communication_loss", "open")
    );
    // Reporting again clears it.
    ingest(
        pool,
        &mut det,
        &[volume_read(METER, now, Decimal::new(1011, 3))],
    )
    .await;
    let rows = alarms(pool).await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].4.as_deref()),
        ("closed", Some("auto"))
    );
    drop(conn);
    db.drop_database().await;
}

#[tokio::test]
async fn gateway_offline_and_spool_overflow_reach_the_alarms_table() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let db = TestDatabase::create().await;
    let url = pipeline::config::mqtt_url();
    let broker = pipeline::config::broker_url(&url).unwrap();
    let (host, port) = (broker.host.clone(), broker.port);
    let root = format!("wm-test-gwalarm-{}", rand::random::<u32>());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let consumer = tokio::spawn(detect::gateway::run(
        db.pool.clone(),
        broker,
        format!("gwa-{}", rand::random::<u32>()),
        root.clone(),
        shutdown,
    ));
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new(format!("gwp-{}", rand::random::<u32>()), host, port),
        16,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let status = |state: &str| {
        serde_json::json!({"v": 1, "gateway": "gw-7", "state": state, "at": "2026-03-02T11:00:00Z"})
            .to_string()
    };
    // Retained, as the gateway's last will is: the consumer reads it even if it connects later.
    client
        .publish(
            format!("{root}/gw-7/status"),
            QoS::AtLeastOnce,
            true,
            status("offline"),
        )
        .await
        .unwrap();
    let overflow = serde_json::json!({"meter": "gateway:gw-7", "kind": "spool_overflow",
        "severity": "critical", "raised_at": "2026-03-02T10:00:00Z", "detail": {"evicted": 5}});
    let wait_for = |sql: &'static str, want: i64| {
        let pool = db.pool.clone();
        async move {
            for _ in 0..100 {
                let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                if n == want {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("{sql} never reached {want}");
        }
    };
    wait_for(
        "SELECT count(*) FROM alarms WHERE kind = 'gateway_offline' AND cleared_at IS NULL",
        1,
    )
    .await;
    for _ in 0..2 {
        client
            .publish(
                format!("{root}/gw-7/alarms"),
                QoS::AtLeastOnce,
                false,
                overflow.to_string(),
            )
            .await
            .unwrap();
    }
    // Two reports of the open alarm: one row, two occurrences.
    wait_for(
        "SELECT coalesce(sum(occurrences), 0)::bigint FROM alarms WHERE kind = 'spool_overflow'",
        2,
    )
    .await;
    client
        .publish(
            format!("{root}/gw-7/status"),
            QoS::AtLeastOnce,
            true,
            status("online"),
        )
        .await
        .unwrap();
    wait_for(
        "SELECT count(*) FROM alarms WHERE kind = 'gateway_offline' AND state = 'closed'",
        1,
    )
    .await;
    // Clear the retained message for other runs.
    client
        .publish(
            format!("{root}/gw-7/status"),
            QoS::AtLeastOnce,
            true,
            Vec::<u8>::new(),
        )
        .await
        .unwrap();
    stop.send(true).ok();
    consumer.await.unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn a_test_database_is_dropped_while_a_connection_is_held() {
    let db = TestDatabase::create().await;
    let name = db.name.clone();
    // What the hanging tests did: a connection checked out, the pool used beside it, and the
    // database dropped while the connection is still held.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
    let one: i64 = sqlx::query_scalar("SELECT 1::int8")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    tokio::time::timeout(std::time::Duration::from_secs(120), db.drop_database())
        .await
        .expect("drop_database returns although a connection is held");
    drop(conn);
    let admin = TestDatabase::create().await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&admin.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "{name} was dropped");
    admin.drop_database().await;
}

async fn exec(pool: &sqlx::PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

#[tokio::test]
async fn dma_balance_raises_once_and_clears_when_the_loss_falls() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    // DMA north: one inlet, 20 customers; DMA south: one inlet, customers that balance.
    exec(
        pool,
        "INSERT INTO meters (meter_id, protocol, dma, role) VALUES
           ('inlet-n', 'modbus', 'north', 'inlet'), ('inlet-s', 'modbus', 'south', 'inlet')",
    )
    .await;
    exec(
        pool,
        "INSERT INTO meters (meter_id, protocol, dma, role)
         SELECT 'c-n-' || i, 'cjt188', 'north', 'customer' FROM generate_series(1, 20) i
         UNION ALL
         SELECT 'c-s-' || i, 'cjt188', 'south', 'customer' FROM generate_series(1, 20) i",
    )
    .await;
    // Days 1-3: north loses 25 % (one customer's day estimated), south 5 %.
    let day = |d: i32, meter: &str, m3: &str, estimated: bool| {
        format!(
            "INSERT INTO rollup_daily (meter_id, bucket, consumption, first_value, last_value, \
             read_count, estimated) VALUES ('{meter}', DATE '2026-03-01' + {d}, {m3}, 0, {m3}, 24, \
             {estimated})"
        )
    };
    for d in 0..3 {
        exec(pool, &day(d, "inlet-n", "100", false)).await;
        exec(pool, &day(d, "inlet-s", "100", false)).await;
        for i in 1..=20 {
            exec(pool, &day(d, &format!("c-n-{i}"), "3.75", i == 1)).await;
            exec(pool, &day(d, &format!("c-s-{i}"), "4.75", false)).await;
        }
    }
    let t = pipeline::detect::config::DmaThresholds::default();
    let utc = time::UtcOffset::UTC;
    let now = datetime!(2026-03-04 12:00 UTC);
    let events = detect::dma::run(pool, &t, utc, now).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    // A second run (a restarted worker 0) refreshes, never adds.
    detect::dma::run(pool, &t, utc, now).await.unwrap();
    let rows: Vec<(String, String, i32, OffsetDateTime, serde_json::Value)> = sqlx::query_as(
        "SELECT meter_id, state, occurrences, first_seen, detail FROM alarms WHERE kind = 'dma_imbalance'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (meter, state, occurrences, first_seen, detail) = &rows[0];
    assert_eq!(
        (meter.as_str(), state.as_str(), *occurrences),
        ("dma:north", "open", 1)
    );
    assert_eq!(*first_seen, datetime!(2026-03-01 0:00 UTC));
    assert_eq!(detail["loss_share"], serde_json::json!(0.25));
    assert_eq!(detail["estimated_m3"], serde_json::json!(3.75));
    // Day 4: north's customers account for 95 %: closed by itself.
    exec(pool, &day(3, "inlet-n", "100", false)).await;
    for i in 1..=20 {
        exec(pool, &day(3, &format!("c-n-{i}"), "4.75", false)).await;
    }
    detect::dma::run(pool, &t, utc, datetime!(2026-03-05 12:00 UTC))
        .await
        .unwrap();
    let (state, closed_by): (String, String) =
        sqlx::query_as("SELECT state, closed_by FROM alarms WHERE kind = 'dma_imbalance'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), closed_by.as_str()), ("closed", "auto"));
    db.drop_database().await;
}

#[tokio::test]
async fn status_bits_follow_the_registry_model_live() {
    use pipeline::registry::live::{Change, spawn_listener};
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    exec(
        pool,
        &format!("INSERT INTO meters (meter_id, protocol) VALUES ('{METER}', 'cjt188')"),
    )
    .await;
    let mut det = store::load(pool, DetectConfig::default(), |_| true)
        .await
        .unwrap();
    let status = |h: i64, word: i64| {
        let mut r = volume_read(
            METER,
            datetime!(2026-03-02 0:00 UTC) + Duration::hours(h),
            Decimal::from(word),
        );
        r.quantity = model::Quantity::StatusWord;
        r.unit = model::Unit::Dimensionless;
        r
    };
    // Default map: 0x08 means nothing, 0x20 is tamper.
    assert!(
        detect::batch_write(&mut det, &[status(1, 0x08)])
            .events
            .is_empty()
    );
    let mut changes = spawn_listener(pool.clone());
    // The listener is connected once a change made now reaches it.
    pipeline::registry::save_model(
        pool,
        &pipeline::registry::MeterModel {
            code: "acme-x1".into(),
            manufacturer: "Acme".into(),
            description: String::new(),
            status_bits: vec![(3, "magnetic_tamper".into()), (9, "battery_low".into())],
        },
        "ops:test",
    )
    .await
    .unwrap();
    // The listener connects in the background: repeat the (idempotent) update until its
    // notification arrives, applying every change as the worker does.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen_meter = false;
    while !seen_meter {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no registry notification"
        );
        exec(
            pool,
            &format!("UPDATE meters SET model_code = 'acme-x1' WHERE meter_id = '{METER}'"),
        )
        .await;
        while let Ok(Some(change)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), changes.recv()).await
        {
            let ids: Option<Vec<String>> = match &change {
                Change::Meters(ids) => {
                    seen_meter |= ids.contains(METER);
                    Some(ids.iter().cloned().collect())
                }
                Change::All => None,
            };
            store::refresh_profiles(pool, &mut det, ids.as_deref(), |_| true)
                .await
                .unwrap();
        }
    }
    let bits = det.status_bits_of(METER);
    assert_eq!(
        (bits.tamper, bits.low_battery, bits.valve_fault),
        (0x08, 0x200, 0)
    );
    let events = detect::batch_write(&mut det, &[status(2, 0x208)]).events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["tamper", "low_battery"]);
    // The old default tamper bit means nothing for this model.
    let events = detect::batch_write(&mut det, &[status(3, 0x20)]).events;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["low_battery"], "cleared, and no tamper from 0x20");
    drop(changes);
    db.drop_database().await;
}

/// Runs a worker whose sweep takes `sweep_now` as its clock, feeds it a day of hourly reads of
/// ten meters delivered at once (as a simulated fleet does: event time far ahead of the wall
/// clock's progress), with meter 0 silent after hour 10, lets it sweep a few times and returns
/// the communication-loss alarms as (meter, state, silent_s).
async fn worker_sweep(sweep_now: detect::SweepNow) -> Vec<(String, String, i64)> {
    use model::{BatchEntry, GatewayId, ReadingBatch, WIRE_VERSION};
    use pipeline::ingest::IngestMetrics;
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    use std::sync::Arc;
    let db = TestDatabase::create().await;
    let url = pipeline::config::mqtt_url();
    let root = format!("wm-test-sweepnow-{}", rand::random::<u32>());
    let mut config = pipeline::worker::WorkerConfig::new(&url, &root, 0, 1, 1).unwrap();
    let client_id = format!("sw-{}", rand::random::<u32>());
    config.client_id = client_id.clone();
    config.sweep_interval = std::time::Duration::from_millis(300);
    config.sweep_now = sweep_now;
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline::worker::run(
        config,
        db.pool.clone(),
        Arc::clone(&metrics),
        shutdown,
    ));
    let broker = pipeline::config::broker_url(&url).unwrap();
    let (host, port) = (broker.host.clone(), broker.port);
    let (client, mut el) = AsyncClient::new(
        MqttOptions::new(format!("swp-{}", rand::random::<u32>()), host, port),
        64,
    );
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    // Until the worker has subscribed: a probe of an unknown wire version, until committed.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
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
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // Two days ago, hour-aligned; every read received now.
    let now = OffsetDateTime::now_utc();
    let t0 = now.replace_time(time::Time::MIDNIGHT) - Duration::days(2);
    let meters: Vec<String> = (0..10).map(|i| format!("cjt188:{:014}", 500 + i)).collect();
    let mut seq = 1u64;
    let mut expected = 0i64;
    for hour in 0..24i64 {
        let entries: Vec<BatchEntry> = meters
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 0 || hour <= 10)
            .map(|(_, m)| {
                let mut r =
                    volume_read(m, t0 + Duration::hours(hour), Decimal::new(1000 + hour, 3));
                r.provenance.received_at = now;
                seq += 1;
                BatchEntry {
                    seq: seq - 1,
                    reading: r,
                }
            })
            .collect();
        expected += entries.len() as i64;
        let batch = ReadingBatch {
            v: WIRE_VERSION,
            gateway: GatewayId::new("gw-1").unwrap(),
            partition: 0,
            sent_at: now,
            incarnation: None,
            prev: None,
            entries,
        };
        client
            .publish(
                format!("{root}/readings/0"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&batch).unwrap(),
            )
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} of {expected} readings stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Several sweeps after the last batch.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT meter_id, state, (detail->>'silent_s')::bigint FROM alarms
         WHERE kind = 'communication_loss' ORDER BY meter_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    pipeline::worker::forget_session(&url, &client_id)
        .await
        .unwrap();
    db.drop_database().await;
    rows
}

#[tokio::test]
async fn event_time_sweep_raises_communication_loss_for_a_meter_silent_in_a_fast_fleet() {
    // Meter 0's last read is hour 10; the newest is hour 23 once every batch is in. A sweep may
    // run while the hours still arrive: the alarm records the silence when it was raised,
    // more than 3 hourly intervals and at most 13 h. The nine others report every hour: none.
    let rows = worker_sweep(detect::SweepNow::EventTime).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (meter, state, silent_s) = &rows[0];
    assert_eq!(
        (meter.as_str(), state.as_str()),
        ("cjt188:00000000000500", "open")
    );
    assert!(
        (3 * 3600 + 1..=13 * 3600).contains(silent_s),
        "silent {silent_s} s"
    );
    assert_eq!(silent_s % 3600, 0, "silence in whole hours of event time");
}

#[tokio::test]
async fn wall_clock_sweep_sees_no_silence_in_reads_all_received_just_now() {
    // Unchanged default: every meter, meter 0 included, was heard (received) seconds ago.
    assert_eq!(worker_sweep(detect::SweepNow::Wall).await, vec![]);
}
