//! Frames per CPU-second of this thread, for a machine shared with other builds.
//!
//! Criterion (`benches/decode.rs`) measures wall time, which on a loaded machine counts the
//! time other processes hold the core. This bench reads the thread's own on-CPU time from
//! `/proc/thread-self/schedstat` (Linux) and divides: frames per second per core.
//!
//! `cargo bench -p decoders --bench cpu_time`

use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
use decoders::mbus::{self, DataRecord, RspUdHeader};
use rust_decimal::Decimal;
use std::hint::black_box;

/// Nanoseconds this thread has spent on a CPU.
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("/proc/thread-self/schedstat (Linux only)");
    stat.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat format")
}

fn measure(name: &str, target_per_s: f64, mut f: impl FnMut()) {
    // Warm up, then run batches until 2 CPU-seconds are used.
    for _ in 0..100_000 {
        f();
    }
    let start_cpu = thread_cpu_ns();
    let start_wall = std::time::Instant::now();
    let mut n: u64 = 0;
    while thread_cpu_ns() - start_cpu < 2_000_000_000 {
        for _ in 0..10_000 {
            f();
        }
        n += 10_000;
    }
    let cpu_s = (thread_cpu_ns() - start_cpu) as f64 / 1e9;
    let wall_s = start_wall.elapsed().as_secs_f64();
    let per_s = n as f64 / cpu_s;
    println!(
        "{name}: {:.0} ns/frame CPU, {:.2} M frames/s per core (target {:.0} M/s: {}); wall {:.2} M/s",
        1e9 / per_s,
        per_s / 1e6,
        target_per_s / 1e6,
        if per_s >= target_per_s {
            "met"
        } else {
            "NOT met"
        },
        n as f64 / wall_s / 1e6,
    );
}

fn main() {
    let reading = Cjt188Reading {
        current_m3: Decimal::new(12_345_678, 2),
        settlement_m3: Decimal::new(12_000_000, 2),
        unit: cjt188::UNIT_M3,
        clock: time::macros::datetime!(2026-11-24 10:43:12),
        status: 0x0004,
    };
    let address = cjt188::parse_address("78330011223344").unwrap();
    let frame =
        cjt188::encode_with_preamble(&Cjt188Frame::read_data_reply(0x10, address, 7, &reading), 2);
    measure("cjt188 901F reply, parse (allocation-free)", 10e6, || {
        black_box(cjt188::parse(black_box(&frame)).unwrap());
    });
    measure("cjt188 901F reply, decode (DecodedFrame)", 0.0, || {
        black_box(cjt188::decode(black_box(&frame)).unwrap());
    });

    let header = RspUdHeader {
        id: 0x1234_5678,
        manufacturer: mbus::manufacturer_id("KAM").unwrap(),
        version: 0x1B,
        medium: 0x07,
        access_number: 0x2A,
        status: 0,
        signature: 0,
    };
    let records = [
        DataRecord::int32(0x13, 12_345_678),
        DataRecord::bcd8(0x13, 12_000_000).storage(1),
        DataRecord::date(time::macros::date!(2026 - 10 - 31)).storage(1),
        DataRecord::date_time(time::macros::datetime!(2026-11-24 10:43)),
        DataRecord::int16(0x3B, 1234),
        DataRecord::int16(0x3B, 2345).function(decoders::Function::Maximum),
        DataRecord::int16(0x5A, 123),
        DataRecord::int16(0x66, 98),
        DataRecord::int32(0x22, 8760),
        DataRecord::raw(0x02, 0xFD, vec![0, 0]).vife_chain(&[0x17]),
    ];
    let frame = mbus::encode::rsp_ud(1, &header, &records);
    measure(
        "mbus 10-record long frame, parse + scaled values (allocation-free)",
        2e6,
        || {
            let rsp = mbus::parse(black_box(&frame)).unwrap();
            let mut sum = Decimal::ZERO;
            for record in rsp.records {
                if let Some((value, _)) = record.unwrap().number() {
                    sum += value;
                }
            }
            black_box(sum);
        },
    );
    measure(
        "mbus 10-record long frame, decode (DecodedFrame)",
        0.0,
        || {
            black_box(mbus::decode(black_box(&frame)).unwrap());
        },
    );
}
