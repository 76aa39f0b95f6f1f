//! Typed configuration of an edge gateway, loaded from one TOML file.
//!
//! `edge-config` owns the gateway's configuration types: sources, devices, Modbus register maps,
//! per-meter keys, uplink and spool settings. Raw serde types are validated into typed ones by
//! pure functions that collect every problem with its path and line. It must not touch the
//! network; reading the file is the only I/O, and it lives at the edge of the crate.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod hydrant;
pub mod mbus;
pub mod modbus;
pub mod wmbus;
