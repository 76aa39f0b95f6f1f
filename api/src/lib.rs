//! The HTTP API (axum): meter records, reads, commands, bills and the dashboard.
//!
//! `api` owns HTTP: routing, authentication, request validation and error mapping. It reads and
//! writes through `pipeline`'s store and `billing-core`; it never speaks a device protocol.
//! Not implemented yet beyond this crate boundary.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
