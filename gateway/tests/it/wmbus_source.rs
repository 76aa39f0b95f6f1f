//! wM-Bus UDP receiver: telegrams sent over real UDP sockets, as a USB receiver forwards them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::{kam_meter, volume_record};
use decoders::wmbus::encode::telegram;
use edge_config::wmbus::WmbusUdpSourceConfig;
use gateway::sources::wmbus::{ReceiverStats, WmbusSource};
use gateway::sources::{Source, SourceEnv, SourceError};
use gateway::{IngestSink, SourceContext, SubmitRequest};
use model::{GatewayId, Quantity};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const KEY: [u8; 16] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
];

struct Rx {
    addr: std::net::SocketAddr,
    rx: mpsc::Receiver<SubmitRequest>,
    sink: IngestSink,
    stats: Arc<ReceiverStats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

async fn start(window: Duration) -> Rx {
    start_with(window, |_| {}).await
}

async fn start_with(window: Duration, tune: impl FnOnce(&mut WmbusUdpSourceConfig)) -> Rx {
    // Pick a free port, then hand it to the receiver.
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = WmbusUdpSourceConfig::new(addr.to_string());
    config.dedup_window = window;
    tune(&mut config);
    config
        .keys
        .insert("mbus:KAM22222222".into(), hex::encode_upper(KEY).into());
    let (sink, rx) = IngestSink::new(16);
    let (_cmd, commands) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-1").unwrap(),
        "wm",
        model::SourceKind::Wmbus,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    // The socket is bound by `build`: telegrams sent from here on are queued for the receiver.
    let source = WmbusSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &SourceEnv::new("wm"),
    )
    .await
    .unwrap();
    let stats = source.stats();
    let task = tokio::spawn(source.run(ctx));
    Rx {
        addr,
        rx,
        sink,
        stats,
        shutdown,
        task,
    }
}

async fn next(rx: &mut mpsc::Receiver<SubmitRequest>) -> Vec<(String, Quantity, String)> {
    let req = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("readings within 5 s")
        .unwrap();
    let v = req
        .readings
        .iter()
        .map(|r| (r.meter.to_string(), r.quantity, r.value.to_string()))
        .collect();
    assert!(
        req.readings
            .iter()
            .all(|r| r.provenance.source == model::SourceKind::Wmbus)
    );
    req.done.send(Ok(())).unwrap();
    v
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn plain_and_encrypted_telegrams_become_readings_and_repeats_are_dropped() {
    let mut r = start(Duration::from_secs(10)).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let repeater = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    let plain = telegram(&kam_meter(0x1111_1111), &volume_record(123_456), 1, None);
    stick.send_to(&plain, r.addr).await.unwrap();
    assert_eq!(
        next(&mut r.rx).await,
        [(
            "mbus:KAM11111111".into(),
            Quantity::Volume,
            "123.456".into()
        )]
    );

    // Mode 5 with the configured key; the repeater forwards the same telegram twice more.
    let secret = telegram(&kam_meter(0x2222_2222), &volume_record(7_000), 2, Some(KEY));
    stick.send_to(&secret, r.addr).await.unwrap();
    repeater.send_to(&secret, r.addr).await.unwrap();
    let mut repeated = secret.clone();
    repeated[1] ^= 0x02; // a repeater may change the C field
    repeater.send_to(&repeated, r.addr).await.unwrap();
    assert_eq!(
        next(&mut r.rx).await,
        [("mbus:KAM22222222".into(), Quantity::Volume, "7".into())]
    );
    wait_for(|| r.stats.duplicates.load(Ordering::Relaxed) == 2).await;
    assert_eq!(r.sink.counters().frames("wm"), 4);
    assert_eq!(r.stats.decoded.load(Ordering::Relaxed), 2);
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_telegrams_are_counted_by_kind() {
    let mut r = start(Duration::from_millis(200)).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Encrypted for a meter without a configured key.
    let unknown = telegram(&kam_meter(0x3333_3333), &volume_record(1), 3, Some(KEY));
    stick.send_to(&unknown, r.addr).await.unwrap();
    // Encrypted with another key than the configured one.
    let wrong = telegram(
        &kam_meter(0x2222_2222),
        &volume_record(1),
        4,
        Some([0x55; 16]),
    );
    stick.send_to(&wrong, r.addr).await.unwrap();
    // Noise: L field larger than the datagram.
    stick.send_to(&[0x40, 0x44, 0x2D], r.addr).await.unwrap();
    let sink = r.sink.clone();
    wait_for(|| {
        sink.counters().decode_errors("wm", "missing_key") == 1
            && sink.counters().decode_errors("wm", "wrong_key") == 1
            && sink.counters().frames("wm") == 3
    })
    .await;
    let total: u64 = ["truncated", "length"]
        .iter()
        .map(|k| sink.counters().decode_errors("wm", k))
        .sum();
    assert_eq!(total, 1);
    // After the window the same telegram is decoded again (a new transmission).
    let plain = telegram(&kam_meter(0x1111_1111), &volume_record(5), 9, None);
    stick.send_to(&plain, r.addr).await.unwrap();
    assert_eq!(next(&mut r.rx).await[0].2, "0.005");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stick.send_to(&plain, r.addr).await.unwrap();
    assert_eq!(next(&mut r.rx).await[0].2, "0.005");
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

/// Volume record plus the meter's date-time record `04 6D` (type F, local time).
fn volume_at(litres: u32, at: time::PrimitiveDateTime) -> Vec<u8> {
    let mut records = volume_record(litres);
    let mut clock = Vec::new();
    decoders::mbus::DataRecord::date_time(at).encode_into(&mut clock);
    records.extend(clock);
    records
}

#[tokio::test]
async fn the_telegram_clock_is_the_reading_time_when_the_zone_is_configured() {
    use time::macros::datetime;
    let at = datetime!(2026-07-01 14:30);
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Meters in CEST (UTC+2): 14:30 local is 12:30 UTC, clock source meter.
    let mut r = start_with(Duration::from_secs(10), |c| {
        c.meter_utc_offset_minutes = Some(120)
    })
    .await;
    let t = telegram(&kam_meter(0x1111_1111), &volume_at(42, at), 1, None);
    stick.send_to(&t, r.addr).await.unwrap();
    let req = tokio::time::timeout(Duration::from_secs(5), r.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.readings.len(), 1);
    assert_eq!(req.readings[0].ts, datetime!(2026-07-01 12:30 UTC));
    assert_eq!(req.readings[0].clock, model::ClockSource::Meter);
    req.done.send(Ok(())).unwrap();
    // A telegram without the record keeps the receive time.
    let t = telegram(&kam_meter(0x1111_1111), &volume_record(43), 2, None);
    stick.send_to(&t, r.addr).await.unwrap();
    let req = r.rx.recv().await.unwrap();
    assert_eq!(req.readings[0].clock, model::ClockSource::Gateway);
    assert!(
        (req.readings[0].ts - time::OffsetDateTime::now_utc()).abs() < time::Duration::minutes(1)
    );
    req.done.send(Ok(())).unwrap();
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();

    // Without a configured zone the record cannot be placed in UTC: receive time.
    let mut r = start(Duration::from_secs(10)).await;
    let t = telegram(&kam_meter(0x1111_1111), &volume_at(44, at), 3, None);
    stick.send_to(&t, r.addr).await.unwrap();
    let req = r.rx.recv().await.unwrap();
    assert_eq!(req.readings[0].clock, model::ClockSource::Gateway);
    req.done.send(Ok(())).unwrap();
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_burst_of_a_thousand_meters_is_received_whole_in_batches() {
    let mut r = start(Duration::from_secs(10)).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let n = 1000u32;
    for i in 0..n {
        let t = telegram(&kam_meter(0x1000_0000 + i), &volume_record(i), 1, None);
        stick.send_to(&t, r.addr).await.unwrap();
    }
    let mut meters = std::collections::BTreeSet::new();
    let mut submits = 0;
    while meters.len() < n as usize {
        for (m, _, _) in next(&mut r.rx).await {
            meters.insert(m);
        }
        submits += 1;
    }
    assert_eq!(r.stats.decoded.load(Ordering::Relaxed), u64::from(n));
    // Batched: far fewer spool submits than telegrams.
    assert!(submits < n / 4, "{submits} submits for {n} telegrams");
    assert_eq!(r.sink.counters().kernel_drops("wm"), 0);
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn datagrams_the_kernel_drops_are_counted() {
    // A tiny buffer and a spool that does not answer: the socket overflows.
    let r = start_with(Duration::from_secs(10), |c| c.recv_buffer_bytes = 4096).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..3000u32 {
        let t = telegram(&kam_meter(0x2000_0000 + i), &volume_record(i), 1, None);
        stick.send_to(&t, r.addr).await.unwrap();
    }
    let sink = r.sink.clone();
    for _ in 0..200 {
        if sink.counters().kernel_drops("wm") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drops = sink.counters().kernel_drops("wm");
    assert!(drops > 0, "no kernel drops counted");
    let received = sink.counters().frames("wm");
    assert!(received + drops <= 3000, "{received} + {drops}");
    let mut text = String::new();
    sink.counters().render_prometheus(&mut text);
    assert!(
        text.contains(&format!(
            "wm_gateway_udp_kernel_drops_total{{source=\"wm\"}} {drops}"
        )),
        "{text}"
    );
    r.shutdown.cancel();
    drop(r.rx);
    r.task.await.unwrap().unwrap();
}

/// Waits up to 5 s (the hold's expiry is checked every second).
async fn wait_long(cond: impl Fn() -> bool) {
    for _ in 0..250 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test]
async fn a_compact_telegram_before_its_full_frame_is_held_then_decoded() {
    use decoders::wmbus::encode::compact_telegram;
    use gateway::CompactOutcome;
    let mut r = start(Duration::from_secs(10)).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let m = kam_meter(0x4444_4444);

    // The compact telegram comes first (the gateway just started): its format is unknown.
    let compact = compact_telegram(&m, &volume_record(900)).unwrap();
    assert_eq!(compact[10], 0x79);
    stick.send_to(&compact, r.addr).await.unwrap();
    let sink = r.sink.clone();
    wait_for(|| sink.counters().compact("wm", CompactOutcome::Held) == 1).await;
    assert_eq!(
        sink.counters()
            .decode_errors("wm", "unknown_compact_format"),
        1
    );
    assert_eq!(r.stats.decoded.load(Ordering::Relaxed), 0);
    let held_at = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // The meter's full frame teaches the format: both readings come in one batch, the held
    // one with its own (earlier) receive time.
    let full = telegram(&m, &volume_record(1000), 2, None);
    stick.send_to(&full, r.addr).await.unwrap();
    let req = tokio::time::timeout(Duration::from_secs(5), r.rx.recv())
        .await
        .expect("readings within 5 s")
        .unwrap();
    let got: Vec<(String, String)> = req
        .readings
        .iter()
        .map(|r| (r.meter.to_string(), r.value.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            ("mbus:KAM44444444".into(), "1".into()),
            ("mbus:KAM44444444".into(), "0.9".into()),
        ]
    );
    assert!(
        req.readings[1].ts < held_at,
        "held reading keeps its receive time"
    );
    assert!(req.readings[0].ts > held_at);
    assert_ne!(
        req.readings[0].provenance.frame_hash,
        req.readings[1].provenance.frame_hash
    );
    req.done.send(Ok(())).unwrap();
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Decoded), 1);
    assert_eq!(r.stats.decoded.load(Ordering::Relaxed), 2);

    // Now the format is known: the next compact telegram decodes at once.
    let compact = compact_telegram(&m, &volume_record(1100)).unwrap();
    stick.send_to(&compact, r.addr).await.unwrap();
    assert_eq!(
        next(&mut r.rx).await,
        [("mbus:KAM44444444".into(), Quantity::Volume, "1.1".into())]
    );
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Held), 1);
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_compact_telegram_whose_full_frame_never_comes_is_counted_and_dropped() {
    use decoders::wmbus::encode::compact_telegram;
    use gateway::CompactOutcome;
    let mut r = start_with(Duration::from_secs(10), |c| {
        c.compact_hold_frames = 2;
        c.compact_hold_max_age = Duration::from_secs(1);
    })
    .await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Three meters' compact telegrams into a hold of two: the oldest is evicted.
    for id in [0x5555_0001, 0x5555_0002, 0x5555_0003] {
        let compact = compact_telegram(&kam_meter(id), &volume_record(7)).unwrap();
        stick.send_to(&compact, r.addr).await.unwrap();
    }
    let sink = r.sink.clone();
    wait_for(|| sink.counters().compact("wm", CompactOutcome::Held) == 3).await;
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Evicted), 1);
    // No full frame ever comes and no other datagram arrives: the age bound drops them.
    wait_long(|| sink.counters().compact("wm", CompactOutcome::Expired) == 2).await;
    assert_eq!(
        sink.counters()
            .decode_errors("wm", "unknown_compact_format"),
        3
    );
    // A full frame of the first meter later finds nothing held: only its own reading.
    let full = telegram(&kam_meter(0x5555_0001), &volume_record(8), 1, None);
    stick.send_to(&full, r.addr).await.unwrap();
    assert_eq!(
        next(&mut r.rx).await,
        [("mbus:KAM55550001".into(), Quantity::Volume, "0.008".into())]
    );
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Decoded), 0);
    let mut text = String::new();
    sink.counters().render_prometheus(&mut text);
    for line in [
        "wm_gateway_wmbus_compact_total{source=\"wm\",outcome=\"held\"} 3",
        "wm_gateway_wmbus_compact_total{source=\"wm\",outcome=\"evicted\"} 1",
        "wm_gateway_wmbus_compact_total{source=\"wm\",outcome=\"expired\"} 2",
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_held_compact_telegram_borrows_the_format_of_its_model() {
    use decoders::wmbus::encode::compact_telegram;
    use gateway::CompactOutcome;
    let mut r = start(Duration::from_secs(10)).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let compact = compact_telegram(&kam_meter(0x6666_0001), &volume_record(321)).unwrap();
    stick.send_to(&compact, r.addr).await.unwrap();
    let sink = r.sink.clone();
    wait_for(|| sink.counters().compact("wm", CompactOutcome::Held) == 1).await;
    // Another meter of the same model (manufacturer, version, type) sends the full frame.
    let full = telegram(&kam_meter(0x6666_0002), &volume_record(5), 1, None);
    stick.send_to(&full, r.addr).await.unwrap();
    let got = next(&mut r.rx).await;
    assert_eq!(
        got,
        [
            ("mbus:KAM66660002".into(), Quantity::Volume, "0.005".into()),
            ("mbus:KAM66660001".into(), Quantity::Volume, "0.321".into()),
        ]
    );
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Decoded), 1);
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_held_plaintext_compact_telegram_of_a_keyed_meter_is_refused_on_release() {
    use decoders::wmbus::encode::compact_telegram;
    use gateway::CompactOutcome;
    let mut r = start(Duration::from_secs(10)).await;
    let stick = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // KAM22222222 has a key: a plaintext compact telegram is held (its format is unknown, so
    // the no-downgrade check cannot run yet) ...
    let forged = compact_telegram(&kam_meter(0x2222_2222), &volume_record(999_999)).unwrap();
    stick.send_to(&forged, r.addr).await.unwrap();
    let sink = r.sink.clone();
    wait_for(|| sink.counters().compact("wm", CompactOutcome::Held) == 1).await;
    // ... and refused when the meter's encrypted full frame releases it.
    let full = telegram(&kam_meter(0x2222_2222), &volume_record(7_000), 5, Some(KEY));
    stick.send_to(&full, r.addr).await.unwrap();
    assert_eq!(
        next(&mut r.rx).await,
        [("mbus:KAM22222222".into(), Quantity::Volume, "7".into())]
    );
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Failed), 1);
    assert_eq!(sink.counters().compact("wm", CompactOutcome::Decoded), 0);
    assert_eq!(sink.counters().decode_errors("wm", "security_downgrade"), 1);
    r.shutdown.cancel();
    r.task.await.unwrap().unwrap();
}
