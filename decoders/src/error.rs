//! The public error of the crate: one variant per protocol, each with its own typed cause.

/// Why a frame could not be decoded. Every variant says what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A CJ/T 188 frame was malformed.
    #[error("cjt188: {0}")]
    Cjt188(#[from] crate::cjt188::Cjt188Error),
    /// A wired M-Bus frame was malformed.
    #[error("mbus: {0}")]
    Mbus(#[from] crate::mbus::MbusError),
    /// A wireless M-Bus telegram was malformed or could not be decrypted.
    #[error("wmbus: {0}")]
    Wmbus(#[from] crate::wmbus::WmbusError),
    /// A Modbus register block did not fit its map.
    #[error("modbus: {0}")]
    Modbus(#[from] crate::modbus::ModbusError),
    /// An IoT-platform envelope was malformed.
    #[error("envelope: {0}")]
    Envelope(#[from] crate::envelope::EnvelopeError),
}

impl DecodeError {
    /// A stable snake_case code for metrics labels: the protocol error's own code (the
    /// gateway's `wm_gateway_decode_errors_total{kind}`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Cjt188(e) => e.code(),
            Self::Mbus(e) => e.code(),
            Self::Wmbus(e) => e.code(),
            Self::Modbus(e) => e.code(),
            Self::Envelope(e) => e.code(),
        }
    }
}

impl crate::modbus::ModbusError {
    /// A stable snake_case code for metrics labels.
    pub fn code(&self) -> &'static str {
        use crate::modbus::ModbusError as E;
        match self {
            E::AddressOverflow { .. } => "address_overflow",
            E::BadBcd { .. } => "bad_bcd",
            E::NotFinite { .. } => "not_finite",
            E::Overflow { .. } => "overflow",
            E::OutOfRange { .. } => "out_of_range",
            E::TypeMismatch { .. } => "type_mismatch",
        }
    }
}

impl crate::envelope::EnvelopeError {
    /// A stable snake_case code for metrics labels, prefixed `envelope_` so it never
    /// collides with the codes of the frame inside.
    pub fn code(&self) -> &'static str {
        use crate::envelope::EnvelopeError as E;
        match self {
            E::TooLarge { .. } => "envelope_too_large",
            E::Json { .. } => "envelope_json",
            E::UnknownFormat => "envelope_unknown_format",
            E::MissingField { .. } => "envelope_missing_field",
            E::BadField { .. } => "envelope_bad_field",
            E::BadHex { .. } => "envelope_bad_hex",
            E::BadBase64 { .. } => "envelope_bad_base64",
            E::EmptyPayload { .. } => "envelope_empty_payload",
            E::NotData { .. } => "envelope_not_data",
            E::Encrypted => "envelope_encrypted",
            E::Batch { .. } => "envelope_batch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DecodeError;

    #[test]
    fn decode_error_codes_are_the_protocol_codes() {
        let e = DecodeError::from(crate::envelope::EnvelopeError::UnknownFormat);
        assert_eq!(e.code(), "envelope_unknown_format");
        let e = DecodeError::from(crate::modbus::ModbusError::AddressOverflow {
            start: 65_535,
            count: 2,
        });
        assert_eq!(e.code(), "address_overflow");
    }
}
