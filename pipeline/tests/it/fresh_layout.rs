//! The fresh (row-form) layout of issue 18 at its floor (docs/storage.md "Fresh rows: the
//! floor of this layout"): a stored reading is one `reading_rows` tuple with no null bitmap
//! that fits 64 bytes on the page, its frame one 80-byte tuple, and the unique key of `frames`
//! is what lets the planner drop the provenance join from every value query on `readings`
//! (a BRIN index in its place would be 20 bytes per frame smaller and make billing and VEE
//! queries scan `frames`).

use model::Reading;
use rust_decimal::Decimal;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::{Duration, OffsetDateTime};

/// `meters` meters × `rounds` quarter-hourly volume reads ending an hour ago, round-major as
/// gateways report, every reading its own frame with its own hash.
fn fleet(meters: u32, rounds: u32) -> Vec<Vec<Reading>> {
    let start = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("whole seconds")
        - Duration::hours(1)
        - Duration::minutes(15 * i64::from(rounds));
    (0..rounds)
        .map(|round| {
            (0..meters)
                .map(|m| {
                    let ts = start + Duration::minutes(15 * i64::from(round));
                    let value = Decimal::new(1_000_000 + i64::from(m) * 1000 + i64::from(round), 3);
                    let mut r =
                        testkit::volume_read(&format!("cjt188:{:014}", 10_000_000 + m), ts, value);
                    r.provenance.frame_hash =
                        format!("{:064x}", u64::from(m) * 1_000_003 + u64::from(round));
                    r
                })
                .collect()
        })
        .collect()
}

/// Writes each round as one ingest batch (the COPY path).
async fn store(pool: &PgPool, rounds: &[Vec<Reading>]) {
    for readings in rounds {
        crate::packing::write_raw(pool, readings).await;
    }
}

async fn plan(pool: &PgPool, sql: &str) -> String {
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (COSTS OFF) {sql}"))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
    lines.join("\n")
}

/// Billing's and VEE's shape: one meter's register over a time range, no provenance.
const VALUE_QUERY: &str = "SELECT ts, value, quality, flags FROM readings
     WHERE meter_id = 'cjt188:00000010000007' AND quantity = 'volume' AND tariff = 0
       AND subunit = 0 AND ts >= now() - interval '1 day' ORDER BY ts";

#[tokio::test]
async fn value_queries_skip_frames_only_while_frames_keeps_its_unique_key() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    store(pool, &fleet(1000, 4)).await;
    sqlx::raw_sql("ANALYZE").execute(pool).await.unwrap();
    let with_key = plan(pool, VALUE_QUERY).await;
    assert!(
        !with_key.contains(" on frames "),
        "a value query reads frames:\n{with_key}"
    );
    assert!(
        with_key
            .lines()
            .any(|l| l.contains("Index") && l.contains("readings_") && l.contains("pkey")),
        "the meter's range is read by the primary key of reading_rows:\n{with_key}"
    );
    // The same rows with a BRIN index in place of the key: the LEFT JOIN is no longer provably
    // at most one row, so the planner keeps it and scans frames for every value query.
    sqlx::raw_sql(
        "ALTER TABLE frames DROP CONSTRAINT frames_pkey;
         CREATE INDEX frames_id_brin ON frames USING brin (frame_id) WITH (pages_per_range = 1);
         ANALYZE frames",
    )
    .execute(pool)
    .await
    .unwrap();
    let with_brin = plan(pool, VALUE_QUERY).await;
    assert!(
        with_brin.contains(" on frames "),
        "without its unique key frames is still dropped from the plan:\n{with_brin}"
    );
}

#[tokio::test]
async fn a_stored_reading_and_its_frame_are_one_tuple_each_at_the_alignment_floor() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    store(pool, &fleet(50, 3)).await;
    // Whole-row sizes are the stored tuples: a 24-byte header (no null bitmap: every column
    // is NOT NULL), 30 bytes of fixed columns and a short numeric, so at most 61 bytes, which
    // MAXALIGN rounds to 64 on the page.
    let rows: (i64, i32, i32) = sqlx::query_as(
        "SELECT count(*), min(pg_column_size(r.*)), max(pg_column_size(r.*)) FROM reading_rows r",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(rows.0, 150);
    assert!(
        rows.1 >= 24 + 30 && rows.2 <= 61,
        "reading_rows tuples of {rows:?} bytes"
    );
    // A frame: header 24, frame id, receive time, source key 8 + 8 + 4, the hash as a short
    // bytea 1 + 32 = 77, so 80 on the page. Its spool sequence is NULL on this path, which
    // costs nothing: the null bitmap of six columns fits the header's padding byte.
    let frames: Vec<(i32, i64)> =
        sqlx::query_as("SELECT pg_column_size(f.*), count(*) FROM frames f GROUP BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(frames, vec![(77, 150)], "one 77-byte frame per reading");
}
