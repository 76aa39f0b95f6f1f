//! The test broker (env `MQTT_URL`, default the local Mosquitto): clients that connect,
//! subscribe and wait for the SUBACK before a test publishes (no sleeps), and waiting for a
//! message with a timeout.

use std::time::Duration;

use model::BrokerUrl;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// How long a test waits for the broker's CONNACK/SUBACK before it fails.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The test broker: `MQTT_URL` or `mqtt://127.0.0.1:1883`.
///
/// # Panics
/// When `MQTT_URL` is not a broker URL: the test environment is wrong.
pub fn broker() -> BrokerUrl {
    let url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    url.parse().unwrap_or_else(|e| panic!("MQTT_URL: {e}"))
}

/// Client options for the test broker with a unique client id derived from `name`, a 10 s
/// keep-alive and 16 MiB packets (reading batches).
pub fn options(name: &str) -> MqttOptions {
    let b = broker();
    let mut o = MqttOptions::new(crate::names::client_id(name), b.host, b.port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    o
}

/// A client and its (not yet polled) event loop on the test broker.
pub fn connect(name: &str) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options(name), 64)
}

/// Polls `eventloop` until the broker has acknowledged every subscription asked for so far
/// (`count` SUBACKs).
///
/// # Panics
/// When the broker is unreachable or does not answer within [`BROKER_TIMEOUT`].
pub async fn wait_suback(eventloop: &mut EventLoop, count: usize) {
    let mut seen = 0;
    tokio::time::timeout(BROKER_TIMEOUT, async {
        while seen < count {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => seen += 1,
                Ok(_) => {}
                Err(e) => panic!(
                    "cannot reach the MQTT broker at {}: {e} (start mosquitto)",
                    broker()
                ),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{seen} of {count} SUBACKs within {BROKER_TIMEOUT:?}"));
}

/// A subscriber whose event loop runs on its own task; messages arrive on [`Subscriber::rx`].
/// Its session is clean: after a reconnect it subscribes to its filters again.
#[derive(Debug)]
pub struct Subscriber {
    /// The client (keep it alive; publish or subscribe more through it).
    pub client: AsyncClient,
    /// Its MQTT client id (unique per subscriber).
    pub client_id: String,
    /// `(topic, payload)` of every message received.
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl Subscriber {
    /// The next message within `within`, or `None` when none came.
    pub async fn next_within(&mut self, within: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The first message within `within` for which `keep` holds (others are dropped).
    ///
    /// # Panics
    /// When none came in time: the test has failed.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        mut keep: impl FnMut(&str, &[u8]) -> bool,
    ) -> (String, Vec<u8>) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((t, p))) if keep(&t, &p) => return (t, p),
                Ok(Some(_)) => {}
                Ok(None) => panic!("the subscriber's connection ended"),
                Err(_) => panic!("no matching message within {within:?}"),
            }
        }
    }
}

/// Connects, subscribes to every filter (QoS 1), waits for their SUBACKs and then forwards
/// every message on [`Subscriber::rx`]. The session is clean, so the broker forgets the
/// subscriptions when the connection drops: on every later CONNACK without a session the
/// subscriber subscribes again (as a long-lived client must), so a test survives a broker
/// restart or a dropped socket; messages published while it was away are lost.
///
/// # Panics
/// When the broker is unreachable or does not acknowledge within [`BROKER_TIMEOUT`].
pub async fn subscribe(name: &str, filters: &[&str]) -> Subscriber {
    let mut options = options(name);
    options.set_clean_session(true);
    let client_id = options.client_id();
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    for f in filters {
        client
            .subscribe(*f, QoS::AtLeastOnce)
            .await
            .expect("the client's request queue is open");
    }
    wait_suback(&mut eventloop, filters.len()).await;
    let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let resubscriber = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        break;
                    }
                }
                // The first CONNACK was taken by `wait_suback`: this is a reconnect.
                Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                    for f in &filters {
                        // `try_`: awaiting a full request queue here would wait on the very
                        // loop that drains it.
                        if let Err(e) = resubscriber.try_subscribe(f.as_str(), QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, filter = %f, "test subscriber resubscribe");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // rumqttc reconnects on the next poll; a test that needs the messages
                    // lost meanwhile fails on its own timeout.
                    tracing::warn!(error = %e, "test subscriber");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    Subscriber {
        client,
        client_id,
        rx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second client with the subscriber's id makes the broker drop the subscriber's socket
    /// (MQTT session takeover); the subscriber reconnects with a clean session and must
    /// subscribe again, or the messages published afterwards never reach it.
    #[tokio::test]
    async fn resubscribes_after_the_broker_drops_the_connection() {
        let topic = format!("{}/resub", crate::names::unique_prefix("testkit"));
        let mut sub = subscribe("resub", &[&topic]).await;
        let (publisher, mut publisher_loop) = connect("resub-pub");
        tokio::spawn(async move { while publisher_loop.poll().await.is_ok() {} });
        publisher
            .publish(topic.as_str(), QoS::AtLeastOnce, false, b"before".to_vec())
            .await
            .unwrap();
        let (_, first) = sub.wait_for(BROKER_TIMEOUT, |_, _| true).await;
        assert_eq!(first, b"before");

        // Take the session over, then leave: the broker closes the subscriber's connection.
        let (thief, mut thief_loop) = AsyncClient::new(
            MqttOptions::new(sub.client_id.clone(), broker().host, broker().port),
            8,
        );
        tokio::time::timeout(BROKER_TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = thief_loop.poll().await.unwrap() {
                    break;
                }
            }
        })
        .await
        .expect("the second client connects");
        thief.disconnect().await.unwrap();
        while thief_loop.poll().await.is_ok() {}
        drop(thief_loop);

        // Messages published while the subscriber is away are lost; once it is back (and
        // subscribed again) one of these arrives.
        let deadline = tokio::time::Instant::now() + BROKER_TIMEOUT;
        let mut received = None;
        let mut n = 0u32;
        while received.is_none() && tokio::time::Instant::now() < deadline {
            n += 1;
            publisher
                .publish(
                    topic.as_str(),
                    QoS::AtLeastOnce,
                    false,
                    format!("after {n}"),
                )
                .await
                .unwrap();
            received = sub.next_within(Duration::from_millis(200)).await;
        }
        let (t, payload) = received.expect("a message after the reconnect: not resubscribed");
        assert_eq!(t, topic);
        assert!(payload.starts_with(b"after "), "{payload:?}");
    }
}
