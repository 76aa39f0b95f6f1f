//! Golden vectors: exact JSON of decoded frames and exact errors of malformed ones.

use crate::common;

use decoders::{cjt188, mbus};
use serde_json::json;

#[test]
fn cjt188_water_reply_golden_json() {
    let bytes = common::hex(
        "FE FE 68 10 44 33 22 11 00 33 78 81 16 1F 90 00 00 77 66 55 2C 00 77 66 55 2C \
         31 01 22 11 05 15 20 21 84 13 16",
    );
    let frame = cjt188::decode(&bytes).unwrap();
    let rec = |q: &str, v: serde_json::Value| {
        json!({"quantity": q, "value": v, "storage": 0, "tariff": 0, "subunit": 0,
               "function": "instantaneous"})
    };
    let mut volume = rec("volume", json!(556677.0));
    volume["unit"] = json!("m3");
    let mut settlement = rec("volume_settlement", json!(556677.0));
    settlement["unit"] = json!("m3");
    assert_eq!(
        serde_json::to_value(&frame).unwrap(),
        json!({
            "protocol": "cjt188",
            "meter": {"id": "78330011223344", "medium": "cold_water"},
            "records": [
                volume,
                settlement,
                rec("date_time", json!("2015-05-11T22:01:31")),
                rec("valve_state", json!(1.0)),
                rec("battery_low", json!(0.0)),
                rec("status_word", json!(33825.0)),
            ]
        })
    );
    assert_eq!(
        cjt188::meter_id(&cjt188::parse(&bytes).unwrap().address),
        "cjt188:78330011223344"
    );
}

#[test]
fn cjt188_malformed_frames_have_typed_errors() {
    use cjt188::Cjt188Error as E;
    let cases: &[(&str, E)] = &[
        (
            "",
            E::Truncated {
                offset: 0,
                field: "start byte",
                needed: 1,
            },
        ),
        (
            "FE FE 69",
            E::BadStart {
                offset: 2,
                found: 0x69,
            },
        ),
        (
            "68 10 01 00 00 05 08 00 00 01 02",
            E::BadLength {
                offset: 10,
                length: 2,
            },
        ),
        (
            "68 10 01 00 00 05 08 00 00 01 03 1F 90 00 38 16",
            E::BadChecksum {
                offset: 14,
                expected: 0x39,
                found: 0x38,
            },
        ),
        (
            "68 10 01 00 00 05 08 00 00 01 03 1F 90 00 39 17",
            E::BadEnd {
                offset: 15,
                found: 0x17,
            },
        ),
        (
            "68 10 01 00 00 05 08 00 00 01 03 1F 90 00 39 16 00",
            E::TrailingBytes {
                offset: 16,
                count: 1,
            },
        ),
        (
            "68 10 01 00 00 05 08 00 00 04 04 A0 17 00 56 9B 16",
            E::BadValveCommand {
                offset: 14,
                byte: 0x56,
            },
        ),
        (
            "68 10 01 00 00 05 08 00 00 81 04 1F 90 00 00 BA 16",
            E::BadDataLength {
                offset: 14,
                di: 0x901F,
                expected: 19,
                found: 1,
            },
        ),
        (
            "68 10 0A 00 00 05 08 00 00 01 03 1F 90 00 42 16",
            E::BadBcd {
                offset: 2,
                field: "address",
                byte: 0x0A,
            },
        ),
    ];
    for (hex, want) in cases {
        assert_eq!(
            cjt188::decode(&common::hex(hex)).unwrap_err(),
            *want,
            "{hex}"
        );
    }
}

#[test]
fn mbus_malformed_frames_have_typed_errors() {
    use mbus::MbusError as E;
    let cases: &[(&str, E)] = &[
        ("", E::Empty),
        (
            "E5",
            E::NotLongFrame {
                kind: "single character E5",
            },
        ),
        (
            "10 5B 01 5C 16",
            E::NotLongFrame {
                kind: "short frame",
            },
        ),
        (
            "10 5B 01 5D 16",
            E::BadChecksum {
                offset: 3,
                expected: 0x5C,
                found: 0x5D,
            },
        ),
        (
            "68 04 05 68",
            E::BadHeader {
                offset: 1,
                first: 4,
                second: 5,
            },
        ),
        (
            "68 02 02 68 08 01 09 16",
            E::BadLength {
                offset: 1,
                length: 2,
            },
        ),
        (
            "68 03 03 68 08 01 72 7B 17",
            E::BadStop {
                offset: 8,
                found: 0x17,
            },
        ),
        (
            "68 03 03 68 08 01 51 5A 16",
            E::UnsupportedCi {
                offset: 6,
                ci: 0x51,
            },
        ),
        (
            "68 04 04 68 08 01 70 08 81 16",
            E::ApplicationError {
                offset: 7,
                code: Some(8),
                meaning: "application busy",
            },
        ),
        (
            "68 08 08 68 08 02 72 78 56 34 12 24 B4 16",
            E::Truncated {
                offset: 7,
                field: "long header",
                needed: 7,
            },
        ),
    ];
    for (hex, want) in cases {
        let got = mbus::decode(&common::hex(hex)).unwrap_err();
        assert_eq!(got, *want, "{hex}");
        assert!(
            got.code()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
        );
    }
    assert_eq!(E::TooManyVife { offset: 0 }.code(), "too_many_vife");
}

#[test]
fn mbus_negative_bcd_and_plain_text_records() {
    // 0C 13 78 56 34 F2: F replaces the top digit and makes it negative: -2345678 L = -2345.678 m3.
    let records = mbus::decode_records(&common::hex(
        "0C 13 78 56 34 F2  02 FC 03 48 52 25 74 D4 11  0D FD 11 03 43 42 41",
    ))
    .unwrap();
    assert_eq!(
        records[0].value,
        decoders::RecordValue::Number("-2345.678".parse().unwrap())
    );
    // FC + text "%RH" + VIFE 74 (x 10^-2): 0x11D4 = 4564 -> 45.64.
    assert_eq!(records[1].quantity, "%RH");
    assert_eq!(
        records[1].value,
        decoders::RecordValue::Number("45.64".parse().unwrap())
    );
    assert_eq!(records[2].quantity, "customer");
    assert_eq!(records[2].value, decoders::RecordValue::Text("ABC".into()));
}

#[test]
fn mbus_mode_2_msb_first_frame() {
    // CI 76: header and data most significant byte first.
    let mut body = common::hex("08 01 76 12 34 56 78 2C 2D 01 07 05 00 00 00 04 13 00 00 30 39");
    body.extend_from_slice(&common::hex("03 6D 0A 2B 05")); // type J, sent MSB first: 10:43:05
    let mut frame = vec![0x68, body.len() as u8, body.len() as u8, 0x68];
    frame.extend_from_slice(&body);
    frame.push(body.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    frame.push(0x16);
    let decoded = mbus::decode(&frame).unwrap();
    assert_eq!(decoded.meter.id, "12345678");
    assert_eq!(decoded.meter.manufacturer.as_deref(), Some("KAM"));
    assert_eq!(
        decoded.records[0].value,
        decoders::RecordValue::Number("12.345".parse().unwrap())
    );
    assert_eq!(
        decoded.records[1].value,
        decoders::RecordValue::Date("10:43:05".into())
    );
}

#[test]
fn cjt188_mirrored_status_bits() {
    use cjt188::StatusBits;
    // sdqr layout: 0x40 closed, 0xC0 abnormal, 0x20 battery low.
    assert_eq!(StatusBits::Mirrored.valve_state(0x0040), 1);
    assert_eq!(StatusBits::Mirrored.valve_state(0x00C0), 3);
    assert!(StatusBits::Mirrored.battery_low(0x0020));
    assert_eq!(StatusBits::Standard.valve_state(0x0021), 1);
    assert_eq!(StatusBits::Standard.valve_state(0x0003), 3);
    let frame = cjt188::Cjt188Frame::valve_reply(0x10, [0x11; 7], 1, 0x0060);
    let decoded = cjt188::to_decoded_with(&frame, StatusBits::Mirrored);
    let value = |q: &str| {
        decoded
            .records
            .iter()
            .find(|r| r.quantity == q)
            .unwrap()
            .value
            .clone()
    };
    assert_eq!(
        value("valve_state"),
        decoders::RecordValue::Number(1.into())
    );
    assert_eq!(
        value("battery_low"),
        decoders::RecordValue::Number(1.into())
    );
}

#[test]
fn detect_needs_matching_lengths() {
    use decoders::{Protocol, detect};
    let cjt = common::hex("68 10 01 00 00 05 08 00 00 01 03 1F 90 00 39 16");
    assert_eq!(detect(&cjt), Some(Protocol::Cjt188));
    assert_eq!(
        detect(&[&[0xFE, 0xFE][..], &cjt].concat()),
        Some(Protocol::Cjt188)
    );
    let long = common::hex("68 03 03 68 53 01 50 A4 16");
    assert_eq!(detect(&long), Some(Protocol::Mbus));
    assert_eq!(detect(&[0xE5]), Some(Protocol::Mbus));
    assert_eq!(detect(&common::hex("10 5B 01 5C 16")), Some(Protocol::Mbus));
    // A wM-Bus telegram whose L field happens to be 0x68 is not taken for a wired frame.
    let mut wmbus = vec![0x68, 0x44, 0x2D, 0x2C];
    wmbus.resize(0x69, 0x00);
    assert_eq!(detect(&wmbus), None);
    assert_eq!(detect(&cjt[..10]), None);
}

#[test]
fn mbus_vif_extension_fb_humidity_frequency_and_reactive_energy() {
    // 02 FB 1A 9A 01: relative humidity 410 × 0.1 % (FB 1A = 10^-1 %);
    // 02 FB 2E F4 01: frequency 500 × 0.1 Hz (FB 2C-2F = 10^(nn-3) Hz);
    // 04 FB 03 3F 00 00 00: reactive energy 63 × 10 kvarh (FB 02/03 = 10^n kvarh).
    let app = common::hex("02 FB 1A 9A 01 02 FB 2E F4 01 04 FB 03 3F 00 00 00");
    let got: Vec<(String, String, Option<model::Unit>)> = mbus::records(&app)
        .map(|r| {
            let rec = r.unwrap().to_record();
            let value = match rec.value {
                decoders::RecordValue::Number(d) => d.normalize().to_string(),
                other => format!("{other:?}"),
            };
            (rec.quantity.to_string(), value, rec.unit)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "relative_humidity".to_owned(),
                "41".to_owned(),
                Some(model::Unit::Percent)
            ),
            ("frequency_hz".to_owned(), "50".to_owned(), None),
            ("reactive_energy_kvarh".to_owned(), "630".to_owned(), None),
        ]
    );
}

/// Fuzz regression (cjt188_roundtrip, crash-df121122): current volume in m³ (2C) but the
/// settlement volume in ×10 m³ (2D, 227730.00 → 2 277 300 m³). Re-encoding wrote the settlement
/// in the current unit, where it needs 9 digits, and silently dropped the leading one.
#[test]
fn cjt188_settlement_in_another_unit_round_trips() {
    let bytes = common::hex(
        "FE FE FE 68 10 44 33 22 11 00 33 78 81 16 1F 90 00 00 77 66 55 2C 00 30 77 22 2D \
         15 55 11 01 05 66 20 21 84 13 16",
    );
    let frame = cjt188::parse(&bytes).unwrap();
    let cjt188::Payload::Reading(r) = &frame.payload else {
        panic!("not a reading: {:?}", frame.payload);
    };
    assert_eq!(r.current_m3.to_string(), "556677.00");
    assert_eq!(r.settlement_m3.normalize().to_string(), "2277300");
    let again = cjt188::parse(&cjt188::encode(&frame)).unwrap();
    assert_eq!(again, frame);
}
