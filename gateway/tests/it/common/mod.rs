//! Helpers shared by the gateway's integration tests (real Mosquitto on `MQTT_URL`).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gateway::mqtt::MqttEndpoint;
use model::Reading;
use rumqttc::{AsyncClient, QoS};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The test broker (env `MQTT_URL`, default local Mosquitto).
pub fn broker() -> MqttEndpoint {
    MqttEndpoint::parse(&testkit::mqtt::broker().to_string()).expect("MQTT_URL")
}

/// A topic root no other test uses.
pub fn unique_prefix(name: &str) -> String {
    testkit::names::unique_prefix(name)
}

/// A volume reading of `meter` with value `value`/1000 m³.
pub fn reading(meter: &str, value: i64) -> Reading {
    testkit::reading(meter).milli(value).build()
}

/// Subscribes to `filter` and forwards every (topic, payload) received; returns once SUBACKed.
pub async fn subscribe(
    name: &str,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let s = testkit::mqtt::subscribe(name, &[filter]).await;
    (s.client, s.rx)
}

/// A TCP proxy in front of the broker that can cut every connection and refuse new ones.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let b = broker();
        let (up2, conns2) = (Arc::clone(&up), Arc::clone(&conns));
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = format!("{}:{}", b.host, b.port);
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                            .await
                            .ok();
                    }
                });
                conns2.lock().unwrap().push(h);
            }
        });
        Proxy { port, up, conns }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> MqttEndpoint {
        MqttEndpoint::parse(&format!("mqtt://127.0.0.1:{}", self.port)).unwrap()
    }
}

/// A gateway whose only source is a hydrant bridge on the test broker (`{site}/<hydrant>/…`).
pub fn hydrant_gateway(
    gw: &str,
    root: &str,
    site: &str,
    spool: &std::path::Path,
) -> edge_config::GatewayConfig {
    let b = broker();
    let sources = format!(
        r#"[[source]]
id = "hydrants"
kind = "hydrant_mqtt"
host = "{host}"
port = {port}
client_id = "{cid}-hyd"
topic_prefix = "{site}"
ack_timeout = "5s"
"#,
        host = b.host,
        port = b.port,
        cid = client_id(root),
    );
    let toml = gateway_toml(gw, root, spool, "", &sources);
    edge_config::parse(&toml, "s.toml".as_ref()).unwrap()
}

/// The uplink client id of a test's gateway: its topic root without slashes.
pub fn client_id(root: &str) -> String {
    root.replace('/', "-")
}

/// A gateway TOML file: `gateway_id`, an `[uplink]` to the test broker on `root` (plus the
/// lines of `uplink_extra`), the spool in `spool`, metrics on an ephemeral port, then `sources`.
/// No pipeline runs in these tests, so the broker's PUBACK acknowledges (`ack_timeout_s = 0`).
pub fn gateway_toml(
    gw: &str,
    root: &str,
    spool: &std::path::Path,
    uplink_extra: &str,
    sources: &str,
) -> String {
    let b = broker();
    format!(
        r#"gateway_id = "{gw}"
[uplink]
broker = "mqtt://{host}:{port}"
client_id = "{cid}"
topic_root = "{root}"
ack_timeout_s = 0
{uplink_extra}[spool]
dir = "{spool}"
[metrics]
listen = "127.0.0.1:0"
{sources}"#,
        host = b.host,
        port = b.port,
        cid = client_id(root),
        spool = spool.display(),
    )
}

/// Plays the hydrant `h1` of `site` for one command: waits up to `within` for it on its cmd
/// topic, checks it is the unlock `command_id`, and answers `ok` on its ack topic.
pub async fn hydrant_unlocks(
    hydrant: &AsyncClient,
    cmds: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    site: &str,
    command_id: &str,
    within: Duration,
) {
    let (_, body) = tokio::time::timeout(within, cmds.recv())
        .await
        .unwrap_or_else(|_| panic!("the hydrant gets command {command_id}"))
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["command_id"], command_id);
    assert_eq!(body["action"], "unlock");
    hydrant
        .publish(
            format!("{site}/h1/ack"),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"command_id":"{command_id}","result":"ok","reason":null}}"#),
        )
        .await
        .unwrap();
}

/// Sends a confirmable CoAP POST `/up` and returns the piggy-backed reply (asserted to be its ACK).
pub async fn coap_post(
    sock: &tokio::net::UdpSocket,
    to: std::net::SocketAddr,
    mid: u16,
    payload: Vec<u8>,
) -> coap_lite::Packet {
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(vec![1, 2, 3, 4]);
    p.add_option(CoapOption::UriPath, b"up".to_vec());
    p.payload = payload;
    sock.send_to(&p.to_bytes().unwrap(), to).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .expect("CoAP reply in time")
        .unwrap();
    let reply = Packet::from_bytes(&buf[..n]).unwrap();
    assert_eq!(reply.header.message_id, mid);
    assert_eq!(reply.header.get_type(), MessageType::Acknowledgement);
    reply
}

/// A nonce no other push of this process uses.
pub fn fresh_nonce() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("t-{}-{n}-{nanos}", std::process::id())
}

/// POSTs `body` to the HTTP push endpoint signed over the canonical request
/// (`model::auth::sign_request`) with a fresh nonce; returns the HTTP status.
pub async fn signed_push(addr: std::net::SocketAddr, body: &[u8], ts: i64, secret: &str) -> u16 {
    signed_push_with_nonce(addr, body, ts, secret, &fresh_nonce()).await
}

/// [`signed_push`] with a given nonce (replay tests).
pub async fn signed_push_with_nonce(
    addr: std::net::SocketAddr,
    body: &[u8],
    ts: i64,
    secret: &str,
    nonce: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sig = model::auth::sign_request(secret.as_bytes(), "POST", "/v1/push", ts, nonce, body);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/push HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Timestamp: {ts}\r\nX-Nonce: {nonce}\r\nX-Signature: {sig}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split(' ').nth(1).unwrap().parse().unwrap()
}

/// A Kamstrup water meter (`KAM`, version 1, type 0x07) with serial `id`, for wM-Bus telegrams.
pub fn kam_meter(id: u32) -> decoders::wmbus::encode::WmbusMeter {
    decoders::wmbus::encode::WmbusMeter {
        manufacturer: decoders::wmbus::manufacturer_from_code("KAM").unwrap(),
        id,
        version: 1,
        device_type: 0x07,
    }
}

/// Volume record `0C 13` (8 BCD digits, litres).
pub fn volume_record(litres: u32) -> Vec<u8> {
    let s = format!("{litres:08}");
    let d: Vec<u8> = s.bytes().map(|b| b - b'0').collect();
    vec![
        0x0C,
        0x13,
        (d[6] << 4) | d[7],
        (d[4] << 4) | d[5],
        (d[2] << 4) | d[3],
        (d[0] << 4) | d[1],
    ]
}
