//! Registry ↔ gateway sync over real PostgreSQL and Mosquitto: a running gateway applies the
//! registry's device sets without a restart, refuses a bad or stale version and reports it,
//! and the registry records the gateway's status, its health (spool depth, uplink lag,
//! re-published periodically) and the outcome.

use std::time::{Duration, Instant};

use gateway::runtime::Gateway;
use model::{DEVICE_SET_WIRE_VERSION, DeviceEntry, DeviceSet};
use pipeline::registry::{self, Book, Cycle, csv, sync};
use testkit::TestDatabase;
use tokio::sync::watch;

/// online, firmware, device set applied, last refusal.
type GatewayRow = (Option<bool>, Option<String>, Option<i64>, Option<String>);
/// online, spool depth, uplink lag, health time, uplink connected.
type HealthRow = (
    Option<bool>,
    Option<i64>,
    Option<f64>,
    Option<time::OffsetDateTime>,
    Option<bool>,
);

const KEY: &str = "000102030405060708090a0b0c0d0e0f";

/// Polls `probe` every 100 ms until it returns `Some`, for at most `within`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn device_sets_reach_a_running_gateway_and_bad_versions_are_refused() {
    let db = TestDatabase::create().await;
    let pool = db.pool.clone();
    let url = pipeline::config::mqtt_url();
    let model::BrokerUrl { host, port, .. } = pipeline::config::broker_url(&url).unwrap();
    let tag = format!("{}-{:08x}", std::process::id(), rand_u32());
    let root = format!("test/regsync/{tag}");
    let gw = format!("gw-reg-{tag}");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, format!("[keys]\nk1 = \"{KEY}\"\n")).unwrap();
    let text = format!(
        r#"gateway_id = "{gw}"
[uplink]
broker = "mqtt://{host}:{port}"
client_id = "{gw}"
topic_root = "{root}"
partitions = 1
health_interval_s = 1
[spool]
dir = "{spool}"
[metrics]
listen = "127.0.0.1:0"
[registry]
device_sets = true
key_file = "{keys}"
[[source]]
id = "radio"
kind = "wmbus_udp"
listen = "127.0.0.1:0"
[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:0"
auth = "none"
"#,
        spool = dir.path().join("spool").display(),
        keys = keys.display(),
    );
    let config = edge_config::parse(&text, "gw.toml".as_ref()).unwrap();
    let mut gateway = Gateway::start(config).await.unwrap();
    let mut updates = gateway
        .take_device_set_updates()
        .expect("device sets enabled");
    // The gateway's own loop (main.rs does the same): apply, answer, and show the devices in
    // force to the test.
    let (seen_tx, seen) = watch::channel::<Vec<(String, bool)>>(Vec::new());
    let (end, mut ended) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        loop {
            let u = tokio::select! {
                _ = &mut ended => break,
                u = updates.recv() => match u {
                    Some(u) => u,
                    None => break,
                },
            };
            let r = gateway.apply_device_set(&u.set).await;
            seen_tx
                .send(
                    gateway
                        .devices()
                        .map(|d| (d.id.to_string(), d.key.is_some()))
                        .collect(),
                )
                .ok();
            u.reply.send(r).ok();
        }
        gateway
    });

    registry::save_book(
        &pool,
        &Book {
            code: "B1".into(),
            name: "b".into(),
            reader: None,
            cycle: Cycle::Monthly,
        },
        "test",
    )
    .await
    .unwrap();
    csv::import(
        &pool,
        &format!(
            "meter_no,meter_id,protocol,status,meter_book,gateway_id,gateway_source,key_ref\n\
             W-1,mbus:ABC12345678,wmbus,active,B1,{gw},radio,k1\n\
             N-1,cjt188:00000000000401,cjt188,active,B1,{gw},nbiot,\n\
             N-2,cjt188:00000000000402,cjt188,in_stock,B1,{gw},nbiot,\n"
        ),
        "test",
        false,
    )
    .await
    .unwrap();
    let (stop, shutdown) = watch::channel(false);
    let service = tokio::spawn(sync::run(
        pool.clone(),
        sync::SyncOptions {
            broker_url: url.clone(),
            root: root.clone(),
            client_id: format!("reg-{tag}"),
            republish_every: Duration::from_secs(60),
        },
        shutdown,
    ));
    let applied = |v: i64| {
        let pool = pool.clone();
        let gw = gw.clone();
        move || {
            let pool = pool.clone();
            let gw = gw.clone();
            async move {
                let row: Option<GatewayRow> = sqlx::query_as(
                    "SELECT online, firmware, device_set_applied, device_set_error
                         FROM gateways WHERE gateway_id = $1",
                )
                .bind(&gw)
                .fetch_optional(&pool)
                .await
                .unwrap();
                row.filter(|r| r.2 == Some(v))
            }
        }
    };
    // Version 1: the two mounted meters; the gateway is online with its firmware.
    let (online, firmware, _, error) =
        eventually(Duration::from_secs(20), "version 1 applied", applied(1)).await;
    assert_eq!(online, Some(true));
    assert_eq!(firmware.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(error, None);
    assert_eq!(
        *seen.borrow(),
        vec![
            ("cjt188:00000000000401".to_owned(), false),
            ("mbus:ABC12345678".to_owned(), true)
        ],
        "the key came from the key file, by reference"
    );

    // A registry change reaches the running gateway: installing N-2 adds it (version 2).
    let changed = Instant::now();
    registry::install(&pool, "N-2", time::OffsetDateTime::now_utc(), "test")
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "version 2 applied", applied(2)).await;
    eprintln!(
        "registry change to applied device set: {:?}",
        changed.elapsed()
    );
    assert_eq!(seen.borrow().len(), 3);

    // A bad version (a device on a source the gateway does not have) is refused and
    // reported; version 2 stays in force.
    let bad = DeviceSet {
        v: DEVICE_SET_WIRE_VERSION,
        gateway: gw.clone(),
        version: 3,
        published_at: String::new(),
        devices: vec![DeviceEntry {
            id: "cjt188:00000000000499".into(),
            meter_no: None,
            protocol: "cjt188".into(),
            source: "nope".into(),
            address: None,
            register_map: None,
            key_ref: None,
        }],
    };
    let topic = sync::device_set_topic(&root, &gw);
    sync::publish_retained(
        &url,
        &format!("bad-{tag}"),
        vec![(topic.clone(), serde_json::to_vec(&bad).unwrap())],
    )
    .await
    .unwrap();
    let refused = {
        let pool = pool.clone();
        let gw = gw.clone();
        eventually(Duration::from_secs(10), "refusal reported", move || {
            let pool = pool.clone();
            let gw = gw.clone();
            async move {
                sqlx::query_scalar::<_, Option<String>>(
                    "SELECT device_set_error FROM gateways WHERE gateway_id = $1 AND device_set_applied = 2",
                )
                .bind(&gw)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .flatten()
            }
        })
        .await
    };
    assert!(refused.starts_with("version 3:"), "{refused}");
    assert!(refused.contains("no source with id `nope`"), "{refused}");
    assert_eq!(seen.borrow().len(), 3, "the old set stays in force");
    // A stale version is refused too.
    let mut stale = bad.clone();
    stale.version = 1;
    stale.devices.clear();
    sync::publish_retained(
        &url,
        &format!("stale-{tag}"),
        vec![(topic.clone(), serde_json::to_vec(&stale).unwrap())],
    )
    .await
    .unwrap();
    let stale_error = {
        let pool = pool.clone();
        let gw = gw.clone();
        eventually(
            Duration::from_secs(10),
            "stale version reported",
            move || {
                let pool = pool.clone();
                let gw = gw.clone();
                async move {
                    sqlx::query_scalar::<_, Option<String>>(
                        "SELECT device_set_error FROM gateways WHERE gateway_id = $1",
                    )
                    .bind(&gw)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .filter(|e| e.starts_with("version 1:"))
                }
            },
        )
        .await
    };
    assert!(
        stale_error.contains("older than version 2"),
        "{stale_error}"
    );

    // Health: the gateway's status carries it and is re-published every second
    // (health_interval_s = 1), so health_at moves on while the gateway is up.
    let health = |after: Option<time::OffsetDateTime>| {
        let pool = pool.clone();
        let gw = gw.clone();
        move || {
            let pool = pool.clone();
            let gw = gw.clone();
            async move {
                let row: Option<HealthRow> = sqlx::query_as(
                    "SELECT online, spool_depth, uplink_lag_s, health_at,
                            (status->'health'->>'uplink_connected')::boolean
                         FROM gateways WHERE gateway_id = $1 AND health_at IS NOT NULL",
                )
                .bind(&gw)
                .fetch_optional(&pool)
                .await
                .unwrap();
                row.filter(|r| after.is_none_or(|a| r.3.is_some_and(|t| t > a)))
            }
        }
    };
    let first = eventually(Duration::from_secs(10), "health recorded", health(None)).await;
    assert_eq!(
        (first.0, first.1, first.2, first.4),
        (Some(true), Some(0), Some(0.0), Some(true)),
        "online, nothing spooled, no lag, uplink connected"
    );
    let later = eventually(
        Duration::from_secs(10),
        "health re-published",
        health(first.3),
    )
    .await;
    assert_eq!(later.0, Some(true));

    // Another gateway whose uplink is behind: its depth and lag are stored as reported, and a
    // status without health (its last will) keeps the last health but turns it offline.
    let behind = format!("gw-behind-{tag}");
    let behind_topic = format!("{root}/{behind}/status");
    sync::publish_retained(
        &url,
        &format!("behind-{tag}"),
        vec![(
            behind_topic.clone(),
            serde_json::to_vec(&serde_json::json!({
                "v": 1, "gateway": behind, "state": "online", "at": "2026-01-02T03:04:05Z",
                "version": "9.9.9",
                "health": {"spool_depth": 4200, "uplink_lag_s": 125.5,
                           "uplink_connected": false, "readings_acked": 17},
            }))
            .unwrap(),
        )],
    )
    .await
    .unwrap();
    let behind_row = |online: bool| {
        let pool = pool.clone();
        let behind = behind.clone();
        move || {
            let pool = pool.clone();
            let behind = behind.clone();
            async move {
                let row: Option<HealthRow> = sqlx::query_as(
                    "SELECT online, spool_depth, uplink_lag_s, health_at,
                            (status->'health'->>'uplink_connected')::boolean
                         FROM gateways WHERE gateway_id = $1",
                )
                .bind(&behind)
                .fetch_optional(&pool)
                .await
                .unwrap();
                row.filter(|r| r.0 == Some(online))
            }
        }
    };
    let at = time::macros::datetime!(2026-01-02 03:04:05 UTC);
    let row = eventually(Duration::from_secs(10), "lagging health", behind_row(true)).await;
    assert_eq!(
        (row.1, row.2, row.3, row.4),
        (Some(4200), Some(125.5), Some(at), Some(false))
    );
    sync::publish_retained(
        &url,
        &format!("behind-will-{tag}"),
        vec![(
            behind_topic.clone(),
            br#"{"v":1,"state":"offline","at":"2026-01-02T03:05:00Z"}"#.to_vec(),
        )],
    )
    .await
    .unwrap();
    let row = eventually(
        Duration::from_secs(10),
        "offline kept health",
        behind_row(false),
    )
    .await;
    assert_eq!((row.1, row.2, row.3), (Some(4200), Some(125.5), Some(at)));

    // A clean stop publishes `offline` with the last health.
    end.send(()).unwrap();
    running.await.unwrap().shutdown().await;
    let stopped = {
        let pool = pool.clone();
        let gw = gw.clone();
        eventually(Duration::from_secs(10), "offline recorded", move || {
            let pool = pool.clone();
            let gw = gw.clone();
            async move {
                sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT spool_depth FROM gateways WHERE gateway_id = $1 AND NOT online",
                )
                .bind(&gw)
                .fetch_optional(&pool)
                .await
                .unwrap()
            }
        })
        .await
    };
    assert_eq!(stopped, Some(0));
    stop.send(true).unwrap();
    service.await.unwrap().unwrap();
    // Leave no retained messages behind on the shared broker.
    let clear = |t: String| (t, Vec::new());
    sync::publish_retained(
        &url,
        &format!("clear-{tag}"),
        vec![
            clear(topic),
            clear(sync::report_topic(&root, &gw)),
            clear(format!("{root}/{gw}/status")),
            clear(behind_topic),
        ],
    )
    .await
    .unwrap();
    db.drop_database().await;
}

fn rand_u32() -> u32 {
    // No rand dependency in this package: the clock's nanoseconds are unique enough per run.
    time::OffsetDateTime::now_utc().nanosecond()
}
