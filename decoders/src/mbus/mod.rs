//! Wired M-Bus: EN 13757-2 link layer and EN 13757-3 application layer (decoder and encoders).
//!
//! * [`parse_link`] splits a link frame: single character `E5`, short frame `10 C A CS 16`,
//!   control frame and long frame `68 L L 68 C A CI .. CS 16`.
//! * [`decode`] turns an RSP_UD long frame into a [`DecodedFrame`];
//!   [`decode_application`] does the same from the CI byte on (reused by wM-Bus) and
//!   [`records`] iterates the data records of a payload without allocating.
//! * [`encode`] builds the master requests and slave answers the simulators and the gateway
//!   master need.
//!
//! Conformance against the libmbus corpus is described in `decoders/CONFORMANCE.md`.
//!
//! ```
//! use decoders::mbus;
//! let frame = hex::decode(
//!     "681515680801720100000096150107180000000C13785634127A16",
//! ).unwrap();
//! let decoded = mbus::decode(&frame).unwrap();
//! assert_eq!(decoded.meter.id, "00000001");
//! assert_eq!(decoded.records[0].quantity, "volume");
//! ```

use model::{Decimal, Unit};

use crate::cursor::checksum;
use crate::frame::{
    DecodedFrame, Function, MeterInfo, Protocol, Record, RecordQuantity, RecordValue,
};
use crate::small_string::SmallString;

/// Single-character acknowledgement.
pub const ACK: u8 = 0xE5;
/// Start byte of a short frame.
pub const START_SHORT: u8 = 0x10;
/// Start byte of a control or long frame.
pub const START_LONG: u8 = 0x68;
/// Stop byte.
pub const STOP: u8 = 0x16;

/// CI: application error from the slave (EN 13757-3 §6.6).
pub const CI_APPLICATION_ERROR: u8 = 0x70;
/// CI: variable data response, long header (mode 1, LSB first).
pub const CI_RSP_LONG: u8 = 0x72;
/// CI: variable data response, long header, mode 2 (MSB first).
pub const CI_RSP_LONG_MSB: u8 = 0x76;
/// CI: variable data response without header.
pub const CI_RSP_NONE: u8 = 0x78;
/// CI: variable data response, short header.
pub const CI_RSP_SHORT: u8 = 0x7A;
/// CI: fixed data structure (EN 13757-3 annex G, LSB first).
pub const CI_RSP_FIXED: u8 = 0x73;
/// CI: fixed data structure, MSB first.
pub const CI_RSP_FIXED_MSB: u8 = 0x77;
/// CI: application reset (master to slave).
pub const CI_APPLICATION_RESET: u8 = 0x50;
/// CI: data send (master to slave).
pub const CI_DATA_SEND: u8 = 0x51;
/// CI: select slave by secondary address.
pub const CI_SELECT: u8 = 0x52;

/// At most this many DIFEs per record (EN 13757-3 §6.3.2).
pub const MAX_DIFE: usize = 10;
/// At most this many VIFEs per record (EN 13757-3 §6.3.3).
pub const MAX_VIFE: usize = 10;

/// Why an M-Bus frame could not be decoded. Offsets count from the first byte of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MbusError {
    /// The input ended before the frame or field did.
    #[error("truncated at byte {offset}: {field} needs {needed} more byte(s)")]
    Truncated {
        /// Offset of the field.
        offset: usize,
        /// Field being read.
        field: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// The input is empty.
    #[error("empty input")]
    Empty,
    /// The first byte is not E5, 10 or 68.
    #[error("expected a frame start (0xE5, 0x10 or 0x68) at byte {offset}, found {found:#04x}")]
    BadStart {
        /// Offset of the byte.
        offset: usize,
        /// The byte.
        found: u8,
    },
    /// The two length bytes of a long frame differ, or the second 0x68 is missing.
    #[error("bad long-frame header at byte {offset}: L {first:#04x} / {second:#04x}")]
    BadHeader {
        /// Offset of the field.
        offset: usize,
        /// First length byte.
        first: u8,
        /// Second length byte (or the byte found instead of the second 0x68).
        second: u8,
    },
    /// The length field is below 3 (C, A, CI).
    #[error("length {length} at byte {offset} is too short (needs C, A and CI)")]
    BadLength {
        /// Offset of L.
        offset: usize,
        /// The length.
        length: u8,
    },
    /// Checksum mismatch.
    #[error("bad checksum at byte {offset}: expected {expected:#04x}, found {found:#04x}")]
    BadChecksum {
        /// Offset of CS.
        offset: usize,
        /// Computed.
        expected: u8,
        /// On the wire.
        found: u8,
    },
    /// Stop byte missing.
    #[error("expected stop byte 0x16 at byte {offset}, found {found:#04x}")]
    BadStop {
        /// Offset.
        offset: usize,
        /// The byte.
        found: u8,
    },
    /// Bytes after the stop byte.
    #[error("{count} unexpected byte(s) after the stop byte, from byte {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// Count.
        count: usize,
    },
    /// [`decode`] needs a long frame with data.
    #[error("expected a long frame with user data, got {kind}")]
    NotLongFrame {
        /// What was found.
        kind: &'static str,
    },
    /// CI value this decoder does not handle.
    #[error("unsupported CI {ci:#04x} at byte {offset}")]
    UnsupportedCi {
        /// Offset of CI.
        offset: usize,
        /// The CI.
        ci: u8,
    },
    /// The slave reported an application error (CI 70).
    #[error("slave reported application error {code:?} ({meaning}) at byte {offset}")]
    ApplicationError {
        /// Offset of the error byte (or of CI when absent).
        offset: usize,
        /// Error code, `None` when the frame carried none.
        code: Option<u8>,
        /// Meaning of the code.
        meaning: &'static str,
    },
    /// More than [`MAX_DIFE`] DIFEs.
    #[error("more than 10 DIFEs in the record at byte {offset}")]
    TooManyDife {
        /// Offset of the DIF.
        offset: usize,
    },
    /// More than [`MAX_VIFE`] VIFEs.
    #[error("more than 10 VIFEs in the record at byte {offset}")]
    TooManyVife {
        /// Offset of the DIF.
        offset: usize,
    },
    /// The DIFE chain gives a tariff wider than 16 bits (a tariff bit in the 9th or 10th
    /// DIFE), beyond what a reading can carry.
    #[error("tariff wider than 16 bits in the record at byte {offset}")]
    TariffTooWide {
        /// Offset of the DIF.
        offset: usize,
    },
    /// Variable-length data with an LVAR this decoder cannot size.
    #[error("unsupported variable-length LVAR {lvar:#04x} at byte {offset}")]
    UnsupportedLvar {
        /// Offset of LVAR.
        offset: usize,
        /// The LVAR byte.
        lvar: u8,
    },
}

impl MbusError {
    /// A stable snake_case code for metrics labels (`decoder_errors_total{error_code}`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::Empty => "empty",
            Self::BadStart { .. } => "bad_start",
            Self::BadHeader { .. } => "bad_header",
            Self::BadLength { .. } => "bad_length",
            Self::BadChecksum { .. } => "bad_checksum",
            Self::BadStop { .. } => "bad_stop",
            Self::TrailingBytes { .. } => "trailing_bytes",
            Self::NotLongFrame { .. } => "not_long_frame",
            Self::UnsupportedCi { .. } => "unsupported_ci",
            Self::ApplicationError { .. } => "application_error",
            Self::TooManyDife { .. } => "too_many_dife",
            Self::TooManyVife { .. } => "too_many_vife",
            Self::TariffTooWide { .. } => "tariff_too_wide",
            Self::UnsupportedLvar { .. } => "unsupported_lvar",
        }
    }
}

type Cursor<'a> = crate::cursor::Cursor<'a, MbusError>;

impl From<crate::cursor::Truncated> for MbusError {
    fn from(t: crate::cursor::Truncated) -> Self {
        Self::Truncated {
            offset: t.offset,
            field: t.field,
            needed: t.needed,
        }
    }
}

mod data_record;
mod decode;
pub mod encode;
mod header;
mod link;
mod readings;
mod records;
mod text;
mod value;
mod vif;

pub use data_record::*;
pub use decode::*;
pub use header::*;
pub use link::*;
pub use readings::*;
pub use records::*;
pub(crate) use text::*;
pub use value::*;
pub use vif::*;
