//! Wireless M-Bus throughput: AES mode-5 telegrams per second on one core, with the expanded
//! key cached per meter in the `FormatCache`.
//!
//! Run: `cargo bench -p decoders --bench wmbus`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use decoders::wmbus::{self, FormatCache, encode};

const KEY: [u8; 16] = [
    0x0F, 0x1E, 0x2D, 0x3C, 0x4B, 0x5A, 0x69, 0x78, 0x87, 0x96, 0xA5, 0xB4, 0xC3, 0xD2, 0xE1, 0xF0,
];

/// A typical water-meter payload: volume (8-digit BCD, 10⁻³ m³), date-time (type F), error
/// flags, and volume at the set date (storage 1).
const RECORDS: [u8; 24] = [
    0x0C, 0x13, 0x27, 0x04, 0x85, 0x02, // volume 2850.427 m³
    0x04, 0x6D, 0x32, 0x37, 0x1F, 0x15, // date-time
    0x02, 0xFD, 0x17, 0x00, 0x00, // error flags
    0x4C, 0x13, 0x11, 0x22, 0x33, 0x00, // volume at set date (storage 1)
    0x2F, // filler
];

fn telegram() -> Vec<u8> {
    let meter = encode::WmbusMeter {
        manufacturer: wmbus::manufacturer_from_code("KAM").unwrap_or(0),
        id: 0x1234_5678,
        version: 0x1B,
        device_type: 0x07,
    };
    encode::telegram(&meter, &RECORDS, 0x2A, Some(KEY))
}

fn bench(c: &mut Criterion) {
    let frame = telegram();
    let key = Some(KEY);
    let mut cache = FormatCache::new();
    let mut group = c.benchmark_group("wmbus");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_mode5_telegram", |b| {
        b.iter(|| wmbus::parse(black_box(&frame), &key, &mut cache))
    });
    group.bench_function("decode_mode5_telegram", |b| {
        b.iter(|| wmbus::decode(black_box(&frame), &key, &mut cache))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
