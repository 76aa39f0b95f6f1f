//! Helpers shared by the workspace's tests (issue 15): one place for what every crate's tests
//! wrote again.
//!
//! - [`reading`]: a [`model::Reading`] builder with test defaults.
//! - [`names`]: unique topic roots, client ids and database names, so parallel tests never meet.
//! - [`mqtt`] (feature `mqtt`): the test broker, clients that subscribe and wait for the SUBACK,
//!   waiting for a message with a timeout.
//! - [`pty`]: a socat pseudo-terminal pair (serial M-Bus and Modbus RTU tests).
//! - [`TestDatabase`] (feature `db`): a fresh, migrated PostgreSQL database per test, and the
//!   pipeline's write helpers ([`volume_read`], [`write_validated`], [`wait_folded`]).
//! - [`tariff`]: the shipped tariff files as fixtures.
//!
//! Dev-only: `publish = false`, and only `[dev-dependencies]` (and the pipeline's benchmark
//! examples) name it, so none of this ships in a production library.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod names;
pub mod pty;
pub mod reading;
pub mod tariff;

#[cfg(feature = "mqtt")]
pub mod mqtt;

#[cfg(feature = "db")]
mod pipeline_db;

// `pipeline_db` is `pipeline/src/testing.rs` moved here unchanged (issue 15: it shipped in the
// production library). It names the pipeline's modules as `crate::…`, as it did inside
// `pipeline`; these private imports keep those paths valid, so later edits to the file on
// other branches still merge by rename.
#[cfg(feature = "db")]
use pipeline::{MIGRATOR, config, db, ingest, vee};

#[cfg(feature = "db")]
pub use pipeline_db::{TestDatabase, volume_read, wait_folded, write_validated};
pub use reading::{ReadingBuilder, reading};
