//! Configuration of the serial M-Bus master (`kind = "mbus_serial"`).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

/// Why an M-Bus source configuration is invalid; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MbusConfigError {
    /// A required field is empty or missing.
    #[error("{field}: must not be empty")]
    Empty {
        /// Field path (`meters[1].secondary`).
        field: String,
    },
    /// A field has a value outside its allowed range or form.
    #[error("{field}: {reason}")]
    Invalid {
        /// Field path.
        field: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// Two meters share an address.
    #[error("{field}: {value:?} is used twice")]
    Duplicate {
        /// Field path of the second use.
        field: String,
        /// The duplicated address.
        value: String,
    },
}

impl crate::FieldPath for MbusConfigError {
    fn field_path(&self) -> &str {
        match self {
            Self::Empty { field, .. }
            | Self::Invalid { field, .. }
            | Self::Duplicate { field, .. } => field,
        }
    }
}

/// One meter on the bus: exactly one of `primary` or `secondary`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MbusMeterConfig {
    /// Primary address 1..=250 (0 is the factory default, allowed with a single meter).
    #[serde(default)]
    pub primary: Option<u8>,
    /// Secondary address: the 8-digit identification number.
    #[serde(default)]
    pub secondary: Option<String>,
}

/// The serial M-Bus master: one line through a level converter, polled in cycles.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MbusSerialSourceConfig {
    /// Source instance id (the `[[source]]` table's `id`; the runtime passes it to the source
    /// as `SourceContext::source_id`).
    #[serde(default)]
    pub id: String,
    /// Serial device path.
    pub port: String,
    /// Baud rate (2400 or 9600 usually; 300..=38400).
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    /// Wait for the first byte of an answer.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra attempts after a timeout or garbled answer (same FCB, so the slave repeats).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Time between read cycles over all meters.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most telegrams read from one meter per cycle (DIF 1F "more records follow").
    #[serde(default = "default_max_telegrams")]
    pub max_telegrams: u8,
    /// Run a wildcard secondary search at start and poll every meter found.
    #[serde(default)]
    pub search_secondary: bool,
    /// Configured meters.
    #[serde(default)]
    pub meters: Vec<MbusMeterConfig>,
}

fn default_baud() -> u32 {
    2400
}
fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_retries() -> u32 {
    2
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(900)
}
fn default_max_telegrams() -> u8 {
    8
}

impl MbusSerialSourceConfig {
    /// A config with defaults for everything but the port.
    pub fn new(port: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            port: port.into(),
            baud_rate: default_baud(),
            timeout: default_timeout(),
            retries: default_retries(),
            poll_interval: default_poll_interval(),
            max_telegrams: default_max_telegrams(),
            search_secondary: false,
            meters: Vec::new(),
        }
    }

    /// Checks every field; returns all problems found.
    pub fn validate(&self) -> Result<(), Vec<MbusConfigError>> {
        let mut errors = Vec::new();
        let invalid = |field: String, reason: &str| MbusConfigError::Invalid {
            field,
            reason: reason.into(),
        };
        if self.port.is_empty() {
            errors.push(MbusConfigError::Empty {
                field: "port".into(),
            });
        }
        if ![300, 600, 1200, 2400, 4800, 9600, 19200, 38400].contains(&self.baud_rate) {
            errors.push(invalid(
                "baud_rate".into(),
                "must be one of 300, 600, 1200, 2400, 4800, 9600, 19200, 38400",
            ));
        }
        if self.timeout < Duration::from_millis(10) || self.timeout > Duration::from_secs(10) {
            errors.push(invalid("timeout".into(), "must be between 10 ms and 10 s"));
        }
        if self.retries > 10 {
            errors.push(invalid("retries".into(), "must be at most 10"));
        }
        if self.poll_interval < Duration::from_millis(100) {
            errors.push(invalid("poll_interval".into(), "must be at least 100 ms"));
        }
        if self.max_telegrams == 0 {
            errors.push(invalid("max_telegrams".into(), "must be at least 1"));
        }
        if self.meters.is_empty() && !self.search_secondary {
            errors.push(MbusConfigError::Empty {
                field: "meters".into(),
            });
        }
        let mut seen = BTreeSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            let at = |f: &str| format!("meters[{i}].{f}");
            match (m.primary, &m.secondary) {
                (Some(_), Some(_)) => errors.push(invalid(
                    at("secondary"),
                    "give either primary or secondary, not both",
                )),
                (None, None) => errors.push(MbusConfigError::Empty {
                    field: at("primary"),
                }),
                (Some(p), None) => {
                    if p > 250 {
                        errors.push(invalid(at("primary"), "must be 0..=250"));
                    } else if !seen.insert(format!("primary {p}")) {
                        errors.push(MbusConfigError::Duplicate {
                            field: at("primary"),
                            value: p.to_string(),
                        });
                    }
                }
                (None, Some(s)) => {
                    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
                        errors.push(invalid(
                            at("secondary"),
                            &format!("{s:?} must be 8 decimal digits"),
                        ));
                    } else if !seen.insert(format!("secondary {s}")) {
                        errors.push(MbusConfigError::Duplicate {
                            field: at("secondary"),
                            value: s.clone(),
                        });
                    }
                }
            }
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
    fn parses_and_validates() {
        let c: MbusSerialSourceConfig = toml::from_str(
            r#"
            port = "/dev/ttyUSB1"
            baud_rate = 9600
            meters = [{ primary = 5 }, { secondary = "12345678" }]
            "#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.max_telegrams, 8);
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = MbusSerialSourceConfig::new("p");
        c.baud_rate = 1000;
        c.meters = vec![
            MbusMeterConfig {
                primary: Some(5),
                secondary: None,
            },
            MbusMeterConfig {
                primary: Some(5),
                secondary: None,
            },
            MbusMeterConfig {
                primary: None,
                secondary: Some("12AB".into()),
            },
            MbusMeterConfig {
                primary: None,
                secondary: None,
            },
        ];
        let text: Vec<String> = c
            .validate()
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "baud_rate: must be one of 300, 600, 1200, 2400, 4800, 9600, 19200, 38400",
                "meters[1].primary: \"5\" is used twice",
                "meters[2].secondary: \"12AB\" must be 8 decimal digits",
                "meters[3].primary: must not be empty",
            ]
        );
    }
}
