//! Hot standby of an ingest worker, with the built binary: a second `pipeline run` with the same
//! assignment stands by; the active one is killed with SIGKILL in the middle of a stream; the
//! standby takes over its partitions and persistent session; every published reading is stored
//! exactly once.

use std::process::Stdio;
use std::time::{Duration, Instant};

use model::{BatchEntry, GatewayId, ReadingBatch, SourceKind, WIRE_VERSION};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use testkit::TestDatabase;
use time::OffsetDateTime;

const PARTITIONS: u16 = 4;
const METERS: usize = 40;

fn worker(
    db: &TestDatabase,
    root: &str,
    client_id: &str,
    log: &std::path::Path,
    metrics_listen: Option<std::net::SocketAddr>,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args([
            "run",
            "--worker",
            "0",
            "--workers",
            "1",
            "--partitions",
            &PARTITIONS.to_string(),
            "--topic-root",
            root,
            "--client-id",
            client_id,
            "--max-batch-delay-ms",
            "20",
            "--metrics-interval-s",
            "3600",
        ])
        .args(metrics_listen.map(|a| format!("--metrics-listen={a}")))
        .env("DATABASE_URL", &db.url)
        .env("MQTT_URL", pipeline::config::mqtt_url())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the pipeline binary")
}

/// One batch per partition for `round`: every meter's reading of that hour.
fn round_batches(round: i64, start: OffsetDateTime) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let entries: Vec<BatchEntry> = (0..METERS)
            .map(|i| format!("cjt188:{:014}", 7_000 + i))
            .filter(|m| model::partition_of(m, PARTITIONS) == p)
            .map(|m| {
                let ts = start + time::Duration::hours(round);
                BatchEntry {
                    seq: (round as u64) * 1_000
                        + u64::from(p) * 100
                        + (m[7..].parse::<u64>().unwrap() % 100),
                    reading: testkit::reading(&m)
                        .ts(ts)
                        .milli(1000 + round * 10)
                        .gateway("gw-t")
                        .source(SourceKind::Coap, "nb")
                        .frame_hash("ab".repeat(32))
                        .received_at(ts + time::Duration::seconds(1))
                        .build(),
                }
            })
            .collect();
        if entries.is_empty() {
            continue;
        }
        let batch = ReadingBatch {
            v: WIRE_VERSION,
            gateway: GatewayId::new("gw-t").unwrap(),
            partition: p,
            sent_at: OffsetDateTime::now_utc(),
            incarnation: None,
            prev: None,
            entries,
        };
        out.push((p, serde_json::to_vec(&batch).unwrap()));
    }
    out
}

async fn stored(db: &TestDatabase) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT (meter_id, ts)) FROM readings")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn wait_rows(db: &TestDatabase, n: i64, within: Duration, what: &str) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if stored(db).await.0 >= n {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n} stored",
            stored(db).await.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_standby_takes_over_a_killed_worker_without_loss_or_duplicates() {
    let db = TestDatabase::create().await;
    let tag = format!(
        "{}-{:x}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos() % 0xffff_ffff
    );
    let root = format!("test/takeover/{tag}");
    let client_id = format!("takeover-{tag}");
    let logs = tempfile::tempdir().unwrap();
    let (client, mut eventloop) = {
        let broker = pipeline::config::broker_url(&pipeline::config::mqtt_url()).unwrap();
        let (host, port) = (broker.host.clone(), broker.port);
        let mut o = MqttOptions::new(format!("takeover-pub-{tag}"), host, port);
        o.set_keep_alive(Duration::from_secs(5));
        AsyncClient::new(o, 1000)
    };
    tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let (pub_client, pub_root) = (client.clone(), root.clone());
    let publish = move |batches: Vec<(u16, Vec<u8>)>| {
        let client = pub_client.clone();
        let root = pub_root.clone();
        async move {
            for (p, payload) in batches {
                client
                    .publish(
                        format!("{root}/readings/{p}"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .unwrap();
            }
        }
    };
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::days(20);

    let mut active = worker(
        &db,
        &root,
        &client_id,
        &logs.path().join("active.log"),
        None,
    );
    // Round 0 until stored: the active worker is subscribed and its session exists.
    let per_round = METERS as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored(&db).await.0 < per_round {
        assert!(
            Instant::now() < deadline,
            "the first worker never stored round 0"
        );
        publish(round_batches(0, start)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let standby_log = logs.path().join("standby.log");
    // The standby also serves its counters (`--metrics-listen`).
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut standby = worker(&db, &root, &client_id, &standby_log, Some(metrics_addr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&standby_log)
        .unwrap_or_default()
        .contains("standing by")
    {
        assert!(
            Instant::now() < deadline,
            "the second process did not stand by"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A stream of rounds; the active worker is killed in the middle of it, the rest is
    // published while the standby takes over.
    let rounds = 60;
    for round in 1..=rounds / 2 {
        publish(round_batches(round, start)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    active.kill().await.unwrap();
    let killed_at = Instant::now();
    let rest = tokio::spawn({
        let publish = publish.clone();
        async move {
            for round in rounds / 2 + 1..=rounds {
                publish(round_batches(round, start)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    // Reads of the rounds published after the kill: only the standby can store them.
    let after_kill = start + time::Duration::hours(rounds / 2 + 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed = loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings WHERE ts >= $1")
            .bind(after_kill)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n > 0 {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "the standby never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rest.await.unwrap();
    wait_rows(
        &db,
        per_round * (rounds + 1),
        Duration::from_secs(90),
        "all rounds",
    )
    .await;
    let (n, distinct) = stored(&db).await;
    assert_eq!(
        (n, distinct),
        (per_round * (rounds + 1), per_round * (rounds + 1)),
        "no loss, no duplicate"
    );
    eprintln!(
        "takeover: the standby stored its first reading {:.2} s after the kill",
        resumed.duration_since(killed_at).as_secs_f64()
    );
    let log = std::fs::read_to_string(&standby_log).unwrap();
    assert!(log.contains("assignment lock taken: consuming"), "{log}");
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let stored_by_standby: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("pipeline_readings_stored_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stored counter in /metrics:\n{text}"));
    assert!(stored_by_standby > 0, "{text}");

    let term = std::process::Command::new("kill")
        .args(["-TERM", &standby.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(30), standby.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "standby exit: {status:?}");
    pipeline::worker::forget_session(&pipeline::config::mqtt_url(), &client_id)
        .await
        .unwrap();
    db.drop_database().await;
}
