//! Shared MQTT plumbing: broker endpoints and an event loop driven on its own task.
//!
//! rumqttc's `EventLoop::poll` must not be cancelled mid-write (a half-sent publish would sit
//! in its in-flight table forever), so it never goes into a `select!`: a task polls it and
//! forwards events over a channel, which is safe to select on.

use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions};
use tokio::sync::mpsc;

/// Where and how to reach an MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
}

impl MqttEndpoint {
    /// Parses `mqtt://host[:port]` (or `tcp://`, or bare `host[:port]`; default port 1883).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        if rest.starts_with("mqtts://") || url.starts_with("mqtts://") || url.starts_with("ssl://")
        {
            return Err(format!(
                "`{url}`: TLS broker URLs are not supported by this build (rumqttc without TLS)"
            ));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("`{url}`: port `{p}` is not a number 0-65535"))?,
            ),
            None => (rest, 1883),
        };
        if host.is_empty() {
            return Err(format!("`{url}`: missing host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            credentials: None,
            keep_alive: Duration::from_secs(15),
        })
    }

    /// rumqttc options for a client id, with large packets allowed (reading batches).
    pub fn options(&self, client_id: &str, last_will: Option<LastWill>) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(self.keep_alive);
        o.set_max_packet_size(64 * 1024 * 1024, 64 * 1024 * 1024);
        o.set_clean_session(true);
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
pub fn drive(mut eventloop: EventLoop) -> mpsc::Receiver<Result<Event, ConnectionError>> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).await.is_err() || failed {
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
) -> (AsyncClient, mpsc::Receiver<Result<Event, ConnectionError>>) {
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
        assert!(
            MqttEndpoint::parse("mqtts://h:8883")
                .unwrap_err()
                .contains("TLS")
        );
    }
}
