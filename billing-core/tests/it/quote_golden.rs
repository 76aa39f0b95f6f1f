//! Golden quotes computed by hand (Nan'an 2025: 2.80 / 3.73 / 6.50 per m3 water + sewage).

use billing_core::{QuoteRequest, TariffBook, quote, to_fen};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use time::macros::date;

fn book(name: &str) -> TariffBook {
    testkit::tariff::book(&[name])
}

fn amounts(q: &billing_core::Quote) -> Vec<(String, u32, Decimal, Decimal)> {
    q.lines
        .iter()
        .map(|l| (l.component.clone(), l.tier, l.volume_m3, l.amount))
        .collect()
}

#[test]
fn within_tier_one() {
    let q = quote(
        &book("nanan-2025.toml"),
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(12)),
    )
    .unwrap();
    // 12 × 1.85 = 22.20, 12 × 0.95 = 11.40.
    assert_eq!(
        amounts(&q),
        vec![
            ("water".into(), 1, dec!(12), dec!(22.20)),
            ("sewage".into(), 1, dec!(12), dec!(11.40))
        ]
    );
    assert_eq!(q.total.to_string(), "33.60");
}

#[test]
fn crossing_one_tier() {
    let q = quote(
        &book("nanan-2025.toml"),
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(28)),
    )
    .unwrap();
    // 20 × 2.80 = 56.00; 8 × 2.78 = 22.24; 8 × 0.95 = 7.60 → 85.84.
    assert_eq!(q.total, dec!(85.84));
    assert_eq!(q.lines.len(), 4);
    assert_eq!(q.lines[2].amount, dec!(22.24));
}

#[test]
fn crossing_two_tiers() {
    let q = quote(
        &book("nanan-2025.toml"),
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(40)),
    )
    .unwrap();
    // 20 × 2.80 + 15 × 3.73 + 5 × 6.50 = 56.00 + 55.95 + 32.50.
    assert_eq!(q.total.to_string(), "144.45");
    let json = serde_json::to_string(&q).unwrap();
    assert!(json.contains("\"total\":\"144.45\""), "{json}");
    assert!(json.contains("\"amount\":\"41.70\""), "{json}");
}

#[test]
fn usage_before_moves_the_tier_position() {
    // 18 m3 already in the period, 5 more: 2 in tier 1, 3 in tier 2.
    let q = quote(
        &book("nanan-2025.toml"),
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(18), dec!(5)),
    )
    .unwrap();
    // 2 × 2.80 = 5.60; 3 × 2.78 = 8.34; 3 × 0.95 = 2.85 → 16.79.
    assert_eq!(q.total, dec!(16.79));
    assert_eq!(amounts(&q)[0], ("water".into(), 1, dec!(2), dec!(3.70)));
}

#[test]
fn fractional_volumes_round_each_line_half_up_once() {
    // 0.003 m3 × 1.85 = 0.00555 → 0.01; × 0.95 = 0.00285 → 0.00.
    let q = quote(
        &book("nanan-2025.toml"),
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(0.003)),
    )
    .unwrap();
    assert_eq!(q.lines[0].amount, dec!(0.01));
    assert_eq!(q.lines[1].amount, dec!(0.00));
    assert_eq!(q.total, dec!(0.01));
    assert_eq!(to_fen(dec!(0.125)), dec!(0.13));
    assert_eq!(to_fen(dec!(0.135)), dec!(0.14));
    assert_eq!(to_fen(dec!(-0.125)), dec!(-0.13));
    assert_eq!(to_fen(dec!(7)).to_string(), "7.00");
}

#[test]
fn large_household_annual_example_with_fixed_and_township() {
    // EXAMPLE tariff (annual): bounds 216 / 300 for 4 persons, +54 per extra person.
    // 7 persons: bounds 216 + 162 = 378, 300 + 162 = 462. Usage 100 after 350 this year:
    // 28 m3 in tier 1 and 72 m3 in tier 2.
    let mut req = QuoteRequest::new("residential", 7, dec!(350), dec!(100));
    let q = quote(&book("fuzhou-example.toml"), date!(2025 - 03 - 01), &req).unwrap();
    assert!(q.notice.as_deref().unwrap().contains("EXAMPLE"));
    let a = amounts(&q);
    assert_eq!(a[0], ("water".into(), 1, dec!(28), dec!(44.80)));
    assert_eq!(a[1], ("sewage".into(), 1, dec!(28), dec!(23.80)));
    assert_eq!(a[2], ("resource".into(), 1, dec!(28), dec!(2.80)));
    assert_eq!(a[3], ("water".into(), 2, dec!(72), dec!(172.80)));
    assert_eq!(a[4], ("sewage".into(), 2, dec!(72), dec!(61.20)));
    assert_eq!(a[5], ("resource".into(), 2, dec!(72), dec!(7.20)));
    assert_eq!(a[6], ("fixed:meter_service".into(), 0, dec!(0), dec!(1.00)));
    assert_eq!(q.total, dec!(313.60));
    // The same household in a township: sewage at 0.50.
    req.township = true;
    let q = quote(&book("fuzhou-example.toml"), date!(2025 - 03 - 01), &req).unwrap();
    // 28 × 0.50 = 14.00, 72 × 0.50 = 36.00: 313.60 − 23.80 − 61.20 + 14.00 + 36.00.
    assert_eq!(q.total, dec!(278.60));
    // 4 persons, same position: all 100 m3 in tier 3 (350 > 300).
    let q = quote(
        &book("fuzhou-example.toml"),
        date!(2025 - 03 - 01),
        &QuoteRequest::new("residential", 4, dec!(350), dec!(100)),
    )
    .unwrap();
    // 100 × (4.80 + 0.85 + 0.10) + 1.00 = 576.00.
    assert_eq!(q.total, dec!(576.00));
}

#[test]
fn non_residential_and_special_are_flat() {
    let b = book("nanan-2025.toml");
    let q = quote(
        &b,
        date!(2025 - 10 - 01),
        &QuoteRequest::new("non_residential", 1, dec!(0), dec!(100)),
    )
    .unwrap();
    assert_eq!(q.total, dec!(360.00));
    let q = quote(
        &b,
        date!(2025 - 10 - 01),
        &QuoteRequest::new("special", 1, dec!(0), dec!(10.5)),
    )
    .unwrap();
    // 10.5 × 3.00 = 31.50; 10.5 × 1.40 = 14.70.
    assert_eq!(q.total, dec!(46.20));
}

#[test]
fn refuses_out_of_range_inputs_and_missing_tariffs() {
    let b = book("nanan-2025.toml");
    assert!(
        quote(
            &b,
            date!(2025 - 10 - 01),
            &QuoteRequest::new("residential", 4, dec!(0), dec!(-1))
        )
        .is_err()
    );
    assert!(
        quote(
            &b,
            date!(2025 - 10 - 01),
            &QuoteRequest::new("residential", 0, dec!(0), dec!(1))
        )
        .is_err()
    );
    assert!(
        quote(
            &b,
            date!(2025 - 01 - 01),
            &QuoteRequest::new("residential", 4, dec!(0), dec!(1))
        )
        .is_err()
    );
    assert!(
        quote(
            &b,
            date!(2025 - 10 - 01),
            &QuoteRequest::new("hotel", 4, dec!(0), dec!(1))
        )
        .is_err()
    );
}

#[test]
fn cli_prints_json_with_total() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .args(["quote", "--tariff"])
        .arg(format!(
            "{}/../tariffs/nanan-2025.toml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([
            "--class",
            "residential",
            "--persons",
            "4",
            "--year-usage-before",
            "0",
            "--usage",
            "40",
            "--date",
            "2025-10-01",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], "144.45");
    assert_eq!(v["lines"].as_array().unwrap().len(), 6);
    assert_eq!(v["lines"][4]["component"], "water");
    assert_eq!(v["lines"][4]["tier"], 3);
    assert_eq!(v["lines"][4]["unit_price"], "5.55");
    // A broken file: non-zero exit, message with the line.
    let dir = std::env::temp_dir().join(format!("billing-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\ncurrency = \"CNY\"\neffective_from = \"2025-01-01\"\ntier_period = \"month\"\nclasses = []\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billing"))
        .args(["quote", "--usage", "1", "--tariff"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:5: classes: at least one class"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tier_bounds_are_inclusive() {
    let b = book("nanan-2025.toml");
    // Exactly 20 m3: all in tier 1.
    let q = quote(
        &b,
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(20)),
    )
    .unwrap();
    assert!(q.lines.iter().all(|l| l.tier == 1));
    assert_eq!(q.total, dec!(56.00));
    // One litre more: 0.001 m3 in tier 2 (0.00278 → 0.00, 0.00095 → 0.00).
    let q = quote(
        &b,
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(20.001)),
    )
    .unwrap();
    assert_eq!(
        q.lines
            .iter()
            .filter(|l| l.tier == 2)
            .map(|l| l.volume_m3)
            .collect::<Vec<_>>(),
        vec![dec!(0.001), dec!(0.001)]
    );
    assert_eq!(q.total, dec!(56.00));
    // Zero usage: no lines, total 0.00.
    let q = quote(
        &b,
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", 4, dec!(0), dec!(0)),
    )
    .unwrap();
    assert!(q.lines.is_empty());
    assert_eq!(q.total.to_string(), "0.00");
}
