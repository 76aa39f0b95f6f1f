//! IoT-platform envelopes: example pushes per platform, typed errors, encode → decode.

use decoders::RecordValue;
use decoders::envelope::{
    Envelope, EnvelopeError, Platform, Signal, decode_envelope, decode_envelopes, encode_envelope,
};
use model::Unit;
use proptest::prelude::*;
use rust_decimal_macros::dec;
use time::macros::datetime;

/// A CJ/T 188 read-data reply (water meter, address 12345678901234, 12345.678 m³) in hex.
const FRAME_HEX: &str = "6810341290785634128115901F01785634122C000000002C3000251126200000C016";
/// The same frame in base64.
const FRAME_B64: &str = "aBA0EpB4VjQSgRWQHwF4VjQSLAAAAAAsMAAlESYgAADAFg==";

fn frame() -> Vec<u8> {
    hex::decode(FRAME_HEX).unwrap()
}

#[test]
fn ctwing_data_report() {
    // Shape of a CTWing (AEP) subscription push for an LwM2M transparent product.
    let body = format!(
        r#"{{"upPacketSN":-1,"upDataSN":-1,"topic":"v1/up/ad","timestamp":1764064800123,
        "tenantId":"2000034335","serviceId":"","protocol":"lwm2m","productId":"15040599",
        "payload":{{"APPdata":"{FRAME_B64}"}},"messageType":"dataReport","deviceType":"",
        "deviceId":"9e0fd11ab6d44b07a8ef7c0ecc5af5b8","assocAssetId":"","IMSI":"undefined",
        "IMEI":"869060030130086"}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(env.platform, Platform::CtWing);
    assert_eq!(env.device_id, "9e0fd11ab6d44b07a8ef7c0ecc5af5b8");
    assert_eq!(env.imei.as_deref(), Some("869060030130086"));
    assert_eq!(
        env.received_at,
        Some(datetime!(2025-11-25 10:00:00.123 UTC))
    );
    assert_eq!(env.payload, frame());
    assert_eq!(env.signal, Signal::default());
    assert!(env.signal_records().is_empty());
}

#[test]
fn ctwing_signal_next_to_appdata() {
    let body = format!(
        r#"{{"messageType":"dataReport","deviceId":"d1","timestamp":1764064800000,
        "payload":{{"APPdata":"{FRAME_B64}","RSRP":-1052,"SINR":"3.5","ECL":1}}}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(
        env.signal,
        Signal {
            rsrp: Some(dec!(-1052)),
            sinr: Some(dec!(3.5)),
            ecl: Some(1)
        }
    );
    assert_eq!(env.imei, None);
}

#[test]
fn ctwing_signal_in_service_data() {
    // Profile-decoded products carry properties in payload.serviceData (SNR spelling).
    let body = format!(
        r#"{{"upPacketSN":"","upDataSN":"","topic":"v1/up/ad19prof","timestamp":1764064800000,
        "payload":{{"APPdata":"{FRAME_B64}","serviceId":"notification",
        "serviceData":{{"RSRP":-114,"SNR":1,"ECL":2}}}},"messageType":"dataReport",
        "deviceId":"acf7","IMSI":"undefined","IMEI":""}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(
        env.signal,
        Signal {
            rsrp: Some(dec!(-114)),
            sinr: Some(dec!(1)),
            ecl: Some(2)
        }
    );
    // An empty IMEI is no IMEI.
    assert_eq!(env.imei, None);
}

#[test]
fn ctwing_other_message_types_are_not_data() {
    let body = br#"{"messageType":"deviceOnlineOfflineReport","deviceId":"d1","eventType":1,"timestamp":1764064800000}"#;
    assert_eq!(
        decode_envelope(body).unwrap_err(),
        EnvelopeError::NotData {
            platform: "ctwing",
            kind: "deviceOnlineOfflineReport".into()
        }
    );
}

#[test]
fn onenet_single_data_point() {
    // OneNET HTTP push for an NB-IoT (LwM2M) device: opaque resource 3200/0/5750 as hex.
    let body = format!(
        r#"{{"msg":{{"at":1764064800000,"imei":"865820031234567","type":1,"ds_id":"3200_0_5750",
        "value":"{FRAME_HEX}","dev_id":2016617}},"msg_signature":"ZjA5ZjE5...","nonce":"abcdefgh"}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(env.platform, Platform::OneNet);
    assert_eq!(env.device_id, "2016617");
    assert_eq!(env.imei.as_deref(), Some("865820031234567"));
    assert_eq!(env.received_at, Some(datetime!(2025-11-25 10:00:00 UTC)));
    assert_eq!(env.payload, frame());
}

#[test]
fn onenet_batch_merges_signal_points_into_the_uplink() {
    let body = format!(
        r#"{{"msg":[
          {{"at":1764064800000,"type":1,"ds_id":"3200_0_5750","value":"{FRAME_HEX}","dev_id":7,"imei":"865820031234567"}},
          {{"at":1764064800000,"type":1,"ds_id":"4_0_2","value":-95,"dev_id":7}},
          {{"at":1764064800000,"type":1,"ds_id":"sinr","value":12.5,"dev_id":7}},
          {{"at":1764064800000,"type":1,"ds_id":"ecl","value":0,"dev_id":7}},
          {{"at":1764064800000,"type":2,"status":1,"login_type":10,"dev_id":8}}
        ],"msg_signature":"x","nonce":"y"}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(env.device_id, "7");
    assert_eq!(
        env.signal,
        Signal {
            rsrp: Some(dec!(-95)),
            sinr: Some(dec!(12.5)),
            ecl: Some(0)
        }
    );
    let records = env.signal_records();
    let got: Vec<(&str, RecordValue, Option<Unit>)> = records
        .iter()
        .map(|r| (r.quantity.as_ref(), r.value.clone(), r.unit))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "signal_rsrp",
                RecordValue::Number(dec!(-95)),
                Some(Unit::Dbm)
            ),
            (
                "signal_sinr",
                RecordValue::Number(dec!(12.5)),
                Some(Unit::Decibel)
            ),
            (
                "signal_ecl",
                RecordValue::Number(dec!(0)),
                Some(Unit::Dimensionless)
            ),
        ]
    );
    assert_eq!(
        records[0].reading_quantity(),
        Some(model::Quantity::SignalRsrp)
    );
}

#[test]
fn onenet_batch_of_two_uplinks() {
    let body = format!(
        r#"{{"msg":[
          {{"type":1,"ds_id":"3200_0_5750","value":"{FRAME_HEX}","dev_id":1}},
          {{"type":1,"ds_id":"3200_0_5750","value":"681001","dev_id":2}}
        ]}}"#
    );
    assert_eq!(
        decode_envelope(body.as_bytes()).unwrap_err(),
        EnvelopeError::Batch {
            platform: "onenet",
            count: 2
        }
    );
    let all = decode_envelopes(body.as_bytes()).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].payload, vec![0x68, 0x10, 0x01]);
}

#[test]
fn onenet_online_message_and_encryption() {
    let body = br#"{"msg":{"at":1764064800000,"login_type":10,"imei":"865820031234567","type":2,"dev_id":7,"status":1},"msg_signature":"x","nonce":"y"}"#;
    assert!(matches!(
        decode_envelope(body),
        Err(EnvelopeError::NotData {
            platform: "onenet",
            ..
        })
    ));
    let body = br#"{"enc_msg":"AAAA","msg_signature":"x","nonce":"y"}"#;
    assert_eq!(decode_envelope(body).unwrap_err(), EnvelopeError::Encrypted);
}

#[test]
fn generic_hex_and_base64() {
    let body = format!(
        r#"{{"v":1,"device_id":"m-17","imei":"861234567890123","ts":"2026-11-25T10:00:00Z",
        "payload":"{FRAME_HEX}","rsrp":-101,"sinr":-2.5,"ecl":2}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(env.platform, Platform::Generic);
    assert_eq!(env.device_id, "m-17");
    assert_eq!(env.received_at, Some(datetime!(2026-11-25 10:00:00 UTC)));
    assert_eq!(env.payload, frame());
    assert_eq!(env.signal.sinr, Some(dec!(-2.5)));
    assert_eq!(env.signal.ecl, Some(2));

    let body = format!(
        r#"{{"device_id":"m-17","payload":"{FRAME_B64}","encoding":"base64","ts":1764064800000}}"#
    );
    let env = decode_envelope(body.as_bytes()).unwrap();
    assert_eq!(env.payload, frame());
    // Hex with spaces, as a log line shows it.
    let env = decode_envelope(br#"{"device_id":"m","payload":"68 10 01"}"#).unwrap();
    assert_eq!(env.payload, vec![0x68, 0x10, 0x01]);
}

#[test]
fn errors_say_what_and_where() {
    let err = |body: &str| decode_envelope(body.as_bytes()).unwrap_err();
    assert!(matches!(
        err("{\"device_id\": \n 1,"),
        EnvelopeError::Json { line: 2, .. }
    ));
    assert_eq!(err("[1,2]"), EnvelopeError::UnknownFormat);
    assert_eq!(err(r#"{"hello":1}"#), EnvelopeError::UnknownFormat);
    assert_eq!(
        err(r#"{"payload":"6810"}"#),
        EnvelopeError::MissingField {
            platform: "generic",
            field: "device_id".into()
        }
    );
    assert_eq!(
        err(r#"{"messageType":"dataReport","deviceId":"d","payload":{}}"#),
        EnvelopeError::MissingField {
            platform: "ctwing",
            field: "payload.APPdata".into()
        }
    );
    assert_eq!(
        err(r#"{"messageType":"dataReport","deviceId":"d","payload":{"APPdata":"aB!A"}}"#),
        EnvelopeError::BadBase64 {
            platform: "ctwing",
            field: "payload.APPdata".into(),
            message: "Invalid symbol 33, offset 2.".into()
        }
    );
    assert_eq!(
        err(r#"{"device_id":"m","payload":"68 1G","encoding":"hex"}"#),
        EnvelopeError::BadHex {
            platform: "generic",
            field: "payload".into(),
            position: 3
        }
    );
    assert_eq!(
        err(r#"{"device_id":"m","payload":"681","encoding":"hex"}"#),
        EnvelopeError::BadHex {
            platform: "generic",
            field: "payload".into(),
            position: 3
        }
    );
    assert_eq!(
        err(r#"{"device_id":"m","payload":""}"#),
        EnvelopeError::EmptyPayload {
            platform: "generic",
            field: "payload".into()
        }
    );
    assert_eq!(
        err(r#"{"msg":{"type":1,"dev_id":1,"ds_id":"3200_0_5750"}}"#),
        EnvelopeError::MissingField {
            platform: "onenet",
            field: "msg.value".into()
        }
    );
    assert_eq!(
        err(r#"{"msg":{"type":1,"dev_id":[1],"ds_id":"x","value":"6810"}}"#),
        EnvelopeError::BadField {
            platform: "onenet",
            field: "msg.dev_id".into(),
            expected: "a string or number"
        }
    );
    assert_eq!(
        err(r#"{"device_id":"m","payload":"6810","ts":"yesterday"}"#),
        EnvelopeError::BadField {
            platform: "generic",
            field: "ts".into(),
            expected: "unix milliseconds or an RFC 3339 timestamp"
        }
    );
    assert_eq!(
        err(r#"{"device_id":"m","payload":"6810","ecl":3}"#),
        EnvelopeError::BadField {
            platform: "generic",
            field: "ecl".into(),
            expected: "a coverage enhancement level 0, 1 or 2"
        }
    );
    let big = vec![b' '; 70_000];
    assert!(matches!(
        decode_envelope(&big),
        Err(EnvelopeError::TooLarge { .. })
    ));
}

#[test]
fn encode_then_decode_every_platform() {
    let env = Envelope {
        platform: Platform::Generic,
        device_id: "2016617".into(),
        imei: Some("865820031234567".into()),
        received_at: Some(datetime!(2026-11-25 10:00:00.5 UTC)),
        payload: frame(),
        signal: Signal {
            rsrp: Some(dec!(-95)),
            sinr: Some(dec!(12.5)),
            ecl: Some(1),
        },
    };
    for platform in [Platform::Generic, Platform::CtWing, Platform::OneNet] {
        let body = encode_envelope(platform, &env);
        let back = decode_envelope(&body).unwrap();
        assert_eq!(
            back,
            Envelope {
                platform,
                ..env.clone()
            },
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    // Without optional fields too.
    let bare = Envelope::new(Platform::CtWing, "d", vec![0x68]);
    for platform in [Platform::Generic, Platform::CtWing, Platform::OneNet] {
        let back = decode_envelope(&encode_envelope(platform, &bare)).unwrap();
        assert_eq!(back.payload, vec![0x68]);
        assert_eq!(back.device_id, "d");
        assert_eq!(back.imei, None);
        assert_eq!(back.received_at, None);
    }
}

#[test]
fn inner_cjt188_frame_decodes_with_signal_records() {
    use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
    let address = cjt188::parse_address("12345678901234").unwrap();
    let reading = Cjt188Reading {
        current_m3: dec!(123.45),
        settlement_m3: dec!(100.00),
        unit: 0x2C,
        clock: datetime!(2026-11-25 18:00:00),
        status: 0,
    };
    let bytes = cjt188::encode(&Cjt188Frame::read_data_reply(0x10, address, 7, &reading));
    let mut env = Envelope::new(Platform::CtWing, "d1", bytes);
    env.signal.rsrp = Some(dec!(-95));
    let pushed = encode_envelope(Platform::CtWing, &env);
    let frame = decode_envelope(&pushed).unwrap().decode_frame().unwrap();
    assert_eq!(frame.meter.id, "12345678901234");
    let volume = frame
        .records
        .iter()
        .find(|r| r.quantity == "volume")
        .expect("volume record");
    assert_eq!(volume.value, RecordValue::Number(dec!(123.45)));
    let last = frame.records.last().unwrap();
    assert_eq!(last.quantity, "signal_rsrp");
    assert_eq!(last.value, RecordValue::Number(dec!(-95)));
    // A payload that is not CJ/T 188 is a typed cjt188 error.
    let junk = Envelope::new(Platform::Generic, "d", vec![0x01, 0x02]);
    assert!(matches!(
        junk.decode_frame(),
        Err(decoders::DecodeError::Cjt188(_))
    ));
}

/// Fuzz regression (envelope_decode, crash-95379e12): a generic envelope with device id `+1`
/// re-encoded for OneNET came back as `1`, because the encoder wrote every id that parses as
/// a number as a JSON number. Ids that do not print back the same must stay strings.
#[test]
fn onenet_encoding_keeps_non_canonical_numeric_device_ids() {
    let body = br#"{"v":1,"device_id":"+1","imei":"8675","ts":"1012-11-25T10:00:00Z","payload":"6810aa","rsrp":-95,"ecl":0}"#;
    let env = decode_envelope(body).unwrap();
    assert_eq!(env.device_id, "+1");
    for id in [
        "+1",
        "01",
        "007",
        "1",
        "18446744073709551615",
        "18446744073709551616",
    ] {
        let mut e = env.clone();
        e.device_id = id.to_owned();
        for platform in [Platform::Generic, Platform::CtWing, Platform::OneNet] {
            let back = decode_envelope(&encode_envelope(platform, &e)).unwrap();
            assert_eq!(back.device_id, id, "{platform:?}");
            assert_eq!(back.payload, vec![0x68, 0x10, 0xAA]);
        }
    }
}

proptest! {
    /// decode_envelope never panics on arbitrary bytes or arbitrary JSON-ish text.
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        drop(decode_envelope(&bytes));
    }

    #[test]
    fn decode_never_panics_on_json_like(text in r#"\{("(msg|device_id|payload|messageType|deviceId|type|value|ds_id|dev_id)":("[0-9a-fA-F]{0,8}"|-?[0-9]{1,3}|\{\}|\[\]|null),?){0,5}\}"#) {
        drop(decode_envelope(text.as_bytes()));
    }

    /// Any payload survives every platform's encoding.
    #[test]
    fn payload_round_trip(payload in proptest::collection::vec(any::<u8>(), 1..64), which in 0usize..3) {
        let platform = [Platform::Generic, Platform::CtWing, Platform::OneNet][which];
        let env = Envelope::new(platform, "dev", payload.clone());
        let back = decode_envelope(&encode_envelope(platform, &env)).unwrap();
        prop_assert_eq!(back.payload, payload);
    }
}
