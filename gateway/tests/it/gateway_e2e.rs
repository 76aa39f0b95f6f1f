//! End to end over real sockets and Mosquitto: a CoAP POST of a CJ/T 188 frame arrives as a
//! reading batch; a valve command is queued, delivered in the CoAP reply, acknowledged by the
//! meter's valve reply, and a re-sent command id is never executed twice; status and metrics.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{MessageClass, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading, Payload};
use gateway::runtime::Gateway;
use model::{CommandAck, CommandState, ReadingBatch};
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedReceiver;

const ADDRESS: [u8; 7] = [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78];
const METER: &str = "cjt188:78330011223344";

fn reading_frame(volume: Decimal, ser: u8) -> Vec<u8> {
    let reading = Cjt188Reading {
        current_m3: volume,
        settlement_m3: Decimal::new(100, 0),
        unit: cjt188::UNIT_M3,
        clock: time::macros::datetime!(2026-11-24 18:43:00),
        status: 0,
    };
    cjt188::encode(&Cjt188Frame::read_data_reply(0x10, ADDRESS, ser, &reading))
}

async fn next_ack(rx: &mut UnboundedReceiver<(String, Vec<u8>)>) -> CommandAck {
    let (_, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("command ack in time")
        .unwrap();
    serde_json::from_slice(&payload).expect("ack json")
}

async fn next_batch(rx: &mut UnboundedReceiver<(String, Vec<u8>)>) -> ReadingBatch {
    let (_, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("batch in time")
        .unwrap();
    serde_json::from_slice(&payload).expect("batch json")
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn command_json(root_gw: &str, id: &str, open: bool) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc();
    let t = |d: time::OffsetDateTime| {
        d.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    serde_json::json!({
        "v": 1, "id": id, "gateway": root_gw, "device": METER,
        "action": {"type": if open { "valve_open" } else { "valve_close" }},
        "issued_by": "test", "issued_at": t(now), "expires_at": t(now + time::Duration::minutes(5))
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_uplink_downlink_status_and_metrics() {
    let root = common::unique_prefix("e2e");
    let gw = "gw-e2e";
    let (_s1, mut batches) = common::subscribe("e2e-readings", &format!("{root}/readings/#")).await;
    let (_s2, mut acks) = common::subscribe("e2e-acks", &format!("{root}/{gw}/cmd-ack")).await;
    let (_s3, mut status) = common::subscribe("e2e-status", &format!("{root}/{gw}/status")).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = common::gateway_toml(
        gw,
        &root,
        &dir.path().join("spool"),
        "partitions = 4\n",
        r#"[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:0"
auth = "none"
"#,
    );
    let config = edge_config::parse(&toml, "e2e.toml".as_ref()).expect("config");
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let coap = gateway.source_addr("nbiot").expect("bound");
    let (_, online) = tokio::time::timeout(Duration::from_secs(10), status.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&online).contains("\"online\""));

    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // 1. Uplink: the reading is spooled, answered 2.04 (nothing pending) and published.
    let reply =
        common::coap_post(&meter, coap, 100, reading_frame(Decimal::new(123456, 2), 1)).await;
    assert_eq!(
        reply.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    assert!(reply.payload.is_empty());
    let batch = next_batch(&mut batches).await;
    assert_eq!(batch.gateway.as_str(), gw);
    let volume = batch
        .entries
        .iter()
        .find(|e| e.reading.quantity == model::Quantity::Volume)
        .expect("volume reading");
    assert_eq!(volume.reading.meter.as_str(), METER);
    assert_eq!(volume.reading.value, Decimal::new(123456, 2));
    assert_eq!(volume.reading.provenance.source, model::SourceKind::Coap);
    assert_eq!(batch.partition, model::partition_of(METER, 4));
    let spooled = gateway.spool().stats().next_seq;
    // A CON retransmission (same message id) gets the same answer and is not stored twice.
    let again =
        common::coap_post(&meter, coap, 100, reading_frame(Decimal::new(123456, 2), 1)).await;
    assert_eq!(again.header.code, reply.header.code);
    assert_eq!(gateway.spool().stats().next_seq, spooled);

    // 2. Downlink: valve close queued until the next uplink; the duplicate is not re-queued.
    let (cmd_client, _cmd_rx) = common::subscribe("e2e-cmd", &format!("{root}/unused")).await;
    let topic = format!("{root}/{gw}/cmd/{METER}");
    cmd_client
        .publish(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            command_json(gw, "c-1", false),
        )
        .await
        .unwrap();
    let a = next_ack(&mut acks).await;
    assert_eq!((a.id.0.as_str(), &a.state), ("c-1", &CommandState::Queued));
    cmd_client
        .publish(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            command_json(gw, "c-1", false),
        )
        .await
        .unwrap();
    let dup = next_ack(&mut acks).await;
    assert_eq!(
        (dup.id.0.as_str(), &dup.state),
        ("c-1", &CommandState::Queued)
    );

    let reply =
        common::coap_post(&meter, coap, 101, reading_frame(Decimal::new(123460, 2), 2)).await;
    assert_eq!(
        reply.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    let down = cjt188::parse(&reply.payload).expect("valve control frame in the reply");
    assert_eq!(down.address, ADDRESS);
    assert_eq!(down.di, cjt188::DI_VALVE);
    assert_eq!(down.payload, Payload::Valve { open: false });
    let a = next_ack(&mut acks).await;
    assert_eq!(a.state, CommandState::Sent);
    // The meter confirms with a valve reply (control 0x84).
    let valve_reply = cjt188::encode(&Cjt188Frame::valve_reply(
        0x10,
        ADDRESS,
        down.ser,
        cjt188::ST_VALVE_CLOSED,
    ));
    let reply = common::coap_post(&meter, coap, 102, valve_reply).await;
    assert_eq!(
        reply.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    assert!(
        reply.payload.is_empty(),
        "only one valve command was queued"
    );
    let a = next_ack(&mut acks).await;
    assert_eq!(
        (a.id.0.as_str(), &a.state),
        ("c-1", &CommandState::Acknowledged)
    );
    // Re-sent once more after completion: reported, never executed again.
    cmd_client
        .publish(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            command_json(gw, "c-1", false),
        )
        .await
        .unwrap();
    let a = next_ack(&mut acks).await;
    assert_eq!(a.state, CommandState::Acknowledged);
    let reply =
        common::coap_post(&meter, coap, 103, reading_frame(Decimal::new(123470, 2), 3)).await;
    assert!(
        reply.payload.is_empty(),
        "duplicate command must not be sent again"
    );

    // 3. A garbage frame is answered 4.00 and counted, never dropped silently.
    let reply = common::coap_post(&meter, coap, 104, vec![0x68, 0x10, 0x00]).await;
    assert_eq!(
        reply.header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );

    // 4. Metrics.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = http_get(gateway.metrics_addr(), "/metrics").await;
    assert!(
        text.contains("wm_gateway_frames_total{source=\"nbiot\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("wm_gateway_decode_errors_total{source=\"nbiot\""),
        "{text}"
    );
    assert!(
        text.contains("wm_gateway_commands_total{state=\"acknowledged\"} 1"),
        "{text}"
    );
    assert!(text.contains("wm_gateway_spool_depth 0"), "{text}");

    // 5. Clean shutdown publishes offline (retained).
    gateway.shutdown().await;
    let offline = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, p) = status.recv().await.unwrap();
            if String::from_utf8_lossy(&p).contains("\"offline\"") {
                return p;
            }
        }
    })
    .await
    .expect("offline status");
    assert!(!offline.is_empty());
}
