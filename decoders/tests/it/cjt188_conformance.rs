//! Every framed CJ/T 188 example of `../shared/conformance/cjt188/` decodes to its listed values.

use crate::common;

use decoders::RecordValue;
use decoders::cjt188::{self, Payload};
use rust_decimal::Decimal;
use serde_json::Value;
use std::str::FromStr;

fn num(record_value: &RecordValue) -> f64 {
    match record_value {
        RecordValue::Number(d) => d.to_string().parse().unwrap(),
        other => panic!("not a number: {other:?}"),
    }
}

fn find<'a>(frame: &'a decoders::DecodedFrame, quantity: &str) -> &'a decoders::Record {
    frame
        .records
        .iter()
        .find(|r| r.quantity == quantity)
        .unwrap_or_else(|| panic!("no {quantity} record in {:?}", frame.records))
}

fn check_status(frame: &decoders::DecodedFrame, status: &Value) {
    let raw = status["raw"].as_str().unwrap();
    let bytes = common::hex(raw);
    let word = u16::from_le_bytes([bytes[0], bytes[1]]);
    assert_eq!(num(&find(frame, "status_word").value), f64::from(word));
    let valve = match status["valve"].as_str().unwrap() {
        "open" => 0.0,
        "closed" => 1.0,
        _ => 3.0,
    };
    assert_eq!(num(&find(frame, "valve_state").value), valve);
    let battery = if status["battery_low"].as_bool().unwrap() {
        1.0
    } else {
        0.0
    };
    assert_eq!(num(&find(frame, "battery_low").value), battery);
}

fn check_volume(frame: &decoders::DecodedFrame, quantity: &str, expected: &Value) {
    let r = find(frame, quantity);
    assert_eq!(expected["unit"], "m3");
    assert!((num(&r.value) - expected["value"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(r.unit, Some(model::Unit::CubicMetre));
}

#[test]
fn every_corpus_frame_decodes_to_its_values() {
    let path = common::shared_dir().join("conformance/cjt188/cjt188_examples.jsonl");
    let text = std::fs::read_to_string(&path).expect("read cjt188 corpus");
    let (mut framed, mut passed) = (0, 0);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let case: Value = serde_json::from_str(line).unwrap();
        let name = case["name"].as_str().unwrap();
        let Some(hex) = case["frame_hex"].as_str() else {
            continue;
        };
        framed += 1;
        let bytes = common::hex(hex);
        let header = &case["header"];
        let parsed = cjt188::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let frame = cjt188::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            frame.meter.id,
            header["address_display"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            format!("{:02X}", parsed.control),
            header["control"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            format!("{:02X}", parsed.meter_type),
            header["meter_type"].as_str().unwrap(),
            "{name}"
        );
        let decoded = &case["decoded"];
        let di_wire = decoded["di_wire"].as_str().unwrap();
        let di_bytes = common::hex(&di_wire[..4]);
        let (logical, order) = if parsed.di_order == cjt188::DiOrder::HighFirst {
            (parsed.di.to_be_bytes(), "high")
        } else {
            (parsed.di.to_le_bytes(), "low")
        };
        assert_eq!(
            logical.to_vec(),
            di_bytes,
            "{name}: DI as sent ({order} first)"
        );
        if let Some(ser) = decoded["ser"].as_str() {
            assert_eq!(format!("{:02X}", parsed.ser), ser, "{name}");
        }
        if decoded.get("current_cumulative").is_some() {
            check_volume(&frame, "volume", &decoded["current_cumulative"]);
            check_volume(
                &frame,
                "volume_settlement",
                &decoded["settlement_cumulative"],
            );
            let rtc = decoded["rtc"].as_str().unwrap();
            if rtc.starts_with("0000") {
                assert!(
                    frame.records.iter().all(|r| r.quantity != "date_time"),
                    "{name}"
                );
            } else {
                let want = rtc.replace(' ', "T");
                assert_eq!(
                    find(&frame, "date_time").value,
                    RecordValue::Date(want.into()),
                    "{name}"
                );
            }
            check_status(&frame, &decoded["status"]);
        } else if let Some(jy) = decoded.get("jy_as_published") {
            let Payload::Heat(heat) = &parsed.payload else {
                panic!("{name}: not heat")
            };
            assert!(heat.unit_first, "{name}: JY unit-first variant detected");
            let energy = find(&frame, "energy");
            assert_eq!(energy.unit, Some(model::Unit::MegawattHour));
            assert!((num(&energy.value) - 0.02).abs() < 1e-9);
            assert!((num(&find(&frame, "energy_settlement").value) - 0.02).abs() < 1e-9);
            assert_eq!(num(&find(&frame, "power").value), 0.0);
            assert_eq!(num(&find(&frame, "volume_flow").value), 0.0);
            assert!((num(&find(&frame, "volume").value) - 10.34).abs() < 1e-9);
            let supply = jy["supply_temp_c"].as_f64().unwrap();
            assert!((num(&find(&frame, "flow_temperature").value) - supply).abs() < 1e-9);
            let ret = jy["return_temp_c"].as_f64().unwrap();
            assert!((num(&find(&frame, "return_temperature").value) - ret).abs() < 1e-9);
            let rtc = jy["rtc"].as_str().unwrap().replace(' ', "T");
            assert_eq!(
                find(&frame, "date_time").value,
                RecordValue::Date(rtc.into())
            );
            check_status(&frame, &jy["status"]);
        } else if let Some(cmd) = decoded.get("command").and_then(Value::as_str) {
            let open = cmd.starts_with("55");
            assert_eq!(parsed.payload, Payload::Valve { open }, "{name}");
        } else if let Some(status) = decoded.get("status") {
            check_status(&frame, status);
        } else {
            assert!(
                frame.records.is_empty(),
                "{name}: requests carry no records"
            );
        }
        // Re-encoding reproduces the frame byte for byte (after the preamble).
        let preamble = header["preamble_fe"].as_u64().unwrap() as usize;
        assert_eq!(
            cjt188::encode(&parsed),
            bytes[preamble..],
            "{name}: re-encode"
        );
        passed += 1;
    }
    println!("cjt188 conformance: {passed}/{framed} corpus frames decoded to their listed values");
    assert_eq!(framed, 17);
    assert_eq!(passed, framed);
}

#[test]
fn payload_only_example_decodes_inside_a_frame() {
    // ng-gateway unit test payload (no framing): 1234.00 m3, 1000.00 m3, 2026-01-08 14:30:00.
    let payload = common::hex("00 34 12 00 2C 00 00 10 00 2C 00 30 14 08 01 26 20 00 00");
    let mut bytes = common::hex("68 10 01 00 00 00 00 00 00 81 16 90 1F 00");
    bytes.extend_from_slice(&payload);
    let cs = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes.extend_from_slice(&[cs, 0x16]);
    let frame = cjt188::parse(&bytes).unwrap();
    let Payload::Reading(r) = frame.payload else {
        panic!("not a reading")
    };
    assert_eq!(r.current_m3, Decimal::from_str("1234").unwrap());
    assert_eq!(r.settlement_m3, Decimal::from_str("1000").unwrap());
    assert_eq!(r.clock, time::macros::datetime!(2026-01-08 14:30:00));
    assert_eq!(r.status, 0);
}
