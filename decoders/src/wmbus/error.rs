//! Typed failures of the wireless M-Bus decoder. Every variant says what and where.

/// Why a wireless M-Bus telegram could not be decoded.
///
/// Key material never appears in these messages; only the meter identity does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WmbusError {
    /// The telegram ended before a field was complete.
    #[error("telegram truncated at byte {offset}: {field} needs {needed} more byte(s)")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Byte offset (in the CRC-free telegram) where the field starts.
        offset: usize,
        /// Missing bytes.
        needed: usize,
    },
    /// The L field promises more bytes than were received.
    #[error("length field says {declared} bytes follow but only {available} were received")]
    LengthMismatch {
        /// Bytes after L according to L.
        declared: usize,
        /// Bytes after L actually present.
        available: usize,
    },
    /// A block CRC did not match: data link layer frame format A or B, or (format `E`) the
    /// payload CRC of an unencrypted ELL-II/IV.
    #[error(
        "bad {format} block CRC in block {block} at byte {offset} (expected {expected:#06x}, got {actual:#06x})"
    )]
    BadCrc {
        /// `A`, `B`, or `E` for the ELL payload CRC.
        format: char,
        /// Block number, 0-based.
        block: usize,
        /// Byte offset of the CRC in the raw telegram.
        offset: usize,
        /// CRC computed over the block.
        expected: u16,
        /// CRC found on the wire.
        actual: u16,
    },
    /// A CI field this decoder does not know.
    #[error("unsupported CI field {ci:#04x} at byte {offset}")]
    UnsupportedCi {
        /// The CI value.
        ci: u8,
        /// Its byte offset.
        offset: usize,
    },
    /// A security mode this decoder does not implement.
    #[error("unsupported security mode {mode} in configuration word at byte {offset}")]
    UnsupportedSecurityMode {
        /// The mode (configuration word bits 12..8).
        mode: u8,
        /// Byte offset of the configuration word.
        offset: usize,
    },
    /// The telegram is encrypted and no key is configured for the meter.
    #[error("telegram from {meter} is encrypted (security mode {mode}) and no key is configured")]
    MissingKey {
        /// Meter id (`mbus:<MAN><8 digits>`).
        meter: String,
        /// The security mode (ELL AES-CTR is reported as mode 128).
        mode: u8,
    },
    /// Decryption produced no valid plaintext: the configured key is wrong for this meter.
    #[error("wrong key for {meter}: {check} failed after decryption (security mode {mode})")]
    WrongKey {
        /// Meter id (`mbus:<MAN><8 digits>`).
        meter: String,
        /// The security mode (ELL AES-CTR is reported as mode 128).
        mode: u8,
        /// Which check failed (`2F2F check bytes`, `ELL payload CRC`, `AFL MAC`).
        check: &'static str,
    },
    /// The encrypted part is not a whole number of AES blocks or exceeds the telegram.
    #[error("encrypted part at byte {offset} has {len} bytes, expected a multiple of 16")]
    BadEncryptedLength {
        /// Byte offset of the encrypted part.
        offset: usize,
        /// Its length.
        len: usize,
    },
    /// A compact frame (CI 79) whose format was not seen in a full frame from that meter.
    #[error("compact frame from {meter} uses format signature {signature:#06x} not seen yet")]
    UnknownCompactFormat {
        /// Meter id.
        meter: String,
        /// The format signature.
        signature: u16,
    },
    /// A compact frame's data does not fit the cached format.
    #[error("compact frame from {meter} does not fit format {signature:#06x}: {reason}")]
    CompactMismatch {
        /// Meter id.
        meter: String,
        /// The format signature.
        signature: u16,
        /// What did not fit.
        reason: &'static str,
    },
    /// An AFL fragment of a long message: kept in the [`super::FormatCache`] until the last
    /// fragment arrives, which decodes the whole message. Also returned for a fragment out of
    /// sequence (one lost or repeated), which drops the message.
    #[error("AFL fragment {fragment} of a long message: waiting for the rest (or out of sequence)")]
    Fragmented {
        /// Fragment id.
        fragment: u8,
    },
    /// The payload is manufacturer specific and this decoder has no decoder for it.
    #[error("manufacturer-specific payload (CI {ci:#04x}) from {meter} is not decoded")]
    ManufacturerSpecific {
        /// Meter id.
        meter: String,
        /// The CI value.
        ci: u8,
    },
    /// The application layer (data records) could not be decoded.
    #[error("application layer at byte {offset}: {source}")]
    Application {
        /// Byte offset of the application data in the CRC-free telegram.
        offset: usize,
        /// The record decoder's error.
        #[source]
        source: crate::mbus::MbusError,
    },
    /// A wired M-Bus long frame handed to the wireless decoder failed to decode.
    #[error("wired long frame: {0}")]
    Wired(#[source] crate::mbus::MbusError),
}

impl WmbusError {
    /// A stable snake_case code for metrics labels (`decoder_errors_total{error_code}`); the
    /// same labels the gateway's wM-Bus source uses.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::LengthMismatch { .. } => "length",
            Self::BadCrc { .. } => "crc",
            Self::UnsupportedCi { .. } => "unsupported_ci",
            Self::UnsupportedSecurityMode { .. } => "unsupported_security_mode",
            Self::MissingKey { .. } => "missing_key",
            Self::WrongKey { .. } => "wrong_key",
            Self::BadEncryptedLength { .. } => "encrypted_length",
            Self::UnknownCompactFormat { .. } => "unknown_compact_format",
            Self::CompactMismatch { .. } => "compact_mismatch",
            Self::Fragmented { .. } => "fragmented",
            Self::ManufacturerSpecific { .. } => "manufacturer_specific",
            Self::Application { .. } => "records",
            Self::Wired(_) => "wired_frame",
        }
    }
}
