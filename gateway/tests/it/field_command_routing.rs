//! A command for a field device goes from `{root}/{gw}/cmd/{device}` through the runtime's
//! router to the hydrant bridge source and back as acks; re-sending the id does not reach the
//! hydrant again.

use crate::common;

use std::time::Duration;

use gateway::runtime::Gateway;
use model::{CommandAck, CommandState};
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydrant_command_is_routed_executed_once_and_acknowledged() {
    let root = common::unique_prefix("route");
    let site = format!("{root}/hydrant");
    let gw = "gw-route";
    let (_a, mut acks) = common::subscribe("route-acks", &format!("{root}/{gw}/cmd-ack")).await;
    // The simulated hydrant: answers every command on its cmd topic.
    let (hydrant, mut cmds) = common::subscribe("route-hyd", &format!("{site}/h1/cmd")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::hydrant_gateway(gw, &root, &site, dir.path());
    let gateway = Gateway::start(config).await.unwrap();
    // Let the control connection subscribe and the bridge connect.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let command = serde_json::json!({
        "v": 1, "id": "h-1", "gateway": gw, "device": "hydrant:h1",
        "action": {"type": "hydrant_unlock", "duration_s": 600},
        "issued_by": "test", "issued_at": fmt(now), "expires_at": fmt(now + time::Duration::minutes(5))
    })
    .to_string();
    let (client, _rx) = common::subscribe("route-pub", &format!("{root}/unused")).await;
    let topic = format!("{root}/{gw}/cmd/hydrant:h1");
    client
        .publish(&topic, QoS::AtLeastOnce, false, command.clone())
        .await
        .unwrap();
    // The hydrant receives it and acknowledges.
    common::hydrant_unlocks(&hydrant, &mut cmds, &site, "h-1", Duration::from_secs(10)).await;
    let mut states = Vec::new();
    while states.last() != Some(&CommandState::Acknowledged) {
        let (_, p) = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .expect("acks")
            .unwrap();
        let ack: CommandAck = serde_json::from_slice(&p).unwrap();
        assert_eq!(ack.id.0, "h-1");
        states.push(ack.state);
    }
    assert_eq!(
        states,
        vec![CommandState::Queued, CommandState::Acknowledged]
    );
    // Same id again: the last state is re-published, the hydrant hears nothing.
    client
        .publish(&topic, QoS::AtLeastOnce, false, command)
        .await
        .unwrap();
    let (_, p) = tokio::time::timeout(Duration::from_secs(10), acks.recv())
        .await
        .unwrap()
        .unwrap();
    let ack: CommandAck = serde_json::from_slice(&p).unwrap();
    assert_eq!(ack.state, CommandState::Acknowledged);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), cmds.recv())
            .await
            .is_err(),
        "the duplicate must not reach the hydrant"
    );
    gateway.shutdown().await;
}
