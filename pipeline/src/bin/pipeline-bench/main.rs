//! `pipeline-bench --readings N --meters M`: the ingest benchmark of issue 7.
//!
//! Measures in one run, on two fresh databases of the server at `DATABASE_URL`:
//! 1. the raw limit: binary COPY of the same rows into the same narrow schema (`frames`,
//!    `reading_rows`, dictionary keys resolved per chunk; `copy_limit_rows_per_s`);
//! 2. the full path: the same readings published as `ReadingBatch` JSON to the broker at
//!    `MQTT_URL`, consumed by the ingest worker(s), validated, stored with rollups and meter
//!    state (`pipeline_readings_per_s`);
//!
//! then prints the VEE state per meter (`state_bytes_per_meter`), the disk space per stored
//! reading of the second database (`bytes_per_reading`: every table and index of readings,
//! their provenance and dictionaries; `bytes_per_reading_net`: less what the same relations
//! take right after migrating; `key_leaf_density`: the primary keys' leaf fill) and, last,
//! `ratio` (2 over 1).
//!
//! Both phases are also measured in CPU seconds (`cpu.rs`): this process (the publisher
//! thread, i.e. the gateways' work, apart from the workers), the PostgreSQL backends of the
//! phase's database and the broker, printed per reading (`copy_cpu_us_per_row`,
//! `pipeline_cpu_us_per_reading` and their splits, `cpu_ratio`), so a run on a loaded machine
//! still says what an idle one would do. By default the bench runs its own Mosquitto
//! (`broker.rs`; `--own-broker false` uses `MQTT_URL`), and it fails with the counts when no
//! reading arrives for `--stall-timeout-s` instead of waiting for messages a broker dropped.

mod broker;
mod cpu;
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use model::{
    BatchEntry, ClockSource, GatewayId, MeterId, Provenance, Quantity, Reading, ReadingBatch,
    SourceKind, Unit, WIRE_VERSION,
};
use pipeline::ingest::IngestMetrics;
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use time::OffsetDateTime;

#[derive(Parser)]
#[command(
    about = "Ingest benchmark: raw binary COPY limit vs the full MQTT → VEE → PostgreSQL path"
)]
struct Args {
    /// Readings in total.
    #[arg(long, default_value_t = 2_000_000)]
    readings: u64,
    /// Distinct meters (readings are spread evenly, `readings / meters` per meter).
    #[arg(long, default_value_t = 100_000)]
    meters: u64,
    /// Partitions.
    #[arg(long, default_value_t = 16)]
    partitions: u16,
    /// Pipeline workers (in this process; worker i owns partitions p % workers == i).
    #[arg(long, default_value_t = 1)]
    workers: u16,
    /// Readings per MQTT message (a gateway's batch).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Minutes between two reads of one meter.
    #[arg(long, default_value_t = 15)]
    interval_min: i64,
    /// Rows per COPY statement in the raw-limit phase.
    #[arg(long, default_value_t = 100_000)]
    copy_chunk: usize,
    /// Most messages published but not yet consumed (Mosquitto's default queue is 1000).
    #[arg(long, default_value_t = 400)]
    window: u64,
    /// Readings per ingest transaction (default: the worker's own).
    #[arg(long)]
    max_batch_readings: Option<usize>,
    /// Journal fold interval of the workers, milliseconds (default: the worker's own).
    #[arg(long)]
    flush_interval_ms: Option<u64>,
    /// The workers batch as before adaptive batching: every batch waits the batch delay for
    /// company (to compare the two in the same session).
    #[arg(long)]
    fixed_batching: bool,
    /// Keep the two bench databases afterwards.
    #[arg(long)]
    keep: bool,
    /// Run a private Mosquitto for the pipeline phase (free port, no queue limit, stopped at the
    /// end; `false`: the broker at `MQTT_URL`, shared and with Mosquitto's default limit of
    /// 1000 queued messages per client).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    own_broker: bool,
    /// Run a private PostgreSQL 15 cluster with the ingest configuration of
    /// docs/operations.md (temporary directory and free port, removed at the end) instead of
    /// the server at `DATABASE_URL`.
    #[arg(long)]
    own_postgres: bool,
    /// Fail when nothing is published, consumed or stored for this many seconds (a broker
    /// that dropped messages would otherwise make the bench wait forever).
    #[arg(long, default_value_t = 120)]
    stall_timeout_s: u64,
    /// After the pipeline phase, pack every month of the stored readings the way the
    /// `reading-retention` job packs closed months (`scheduler::pack_closed_months`, the bench's
    /// data treated as history) and print `packed_bytes_per_reading=`.
    #[arg(long)]
    pack: bool,
}

/// Generates the benchmark rows: round-major (every meter once per interval, as gateways
/// report), so each MQTT batch holds many meters.
struct Fleet {
    meters: Vec<MeterId>,
    gateway: Vec<GatewayId>,
    start: OffsetDateTime,
    interval: time::Duration,
    rounds: u64,
}

impl Fleet {
    fn new(meters: u64, readings: u64, interval_min: i64, partitions: u16) -> Self {
        let rounds = readings.div_ceil(meters.max(1));
        let interval = time::Duration::minutes(interval_min);
        let now = OffsetDateTime::now_utc();
        let span = interval * i32::try_from(rounds).unwrap_or(i32::MAX);
        Self {
            meters: (0..meters)
                .map(|i| MeterId::new(format!("cjt188:{:014}", 10_000_000 + i)).expect("meter id"))
                .collect(),
            gateway: (0..partitions)
                .map(|p| GatewayId::new(format!("bench-gw-{p}")).expect("gateway id"))
                .collect(),
            start: now - span - time::Duration::hours(1),
            interval,
            rounds,
        }
    }

    fn reading(&self, meter: usize, round: u64, partition: u16) -> Reading {
        let ts = self.start + self.interval * i32::try_from(round).unwrap_or(0);
        // 1..10 L per interval depending on the meter; register starts at meter-specific value.
        let per_round = Decimal::new(1 + (meter as i64 % 10), 3);
        let value = Decimal::new(1000 + meter as i64 % 5000, 0) + per_round * Decimal::from(round);
        // model's own constructors: a field `Reading` gains gets its default here as in every
        // other maker of actual readings, so the bench's cannot drift from production's.
        Reading::actual(
            self.meters[meter].clone(),
            ts,
            ClockSource::Meter,
            (Quantity::Volume, value, Unit::CubicMetre),
            Provenance::new(
                self.gateway[usize::from(partition)].clone(),
                SourceKind::Coap,
                "nbiot",
                format!("{:064x}", meter as u64 * 1_000_003 + round),
                ts + time::Duration::seconds(5),
            ),
        )
    }
}

/// The `--pack` step: packs every month holding readings (as the retention job does with
/// months that ended `pack_after_days` ago; here the bench's data counts as history), checks
/// the `readings` view still holds every reading, and prints the disk per reading of the
/// packed form. Before measuring, `frames` is vacuumed and reindexed: the job leaves the
/// packed frames' space in `frames` to be reused by new frames (a steady state holds only the
/// open months there), while a bench that packs everything would otherwise count it.
async fn pack_and_measure(pool: &PgPool, stored: i64) -> anyhow::Result<()> {
    let at = OffsetDateTime::now_utc() + time::Duration::days(62);
    let t = Instant::now();
    let packed = pipeline::scheduler::pack_closed_months(pool, at, 0, false)
        .await
        .context("packing the bench's months")?;
    let secs = t.elapsed().as_secs_f64();
    let rows: i64 = packed.iter().map(|p| p.2).sum();
    for sql in [
        "VACUUM ANALYZE frames, reading_packs, frame_packs",
        "REINDEX TABLE frames",
    ] {
        sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .with_context(|| format!("{sql} after packing"))?;
    }
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        visible == stored,
        "after packing the readings view holds {visible} readings, expected {stored}"
    );
    println!(
        "packed_months={} packed_segments={} packed_rows={rows} packed_frames={} pack_seconds={secs:.2} pack_readings_per_s={:.0} packed_view_rows={visible}",
        packed.len(),
        packed.iter().map(|p| p.1).sum::<i64>(),
        packed.iter().map(|p| p.3).sum::<i64>(),
        rows as f64 / secs.max(1e-9),
    );
    let sizes: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT t, sum(pg_total_relation_size(c.oid))::int8, sum(pg_indexes_size(c.oid))::int8
         FROM (VALUES
             ('reading_rows'), ('reading_packs'), ('frames'), ('frame_packs'), ('frame_sources'),
             ('reading_details'), ('meter_keys'), ('reading_series'), ('reading_units')) AS v(t)
         JOIN pg_class c ON c.relname = v.t
           OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = v.t::regclass)
         GROUP BY t ORDER BY t",
    )
    .fetch_all(pool)
    .await?;
    let n = stored.max(1) as f64;
    println!(
        "packed_storage_bytes_per_reading {}",
        sizes
            .iter()
            .map(|(t, b, i)| format!("{t}={:.1}(indexes={:.1})", *b as f64 / n, *i as f64 / n))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "packed_bytes_per_reading={:.1}",
        sizes.iter().map(|s| s.1).sum::<i64>() as f64 / n
    );
    Ok(())
}

/// Size of each relation of the stored readings (narrow rows, provenance, dictionaries) with
/// its partitions: (table, everything: heap, TOAST, maps and indexes, the indexes alone).
async fn relation_sizes(pool: &PgPool) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t, sum(pg_total_relation_size(c.oid))::int8, sum(pg_indexes_size(c.oid))::int8
         FROM (VALUES
             ('reading_rows'), ('frames'), ('frame_sources'), ('reading_details'),
             ('meter_keys'), ('reading_series'), ('reading_units')) AS v(t)
         JOIN pg_class c ON c.relname = v.t
           OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = v.t::regclass)
         GROUP BY t ORDER BY t",
    )
    .fetch_all(pool)
    .await
}

/// Prints the leaf fill (pgstattuple's `avg_leaf_density`, %) of the primary keys of
/// `reading_rows`' non-empty partitions and of `frames`. The reading key's fill is what moves
/// `bytes_per_reading` between runs of the same layout: with one new reading per meter per
/// round every leaf splits in the same round, so the fill when the run stops depends on its
/// number of rounds (docs/benchmarks.md, "Fresh bytes per reading"). Skipped with a note when
/// the server has no pgstattuple.
async fn print_key_fill(pool: &PgPool) {
    if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        .execute(pool)
        .await
    {
        println!("key_leaf_density=na ({e})");
        return;
    }
    let fill: Result<Vec<(String, f64)>, sqlx::Error> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, (pgstatindex(i.indexrelid::regclass)).avg_leaf_density
         FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
         WHERE i.indisprimary AND t.relkind = 'r' AND pg_relation_size(t.oid) > 0
           AND (t.relname = 'frames'
                OR t.oid IN (SELECT inhrelid FROM pg_inherits
                             WHERE inhparent = 'reading_rows'::regclass))
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await;
    match fill {
        Ok(fill) => println!(
            "key_leaf_density {}",
            fill.iter()
                .map(|(i, d)| format!("{i}={d:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(e) => println!("key_leaf_density=na ({e})"),
    }
}

async fn create_db(admin: &PgConnectOptions, name: &str) -> anyhow::Result<PgPool> {
    let mut conn = admin
        .connect()
        .await
        .context("connecting to DATABASE_URL")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating {name}"))?;
    conn.close().await.ok();
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .connect_with(admin.clone().database(name))
        .await?;
    pipeline::MIGRATOR.run(&pool).await.context("migrating")?;
    Ok(pool)
}

async fn drop_db(admin: &PgConnectOptions, name: &str) {
    if let Ok(mut conn) = admin.connect().await {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .ok();
    }
}

/// The shared Mosquitto's pid (Debian's service writes it here), for its CPU.
fn system_broker_pid() -> Option<u32> {
    std::fs::read_to_string("/run/mosquitto/mosquitto.pid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The gateways: publishes the pre-encoded batches from a thread (and runtime) of its own, so
/// its CPU is measured apart from the workers'. At most `window` messages are ahead of what
/// the workers consumed.
struct Publisher {
    thread: Option<std::thread::JoinHandle<anyhow::Result<f64>>>,
    connected: Option<tokio::sync::oneshot::Receiver<()>>,
    go: Option<tokio::sync::oneshot::Sender<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl Publisher {
    fn spawn(
        mqtt_url: &str,
        root: String,
        payloads: Vec<(u16, Vec<u8>)>,
        window: u64,
        metrics: Arc<IngestMetrics>,
    ) -> anyhow::Result<Self> {
        let broker = pipeline::config::broker_url(mqtt_url)?;
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&published);
        let thread = std::thread::Builder::new()
            .name("bench-publisher".into())
            .spawn(move || -> anyhow::Result<f64> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let (publisher, connected) = pipeline::config::BenchPublisher::spawn(
                        &broker,
                        format!("bench-pub-{}", std::process::id()),
                        root,
                    )?;
                    if connected.await.is_ok() {
                        connected_tx.send(()).ok();
                    }
                    go_rx.await?;
                    let cpu_at_start = cpu::thread_cpu_s();
                    for (published, (p, payload)) in (0u64..).zip(payloads) {
                        while published.saturating_sub(IngestMetrics::get(&metrics.messages))
                            > window
                        {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        publisher.publish(p, payload).await?;
                        counter.store(published + 1, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Stays connected (PUBACKs, the broker's view) until the phase ends.
                    stop_rx.await.ok();
                    Ok(cpu::thread_cpu_s() - cpu_at_start)
                })
            })?;
        Ok(Self {
            thread: Some(thread),
            connected: Some(connected),
            go: Some(go),
            stop: Some(stop),
            published,
        })
    }

    /// Waits until the publisher's MQTT session is up (at most 30 s).
    async fn connected(&mut self) -> anyhow::Result<()> {
        let rx = self.connected.take().context("connected() twice")?;
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .context("the bench publisher did not connect to the broker within 30 s")?
            .context("the bench publisher stopped before connecting")
    }

    /// Starts publishing.
    fn go(&mut self) {
        if let Some(go) = self.go.take() {
            go.send(()).ok();
        }
    }

    /// Messages handed to the MQTT client so far.
    fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The publisher's error, if it stopped early.
    fn failed(&mut self) -> Option<String> {
        if !self.thread.as_ref()?.is_finished() {
            return None;
        }
        match self.thread.take()?.join() {
            Ok(Ok(_)) => Some("the publisher stopped early".into()),
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("the publisher panicked".into()),
        }
    }

    /// Ends the publisher; returns its CPU seconds from [`Publisher::go`] on.
    fn finish(mut self) -> anyhow::Result<f64> {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        match self
            .thread
            .take()
            .context("the publisher already ended")?
            .join()
        {
            Ok(r) => r,
            Err(_) => anyhow::bail!("the publisher panicked"),
        }
    }
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .init();
    let args = Args::parse();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Interrupted, the bench's future is dropped before `main` returns: its own broker and
    // PostgreSQL cluster stop and their directories go (they would outlive a killed process).
    tokio::select! {
        r = bench(args) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = terminate.recv() => anyhow::bail!("terminated"),
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.meters > 0 && args.readings >= args.meters,
        "need readings >= meters > 0"
    );
    let own_postgres = if args.own_postgres {
        Some(pg::OwnPostgres::start()?)
    } else {
        None
    };
    let cluster = own_postgres.as_ref().map(pg::OwnPostgres::postmaster);
    let admin: PgConnectOptions = match &own_postgres {
        Some(pg) => pg.url(),
        None => pipeline::config::database_url(),
    }
    .parse()?;
    let own_broker = if args.own_broker {
        Some(broker::OwnBroker::start(None).await?)
    } else {
        None
    };
    let (mqtt_url, broker_pid) = match &own_broker {
        Some(b) => (b.url(), Some(b.pid())),
        None => (pipeline::config::mqtt_url(), system_broker_pid()),
    };
    let fleet = Fleet::new(
        args.meters,
        args.readings,
        args.interval_min,
        args.partitions,
    );
    let total = fleet.rounds * args.meters;
    println!(
        "readings={total} meters={} partitions={} workers={} batch={} nproc={}",
        args.meters,
        args.partitions,
        args.workers,
        args.batch,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "broker={} broker_url={mqtt_url} broker_tcp_nodelay={}",
        if own_broker.is_some() {
            "own"
        } else {
            "shared"
        },
        own_broker.as_ref().is_some_and(|b| b.tcp_nodelay)
    );
    println!(
        "postgres={} postgres_settings {}",
        if own_postgres.is_some() {
            "own"
        } else {
            "shared"
        },
        pg::server_settings(&admin).await?
    );
    let partition_of: Vec<u16> = fleet
        .meters
        .iter()
        .map(|m| m.partition(args.partitions))
        .collect();

    // Phase 1: raw binary COPY of the same rows into the same schema.
    let copy_db = format!("wm_bench_copy_{}", std::process::id());
    let pool = create_db(&admin, &copy_db).await?;
    let mut conn = pool.acquire().await?;
    let meter = cpu::CpuMeter::start(&copy_db, None, cluster)?;
    let started = Instant::now();
    // Making the rows is not the COPY's work: its CPU (this thread's, exact to the
    // nanosecond) is taken out of the phase's.
    let mut generator_s = 0.0;
    {
        let mut chunk = Vec::with_capacity(args.copy_chunk);
        let mut gen_started = cpu::thread_cpu_s();
        for round in 0..fleet.rounds {
            for (m, p) in partition_of.iter().enumerate() {
                chunk.push(fleet.reading(m, round, *p));
                if chunk.len() == args.copy_chunk {
                    generator_s += cpu::thread_cpu_s() - gen_started;
                    pipeline::db::readings::copy_readings(&mut conn, &chunk).await?;
                    chunk.clear();
                    gen_started = cpu::thread_cpu_s();
                }
            }
        }
        generator_s += cpu::thread_cpu_s() - gen_started;
        if !chunk.is_empty() {
            pipeline::db::readings::copy_readings(&mut conn, &chunk).await?;
        }
    }
    let copy_secs = started.elapsed().as_secs_f64();
    let mut copy_cpu = meter.stop();
    copy_cpu.bench_s = (copy_cpu.bench_s - generator_s).max(0.0);
    drop(conn);
    let copied: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(copied as u64 == total, "copied {copied} of {total}");
    let copy_rate = total as f64 / copy_secs;
    println!("copy_limit_seconds={copy_secs:.2}");
    println!("copy_limit_rows_per_s={copy_rate:.0}");
    let per_row = |s: f64| s * 1e6 / total as f64;
    println!(
        "copy_cpu_us_per_row={:.2} copy_bench_cpu_us_per_row={:.2} copy_postgres_cpu_us_per_row={:.2} copy_postgres_background_cpu_us_per_row={:.2} copy_generator_cpu_us_per_row={:.2} copy_load_average={}..{}",
        per_row(copy_cpu.total_s()),
        per_row(copy_cpu.bench_s),
        per_row(copy_cpu.postgres_s),
        per_row(copy_cpu.postgres_background_s),
        per_row(generator_s),
        copy_cpu.load.0,
        copy_cpu.load.1,
    );
    pool.close().await;
    if !args.keep {
        drop_db(&admin, &copy_db).await;
    }

    // Phase 2: the full path.
    let pipe_db = format!("wm_bench_pipe_{}", std::process::id());
    let pool = create_db(&admin, &pipe_db).await?;
    let empty_sizes = relation_sizes(&pool).await?;
    let root = format!("bench/{}-{:08x}", std::process::id(), rand::random::<u32>());
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let mut config = pipeline::worker::WorkerConfig::new(
            &mqtt_url,
            &root,
            w,
            args.workers,
            args.partitions,
        )?;
        config.client_id = format!("bench-{}-w{w}", std::process::id());
        config.adaptive_batching = !args.fixed_batching;
        if let Some(n) = args.max_batch_readings {
            config.max_batch_readings = n;
        }
        if let Some(ms) = args.flush_interval_ms {
            config.flush_interval = Duration::from_millis(ms);
        }
        // The fleet's reads are back-dated (receive times hours old), so a communication-loss
        // sweep during the run would judge every meter silent and write 100 000 raises and
        // clears: a periodic job, not the ingest path this measures. It used never to fire only
        // because runs were shorter than its first tick (60 s).
        config.sweep_interval = Duration::from_secs(24 * 3600);
        workers.push(tokio::spawn(pipeline::worker::run(
            config,
            pool.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        )));
    }
    // Let the workers subscribe before timing starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by_partition: Vec<Vec<usize>> = (0..args.partitions)
        .map(|p| {
            (0..fleet.meters.len())
                .filter(|m| partition_of[*m] == p)
                .collect()
        })
        .collect();
    // The gateways' JSON is encoded before the clock starts: encoding it is the gateways' work,
    // and doing it here would take CPU from the pipeline under test on this 2-core machine.
    let mut seq = vec![1u64; usize::from(args.partitions)];
    let mut payloads: Vec<(u16, Vec<u8>)> = Vec::new();
    for round in 0..fleet.rounds {
        for p in 0..args.partitions {
            for chunk in by_partition[usize::from(p)].chunks(args.batch) {
                let s = &mut seq[usize::from(p)];
                let entries: Vec<BatchEntry> = chunk
                    .iter()
                    .map(|m| {
                        let e = BatchEntry {
                            seq: *s,
                            reading: fleet.reading(*m, round, p),
                        };
                        *s += 1;
                        e
                    })
                    .collect();
                let batch = ReadingBatch {
                    v: WIRE_VERSION,
                    gateway: fleet.gateway[usize::from(p)].clone(),
                    partition: p,
                    sent_at: OffsetDateTime::now_utc(),
                    incarnation: None,
                    prev: None,
                    entries,
                };
                payloads.push((p, serde_json::to_vec(&batch)?));
            }
        }
    }
    let messages_total = payloads.len() as u64;
    let mut publisher = Publisher::spawn(
        &mqtt_url,
        root.clone(),
        payloads,
        args.window,
        Arc::clone(&metrics),
    )?;
    publisher.connected().await?;
    let meter = cpu::CpuMeter::start(&pipe_db, broker_pid, cluster)?;
    let started = Instant::now();
    publisher.go();
    // Done when every reading is stored and its rollups and meter state are folded in.
    let stall = Duration::from_secs(args.stall_timeout_s);
    let mut last_progress = (0, 0, 0, 0);
    let mut progressed_at = Instant::now();
    while IngestMetrics::get(&metrics.stored) < total
        || IngestMetrics::get(&metrics.pending_spans) > 0
    {
        let now = (
            publisher.published(),
            IngestMetrics::get(&metrics.messages),
            IngestMetrics::get(&metrics.stored),
            IngestMetrics::get(&metrics.flushes),
        );
        if now != last_progress {
            last_progress = now;
            progressed_at = Instant::now();
        }
        if let Some(e) = publisher.failed() {
            anyhow::bail!("publishing failed: {e}");
        }
        anyhow::ensure!(
            progressed_at.elapsed() < stall,
            "no progress for {} s: {} of {messages_total} messages published, {} consumed by \
             the workers, {} of {total} readings stored ({} already stored, {} duplicates, {} \
             rejected before storage, {} batches held back after a gap), {} journal folds; a \
             broker that drops messages (Mosquitto's max_queued_messages, 1000 by default) \
             loses them for good here (`--own-broker true` has no limit)",
            args.stall_timeout_s,
            now.0,
            now.1,
            now.2,
            IngestMetrics::get(&metrics.already_stored),
            IngestMetrics::get(&metrics.duplicates),
            IngestMetrics::get(&metrics.unstorable),
            IngestMetrics::get(&metrics.gaps),
            now.3,
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pipe_secs = started.elapsed().as_secs_f64();
    let pipe_cpu = meter.stop();
    let publisher_s = publisher.finish()?;
    let pipe_rate = total as f64 / pipe_secs;
    stop.send(true).ok();
    for w in workers {
        w.await??;
    }
    for w in 0..args.workers {
        pipeline::worker::forget_session(&mqtt_url, &format!("bench-{}-w{w}", std::process::id()))
            .await
            .ok();
    }
    let rss = rss_bytes();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&pool)
        .await?;
    let validated: i64 =
        sqlx::query_scalar("SELECT count(*) FROM readings WHERE quality = 'validated'")
            .fetch_one(&pool)
            .await?;
    // The hourly rows the API would derive (migration 0151: no longer a table), counted from
    // the billable reads in one pass instead of through the per-meter view.
    let hourly: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT (meter_id, date_trunc('hour', ts, 'UTC'))) FROM readings
         WHERE quantity = 'volume' AND tariff = 0 AND subunit = 0 AND storage = 0
           AND quality IN ('validated', 'estimated', 'edited')",
    )
    .fetch_one(&pool)
    .await?;
    // Every meter's register rises by its per-round step each round: the daily rollups must
    // hold exactly that.
    let daily: String = sqlx::query_scalar("SELECT sum(consumption)::text FROM rollup_daily")
        .fetch_one(&pool)
        .await?;
    let expected_daily: Decimal = (0..fleet.meters.len())
        .map(|m| {
            Decimal::new(1 + (m as i64 % 10), 3) * Decimal::from(fleet.rounds.saturating_sub(1))
        })
        .sum();
    anyhow::ensure!(
        daily.parse::<Decimal>().ok() == Some(expected_daily),
        "daily rollups hold {daily} m3, expected {expected_daily}"
    );
    let states: i64 = sqlx::query_scalar("SELECT count(*) FROM meter_state")
        .fetch_one(&pool)
        .await?;
    // The state a worker holds is what it rebuilds on restart: measure that.
    let mut vee =
        pipeline::db::meter_state::load_vee(&pool, pipeline::vee::VeeConfig::default(), |_| true)
            .await?;
    let per_meter = vee.state_bytes() as f64 / vee.meters().max(1) as f64;
    println!(
        "pipeline_seconds={pipe_secs:.2} stored={stored} validated={validated} rollup_hourly_rows={hourly} rollup_daily_consumption={daily} meter_state_rows={states} messages={} commits={} journal_flushes={} slow_path_conflicts={}",
        IngestMetrics::get(&metrics.messages),
        IngestMetrics::get(&metrics.commits),
        IngestMetrics::get(&metrics.flushes),
        IngestMetrics::get(&metrics.conflicts),
    );
    if let Some(rss) = rss {
        println!("process_rss_mb={:.0}", rss as f64 / 1e6);
    }
    println!("state_meters={}", vee.meters());
    println!("state_bytes_per_meter={per_meter:.0}");
    // The detectors' state beside it, rebuilt the same way (checkpointed `detector_state`) and,
    // as in the worker, indexed through VEE's meter states: VEE's bytes after it show that the
    // index adds nothing there.
    let det = pipeline::detect::store::load_on(
        &pool,
        pipeline::detect::DetectConfig::default(),
        |_| true,
        std::iter::empty(),
        &mut vee,
    )
    .await?;
    println!(
        "detector_state_rows={} detector_bytes_per_meter={:.0} state_bytes_per_meter_with_detectors={:.0}",
        det.meters(),
        det.state_bytes() as f64 / det.meters().max(1) as f64,
        vee.state_bytes() as f64 / vee.meters().max(1) as f64
    );
    println!("pipeline_readings_per_s={pipe_rate:.0}");
    let per_reading = |s: f64| s * 1e6 / total as f64;
    let pipe_us = per_reading(pipe_cpu.total_s());
    println!(
        "pipeline_cpu_us_per_reading={pipe_us:.2} bench_workers_cpu_us_per_reading={:.2} bench_publisher_cpu_us_per_reading={:.2} postgres_cpu_us_per_reading={:.2} broker_cpu_us_per_reading={} postgres_background_cpu_us_per_reading={:.2} pipeline_load_average={}..{}",
        per_reading((pipe_cpu.bench_s - publisher_s).max(0.0)),
        per_reading(publisher_s),
        per_reading(pipe_cpu.postgres_s),
        pipe_cpu
            .broker_s
            .map_or_else(|| "na".to_owned(), |b| format!("{:.2}", per_reading(b))),
        per_reading(pipe_cpu.postgres_background_s),
        pipe_cpu.load.0,
        pipe_cpu.load.1,
    );
    // Rates an idle machine would reach if the phase were bound by CPU alone: the pipeline
    // spreads over every core (two workers, PostgreSQL backends, broker, publisher); the raw
    // COPY is one connection whose client and backend take turns, so one core.
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let copy_us = per_row(copy_cpu.total_s());
    println!(
        "cpu_ratio={:.3} pipeline_cpu_bound_readings_per_s={:.0} copy_cpu_bound_rows_per_s={:.0} pipeline_cpu_utilisation={:.2} copy_cpu_utilisation={:.2}",
        copy_us / pipe_us.max(1e-9),
        cores * 1e6 / pipe_us.max(1e-9),
        1e6 / copy_us.max(1e-9),
        pipe_cpu.total_s() / pipe_cpu.wall_s.max(1e-9),
        copy_cpu.total_s() / copy_cpu.wall_s.max(1e-9),
    );
    // Disk per reading, after a checkpoint-free VACUUM-less read of the relation sizes: the
    // narrow rows and their index, provenance (frames, frame_sources) and dictionaries.
    // Per table: everything (heap, TOAST, maps, indexes) and the indexes alone, so the
    // breakdown in docs/benchmarks.md can be read off one run.
    let sizes = relation_sizes(&pool).await?;
    let total_bytes: i64 = sizes.iter().map(|s| s.1).sum();
    println!(
        "storage_bytes {}",
        sizes
            .iter()
            .map(|(t, b, _)| format!("{t}={b}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "storage_bytes_per_reading {}",
        sizes
            .iter()
            .map(|(t, b, i)| {
                let n = stored.max(1) as f64;
                format!("{t}={:.1}(indexes={:.1})", *b as f64 / n, *i as f64 / n)
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "bytes_per_reading={:.1}",
        total_bytes as f64 / stored.max(1) as f64
    );
    // The same relations right after migrating hold no reading but take space (mostly the
    // indexes of the ~37 empty monthly partitions prepared around now, ~104 KiB each): a fixed
    // cost that a short run spreads over few readings (14 bytes per reading at 300 000).
    let empty_bytes: i64 = empty_sizes.iter().map(|s| s.1).sum();
    println!(
        "empty_schema_bytes={empty_bytes} bytes_per_reading_net={:.1}",
        (total_bytes - empty_bytes) as f64 / stored.max(1) as f64
    );
    println!(
        "storage_bytes_per_reading_net {}",
        sizes
            .iter()
            .map(|(t, b, i)| {
                let (eb, ei) = empty_sizes
                    .iter()
                    .find(|e| e.0 == *t)
                    .map_or((0, 0), |e| (e.1, e.2));
                let n = stored.max(1) as f64;
                format!(
                    "{t}={:.1}(indexes={:.1})",
                    (b - eb) as f64 / n,
                    (i - ei) as f64 / n
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    print_key_fill(&pool).await;
    // The write-behind tables beside the readings, apart from bytes_per_reading (which counts
    // the readings, their provenance and dictionaries only): per meter rather than per reading
    // in the field, so they are shown on their own line. A view counts 0.
    let behind: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t, coalesce((SELECT pg_total_relation_size(c.oid) FROM pg_class c
                              WHERE c.relname = t AND c.relkind = 'r'), 0)::int8
         FROM unnest(ARRAY['rollup_hourly', 'rollup_daily', 'meter_state', 'detector_state',
                           'ingest_journal']) AS t",
    )
    .fetch_all(&pool)
    .await?;
    println!(
        "write_behind_bytes_per_reading {}",
        behind
            .iter()
            .map(|(t, b)| format!("{t}={:.1}", *b as f64 / stored.max(1) as f64))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if args.pack {
        pack_and_measure(&pool, stored).await?;
    }
    pool.close().await;
    if !args.keep {
        drop_db(&admin, &pipe_db).await;
    }
    println!("ratio={:.3}", pipe_rate / copy_rate);
    Ok(())
}
