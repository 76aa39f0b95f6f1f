//! All integration tests of this package in one binary (issue 15: one link instead of one per
//! file; each former `tests/NAME.rs` is module `NAME`, run one with `--test it NAME::`).

mod billing_runs;
mod common;
mod control;
mod delivery;
mod detector_scoring;
mod field_buses;
mod fleet_e2e;
mod foundation;
mod hydrant_alarms;
mod registry_sync;
mod scale_out;
