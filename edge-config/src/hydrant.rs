//! Configuration of the hydrant MQTT bridge (`kind = "hydrant_mqtt"`).
//!
//! Hydrant controllers publish `{topic_prefix}/{id}/up` on the site broker and take commands on
//! `{topic_prefix}/{id}/cmd`, answering on `{topic_prefix}/{id}/ack` (CONTRACTS.md).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Why a hydrant bridge configuration is invalid; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HydrantConfigError {
    /// A required text field is empty.
    #[error("{field}: must not be empty")]
    Empty {
        /// Field path.
        field: &'static str,
    },
    /// A field has a value outside its allowed range or form.
    #[error("{field}: {reason}")]
    Invalid {
        /// Field path.
        field: &'static str,
        /// What is wrong and what was expected.
        reason: String,
    },
}

impl crate::FieldPath for HydrantConfigError {
    fn field_path(&self) -> &str {
        match self {
            Self::Empty { field, .. } | Self::Invalid { field, .. } => field,
        }
    }
}

/// The hydrant bridge: one MQTT client on the site broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HydrantSourceConfig {
    /// Source instance id (the `[[source]]` table's `id`; the runtime passes it to the source
    /// as `SourceContext::source_id`).
    #[serde(default)]
    pub id: String,
    /// Broker host name or address.
    pub host: String,
    /// Broker port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT client id; must be unique on the broker.
    pub client_id: String,
    /// Optional user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Optional password (needs `username`).
    #[serde(default)]
    pub password: Option<crate::Secret>,
    /// Connect with TLS (default false).
    #[serde(default)]
    pub tls: bool,
    /// CA certificate (PEM) to verify the broker; without it the system's roots.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PKCS#8 PEM) for mutual TLS.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Topic prefix in front of `{id}/up|cmd|ack`, without a trailing slash.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// How long to wait for a hydrant's ack to a command.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// MQTT keep-alive interval.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
}

fn default_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "hydrant".into()
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

impl HydrantSourceConfig {
    /// A configuration with defaults for everything but broker and client id.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            host: host.into(),
            port,
            client_id: client_id.into(),
            username: None,
            password: None,
            tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            topic_prefix: default_prefix(),
            ack_timeout: default_ack_timeout(),
            keep_alive: default_keep_alive(),
        }
    }

    /// TLS settings, `None` when `tls = false`.
    pub fn tls(&self) -> Option<crate::MqttTls> {
        crate::MqttTls::from_fields(self.tls, &self.tls_ca, &self.tls_cert, &self.tls_key)
    }

    /// Checks every field; returns all problems found.
    pub fn validate(&self) -> Result<(), Vec<HydrantConfigError>> {
        let mut errors = Vec::new();
        if self.host.trim().is_empty() {
            errors.push(HydrantConfigError::Empty { field: "host" });
        }
        if self.port == 0 {
            errors.push(HydrantConfigError::Invalid {
                field: "port",
                reason: "must be 1..=65535".into(),
            });
        }
        if self.client_id.trim().is_empty() {
            errors.push(HydrantConfigError::Empty { field: "client_id" });
        }
        if self.password.is_some() && self.username.is_none() {
            errors.push(HydrantConfigError::Invalid {
                field: "password",
                reason: "a password needs a username".into(),
            });
        }
        for (field, reason) in crate::tls::field_problems(
            self.tls,
            &self.tls_ca,
            &self.tls_cert,
            &self.tls_key,
            "set tls = true",
        ) {
            errors.push(HydrantConfigError::Invalid { field, reason });
        }
        if self.topic_prefix.is_empty() {
            errors.push(HydrantConfigError::Empty {
                field: "topic_prefix",
            });
        } else if self.topic_prefix.ends_with('/') || self.topic_prefix.contains(['+', '#']) {
            errors.push(HydrantConfigError::Invalid {
                field: "topic_prefix",
                reason: format!(
                    "{:?} must not end with '/' nor contain MQTT wildcards",
                    self.topic_prefix
                ),
            });
        }
        if self.ack_timeout.is_zero() || self.ack_timeout > Duration::from_secs(3600) {
            errors.push(HydrantConfigError::Invalid {
                field: "ack_timeout",
                reason: "must be between 1 ms and 1 h".into(),
            });
        }
        if self.keep_alive < Duration::from_secs(1) || self.keep_alive > Duration::from_secs(65535)
        {
            errors.push(HydrantConfigError::Invalid {
                field: "keep_alive",
                reason: "must be between 1 s and 65535 s".into(),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_validates() {
        let c: HydrantSourceConfig =
            toml::from_str("host = \"127.0.0.1\"\nclient_id = \"gw-h\"\nack_timeout = \"5s\"")
                .unwrap();
        assert_eq!(c.port, 1883);
        assert_eq!(c.topic_prefix, "hydrant");
        assert_eq!(c.ack_timeout, Duration::from_secs(5));
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = HydrantSourceConfig::new("", 0, "x");
        c.topic_prefix = "a/#".into();
        c.password = Some("p".into());
        let errs = c.validate().unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "host: must not be empty",
                "port: must be 1..=65535",
                "password: a password needs a username",
                "topic_prefix: \"a/#\" must not end with '/' nor contain MQTT wildcards",
            ]
        );
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = toml::from_str::<HydrantSourceConfig>("host = \"h\"\nclient_id = \"c\"\nbogus = 1")
            .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
