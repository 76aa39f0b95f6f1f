//! All integration tests of this package in one binary (issue 15: one link instead of one per
//! file; each former `tests/NAME.rs` is module `NAME`, run one with `--test it NAME::`).

mod apictl;
mod common;
mod dashboard;
mod http;
