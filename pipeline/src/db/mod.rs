//! The pipeline's database layer: everything that reads or writes PostgreSQL for ingest.
//!
//! One module per table group, dependencies one way (see ARCHITECTURE.md, "db/ tree"):
//! [`error`] and [`copy`] at the bottom; [`readings`], [`rollups`], [`meter_state`],
//! [`progress`], [`rejects`] and [`partitions`] on them; [`journal`] on rollups and meter
//! state; [`write`] (the ingest transaction) on all of them. No module here imports the MQTT
//! worker, `control`, or the payload decoding of [`crate::ingest`].

use time::UtcOffset;

pub mod copy;
pub mod error;
pub mod journal;
pub mod meter_state;
pub mod partitions;
pub mod progress;
pub mod readings;
pub mod rejects;
pub mod retry;
pub mod rollups;
pub mod write;

pub use error::StoreError;
pub use write::{WriteMode, WriteSet, WriteStats, write_batch};

/// Storage options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Offset of the local day for daily rollups (Asia/Shanghai: +08:00, no DST).
    pub day_offset: UtcOffset,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            day_offset: UtcOffset::from_hms(8, 0, 0).unwrap_or(UtcOffset::UTC),
        }
    }
}
