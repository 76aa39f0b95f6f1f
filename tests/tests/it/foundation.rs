//! Proves the foundation uses the real services: a reading crosses Mosquitto and lands in
//! PostgreSQL through the migrated schema.

use std::time::Duration;

use model::{
    BatchEntry, ClockSource, Decimal, GatewayId, MeterId, Provenance, Quality, Quantity, Reading,
    ReadingBatch, SourceKind, Unit, WIRE_VERSION,
};
use rumqttc::{Event, Packet, QoS};
use testkit::TestDatabase;
use time::macros::time;
use time::{Duration as TimeDelta, OffsetDateTime};

/// A time in the current month (the 15th, 12:00 UTC): always inside the monthly partitions the
/// migration prepares around now (24 months back, 12 ahead), and far enough from the month's
/// edges that the server's time zone cannot move it into a neighbouring partition.
fn this_month_mid() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_day(15).unwrap().replace_time(time!(12:00))
}

fn reading(value: &str, ts: OffsetDateTime) -> Reading {
    Reading {
        meter: MeterId::new("cjt188:78330011223344").unwrap(),
        ts,
        clock: ClockSource::Meter,
        quantity: Quantity::Volume,
        value: value.parse().unwrap(),
        unit: Unit::CubicMetre,
        storage: 0,
        tariff: 0,
        subunit: 0,
        quality: Quality::Actual,
        flags: vec![],
        provenance: Provenance {
            gateway: GatewayId::new("gw-test").unwrap(),
            source: SourceKind::Coap,
            source_id: "nbiot".into(),
            frame_hash: "ab".repeat(32),
            received_at: ts + TimeDelta::seconds(3),
            channel: None,
        },
    }
}

#[tokio::test]
async fn migrations_are_idempotent_and_create_partitions() {
    let db = TestDatabase::create().await;
    // Running the migrator again is a no-op, and the raw SQL of the current readings layout
    // (0080: narrow rows behind the `readings` view) tolerates a second run. 0001 and 0021
    // no longer do: they address `readings` as a table, which 0080 turned into the view.
    pipeline::MIGRATOR.run(&db.pool).await.unwrap();
    sqlx::raw_sql(include_str!(
        "../../../pipeline/migrations/0080_narrow_readings.sql"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // The view keeps every column of the wide table, channel (0021) included.
    let channel: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns
         WHERE table_name = 'readings' AND column_name = 'channel'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(channel, 1);
    let partitions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'reading_rows'::regclass",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // 37 monthly partitions plus the default one.
    assert_eq!(partitions, 38);
    let created: i32 = sqlx::query_scalar("SELECT wm_ensure_reading_partitions(now()::date, 15)")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        created, 2,
        "months 13 and 14 ahead are new (0..=12 were prepared)"
    );
    db.drop_database().await;
}

#[tokio::test]
async fn reading_round_trips_through_mosquitto_into_postgres() {
    let db = TestDatabase::create().await;
    let ts = this_month_mid();
    let prefix = wm_tests::unique_prefix("foundation");
    let topic = format!("{prefix}/wm/v1/readings/3");

    let (sub, mut sub_loop) = wm_tests::mqtt_client("sub");
    sub.subscribe(format!("{prefix}/wm/v1/readings/+"), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Wait for the broker's SubAck before publishing: no sleeps.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!(
                    "cannot reach Mosquitto ({e}); start it with \
                     `mosquitto -d -c /etc/mosquitto/mosquitto.conf` or run `bash .ci/run`"
                ),
            }
        }
    })
    .await
    .expect("no SubAck from the broker within 10 s");

    let batch = ReadingBatch {
        v: WIRE_VERSION,
        gateway: GatewayId::new("gw-test").unwrap(),
        partition: 3,
        sent_at: ts + TimeDelta::seconds(5),
        incarnation: None,
        prev: None,
        entries: vec![
            BatchEntry {
                seq: 1,
                reading: reading("556677.01", ts),
            },
            // A redelivered duplicate must not create a second row.
            BatchEntry {
                seq: 1,
                reading: reading("556677.01", ts),
            },
        ],
    };
    let (publisher, mut pub_loop) = wm_tests::mqtt_client("pub");
    publisher
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&batch).unwrap(),
        )
        .await
        .unwrap();
    let pub_task = tokio::spawn(async move {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = pub_loop.poll().await {
                break;
            }
        }
    });

    let payload = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = sub_loop.poll().await.unwrap() {
                break p.payload;
            }
        }
    })
    .await
    .expect("batch not delivered within 10 s");
    pub_task.await.unwrap();

    let received: ReadingBatch = serde_json::from_slice(&payload).unwrap();
    assert_eq!(received, batch);
    let readings: Vec<Reading> = received.entries.into_iter().map(|e| e.reading).collect();
    let inserted = pipeline::db::readings::insert_readings(&db.pool, &readings)
        .await
        .unwrap();
    assert_eq!(inserted, 1);

    let (meter, value, unit, quality, gateway): (String, Decimal, String, String, String) =
        sqlx::query_as(
            "SELECT meter_id, value, unit, quality, gateway_id FROM readings WHERE quantity = 'volume'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(meter, "cjt188:78330011223344");
    assert_eq!(value, "556677.01".parse::<Decimal>().unwrap());
    assert_eq!(unit, "m3");
    assert_eq!(quality, "actual");
    assert_eq!(gateway, "gw-test");
    // `readings` is a view over the narrow `reading_rows` (docs/storage.md): the partition is
    // the narrow table's.
    let partition: String = sqlx::query_scalar("SELECT tableoid::regclass::text FROM reading_rows")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let expected = format!("readings_{:04}{:02}", ts.year(), u8::from(ts.month()));
    assert_eq!(
        partition, expected,
        "the read of {ts} lands in its monthly partition"
    );
    db.drop_database().await;
}
