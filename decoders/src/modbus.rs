//! Decoder for Modbus register maps (issue 4). Not implemented yet: every entry point returns [`ModbusError::NotImplemented`].

/// Why a frame of this protocol could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModbusError {
    /// This decoder is not implemented yet.
    #[error("decoder not implemented yet")]
    NotImplemented,
}
