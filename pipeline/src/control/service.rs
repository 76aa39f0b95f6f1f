//! The control service task: its own MQTT connection and database listener.
//!
//! - publishes the command outbox (rows written by [`super::issue`] from the API, the CLI or
//!   a rule) to `{root}/{gateway}/cmd/{device}`, most urgent first, woken by `wm_control`
//!   notifications; a published command the gateway never mentioned is published again after
//!   a minute (the gateway executes an id once, so this is safe);
//! - consumes `{root}/+/cmd-ack` into `command_events` ([`super::apply_ack`], idempotent);
//! - consumes `{root}/alarms`: a raised `burst` runs [`rules::burst_auto_close`] and the close
//!   is published at once;
//! - sweeps: TTL expiry, telemetry confirmation (`valve_fault` on contradiction), hydrant
//!   permits ending, permit volume limits ([`hydrant::enforce_volume`]), unpermitted hydrant use, missed burst alarms, and the arrears rule
//!   (reopen on payment is also woken by the `arrears` notification).
//!
//! Deadlock rule of the workspace (docs/reliability.md): the task that drains the MQTT event
//! loop never awaits a client call. It only forwards incoming publishes into an unbounded
//! channel; publishes leave through their own task and unbounded queue.

use std::time::Duration;

use model::{Alarm, AlarmKind, AlarmSeverity, CommandAck, MeterId};
use rumqttc::{Event, Packet, QoS};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use super::rules::{self, ArrearsPolicy};
use super::{CentralState, ControlError, hydrant};

/// The notification channel of the migration's triggers.
pub const CHANNEL: &str = "wm_control";

/// Settings of the control service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The broker (`mqtts://` connects over TLS).
    pub broker: model::BrokerUrl,
    /// MQTT client id.
    pub client_id: String,
    /// Topic root.
    pub topic_root: String,
    /// Time between sweeps.
    pub sweep_interval: Duration,
    /// The arrears rule and its policy; `None` leaves arrears alone (reopens included).
    pub arrears: Option<ArrearsPolicy>,
    /// Time between arrears runs.
    pub arrears_interval: Duration,
}

impl ServiceConfig {
    /// Settings for `broker_url` and `topic_root`: 2 s sweeps, arrears rule off.
    ///
    /// # Errors
    /// [`ControlError::Mqtt`] for a bad broker URL.
    pub fn new(broker_url: &str, topic_root: &str, client_id: &str) -> Result<Self, ControlError> {
        let broker =
            crate::config::broker_url(broker_url).map_err(|e| ControlError::Mqtt(e.to_string()))?;
        Ok(Self {
            broker,
            client_id: client_id.to_owned(),
            topic_root: topic_root.to_owned(),
            sweep_interval: Duration::from_secs(2),
            arrears: None,
            arrears_interval: Duration::from_secs(60),
        })
    }
}

struct Outgoing {
    topic: String,
    payload: Vec<u8>,
}

enum Incoming {
    Ack(CommandAck),
    Alarm(Alarm),
    Connected,
}

/// Runs the control service until `shutdown` turns true.
///
/// # Errors
/// [`ControlError`] when the database listener cannot start.
pub async fn run(
    pool: PgPool,
    config: ServiceConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ControlError> {
    run_with_local_alarms(pool, config, shutdown, None).await
}

/// Runs the control service until `shutdown` turns true, also taking alarms from ingest
/// workers of this process (`WorkerConfig::alarm_tap`) as soon as they commit, instead of
/// only after their round trip through the broker. The broker copy of an alarm already
/// taken locally is skipped (same meter, kind and raise time).
///
/// # Errors
/// [`ControlError`] when the database listener cannot start.
pub async fn run_with_local_alarms(
    pool: PgPool,
    config: ServiceConfig,
    mut shutdown: watch::Receiver<bool>,
    local_alarms: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
) -> Result<(), ControlError> {
    let mut local_alarms = local_alarms;
    let mut seen = RecentAlarms::default();
    let (client, mut eventloop) =
        crate::config::mqtt_client(&config.broker, config.client_id.clone(), 1024, |o| {
            o.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(1 << 20, 1 << 20);
        })
        .map_err(|e| ControlError::Mqtt(e.to_string()))?;
    let root = config.topic_root.clone();
    let filters = vec![
        rumqttc::SubscribeFilter::new(format!("{root}/+/cmd-ack"), QoS::AtLeastOnce),
        rumqttc::SubscribeFilter::new(crate::detect::alarms_topic(&root), QoS::AtLeastOnce),
    ];
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Incoming>();
    let sub_client = client.clone();
    let alarms_topic = crate::detect::alarms_topic(&root);
    let event_loop = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // try_: never wait on the request channel this loop drains.
                    if let Err(e) = sub_client.try_subscribe_many(filters.clone()) {
                        tracing::warn!(error = %e, "control: subscribe failed");
                    }
                    in_tx.send(Incoming::Connected).ok();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let msg = if p.topic == alarms_topic {
                        serde_json::from_slice::<Alarm>(&p.payload)
                            .map(Incoming::Alarm)
                            .map_err(|e| e.to_string())
                    } else {
                        serde_json::from_slice::<CommandAck>(&p.payload)
                            .map(Incoming::Ack)
                            .map_err(|e| e.to_string())
                    };
                    match msg {
                        Ok(m) => {
                            if in_tx.send(m).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(topic = %p.topic, error = %e, "control: unreadable message")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "control: mqtt connection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let pub_client = client.clone();
    let publisher = tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            if pub_client
                .publish(o.topic, QoS::AtLeastOnce, false, o.payload)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut listener =
        PgListener::connect_with(&pool)
            .await
            .map_err(|source| ControlError::Db {
                what: "connecting the control listener",
                source,
            })?;
    listener
        .listen(CHANNEL)
        .await
        .map_err(|source| ControlError::Db {
            what: "listening on wm_control",
            source,
        })?;
    let serial = tokio::sync::Mutex::new(());
    let svc = Service {
        pool: &pool,
        config: &config,
        out: out_tx,
        serial: &serial,
    };
    // The sweep runs beside the event loop below, not in it: a burst alarm arriving during a
    // sweep (tens of ms of queries, more on a loaded database) is acted on at once instead of
    // queueing behind it. The two meet only where they could act twice, and there they take
    // turns (`Service::serial`).
    let sweeper_svc = Service {
        pool: &pool,
        config: &config,
        out: svc.out.clone(),
        serial: &serial,
    };
    let mut sweep_shutdown = shutdown.clone();
    let sweeper = async {
        let mut sweep = tokio::time::interval(config.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut illegal_since = OffsetDateTime::now_utc() - time::Duration::hours(1);
        loop {
            tokio::select! {
                changed = sweep_shutdown.changed() => {
                    if changed.is_err() || *sweep_shutdown.borrow() { return; }
                    continue;
                }
                _ = sweep.tick() => {}
            }
            let now = OffsetDateTime::now_utc();
            match sweeper_svc.sweep(illegal_since).await {
                // Overlap by a minute: a reading committed late is still seen.
                Ok(()) => illegal_since = now - time::Duration::minutes(1),
                Err(e) => {
                    tracing::error!(error = %e, "control sweep failed; retried on the next one")
                }
            }
        }
    };
    let mut arrears_tick = tokio::time::interval(config.arrears_interval);
    arrears_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(root = %config.topic_root, "control service started");
    let events = async {
        loop {
            let step = tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break; }
                    Ok(())
                }
                Some(payload) = async {
                    match local_alarms.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match serde_json::from_slice::<Alarm>(&payload) {
                    Ok(alarm) if seen.first(&alarm) => svc.on_alarm(&alarm).await,
                    Ok(_) => Ok(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "control: unreadable local alarm");
                        Ok(())
                    }
                },
                m = in_rx.recv() => match m {
                    Some(Incoming::Ack(ack)) => svc.on_ack(&ack).await,
                    Some(Incoming::Alarm(alarm)) => {
                        if seen.first(&alarm) { svc.on_alarm(&alarm).await } else { Ok(()) }
                    }
                    Some(Incoming::Connected) => svc.flush_outbox().await,
                    None => break,
                },
                n = listener.recv() => match n {
                    Ok(n) if n.payload() == "arrears" => match &config.arrears {
                        Some(_) => svc.reopen().await,
                        None => Ok(()),
                    },
                    Ok(_) => svc.flush_outbox().await,
                    Err(e) => {
                        tracing::warn!(error = %e, "control: database listener failed; it reconnects");
                        Ok(())
                    }
                },
                _ = arrears_tick.tick() => match &config.arrears {
                    Some(policy) => svc.arrears(policy).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = step {
                tracing::error!(error = %e, "control step failed; retried on the next event or sweep");
            }
        }
    };
    // The event loop ends on shutdown (or when the connection task is gone); a sweep still in
    // progress then is dropped (its transaction rolls back) and runs again at the next start.
    tokio::select! {
        () = events => {}
        () = sweeper => {}
    }
    event_loop.abort();
    drop(svc);
    drop(sweeper_svc);
    publisher.await.ok();
    client.disconnect().await.ok();
    Ok(())
}

/// (meter, kind, raise time, cleared): one alarm message.
type AlarmKey = (String, AlarmKind, i128, bool);

/// Alarms recently acted on, so one taken from a local worker is not acted on again when its
/// broker copy arrives (acting twice is harmless, the rules are idempotent, but costs queries).
#[derive(Default)]
struct RecentAlarms {
    set: std::collections::HashSet<AlarmKey>,
    order: std::collections::VecDeque<AlarmKey>,
}

impl RecentAlarms {
    const CAPACITY: usize = 4096;

    /// True the first time an alarm (meter, kind, raise time) is seen.
    fn first(&mut self, alarm: &Alarm) -> bool {
        let key = (
            alarm.meter.as_str().to_owned(),
            alarm.kind,
            alarm.raised_at.unix_timestamp_nanos(),
            alarm.cleared_at.is_some(),
        );
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

struct Service<'a> {
    pool: &'a PgPool,
    config: &'a ServiceConfig,
    out: mpsc::UnboundedSender<Outgoing>,
    /// Taken by whatever could act twice when the sweep and the event loop run at once: the
    /// burst rule for a meter (both could find its alarm undecided) and the outbox (both could
    /// publish a command).
    serial: &'a tokio::sync::Mutex<()>,
}

impl Service<'_> {
    fn publish(&self, topic: String, payload: Vec<u8>) {
        self.out.send(Outgoing { topic, payload }).ok();
    }

    fn publish_alarm(&self, meter: &str, kind: AlarmKind, detail: serde_json::Value) {
        let Ok(meter) = MeterId::new(meter.to_owned()) else {
            return;
        };
        let alarm = Alarm {
            meter,
            kind,
            severity: AlarmSeverity::Critical,
            raised_at: OffsetDateTime::now_utc(),
            cleared_at: None,
            detail: detail.as_object().cloned().unwrap_or_default(),
        };
        if let Ok(body) = serde_json::to_vec(&alarm) {
            self.publish(crate::detect::alarms_topic(&self.config.topic_root), body);
        }
    }

    fn publish_decision(&self, d: &rules::Decision) {
        let body = json!({"rule": d.rule, "meter": d.meter, "outcome": d.outcome,
                          "reason": d.reason, "command": d.command, "inputs": d.inputs});
        self.publish(
            format!("{}/control/decisions", self.config.topic_root),
            body.to_string().into_bytes(),
        );
    }

    /// Publishes every unpublished command, and re-publishes those published over a minute
    /// ago that no gateway has reported on.
    async fn flush_outbox(&self) -> Result<(), ControlError> {
        let _turn = self.serial.lock().await;
        loop {
            let mut rows = super::outbox(self.pool, 500).await?;
            let stale: Vec<String> = sqlx::query_scalar(
                "SELECT c.command_id FROM commands c \
                 WHERE c.state = 'queued' AND c.published_at < now() - interval '60 seconds' \
                   AND c.expires_at > now() AND NOT EXISTS (SELECT 1 FROM command_events e \
                       WHERE e.command_id = c.command_id AND e.detail->>'by' = 'gateway') \
                 LIMIT 500",
            )
            .fetch_all(self.pool)
            .await
            .map_err(|source| ControlError::Db {
                what: "finding unanswered commands",
                source,
            })?;
            for id in &stale {
                rows.push(super::get(self.pool, id).await?);
            }
            if rows.is_empty() {
                return Ok(());
            }
            let n = rows.len();
            let mut ids = Vec::with_capacity(n);
            for row in rows {
                let cmd = super::device_command(&row)?;
                let body = serde_json::to_vec(&cmd)
                    .map_err(|e| ControlError::Invalid(format!("serialising `{}`: {e}", row.id)))?;
                self.publish(
                    super::command_topic(&self.config.topic_root, &row.gateway, &row.device),
                    body,
                );
                tracing::info!(command = %row.id, device = %row.device, gateway = %row.gateway, "command published");
                ids.push(row.id);
            }
            // Re-published ones get a fresh mark, so they wait another minute.
            sqlx::query("UPDATE commands SET published_at = $2 WHERE command_id = ANY($1)")
                .bind(&ids)
                .bind(OffsetDateTime::now_utc())
                .execute(self.pool)
                .await
                .map_err(|source| ControlError::Db {
                    what: "marking commands published",
                    source,
                })?;
            if n < 500 {
                return Ok(());
            }
        }
    }

    async fn on_ack(&self, ack: &CommandAck) -> Result<(), ControlError> {
        let out = super::apply_ack(self.pool, ack).await?;
        tracing::debug!(command = %ack.id, ?out, "command ack");
        Ok(())
    }

    async fn on_alarm(&self, alarm: &Alarm) -> Result<(), ControlError> {
        if alarm.kind != AlarmKind::Burst || alarm.cleared_at.is_some() {
            return Ok(());
        }
        let decided = {
            let _turn = self.serial.lock().await;
            rules::burst_auto_close(self.pool, alarm.meter.as_str()).await?
        };
        if let Some((d, issued)) = decided {
            self.publish_decision(&d);
            if issued.is_some() {
                self.flush_outbox().await?;
            }
        }
        Ok(())
    }

    async fn reopen(&self) -> Result<(), ControlError> {
        let report = rules::arrears_reopen(self.pool).await?;
        for d in &report.decisions {
            self.publish_decision(d);
        }
        if !report.reopened.is_empty() {
            self.flush_outbox().await?;
        }
        Ok(())
    }

    async fn arrears(&self, policy: &ArrearsPolicy) -> Result<(), ControlError> {
        let report = rules::arrears_run(self.pool, policy, OffsetDateTime::now_utc()).await?;
        for d in &report.decisions {
            self.publish_decision(d);
        }
        if !report.closed.is_empty() || !report.reopened.is_empty() {
            self.flush_outbox().await?;
        }
        Ok(())
    }

    async fn sweep(&self, illegal_since: OffsetDateTime) -> Result<(), ControlError> {
        let now = OffsetDateTime::now_utc();
        let expired = super::expire_due(self.pool, now).await?;
        if !expired.is_empty() {
            tracing::info!(count = expired.len(), "commands expired");
        }
        for v in super::confirm_by_telemetry(self.pool).await? {
            tracing::info!(command = %v.command, state = v.state.as_str(), detail = %v.detail, "telemetry verdict");
            if v.state == CentralState::Failed {
                self.publish_alarm(
                    &v.device,
                    AlarmKind::ValveFault,
                    json!({"command": v.command, "reason": v.detail}),
                );
            }
        }
        for meter in rules::undecided_bursts(self.pool).await? {
            let decided = {
                let _turn = self.serial.lock().await;
                rules::burst_auto_close(self.pool, &meter).await?
            };
            if let Some((d, _)) = decided {
                self.publish_decision(&d);
            }
        }
        let volume = hydrant::enforce_volume(self.pool, now).await?;
        for (h, drawn, ts) in &volume.drawn_after_lock {
            self.publish_alarm(
                h,
                AlarmKind::HydrantIllegalUse,
                json!({"source": "control", "reason": "water drawn after the permit's volume lock",
                       "drawn_after_lock_m3": drawn, "register_at": super::rfc3339(*ts)}),
            );
        }
        hydrant::lock_ended(self.pool, now).await?;
        for (h, ts) in hydrant::detect_illegal_use(self.pool, illegal_since).await? {
            self.publish_alarm(
                &h,
                AlarmKind::HydrantIllegalUse,
                json!({"source": "control", "outlet_open_at": super::rfc3339(ts), "reason": "outlet open with no active permit"}),
            );
        }
        self.flush_outbox().await
    }
}
