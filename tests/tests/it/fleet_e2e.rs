//! The whole stack end to end: a simulated fleet → a real gateway → Mosquitto → a real pipeline
//! worker → a fresh PostgreSQL database.
//!
//! NB-IoT CoAP meters, NB-IoT meters behind an IoT platform (signed HTTP push envelopes),
//! concentrators (MQTT JSON), wM-Bus meters (encrypted UDP telegrams) and a Modbus TCP DMA inlet
//! flow meter report to a gateway started in-process from a generated TOML
//! configuration. The test asserts that every reading the fleet sent is stored exactly once,
//! that stored values equal the simulator's model values exactly, and that a valve command is
//! queued, executed by the meter on its next uplink, acknowledged once and never re-executed
//! when it is sent again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gateway::runtime::Gateway;
use model::{CommandAck, CommandState};
use rumqttc::QoS;
use rust_decimal::Decimal;
use simulators::engine::{Emission, Engine};
use simulators::fleet::{
    CoapConfig, ConcentratorConfig, Fleet, FleetConfig, HttpPushConfig, ModbusConfig, Upload,
    WmbusConfig,
};
use simulators::mqtt::MqttConfig;
use simulators::scenario::Scenario;
use testkit::TestDatabase;
use time::OffsetDateTime;
use tokio::sync::mpsc::UnboundedReceiver;

use wm_tests::subscribe;

const GW: &str = "gw-fleet";
const METERS: u32 = 60;
const MBUS_METERS: u32 = 10;
const COAP_METERS: u32 = 10;
const PUSH_METERS: u32 = 5;
const PUSH_SECRET: &str = "fleet-e2e-push-secret";
const NBIOT_KEY_SEED: &str = "fleet-e2e-nbiot-keys";
const CONCENTRATOR_METERS: u32 = 20;
const STEPS: u64 = 5;
const SEED: u64 = 11;

/// Returns a port nobody listens on now (bound and released; the gateway binds it next).
fn free_port(udp: bool) -> u16 {
    if udp {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp bind");
        s.local_addr().expect("addr").port()
    } else {
        let s = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp bind");
        s.local_addr().expect("addr").port()
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

fn valve_close(id: &str, device: &str) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    serde_json::json!({
        "v": 1, "id": id, "gateway": GW, "device": device,
        "action": {"type": "valve_close"},
        "issued_by": "fleet-e2e", "issued_at": rfc3339(now),
        "expires_at": rfc3339(now + time::Duration::minutes(10))
    })
    .to_string()
    .into_bytes()
}

async fn next_ack(rx: &mut UnboundedReceiver<(String, Vec<u8>)>) -> CommandAck {
    let (_, payload) = tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("command ack within 15 s")
        .expect("ack channel open");
    serde_json::from_slice(&payload).expect("ack JSON")
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("metrics request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("metrics read");
    out
}

/// Stored volume registers (storage 0, not estimates) by source kind.
async fn counts_by_source(db: &TestDatabase) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT source, count(*) FROM readings
         WHERE quantity = 'volume' AND storage = 0 AND quality <> 'estimated'
         GROUP BY source",
    )
    .fetch_all(&db.pool)
    .await
    .expect("count query")
    .into_iter()
    .collect()
}

/// A meter's stored volume registers in time order.
async fn volumes(db: &TestDatabase, meter: &str) -> Vec<Decimal> {
    sqlx::query_scalar::<_, Decimal>(
        "SELECT value FROM readings
         WHERE meter_id = $1 AND quantity = 'volume' AND storage = 0 AND quality <> 'estimated'
         ORDER BY ts",
    )
    .bind(meter)
    .fetch_all(&db.pool)
    .await
    .expect("volume query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulated_fleet_through_gateway_and_pipeline_into_postgres() {
    let started = Instant::now();
    let root = wm_tests::unique_prefix("fleet");
    let site = format!("{root}/site");
    let db = TestDatabase::create().await;
    let broker = pipeline::config::mqtt_url();
    let model::BrokerUrl { host, port, .. } =
        pipeline::config::broker_url(&broker).expect("MQTT_URL");

    // The fleet: readings end at the last full hour, so none is in the future for the VEE.
    let now = OffsetDateTime::now_utc();
    let hour = now.replace_minute(0).and_then(|t| t.replace_second(0));
    let hour = hour
        .and_then(|t| t.replace_nanosecond(0))
        .expect("whole hour");
    let start = hour - time::Duration::hours(STEPS as i64);
    let mut scenario = Scenario::plain(METERS, 1, SEED, start);
    scenario.fleet.mbus_meters = MBUS_METERS;
    let population = simulators::engine::Population::new(&scenario);
    let ids: Vec<String> = population
        .meters
        .iter()
        .map(|m| m.id.as_str().to_owned())
        .collect();
    // Routes as the fleet assigns them: CJ/T 188 meters to CoAP first, then the platform's
    // HTTP push, then concentrators; M-Bus-addressed meters (the last ones) to wM-Bus.
    let coap_ids: Vec<&str> = ids
        .iter()
        .take(COAP_METERS as usize)
        .map(String::as_str)
        .collect();
    let push_ids: Vec<&str> = ids
        .iter()
        .skip(COAP_METERS as usize)
        .take(PUSH_METERS as usize)
        .map(String::as_str)
        .collect();
    let first_conc = (COAP_METERS + PUSH_METERS) as usize;
    let conc_ids: Vec<&str> = ids
        .iter()
        .skip(first_conc)
        .take(CONCENTRATOR_METERS as usize)
        .map(String::as_str)
        .collect();
    let first_mbus = (METERS - MBUS_METERS) as usize;
    let wmbus_ids: Vec<&str> = ids.iter().skip(first_mbus).map(String::as_str).collect();
    assert!(
        coap_ids
            .iter()
            .chain(&push_ids)
            .all(|m| m.starts_with("cjt188:"))
    );
    assert!(wmbus_ids.iter().all(|m| m.starts_with("mbus:")));

    // The gateway, with every source the fleet speaks to on ephemeral ports.
    let dir = tempfile::tempdir().expect("tempdir");
    let wmbus_port = free_port(true);
    let modbus_port = free_port(false);
    let keys: String = (first_mbus as u32..METERS)
        .map(|i| {
            format!(
                "\"{}\" = \"{}\"\n",
                ids[i as usize],
                hex::encode_upper(simulators::frames::wmbus_key(SEED, i))
            )
        })
        .collect();
    // The CoAP meters authenticate (auth = "frame_mac"): their keys in the gateway's key file.
    let nbiot_keys = dir.path().join("nbiot-keys.toml");
    std::fs::write(
        &nbiot_keys,
        coap_ids
            .iter()
            .map(|m| {
                let key = simulators::nbiot::meter_key(NBIOT_KEY_SEED, m);
                format!("\"{m}\" = \"{}\"\n", hex::encode(key))
            })
            .collect::<String>(),
    )
    .expect("key file");
    let client_base = root.replace('/', "-");
    let sources = format!(
        r#"
[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:0"
meter_utc_offset_minutes = 480
key_file = "{nbiot_keys}"

[[source]]
id = "platform"
kind = "http_push"
listen = "127.0.0.1:0"
secret = "{PUSH_SECRET}"

[[source]]
id = "concentrators"
kind = "mqtt"
broker = "mqtt://{host}:{port}"
client_id = "{client_base}-conc"
topics = [{{ filter = "{site}/concentrator/+/readings", format = "json" }}]

[[source]]
id = "wmbus"
kind = "wmbus_udp"
listen = "127.0.0.1:{wmbus_port}"
[source.keys]
{keys}
[[source]]
id = "dma"
kind = "modbus_tcp"
[source.timing]
timeout = "1s"
retries = 1
[[source.devices]]
name = "dma-0-inlet"
address = "127.0.0.1:{modbus_port}"
unit_id = 1
map = "generic-emf"
poll_interval = "1s"
"#,
        nbiot_keys = nbiot_keys.display(),
    );
    let spool = dir.path().join("spool");
    let uplink = "partitions = 4\nbatch_size = 200\n";
    let toml = crate::common::gateway_toml(GW, &root, &spool, uplink, &sources);
    let config = edge_config::parse(&toml, "fleet-e2e.toml".as_ref()).expect("gateway config");
    let (_acks_client, mut acks) = subscribe("fleet-acks", &format!("{root}/{GW}/cmd-ack")).await;
    let gateway = Gateway::start(config).await.expect("gateway starts");
    let coap = gateway.source_addr("nbiot").expect("CoAP bound");
    let platform = gateway.source_addr("platform").expect("HTTP push bound");

    // The pipeline worker, on the same topic root and partitions.
    let mut worker = pipeline::worker::WorkerConfig::new(&broker, &root, 0, 1, 4).expect("worker");
    worker.client_id = format!("{client_base}-pipeline");
    let ingest = std::sync::Arc::new(pipeline::ingest::IngestMetrics::default());
    let (stop_worker, worker_shutdown) = tokio::sync::watch::channel(false);
    let worker_task = tokio::spawn(pipeline::worker::run(
        worker,
        db.pool.clone(),
        ingest,
        worker_shutdown,
    ));

    // The concentrator source is subscribed once a probe (not a reading) is counted.
    let (probe, _probe_rx) = subscribe("fleet-probe", &format!("{root}/unused")).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        probe
            .publish(
                format!("{site}/concentrator/probe/readings"),
                QoS::AtLeastOnce,
                false,
                b"not json".to_vec(),
            )
            .await
            .expect("probe publish");
        tokio::time::sleep(Duration::from_millis(200)).await;
        if metrics(gateway.metrics_addr())
            .await
            .contains("wm_gateway_frames_total{source=\"concentrators\"}")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway's concentrator source never received the probe"
        );
    }

    // Downlink: a valve close for the first CoAP meter, queued until its next uplink.
    let valve_meter = coap_ids[0];
    let cmd_topic = format!("{root}/{GW}/cmd/{valve_meter}");
    probe
        .publish(
            &cmd_topic,
            QoS::AtLeastOnce,
            false,
            valve_close("valve-1", valve_meter),
        )
        .await
        .expect("command publish");
    let a = next_ack(&mut acks).await;
    assert_eq!(
        (a.id.0.as_str(), &a.state),
        ("valve-1", &CommandState::Queued)
    );

    // Run the fleet.
    let mut fleet_config = FleetConfig::new(scenario.clone());
    // wM-Bus and Modbus readings carry the gateway's receive time and the pipeline keeps a
    // meter's last read at one-second resolution: steps are kept well over a second apart.
    fleet_config.step_every = Duration::from_millis(1500);
    fleet_config.max_steps = Some(STEPS);
    fleet_config.coap = Some(CoapConfig {
        gateway: coap,
        meters: COAP_METERS,
    });
    fleet_config.nbiot_key_seed = Some(NBIOT_KEY_SEED.into());
    fleet_config.http_push = Some(HttpPushConfig {
        gateway: platform,
        path: "/v1/push".into(),
        secret: PUSH_SECRET.into(),
        platform: decoders::envelope::Platform::CtWing,
        meters: PUSH_METERS,
    });
    fleet_config.mqtt =
        Some(MqttConfig::from_url(&broker, &site, &format!("{client_base}-fleet")).expect("mqtt"));
    fleet_config.concentrators = Some(ConcentratorConfig {
        format: simulators::fleet::ConcentratorFormat::Json,
        count: 2,
        meters: CONCENTRATOR_METERS,
        upload: Upload::EveryStep,
    });
    fleet_config.wmbus = Some(WmbusConfig {
        gateway: format!("127.0.0.1:{wmbus_port}").parse().expect("addr"),
        meters: MBUS_METERS,
        encrypted: true,
    });
    fleet_config.modbus = Some(ModbusConfig {
        bind: format!("127.0.0.1:{modbus_port}").parse().expect("addr"),
    });
    let mut fleet = Fleet::start(fleet_config).await.expect("fleet starts");
    assert_eq!(
        fleet
            .modbus_devices()
            .first()
            .map(|d| (d.unit, d.name.as_str())),
        Some((1, "dma-0-inlet"))
    );

    // The meter executes the command on its first uplink and confirms it: Sent, Acknowledged.
    let a = next_ack(&mut acks).await;
    assert_eq!(
        (a.id.0.as_str(), &a.state),
        ("valve-1", &CommandState::Sent)
    );
    let a = next_ack(&mut acks).await;
    assert_eq!(
        (a.id.0.as_str(), &a.state),
        ("valve-1", &CommandState::Acknowledged)
    );
    // Sent again while the fleet still runs: reported as done, never executed again.
    probe
        .publish(
            &cmd_topic,
            QoS::AtLeastOnce,
            false,
            valve_close("valve-1", valve_meter),
        )
        .await
        .expect("command re-publish");
    let a = next_ack(&mut acks).await;
    assert_eq!(
        (a.id.0.as_str(), &a.state),
        ("valve-1", &CommandState::Acknowledged)
    );

    let counts = fleet.wait_finished().await;
    // Values equal the model's exactly: replay the same scenario (and the
    // valve close) on a second engine.
    let mut model: Vec<Vec<Emission>> = vec![Vec::new(); METERS as usize];
    let mut engine = Engine::new(scenario.clone());
    for step in 0..STEPS {
        engine.step(|e| model[e.meter as usize].push(*e));
        if step == 0 {
            // The fleet's meter 0 closes its valve after its first uplink.
            engine.set_valve(0, false);
        }
    }
    // The DMA inlet flow meter (polled every second) ends on the model's inflow, in litres.
    let inflow_ml = engine.dma_inflow(0).expect("DMA 0").0;
    let inflow = Decimal::new((inflow_ml / 1000).rem_euclid(1 << 31), 3);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let inlet = volumes(&db, "modbus:dma-0-inlet").await;
        if inlet.last() == Some(&inflow) {
            assert!(inlet.windows(2).all(|w| w[0] <= w[1]), "{inlet:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "inlet {:?} never reached {inflow}",
            inlet.last()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts_after = fleet
        .stop()
        .await
        .expect("fleet ran without transport errors");
    assert_eq!(counts_after.steps, STEPS);
    assert_eq!(counts.errors, 0, "{counts:?}");
    assert_eq!(
        counts.coap_uplinks,
        u64::from(COAP_METERS) * STEPS,
        "{counts:?}"
    );
    assert_eq!(
        (counts.http_pushes, counts.http_rejected),
        (u64::from(PUSH_METERS) * STEPS, 0),
        "{counts:?}"
    );
    assert_eq!(
        counts.concentrator_readings,
        u64::from(CONCENTRATOR_METERS) * STEPS,
        "{counts:?}"
    );
    assert_eq!(
        counts.wmbus_telegrams,
        u64::from(MBUS_METERS) * STEPS,
        "{counts:?}"
    );
    assert_eq!(
        counts.coap_valve_commands, 1,
        "executed exactly once: {counts:?}"
    );
    assert_eq!(counts.coap_valve_replies, 1, "{counts:?}");
    assert!(acks.try_recv().is_err(), "no further command acks");

    // Every reading the fleet sent is stored once.
    let expected: BTreeMap<String, i64> = [
        ("coap".to_owned(), counts.coap_uplinks as i64),
        ("http_push".to_owned(), counts.http_pushes as i64),
        ("mqtt".to_owned(), counts.concentrator_readings as i64),
        ("wmbus".to_owned(), counts.wmbus_telegrams as i64),
    ]
    .into_iter()
    .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let mut stored = counts_by_source(&db).await;
        let modbus = stored.remove("modbus_tcp").unwrap_or(0);
        if stored == expected && modbus > 0 {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "stored {stored:?} (+{modbus} modbus) != sent {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stored, expected);

    let per_step = |i: usize, f: fn(&Emission) -> Decimal| -> Vec<Decimal> {
        model[i].iter().map(f).collect()
    };
    // CoAP (CJ/T 188, 2 decimals); meter 0 had its valve closed by the command after
    // its first uplink, so its register stays at the first reading.
    // The platform's meters (CJ/T 188 inside CTWing envelopes) likewise.
    for i in [
        1usize,
        5,
        COAP_METERS as usize - 1,
        COAP_METERS as usize,
        first_conc - 1,
    ] {
        let got = volumes(&db, &ids[i]).await;
        assert_eq!(
            got,
            per_step(i, |e| simulators::frames::m3_2dp(e.register_ml)),
            "{}",
            ids[i]
        );
        assert_eq!(got.len(), STEPS as usize);
    }
    let closed = volumes(&db, valve_meter).await;
    assert_eq!(
        closed,
        per_step(0, |e| simulators::frames::m3_2dp(e.register_ml))
    );
    assert!(
        closed.iter().all(|v| *v == closed[0]),
        "valve closed: {closed:?}"
    );
    // Concentrators and wM-Bus (litres).
    for i in [first_conc, first_conc + 7, first_mbus, METERS as usize - 1] {
        let got = volumes(&db, &ids[i]).await;
        assert_eq!(got, per_step(i, Emission::register_m3), "{}", ids[i]);
        assert_eq!(got.len(), STEPS as usize);
    }
    assert_eq!(conc_ids.first().copied(), Some(ids[first_conc].as_str()));
    assert_eq!(
        push_ids.first().copied(),
        Some(ids[COAP_METERS as usize].as_str())
    );
    stop_worker.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), worker_task)
        .await
        .expect("worker stops")
        .expect("worker task")
        .expect("worker ran");
    gateway.shutdown().await;
    db.drop_database().await;
    eprintln!("fleet e2e took {:.1} s", started.elapsed().as_secs_f64());
}

/// NB-IoT meters in daily mode: each uplink carries the hourly 901F frames since the previous
/// one; the real gateway spools and publishes every one of them with its own meter time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_nbiot_uplinks_deliver_every_hourly_reading() {
    const DAILY_METERS: u32 = 3;
    const DAILY_STEPS: u64 = 24;
    let root = wm_tests::unique_prefix("daily");
    let now = OffsetDateTime::now_utc();
    let start = now
        .replace_minute(0)
        .and_then(|t| t.replace_second(0))
        .and_then(|t| t.replace_nanosecond(0))
        .expect("whole hour")
        - time::Duration::hours(DAILY_STEPS as i64 + 1);
    let scenario = Scenario::plain(DAILY_METERS, 2, SEED, start);
    let dir = tempfile::tempdir().expect("tempdir");
    let sources = r#"[[source]]
id = "nbiot"
kind = "coap"
listen = "127.0.0.1:0"
meter_utc_offset_minutes = 480
auth = "none"
"#;
    let spool = dir.path().join("spool");
    let toml = crate::common::gateway_toml("gw-daily", &root, &spool, "partitions = 2\n", sources);
    let config = edge_config::parse(&toml, "daily.toml".as_ref()).expect("gateway config");
    let (_sub, mut published) = subscribe("daily-readings", &format!("{root}/readings/+")).await;
    let gateway = Gateway::start(config).await.expect("gateway starts");

    let mut fleet_config = FleetConfig::new(scenario.clone());
    fleet_config.step_every = Duration::from_millis(20);
    fleet_config.max_steps = Some(DAILY_STEPS);
    fleet_config.nbiot_uplink = simulators::fleet::NbiotUplink::Daily;
    fleet_config.coap = Some(CoapConfig {
        gateway: gateway.source_addr("nbiot").expect("CoAP bound"),
        meters: DAILY_METERS,
    });
    let mut fleet = Fleet::start(fleet_config).await.expect("fleet starts");
    let counts = fleet.wait_finished().await;
    fleet
        .stop()
        .await
        .expect("fleet ran without transport errors");
    // One uplink per meter (each at its own hour), every hourly reading since the start in it.
    assert_eq!(counts.coap_uplinks, u64::from(DAILY_METERS), "{counts:?}");
    assert!(
        counts.nbiot_frames > u64::from(DAILY_METERS) * 20,
        "{counts:?}"
    );

    // Every frame's register reading leaves the gateway, at its own meter time.
    let mut by_meter: BTreeMap<String, Vec<(OffsetDateTime, Decimal)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while by_meter.values().map(Vec::len).sum::<usize>() < counts.nbiot_frames as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, payload) = tokio::time::timeout(left, published.recv())
            .await
            .expect("all readings published in time")
            .expect("subscriber alive");
        let batch: model::ReadingBatch = serde_json::from_slice(&payload).expect("batch JSON");
        for e in batch.entries {
            let r = e.reading;
            if r.quantity == model::Quantity::Volume && r.storage == 0 {
                by_meter
                    .entry(r.meter.as_str().to_owned())
                    .or_default()
                    .push((r.ts, r.value));
            }
        }
    }
    assert_eq!(by_meter.len(), DAILY_METERS as usize);
    // The model, hour by hour, for the meter whose day was complete (meter 0: steps 1..=24).
    let mut model: Vec<Vec<Emission>> = vec![Vec::new(); DAILY_METERS as usize];
    let mut engine = Engine::new(scenario.clone());
    for _ in 0..DAILY_STEPS {
        engine.step(|e| model[e.meter as usize].push(*e));
    }
    let population = simulators::engine::Population::new(&scenario);
    let first = population.meters[0].id.as_str().to_owned();
    let got = &by_meter[&first];
    assert_eq!(got.len(), DAILY_STEPS as usize, "{got:?}");
    for pair in got.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, time::Duration::hours(1), "{got:?}");
    }
    let values: Vec<Decimal> = got.iter().map(|(_, v)| *v).collect();
    let want: Vec<Decimal> = model[0]
        .iter()
        .map(|e| simulators::frames::m3_2dp(e.register_ml))
        .collect();
    assert_eq!(values, want);
    gateway.shutdown().await;
}
