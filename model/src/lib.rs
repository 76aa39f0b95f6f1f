//! The shared vocabulary of the water-meter ingestion gateway and pipeline.
//!
//! `model` owns the types every other crate speaks: meter identity ([`MeterId`],
//! [`MeterAddress`]), normalised readings ([`Reading`], [`Quantity`], [`Unit`], [`Quality`]),
//! the uplink wire batch ([`ReadingBatch`]), device commands ([`DeviceCommand`]) and alarms
//! ([`Alarm`]). It is pure: no I/O, no clocks, no async. Register values are exact
//! ([`rust_decimal::Decimal`]), never floats, because they end up on bills.
//!
//! The JSON form of every type is versioned (see [`WIRE_VERSION`]) and documented in
//! `docs/wire-format.md`; changing a field name is a breaking wire change.
//!
//! ```
//! use model::{MeterAddress, MeterId};
//! let addr = MeterAddress::Cjt188 { meter_type: 0x10, address: [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78] };
//! assert_eq!(MeterId::from(&addr).as_str(), "cjt188:78330011223344");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod alarm;
pub mod auth;
mod broker;
mod command;
mod device_set;
mod meter;
mod reading;
pub mod topic;
mod unit;

pub use alarm::{Alarm, AlarmKind, AlarmSeverity};
pub use broker::{BrokerUrl, BrokerUrlError, MQTT_PORT, MQTTS_PORT};
pub use command::{CommandAck, CommandAction, CommandId, CommandState, DeviceCommand};
pub use device_set::{DEVICE_SET_WIRE_VERSION, DeviceEntry, DeviceSet, DeviceSetReport};
pub use meter::{GatewayId, MeterAddress, MeterId, MeterIdError, partition_of};
pub use reading::{
    BatchEntry, ClockSource, EstimationMethod, IngestAck, Provenance, Quality, QualityFlag,
    Reading, ReadingBatch, RejectReason, SourceKind, WIRE_VERSION,
};
pub use rust_decimal::Decimal;
pub use unit::{Quantity, Unit, UnitError};
