//! End-to-end tests of the water-meter pipeline over real PostgreSQL and Mosquitto.
//!
//! This crate holds only tests (in `tests/tests/`) and the small helpers they share. It uses
//! every other crate through its public interface and never mocks PostgreSQL or MQTT: an
//! unreachable service fails the test with what to start.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use rumqttc::{AsyncClient, EventLoop, MqttOptions};

/// Returns a client and event loop connected to `MQTT_URL` (default local Mosquitto), with a
/// unique client id derived from `name`.
///
/// # Panics
/// Panics when `MQTT_URL` is malformed.
pub fn mqtt_client(name: &str) -> (AsyncClient, EventLoop) {
    let url = pipeline::config::mqtt_url();
    let (host, port) =
        pipeline::config::parse_mqtt_url(&url).unwrap_or_else(|e| panic!("bad MQTT_URL: {e}"));
    let id = format!("{name}-{}-{:08x}", std::process::id(), rand_suffix());
    let mut options = MqttOptions::new(id, host, port);
    options.set_keep_alive(std::time::Duration::from_secs(10));
    options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    AsyncClient::new(options, 64)
}

/// Returns a random topic prefix so parallel tests never see each other's messages.
pub fn unique_prefix(name: &str) -> String {
    format!("test/{name}/{}-{:08x}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}
