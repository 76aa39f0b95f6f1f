//! Uplink against real Mosquitto: batches arrive per partition, PUBACK empties the spool,
//! and readings spooled while the broker is unreachable are replayed after reconnect.

mod common;

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
