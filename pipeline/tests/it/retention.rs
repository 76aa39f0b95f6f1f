//! The reading-retention job (`wm_reading_retention`, migrations 0081 and 0110) run from Rust
//! on real partitions: months older than the policy are archived to `wm_archive` with their
//! frames and quality details, archived months past `drop_months` are dropped, partitions are
//! created ahead, a frame still used online stays, and a dry run returns the real run's plan
//! and changes nothing (docs/operations.md, "Retention").

use pipeline::scheduler::{RetentionPolicy, RetentionStep, compact_closed_months, run_retention};
use sqlx::PgPool;
use testkit::TestDatabase;
use time::{Duration, OffsetDateTime};

/// (year, month) of the month `back` months before the month of `at` (negative: ahead).
fn month(at: OffsetDateTime, back: i32) -> (i32, u8) {
    let idx = at.year() * 12 + i32::from(u8::from(at.month())) - 1 - back;
    let m = u8::try_from(idx.rem_euclid(12) + 1).expect("a month number");
    (idx.div_euclid(12), m)
}

/// `YYYY-MM` as the job reports a month.
fn label(at: OffsetDateTime, back: i32) -> String {
    let (y, m) = month(at, back);
    format!("{y:04}-{m:02}")
}

/// `YYYYMM` as partitions and archive tables are named.
fn suffix(at: OffsetDateTime, back: i32) -> String {
    let (y, m) = month(at, back);
    format!("{y:04}{m:02}")
}

/// The 11th of the month `back` months ago, 08:00 UTC, as SQL text.
fn day_in(at: OffsetDateTime, back: i32) -> String {
    let (y, m) = month(at, back);
    format!("{y:04}-{m:02}-11 08:00+00")
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn archive_tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'wm_archive' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn exists(pool: &PgPool, relation: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(relation)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A reading through the `readings` view (its own frame), at the 11th of `back` months ago.
async fn read_at(pool: &PgPool, at: OffsetDateTime, back: i32, hour: i32, estimated: bool) {
    let (quality, detail) = if estimated {
        (
            "estimated",
            "'{\"status\": \"estimated\", \"method\": \"linear\"}'::jsonb",
        )
    } else {
        ("actual", "NULL")
    };
    sqlx::raw_sql(&format!(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, quality_detail,
             clock, source, source_id, gateway_id, spool_seq, frame_hash, received_at)
         VALUES ('cjt188:00000000000042', timestamptz '{ts}' + interval '{hour} hours', 'volume',
             {value}, 'm3', '{quality}', {detail}, 'meter', 'coap', 'nb', 'gw-1', {seq},
             '{hash:064x}', timestamptz '{ts}' + interval '{hour} hours 5 seconds')",
        ts = day_in(at, back),
        value = 1000 + 10 * (40 - back) + hour,
        seq = 100 * (40 - back) + hour,
        hash = 1000 * (40 - back) + hour,
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn retention_archives_drops_and_creates_ahead_and_its_dry_run_changes_nothing() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let at = OffsetDateTime::now_utc();
    // 20 months ago (archived, then dropped in the same run), 14 months ago (archived and
    // kept: an actual read and an estimate with its detail), last month (online).
    read_at(pool, at, 20, 0, false).await;
    read_at(pool, at, 14, 0, false).await;
    read_at(pool, at, 14, 1, true).await;
    read_at(pool, at, 1, 0, false).await;
    // A row online that shares the frame of the 14-months-old actual read (a historic value
    // decoded from an old frame, dated last month): that frame must stay in `frames`.
    sqlx::raw_sql(&format!(
        "INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage, quality,
             flags, value)
         SELECT timestamptz '{ts}' + interval '3 hours', frame_id, meter_key, series_id, unit_id,
                storage, quality, flags, value
         FROM reading_rows WHERE ts = timestamptz '{old}'",
        ts = day_in(at, 1),
        old = day_in(at, 14),
    ))
    .execute(pool)
    .await
    .unwrap();
    // The partition two months ahead is missing (the job creates it).
    let ahead = format!("readings_{}", suffix(at, -2));
    sqlx::raw_sql(&format!("DROP TABLE {ahead}"))
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(count(pool, "SELECT count(*) FROM readings").await, 5);
    assert_eq!(count(pool, "SELECT count(*) FROM frames").await, 4);
    assert_eq!(count(pool, "SELECT count(*) FROM reading_details").await, 1);

    // Keep 12 months online, archives for 18, 3 months ahead. Partitions were prepared from
    // 24 months back, so months 24..=13 back are archived (oldest first) and 24..=19 dropped.
    let policy = RetentionPolicy {
        keep_months: 12,
        drop_months: 18,
        months_ahead: 3,
        dry_run: true,
        pack_after_days: None,
    };
    let rows_of = |back: i32| match back {
        20 => 1,
        14 => 2,
        _ => 0,
    };
    let mut expected: Vec<RetentionStep> = vec![(label(at, -2), "create".into(), 0)];
    expected.extend(
        (13..=24)
            .rev()
            .map(|b| (label(at, b), "archive".into(), rows_of(b))),
    );
    expected.extend(
        (19..=24)
            .rev()
            .map(|b| (label(at, b), "drop".into(), rows_of(b))),
    );

    let planned = run_retention(pool, policy, at).await.unwrap();
    assert_eq!(planned, expected, "the dry run's plan");
    assert_eq!(count(pool, "SELECT count(*) FROM readings").await, 5);
    assert_eq!(count(pool, "SELECT count(*) FROM frames").await, 4);
    assert!(
        archive_tables(pool).await.is_empty(),
        "a dry run archives nothing"
    );
    assert!(!exists(pool, &ahead).await, "a dry run creates nothing");
    assert!(exists(pool, &format!("readings_{}", suffix(at, 24))).await);

    let done = run_retention(
        pool,
        RetentionPolicy {
            dry_run: false,
            ..policy
        },
        at,
    )
    .await
    .unwrap();
    assert_eq!(done, expected, "the real run does what the dry run planned");

    // Online: last month's read and the row sharing the old frame, with its provenance.
    let online: Vec<(String, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM'), spool_seq, gateway_id
         FROM readings ORDER BY ts",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        online,
        vec![
            (label(at, 1), Some(3900), Some("gw-1".into())),
            (label(at, 1), Some(2600), Some("gw-1".into())),
        ]
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM reading_details").await,
        0,
        "the estimate's detail went with its month"
    );
    // frames: last month's own frame and the shared old one; the others were archived.
    let mut seqs: Vec<i64> = sqlx::query_scalar("SELECT spool_seq FROM frames")
        .fetch_all(pool)
        .await
        .unwrap();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![2600, 3900]);
    let s14 = suffix(at, 14);
    let mut kept: Vec<String> = (13..=18)
        .flat_map(|b| ["details", "frames", "readings"].map(|t| format!("{t}_{}", suffix(at, b))))
        .collect();
    kept.sort();
    assert_eq!(
        archive_tables(pool).await,
        kept,
        "archived months 13..=18 back are kept, 19..=24 dropped"
    );
    let archived = |t: &str| format!("SELECT count(*) FROM wm_archive.{t}_{s14}");
    assert_eq!(count(pool, &archived("readings")).await, 2);
    assert_eq!(count(pool, &archived("frames")).await, 2);
    assert_eq!(count(pool, &archived("details")).await, 1);
    assert_eq!(
        count(
            pool,
            &format!(
                "SELECT count(*) FROM wm_archive.readings_{s14} WHERE value = {}",
                1000 + 10 * 26 + 1
            )
        )
        .await,
        1,
        "the archived estimate keeps its value"
    );
    assert!(exists(pool, &ahead).await, "created ahead");
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'reading_rows'::regclass
               AND c.relname ~ '^readings_[0-9]{6}$'
               AND to_date(substring(c.relname from 10), 'YYYYMM')
                   < date_trunc('month', now()) - interval '12 months'",
        )
        .await,
        0,
        "no partition older than 12 months stays attached"
    );
    // A reading arriving for an archived month lands in the default partition, not lost.
    read_at(pool, at, 15, 2, false).await;
    assert_eq!(
        count(pool, "SELECT count(*) FROM readings_default").await,
        1
    );
    sqlx::raw_sql("DELETE FROM reading_rows WHERE tableoid = 'readings_default'::regclass")
        .execute(pool)
        .await
        .unwrap();

    // Run again at once: nothing left to do.
    assert_eq!(
        run_retention(
            pool,
            RetentionPolicy {
                dry_run: false,
                ..policy
            },
            at
        )
        .await
        .unwrap(),
        Vec::<RetentionStep>::new()
    );

    // Seven months later: months 12..=6 back (of today) are archived, and the archives that
    // are then older than 18 months (19..=12 back of today) dropped, the 14-months one too.
    let later = at + Duration::days(7 * 31);
    let months_later = (later.year() * 12 + i32::from(u8::from(later.month())))
        - (at.year() * 12 + i32::from(u8::from(at.month())));
    let steps = run_retention(
        pool,
        RetentionPolicy {
            dry_run: false,
            ..policy
        },
        later,
    )
    .await
    .unwrap();
    assert!(
        steps.contains(&(label(at, 14), "drop".into(), 2)),
        "{months_later} months later the 14-months-old archive is dropped: {steps:?}"
    );
    assert!(!exists(pool, &format!("wm_archive.readings_{s14}")).await);
    assert_eq!(
        count(pool, "SELECT count(*) FROM readings").await,
        2,
        "last month is still within 12 months"
    );
    db.drop_database().await;
}

#[tokio::test]
async fn retention_refuses_a_policy_that_drops_before_it_archives() {
    let db = TestDatabase::create().await;
    let err = run_retention(
        &db.pool,
        RetentionPolicy {
            keep_months: 12,
            drop_months: 6,
            months_ahead: 3,
            dry_run: true,
            pack_after_days: None,
        },
        OffsetDateTime::now_utc(),
    )
    .await
    .expect_err("drop_months < keep_months is refused");
    assert!(
        err.to_string()
            .contains("keep_months (12) <= drop_months (6)"),
        "{err}"
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'wm_archive'"
        )
        .fetch_one(&db.pool)
        .await
        .unwrap(),
        0
    );
    db.drop_database().await;
}

#[tokio::test]
async fn closed_months_get_their_key_compacted_once_and_keep_deduplicating() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let at = OffsetDateTime::now_utc();
    // Two months back (closed: the month after it has ended too) and last month (not yet):
    // 2 000 meters × 30 rounds, round-major with each round one key-ordered insert, as ingest
    // writes them, so the key's leaves split half-full.
    sqlx::raw_sql(&format!(
        "INSERT INTO meter_keys (meter_id)
             SELECT format('cjt188:%s', lpad(i::text, 14, '0')) FROM generate_series(1, 2000) i;
         INSERT INTO reading_series (quantity, tariff, subunit) VALUES ('volume', 0, 0);
         INSERT INTO reading_units (unit) VALUES ('m3');
         DO $$
         BEGIN
             FOR r IN 0..29 LOOP
                 INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage,
                                           quality, flags, value)
                 SELECT b.t + r * interval '15 minutes', 1, k.meter_key, 1, 1, 0, 0, 0,
                        1000 + r * 0.001
                 FROM meter_keys k, (VALUES (timestamptz '{closed}'), (timestamptz '{open}')) b(t)
                 ORDER BY k.meter_key, b.t;
             END LOOP;
         END $$;",
        closed = day_in(at, 2),
        open = day_in(at, 1),
    ))
    .execute(pool)
    .await
    .unwrap();
    let closed = format!("readings_{}", suffix(at, 2));
    let key_of = |part: &str| {
        format!(
            "SELECT x.indexrelid::regclass::text FROM pg_index x
             WHERE x.indrelid = '{part}'::regclass AND x.indisprimary"
        )
    };
    let index: String = sqlx::query_scalar(&key_of(&closed))
        .fetch_one(pool)
        .await
        .unwrap();
    let size = |index: String| async move {
        count(
            pool,
            &format!("SELECT pg_relation_size('{index}'::regclass)"),
        )
        .await
    };
    let before = size(index.clone()).await;
    assert!(
        before as f64 / 60_000.0 > 33.0,
        "the fresh key is loose: {before} bytes for 60 000 entries"
    );

    let planned = compact_closed_months(pool, at, true).await.unwrap();
    assert_eq!(planned, vec![(label(at, 2), before, before)]);
    assert_eq!(
        size(index.clone()).await,
        before,
        "a dry run rebuilds nothing"
    );

    let done = compact_closed_months(pool, at, false).await.unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    let (month, b, after) = done[0].clone();
    assert_eq!((month, b), (label(at, 2), before));
    assert_eq!(size(index.clone()).await, after);
    assert!(
        (after as f64 / 60_000.0) < 30.0,
        "compacted to under 30 bytes per entry: {after} bytes (was {before})"
    );
    // Still the dedup key: a second reading of the same meter, series and time is refused.
    let dup = sqlx::raw_sql(&format!(
        "INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage, quality,
                                   flags, value)
         VALUES (timestamptz '{}', 1, 7, 1, 1, 0, 0, 0, 1)",
        day_in(at, 2)
    ))
    .execute(pool)
    .await
    .expect_err("the compacted key still refuses duplicates");
    assert!(
        dup.as_database_error().and_then(|e| e.code()).as_deref() == Some("23505"),
        "{dup}"
    );
    assert_eq!(
        count(
            pool,
            &format!(
                "SELECT count(*) FROM readings WHERE meter_id = 'cjt188:00000000000007'
                 AND ts >= timestamptz '{}' AND ts < timestamptz '{}' + interval '1 month'",
                day_in(at, 2),
                day_in(at, 2)
            )
        )
        .await,
        30
    );
    // Once only; last month waits until the month after it has ended.
    assert_eq!(
        compact_closed_months(pool, at, false).await.unwrap(),
        vec![]
    );
    let later = at + Duration::days(31);
    let next = compact_closed_months(pool, later, true).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.0.clone()).collect::<Vec<_>>(),
        vec![label(at, 1)]
    );
    db.drop_database().await;
}
