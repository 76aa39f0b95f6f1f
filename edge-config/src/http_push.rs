//! Configuration of the IoT-platform HTTP push endpoint (`kind = "http_push"`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::valid::{FieldProblem, collected};
use crate::{Secret, Valid};

/// `kind = "http_push"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPushSourceConfig {
    /// Source id.
    pub id: String,
    /// TCP listen address.
    pub listen: SocketAddr,
    /// HMAC-SHA256 shared secret, at least 16 bytes (`Debug` shows `***`).
    pub secret: Secret,
    /// Largest accepted clock difference of `X-Timestamp`, seconds (default 300, 1..=86400).
    #[serde(default = "default_max_skew")]
    pub max_skew_s: u64,
    /// Connections served at once (default 256; all push listeners together also stay within
    /// the descriptor limit).
    #[serde(default = "default_push_connections")]
    pub max_connections: usize,
    /// Time allowed for a request's headers, seconds (default 10).
    #[serde(default = "default_push_timeout_s")]
    pub header_timeout_s: u64,
    /// Time allowed for a request's body, seconds (default 10).
    #[serde(default = "default_push_timeout_s")]
    pub body_timeout_s: u64,
    /// Largest accepted body, bytes (default 1 MiB).
    #[serde(default = "default_push_body_bytes")]
    pub max_body_bytes: usize,
    /// Most nonces remembered within the replay window (default 100000); when full, pushes
    /// are refused (503) rather than a nonce forgotten.
    #[serde(default = "default_nonce_window")]
    pub nonce_window: usize,
}

fn default_max_skew() -> u64 {
    300
}

fn default_push_connections() -> usize {
    256
}

fn default_push_timeout_s() -> u64 {
    10
}

fn default_push_body_bytes() -> usize {
    1 << 20
}

fn default_nonce_window() -> usize {
    100_000
}

impl HttpPushSourceConfig {
    /// A push endpoint on `listen` with default limits.
    pub fn new(id: impl Into<String>, listen: SocketAddr, secret: impl Into<Secret>) -> Self {
        Self {
            id: id.into(),
            listen,
            secret: secret.into(),
            max_skew_s: default_max_skew(),
            max_connections: default_push_connections(),
            header_timeout_s: default_push_timeout_s(),
            body_timeout_s: default_push_timeout_s(),
            max_body_bytes: default_push_body_bytes(),
            nonce_window: default_nonce_window(),
        }
    }

    /// Checks every field; returns all problems found (never the secret itself).
    ///
    /// # Errors
    /// Every problem, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems = Vec::new();
        if self.secret.len() < 16 {
            problems.push(FieldProblem::new(
                "secret",
                format!(
                    "the HMAC secret must be at least 16 bytes, got {}",
                    self.secret.len()
                ),
            ));
        }
        for (field, value, range) in [
            ("max_skew_s", self.max_skew_s, 1..=86_400),
            ("max_connections", self.max_connections as u64, 1..=100_000),
            ("header_timeout_s", self.header_timeout_s, 1..=300),
            ("body_timeout_s", self.body_timeout_s, 1..=300),
            ("max_body_bytes", self.max_body_bytes as u64, 1..=(64 << 20)),
            ("nonce_window", self.nonce_window as u64, 1..=10_000_000),
        ] {
            if !range.contains(&value) {
                problems.push(FieldProblem::new(
                    field,
                    format!("{value} is outside {}..={}", range.start(), range.end()),
                ));
            }
        }
        collected(problems)
    }
}

impl Valid<HttpPushSourceConfig> {
    /// Time allowed for a request's headers.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_s)
    }

    /// Time allowed for a request's body.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_secret_are_checked_without_showing_it() {
        let mut c = HttpPushSourceConfig::new("p", "127.0.0.1:0".parse().unwrap(), "short-s3cr3t");
        c.max_skew_s = 0;
        c.body_timeout_s = 301;
        let text: Vec<String> = Valid::new(c.clone())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "secret: the HMAC secret must be at least 16 bytes, got 12",
                "max_skew_s: 0 is outside 1..=86400",
                "body_timeout_s: 301 is outside 1..=300",
            ]
        );
        c.secret = "0123456789abcdef-s3cr3t".into();
        c.max_skew_s = 60;
        c.body_timeout_s = 5;
        let v = Valid::new(c).unwrap();
        assert_eq!(v.body_timeout(), Duration::from_secs(5));
        assert!(!format!("{v:?}").contains("s3cr3t"));
    }
}
