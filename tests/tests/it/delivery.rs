//! Issue 25, "nothing accepted is ever lost": poison readings, the default partition, and the
//! end-to-end delivery guarantee through faults (a broker queue limit of 10, a PostgreSQL
//! outage, a worker stopped while it cannot commit, a broker killed with kill -9), each
//! counting readings spooled against readings stored, exactly.
//!
//! The broker faults use a Mosquitto started by the test on a free port (never the shared
//! one); the PostgreSQL outage is a TCP proxy in front of the shared server that the test
//! cuts (the server itself is never stopped). Short forms run in CI; `WM_SOAK=1` runs the
//! long ones (2-minute outages, 200,000 readings).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gateway::mqtt::MqttEndpoint;
use gateway::spool::{Spool, SpoolConfig, SpoolWriter};
use gateway::uplink::{self, UplinkOptions, UplinkStats};
use model::{BatchEntry, Decimal, GatewayId, Reading, ReadingBatch, SourceKind, WIRE_VERSION};
use pipeline::ingest::IngestMetrics;
use pipeline::worker::WorkerConfig;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use testkit::TestDatabase;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::common::{RunningWorker, spawn_worker};

const PARTITIONS: u16 = 4;

fn soak() -> bool {
    std::env::var("WM_SOAK").is_ok_and(|v| v == "1")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A Mosquitto of the test's own, on a free port, that can be killed and restarted.
struct Broker {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    async fn start(max_queued: u32, persistence: bool) -> Self {
        Self::start_with(max_queued, persistence, "").await
    }

    async fn start_with(max_queued: u32, persistence: bool, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages {max_queued}\n\
             persistence {persistence}\npersistence_location {}/\nautosave_interval 1800\n{extra}",
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut b = Self {
            port,
            dir,
            child: None,
        };
        b.spawn().await;
        b
    }

    async fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto installed (scripts/services.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "own mosquitto did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait: a clean stop (Mosquitto saves its persistence file).
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .ok();
            c.wait().ok();
        }
    }

    /// kill -9, as a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy in front of PostgreSQL: `cut` drops every connection and refuses new ones.
struct PgProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
}

impl PgProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let gen_tx = generation.clone();
        let is_open = Arc::clone(&open);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                let mut cut = gen_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            generation,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn start_worker(
    pool: sqlx::PgPool,
    broker_url: &str,
    root: &str,
    client_id: &str,
) -> RunningWorker {
    let mut config = WorkerConfig::new(broker_url, root, 0, 1, PARTITIONS).unwrap();
    config.client_id = client_id.to_owned();
    config.max_batch_readings = 2_000;
    spawn_worker(config, pool)
}

/// Reading `i` of a run: ten seconds apart from 30 days ago, so even the soak's 200,000 stay
/// in the past (one minute apart, readings past 73,440 were dated more than 31 days ahead and
/// refused as `timestamp_out_of_range`, which looked like loss in the soak runs).
fn reading(meter: &str, gateway: &str, i: i64) -> Reading {
    let ts = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::days(30)
        + time::Duration::seconds(10 * i);
    testkit::reading(meter)
        .ts(ts)
        .milli(1_000 + i)
        .gateway(gateway)
        .source(SourceKind::Coap, "nb")
        .frame_hash("ab".repeat(32))
        .received_at(ts + time::Duration::seconds(2))
        .build()
}

/// A plain MQTT client on `url`, its events forwarded (publishes only).
fn client(url: &str, name: &str) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let model::BrokerUrl { host, port, .. } = pipeline::config::broker_url(url).unwrap();
    let mut o = MqttOptions::new(
        format!("{name}-{}", wm_tests::unique_prefix("c").replace('/', "-")),
        host,
        port,
    );
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (c, mut el) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (c, rx)
}

/// One sample of a gateway's `/metrics` (0 when absent or when the gateway does not answer,
/// e.g. a process still starting).
async fn gateway_metric(addr: SocketAddr, sample: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(10), fetch).await else {
        return 0;
    };
    body.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Sum of every sample of a metric family whose labels start with `prefix` (e.g. all kinds
/// of one source's decode errors).
async fn gateway_metric_sum(addr: SocketAddr, prefix: &str) -> BTreeMap<String, u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            Some((name.to_owned(), v.parse().ok()?))
        })
        .collect()
}

async fn wait_until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows stored for `gateway` that came from it (VEE's gap estimates, which a reading arriving
/// late after a fault can cause, are not "in"): (rows, distinct keys).
async fn stored(pool: &sqlx::PgPool, gateway: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT (meter_id, ts, quantity, tariff, subunit))
           FROM readings WHERE gateway_id = $1 AND quality <> 'estimated'",
    )
    .bind(gateway)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// One reading whose value overflows `numeric(20, 6)`, one with a NUL byte and one dated far
/// in the future sit in a batch of 500: the other 497 are stored, the three are refused with
/// typed reasons in `ingest_rejects`, and the batch is acknowledged end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_readings_are_refused_alone_and_the_batch_is_acknowledged() {
    let db = TestDatabase::create().await;
    let root = wm_tests::unique_prefix("poison");
    let url = pipeline::config::mqtt_url();
    let (publisher, mut acks) = client(&url, "poison-pub");
    publisher
        .subscribe(format!("{root}/gw-poison/ingest-ack"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let w = start_worker(
        db.pool.clone(),
        &url,
        &root,
        &format!("{}-w", root.replace('/', "-")),
    );
    let meter = (0..)
        .map(|i| format!("cjt188:{:014}", 9_000 + i))
        .find(|m| model::partition_of(m, PARTITIONS) == 1)
        .unwrap();
    let mut entries: Vec<BatchEntry> = (1..=500)
        .map(|i| BatchEntry {
            seq: i as u64,
            reading: reading(&meter, "gw-poison", i),
        })
        .collect();
    entries[99].reading.value = Decimal::from(100_000_000_000_000i64);
    entries[199].reading.provenance.source_id = "bad\0id".into();
    entries[299].reading.ts = OffsetDateTime::now_utc() + time::Duration::days(3650);
    let batch = ReadingBatch {
        v: WIRE_VERSION,
        gateway: GatewayId::new("gw-poison").unwrap(),
        partition: 1,
        sent_at: OffsetDateTime::now_utc(),
        incarnation: Some("00c0ffee00c0ffee".into()),
        prev: None,
        entries,
    };
    let payload = serde_json::to_vec(&batch).unwrap();
    // The worker may still be subscribing: publish until the acknowledgement arrives.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ack = loop {
        publisher
            .publish(
                format!("{root}/readings/1"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
        if let Ok(Some((_, p))) = tokio::time::timeout(Duration::from_secs(2), acks.recv()).await {
            break serde_json::from_slice::<model::IngestAck>(&p).unwrap();
        }
        assert!(Instant::now() < deadline, "no ingest acknowledgement");
    };
    assert_eq!(
        ack,
        model::IngestAck {
            v: WIRE_VERSION,
            incarnation: "00c0ffee00c0ffee".into(),
            partition: 1,
            seq: 500
        }
    );
    assert_eq!(stored(&db.pool, "gw-poison").await, (497, 497));
    let kinds: Vec<(String, i64)> =
        sqlx::query_as("SELECT kind, count(*) FROM ingest_rejects GROUP BY kind ORDER BY kind")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let kinds: BTreeMap<String, i64> = kinds
        .into_iter()
        .filter(|(k, _)| k != "unknown_version")
        .collect();
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("nul_byte".to_owned(), 1),
            ("timestamp_out_of_range".to_owned(), 1),
            ("value_out_of_range".to_owned(), 1),
        ])
    );
    assert_eq!(IngestMetrics::get(&w.metrics.unstorable), 3);
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    db.drop_database().await;
}

/// A reading the pre-COPY checks let through but the database refuses (here: a `source_id`
/// longer than a check the test adds to its provenance source) is found by bisection and refused alone;
/// the rest of the batch commits, and the refused read leaves no span in the journal: the
/// daily rollup holds the stored reads only, its consumption from the first stored value to
/// the last (the refused read's share moved to the next span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_the_database_refuses_is_isolated_and_leaves_no_span() {
    let db = TestDatabase::create().await;
    // The `readings` view depends on the column, so its type cannot be narrowed; a check
    // refuses the same rows.
    sqlx::query("ALTER TABLE frame_sources ADD CONSTRAINT test_short_source_id CHECK (length(source_id) <= 8)")
        .execute(&db.pool)
        .await
        .unwrap();
    let root = wm_tests::unique_prefix("bisect");
    let url = pipeline::config::mqtt_url();
    let (publisher, mut acks) = client(&url, "bisect-pub");
    publisher
        .subscribe(format!("{root}/gw-bisect/ingest-ack"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let w = start_worker(
        db.pool.clone(),
        &url,
        &root,
        &format!("{}-w", root.replace('/', "-")),
    );
    let meter = (0..)
        .map(|i| format!("cjt188:{:014}", 7_000 + i))
        .find(|m| model::partition_of(m, PARTITIONS) == 2)
        .unwrap();
    let mut entries: Vec<BatchEntry> = (1..=10)
        .map(|i| BatchEntry {
            seq: i as u64,
            reading: reading(&meter, "gw-bisect", i),
        })
        .collect();
    // Passes `check_storable` (256 bytes allowed), refused by varchar(8): SQLSTATE 22001.
    entries[4].reading.provenance.source_id = "longer-than-eight".into();
    let batch = ReadingBatch {
        v: WIRE_VERSION,
        gateway: GatewayId::new("gw-bisect").unwrap(),
        partition: 2,
        sent_at: OffsetDateTime::now_utc(),
        incarnation: Some("00b15ec700b15ec7".into()),
        prev: None,
        entries,
    };
    let payload = serde_json::to_vec(&batch).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ack = loop {
        publisher
            .publish(
                format!("{root}/readings/2"),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .unwrap();
        if let Ok(Some((_, p))) = tokio::time::timeout(Duration::from_secs(2), acks.recv()).await {
            break serde_json::from_slice::<model::IngestAck>(&p).unwrap();
        }
        assert!(Instant::now() < deadline, "no ingest acknowledgement");
    };
    assert_eq!(ack.seq, 10);
    assert_eq!(stored(&db.pool, "gw-bisect").await, (9, 9));
    assert_eq!(IngestMetrics::get(&w.metrics.isolated), 1);
    let refused: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, meter_id FROM ingest_rejects WHERE kind <> 'unknown_version'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        refused,
        vec![("database_refused".to_owned(), meter.clone())]
    );
    // Stopping folds and checkpoints the journal.
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    assert_eq!(IngestMetrics::get(&w.metrics.pending_spans), 0);
    let journal: i64 = sqlx::query_scalar("SELECT count(*) FROM ingest_journal")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(journal, 0, "no journal record left behind");
    let (reads, consumption): (i64, Decimal) = sqlx::query_as(
        "SELECT sum(read_count)::int8, sum(consumption) FROM rollup_daily WHERE meter_id = $1",
    )
    .bind(&meter)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Stored values 1.001 … 1.010 without 1.005: consumption 1.010 − 1.001.
    assert_eq!((reads, consumption), (9, Decimal::new(9, 3)));
    db.drop_database().await;
}

/// A reading already sitting in `readings_default` for a month that has no partition yet (as
/// stored before ingest refused such reads) no longer stops a worker from starting: the month
/// is created around it and the row moves into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_in_the_default_partition_does_not_stop_a_worker() {
    let db = TestDatabase::create().await;
    let month: String = sqlx::query_scalar(
        "SELECT to_char(date_trunc('month', now()) + interval '2 months', 'YYYYMM')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(&format!("DROP TABLE readings_{month}"))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut future = reading("cjt188:00000000000042", "gw-default", 0);
    future.ts = OffsetDateTime::now_utc() + time::Duration::days(62);
    pipeline::db::readings::insert_readings(&db.pool, &[future])
        .await
        .unwrap();
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM readings_default")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_default, 1);
    // What used to fail: "updated partition constraint for default partition would be violated".
    let created = pipeline::db::partitions::ensure_partitions(&db.pool, 3)
        .await
        .unwrap();
    assert!(created >= 1);
    let (in_default, in_month): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM readings_default), (SELECT count(*) FROM readings_{month})"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((in_default, in_month), (0, 1));
    db.drop_database().await;
}

/// Writes `n` readings into the spool as a gateway's sources would, spread over meters.
fn spool_readings(writer: &mut SpoolWriter, gateway: &str, from: i64, n: i64) {
    for i in from..from + n {
        writer
            .append(&[reading(&format!("cjt188:{:014}", 100 + i % 50), gateway, i)])
            .unwrap();
        if i % 500 == 0 {
            writer.sync().unwrap();
        }
    }
    writer.sync().unwrap();
}

/// The guarantee end to end: a gateway uplink and a worker on a broker whose queue holds only
/// 10 messages per client, PostgreSQL cut for a while (the worker reports itself stuck and
/// still stops within seconds when asked), the worker restarted, the broker killed with
/// kill -9 (no persistence) and restarted; afterwards every spooled reading is stored exactly
/// once and the spool is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spooled_reading_is_stored_once_through_broker_and_database_faults() {
    let outage = if soak() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(12)
    };
    let total: i64 = if soak() { 200_000 } else { 12_000 };
    let gw = "gw-faults";
    let started = Instant::now();
    let db = TestDatabase::create().await;
    let host_port = db
        .url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("DATABASE_URL of the form postgres://user@host:port/db")
        .to_owned();
    let pg: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .unwrap()
        .next()
        .unwrap();
    let proxy = PgProxy::start(pg).await;
    let proxied_url = db.url.replace(&host_port, &proxy.addr.to_string());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&proxied_url)
        .await
        .unwrap();
    let mut broker = Broker::start(10, false).await;
    let root = wm_tests::unique_prefix("faults");
    let worker_id = format!("{}-w", root.replace('/', "-"));

    let dir = tempfile::tempdir().unwrap();
    let (spool, mut writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
    let stats = Arc::new(UplinkStats::default());
    let shutdown = CancellationToken::new();
    let opts = UplinkOptions {
        endpoint: MqttEndpoint::parse(&broker.url()).unwrap(),
        client_id: format!("{}-up", root.replace('/', "-")),
        topic_root: root.clone(),
        gateway: GatewayId::new(gw).unwrap(),
        partitions: PARTITIONS,
        batch_size: 200,
        window: 8,
        ack_timeout: Some(Duration::from_secs(2)),
        max_unacked: 200 * 8 * 8,
    };
    let up = tokio::spawn(uplink::run(
        opts,
        spool.clone(),
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    let mut w = start_worker(pool.clone(), &broker.url(), &root, &worker_id);

    // Phase 1: steady traffic.
    let quarter = total / 4;
    spool_readings(&mut writer, gw, 0, quarter);
    // Phase 2: PostgreSQL unreachable while readings keep coming; the broker's queue of 10
    // overflows and drops, which end-to-end acknowledgement must make up for.
    proxy.cut();
    spool_readings(&mut writer, gw, quarter, quarter);
    let m = Arc::clone(&w.metrics);
    // Eight failed attempts, each up to the pool's 2 s acquire timeout plus a growing pause
    // (about 22 s in all on a loaded machine): the deadline only bounds a worker that never says.
    wait_until(
        "worker reports itself stuck",
        outage.max(Duration::from_secs(60)),
        || IngestMetrics::get(&m.stuck) == 1,
    )
    .await;
    tokio::time::sleep(outage.saturating_sub(Duration::from_secs(10))).await;
    // SIGTERM while it cannot commit: it stops within seconds, committing nothing half.
    let asked = Instant::now();
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), &mut w.task)
        .await
        .expect("a stuck worker honours shutdown within seconds")
        .unwrap()
        .unwrap();
    let stop_time = asked.elapsed();
    proxy.restore();
    w = start_worker(pool.clone(), &broker.url(), &root, &worker_id);
    // Phase 3: the broker crashes (kill -9, no persistence) and comes back.
    spool_readings(&mut writer, gw, 2 * quarter, quarter);
    broker.kill();
    spool_readings(&mut writer, gw, 3 * quarter, total - 3 * quarter);
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.spawn().await;
    let recovery = Instant::now();
    let limit = if soak() {
        Duration::from_secs(900)
    } else {
        Duration::from_secs(150)
    };
    let s = spool.clone();
    wait_until("spool emptied by ingest acknowledgements", limit, || {
        s.stats().depth == 0
    })
    .await;
    let recovery = recovery.elapsed();
    let (rows, distinct) = stored(&pool, gw).await;
    assert_eq!(
        (rows, distinct),
        (total, total),
        "every spooled reading stored exactly once"
    );
    assert_eq!(spool.stats().evicted, 0);
    eprintln!(
        "delivery: in {total}, stored {rows}, lost {}, duplicated {}, stuck-worker stop {:?}, \
         recovery after the broker restart {:?}, resends {}, total {:?}",
        total - distinct,
        rows - distinct,
        stop_time,
        recovery,
        stats.resends.load(Ordering::Relaxed),
        started.elapsed()
    );
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    shutdown.cancel();
    up.await.unwrap();
    pool.close().await;
    db.drop_database().await;
}

/// A backlog of concentrator messages (100,000 with `WM_SOAK=1`, 4,000 in CI) queued for the
/// gateway's concentrator source while it was stopped, on a site broker without in-flight limit,
/// floods in at once when it starts. Before, the source deadlocked after a few hundred
/// messages (event loop waiting on a full event channel, handler waiting in `ack()`); now every
/// message is spooled and published, and the source stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_backlog_floods_in_without_deadlock() {
    // The pace is the disk's (messages in flight share group commits): the CI form is smaller.
    let n: usize = std::env::var("WM_BACKLOG_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if soak() { 100_000 } else { 4_000 });
    let site = Broker::start_with(0, false, "max_inflight_messages 0\n").await;
    let root = wm_tests::unique_prefix("backlog");
    let cid = root.replace('/', "-");
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"gateway_id = "gw-backlog"
[uplink]
broker = "{url}"
client_id = "{cid}-gw"
topic_root = "{root}"
ack_timeout_s = 0
batch_size = 1000
[spool]
dir = "{spool}"
[metrics]
listen = "127.0.0.1:0"
[[source]]
id = "conc"
kind = "mqtt"
broker = "{url}"
client_id = "{cid}-conc"
topics = [{{ filter = "site/+/readings", format = "json" }}]
"#,
        url = site.url(),
        spool = dir.path().display(),
    );
    let config = edge_config::parse(&toml, "t.toml".as_ref()).unwrap();
    // First start: the source's persistent session and subscription exist from then on. The
    // probes are undecodable, so they add nothing to the spool: a probe published before the
    // source's SUBSCRIBE reached the broker is dropped (nobody has subscribed yet), and the
    // test used to count every *published* probe as spooled: that was the intermittent
    // "3999 of 4000 spooled" (issue 25), not a lost backlog message.
    let gateway = gateway::runtime::Gateway::start(config.clone())
        .await
        .unwrap();
    let (publisher, _rx) = client(&site.url(), "backlog-pub");
    wait_subscribed(&publisher, gateway.metrics_addr()).await;
    let before = gateway.spool().stats().next_seq;
    gateway.shutdown().await;
    let probe = r#"{"v":1,"readings":[{"meter":"cjt188:00000000000001","ts":"2026-11-24T09:00:00Z","volume_m3":"1"}]}"#;
    // The backlog: n messages of one reading each, queued by the broker for the source.
    for i in 0..n {
        let body = format!(
            r#"{{"v":1,"readings":[{{"meter":"cjt188:{:014}","ts":"2026-11-24T10:00:00Z","volume_m3":"{}.5"}}]}}"#,
            10_000 + i % 1000,
            i
        );
        publisher
            .publish(
                format!("site/c{}/readings", i % 7),
                QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let gateway = gateway::runtime::Gateway::start(config).await.unwrap();
    let spool = gateway.spool().clone();
    let limit = Duration::from_secs(if soak() { 1800 } else { 150 });
    let deadline = Instant::now() + limit;
    while spool.stats().next_seq < before + n as u64 {
        assert!(
            Instant::now() < deadline,
            "backlog not spooled in {limit:?}: {} of {n} (the source is deadlocked or slow)",
            spool.stats().next_seq.saturating_sub(before)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "backlog: {n} messages spooled in {elapsed:?} ({:.0} messages/s)",
        n as f64 / elapsed.as_secs_f64()
    );
    // Still connected and working: one more message goes through.
    let after = spool.stats().next_seq;
    publisher
        .publish("site/c0/readings", QoS::AtLeastOnce, false, probe)
        .await
        .unwrap();
    wait_until(
        "a message after the backlog",
        Duration::from_secs(20),
        || spool.stats().next_seq > after,
    )
    .await;
    assert_eq!(spool.stats().next_seq, before + n as u64 + 1);
    gateway.shutdown().await;
}

/// Ten gateway crashes during a run (the uplink task aborted mid-flight and the spool reopened
/// from disk, as after kill -9; 200,000 readings with `WM_SOAK=1`): every reading spooled is
/// stored exactly once, re-sends included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_gateway_crashes_lose_and_duplicate_nothing() {
    let total: i64 = if soak() { 200_000 } else { 10_000 };
    let gw = "gw-crashes";
    let db = TestDatabase::create().await;
    let url = pipeline::config::mqtt_url();
    let root = wm_tests::unique_prefix("crashes");
    let cid = root.replace('/', "-");
    let w = start_worker(db.pool.clone(), &url, &root, &format!("{cid}-w"));
    let dir = tempfile::tempdir().unwrap();
    let opts = UplinkOptions {
        endpoint: MqttEndpoint::parse(&url).unwrap(),
        client_id: format!("{cid}-up"),
        topic_root: root.clone(),
        gateway: GatewayId::new(gw).unwrap(),
        partitions: PARTITIONS,
        batch_size: 200,
        window: 8,
        ack_timeout: Some(Duration::from_secs(2)),
        max_unacked: 200 * 8 * 8,
    };
    let per_run = total / 10;
    let mut incarnations = std::collections::BTreeSet::new();
    for crash in 0..10 {
        let (spool, mut writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
        incarnations.insert(spool.incarnation());
        let stats = Arc::new(UplinkStats::default());
        let up = tokio::spawn(uplink::run(
            opts.clone(),
            spool.clone(),
            stats,
            CancellationToken::new(),
        ));
        spool_readings(&mut writer, gw, crash * per_run, per_run);
        // Crash at a different point of each run: mid-send, mid-acknowledgement.
        tokio::time::sleep(Duration::from_millis(150 + 97 * crash as u64)).await;
        up.abort();
        assert!(up.await.unwrap_err().is_cancelled());
        drop((spool, writer));
    }
    // After the last restart the gateway runs until its spool is empty.
    let (spool, _writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
    let shutdown = CancellationToken::new();
    let up = tokio::spawn(uplink::run(
        opts,
        spool.clone(),
        Arc::new(UplinkStats::default()),
        shutdown.clone(),
    ));
    let s = spool.clone();
    wait_until("spool emptied", Duration::from_secs(120), || {
        s.stats().depth == 0
    })
    .await;
    let (rows, distinct) = stored(&db.pool, gw).await;
    eprintln!(
        "crashes: in {total}, stored {rows}, lost {}, duplicated {}, seq duplicates dropped {}",
        total - distinct,
        rows - distinct,
        IngestMetrics::get(&w.metrics.seq_duplicates)
    );
    assert_eq!((rows, distinct), (total, total));
    assert_eq!(
        incarnations.len(),
        1,
        "a clean reopen keeps the incarnation"
    );
    shutdown.cancel();
    up.await.unwrap();
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    db.drop_database().await;
}

// ---------------------------------------------------------------------------------------------
// The gateway as a process, a full disk, a flood of malformed input, a persistent broker.
// ---------------------------------------------------------------------------------------------

/// Newest modification time of `path`, or of the files under it (recursively).
fn newest_file(path: &std::path::Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(newest);
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let t = if meta.is_dir() {
            newest_file(&entry.path())
        } else {
            meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH)
        };
        newest = newest.max(t);
    }
    newest
}

/// The `gateway` binary of this workspace. `cargo nextest run --workspace` (CI) builds it
/// beside the tests; run for this package alone, nextest does not, so a binary missing or
/// older than the sources of the gateway and its crates is built here first.
/// `WM_GATEWAY_BIN` overrides the path (for `cargo test`, which may hold the build lock while
/// tests run: build it first with `cargo build -p gateway --bin gateway`).
fn gateway_binary() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("WM_GATEWAY_BIN") {
            return path.into();
        }
        // target/<profile>/deps/delivery-<hash> → target/<profile>/gateway
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable under target/<profile>/deps")
            .to_owned();
        let bin = profile_dir.join("gateway");
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ inside the workspace")
            .to_owned();
        let sources = ["gateway", "model", "decoders", "edge-config"]
            .iter()
            .map(|c| newest_file(&workspace.join(c).join("src")))
            .chain([newest_file(&workspace.join("Cargo.lock"))])
            .max()
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        if built.is_some_and(|b| b >= sources) {
            return bin;
        }
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "gateway", "--bin", "gateway"])
            .current_dir(&workspace);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo to build the gateway");
        assert!(
            status.success(),
            "cargo build -p gateway --bin gateway failed ({status})"
        );
        assert!(
            bin.try_exists().unwrap_or(false),
            "{} missing after the build",
            bin.display()
        );
        bin
    })
    .clone()
}

/// A running `gateway run` process; killed with SIGKILL when dropped.
struct GatewayProcess(Child);

impl GatewayProcess {
    /// Starts the binary on `config`; with `tmpfs`, inside a private mount namespace whose
    /// spool directory is a tmpfs of that many KiB (a real full disk: ENOSPC).
    fn spawn(config: &std::path::Path, tmpfs: Option<(&std::path::Path, u32)>) -> Self {
        let bin = gateway_binary();
        let mut cmd = match tmpfs {
            None => {
                let mut c = Command::new(&bin);
                c.args(["run", "--config"]).arg(config);
                c
            }
            Some((dir, kib)) => {
                let mut c = Command::new("unshare");
                c.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
                    .arg(format!(
                        "mount -t tmpfs -o size={kib}k tmpfs \"$1\" && exec \"$2\" run --config \"$3\""
                    ))
                    .arg("sh")
                    .arg(dir)
                    .arg(&bin)
                    .arg(config);
                c
            }
        };
        let child = cmd
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway binary");
        Self(child)
    }

    /// kill -9.
    fn kill9(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A gateway configuration with one concentrator MQTT source (`site/+/readings`, JSON, and
/// `site/+/frame`, CJ/T 188) on `url`, its uplink on the same broker.
fn concentrator_toml(
    gw: &str,
    url: &str,
    cid: &str,
    root: &str,
    spool: &std::path::Path,
    metrics_port: u16,
    ack_timeout_s: u32,
) -> String {
    format!(
        r#"gateway_id = "{gw}"
[uplink]
broker = "{url}"
client_id = "{cid}-gw"
topic_root = "{root}"
ack_timeout_s = {ack_timeout_s}
partitions = {PARTITIONS}
[spool]
dir = "{spool}"
max_bytes = 1048576
[metrics]
listen = "127.0.0.1:{metrics_port}"
[[source]]
id = "conc"
kind = "mqtt"
broker = "{url}"
client_id = "{cid}-conc"
topics = [{{ filter = "site/+/readings", format = "json" }}, {{ filter = "site/+/frame", format = "cjt188" }}]
"#,
        spool = spool.display(),
    )
}

/// Concentrator message `g` of a run: `per` readings, each a unique (meter, ts) over 50
/// meters, values rising per meter.
fn concentrator_message(base: OffsetDateTime, g: usize, per: usize) -> String {
    let readings: Vec<String> = (g * per..(g + 1) * per)
        .map(|k| {
            let ts = base + time::Duration::minutes(k as i64);
            format!(
                r#"{{"meter":"cjt188:{:014}","ts":"{}","volume_m3":"{}.{:03}"}}"#,
                20_000 + k % 50,
                ts.format(&time::format_description::well_known::Rfc3339)
                    .unwrap(),
                1 + k / 1000,
                k % 1000
            )
        })
        .collect();
    format!(r#"{{"v":1,"readings":[{}]}}"#, readings.join(","))
}

/// A publisher on `url` that counts the broker's PUBACKs: what the broker accepted is "in".
fn counting_publisher(url: &str, name: &str) -> (AsyncClient, Arc<std::sync::atomic::AtomicU64>) {
    let model::BrokerUrl { host, port, .. } = pipeline::config::broker_url(url).unwrap();
    let mut o = MqttOptions::new(
        format!("{name}-{}", wm_tests::unique_prefix("p").replace('/', "-")),
        host,
        port,
    );
    o.set_max_packet_size(16 << 20, 16 << 20);
    o.set_inflight(200);
    let (c, mut el) = AsyncClient::new(o, 1024);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = Arc::clone(&acked);
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (c, acked)
}

/// Publishes undecodable probes until the gateway's source counts one: from then on its
/// persistent session is subscribed and the broker keeps every message for it. (A message
/// published before that is dropped by the broker: nobody has subscribed yet.)
async fn wait_subscribed(publisher: &AsyncClient, metrics: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while gateway_metric(
        metrics,
        r#"wm_gateway_decode_errors_total{source="conc",kind="json"}"#,
    )
    .await
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the concentrator source never subscribed"
        );
        publisher
            .publish("site/probe/readings", QoS::AtLeastOnce, false, "probe")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Ten (or, with `WM_SOAK=1`, as many as fit in a 200,000-reading run, at least ten) kill -9 of
/// the gateway *process* while a concentrator keeps publishing to it: every reading the site
/// broker accepted is stored exactly once. The site broker keeps what the gateway had not
/// PUBACKed (persistent session), the spool what the pipeline had not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_process_killed_ten_times_loses_and_duplicates_nothing() {
    let per = 20usize;
    let messages: usize = if soak() { 10_000 } else { 800 };
    let total = (messages * per) as i64;
    let gw = "gw-kill9";
    let db = TestDatabase::create().await;
    let broker = Broker::start_with(0, false, "").await;
    let root = wm_tests::unique_prefix("kill9");
    let cid = root.replace('/', "-");
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        concentrator_toml(
            gw,
            &broker.url(),
            &cid,
            &root,
            &dir.path().join("spool"),
            metrics_port,
            3,
        ),
    )
    .unwrap();
    let w = start_worker(db.pool.clone(), &broker.url(), &root, &format!("{cid}-w"));
    let mut gateway = GatewayProcess::spawn(&config, None);
    let (publisher, accepted) = counting_publisher(&broker.url(), "kill9-pub");
    wait_subscribed(&publisher, metrics).await;
    let base = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
        - time::Duration::days(if soak() { 160 } else { 20 });
    let pace = publisher.clone();
    let publishing = tokio::spawn(async move {
        // About 100 messages (2,000 readings) a second, as a busy concentrator site.
        for g in 0..messages {
            pace.publish(
                format!("site/c{}/readings", g % 7),
                QoS::AtLeastOnce,
                false,
                concentrator_message(base, g, per),
            )
            .await
            .unwrap();
            if g % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let started = Instant::now();
    let mut kills = 0u32;
    let mut last_restart = Instant::now();
    let mut slowest_comeback = Duration::ZERO;
    while kills < 10 || !publishing.is_finished() {
        // Let the restarted gateway make progress end to end before the next crash.
        let seen = IngestMetrics::get(&w.metrics.stored);
        let m = Arc::clone(&w.metrics);
        wait_until("progress after a restart", Duration::from_secs(90), || {
            let now = IngestMetrics::get(&m.stored);
            now > seen || now as i64 >= total
        })
        .await;
        if kills > 0 {
            slowest_comeback = slowest_comeback.max(last_restart.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(150 + u64::from(kills * 137 % 500))).await;
        gateway.kill9();
        kills += 1;
        gateway = GatewayProcess::spawn(&config, None);
        last_restart = Instant::now();
    }
    publishing.await.unwrap();
    let a = Arc::clone(&accepted);
    wait_until(
        "the site broker accepted every message",
        Duration::from_secs(60),
        || a.load(Ordering::SeqCst) >= messages as u64,
    )
    .await;
    let pool = db.pool.clone();
    let deadline = Instant::now() + Duration::from_secs(if soak() { 900 } else { 150 });
    let (rows, distinct) = loop {
        let (rows, distinct) = stored(&pool, gw).await;
        if distinct >= total {
            break (rows, distinct);
        }
        assert!(
            Instant::now() < deadline,
            "after {kills} kills: {distinct} of {total} stored"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let recovery = last_restart.elapsed();
    eprintln!(
        "kill -9 of the gateway process: kills {kills}, in {total}, stored {rows}, lost {}, \
         duplicated {}, re-deliveries dropped by the pipeline {} (sequence) + {} (row key), \
         slowest restart to new readings stored {slowest_comeback:?}, all stored \
         {recovery:?} after the last restart, run {:?}",
        total - distinct,
        rows - distinct,
        IngestMetrics::get(&w.metrics.seq_duplicates),
        IngestMetrics::get(&w.metrics.duplicates),
        started.elapsed()
    );
    assert_eq!((rows, distinct), (total, total));
    assert!(kills >= 10);
    drop(gateway);
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    db.drop_database().await;
}

/// The spool on a full disk: the gateway process runs with its spool directory on a 448 KiB
/// tmpfs (a private mount namespace; `unshare` must be allowed) while PostgreSQL is cut, so
/// nothing is acknowledged end to end and the spool fills the disk. Writes fail with ENOSPC,
/// counted in `wm_gateway_spool_write_errors_total`; the concentrator's messages stay
/// unacknowledged at the site broker. When the database is back the pipeline commits, the
/// spool frees its segments and every reading the site broker accepted is stored exactly
/// once, nothing evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_on_a_full_disk_refuses_and_recovers_without_loss() {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg("d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs \"$d\"")
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "this test needs `unshare --user --map-root-user --mount` and tmpfs mounts"
    );
    let per = 20usize;
    let messages = if soak() { 3_000 } else { 400 };
    let total = (messages * per) as i64;
    let gw = "gw-fulldisk";
    let db = TestDatabase::create().await;
    let host_port = db
        .url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("DATABASE_URL of the form postgres://user@host:port/db")
        .to_owned();
    let pg: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .unwrap()
        .next()
        .unwrap();
    let proxy = PgProxy::start(pg).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&db.url.replace(&host_port, &proxy.addr.to_string()))
        .await
        .unwrap();
    let broker = Broker::start_with(0, false, "").await;
    let root = wm_tests::unique_prefix("fulldisk");
    let cid = root.replace('/', "-");
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    std::fs::create_dir(&spool_dir).unwrap();
    let metrics_port = free_port();
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        concentrator_toml(gw, &broker.url(), &cid, &root, &spool_dir, metrics_port, 2),
    )
    .unwrap();
    let w = start_worker(pool.clone(), &broker.url(), &root, &format!("{cid}-w"));
    let _gateway = GatewayProcess::spawn(&config, Some((&spool_dir, 448)));
    let (publisher, accepted) = counting_publisher(&broker.url(), "fulldisk-pub");
    wait_subscribed(&publisher, metrics).await;
    proxy.cut();
    // 60,000 readings a minute apart (soak) must all lie in the past.
    let base = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::days(60);
    for g in 0..messages {
        publisher
            .publish(
                format!("site/c{}/readings", g % 7),
                QoS::AtLeastOnce,
                false,
                concentrator_message(base, g, per),
            )
            .await
            .unwrap();
    }
    // The disk fills: about 1,000 readings fit.
    let deadline = Instant::now() + Duration::from_secs(90);
    while gateway_metric(metrics, "wm_gateway_spool_write_errors_total").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the spool never hit the full disk"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let full_bytes = gateway_metric(metrics, "wm_gateway_spool_bytes").await;
    let spooled_when_full = gateway_metric(metrics, "wm_gateway_spool_next_seq").await;
    proxy.restore();
    let restored = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(if soak() { 900 } else { 150 });
    let (rows, distinct) = loop {
        let (rows, distinct) = stored(&db.pool, gw).await;
        if distinct >= total {
            break (rows, distinct);
        }
        assert!(
            Instant::now() < deadline,
            "after the disk freed: {distinct} of {total} stored"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let recovery = restored.elapsed();
    let estimates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM readings WHERE gateway_id = $1 AND quality = 'estimated'",
    )
    .bind(gw)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let write_errors = gateway_metric(metrics, "wm_gateway_spool_write_errors_total").await;
    let evicted = gateway_metric(metrics, "wm_gateway_spool_evicted_total").await;
    eprintln!(
        "full disk (448 KiB tmpfs): in {total}, stored {rows}, lost {}, duplicated {}, \
         spool full at {full_bytes} bytes after {} readings, failed group commits {write_errors}, \
         evicted {evicted}, gap estimates for late reads {estimates}, all stored {recovery:?} \
         after the database came back",
        total - distinct,
        rows - distinct,
        spooled_when_full.saturating_sub(1),
    );
    assert_eq!((rows, distinct), (total, total));
    assert!(accepted.load(Ordering::SeqCst) >= messages as u64);
    assert_eq!(evicted, 0);
    // Re-delivered messages kept their order (no read arrived after a later one of its meter).
    assert_eq!(estimates, 0);
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    pool.close().await;
    db.drop_database().await;
}

/// Junk message `j` of the flood, with its topic: broken JSON, an unknown version, a reading
/// that does not parse, a truncated CJ/T 188 frame, bytes that are no frame at all.
fn junk_message(j: usize) -> (String, Vec<u8>) {
    let site = j % 7;
    match j % 5 {
        0 => (
            format!("site/j{site}/readings"),
            br#"{"v":1,"readings":[{"meter":"#.to_vec(),
        ),
        1 => (
            format!("site/j{site}/readings"),
            br#"{"v":7,"readings":[]}"#.to_vec(),
        ),
        2 => (
            format!("site/j{site}/readings"),
            format!(
                r#"{{"v":1,"readings":[{{"meter":"no meter {j}","ts":"x","volume_m3":"1"}}]}}"#
            )
            .into_bytes(),
        ),
        3 => (
            format!("site/j{site}/frame"),
            vec![
                0x68, 0x10, 0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78, 0x81, 0x16,
            ],
        ),
        _ => (
            format!("site/j{site}/frame"),
            (0..(j % 40) as u8).map(|b| b.wrapping_mul(37)).collect(),
        ),
    }
}

/// 100,000 malformed concentrator messages (five kinds) and 1,000 malformed reading batches
/// for the pipeline, flooded in while normal traffic flows at a steady pace: every one is
/// refused with a typed reason and counted (`wm_gateway_decode_errors_total` by kind,
/// `ingest_rejects`), every normal reading is stored exactly once, and the normal traffic's
/// throughput with the flood is printed beside the one without (asserted within 20 % with
/// `WM_SOAK=1`, where the machine is not shared with the rest of the suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_input_is_refused_counted_and_normal_traffic_stored() {
    let junk: usize = std::env::var("WM_JUNK_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let bad_batches = 1_000usize;
    let per = 10usize;
    let normal = 400usize;
    let gw = "gw-junk";
    let db = TestDatabase::create().await;
    let broker = Broker::start_with(0, false, "").await;
    let root = wm_tests::unique_prefix("junk");
    let cid = root.replace('/', "-");
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let toml = concentrator_toml(
        gw,
        &broker.url(),
        &cid,
        &root,
        &dir.path().join("spool"),
        metrics_port,
        5,
    );
    let gateway =
        gateway::runtime::Gateway::start(edge_config::parse(&toml, "junk.toml".as_ref()).unwrap())
            .await
            .unwrap();
    let metrics = gateway.metrics_addr();
    let w = start_worker(db.pool.clone(), &broker.url(), &root, &format!("{cid}-w"));
    let (publisher, _) = counting_publisher(&broker.url(), "junk-normal");
    wait_subscribed(&publisher, metrics).await;
    let base = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::days(20);
    let spool = gateway.spool().clone();
    // Normal traffic: 100 messages (1,000 readings) a second; readings/s until all spooled.
    let steady = |from: usize| {
        let publisher = publisher.clone();
        let spool = spool.clone();
        async move {
            let target = spool.stats().next_seq + (normal * per) as u64;
            let started = Instant::now();
            for g in from..from + normal {
                publisher
                    .publish(
                        format!("site/c{}/readings", g % 7),
                        QoS::AtLeastOnce,
                        false,
                        concentrator_message(base, g, per),
                    )
                    .await
                    .unwrap();
                if g % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let deadline = Instant::now() + Duration::from_secs(300);
            while spool.stats().next_seq < target {
                assert!(Instant::now() < deadline, "normal traffic not spooled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (normal * per) as f64 / started.elapsed().as_secs_f64()
        }
    };
    let alone = steady(0).await;
    let errors_before: u64 =
        gateway_metric_sum(metrics, r#"wm_gateway_decode_errors_total{source="conc""#)
            .await
            .values()
            .sum();
    let (flooder, flooder_acks) = counting_publisher(&broker.url(), "junk-flood");
    let flood_started = Instant::now();
    let root_for_batches = root.clone();
    let flood = tokio::spawn(async move {
        for j in 0..junk {
            let (topic, payload) = junk_message(j);
            flooder
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            // The pipeline's share: malformed reading batches.
            if j % (junk / bad_batches).max(1) == 0 && j / (junk / bad_batches).max(1) < bad_batches
            {
                flooder
                    .publish(
                        format!(
                            "{root_for_batches}/readings/{}",
                            j % usize::from(PARTITIONS)
                        ),
                        QoS::AtLeastOnce,
                        false,
                        format!(r#"{{"v":1,"gateway":"gw-junk","partition":0,"entries":[{j}"#),
                    )
                    .await
                    .unwrap();
            }
        }
    });
    let flooded = steady(normal).await;
    flood.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let errors = loop {
        let kinds =
            gateway_metric_sum(metrics, r#"wm_gateway_decode_errors_total{source="conc""#).await;
        let total: u64 = kinds.values().sum();
        if total >= errors_before + junk as u64 {
            break kinds;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {junk} junk messages counted",
            total - errors_before
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let flood_time = flood_started.elapsed();
    let m = Arc::clone(&w.metrics);
    wait_until(
        "malformed batches refused",
        Duration::from_secs(120),
        || IngestMetrics::get(&m.malformed) >= bad_batches as u64,
    )
    .await;
    let total = (2 * normal * per) as i64;
    let deadline = Instant::now() + Duration::from_secs(150);
    let (rows, distinct) = loop {
        let (rows, distinct) = stored(&db.pool, gw).await;
        if distinct >= total {
            break (rows, distinct);
        }
        assert!(Instant::now() < deadline, "{distinct} of {total} stored");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let refused_batches: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ingest_rejects WHERE kind = 'malformed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let counted: u64 = errors.values().sum::<u64>() - errors_before;
    eprintln!(
        "malformed flood: {junk} junk messages + {bad_batches} malformed batches, flood took \
         {flood_time:?}; counted {counted} by kind {errors:?}; malformed batches refused \
         {refused_batches}; normal traffic {alone:.0} readings/s alone, {flooded:.0} during the \
         flood ({:.0} %); in {total}, stored {rows}, lost {}, duplicated {}; broker accepted {} \
         junk publishes",
        100.0 * flooded / alone,
        total - distinct,
        rows - distinct,
        flooder_acks.load(Ordering::SeqCst),
    );
    assert_eq!(
        counted, junk as u64,
        "every junk message refused and counted once"
    );
    assert_eq!(refused_batches, bad_batches as i64);
    assert_eq!(IngestMetrics::get(&w.metrics.malformed), bad_batches as u64);
    assert_eq!((rows, distinct), (total, total));
    if soak() {
        assert!(
            flooded >= 0.8 * alone,
            "normal throughput fell by more than 20 %: {alone:.0} → {flooded:.0} readings/s"
        );
    }
    gateway.shutdown().await;
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    db.drop_database().await;
}

/// The central broker with persistence: a clean restart, then kill -9 (what it had not saved
/// since its last autosave is gone) and, with `WM_SOAK=1`, a 2-minute outage, while the
/// gateway keeps spooling: every spooled reading is stored exactly once and the spool drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_broker_restarted_and_killed_loses_nothing() {
    let total: i64 = if soak() { 100_000 } else { 8_000 };
    let outage = Duration::from_secs(if soak() { 120 } else { 3 });
    let gw = "gw-persist";
    let db = TestDatabase::create().await;
    let mut broker = Broker::start(1000, true).await;
    let root = wm_tests::unique_prefix("persist");
    let cid = root.replace('/', "-");
    let dir = tempfile::tempdir().unwrap();
    let (spool, mut writer) = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
    let stats = Arc::new(UplinkStats::default());
    let shutdown = CancellationToken::new();
    let opts = UplinkOptions {
        endpoint: MqttEndpoint::parse(&broker.url()).unwrap(),
        client_id: format!("{cid}-up"),
        topic_root: root.clone(),
        gateway: GatewayId::new(gw).unwrap(),
        partitions: PARTITIONS,
        batch_size: 200,
        window: 8,
        ack_timeout: Some(Duration::from_secs(2)),
        max_unacked: 200 * 8 * 8,
    };
    let up = tokio::spawn(uplink::run(
        opts,
        spool.clone(),
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    let w = start_worker(db.pool.clone(), &broker.url(), &root, &format!("{cid}-w"));
    let quarter = total / 4;
    spool_readings(&mut writer, gw, 0, quarter);
    // A clean restart: Mosquitto saves its sessions and queues and loads them again.
    broker.terminate();
    spool_readings(&mut writer, gw, quarter, quarter);
    broker.spawn().await;
    spool_readings(&mut writer, gw, 2 * quarter, quarter);
    // kill -9 with persistence on: what is not autosaved is lost by the broker.
    broker.kill();
    spool_readings(&mut writer, gw, 3 * quarter, total - 3 * quarter);
    tokio::time::sleep(outage).await;
    broker.spawn().await;
    let recovery = Instant::now();
    let s = spool.clone();
    wait_until(
        "spool emptied by ingest acknowledgements",
        Duration::from_secs(if soak() { 900 } else { 150 }),
        || s.stats().depth == 0,
    )
    .await;
    let recovery = recovery.elapsed();
    let (rows, distinct) = stored(&db.pool, gw).await;
    eprintln!(
        "persistent broker, clean restart + kill -9 + {outage:?} outage: in {total}, stored \
         {rows}, lost {}, duplicated {}, spool empty {recovery:?} after the restart, resends {}",
        total - distinct,
        rows - distinct,
        stats.resends.load(Ordering::Relaxed),
    );
    assert_eq!((rows, distinct), (total, total));
    assert_eq!(spool.stats().evicted, 0);
    shutdown.cancel();
    up.await.unwrap();
    w.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), w.task)
        .await
        .expect("worker stops")
        .unwrap()
        .unwrap();
    db.drop_database().await;
}
