//! Pure, panic-free decoders (and encoders) for the meter protocols the gateway receives.
//!
//! `decoders` turns bytes into [`DecodedFrame`]s: CJ/T 188 ([`cjt188`]), wired M-Bus
//! EN 13757-2/-3 ([`mbus`]), wireless M-Bus / OMS EN 13757-4 ([`wmbus`]), Modbus register
//! blocks ([`modbus`]) and carrier IoT-platform JSON envelopes ([`envelope`]). It owns protocol
//! knowledge only: no sockets, files, clocks, async or logging. `nom` stays private; the public
//! API takes `&[u8]` and returns `Result<_, DecodeError>`.
//!
//! Every parser is `nom` combinators over `&[u8]`, checks every length prefix before taking
//! bytes, never indexes slices directly, and is fuzzed (see `fuzz/`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]

pub mod cjt188;
pub mod envelope;
mod error;
mod frame;
pub mod mbus;
pub mod modbus;
pub mod wmbus;

pub use error::DecodeError;
pub use frame::{DecodedFrame, Function, MeterInfo, Protocol, Record, RecordValue};
