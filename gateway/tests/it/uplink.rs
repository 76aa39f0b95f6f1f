//! Uplink against real Mosquitto: batches arrive per partition, PUBACK empties the spool,
//! and readings spooled while the broker is unreachable are replayed after reconnect; end to
//! end, readings stay spooled until the pipeline's acknowledgement and are re-sent without it.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use gateway::spool::{Spool, SpoolConfig};
use gateway::uplink::{self, UplinkOptions, UplinkStats};
use model::{GatewayId, ReadingBatch, partition_of};
use tokio_util::sync::CancellationToken;

async fn collect(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    root: &str,
    seqs: &mut BTreeSet<u64>,
    want: usize,
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while seqs.len() < want {
            let (topic, payload) = rx.recv().await.expect("subscriber alive");
            let batch: ReadingBatch = serde_json::from_slice(&payload).expect("batch json");
            assert_eq!(topic, format!("{root}/readings/{}", batch.partition));
            assert_eq!(batch.gateway.as_str(), "gw-test");
            // Within a batch (one partition) entries keep spool order.
            assert!(batch.entries.windows(2).all(|w| w[0].seq < w[1].seq));
            for e in batch.entries {
                assert_eq!(partition_of(e.reading.meter.as_str(), 8), batch.partition);
                // Value encodes the seq (see below), so a wrong splice would show.
                assert_eq!(e.reading.value, rust_decimal::Decimal::new(e.seq as i64, 3));
                seqs.insert(e.seq);
            }
        }
    })
    .await
    .expect("all readings arrive in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_publishes_and_replays_after_reconnect() {
    let root = common::unique_prefix("uplink");
    let (_sub, mut rx) = common::subscribe("uplink-sub", &format!("{root}/readings/#")).await;
    let proxy = common::Proxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (spool, mut writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
    // Readings n = 1..: seq n carries value n/1000, meters spread over partitions.
    let mut next = 1i64;
    let mut write = |n: usize| {
        for _ in 0..n {
            writer
                .append(&[common::reading(&format!("m:{}", next % 37), next)])
                .unwrap();
            next += 1;
        }
        writer.sync().unwrap();
    };
    write(500);
    let stats = Arc::new(UplinkStats::default());
    let shutdown = CancellationToken::new();
    let opts = UplinkOptions {
        endpoint: proxy.endpoint(),
        client_id: format!("{}-up", root.replace('/', "-")),
        topic_root: root.clone(),
        gateway: GatewayId::new("gw-test").unwrap(),
        partitions: 8,
        batch_size: 50,
        window: 4,
        ack_timeout: None,
        max_unacked: 10_000,
    };
    let task = tokio::spawn(uplink::run(
        opts,
        spool.clone(),
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    let mut seqs = BTreeSet::new();
    collect(&mut rx, &root, &mut seqs, 500).await;
    // Every PUBACK empties the spool.
    tokio::time::timeout(Duration::from_secs(10), async {
        while spool.stats().depth > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("spool drained after PUBACKs");

    // Broker unreachable: new readings stay in the spool.
    proxy.cut();
    write(300);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(spool.stats().depth, 300);
    proxy.restore();
    collect(&mut rx, &root, &mut seqs, 800).await;
    assert_eq!(seqs, (1..=800).collect::<BTreeSet<u64>>());
    tokio::time::timeout(Duration::from_secs(10), async {
        while spool.stats().depth > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("spool drained after reconnect");
    assert!(stats.connects.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    shutdown.cancel();
    task.await.unwrap();
}

/// End to end: a broker PUBACK frees nothing; without an ingest acknowledgement the readings
/// are sent again after the timeout; acknowledgements per partition empty the spool; an
/// acknowledgement of a number never issued starts a new incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_keeps_readings_until_the_pipeline_acknowledges() {
    use rumqttc::QoS;
    use std::collections::BTreeMap;
    let root = common::unique_prefix("uplink-e2e");
    let (acker, mut rx) = common::subscribe("uplink-e2e-sub", &format!("{root}/readings/#")).await;
    let dir = tempfile::tempdir().unwrap();
    let (spool, mut writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
    for n in 1..=300i64 {
        writer
            .append(&[common::reading(&format!("m:{}", n % 37), n)])
            .unwrap();
    }
    writer.sync().unwrap();
    let stats = Arc::new(UplinkStats::default());
    let shutdown = CancellationToken::new();
    let opts = UplinkOptions {
        endpoint: common::broker(),
        client_id: format!("{}-up", root.replace('/', "-")),
        topic_root: root.clone(),
        gateway: GatewayId::new("gw-test").unwrap(),
        partitions: 8,
        batch_size: 50,
        window: 4,
        ack_timeout: Some(Duration::from_secs(3)),
        max_unacked: 10_000,
    };
    let task = tokio::spawn(uplink::run(
        opts,
        spool.clone(),
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    let incarnation = spool.incarnation();
    // First pass: every reading arrives once, chained by `prev` per partition.
    let mut seen: BTreeMap<u16, u64> = BTreeMap::new();
    let mut count = 0usize;
    let mut first_pass = BTreeSet::new();
    while first_pass.len() < 300 {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("batches in time")
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).unwrap();
        assert_eq!(batch.incarnation.as_deref(), Some(incarnation.as_str()));
        assert_eq!(batch.prev, seen.get(&batch.partition).copied());
        let last = batch.entries.last().unwrap().seq;
        seen.insert(batch.partition, last);
        for e in &batch.entries {
            first_pass.insert(e.seq);
            count += 1;
        }
    }
    assert_eq!(count, 300, "no re-send before the timeout");
    // The broker PUBACKed everything by now; the spool still holds it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spool.stats().depth, 300);
    // No acknowledgement: the same readings come again, the pass starting without `prev`.
    let mut again = BTreeSet::new();
    while again.len() < 300 {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("re-send in time")
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).unwrap();
        again.extend(batch.entries.iter().map(|e| e.seq));
    }
    assert_eq!(again, first_pass);
    assert!(stats.resends.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // The pipeline acknowledges every partition: the spool empties.
    for (partition, seq) in &seen {
        let ack = model::IngestAck {
            v: model::WIRE_VERSION,
            incarnation: incarnation.clone(),
            partition: *partition,
            seq: *seq,
        };
        acker
            .publish(
                format!("{root}/gw-test/ingest-ack"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&ack).unwrap(),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while spool.stats().depth > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("spool emptied by ingest acknowledgements");
    // A forged acknowledgement far above anything issued: new incarnation for new readings.
    let forged = model::IngestAck {
        v: model::WIRE_VERSION,
        incarnation: incarnation.clone(),
        partition: 0,
        seq: i64::MAX as u64,
    };
    acker
        .publish(
            format!("{root}/gw-test/ingest-ack"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&forged).unwrap(),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while stats
            .incarnation_rotations
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("incarnation rotated");
    assert_ne!(spool.incarnation(), incarnation);
    writer.append(&[common::reading("m:1", 301)]).unwrap();
    writer.sync().unwrap();
    loop {
        let (_, payload) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("new batch in time")
            .unwrap();
        let batch: ReadingBatch = serde_json::from_slice(&payload).unwrap();
        if batch.entries.iter().any(|e| e.seq == 301) {
            assert_eq!(batch.incarnation, Some(spool.incarnation()));
            break;
        }
    }
    shutdown.cancel();
    task.await.unwrap();
}
