//! Illegal hydrant use end to end: simulated hydrant controllers (MQTT) → a real gateway (its
//! hydrant bridge, spool and uplink) → Mosquitto → a real pipeline worker → `alarms`. Every
//! illegal use the simulator recorded in its ground truth becomes exactly one
//! `hydrant_illegal_use` alarm of that hydrant, starting at that status report, and closed when
//! the hydrant reports its outlet closed again; no other hydrant gets one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pipeline::ingest::IngestMetrics;
use rumqttc::QoS;
use simulators::fleet::{Fleet, FleetConfig};
use simulators::mqtt::{HydrantUp, MqttConfig};
use simulators::scenario::Scenario;
use simulators::truth::TruthKind;
use testkit::TestDatabase;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const HYDRANTS: u32 = 40;
const STEPS: u64 = 30;
const SEED: u64 = 6;

async fn count(db: &TestDatabase, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illegal_hydrant_use_raises_one_alarm_through_gateway_and_pipeline() {
    let prefix = wm_tests::unique_prefix("hydrant-alarm");
    let broker = pipeline::config::mqtt_url();
    let model::BrokerUrl { host, port, .. } =
        pipeline::config::broker_url(&broker).expect("MQTT_URL");
    let cid = prefix.replace('/', "-");
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sources = format!(
        r#"[[source]]
id = "hydrants"
kind = "hydrant_mqtt"
host = "{host}"
port = {port}
client_id = "{cid}-bridge"
topic_prefix = "{prefix}/hydrant"
"#
    );
    let spool = dir.path().join("spool");
    let toml = crate::common::gateway_toml("gw-hyd", &prefix, &spool, "partitions = 2\n", &sources);
    let gateway = crate::common::start_gateway(&toml, "hydrants.toml").await;

    let mut worker_config =
        pipeline::worker::WorkerConfig::new(&broker, &prefix, 0, 1, 2).expect("worker config");
    worker_config.client_id = format!("{cid}-wk");
    worker_config.sweep_interval = Duration::from_secs(24 * 3600);
    let metrics = Arc::new(IngestMetrics::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline::worker::run(
        worker_config.clone(),
        db.pool.clone(),
        Arc::clone(&metrics),
        shutdown,
    ));

    // The chain is live (bridge subscribed, uplink and worker connected) once a probe hydrant's
    // report is stored; only then do the simulated hydrants start, so none of their reports
    // can be lost to a subscription not yet made.
    let (probe, mut probe_loop) = wm_tests::mqtt_client(&format!("{cid}-probe"));
    // Keeps polling through connection errors (a loaded broker may refuse or time out once):
    // the client reconnects instead of failing every later publish.
    tokio::spawn(async move {
        loop {
            if probe_loop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(
        &db,
        "SELECT count(*) FROM readings WHERE meter_id = 'hydrant:probe'",
    )
    .await
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the probe report never reached the database"
        );
        let up = HydrantUp {
            v: 1,
            hydrant: "probe".into(),
            ts: OffsetDateTime::now_utc().format(&Rfc3339).unwrap(),
            pressure_bar: "3.20".into(),
            state: "closed".into(),
            locked: true,
            events: vec![],
            // A report of older firmware: no volume register.
            volume_m3: None,
            flow_m3h: None,
        };
        probe
            .publish(
                format!("{prefix}/hydrant/probe/up"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&up).unwrap(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let start = OffsetDateTime::now_utc()
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .expect("whole hour")
        - time::Duration::hours(STEPS as i64 + 2);
    let mut fleet_config = FleetConfig::new(Scenario::plain(10, 2, SEED, start));
    fleet_config.step_every = Duration::from_millis(50);
    fleet_config.max_steps = Some(STEPS);
    fleet_config.hydrants = HYDRANTS;
    fleet_config.mqtt = Some(MqttConfig {
        host: host.clone(),
        port,
        topic_prefix: format!("{prefix}/"),
        client_id: format!("{cid}-fleet"),
    });
    let mut fleet = Fleet::start(fleet_config).await.expect("fleet starts");
    let counts = fleet.wait_finished().await;
    let truth = fleet.ground_truth();
    assert_eq!(
        counts.hydrant_ups,
        u64::from(HYDRANTS) * STEPS,
        "{counts:?}"
    );

    let mut want: BTreeMap<String, Vec<OffsetDateTime>> = BTreeMap::new();
    for e in &truth.events {
        if e.kind == TruthKind::HydrantIllegalUse {
            want.entry(e.meter.clone()).or_default().push(e.from);
        }
    }
    let episodes: usize = want.values().map(Vec::len).sum();
    assert!(
        episodes >= 1,
        "the seeded run has illegal uses to detect: {:?}",
        truth.events
    );

    // Every hydrant report stored (each has a status word: the hydrants report `locked`), then
    // the alarms are complete: they commit with the readings that raised them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let reports = i64::from(HYDRANTS) * STEPS as i64;
    while count(
        &db,
        "SELECT count(*) FROM readings WHERE meter_id LIKE 'hydrant:hyd-%' AND quantity = 'status_word'",
    )
    .await
        < reports
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hydrant reports not all stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped only now: its last QoS 1 publishes may still be queued in its client until then.
    fleet
        .stop()
        .await
        .expect("fleet ran without transport errors");
    let rows: Vec<(String, OffsetDateTime, Option<OffsetDateTime>, i32)> = sqlx::query_as(
        "SELECT meter_id, first_seen, cleared_at, occurrences FROM alarms
         WHERE kind = 'hydrant_illegal_use' ORDER BY meter_id, first_seen",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut got: BTreeMap<String, Vec<OffsetDateTime>> = BTreeMap::new();
    for (meter, first_seen, cleared_at, occurrences) in &rows {
        assert_eq!(*occurrences, 1, "{meter}: one alarm per use");
        // The simulator closes an illegally opened outlet at the next report, unless the run
        // ended first.
        if *first_seen < start + time::Duration::hours(STEPS as i64 - 1) {
            assert!(cleared_at.is_some(), "{meter} closed again: {rows:?}");
        }
        got.entry(meter.clone()).or_default().push(*first_seen);
    }
    assert_eq!(got, want, "alarms vs the simulator's ground truth");

    stop.send(true).unwrap();
    worker.await.unwrap().unwrap();
    gateway.shutdown().await;
    pipeline::worker::forget_session(&broker, &worker_config.client_id)
        .await
        .unwrap();
    db.drop_database().await;
}
