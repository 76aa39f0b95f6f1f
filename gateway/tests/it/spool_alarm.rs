//! A spool past its size bound evicts its oldest readings and the gateway raises a
//! `spool_overflow` alarm on `{root}/{gateway}/alarms` through the real broker.

use crate::common;

use std::time::Duration;

use gateway::control::{self, ControlOptions};
use gateway::downlink::Downlink;
use gateway::spool::{Spool, SpoolConfig};
use model::{Alarm, AlarmKind, AlarmSeverity, GatewayId};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn eviction_raises_a_spool_overflow_alarm_on_the_broker() {
    let root = common::unique_prefix("spool-alarm");
    let gateway = GatewayId::new("gw-alarm").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_sub, mut received) =
        common::subscribe("alarm-sub", &format!("{root}/gw-alarm/alarms")).await;

    let (spool, mut writer) = Spool::open(SpoolConfig {
        dir: dir.path().join("spool"),
        max_bytes: 16 * 1024,
        segment_bytes: 4 * 1024,
    })
    .unwrap();
    let (downlink, acks) = Downlink::open(gateway.clone(), dir.path()).unwrap();
    let (alarm_tx, alarm_rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let control = tokio::spawn(control::run(
        ControlOptions {
            endpoint: common::broker(),
            client_id: common::unique_prefix("alarm-ctl").replace('/', "-"),
            topic_root: root.clone(),
            gateway: gateway.clone(),
            health: None,
            health_every: Duration::from_secs(10),
        },
        downlink,
        acks,
        alarm_rx,
        shutdown.clone(),
    ));
    // No uplink drains the spool: 400 readings of ~300 bytes overflow its 16 KiB bound.
    for i in 0..400 {
        writer
            .append(&[common::reading("cjt188:00000000000001", i)])
            .unwrap();
        writer.sync().unwrap();
    }
    let evicted = spool.stats().evicted;
    assert!(evicted > 0, "{:?}", spool.stats());
    // The watcher counts from zero: evictions before it started are reported, in one alarm.
    let watcher = tokio::spawn(control::watch_spool_overflow(
        spool.clone(),
        gateway.clone(),
        "spool".into(),
        alarm_tx,
        shutdown.clone(),
    ));

    let (topic, payload) = tokio::time::timeout(Duration::from_secs(15), received.recv())
        .await
        .expect("an alarm in time")
        .expect("subscriber alive");
    assert_eq!(topic, format!("{root}/gw-alarm/alarms"));
    let alarm: Alarm = serde_json::from_slice(&payload).unwrap();
    assert_eq!(alarm.kind, AlarmKind::SpoolOverflow);
    assert_eq!(alarm.severity, AlarmSeverity::Critical);
    assert_eq!(alarm.meter.as_str(), "gateway:gw-alarm");
    assert_eq!(alarm.detail["evicted_total"], evicted);
    assert_eq!(alarm.detail["evicted"], evicted);
    // Nothing more is evicted, so no second alarm.
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), received.recv())
            .await
            .is_err()
    );
    shutdown.cancel();
    control.await.unwrap();
    watcher.await.unwrap();
}

#[test]
fn no_alarm_without_new_evictions() {
    let gw = GatewayId::new("gw-1").unwrap();
    assert!(control::spool_overflow_alarm(&gw, 5, 5, "s").is_none());
    assert!(control::spool_overflow_alarm(&gw, 0, 0, "s").is_none());
    let alarm = control::spool_overflow_alarm(&gw, 5, 12, "s").unwrap();
    assert_eq!(alarm.detail["evicted"], 7);
}
