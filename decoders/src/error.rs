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
