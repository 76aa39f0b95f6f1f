//! The control connection is a persistent MQTT session: a command published (QoS 1) while the
//! gateway is down is delivered when it comes back, executed once on the hydrant and
//! acknowledged; a further restart neither re-delivers nor re-executes it.

use crate::common;

use std::time::Duration;

use gateway::runtime::Gateway;
use model::{CommandAck, CommandState};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::mpsc::UnboundedReceiver;

fn command(gw: &str, id: &str, device: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    serde_json::json!({
        "v": 1, "id": id, "gateway": gw, "device": device,
        "action": {"type": "hydrant_unlock", "duration_s": 600},
        "issued_by": "test", "issued_at": fmt(now),
        "expires_at": fmt(now + time::Duration::minutes(5))
    })
    .to_string()
}

/// Publishes with QoS 1 and returns once the broker has PUBACKed it (so it is in the
/// broker's hands, not in a client buffer).
async fn publish_acked(topic: &str, body: String) {
    let o = common::broker().options(&common::unique_prefix("sess-pub").replace('/', "-"), None);
    let (client, mut el) = AsyncClient::new(o, 8);
    client
        .publish(topic, QoS::AtLeastOnce, false, body)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("publisher: {e}"),
            }
        }
    })
    .await
    .expect("PUBACK from the broker");
    client.disconnect().await.ok();
    // Let the event loop write the DISCONNECT.
    tokio::time::timeout(Duration::from_secs(2), el.poll())
        .await
        .ok();
}

async fn next_ack(
    acks: &mut UnboundedReceiver<(String, Vec<u8>)>,
    wait: Duration,
) -> Option<CommandAck> {
    let (_, p) = tokio::time::timeout(wait, acks.recv()).await.ok()??;
    Some(serde_json::from_slice(&p).unwrap())
}

/// Re-sends a command for a device the gateway does not know until its `failed` ack comes
/// back: then the control connection is up and subscribed, so the broker holds its session.
async fn wait_until_subscribed(
    gw: &str,
    root: &str,
    acks: &mut UnboundedReceiver<(String, Vec<u8>)>,
) {
    let topic = format!("{root}/{gw}/cmd/mbus:SIM10000000");
    for _ in 0..40 {
        publish_acked(&topic, command(gw, "probe", "mbus:SIM10000000")).await;
        // States of earlier commands re-published on connect may come first.
        while let Some(ack) = next_ack(acks, Duration::from_millis(500)).await {
            if ack.id.0 != "probe" {
                continue;
            }
            assert!(matches!(ack.state, CommandState::Failed { .. }), "{ack:?}");
            // Drain re-publications of the probe's state.
            while next_ack(acks, Duration::from_millis(300)).await.is_some() {}
            return;
        }
    }
    panic!("the control connection never subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_published_while_gateway_is_down_is_executed_once_after_restart() {
    let root = common::unique_prefix("session");
    let site = format!("{root}/hydrant");
    let gw = "gw-session";
    let (_a, mut acks) = common::subscribe("sess-acks", &format!("{root}/{gw}/cmd-ack")).await;
    let (hydrant, mut cmds) = common::subscribe("sess-hyd", &format!("{site}/h1/cmd")).await;
    let dir = tempfile::tempdir().unwrap();

    // First run: the control connection creates its session (and subscription), then stops.
    let gateway = Gateway::start(common::hydrant_gateway(gw, &root, &site, dir.path()))
        .await
        .unwrap();
    wait_until_subscribed(gw, &root, &mut acks).await;
    gateway.shutdown().await;

    // While the gateway is down a command is published; the broker holds it in the session.
    let topic = format!("{root}/{gw}/cmd/hydrant:h1");
    publish_acked(&topic, command(gw, "h-offline", "hydrant:h1")).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), cmds.recv())
            .await
            .is_err(),
        "nothing can reach the hydrant while the gateway is down"
    );

    // Restart: the broker delivers the queued command; the hydrant gets it and answers.
    let gateway = Gateway::start(common::hydrant_gateway(gw, &root, &site, dir.path()))
        .await
        .unwrap();
    common::hydrant_unlocks(
        &hydrant,
        &mut cmds,
        &site,
        "h-offline",
        Duration::from_secs(15),
    )
    .await;
    let mut states = Vec::new();
    while states.last() != Some(&CommandState::Acknowledged) {
        let ack = next_ack(&mut acks, Duration::from_secs(10))
            .await
            .expect("command acks");
        // The probe's state is re-published on connect; only h-offline's states count here.
        if ack.id.0 == "h-offline" {
            states.push(ack.state);
        }
    }
    assert_eq!(
        states,
        vec![CommandState::Queued, CommandState::Acknowledged]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(700), cmds.recv())
            .await
            .is_err(),
        "the hydrant gets the command exactly once"
    );
    gateway.shutdown().await;

    // Another restart: the journal's latest states are re-published on connect (an ack lost in
    // a crash still arrives), but the command was PUBACKed after it was journaled, so the broker
    // does not deliver it again and the hydrant hears nothing.
    let gateway = Gateway::start(common::hydrant_gateway(gw, &root, &site, dir.path()))
        .await
        .unwrap();
    let republished = next_ack(&mut acks, Duration::from_secs(10))
        .await
        .expect("states re-published on connect");
    let mut seen = vec![(republished.id.0.clone(), republished.state)];
    while let Some(ack) = next_ack(&mut acks, Duration::from_millis(500)).await {
        seen.push((ack.id.0.clone(), ack.state));
    }
    assert!(
        seen.contains(&("h-offline".to_owned(), CommandState::Acknowledged)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(id, state)| id != "h-offline" || *state == CommandState::Acknowledged),
        "only the latest state is re-published: {seen:?}"
    );
    wait_until_subscribed(gw, &root, &mut acks).await;
    assert!(
        next_ack(&mut acks, Duration::from_millis(500))
            .await
            .is_none(),
        "no command re-delivered after the restart"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), cmds.recv())
            .await
            .is_err(),
        "the hydrant hears nothing after the restart"
    );
    gateway.shutdown().await;
    // Drop the session this test left on the broker.
    let mut o = common::broker().options(&format!("{}-ctl", common::client_id(&root)), None);
    o.set_clean_session(true);
    let (client, mut el) = AsyncClient::new(o, 8);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(
            el.poll().await,
            Ok(Event::Incoming(Packet::ConnAck(_))) | Err(_)
        ) {}
    })
    .await
    .ok();
    client.disconnect().await.ok();
    tokio::time::timeout(Duration::from_secs(2), el.poll())
        .await
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lost_in_a_crash_are_published_after_the_restart() {
    let root = common::unique_prefix("lost-acks");
    let site = format!("{root}/hydrant");
    let gw = "gw-lost-acks";
    let dir = tempfile::tempdir().unwrap();
    // The journal as a crashed gateway leaves it: a command reached its final state (no route
    // for the device: failed), but the ack never left the process.
    {
        let (downlink, lost) =
            gateway::downlink::Downlink::open(model::GatewayId::new(gw).unwrap(), dir.path())
                .unwrap();
        drop(lost);
        let cmd: model::DeviceCommand =
            serde_json::from_str(&command(gw, "lost-1", "mbus:SIM10000000")).unwrap();
        downlink.handle(cmd).await;
    }
    let (_a, mut acks) = common::subscribe("lost-acks", &format!("{root}/{gw}/cmd-ack")).await;
    let gateway = Gateway::start(common::hydrant_gateway(gw, &root, &site, dir.path()))
        .await
        .unwrap();
    let ack = next_ack(&mut acks, Duration::from_secs(10))
        .await
        .expect("the journaled state is published after the restart");
    assert_eq!(ack.id.0, "lost-1");
    assert!(matches!(ack.state, CommandState::Failed { .. }), "{ack:?}");
    gateway.shutdown().await;
}
