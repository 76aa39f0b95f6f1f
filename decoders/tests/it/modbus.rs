//! Modbus register decoding and encoding: hand-computed register vectors per data type and byte
//! order, tables, errors, and encode → decode round trips.

use decoders::RecordValue;
use decoders::modbus::{
    ByteOrder, DataType, ModbusError, ReadBlock, RegisterFunction, RegisterMap, RegisterSpec,
    TableSpec, decode, decode_bits, decode_function, encode, encode_image, encode_value,
};
use model::{Decimal, Unit};
use proptest::prelude::*;
use rust_decimal_macros::dec;

fn spec(data_type: DataType, order: ByteOrder) -> RegisterSpec {
    let mut s = RegisterSpec::new("v", "volume", RegisterFunction::Holding, 0, data_type);
    s.byte_order = order;
    s
}

fn one(spec: RegisterSpec, words: &[u16]) -> Result<Decimal, ModbusError> {
    let map = RegisterMap::new("t", vec![spec]);
    let records = decode(&map, 0, words)?;
    assert_eq!(records.len(), 1, "one record expected");
    match &records[0].value {
        RecordValue::Number(n) => Ok(*n),
        other => panic!("not a number: {other:?}"),
    }
}

#[test]
fn f32_in_all_four_byte_orders() {
    // 0.545 f32 = 0x3F0B851F.
    let cases = [
        (ByteOrder::Abcd, [0x3F0B, 0x851F]),
        (ByteOrder::Cdab, [0x851F, 0x3F0B]),
        (ByteOrder::Badc, [0x0B3F, 0x1F85]),
        (ByteOrder::Dcba, [0x1F85, 0x0B3F]),
    ];
    for (order, words) in cases {
        assert_eq!(
            one(spec(DataType::F32, order), &words).unwrap(),
            dec!(0.545),
            "{order:?}"
        );
    }
    // PROTOCOLS.md quotes the Xintai meter's `1E 85 0B 3F` as 0.545 m³/h; exactly it is the
    // float next to it, whose shortest repr is 0.54499996: we keep what the meter sent.
    assert_eq!(
        one(spec(DataType::F32, ByteOrder::Dcba), &[0x1E85, 0x0B3F]).unwrap(),
        dec!(0.54499996)
    );
}

#[test]
fn f32_uses_shortest_decimal_repr() {
    // 0.1f32 = 0x3DCCCCCD is 0.100000001490116..., shortest repr "0.1".
    assert_eq!(
        one(spec(DataType::F32, ByteOrder::Abcd), &[0x3DCC, 0xCCCD]).unwrap(),
        dec!(0.1)
    );
    // 123456.7f32 = 0x47F1205A.
    assert_eq!(
        one(spec(DataType::F32, ByteOrder::Abcd), &[0x47F1, 0x205A]).unwrap(),
        dec!(123456.7)
    );
}

#[test]
fn float_extremes() {
    let f32_spec = || spec(DataType::F32, ByteOrder::Abcd);
    // -0.0 is zero; a denormal (1e-40) rounds to zero at 28 places; 3e38 exceeds Decimal.
    assert_eq!(one(f32_spec(), &[0x8000, 0x0000]).unwrap(), dec!(0));
    assert!(
        !one(f32_spec(), &[0x8000, 0x0000])
            .unwrap()
            .is_sign_negative()
    );
    assert_eq!(one(f32_spec(), &[0x0001, 0x16C2]).unwrap(), dec!(0));
    assert_eq!(
        one(f32_spec(), &[0x7F61, 0xB1E6]).unwrap_err(),
        ModbusError::Overflow {
            name: "v".into(),
            address: 0
        }
    );
}

#[test]
fn f64_in_abcd_and_dcba() {
    // 1.5 = 0x3FF8_0000_0000_0000; 1234.5678 = 0x40934A456D5CFAAD.
    assert_eq!(
        one(spec(DataType::F64, ByteOrder::Abcd), &[0x3FF8, 0, 0, 0]).unwrap(),
        dec!(1.5)
    );
    assert_eq!(
        one(spec(DataType::F64, ByteOrder::Dcba), &[0, 0, 0, 0xF83F]).unwrap(),
        dec!(1.5)
    );
    assert_eq!(
        one(
            spec(DataType::F64, ByteOrder::Abcd),
            &[0x4093, 0x4A45, 0x6D5C, 0xFAAD]
        )
        .unwrap(),
        dec!(1234.5678)
    );
}

#[test]
fn integers_with_scale_and_offset() {
    // ONICON F-3100: positive total 226794 with 3 display decimals = 226.794 (0x000375EA).
    let mut s = spec(DataType::U32, ByteOrder::Abcd);
    s.scale = dec!(0.001);
    assert_eq!(one(s.clone(), &[0x0003, 0x75EA]).unwrap(), dec!(226.794));
    s.byte_order = ByteOrder::Cdab;
    assert_eq!(one(s, &[0x75EA, 0x0003]).unwrap(), dec!(226.794));

    // i16 -250 = 0xFF06, scale 0.01 → -2.50; offset 10 → 7.50.
    let mut s = spec(DataType::I16, ByteOrder::Abcd);
    s.scale = dec!(0.01);
    s.offset = dec!(10);
    assert_eq!(one(s, &[0xFF06]).unwrap(), dec!(7.50));

    // i32 -2 = 0xFFFFFFFE; u16 BADC of 0x1234 stored as 0x3412.
    assert_eq!(
        one(spec(DataType::I32, ByteOrder::Abcd), &[0xFFFF, 0xFFFE]).unwrap(),
        dec!(-2)
    );
    assert_eq!(
        one(spec(DataType::U16, ByteOrder::Badc), &[0x3412]).unwrap(),
        dec!(4660)
    );

    // u64 0x0000_0001_0000_0002 = 4294967298; CDAB reverses the four words.
    assert_eq!(
        one(spec(DataType::U64, ByteOrder::Abcd), &[0, 1, 0, 2]).unwrap(),
        dec!(4294967298)
    );
    assert_eq!(
        one(spec(DataType::U64, ByteOrder::Cdab), &[2, 0, 1, 0]).unwrap(),
        dec!(4294967298)
    );
    // u64 max survives exactly.
    assert_eq!(
        one(
            spec(DataType::U64, ByteOrder::Abcd),
            &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]
        )
        .unwrap(),
        dec!(18446744073709551615)
    );
}

#[test]
fn bcd_one_and_two_registers() {
    assert_eq!(
        one(
            spec(DataType::Bcd { registers: 1 }, ByteOrder::Abcd),
            &[0x1234]
        )
        .unwrap(),
        dec!(1234)
    );
    assert_eq!(
        one(
            spec(DataType::Bcd { registers: 2 }, ByteOrder::Abcd),
            &[0x0012, 0x3456]
        )
        .unwrap(),
        dec!(123456)
    );
    assert_eq!(
        one(
            spec(DataType::Bcd { registers: 2 }, ByteOrder::Cdab),
            &[0x3456, 0x0012]
        )
        .unwrap(),
        dec!(123456)
    );
}

#[test]
fn bad_bcd_and_nan_are_typed_errors() {
    let err = one(
        spec(DataType::Bcd { registers: 1 }, ByteOrder::Abcd),
        &[0x12A4],
    )
    .unwrap_err();
    assert_eq!(
        err,
        ModbusError::BadBcd {
            name: "v".into(),
            address: 0,
            word: 0x12A4
        }
    );
    // Word-swapped BCD: the error names the register that holds the bad nibble.
    let mut s = spec(DataType::Bcd { registers: 2 }, ByteOrder::Cdab);
    s.address = 5;
    let map = RegisterMap::new("t", vec![s]);
    assert_eq!(
        decode(&map, 5, &[0x1234, 0x00F0]).unwrap_err(),
        ModbusError::BadBcd {
            name: "v".into(),
            address: 6,
            word: 0x00F0
        }
    );
    // 0x7FC00000 is a quiet NaN; 0x7F800000 is +inf.
    for words in [[0x7FC0, 0], [0x7F80, 0]] {
        assert_eq!(
            one(spec(DataType::F32, ByteOrder::Abcd), &words).unwrap_err(),
            ModbusError::NotFinite {
                name: "v".into(),
                address: 0
            }
        );
    }
}

#[test]
fn block_decodes_only_values_inside_it() {
    let mut a = RegisterSpec::new(
        "a",
        "pressure",
        RegisterFunction::Holding,
        10,
        DataType::U16,
    );
    a.unit = Some(Unit::Bar);
    let b = RegisterSpec::new("b", "volume", RegisterFunction::Holding, 12, DataType::U32);
    let c = RegisterSpec::new("c", "volume", RegisterFunction::Input, 11, DataType::U16);
    let map = RegisterMap::new("t", vec![a, b, c]);
    // Block 10..13 holds a (10), c (11, input) but b (12..14) only partly: b skipped.
    let records = decode(&map, 10, &[7, 8, 9]).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].value, RecordValue::Number(dec!(7)));
    assert_eq!(records[0].unit, Some(Unit::Bar));
    assert_eq!(records[1].value, RecordValue::Number(dec!(8)));
    // Restricting to holding registers drops c.
    let records = decode_function(&map, RegisterFunction::Holding, 10, &[7, 8, 9, 1]).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].value, RecordValue::Number(dec!(589825)));
    // A block past 65535 is an error, not a wrap.
    assert!(matches!(
        decode(&map, 65535, &[1, 2]),
        Err(ModbusError::AddressOverflow { .. })
    ));
}

#[test]
fn coils_decode_to_zero_and_one() {
    let valve = RegisterSpec::new(
        "valve",
        "valve_state",
        RegisterFunction::Coil,
        3,
        DataType::Bool,
    );
    let map = RegisterMap::new("t", vec![valve]);
    let records =
        decode_bits(&map, RegisterFunction::Coil, 0, &[false, false, true, true]).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, RecordValue::Number(dec!(1)));
    let image = encode_image(&map, &[("valve", dec!(1))]).unwrap();
    assert_eq!(
        image.read_bits(RegisterFunction::Coil, 2, 2),
        Some(vec![false, true])
    );
}

fn table_map() -> RegisterMap {
    let mut registers = Vec::new();
    for row in 1..=3u16 {
        let base = 100 + (row - 1) * 4;
        let mut id = RegisterSpec::new(
            format!("address[{row}]"),
            "meter_address",
            RegisterFunction::Input,
            base,
            DataType::Bcd { registers: 2 },
        );
        id.row = Some(row);
        let mut vol = RegisterSpec::new(
            format!("volume[{row}]"),
            "volume",
            RegisterFunction::Input,
            base + 2,
            DataType::U32,
        );
        vol.scale = dec!(0.001);
        vol.unit = Some(Unit::CubicMetre);
        vol.row = Some(row);
        registers.push(id);
        registers.push(vol);
    }
    let mut map = RegisterMap::new("conc", registers);
    map.tables.push(TableSpec {
        name: "meters".into(),
        function: RegisterFunction::Input,
        start: 100,
        stride: 4,
        rows: 3,
    });
    map
}

#[test]
fn table_rows_become_subunits_and_empty_rows_are_skipped() {
    let map = table_map();
    // Row 1: meter 00123456, 1234.567 m³ (0x0012D687); row 2 empty (0xFFFF); row 3: 00000042, 0.
    let words = [
        0x0012, 0x3456, 0x0012, 0xD687, //
        0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, //
        0x0000, 0x0042, 0x0000, 0x0000,
    ];
    let records = decode(&map, 100, &words).unwrap();
    let got: Vec<(u16, &str, RecordValue)> = records
        .iter()
        .map(|r| (r.subunit, r.quantity.as_ref(), r.value.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "meter_address", RecordValue::Number(dec!(123456))),
            (1, "volume", RecordValue::Number(dec!(1234.567))),
            (3, "meter_address", RecordValue::Number(dec!(42))),
            (3, "volume", RecordValue::Number(dec!(0.000))),
        ]
    );
}

#[test]
fn encode_gives_the_register_span_and_decodes_back() {
    let map = table_map();
    let values = [
        ("address[1]", dec!(123456)),
        ("volume[1]", dec!(1234.567)),
        ("address[3]", dec!(42)),
        ("volume[3]", dec!(7.0005)), // rounds half-even to 7.000
    ];
    let words = encode(&map, &values).unwrap();
    assert_eq!(map.register_span(), Some((100, 12)));
    assert_eq!(
        words,
        vec![
            0x0012, 0x3456, 0x0012, 0xD687, 0, 0, 0, 0, 0x0000, 0x0042, 0x0000, 0x1B58
        ]
    );
    let records = decode(&map, 100, &words).unwrap();
    assert_eq!(records.len(), 4);
    assert_eq!(records[3].value, RecordValue::Number(dec!(7.000)));
}

#[test]
fn encode_rejects_values_that_do_not_fit() {
    let s = spec(DataType::U16, ByteOrder::Abcd);
    assert!(matches!(
        encode_value(&s, dec!(65536)),
        Err(ModbusError::OutOfRange { .. })
    ));
    assert!(matches!(
        encode_value(&s, dec!(-1)),
        Err(ModbusError::OutOfRange { .. })
    ));
    let s = spec(DataType::Bcd { registers: 1 }, ByteOrder::Abcd);
    assert!(matches!(
        encode_value(&s, dec!(10000)),
        Err(ModbusError::OutOfRange { .. })
    ));
    assert_eq!(encode_value(&s, dec!(9999)).unwrap(), vec![0x9999]);
}

#[test]
fn read_plan_merges_close_values_and_splits_tables() {
    let map = RegisterMap::new(
        "t",
        vec![
            RegisterSpec::new("a", "x", RegisterFunction::Holding, 0, DataType::F32),
            RegisterSpec::new("b", "x", RegisterFunction::Holding, 4, DataType::U16),
            RegisterSpec::new("c", "x", RegisterFunction::Holding, 100, DataType::U64),
            RegisterSpec::new("d", "x", RegisterFunction::Input, 0, DataType::U16),
            RegisterSpec::new("e", "x", RegisterFunction::Coil, 5, DataType::Bool),
        ],
    );
    let plan = map.read_plan(125, 8);
    let block = |function, start, count| ReadBlock {
        function,
        start,
        count,
    };
    assert_eq!(
        plan,
        vec![
            block(RegisterFunction::Coil, 5, 1),
            block(RegisterFunction::Holding, 0, 5),
            block(RegisterFunction::Holding, 100, 4),
            block(RegisterFunction::Input, 0, 1),
        ]
    );
    // A small block limit splits even adjacent values.
    assert_eq!(map.read_plan(3, 8).len(), 5);
}

fn any_order() -> impl Strategy<Value = ByteOrder> {
    prop_oneof![
        Just(ByteOrder::Abcd),
        Just(ByteOrder::Cdab),
        Just(ByteOrder::Badc),
        Just(ByteOrder::Dcba)
    ]
}

fn any_int_type() -> impl Strategy<Value = DataType> {
    prop_oneof![
        Just(DataType::U16),
        Just(DataType::I16),
        Just(DataType::U32),
        Just(DataType::I32),
        Just(DataType::U64),
        (1u8..=4).prop_map(|registers| DataType::Bcd { registers }),
    ]
}

proptest! {
    /// decode(encode(v)) == v for integer types: any raw in range, any scale 10^-k, any offset.
    #[test]
    fn integer_encode_decode_round_trip(
        data_type in any_int_type(),
        order in any_order(),
        raw in any::<u64>(),
        k in 0u32..6,
        offset in -1000i64..1000,
    ) {
        let raw = match data_type {
            DataType::U16 => Decimal::from(raw % 65536),
            DataType::I16 => Decimal::from(raw as u16 as i16),
            DataType::U32 => Decimal::from(raw as u32),
            DataType::I32 => Decimal::from(raw as u32 as i32),
            DataType::U64 => Decimal::from(raw),
            DataType::Bcd { registers } => Decimal::from(raw % 10u64.pow(4 * u32::from(registers))),
            _ => unreachable!(),
        };
        let mut s = spec(data_type, order);
        s.scale = Decimal::new(1, k);
        s.offset = Decimal::from(offset);
        let value = raw * s.scale + s.offset;
        let words = encode_value(&s, value).unwrap();
        prop_assert_eq!(words.len(), usize::from(data_type.width()));
        prop_assert_eq!(one(s, &words).unwrap(), value);
    }

    /// Floats: registers → decimal → registers gives the same registers (shortest repr
    /// round-trips), for magnitudes a meter reports.
    #[test]
    fn float_decode_encode_round_trip(
        order in any_order(),
        mantissa in -99_999_999i64..99_999_999,
        exp in 0u32..8,
        wide in any::<bool>(),
    ) {
        let x = Decimal::new(mantissa, exp);
        let data_type = if wide { DataType::F64 } else { DataType::F32 };
        let s = spec(data_type, order);
        let words = encode_value(&s, x).unwrap();
        let back = one(s.clone(), &words).unwrap();
        prop_assert_eq!(encode_value(&s, back).unwrap(), words);
        if wide {
            // f64 holds 8 significant digits exactly.
            prop_assert_eq!(back, x.normalize());
        }
    }

    /// decode never panics on arbitrary registers, whatever the spec.
    #[test]
    fn decode_never_panics(
        data_type in prop_oneof![any_int_type(), Just(DataType::F32), Just(DataType::F64)],
        order in any_order(),
        start in any::<u16>(),
        words in proptest::collection::vec(any::<u16>(), 0..8),
    ) {
        let map = RegisterMap::new("t", vec![spec(data_type, order)]);
        drop(decode(&map, start, &words));
    }
}
