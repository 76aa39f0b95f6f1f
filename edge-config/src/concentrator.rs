//! Configuration of the concentrator MQTT subscriber (`kind = "mqtt"`).

use std::path::PathBuf;

use serde::Deserialize;

use crate::valid::{FieldProblem, collected};
use crate::{BrokerUrl, MqttProtocol, MqttTls, Secret};

/// How the payloads of an MQTT topic are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// Concentrator readings JSON (`{"v":1,"concentrator":..,"readings":[..]}`).
    Json,
    /// One raw CJ/T 188 frame.
    Cjt188,
    /// One raw M-Bus long frame.
    Mbus,
    /// A raw frame; CJ/T 188 (starts 0x68 with a meter type) or M-Bus by its start bytes.
    Auto,
}

/// One topic subscription of an MQTT source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMapping {
    /// Topic filter (wildcards allowed), e.g. `concentrator/+/readings`.
    pub filter: String,
    /// Payload format.
    pub format: PayloadFormat,
}

/// `kind = "mqtt"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// Source id.
    pub id: String,
    /// Site broker.
    pub broker: BrokerUrl,
    /// Client id (default `<gateway>-<source id>`).
    pub client_id: Option<String>,
    /// Protocol version (default "3.1.1").
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// User name.
    pub username: Option<String>,
    /// Password (needs `username`; `Debug` shows `***`).
    pub password: Option<Secret>,
    /// CA certificate (PEM) to verify the broker.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key: Option<PathBuf>,
    /// Topic → payload format.
    pub topics: Vec<TopicMapping>,
}

impl MqttSourceConfig {
    /// TLS settings, `None` for a plain `mqtt://` broker.
    pub fn tls(&self) -> Option<MqttTls> {
        MqttTls::from_fields(self.broker.tls, &self.tls_ca, &self.tls_cert, &self.tls_key)
    }

    /// Checks every field; returns all problems found.
    ///
    /// # Errors
    /// Every problem, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems: Vec<FieldProblem> = crate::tls::field_problems(
            self.broker.tls,
            &self.tls_ca,
            &self.tls_cert,
            &self.tls_key,
            "use mqtts://",
        )
        .into_iter()
        .map(|(field, reason)| FieldProblem::new(field, reason))
        .collect();
        if self.username.is_none() && self.password.is_some() {
            problems.push(FieldProblem::new("password", "a password needs a username"));
        }
        if self.topics.is_empty() {
            problems.push(FieldProblem::new(
                "topics",
                "at least one topic mapping is needed",
            ));
        }
        for (j, t) in self.topics.iter().enumerate() {
            if t.filter.is_empty() {
                problems.push(FieldProblem::new(
                    format!("topics[{j}].filter"),
                    "empty topic filter",
                ));
            }
        }
        collected(problems)
    }
}
