//! Wireless M-Bus throughput: AES mode-5 telegrams per second on one core, with the expanded
//! key cached per meter in the `FormatCache`.
//!
//! Run: `cargo bench -p decoders --bench wmbus`.

use std::hint::black_box;
use std::time::{Duration, Instant};

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

/// Records [`RECORDS`] decodes to: volume, date-time, error flags, volume at the set date (the
/// 0x2F filler is not a record).
const EXPECTED_RECORDS: usize = 4;

/// Checks once, before anything is timed, that the bench telegram parses (mode 5, decrypted)
/// and decodes to [`EXPECTED_RECORDS`] records, so the bench cannot silently time an error path.
fn assert_decodes(frame: &[u8], key: &Option<[u8; 16]>, cache: &mut FormatCache) {
    let telegram = wmbus::parse(frame, key, cache)
        .unwrap_or_else(|e| panic!("the bench telegram does not parse: {e}"));
    // Mode 5 plaintext: the 2F 2F check bytes, the records, 2F padding to the AES block.
    assert!(
        telegram
            .payload
            .windows(RECORDS.len())
            .any(|w| w == RECORDS.as_slice()),
        "the bench telegram was not decrypted to its records: {:02X?}",
        telegram.payload
    );
    let decoded = wmbus::decode(frame, key, cache)
        .unwrap_or_else(|e| panic!("the bench telegram does not decode: {e}"));
    assert_eq!(
        decoded.records.len(),
        EXPECTED_RECORDS,
        "the bench telegram decodes to other records: {:?}",
        decoded.records
    );
}

fn telegram() -> Vec<u8> {
    let meter = encode::WmbusMeter {
        manufacturer: wmbus::manufacturer_from_code("KAM").unwrap_or(0),
        id: 0x1234_5678,
        version: 0x1B,
        device_type: 0x07,
    };
    encode::telegram(&meter, &RECORDS, 0x2A, Some(KEY))
}

/// CPU time of this thread in nanoseconds (Linux `schedstat`), so the figure stays meaningful
/// on a shared, loaded machine where wall time includes waiting for a core. `None` elsewhere.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Returns the CPU time `iters` runs of `f` take (wall time if CPU time is unknown). The
/// scheduler updates the CPU-time counter only every few milliseconds, so the batch is repeated
/// until at least 40 ms of CPU time have passed and the mean per batch is returned.
fn cpu_time(iters: u64, mut f: impl FnMut()) -> Duration {
    const MIN_NS: u64 = 40_000_000;
    let wall = Instant::now();
    let Some(start) = thread_cpu_ns() else {
        for _ in 0..iters {
            f();
        }
        return wall.elapsed();
    };
    let mut batches = 0u64;
    loop {
        for _ in 0..iters {
            f();
        }
        batches += 1;
        let spent = thread_cpu_ns().unwrap_or(start).saturating_sub(start);
        if spent >= MIN_NS {
            return Duration::from_nanos(spent / batches);
        }
    }
}

fn bench(c: &mut Criterion) {
    let frame = telegram();
    let key = Some(KEY);
    let mut cache = FormatCache::new();
    assert_decodes(&frame, &key, &mut cache);
    let mut group = c.benchmark_group("wmbus");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_mode5_telegram", |b| {
        b.iter(|| wmbus::parse(black_box(&frame), &key, &mut cache))
    });
    group.bench_function("decode_mode5_telegram", |b| {
        b.iter(|| wmbus::decode(black_box(&frame), &key, &mut cache))
    });
    group.finish();

    // Same work, timed in thread CPU time: telegrams per second per core.
    let mut group = c.benchmark_group("wmbus_cpu_time");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    group.bench_function("parse_mode5_telegram", |b| {
        b.iter_custom(|iters| {
            cpu_time(iters, || {
                black_box(wmbus::parse(black_box(&frame), &key, &mut cache)).ok();
            })
        })
    });
    group.bench_function("decode_mode5_telegram", |b| {
        b.iter_custom(|iters| {
            cpu_time(iters, || {
                black_box(wmbus::decode(black_box(&frame), &key, &mut cache)).ok();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
