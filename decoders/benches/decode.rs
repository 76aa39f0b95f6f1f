//! Frames per second for a CJ/T 188 901F reply and a 10-record M-Bus long frame.
//!
//! `cargo bench -p decoders --bench decode`; the figures are in docs/benchmarks.md.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
use decoders::mbus::{self, DataRecord, RspUdHeader};
use rust_decimal::Decimal;
use std::hint::black_box;

fn cjt188_reply() -> Vec<u8> {
    let reading = Cjt188Reading {
        current_m3: Decimal::new(12_345_678, 2),
        settlement_m3: Decimal::new(12_000_000, 2),
        unit: cjt188::UNIT_M3,
        clock: time::macros::datetime!(2026-11-24 10:43:12),
        status: 0x0004,
    };
    let address = cjt188::parse_address("78330011223344").unwrap();
    cjt188::encode_with_preamble(&Cjt188Frame::read_data_reply(0x10, address, 7, &reading), 2)
}

/// A water meter answer with 10 records of the usual kinds.
fn mbus_frame() -> Vec<u8> {
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
        DataRecord::int32(0x13, 12_345_678),           // volume, L
        DataRecord::bcd8(0x13, 12_000_000).storage(1), // volume at due date
        DataRecord::date(time::macros::date!(2026 - 10 - 31)).storage(1),
        DataRecord::date_time(time::macros::datetime!(2026-11-24 10:43)),
        DataRecord::int16(0x3B, 1234), // flow, L/h
        DataRecord::int16(0x3B, 2345).function(decoders::Function::Maximum),
        DataRecord::int16(0x5A, 123),  // flow temperature 0.1 °C
        DataRecord::int16(0x66, 98),   // external temperature
        DataRecord::int32(0x22, 8760), // on time, hours
        DataRecord::raw(0x02, 0xFD, vec![0, 0]).vife_chain(&[0x17]), // error flags
    ];
    mbus::encode::rsp_ud(1, &header, &records)
}

fn benches(c: &mut Criterion) {
    let frame = cjt188_reply();
    let mut group = c.benchmark_group("cjt188_901f_reply");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse (allocation-free)", |b| {
        b.iter(|| cjt188::parse(black_box(&frame)).unwrap())
    });
    group.bench_function("decode (DecodedFrame)", |b| {
        b.iter(|| cjt188::decode(black_box(&frame)).unwrap())
    });
    group.finish();

    let frame = mbus_frame();
    assert_eq!(mbus::decode(&frame).unwrap().records.len(), 10);
    let mut group = c.benchmark_group("mbus_long_frame_10_records");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse + scaled values (allocation-free)", |b| {
        b.iter(|| {
            let rsp = mbus::parse(black_box(&frame)).unwrap();
            let mut sum = Decimal::ZERO;
            for record in rsp.records {
                if let Some((value, _unit)) = record.unwrap().number() {
                    sum += value;
                }
            }
            sum
        })
    });
    group.bench_function("decode (DecodedFrame)", |b| {
        b.iter(|| mbus::decode(black_box(&frame)).unwrap())
    });
    group.finish();
}

criterion_group!(decode, benches);
criterion_main!(decode);
