//! The attacks of issue 16 against a running gateway (real sockets, Mosquitto): a spoofed
//! NB-IoT uplink, a stolen command, a forged acknowledgement, a replayed push, a flood of
//! 60,000 CoAP requests. Slow HTTP clients and SIGTERM under trickling bodies run against the
//! gateway process in `edge_limits.rs`.

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading, Payload};
use decoders::envelope::{Envelope, Platform, encode_envelope};
use gateway::runtime::Gateway;
use model::auth::{Direction, open_uplink, seal_uplink};
use model::{CommandAck, CommandState, ReadingBatch};
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedReceiver;

const ADDRESS: [u8; 7] = [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78];
const METER: &str = "cjt188:78330011223344";
const KEY: [u8; 16] = *b"meter-key-0001!!";

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

async fn metrics(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("metrics in time")
        .unwrap();
    out
}

/// The value of one metric line (`name{labels}`), 0 if absent.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A gateway with an authenticated CoAP source (key file with METER's key) and a push source.
async fn secured_gateway(gw: &str, root: &str, dir: &std::path::Path, extra_coap: &str) -> Gateway {
    let keys = dir.join("nbiot-keys.toml");
    std::fs::write(&keys, format!("\"{METER}\" = \"{}\"\n", hex::encode(KEY))).unwrap();
    let toml = common::gateway_toml(
        gw,
        root,
        &dir.join("spool"),
        "partitions = 4\n",
        &format!(
            r#"[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:0"
key_file = "{keys}"
{extra_coap}
[[source]]
id = "platform"
kind = "http_push"
listen = "127.0.0.1:0"
secret = "{PUSH_SECRET}"
"#,
            keys = keys.display()
        ),
    );
    let config = edge_config::parse(&toml, "sec.toml".as_ref()).expect("config");
    Gateway::start(config).await.expect("gateway starts")
}

const PUSH_SECRET: &str = "0123456789abcdef-security";

fn status(p: &Packet) -> MessageClass {
    p.header.code
}

const CHANGED: MessageClass = MessageClass::Response(ResponseType::Changed);
const UNAUTHORIZED: MessageClass = MessageClass::Response(ResponseType::Unauthorized);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_uplink_stolen_command_and_forged_ack_are_refused() {
    let root = common::unique_prefix("sec-coap");
    let gw = "gw-sec";
    let (_s1, mut acks) = common::subscribe("sec-acks", &format!("{root}/{gw}/cmd-ack")).await;
    let (_s2, mut statuses) = common::subscribe("sec-status", &format!("{root}/{gw}/status")).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = secured_gateway(gw, &root, dir.path(), "").await;
    // Commands are subscribed once the control connection is up (it says `online` first).
    let (_, online) = tokio::time::timeout(Duration::from_secs(10), statuses.recv())
        .await
        .expect("status in time")
        .unwrap();
    assert!(String::from_utf8_lossy(&online).contains("\"online\""));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let coap = gateway.source_addr("nbiot").expect("bound");
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spooled = || gateway.spool().stats().next_seq;

    // A valve command for the meter waits in the queue.
    let (cmd_client, _rx) = common::subscribe("sec-cmd", &format!("{root}/unused")).await;
    let now = time::OffsetDateTime::now_utc();
    let fmt = |d: time::OffsetDateTime| {
        d.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let command = serde_json::json!({
        "v": 1, "id": "close-1", "gateway": gw, "device": METER,
        "action": {"type": "valve_close"}, "issued_by": "test",
        "issued_at": fmt(now), "expires_at": fmt(now + time::Duration::minutes(5))
    });
    cmd_client
        .publish(
            format!("{root}/{gw}/cmd/{METER}"),
            rumqttc::QoS::AtLeastOnce,
            false,
            command.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(next_ack(&mut acks).await.state, CommandState::Queued);

    // 1. Spoofed uplink: the plain frame (what any meter used to send), then one sealed under
    //    a wrong key. Both 4.01, nothing spooled, the command not released.
    let before = spooled();
    let plain = reading_frame(Decimal::new(999_999, 2), 1);
    let reply = common::coap_post(&attacker, coap, 1, plain.clone()).await;
    assert_eq!(status(&reply), UNAUTHORIZED);
    assert!(
        reply.payload.is_empty(),
        "no command for an unauthenticated peer"
    );
    let forged = seal_uplink(&[0u8; 16], Direction::Uplink, METER, u64::MAX, &plain);
    let reply = common::coap_post(&attacker, coap, 2, forged).await;
    assert_eq!(status(&reply), UNAUTHORIZED);
    assert!(reply.payload.is_empty());
    assert_eq!(spooled(), before, "nothing of a spoofed uplink is spooled");

    // 2. The real meter: its sealed uplink is spooled and the command comes back sealed under
    //    its key for that uplink's counter.
    let up = seal_uplink(
        &KEY,
        Direction::Uplink,
        METER,
        100,
        &reading_frame(Decimal::new(123_456, 2), 2),
    );
    let reply = common::coap_post(&meter, coap, 10, up.clone()).await;
    assert_eq!(status(&reply), CHANGED);
    assert!(spooled() > before);
    let (body, counter) =
        open_uplink(&KEY, Direction::Downlink, METER, &reply.payload).expect("sealed command");
    assert_eq!(counter, 100);
    let down = cjt188::parse(body).expect("valve frame");
    assert_eq!(down.payload, Payload::Valve { open: false });
    assert_eq!(next_ack(&mut acks).await.state, CommandState::Sent);

    // 3. Stolen command: replaying the meter's uplink from elsewhere processes nothing; the
    //    answer is the same sealed bytes, useless without the key; an older counter is refused.
    let at = spooled();
    let replay = common::coap_post(&attacker, coap, 11, up).await;
    assert_eq!(status(&replay), CHANGED);
    assert_eq!(replay.payload, reply.payload);
    let old = seal_uplink(
        &KEY,
        Direction::Uplink,
        METER,
        99,
        &reading_frame(Decimal::new(1, 0), 3),
    );
    let reply = common::coap_post(&attacker, coap, 12, old).await;
    assert_eq!(status(&reply), UNAUTHORIZED);
    assert_eq!(spooled(), at, "replays are not spooled again");

    // 4. Forged acknowledgement: a plain valve reply echoing the SER is refused, and the command
    //    stays `sent` (no ack published).
    let valve_reply = |ser: u8| {
        cjt188::encode(&Cjt188Frame::valve_reply(
            0x10,
            ADDRESS,
            ser,
            cjt188::ST_VALVE_CLOSED,
        ))
    };
    let reply = common::coap_post(&attacker, coap, 13, valve_reply(down.ser)).await;
    assert_eq!(status(&reply), UNAUTHORIZED);
    // Even sealed by the meter, a reply with another SER completes nothing.
    let wrong_ser = seal_uplink(
        &KEY,
        Direction::Uplink,
        METER,
        101,
        &valve_reply(down.ser.wrapping_add(1)),
    );
    assert_eq!(
        status(&common::coap_post(&meter, coap, 14, wrong_ser).await),
        CHANGED
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), acks.recv())
            .await
            .is_err(),
        "a forged or stale reply must not acknowledge the command"
    );
    // The meter's own reply acknowledges it.
    let real = seal_uplink(&KEY, Direction::Uplink, METER, 102, &valve_reply(down.ser));
    assert_eq!(
        status(&common::coap_post(&meter, coap, 15, real).await),
        CHANGED
    );
    let ack = next_ack(&mut acks).await;
    assert_eq!(
        (ack.id.0.as_str(), ack.state),
        ("close-1", CommandState::Acknowledged)
    );

    let text = metrics(gateway.metrics_addr()).await;
    for (reason, n) in [("unparsable", 2), ("bad_mac", 1), ("stale_counter", 1)] {
        assert_eq!(
            metric(
                &text,
                &format!(
                    "wm_gateway_security_refused_total{{listener=\"nbiot\",reason=\"{reason}\"}}"
                )
            ),
            n,
            "{reason}: {text}"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_push_is_refused_and_its_readings_keep_their_key() {
    let root = common::unique_prefix("sec-push");
    let (_s, mut batches) =
        common::subscribe("sec-push-readings", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = secured_gateway("gw-sec-push", &root, dir.path(), "").await;
    let http = gateway.source_addr("platform").expect("bound");
    // No platform receive time in the envelope: the reading used to take ours.
    let body = encode_envelope(
        Platform::Generic,
        &Envelope::new(
            Platform::Generic,
            "nb-1",
            reading_frame(Decimal::new(4242, 2), 1),
        ),
    );
    let signed_at = time::OffsetDateTime::now_utc().unix_timestamp() - 30;
    let nonce = "replay-test-nonce-0001";
    assert_eq!(
        common::signed_push_with_nonce(http, &body, signed_at, PUSH_SECRET, nonce).await,
        202
    );
    let seq = gateway.spool().stats().next_seq;
    // Replayed 1 s later within the skew: refused, nothing stored.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(
            common::signed_push_with_nonce(http, &body, signed_at, PUSH_SECRET, nonce).await,
            401
        );
    }
    assert_eq!(gateway.spool().stats().next_seq, seq);
    // The same body under a fresh nonce (what a replay after a restart looks like to the
    // gateway) is accepted but keeps the reading's key: timestamp = the signed time.
    assert_eq!(
        common::signed_push(http, &body, signed_at, PUSH_SECRET).await,
        202
    );
    let mut stamps = BTreeSet::new();
    while stamps.len() < 2 {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(10), batches.recv())
            .await
            .expect("batches in time")
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).unwrap();
        for e in batch.entries {
            if e.reading.quantity == model::Quantity::Volume {
                stamps.insert((
                    e.reading.ts.unix_timestamp(),
                    e.reading.provenance.received_at,
                ));
            }
        }
    }
    let keys: BTreeSet<i64> = stamps.iter().map(|(ts, _)| *ts).collect();
    assert_eq!(keys, BTreeSet::from([signed_at]), "{stamps:?}");
    let text = metrics(gateway.metrics_addr()).await;
    assert_eq!(
        metric(
            &text,
            "wm_gateway_security_refused_total{listener=\"platform\",reason=\"replay\"}"
        ),
        3,
        "{text}"
    );
    gateway.shutdown().await;
}

fn con_post(mid: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(vec![9]);
    p.add_option(CoapOption::UriPath, b"up".to_vec());
    p.payload = payload.to_vec();
    p.to_bytes().unwrap()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_flood_of_60000_requests_keeps_the_cache_bounded_and_the_meter_served() {
    const FLOOD: u32 = 60_000;
    const SOCKETS: u32 = 8;
    const WINDOW: u32 = 100;
    let root = common::unique_prefix("sec-flood");
    let dir = tempfile::tempdir().unwrap();
    let gateway = secured_gateway(
        "gw-sec-flood",
        &root,
        dir.path(),
        "exchange_cache_entries = 2000",
    )
    .await;
    let coap = gateway.source_addr("nbiot").expect("bound");
    let rss_before = resident_bytes();
    let started = Instant::now();
    // Distinct (peer, message id) pairs, each answered and cached: the cache used to keep
    // every one of them for 247 s.
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..SOCKETS {
        tasks.spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let junk = seal_uplink(&[1u8; 16], Direction::Uplink, METER, 1, b"junk");
            let mut answered = 0u32;
            let mut buf = [0u8; 256];
            let mut mid = 0u16;
            for _ in 0..FLOOD / SOCKETS / WINDOW {
                for _ in 0..WINDOW {
                    mid = mid.wrapping_add(1);
                    sock.send_to(&con_post(mid, &junk), coap).await.unwrap();
                }
                for _ in 0..WINDOW {
                    match tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf))
                        .await
                    {
                        Ok(Ok(_)) => answered += 1,
                        _ => break,
                    }
                }
            }
            let _ = s;
            answered
        });
    }
    let mut answered = 0;
    while let Some(n) = tasks.join_next().await {
        answered += n.unwrap();
    }
    let flood_time = started.elapsed();
    let rss_after = resident_bytes();
    // The meter is still served at once.
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let t = Instant::now();
    let up = seal_uplink(
        &KEY,
        Direction::Uplink,
        METER,
        7,
        &reading_frame(Decimal::new(1, 0), 1),
    );
    let reply = common::coap_post(&meter, coap, 1, up).await;
    let latency = t.elapsed();
    assert_eq!(status(&reply), CHANGED);
    let text = metrics(gateway.metrics_addr()).await;
    let entries = metric(
        &text,
        "wm_gateway_coap_exchange_cache_entries{listener=\"nbiot\"}",
    );
    let evicted = metric(
        &text,
        "wm_gateway_coap_exchange_cache_evicted_total{listener=\"nbiot\"}",
    );
    eprintln!(
        "flood: {answered} of {FLOOD} answered in {flood_time:?}; cache {entries} entries, \
         {evicted} evicted; RSS {} -> {} KiB; meter answered in {latency:?}",
        rss_before / 1024,
        rss_after / 1024
    );
    // Most datagrams are answered (the rest overflow the socket buffer on a busy machine).
    assert!(answered > FLOOD / 2, "{answered}");
    assert!(entries <= 2000, "{entries}");
    assert!(evicted >= u64::from(answered) - 2000, "{evicted}");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    // Bounded memory: 2,000 small entries, whatever the flood.
    assert!(
        rss_after.saturating_sub(rss_before) < 32 << 20,
        "RSS grew {} KiB",
        (rss_after - rss_before) / 1024
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wmbus_plaintext_or_fake_encrypted_telegrams_of_a_keyed_meter_are_refused() {
    use decoders::wmbus::encode::{WmbusMeter, telegram};
    use edge_config::wmbus::WmbusUdpSourceConfig;
    use gateway::{IngestSink, SourceContext};
    const WM_KEY: [u8; 16] = *b"wmbus-key-000001";
    let meter = |id| WmbusMeter {
        manufacturer: decoders::wmbus::manufacturer_from_code("KAM").unwrap(),
        id,
        version: 1,
        device_type: 0x07,
    };
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = WmbusUdpSourceConfig::new(addr.to_string());
    config
        .keys
        .insert("mbus:KAM22222222".into(), hex::encode(WM_KEY).into());
    let (sink, mut rx) = IngestSink::new(16);
    let (_cmd, commands) = tokio::sync::mpsc::channel(1);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ctx = SourceContext::new(
        model::GatewayId::new("gw-1").unwrap(),
        "wm",
        model::SourceKind::Wmbus,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    use gateway::sources::Source as _;
    // Bound by `build`: what is sent from here on is queued for the receiver.
    let source = gateway::sources::wmbus::WmbusSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &gateway::sources::SourceEnv::new("wm"),
    )
    .await
    .unwrap();
    let task = tokio::spawn(source.run(ctx));
    let radio = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let records = [0x0C, 0x13, 0x00, 0x70, 0x00, 0x00];
    let keyed = meter(0x2222_2222);
    let encrypted = telegram(&keyed, &records, 2, Some(WM_KEY));
    // Plaintext (mode 0) and a mode-5 header over plaintext, both for the keyed meter.
    let plain = telegram(&keyed, &records, 3, None);
    let mut fake = encrypted[..15].to_vec();
    let mut body = vec![0x2F, 0x2F];
    body.extend_from_slice(&records);
    body.resize(16, 0x2F);
    fake[11] = 4; // another access number, so the receiver's dedup does not hide it
    fake.extend_from_slice(&body);
    for t in [&plain, &fake] {
        radio.send_to(t, addr).await.unwrap();
    }
    // The meter's real telegram, and a plaintext one of a meter without a key, go through.
    radio.send_to(&encrypted, addr).await.unwrap();
    radio
        .send_to(&telegram(&meter(0x3333_3333), &records, 5, None), addr)
        .await
        .unwrap();
    // The receiver batches what waits in the socket, so both may come in one submit.
    let mut meters = std::collections::BTreeSet::new();
    while meters.len() < 2 {
        let req = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("accepted telegrams in time")
            .unwrap();
        meters.extend(req.readings.iter().map(|r| r.meter.to_string()));
        req.done.send(Ok(())).ok();
    }
    assert_eq!(
        meters.into_iter().collect::<Vec<_>>(),
        ["mbus:KAM22222222", "mbus:KAM33333333"]
    );
    let mut text = String::new();
    sink.counters().render_prometheus(&mut text);
    assert!(
        text.contains(
            "wm_gateway_decode_errors_total{source=\"wm\",kind=\"security_downgrade\"} 2"
        ),
        "{text}"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
