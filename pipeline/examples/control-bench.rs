//! `control-bench`: burst auto-close latency of issue 21 (docs/benchmarks.md).
//!
//! On a fresh database of `DATABASE_URL` and the broker at `MQTT_URL`, runs ingest worker(s)
//! and the control service in this process, registers `--trials` valve meters with
//! `auto_close_on_burst`, and gives each two hours of history (1.5 m³/h, above 0.4 × Q3).
//! Then, one meter at a time, publishes the reading that confirms the burst (the second hour
//! above the threshold) and measures until the valve-close command for the meter's gateway is
//! seen on `{root}/{gateway}/cmd/{meter}`: detection in the ingest transaction, the alarm on
//! `{root}/alarms`, the rule, the command row and its publication. Meanwhile a background
//! load of `--load-rate` readings/s flows through the same workers. Prints p50/p99/max and the
//! CPU time spent per background reading over the measured phase (utime + stime from
//! `/proc`, by `pipeline-bench`'s `cpu.rs`): this process (split into the load generator's
//! thread and the rest), the PostgreSQL processes of its database and the shared background
//! ones (checkpointer, WAL writer, ...), and Mosquitto. CPU time, unlike throughput, barely
//! depends on what else the machine runs, so it compares configurations on a shared machine.
//!
//! `--own-broker` starts a private Mosquitto on a free port with a temporary configuration
//! (`--broker-nodelay` adds `set_tcp_nodelay true`); otherwise the broker of `MQTT_URL` is used
//! and its CPU is read through `/run/mosquitto/mosquitto.pid`.

// The private broker and the `/proc` CPU accounting of `pipeline-bench` (one implementation
// for both benches; kept out of the library so the api's build never carries them).
#[path = "../src/bin/pipeline-bench/broker.rs"]
mod broker;
#[path = "../src/bin/pipeline-bench/cpu.rs"]
#[allow(
    dead_code,
    reason = "pipeline-bench prints the phase's wall time and load from it"
)]
mod cpu;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use broker::OwnBroker;
use clap::Parser;
use model::{
    BatchEntry, ClockSource, GatewayId, MeterId, Provenance, Quantity, Reading, ReadingBatch,
    SourceKind, Unit, WIRE_VERSION,
};
use pipeline::ingest::IngestMetrics;
use rumqttc::{Event, Packet, QoS};
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "Burst-confirming reading → valve-close command latency under load")]
struct Args {
    /// Bursts measured (one valve meter each, one at a time).
    #[arg(long, default_value_t = 200)]
    trials: u32,
    /// Background readings per second through the same workers (0: none).
    #[arg(long, default_value_t = 5_000)]
    load_rate: u64,
    /// Meters of the background load.
    #[arg(long, default_value_t = 20_000)]
    load_meters: u64,
    /// Readings per background message.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Partitions.
    #[arg(long, default_value_t = 4)]
    partitions: u16,
    /// Workers (in this process).
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// The workers' batch delay, ms (`pipeline run --max-batch-delay-ms`; default 50): the
    /// longest a lone message waits for company before its batch is processed.
    #[arg(long, default_value_t = 50)]
    max_batch_delay_ms: u64,
    /// Alarms reach the control service only through the broker (as from workers of another
    /// process), not handed over in-process (`pipeline run --control` hands them over).
    #[arg(long)]
    via_broker: bool,
    /// The workers batch as before adaptive batching: a lone message waits the whole batch
    /// delay for company (to compare in the same session).
    #[arg(long)]
    fixed_batching: bool,
    /// No priority lane: the valve meters' readings take the bulk path with the load.
    #[arg(long)]
    no_lane: bool,
    /// Pause between two bursts, ms: stretches the measured phase (CPU accounting needs some
    /// seconds of it) without more bursts.
    #[arg(long, default_value_t = 0)]
    trial_gap_ms: u64,
    /// Runs a private Mosquitto on a free port (temporary configuration, no persistence) instead
    /// of using `MQTT_URL`: its CPU time is then this bench's alone.
    #[arg(long)]
    own_broker: bool,
    /// With `--own-broker`: `set_tcp_nodelay true` in its configuration (Mosquitto ≥ 2.0; off by
    /// default: the broker's sockets keep Nagle's algorithm).
    #[arg(long, requires = "own_broker")]
    broker_nodelay: bool,
}

const GW: &str = "gw-bench";

fn reading(meter: &MeterId, ts: OffsetDateTime, value: Decimal, gateway: &GatewayId) -> Reading {
    Reading::actual(
        meter.clone(),
        ts,
        ClockSource::Meter,
        (Quantity::Volume, value, Unit::CubicMetre),
        Provenance::new(
            gateway.clone(),
            SourceKind::Coap,
            "bench",
            "00".repeat(32),
            OffsetDateTime::now_utc(),
        ),
    )
}

/// Numbers entries per (gateway, partition), as a gateway's spool does.
struct Sequencer {
    gateway: GatewayId,
    next: Vec<u64>,
    partitions: u16,
}

impl Sequencer {
    fn batch(&mut self, readings: Vec<Reading>) -> Vec<(u16, Vec<u8>)> {
        let mut by_p: HashMap<u16, Vec<BatchEntry>> = HashMap::new();
        for r in readings {
            let p = r.meter.partition(self.partitions);
            let s = &mut self.next[usize::from(p)];
            by_p.entry(p).or_default().push(BatchEntry {
                seq: *s,
                reading: r,
            });
            *s += 1;
        }
        by_p.into_iter()
            .map(|(p, entries)| {
                let batch = ReadingBatch {
                    v: WIRE_VERSION,
                    gateway: self.gateway.clone(),
                    partition: p,
                    sent_at: OffsetDateTime::now_utc(),
                    incarnation: None,
                    prev: None,
                    entries,
                };
                (p, serde_json::to_vec(&batch).unwrap_or_default())
            })
            .collect()
    }
}

/// `/proc/self/task/<tid>` of this process's thread named `name`.
fn thread_stat(name: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| t.path().join("stat"))
}

/// Publishes `rate` readings/s of `meters` background meters, `batch` per message, until
/// `stop`; returns how many it published.
async fn generate_load(
    broker: model::BrokerUrl,
    root: String,
    partitions: u16,
    rate: u64,
    meters: u64,
    batch: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut published = 0u64;
    if rate == 0 {
        return Ok(published);
    }
    let (publisher, _connected) = pipeline::config::BenchPublisher::spawn(
        &broker,
        format!("ctl-bench-load-{}", std::process::id()),
        root,
    )?;
    let gw = GatewayId::new("gw-load").context("gateway id")?;
    let mut seq = Sequencer {
        gateway: gw.clone(),
        next: vec![1; usize::from(partitions)],
        partitions,
    };
    let ids: Vec<MeterId> = (0..meters)
        .filter_map(|i| MeterId::new(format!("cjt188:99{i:012}")).ok())
        .collect();
    let base = OffsetDateTime::now_utc() - time::Duration::days(90);
    let started = Instant::now();
    let mut round = 0i64;
    let mut cursor = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(published),
            _ = tick.tick() => {}
        }
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while published + batch as u64 <= due {
            let mut readings = Vec::with_capacity(batch);
            for _ in 0..batch {
                let Some(m) = ids.get(cursor) else { break };
                let ts = base + time::Duration::minutes(15 * round);
                readings.push(reading(m, ts, Decimal::new(round * 10, 3), &gw));
                cursor += 1;
                if cursor == ids.len() {
                    cursor = 0;
                    round += 1;
                }
            }
            published += readings.len() as u64;
            for (p, payload) in seq.batch(readings) {
                if publisher.publish(p, payload).await.is_err() {
                    return Ok(published);
                }
            }
        }
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let own_broker = if args.own_broker {
        Some(OwnBroker::start(Some(args.broker_nodelay)).await?)
    } else {
        None
    };
    let mqtt_url = own_broker
        .as_ref()
        .map_or_else(pipeline::config::mqtt_url, OwnBroker::url);
    let broker_pid = match &own_broker {
        Some(b) => Some(b.pid()),
        None => std::fs::read_to_string("/run/mosquitto/mosquitto.pid")
            .ok()
            .and_then(|p| p.trim().parse().ok()),
    };
    let db = testkit::TestDatabase::create().await;
    let pool = db.pool.clone();
    let root = format!(
        "bench/ctl-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    println!(
        "trials={} load_rate={} load_meters={} partitions={} workers={} alarms={} batching={} lane={} broker={} nproc={}",
        args.trials,
        args.load_rate,
        args.load_meters,
        args.partitions,
        args.workers,
        if args.via_broker {
            "via-broker"
        } else {
            "in-process"
        },
        if args.fixed_batching {
            "fixed"
        } else {
            "adaptive"
        },
        if args.no_lane { "off" } else { "on" },
        match own_broker.as_ref().map(|b| b.tcp_nodelay) {
            None => "shared",
            Some(false) => "own",
            Some(true) => "own+nodelay",
        },
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let trial_meters: Vec<MeterId> = (0..args.trials)
        .map(|i| MeterId::new(format!("cjt188:77{i:012}")).context("meter id"))
        .collect::<anyhow::Result<_>>()?;
    for m in &trial_meters {
        sqlx::query(
            "INSERT INTO meters (meter_id, protocol, gateway_id, has_valve, auto_close_on_burst) \
             VALUES ($1, 'cjt188', $2, true, true)",
        )
        .bind(m.as_str())
        .bind(GW)
        .execute(&pool)
        .await?;
    }

    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let (tap, local_alarms) = mpsc::unbounded_channel();
    for w in 0..args.workers {
        let mut config = pipeline::worker::WorkerConfig::new(
            &mqtt_url,
            &root,
            w,
            args.workers,
            args.partitions,
        )?;
        config.client_id = format!("ctl-bench-{}-w{w}", std::process::id());
        config.max_batch_delay = Duration::from_millis(args.max_batch_delay_ms);
        config.adaptive_batching = !args.fixed_batching;
        config.priority_lane = !args.no_lane;
        if !args.via_broker {
            config.alarm_tap = Some(tap.clone());
        }
        tasks.push(tokio::spawn(pipeline::worker::run(
            config,
            pool.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        )));
    }
    let control = pipeline::control::service::ServiceConfig::new(
        &mqtt_url,
        &root,
        &format!("ctl-bench-{}-control", std::process::id()),
    )?;
    drop(tap);
    let control_task = tokio::spawn(pipeline::control::service::run_with_local_alarms(
        pool.clone(),
        control,
        shutdown.clone(),
        (!args.via_broker).then_some(local_alarms),
    ));

    // The observer: when each close command reaches the broker's subscribers.
    let broker = pipeline::config::broker_url(&mqtt_url)?;
    let (obs, mut obs_loop) = pipeline::config::mqtt_client(
        &broker,
        format!("ctl-bench-obs-{}", std::process::id()),
        64,
        |o| {
            o.set_keep_alive(Duration::from_secs(30));
        },
    )?;
    obs.subscribe(format!("{root}/{GW}/cmd/#"), QoS::AtLeastOnce)
        .await?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match obs_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        r.send(()).ok();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    let device = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
                    if seen_tx.send((device, at)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .context("observer SUBACK")??;

    let (publisher, _connected) = pipeline::config::BenchPublisher::spawn(
        &broker,
        format!("ctl-bench-pub-{}", std::process::id()),
        root.clone(),
    )?;

    // History: two hour boundaries before the confirming one, 1.5 m³ per hour.
    let now = OffsetDateTime::now_utc();
    let h2 = now
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))?;
    let (h0, h1) = (h2 - time::Duration::hours(2), h2 - time::Duration::hours(1));
    let gw = GatewayId::new(GW).context("gateway id")?;
    let mut trial_seq = Sequencer {
        gateway: gw.clone(),
        next: vec![1; usize::from(args.partitions)],
        partitions: args.partitions,
    };
    let history: Vec<Reading> = trial_meters
        .iter()
        .flat_map(|m| {
            [
                reading(m, h0, Decimal::new(100_000, 3), &gw),
                reading(m, h1, Decimal::new(101_500, 3), &gw),
            ]
        })
        .collect();
    let history_n = history.len() as u64;
    let history = trial_seq.batch(history);
    // Published again until stored: the workers may not have subscribed yet, and the same
    // sequence numbers make a repeat harmless.
    let deadline = Instant::now() + Duration::from_secs(300);
    'stored: loop {
        for (p, payload) in &history {
            publisher.publish(*p, payload.clone()).await?;
        }
        let round = Instant::now() + Duration::from_secs(5);
        while Instant::now() < round {
            if IngestMetrics::get(&metrics.stored) >= history_n {
                break 'stored;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(Instant::now() < deadline, "history not stored within 300 s");
    }
    eprintln!("history stored");

    // Background load, paced per 100 ms slice, on a thread of its own with its own client and
    // runtime: its CPU time (building and serializing the readings, publishing) is read apart
    // from the pipeline's.
    let (load_stop_tx, load_stop) = tokio::sync::watch::channel(false);
    let load = std::thread::Builder::new().name("load-gen".into()).spawn({
        let root = root.clone();
        let broker = broker.clone();
        let partitions = args.partitions;
        let (rate, meters, batch) = (args.load_rate, args.load_meters.max(1), args.batch.max(1));
        move || -> anyhow::Result<u64> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(generate_load(
                broker, root, partitions, rate, meters, batch, load_stop,
            ))
        }
    })?;
    // Let the load reach its rate before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load_gen = thread_stat("load-gen");
    let load_gen_cpu = || load_gen.as_deref().and_then(cpu::stat_cpu_s).unwrap_or(0.0);
    let load_gen_at_start = load_gen_cpu();
    let meter = cpu::CpuMeter::start(&db.name, broker_pid, None)?;
    let stored_at_start = IngestMetrics::get(&metrics.stored);
    let measure_start = Instant::now();
    let mut latencies = Vec::with_capacity(trial_meters.len());
    let mut missed = 0u32;
    for m in &trial_meters {
        if args.trial_gap_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.trial_gap_ms)).await;
        }
        let payloads = trial_seq.batch(vec![reading(m, h2, Decimal::new(103_000, 3), &gw)]);
        let sent = Instant::now();
        for (p, payload) in payloads {
            publisher.publish(p, payload).await?;
        }
        let got = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some((device, at)) = seen_rx.recv().await {
                if device == m.as_str() {
                    return Some(at);
                }
            }
            None
        })
        .await;
        match got {
            Ok(Some(at)) => latencies.push(at - sent),
            _ => missed += 1,
        }
    }
    let elapsed = measure_start.elapsed().as_secs_f64();
    let stored = IngestMetrics::get(&metrics.stored) - stored_at_start;
    let cpu = meter.stop();
    let load_gen_s = (load_gen_cpu() - load_gen_at_start).max(0.0);
    load_stop_tx.send(true).ok();
    let load_published = tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load generator panicked"))??;
    latencies.sort();
    if latencies.is_empty() {
        bail!(
            "no valve-close command seen for any of {} bursts",
            args.trials
        );
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("bursts_measured={} missed={missed}", latencies.len());
    println!("latency_p50_ms={:.1}", ms(percentile(&latencies, 0.50)));
    println!("latency_p99_ms={:.1}", ms(percentile(&latencies, 0.99)));
    println!("latency_max_ms={:.1}", ms(percentile(&latencies, 1.0)));
    println!(
        "background_stored_per_s={:.0} (published {load_published} in total)",
        stored as f64 / elapsed
    );
    // Per background reading: the bursts' own readings are a few hundred among millions.
    let per = |secs: f64| secs * 1e6 / stored.max(1) as f64;
    let pipeline_s = cpu.bench_s - load_gen_s;
    let broker_s = cpu.broker_s.unwrap_or(0.0);
    // The shared background processes count here (unlike in `pipeline-bench`'s totals): the
    // bench's load is most of what they do during the phase.
    let total = cpu.bench_s + cpu.postgres_s + cpu.postgres_background_s + broker_s;
    println!(
        "cpu_us_per_reading={:.2} (bench {:.2} = load generator {:.2} + pipeline {:.2}; postgres {:.2} = own database {:.2} + shared processes {:.2}; mosquitto {:.2})",
        per(total),
        per(cpu.bench_s),
        per(load_gen_s),
        per(pipeline_s),
        per(cpu.postgres_s + cpu.postgres_background_s),
        per(cpu.postgres_s),
        per(cpu.postgres_background_s),
        per(broker_s),
    );
    println!(
        "cpu_s={total:.2} over {elapsed:.1} s ({:.2} cores busy; without the load generator {:.2}); stored_in_phase={stored}; mosquitto pid {}",
        total / elapsed,
        (total - load_gen_s) / elapsed,
        broker_pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
    );
    println!(
        "lane_stored={} loadavg={}",
        IngestMetrics::get(&metrics.lane_stored),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    stop.send(true).ok();
    for t in tasks {
        t.await.ok();
    }
    control_task.await.ok();
    db.drop_database().await;
    Ok(())
}
