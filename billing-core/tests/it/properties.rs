//! Properties: total = sum of lines; totals never fall when usage grows; splitting a usage or a
//! cycle in two changes the total by at most the rounding of the lines.

use billing_core::{
    BillRequest, QuoteRequest, RegisterRead, Tariff, TariffBook, compute_bill, quote,
};
use proptest::prelude::*;
use rust_decimal::Decimal;
use time::Date;
use time::macros::{date, offset};

fn shipped(name: &str) -> TariffBook {
    testkit::tariff::book(&[name])
}

/// Annual tiers, three components, large-household extra, no fixed charge (a fixed charge is
/// per bill by design, so splitting a cycle adds one).
const ANNUAL: &str = r#"name = "Annual test tariff"
currency = "CNY"
effective_from = "2020-01-01"
tier_period = "year"
[[classes]]
id = "residential"
base_persons = 4
extra_volume_per_person = "54"
  [[classes.tiers]]
  up_to = "216"
  prices = { water = "1.6013", sewage = "0.85", resource = "0.1" }
  [[classes.tiers]]
  up_to = "300"
  prices = { water = "2.4077", sewage = "0.85", resource = "0.1" }
  [[classes.tiers]]
  prices = { water = "4.8", sewage = "0.85", resource = "0.1" }
"#;

/// Volumes in litres as m3 with three decimals.
fn volume(max_litres: i64) -> impl Strategy<Value = Decimal> {
    (0..=max_litres).prop_map(|l| Decimal::new(l, 3))
}

fn quote_total(
    book: &TariffBook,
    persons: u32,
    before: Decimal,
    usage: Decimal,
) -> (Decimal, usize) {
    let q = quote(
        book,
        date!(2025 - 10 - 01),
        &QuoteRequest::new("residential", persons, before, usage),
    )
    .unwrap();
    (q.total, q.lines.len())
}

fn half_fen(lines: usize) -> Decimal {
    Decimal::new(5, 3) * Decimal::from(lines)
}

proptest! {
    #[test]
    fn total_is_the_sum_of_the_lines(persons in 1u32..12, before in volume(600_000), usage in volume(600_000)) {
        for book in [shipped("nanan-2025.toml"), shipped("fuzhou-example.toml")] {
            let q = quote(&book, date!(2025 - 10 - 01), &QuoteRequest::new("residential", persons, before, usage)).unwrap();
            let sum: Decimal = q.lines.iter().map(|l| l.amount).sum();
            prop_assert_eq!(q.total, sum);
            prop_assert_eq!(q.total.scale(), 2);
            for l in &q.lines {
                prop_assert_eq!(l.amount.scale(), 2);
            }
        }
    }

    #[test]
    fn monotonic_in_usage(persons in 1u32..12, before in volume(400_000), a in volume(400_000), b in volume(400_000)) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        for book in [shipped("nanan-2025.toml"), shipped("fuzhou-example.toml")] {
            prop_assert!(quote_total(&book, persons, before, lo).0 <= quote_total(&book, persons, before, hi).0);
        }
    }

    #[test]
    fn splitting_a_usage_changes_only_line_rounding(persons in 1u32..12, before in volume(400_000), a in volume(200_000), b in volume(200_000)) {
        for book in [shipped("nanan-2025.toml"), TariffBook::parse([("annual.toml", ANNUAL)]).unwrap()] {
            let (whole, n) = quote_total(&book, persons, before, a + b);
            let (first, n1) = quote_total(&book, persons, before, a);
            let (second, n2) = quote_total(&book, persons, before + a, b);
            prop_assert!((whole - first - second).abs() <= half_fen(n + n1 + n2));
        }
    }

    #[test]
    fn splitting_a_cycle_changes_only_line_rounding(
        persons in 1u32..12,
        before in volume(300_000),
        start_value in volume(50_000_000),
        first in volume(150_000),
        second in volume(150_000),
        start_day in 0i64..300,
        len1 in 1i64..60,
        len2 in 1i64..60,
    ) {
        // Annual tiers only: with monthly tiers a cycle's allowances are per month of the
        // cycle, so a split prices differently (docs/billing.md "Limits";
        // bill_golden.rs `splitting_a_cycle_on_monthly_tiers_changes_the_price`).
        let book = TariffBook::parse([("annual.toml", ANNUAL)]).unwrap();
        let s = date!(2024 - 01 - 01) + time::Duration::days(start_day);
        let m = s + time::Duration::days(len1);
        let e = m + time::Duration::days(len2);
        // Reads at the boundaries; the register wraps at 100000 m3.
        let cap = Decimal::from(100_000);
        let wrap = |v: Decimal| if v >= cap { v - cap } else { v };
        let v0 = start_value;
        let v1 = wrap(v0 + first);
        let v2 = wrap(v1 + second);
        let req = |from: Date, to: Date, a: Decimal, b: Decimal, before: Decimal| BillRequest {
            meter: "m".into(),
            class: "residential".into(),
            persons,
            township: false,
            period_start: from,
            period_end: to,
            start: RegisterRead { ts: from.midnight().assume_offset(offset!(+8)), value: a, estimated: false },
            end: RegisterRead { ts: to.midnight().assume_offset(offset!(+8)), value: b, estimated: false },
            capacity: cap,
            replacement: None,
            year_usage_before: before,
        };
        // Usage is allocated to tariff-year parts by days while split bills take it from
        // their reads, so the property is stated for cycles inside one tariff year.
        let same_year = s.year() == e.year()
            || (e.month() == time::Month::January && e.day() == 1 && e.year() == s.year() + 1);
        prop_assume!(same_year);
        let whole = compute_bill(&book, &req(s, e, v0, v2, before)).unwrap();
        let p1 = compute_bill(&book, &req(s, m, v0, v1, before)).unwrap();
        let p2 = compute_bill(&book, &req(m, e, v1, v2, before + first)).unwrap();
        prop_assert_eq!(whole.usage.total, first + second);
        prop_assert_eq!(p1.usage.total + p2.usage.total, first + second);
        let lines = whole.lines.len() + p1.lines.len() + p2.lines.len();
        prop_assert!((whole.total - p1.total - p2.total).abs() <= half_fen(lines),
            "whole {} vs {} + {}", whole.total, p1.total, p2.total);
    }
}

const DOMAIN_EXAMPLE: &str = r#"name = "Example residential tariff"
currency = "CNY"
effective_from = "2025-09-01"
tier_period = "month"
[[classes]]
id = "residential"
base_persons = 4
extra_volume_per_person = "5"
  [[classes.tiers]]
  up_to = "20"
  prices = { water = "1.85", sewage = "0.95" }
  [[classes.tiers]]
  prices = { water = "5.55", sewage = "0.95" }
"#;

proptest! {
    /// Any text, and any single-byte corruption of a valid file, is refused with an error or
    /// accepted, never a panic; accepted files price the largest inputs without overflow.
    #[test]
    fn tariff_parsing_never_panics(text in "\\PC{0,200}", pos in 0usize..400, byte in proptest::num::u8::ANY) {
        if let Ok(t) = Tariff::parse("fuzz.toml", &text) {
            prop_assert!(!t.classes.is_empty());
        }
        let mut bytes = DOMAIN_EXAMPLE.as_bytes().to_vec();
        let i = pos % bytes.len();
        bytes[i] = byte;
        let parsed = String::from_utf8(bytes).ok().and_then(|s| Tariff::parse("fuzz.toml", &s).ok());
        if let Some(t) = parsed {
            let book = TariffBook::new([t]).unwrap();
            for class in ["residential", "special"] {
                let req = QuoteRequest::new(class, 1000, billing_core::quote::MAX_VOLUME, billing_core::quote::MAX_VOLUME);
                if let Ok(q) = quote(&book, date!(2030 - 01 - 01), &req) {
                    prop_assert_eq!(q.total, q.lines.iter().map(|l| l.amount).sum::<Decimal>());
                }
            }
        }
    }

    #[test]
    fn huge_values_in_tariffs_are_refused_not_overflowing(digits in 10usize..40) {
        let big = "9".repeat(digits);
        let text = DOMAIN_EXAMPLE.replace("\"5.55\"", &format!("\"{big}\""));
        prop_assert!(Tariff::parse("big.toml", &text).is_err());
    }
}
