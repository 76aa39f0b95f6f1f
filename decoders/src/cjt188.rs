//! Decoder for CJ/T 188 frames (issue 3). Not implemented yet: every entry point returns [`Cjt188Error::NotImplemented`].

/// Why a frame of this protocol could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cjt188Error {
    /// This decoder is not implemented yet.
    #[error("decoder not implemented yet")]
    NotImplemented,
}
