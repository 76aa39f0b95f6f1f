//! The `gateway` binary as a process: kill -9 loses no acknowledged reading, SIGHUP reloads
//! sources.

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
use model::ReadingBatch;
use rust_decimal::Decimal;
use tokio::net::UdpSocket;

struct Gw(Child);

impl Drop for Gw {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn spawn(config: &Path) -> Gw {
    Gw(Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start gateway"))
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &Path, root: &str, broker: &str, coap_port: u16) -> String {
    format!(
        r#"gateway_id = "gw-proc"
[uplink]
broker = "{broker}"
keep_alive_s = 1
client_id = "{cid}"
topic_root = "{root}"
[spool]
dir = "{spool}"
[metrics]
listen = "127.0.0.1:0"
[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:{coap_port}"
auth = "none"
"#,
        cid = root.replace('/', "-"),
        spool = dir.join("spool").display()
    )
}

fn frame(n: u32) -> Vec<u8> {
    let reading = Cjt188Reading {
        current_m3: Decimal::new(i64::from(n), 2),
        settlement_m3: Decimal::new(1, 0),
        unit: cjt188::UNIT_M3,
        clock: time::macros::datetime!(2026-11-24 18:00:00),
        status: 0,
    };
    let address = [0x99, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
    cjt188::encode(&Cjt188Frame::read_data_reply(0x10, address, 1, &reading))
}

/// POSTs a frame; `None` when nothing answers within `wait`.
async fn post(
    sock: &UdpSocket,
    to: SocketAddr,
    mid: u16,
    payload: Vec<u8>,
    wait: Duration,
) -> Option<Packet> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.add_option(CoapOption::UriPath, b"up".to_vec());
    p.payload = payload;
    sock.send_to(&p.to_bytes().unwrap(), to).await.ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        let reply = Packet::from_bytes(&buf[..n]).ok()?;
        if reply.header.message_id == mid {
            return Some(reply);
        }
    }
}

/// Retries until the gateway answers (it is starting up).
async fn post_ready(sock: &UdpSocket, to: SocketAddr, mid: u16, payload: Vec<u8>) -> Packet {
    for _ in 0..100 {
        if let Some(r) = post(sock, to, mid, payload.clone(), Duration::from_millis(200)).await {
            return r;
        }
    }
    panic!("gateway at {to} never answered");
}

async fn collect_values(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    want: &BTreeSet<Decimal>,
) -> BTreeSet<Decimal> {
    let mut got = BTreeSet::new();
    // On timeout the caller's assertion reports what is missing.
    let _timed_out = tokio::time::timeout(Duration::from_secs(30), async {
        while !want.is_subset(&got) {
            let Some((_, p)) = rx.recv().await else { break };
            let b: ReadingBatch = serde_json::from_slice(&p).unwrap();
            for e in b.entries {
                if e.reading.quantity == model::Quantity::Volume {
                    got.insert(e.reading.value);
                }
            }
        }
    })
    .await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_reading() {
    let root = common::unique_prefix("kill9");
    let (_s, mut batches) = common::subscribe("kill9-sub", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let port = free_udp_port();
    let coap: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // First life: the broker is unreachable, so acknowledged readings exist only in the spool.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    std::fs::write(
        &path,
        config(
            dir.path(),
            &root,
            &format!("mqtt://127.0.0.1:{dead_port}"),
            port,
        ),
    )
    .unwrap();
    let mut gw = spawn(&path);
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut acked = BTreeSet::new();
    let first = post_ready(&meter, coap, 1, frame(1)).await;
    assert_eq!(
        first.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    acked.insert(Decimal::new(1, 2));
    for n in 2..=150u32 {
        let r = post(&meter, coap, n as u16, frame(n), Duration::from_secs(5))
            .await
            .expect("reply");
        assert_eq!(r.header.code, MessageClass::Response(ResponseType::Changed));
        acked.insert(Decimal::new(i64::from(n), 2));
    }
    // SIGKILL right after the last acknowledgement.
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    drop(gw);
    // Second life with the real broker: every acknowledged reading is published.
    let b = common::broker();
    std::fs::write(
        &path,
        config(
            dir.path(),
            &root,
            &format!("mqtt://{}:{}", b.host, b.port),
            port,
        ),
    )
    .unwrap();
    let _gw = spawn(&path);
    let got = collect_values(&mut batches, &acked).await;
    let missing: Vec<_> = acked.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged readings lost: {missing:?}",
        missing.len()
    );
    assert_eq!(acked.len(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_online_and_the_last_will_says_offline_after_kill_9() {
    let root = common::unique_prefix("lwt");
    let (_s, mut status) = common::subscribe("lwt-sub", &format!("{root}/gw-proc/status")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let b = common::broker();
    let port = free_udp_port();
    std::fs::write(
        &path,
        config(
            dir.path(),
            &root,
            &format!("mqtt://{}:{}", b.host, b.port),
            port,
        ),
    )
    .unwrap();
    let mut gw = spawn(&path);
    let state = |p: &[u8]| -> String {
        let v: serde_json::Value = serde_json::from_slice(p).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["gateway"], "gw-proc");
        v["state"].as_str().unwrap().to_owned()
    };
    let (_, p) = tokio::time::timeout(Duration::from_secs(15), status.recv())
        .await
        .expect("online")
        .unwrap();
    assert_eq!(state(&p), "online");
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    // keep_alive_s = 1: the broker gives up after about 1.5 s and publishes the will. The
    // gateway re-publishes `online` with its health periodically, so one of those may still be
    // on its way when the process dies.
    let offline = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let (_, p) = status.recv().await.unwrap();
            let s = state(&p);
            if s != "online" {
                return s;
            }
        }
    })
    .await
    .expect("last will");
    assert_eq!(offline, "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_changed_source() {
    let root = common::unique_prefix("hup");
    let (_s, mut batches) = common::subscribe("hup-sub", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.toml");
    let b = common::broker();
    let broker = format!("mqtt://{}:{}", b.host, b.port);
    let (p1, p2) = (free_udp_port(), free_udp_port());
    let a1: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let a2: SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    std::fs::write(&path, config(dir.path(), &root, &broker, p1)).unwrap();
    let gw = spawn(&path);
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    post_ready(&meter, a1, 1, frame(501)).await;
    // A broken file is refused on SIGHUP and the running configuration kept.
    std::fs::write(&path, "gateway_id = 5\n").unwrap();
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    hup(gw.0.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        post(&meter, a1, 2, frame(502), Duration::from_secs(2))
            .await
            .is_some(),
        "still serving after a bad reload"
    );
    // Move the CoAP source to another port.
    std::fs::write(&path, config(dir.path(), &root, &broker, p2)).unwrap();
    hup(gw.0.id());
    let r = post_ready(&meter, a2, 3, frame(503)).await;
    assert_eq!(r.header.code, MessageClass::Response(ResponseType::Changed));
    assert!(
        post(&meter, a1, 4, frame(504), Duration::from_millis(500))
            .await
            .is_none(),
        "old port closed"
    );
    let want: BTreeSet<Decimal> = [501, 502, 503]
        .into_iter()
        .map(|n| Decimal::new(n, 2))
        .collect();
    let got = collect_values(&mut batches, &want).await;
    assert!(want.is_subset(&got), "{got:?}");
}
