//! All integration tests of this package in one binary (issue 15: one link instead of one per
//! file; each former `tests/NAME.rs` is module `NAME`, run one with `--test it NAME::`).

mod common;

mod check_config;
mod coap_history;
mod control_session;
mod edge_limits;
mod edge_security;
mod field_command_routing;
mod gateway_e2e;
mod hydrant_source;
mod mbus_source;
mod modbus_source;
mod mqtt_tls;
mod process;
mod push_and_mqtt_sources;
mod spool_alarm;
mod spool_crash;
mod uplink;
mod wmbus_device_set;
mod wmbus_source;
