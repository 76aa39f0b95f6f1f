//! Simulated devices that speak every protocol for real, over sockets, UDP, serial ptys and MQTT.
//!
//! `simulators` owns the stand-in for the field: meters, concentrators, Modbus instruments and
//! hydrant controllers with realistic consumption and scripted faults. Frames are produced with
//! `decoders`' encoders; the simulators reach the gateway only through its public interfaces.
//!
//! - [`scenario`]: seeded scenario files (fleet, span, faults); [`profile`]: the demand model;
//! - [`engine`]: the pure, simulated-clock engine producing readings and the ground truth;
//! - [`truth`]: injected events, DMA balances and precision/recall scoring of detectors;
//! - [`frames`]: CJ/T 188, M-Bus and wM-Bus frames built with `decoders`' encoders;
//! - [`fleet`]: [`fleet::Fleet::start`] runs the engine against real transports
//!   ([`nbiot`] CoAP and HTTP push, [`mqtt`] concentrators and hydrants, wM-Bus UDP,
//!   [`mbus_serial`] socat ptys, [`modbus_tcp`]) and counts every frame sent.
//!
//! ```
//! use simulators::engine::{Engine, ground_truth};
//! use simulators::scenario::Scenario;
//!
//! let scenario = Scenario::from_toml(r#"
//!     name = "doc"
//!     seed = 1
//!     start = "2026-06-01T00:00:00Z"
//!     days = 2
//!     [fleet]
//!     households = 10
//!     [[faults]]
//!     kind = "leak"
//!     meter = 3
//!     from = "2026-06-01T12:00:00Z"
//!     rate_lph = 20.0
//! "#, "doc").unwrap();
//! let mut readings = 0;
//! Engine::new(scenario.clone()).run(|_| readings += 1);
//! assert_eq!(readings, 10 * 48);
//! let truth = ground_truth(&scenario);
//! assert_eq!(truth.events[0].meter, "cjt188:78330000000003");
//! ```
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
pub mod registry;
pub mod scenario;
pub mod truth;
