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

#[test]
fn wmbus_points_to_the_wmbus_module() {
    let (code, _, err) = meter_decode(&["--protocol", "wmbus", "2E44"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("wmbus decoding is provided by decoders::wmbus"),
        "{err}"
    );
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
