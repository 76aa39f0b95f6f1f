//! The edge runtime: protocol sources, the crash-safe spool, the MQTT uplink and downlink.
//!
//! `gateway` owns I/O at the edge: it receives frames from sources (MQTT, Modbus, M-Bus serial,
//! CoAP, HTTP push), decodes them with `decoders`, spools readings to disk before acknowledging
//! anything, publishes batches upstream, and routes commands down. It never touches the
//! database and never interprets payloads itself (that is `decoders`' job).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod control;
pub mod device_set;
pub mod downlink;
pub mod listener;
pub mod metrics;
pub mod mqtt;
pub mod normalise;
pub mod runtime;
pub mod sink;
pub mod sources;
pub mod spool;
pub mod uplink;

pub use sink::{CompactOutcome, IngestSink, SinkError, SourceCounters, SubmitRequest};
pub use sources::{CommandOutcome, CommandRequest, SourceContext};
