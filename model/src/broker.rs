//! The MQTT broker URL: one grammar for every crate (gateway config, pipeline, simulators, api).
//!
//! `[scheme://]host[:port][/]` where the scheme is `mqtt://` or `tcp://` (plain, default port
//! 1883) or `mqtts://` or `ssl://` (TLS, default port 8883). A bare `host[:port]` is plain MQTT:
//! the environment variables (`MQTT_URL`) and command lines have always accepted it.

use std::fmt;
use std::str::FromStr;

/// Plain MQTT's default port.
pub const MQTT_PORT: u16 = 1883;
/// MQTT over TLS's default port.
pub const MQTTS_PORT: u16 = 8883;

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    /// Host name or address (also the name a TLS broker's certificate must carry).
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
    /// TLS requested by the scheme (`mqtts://`, `ssl://`).
    pub tls: bool,
}

/// Why a broker URL was refused; every variant names the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// A scheme other than mqtt, tcp, mqtts or ssl.
    #[error("broker URL `{url}` must start with mqtt://, tcp://, mqtts:// or ssl://")]
    Scheme {
        /// The URL given.
        url: String,
    },
    /// The port is not a number in 1..=65535.
    #[error("broker URL `{url}`: port `{port}` is not 1-65535")]
    Port {
        /// The URL given.
        url: String,
        /// The port text.
        port: String,
    },
    /// Nothing before the port.
    #[error("broker URL `{url}` has no host")]
    Host {
        /// The URL given.
        url: String,
    },
}

impl BrokerUrl {
    /// A plain (`mqtt://`) URL.
    pub fn plain(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: false,
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    fn from_str(url: &str) -> Result<Self, BrokerUrlError> {
        let (tls, rest) = match url.split_once("://") {
            None => (false, url),
            Some(("mqtt" | "tcp", r)) => (false, r),
            Some(("mqtts" | "ssl", r)) => (true, r),
            Some(_) => {
                return Err(BrokerUrlError::Scheme {
                    url: url.to_owned(),
                });
            }
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => {
                let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    BrokerUrlError::Port {
                        url: url.to_owned(),
                        port: p.to_owned(),
                    }
                })?;
                (h, port)
            }
            None => (rest, if tls { MQTTS_PORT } else { MQTT_PORT }),
        };
        if host.is_empty() {
            return Err(BrokerUrlError::Host {
                url: url.to_owned(),
            });
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl<'de> serde::Deserialize<'de> for BrokerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for BrokerUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<BrokerUrl, BrokerUrlError> {
        s.parse()
    }

    #[test]
    fn schemes_ports_and_defaults() {
        assert_eq!(
            p("mqtt://127.0.0.1:1884"),
            Ok(BrokerUrl::plain("127.0.0.1", 1884))
        );
        assert_eq!(p("tcp://broker/"), Ok(BrokerUrl::plain("broker", 1883)));
        assert_eq!(
            p("broker.local"),
            Ok(BrokerUrl::plain("broker.local", 1883))
        );
        assert_eq!(
            p("broker.local:1999"),
            Ok(BrokerUrl::plain("broker.local", 1999))
        );
        let t = p("mqtts://broker.example").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("broker.example", 8883, true)
        );
        let t = p("ssl://b:8884").unwrap();
        assert_eq!((t.port, t.tls), (8884, true));
    }

    #[test]
    fn refusals_name_the_url_and_the_part() {
        assert!(matches!(p("http://x"), Err(BrokerUrlError::Scheme { .. })));
        assert_eq!(
            p("mqtt://h:x"),
            Err(BrokerUrlError::Port {
                url: "mqtt://h:x".into(),
                port: "x".into()
            })
        );
        assert!(matches!(p("mqtt://x:0"), Err(BrokerUrlError::Port { .. })));
        assert!(matches!(
            p("mqtt://x:65536"),
            Err(BrokerUrlError::Port { .. })
        ));
        assert!(matches!(
            p("mqtt://:1883"),
            Err(BrokerUrlError::Host { .. })
        ));
        assert!(p("http://x").unwrap_err().to_string().contains("mqtts://"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["mqtt://h:1", "mqtts://broker.example:8883"] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
        assert_eq!(p("h").unwrap().to_string(), "mqtt://h:1883");
    }
}
