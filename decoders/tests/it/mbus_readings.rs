//! `mbus::readings` (the gateway's path) gives exactly what `mbus::decode` followed by the
//! gateway's filter (`NumericReading::of_record`) gives: on every libmbus corpus frame, on
//! mutated corpus frames (checksum fixed, so they reach the record parser), and on random
//! frames from the encoder. Values are compared by their `Debug` form, which includes each
//! `Decimal`'s scale.

use decoders::mbus::{self, DataRecord, NumericReading, RspUdHeader};
use proptest::prelude::*;
use serde_json::Value;

use crate::common;

/// `readings` against `decode` + filter on one frame; `Err` describes the difference.
fn same_as_decode(frame: &[u8]) -> Result<(), String> {
    let mut got = Vec::new();
    let typed = mbus::readings(frame, &mut got);
    match (mbus::decode(frame), typed) {
        (Ok(decoded), Ok(meter)) => {
            let want: Vec<NumericReading> = decoded
                .records
                .iter()
                .filter_map(NumericReading::of_record)
                .collect();
            if format!("{want:?}") != format!("{got:?}") {
                return Err(format!("readings {got:?}\n  != decode {want:?}"));
            }
            if meter != decoded.meter {
                return Err(format!("meter {meter:?} != {:?}", decoded.meter));
            }
            Ok(())
        }
        (Err(want), Err(got)) if want == got => Ok(()),
        (want, got) => Err(format!("decode {want:?} but readings {got:?}")),
    }
}

/// With its link-layer checksum recomputed (a long frame's CS covers C to the last data byte).
fn fix_checksum(frame: &mut [u8]) {
    let n = frame.len();
    if n >= 9 && frame[0] == 0x68 && frame[3] == 0x68 {
        frame[n - 2] = frame[4..n - 2].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    }
}

#[test]
fn readings_equal_decode_on_the_libmbus_corpus_and_its_mutations() {
    let path = common::shared_dir().join("conformance/mbus/libmbus_cases.jsonl");
    let text = std::fs::read_to_string(&path).expect("read libmbus corpus");
    let (mut frames, mut decoded, mut mutated) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let case: Value = serde_json::from_str(line).unwrap();
        let name = case["name"].as_str().unwrap().to_owned();
        let bytes = common::hex_tokens(case["frame_hex"].as_str().unwrap_or(""));
        frames += 1;
        decoded += usize::from(mbus::decode(&bytes).is_ok());
        if let Err(e) = same_as_decode(&bytes) {
            failures.push(format!("{name}: {e}"));
        }
        // Every byte after the link header, set to a few values that change the record
        // structure (extension bits, function and storage bits, LVAR, fillers, manufacturer
        // data) and to its complement.
        for i in 6..bytes.len().saturating_sub(2) {
            for v in [0x00, 0x0F, 0x1F, 0x2F, 0x80, 0xC4, 0xFD, 0xFF, !bytes[i]] {
                let mut m = bytes.clone();
                m[i] = v;
                fix_checksum(&mut m);
                mutated += 1;
                if let Err(e) = same_as_decode(&m) {
                    failures.push(format!("{name} byte {i} = {v:#04x}: {e}"));
                }
            }
        }
    }
    println!(
        "mbus::readings = decode + filter on {frames} corpus frames ({decoded} decoded) and {mutated} mutated frames"
    );
    assert!(frames >= 100, "corpus too small: {frames}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn any_record() -> impl Strategy<Value = DataRecord> {
    (
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..3),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..3),
        proptest::collection::vec(any::<u8>(), 0..9),
    )
        .prop_map(|(dif, dife, vif, vife, data)| DataRecord {
            // Any coding, function and storage bit; the extension bits come from the chains.
            dif: dif & 0x7F,
            dife,
            vif: vif & 0x7F,
            vife,
            data,
        })
}

proptest! {
    #[test]
    fn readings_equal_decode_on_random_frames(
        records in proptest::collection::vec(any_record(), 0..16),
        msb_first in any::<bool>(),
        ci in prop_oneof![Just(0x72u8), Just(0x76), Just(0x7A), Just(0x78), Just(0x73)],
    ) {
        let header = RspUdHeader {
            id: 0x1234_5678, manufacturer: 0x2C2D, version: 1, medium: 7,
            access_number: 0, status: 0, signature: 0,
        };
        let mut frame = mbus::encode::rsp_ud(1, &header, &records);
        frame[6] = if msb_first && ci == 0x72 { 0x76 } else { ci };
        fix_checksum(&mut frame);
        prop_assert!(same_as_decode(&frame).is_ok(), "{}", same_as_decode(&frame).unwrap_err());
    }
}
