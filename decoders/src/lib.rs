//! Pure, panic-free decoders (and encoders) for the meter protocols the gateway receives.
//!
//! `decoders` turns bytes into [`DecodedFrame`]s: CJ/T 188 ([`cjt188`]), wired M-Bus
//! EN 13757-2/-3 ([`mbus`]), wireless M-Bus / OMS EN 13757-4 ([`wmbus`]), Modbus register
//! blocks ([`modbus`]) and carrier IoT-platform JSON envelopes ([`envelope`]). It owns protocol
//! knowledge only: no sockets, files, clocks, async or logging. `nom` stays private; the public
//! API takes `&[u8]` and returns `Result<_, DecodeError>`.
//!
//! Every parser is `nom` combinators over `&[u8]` (the M-Bus record parser, the hot path,
//! reads by checked index instead), checks every length prefix before taking bytes, never
//! indexes slices directly, and has cargo-fuzz targets (see `fuzz/`) plus
//! proptest no-panic properties. Conformance against public corpora: `CONFORMANCE.md`.
//!
//! The `meter-decode` binary prints the JSON form of a pasted frame:
//! `meter-decode --protocol auto "68 15 15 68 08 01 72 ..."`.
//!
//! ```
//! use decoders::{Protocol, RecordValue};
//! // A CJ/T 188 read-data reply: 556677.00 m³, clock 2015-05-11 22:01:31, valve closed.
//! let bytes = hex::decode(
//!     "681044332211003378811 61F9000007766552C007766552C3101221105152021841316".replace(' ', ""),
//! ).unwrap();
//! assert_eq!(decoders::detect(&bytes), Some(Protocol::Cjt188));
//! let frame = decoders::decode(Protocol::Cjt188, &bytes).unwrap().unwrap();
//! assert_eq!(frame.meter.id, "78330011223344");
//! assert_eq!(frame.records[0].value, RecordValue::Number(556677.into()));
//! assert_eq!(frame.records[2].value, RecordValue::Date("2015-05-11T22:01:31".into()));
//! ```
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
mod cursor;
pub mod envelope;
mod error;
mod frame;
pub mod mbus;
pub mod modbus;
mod small_string;
pub mod wmbus;

pub use error::DecodeError;
pub use frame::{DecodedFrame, Function, MeterInfo, Protocol, Record, RecordQuantity, RecordValue};
pub use small_string::SmallString;

/// Guesses the protocol of a raw frame from its framing bytes.
///
/// M-Bus: `E5`, a short frame `10 C A CS 16`, or `68 L L 68` whose length matches. CJ/T 188:
/// `FE` wake-up bytes, or `68 T A0..A6 C L` whose length matches. Returns `None` otherwise
/// (wM-Bus telegrams start with their L field, which may be any byte, even 0x68).
pub fn detect(bytes: &[u8]) -> Option<Protocol> {
    let total = |l: &u8, overhead: usize| usize::from(*l).checked_add(overhead);
    match bytes {
        [0xE5] | [0x10, _, _, _, 0x16] => Some(Protocol::Mbus),
        [0x68, l1, l2, 0x68, ..] if l1 == l2 && total(l1, 6) == Some(bytes.len()) => {
            Some(Protocol::Mbus)
        }
        [0xFE, ..] => Some(Protocol::Cjt188),
        [0x68, _, _, _, _, _, _, _, _, _, l, ..] if total(l, 13) == Some(bytes.len()) => {
            Some(Protocol::Cjt188)
        }
        _ => None,
    }
}

/// Decodes one wired frame of `protocol` (CJ/T 188 or M-Bus long frame).
///
/// Returns `None` for protocols that need more than the bytes (wM-Bus needs keys and a
/// format cache: use `wmbus::decode`; Modbus needs a register map: use `modbus::decode`).
pub fn decode(protocol: Protocol, bytes: &[u8]) -> Option<Result<DecodedFrame, DecodeError>> {
    match protocol {
        Protocol::Cjt188 => Some(cjt188::decode(bytes).map_err(DecodeError::from)),
        Protocol::Mbus => Some(mbus::decode(bytes).map_err(DecodeError::from)),
        Protocol::Wmbus | Protocol::Modbus => None,
    }
}
