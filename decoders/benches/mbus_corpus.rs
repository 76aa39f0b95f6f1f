//! Frames per CPU-second on the public corpora, side by side in one process: the paths the
//! gateway runs (`mbus::readings` for serial and concentrator M-Bus, `cjt188::decode`,
//! `wmbus::decode`), the public `mbus::decode`, and, for wired M-Bus, the `m-bus-parser` crate
//! (0.5.3) on the frames both accept.
//!
//! `cargo bench -p decoders --bench mbus_corpus` (reads `conformance/` like the conformance
//! tests: `WM_SHARED_DIR`, `<workspace>/../shared`, `/work/shared`). CPU time comes from
//! `/proc/thread-self/schedstat`, so other processes on a shared machine do not count; the
//! figures are per core (one thread).
//!
//! For instruction counts, which the machine's load does not change, set
//! `MBUS_CORPUS_CALLGRIND=<path>:<passes>` (`path` = `ours` for `mbus::decode` with every
//! record read, `gateway` for
//! `mbus::readings`, `theirs` for m-bus-parser; `walk`, `lazy` and `typed` for what a
//! redesigned `decode` would cost at least, see `walk_path`, `lazy_path`, `typed_path`): the bench then runs exactly `passes` passes of that path over the frames
//! both accept, untimed, and exits. Under `valgrind --tool=callgrind`, the difference of the
//! totals of two pass counts divided by the frames decoded is instructions per frame:
//! `scripts/callgrind-mbus.sh` does that for both paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::path::PathBuf;

use decoders::{cjt188, mbus, wmbus};
use m_bus_parser::WiredFrame;
use m_bus_parser::mbus_data::MbusData;

fn shared_dir() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("WM_SHARED_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    candidates.push(PathBuf::from("/work/shared"));
    candidates
        .into_iter()
        .find(|c| c.join("conformance").is_dir())
        .expect("conformance corpus (set WM_SHARED_DIR)")
}

fn lines(path: PathBuf) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Space-separated tokens (libmbus writes some bytes with one digit) or contiguous hex.
fn hex(s: &str) -> Vec<u8> {
    if s.contains(char::is_whitespace) {
        s.split_whitespace()
            .filter_map(|t| u8::from_str_radix(t, 16).ok())
            .collect()
    } else {
        hex::decode(s).unwrap()
    }
}

/// Nanoseconds this thread has spent on a CPU.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("/proc/thread-self/schedstat (Linux only)")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat format")
}

/// Runs `pass` (one pass over `frames` frames) for 2 CPU-seconds; returns frames/s per core.
fn measure(name: &str, frames: usize, mut pass: impl FnMut() -> usize) -> f64 {
    for _ in 0..200 {
        black_box(pass());
    }
    let start = thread_cpu_ns();
    let mut n = 0u64;
    while thread_cpu_ns() - start < 2_000_000_000 {
        for _ in 0..100 {
            black_box(pass());
        }
        n += 100 * frames as u64;
    }
    let per_s = n as f64 / ((thread_cpu_ns() - start) as f64 / 1e9);
    println!(
        "{name}: {:.0} ns/frame, {:.2} M frames/s per core",
        1e9 / per_s,
        per_s / 1e6
    );
    per_s
}

/// m-bus-parser's full decode: link frame, application header, every record with its value.
fn m_bus_parser_decode(frame: &[u8]) -> Option<usize> {
    let parsed = MbusData::<WiredFrame<'_>>::try_from(frame).ok()?;
    if parsed.application_error.is_some() {
        return None;
    }
    let mut records = 0;
    for record in parsed.data_records? {
        black_box(record.ok()?);
        records += 1;
    }
    Some(records)
}

/// The public API as its callers use it, touching what `m_bus_parser_decode` touches: the
/// frame decoded, then every record read (quantity, value, unit, storage, tariff, sub-unit,
/// function). With today's eager `DecodedFrame` the records are already built, so reading them
/// costs little; a `decode` that computed records on access would do its per-record work
/// here, and timing `decode` alone would then leave it out (branch `h17`).
fn public_path(frame: &[u8]) -> usize {
    let decoded = mbus::decode(frame).unwrap();
    black_box(&decoded.meter);
    let mut n = 0;
    for r in &decoded.records {
        black_box(r);
        n += 1;
    }
    n
}

/// The gateway's M-Bus path in the decoder: the meter's identity and the typed readings the
/// pipeline stores, into a buffer reused across frames (the gateway then wraps them in
/// `model::Reading`s with their provenance).
fn gateway_path(frame: &[u8], buf: &mut Vec<mbus::NumericReading>) -> usize {
    buf.clear();
    let meter = mbus::readings(frame, buf).unwrap();
    black_box(&meter);
    black_box(&*buf);
    buf.len()
}

/// Floor of a fully lazy `decode`: link frame, header and the record walk that validates the
/// structure, nothing computed per record (fixed-structure frames, which `parse` refuses,
/// count as 0 records).
fn walk_path(frame: &[u8]) -> usize {
    let Ok(rsp) = mbus::parse(frame) else {
        return 0;
    };
    black_box(&rsp.header);
    let mut n = 0;
    for r in rsp.records {
        black_box(r.unwrap());
        n += 1;
    }
    n
}

/// What a `decode` whose records are computed on access would cost at least: an owned copy
/// of the frame and, per record, where it starts in the copy (the walk validates the
/// structure once; fields would be read from the copy on access).
fn lazy_path(frame: &[u8]) -> usize {
    let Ok(rsp) = mbus::parse(frame) else {
        return 0;
    };
    black_box(&rsp.header);
    let owned = frame.to_vec();
    let mut starts: Vec<u32> = Vec::with_capacity(frame.len() >> 2);
    for r in rsp.records {
        starts.push(r.unwrap().offset as u32);
    }
    black_box((&owned, &starts));
    starts.len()
}

/// What an eager compact `decode` computes per record without text or `Decimal`: the VIF's
/// meaning, the unscaled typed value, storage/tariff/subunit/function (through the public
/// record API, which reads the VIF table twice: an upper bound).
fn typed_path(frame: &[u8]) -> usize {
    let Ok(rsp) = mbus::parse(frame) else {
        return 0;
    };
    black_box(&rsp.header);
    let mut n = 0;
    for r in rsp.records {
        let r = r.unwrap();
        black_box((r.vif_info(), r.raw_value()));
        black_box((r.storage(), r.tariff(), r.subunit(), r.function()));
        n += 1;
    }
    n
}

fn main() {
    let dir = shared_dir().join("conformance");

    // Wired M-Bus: every libmbus frame both decoders accept completely.
    let cases = lines(dir.join("mbus/libmbus_cases.jsonl"));
    let all: Vec<Vec<u8>> = cases
        .iter()
        .map(|c| hex(c["frame_hex"].as_str().unwrap()))
        .collect();
    let both: Vec<&Vec<u8>> = all
        .iter()
        .filter(|f| mbus::decode(f).is_ok() && m_bus_parser_decode(f).is_some())
        .collect();
    if let Ok(spec) = std::env::var("MBUS_CORPUS_CALLGRIND") {
        let (path, passes) = spec
            .split_once(':')
            .expect("MBUS_CORPUS_CALLGRIND=<path>:<passes>");
        let passes: usize = passes.parse().expect("passes is a number");
        let mut records = 0usize;
        let mut buf = Vec::new();
        for _ in 0..passes {
            for f in &both {
                records += match path {
                    "ours" => public_path(black_box(f)),
                    "gateway" => gateway_path(black_box(f), &mut buf),
                    "theirs" => m_bus_parser_decode(black_box(f)).unwrap(),
                    "walk" => walk_path(black_box(f)),
                    "typed" => typed_path(black_box(f)),
                    "lazy" => lazy_path(black_box(f)),
                    other => {
                        panic!("unknown path {other:?} (ours, gateway, theirs, walk, typed, lazy)")
                    }
                };
            }
        }
        println!(
            "{path}: {passes} passes over {} frames, {records} records",
            both.len()
        );
        return;
    }
    let ours_ok = all.iter().filter(|f| mbus::decode(f).is_ok()).count();
    println!(
        "libmbus corpus: {} frames, {ours_ok} decoded by mbus::decode, {} by both",
        all.len(),
        both.len()
    );
    let decode = measure(
        "mbus::decode -> DecodedFrame, every record read (public API)",
        both.len(),
        || both.iter().map(|f| public_path(black_box(f))).sum(),
    );
    let mut buf = Vec::new();
    let gateway = measure(
        "mbus::readings -> typed readings (the gateway's path)",
        both.len(),
        || {
            both.iter()
                .map(|f| gateway_path(black_box(f), &mut buf))
                .sum()
        },
    );
    let parse = measure(
        "mbus::parse + scaled values (allocation-free)",
        both.len(),
        || {
            both.iter()
                .map(|f| {
                    let rsp = mbus::parse(black_box(f)).unwrap();
                    rsp.records
                        .filter_map(|r| r.ok().and_then(|r| r.number()))
                        .count()
                })
                .sum()
        },
    );
    let theirs = measure("m-bus-parser 0.5.3 (records iterated)", both.len(), || {
        both.iter()
            .map(|f| m_bus_parser_decode(black_box(f)).unwrap())
            .sum()
    });
    println!(
        "ratio mbus::readings (gateway) / m-bus-parser: {:.2}x; mbus::decode / m-bus-parser: {:.2}x; allocation-free / m-bus-parser: {:.2}x",
        gateway / theirs,
        decode / theirs,
        parse / theirs
    );

    // CJ/T 188: the framed examples, as the CoAP / HTTP / MQTT sources decode them.
    let cjt: Vec<Vec<u8>> = lines(dir.join("cjt188/cjt188_examples.jsonl"))
        .iter()
        .filter_map(|c| Some(hex(c["frame_hex"].as_str()?)))
        .filter(|f| cjt188::decode(f).is_ok())
        .collect();
    measure(
        &format!("cjt188::decode ({} corpus frames)", cjt.len()),
        cjt.len(),
        || {
            cjt.iter()
                .map(|f| cjt188::decode(black_box(f)).unwrap().records.len())
                .sum()
        },
    );

    // wM-Bus: last telegram of each single-telegram wmbusmeters driver test that decodes
    // without a key, through one FormatCache as the wmbus_udp source keeps it.
    let wm: Vec<Vec<u8>> = lines(dir.join("wmbus/wmbusmeters_driver_tests.jsonl"))
        .iter()
        .filter(|c| c["telegrams"].as_array().is_some_and(|t| t.len() == 1))
        .map(|c| hex(c["telegrams"][0].as_str().unwrap()))
        .filter(|t| wmbus::decode(t, &None, &mut wmbus::FormatCache::new()).is_ok())
        .collect();
    let mut cache = wmbus::FormatCache::new();
    measure(
        &format!("wmbus::decode ({} corpus telegrams, no key)", wm.len()),
        wm.len(),
        || {
            wm.iter()
                .map(|t| {
                    wmbus::decode(black_box(t), &None, &mut cache)
                        .unwrap()
                        .records
                        .len()
                })
                .sum()
        },
    );
}
