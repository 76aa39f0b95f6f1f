//! Golden bills computed by hand: tier crossings, rollover, replacement, price change inside
//! the cycle, annual tiers across a new year, multi-month cycles, estimated then actual.

use billing_core::{
    BillRequest, BillingError, LineKind, RegisterRead, Replacement, Tariff, TariffBook,
    adjustment_lines, bill_total, compute_bill,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use time::macros::{date, datetime};
use time::{Date, OffsetDateTime};

fn book(names: &[&str]) -> TariffBook {
    testkit::tariff::book(names)
}

fn read(ts: OffsetDateTime, value: Decimal) -> RegisterRead {
    RegisterRead {
        ts,
        value,
        estimated: false,
    }
}

fn request(start: Date, end: Date, from: Decimal, to: Decimal) -> BillRequest {
    BillRequest {
        meter: "cjt188:00000000000001".into(),
        class: "residential".into(),
        persons: 4,
        township: false,
        period_start: start,
        period_end: end,
        start: read(
            start.midnight().assume_offset(time::macros::offset!(+8)),
            from,
        ),
        end: read(end.midnight().assume_offset(time::macros::offset!(+8)), to),
        capacity: dec!(100000),
        replacement: None,
        year_usage_before: dec!(0),
    }
}

#[test]
fn monthly_cycle_crossing_two_tiers() {
    let b = compute_bill(
        &book(&["nanan-2025.toml"]),
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(1000),
            dec!(1040),
        ),
    )
    .unwrap();
    assert_eq!(b.usage.total, dec!(40));
    assert_eq!(b.total, dec!(144.45));
    assert_eq!(b.segments.len(), 1);
    assert_eq!(b.segments[0].tier_scale, dec!(1));
    assert!(!b.estimated);
    assert_eq!(b.total, bill_total(&b.lines));
    assert!(b.tariff_version().starts_with("2025-08-19+"));
}

#[test]
fn rollover_across_register_capacity() {
    // 99990 → 15 on a 100000 m3 register: 25 m3 = 20 × 2.80 + 5 × 3.73 = 56.00 + 18.65.
    let b = compute_bill(
        &book(&["nanan-2025.toml"]),
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(99990),
            dec!(15),
        ),
    )
    .unwrap();
    assert!(b.usage.rollover);
    assert_eq!(b.usage.total, dec!(25));
    assert_eq!(b.total, dec!(74.65));
    // A large decrease is not a rollover: refused.
    let err = compute_bill(
        &book(&["nanan-2025.toml"]),
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(500),
            dec!(400),
        ),
    )
    .unwrap_err();
    assert!(
        matches!(err, BillingError::RegisterDecreased { .. }),
        "{err}"
    );
    let err = compute_bill(
        &book(&["nanan-2025.toml"]),
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(500),
            dec!(100000),
        ),
    )
    .unwrap_err();
    assert!(matches!(err, BillingError::BeyondCapacity { .. }), "{err}");
}

#[test]
fn meter_replacement_bridges_old_final_and_new_initial() {
    // Old meter 500 → 510 (10 m3), new meter 0.2 → 12.2 (12 m3): 22 m3 = 56.00 + 2 × 3.73.
    let mut req = request(
        date!(2025 - 10 - 01),
        date!(2025 - 11 - 01),
        dec!(500),
        dec!(12.2),
    );
    req.replacement = Some(Replacement {
        at: datetime!(2025-10-12 10:00 +8),
        old_final: dec!(510),
        new_initial: dec!(0.2),
    });
    let b = compute_bill(&book(&["nanan-2025.toml"]), &req).unwrap();
    assert!(b.usage.replaced);
    assert_eq!(b.usage.total, dec!(22.0));
    assert_eq!(b.total, dec!(63.46));
    // A replacement outside the cycle is not bridged (and then the decrease is refused).
    req.replacement = Some(Replacement {
        at: datetime!(2025-09-12 10:00 +8),
        old_final: dec!(510),
        new_initial: dec!(0.2),
    });
    assert!(compute_bill(&book(&["nanan-2025.toml"]), &req).is_err());
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

#[test]
fn price_change_inside_the_cycle_is_prorated_by_days() {
    let b = TariffBook::new([
        Tariff::parse("nanan-2025.toml", &testkit::tariff::text("nanan-2025.toml")).unwrap(),
        Tariff::parse("newer.toml", NEWER).unwrap(),
    ])
    .unwrap();
    // Oct 1–15 (15 days) old prices, Oct 16–31 (16 days) new; 31 m3 → 15 + 16 m3.
    // Old: 15 × 1.85 = 27.75, 15 × 0.95 = 14.25.
    // New, tier position 15: 5 m3 tier 1 (10.00 + 5.00), 11 m3 tier 2 (33.00 + 11.00).
    let bill = compute_bill(
        &b,
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(100),
            dec!(131),
        ),
    )
    .unwrap();
    assert_eq!(bill.segments.len(), 2);
    assert_eq!(
        (bill.segments[0].days, bill.segments[0].usage),
        (15, dec!(15))
    );
    assert_eq!(
        (
            bill.segments[1].days,
            bill.segments[1].usage,
            bill.segments[1].usage_before
        ),
        (16, dec!(16), dec!(15))
    );
    let amounts: Vec<_> = bill
        .lines
        .iter()
        .map(|l| (l.line.tier, l.line.amount))
        .collect();
    assert_eq!(
        amounts,
        vec![
            (1, dec!(27.75)),
            (1, dec!(14.25)),
            (1, dec!(10.00)),
            (1, dec!(5.00)),
            (2, dec!(33.00)),
            (2, dec!(11.00))
        ]
    );
    assert_eq!(bill.total, dec!(101.00));
    assert_eq!(bill.lines[2].from, date!(2025 - 10 - 16));
    assert!(bill.tariff_version().contains(','));
    // Uneven split: 10 m3 over 31 days → 4.839 m3 (rounded to the litre) and 5.161 m3.
    let bill = compute_bill(
        &b,
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(100),
            dec!(110),
        ),
    )
    .unwrap();
    assert_eq!(bill.segments[0].usage, dec!(4.839));
    assert_eq!(bill.segments[1].usage, dec!(5.161));
    // 4.839 × 1.85 = 8.95215 → 8.95; × 0.95 = 4.59705 → 4.60; 5.161 × 2.00 = 10.32; × 1.00 = 5.16.
    assert_eq!(bill.total, dec!(29.03));
}

#[test]
fn annual_tiers_restart_on_first_january() {
    // EXAMPLE tariff, annual tiers 216 / 300. Dec 2025 + Jan 2026 cycle (62 days), 62 m3,
    // 200 m3 billed earlier in 2025. December: 31 m3 from position 200 → 16 tier 1, 15 tier 2.
    // January: 31 m3 from position 0 → tier 1. Fixed 1.00 prorated 31/62 per part.
    let mut req = request(
        date!(2025 - 12 - 01),
        date!(2026 - 02 - 01),
        dec!(0),
        dec!(62),
    );
    req.year_usage_before = dec!(200);
    let b = compute_bill(&book(&["fuzhou-example.toml"]), &req).unwrap();
    assert_eq!(b.segments.len(), 2);
    assert_eq!(b.segments[1].from, date!(2026 - 01 - 01));
    assert_eq!(b.segments[1].usage_before, dec!(0));
    let dec_part: Decimal = b
        .lines
        .iter()
        .filter(|l| l.from.year() == 2025)
        .map(|l| l.line.amount)
        .sum();
    // 25.60 + 13.60 + 1.60 + 36.00 + 12.75 + 1.50 + 0.50
    assert_eq!(dec_part, dec!(91.55));
    // 49.60 + 26.35 + 3.10 + 0.50
    assert_eq!(b.total, dec!(171.10));
}

#[test]
fn two_month_cycle_doubles_monthly_tiers_and_large_households_get_more() {
    // Oct 1 → Dec 1 on monthly tiers: bounds 40 / 70. 50 m3 = 40 × 2.80 + 10 × 3.73.
    let b = compute_bill(
        &book(&["nanan-2025.toml"]),
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 12 - 01),
            dec!(0),
            dec!(50),
        ),
    )
    .unwrap();
    assert_eq!(b.segments[0].tier_scale, dec!(2));
    assert_eq!(b.total, dec!(149.30));
    // DOMAIN.md example tariff, 6 persons (base 4, +5 m3 each): bounds 30 / 45 per month.
    // 50 m3 = 30 × 2.80 + 15 × 3.73 + 5 × 6.50 = 84.00 + 55.95 + 32.50.
    let t = Tariff::parse(
        "example.toml",
        &testkit::tariff::text("nanan-2025.toml")
            .replace("status = \"verified\"", "")
            .replace("[[classes]]\nid = \"residential\"", "[[classes]]\nid = \"residential\"\nbase_persons = 4\nextra_volume_per_person = \"5\""),
    )
    .unwrap();
    let mut req = request(
        date!(2025 - 10 - 01),
        date!(2025 - 11 - 01),
        dec!(0),
        dec!(50),
    );
    req.persons = 6;
    let b = compute_bill(&TariffBook::new([t]).unwrap(), &req).unwrap();
    assert_eq!(b.total, dec!(172.45));
}

#[test]
fn splitting_a_cycle_on_monthly_tiers_changes_the_price() {
    // docs/billing.md "Limits": monthly allowances are per month of the cycle, so the split
    // property of annual tiers does not hold. 50 m3 over Oct 1 → Dec 1 (bounds 40 / 70):
    // 40 × 2.80 + 10 × 3.73 = 149.30. The same 50 m3 as two monthly cycles of 45 and 5 m3:
    // (20 × 2.80 + 15 × 3.73 + 10 × 6.50) + 5 × 2.80 = 176.95 + 14.00 = 190.95.
    let bk = book(&["nanan-2025.toml"]);
    let whole = compute_bill(
        &bk,
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 12 - 01),
            dec!(1000),
            dec!(1050),
        ),
    )
    .unwrap();
    let october = compute_bill(
        &bk,
        &request(
            date!(2025 - 10 - 01),
            date!(2025 - 11 - 01),
            dec!(1000),
            dec!(1045),
        ),
    )
    .unwrap();
    let november = compute_bill(
        &bk,
        &request(
            date!(2025 - 11 - 01),
            date!(2025 - 12 - 01),
            dec!(1045),
            dec!(1050),
        ),
    )
    .unwrap();
    assert_eq!(whole.total, dec!(149.30));
    assert_eq!((october.total, november.total), (dec!(176.95), dec!(14.00)));
    assert_eq!(october.total + november.total, dec!(190.95));
}

#[test]
fn estimated_bill_trued_up_by_the_actual_read() {
    let bk = book(&["nanan-2025.toml"]);
    // Estimated end read 1030: 30 m3 = 56.00 + 10 × 3.73 = 93.30, marked estimated.
    let mut req = request(
        date!(2025 - 10 - 01),
        date!(2025 - 11 - 01),
        dec!(1000),
        dec!(1030),
    );
    req.end.estimated = true;
    let estimated = compute_bill(&bk, &req).unwrap();
    assert!(estimated.estimated);
    assert_eq!(estimated.total, dec!(93.30));
    // The actual read arrives: 1026 → 26 m3 = 56.00 + 6 × 3.73 = 78.38.
    req.end = read(datetime!(2025-10-31 22:40 +8), dec!(1026));
    let actual = compute_bill(&bk, &req).unwrap();
    assert!(!actual.estimated);
    assert_eq!(actual.total, dec!(78.38));
    let adj = adjustment_lines(&estimated.lines, &actual.lines);
    assert_eq!(adj.len(), 8);
    assert_eq!(
        adj.iter().filter(|l| l.kind == LineKind::Reversal).count(),
        4
    );
    assert_eq!(adj[2].line.volume_m3, dec!(-10));
    assert_eq!(adj[2].line.amount, dec!(-27.80));
    assert_eq!(bill_total(&adj), dec!(-14.92));
    // Adjusting an adjustment reverses only its charges.
    let again = adjustment_lines(&adj, &estimated.lines);
    assert_eq!(bill_total(&again), dec!(14.92));
}

#[test]
fn bad_periods_are_refused() {
    let bk = book(&["nanan-2025.toml"]);
    let req = request(
        date!(2025 - 11 - 01),
        date!(2025 - 10 - 01),
        dec!(0),
        dec!(1),
    );
    assert!(matches!(
        compute_bill(&bk, &req),
        Err(BillingError::BadPeriod(_))
    ));
    // Before the tariff's effective date.
    let req = request(
        date!(2025 - 07 - 01),
        date!(2025 - 08 - 01),
        dec!(0),
        dec!(1),
    );
    assert!(matches!(
        compute_bill(&bk, &req),
        Err(BillingError::Tariff(_))
    ));
}

#[test]
fn cli_recomputes_a_bill_from_stored_inputs() {
    let bk = book(&["nanan-2025.toml"]);
    let req = request(
        date!(2025 - 10 - 01),
        date!(2025 - 11 - 01),
        dec!(99990),
        dec!(15),
    );
    let bill = compute_bill(&bk, &req).unwrap();
    // The shape of `bills.inputs`: the request under "request".
    let stored = serde_json::json!({ "request": req, "segments": [] });
    assert_eq!(stored["request"]["period_start"], "2025-10-01");
    let dir = std::env::temp_dir().join(format!("billing-bill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("inputs.json");
    std::fs::write(&path, stored.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .args(["bill", "--tariff"])
        .arg(format!(
            "{}/../tariffs/nanan-2025.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg("--inputs")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], "74.65");
    assert_eq!(v["total"], bill.total.to_string());
    assert_eq!(v["usage"]["rollover"], true);
    assert_eq!(v["lines"][2]["kind"], "charge");
    assert_eq!(v["lines"][2]["from"], "2025-10-01");
    std::fs::remove_dir_all(&dir).ok();
}
