//! The fleet's transports really send: a test socket plays the gateway, receives the CoAP
//! datagrams, HTTP pushes and wM-Bus telegrams, and decodes them with `decoders`.

use std::collections::HashMap;
use std::time::Duration;

use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Payload};
use decoders::{RecordValue, wmbus};
use rust_decimal::Decimal;
use simulators::engine::{Engine, Population};
use simulators::fleet::{CoapConfig, Fleet, FleetConfig, HttpPushConfig, NbiotUplink, WmbusConfig};
use simulators::frames::{m3_2dp, wmbus_key};
use simulators::nbiot::push_signature;
use simulators::scenario::Scenario;
use time::macros::datetime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

fn scenario() -> Scenario {
    let mut s = Scenario::plain(12, 1, 21, datetime!(2026-11-01 0:00 UTC));
    s.fleet.mbus_meters = 4;
    s
}

/// Expected CJ/T 188 register per (meter id, step) from an independent engine run.
fn expected(s: &Scenario, steps: u64) -> HashMap<(String, i64), Decimal> {
    let mut engine = Engine::new(s.clone());
    let ids: Vec<String> = engine
        .population()
        .meters
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    let mut out = HashMap::new();
    for _ in 0..steps {
        engine.step(|e| {
            out.insert((ids[e.meter as usize].clone(), e.ts), m3_2dp(e.register_ml));
        });
    }
    out
}

fn volume(frame: &decoders::DecodedFrame) -> Decimal {
    frame
        .records
        .iter()
        .find_map(|r| match (&r.value, r.quantity.as_ref(), r.storage) {
            (RecordValue::Number(n), "volume", 0) => Some(*n),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn coap_meters_post_readings_and_execute_a_queued_valve_command() {
    let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let s = scenario();
    let mut config = FleetConfig::new(s.clone());
    config.step_every = Duration::ZERO;
    config.max_steps = Some(2);
    config.coap = Some(CoapConfig {
        gateway: gw.local_addr().unwrap(),
        meters: 3,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let want = expected(&s, 2);
    let pop = Population::new(&s);
    let close_target = pop.meters[1].id.to_string();
    let mut buf = vec![0u8; 2048];
    let mut readings = Vec::new();
    let mut valve_reply = None;
    let mut sent_close = false;
    // 3 meters × 2 steps + 1 valve reply.
    while readings.len() < 6 || valve_reply.is_none() {
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), gw.recv_from(&mut buf))
            .await
            .expect("a coap datagram within 10 s")
            .unwrap();
        let req = Packet::from_bytes(&buf[..n]).unwrap();
        assert_eq!(req.header.get_type(), MessageType::Confirmable);
        assert_eq!(
            req.get_first_option(coap_lite::CoapOption::UriPath)
                .unwrap(),
            b"up"
        );
        let frame = cjt188::parse(&req.payload).unwrap();
        let mut resp = changed_ack(&req);
        if frame.control == 0x84 {
            valve_reply = Some(frame);
        } else {
            let decoded = cjt188::decode(&req.payload).unwrap();
            let id = format!("cjt188:{}", decoded.meter.id);
            readings.push((id.clone(), volume(&decoded)));
            if id == close_target && !sent_close {
                resp.payload =
                    cjt188::encode(&Cjt188Frame::valve_control(0x10, frame.address, 5, false));
                sent_close = true;
            }
        }
        gw.send_to(&resp.to_bytes().unwrap(), from).await.unwrap();
    }
    fleet.wait_finished().await;
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.coap_uplinks, 6);
    assert_eq!(counts.coap_valve_commands, 1);
    assert_eq!(counts.coap_valve_replies, 1);
    let reply = valve_reply.unwrap();
    assert_eq!(reply.ser, 5);
    assert_eq!(reply.payload, Payload::Status(0x0001), "valve closed bit");
    for (id, v) in &readings {
        assert!(
            want.iter().any(|((wid, _), wv)| wid == id && wv == v),
            "{id} {v} not produced by the model"
        );
    }
}

#[tokio::test]
async fn http_pushes_are_signed_envelopes_around_cjt188_frames() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = scenario();
    let mut config = FleetConfig::new(s.clone());
    config.step_every = Duration::ZERO;
    config.max_steps = Some(1);
    config.http_push = Some(HttpPushConfig {
        gateway: listener.local_addr().unwrap(),
        path: "/v1/push".into(),
        secret: "s3cret".into(),
        platform: decoders::envelope::Platform::Generic,
        meters: 2,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let want = expected(&s, 1);
    for _ in 0..2 {
        let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let (head, body) = loop {
            let n = conn.read(&mut buf).await.unwrap();
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw).to_string();
            if let Some(split) = text.find("\r\n\r\n") {
                let head = text[..split].to_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if raw.len() >= split + 4 + len {
                    break (head, raw[split + 4..split + 4 + len].to_vec());
                }
            }
            assert!(n > 0, "connection closed early");
        };
        assert!(head.starts_with("POST /v1/push HTTP/1.1"));
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap()
                .to_owned()
        };
        let ts: i64 = header("X-Timestamp").parse().unwrap();
        let nonce = header("X-Nonce");
        assert_eq!(
            header("X-Signature"),
            push_signature(b"s3cret", "/v1/push", ts, &nonce, &body)
        );
        let env = decoders::envelope::decode_envelope(&body).unwrap();
        let decoded = cjt188::decode(&env.payload).unwrap();
        let id = format!("cjt188:{}", decoded.meter.id);
        assert_eq!(
            Some(&volume(&decoded)),
            want.get(&(id, datetime!(2026-11-01 01:00 UTC).unix_timestamp()))
        );
        conn.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
    }
    fleet.wait_finished().await;
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.http_pushes, 2);
}

#[tokio::test]
async fn wmbus_telegrams_arrive_as_udp_datagrams_and_decrypt() {
    let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let s = scenario();
    let mut config = FleetConfig::new(s.clone());
    config.step_every = Duration::ZERO;
    config.max_steps = Some(3);
    config.wmbus = Some(WmbusConfig {
        gateway: gw.local_addr().unwrap(),
        meters: 4,
        encrypted: true,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let pop = Population::new(&s);
    let keys: HashMap<String, [u8; 16]> = (8..12u32)
        .map(|i| (pop.meters[i as usize].id.to_string(), wmbus_key(s.seed, i)))
        .collect();
    let mut engine = Engine::new(s.clone());
    let mut litres = HashMap::new();
    for _ in 0..3 {
        engine.step(|e| {
            litres.insert(
                (pop.meters[e.meter as usize].id.to_string(), e.ts),
                Decimal::from(e.register_ml / 1000) / Decimal::from(1000),
            );
        });
    }
    let mut cache = wmbus::FormatCache::default();
    let mut buf = vec![0u8; 512];
    for _ in 0..12 {
        let n = tokio::time::timeout(Duration::from_secs(10), gw.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let tg = &buf[..n];
        assert_eq!(
            usize::from(tg[0]) + 1,
            n,
            "starts with the L field, no CRCs"
        );
        let frame = wmbus::decode(tg, &keys, &mut cache).unwrap();
        let id = format!("mbus:SIM{}", frame.meter.id);
        assert!(keys.contains_key(&id), "{id}");
        let v = volume(&frame);
        assert!(litres.iter().any(|((m, _), l)| *m == id && *l == v));
    }
    let counts = fleet.wait_finished().await;
    assert_eq!(counts.wmbus_telegrams, 12);
    fleet.stop().await.unwrap();
}

#[tokio::test]
async fn nbiot_meters_report_at_their_own_interval() {
    let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut config = FleetConfig::new(scenario());
    config.step_every = Duration::ZERO;
    config.max_steps = Some(8);
    config.nbiot_report_every = 4;
    config.coap = Some(CoapConfig {
        gateway: gw.local_addr().unwrap(),
        meters: 3,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let responder = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut per_meter: HashMap<String, u32> = HashMap::new();
        for _ in 0..6 {
            let (n, from) = gw.recv_from(&mut buf).await.unwrap();
            let req = Packet::from_bytes(&buf[..n]).unwrap();
            let id = cjt188::decode(&req.payload).unwrap().meter.id.to_string();
            *per_meter.entry(id).or_default() += 1;
            let resp = changed_ack(&req);
            gw.send_to(&resp.to_bytes().unwrap(), from).await.unwrap();
        }
        per_meter
    });
    let counts = tokio::time::timeout(Duration::from_secs(20), fleet.wait_finished())
        .await
        .unwrap();
    // 8 steps, every 4th step per meter: 2 uplinks each.
    assert_eq!(counts.coap_uplinks, 6);
    let per_meter = responder.await.unwrap();
    assert_eq!(per_meter.len(), 3);
    assert!(per_meter.values().all(|n| *n == 2));
    fleet.stop().await.unwrap();
}

/// The gateway's piggy-backed 2.04 Changed ACK to a confirmable request (no payload yet).
fn changed_ack(req: &Packet) -> Packet {
    let mut resp = Packet::new();
    resp.header.set_type(MessageType::Acknowledgement);
    resp.header.message_id = req.header.message_id;
    resp.header.code = MessageClass::Response(ResponseType::Changed);
    resp.set_token(req.get_token().to_vec());
    resp
}

/// Responds 2.04 to one CoAP request (with `downlink` as payload) and returns its payload.
async fn answer(gw: &UdpSocket, downlink: Vec<u8>) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), gw.recv_from(&mut buf))
        .await
        .expect("a coap datagram within 10 s")
        .unwrap();
    let req = Packet::from_bytes(&buf[..n]).unwrap();
    let mut resp = changed_ack(&req);
    resp.payload = downlink;
    gw.send_to(&resp.to_bytes().unwrap(), from).await.unwrap();
    req.payload
}

#[tokio::test]
async fn daily_meter_uplink_carries_24_hourly_readings() {
    let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let s = scenario();
    let mut config = FleetConfig::new(s.clone());
    config.step_every = Duration::ZERO;
    // Meter 0 sends its daily uplink at step 24: the readings of steps 1..=24.
    config.max_steps = Some(24);
    config.nbiot_uplink = NbiotUplink::Daily;
    config.coap = Some(CoapConfig {
        gateway: gw.local_addr().unwrap(),
        meters: 1,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let payload = answer(&gw, Vec::new()).await;
    let counts = tokio::time::timeout(Duration::from_secs(20), fleet.wait_finished())
        .await
        .unwrap();
    fleet.stop().await.unwrap();
    assert_eq!((counts.coap_uplinks, counts.nbiot_frames), (1, 24));

    let frames = cjt188::parse_concatenated(&payload).unwrap();
    assert_eq!(frames.len(), 24);
    let mut clocks = Vec::new();
    let mut volumes = Vec::new();
    for (frame, range) in &frames {
        let decoded = cjt188::decode(&payload[range.clone()]).unwrap();
        assert_eq!(decoded.meter.id, "78330000000000");
        let Payload::Reading(r) = &frame.payload else {
            panic!("not a 901F reply: {frame:?}")
        };
        clocks.push(r.clock);
        volumes.push(volume(&decoded));
    }
    for pair in clocks.windows(2) {
        assert_eq!(pair[1] - pair[0], time::Duration::hours(1), "{clocks:?}");
    }
    assert!(volumes.windows(2).all(|p| p[0] <= p[1]), "{volumes:?}");
    // The same registers as an independent engine run, hour by hour.
    let want = expected(&s, 24);
    let mut model: Vec<(i64, Decimal)> = want
        .iter()
        .filter(|((id, _), _)| id == "cjt188:78330000000000")
        .map(|((_, ts), v)| (*ts, *v))
        .collect();
    model.sort();
    assert_eq!(
        model.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        volumes
    );
}

#[tokio::test]
async fn meter_without_valve_refuses_a_valve_command_with_the_abnormal_reply() {
    let gw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut config = FleetConfig::new(scenario());
    config.step_every = Duration::ZERO;
    config.max_steps = Some(2);
    config.nbiot_without_valve = [1].into();
    config.coap = Some(CoapConfig {
        gateway: gw.local_addr().unwrap(),
        meters: 2,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let mut refusal = None;
    let mut statuses: HashMap<[u8; 7], Vec<u16>> = HashMap::new();
    let mut sent = false;
    // 2 meters × 2 steps + 1 refusal.
    for _ in 0..5 {
        let mut buf = vec![0u8; 4096];
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), gw.recv_from(&mut buf))
            .await
            .expect("a coap datagram within 10 s")
            .unwrap();
        let req = Packet::from_bytes(&buf[..n]).unwrap();
        let frame = cjt188::parse(&req.payload).unwrap();
        let mut resp = changed_ack(&req);
        match &frame.payload {
            Payload::Reading(r) => {
                statuses.entry(frame.address).or_default().push(r.status);
                if frame.address == simulators::engine::cjt188_address(1) && !sent {
                    resp.payload =
                        cjt188::encode(&Cjt188Frame::valve_control(0x10, frame.address, 7, false));
                    sent = true;
                }
            }
            _ => refusal = Some(frame),
        }
        gw.send_to(&resp.to_bytes().unwrap(), from).await.unwrap();
    }
    fleet.wait_finished().await;
    let counts = fleet.stop().await.unwrap();
    assert_eq!(
        (counts.coap_valve_commands, counts.coap_valve_refused),
        (0, 1)
    );
    let refusal = refusal.expect("the meter answered the command");
    assert!(refusal.is_reply() && refusal.is_abnormal(), "{refusal:?}");
    assert_eq!(
        (refusal.control, refusal.di, refusal.ser),
        (0xC4, cjt188::DI_VALVE, 7)
    );
    assert_eq!(refusal.payload, Payload::Status(0), "valve still open");
    // The valve stayed open: no closed bit in the meter's next reading.
    let st = &statuses[&simulators::engine::cjt188_address(1)];
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|s| s & 0x0001 == 0), "{st:?}");
}
