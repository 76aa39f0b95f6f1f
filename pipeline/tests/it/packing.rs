//! Packed closed months (migration 0120, `scheduler::pack_closed_months`, docs/storage.md
//! "Packed months"): what the `readings` view, billing's reads, rollup recompute and VEE's
//! state give is the same before and after packing; duplicates into a packed month are still
//! refused, late new reads and edits still land (their meter's month is unpacked and packed
//! again by the next run); packing again changes nothing; a dry run changes nothing; a
//! realistic month packs to under 100 bytes per reading.

use model::{Quantity, Reading};
use pipeline::db::{self, StoreOptions, WriteSet};
use pipeline::scheduler::pack_closed_months;
use pipeline::vee::{Vee, VeeConfig};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::{Date, Duration, Month, OffsetDateTime, Time};

/// 00:00 UTC on the first of the month `back` months before now.
fn month_start(back: i32) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let idx = now.year() * 12 + i32::from(u8::from(now.month())) - 1 - back;
    let month =
        Month::try_from(u8::try_from(idx.rem_euclid(12) + 1).expect("a month")).expect("a month");
    Date::from_calendar_date(idx.div_euclid(12), month, 1)
        .expect("a date")
        .with_time(Time::MIDNIGHT)
        .assume_utc()
}

/// `t` as SQL timestamp text.
fn sql_ts(t: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A volume read with its own frame hash.
fn read(meter: &str, ts: OffsetDateTime, value: Decimal, n: u64) -> Reading {
    let mut r = testkit::volume_read(meter, ts, value);
    r.provenance.frame_hash = format!("{:064x}", 0x5eed_0000_u64 + n);
    r
}

/// Every column of every reading, as text, in key order.
async fn view(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(r)::text FROM readings r ORDER BY meter_id, quantity, ts",
    )
    .fetch_all(pool)
    .await
    .expect("reading the view")
}

/// Billing's two reading queries (`billing::boundary_read`, `billing::estimated_share`) for
/// `meter`, called as the bill run calls them.
async fn billing_reads(
    pool: &PgPool,
    meter: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> String {
    let mut conn = pool.acquire().await.expect("a connection");
    let boundary = pipeline::billing::boundary_read(&mut conn, meter, to, from)
        .await
        .expect("a boundary read");
    let share = pipeline::billing::estimated_share(&mut conn, meter, from, to)
        .await
        .expect("the estimated share");
    format!("{boundary:?} {share:?}")
}

/// Rollups of `meter` rebuilt from its readings over `[from, to]`, then read back.
async fn recomputed_rollups(
    pool: &PgPool,
    meter: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Vec<String> {
    let mut tx = pool.begin().await.expect("a transaction");
    pipeline::db::journal::lock_out_ingest(&mut tx)
        .await
        .expect("the journal lock");
    db::rollups::recompute_rollups(&mut tx, meter, from, to, StoreOptions::default())
        .await
        .expect("recomputing rollups");
    tx.commit().await.expect("committing");
    sqlx::query_scalar(
        "SELECT format('%s %s %s %s %s %s %s', 'h', meter_id, bucket, consumption, first_value,
                       last_value, read_count)
         FROM rollup_hourly WHERE meter_id = $1
         UNION ALL
         SELECT format('%s %s %s %s %s %s %s', 'd', meter_id, bucket, consumption, first_value,
                       last_value, read_count)
         FROM rollup_daily WHERE meter_id = $1
         ORDER BY 1",
    )
    .bind(meter)
    .fetch_all(pool)
    .await
    .expect("reading rollups")
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Writes `readings` as one ingest batch without VEE (what a redelivered or late batch does
/// after VEE let it through).
pub(crate) async fn write_raw(pool: &PgPool, readings: &[Reading]) -> db::WriteStats {
    let mut conn = pool.acquire().await.expect("a connection");
    db::write_batch(
        &mut conn,
        &WriteSet {
            readings,
            ..WriteSet::default()
        },
        StoreOptions::default(),
    )
    .await
    .expect("writing the batch")
}

#[tokio::test]
async fn packed_month_reads_back_identically_and_stays_writable() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m0 = month_start(3);
    let m1 = month_start(2);
    let meters = ["cjt188:00000000000101", "cjt188:00000000000102"];
    // Two meters, hourly for three days in month m0 and two days in m1, through VEE as the
    // worker stores them; one estimate with its detail and one legacy frame label written
    // through the view; one read this month (never packed).
    let mut vee = Vee::new(VeeConfig::default());
    let mut n = 0;
    for month in [m0, m1] {
        let mut batch = Vec::new();
        for (i, meter) in meters.iter().enumerate() {
            for h in 0..60 {
                n += 1;
                let value = Decimal::from(1000 * (i as i64 + 1)) + Decimal::new(h * 125, 3);
                batch.push(read(meter, month + Duration::hours(h + 24), value, n));
            }
        }
        testkit::write_validated(pool, &mut vee, batch, month + Duration::days(5)).await;
    }
    sqlx::raw_sql(&format!(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, quality_detail,
             clock, source, source_id, gateway_id, spool_seq, frame_hash, received_at)
         VALUES ('{m}', timestamptz '{t}' + interval '4 days 30 minutes', 'volume', 1009.5, 'm3', 'estimated',
                 '{{\"status\": \"estimated\", \"method\": \"linear\"}}', 'meter', 'coap', 'nb',
                 'gw-1', NULL, 'legacy-frame-7', timestamptz '{t}' + interval '4 days 1 hour'),
                ('{m}', now() - interval '1 hour', 'volume', 2000, 'm3', 'actual', NULL, 'meter',
                 'coap', 'nb', 'gw-1', 9, NULL, now())",
        m = meters[0],
        t = sql_ts(m0),
    ))
    .execute(pool)
    .await
    .expect("writing through the view");
    let (from, to) = (m0, m1 + Duration::days(5));
    let before_view = view(pool).await;
    let before_bill = billing_reads(pool, meters[0], from, m0 + Duration::days(10)).await;
    assert!(
        before_bill.starts_with("Some(RegisterRead"),
        "billing finds a boundary read before packing: {before_bill}"
    );
    let before_rollups = recomputed_rollups(pool, meters[0], from, to).await;
    let before_vee = db::meter_state::load_vee(pool, VeeConfig::default(), |_| true)
        .await
        .expect("loading VEE");
    let before_state = format!("{:?}", before_vee.state(meters[0]));
    let total = before_view.len() as i64;
    let meter1_m0 = count(
        pool,
        &format!(
            "SELECT count(*) FROM readings WHERE meter_id = '{}' AND ts >= '{}' AND ts < '{}'",
            meters[1],
            sql_ts(m0),
            sql_ts(m1)
        ),
    )
    .await;

    // Dry run: the plan, nothing changed.
    let now = OffsetDateTime::now_utc();
    let plan = pack_closed_months(pool, now, 7, true)
        .await
        .expect("a dry run");
    let months: Vec<&str> = plan.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(months.len(), 2, "{plan:?}");
    assert_eq!(plan.iter().map(|p| p.2).sum::<i64>(), total - 1, "{plan:?}");
    assert_eq!(count(pool, "SELECT count(*) FROM reading_packs").await, 0);
    assert_eq!(
        count(pool, "SELECT count(*) FROM reading_rows").await,
        total
    );

    // Packed: rows and frames of both months moved, this month's read left.
    let packed = pack_closed_months(pool, now, 7, false)
        .await
        .expect("packing");
    assert_eq!(packed, plan, "the dry run planned the real run");
    assert_eq!(count(pool, "SELECT count(*) FROM reading_rows").await, 1);
    assert_eq!(count(pool, "SELECT count(*) FROM frames").await, 1);
    assert_eq!(count(pool, "SELECT count(*) FROM reading_packs").await, 4);
    assert_eq!(count(pool, "SELECT count(*) FROM frame_packs").await, 4);
    assert_eq!(
        view(pool).await,
        before_view,
        "every column of every reading as before"
    );
    assert_eq!(
        billing_reads(pool, meters[0], from, m0 + Duration::days(10)).await,
        before_bill
    );
    assert_eq!(
        recomputed_rollups(pool, meters[0], from, to).await,
        before_rollups
    );
    let after_vee = db::meter_state::load_vee(pool, VeeConfig::default(), |_| true)
        .await
        .expect("loading VEE");
    assert_eq!(format!("{:?}", after_vee.state(meters[0])), before_state);

    // Packing again finds nothing to do and changes nothing.
    assert_eq!(
        pack_closed_months(pool, now, 7, false).await.unwrap(),
        vec![]
    );
    assert_eq!(view(pool).await, before_view);

    // The same read again (redelivery): refused as a duplicate, nothing added.
    let again = read(
        meters[1],
        m0 + Duration::hours(30),
        dec!(2000) + Decimal::new(6 * 125, 3),
        7,
    );
    let stats = write_raw(pool, std::slice::from_ref(&again)).await;
    assert_eq!(stats.inserted, 0);
    assert!(stats.slow_path);
    // A different value at a stored key: a duplicate conflict for review, stored value kept.
    let mut conflicting = again.clone();
    conflicting.value = dec!(2999);
    conflicting.provenance.frame_hash = "cd".repeat(32);
    let stats = write_raw(pool, &[conflicting]).await;
    assert_eq!(stats.inserted, 0);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM ingest_rejects WHERE kind = 'duplicate_conflict'"
        )
        .await,
        1
    );
    assert_eq!(
        view(pool).await,
        before_view,
        "nothing changed by the duplicates"
    );
    // Only that meter's month went back to row form.
    assert_eq!(
        count(pool, "SELECT count(*) FROM reading_rows").await,
        1 + meter1_m0
    );

    // A late new read in the packed month m1 of meter 0: stored, visible.
    let late = read(meters[0], m1 + Duration::hours(100), dec!(1008), 999);
    let stats = write_raw(pool, &[late]).await;
    assert_eq!(stats.inserted, 1);
    let stored: (Decimal, String, String) = sqlx::query_as(
        "SELECT value, quality, frame_hash FROM readings WHERE meter_id = $1 AND ts = $2",
    )
    .bind(meters[0])
    .bind(m1 + Duration::hours(100))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        (
            dec!(1008),
            "actual".into(),
            format!("{:064x}", 0x5eed_0000_u64 + 999)
        )
    );

    // An edit in packed month m0 (meter 0 is still packed there).
    assert!(
        count(pool, &format!("SELECT count(*) FROM reading_packs WHERE meter_key = (SELECT meter_key FROM meter_keys WHERE meter_id = '{}') AND month = '{}'", meters[0], m0.date())).await
            == 1
    );
    let edited_at = m0 + Duration::hours(40);
    let history = count(pool, "SELECT count(*) FROM reading_history").await;
    let outcome = pipeline::edit::edit_reading(
        pool,
        meters[0],
        edited_at,
        Quantity::Volume,
        dec!(1002.001),
        "ops",
        "register photo",
    )
    .await
    .expect("editing a packed reading");
    assert_eq!(outcome.old_value, dec!(1000) + Decimal::new(16 * 125, 3));
    let edited: (Decimal, String) =
        sqlx::query_as("SELECT value, quality FROM readings WHERE meter_id = $1 AND ts = $2")
            .bind(meters[0])
            .bind(edited_at)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(edited, (dec!(1002.001), "edited".into()));
    assert_eq!(
        count(pool, "SELECT count(*) FROM reading_history").await,
        history + 1
    );

    // The next run packs the unpacked months again; the view is what it was before it.
    let after_writes = view(pool).await;
    assert_eq!(after_writes.len() as i64, total + 1);
    let repacked = pack_closed_months(pool, now, 7, false)
        .await
        .expect("re-packing");
    assert_eq!(repacked.len(), 2, "{repacked:?}");
    assert_eq!(count(pool, "SELECT count(*) FROM reading_rows").await, 1);
    assert_eq!(count(pool, "SELECT count(*) FROM reading_packs").await, 4);
    assert_eq!(view(pool).await, after_writes);
}

#[tokio::test]
async fn a_packed_month_of_1000_meters_hourly_takes_under_100_bytes_per_reading() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m_start = month_start(2);
    let m = sql_ts(m_start);
    // 1000 meters × 720 hourly reads, each its own frame with a random 32-byte hash (as
    // telegram hashes are), received a few seconds after the hour, spool sequences per
    // gateway; the values are registers with a meter-specific flow and micro-litre noise.
    sqlx::raw_sql(&format!(
        "INSERT INTO meter_keys (meter_id)
             SELECT 'cjt188:' || lpad(i::text, 14, '0') FROM generate_series(1, 1000) i;
         INSERT INTO reading_series (quantity, tariff, subunit) VALUES ('volume', 0, 0);
         INSERT INTO reading_units (unit) VALUES ('m3');
         INSERT INTO frame_sources (gateway_id, source, source_id, channel, clock)
             SELECT 'gw-' || g, 'coap', 'nb', NULL, 'meter' FROM generate_series(0, 9) g;
         INSERT INTO frames (frame_id, received_at, spool_seq, source_key, frame_hash)
         SELECT ((1000 + h)::bigint << 20) | k, timestamptz '{m}' + h * interval '1 hour'
                    + (2000000 + (hashint4(k * 7919 + h) & 65535) * 61) * interval '1 microsecond',
                h * 100 + k / 10, 1 + k % 10, sha256(('frame ' || k || ' ' || h)::bytea)
         FROM generate_series(0, 719) h, meter_keys mk(k);
         INSERT INTO reading_rows (ts, frame_id, meter_key, series_id, unit_id, storage, quality,
                                   flags, value)
         SELECT timestamptz '{m}' + h * interval '1 hour', ((1000 + h)::bigint << 20) | k, k, 1, 1,
                0, 1, 0,
                round(k * 10 + h * (0.01 + (k % 7) * 0.003)
                      + (hashint4(k * 1000 + h) & 1023) * 0.000001, 6)
         FROM generate_series(0, 719) h, meter_keys mk(k) ORDER BY 3, 1;
         ANALYZE;"
    ))
    .execute(pool)
    .await
    .expect("generating a month");
    let digest = "SELECT count(*)::text || ' ' || sum(value)::text || ' '
                  || md5(string_agg(concat_ws(',', meter_id, ts, value, quality, flags,
                                              frame_hash, received_at, spool_seq, gateway_id),
                                    ';' ORDER BY meter_id, ts))
                  FROM readings";
    let before: String = sqlx::query_scalar(digest).fetch_one(pool).await.unwrap();
    let packed = pack_closed_months(pool, OffsetDateTime::now_utc(), 7, false)
        .await
        .expect("packing");
    assert_eq!(packed.len(), 1);
    assert_eq!(
        (packed[0].1, packed[0].2, packed[0].3),
        (1000, 720_000, 720_000)
    );
    for sql in [
        "VACUUM ANALYZE frames, reading_packs, frame_packs",
        "REINDEX TABLE frames",
    ] {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    }
    let after: String = sqlx::query_scalar(digest).fetch_one(pool).await.unwrap();
    assert_eq!(after, before, "every reading and its provenance as before");
    // Everything a reading of the month takes: packs (heap, TOAST, key), what is left of its
    // partition and of `frames`.
    let bytes: i64 = count(
        pool,
        &format!(
            "SELECT (pg_total_relation_size('reading_packs') + pg_total_relation_size('frame_packs')
                    + pg_total_relation_size('readings_{}') + pg_total_relation_size('frames'))::int8",
            format_args!("{:04}{:02}", m_start.year(), u8::from(m_start.month()))
        ),
    )
    .await;
    let per_reading = bytes as f64 / 720_000.0;
    eprintln!("packed bytes per reading: {per_reading:.1}");
    assert!(per_reading < 100.0, "{per_reading:.1} bytes per reading");
}
