//! Runs the `meter-decode` binary as a user would.

use std::process::Command;

fn meter_decode(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meter-decode"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const CJT188_REPLY: &str = "FE FE FE FE 68 10 44 33 22 11 00 33 78 81 16 1F 90 00 00 77 66 55 2C \
                            00 77 66 55 2C 31 01 22 11 05 15 20 21 84 13 16";

#[test]
fn decodes_a_cjt188_reply_to_json() {
    let (code, out, err) = meter_decode(&["--protocol", "cjt188", CJT188_REPLY]);
    assert_eq!(code, 0, "stderr: {err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["protocol"], "cjt188");
    assert_eq!(json["meter"]["id"], "78330011223344");
    assert_eq!(json["records"][0]["quantity"], "volume");
    assert_eq!(json["records"][0]["value"], 556677.0);
    assert_eq!(json["records"][0]["unit"], "m3");
    assert_eq!(json["records"][2]["value"], "2015-05-11T22:01:31");
}

#[test]
fn auto_detects_an_mbus_long_frame_split_over_arguments() {
    let (code, out, err) = meter_decode(&[
        "--protocol",
        "auto",
        "68 15 15 68 08 01 72 01 00 00 00 96 15 01 07 18 00 00 00",
        "0C 13 78 56 34 12 7A 16",
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["protocol"], "mbus");
    assert_eq!(json["meter"]["id"], "00000001");
    assert_eq!(json["meter"]["medium"], "water");
    assert_eq!(json["records"][0]["value"], 12345.678);
    assert_eq!(json["records"][0]["unit"], "m3");
    assert_eq!(json["records"][0]["function"], "instantaneous");
}

#[test]
fn bad_checksum_exits_non_zero_with_the_offset() {
    let bad = CJT188_REPLY.replace("13 16", "14 16");
    let (code, out, err) = meter_decode(&["--protocol", "cjt188", &bad]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert_eq!(
        err.trim(),
        "error: cjt188: bad checksum at byte 37: expected 0x13, found 0x14"
    );
}

#[test]
fn mbus_application_error_is_reported() {
    let (code, _, err) = meter_decode(&["--protocol", "mbus", "68 04 04 68 08 01 70 08 81 16"]);
    assert_eq!(code, 1);
    assert!(err.contains("application busy"), "{err}");
    assert!(err.contains("at byte 7"), "{err}");
}

/// A mode-5 (AES-CBC) telegram from the simulator encoder: volume 12.345 m³, error flags 0.
fn wmbus_mode5() -> (String, String) {
    use decoders::wmbus::{encode, manufacturer_from_code};
    let key = [0x5Au8; 16];
    let meter = encode::WmbusMeter {
        manufacturer: manufacturer_from_code("KAM").unwrap(),
        id: 0x1234_5678,
        version: 0x1B,
        device_type: 0x07,
    };
    let records = [
        0x04, 0x13, 0x39, 0x30, 0x00, 0x00, 0x02, 0xFD, 0x17, 0x00, 0x00,
    ];
    let frame = encode::telegram(&meter, &records, 0x21, Some(key));
    (hex::encode(frame), hex::encode(key))
}

#[test]
fn wmbus_mode5_decodes_with_its_key() {
    let (frame, key) = wmbus_mode5();
    for protocol in ["wmbus", "auto"] {
        let (code, out, err) = meter_decode(&["--protocol", protocol, "--key", &key, &frame]);
        assert_eq!(code, 0, "stderr: {err}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["protocol"], "wmbus");
        assert_eq!(json["meter"]["id"], "12345678");
        assert_eq!(json["meter"]["manufacturer"], "KAM");
        assert_eq!(json["records"][0]["value"], 12.345);
        assert_eq!(json["records"][0]["unit"], "m3");
        assert!(!out.contains(&key) && !err.contains(&key));
    }
}

#[test]
fn auto_tries_wmbus_when_a_telegram_looks_like_a_wired_frame() {
    use decoders::wmbus::{encode, manufacturer_from_code};
    let meter = encode::WmbusMeter {
        manufacturer: manufacturer_from_code("ABC").unwrap(),
        id: 0x0000_0001,
        version: 1,
        device_type: 0x07,
    };
    // 14 header bytes after L + 90 bytes of records = L 0x68, the CJ/T 188 start byte.
    let mut records = vec![0x04, 0x13, 0x39, 0x30, 0x00, 0x00];
    records.resize(90, 0x2F);
    let frame = encode::telegram(&meter, &records, 1, None);
    assert_eq!(frame[0], 0x68);
    let (code, out, err) = meter_decode(&["--protocol", "auto", &hex::encode(&frame)]);
    assert_eq!(code, 0, "stderr: {err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["protocol"], "wmbus");
    assert_eq!(json["records"][0]["value"], 12.345);
}

#[test]
fn wmbus_wrong_or_missing_key_exits_non_zero() {
    let (frame, key) = wmbus_mode5();
    let (code, out, err) = meter_decode(&["--protocol", "wmbus", &frame]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("no key is configured"), "{err}");
    let wrong = key.replace('5', "6");
    let (code, out, err) = meter_decode(&["--protocol", "wmbus", "--key", &wrong, &frame]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("wrong key for mbus:KAM12345678"), "{err}");
    assert!(!err.contains(&wrong));
}

#[test]
fn bad_hex_and_bad_key_are_refused() {
    let (code, _, err) = meter_decode(&["--protocol", "mbus", "68 0G"]);
    assert_eq!(code, 1);
    assert!(err.contains("not valid hex"), "{err}");
    let (code, _, err) = meter_decode(&["--protocol", "mbus", "--key", "0011", "E5"]);
    assert_eq!(code, 1);
    assert!(err.contains("16 bytes"), "{err}");
}
