//! The central pipeline: ingest from MQTT, VEE, storage on PostgreSQL, rollups, billing trigger.
//!
//! `pipeline` owns the database: the schema ([`MIGRATOR`]), batched writes of readings
//! ([`db`]), and the stages between the broker and storage. It never serves HTTP (that is
//! `api`) and never speaks device protocols (that is `gateway` and `decoders`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api_retention;
pub mod billing;
pub mod config;
pub mod control;
pub mod db;
pub mod detect;
pub mod edit;
pub mod ingest;
pub mod ledger;
pub mod metrics_http;
pub mod notify;
pub mod registry;
pub mod review;
pub mod scheduler;
pub mod takeover;
pub mod vee;
#[cfg(feature = "worker")]
pub mod worker;

/// The schema migrations in `pipeline/migrations`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
