//! Simulated devices that speak every protocol for real, over sockets, UDP, serial ptys and MQTT.
//!
//! `simulators` owns the stand-in for the field: meters, concentrators, Modbus instruments and
//! hydrant controllers with realistic consumption and scripted faults. Frames are produced with
//! `decoders`' encoders; the simulators reach the gateway only through its public interfaces.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod engine;
pub mod fleet;
pub mod frames;
pub mod mbus_serial;
pub mod modbus_tcp;
pub mod mqtt;
pub mod nbiot;
pub mod profile;
pub mod scenario;
pub mod truth;
