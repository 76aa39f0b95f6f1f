//! Concentrators and hydrants really talk to Mosquitto (`MQTT_URL`, default 127.0.0.1:1883).

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use simulators::engine::{Delivery, Engine, ml_to_m3};
use simulators::fleet::{ConcentratorConfig, ConcentratorFormat, Fleet, FleetConfig, Upload};
use simulators::mqtt::{ConcentratorBatch, HydrantAck, HydrantUp, MqttConfig};
use simulators::scenario::Scenario;
use time::macros::datetime;

fn broker() -> (String, u16) {
    let b = testkit::mqtt::broker();
    (b.host, b.port)
}

/// Connects a test client and waits for the SubAck of `topic`.
async fn subscriber(name: &str, topic: &str) -> (AsyncClient, EventLoop) {
    let (client, mut el) = testkit::mqtt::connect(name);
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    testkit::mqtt::wait_suback(&mut el, 1).await;
    (client, el)
}

async fn next_publish(el: &mut EventLoop) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("a publish within 10 s")
}

#[tokio::test]
async fn concentrators_publish_every_reading_the_model_produced() {
    let prefix = testkit::names::unique_prefix("conc");
    let (_sub, mut el) = subscriber("conc-sub", &format!("{prefix}/concentrator/+/readings")).await;

    let mut scenario = Scenario::plain(40, 1, 3, datetime!(2026-11-01 0:00 UTC));
    scenario.faults.push(simulators::scenario::Fault::CommLoss {
        meter: 5,
        from: datetime!(2026-11-01 10:00 UTC),
        until: datetime!(2026-11-01 13:00 UTC),
    });
    let mut config = FleetConfig::new(scenario.clone());
    config.step_every = Duration::ZERO;
    let (host, port) = broker();
    config.mqtt = Some(MqttConfig {
        host,
        port,
        topic_prefix: format!("{prefix}/"),
        client_id: testkit::names::client_id("fleet"),
    });
    config.concentrators = Some(ConcentratorConfig {
        format: ConcentratorFormat::Json,
        count: 3,
        meters: 30,
        upload: Upload::Midnight,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    let counts = fleet.wait_finished().await;
    // 30 routed meters × 24 hourly readings, 3 lost to the comm-loss fault.
    assert_eq!(counts.concentrator_readings, 30 * 24 - 3);
    assert_eq!(counts.lost, 3);
    // Local midnight (16:00 UTC) upload + end-of-run flush, per concentrator.
    assert_eq!(counts.concentrator_batches, 6);
    let counts = fleet.stop().await.unwrap();

    // Expected values from an independent run of the same scenario.
    let mut expected: HashMap<(String, String), String> = HashMap::new();
    let mut engine = Engine::new(scenario);
    let ids: Vec<String> = engine
        .population()
        .meters
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    engine.run(|e| {
        if e.meter < 30 && e.delivery != Delivery::Lost {
            let ts = e
                .meter_time()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            expected.insert(
                (ids[e.meter as usize].clone(), ts),
                ml_to_m3(e.register_ml).to_string(),
            );
        }
    });

    let mut seen = 0;
    let mut conc = std::collections::BTreeSet::new();
    while seen < counts.concentrator_readings {
        let p = next_publish(&mut el).await;
        let batch: ConcentratorBatch = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(batch.v, 1);
        assert!(
            p.topic
                .ends_with(&format!("concentrator/{}/readings", batch.concentrator))
        );
        conc.insert(batch.concentrator.clone());
        for r in &batch.readings {
            let want = expected
                .get(&(r.meter.clone(), r.ts.clone()))
                .unwrap_or_else(|| panic!("unexpected reading {r:?}"));
            assert_eq!(&r.volume_m3, want, "{r:?}");
            seen += 1;
        }
    }
    assert_eq!(seen, 30 * 24 - 3);
    assert_eq!(conc.len(), 3);
}

#[tokio::test]
async fn hydrants_ack_commands_and_execute_each_command_id_once() {
    let prefix = testkit::names::unique_prefix("hyd");
    let (sub, mut el) = subscriber("hyd-sub", &format!("{prefix}/hydrant/hyd-0001/ack")).await;
    let scenario = Scenario::plain(5, 1, 3, datetime!(2026-11-01 0:00 UTC));
    let mut config = FleetConfig::new(scenario);
    config.step_every = Duration::from_millis(50);
    let (host, port) = broker();
    config.mqtt = Some(MqttConfig {
        host,
        port,
        topic_prefix: format!("{prefix}/"),
        client_id: testkit::names::client_id("hyd-fleet"),
    });
    config.hydrants = 3;
    let fleet = Fleet::start(config).await.unwrap();

    let cmd = serde_json::json!({"command_id": "c-1", "action": "unlock", "duration_s": 600});
    let topic = format!("{prefix}/hydrant/hyd-0001/cmd");
    for _ in 0..2 {
        sub.publish(&topic, QoS::AtLeastOnce, false, cmd.to_string())
            .await
            .unwrap();
    }
    sub.publish(
        &topic,
        QoS::AtLeastOnce,
        false,
        r#"{"command_id":"c-2","action":"explode"}"#,
    )
    .await
    .unwrap();
    let mut acks = Vec::new();
    while acks.len() < 3 {
        let p = next_publish(&mut el).await;
        acks.push(serde_json::from_slice::<HydrantAck>(&p.payload).unwrap());
    }
    assert_eq!(acks[0].command_id, "c-1");
    assert_eq!(acks[0].result, "ok");
    assert_eq!(acks[1], acks[0]);
    assert_eq!(acks[2].result, "refused");
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.hydrant_commands_executed, 1);
    assert_eq!(counts.hydrant_acks, 3);
    assert!(counts.hydrant_ups >= 3);
}

#[tokio::test]
async fn hydrant_status_reports_unlock_as_open() {
    let prefix = testkit::names::unique_prefix("hyd-up");
    let (sub, mut el) = subscriber("hyd-up-sub", &format!("{prefix}/hydrant/hyd-0000/up")).await;
    let scenario = Scenario::plain(5, 1, 3, datetime!(2026-11-01 0:00 UTC));
    let mut config = FleetConfig::new(scenario);
    config.step_every = Duration::from_millis(100);
    let (host, port) = broker();
    config.mqtt = Some(MqttConfig {
        host,
        port,
        topic_prefix: format!("{prefix}/"),
        client_id: testkit::names::client_id("hyd-up-fleet"),
    });
    config.hydrants = 1;
    let fleet = Fleet::start(config).await.unwrap();
    let first: HydrantUp = serde_json::from_slice(&next_publish(&mut el).await.payload).unwrap();
    assert_eq!(first.v, 1);
    assert_eq!(first.hydrant, "hyd-0000");
    assert!(first.pressure_bar.parse::<f64>().unwrap() > 1.0);
    sub.publish(
        format!("{prefix}/hydrant/hyd-0000/cmd"),
        QoS::AtLeastOnce,
        false,
        r#"{"command_id":"u-1","action":"unlock","duration_s":36000}"#,
    )
    .await
    .unwrap();
    let opened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let up: HydrantUp =
                serde_json::from_slice(&next_publish(&mut el).await.payload).unwrap();
            if !up.locked {
                return up;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(opened.state, "open");
    assert!(opened.events.contains(&"open".to_owned()));
    fleet.stop().await.unwrap();
}

#[tokio::test]
async fn concentrators_forward_raw_cjt188_frames() {
    let prefix = testkit::names::unique_prefix("conc-frames");
    let (_sub, mut el) = subscriber("frames-sub", &format!("{prefix}/concentrator/+/frame")).await;
    let mut scenario = Scenario::plain(10, 1, 5, datetime!(2026-11-01 0:00 UTC));
    scenario
        .faults
        .push(simulators::scenario::Fault::CorruptedFrames {
            meter: 0,
            from: datetime!(2026-11-01 00:00 UTC),
            until: datetime!(2026-11-01 01:00 UTC),
        });
    let mut config = FleetConfig::new(scenario);
    config.step_every = Duration::ZERO;
    config.max_steps = Some(2);
    let (host, port) = broker();
    config.mqtt = Some(MqttConfig {
        host,
        port,
        topic_prefix: format!("{prefix}/"),
        client_id: testkit::names::client_id("frames-fleet"),
    });
    config.concentrators = Some(ConcentratorConfig {
        format: ConcentratorFormat::Frames,
        count: 1,
        meters: 4,
        upload: Upload::EveryStep,
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    fleet.wait_finished().await;
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.concentrator_frames, 8);
    assert_eq!(counts.corrupted, 1);
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..8 {
        let p = next_publish(&mut el).await;
        assert!(p.topic.ends_with("concentrator/conc-000/frame"));
        match decoders::cjt188::decode(&p.payload) {
            Ok(f) => {
                assert!(f.meter.id.starts_with("7833"));
                ok += 1;
            }
            Err(_) => bad += 1,
        }
    }
    assert_eq!((ok, bad), (7, 1));
}

#[tokio::test]
async fn hydrant_events_are_in_the_ground_truth() {
    let prefix = testkit::names::unique_prefix("hyd-truth");
    let (_sub, mut el) = subscriber("hyd-truth-sub", &format!("{prefix}/hydrant/+/up")).await;
    let scenario = Scenario::plain(5, 30, 3, datetime!(2026-11-01 0:00 UTC));
    let mut config = FleetConfig::new(scenario);
    // Paced (about 2000 messages/s) so a loaded CI machine's subscriber never falls behind the
    // broker's per-client queue of 1000 and has messages dropped.
    config.step_every = Duration::from_millis(5);
    config.max_steps = Some(200);
    let (host, port) = broker();
    config.mqtt = Some(MqttConfig {
        host,
        port,
        topic_prefix: format!("{prefix}/"),
        client_id: testkit::names::client_id("hyd-truth-fleet"),
    });
    config.hydrants = 10;
    // Read while the fleet runs: the broker queues only so many messages per client.
    let collector = tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let up: HydrantUp =
                serde_json::from_slice(&next_publish(&mut el).await.payload).unwrap();
            for ev in &up.events {
                if ev == "illegal_use" || ev == "tilt" {
                    seen.insert((up.hydrant.clone(), up.ts.clone(), ev.clone()));
                }
            }
        }
        seen
    });
    let mut fleet = Fleet::start(config).await.unwrap();
    fleet.wait_finished().await;
    let truth = fleet.ground_truth();
    let counts = fleet.stop().await.unwrap();
    assert_eq!(counts.hydrant_ups, 2000);
    let seen = collector.await.unwrap();
    let from_truth: std::collections::BTreeSet<_> = truth
        .events
        .iter()
        .map(|e| {
            let ev = match e.kind {
                simulators::truth::TruthKind::HydrantIllegalUse => "illegal_use",
                simulators::truth::TruthKind::HydrantTilt => "tilt",
                other => panic!("unexpected {other:?}"),
            };
            let ts = e
                .from
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            let hid = e.meter.strip_prefix("hydrant:").unwrap().to_owned();
            (hid, ts, ev.to_owned())
        })
        .collect();
    assert!(!seen.is_empty());
    assert_eq!(seen, from_truth);
}
