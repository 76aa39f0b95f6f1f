//! Connection settings shared by the pipeline's binaries and tests.

/// Default PostgreSQL URL: the local server with trust authentication.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Default MQTT broker URL: the local Mosquitto.
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";

/// Why a broker URL could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The URL does not start with `mqtt://` or `tcp://`.
    #[error("broker url {url:?} must start with mqtt:// or tcp://")]
    Scheme {
        /// The URL given.
        url: String,
    },
    /// The port is not a number.
    #[error("broker url {url:?} has a bad port (expected 1..=65535)")]
    Port {
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

/// Splits `mqtt://host:port` into host and port (default port 1883).
///
/// # Errors
/// Returns [`UrlError`] for another scheme or a bad port.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), UrlError> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| UrlError::Scheme {
            url: url.to_owned(),
        })?;
    let rest = rest.trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) => {
            let port =
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| UrlError::Port {
                        url: url.to_owned(),
                    })?;
            Ok((host.to_owned(), port))
        }
        None => Ok((rest.to_owned(), 1883)),
    }
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
            Err(UrlError::Scheme { .. })
        ));
        assert!(matches!(
            parse_mqtt_url("mqtt://x:0"),
            Err(UrlError::Port { .. })
        ));
    }
}
