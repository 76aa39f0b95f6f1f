//! Connection settings shared by the pipeline's binaries and tests.

/// Default PostgreSQL URL: the local server with trust authentication.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Default MQTT broker URL: the local Mosquitto.
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";

/// Why a broker URL could not be used by the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a broker URL (scheme, port or host): the one grammar of [`model::BrokerUrl`].
    #[error(transparent)]
    Url(#[from] model::BrokerUrlError),
    /// `mqtts://`: the pipeline's MQTT connections are plain TCP so far.
    #[error("broker URL {url:?}: the pipeline does not speak TLS yet (use mqtt://)")]
    Tls {
        /// The URL given.
        url: String,
    },
}

/// Returns `DATABASE_URL` from the environment, or [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// Returns `MQTT_URL` from the environment, or [`DEFAULT_MQTT_URL`].
pub fn mqtt_url() -> String {
    std::env::var("MQTT_URL").unwrap_or_else(|_| DEFAULT_MQTT_URL.to_owned())
}

/// Splits a plain broker URL ([`model::BrokerUrl`]: `mqtt://host[:port]`, `tcp://` or bare
/// `host[:port]`, default port 1883) into host and port.
///
/// # Errors
/// Returns [`UrlError`] for a malformed URL, or a TLS one (the pipeline's connections are
/// plain TCP).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), UrlError> {
    let b: model::BrokerUrl = url.parse()?;
    if b.tls {
        return Err(UrlError::Tls {
            url: url.to_owned(),
        });
    }
    Ok((b.host, b.port))
}

/// Disables Nagle's algorithm on an MQTT client's socket. rumqttc leaves it on: a small
/// packet (an alarm, a PUBACK) written while an earlier one is not yet acknowledged by TCP
/// then waits for that ACK, which the peer's delayed-ACK timer may hold back ~40 ms.
/// `WM_MQTT_NAGLE=1` leaves it on (to measure the difference, `docs/benchmarks.md`).
pub fn set_nodelay(eventloop: &mut rumqttc::EventLoop) {
    if std::env::var("WM_MQTT_NAGLE").is_ok_and(|v| v == "1") {
        return;
    }
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1883"),
            Ok(("127.0.0.1".into(), 1883))
        );
        assert_eq!(parse_mqtt_url("tcp://broker/"), Ok(("broker".into(), 1883)));
        assert!(matches!(
            parse_mqtt_url("http://x"),
            Err(UrlError::Url(model::BrokerUrlError::Scheme { .. }))
        ));
        assert!(matches!(
            parse_mqtt_url("mqtt://x:0"),
            Err(UrlError::Url(model::BrokerUrlError::Port { .. }))
        ));
        assert!(matches!(
            parse_mqtt_url("mqtts://x"),
            Err(UrlError::Tls { .. })
        ));
    }
}
