//! The command service end to end: a real gateway with a hydrant bridge, a simulated hydrant
//! (`simulators::mqtt::Hydrant`) over Mosquitto, a real pipeline worker storing the hydrant's
//! status readings, and the control service (`pipeline::control::service`) on a fresh
//! PostgreSQL database.
//!
//! Asserted: a permit unlock is published from the outbox, executed once by the hydrant and
//! acknowledged; issuing the same id again and re-publishing it execute nothing more; acks
//! repeated by a gateway restart add no events; the hydrant's next status confirms the unlock
//! by telemetry; a hydrant open without a permit raises `hydrant_illegal_use`; revoking the
//! permit locks the hydrant; a burst alarm on `{root}/alarms` makes the service publish a
//! valve close for the meter's gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway::runtime::Gateway;
use model::{Alarm, AlarmKind, AlarmSeverity, DeviceCommand, MeterId};
use pipeline::control::{self, CentralState, hydrant, service};
use pipeline::testing::TestDatabase;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use simulators::mqtt::{Hydrant, HydrantCommand};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const GW: &str = "gw-ctl-e2e";

/// Subscribes `filter` and forwards every publish (after the SUBACK).
async fn subscribe(
    name: &str,
    filter: &str,
) -> (AsyncClient, UnboundedReceiver<(String, Vec<u8>)>) {
    let (client, mut events) = wm_tests::mqtt_client(name);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, rx) = unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        r.send(()).ok();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("MQTT connection of the test failed (is Mosquitto running?): {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .expect("SUBACK within 10 s")
        .expect("subscriber alive");
    (client, rx)
}

/// Polls `check` until it returns `Some`, failing with `what` after `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn state(pool: &PgPool, id: &str) -> Option<CentralState> {
    control::get(pool, id).await.ok().map(|c| c.state)
}

async fn event_count(pool: &PgPool, id: &str) -> usize {
    control::events(pool, id)
        .await
        .map(|e| e.len())
        .unwrap_or(0)
}

fn gateway_config(root: &str, site: &str, spool: &std::path::Path) -> edge_config::GatewayConfig {
    let url = pipeline::config::mqtt_url();
    let (host, port) = pipeline::config::parse_mqtt_url(&url).expect("MQTT_URL");
    let cid = root.replace('/', "-");
    let toml = format!(
        r#"gateway_id = "{GW}"
[uplink]
broker = "mqtt://{host}:{port}"
client_id = "{cid}-gw"
topic_root = "{root}"
partitions = 4
batch_size = 50
[spool]
dir = "{spool}"
[metrics]
listen = "127.0.0.1:0"
[[source]]
id = "hydrants"
kind = "hydrant_mqtt"
host = "{host}"
port = {port}
client_id = "{cid}-hyd"
topic_prefix = "{site}"
ack_timeout = "10s"
"#,
        spool = spool.display()
    );
    edge_config::parse(&toml, "control-e2e.toml".as_ref()).expect("gateway config")
}

/// Plays hydrant `hyd-0001` of `site`: executes commands with the simulator's model and
/// answers on its ack topic. Returns the count of executions (repeated ids not counted).
async fn run_hydrant(site: &str) -> Arc<AtomicU64> {
    let (client, mut cmds) = subscribe("ctl-hydrant", &format!("{site}/hyd-0001/cmd")).await;
    let executed = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&executed);
    let ack_topic = format!("{site}/hyd-0001/ack");
    tokio::spawn(async move {
        let mut h = Hydrant::new(1);
        while let Some((_, body)) = cmds.recv().await {
            let Ok(cmd) = serde_json::from_slice::<HydrantCommand>(&body) else {
                continue;
            };
            let ack = h.handle(&cmd, OffsetDateTime::now_utc().unix_timestamp());
            count.store(h.executed, Ordering::SeqCst);
            let body = serde_json::to_vec(&ack).expect("ack json");
            if client
                .publish(&ack_topic, QoS::AtLeastOnce, false, body)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    executed
}

fn hydrant_up(id: &str, open: bool, locked: bool) -> Vec<u8> {
    let ts = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("ts");
    serde_json::json!({
        "v": 1, "hydrant": id, "ts": ts, "pressure_bar": "2.10",
        "state": if open { "open" } else { "closed" }, "locked": locked,
        "events": if open { vec!["open"] } else { vec![] },
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_through_the_real_gateway_and_simulated_hydrant() {
    let root = wm_tests::unique_prefix("control");
    let site = format!("{root}/hyd");
    let db = TestDatabase::create().await;
    let pool = db.pool.clone();
    let broker = pipeline::config::mqtt_url();
    for (meter, protocol, valve, auto) in [
        ("hydrant:hyd-0001", "named", false, false),
        ("hydrant:hyd-0002", "named", false, false),
        ("cjt188:00000000000777", "cjt188", true, true),
    ] {
        sqlx::query(
            "INSERT INTO meters (meter_id, protocol, gateway_id, has_valve, auto_close_on_burst) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(meter)
        .bind(protocol)
        .bind(GW)
        .bind(valve)
        .bind(auto)
        .execute(&pool)
        .await
        .expect("register");
    }

    // Observers: every ack of the gateway and every command it is sent.
    let (_a, mut acks) = subscribe("ctl-acks", &format!("{root}/{GW}/cmd-ack")).await;
    let (_c, mut cmds) = subscribe("ctl-cmds", &format!("{root}/{GW}/cmd/#")).await;
    let (_l, mut alarms) = subscribe("ctl-alarms", &format!("{root}/alarms")).await;
    let executed = run_hydrant(&site).await;

    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let gateway = Gateway::start(gateway_config(&root, &site, &spool))
        .await
        .expect("gateway starts");
    let cid = root.replace('/', "-");
    let mut worker = pipeline::worker::WorkerConfig::new(&broker, &root, 0, 1, 4).expect("worker");
    worker.client_id = format!("{cid}-pipeline");
    let worker_client = worker.client_id.clone();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let worker_task = tokio::spawn(pipeline::worker::run(
        worker,
        pool.clone(),
        Arc::new(pipeline::ingest::IngestMetrics::default()),
        shutdown.clone(),
    ));
    let mut config =
        service::ServiceConfig::new(&broker, &root, &format!("{cid}-control")).expect("config");
    config.sweep_interval = Duration::from_millis(500);
    let service_task = tokio::spawn(service::run(pool.clone(), config, shutdown));

    // 1. A permit and its unlock: outbox → gateway → hydrant, acknowledged once.
    let now = OffsetDateTime::now_utc();
    hydrant::create_permit(
        &pool,
        &hydrant::Permit {
            id: "P-E2E".into(),
            hydrant: "hydrant:hyd-0001".into(),
            holder: "street cleaning".into(),
            valid_from: now - time::Duration::minutes(1),
            valid_to: now + time::Duration::hours(1),
            volume_limit_m3: None,
            issued_by: "user:permits".into(),
        },
    )
    .await
    .expect("permit");
    let unlock = hydrant::unlock(&pool, "P-E2E", "user:holder", OffsetDateTime::now_utc())
        .await
        .expect("unlock inside the permit");
    let id = unlock.command.id.clone();
    wait_for(
        "the unlock acknowledged",
        Duration::from_secs(120),
        || async { (state(&pool, &id).await == Some(CentralState::Acknowledged)).then_some(()) },
    )
    .await;
    assert_eq!(executed.load(Ordering::SeqCst), 1);

    let (hyd, _hyd_rx) = subscribe("ctl-hyd-up", &format!("{root}/unused")).await;
    // 2. The same id again: no new command; re-published: the gateway only repeats its ack.
    assert!(
        !hydrant::unlock(&pool, "P-E2E", "user:holder", OffsetDateTime::now_utc())
            .await
            .expect("idempotent")
            .created
    );
    let mut seen_acks = 0;
    let count_acks = |acks: &mut UnboundedReceiver<(String, Vec<u8>)>, n: &mut usize| {
        while let Ok((_, p)) = acks.try_recv() {
            let a: model::CommandAck = serde_json::from_slice(&p).expect("ack");
            if a.id.0 == id {
                *n += 1;
            }
        }
    };
    wait_for("the first acks observed", Duration::from_secs(30), || {
        count_acks(&mut acks, &mut seen_acks);
        let n = seen_acks;
        async move { (n >= 2).then_some(()) }
    })
    .await;
    // The command re-sent as published (a broker re-delivery, a second centre): same id.
    let row = control::get(&pool, &id).await.expect("row");
    let wire = serde_json::to_vec(&control::device_command(&row).expect("wire")).expect("json");
    hyd.publish(
        control::command_topic(&root, GW, &row.device),
        QoS::AtLeastOnce,
        false,
        wire,
    )
    .await
    .expect("re-send");
    let before = seen_acks;
    wait_for(
        "the duplicate's repeated ack",
        Duration::from_secs(60),
        || {
            count_acks(&mut acks, &mut seen_acks);
            let n = seen_acks;
            async move { (n > before).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        executed.load(Ordering::SeqCst),
        1,
        "a re-sent id is not executed again"
    );

    // 3. Telemetry: the hydrant reports unlocked and open → confirmed by telemetry.
    let confirmed = wait_for(
        "confirmation by telemetry",
        Duration::from_secs(120),
        || {
            let (pool, hyd, site, id) = (pool.clone(), hyd.clone(), site.clone(), id.clone());
            async move {
                // Re-sent until stored: the bridge may still be subscribing on a slow machine.
                hyd.publish(
                    format!("{site}/hyd-0001/up"),
                    QoS::AtLeastOnce,
                    false,
                    hydrant_up("hyd-0001", true, false),
                )
                .await
                .ok();
                tokio::time::sleep(Duration::from_millis(400)).await;
                (state(&pool, &id).await == Some(CentralState::ConfirmedByTelemetry)).then_some(())
            }
        },
    )
    .await;
    let _: () = confirmed;

    // 4. The second hydrant opens with no permit: hydrant_illegal_use, stored and published.
    wait_for("hydrant_illegal_use", Duration::from_secs(120), || {
        let (pool, hyd, site) = (pool.clone(), hyd.clone(), site.clone());
        async move {
            hyd.publish(
                format!("{site}/hyd-0002/up"),
                QoS::AtLeastOnce,
                false,
                hydrant_up("hyd-0002", true, true),
            )
            .await
            .ok();
            tokio::time::sleep(Duration::from_millis(400)).await;
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM alarms WHERE meter_id = 'hydrant:hyd-0002' \
                 AND kind = 'hydrant_illegal_use' AND cleared_at IS NULL",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (n == 1).then_some(())
        }
    })
    .await;
    wait_for(
        "the illegal-use alarm on {root}/alarms",
        Duration::from_secs(30),
        || {
            let mut found = false;
            while let Ok((_, p)) = alarms.try_recv() {
                if let Ok(a) = serde_json::from_slice::<Alarm>(&p) {
                    found |= a.kind == AlarmKind::HydrantIllegalUse
                        && a.meter.as_str() == "hydrant:hyd-0002";
                }
            }
            async move { found.then_some(()) }
        },
    )
    .await;

    // 5. Revoking the permit locks the hydrant (a second execution).
    hydrant::revoke(&pool, "P-E2E", "user:permits", OffsetDateTime::now_utc())
        .await
        .expect("revoke");
    wait_for(
        "the lock acknowledged",
        Duration::from_secs(120),
        || async {
            (state(&pool, "permit:P-E2E:lock").await == Some(CentralState::Acknowledged))
                .then_some(())
        },
    )
    .await;
    assert_eq!(executed.load(Ordering::SeqCst), 2);

    // 6. A gateway restart re-publishes its recent acks: no new events.
    let events_before = event_count(&pool, &id).await;
    gateway.shutdown().await;
    let gateway = Gateway::start(gateway_config(&root, &site, &spool))
        .await
        .expect("gateway restarts");
    let before = seen_acks;
    wait_for(
        "acks re-published after the restart",
        Duration::from_secs(60),
        || {
            count_acks(&mut acks, &mut seen_acks);
            let n = seen_acks;
            async move { (n > before).then_some(()) }
        },
    )
    .await;

    // 7. A burst alarm: the service closes the valve of an auto-close meter at once.
    let meter = "cjt188:00000000000777";
    sqlx::query(
        "INSERT INTO alarms (meter_id, kind, severity, raised_at, first_seen, last_seen) \
         VALUES ($1, 'burst', 'critical', now(), now(), now())",
    )
    .bind(meter)
    .execute(&pool)
    .await
    .expect("burst alarm row");
    let alarm = Alarm {
        meter: MeterId::new(meter).expect("id"),
        kind: AlarmKind::Burst,
        severity: AlarmSeverity::Critical,
        raised_at: OffsetDateTime::now_utc(),
        cleared_at: None,
        detail: serde_json::Map::new(),
    };
    hyd.publish(
        format!("{root}/alarms"),
        QoS::AtLeastOnce,
        false,
        serde_json::to_vec(&alarm).expect("alarm"),
    )
    .await
    .expect("publish alarm");
    let close: DeviceCommand = wait_for(
        "the valve close for the gateway",
        Duration::from_secs(60),
        || {
            let mut found = None;
            while let Ok((topic, p)) = cmds.try_recv() {
                if topic.ends_with(meter) {
                    found = serde_json::from_slice::<DeviceCommand>(&p).ok();
                }
            }
            async move { found }
        },
    )
    .await;
    assert_eq!(close.action, model::CommandAction::ValveClose);
    assert!(close.id.0.starts_with("burst-"), "{}", close.id);
    let decision = pipeline::control::rules::decisions(&pool, meter)
        .await
        .expect("decisions");
    assert_eq!(decision.last().map(|d| d.outcome.as_str()), Some("issued"));

    // The service handles messages in order: once the close's gateway ack (unknown device at
    // this gateway: failed) is applied, every repeated unlock ack before it was too.
    wait_for(
        "the close's gateway ack applied",
        Duration::from_secs(60),
        || async { (state(&pool, &close.id.0).await == Some(CentralState::Failed)).then_some(()) },
    )
    .await;
    let events = control::events(&pool, &id).await.expect("events");
    let states: Vec<&str> = events.iter().map(|e| e.state.as_str()).collect();
    assert_eq!(event_count(&pool, &id).await, events_before, "{states:?}");
    assert_eq!(
        states.iter().filter(|s| **s == "acknowledged").count(),
        1,
        "{states:?}"
    );
    assert!(states.contains(&"confirmed_by_telemetry"), "{states:?}");

    stop.send(true).ok();
    service_task.await.expect("service task").expect("service");
    worker_task.await.expect("worker task").expect("worker");
    gateway.shutdown().await;
    pipeline::worker::forget_session(&broker, &worker_client)
        .await
        .ok();
    db.drop_database().await;
}
