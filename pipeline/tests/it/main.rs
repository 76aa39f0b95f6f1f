//! All integration tests of this package in one binary (issue 15: one link instead of one per
//! file; each former `tests/NAME.rs` is module `NAME`, run one with `--test it NAME::`).

mod bill_run_cli;
mod control_rules;
mod detect_alarms;
mod detect_crash;
mod detect_replay_cli;
mod fresh_layout;
mod ingest_encoding;
mod journal;
mod ledger;
mod monthly_bills;
mod monthly_logs;
mod notify;
mod packing;
mod pipeline_store;
mod priority_lane;
mod registry;
mod retention;
mod review;
mod scheduler;
mod storage_migration;
mod takeover;
