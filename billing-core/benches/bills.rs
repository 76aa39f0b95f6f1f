//! Throughput of quotes and bills (one measured run is enough; see docs/billing.md).

use std::hint::black_box;

use billing_core::{
    BillRequest, QuoteRequest, RegisterRead, Tariff, TariffBook, compute_bill, quote,
};
use criterion::{Criterion, criterion_group, criterion_main};
use rust_decimal_macros::dec;
use time::macros::{date, datetime};

const NEWER: &str = r#"name = "Bench tariff from 2025-10-16"
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

fn benches(c: &mut Criterion) {
    let nanan = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tariffs/nanan-2025.toml"
    ))
    .unwrap();
    let one = TariffBook::new([Tariff::parse("nanan-2025.toml", &nanan).unwrap()]).unwrap();
    let two =
        TariffBook::parse([("nanan-2025.toml", nanan.as_str()), ("newer.toml", NEWER)]).unwrap();
    c.bench_function("parse_tariff_file", |b| {
        b.iter(|| Tariff::parse("nanan-2025.toml", black_box(&nanan)).unwrap())
    });
    let q = QuoteRequest::new("residential", 4, dec!(0), dec!(40));
    c.bench_function("quote_three_tiers", |b| {
        b.iter(|| quote(&one, date!(2025 - 10 - 01), black_box(&q)).unwrap())
    });
    let req = BillRequest {
        meter: "cjt188:00000000000001".into(),
        class: "residential".into(),
        persons: 4,
        township: false,
        period_start: date!(2025 - 10 - 01),
        period_end: date!(2025 - 11 - 01),
        start: RegisterRead {
            ts: datetime!(2025-09-30 23:00 +8),
            value: dec!(99990),
            estimated: false,
        },
        end: RegisterRead {
            ts: datetime!(2025-10-31 23:00 +8),
            value: dec!(21),
            estimated: false,
        },
        capacity: dec!(100000),
        replacement: None,
        year_usage_before: dec!(0),
    };
    c.bench_function("bill_one_tariff_rollover", |b| {
        b.iter(|| compute_bill(&one, black_box(&req)).unwrap())
    });
    c.bench_function("bill_price_change_in_cycle", |b| {
        b.iter(|| compute_bill(&two, black_box(&req)).unwrap())
    });
    let bill = compute_bill(&two, &req).unwrap();
    c.bench_function("bill_fingerprint", |b| {
        b.iter(|| black_box(&bill).fingerprint())
    });
}

criterion_group!(billing, benches);
criterion_main!(billing);
