//! Property tests: encode → decode round trips, and no panic on arbitrary or mutated bytes.

use decoders::cjt188::{
    self, Cjt188Frame, Cjt188Reading, DiOrder, HeatReading, Payload, UnitValue,
};
use decoders::mbus::{self, DataRecord, RspUdHeader};
use decoders::{Function, RecordValue};
use model::{Decimal, Unit};
use proptest::prelude::*;
use time::{Date, Month, PrimitiveDateTime, Time};

fn bcd_byte() -> impl Strategy<Value = u8> {
    (0u8..10, 0u8..10).prop_map(|(h, l)| (h << 4) | l)
}

fn address() -> impl Strategy<Value = [u8; 7]> {
    proptest::array::uniform7(bcd_byte())
}

fn clock() -> impl Strategy<Value = PrimitiveDateTime> {
    (2000i32..2100, 1u8..=12, 1u8..=28, 0u8..24, 0u8..60, 0u8..60).prop_map(
        |(y, mo, d, h, mi, s)| {
            let date = Date::from_calendar_date(y, Month::try_from(mo).unwrap(), d).unwrap();
            PrimitiveDateTime::new(date, Time::from_hms(h, mi, s).unwrap())
        },
    )
}

fn di_order() -> impl Strategy<Value = DiOrder> {
    prop_oneof![Just(DiOrder::HighFirst), Just(DiOrder::LowFirst)]
}

/// A volume in m³ that the wire format holds exactly in `unit` (8 BCD digits, 2 decimals).
fn volume(unit: u8) -> impl Strategy<Value = Decimal> {
    (0i64..100_000_000).prop_map(move |cents| {
        let factor = match unit {
            0x29 => Decimal::new(1, 3),
            0x2A => Decimal::new(1, 2),
            0x2B => Decimal::new(1, 1),
            0x2C => Decimal::ONE,
            0x2D => Decimal::TEN,
            _ => Decimal::ONE_HUNDRED,
        };
        Decimal::new(cents, 2) * factor
    })
}

fn reading() -> impl Strategy<Value = Cjt188Reading> {
    (0x29u8..=0x2E).prop_flat_map(|unit| {
        (volume(unit), volume(unit), clock(), any::<u16>()).prop_map(
            move |(current_m3, settlement_m3, clock, status)| Cjt188Reading {
                current_m3,
                settlement_m3,
                unit,
                clock,
                status,
            },
        )
    })
}

fn unit_value(units: &'static [u8], scale: u32) -> impl Strategy<Value = UnitValue> {
    (proptest::sample::select(units), 0i64..100_000_000).prop_map(move |(unit, raw)| UnitValue {
        value: Decimal::new(raw, scale),
        unit,
    })
}

fn heat() -> impl Strategy<Value = HeatReading> {
    const ENERGY: &[u8] = &[0x02, 0x05, 0x08, 0x0E, 0x11];
    const POWER: &[u8] = &[0x14, 0x17, 0x1A];
    const FLOW: &[u8] = &[0x32, 0x35];
    const VOLUME: &[u8] = &[0x29, 0x2C];
    (
        (
            unit_value(ENERGY, 2),
            unit_value(ENERGY, 2),
            unit_value(POWER, 2),
        ),
        (unit_value(FLOW, 4), unit_value(VOLUME, 2)),
        (0i64..1_000_000, 0i64..1_000_000, 0u32..1_000_000),
        (proptest::option::of(clock()), any::<u16>()),
    )
        .prop_map(
            |((sh, ch, p), (f, v), (sup, ret, hours), (clock, status))| HeatReading {
                settlement_heat: sh,
                current_heat: ch,
                power: p,
                flow: f,
                volume: v,
                supply_c: Decimal::new(sup, 2),
                return_c: Decimal::new(ret, 2),
                working_hours: hours,
                clock,
                status,
                unit_first: false,
            },
        )
}

/// One well-formed M-Bus data record: any data coding with the right data length, DIFEs,
/// primary or FD/FB extension VIFs and combinable VIFEs (scale, additive, reverse, 7F escape).
fn any_data_record() -> impl Strategy<Value = DataRecord> {
    let coding = proptest::sample::select(vec![
        0x00u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E,
    ]);
    let vif = prop_oneof![
        // Plain-text VIFs need their text; they have their own tests.
        any::<u8>().prop_map(|v| if v & 0x7F == 0x7C { 0x13 } else { v & 0x7F }),
        Just(0x6Du8),
        Just(0x6C),
        Just(0xFD),
        Just(0xFB),
    ];
    let vife = proptest::collection::vec(
        prop_oneof![
            0x70u8..=0x7F,
            Just(0x3C),
            any::<u8>().prop_map(|v| v & 0x7F)
        ],
        0..3,
    );
    (
        coding,
        any::<u8>(),
        proptest::collection::vec(any::<u8>().prop_map(|d| d & 0x7F), 0..3),
        vif,
        any::<u8>(),
        vife,
        proptest::collection::vec(any::<u8>(), 64),
        prop_oneof![0u8..12, 0xC0u8..0xC5, 0xD0u8..0xD5, 0xE0u8..0xE5],
    )
        .prop_map(
            |(coding, dif_bits, dife, vif, code, mut vife, bytes, lvar)| {
                let dif = coding | (dif_bits & 0x70);
                if vif == 0xFD || vif == 0xFB {
                    vife.insert(0, code & 0x7F);
                }
                let len = match coding {
                    0x01 | 0x09 => 1,
                    0x02 | 0x0A => 2,
                    0x03 | 0x0B => 3,
                    0x04 | 0x05 | 0x0C => 4,
                    0x06 | 0x0E => 6,
                    0x07 => 8,
                    0x0D => match lvar {
                        0xE0..=0xEF => usize::from(lvar - 0xE0),
                        0xD0..=0xDF => usize::from(lvar - 0xD0),
                        0xC0..=0xCF => usize::from(lvar - 0xC0),
                        _ => usize::from(lvar),
                    },
                    _ => 0,
                };
                let mut data = Vec::new();
                if coding == 0x0D {
                    data.push(lvar);
                }
                data.extend_from_slice(&bytes[..len]);
                DataRecord {
                    dif,
                    dife,
                    vif,
                    vife,
                    data,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn cjt188_read_reply_round_trips(
        t in 0x10u8..0x1A, addr in address(), ser in any::<u8>(), r in reading(), order in di_order()
    ) {
        let frame = Cjt188Frame::read_data_reply(t, addr, ser, &r).with_di_order(order);
        let bytes = cjt188::encode(&frame);
        prop_assert_eq!(cjt188::parse(&bytes).unwrap(), frame.clone());
        let with_preamble = cjt188::encode_with_preamble(&frame, 4);
        prop_assert_eq!(cjt188::parse(&with_preamble).unwrap(), frame);
        let decoded = cjt188::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded.records[0].value, &RecordValue::Number(r.current_m3.normalize()));
        prop_assert_eq!(decoded.records[0].unit, Some(Unit::CubicMetre));
    }

    #[test]
    fn cjt188_heat_reply_round_trips(addr in address(), ser in any::<u8>(), h in heat()) {
        let frame = Cjt188Frame {
            meter_type: 0x20,
            address: addr,
            control: 0x81,
            di: cjt188::DI_CURRENT,
            di_order: DiOrder::HighFirst,
            ser,
            payload: Payload::Heat(Box::new(h)),
        };
        prop_assert_eq!(cjt188::parse(&cjt188::encode(&frame)).unwrap(), frame);
    }

    #[test]
    fn cjt188_valve_frames_round_trip(
        t in any::<u8>(), addr in address(), ser in any::<u8>(), open in any::<bool>(),
        st in any::<u16>(), order in di_order()
    ) {
        let req = Cjt188Frame::valve_control(t, addr, ser, open).with_di_order(order);
        prop_assert_eq!(cjt188::parse(&cjt188::encode(&req)).unwrap(), req);
        let reply = Cjt188Frame::valve_reply(t, addr, ser, st).with_di_order(order);
        prop_assert_eq!(cjt188::parse(&cjt188::encode(&reply)).unwrap(), reply);
        let read = Cjt188Frame::read_data_request(t, addr).with_di_order(order);
        prop_assert_eq!(cjt188::parse(&cjt188::encode(&read)).unwrap(), read);
    }

    #[test]
    fn mbus_records_round_trip(
        id in 0u32..100_000_000, records in proptest::collection::vec(
            (0u8..8, any::<i32>(), 0u32..1000, 0u32..16, 0u32..4, 0u8..4, any::<bool>()), 0..12)
    ) {
        let bcd_id = u32::from_str_radix(&format!("{id:08}"), 16).unwrap();
        let header = RspUdHeader {
            id: bcd_id,
            manufacturer: mbus::manufacturer_id("KAM").unwrap(),
            version: 1,
            medium: 7,
            access_number: 3,
            status: 0,
            signature: 0,
        };
        let functions = [
            Function::Instantaneous, Function::Maximum, Function::Minimum, Function::ValueDuringError,
        ];
        let data: Vec<DataRecord> = records.iter().map(|(n, v, storage, tariff, subunit, f, bcd)| {
            let r = if *bcd {
                DataRecord::bcd8(0x10 | n, i64::from(*v) % 10_000_000)
            } else {
                DataRecord::int32(0x10 | n, *v)
            };
            r.storage(*storage).tariff(*tariff).subunit(*subunit).function(functions[*f as usize])
        }).collect();
        let frame = mbus::encode::rsp_ud(5, &header, &data);
        let decoded = mbus::decode(&frame).unwrap();
        prop_assert_eq!(decoded.meter.id, format!("{id:08}"));
        prop_assert_eq!(decoded.meter.manufacturer.as_deref(), Some("KAM"));
        prop_assert_eq!(decoded.records.len(), records.len());
        for (got, (n, v, storage, tariff, subunit, f, bcd)) in decoded.records.iter().zip(&records) {
            let raw = if *bcd { i64::from(*v) % 10_000_000 } else { i64::from(*v) };
            let want = Decimal::new(raw, 0) * Decimal::new(1, 6) * Decimal::from(10i64.pow(u32::from(*n)));
            prop_assert_eq!(&got.value, &RecordValue::Number(want.normalize()));
            prop_assert_eq!(got.unit, Some(Unit::CubicMetre));
            prop_assert_eq!(got.storage, *storage);
            prop_assert_eq!(u32::from(got.tariff), *tariff);
            prop_assert_eq!(u32::from(got.subunit), *subunit);
            prop_assert_eq!(got.function, functions[*f as usize]);
        }
    }

    #[test]
    fn mbus_requests_round_trip(primary in any::<u8>(), fcb in any::<bool>()) {
        let frame = mbus::encode::req_ud2(primary, fcb);
        let control = if fcb { 0x7B } else { 0x5B };
        prop_assert_eq!(
            mbus::parse_link(&frame).unwrap(),
            mbus::LinkFrame::Short { control, address: primary }
        );
        let nke = mbus::encode::snd_nke(primary);
        prop_assert_eq!(
            mbus::parse_link(&nke).unwrap(),
            mbus::LinkFrame::Short { control: 0x40, address: primary }
        );
    }

    #[test]
    fn decode_matches_the_record_iterator(
        records in proptest::collection::vec(any_data_record(), 0..24),
        msb_first in any::<bool>(),
    ) {
        // `decode` fills its record vector in place after a counting pass; the iterator path
        // converts one record at a time. Both must give the same records (and errors), with
        // every number in normal form.
        let header = RspUdHeader {
            id: 0x1234_5678, manufacturer: 0x2C2D, version: 1, medium: 7,
            access_number: 0, status: 0, signature: 0,
        };
        let mut frame = mbus::encode::rsp_ud(1, &header, &records);
        if msb_first {
            frame[6] = 0x76;
            let n = frame.len();
            frame[n - 2] = frame[4..n - 2].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        }
        let via_iter: Result<Vec<_>, _> = mbus::parse(&frame)
            .unwrap()
            .records
            .map(|r| r.map(|r| r.to_record()))
            .collect();
        match (mbus::decode(&frame), via_iter) {
            (Ok(decoded), Ok(expected)) => {
                prop_assert_eq!(&decoded.records, &expected);
                for r in &decoded.records {
                    if let RecordValue::Number(d) = &r.value {
                        prop_assert_eq!(d.to_string(), d.normalize().to_string());
                    }
                }
            }
            (Err(e), Err(expected)) => prop_assert_eq!(e, expected),
            (got, expected) => prop_assert!(false, "decode {got:?} but iterator {expected:?}"),
        }
    }

    #[test]
    fn afl_fragments_reassemble_to_the_whole_telegram(
        records in proptest::collection::vec(any_data_record(), 1..12),
        piece in 1usize..40,
        key in proptest::option::of(any::<[u8; 16]>()),
        access in any::<u8>(),
    ) {
        use decoders::wmbus::{self, FormatCache, encode};
        let meter = encode::WmbusMeter {
            manufacturer: wmbus::manufacturer_from_code("KAM").unwrap(),
            id: 0x1234_5678,
            version: 1,
            device_type: 7,
        };
        let mut payload = Vec::new();
        for r in &records {
            r.encode_into(&mut payload);
        }
        let whole = encode::telegram(&meter, &payload, access, key);
        let expected = wmbus::decode(&whole, &key, &mut FormatCache::new());
        let parts = encode::fragments(&whole, piece);
        let mut cache = FormatCache::new();
        let (last, first) = parts.split_last().unwrap();
        for (i, part) in first.iter().enumerate() {
            prop_assert_eq!(
                wmbus::decode(part, &key, &mut cache).unwrap_err(),
                wmbus::WmbusError::Fragmented { fragment: u8::try_from(i + 1).unwrap() }
            );
        }
        prop_assert_eq!(wmbus::decode(last, &key, &mut cache), expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _r = cjt188::parse(&bytes);
        let _r = cjt188::decode(&bytes);
        let _r = mbus::parse_link(&bytes);
        let _r = mbus::decode(&bytes);
        let _r = mbus::decode_application(&bytes);
        let _r = mbus::decode_records(&bytes);
        let _r = decoders::detect(&bytes);
    }

    #[test]
    fn framed_random_payloads_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..250), ci in prop_oneof![
            Just(0x72u8), Just(0x76), Just(0x78), Just(0x7A), Just(0x73), Just(0x70), any::<u8>()
        ]
    ) {
        // Valid framing and checksum, random application data: exercises the record parser.
        let frame = mbus::encode::long(0x08, 1, ci, &payload);
        let _r = mbus::decode(&frame);
        let mut c = vec![0x68, 0x10, 1, 0, 0, 0, 0, 0, 0, 0x81];
        c.push(u8::try_from(payload.len().min(200)).unwrap());
        c.extend_from_slice(&payload[..payload.len().min(200)]);
        let cs = c.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        c.extend_from_slice(&[cs, 0x16]);
        let _r = cjt188::decode(&c);
    }

    #[test]
    fn whatever_parses_re_encodes_to_the_same_frame(
        meter_type in prop_oneof![Just(0x10u8), Just(0x20), Just(0x30), any::<u8>()],
        control in prop_oneof![Just(0x81u8), Just(0x84), Just(0x04), Just(0xAA), Just(0xC1), any::<u8>()],
        di in prop_oneof![
            Just([0x90u8, 0x1F]), Just([0x1F, 0x90]), Just([0xA0, 0x17]), Just([0xD1, 0x21]),
            any::<[u8; 2]>()
        ],
        data in proptest::collection::vec(any::<u8>(), 0..60),
        ser in any::<u8>(),
    ) {
        let mut f = vec![0x68, meter_type, 1, 2, 3, 4, 5, 6, 7, control];
        f.push(u8::try_from(data.len() + 3).unwrap());
        f.extend_from_slice(&di);
        f.push(ser);
        f.extend_from_slice(&data);
        let cs = f.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        f.extend_from_slice(&[cs, 0x16]);
        if let Ok(frame) = cjt188::parse(&f) {
            let again = cjt188::encode(&frame);
            prop_assert_eq!(&again, &f);
            prop_assert_eq!(cjt188::parse(&again).unwrap(), frame);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        index in any::<prop::sample::Index>(), value in any::<u8>(), cut in any::<prop::sample::Index>(),
        fix_checksum in any::<bool>()
    ) {
        let frames: [&[u8]; 3] = [
            &hex("681515680801720100000096150107180000000C13785634127A16"),
            &hex("6810443322110033788116 1F9000007766552C007766552C310122110515202184 1316"),
            &hex("68 56 56 68 08 01 72 23 15 01 09 77 04 14 07 25 00 00 00 0C 78 23 15 01 09 0D 7C 08 44 49 20 2E 74 73 75 63 0A 35 35 37 36 37 30 41 4C 39 30 04 6D 1A 0E CD 13 02 7C 09 65 6D 69 74 20 2E 74 61 62 D4 09 04 13 1F 00 00 00 04 93 7F 00 00 00 00 44 13 1F 00 00 00 0F 00 01 1F A9 16"),
        ];
        for f in frames {
            let mut m = f.to_vec();
            let i = index.index(m.len());
            m[i] = value;
            if fix_checksum && m.len() > 6 {
                let n = m.len();
                let start = if m[0] == 0x68 && m[3] == 0x68 { 4 } else { 0 };
                let cs = m[start..n - 2].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                m[n - 2] = cs;
            }
            let _r = cjt188::decode(&m);
            let _r = mbus::decode(&m);
            m.truncate(cut.index(m.len() + 1));
            let _r = cjt188::decode(&m);
            let _r = mbus::decode(&m);
        }
    }
}

fn hex(s: &str) -> Vec<u8> {
    let clean: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    ::hex::decode(clean).unwrap()
}

#[test]
fn secondary_selection_matches_with_wildcards() {
    let header = RspUdHeader {
        id: 0x1234_5678,
        manufacturer: mbus::manufacturer_id("KAM").unwrap(),
        version: 1,
        medium: 7,
        access_number: 0,
        status: 0,
        signature: 0,
    };
    let frame = mbus::encode::select_secondary(0x1234_FFFF, None, None, Some(7));
    let sel = mbus::parse_link(&frame)
        .unwrap()
        .secondary_selection()
        .unwrap();
    assert!(sel.matches(&header));
    let frame = mbus::encode::select_secondary(0x1234_5679, None, None, None);
    let sel = mbus::parse_link(&frame)
        .unwrap()
        .secondary_selection()
        .unwrap();
    assert!(!sel.matches(&header));
    assert_eq!(mbus::manufacturer_code(0x2C2D), "KAM");
}

#[test]
fn mbus_set_time_and_reset_frames() {
    let t = time::macros::datetime!(2026-11-24 10:43 UTC);
    let frame = mbus::encode::set_time(3, t);
    let mbus::LinkFrame::Long {
        control,
        address,
        ci,
        data,
        ..
    } = mbus::parse_link(&frame).unwrap()
    else {
        panic!("not a long frame")
    };
    assert_eq!((control, address, ci), (0x53, 3, 0x51));
    let records = mbus::decode_records(data).unwrap();
    assert_eq!(
        records[0].value,
        RecordValue::Date("2026-11-24T10:43".into())
    );
    assert_eq!(
        mbus::parse_link(&mbus::encode::application_reset(3)).unwrap(),
        mbus::LinkFrame::Control {
            control: 0x53,
            address: 3,
            ci: 0x50
        }
    );
    assert_eq!(
        mbus::parse_link(&mbus::encode::ack()).unwrap(),
        mbus::LinkFrame::Ack
    );
}

#[test]
fn more_records_follow_is_reported() {
    let header = RspUdHeader {
        id: 0x0000_0001,
        manufacturer: 0x2C2D,
        version: 1,
        medium: 7,
        access_number: 0,
        status: 0,
        signature: 0,
    };
    let frame = mbus::encode::rsp_ud_more(1, &header, &[DataRecord::int32(0x13, 5)]);
    let app = mbus::decode_application(&frame[6..frame.len() - 2]).unwrap();
    assert!(app.more_records_follow);
    assert_eq!(app.records.len(), 2);
    assert_eq!(app.records[1].quantity, "more_records_follow");
}

#[test]
fn cjt188_errors_carry_offsets() {
    // Non-BCD nibble in the current volume (byte 19 after 4 FE).
    let mut bytes =
        hex("FEFEFEFE6810443322110033788116 1F9000007766552C007766552C310122110515202184 1316");
    bytes[19] = 0x7A;
    let cs = bytes[4..bytes.len() - 2]
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b));
    let n = bytes.len();
    bytes[n - 2] = cs;
    assert_eq!(
        cjt188::decode(&bytes).unwrap_err(),
        cjt188::Cjt188Error::BadBcd {
            offset: 19,
            field: "current cumulative volume",
            byte: 0x7A
        }
    );
    assert!(matches!(
        cjt188::decode(&bytes[..10]).unwrap_err(),
        cjt188::Cjt188Error::Truncated {
            offset: 6,
            field: "address",
            needed: 3
        }
    ));
}
