//! Migration 0080: wide `readings` rows move to the narrow tables unchanged, and the view gives
//! every column back exactly as the wide table held it.

use testkit::TestDatabase;

/// Every column of the wide table (its row as text: exact values, NULLs visible), in key order.
const ALL_COLUMNS: &str = "SELECT ROW(meter_id, ts, quantity, tariff, subunit, storage, value, unit, \
     quality, quality_detail, flags, clock, source, source_id, gateway_id, spool_seq, \
     frame_hash, received_at, channel)::text \
     FROM readings ORDER BY meter_id, ts, quantity, tariff, subunit";

#[tokio::test]
async fn wide_readings_move_to_the_narrow_tables_unchanged() {
    let db = TestDatabase::create_migrated_to(79).await;
    let kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = 'readings'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        kind, "p",
        "before 0080 readings is the partitioned wide table"
    );
    // Two readings of one frame (volume and status word), an estimate with its detail and
    // flags, a multi-tariff register, a frame hash that is not 64 hex digits, provenance with
    // NULLs, a spool sequence, and a row in a month far outside the prepared partitions.
    sqlx::raw_sql(&format!(
        "INSERT INTO readings (meter_id, ts, quantity, tariff, subunit, storage, value, unit,
             quality, quality_detail, flags, clock, source, source_id, gateway_id, spool_seq,
             frame_hash, received_at, channel) VALUES
         ('cjt188:00000000000001', '2026-11-01 00:00+00', 'volume', 0, 0, 0, 1234.5, 'm3',
          'validated', NULL, '{{}}', 'meter', 'coap', 'nb', 'gw-1', 17, '{h}',
          '2026-11-01 00:00:03.25+00', '198.51.100.4:5683'),
         ('cjt188:00000000000001', '2026-11-01 00:00+00', 'status_word', 0, 0, 0, 3, 'none',
          'actual', NULL, '{{}}', 'meter', 'coap', 'nb', 'gw-1', 17, '{h}',
          '2026-11-01 00:00:03.25+00', '198.51.100.4:5683'),
         ('cjt188:00000000000001', '2026-11-01 01:00+00', 'volume', 0, 0, 0, 1235.000001, 'm3',
          'estimated', '{{\"status\": \"estimated\", \"method\": \"linear\"}}',
          '{{rollover,superseded}}', 'pipeline', 'pipeline', '', NULL, NULL, NULL,
          '2026-11-01 02:00+00', NULL),
         ('mbus:12345678', '2026-10-31 23:00+00', 'volume', 1, 2, 5, -0.000001, 'L',
          'edited', '{{\"status\": \"edited\", \"by\": \"ops\", \"reason\": \"fix\"}}',
          '{{clock_skew}}', 'gateway', 'mbus_serial', 'ttyS0', 'gw-2', NULL, 'not-a-hash',
          '2026-10-31 23:00:01+00', '/dev/ttyS0 primary 5'),
         ('mbus:12345678', '2019-01-15 12:00+00', 'volume', 0, 0, 0, 99999999999999.999999, 'm3',
          'rejected', '{{\"status\": \"rejected\", \"reason\": \"register_decrease\"}}', '{{}}',
          'manual', 'api', 'u1', NULL, NULL, '', '2019-01-15 12:00+00', NULL)",
        h = "0f".repeat(32)
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let before: Vec<String> = sqlx::query_scalar(ALL_COLUMNS)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(before.len(), 5);
    assert!(
        before.iter().any(|r| r.contains(",99999999999999.999999,")),
        "exact value: {before:?}"
    );

    db.migrate_rest().await;

    let kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = 'readings'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(kind, "v", "after 0080 readings is the view");
    let after: Vec<String> = sqlx::query_scalar(ALL_COLUMNS)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(after, before);
    // Stored once: two frames share their provenance source, the two readings of one frame
    // share their frame, the 64-hex hash is bytes and the other one text.
    let (rows, frames, sources, meters, details): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM reading_rows), (SELECT count(*) FROM frames),
                (SELECT count(*) FROM frame_sources), (SELECT count(*) FROM meter_keys),
                (SELECT count(*) FROM reading_details)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((rows, frames, sources, meters, details), (5, 4, 4, 2, 3));
    let hashes: Vec<(Option<i32>, Option<String>)> = sqlx::query_as(
        "SELECT length(frame_hash), frame_label FROM frames
         ORDER BY frame_label NULLS FIRST, 1 NULLS FIRST",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        hashes,
        vec![
            (None, None),
            (Some(32), None),
            (None, Some(String::new())),
            (None, Some("not-a-hash".into())),
        ]
    );
    // The 2019 row got a partition of its own rather than the default one.
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM readings_default")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_default, 0);
    let wide_left: Option<String> = sqlx::query_scalar("SELECT to_regclass('readings_wide')::text")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(wide_left, None);
    db.drop_database().await;
}

/// Rare writers keep writing through the view: insert, update (value, quality, flags, detail)
/// and delete land in the narrow tables, and a duplicate key is still refused.
#[tokio::test]
async fn the_view_takes_inserts_updates_and_deletes() {
    let db = TestDatabase::create().await;
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source,
             gateway_id, frame_hash, received_at)
         VALUES ('m-1', '2026-11-02 00:00+00', 'volume', 10.5, 'm3', 'validated', 'meter',
                 'mqtt', 'gw-1', 'ab', '2026-11-02 00:00:05+00')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dup = sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source,
             received_at)
         VALUES ('m-1', '2026-11-02 00:00+00', 'volume', 11, 'm3', 'validated', 'meter',
                 'mqtt', '2026-11-02 00:00:05+00')",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(
        dup.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("23505")
    );
    let updated = sqlx::query(
        "UPDATE readings SET value = 12, quality = 'edited',
             quality_detail = '{\"by\": \"ops\"}', flags = array_append(flags, 'spike')
         WHERE meter_id = 'm-1'",
    )
    .execute(&db.pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(updated, 1);
    let row: (
        String,
        String,
        Option<String>,
        Vec<String>,
        Option<String>,
        String,
    ) = sqlx::query_as(
        "SELECT value::text, quality, quality_detail->>'by', flags, gateway_id, frame_hash
             FROM readings WHERE meter_id = 'm-1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "12.000000".into(),
            "edited".into(),
            Some("ops".into()),
            vec!["spike".into()],
            Some("gw-1".into()),
            "ab".into()
        )
    );
    let deleted = sqlx::query("DELETE FROM readings WHERE meter_id = 'm-1'")
        .execute(&db.pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 1);
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM reading_rows), (SELECT count(*) FROM reading_details)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0));
    db.drop_database().await;
}
