//! Benchmark: replay a spooled backlog to a real MQTT broker and report readings/s.
//!
//! Usage: `gateway-bench-replay [READINGS] [MQTT_URL]` (defaults 1000000, `MQTT_URL` env or
//! mqtt://127.0.0.1:1883). Fills a fresh spool in a temporary directory (not timed), then
//! starts the uplink and times until the broker has PUBACKed every reading.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use gateway::mqtt::MqttEndpoint;
use gateway::spool::{Spool, SpoolConfig};
use gateway::uplink::{self, UplinkOptions, UplinkStats};
use model::{ClockSource, GatewayId, MeterId, Provenance, Quantity, Reading, SourceKind, Unit};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let url = args
        .next()
        .or_else(|| std::env::var("MQTT_URL").ok())
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let endpoint = MqttEndpoint::parse(&url).map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("gateway-bench-replay-{}", std::process::id()));
    let (spool, mut writer) = Spool::open(SpoolConfig::new(&dir, 8 << 30))?;
    let gateway = GatewayId::new("gw-bench")?;
    let now = OffsetDateTime::now_utc();
    let t0 = Instant::now();
    let mut group = Vec::with_capacity(8192);
    for i in 0..n {
        group.push(Reading::actual(
            MeterId::new(format!("cjt188:{:014}", i % 10_000))?,
            now,
            ClockSource::Meter,
            (
                Quantity::Volume,
                Decimal::new(i64::try_from(i)?, 3),
                Unit::CubicMetre,
            ),
            Provenance::new(
                gateway.clone(),
                SourceKind::Coap,
                "bench",
                "ab".repeat(32),
                now,
            ),
        ));
        if group.len() == 8192 || i + 1 == n {
            writer.append(&group)?;
            writer.sync()?;
            group.clear();
        }
    }
    let fill = t0.elapsed();
    let stats = spool.stats();
    println!(
        "spooled {n} readings ({} MiB, {} segments) in {:.2}s = {:.0} readings/s (group commits of 8192)",
        stats.bytes >> 20,
        stats.segments,
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64()
    );
    let root = format!("bench/{}-{}", std::process::id(), now.unix_timestamp());
    let up_stats = Arc::new(UplinkStats::default());
    let shutdown = CancellationToken::new();
    let opts = UplinkOptions {
        endpoint,
        client_id: format!("gw-bench-{}", std::process::id()),
        topic_root: root,
        gateway,
        partitions: 16,
        batch_size: 1000,
        window: 32,
        // Measures the broker path alone: no pipeline acknowledges here.
        ack_timeout: None,
        max_unacked: 0,
    };
    let t1 = Instant::now();
    let task = tokio::spawn(uplink::run(
        opts,
        spool.clone(),
        Arc::clone(&up_stats),
        shutdown.clone(),
    ));
    while spool.stats().depth > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if t1.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("replay did not finish in 10 minutes");
        }
    }
    let replay = t1.elapsed();
    shutdown.cancel();
    task.await.context("uplink task")?;
    std::fs::remove_dir_all(&dir).ok();
    println!(
        "replayed {n} readings in {} batches to {url} in {:.2}s = {:.0} readings/s (QoS 1, all PUBACKed)",
        up_stats
            .batches_sent
            .load(std::sync::atomic::Ordering::Relaxed),
        replay.as_secs_f64(),
        n as f64 / replay.as_secs_f64()
    );
    Ok(())
}
