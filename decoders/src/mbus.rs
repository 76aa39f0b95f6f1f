//! Decoder for wired M-Bus EN 13757-2/-3 (issue 3). Not implemented yet: every entry point returns [`MbusError::NotImplemented`].

/// Why a frame of this protocol could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MbusError {
    /// This decoder is not implemented yet.
    #[error("decoder not implemented yet")]
    NotImplemented,
}
