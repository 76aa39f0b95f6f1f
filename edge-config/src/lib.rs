//! Typed configuration of an edge gateway, loaded from one TOML file.
//!
//! `edge-config` owns the gateway's configuration types: sources, devices, Modbus register maps,
//! per-meter keys, uplink and spool settings. Raw serde types are validated into typed ones by
//! pure functions that collect every problem with its path and line. It must not touch the
//! network; reading the file is the only I/O, and it lives at the edge of the crate.
//!
//! ```
//! let text = r#"
//! gateway_id = "gw-1"
//! [uplink]
//! broker = "mqtt://127.0.0.1:1883"
//! [spool]
//! dir = "/tmp/spool"
//! [[source]]
//! id = "nbiot"
//! kind = "coap"
//! listen = "0.0.0.0:5683"
//! key_file = "nbiot-keys.toml"
//! "#;
//! let config = edge_config::parse(text, "gateway.toml".as_ref()).unwrap();
//! assert_eq!(config.uplink.topic_root, "wm/v1");
//! assert_eq!(config.sources[0].config.id(), "nbiot");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod register_map;

pub mod device_set;

pub mod coap;
pub mod concentrator;
pub mod http_push;
pub mod hydrant;
pub mod mbus;
pub mod modbus;
pub mod nbiot_keys;
mod secret;
mod spans;
pub mod tls;
mod valid;
pub mod wmbus;

pub use coap::{CoapAuth, CoapSourceConfig};
pub use concentrator::{MqttSourceConfig, PayloadFormat, TopicMapping};
pub use http_push::HttpPushSourceConfig;
pub use secret::Secret;
pub use spans::{FieldError, FieldPath, Spans};
pub use tls::MqttTls;
/// Values with their position in the TOML text (re-exported for `GatewayConfig::devices`).
pub use toml::Spanned;
pub use valid::{FieldProblem, Valid, Validate};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use model::{GatewayId, MeterId};
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// One problem in a configuration file: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when the problem has no position, e.g. the file is unreadable).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field (key or table) concerned.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: `{}`: {}",
            self.file.display(),
            self.line,
            self.column,
            self.field,
            self.message
        )
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// This gateway's id (used in topics and provenance).
    pub gateway_id: GatewayId,
    /// Connection to the central broker and how batches are published.
    pub uplink: Valid<UplinkConfig>,
    /// The on-disk spool.
    pub spool: SpoolSettings,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Protocol sources (`[[source]]` tables), in file order.
    pub sources: Vec<SourceEntry>,
    /// Devices behind the sources (`[[device]]` tables).
    pub devices: Vec<Spanned<DeviceConfig>>,
    /// Modbus register maps by name: name → TOML file (relative to the config file).
    pub register_maps: BTreeMap<String, PathBuf>,
    /// Device sets from the central registry (`[registry]`, optional).
    pub registry: RegistrySettings,
}

/// The `[registry]` table: whether the gateway takes its `[[device]]` list from the central
/// registry's retained device sets (`{root}/{gateway}/config/devices`), and where the keys
/// those sets name live. Keys never travel on the topic: a set carries key references (names
/// in `key_file`), so a broker without TLS never sees a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Subscribe to and apply the registry's device sets.
    #[serde(default)]
    pub device_sets: bool,
    /// TOML file with a `[keys]` table, reference name → 32 hex digits (relative to the
    /// configuration file).
    pub key_file: Option<PathBuf>,
}

/// A `[[source]]` table and the line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEntry {
    /// 1-based line of the `[[source]]` header.
    pub line: usize,
    /// The typed source.
    pub config: SourceConfig,
}

/// The file as serde sees it; sources are typed in a second step so that errors inside a
/// `[[source]]` table keep their exact line (serde's tagged enums would lose it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway_id: GatewayId,
    uplink: UplinkConfig,
    spool: SpoolSettings,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    source: Vec<Spanned<toml::Table>>,
    #[serde(default)]
    device: Vec<Spanned<DeviceConfig>>,
    #[serde(default)]
    register_maps: BTreeMap<String, PathBuf>,
    #[serde(default)]
    registry: RegistrySettings,
}

/// An MQTT broker URL (`mqtt://` plain, `mqtts://` TLS): the one grammar lives in `model`.
pub use model::BrokerUrl;

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// `[uplink]`: the central broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Broker URL.
    pub broker: BrokerUrl,
    /// Client id prefix (default: the gateway id).
    pub client_id: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Password (`Debug` shows `***`).
    pub password: Option<Secret>,
    /// CA certificate (PEM).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Topic root (default `wm/v1`).
    #[serde(default = "default_topic_root")]
    pub topic_root: String,
    /// Partitions P (default 16).
    #[serde(default = "default_partitions")]
    pub partitions: u16,
    /// Most readings per batch (default 500).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Most batches awaiting PUBACK (default 16).
    #[serde(default = "default_window")]
    pub window: u16,
    /// MQTT keep-alive in seconds (default 15); the broker publishes the `offline` last will
    /// about 1.5 keep-alives after the gateway vanishes.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
    /// Seconds sent readings wait for the pipeline's end-to-end acknowledgement before they
    /// are sent again (default 30; doubles while nothing is acknowledged). 0: the broker's
    /// PUBACK acknowledges instead, for a pipeline that publishes no `ingest-ack`.
    #[serde(default = "default_ack_timeout_s")]
    pub ack_timeout_s: u32,
    /// Seconds between two publications of the retained status with the gateway's health
    /// (spool depth, uplink lag; default 10, 1..=3600).
    #[serde(default = "default_health_interval_s")]
    pub health_interval_s: u16,
}

impl UplinkConfig {
    /// TLS settings, `None` for a plain `mqtt://` broker.
    pub fn tls(&self) -> Option<MqttTls> {
        MqttTls::from_fields(self.broker.tls, &self.tls_ca, &self.tls_cert, &self.tls_key)
    }

    /// Checks every field; returns all problems found.
    ///
    /// # Errors
    /// Every problem, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems = Vec::new();
        if self.partitions == 0 {
            problems.push(FieldProblem::new("partitions", "must be at least 1"));
        }
        let mut outside = |field: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
            if !range.contains(&value) {
                problems.push(FieldProblem::new(
                    field,
                    format!("{value} is outside {}..={}", range.start(), range.end()),
                ));
            }
        };
        outside("batch_size", self.batch_size as u64, 1..=10_000);
        outside("keep_alive_s", self.keep_alive_s.into(), 1..=3600);
        outside("health_interval_s", self.health_interval_s.into(), 1..=3600);
        outside("window", self.window.into(), 1..=1000);
        if self.topic_root.is_empty()
            || self.topic_root.contains(['+', '#'])
            || self.topic_root.ends_with('/')
        {
            problems.push(FieldProblem::new(
                "topic_root",
                format!(
                    "`{}` must be non-empty, without wildcards or a trailing /",
                    self.topic_root
                ),
            ));
        }
        for (field, reason) in tls::field_problems(
            self.broker.tls,
            &self.tls_ca,
            &self.tls_cert,
            &self.tls_key,
            "use mqtts://",
        ) {
            problems.push(FieldProblem::new(field, reason));
        }
        if self.username.is_none() && self.password.is_some() {
            problems.push(FieldProblem::new("password", "a password needs a username"));
        }
        valid::collected(problems)
    }
}

fn default_keep_alive_s() -> u16 {
    15
}

fn default_ack_timeout_s() -> u32 {
    30
}

fn default_health_interval_s() -> u16 {
    10
}

fn default_topic_root() -> String {
    "wm/v1".into()
}
fn default_partitions() -> u16 {
    16
}
fn default_batch_size() -> usize {
    500
}
fn default_window() -> u16 {
    16
}

/// `[spool]`: where readings wait for the uplink.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// Directory (relative paths are relative to the config file).
    pub dir: PathBuf,
    /// Size bound in bytes (default 1 GiB); oldest data is evicted past it.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
}

fn default_max_bytes() -> u64 {
    1 << 30
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of `GET /metrics` (default `127.0.0.1:9464`).
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// A `[[source]]` table, by `kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// MQTT subscriber for concentrators.
    Mqtt(Valid<MqttSourceConfig>),
    /// NB-IoT CoAP server.
    Coap(Valid<CoapSourceConfig>),
    /// IoT-platform HTTP push endpoint.
    HttpPush(Valid<HttpPushSourceConfig>),
    /// Modbus TCP poller.
    ModbusTcp(Valid<modbus::ModbusTcpSourceConfig>),
    /// Modbus RTU poller.
    ModbusRtu(Valid<modbus::ModbusRtuSourceConfig>),
    /// Wired M-Bus master.
    MbusSerial(Valid<mbus::MbusSerialSourceConfig>),
    /// Wireless M-Bus UDP receiver.
    WmbusUdp(Valid<wmbus::WmbusUdpSourceConfig>),
    /// Hydrant MQTT bridge.
    HydrantMqtt(Valid<hydrant::HydrantSourceConfig>),
}

impl SourceConfig {
    /// The source instance id.
    pub fn id(&self) -> &str {
        match self {
            Self::Mqtt(c) => &c.id,
            Self::Coap(c) => &c.id,
            Self::HttpPush(c) => &c.id,
            Self::ModbusTcp(c) => &c.id,
            Self::ModbusRtu(c) => &c.id,
            Self::MbusSerial(c) => &c.id,
            Self::WmbusUdp(c) => &c.id,
            Self::HydrantMqtt(c) => &c.id,
        }
    }

    /// The `kind` string.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mqtt(_) => "mqtt",
            Self::Coap(_) => "coap",
            Self::HttpPush(_) => "http_push",
            Self::ModbusTcp(_) => "modbus_tcp",
            Self::ModbusRtu(_) => "modbus_rtu",
            Self::MbusSerial(_) => "mbus_serial",
            Self::WmbusUdp(_) => "wmbus_udp",
            Self::HydrantMqtt(_) => "hydrant_mqtt",
        }
    }
}

/// The protocol a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceProtocol {
    /// CJ/T 188 (NB-IoT meters, concentrators).
    Cjt188,
    /// Wired M-Bus.
    Mbus,
    /// Wireless M-Bus.
    Wmbus,
    /// Modbus.
    Modbus,
    /// Hydrant controller.
    Hydrant,
}

/// A `[[device]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Meter/device id as the pipeline knows it (`cjt188:…`, `mbus:…`, `modbus:…`).
    pub id: MeterId,
    /// Protocol.
    pub protocol: DeviceProtocol,
    /// Id of the source the device is reached through.
    pub source: Spanned<String>,
    /// Protocol address (M-Bus primary/secondary, Modbus unit id, hydrant id...).
    pub address: Option<String>,
    /// AES-128 key, 32 hex digits (wM-Bus, encrypted payloads; `Debug` shows `***`).
    pub key: Option<Spanned<Secret>>,
    /// Register map name (Modbus).
    pub register_map: Option<Spanned<String>>,
}

impl DeviceConfig {
    /// The decoded AES key, if any (validated on load).
    pub fn key_bytes(&self) -> Option<[u8; 16]> {
        let key = self.key.as_ref()?;
        let v = hex::decode(key.get_ref().expose()).ok()?;
        v.try_into().ok()
    }
}

impl GatewayConfig {
    /// The sources without their lines.
    pub fn source_configs(&self) -> impl Iterator<Item = &SourceConfig> {
        self.sources.iter().map(|s| &s.config)
    }

    /// The configured device with this id.
    pub fn device(&self, id: &str) -> Option<&DeviceConfig> {
        self.devices
            .iter()
            .map(Spanned::get_ref)
            .find(|d| d.id.as_str() == id)
    }
}

/// Reads and validates a configuration file.
///
/// # Errors
/// Every problem found, each with file, line and field.
pub fn load(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    let mut config = parse(&text, path)?;
    // Relative paths are relative to the configuration file, not the working directory.
    if let Some(base) = path.parent() {
        if config.spool.dir.is_relative() {
            config.spool.dir = base.join(&config.spool.dir);
        }
        for p in config.register_maps.values_mut() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = config.registry.key_file.as_mut()
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
        let u = config.uplink.paths_mut();
        tls::resolve(base, [&mut u.tls_ca, &mut u.tls_cert, &mut u.tls_key]);
        for s in &mut config.sources {
            match &mut s.config {
                SourceConfig::Mqtt(m) => {
                    let m = m.paths_mut();
                    tls::resolve(base, [&mut m.tls_ca, &mut m.tls_cert, &mut m.tls_key]);
                }
                SourceConfig::HydrantMqtt(h) => {
                    let h = h.paths_mut();
                    tls::resolve(base, [&mut h.tls_ca, &mut h.tls_cert, &mut h.tls_key]);
                }
                SourceConfig::Coap(c) => {
                    if let Some(p) = &mut c.paths_mut().key_file
                        && p.is_relative()
                    {
                        *p = base.join(&*p);
                    }
                }
                _ => {}
            }
        }
    }
    let spans = Spans::new(&text);
    // Key files must load now; the error names the line, never a key.
    let mut key_errors = Vec::new();
    for (i, s) in config.sources.iter_mut().enumerate() {
        if let SourceConfig::Coap(c) = &mut s.config
            && let Some(p) = c.key_file.clone()
        {
            match nbiot_keys::load(&p) {
                Ok(keys) => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    keys.to_toml().hash(&mut h);
                    c.paths_mut().key_file_fingerprint = h.finish();
                }
                Err(e) => key_errors.push(config_error(
                    &text,
                    path,
                    spans.error(
                        format!("source[{i}].key_file"),
                        format!("{}: {e}", p.display()),
                    ),
                )),
            }
        }
    }
    if !key_errors.is_empty() {
        return Err(ConfigErrors(key_errors));
    }
    // TLS files must be readable PEM now, not at the first reconnect.
    let mut tls_files = vec![(
        "uplink".to_owned(),
        [
            &config.uplink.tls_ca,
            &config.uplink.tls_cert,
            &config.uplink.tls_key,
        ],
    )];
    for (i, s) in config.sources.iter().enumerate() {
        match &s.config {
            SourceConfig::Mqtt(m) => {
                tls_files.push((format!("source[{i}]"), [&m.tls_ca, &m.tls_cert, &m.tls_key]));
            }
            SourceConfig::HydrantMqtt(h) => {
                tls_files.push((format!("source[{i}]"), [&h.tls_ca, &h.tls_cert, &h.tls_key]));
            }
            _ => {}
        }
    }
    let mut errors = Vec::new();
    for (section, files) in tls_files {
        for (name, p) in ["tls_ca", "tls_cert", "tls_key"].into_iter().zip(files) {
            if let Some(message) = p.as_deref().and_then(|p| tls::check_pem(p).err()) {
                errors.push(config_error(
                    &text,
                    path,
                    spans.error(format!("{section}.{name}"), message),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Named register maps must load; a map error is a configuration error.
    let errors: Vec<ConfigError> = config
        .register_maps
        .iter()
        .filter_map(|(name, p)| {
            register_map::load(p).err().map(|e| {
                config_error(
                    &text,
                    path,
                    spans.error(
                        format!("register_maps.\"{name}\""),
                        format!("{}: {e}", p.display()),
                    ),
                )
            })
        })
        .collect();
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(config)
}

/// Parses and validates configuration text; `file` is only used in error messages.
///
/// # Errors
/// Every problem found, each with file, line and field.
pub fn parse(text: &str, file: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let toml_error = |e: toml::de::Error, base: usize| {
        let (line, column, field) = match e.span() {
            Some(span) => locate(text, base + span.start),
            None => locate(text, base),
        };
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            field,
            message: e.message().trim().to_owned(),
        }
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(e, 0)]))?;
    // The same text as a spanned document: each `[[source]]` table is typed from it by its
    // `kind`, and its errors keep their absolute positions (their own lines).
    let doc = DeTable::parse(text).map_err(|e| ConfigErrors(vec![toml_error(e, 0)]))?;
    let source_tables = match doc.get_ref().get("source").map(Spanned::get_ref) {
        Some(DeValue::Array(a)) => a.iter().cloned().collect(),
        _ => Vec::new(),
    };
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    for (table, value) in raw.source.iter().zip(source_tables) {
        let header = table.span();
        match source_config(table.get_ref(), value) {
            Ok(config) => sources.push(SourceEntry {
                line: locate(text, header.start).0,
                config,
            }),
            Err(SourceParseError::Toml(e)) => errors.push(toml_error(e, 0)),
            Err(SourceParseError::Kind(message)) => {
                let (line, column, _) = locate(text, header.start);
                errors.push(ConfigError {
                    file: file.to_owned(),
                    line,
                    column,
                    field: "source.kind".into(),
                    message,
                });
            }
        }
    }
    let config = GatewayConfig {
        gateway_id: raw.gateway_id,
        // Checked by `validate` before `parse` returns anything (see `Valid`).
        uplink: Valid::pending(raw.uplink),
        spool: raw.spool,
        metrics: raw.metrics,
        sources,
        devices: raw.device,
        register_maps: raw.register_maps,
        registry: raw.registry,
    };
    if errors.is_empty() {
        let spans = Spans::new(text);
        errors = validate(&config, &spans)
            .into_iter()
            .map(|e| config_error(text, file, e))
            .collect();
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

enum SourceParseError {
    Toml(toml::de::Error),
    Kind(String),
}

/// Types one `[[source]]` table (`table`, the same as `value` from the spanned document) by
/// its `kind`.
fn source_config(
    table: &toml::Table,
    mut value: Spanned<DeValue<'_>>,
) -> Result<SourceConfig, SourceParseError> {
    let kind = match table.get("kind") {
        Some(toml::Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err(SourceParseError::Kind(format!(
                "`kind` must be a string, got {}",
                other.type_str()
            )));
        }
        None => {
            return Err(SourceParseError::Kind(
                "missing field `kind` (one of mqtt, coap, http_push, modbus_tcp, modbus_rtu, \
                 mbus_serial, wmbus_udp, hydrant_mqtt)"
                    .into(),
            ));
        }
    };
    // `kind` chose the type; the typed tables refuse unknown fields, so it goes.
    if let DeValue::Table(t) = value.get_mut() {
        t.remove("kind");
    }
    // Checked by `validate` before `parse` returns anything (see `Valid`).
    fn typed<T: serde::de::DeserializeOwned>(
        value: Spanned<DeValue<'_>>,
    ) -> Result<Valid<T>, SourceParseError> {
        T::deserialize(ValueDeserializer::from(value))
            .map(Valid::pending)
            .map_err(SourceParseError::Toml)
    }
    Ok(match kind {
        "mqtt" => SourceConfig::Mqtt(typed(value)?),
        "coap" => SourceConfig::Coap(typed(value)?),
        "http_push" => SourceConfig::HttpPush(typed(value)?),
        "modbus_tcp" => SourceConfig::ModbusTcp(typed(value)?),
        "modbus_rtu" => SourceConfig::ModbusRtu(typed(value)?),
        "mbus_serial" => SourceConfig::MbusSerial(typed(value)?),
        "wmbus_udp" => SourceConfig::WmbusUdp(typed(value)?),
        "hydrant_mqtt" => SourceConfig::HydrantMqtt(typed(value)?),
        other => {
            return Err(SourceParseError::Kind(format!(
                "unknown source kind `{other}` (expected one of mqtt, coap, http_push, \
                 modbus_tcp, modbus_rtu, mbus_serial, wmbus_udp, hydrant_mqtt)"
            )));
        }
    })
}

/// A [`FieldError`] of `text` as the file/line/column error people read.
fn config_error(text: &str, file: &Path, e: FieldError) -> ConfigError {
    let (line, column) = match &e.span {
        Some(span) => {
            let (line, column, _) = locate(text, span.start);
            (line, column)
        }
        None => (0, 0),
    };
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        field: e.field(),
        message: e.message,
    }
}

/// Line, column and the key or table named at byte `offset`.
fn locate(text: &str, offset: usize) -> (usize, usize, String) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    let line_text = text
        .get(line_start..)
        .and_then(|t| t.lines().next())
        .unwrap_or("")
        .trim();
    let field = if line_text.starts_with('[') {
        line_text.trim_matches(|c| c == '[' || c == ']').to_owned()
    } else {
        line_text.split('=').next().unwrap_or("").trim().to_owned()
    };
    (line, column, field)
}

/// Reports the errors of a field source's own validation, each at its own field of
/// `source[index]`.
fn field_errors<E: FieldPath>(
    err: &mut impl FnMut(String, String),
    index: usize,
    id: &str,
    result: Result<(), Vec<E>>,
) {
    for e in result.err().unwrap_or_default() {
        err(
            format!("source[{index}].{}", e.field_path()),
            format!("source `{id}`: {e}"),
        );
    }
}

/// Checks the parsed configuration; every problem is a [`FieldError`] at its own field.
fn validate(config: &GatewayConfig, spans: &Spans<'_>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut err = |path: String, message: String| errors.push(spans.error(path, message));
    for e in config.uplink.check().err().unwrap_or_default() {
        err(format!("uplink.{}", e.field_path()), e.reason);
    }
    if config.spool.max_bytes < 1 << 20 {
        err(
            "spool.max_bytes".into(),
            format!("{} is below the 1 MiB minimum", config.spool.max_bytes),
        );
    }

    let mut ids = BTreeMap::new();
    for (i, s) in config.sources.iter().enumerate() {
        let at = |field: &str| format!("source[{i}].{field}");
        let src = &s.config;
        let id = src.id();
        if id.is_empty() {
            err(at("id"), "every source needs a non-empty `id`".into());
        } else if ids.insert(id.to_owned(), src.kind()).is_some() {
            err(at("id"), format!("duplicate source id `{id}`"));
        }
        match src {
            SourceConfig::Mqtt(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::Coap(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::HttpPush(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::ModbusTcp(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::ModbusRtu(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::MbusSerial(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::WmbusUdp(c) => field_errors(&mut err, i, id, c.validate()),
            SourceConfig::HydrantMqtt(c) => field_errors(&mut err, i, id, c.validate()),
        }
    }

    // Devices carry their own spans (they are also checked outside a file, for the registry).
    check_devices(
        &config.devices,
        &ids,
        &config.register_maps,
        &mut |offset, field, message| {
            errors.push(FieldError {
                path: field.to_owned(),
                span: Some(offset..offset),
                message,
            });
        },
    );
    errors
}

/// Parses `[[device]]` tables sent by the registry (`text`, named `name` in errors) and checks
/// them exactly as the configuration file's own `[[device]]` tables are checked, against the
/// sources and register maps of `config`.
///
/// # Errors
/// Every problem found, with its line in `text`.
pub fn parse_device_set(
    text: &str,
    name: &Path,
    config: &GatewayConfig,
) -> Result<Vec<Spanned<DeviceConfig>>, ConfigErrors> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        #[serde(default)]
        device: Vec<Spanned<DeviceConfig>>,
    }
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let (line, column, field) = locate(text, e.span().map_or(0, |s| s.start));
        ConfigErrors(vec![ConfigError {
            file: name.to_owned(),
            line,
            column,
            field,
            message: e.message().trim().to_owned(),
        }])
    })?;
    let ids: BTreeMap<String, &'static str> = config
        .source_configs()
        .map(|s| (s.id().to_owned(), s.kind()))
        .collect();
    let mut errors = Vec::new();
    let mut err = |offset: usize, field: &str, message: String| {
        let (line, column, _) = locate(text, offset);
        errors.push(ConfigError {
            file: name.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message,
        });
    };
    check_devices(&raw.device, &ids, &config.register_maps, &mut err);
    if errors.is_empty() {
        Ok(raw.device)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The `[[device]]` checks shared by the configuration file and the registry's device sets
/// (`parse_device_set`): unique ids, a known source of a kind that can reach the protocol, a
/// well-formed key, a known register map.
fn check_devices(
    devices: &[Spanned<DeviceConfig>],
    ids: &BTreeMap<String, &'static str>,
    register_maps: &BTreeMap<String, PathBuf>,
    err: &mut impl FnMut(usize, &str, String),
) {
    let mut device_ids = BTreeSet::new();
    for d in devices {
        let at = d.span().start;
        let dev = d.get_ref();
        if !device_ids.insert(dev.id.as_str().to_owned()) {
            err(at, "device.id", format!("duplicate device id `{}`", dev.id));
        }
        let source = dev.source.get_ref();
        match ids.get(source.as_str()) {
            None => err(
                dev.source.span().start,
                "device.source",
                format!(
                    "device `{}`: no source with id `{source}` (known: {})",
                    dev.id,
                    ids.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ),
            Some(kind) => {
                let ok = match dev.protocol {
                    DeviceProtocol::Cjt188 => matches!(*kind, "coap" | "http_push" | "mqtt"),
                    DeviceProtocol::Mbus => matches!(*kind, "mbus_serial" | "mqtt"),
                    DeviceProtocol::Wmbus => *kind == "wmbus_udp",
                    DeviceProtocol::Modbus => matches!(*kind, "modbus_tcp" | "modbus_rtu"),
                    DeviceProtocol::Hydrant => *kind == "hydrant_mqtt",
                };
                if !ok {
                    err(
                        dev.source.span().start,
                        "device.source",
                        format!(
                            "device `{}`: protocol {:?} cannot be reached through a `{kind}` source",
                            dev.id, dev.protocol
                        ),
                    );
                }
            }
        }
        if let Some(key) = &dev.key
            && dev.key_bytes().is_none()
        {
            err(
                key.span().start,
                "device.key",
                format!(
                    "device `{}`: key must be 32 hex digits (AES-128), got {} characters",
                    dev.id,
                    key.get_ref().len()
                ),
            );
        }
        if let Some(map) = &dev.register_map
            && !register_maps.contains_key(map.get_ref())
            && !register_map::builtin_names().contains(&map.get_ref().as_str())
        {
            err(
                map.span().start,
                "device.register_map",
                format!(
                    "device `{}`: unknown register map `{}` (not built in; define it under [register_maps])",
                    dev.id,
                    map.get_ref()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"gateway_id = "gw-1"

[uplink]
broker = "mqtt://127.0.0.1:1883"
partitions = 8

[spool]
dir = "spool"

[[source]]
id = "nbiot"
kind = "coap"
listen = "0.0.0.0:5683"
auth = "none"
[[source]]
id = "conc"
kind = "mqtt"
broker = "mqtt://127.0.0.1"
topics = [{ filter = "concentrator/+/readings", format = "json" }]

[[device]]
id = "cjt188:78330011223344"
protocol = "cjt188"
source = "nbiot"
"#;

    #[test]
    fn coap_frame_mac_needs_a_loadable_key_file_and_push_limits_are_checked() {
        let no_keys = GOOD.replace("auth = \"none\"", "allow = [\"10.64.0.0/10\", \"bogus\"]");
        let e = parse(&no_keys, Path::new("gw.toml")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("source.key_file") && text.contains("auth = \"none\""),
            "{text}"
        );
        assert!(text.contains("`bogus` is not an address"), "{text}");
        let dir = std::env::temp_dir().join(format!("wm-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = "000102030405060708090a0b0c0d0e0f";
        std::fs::write(
            dir.join("keys.toml"),
            format!("\"cjt188:78330011223344\" = \"{key}\"\n"),
        )
        .unwrap();
        let with_keys = GOOD.replace("auth = \"none\"", "key_file = \"keys.toml\"");
        std::fs::write(dir.join("gw.toml"), &with_keys).unwrap();
        let c = load(&dir.join("gw.toml")).unwrap();
        let SourceConfig::Coap(coap) = &c.sources[0].config else {
            panic!("coap first")
        };
        assert_eq!(coap.auth, CoapAuth::FrameMac);
        assert_eq!(
            coap.key_file.as_deref(),
            Some(dir.join("keys.toml").as_path())
        );
        assert_ne!(coap.key_file_fingerprint, 0);
        assert!(!format!("{c:?}").contains(key));
        std::fs::write(
            dir.join("keys.toml"),
            "\"cjt188:78330011223344\" = \"00zz\"\n",
        )
        .unwrap();
        let e = load(&dir.join("gw.toml")).unwrap_err().to_string();
        assert!(e.contains("source.key_file") && !e.contains("00zz"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        let push = format!(
            "{GOOD}\n[[source]]\nid = \"p\"\nkind = \"http_push\"\nlisten = \"127.0.0.1:0\"\nsecret = \"0123456789abcdef\"\nbody_timeout_s = 0\n"
        );
        let e = parse(&push, Path::new("gw.toml")).unwrap_err().to_string();
        assert!(e.contains("source.body_timeout_s"), "{e}");
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = parse(GOOD, Path::new("gw.toml")).unwrap();
        assert_eq!(c.gateway_id.as_str(), "gw-1");
        assert_eq!(c.uplink.partitions, 8);
        assert_eq!(c.uplink.batch_size, 500);
        assert_eq!(c.uplink.broker.port, 1883);
        assert_eq!(c.spool.max_bytes, 1 << 30);
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.sources[1].config.kind(), "mqtt");
        assert_eq!(c.sources[1].line, 15);
        assert_eq!(
            c.device("cjt188:78330011223344").unwrap().source.get_ref(),
            "nbiot"
        );
    }

    #[test]
    fn type_errors_name_line_and_field() {
        let bad = GOOD.replace("partitions = 8", "partitions = \"eight\"");
        let e = parse(&bad, Path::new("gw.toml")).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].line, 5);
        assert_eq!(e.0[0].field, "partitions");
        assert!(e.to_string().starts_with("gw.toml:5:"), "{e}");
    }

    #[test]
    fn unknown_and_missing_fields_are_reported() {
        let bad = GOOD.replace("listen = \"0.0.0.0:5683\"", "lisen = \"0.0.0.0:5683\"");
        let e = parse(&bad, Path::new("gw.toml")).unwrap_err();
        assert!(
            e.0[0].message.contains("lisen") || e.0[0].message.contains("listen"),
            "{e}"
        );
        assert!(e.0[0].line >= 10, "{e}");
        let bad = GOOD.replace("listen = \"0.0.0.0:5683\"", "listen = \"nowhere\"");
        let e = parse(&bad, Path::new("gw.toml")).unwrap_err();
        assert_eq!(e.0[0].line, 13, "{e}");
        assert_eq!(e.0[0].field, "listen", "{e}");
        // Nested tables of a source keep their lines too.
        let nested = GOOD.replace(
            "topics = [{ filter = \"concentrator/+/readings\", format = \"json\" }]",
            "[[source.topics]]\nfilter = \"concentrator/+/frame\"\nformat = \"xml\"",
        );
        let e = parse(&nested, Path::new("gw.toml")).unwrap_err();
        assert_eq!((e.0[0].line, e.0[0].field.as_str()), (21, "format"), "{e}");
    }

    #[test]
    fn semantic_errors_are_all_collected_with_lines() {
        let bad = format!(
            "{GOOD}\n[[device]]\nid = \"mbus:KAM12345678\"\nprotocol = \"mbus\"\nsource = \"nope\"\nkey = \"abc\"\n\n[[source]]\nid = \"bus1\"\nkind = \"mbus_serial\"\nport = \"/dev/null\"\nbaud_rate = 7\n"
        );
        let e = parse(&bad, Path::new("gw.toml")).unwrap_err();
        let text = e.to_string();
        assert_eq!(e.0.len(), 4, "{text}");
        let by_field = |f: &str| e.0.iter().find(|x| x.field == f).unwrap().clone();
        assert_eq!(by_field("device.source").line, 29, "{text}");
        assert!(
            by_field("device.source")
                .message
                .contains("no source with id `nope`")
        );
        assert_eq!(by_field("device.key").line, 30, "{text}");
        // A field source's own check points at the field's line, not the `[[source]]` header.
        assert!(
            by_field("source.baud_rate")
                .message
                .contains("source `bus1`"),
            "{text}"
        );
        assert_eq!(by_field("source.baud_rate").line, 36, "{text}");
        assert!(text.contains("baud_rate"), "{text}");
    }

    #[test]
    fn field_errors_point_at_their_own_line_and_secrets_never_print() {
        let text = format!(
            "{GOOD}\n[[source]]\nid = \"p\"\nkind = \"http_push\"\nlisten = \"127.0.0.1:0\"\nsecret = \"short-secret\"\nnonce_window = 0\n"
        )
        .replace("partitions = 8", "partitions = 0");
        let e = parse(&text, Path::new("gw.toml")).unwrap_err();
        let by_field = |f: &str| e.0.iter().find(|x| x.field == f).unwrap().clone();
        // Line 5 is `partitions = 0` (not the `[uplink]` header on line 3).
        assert_eq!(
            (
                by_field("uplink.partitions").line,
                by_field("uplink.partitions").column
            ),
            (5, 14),
            "{e}"
        );
        // The `[[source]]` header is line 26; secret and nonce_window are lines 30 and 31.
        assert_eq!(by_field("source.secret").line, 30, "{e}");
        assert_eq!(by_field("source.nonce_window").line, 31, "{e}");
        assert!(!e.to_string().contains("short-secret"), "{e}");

        let good = format!(
            "{GOOD}\n[[source]]\nid = \"p\"\nkind = \"http_push\"\nlisten = \"127.0.0.1:0\"\nsecret = \"0123456789abcdef-s3cr3t\"\n"
        )
        .replace(
            "broker = \"mqtt://127.0.0.1:1883\"",
            "broker = \"mqtt://127.0.0.1:1883\"\nusername = \"gw\"\npassword = \"pa55word-pa55word\"",
        );
        let c = parse(&good, Path::new("gw.toml")).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("pa55word"),
            "{shown}"
        );
        assert_eq!(
            c.uplink.password.as_ref().map(Secret::expose),
            Some("pa55word-pa55word")
        );
    }

    /// Every field check of `[uplink]` and of the `mqtt`, `coap` and `http_push` sources points
    /// at the field's own line.
    #[test]
    fn uplink_and_listener_source_errors_point_at_their_own_lines() {
        let text = r#"gateway_id = "gw-1"
[uplink]
broker = "mqtt://127.0.0.1:1883"
partitions = 0
batch_size = 0
window = 0
keep_alive_s = 0
health_interval_s = 0
topic_root = "a/#"
tls_ca = "ca.pem"
tls_key = "key.pem"
password = "uplink-pa55word"
[spool]
dir = "spool"
[[source]]
id = "conc"
kind = "mqtt"
broker = "mqtt://127.0.0.1"
tls_ca = "conc-ca.pem"
tls_key = "conc-key.pem"
password = "conc-pa55word"
topics = [{ filter = "", format = "json" }]
[[source]]
id = "conc2"
kind = "mqtt"
broker = "mqtt://127.0.0.1"
topics = []
[[source]]
id = "nb"
kind = "coap"
listen = "0.0.0.0:5683"
meter_utc_offset_minutes = 900
allow = ["10.0.0.0/8",
  "bogus"]
exchange_cache_entries = 0
exchange_lifetime_s = 0
[[source]]
id = "p"
kind = "http_push"
listen = "127.0.0.1:0"
secret = "short-s3cr3t"
max_skew_s = 0
max_connections = 0
header_timeout_s = 0
body_timeout_s = 301
max_body_bytes = 0
nonce_window = 0
"#;
        let e = parse(text, Path::new("gw.toml")).unwrap_err();
        let shown = e.to_string();
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("pa55word"),
            "{shown}"
        );
        let line_of = |needle: &str| {
            let at = text.find(needle).unwrap_or_else(|| panic!("{needle}"));
            text[..at].matches('\n').count() + 1
        };
        let expected = [
            ("uplink.partitions", "partitions = 0"),
            ("uplink.batch_size", "batch_size = 0"),
            ("uplink.window", "window = 0"),
            ("uplink.keep_alive_s", "keep_alive_s = 0"),
            ("uplink.health_interval_s", "health_interval_s = 0"),
            ("uplink.topic_root", "topic_root = "),
            ("uplink.tls_ca", "tls_ca = "),
            ("uplink.tls_key", "tls_key = "),
            ("uplink.password", "password = \"uplink"),
            ("source.tls_ca", "tls_ca = \"conc"),
            ("source.tls_key", "tls_key = \"conc"),
            ("source.password", "password = \"conc"),
            ("source.topics.filter", "filter = \"\""),
            ("source.topics", "topics = []"),
            (
                "source.meter_utc_offset_minutes",
                "meter_utc_offset_minutes",
            ),
            // Absent (it is what is missing): its table, the `[[source]]` header.
            ("source.key_file", "[[source]]\nid = \"nb\""),
            ("source.allow", "\"bogus\""),
            ("source.exchange_cache_entries", "exchange_cache_entries"),
            ("source.exchange_lifetime_s", "exchange_lifetime_s"),
            ("source.secret", "secret = "),
            ("source.max_skew_s", "max_skew_s"),
            ("source.max_connections", "max_connections"),
            ("source.header_timeout_s", "header_timeout_s"),
            ("source.body_timeout_s", "body_timeout_s"),
            ("source.max_body_bytes", "max_body_bytes"),
            ("source.nonce_window", "nonce_window"),
        ];
        for (field, needle) in expected {
            let lines: Vec<usize> =
                e.0.iter()
                    .filter(|x| x.field == field)
                    .map(|x| x.line)
                    .collect();
            assert!(
                lines.contains(&line_of(needle)),
                "{field}: expected line {} ({needle}), got {lines:?}\n{shown}",
                line_of(needle)
            );
        }
        assert_eq!(e.0.len(), expected.len(), "{shown}");
        // Spot checks with literal lines: the field's line, never its table's header.
        let line = |f: &str| e.0.iter().find(|x| x.field == f).unwrap().line;
        assert_eq!(line("uplink.partitions"), 4, "{shown}");
        assert_eq!(line("source.allow"), 34, "{shown}");
        assert_eq!(line("source.nonce_window"), 47, "{shown}");
    }

    #[test]
    fn broker_urls() {
        let b: BrokerUrl = "mqtts://broker.example:8884".parse().unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.tls),
            ("broker.example", 8884, true)
        );
        assert!("http://x".parse::<BrokerUrl>().is_err());
    }
}
