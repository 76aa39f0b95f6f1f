//! Hydrant bridge against the real Mosquitto on 127.0.0.1:1883, with a simulated hydrant.

use std::time::Duration;

use edge_config::hydrant::HydrantSourceConfig;
use gateway::sources::hydrant::HydrantSource;
use gateway::sources::{Source, SourceEnv, SourceError};
use gateway::{CommandOutcome, CommandRequest, IngestSink, SourceContext, SubmitRequest};
use model::{CommandAction, CommandId, DeviceCommand, GatewayId, MeterId, Quantity};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

struct Harness {
    prefix: String,
    sink_rx: mpsc::Receiver<SubmitRequest>,
    cmd_tx: mpsc::Sender<CommandRequest>,
    sink: IngestSink,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
}

async fn start(name: &str, ack_timeout: Duration) -> Harness {
    let prefix = testkit::names::unique_prefix(name);
    let mut config = HydrantSourceConfig::new(
        "127.0.0.1",
        1883,
        format!("gw-{}", prefix.replace('/', "-")),
    );
    config.topic_prefix = prefix.clone();
    config.ack_timeout = ack_timeout;
    let (sink, sink_rx) = IngestSink::new(16);
    let (cmd_tx, commands) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(
        GatewayId::new("gw-1").unwrap(),
        "hydrants",
        model::SourceKind::Mqtt,
        sink.clone(),
        commands,
        shutdown.clone(),
    );
    let readiness = ctx.readiness.clone();
    let source = HydrantSource::build(
        &edge_config::Valid::new(config).expect("valid config"),
        &SourceEnv::new("hydrants"),
    )
    .await
    .unwrap();
    let task = tokio::spawn(source.run(ctx));
    // Subscribed (both SUBACKs in) before the test publishes.
    tokio::time::timeout(Duration::from_secs(10), readiness.wait_ready())
        .await
        .expect("hydrant bridge ready within 10 s");
    Harness {
        prefix,
        sink_rx,
        cmd_tx,
        sink,
        shutdown,
        task,
    }
}

/// A simulated hydrant: publishes uplinks, answers commands (once per command id).
async fn hydrant_client(
    prefix: &str,
    hid: &str,
) -> (AsyncClient, mpsc::Receiver<serde_json::Value>) {
    let (client, mut eventloop) = testkit::mqtt::connect(&format!("sim-{prefix}-{hid}"));
    client
        .subscribe(format!("{prefix}/{hid}/cmd"), QoS::AtLeastOnce)
        .await
        .unwrap();
    testkit::mqtt::wait_suback(&mut eventloop, 1).await;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    if tx.send(v).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

fn command(id: &str, device: &str, action: CommandAction) -> DeviceCommand {
    let now = OffsetDateTime::now_utc();
    DeviceCommand {
        v: 1,
        id: CommandId(id.into()),
        gateway: GatewayId::new("gw-1").unwrap(),
        device: MeterId::new(device).unwrap(),
        action,
        issued_by: "test".into(),
        issued_at: now,
        expires_at: now + Duration::from_secs(600),
    }
}

async fn send(h: &Harness, cmd: DeviceCommand) -> oneshot::Receiver<CommandOutcome> {
    let (reply, rx) = oneshot::channel();
    h.cmd_tx
        .send(CommandRequest {
            command: cmd,
            reply,
        })
        .await
        .unwrap();
    rx
}

/// Publishes `payload` on `topic` until the bridge's subscription is live and a submit arrives.
async fn publish_until_submitted(
    h: &mut Harness,
    sim: &AsyncClient,
    topic: &str,
    payload: &str,
) -> SubmitRequest {
    for _ in 0..50 {
        sim.publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
            .await
            .unwrap();
        if let Ok(Some(req)) =
            tokio::time::timeout(Duration::from_millis(200), h.sink_rx.recv()).await
        {
            return req;
        }
    }
    panic!("no readings submitted for {topic}");
}

#[tokio::test]
async fn uplink_readings_reach_the_sink() {
    let mut h = start("hyd-up", Duration::from_secs(2)).await;
    let (sim, _cmds) = hydrant_client(&h.prefix, "h1").await;
    let up = r#"{"v":1,"hydrant":"h1","ts":"2026-11-25T10:00:00Z","pressure_bar":"3.20","state":"closed","locked":true,"events":["tilt"]}"#;
    let topic = format!("{}/h1/up", h.prefix);
    let req = publish_until_submitted(&mut h, &sim, &topic, up).await;
    let got: Vec<(String, Quantity, String)> = req
        .readings
        .iter()
        .map(|r| (r.meter.to_string(), r.quantity, r.value.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "hydrant:h1".to_string(),
                Quantity::Pressure,
                "3.20".to_string()
            ),
            (
                "hydrant:h1".to_string(),
                Quantity::OutletState,
                "0".to_string()
            ),
            (
                "hydrant:h1".to_string(),
                Quantity::StatusWord,
                "3".to_string()
            ),
        ]
    );
    req.done.send(Ok(())).unwrap();
    // Drain duplicates from the subscribe race, then a bad payload only bumps the error counter.
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(300), h.sink_rx.recv()).await
    {
        r.done.send(Ok(())).ok();
    }
    let before = h.sink.counters().frames("hydrants");
    sim.publish(
        format!("{}/h1/up", h.prefix),
        QoS::AtLeastOnce,
        false,
        "{garbage",
    )
    .await
    .unwrap();
    for _ in 0..50 {
        if h.sink.counters().decode_errors("hydrants", "json") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.sink.counters().decode_errors("hydrants", "json"), 1);
    assert_eq!(h.sink.counters().frames("hydrants"), before + 1);
    h.shutdown.cancel();
    h.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn unlock_is_acknowledged_once_and_resend_is_not_republished() {
    let mut h = start("hyd-cmd", Duration::from_secs(3)).await;
    let (sim, mut cmds) = hydrant_client(&h.prefix, "h7").await;
    // Wait until the bridge is subscribed (its uplink path works), so the ack is not missed.
    let up = r#"{"v":1,"hydrant":"h7","pressure_bar":"2.5"}"#;
    let topic = format!("{}/h7/up", h.prefix);
    let req = publish_until_submitted(&mut h, &sim, &topic, up).await;
    req.done.send(Ok(())).unwrap();

    let outcome = send(
        &h,
        command(
            "c-1",
            "hydrant:h7",
            CommandAction::HydrantUnlock { duration_s: 600 },
        ),
    )
    .await;
    let cmd = tokio::time::timeout(Duration::from_secs(3), cmds.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        cmd,
        serde_json::json!({"command_id": "c-1", "action": "unlock", "duration_s": 600})
    );
    sim.publish(
        format!("{}/h7/ack", h.prefix),
        QoS::AtLeastOnce,
        false,
        r#"{"command_id":"c-1","result":"ok","reason":null}"#,
    )
    .await
    .unwrap();
    assert_eq!(outcome.await.unwrap(), CommandOutcome::Acknowledged);

    // Same id again: answered from memory, nothing published to the hydrant.
    let again = send(
        &h,
        command(
            "c-1",
            "hydrant:h7",
            CommandAction::HydrantUnlock { duration_s: 600 },
        ),
    )
    .await;
    assert_eq!(again.await.unwrap(), CommandOutcome::Acknowledged);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), cmds.recv())
            .await
            .is_err()
    );

    // A refusal carries the hydrant's reason.
    let lock = send(&h, command("c-2", "hydrant:h7", CommandAction::HydrantLock)).await;
    let cmd = cmds.recv().await.unwrap();
    assert_eq!(
        cmd,
        serde_json::json!({"command_id": "c-2", "action": "lock"})
    );
    sim.publish(
        format!("{}/h7/ack", h.prefix),
        QoS::AtLeastOnce,
        false,
        r#"{"command_id":"c-2","result":"refused","reason":"outlet open"}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        lock.await.unwrap(),
        CommandOutcome::Failed("refused by hydrant: outlet open".into())
    );

    // The same id sent twice while the first is in flight: one publish, both answered.
    let first = send(&h, command("c-3", "hydrant:h7", CommandAction::HydrantLock)).await;
    let second = send(&h, command("c-3", "hydrant:h7", CommandAction::HydrantLock)).await;
    let cmd = cmds.recv().await.unwrap();
    assert_eq!(cmd["command_id"], "c-3");
    // An ack for that id from another hydrant does not count.
    sim.publish(
        format!("{}/h8/ack", h.prefix),
        QoS::AtLeastOnce,
        false,
        r#"{"command_id":"c-3","result":"ok"}"#,
    )
    .await
    .unwrap();
    sim.publish(
        format!("{}/h7/ack", h.prefix),
        QoS::AtLeastOnce,
        false,
        r#"{"command_id":"c-3","result":"ok"}"#,
    )
    .await
    .unwrap();
    assert_eq!(first.await.unwrap(), CommandOutcome::Acknowledged);
    assert_eq!(second.await.unwrap(), CommandOutcome::Acknowledged);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), cmds.recv())
            .await
            .is_err()
    );
    h.shutdown.cancel();
    h.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn missing_ack_times_out_and_wrong_device_fails() {
    let h = start("hyd-timeout", Duration::from_millis(700)).await;
    let outcome = send(
        &h,
        command("c-9", "hydrant:nobody", CommandAction::HydrantLock),
    )
    .await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), outcome)
            .await
            .unwrap()
            .unwrap(),
        CommandOutcome::Failed("no ack within 700ms".into())
    );
    let wrong = send(
        &h,
        command("c-10", "mbus:KAM12345678", CommandAction::HydrantLock),
    )
    .await;
    assert_eq!(
        wrong.await.unwrap(),
        CommandOutcome::Failed(
            "device mbus:KAM12345678 is not a hydrant (expected hydrant:<id>)".into()
        )
    );
    let valve = send(&h, command("c-11", "hydrant:h1", CommandAction::ValveOpen)).await;
    assert_eq!(
        valve.await.unwrap(),
        CommandOutcome::Failed("the hydrant bridge cannot execute ValveOpen".into())
    );
    h.shutdown.cancel();
    h.task.await.unwrap().unwrap();
}
