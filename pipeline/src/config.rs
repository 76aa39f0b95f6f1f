//! Connection settings shared by the pipeline's binaries and tests.

/// Default PostgreSQL URL: the local server with trust authentication.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Default MQTT broker URL: the local Mosquitto.
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";

/// Why a broker URL could not be used by the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a broker URL (scheme, port or host): the one grammar of [`model::BrokerUrl`].
    #[error(transparent)]
    Url(#[from] model::BrokerUrlError),
    /// `mqtts://`: the TLS connector (system trust store, TLS 1.2+) could not be built.
    #[error("broker URL `{url}`: cannot set up TLS: {source}")]
    Tls {
        /// The URL, as parsed.
        url: String,
        /// What the TLS library said.
        source: native_tls::Error,
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

/// Parses a broker URL in the one grammar of [`model::BrokerUrl`] (`mqtt://`, `tcp://`, bare
/// `host[:port]`, or `mqtts://`/`ssl://` for TLS).
///
/// # Errors
/// [`UrlError::Url`] naming the URL and the part refused.
pub fn broker_url(url: &str) -> Result<model::BrokerUrl, UrlError> {
    Ok(url.parse()?)
}

/// MQTT options for `broker`: host, port and transport. `mqtts://` gets TLS (1.2 or newer),
/// the broker's certificate checked against the system trust store (OpenSSL's: `SSL_CERT_FILE`
/// or `SSL_CERT_DIR` point it elsewhere) and its name against the URL's host.
///
/// # Errors
/// [`UrlError::Tls`] when the TLS connector cannot be built.
pub fn mqtt_options(
    broker: &model::BrokerUrl,
    client_id: impl Into<String>,
) -> Result<rumqttc::MqttOptions, UrlError> {
    let mut options = rumqttc::MqttOptions::new(client_id, broker.host.clone(), broker.port);
    if broker.tls {
        let connector = native_tls::TlsConnector::builder()
            .min_protocol_version(Some(native_tls::Protocol::Tlsv12))
            .build()
            .map_err(|source| UrlError::Tls {
                url: broker.to_string(),
                source,
            })?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::NativeConnector(connector),
        ));
    }
    Ok(options)
}

/// The one way the pipeline connects to a broker: [`mqtt_options`] for `broker`, then
/// `configure` (keep-alive, session, packet sizes), then the client with `TCP_NODELAY`
/// ([`set_nodelay`]).
///
/// # Errors
/// [`UrlError::Tls`] when the TLS connector cannot be built.
pub fn mqtt_client(
    broker: &model::BrokerUrl,
    client_id: impl Into<String>,
    cap: usize,
    configure: impl FnOnce(&mut rumqttc::MqttOptions),
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), UrlError> {
    let mut options = mqtt_options(broker, client_id)?;
    configure(&mut options);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, cap);
    set_nodelay(&mut eventloop);
    Ok((client, eventloop))
}

/// The reading publisher of `pipeline-bench` and `control-bench`, one definition so the two
/// benches load the broker alike: [`mqtt_client`] with a 256-request queue, 16 MiB packets
/// (whole gateway batches), 200 QoS-1 publishes in flight and a 30 s keep-alive.
///
/// # Errors
/// [`UrlError::Tls`] when the TLS connector cannot be built.
pub fn bench_publisher(
    broker: &model::BrokerUrl,
    client_id: impl Into<String>,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), UrlError> {
    mqtt_client(broker, client_id, 256, |o| {
        o.set_max_packet_size(16 << 20, 16 << 20)
            .set_inflight(200)
            .set_keep_alive(std::time::Duration::from_secs(30));
    })
}

/// A [`bench_publisher`] whose connection is driven: what both benches publish readings with.
#[derive(Debug, Clone)]
pub struct BenchPublisher {
    client: rumqttc::AsyncClient,
    root: String,
}

impl BenchPublisher {
    /// Connects a [`bench_publisher`] and polls its event loop on a task of the calling
    /// runtime (a connection error is logged and the connection tried again after 200 ms;
    /// the task ends when the last clone of the publisher is dropped). The receiver is told
    /// at the first CONNACK.
    ///
    /// # Errors
    /// [`UrlError::Tls`] when the TLS connector cannot be built.
    pub fn spawn(
        broker: &model::BrokerUrl,
        client_id: impl Into<String>,
        root: impl Into<String>,
    ) -> Result<(Self, tokio::sync::oneshot::Receiver<()>), UrlError> {
        let (client, mut eventloop) = bench_publisher(broker, client_id)?;
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut connected = Some(connected_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(c) = connected.take() {
                            c.send(()).ok();
                        }
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "bench publisher connection");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let root = root.into();
        Ok((Self { client, root }, connected))
    }

    /// Publishes a `ReadingBatch` payload to partition `partition` of the root (QoS 1, as
    /// gateways do); returns once the client queued it.
    ///
    /// # Errors
    /// When the client's event loop has ended.
    pub async fn publish(
        &self,
        partition: u16,
        payload: Vec<u8>,
    ) -> Result<(), rumqttc::ClientError> {
        self.client
            .publish(
                crate::ingest::readings_topic(&self.root, partition),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
    }
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
    use rumqttc::Transport;

    #[test]
    fn plain_url_gives_tcp_with_host_and_port() {
        let o = mqtt_options(&broker_url("mqtt://127.0.0.1:1884").unwrap(), "t").unwrap();
        assert_eq!(o.broker_address(), ("127.0.0.1".to_owned(), 1884));
        assert!(matches!(o.transport(), Transport::Tcp));
        let o = mqtt_options(&broker_url("tcp://broker/").unwrap(), "t").unwrap();
        assert_eq!(o.broker_address(), ("broker".to_owned(), 1883));
        assert!(matches!(o.transport(), Transport::Tcp));
    }

    #[test]
    fn tls_url_gives_tls_on_8883() {
        let o = mqtt_options(&broker_url("mqtts://broker.example").unwrap(), "t").unwrap();
        assert_eq!(o.broker_address(), ("broker.example".to_owned(), 8883));
        assert!(matches!(o.transport(), Transport::Tls(_)));
        let o = mqtt_options(&broker_url("ssl://b:8884").unwrap(), "t").unwrap();
        assert_eq!(o.broker_address(), ("b".to_owned(), 8884));
        assert!(matches!(o.transport(), Transport::Tls(_)));
    }

    #[test]
    fn bad_url_is_typed_and_named() {
        for (url, part) in [("http://x", "http://x"), ("mqtt://x:0", "`0`")] {
            let e = broker_url(url).unwrap_err();
            assert!(matches!(e, UrlError::Url(_)), "{url}: {e:?}");
            assert!(e.to_string().contains(url), "{e}");
            assert!(e.to_string().contains(part), "{e}");
        }
        assert!(matches!(
            broker_url("mqtt://:1883"),
            Err(UrlError::Url(model::BrokerUrlError::Host { .. }))
        ));
    }

    #[test]
    fn client_helper_builds_for_both_schemes() {
        for url in ["mqtt://127.0.0.1:1883", "mqtts://127.0.0.1"] {
            let b = broker_url(url).unwrap();
            let (_client, eventloop) = mqtt_client(&b, "t", 8, |o| {
                o.set_keep_alive(std::time::Duration::from_secs(30));
            })
            .unwrap();
            let _ = eventloop;
        }
    }
}
