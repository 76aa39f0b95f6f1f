//! HTTP push (HMAC-signed envelopes) and the concentrator MQTT source (3.1.1 and 5), through the running
//! gateway to reading batches on Mosquitto.

use crate::common;

use std::time::Duration;

use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
use decoders::envelope::{Envelope, Platform, encode_envelope};
use gateway::runtime::Gateway;
use model::ReadingBatch;
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

const SECRET: &str = "0123456789abcdef-secret";

fn frame(address: [u8; 7], volume: Decimal) -> Vec<u8> {
    let reading = Cjt188Reading {
        current_m3: volume,
        settlement_m3: Decimal::new(1, 0),
        unit: cjt188::UNIT_M3,
        clock: time::macros::datetime!(2026-11-24 18:00:00),
        status: 0,
    };
    cjt188::encode(&Cjt188Frame::read_data_reply(0x10, address, 1, &reading))
}

/// (meter, value, source kind, provenance channel) of every volume reading.
async fn values_until(
    rx: &mut UnboundedReceiver<(String, Vec<u8>)>,
    want: usize,
) -> Vec<(String, Decimal, model::SourceKind, Option<String>)> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while got.len() < want {
            let (_, p) = rx.recv().await.unwrap();
            let b: ReadingBatch = serde_json::from_slice(&p).unwrap();
            for e in b.entries {
                if e.reading.quantity == model::Quantity::Volume {
                    got.push((
                        e.reading.meter.to_string(),
                        e.reading.value,
                        e.reading.provenance.source,
                        e.reading.provenance.channel,
                    ));
                }
            }
        }
    })
    .await
    .expect("readings arrive");
    got.sort_by(|a, b| a.0.cmp(&b.0));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_push_and_concentrator_mqtt_reach_the_uplink() {
    let root = common::unique_prefix("sources");
    let site = format!("{root}/site");
    let (_s, mut batches) = common::subscribe("src-readings", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let b = common::broker();
    let sources = format!(
        r#"[[source]]
id = "platform"
kind = "http_push"
listen = "127.0.0.1:0"
secret = "{SECRET}"
[[source]]
id = "conc"
kind = "mqtt"
broker = "mqtt://{host}:{port}"
client_id = "{cid}-conc"
topics = [
  {{ filter = "{site}/concentrator/+/readings", format = "json" }},
  {{ filter = "{site}/concentrator/+/frame", format = "auto" }},
]
[[source]]
id = "conc5"
kind = "mqtt"
protocol = "5"
broker = "mqtt://{host}:{port}"
client_id = "{cid}-conc5"
topics = [{{ filter = "{site}/c5/+/readings", format = "json" }}]
"#,
        host = b.host,
        port = b.port,
        cid = common::client_id(&root),
    );
    let toml = common::gateway_toml("gw-src", &root, dir.path(), "", &sources);
    let config = edge_config::parse(&toml, "t.toml".as_ref()).unwrap();
    let gateway = Gateway::start(config).await.unwrap();
    let http = gateway.source_addr("platform").unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    // HTTP push: good signature → 202; bad signature, old timestamp → 401; garbage → 400.
    let addr1 = [0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
    let env = Envelope::new(
        Platform::Generic,
        "dev-1",
        frame(addr1, Decimal::new(4242, 2)),
    );
    let body = encode_envelope(Platform::Generic, &env);
    assert_eq!(common::signed_push(http, &body, now, SECRET).await, 202);
    assert_eq!(
        common::signed_push(http, &body, now, "wrong-secret-wrong").await,
        401
    );
    assert_eq!(
        common::signed_push(http, &body, now - 1000, SECRET).await,
        401
    );
    assert_eq!(
        common::signed_push(http, b"{\"nonsense\":1}", now, SECRET).await,
        400
    );

    // Concentrator: one JSON list and one raw CJ/T 188 frame.
    let (pubc, _rx) = common::subscribe("src-pub", &format!("{root}/unused")).await;
    // The concentrator source is ready once its subscriptions are confirmed.
    let waiting = gateway.wait_ready(Duration::from_secs(10)).await;
    assert!(waiting.is_empty(), "sources not ready: {waiting:?}");
    let json = r#"{"v":1,"concentrator":"c1","sent_at":"2026-11-24T10:00:00Z","readings":[{"meter":"cjt188:00000000000002","ts":"2026-11-24T09:00:00Z","volume_m3":"7.125"}]}"#;
    pubc.publish(
        format!("{site}/concentrator/c1/readings"),
        rumqttc::QoS::AtLeastOnce,
        false,
        json,
    )
    .await
    .unwrap();
    let addr3 = [0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
    pubc.publish(
        format!("{site}/concentrator/c1/frame"),
        rumqttc::QoS::AtLeastOnce,
        false,
        frame(addr3, Decimal::new(333, 2)),
    )
    .await
    .unwrap();
    pubc.publish(
        format!("{site}/concentrator/c1/frame"),
        rumqttc::QoS::AtLeastOnce,
        false,
        vec![0x68u8, 0x10, 0x01],
    )
    .await
    .unwrap();

    let json5 = r#"{"v":1,"concentrator":"c5","sent_at":"2026-11-24T10:00:00Z","readings":[{"meter":"cjt188:00000000000004","ts":"2026-11-24T09:00:00Z","volume_m3":"4.5"}]}"#;
    pubc.publish(
        format!("{site}/c5/x/readings"),
        rumqttc::QoS::AtLeastOnce,
        false,
        json5,
    )
    .await
    .unwrap();

    let mut got = values_until(&mut batches, 4).await;
    // The push's channel is the HTTP peer: this test's ephemeral client port.
    let push_channel = got[0].3.take().expect("push reading has a channel");
    assert!(
        push_channel.starts_with("127.0.0.1:") && push_channel != http.to_string(),
        "{push_channel}"
    );
    use model::SourceKind::{HttpPush, Mqtt};
    // Concentrator readings carry the topic they arrived on.
    let topic = |t: &str| Some(format!("{site}/{t}"));
    assert_eq!(
        got,
        vec![
            (
                "cjt188:00000000000001".into(),
                Decimal::new(4242, 2),
                HttpPush,
                None
            ),
            (
                "cjt188:00000000000002".into(),
                Decimal::new(7125, 3),
                Mqtt,
                topic("concentrator/c1/readings")
            ),
            (
                "cjt188:00000000000003".into(),
                Decimal::new(333, 2),
                Mqtt,
                topic("concentrator/c1/frame")
            ),
            (
                "cjt188:00000000000004".into(),
                Decimal::new(45, 1),
                Mqtt,
                topic("c5/x/readings")
            ),
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = tokio::net::TcpStream::connect(gateway.metrics_addr())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains("wm_gateway_frames_total{source=\"conc\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("wm_gateway_decode_errors_total{source=\"conc\""),
        "{text}"
    );
    assert!(
        text.contains("wm_gateway_decode_errors_total{source=\"platform\",kind=\"envelope_"),
        "{text}"
    );
    for source in ["platform", "conc"] {
        assert!(
            text.contains(&format!("wm_gateway_source_ready{{source=\"{source}\"}} 1")),
            "{text}"
        );
    }
    gateway.shutdown().await;
}
