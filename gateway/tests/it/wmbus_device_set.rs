//! Registry device sets that change wM-Bus keys, applied to a running gateway over real UDP
//! sockets and Mosquitto: the receiver takes the new keys without ever releasing its port, and
//! a refused set leaves the keys in force receiving.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use decoders::wmbus::encode::telegram;
use gateway::runtime::Gateway;
use model::{DEVICE_SET_WIRE_VERSION, DeviceEntry, DeviceSet, ReadingBatch};
use rust_decimal::Decimal;
use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedReceiver;

const OLD_KEY: [u8; 16] = [0x11; 16];
const NEW_KEY: [u8; 16] = [0x22; 16];
const METER: &str = "mbus:KAM31313131";

/// An encrypted (mode 5) telegram of [`METER`] with volume record `0C 13` of `litres`.
fn volume_telegram(litres: u32, access_no: u8, key: [u8; 16]) -> Vec<u8> {
    telegram(
        &common::kam_meter(0x3131_3131),
        &common::volume_record(litres),
        access_no,
        Some(key),
    )
}

fn device_set(gw: &str, version: u64, key_ref: &str) -> DeviceSet {
    DeviceSet {
        v: DEVICE_SET_WIRE_VERSION,
        gateway: gw.to_owned(),
        version,
        published_at: "2026-12-08T00:00:00Z".into(),
        devices: vec![DeviceEntry {
            id: METER.into(),
            meter_no: None,
            protocol: "wmbus".into(),
            source: "radio".into(),
            address: None,
            register_map: None,
            key_ref: Some(key_ref.into()),
        }],
    }
}

/// The volumes (m³) of [`METER`] published until one equal to `want` arrives (10 s at most).
async fn volumes_until(
    rx: &mut UnboundedReceiver<(String, Vec<u8>)>,
    want: Decimal,
) -> Vec<Decimal> {
    let mut seen = Vec::new();
    while !seen.contains(&want) {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("a reading of {want} m³ within 10 s (seen {seen:?})"))
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).expect("batch json");
        seen.extend(
            batch
                .entries
                .iter()
                .filter(|e| e.reading.meter.as_str() == METER)
                .map(|e| e.reading.value),
        );
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_take_effect_without_releasing_the_port_and_a_refused_set_keeps_the_old() {
    let root = common::unique_prefix("wmbus-keys");
    let gw = "gw-wmbus-keys";
    let (_sub, mut batches) = common::subscribe("wmbus-keys", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[keys]\nold = \"{}\"\nnew = \"{}\"\n",
            hex::encode(OLD_KEY),
            hex::encode(NEW_KEY)
        ),
    )
    .unwrap();
    // A fixed port, as in the field: a receiver that bound its address again would have to
    // get this one back.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let toml = common::gateway_toml(
        gw,
        &root,
        &dir.path().join("spool"),
        "",
        &format!(
            r#"[registry]
key_file = "{}"
[[source]]
id = "radio"
kind = "wmbus_udp"
listen = "127.0.0.1:{port}"
"#,
            keys.display()
        ),
    );
    let config = edge_config::parse(&toml, "keys.toml".as_ref()).expect("config");
    let mut gateway = Gateway::start(config).await.expect("gateway starts");
    let radio = gateway.source_addr("radio").expect("bound");
    assert_eq!(radio.port(), port);
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Version 1: the meter's key is `old`.
    assert_eq!(
        gateway.apply_device_set(&device_set(gw, 1, "old")).await,
        Ok(1)
    );
    stick
        .send_to(&volume_telegram(1_000, 1, OLD_KEY), radio)
        .await
        .unwrap();
    volumes_until(&mut batches, Decimal::new(1, 0)).await;

    // Version 2 changes the key while another socket tries to take the port the whole time:
    // a restart that closed the socket and bound it again would lose it to this one (and the
    // gateway its wM-Bus receiver).
    let stop = Arc::new(AtomicBool::new(false));
    let thief = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut attempts = 0u64;
            while !stop.load(Ordering::Relaxed) {
                attempts += 1;
                if let Ok(socket) = std::net::UdpSocket::bind(radio) {
                    return (attempts, Some(socket));
                }
            }
            (attempts, None)
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let applied = gateway.apply_device_set(&device_set(gw, 2, "new")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    let (attempts, stolen) = thief.join().unwrap();
    assert!(attempts > 0);
    assert!(
        stolen.is_none(),
        "the port was free during the device set ({attempts} bind attempts)"
    );
    assert_eq!(applied, Ok(1));
    assert_eq!(gateway.device_set_version(), 2);
    // Under the old key the meter is no longer heard; under the new one it is.
    stick
        .send_to(&volume_telegram(1_500, 2, OLD_KEY), radio)
        .await
        .unwrap();
    stick
        .send_to(&volume_telegram(2_000, 3, NEW_KEY), radio)
        .await
        .unwrap();
    let seen = volumes_until(&mut batches, Decimal::new(2, 0)).await;
    assert!(
        !seen.contains(&Decimal::new(15, 1)),
        "a telegram under the replaced key was decoded: {seen:?}"
    );

    // Version 3 names a key the key file does not have: refused with the reason, version 2
    // and its key stay in force and the receiver keeps receiving.
    let refused = gateway
        .apply_device_set(&device_set(gw, 3, "missing"))
        .await
        .expect_err("a set naming an unknown key is refused");
    assert!(
        refused.contains("no key `missing` in the key file"),
        "{refused}"
    );
    assert_eq!(gateway.device_set_version(), 2);
    assert_eq!(gateway.source_addr("radio"), Some(radio));
    stick
        .send_to(&volume_telegram(3_000, 4, NEW_KEY), radio)
        .await
        .unwrap();
    volumes_until(&mut batches, Decimal::new(3, 0)).await;
    gateway.shutdown().await;
}
