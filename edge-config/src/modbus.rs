//! Configuration of the Modbus pollers (`kind = "modbus_tcp"` and `kind = "modbus_rtu"`).
//!
//! Each device names a register map (`map`: a built-in model name or a path to a map TOML,
//! see `edge-config/maps/`) and is polled every `poll_interval`. Requests on one bus (one TCP
//! endpoint, or one serial line) go out one at a time.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

/// Why a Modbus source configuration is invalid; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModbusConfigError {
    /// A required text field is empty.
    #[error("{field}: must not be empty")]
    Empty {
        /// Field path (`devices[2].name`).
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
    /// Two devices share a name or a (bus, unit id).
    #[error("{field}: {value:?} is used twice")]
    Duplicate {
        /// Field path of the second use.
        field: String,
        /// The duplicated value.
        value: String,
    },
}

impl crate::FieldPath for ModbusConfigError {
    fn field_path(&self) -> &str {
        match self {
            Self::Empty { field, .. }
            | Self::Invalid { field, .. }
            | Self::Duplicate { field, .. } => field,
        }
    }
}

/// Timeouts, retries and backoff shared by both transports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTiming {
    /// How long to wait for one response (or one TCP connect).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Extra attempts of one request after a timeout or transport error.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry / reconnect delay; doubles per failure, with jitter.
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Largest retry / reconnect delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Largest read block in registers (the protocol allows 125).
    #[serde(default = "default_max_block")]
    pub max_block: u16,
    /// Unused registers a read block may span to merge two values into one request.
    #[serde(default = "default_max_gap")]
    pub max_gap: u16,
}

impl Default for ModbusTiming {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            retries: default_retries(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            max_block: default_max_block(),
            max_gap: default_max_gap(),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_max_block() -> u16 {
    125
}
fn default_max_gap() -> u16 {
    8
}

/// One polled device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    /// Device name; its meter id is `modbus:<name>`.
    pub name: String,
    /// TCP only: `host:port` of the device or Modbus TCP gateway.
    #[serde(default)]
    pub address: Option<String>,
    /// Unit (slave) id, 1..=247 (0 is broadcast; TCP devices commonly use 1 or 255).
    pub unit_id: u8,
    /// Register map: a built-in model name or a path to a map TOML.
    pub map: String,
    /// How often to poll.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Valve control register, for `valve_open` / `valve_close` commands.
    #[serde(default)]
    pub valve: Option<ModbusValve>,
}

/// How a device's valve is driven: one holding register and the values that open and close it
/// (for example the Xintai meter: register 0x001C, 1 = open, 2 = close).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusValve {
    /// Holding register address (0-based).
    pub register: u16,
    /// Value written to open.
    #[serde(default = "default_valve_open")]
    pub open: u16,
    /// Value written to close.
    #[serde(default = "default_valve_close")]
    pub close: u16,
}

fn default_valve_open() -> u16 {
    1
}
fn default_valve_close() -> u16 {
    2
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}

/// Modbus TCP poller: devices on one or more TCP endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTcpSourceConfig {
    /// Source instance id (the `[[source]]` table's `id`; the runtime passes it to the source
    /// as `SourceContext::source_id`).
    #[serde(default)]
    pub id: String,
    /// Timeouts, retries, backoff.
    #[serde(default)]
    pub timing: ModbusTiming,
    /// Polled devices (each with `address`).
    pub devices: Vec<ModbusDeviceConfig>,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    /// No parity.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Modbus RTU poller: devices on one serial line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusRtuSourceConfig {
    /// Source instance id (the `[[source]]` table's `id`; the runtime passes it to the source
    /// as `SourceContext::source_id`).
    #[serde(default)]
    pub id: String,
    /// Serial device path (`/dev/ttyUSB0`).
    pub port: String,
    /// Baud rate.
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    /// Parity (Modbus default is even).
    #[serde(default = "default_parity")]
    pub parity: Parity,
    /// Data bits (7 or 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// Stop bits (1 or 2).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Timeouts, retries, backoff.
    #[serde(default)]
    pub timing: ModbusTiming,
    /// Polled devices (without `address`).
    pub devices: Vec<ModbusDeviceConfig>,
}

fn default_baud() -> u32 {
    9600
}
fn default_parity() -> Parity {
    Parity::Even
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ModbusConfigError {
    ModbusConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl ModbusTiming {
    fn validate(&self, errors: &mut Vec<ModbusConfigError>) {
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            errors.push(invalid("timing.timeout", "must be between 1 ms and 60 s"));
        }
        if self.retries > 10 {
            errors.push(invalid("timing.retries", "must be at most 10"));
        }
        if self.backoff_initial.is_zero() {
            errors.push(invalid("timing.backoff_initial", "must be above 0"));
        }
        if self.backoff_max < self.backoff_initial {
            errors.push(invalid(
                "timing.backoff_max",
                "must be at least timing.backoff_initial",
            ));
        }
        if !(1..=125).contains(&self.max_block) {
            errors.push(invalid("timing.max_block", "must be 1..=125 registers"));
        }
    }
}

fn validate_devices(
    devices: &[ModbusDeviceConfig],
    tcp: bool,
    errors: &mut Vec<ModbusConfigError>,
) {
    if devices.is_empty() {
        errors.push(ModbusConfigError::Empty {
            field: "devices".into(),
        });
    }
    let mut names = BTreeSet::new();
    let mut units = BTreeSet::new();
    for (i, d) in devices.iter().enumerate() {
        let at = |f: &str| format!("devices[{i}].{f}");
        if d.name.is_empty() {
            errors.push(ModbusConfigError::Empty { field: at("name") });
        } else if let Some(c) = d
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            errors.push(invalid(
                at("name"),
                format!("{:?} has {c:?} (expected A-Z a-z 0-9 . _ -)", d.name),
            ));
        } else if !names.insert(d.name.clone()) {
            errors.push(ModbusConfigError::Duplicate {
                field: at("name"),
                value: d.name.clone(),
            });
        }
        match (&d.address, tcp) {
            (None, true) => errors.push(ModbusConfigError::Empty {
                field: at("address"),
            }),
            (Some(a), true) => match a.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => errors.push(invalid(at("address"), format!("{a:?} is not host:port"))),
            },
            (Some(_), false) => errors.push(invalid(
                at("address"),
                "RTU devices share the source's serial port; remove address",
            )),
            (None, false) => {}
        }
        if !tcp && !(1..=247).contains(&d.unit_id) {
            errors.push(invalid(at("unit_id"), "must be 1..=247 on a serial line"));
        }
        let bus = d.address.clone().unwrap_or_default();
        if !units.insert((bus.clone(), d.unit_id)) {
            errors.push(ModbusConfigError::Duplicate {
                field: at("unit_id"),
                value: format!("{bus} unit {}", d.unit_id),
            });
        }
        if d.map.is_empty() {
            errors.push(ModbusConfigError::Empty { field: at("map") });
        }
        if let Some(v) = d.valve
            && v.open == v.close
        {
            errors.push(invalid(at("valve.close"), "must differ from valve.open"));
        }
        if d.poll_interval < Duration::from_millis(100) {
            errors.push(invalid(at("poll_interval"), "must be at least 100 ms"));
        }
    }
}

impl ModbusTcpSourceConfig {
    /// Checks every field; returns all problems found.
    pub fn validate(&self) -> Result<(), Vec<ModbusConfigError>> {
        let mut errors = Vec::new();
        self.timing.validate(&mut errors);
        validate_devices(&self.devices, true, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

impl ModbusRtuSourceConfig {
    /// Checks every field; returns all problems found.
    pub fn validate(&self) -> Result<(), Vec<ModbusConfigError>> {
        let mut errors = Vec::new();
        if self.port.is_empty() {
            errors.push(ModbusConfigError::Empty {
                field: "port".into(),
            });
        }
        if !(300..=921_600).contains(&self.baud_rate) {
            errors.push(invalid("baud_rate", "must be 300..=921600"));
        }
        if !matches!(self.data_bits, 7 | 8) {
            errors.push(invalid("data_bits", "must be 7 or 8"));
        }
        if !matches!(self.stop_bits, 1 | 2) {
            errors.push(invalid("stop_bits", "must be 1 or 2"));
        }
        self.timing.validate(&mut errors);
        validate_devices(&self.devices, false, &mut errors);
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
    fn tcp_config_parses_with_defaults() {
        let c: ModbusTcpSourceConfig = toml::from_str(
            r#"
            id = "modbus-site"
            [timing]
            timeout = "500ms"
            [[devices]]
            name = "flow-1"
            address = "127.0.0.1:5020"
            unit_id = 1
            map = "generic-emf"
            poll_interval = "10s"
            valve = { register = 28 }
            "#,
        )
        .unwrap();
        assert_eq!(c.id, "modbus-site");
        assert_eq!(c.timing.timeout, Duration::from_millis(500));
        assert_eq!(c.timing.retries, 2);
        assert_eq!(c.devices[0].poll_interval, Duration::from_secs(10));
        assert_eq!(
            c.devices[0].valve,
            Some(ModbusValve {
                register: 28,
                open: 1,
                close: 2
            })
        );
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let c: ModbusRtuSourceConfig = toml::from_str(
            r#"
            port = "/dev/ttyUSB0"
            data_bits = 9
            [[devices]]
            name = "a"
            unit_id = 0
            map = "m"
            [[devices]]
            name = "a"
            address = "x:1"
            unit_id = 3
            map = ""
            poll_interval = "1ms"
            "#,
        )
        .unwrap();
        let text: Vec<String> = c
            .validate()
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "data_bits: must be 7 or 8",
                "devices[0].unit_id: must be 1..=247 on a serial line",
                "devices[1].name: \"a\" is used twice",
                "devices[1].address: RTU devices share the source's serial port; remove address",
                "devices[1].map: must not be empty",
                "devices[1].poll_interval: must be at least 100 ms",
            ]
        );
    }

    #[test]
    fn tcp_device_needs_host_port() {
        let c = ModbusTcpSourceConfig {
            id: "mb".into(),
            timing: ModbusTiming::default(),
            devices: vec![ModbusDeviceConfig {
                name: "d".into(),
                address: Some("nohost".into()),
                unit_id: 1,
                map: "m".into(),
                poll_interval: Duration::from_secs(1),
                valve: None,
            }],
        };
        assert_eq!(
            c.validate().unwrap_err(),
            [ModbusConfigError::Invalid {
                field: "devices[0].address".into(),
                reason: "\"nohost\" is not host:port".into()
            }]
        );
    }
}
