//! All integration tests of this package in one binary (issue 15: one link instead of one per
//! file; each former `tests/NAME.rs` is module `NAME`, run one with `--test it NAME::`).

mod common;

mod cjt188_conformance;
#[cfg(feature = "cli")]
mod cli;
mod envelope;
mod golden;
mod mbus_conformance;
mod mbus_json_golden;
mod mbus_readings;
mod modbus;
mod properties;
mod wmbus_conformance;
mod wmbus_crc_detection;
