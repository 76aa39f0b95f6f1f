//! Decoder for wireless M-Bus / OMS EN 13757-4 (issue 4). Not implemented yet: every entry point returns [`WmbusError::NotImplemented`].

/// Why a frame of this protocol could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WmbusError {
    /// This decoder is not implemented yet.
    #[error("decoder not implemented yet")]
    NotImplemented,
}
