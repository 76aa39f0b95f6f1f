//! Measures the wM-Bus UDP receiver: encrypted (mode 5) telegrams per second from receipt to
//! the spool hand-off, over loopback UDP.
//!
//! `cargo run --release -p gateway --example wmbus_rate -- [telegrams] [meters]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use decoders::wmbus::encode::{WmbusMeter, telegram};
use decoders::wmbus::manufacturer_from_code;
use edge_config::wmbus::WmbusUdpSourceConfig;
use gateway::sources::wmbus::WmbusSource;
use gateway::sources::{Source, SourceEnv};
use gateway::{IngestSink, SourceContext};
use model::GatewayId;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: u32 = args.next().map_or(Ok(200_000), |a| a.parse())?;
    let meters: u32 = args.next().map_or(Ok(1_000), |a| a.parse())?;
    let man = manufacturer_from_code("KAM").ok_or_else(|| anyhow::anyhow!("manufacturer"))?;

    let addr = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let mut config = WmbusUdpSourceConfig::new(addr.to_string());
    let mut keys = BTreeMap::new();
    let mut frames = Vec::new();
    for m in 0..meters {
        let id = u32::from_str_radix(&format!("{:08}", 10_000_000 + m), 16)?;
        let meter = WmbusMeter {
            manufacturer: man,
            id,
            version: 1,
            device_type: 0x07,
        };
        let key = [m.to_le_bytes(), [1; 4], [2; 4], [3; 4]].concat();
        let key: [u8; 16] = key.try_into().map_err(|_| anyhow::anyhow!("key"))?;
        keys.insert(meter.meter_id(), hex::encode(key).into());
        frames.push((meter, key));
    }
    config.keys = keys;
    let (sink, mut rx) = IngestSink::new(1024);
    let (_cmd, commands) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-bench")?,
        "wmbus",
        model::SourceKind::Wmbus,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    // Bound here: telegrams sent from now on wait in the socket for the receiver.
    let source = WmbusSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &SourceEnv::new("wmbus"),
    )
    .await?;
    let stats = source.stats();
    let receiver = tokio::spawn(source.run(ctx));
    // The spool stand-in: acknowledge every hand-off at once.
    let spool = tokio::spawn(async move {
        let mut readings = 0usize;
        while let Some(req) = rx.recv().await {
            readings += req.readings.len();
            if req.done.send(Ok(())).is_err() {
                break;
            }
        }
        readings
    });

    // Pre-build the telegrams (distinct access numbers, so none is a duplicate).
    let telegrams: Vec<Vec<u8>> = (0..total)
        .map(|i| {
            let (meter, key) = frames[(i % meters) as usize];
            let litres = format!("{:08}", i);
            let d: Vec<u8> = litres.bytes().map(|b| b - b'0').collect();
            let records = [
                0x0C,
                0x13,
                (d[6] << 4) | d[7],
                (d[4] << 4) | d[5],
                (d[2] << 4) | d[3],
                (d[0] << 4) | d[1],
            ];
            telegram(&meter, &records, (i / meters) as u8, Some(key))
        })
        .collect();
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let start = Instant::now();
    for (i, t) in telegrams.iter().enumerate() {
        socket.send_to(t, addr).await?;
        // Keep at most ~100 datagrams in flight so the socket buffer (~200 KiB) never drops any.
        while (i as u64).saturating_sub(stats.decoded.load(Ordering::Relaxed)) > 100 {
            tokio::task::yield_now().await;
        }
    }
    // Done when every datagram was received (decoded or not) or nothing moved for 2 s.
    let mut last = (0, Instant::now());
    while sink.counters().frames("wmbus") < u64::from(total) {
        let now = sink.counters().frames("wmbus");
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    receiver.await??;
    let readings_task = spool;
    let counters = Arc::clone(sink.counters());
    drop(sink);
    let readings = readings_task.await?;
    let received = counters.frames("wmbus");
    let decoded = stats.decoded.load(Ordering::Relaxed);
    println!(
        "{total} mode-5 telegrams from {meters} meters: {received} received, {decoded} decoded in \
         {:.2} s = {:.0} telegrams/s; {readings} readings, {} duplicates dropped",
        elapsed.as_secs_f64(),
        decoded as f64 / elapsed.as_secs_f64(),
        stats.duplicates.load(Ordering::Relaxed)
    );
    let mut metrics = String::new();
    counters.render_prometheus(&mut metrics);
    print!("{metrics}");
    Ok(())
}
