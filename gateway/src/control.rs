//! The control connection to the central broker: retained status with a last will, the
//! command subscription `{root}/{gateway}/cmd/#`, command acknowledgements on
//! `{root}/{gateway}/cmd-ack` and the gateway's own alarms (spool overflow) on
//! `{root}/{gateway}/alarms`.
//!
//! While connected the retained `online` status is re-published every
//! [`ControlOptions::health_every`] with the gateway's health (spool depth, uplink lag,
//! uplink connected, readings acknowledged), so the centre's fleet view sees a gateway that is
//! online but not getting its readings out. The last will stays a plain `offline`.
//!
//! The connection is a persistent MQTT session (`clean_session = false`, the stable client id
//! `{base}-ctl`, subscription at QoS 1), so the broker queues the commands published while the
//! gateway is offline or reconnecting and delivers them when it is back. (With a clean session
//! the broker discarded them: a hydrant command sent during an outage was silently lost.)
//!
//! Commands are acknowledged to the broker by hand, *after* [`Downlink::handle`] has journaled
//! them in `commands.jsonl` (fsync), not on receipt. Why: acking on receipt opens a window in
//! which the broker has forgotten a command that the gateway has not yet written down, so a
//! crash there loses it. Acking after the journal makes delivery at-least-once from the
//! broker's side, and the journal turns every re-delivery of an id into a no-op that only
//! re-publishes the command's last state, so each command is executed at most once: together,
//! exactly once as long as the spool directory survives. A command that is not valid JSON is
//! acked at once (it would otherwise be re-delivered forever).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use model::{Alarm, AlarmKind, AlarmSeverity, CommandAck, DeviceCommand, GatewayId, MeterId};
use rumqttc::{AsyncClient, Event, LastWill, Packet, Publish, QoS};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::downlink::Downlink;
use crate::mqtt::{self, MqttEndpoint};
use crate::uplink::UplinkStats;

/// Control connection settings.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Broker.
    pub endpoint: MqttEndpoint,
    /// MQTT client id; must be stable across restarts, the broker keeps the session under it.
    pub client_id: String,
    /// Topic root.
    pub topic_root: String,
    /// This gateway.
    pub gateway: GatewayId,
    /// Where the health in the status comes from; `None`: status without health.
    pub health: Option<HealthSource>,
    /// How often the retained status with health is re-published while connected.
    pub health_every: Duration,
}

/// The gateway parts whose state the status reports as its health.
#[derive(Debug, Clone)]
pub struct HealthSource {
    /// The spool (depth).
    pub spool: crate::spool::Spool,
    /// The uplink's counters (connected, acknowledged, last acknowledgement).
    pub uplink: Arc<UplinkStats>,
}

impl HealthSource {
    /// The health object of the status message: `spool_depth` (readings waiting),
    /// `uplink_lag_s` (seconds the oldest waiting data may have waited, 0 when none waits),
    /// `uplink_connected`, `readings_acked` (since the gateway started).
    pub fn snapshot(&self) -> serde_json::Value {
        let depth = self.spool.stats().depth;
        json!({
            "spool_depth": depth,
            "uplink_lag_s": self.uplink.lag_seconds(depth),
            "uplink_connected": self.uplink.connected.load(Ordering::Relaxed),
            "readings_acked": self.uplink.readings_acked.load(Ordering::Relaxed),
        })
    }
}

/// The retained status payload: `state` `online`/`offline`, firmware `version`, `at`, and the
/// `health` object when there is one.
fn status(gateway: &GatewayId, state: &str, health: Option<&HealthSource>) -> Vec<u8> {
    let at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let mut message = json!({"v": model::WIRE_VERSION, "gateway": gateway, "state": state, "at": at, "version": env!("CARGO_PKG_VERSION")});
    if let (Some(h), Some(m)) = (health, message.as_object_mut()) {
        m.insert("health".into(), h.snapshot());
    }
    message.to_string().into_bytes()
}

/// The alarm for readings the spool evicted since the last check (`evicted_total` grew from
/// `previous`), or `None`. The alarm's device is `gateway:<gateway id>`.
pub fn spool_overflow_alarm(
    gateway: &GatewayId,
    previous: u64,
    evicted_total: u64,
    spool_dir: &str,
) -> Option<Alarm> {
    let lost = evicted_total.checked_sub(previous).filter(|n| *n > 0)?;
    let mut detail = serde_json::Map::new();
    detail.insert("evicted".into(), lost.into());
    detail.insert("evicted_total".into(), evicted_total.into());
    detail.insert("spool_dir".into(), spool_dir.into());
    Some(Alarm {
        meter: MeterId::new(format!("gateway:{gateway}")).ok()?,
        kind: AlarmKind::SpoolOverflow,
        severity: AlarmSeverity::Critical,
        raised_at: OffsetDateTime::now_utc(),
        cleared_at: None,
        detail,
    })
}

/// Watches the spool's eviction counter once a second until `shutdown` and sends a
/// [`spool_overflow_alarm`] for every increase. Counting starts from zero, so readings evicted
/// before the watcher started are reported too.
pub async fn watch_spool_overflow(
    spool: crate::spool::Spool,
    gateway: GatewayId,
    spool_dir: String,
    alarms: mpsc::UnboundedSender<Alarm>,
    shutdown: CancellationToken,
) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let evicted = spool.stats().evicted;
                if let Some(alarm) = spool_overflow_alarm(&gateway, reported, evicted, &spool_dir) {
                    tracing::error!(alarm = "spool_overflow", evicted = evicted.saturating_sub(reported), evicted_total = evicted, "raising a spool overflow alarm");
                    if alarms.send(alarm).is_err() {
                        return;
                    }
                }
                reported = evicted;
            }
        }
    }
}

/// Queues `message` as JSON on `topic` (QoS 1, not retained); `what` names it in the logs.
async fn publish_json<T: serde::Serialize>(
    client: &AsyncClient,
    topic: &str,
    message: &T,
    what: &'static str,
) {
    match serde_json::to_vec(message) {
        Ok(body) => {
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, body).await {
                tracing::warn!(error = %e, "could not queue {what}");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not serialise {what}"),
    }
}

/// Runs the control connection until `shutdown`; then publishes `offline` and disconnects.
/// Acknowledgements and alarms that arrive while the broker is unreachable wait in their
/// channels and go out after the reconnect.
pub async fn run(
    opts: ControlOptions,
    downlink: Arc<Downlink>,
    mut acks: mpsc::UnboundedReceiver<CommandAck>,
    mut alarms: mpsc::UnboundedReceiver<Alarm>,
    shutdown: CancellationToken,
) {
    let status_topic = model::topic::status(&opts.topic_root, opts.gateway.as_str());
    let cmd_filter = model::topic::commands_of(&opts.topic_root, opts.gateway.as_str());
    let ack_topic = model::topic::command_ack(&opts.topic_root, opts.gateway.as_str());
    let alarm_topic = model::topic::alarms(&opts.topic_root, opts.gateway.as_str());
    // Commands are handled one at a time, in arrival order, so a duplicate id can never race
    // its original past the idempotency check. Each carries the PUBLISH and the client of the
    // connection it came on, to be acked once the command is journaled.
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<(DeviceCommand, Publish, AsyncClient)>();
    let router = Arc::clone(&downlink);
    tokio::spawn(async move {
        while let Some((cmd, publish, client)) = cmd_rx.recv().await {
            router.handle(cmd).await;
            // If that connection is gone the ack fails; the broker re-delivers the command on
            // the next connection and the journal makes it a no-op.
            if let Err(e) = client.ack(&publish).await {
                tracing::debug!(error = %e, "command ack for a closed connection; it will be re-delivered");
            }
        }
    });
    let mut backoff = Duration::from_millis(200);
    // Acks are re-published after every connect from the journal: after a start, those of the
    // last day (a crash may have lost them in memory); after a lost connection, those of the
    // minute before it (publishes not yet PUBACKed die with the old client).
    let mut resend_since = OffsetDateTime::now_utc() - time::Duration::days(1);
    let health = opts.health.clone();
    let mut health_tick = tokio::time::interval(opts.health_every.max(Duration::from_millis(100)));
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let will = LastWill::new(
            &status_topic,
            status(&opts.gateway, "offline", None),
            QoS::AtLeastOnce,
            true,
        );
        let mut options = opts.endpoint.options(&opts.client_id, Some(will));
        options.set_clean_session(false);
        options.set_manual_acks(true);
        let (client, mut events) = mqtt::connect(options, 256);
        let mut connected = false;
        let failure = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if connected {
                        // Retained offline on a clean stop (the will covers crashes).
                        client.publish(&status_topic, QoS::AtLeastOnce, true, status(&opts.gateway, "offline", health.as_ref())).await.ok();
                        // Give the event loop a moment to write it before disconnecting.
                        let deadline = tokio::time::sleep(Duration::from_millis(500));
                        tokio::pin!(deadline);
                        loop {
                            tokio::select! {
                                _ = &mut deadline => break,
                                ev = events.recv() => match ev {
                                    Some(Ok(Event::Incoming(Packet::PubAck(_)))) | None | Some(Err(_)) => break,
                                    _ => {}
                                }
                            }
                        }
                        client.disconnect().await.ok();
                    }
                    return;
                }
                _ = health_tick.tick(), if connected && health.is_some() => {
                    client.publish(&status_topic, QoS::AtLeastOnce, true, status(&opts.gateway, "online", health.as_ref())).await.ok();
                }
                ack = acks.recv(), if connected => {
                    let Some(ack) = ack else { continue };
                    publish_json(&client, &ack_topic, &ack, "a command ack").await;
                }
                alarm = alarms.recv(), if connected => {
                    let Some(alarm) = alarm else { continue };
                    publish_json(&client, &alarm_topic, &alarm, "an alarm").await;
                }
                ev = events.recv() => match ev {
                    None => break "event loop ended".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                        connected = true;
                        backoff = Duration::from_millis(200);
                        tracing::info!(topic = %status_topic, session_present = ack.session_present, "control connection up; status online");
                        client.publish(&status_topic, QoS::AtLeastOnce, true, status(&opts.gateway, "online", health.as_ref())).await.ok();
                        // That status carries the health; the periodic one is due a full period
                        // later (the interval's pending tick would repeat it at once).
                        health_tick.reset();
                        // Already in a resumed session; subscribing again is harmless and creates
                        // it the first time (or after the broker lost its sessions).
                        client.subscribe(&cmd_filter, QoS::AtLeastOnce).await.ok();
                        for ack in downlink.recent_acks(resend_since) {
                            publish_json(&client, &ack_topic, &ack, "a command ack").await;
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        match serde_json::from_slice::<DeviceCommand>(&p.payload) {
                            Ok(cmd) => {
                                cmd_tx.send((cmd, p, client.clone())).ok();
                            }
                            Err(e) => {
                                tracing::warn!(topic = %p.topic, error = %e, "ignoring an unreadable command");
                                client.ack(&p).await.ok();
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                },
            }
        };
        tracing::warn!(error = %failure, "control connection lost");
        if connected {
            resend_since = OffsetDateTime::now_utc() - time::Duration::minutes(1);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
