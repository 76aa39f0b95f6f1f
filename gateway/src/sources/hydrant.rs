//! Hydrant MQTT bridge: `hydrant/{id}/up` JSON → readings, `hydrant_unlock`/`hydrant_lock`
//! commands → `hydrant/{id}/cmd`, confirmed by `hydrant/{id}/ack` with the same command id.
//!
//! Uplinks are acknowledged to the broker (manual QoS 1 PUBACK) only after the spool accepted
//! their readings, so a crash between receipt and spool makes the broker redeliver.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use edge_config::hydrant::HydrantSourceConfig;
use model::{ClockSource, CommandAction, MeterId, Provenance, Quantity, Reading, SourceKind, Unit};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use rust_decimal::Decimal;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Backoff, ErrorCode, IntakeError, Source, SourceContext, SourceEnv, SourceError};
use crate::normalise::frame_hash;
use crate::{CommandOutcome, CommandRequest};

/// Status-word bits of a hydrant reading (documented in docs/field-buses.md).
pub mod status_bits {
    /// The outlet is locked.
    pub const LOCKED: u32 = 0x01;
    /// Tilt event (collision).
    pub const TILT: u32 = 0x02;
    /// Illegal use event (opened while locked or without authorisation).
    pub const ILLEGAL_USE: u32 = 0x04;
    /// Outlet opened event.
    pub const OPEN: u32 = 0x08;
    /// Outlet closed event.
    pub const CLOSE: u32 = 0x10;
}

/// How many finished command ids are remembered for idempotency.
const DONE_CAPACITY: usize = 4096;

/// The hydrant MQTT bridge: configuration checked and TLS built at build.
#[derive(Debug)]
pub struct HydrantSource {
    config: HydrantSourceConfig,
    tls: Option<native_tls::TlsConnector>,
}

impl Source for HydrantSource {
    type Config = edge_config::Valid<HydrantSourceConfig>;
    const KIND: SourceKind = SourceKind::Mqtt;

    async fn build(config: &Self::Config, _env: &SourceEnv) -> Result<Self, SourceError> {
        // Checked by edge-config (`Valid`): nothing to validate here.
        let tls = config
            .tls()
            .map(|t| crate::mqtt::tls_connector(&t))
            .transpose()?;
        Ok(Self {
            config: (**config).clone(),
            tls,
        })
    }

    /// Runs the bridge until `ctx.shutdown` is cancelled; ready once both subscriptions are
    /// confirmed.
    async fn run(self, ctx: SourceContext) -> Result<(), SourceError> {
        run(self.config, self.tls, ctx).await;
        Ok(())
    }
}

async fn run(
    config: HydrantSourceConfig,
    tls: Option<native_tls::TlsConnector>,
    mut ctx: SourceContext,
) {
    let commands = std::mem::replace(&mut ctx.commands, mpsc::channel(1).1);
    let ctx = std::sync::Arc::new(ctx);
    let source_id = ctx.source_id.clone();
    let shutdown = ctx.shutdown.clone();

    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options.set_keep_alive(config.keep_alive);
    options.set_manual_acks(true);
    // A persistent session makes the broker keep and redeliver uplinks not yet PUBACKed.
    options.set_clean_session(false);
    options.set_transport(crate::mqtt::transport(tls.as_ref()));
    if let Some(user) = &config.username {
        let password = config.password.as_ref().map(|p| p.expose().to_owned());
        options.set_credentials(user.clone(), password.unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);

    let prefix = config.topic_prefix.clone();
    // Unbounded: the event loop below must never wait on its workers, since the ingest worker
    // waits in `client.ack()` on the request channel that only this loop drains (a burst
    // deadlocked both, issue 25). The broker's in-flight window bounds what can pile up, as
    // nothing is PUBACKed before it is spooled.
    let (up_tx, up_rx) = mpsc::unbounded_channel::<Publish>();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();

    let ingest = tokio::spawn(ingest_worker(
        up_rx,
        client.clone(),
        std::sync::Arc::clone(&ctx),
        prefix.clone(),
    ));
    let cmd_task = tokio::spawn(command_worker(
        commands,
        ack_rx,
        client.clone(),
        prefix.clone(),
        config.ack_timeout,
        shutdown.clone(),
    ));

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut awaiting_subacks = usize::MAX;
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!(source = %source_id, "hydrant bridge connected");
                let subs = [format!("{prefix}/+/up"), format!("{prefix}/+/ack")];
                awaiting_subacks = subs.len();
                for topic in subs {
                    if let Err(e) = client.try_subscribe(topic, QoS::AtLeastOnce) {
                        tracing::warn!(source = %source_id, error = %e, "subscribe failed");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                awaiting_subacks = awaiting_subacks.saturating_sub(1);
                if awaiting_subacks == 0 {
                    ctx.readiness.set_ready();
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.topic.ends_with("/ack") {
                    let topic = publish.topic.clone();
                    let payload = publish.payload.to_vec();
                    if let Err(e) = client.try_ack(&publish) {
                        tracing::warn!(source = %source_id, error = %e, "puback failed");
                    }
                    if ack_tx.send((topic, payload)).is_err() {
                        break;
                    }
                } else if up_tx.send(publish).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                ctx.readiness.set_connecting();
                let delay = backoff.next_delay();
                tracing::warn!(source = %source_id, error = %e, ?delay, "hydrant broker connection failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    drop(up_tx);
    drop(ack_tx);
    if client.try_disconnect().is_ok() {
        // Let the event loop flush the DISCONNECT; bounded so shutdown never hangs.
        let _flush = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    }
    cmd_task.abort();
    ingest.abort();
}

/// An event name this bridge does not know (ignored, counted).
#[derive(Debug, thiserror::Error)]
#[error("unknown hydrant event {0:?}")]
struct UnknownEvent(String);

impl ErrorCode for UnknownEvent {
    fn code(&self) -> &'static str {
        "unknown_event"
    }
}

async fn ingest_worker(
    mut rx: mpsc::UnboundedReceiver<Publish>,
    client: AsyncClient,
    ctx: std::sync::Arc<SourceContext>,
    prefix: String,
) {
    let source_id = ctx.source_id.as_str();
    while let Some(publish) = rx.recv().await {
        let received_at = OffsetDateTime::now_utc();
        let hid = hydrant_of_topic(&prefix, &publish.topic, "up");
        let provenance = Provenance {
            gateway: ctx.gateway.clone(),
            source: SourceKind::Mqtt,
            source_id: source_id.to_owned(),
            frame_hash: frame_hash(&publish.payload),
            received_at,
            channel: Some(publish.topic.clone()),
        };
        let decoded = match hid {
            Some(hid) => decode_up(hid, &publish.payload, provenance),
            None => Err(UpError::Topic),
        };
        let readings = decoded.map(|up| {
            for event in up.unknown_events {
                tracing::debug!(source = %source_id, event, "unknown hydrant event ignored");
                ctx.reject(&UnknownEvent(event));
            }
            up.readings
        });
        match ctx.intake_readings(1, readings).await {
            Ok(()) => {}
            Err(IntakeError::Spool(e)) => {
                // Not acknowledged: the broker redelivers after reconnect.
                tracing::warn!(source = %source_id, error = %e, "spool refused hydrant readings");
                continue;
            }
            Err(e @ IntakeError::Rejected { .. }) => {
                tracing::warn!(source = %source_id, topic = %publish.topic, error = %e, "bad hydrant uplink");
            }
        }
        if let Err(e) = client.ack(&publish).await {
            tracing::warn!(source = %source_id, error = %e, "puback failed");
        }
    }
}

/// `{prefix}/{id}/{leaf}` → `id`.
fn hydrant_of_topic<'a>(prefix: &str, topic: &'a str, leaf: &str) -> Option<&'a str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let id = rest.strip_suffix(leaf)?.strip_suffix('/')?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// Why a hydrant uplink was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpError {
    /// The topic is not `{prefix}/{id}/up`.
    #[error("topic is not <prefix>/<hydrant>/up")]
    Topic,
    /// Not the expected JSON object.
    #[error("payload is not hydrant uplink JSON: {0}")]
    Json(String),
    /// Unknown wire version.
    #[error("field v: version {0} is not supported (expected 1)")]
    Version(u16),
    /// The payload's `hydrant` differs from the topic's.
    #[error("field hydrant: {payload:?} differs from topic id {topic:?}")]
    HydrantMismatch {
        /// Id in the payload.
        payload: String,
        /// Id in the topic.
        topic: String,
    },
    /// The id is not usable as a meter id.
    #[error("hydrant id {0:?} is not a valid meter id")]
    MeterId(String),
    /// `ts` is not RFC 3339.
    #[error("field ts: {0:?} is not an RFC 3339 timestamp")]
    Timestamp(String),
    /// `state` is neither `open` nor `closed`.
    #[error("field state: {0:?} (expected \"open\" or \"closed\")")]
    State(String),
    /// `volume_m3` or `flow_m3h` is negative.
    #[error("field {field}: {value} is negative (expected a register or flow >= 0)")]
    Negative {
        /// The field.
        field: &'static str,
        /// Its value.
        value: Decimal,
    },
}

impl ErrorCode for UpError {
    fn code(&self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Json(_) => "json",
            Self::Version(_) => "version",
            Self::HydrantMismatch { .. } => "hydrant_mismatch",
            Self::MeterId(_) => "meter_id",
            Self::Timestamp(_) => "timestamp",
            Self::State(_) => "state",
            Self::Negative { .. } => "negative",
        }
    }
}

#[derive(Debug, Deserialize)]
struct UpMessage {
    v: u16,
    hydrant: String,
    #[serde(default)]
    ts: Option<String>,
    #[serde(default)]
    pressure_bar: Option<Decimal>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    locked: Option<bool>,
    #[serde(default)]
    tilt_deg: Option<Decimal>,
    #[serde(default)]
    events: Vec<String>,
    /// Cumulative outlet volume register, m³ (optional: older firmware does not send it).
    #[serde(default)]
    volume_m3: Option<Decimal>,
    /// Instantaneous outlet flow, m³/h (optional).
    #[serde(default)]
    flow_m3h: Option<Decimal>,
}

/// A decoded uplink.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedUp {
    /// Readings in a fixed order: pressure, outlet_state, tilt, status_word, volume, flow
    /// (each only when its field is present).
    pub readings: Vec<Reading>,
    /// Event names this bridge does not know (ignored, counted).
    pub unknown_events: Vec<String>,
}

/// Decodes one `hydrant/{id}/up` payload into readings of meter `hydrant:{id}`.
pub fn decode_up(
    topic_id: &str,
    payload: &[u8],
    provenance: Provenance,
) -> Result<DecodedUp, UpError> {
    let msg: UpMessage =
        serde_json::from_slice(payload).map_err(|e| UpError::Json(e.to_string()))?;
    if msg.v != 1 {
        return Err(UpError::Version(msg.v));
    }
    if msg.hydrant != topic_id {
        return Err(UpError::HydrantMismatch {
            payload: msg.hydrant,
            topic: topic_id.to_owned(),
        });
    }
    let meter = MeterId::new(format!("hydrant:{topic_id}"))
        .map_err(|_| UpError::MeterId(topic_id.to_owned()))?;
    let (ts, clock) = match &msg.ts {
        Some(ts) => (
            OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
                .map_err(|_| UpError::Timestamp(ts.clone()))?
                .to_offset(time::UtcOffset::UTC),
            ClockSource::Meter,
        ),
        None => (provenance.received_at, ClockSource::Gateway),
    };
    let outlet = match msg.state.as_deref() {
        None => None,
        Some("open") => Some(Decimal::ONE),
        Some("closed") => Some(Decimal::ZERO),
        Some(other) => return Err(UpError::State(other.to_owned())),
    };
    for (field, value) in [("volume_m3", msg.volume_m3), ("flow_m3h", msg.flow_m3h)] {
        if let Some(value) = value.filter(|v| v.is_sign_negative() && !v.is_zero()) {
            return Err(UpError::Negative { field, value });
        }
    }
    let mut status: u32 = 0;
    let mut unknown_events = Vec::new();
    if msg.locked == Some(true) {
        status |= status_bits::LOCKED;
    }
    for event in &msg.events {
        status |= match event.as_str() {
            "tilt" => status_bits::TILT,
            "illegal_use" => status_bits::ILLEGAL_USE,
            "open" => status_bits::OPEN,
            "close" => status_bits::CLOSE,
            _ => {
                unknown_events.push(event.clone());
                0
            }
        };
    }
    let reading = |quantity, value, unit| {
        Reading::actual(
            meter.clone(),
            ts,
            clock,
            (quantity, value, unit),
            provenance.clone(),
        )
    };
    let mut readings = Vec::new();
    if let Some(p) = msg.pressure_bar {
        readings.push(reading(Quantity::Pressure, p, Unit::Bar));
    }
    if let Some(o) = outlet {
        readings.push(reading(Quantity::OutletState, o, Unit::Dimensionless));
    }
    if let Some(t) = msg.tilt_deg {
        readings.push(reading(Quantity::Tilt, t, Unit::Degree));
    }
    if msg.locked.is_some() || !msg.events.is_empty() {
        readings.push(reading(
            Quantity::StatusWord,
            Decimal::from(status),
            Unit::Dimensionless,
        ));
    }
    if let Some(v) = msg.volume_m3 {
        readings.push(reading(Quantity::Volume, v, Unit::CubicMetre));
    }
    if let Some(f) = msg.flow_m3h {
        readings.push(reading(Quantity::Flow, f, Unit::CubicMetrePerHour));
    }
    Ok(DecodedUp {
        readings,
        unknown_events,
    })
}

#[derive(Debug, Deserialize)]
struct AckMessage {
    command_id: String,
    result: String,
    #[serde(default)]
    reason: Option<String>,
}

struct Pending {
    hydrant: String,
    replies: Vec<oneshot::Sender<CommandOutcome>>,
}

struct Commands {
    client: AsyncClient,
    prefix: String,
    ack_timeout: Duration,
    pending: HashMap<String, Pending>,
    done: HashMap<String, CommandOutcome>,
    done_order: VecDeque<String>,
    timeouts: mpsc::Sender<String>,
}

async fn command_worker(
    mut commands: mpsc::Receiver<CommandRequest>,
    mut acks: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    client: AsyncClient,
    prefix: String,
    ack_timeout: Duration,
    shutdown: CancellationToken,
) {
    let (timeout_tx, mut timeout_rx) = mpsc::channel::<String>(256);
    let mut state = Commands {
        client,
        prefix,
        ack_timeout,
        pending: HashMap::new(),
        done: HashMap::new(),
        done_order: VecDeque::new(),
        timeouts: timeout_tx,
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(req) = commands.recv() => state.start(req).await,
            Some((topic, payload)) = acks.recv() => state.on_ack(&topic, &payload),
            Some(id) = timeout_rx.recv() => state.on_timeout(&id),
        }
    }
    for (_, pending) in state.pending.drain() {
        for reply in pending.replies {
            let _gone = reply.send(CommandOutcome::Failed(
                "gateway shut down before the hydrant acknowledged".into(),
            ));
        }
    }
}

impl Commands {
    async fn start(&mut self, req: CommandRequest) {
        let CommandRequest { command, reply } = req;
        let id = command.id.0.clone();
        if let Some(outcome) = self.done.get(&id) {
            // Idempotent: a re-sent command gets the first outcome, the hydrant is not asked again.
            let _gone = reply.send(outcome.clone());
            return;
        }
        if let Some(p) = self.pending.get_mut(&id) {
            p.replies.push(reply);
            return;
        }
        let Some(hid) = command
            .device
            .as_str()
            .strip_prefix("hydrant:")
            .filter(|h| !h.is_empty())
        else {
            let _gone = reply.send(CommandOutcome::Failed(format!(
                "device {} is not a hydrant (expected hydrant:<id>)",
                command.device
            )));
            return;
        };
        let body = match &command.action {
            CommandAction::HydrantUnlock { duration_s } => serde_json::json!({
                "command_id": id, "action": "unlock", "duration_s": duration_s
            }),
            CommandAction::HydrantLock => {
                serde_json::json!({"command_id": id, "action": "lock"})
            }
            other => {
                let _gone = reply.send(CommandOutcome::Failed(format!(
                    "the hydrant bridge cannot execute {other:?}"
                )));
                return;
            }
        };
        let topic = format!("{}/{hid}/cmd", self.prefix);
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
        {
            let _gone = reply.send(CommandOutcome::Failed(format!(
                "could not publish to the hydrant: {e}"
            )));
            return;
        }
        self.pending.insert(
            id.clone(),
            Pending {
                hydrant: hid.to_owned(),
                replies: vec![reply],
            },
        );
        let tx = self.timeouts.clone();
        let after = self.ack_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _closed = tx.send(id).await;
        });
    }

    fn on_ack(&mut self, topic: &str, payload: &[u8]) {
        let Some(hid) = hydrant_of_topic(&self.prefix, topic, "ack") else {
            return;
        };
        let Ok(ack) = serde_json::from_slice::<AckMessage>(payload) else {
            tracing::warn!(topic, "unparsable hydrant ack ignored");
            return;
        };
        let Some(pending) = self.pending.get(&ack.command_id) else {
            // Late ack after a timeout, or a command of another gateway: nothing waits for it.
            return;
        };
        if pending.hydrant != hid {
            tracing::warn!(topic, command = %ack.command_id, "ack from another hydrant ignored");
            return;
        }
        let outcome = match ack.result.as_str() {
            "ok" => CommandOutcome::Acknowledged,
            "refused" => CommandOutcome::Failed(format!(
                "refused by hydrant: {}",
                ack.reason.as_deref().unwrap_or("no reason given")
            )),
            other => CommandOutcome::Failed(format!("hydrant answered unknown result {other:?}")),
        };
        if let Some(pending) = self.pending.remove(&ack.command_id) {
            for reply in pending.replies {
                let _gone = reply.send(outcome.clone());
            }
        }
        self.remember(ack.command_id, outcome);
    }

    fn on_timeout(&mut self, id: &str) {
        // Not remembered: a re-sent command after a timeout is published again, which is safe
        // because the hydrant itself never executes one command id twice.
        if let Some(pending) = self.pending.remove(id) {
            for reply in pending.replies {
                let _gone = reply.send(CommandOutcome::Failed(format!(
                    "no ack within {:?}",
                    self.ack_timeout
                )));
            }
        }
    }

    fn remember(&mut self, id: String, outcome: CommandOutcome) {
        if self.done.insert(id.clone(), outcome).is_none() {
            self.done_order.push_back(id);
        }
        while self.done_order.len() > DONE_CAPACITY {
            if let Some(old) = self.done_order.pop_front() {
                self.done.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn prov() -> Provenance {
        Provenance {
            gateway: model::GatewayId::new("gw-1").unwrap(),
            source: SourceKind::Mqtt,
            source_id: "hyd".into(),
            frame_hash: "00".into(),
            received_at: datetime!(2026-11-25 10:00:05 UTC),
            channel: Some("hydrant/h1/up".into()),
        }
    }

    #[test]
    fn topic_parsing() {
        assert_eq!(hydrant_of_topic("a/b", "a/b/h1/up", "up"), Some("h1"));
        assert_eq!(hydrant_of_topic("a/b", "a/b/h1/x/up", "up"), None);
        assert_eq!(hydrant_of_topic("a/b", "a/b//up", "up"), None);
        assert_eq!(hydrant_of_topic("a/b", "a/bx/h1/up", "up"), None);
    }

    #[test]
    fn uplink_becomes_readings() {
        let json = br#"{"v":1,"hydrant":"h1","ts":"2026-11-25T10:00:00+08:00","pressure_bar":"3.20",
            "state":"open","locked":true,"tilt_deg":"12.5","events":["tilt","illegal_use","boom"]}"#;
        let up = decode_up("h1", json, prov()).unwrap();
        let got: Vec<(Quantity, String)> = up
            .readings
            .iter()
            .map(|r| (r.quantity, r.value.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (Quantity::Pressure, "3.20".to_string()),
                (Quantity::OutletState, "1".to_string()),
                (Quantity::Tilt, "12.5".to_string()),
                (Quantity::StatusWord, "7".to_string()),
            ]
        );
        assert_eq!(up.readings[0].ts, datetime!(2026-11-25 02:00:00 UTC));
        assert_eq!(up.readings[0].meter.as_str(), "hydrant:h1");
        assert_eq!(up.readings[0].clock, ClockSource::Meter);
        assert_eq!(up.unknown_events, ["boom"]);
    }

    /// Golden vector of the volume extension: the register and flow come out exact, after the
    /// older fields, and a frame of older firmware (no register) still decodes.
    #[test]
    fn volume_register_and_flow_golden_vector() {
        let json = br#"{"v":1,"hydrant":"h1","ts":"2026-11-25T10:00:00Z","state":"open",
            "locked":false,"events":[],"volume_m3":"1234.567","flow_m3h":"18.000"}"#;
        let up = decode_up("h1", json, prov()).unwrap();
        let got: Vec<(Quantity, String, Unit)> = up
            .readings
            .iter()
            .map(|r| (r.quantity, r.value.to_string(), r.unit))
            .collect();
        assert_eq!(
            got,
            [
                (Quantity::OutletState, "1".to_string(), Unit::Dimensionless),
                (Quantity::StatusWord, "0".to_string(), Unit::Dimensionless),
                (Quantity::Volume, "1234.567".to_string(), Unit::CubicMetre),
                (
                    Quantity::Flow,
                    "18.000".to_string(),
                    Unit::CubicMetrePerHour
                ),
            ]
        );
        let old = br#"{"v":1,"hydrant":"h1","state":"closed","locked":true}"#;
        let up = decode_up("h1", old, prov()).unwrap();
        assert!(
            up.readings
                .iter()
                .all(|r| r.quantity != Quantity::Volume && r.quantity != Quantity::Flow)
        );
        assert_eq!(up.readings.len(), 2);
    }

    #[test]
    fn bad_uplinks_are_typed() {
        let cases: [(&[u8], &str); 7] = [
            (b"not json", "json"),
            (br#"{"v":2,"hydrant":"h1"}"#, "version"),
            (br#"{"v":1,"hydrant":"h2"}"#, "hydrant_mismatch"),
            (br#"{"v":1,"hydrant":"h1","ts":"yesterday"}"#, "timestamp"),
            (br#"{"v":1,"hydrant":"h1","state":"ajar"}"#, "state"),
            (
                br#"{"v":1,"hydrant":"h1","volume_m3":"-0.001"}"#,
                "negative",
            ),
            (br#"{"v":1,"hydrant":"h1","flow_m3h":"ten"}"#, "json"),
        ];
        for (payload, kind) in cases {
            assert_eq!(decode_up("h1", payload, prov()).unwrap_err().code(), kind);
        }
    }

    #[test]
    fn random_payloads_never_panic() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let seeds: [&[u8]; 3] = [
            br#"{"v":1,"hydrant":"h1","pressure_bar":"1"#,
            br#"{"v":1,"hydrant":"h1","events":["#,
            br#"{"v":1,"hydrant":"h1","ts":"2026-"#,
        ];
        for i in 0..3000usize {
            let mut bytes = seeds[i % 3].to_vec();
            for _ in 0..i % 40 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push((seed >> 32) as u8);
            }
            decode_up("h1", &bytes, prov()).ok();
        }
    }
}
