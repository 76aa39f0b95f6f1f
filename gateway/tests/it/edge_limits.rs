//! Resource limits of the `gateway` process under a descriptor limit of 256 (issue 16):
//! 300 slow HTTP clients neither starve the CoAP source nor `/metrics`, and SIGTERM stops the
//! gateway within seconds while clients trickle request bodies.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coap_lite::{MessageClass, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

struct Gw(Child);

impl Drop for Gw {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// Starts the gateway binary with `ulimit -n 256`.
fn spawn_limited(config: &Path) -> Gw {
    Gw(Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" run --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_gateway"))
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start gateway"))
}

async fn get_metrics(addr: SocketAddr) -> Option<String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.starts_with("HTTP/1.1 200").then_some(out)
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn frame(n: u32) -> Vec<u8> {
    let reading = Cjt188Reading {
        current_m3: Decimal::new(i64::from(n), 2),
        settlement_m3: Decimal::ZERO,
        unit: cjt188::UNIT_M3,
        clock: time::macros::datetime!(2026-11-24 18:43:00),
        status: 0,
    };
    let address = [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78];
    cjt188::encode(&Cjt188Frame::read_data_reply(0x10, address, 1, &reading))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_neither_starve_coap_nor_metrics_and_sigterm_stops_within_seconds() {
    let root = common::unique_prefix("edge-limits");
    let dir = tempfile::tempdir().unwrap();
    let (coap_port, push_port, metrics_port) =
        (free_port(true), free_port(false), free_port(false));
    let sources = format!(
        r#"[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:{coap_port}"
auth = "none"
[[source]]
id = "platform"
kind = "http_push"
listen = "127.0.0.1:{push_port}"
secret = "0123456789abcdef-limits"
header_timeout_s = 3
body_timeout_s = 60
"#
    );
    let toml = common::gateway_toml("gw-limits", &root, &dir.path().join("spool"), "", &sources)
        .replace(
            "listen = \"127.0.0.1:0\"\n[[source]]",
            &format!("listen = \"127.0.0.1:{metrics_port}\"\n[[source]]"),
        );
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, toml).unwrap();
    let mut gw = spawn_limited(&path);
    let pid = gw.0.id();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let push: SocketAddr = format!("127.0.0.1:{push_port}").parse().unwrap();
    let coap: SocketAddr = format!("127.0.0.1:{coap_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while get_metrics(metrics_addr).await.is_none() {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 300 slow clients: each sends half a request line and then a byte now and then.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(push).await.unwrap();
        s.write_all(b"POST /v1/push HTTP/1.1\r\nX-Slow: ")
            .await
            .ok();
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for s in &mut slow {
                s.write_all(b"a").await.ok();
            }
        }
        slow
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_under_attack = open_fds(pid);

    // CoAP is served: 20 uplinks, each answered 2.04.
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut worst = Duration::ZERO;
    for n in 0..20u16 {
        let t = Instant::now();
        let reply = common::coap_post(&meter, coap, 100 + n, frame(u32::from(n))).await;
        worst = worst.max(t.elapsed());
        assert_eq!(
            reply.header.code,
            MessageClass::Response(ResponseType::Changed),
            "uplink {n}"
        );
    }
    // `/metrics` is reachable and shows the refusals.
    let text = get_metrics(metrics_addr)
        .await
        .expect("metrics reachable under attack");
    let refused = metric(
        &text,
        "wm_gateway_listener_refused_full_total{listener=\"platform\"}",
    );
    let open = metric(
        &text,
        "wm_gateway_listener_connections_open{listener=\"platform\"}",
    );
    eprintln!(
        "300 slow clients: {open} held, {refused} refused, gateway fds {fds_under_attack}, \
         slowest CoAP answer {worst:?}"
    );
    assert!(fds_under_attack < 256, "{fds_under_attack} descriptors");
    assert!(
        open <= 112 && refused >= 300 - 112,
        "{open} open, {refused} refused"
    );
    assert!(worst < Duration::from_secs(1), "{worst:?}");

    // The header timeout (3 s) closes the held ones, trickling or not.
    let mut slow = trickle.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 256];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    drop(slow);
    assert_eq!(closed, 300, "every slow client is answered or closed");
    let text = get_metrics(metrics_addr).await.expect("metrics");
    assert_eq!(
        metric(
            &text,
            "wm_gateway_listener_connections_open{listener=\"platform\"}"
        ),
        0,
        "{text}"
    );

    // SIGTERM while 50 clients trickle bodies (body timeout 60 s): the gateway stops within
    // seconds (it used to wait for them).
    let mut trickling = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(push).await.unwrap();
        s.write_all(
            b"POST /v1/push HTTP/1.1\r\nHost: x\r\nX-Timestamp: 1\r\nContent-Length: 100000\r\n\r\n{",
        )
        .await
        .unwrap();
        trickling.push(s);
    }
    let keep = tokio::spawn(async move {
        loop {
            for s in &mut trickling {
                s.write_all(b" ").await.ok();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = loop {
        if let Some(s) = gw.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gateway still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stop = t.elapsed();
    keep.abort();
    eprintln!("SIGTERM with 50 trickling bodies: exited {status} after {stop:?}");
    assert!(status.success(), "{status}");
    assert!(stop < Duration::from_secs(5), "{stop:?}");
}
