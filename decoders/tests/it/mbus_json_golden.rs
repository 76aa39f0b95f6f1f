//! `mbus::decode`'s serialized output (the JSON `meter-decode` prints, and the `Debug` form)
//! for every libmbus corpus frame and for mutations of each, pinned against a golden listing
//! generated before the frame types changed: a redesign of `DecodedFrame`'s representation
//! must not change one byte of the text. The listing keeps a 64-bit FNV-1a hash per frame,
//! not the text itself (the corpus stays in `../shared`, see CONFORMANCE.md).
//!
//! Regenerate (only when an output change is intended): `MBUS_JSON_GOLDEN_WRITE=1 cargo
//! nextest run -p decoders --test it mbus_json_golden::`.

use crate::common;

use decoders::mbus;
use serde_json::Value;

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/it/data/mbus_json_golden.tsv"
);

/// Values each byte from the CI on is set to in turn (checksum fixed): no data / zero,
/// variable length, filler, extension bit, all ones (invalid BCD, `FD` tables); few, as the
/// test runs unoptimized.
const MUTATIONS: [u8; 5] = [0x00, 0x0D, 0x2F, 0x80, 0xFF];

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, text: &str) {
        for b in text.bytes().chain([0xFF]) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The text `meter-decode` would print for a frame (or the error), and the `Debug` form.
fn outputs(bytes: &[u8], hash: &mut Fnv) {
    match mbus::decode(bytes) {
        Ok(frame) => {
            hash.add(&serde_json::to_string(&frame).expect("serializable"));
            hash.add(&format!("{frame:?}"));
        }
        Err(e) => hash.add(&format!("error: {e} / {e:?}")),
    }
}

fn listing() -> String {
    let path = common::shared_dir().join("conformance/mbus/libmbus_cases.jsonl");
    let text = std::fs::read_to_string(&path).expect("read libmbus corpus");
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let case: Value = serde_json::from_str(line).unwrap();
        let name = format!(
            "{}/{}",
            case["set"].as_str().unwrap(),
            case["name"].as_str().unwrap()
        );
        let bytes = common::hex_tokens(case["frame_hex"].as_str().unwrap_or(""));
        let mut whole = Fnv::new();
        outputs(&bytes, &mut whole);
        let mut mutated = Fnv::new();
        let long = bytes.len() > 9 && bytes[0] == 0x68 && bytes[3] == 0x68;
        if long {
            let cs_at = bytes.len() - 2;
            for i in 6..cs_at {
                for v in MUTATIONS {
                    let mut m = bytes.clone();
                    m[i] = v;
                    m[cs_at] = m[4..cs_at].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                    outputs(&m, &mut mutated);
                }
            }
        }
        out.push_str(&format!("{name}\t{:016x}\t{:016x}\n", whole.0, mutated.0));
    }
    out
}

#[test]
fn decode_output_matches_the_golden_listing() {
    let got = listing();
    if std::env::var_os("MBUS_JSON_GOLDEN_WRITE").is_some() {
        std::fs::write(GOLDEN, &got).expect("write golden listing");
        return;
    }
    let want = std::fs::read_to_string(GOLDEN).expect("read golden listing");
    let diff: Vec<_> = got
        .lines()
        .zip(want.lines())
        .filter(|(g, w)| g != w)
        .map(|(g, w)| format!("got  {g}\nwant {w}"))
        .collect();
    assert!(
        diff.is_empty() && got.lines().count() == want.lines().count(),
        "{} of {} frames differ from the golden output:\n{}",
        diff.len(),
        want.lines().count(),
        diff.join("\n")
    );
}
