//! Storage and ingest against real PostgreSQL and Mosquitto.

use std::sync::Arc;
use std::time::Duration;

use model::{
    BatchEntry, ClockSource, GatewayId, Quality, Quantity, Reading, ReadingBatch, SourceKind, Unit,
    WIRE_VERSION,
};
use pipeline::db;
use pipeline::ingest::IngestMetrics;
use pipeline::vee::{Vee, VeeConfig};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use testkit::TestDatabase;
use time::{OffsetDateTime, macros::datetime};

const T0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);

fn read(meter: &str, minutes: i64, value: Decimal) -> Reading {
    testkit::volume_read(meter, T0 + time::Duration::minutes(minutes), value)
}

async fn write(db: &TestDatabase, vee: &mut Vee, readings: Vec<Reading>) -> db::WriteStats {
    testkit::write_validated(&db.pool, vee, readings, T0 + time::Duration::days(3)).await
}

#[tokio::test]
async fn binary_copy_round_trips_values_flags_and_quality() {
    let db = TestDatabase::create().await;
    let mut vee = Vee::new(VeeConfig::default());
    let mut litres = read("m-l", 0, dec!(123456.789));
    litres.unit = Unit::Litre;
    let mut with_channel = read("m1", 60, dec!(556677.0125));
    with_channel.provenance.channel = Some("198.51.100.4:5683".into());
    let stats = write(
        &db,
        &mut vee,
        vec![
            read("m1", 0, dec!(556677.01)),
            with_channel,
            read("m2", 0, dec!(0.000123)),
            litres,
        ],
    )
    .await;
    assert_eq!(stats.inserted, 4);
    assert!(!stats.slow_path);
    let rows: Vec<(String, String, String, Vec<String>, String)> = sqlx::query_as(
        "SELECT meter_id, value::text, quality, flags, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
         FROM readings ORDER BY meter_id, ts",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "m-l".into(),
                "123.456789".into(),
                "validated".into(),
                vec!["unit_converted".into()],
                "2026-11-20 00:00".into()
            ),
            (
                "m1".into(),
                "556677.010000".into(),
                "validated".into(),
                vec![],
                "2026-11-20 00:00".into()
            ),
            (
                "m1".into(),
                "556677.012500".into(),
                "validated".into(),
                vec![],
                "2026-11-20 01:00".into()
            ),
            (
                "m2".into(),
                "0.000123".into(),
                "validated".into(),
                vec![],
                "2026-11-20 00:00".into()
            ),
        ]
    );
    // The provenance channel survives the binary COPY; a reading without one stores NULL.
    let channels: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT meter_id, channel FROM readings ORDER BY meter_id, ts")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        channels,
        vec![
            ("m-l".into(), None),
            ("m1".into(), None),
            ("m1".into(), Some("198.51.100.4:5683".into())),
            ("m2".into(), None),
        ]
    );
    let hourly: Vec<(String, String)> = sqlx::query_as(
        "SELECT meter_id, consumption::text FROM rollup_hourly WHERE meter_id = 'm1' ORDER BY bucket",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        hourly,
        vec![
            ("m1".into(), "0.000000".into()),
            ("m1".into(), "0.002500".into())
        ]
    );
    let state: (String, String) = sqlx::query_as(
        "SELECT last_value::text, profile->>'n' FROM meter_state WHERE meter_id = 'm1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state, ("556677.012500".into(), "2".into()));
    db.drop_database().await;
}

#[tokio::test]
async fn late_actual_read_supersedes_estimate_and_keeps_history() {
    let db = TestDatabase::create().await;
    let mut vee = Vee::new(VeeConfig::default());
    // Hourly reads 0..3 h, then a 4-hour gap: estimates at 4, 5, 6 h.
    let hist: Vec<Reading> = (0..4)
        .map(|h| read("m1", h * 60, dec!(10) + Decimal::from(h) / dec!(10)))
        .collect();
    write(&db, &mut vee, hist).await;
    write(&db, &mut vee, vec![read("m1", 7 * 60, dec!(11))]).await;
    let estimates: i64 =
        sqlx::query_scalar("SELECT count(*) FROM readings WHERE quality = 'estimated'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(estimates, 3);
    let daily: String =
        sqlx::query_scalar("SELECT consumption::text FROM rollup_daily WHERE meter_id = 'm1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(daily, "1.000000");
    // The gateway's spool delivers the missing 5 h read late.
    let mut late = read("m1", 5 * 60, dec!(10.55));
    late.provenance.channel = Some("198.51.100.4:5683".into());
    let stats = write(&db, &mut vee, vec![late]).await;
    assert!(stats.slow_path);
    assert_eq!(stats.superseded, 1);
    let at5: (String, String, Vec<String>, Option<String>) =
        sqlx::query_as("SELECT value::text, quality, flags, channel FROM readings WHERE ts = $1")
            .bind(T0 + time::Duration::hours(5))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        at5,
        (
            "10.550000".into(),
            "actual".into(),
            vec!["out_of_order".into()],
            Some("198.51.100.4:5683".into())
        )
    );
    let history: Vec<(String, String)> =
        sqlx::query_as("SELECT quality, replaced_by FROM reading_history")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(history, vec![("estimated".into(), "actual_read".into())]);
    // The other estimates of that gap are flagged superseded and leave the rollups; the day
    // total is unchanged (the 7 h read still closes the span).
    let superseded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM readings WHERE quality = 'estimated' AND 'superseded' = ANY (flags)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(superseded, 2);
    let daily: String =
        sqlx::query_scalar("SELECT consumption::text FROM rollup_daily WHERE meter_id = 'm1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(daily, "1.000000");
    db.drop_database().await;
}

fn batch(gateway: &str, partition: u16, first_seq: u64, readings: Vec<Reading>) -> ReadingBatch {
    ReadingBatch {
        v: WIRE_VERSION,
        gateway: GatewayId::new(gateway).unwrap(),
        partition,
        sent_at: T0,
        incarnation: None,
        prev: None,
        entries: readings
            .into_iter()
            .enumerate()
            .map(|(i, reading)| BatchEntry {
                seq: first_seq + i as u64,
                reading,
            })
            .collect(),
    }
}

#[tokio::test]
async fn worker_ingests_dedupes_and_refuses_unknown_versions() {
    let db = TestDatabase::create().await;
    let root = testkit::names::unique_prefix("worker");
    let url = pipeline::config::mqtt_url();
    let mut config = pipeline::worker::WorkerConfig::new(&url, &root, 0, 1, 4).unwrap();
    let client_id = format!("wk-{}", rand::random::<u32>());
    config.client_id = client_id.clone();
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
    let mut opts = MqttOptions::new(format!("pub-{}", rand::random::<u32>()), host, port);
    opts.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut el) = AsyncClient::new(opts, 64);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    // Wait until the worker has subscribed: publish a probe until it is counted.
    let meters: Vec<String> = (0..20).map(|i| format!("cjt188:{i:014}")).collect();
    let by_partition = |m: &str| model::partition_of(m, 4);
    let mut seq = 1;
    let mut expected = 0;
    let mut payloads = Vec::new();
    for hour in 0..3 {
        for p in 0..4u16 {
            let rs: Vec<Reading> = meters
                .iter()
                .filter(|m| by_partition(m) == p)
                .map(|m| read(m, hour * 60, dec!(1) + Decimal::from(hour)))
                .collect();
            if rs.is_empty() {
                continue;
            }
            expected += rs.len();
            let n = rs.len() as u64;
            payloads.push((p, serde_json::to_vec(&batch("gw-1", p, seq, rs)).unwrap()));
            seq += n;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
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
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for (p, payload) in &payloads {
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
    // Every message again: a gateway resending after a lost PUBACK.
    for (p, payload) in &payloads {
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let msgs = IngestMetrics::get(&metrics.messages);
        if n as usize == expected && msgs as usize >= 2 * payloads.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} of {expected} readings"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        IngestMetrics::get(&metrics.seq_duplicates) as usize,
        expected,
        "second copies dropped by spool sequence"
    );
    assert!(IngestMetrics::get(&metrics.unknown_version) >= 1);
    let rejects: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ingest_rejects WHERE kind = 'unknown_version'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(rejects >= 1);
    testkit::wait_folded(&[&metrics], Duration::from_secs(10)).await;
    let consumption: String = sqlx::query_scalar("SELECT sum(consumption)::text FROM rollup_daily")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(consumption, "40.000000", "20 meters x 2 m3");
    let progress: i64 = sqlx::query_scalar("SELECT max(max_seq) FROM ingest_progress")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(progress, seq as i64 - 1);
    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
    pipeline::worker::forget_session(&url, &client_id)
        .await
        .unwrap();
    db.drop_database().await;
}

#[tokio::test]
async fn edit_is_audited_versioned_and_rolled_up() {
    let db = TestDatabase::create().await;
    let mut vee = Vee::new(VeeConfig::default());
    let hist: Vec<Reading> = (0..4)
        .map(|h| read("m1", h * 60, dec!(10) + Decimal::from(h)))
        .collect();
    write(&db, &mut vee, hist).await;
    let out = pipeline::edit::edit_reading(
        &db.pool,
        "m1",
        T0 + time::Duration::hours(2),
        Quantity::Volume,
        dec!(11.5),
        "ops:alice",
        "field visit photo",
    )
    .await
    .unwrap();
    assert_eq!(out.old_value, dec!(12));
    let row: (String, String, String) = sqlx::query_as(
        "SELECT value::text, quality, quality_detail->>'by' FROM readings WHERE ts = $1",
    )
    .bind(T0 + time::Duration::hours(2))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        ("11.500000".into(), "edited".into(), "ops:alice".into())
    );
    let audit: (String, String) =
        sqlx::query_as("SELECT actor, detail->>'old_value' FROM audit_log")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audit, ("ops:alice".into(), "12.000000".into()));
    let hourly: Vec<String> = sqlx::query_scalar(
        "SELECT consumption::text FROM rollup_hourly WHERE meter_id = 'm1' ORDER BY bucket",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(hourly, vec!["0.000000", "1.000000", "0.500000", "1.500000"]);
    let missing =
        pipeline::edit::edit_reading(&db.pool, "m1", T0, Quantity::Volume, dec!(1), "", "x").await;
    assert!(matches!(
        missing,
        Err(pipeline::edit::EditError::Unattributed)
    ));
    db.drop_database().await;
}

#[tokio::test]
async fn manual_read_goes_through_vee() {
    let db = TestDatabase::create().await;
    let mut vee = Vee::new(VeeConfig::default());
    write(
        &db,
        &mut vee,
        vec![read("m1", 0, dec!(10)), read("m1", 60, dec!(10.1))],
    )
    .await;
    let now = OffsetDateTime::now_utc();
    let mut manual = read("m1", 0, dec!(5));
    manual.ts = now - time::Duration::minutes(1);
    manual.clock = ClockSource::Manual;
    manual.provenance.source = SourceKind::Api;
    manual.provenance.received_at = now;
    // 5 < 10.1 with no replacement recorded: a register decrease.
    let (stored, estimates) =
        pipeline::edit::ingest_manual(&db.pool, manual.clone(), VeeConfig::default())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        stored.quality,
        Quality::Rejected {
            reason: model::RejectReason::RegisterDecrease
        }
    );
    assert!(estimates.is_empty());
    manual.value = dec!(10.3);
    manual.ts = now;
    let (stored, _) = pipeline::edit::ingest_manual(&db.pool, manual, VeeConfig::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.quality, Quality::Validated);
    let last: String =
        sqlx::query_scalar("SELECT last_value::text FROM meter_state WHERE meter_id = 'm1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(last, "10.300000");
    db.drop_database().await;
}
