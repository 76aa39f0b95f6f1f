//! End-to-end tests of the water-meter pipeline over real PostgreSQL and Mosquitto.
//!
//! This crate holds only tests (in `tests/tests/`) and the small helpers they share. It uses
//! every other crate through its public interface and never mocks PostgreSQL or MQTT: an
//! unreachable service fails the test with what to start.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The helpers live in the dev-only `testkit` (issue 15); these names stay for the suites here.
pub use testkit::mqtt::connect as mqtt_client;
pub use testkit::names::unique_prefix;

/// Subscribes `filter` (QoS 1), waits for its SUBACK and returns the client with the channel
/// of every `(topic, payload)` received: [`testkit::mqtt::subscribe`] in the tuple form the
/// suites here destructure.
pub async fn subscribe(
    name: &str,
    filter: &str,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let s = testkit::mqtt::subscribe(name, &[filter]).await;
    (s.client, s.rx)
}
