//! Bill runs over a real PostgreSQL: idempotence, adjustments after corrected or actual reads,
//! rollover, replacement, annual tier position across cycles, price change inside a cycle,
//! arrears for the valve policy.

use std::str::FromStr;

use billing_core::{Tariff, TariffBook};
use model::Decimal;
use pipeline::billing::{Arrears, Cycle, arrears_of, meters_in_arrears, record_arrears, run_cycle};
use sqlx::PgPool;
use testkit::TestDatabase;
use time::macros::{date, datetime};
use time::{Date, OffsetDateTime};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn tariff_text(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../tariffs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn book(name: &str) -> TariffBook {
    TariffBook::new([Tariff::parse(name, &tariff_text(name)).unwrap()]).unwrap()
}

async fn meter(pool: &PgPool, id: &str, book: &str) {
    sqlx::query("INSERT INTO meters (meter_id, protocol, meter_book) VALUES ($1, 'cjt188', $2)")
        .bind(id)
        .bind(book)
        .execute(pool)
        .await
        .unwrap();
}

async fn read(pool: &PgPool, id: &str, ts: OffsetDateTime, value: &str, quality: &str) {
    sqlx::query(
        "INSERT INTO readings (meter_id, ts, quantity, value, unit, quality, clock, source, received_at)
         VALUES ($1, $2, 'volume', $3, 'm3', $4, 'meter', 'mqtt', now())",
    )
    .bind(id)
    .bind(ts)
    .bind(d(value))
    .bind(quality)
    .execute(pool)
    .await
    .unwrap();
}

fn october(book: &str) -> Cycle {
    Cycle {
        meter_book: book.into(),
        period_start: date!(2025 - 10 - 01),
        period_end: date!(2025 - 11 - 01),
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct BillRow {
    bill_id: i64,
    revision: i32,
    adjusts_bill_id: Option<i64>,
    kind: String,
    total: Decimal,
    effective_total: Option<Decimal>,
    estimated: bool,
    usage_m3: Decimal,
    tariff_version: String,
    inputs: serde_json::Value,
}

async fn bills_of(pool: &PgPool, meter: &str) -> Vec<BillRow> {
    sqlx::query_as(
        "SELECT bill_id, revision, adjusts_bill_id, kind, total, effective_total, estimated, usage_m3,
                tariff_version, inputs
         FROM bills WHERE meter_id = $1 ORDER BY cycle_id, revision",
    )
    .bind(meter)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn lines_of(
    pool: &PgPool,
    bill_id: i64,
) -> Vec<(String, i32, Decimal, Decimal, Decimal, String, Option<Date>)> {
    sqlx::query_as(
        "SELECT component, tier, volume_m3, unit_price, amount, kind, period_from FROM bill_lines
         WHERE bill_id = $1 ORDER BY line_no",
    )
    .bind(bill_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn running_a_cycle_twice_creates_one_bill() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    meter(pool, "cjt188:00000000000001", "B1").await;
    read(
        pool,
        "cjt188:00000000000001",
        datetime!(2025-09-30 23:00 +8),
        "1000",
        "validated",
    )
    .await;
    read(
        pool,
        "cjt188:00000000000001",
        datetime!(2025-10-15 12:00 +8),
        "1020",
        "validated",
    )
    .await;
    read(
        pool,
        "cjt188:00000000000001",
        datetime!(2025-10-31 23:30 +8),
        "1040",
        "validated",
    )
    .await;
    let bk = book("nanan-2025.toml");
    let first = run_cycle(pool, &bk, &october("B1")).await.unwrap();
    assert_eq!(first.created.len(), 1);
    assert!(first.adjusted.is_empty() && first.skipped.is_empty());
    let bills = bills_of(pool, "cjt188:00000000000001").await;
    assert_eq!(bills.len(), 1);
    let b = &bills[0];
    // 40 m3 = 20 × 2.80 + 15 × 3.73 + 5 × 6.50.
    assert_eq!(
        (b.revision, b.kind.as_str(), b.total, b.usage_m3),
        (0, "original", d("144.45"), d("40"))
    );
    assert_eq!(b.effective_total, Some(d("144.45")));
    assert!(!b.estimated);
    assert!(b.tariff_version.starts_with("2025-08-19+"));
    assert_eq!(b.inputs["request"]["start"]["value"], "1000");
    assert_eq!(b.inputs["request"]["end"]["value"], "1040");
    let lines = lines_of(pool, b.bill_id).await;
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[4],
        (
            "water".into(),
            3,
            d("5"),
            d("5.55"),
            d("27.75"),
            "charge".into(),
            Some(date!(2025 - 10 - 01))
        )
    );
    let sum: Decimal = lines.iter().map(|l| l.4).sum();
    assert_eq!(sum, d("144.45"));
    // Reproducible: the stored inputs give the same bill and the stored fingerprint.
    let request: billing_core::BillRequest =
        serde_json::from_value(b.inputs["request"].clone()).unwrap();
    let again = billing_core::compute_bill(&bk, &request).unwrap();
    assert_eq!(again.total, b.total);
    let hash: String = sqlx::query_scalar("SELECT inputs_hash FROM bills WHERE bill_id = $1")
        .bind(b.bill_id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(again.fingerprint(), hash);

    let second = run_cycle(pool, &bk, &october("B1")).await.unwrap();
    assert!(second.created.is_empty() && second.adjusted.is_empty());
    assert_eq!(second.unchanged, vec!["cjt188:00000000000001".to_string()]);
    assert_eq!(second.cycle_id, first.cycle_id);
    assert_eq!(count(pool, "SELECT count(*) FROM bills").await, 1);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM bill_runs WHERE finished_at IS NOT NULL"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM audit_log WHERE action = 'bill.create'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM audit_log WHERE action = 'bill_run'"
        )
        .await,
        2
    );
    db.drop_database().await;
}

#[tokio::test]
async fn concurrent_runs_of_a_cycle_create_one_bill() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    for i in 0..5 {
        let id = format!("cjt188:0000000000010{i}");
        meter(pool, &id, "B2").await;
        read(pool, &id, datetime!(2025-09-30 23:00 +8), "10", "validated").await;
        read(pool, &id, datetime!(2025-10-31 23:00 +8), "22", "validated").await;
    }
    let bk = book("nanan-2025.toml");
    let cycle = october("B2");
    let (a, b) = tokio::join!(run_cycle(pool, &bk, &cycle), run_cycle(pool, &bk, &cycle));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.created.len() + b.created.len(), 5);
    assert_eq!(a.unchanged.len() + b.unchanged.len(), 5);
    assert_eq!(count(pool, "SELECT count(*) FROM bills").await, 5);
    // 12 m3 × 2.80 each.
    assert_eq!(
        count(pool, "SELECT count(*) FROM bills WHERE total = 33.60").await,
        5
    );
    db.drop_database().await;
}

#[tokio::test]
async fn estimated_bill_is_trued_up_by_an_adjustment_when_the_actual_read_arrives() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000002";
    meter(pool, m, "B3").await;
    read(pool, m, datetime!(2025-09-30 22:00 +8), "1000", "validated").await;
    read(pool, m, datetime!(2025-11-01 00:00 +8), "1030", "estimated").await;
    let bk = book("nanan-2025.toml");
    run_cycle(pool, &bk, &october("B3")).await.unwrap();
    // 30 m3 estimated: 56.00 + 10 × 3.73.
    let bills = bills_of(pool, m).await;
    assert_eq!((bills[0].total, bills[0].estimated), (d("93.30"), true));

    // The actual read arrives; VEE marks the estimate superseded.
    read(pool, m, datetime!(2025-10-31 22:40 +8), "1026", "validated").await;
    sqlx::query("UPDATE readings SET flags = array_append(flags, 'superseded') WHERE meter_id = $1 AND quality = 'estimated'")
        .bind(m)
        .execute(pool)
        .await
        .unwrap();
    let rerun = run_cycle(pool, &bk, &october("B3")).await.unwrap();
    assert_eq!(rerun.adjusted.len(), 1);
    let bills = bills_of(pool, m).await;
    assert_eq!(
        bills.len(),
        2,
        "the estimated bill is kept, not overwritten"
    );
    assert_eq!((bills[0].total, bills[0].estimated), (d("93.30"), true));
    let adj = &bills[1];
    // 26 m3 actual: 56.00 + 6 × 3.73 = 78.38; the adjustment is 78.38 − 93.30.
    assert_eq!(
        (adj.revision, adj.kind.as_str(), adj.adjusts_bill_id),
        (1, "adjustment", Some(bills[0].bill_id))
    );
    assert_eq!(
        (adj.total, adj.effective_total, adj.estimated),
        (d("-14.92"), Some(d("78.38")), false)
    );
    let lines = lines_of(pool, adj.bill_id).await;
    assert_eq!(lines.iter().filter(|l| l.5 == "reversal").count(), 4);
    assert_eq!(lines.iter().filter(|l| l.5 == "charge").count(), 4);
    assert_eq!(lines.iter().map(|l| l.4).sum::<Decimal>(), d("-14.92"));
    assert_eq!(lines[2].2, d("-10"));
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM audit_log WHERE action = 'bill.adjust'"
        )
        .await,
        1
    );

    // Nothing changed since: no third bill.
    let again = run_cycle(pool, &bk, &october("B3")).await.unwrap();
    assert_eq!(again.unchanged.len(), 1);
    assert_eq!(bills_of(pool, m).await.len(), 2);
    db.drop_database().await;
}

#[tokio::test]
async fn corrected_read_creates_an_adjustment_not_an_overwrite() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000003";
    meter(pool, m, "B4").await;
    read(pool, m, datetime!(2025-09-30 22:00 +8), "1000", "validated").await;
    read(pool, m, datetime!(2025-10-31 22:00 +8), "1040", "validated").await;
    let bk = book("nanan-2025.toml");
    run_cycle(pool, &bk, &october("B4")).await.unwrap();
    sqlx::query(
        "UPDATE readings SET value = 1035, quality = 'edited' WHERE meter_id = $1 AND value = 1040",
    )
    .bind(m)
    .execute(pool)
    .await
    .unwrap();
    let rerun = run_cycle(pool, &bk, &october("B4")).await.unwrap();
    assert_eq!(rerun.adjusted.len(), 1);
    let bills = bills_of(pool, m).await;
    // 35 m3: 56.00 + 15 × 3.73 = 111.95; −32.50 against 144.45.
    assert_eq!(bills[0].total, d("144.45"));
    assert_eq!(
        (bills[1].total, bills[1].effective_total),
        (d("-32.50"), Some(d("111.95")))
    );
    assert_eq!(bills[1].inputs["request"]["end"]["value"], "1035");
    db.drop_database().await;
}

#[tokio::test]
async fn rollover_replacement_and_unbillable_meters() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    for id in [
        "cjt188:00000000000011",
        "cjt188:00000000000012",
        "cjt188:00000000000013",
        "cjt188:00000000000014",
    ] {
        meter(pool, id, "B5").await;
    }
    sqlx::query("UPDATE meters SET retired_at = '2025-06-01T00:00:00+08' WHERE meter_id = 'cjt188:00000000000014'")
        .execute(pool)
        .await
        .unwrap();
    // Rollover: 99990 → 15 on a 100000 m3 register.
    read(
        pool,
        "cjt188:00000000000011",
        datetime!(2025-09-30 21:00 +8),
        "99990",
        "validated",
    )
    .await;
    read(
        pool,
        "cjt188:00000000000011",
        datetime!(2025-10-31 21:00 +8),
        "15",
        "validated",
    )
    .await;
    // Replacement on 12 October: old 500 → 510, new 0.2 → 12.2.
    read(
        pool,
        "cjt188:00000000000012",
        datetime!(2025-09-30 21:00 +8),
        "500",
        "validated",
    )
    .await;
    read(
        pool,
        "cjt188:00000000000012",
        datetime!(2025-10-31 21:00 +8),
        "12.2",
        "validated",
    )
    .await;
    sqlx::query(
        "INSERT INTO meter_replacements (meter_id, replaced_at, old_final_value, new_initial_value, recorded_by)
         VALUES ('cjt188:00000000000012', '2025-10-12T10:00:00+08', 510, 0.2, 'field-crew-7')",
    )
    .execute(pool)
    .await
    .unwrap();
    // No end read at all (13): skipped with the reason.
    read(
        pool,
        "cjt188:00000000000013",
        datetime!(2025-09-30 21:00 +8),
        "1",
        "validated",
    )
    .await;
    let report = run_cycle(pool, &book("nanan-2025.toml"), &october("B5"))
        .await
        .unwrap();
    assert_eq!(report.created.len(), 2);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].meter_id, "cjt188:00000000000013");
    assert!(
        report.skipped[0].reason.contains("no billable read"),
        "{}",
        report.skipped[0].reason
    );
    let rolled = bills_of(pool, "cjt188:00000000000011").await;
    // 25 m3 = 56.00 + 5 × 3.73.
    assert_eq!((rolled[0].usage_m3, rolled[0].total), (d("25"), d("74.65")));
    assert_eq!(rolled[0].inputs["usage"]["rollover"], true);
    let replaced = bills_of(pool, "cjt188:00000000000012").await;
    // 22 m3 = 56.00 + 2 × 3.73.
    assert_eq!(
        (replaced[0].usage_m3, replaced[0].total),
        (d("22"), d("63.46"))
    );
    assert_eq!(
        replaced[0].inputs["request"]["replacement"]["old_final"],
        "510"
    );
    assert!(bills_of(pool, "cjt188:00000000000014").await.is_empty());
    let detail: serde_json::Value =
        sqlx::query_scalar("SELECT detail FROM bill_runs WHERE run_id = $1")
            .bind(report.run_id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(detail["skipped"][0]["meter_id"], "cjt188:00000000000013");
    db.drop_database().await;
}

#[tokio::test]
async fn annual_tier_position_carries_across_cycles() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000021";
    meter(pool, m, "B6").await;
    read(pool, m, datetime!(2024-12-31 20:00 +8), "0", "validated").await;
    read(pool, m, datetime!(2025-01-31 20:00 +8), "200", "validated").await;
    read(pool, m, datetime!(2025-02-28 20:00 +8), "230", "validated").await;
    // EXAMPLE tariff (annual tiers 216 / 300, fixed 1.00 per bill).
    let bk = book("fuzhou-example.toml");
    let jan = Cycle {
        meter_book: "B6".into(),
        period_start: date!(2025 - 01 - 01),
        period_end: date!(2025 - 02 - 01),
    };
    let feb = Cycle {
        meter_book: "B6".into(),
        period_start: date!(2025 - 02 - 01),
        period_end: date!(2025 - 03 - 01),
    };
    run_cycle(pool, &bk, &jan).await.unwrap();
    run_cycle(pool, &bk, &feb).await.unwrap();
    let bills = bills_of(pool, m).await;
    // January: 200 m3 × 2.55 + 1.00.
    assert_eq!(bills[0].total, d("511.00"));
    // February starts at January's end read and at tier position 200: 16 m3 in tier 1
    // (25.60 + 13.60 + 1.60), 14 m3 in tier 2 (33.60 + 11.90 + 1.40), fixed 1.00.
    assert_eq!(bills[1].inputs["request"]["year_usage_before"], "200");
    assert_eq!(bills[1].inputs["request"]["start"]["value"], "200");
    assert_eq!(bills[1].total, d("88.70"));
    db.drop_database().await;
}

const NEWER: &str = r#"name = "Test tariff from 2025-10-16"
currency = "CNY"
effective_from = "2025-10-16"
tier_period = "month"
[[classes]]
id = "residential"
  [[classes.tiers]]
  up_to = "20"
  prices = { water = "2.00", sewage = "1.00" }
  [[classes.tiers]]
  up_to = "35"
  prices = { water = "3.00", sewage = "1.00" }
  [[classes.tiers]]
  prices = { water = "6.00", sewage = "1.00" }
"#;

#[tokio::test]
async fn price_change_inside_the_cycle_stores_both_tariff_versions() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000031";
    meter(pool, m, "B7").await;
    read(pool, m, datetime!(2025-09-30 23:00 +8), "100", "validated").await;
    read(pool, m, datetime!(2025-10-31 23:00 +8), "131", "validated").await;
    let bk = TariffBook::parse([
        ("nanan-2025.toml", tariff_text("nanan-2025.toml").as_str()),
        ("newer.toml", NEWER),
    ])
    .unwrap();
    run_cycle(pool, &bk, &october("B7")).await.unwrap();
    let bills = bills_of(pool, m).await;
    // 15 m3 at the old prices, 16 m3 at the new from tier position 15 (see bill_golden.rs).
    assert_eq!(bills[0].total, d("101.00"));
    assert!(
        bills[0].tariff_version.contains(",2025-10-16+"),
        "{}",
        bills[0].tariff_version
    );
    let lines = lines_of(pool, bills[0].bill_id).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.6 == Some(date!(2025 - 10 - 16)))
            .count(),
        4
    );
    db.drop_database().await;
}

#[tokio::test]
async fn arrears_from_the_revenue_system_feed_the_valve_policy() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    for id in [
        "cjt188:00000000000041",
        "cjt188:00000000000042",
        "cjt188:00000000000043",
    ] {
        meter(pool, id, "B8").await;
    }
    sqlx::query("UPDATE meters SET has_valve = true, protected_customer = (meter_id = 'cjt188:00000000000042')")
        .execute(pool)
        .await
        .unwrap();
    let at = datetime!(2025-11-20 09:00 UTC);
    let rec = |m: &str, amount: &str, since: Date| Arrears {
        meter_id: m.into(),
        account_id: format!("acct-{m}"),
        amount_overdue: d(amount),
        overdue_since: since,
        reported_at: at,
    };
    record_arrears(
        pool,
        &rec("cjt188:00000000000041", "150.20", date!(2025 - 10 - 01)),
        "revenue-sync",
    )
    .await
    .unwrap();
    record_arrears(
        pool,
        &rec("cjt188:00000000000042", "300.00", date!(2025 - 09 - 01)),
        "revenue-sync",
    )
    .await
    .unwrap();
    record_arrears(
        pool,
        &rec("cjt188:00000000000043", "20.00", date!(2025 - 11 - 15)),
        "revenue-sync",
    )
    .await
    .unwrap();
    assert!(
        record_arrears(
            pool,
            &rec("cjt188:00000000000043", "-1", date!(2025 - 11 - 15)),
            "x"
        )
        .await
        .is_err()
    );
    assert!(
        record_arrears(
            pool,
            &rec("cjt188:00000000000043", "1.001", date!(2025 - 11 - 15)),
            "x"
        )
        .await
        .is_err()
    );
    // Update replaces the amount.
    record_arrears(
        pool,
        &rec("cjt188:00000000000041", "180.20", date!(2025 - 10 - 01)),
        "revenue-sync",
    )
    .await
    .unwrap();
    assert_eq!(
        arrears_of(pool, "cjt188:00000000000041")
            .await
            .unwrap()
            .unwrap()
            .amount_overdue,
        d("180.20")
    );

    // At least 50 yuan for at least 30 days on 2025-11-25: 41 (55 days) and 42 (protected).
    let due = meters_in_arrears(pool, date!(2025 - 11 - 25), d("50"), 30)
        .await
        .unwrap();
    let ids: Vec<_> = due
        .iter()
        .map(|s| {
            (
                s.arrears.meter_id.as_str(),
                s.days_overdue,
                s.protected_customer,
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            ("cjt188:00000000000042", 85, true),
            ("cjt188:00000000000041", 55, false)
        ]
    );

    // Payment clears the record.
    record_arrears(
        pool,
        &rec("cjt188:00000000000041", "0", date!(2025 - 10 - 01)),
        "revenue-sync",
    )
    .await
    .unwrap();
    assert!(
        arrears_of(pool, "cjt188:00000000000041")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM audit_log WHERE action = 'arrears.record'"
        )
        .await,
        4
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM audit_log WHERE action = 'arrears.clear'"
        )
        .await,
        1
    );
    db.drop_database().await;
}

#[tokio::test]
async fn next_cycle_continues_from_the_estimate_and_both_true_up() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000051";
    meter(pool, m, "B9").await;
    // Six persons in a township (Nan'an has no household or township rule: same prices).
    sqlx::query("UPDATE meters SET persons = 6, township = true WHERE meter_id = $1")
        .bind(m)
        .execute(pool)
        .await
        .unwrap();
    read(pool, m, datetime!(2025-09-30 22:00 +8), "1000", "validated").await;
    read(pool, m, datetime!(2025-11-01 00:00 +8), "1030", "estimated").await;
    read(pool, m, datetime!(2025-11-30 22:00 +8), "1050", "validated").await;
    let bk = book("nanan-2025.toml");
    let nov = Cycle {
        meter_book: "B9".into(),
        period_start: date!(2025 - 11 - 01),
        period_end: date!(2025 - 12 - 01),
    };
    run_cycle(pool, &bk, &october("B9")).await.unwrap();
    run_cycle(pool, &bk, &nov).await.unwrap();
    let bills = bills_of(pool, m).await;
    // October 30 m3 estimated (93.30); November starts at the estimate: 20 m3 = 56.00.
    assert_eq!((bills[0].total, bills[0].estimated), (d("93.30"), true));
    assert_eq!(
        (bills[1].usage_m3, bills[1].total, bills[1].estimated),
        (d("20"), d("56.00"), true)
    );
    assert_eq!(bills[1].inputs["request"]["persons"], 6);
    assert_eq!(bills[1].inputs["request"]["township"], true);

    // The actual October read arrives: both cycles are trued up, and the two cycles together
    // bill exactly the 50 m3 the meter measured.
    read(pool, m, datetime!(2025-10-31 23:10 +8), "1026", "validated").await;
    assert_eq!(
        run_cycle(pool, &bk, &october("B9"))
            .await
            .unwrap()
            .adjusted
            .len(),
        1
    );
    assert_eq!(run_cycle(pool, &bk, &nov).await.unwrap().adjusted.len(), 1);
    let bills = bills_of(pool, m).await;
    assert_eq!(bills.len(), 4);
    // October 26 m3 = 78.38; November 24 m3 = 56.00 + 4 × 3.73 = 70.92.
    assert_eq!(bills[1].effective_total, Some(d("78.38")));
    assert_eq!(bills[3].effective_total, Some(d("70.92")));
    assert_eq!(bills[3].inputs["request"]["start"]["value"], "1026");
    assert!(!bills[3].estimated);
    let owed: Decimal = bills.iter().map(|b| b.total).sum();
    assert_eq!(owed, d("149.30"));
    db.drop_database().await;
}

#[tokio::test]
async fn billing_gate_holds_meters_with_too_many_estimates() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let m = "cjt188:00000000000061";
    meter(pool, m, "B10").await;
    read(pool, m, datetime!(2025-09-30 22:00 +8), "1000", "validated").await;
    read(pool, m, datetime!(2025-10-10 22:00 +8), "1005", "estimated").await;
    read(pool, m, datetime!(2025-10-20 22:00 +8), "1010", "estimated").await;
    read(pool, m, datetime!(2025-10-31 22:00 +8), "1020", "validated").await;
    let bk = book("nanan-2025.toml");
    let options = pipeline::billing::RunOptions {
        max_estimated_share: Some(d("0.5")),
        ..Default::default()
    };
    // 2 of 3 reads after the start read are estimated: above one half, held.
    let held = pipeline::billing::run_cycle_with(pool, &bk, &october("B10"), &options)
        .await
        .unwrap();
    assert!(held.created.is_empty());
    assert!(
        held.skipped[0]
            .reason
            .starts_with("held for review: 2 of 3"),
        "{}",
        held.skipped[0].reason
    );
    assert!(bills_of(pool, m).await.is_empty());
    // A field visit confirms one read: now 1 of 3, billed.
    sqlx::query("UPDATE readings SET quality = 'validated' WHERE meter_id = $1 AND value = 1005")
        .bind(m)
        .execute(pool)
        .await
        .unwrap();
    let billed = pipeline::billing::run_cycle_with(pool, &bk, &october("B10"), &options)
        .await
        .unwrap();
    assert_eq!(billed.created.len(), 1);
    // 20 m3 = 56.00.
    assert_eq!(bills_of(pool, m).await[0].total, d("56.00"));
    db.drop_database().await;
}
