//! Migration 0140: bills and their lines partitioned by the month of their cycle. Bills land in
//! their month (or the default partition until it exists, then move with every reference
//! intact), an adjustment made after later months were billed links to the bill it adjusts by
//! (bill_id, period_start), the upkeep job creates bill months ahead, a lookup by id visits one
//! partition, bill ids stay unique across months, and a database billed under the old schema
//! migrates with every bill, line and adjustment link unchanged.

use std::str::FromStr;

use model::Decimal;
use pipeline::billing::{Cycle, run_cycle};
use pipeline::scheduler::ensure_partitions;
use sqlx::PgPool;
use testkit::TestDatabase;
use time::macros::{date, datetime};
use time::{Date, OffsetDateTime};

const METER: &str = "cjt188:00000000000051";

async fn read(pool: &PgPool, ts: OffsetDateTime, value: &str, quality: &str) {
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, received_at)
         VALUES ($1, $2, 'volume', $3, 'm3', $4, 'meter', 'mqtt', now())",
    )
    .bind(METER)
    .bind(ts)
    .bind(Decimal::from_str(value).unwrap())
    .bind(quality)
    .execute(pool)
    .await
    .unwrap();
}

fn cycle(start: Date, end: Date) -> Cycle {
    Cycle {
        meter_book: "MB".into(),
        period_start: start,
        period_end: end,
    }
}

/// The partition holding bill `id`, and the distinct partitions holding its lines.
async fn homes(pool: &PgPool, id: i64) -> (String, Vec<String>) {
    let bill: String =
        sqlx::query_scalar("SELECT tableoid::regclass::text FROM bills WHERE bill_id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT tableoid::regclass::text FROM bill_lines WHERE bill_id = $1",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap();
    (bill, lines)
}

async fn scalar_i64(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn bills_land_in_their_cycles_month_and_adjustments_link_across_months() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    sqlx::query("INSERT INTO meters (meter_id, protocol, meter_book) VALUES ($1, 'cjt188', 'MB')")
        .bind(METER)
        .execute(pool)
        .await
        .unwrap();
    read(pool, datetime!(2025-09-30 22:00 +8), "1000", "validated").await;
    read(pool, datetime!(2025-11-01 00:00 +8), "1030", "estimated").await;
    read(pool, datetime!(2025-11-30 22:00 +8), "1050", "validated").await;
    let bk = testkit::tariff::book(&["nanan-2025.toml"]);
    let october = cycle(date!(2025 - 10 - 01), date!(2025 - 11 - 01));
    let november = cycle(date!(2025 - 11 - 01), date!(2025 - 12 - 01));

    // October 2025 has no partition yet (the migration prepares last month and three ahead of
    // today): its bill is not refused, it waits in the default partition.
    let run = run_cycle(pool, &bk, &october).await.unwrap();
    let original = run.created[0];
    assert_eq!(
        homes(pool, original).await,
        ("bills_default".into(), vec!["bill_lines_default".into()])
    );

    // The upkeep job run as of mid-November 2025 makes October .. February (five months, both
    // tables) and moves the waiting bill and its lines into October.
    let created = ensure_partitions(pool, datetime!(2025-11-15 00:00 UTC))
        .await
        .unwrap();
    assert_eq!(created.bills, 5, "{created:?}");
    for month in ["202510", "202511", "202512", "202601", "202602"] {
        for table in ["bills", "bill_lines"] {
            let name = format!("{table}_{month}");
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(&name)
                .fetch_one(pool)
                .await
                .unwrap();
            assert!(exists, "{name} made ahead");
        }
    }
    assert_eq!(
        homes(pool, original).await,
        ("bills_202510".into(), vec!["bill_lines_202510".into()])
    );
    let again = ensure_partitions(pool, datetime!(2025-11-15 00:00 UTC))
        .await
        .unwrap();
    assert_eq!(again.bills, 0, "a second run creates nothing");

    // November is billed into its month, continuing from October's (estimated) end read.
    let run = run_cycle(pool, &bk, &november).await.unwrap();
    let nov = run.created[0];
    assert_eq!(
        homes(pool, nov).await,
        ("bills_202511".into(), vec!["bill_lines_202511".into()])
    );
    let nov_start: String = sqlx::query_scalar(
        "SELECT inputs->'request'->'start'->>'value' FROM bills WHERE bill_id = $1",
    )
    .bind(nov)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(nov_start, "1030");

    // Later, October's actual read arrives: the adjustment goes to October, beside its
    // original, and references it by (bill_id, period_start).
    read(pool, datetime!(2025-10-31 22:40 +8), "1026", "validated").await;
    sqlx::query(
        "UPDATE readings SET flags = array_append(flags, 'superseded')
         WHERE meter_id = $1 AND quality = 'estimated'",
    )
    .bind(METER)
    .execute(pool)
    .await
    .unwrap();
    let rerun = run_cycle(pool, &bk, &october).await.unwrap();
    assert_eq!(rerun.adjusted.len(), 1, "{rerun:?}");
    let adjustment = rerun.adjusted[0];
    assert_eq!(
        homes(pool, adjustment).await,
        ("bills_202510".into(), vec!["bill_lines_202510".into()])
    );
    let link: (i64, i32, String, Date) = sqlx::query_as(
        "SELECT a.bill_id, adj.revision, adj.kind, adj.adjusts_period_start
         FROM bills adj
         JOIN bills a ON a.bill_id = adj.adjusts_bill_id AND a.period_start = adj.adjusts_period_start
         WHERE adj.bill_id = $1",
    )
    .bind(adjustment)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        link,
        (original, 1, "adjustment".into(), date!(2025 - 10 - 01))
    );
    // Nothing else changed: November stands.
    assert_eq!(
        scalar_i64(pool, "SELECT count(*) FROM bills").await,
        3,
        "original, November, adjustment"
    );

    // The keys hold: a link to the right id in the wrong month, or without its month, is
    // refused; so is a second bill with an id already used in another month.
    let insert = |id: Option<i64>, revision: i32, adjusts: Option<i64>, month: Option<Date>| {
        sqlx::query(
            "INSERT INTO bills (bill_id, cycle_id, meter_id, revision, adjusts_bill_id,
                 adjusts_period_start, customer_class, tariff_name, tariff_version, start_ts,
                 end_ts, start_value, end_value, usage_m3, estimated, total, inputs, period_start)
             SELECT coalesce($1, nextval('bills_bill_id_seq')), cycle_id, $5, $2, $3, $4, 'x',
                    't', 'v', now(), now(), 0, 0, 0, false, 0, '{}', period_start
             FROM billing_cycles WHERE period_start = '2025-11-01'",
        )
        .bind(id)
        .bind(revision)
        .bind(adjusts)
        .bind(month)
        .bind(METER)
        .execute(pool)
    };
    let err = insert(None, 7, Some(original), Some(date!(2025 - 11 - 01)))
        .await
        .expect_err("the adjusted bill is not in November");
    assert!(err.to_string().contains("bills_adjusts_fkey"), "{err}");
    let err = insert(None, 8, Some(original), None)
        .await
        .expect_err("MATCH FULL: an adjustment names its bill's month");
    assert!(err.to_string().contains("bills_adjusts_fkey"), "{err}");
    let err = insert(Some(original), 9, None, None)
        .await
        .expect_err("bill ids are unique across months");
    assert!(err.to_string().contains("bill_index_pkey"), "{err}");
    insert(None, 10, Some(original), Some(date!(2025 - 10 - 01)))
        .await
        .expect("a November adjustment of the October bill links");

    // A lookup by id as the API makes it reads one partition: its month from bill_index.
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF)
         SELECT b.total FROM bills b WHERE b.bill_id = {original}
           AND b.period_start = (SELECT i.period_start FROM bill_index i WHERE i.bill_id = {original})"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    let scanned: Vec<&String> = plan
        .iter()
        .filter(|l| l.contains(" on bills_") && !l.contains("never executed"))
        .collect();
    assert_eq!(scanned.len(), 1, "{}", plan.join("\n"));
    assert!(scanned[0].contains("bills_202510"), "{}", plan.join("\n"));
    db.drop_database().await;
}

const OLD_BILLS: &str = "SELECT ROW(bill_id, cycle_id, meter_id, revision, adjusts_bill_id, \
     customer_class, tariff_name, tariff_version, start_ts, end_ts, start_value, end_value, \
     usage_m3, estimated, total, inputs, created_at, kind, effective_total, inputs_hash, \
     run_id)::text FROM bills ORDER BY bill_id";
const OLD_LINES: &str = "SELECT ROW(bill_id, line_no, component, tier, volume_m3, unit_price, \
     amount, kind, period_from, period_to, tariff_version)::text FROM bill_lines \
     ORDER BY bill_id, line_no";

#[tokio::test]
async fn bills_of_the_old_schema_migrate_with_every_line_and_link() {
    let db = TestDatabase::create_migrated_to(139).await;
    let pool = &db.pool;
    // Two months of originals, an adjustment made two months later, a bill for a cycle far
    // ahead, lines for each.
    sqlx::raw_sql(
        "INSERT INTO billing_cycles (meter_book, period_start, period_end) VALUES
             ('OB', '2024-01-01', '2024-02-01'), ('OB', '2024-02-01', '2024-03-01'),
             ('OB', '2031-06-01', '2031-07-01');
         INSERT INTO bill_runs (cycle_id, actor) VALUES (1, 'old');
         INSERT INTO bills (cycle_id, meter_id, revision, adjusts_bill_id, customer_class,
             tariff_name, tariff_version, start_ts, end_ts, start_value, end_value, usage_m3,
             estimated, total, inputs, kind, effective_total, inputs_hash, run_id, created_at)
         VALUES
             (1, 'm1', 0, NULL, 'res', 'nanan', 'v1', '2023-12-31 15:00+00', '2024-01-31 15:00+00',
              0, 10.5, 10.5, true, 29.40, '{\"segments\": []}', 'original', 29.40, 'h1', 1,
              '2024-02-02 01:00+00'),
             (2, 'm1', 0, NULL, 'res', 'nanan', 'v1', '2024-01-31 15:00+00', '2024-02-29 15:00+00',
              10.5, 20, 9.5, false, 26.60, '{}', 'original', 26.60, 'h2', NULL,
              '2024-03-02 01:00+00'),
             (3, 'm1', 0, NULL, 'res', 'nanan', 'v1', '2031-05-31 16:00+00', '2031-06-30 16:00+00',
              20, 30, 10, false, 28.00, '{}', 'original', NULL, NULL, NULL, now());
         INSERT INTO bills (cycle_id, meter_id, revision, adjusts_bill_id, customer_class,
             tariff_name, tariff_version, start_ts, end_ts, start_value, end_value, usage_m3,
             estimated, total, inputs, kind, effective_total, inputs_hash, created_at)
         VALUES (1, 'm1', 1, 1, 'res', 'nanan', 'v1', '2023-12-31 15:00+00', '2024-01-31 15:00+00',
                 0, 10, 10, false, -1.40, '{}', 'adjustment', 28.00, 'h3', '2024-04-05 01:00+00');
         INSERT INTO bill_lines (bill_id, line_no, component, tier, volume_m3, unit_price, amount,
             kind, period_from, period_to, tariff_version)
         SELECT b, n, 'water', n, 5.25, 2.8, 14.70, CASE WHEN n = 2 THEN 'reversal' ELSE 'charge' END,
                '2024-01-01', NULL, CASE WHEN n = 1 THEN 'v1' END
         FROM generate_series(1, 4) b, generate_series(1, 3) n;",
    )
    .execute(pool)
    .await
    .unwrap();
    let bills_before: Vec<String> = sqlx::query_scalar(OLD_BILLS).fetch_all(pool).await.unwrap();
    let lines_before: Vec<String> = sqlx::query_scalar(OLD_LINES).fetch_all(pool).await.unwrap();

    db.migrate_rest().await;

    let kind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid IN ('bills'::regclass, 'bill_lines'::regclass)
         GROUP BY relkind",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(kind, "p", "both tables partitioned");
    let bills_after: Vec<String> = sqlx::query_scalar(OLD_BILLS).fetch_all(pool).await.unwrap();
    let lines_after: Vec<String> = sqlx::query_scalar(OLD_LINES).fetch_all(pool).await.unwrap();
    assert_eq!(bills_after, bills_before);
    assert_eq!(lines_after, lines_before);
    let placed: Vec<(i64, String, Date, Option<Date>)> = sqlx::query_as(
        "SELECT bill_id, tableoid::regclass::text, period_start, adjusts_period_start
         FROM bills ORDER BY bill_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        placed,
        vec![
            (1, "bills_202401".into(), date!(2024 - 01 - 01), None),
            (2, "bills_202402".into(), date!(2024 - 02 - 01), None),
            (3, "bills_203106".into(), date!(2031 - 06 - 01), None),
            (
                4,
                "bills_202401".into(),
                date!(2024 - 01 - 01),
                Some(date!(2024 - 01 - 01))
            ),
        ]
    );
    // Every line sits with its bill, and every adjustment link resolves on the composite key.
    assert_eq!(
        scalar_i64(
            pool,
            "SELECT count(*) FROM bill_lines l JOIN bills b
                 ON b.bill_id = l.bill_id AND b.period_start = l.period_start
             WHERE substr(l.tableoid::regclass::text, 12) = substr(b.tableoid::regclass::text, 7)"
        )
        .await,
        12
    );
    assert_eq!(
        scalar_i64(
            pool,
            "SELECT count(*) FROM bills adj JOIN bills a
                 ON a.bill_id = adj.adjusts_bill_id AND a.period_start = adj.adjusts_period_start
             WHERE a.revision = 0 AND adj.revision = 1"
        )
        .await,
        1
    );
    assert_eq!(
        scalar_i64(
            pool,
            "SELECT count(*) FROM bill_index i JOIN bills b USING (bill_id, period_start)"
        )
        .await,
        4
    );
    // New bills keep numbering after the old ones, from the same sequence.
    let next: i64 = sqlx::query_scalar("SELECT nextval('bills_bill_id_seq')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(next, 5);
    assert_eq!(
        homes(pool, 3).await,
        ("bills_203106".into(), vec!["bill_lines_203106".into()])
    );
    // The migration made a partition for each month with bills: the upkeep adds the others.
    let created = ensure_partitions(pool, datetime!(2031-07-10 00:00 UTC))
        .await
        .unwrap();
    assert_eq!(created.bills, 4, "{created:?}");
    db.drop_database().await;
}
