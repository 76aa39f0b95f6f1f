//! Test helper for the kill -9 test of the spool: writes readings forever from several tasks
//! and prints `<task> <n>` on stdout after each submit is acknowledged (durable).
//!
//! Usage: `gateway-spool-torture DIR [TASKS]`. It never exits on its own; the test kills it.

use std::io::Write;

use anyhow::Context;
use gateway::IngestSink;
use gateway::spool::{Spool, SpoolConfig, spawn_writer};
use model::{ClockSource, GatewayId, MeterId, Provenance, Quantity, Reading, SourceKind, Unit};
use rust_decimal::Decimal;
use time::OffsetDateTime;

fn reading(task: usize, n: i64) -> anyhow::Result<Reading> {
    let now = OffsetDateTime::now_utc();
    Ok(Reading::actual(
        MeterId::new(format!("torture:{task}"))?,
        now,
        ClockSource::Gateway,
        (Quantity::Volume, Decimal::new(n, 0), Unit::CubicMetre),
        Provenance::new(
            GatewayId::new("gw-torture")?,
            SourceKind::Coap,
            "torture",
            "00".repeat(32),
            now,
        ),
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: gateway-spool-torture DIR [TASKS]")?;
    let tasks: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let (_spool, writer) = Spool::open(SpoolConfig::new(dir, 1 << 30))?;
    let (sink, rx) = IngestSink::new(64);
    let _writer = spawn_writer(writer, rx);
    let mut handles = Vec::new();
    for task in 0..tasks {
        let sink = sink.clone();
        handles.push(tokio::spawn(async move {
            for n in 0.. {
                sink.submit(vec![reading(task, n)?]).await?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{task} {n}")?;
                out.flush()?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}
