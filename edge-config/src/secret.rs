//! [`Secret`]: a configured password, HMAC secret or key whose `Debug` and `Display` never
//! show it, so a configuration can be logged (`{config:?}`) without leaking credentials.

use std::fmt;

use serde::Deserialize;

/// A secret string from the configuration (password, push HMAC secret, AES key in hex).
/// `Debug` and `Display` print `***`; [`Secret::expose`] is the one way to the value, so every
/// use of it is easy to find.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself (for the one place that needs it: a connection, a MAC, a key).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its length in bytes (validation messages name the length, never the value).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty secret.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        #[derive(Debug, Deserialize)]
        struct C {
            #[allow(dead_code)]
            password: Secret,
        }
        let c: C = toml::from_str("password = \"hunter2-hunter2\"").unwrap();
        let shown = format!("{c:?} {}", c.password);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(shown, "C { password: Secret(***) } ***");
        assert_eq!(c.password.expose(), "hunter2-hunter2");
        assert_eq!(c.password.len(), 15);
    }
}
