//! Modbus register-block decoding and IoT-platform envelope unwrapping throughput on one core.
//!
//! Run: `cargo bench -p decoders --bench modbus_envelope`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use decoders::envelope::{self, Envelope, Platform};
use decoders::modbus::{
    self, ByteOrder, DataType, RegisterFunction, RegisterMap, RegisterSpec, TableSpec,
};
use rust_decimal_macros::dec;

/// The generic electromagnetic flow meter of `edge-config/maps/generic-emf.toml`.
fn emf_map() -> RegisterMap {
    let f = |name: &str, quantity: &str, address: u16, data_type: DataType| {
        let mut s = RegisterSpec::new(
            name,
            quantity,
            RegisterFunction::Holding,
            address,
            data_type,
        );
        s.byte_order = ByteOrder::Abcd;
        s
    };
    let mut totals = [
        f("forward_total", "volume", 6, DataType::U32),
        f("reverse_total", "volume_reverse", 8, DataType::U32),
        f("net_total", "volume_net", 10, DataType::I32),
    ];
    for t in &mut totals {
        t.scale = dec!(0.001);
    }
    let mut registers = vec![
        f("flow", "volume_flow", 0, DataType::F32),
        f("velocity", "velocity", 2, DataType::F32),
        f("flow_percent", "flow_percent", 4, DataType::F32),
    ];
    registers.extend(totals);
    registers.push(f("pressure", "pressure", 12, DataType::F32));
    registers.push(f("alarm", "status_word", 14, DataType::U16));
    RegisterMap::new("generic-emf", registers)
}

/// A 12-row concentrator table: BCD address, u32 litres, status, u32 age (10 registers a row),
/// the largest block one 03/04 read returns (120 ≤ 125 registers).
fn concentrator_map() -> RegisterMap {
    let mut registers = Vec::new();
    for row in 1..=12u16 {
        let base = 1000 + (row - 1) * 10;
        let mut cols = [
            RegisterSpec::new(
                format!("meter_address[{row}]"),
                "meter_address",
                RegisterFunction::Input,
                base,
                DataType::Bcd { registers: 4 },
            ),
            RegisterSpec::new(
                format!("volume[{row}]"),
                "volume",
                RegisterFunction::Input,
                base + 4,
                DataType::U32,
            ),
            RegisterSpec::new(
                format!("status[{row}]"),
                "status_word",
                RegisterFunction::Input,
                base + 6,
                DataType::U16,
            ),
            RegisterSpec::new(
                format!("reading_age[{row}]"),
                "reading_age",
                RegisterFunction::Input,
                base + 7,
                DataType::U32,
            ),
        ];
        cols[1].scale = dec!(0.001);
        for c in &mut cols {
            c.row = Some(row);
        }
        registers.extend(cols);
    }
    let mut map = RegisterMap::new("concentrator", registers);
    map.tables.push(TableSpec {
        name: "meters".into(),
        function: RegisterFunction::Input,
        start: 1000,
        stride: 10,
        rows: 12,
    });
    map
}

fn bench(c: &mut Criterion) {
    let emf = emf_map();
    let emf_words = modbus::encode(
        &emf,
        &[
            ("flow", dec!(12.5)),
            ("velocity", dec!(0.75)),
            ("flow_percent", dec!(25)),
            ("forward_total", dec!(1234.567)),
            ("reverse_total", dec!(0.89)),
            ("net_total", dec!(1233.677)),
            ("pressure", dec!(0.35)),
            ("alarm", dec!(1)),
        ],
    )
    .unwrap_or_default();
    let conc = concentrator_map();
    let conc_words = modbus::encode(&conc, &|spec: &RegisterSpec| match spec.quantity.as_str() {
        "meter_address" => {
            Some(dec!(10000000000000) + rust_decimal::Decimal::from(spec.row.unwrap_or(0)))
        }
        "volume" => Some(dec!(1234.567)),
        "reading_age" => Some(dec!(300)),
        _ => None,
    })
    .unwrap_or_default();

    let mut g = c.benchmark_group("modbus");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_generic_emf_block", |b| {
        b.iter(|| modbus::decode(black_box(&emf), 0, black_box(&emf_words)))
    });
    g.bench_function("decode_concentrator_12_rows", |b| {
        b.iter(|| modbus::decode(black_box(&conc), 1000, black_box(&conc_words)))
    });
    g.finish();

    let frame = hex_frame();
    let mut env = Envelope::new(Platform::CtWing, "9e0fd11ab6d44b07a8ef7c0ecc5af5b8", frame);
    env.imei = Some("869060030130086".into());
    env.signal.rsrp = Some(dec!(-95));
    let ctwing = envelope::encode_envelope(Platform::CtWing, &env);
    let onenet = envelope::encode_envelope(Platform::OneNet, &env);
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_ctwing", |b| {
        b.iter(|| envelope::decode_envelope(black_box(&ctwing)))
    });
    g.bench_function("decode_onenet_with_signal", |b| {
        b.iter(|| envelope::decode_envelope(black_box(&onenet)))
    });
    g.finish();
}

/// A 34-byte CJ/T 188 read-data reply.
fn hex_frame() -> Vec<u8> {
    hex::decode("6810341290785634128115901F01785634122C000000002C3000251126200000C016")
        .unwrap_or_default()
}

criterion_group!(benches, bench);
criterion_main!(benches);
