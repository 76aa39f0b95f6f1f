//! Shared MQTT plumbing: broker endpoints and an event loop driven on its own task.
//!
//! rumqttc's `EventLoop::poll` must not be cancelled mid-write (a half-sent publish would sit
//! in its in-flight table forever), so it never goes into a `select!`: a task polls it and
//! forwards events over a channel, which is safe to select on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_config::MqttTls;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, TlsConfiguration,
    Transport,
};
use tokio::sync::mpsc;

/// Why the TLS material of an MQTT connection could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate or key file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The CA file holds no certificate that parses.
    #[error("{}: no PEM certificate could be parsed{}", path.display(), detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Certificate {
        /// The CA file.
        path: PathBuf,
        /// The parser's complaint about the first bad block, if any.
        detail: Option<String>,
    },
    /// The client certificate and key do not form an identity.
    #[error("client certificate {} with key {}: {source} (the key must be PKCS#8 PEM, \
             `-----BEGIN PRIVATE KEY-----`; convert with `openssl pkcs8 -topk8 -nocrypt`)",
            cert.display(), key.display())]
    Identity {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Underlying error.
        source: native_tls::Error,
    },
    /// The TLS library refused the configuration (a key that does not match its certificate
    /// shows up here).
    #[error("cannot build the TLS connector ({context}): {source}")]
    Build {
        /// The files involved.
        context: String,
        /// Underlying error.
        source: native_tls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Builds a TLS connector: TLS 1.2 or newer, the broker verified against `tls.ca` (or the
/// system's roots), with a client certificate when one is configured.
///
/// # Errors
/// A file that cannot be read or parsed, named in the error.
pub fn tls_connector(tls: &MqttTls) -> Result<native_tls::TlsConnector, TlsSetupError> {
    let mut builder = native_tls::TlsConnector::builder();
    builder.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    if let Some(ca) = &tls.ca {
        let pem = read(ca)?;
        let text = String::from_utf8_lossy(&pem);
        // `Certificate::from_pem` reads one block; a CA bundle has several.
        let mut added = 0;
        let mut detail = None;
        for block in text.split_inclusive("-----END CERTIFICATE-----") {
            if !block.contains("-----BEGIN CERTIFICATE-----") {
                continue;
            }
            match native_tls::Certificate::from_pem(block.trim_start().as_bytes()) {
                Ok(cert) => {
                    builder.add_root_certificate(cert);
                    added += 1;
                }
                Err(e) => {
                    detail.get_or_insert_with(|| e.to_string());
                }
            }
        }
        if added == 0 || detail.is_some() {
            return Err(TlsSetupError::Certificate {
                path: ca.clone(),
                detail,
            });
        }
    }
    if let Some((cert, key)) = &tls.client {
        let identity =
            native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?).map_err(|source| {
                TlsSetupError::Identity {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                }
            })?;
        builder.identity(identity);
    }
    builder.build().map_err(|source| TlsSetupError::Build {
        context: match &tls.client {
            Some((cert, key)) => format!(
                "client certificate {} with key {}",
                cert.display(),
                key.display()
            ),
            None => "no client certificate".into(),
        },
        source,
    })
}

/// The rumqttc transport for a connector (`None`: plain TCP).
pub fn transport(tls: Option<&native_tls::TlsConnector>) -> Transport {
    match tls {
        Some(connector) => {
            Transport::tls_with_config(TlsConfiguration::NativeConnector(connector.clone()))
        }
        None => Transport::tcp(),
    }
}

/// Where and how to reach an MQTT broker.
#[derive(Debug, Clone)]
pub struct MqttEndpoint {
    /// Host name or address (also the name the broker's certificate must carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// TLS connector; `None` for plain TCP.
    pub tls: Option<native_tls::TlsConnector>,
}

impl MqttEndpoint {
    /// Parses a [`model::BrokerUrl`] (`mqtt://host[:port]`, `tcp://` or bare `host[:port]`,
    /// default port 1883; `mqtts://` or `ssl://`, default port 8883, verified against the
    /// system's roots).
    pub fn parse(url: &str) -> Result<Self, String> {
        let broker: model::BrokerUrl = url
            .parse()
            .map_err(|e: model::BrokerUrlError| e.to_string())?;
        let tls = if broker.tls {
            Some(tls_connector(&MqttTls::default()).map_err(|e| format!("`{url}`: {e}"))?)
        } else {
            None
        };
        Ok(Self {
            host: broker.host,
            port: broker.port,
            credentials: None,
            keep_alive: Duration::from_secs(15),
            tls,
        })
    }

    /// rumqttc options for a client id, with large packets allowed (reading batches).
    ///
    /// The session is clean; connections that must not lose QoS 1 messages published while
    /// they are away (control, concentrator and hydrant sources) switch to a persistent session
    /// and manual acks themselves.
    pub fn options(&self, client_id: &str, last_will: Option<LastWill>) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024);
        o.set_clean_session(true);
        o.set_transport(transport(self.tls.as_ref()));
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u.clone(), p.clone());
        }
        if let Some(w) = last_will {
            o.set_last_will(w);
        }
        o
    }
}

/// Polls `eventloop` on its own task until the connection fails; events arrive on the channel,
/// the last message is the error. Dropping the receiver stops the task at the next event.
///
/// The channel is unbounded on purpose. With a bounded one, a burst fills it, the task waits
/// to send and stops polling; a handler that meanwhile waits in `client.ack()` or `publish()`
/// for room in the client's request channel, which only this task drains, never returns:
/// both wait on each other, no PINGREQ goes out and the broker drops the connection, and the
/// handler never sees the error (issue 25). Unbounded, the task never waits, so requests and
/// pings always flow. What can pile up is bounded by what the broker sends without a PUBACK:
/// the manual-ack sources and the control session acknowledge only after their work is done,
/// and the broker stops at its in-flight window.
pub fn drive(mut eventloop: EventLoop) -> mpsc::UnboundedReceiver<Result<Event, ConnectionError>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// Creates a client and starts driving its event loop.
pub fn connect(
    options: MqttOptions,
    capacity: usize,
) -> (
    AsyncClient,
    mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
) {
    let (client, eventloop) = AsyncClient::new(options, capacity);
    (client, drive(eventloop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let e = MqttEndpoint::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 1884));
        let e = MqttEndpoint::parse("broker.local").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("broker.local", 1883));
        assert!(
            MqttEndpoint::parse("mqtt://h:x")
                .unwrap_err()
                .contains("port")
        );
        let e = MqttEndpoint::parse("mqtts://broker.example").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls.is_some()),
            ("broker.example", 8883, true)
        );
        assert!(MqttEndpoint::parse("broker.local").unwrap().tls.is_none());
    }
}
