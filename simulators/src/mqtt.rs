//! MQTT devices: data concentrators (JSON batches, raw frames) and fire-hydrant controllers.
//!
//! Payloads follow `/work/wt/CONTRACTS.md` ("Concentrator MQTT", "Hydrants MQTT"). Topics are
//! `{prefix}concentrator/{cid}/readings|frame` and `{prefix}hydrant/{hid}/up|cmd|ack`, where the
//! prefix is empty in the field and unique per test.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, watch};

use crate::engine::{Delivery, Emission, unix};
use crate::profile::unit;

/// Where the fleet's MQTT devices connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Prefix put before every device topic (`""` in the field, unique in tests).
    pub topic_prefix: String,
    /// Client id of the fleet's connection.
    pub client_id: String,
}

impl MqttConfig {
    /// Parses a plain [`model::BrokerUrl`] (`mqtt://host:port` or `host:port`) into a config
    /// with the given prefix.
    ///
    /// # Errors
    /// Returns a message when the URL has no valid port.
    pub fn from_url(url: &str, topic_prefix: &str, client_id: &str) -> Result<Self, String> {
        let broker: model::BrokerUrl = url
            .parse()
            .map_err(|e: model::BrokerUrlError| e.to_string())?;
        if broker.tls {
            return Err(format!(
                "MQTT URL {url:?}: the simulators speak plain MQTT only"
            ));
        }
        Ok(Self {
            host: broker.host,
            port: broker.port,
            topic_prefix: normalise_prefix(topic_prefix),
            client_id: client_id.to_owned(),
        })
    }

    /// Returns `{prefix}{rest}`.
    pub fn topic(&self, rest: &str) -> String {
        format!("{}{rest}", self.topic_prefix)
    }
}

/// Makes a prefix end with `/` unless it is empty.
pub fn normalise_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    }
}

/// One meter reading in a concentrator batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcentratorReading {
    /// Meter id (`cjt188:…`).
    pub meter: String,
    /// Meter timestamp, RFC 3339.
    pub ts: String,
    /// Register, m³, decimal string.
    pub volume_m3: String,
}

/// The JSON a concentrator publishes on `concentrator/{cid}/readings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcentratorBatch {
    /// Version, 1.
    pub v: u16,
    /// Concentrator id.
    pub concentrator: String,
    /// When the batch was sent (simulated clock), RFC 3339.
    pub sent_at: String,
    /// Readings.
    pub readings: Vec<ConcentratorReading>,
}

/// Returns the batch entries for one emission, honouring its delivery fault: none when
/// lost, two when duplicated, and none when corrupted (the concentrator's own checksum check
/// rejects the meter's garbled frame, so the reading is missing from the batch; a garbled
/// JSON value would make the gateway refuse the whole batch, which no concentrator does).
pub fn concentrator_entries(meter_id: &str, e: &Emission) -> Vec<ConcentratorReading> {
    let ts = unix(e.meter_ts).format(&Rfc3339).unwrap_or_default();
    let volume = e.register_m3().to_string();
    let entry = |volume_m3: String| ConcentratorReading {
        meter: meter_id.to_owned(),
        ts: ts.clone(),
        volume_m3,
    };
    match e.delivery {
        Delivery::Lost | Delivery::Corrupt => Vec::new(),
        Delivery::Normal => vec![entry(volume)],
        Delivery::Duplicate => vec![entry(volume.clone()), entry(volume)],
    }
}

/// A hydrant command as received on `hydrant/{hid}/cmd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HydrantCommand {
    /// Idempotency key.
    pub command_id: String,
    /// `unlock` or `lock`.
    pub action: String,
    /// Unlock duration, seconds.
    #[serde(default)]
    pub duration_s: Option<u32>,
}

/// A hydrant's acknowledgement on `hydrant/{hid}/ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HydrantAck {
    /// The command acknowledged.
    pub command_id: String,
    /// `ok` or `refused`.
    pub result: String,
    /// Why it was refused.
    pub reason: Option<String>,
}

/// A hydrant's periodic status on `hydrant/{hid}/up`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HydrantUp {
    /// Version, 1.
    pub v: u16,
    /// Hydrant id.
    pub hydrant: String,
    /// Simulated time, RFC 3339.
    pub ts: String,
    /// Outlet pressure, bar, 2 decimals.
    pub pressure_bar: String,
    /// `open` or `closed`.
    pub state: String,
    /// Whether the outlet is locked against unauthorised use.
    pub locked: bool,
    /// Events since the last status (`tilt`, `illegal_use`, `open`, `close`).
    pub events: Vec<String>,
    /// Cumulative outlet volume register, m³, 3 decimals (optional on the wire: older
    /// firmware does not send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_m3: Option<String>,
    /// Instantaneous outlet flow, m³/h, 3 decimals (optional on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_m3h: Option<String>,
}

/// Outlet flow of a simulated hydrant while open, litres per second (a DN65 hose, 18 m³/h).
pub const HYDRANT_FLOW_L_PER_S: i64 = 5;

/// One simulated hydrant controller.
#[derive(Debug, Clone)]
pub struct Hydrant {
    /// Id (`hyd-0001`).
    pub id: String,
    index: u64,
    locked: bool,
    open: bool,
    illegal_open: bool,
    /// Steps at which the hydrant is opened illegally (if locked and closed then), besides the
    /// rare random events: a scripted fault for demos and tests.
    illegal_at: BTreeSet<u64>,
    unlocked_until: Option<i64>,
    events: Vec<String>,
    acks: HashMap<String, HydrantAck>,
    /// Cumulative outlet volume, litres (exact: an integer count of litres).
    volume_l: i64,
    /// Simulated time up to which `volume_l` is accounted.
    accounted_to: Option<i64>,
    /// Commands executed (not counting repeated command ids).
    pub executed: u64,
}

impl Hydrant {
    /// Creates hydrant `index`, locked and closed.
    pub fn new(index: u32) -> Self {
        Self {
            id: format!("hyd-{index:04}"),
            index: u64::from(index),
            locked: true,
            open: false,
            illegal_open: false,
            illegal_at: BTreeSet::new(),
            unlocked_until: None,
            events: Vec::new(),
            acks: HashMap::new(),
            volume_l: 0,
            accounted_to: None,
            executed: 0,
        }
    }

    /// The same hydrant, also opened illegally at each of `steps` (when locked and closed).
    pub fn with_illegal_use_at(mut self, steps: impl IntoIterator<Item = u64>) -> Self {
        self.illegal_at.extend(steps);
        self
    }

    /// Returns (locked, open).
    pub fn state(&self) -> (bool, bool) {
        (self.locked, self.open)
    }

    /// The cumulative outlet volume register, m³ (exact, 3 decimals).
    pub fn volume_m3(&self) -> Decimal {
        Decimal::new(self.volume_l, 3)
    }

    /// Accounts the water drawn up to simulated time `now`: the outlet flows at
    /// [`HYDRANT_FLOW_L_PER_S`] while open. Called before every state change, so a lock stops
    /// the register at the lock's time.
    fn accumulate(&mut self, now: i64) {
        if let Some(from) = self.accounted_to
            && now > from
            && self.open
        {
            self.volume_l += (now - from) * HYDRANT_FLOW_L_PER_S;
        }
        self.accounted_to = Some(self.accounted_to.map_or(now, |t| t.max(now)));
    }

    /// Handles a command at simulated time `now`. A command id seen before is acknowledged
    /// again with the first result and not executed again.
    pub fn handle(&mut self, cmd: &HydrantCommand, now: i64) -> HydrantAck {
        if let Some(ack) = self.acks.get(&cmd.command_id) {
            return ack.clone();
        }
        self.accumulate(now);
        let refuse = |reason: &str| HydrantAck {
            command_id: cmd.command_id.clone(),
            result: "refused".into(),
            reason: Some(reason.into()),
        };
        let ack = match (cmd.action.as_str(), cmd.duration_s) {
            ("unlock", Some(d)) if d > 0 => {
                self.locked = false;
                self.unlocked_until = Some(now + i64::from(d));
                // Authorised use starts as soon as the outlet is unlocked.
                if !self.open {
                    self.open = true;
                    self.events.push("open".into());
                }
                self.executed += 1;
                None
            }
            ("unlock", _) => Some(refuse("unlock needs duration_s > 0")),
            ("lock", _) => {
                self.lock();
                self.executed += 1;
                None
            }
            (other, _) => Some(refuse(&format!("unknown action {other:?}"))),
        }
        .unwrap_or_else(|| HydrantAck {
            command_id: cmd.command_id.clone(),
            result: "ok".into(),
            reason: None,
        });
        self.acks.insert(cmd.command_id.clone(), ack.clone());
        ack
    }

    fn lock(&mut self) {
        self.locked = true;
        self.unlocked_until = None;
        if self.open && !self.illegal_open {
            self.open = false;
            self.events.push("close".into());
        }
    }

    /// Advances to simulated time `now` (step `step` of the run) and returns the status to
    /// publish. Rare random events: a tilt (collision), or illegal use while locked.
    pub fn tick(&mut self, now: i64, seed: u64, step: u64) -> HydrantUp {
        self.accumulate(now);
        if self.illegal_open {
            self.illegal_open = false;
            self.open = false;
            self.events.push("close".into());
        }
        if self.unlocked_until.is_some_and(|t| now >= t) {
            self.lock();
        }
        let u = unit(seed ^ 0x4879_6472, self.index, step);
        let scripted = self.illegal_at.contains(&step);
        if u < 0.002 && !scripted {
            self.events.push("tilt".into());
        } else if (scripted || u < 0.006) && self.locked && !self.open {
            self.open = true;
            self.illegal_open = true;
            self.events.push("illegal_use".into());
            self.events.push("open".into());
        }
        let noise = unit(seed ^ 0x7072_6573, self.index, step);
        let base = if self.open { 2.10 } else { 3.20 };
        let pressure = base + 0.3 * (noise - 0.5);
        let centibar = (pressure * 100.0).round() as i64;
        HydrantUp {
            v: 1,
            hydrant: self.id.clone(),
            ts: unix(now).format(&Rfc3339).unwrap_or_default(),
            pressure_bar: Decimal::new(centibar, 2).to_string(),
            state: if self.open { "open" } else { "closed" }.into(),
            locked: self.locked,
            events: std::mem::take(&mut self.events),
            volume_m3: Some(self.volume_m3().to_string()),
            flow_m3h: Some(if self.open {
                // L/s × 3600 s/h ÷ 1000 L/m³.
                Decimal::new(HYDRANT_FLOW_L_PER_S * 3600, 3).to_string()
            } else {
                Decimal::new(0, 3).to_string()
            }),
        }
    }
}

/// A connection of the fleet to the broker.
#[derive(Debug)]
pub struct Connection {
    /// Client to publish with.
    pub client: AsyncClient,
    /// Publishes received on the subscription.
    pub incoming: mpsc::Receiver<rumqttc::Publish>,
    /// Turns true once the subscription is acknowledged (at once without one).
    pub ready: watch::Receiver<bool>,
    /// QoS 1 publishes acknowledged by the broker so far.
    pub acked: watch::Receiver<u64>,
    /// The event-loop task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Connects to the broker and subscribes to `subscribe`, if given. The event loop
/// reconnects on its own until `shutdown` turns true or a DISCONNECT has been sent.
pub fn connect(
    config: &MqttConfig,
    subscribe: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) -> Connection {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, eventloop) = AsyncClient::new(options, 256);
    let (tx, rx) = mpsc::channel(256);
    let (ready_tx, ready) = watch::channel(false);
    let (acked_tx, acked) = watch::channel(0u64);
    let sub_client = client.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            () = poll(eventloop, sub_client, subscribe, tx, ready_tx, acked_tx) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    });
    Connection {
        client,
        incoming: rx,
        ready,
        acked,
        task,
    }
}

async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscribe: Option<String>,
    tx: mpsc::Sender<rumqttc::Publish>,
    ready: watch::Sender<bool>,
    acked: watch::Sender<u64>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => match &subscribe {
                // Resubscribe on every (re)connect: the session is clean.
                Some(topic) => {
                    if let Err(e) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(error = %e, "mqtt subscribe request failed");
                    }
                }
                None => {
                    ready.send_replace(true);
                }
            },
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                ready.send_replace(true);
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).await.is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(ev) => tracing::trace!(?ev, "mqtt event"),
            Err(e) => {
                tracing::warn!(error = %e, "mqtt connection error; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Status;

    fn emission(delivery: Delivery) -> Emission {
        Emission {
            meter: 0,
            ts: 1_780_000_000,
            meter_ts: 1_780_000_000,
            register_ml: 123_456_789,
            reverse_ml: 0,
            settlement_ml: 0,
            flow_lph: 0.0,
            battery_pct: 90,
            status: Status::default(),
            delivery,
        }
    }

    #[test]
    fn concentrator_entries_follow_delivery_faults() {
        let e = concentrator_entries("cjt188:1", &emission(Delivery::Normal));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].volume_m3, "123.456");
        assert_eq!(e[0].ts, "2026-05-28T20:26:40Z");
        assert!(concentrator_entries("m", &emission(Delivery::Lost)).is_empty());
        assert_eq!(
            concentrator_entries("m", &emission(Delivery::Duplicate)).len(),
            2
        );
        assert!(concentrator_entries("m", &emission(Delivery::Corrupt)).is_empty());
    }

    #[test]
    fn hydrant_obeys_unlock_and_lock_once_per_command_id() {
        let mut h = Hydrant::new(1);
        let unlock = HydrantCommand {
            command_id: "c-1".into(),
            action: "unlock".into(),
            duration_s: Some(600),
        };
        let ack = h.handle(&unlock, 1000);
        assert_eq!((ack.result.as_str(), ack.reason), ("ok", None));
        assert_eq!(h.state(), (false, true));
        // Lock, then the same unlock again: acked again, not re-executed.
        h.handle(
            &HydrantCommand {
                command_id: "c-2".into(),
                action: "lock".into(),
                duration_s: None,
            },
            1100,
        );
        assert_eq!(h.state(), (true, false));
        let again = h.handle(&unlock, 1200);
        assert_eq!(again.result, "ok");
        assert_eq!(h.state(), (true, false));
        assert_eq!(h.executed, 2);
        let bad = h.handle(
            &HydrantCommand {
                command_id: "c-3".into(),
                action: "flood".into(),
                duration_s: None,
            },
            1300,
        );
        assert_eq!(bad.result, "refused");
    }

    #[test]
    fn unlock_expires_on_the_simulated_clock() {
        let mut h = Hydrant::new(2);
        h.handle(
            &HydrantCommand {
                command_id: "u".into(),
                action: "unlock".into(),
                duration_s: Some(600),
            },
            0,
        );
        let up = h.tick(300, 1, 1);
        assert_eq!((up.state.as_str(), up.locked), ("open", false));
        assert_eq!(up.events, vec!["open".to_owned()]);
        // 300 s at 5 L/s = 1.5 m³, flowing at 18 m³/h.
        assert_eq!(up.volume_m3.as_deref(), Some("1.500"));
        assert_eq!(up.flow_m3h.as_deref(), Some("18.000"));
        let up = h.tick(600, 1, 2);
        assert!(up.locked);
        assert!(up.events.contains(&"close".to_owned()));
        // Drawn up to the lock at 600 s, nothing after it.
        assert_eq!(up.volume_m3.as_deref(), Some("3.000"));
        assert_eq!(up.flow_m3h.as_deref(), Some("0.000"));
        let up = h.tick(900, 1, 3);
        assert_eq!(up.volume_m3.as_deref(), Some("3.000"));
    }

    #[test]
    fn a_lock_command_stops_the_register_at_its_time() {
        let mut h = Hydrant::new(4);
        h.tick(0, 1, 0);
        h.handle(
            &HydrantCommand {
                command_id: "u".into(),
                action: "unlock".into(),
                duration_s: Some(3600),
            },
            10,
        );
        assert_eq!(h.tick(20, 1, 1).volume_m3.as_deref(), Some("0.050"));
        h.handle(
            &HydrantCommand {
                command_id: "l".into(),
                action: "lock".into(),
                duration_s: None,
            },
            25,
        );
        assert_eq!(h.volume_m3(), Decimal::new(75, 3));
        assert_eq!(h.tick(40, 1, 2).volume_m3.as_deref(), Some("0.075"));
    }

    #[test]
    fn scripted_illegal_use_opens_a_locked_hydrant_for_one_step() {
        let mut h = Hydrant::new(3).with_illegal_use_at([5]);
        let up = h.tick(3600, 1, 5);
        assert_eq!((up.state.as_str(), up.locked), ("open", true));
        assert_eq!(up.events, vec!["illegal_use".to_owned(), "open".to_owned()]);
        let up = h.tick(7200, 1, 6);
        assert_eq!(up.state, "closed");
        assert!(up.events.contains(&"close".to_owned()));
        // Not while an authorised unlock holds it open.
        let mut h = Hydrant::new(3).with_illegal_use_at([5]);
        h.handle(
            &HydrantCommand {
                command_id: "u".into(),
                action: "unlock".into(),
                duration_s: Some(86_400),
            },
            0,
        );
        let up = h.tick(3600, 1, 5);
        assert!(!up.events.contains(&"illegal_use".to_owned()));
    }

    #[test]
    fn parses_mqtt_urls() {
        let c = MqttConfig::from_url("mqtt://127.0.0.1:1884", "test/x", "id").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 1884));
        assert_eq!(c.topic("hydrant/h1/up"), "test/x/hydrant/h1/up");
        assert!(MqttConfig::from_url("mqtt://h:abc", "", "id").is_err());
    }
}
