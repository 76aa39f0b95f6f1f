//! A daily NB-IoT uplink carries 24 hourly CJ/T 188 901F replies back to back: over real UDP
//! the gateway's CoAP source spools every one of them before its 2.04, and a payload with one
//! bad frame is refused whole (4.00, counted) with nothing spooled. The same over HTTP push.

use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{MessageClass, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Cjt188Reading};
use decoders::envelope::{Envelope, Platform, encode_envelope};
use gateway::runtime::Gateway;
use model::{ClockSource, Quantity, ReadingBatch};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

const ADDRESS: [u8; 7] = [0x07, 0x00, 0x00, 0x00, 0x00, 0x33, 0x78];
const METER: &str = "cjt188:78330000000007";

/// 24 hourly read-data replies of one meter (local clock 2026-11-24 00:00 … 23:00), the
/// register growing 0.25 m³ an hour from 100 m³.
fn day_of_frames() -> Vec<u8> {
    let mut out = Vec::new();
    for hour in 0..24u8 {
        let reading = Cjt188Reading {
            current_m3: Decimal::new(10_000 + 25 * i64::from(hour), 2),
            settlement_m3: Decimal::new(100, 0),
            unit: cjt188::UNIT_M3,
            clock: time::macros::datetime!(2026-11-24 00:00:00)
                + time::Duration::hours(hour.into()),
            status: 0,
        };
        out.extend(cjt188::encode(&Cjt188Frame::read_data_reply(
            0x10, ADDRESS, hour, &reading,
        )));
    }
    out
}

async fn metrics(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_frame_coap_uplink_spools_every_reading_or_none() {
    let root = common::unique_prefix("history");
    let gw = "gw-history";
    let (_s, mut batches) = common::subscribe("hist-readings", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = common::gateway_toml(
        gw,
        &root,
        &dir.path().join("spool"),
        "",
        r#"[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:0"
meter_utc_offset_minutes = 480
auth = "none"
"#,
    );
    let config = edge_config::parse(&toml, "h.toml".as_ref()).expect("config");
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let coap = gateway.source_addr("nbiot").expect("bound");
    let meter = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // A payload whose 13th frame has a bad checksum: refused whole, nothing spooled.
    let seq_before = gateway.spool().stats().next_seq;
    let mut bad = day_of_frames();
    let frame_len = bad.len() / 24;
    bad[13 * frame_len - 2] ^= 0x5A;
    let reply = common::coap_post(&meter, coap, 1, bad).await;
    assert_eq!(
        reply.header.code,
        MessageClass::Response(ResponseType::BadRequest)
    );
    let why = String::from_utf8_lossy(&reply.payload).into_owned();
    assert!(
        why.contains("frame 12") && why.contains("checksum"),
        "{why}"
    );
    assert_eq!(
        gateway.spool().stats().next_seq,
        seq_before,
        "nothing half-accepted"
    );
    let text = metrics(gateway.metrics_addr()).await;
    assert!(
        text.contains(r#"wm_gateway_decode_errors_total{source="nbiot",kind="bad_checksum"} 1"#),
        "{text}"
    );

    // The whole day: 2.04 only after all 24 hours are in the spool.
    let reply = common::coap_post(&meter, coap, 2, day_of_frames()).await;
    assert_eq!(
        reply.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    assert!(reply.payload.is_empty());
    let mut volumes: BTreeMap<OffsetDateTime, Decimal> = BTreeMap::new();
    while volumes.len() < 24 {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(10), batches.recv())
            .await
            .expect("reading batches in time")
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).unwrap();
        for e in batch.entries {
            let r = e.reading;
            if r.quantity == Quantity::Volume && r.storage == 0 {
                assert_eq!(r.meter.as_str(), METER);
                assert_eq!(r.clock, ClockSource::Meter);
                // The channel is the meter's CoAP peer address.
                assert_eq!(
                    r.provenance.channel,
                    Some(meter.local_addr().unwrap().to_string())
                );
                assert!(
                    volumes.insert(r.ts, r.value).is_none(),
                    "one reading per hour"
                );
            }
        }
    }
    // Local 00:00 … 23:00 at UTC+8 is 16:00 the day before … 15:00 UTC, 0.25 m³ an hour.
    let expected: BTreeMap<OffsetDateTime, Decimal> = (0..24i64)
        .map(|h| {
            (
                time::macros::datetime!(2026-11-23 16:00 UTC) + time::Duration::hours(h),
                Decimal::new(10_000 + 25 * h, 2),
            )
        })
        .collect();
    assert_eq!(volumes, expected);
    let text = metrics(gateway.metrics_addr()).await;
    assert!(
        text.contains(r#"wm_gateway_frames_total{source="nbiot"} 25"#),
        "one refused payload + 24 frames: {text}"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_frame_push_places_history_before_the_platform_time() {
    const SECRET: &str = "0123456789abcdef-history";
    let root = common::unique_prefix("push-history");
    let (_s, mut batches) =
        common::subscribe("phist-readings", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = common::gateway_toml(
        "gw-push-history",
        &root,
        dir.path(),
        "",
        &format!(
            r#"[[source]]
id = "platform"
kind = "http_push"
listen = "127.0.0.1:0"
secret = "{SECRET}"
"#
        ),
    );
    let config = edge_config::parse(&toml, "p.toml".as_ref()).expect("config");
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let http = gateway.source_addr("platform").expect("bound");
    let platform_time = time::macros::datetime!(2026-11-24 15:00:05 UTC);
    let envelope = |payload: Vec<u8>| {
        let mut env = Envelope::new(Platform::Generic, "nb-7", payload);
        env.received_at = Some(platform_time);
        encode_envelope(Platform::Generic, &env)
    };

    // One bad frame in the middle: 400, nothing spooled.
    let seq_before = gateway.spool().stats().next_seq;
    let mut bad = day_of_frames();
    let frame_len = bad.len() / 24;
    bad[6 * frame_len - 2] ^= 0x5A; // the 6th frame's checksum
    assert_eq!(
        common::signed_push(
            http,
            &envelope(bad),
            OffsetDateTime::now_utc().unix_timestamp(),
            SECRET
        )
        .await,
        400
    );
    assert_eq!(gateway.spool().stats().next_seq, seq_before);

    // The day: 24 readings, the newest at the platform's time, the others an hour apart.
    assert_eq!(
        common::signed_push(
            http,
            &envelope(day_of_frames()),
            OffsetDateTime::now_utc().unix_timestamp(),
            SECRET
        )
        .await,
        202
    );
    let mut volumes: BTreeMap<OffsetDateTime, Decimal> = BTreeMap::new();
    while volumes.len() < 24 {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(10), batches.recv())
            .await
            .expect("reading batches in time")
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).unwrap();
        for e in batch.entries {
            let r = e.reading;
            if r.quantity == Quantity::Volume {
                assert_eq!(r.clock, ClockSource::Platform);
                assert!(
                    volumes.insert(r.ts, r.value).is_none(),
                    "one reading per hour"
                );
            }
        }
    }
    let expected: BTreeMap<OffsetDateTime, Decimal> = (0..24i64)
        .map(|h| {
            (
                platform_time - time::Duration::hours(23 - h),
                Decimal::new(10_000 + 25 * h, 2),
            )
        })
        .collect();
    assert_eq!(volumes, expected);
    gateway.shutdown().await;
}
