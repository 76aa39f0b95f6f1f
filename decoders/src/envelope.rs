//! Decoder for IoT-platform envelopes (issue 4). Not implemented yet: every entry point returns [`EnvelopeError::NotImplemented`].

/// Why a frame of this protocol could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// This decoder is not implemented yet.
    #[error("decoder not implemented yet")]
    NotImplemented,
}
