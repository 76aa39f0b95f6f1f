//! The read completeness ledger against the real PostgreSQL: slots counted per meter from its
//! read interval and in-service window, qualities apart, end reads, completeness, and arrivals
//! and lag per gateway and source.

use std::str::FromStr;

use pipeline::ledger::{self, MeterLedger};
use rust_decimal::Decimal;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::macros::{date, datetime, offset};
use time::{Duration, OffsetDateTime};

async fn read(pool: &PgPool, meter: &str, ts: OffsetDateTime, quality: &str, gateway: &str) {
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, gateway_id, received_at)
         VALUES ($1, $2, 'volume', $3, 'm3', $4, 'meter', 'coap', $5, $2 + interval '90 s')",
    )
    .bind(meter)
    .bind(ts)
    .bind(Decimal::from_str("10.5").unwrap())
    .bind(quality)
    .bind(gateway)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn book_ledger_counts_slots_and_says_why_a_book_is_incomplete() {
    let db = TestDatabase::create().await;
    let start = datetime!(2026-10-01 00:00 +8);
    sqlx::query(
        "INSERT INTO meters (meter_id, protocol, meter_book, read_interval_s, installed_at) VALUES
         ('cjt188:00000000000001', 'cjt188', 'L-1', 3600, NULL),
         ('cjt188:00000000000002', 'cjt188', 'L-1', 21600, '2026-10-16 00:00+08'),
         ('cjt188:00000000000003', 'cjt188', 'OTHER', 3600, NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // Meter 1: hourly over 31 days = 744 slots. Hours 10..13 missing, 20 and 21 estimated,
    // 30 rejected; hour 40 read twice (a duplicate 20 s later counts once).
    for h in 0..744 {
        let quality = match h {
            10..=12 => continue,
            20 | 21 => "estimated",
            30 => "rejected",
            _ => "validated",
        };
        read(
            &db.pool,
            "cjt188:00000000000001",
            start + Duration::hours(h),
            quality,
            "gw-1",
        )
        .await;
    }
    read(
        &db.pool,
        "cjt188:00000000000001",
        start + Duration::hours(40) + Duration::seconds(20),
        "validated",
        "gw-1",
    )
    .await;
    // Meter 2: installed on the 16th, 6-hourly → 16 days × 4 = 64 slots; reads only until the
    // 20th, so no end read.
    for slot in 0..16 {
        read(
            &db.pool,
            "cjt188:00000000000002",
            datetime!(2026-10-16 00:00 +8) + Duration::hours(6 * slot),
            "validated",
            "gw-2",
        )
        .await;
    }

    let l = ledger::book_ledger(
        &db.pool,
        "L-1",
        date!(2026 - 10 - 01),
        date!(2026 - 11 - 01),
        offset!(+8),
        Decimal::new(5, 2),
    )
    .await
    .unwrap();
    assert_eq!(
        l.meters,
        [
            MeterLedger {
                meter_id: "cjt188:00000000000001".into(),
                read_interval_s: 3600,
                expected: 744,
                received: 739,
                validated: 738,
                estimated: 2,
                rejected: 1,
                missing: 3,
                has_end_read: true,
            },
            MeterLedger {
                meter_id: "cjt188:00000000000002".into(),
                read_interval_s: 21600,
                expected: 64,
                received: 16,
                validated: 16,
                estimated: 0,
                rejected: 0,
                missing: 48,
                has_end_read: false,
            },
        ]
    );
    assert_eq!((l.expected, l.missing), (808, 51));
    assert_eq!(l.missing_share, Decimal::from_str("0.0631").unwrap());
    assert!(!l.complete);
    assert_eq!(
        l.incomplete_because,
        [
            "1 meter(s) without a billable end read: cjt188:00000000000002",
            "missing share 0.0631 above the limit 0.05 (51 of 808 reads)",
        ]
    );

    // The second meter's last reads arrive: the end read is there, the share now passes.
    for slot in 16..64 {
        read(
            &db.pool,
            "cjt188:00000000000002",
            datetime!(2026-10-16 00:00 +8) + Duration::hours(6 * slot),
            "validated",
            "gw-2",
        )
        .await;
    }
    let l = ledger::book_ledger(
        &db.pool,
        "L-1",
        date!(2026 - 10 - 01),
        date!(2026 - 11 - 01),
        offset!(+8),
        Decimal::new(5, 2),
    )
    .await
    .unwrap();
    assert!(l.complete, "{:?}", l.incomplete_because);
    assert_eq!(l.missing, 3);

    let err = ledger::book_ledger(
        &db.pool,
        "NOPE",
        date!(2026 - 10 - 01),
        date!(2026 - 11 - 01),
        offset!(+8),
        Decimal::ZERO,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "meter book \"NOPE\" has no meter in service during the cycle"
    );
    db.drop_database().await;
}

#[tokio::test]
async fn source_ledger_counts_arrivals_and_lag_per_gateway() {
    let db = TestDatabase::create().await;
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    // gw-a: 10 reads, each arriving 90 s after its time; gw-b: 2 reads, one from long ago.
    for i in 0..10 {
        read(
            &db.pool,
            "cjt188:00000000000011",
            now - Duration::minutes(30 + i),
            "validated",
            "gw-a",
        )
        .await;
    }
    read(
        &db.pool,
        "cjt188:00000000000012",
        now - Duration::minutes(5),
        "validated",
        "gw-b",
    )
    .await;
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, gateway_id, received_at)
         VALUES ('cjt188:00000000000013', $1, 'volume', 1, 'm3', 'validated', 'meter', 'mqtt', 'gw-b', $2)",
    )
    .bind(now - Duration::hours(10))
    .bind(now - Duration::minutes(1))
    .execute(&db.pool)
    .await
    .unwrap();
    let rows = ledger::source_ledger(&db.pool, now - Duration::hours(2), now + Duration::hours(1))
        .await
        .unwrap();
    let summary: Vec<(String, String, i64, i64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.gateway_id.clone(),
                r.source.clone(),
                r.meters,
                r.reads,
                r.lag_max_s,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("gw-a".into(), "coap".into(), 1, 10, 90.0),
            ("gw-b".into(), "coap".into(), 1, 1, 90.0),
            ("gw-b".into(), "mqtt".into(), 1, 1, 35_940.0),
        ]
    );
    assert_eq!(rows[0].lag_p50_s, 90.0);
    db.drop_database().await;
}
