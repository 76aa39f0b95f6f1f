//! What a fleet runs and where it sends: the transports' settings and [`FleetConfig`].

use super::*;

/// When concentrators upload what they collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Upload {
    /// Once a day at local midnight (what real concentrators do), and at the end of the run.
    #[default]
    Midnight,
    /// After every simulation step.
    EveryStep,
}

/// What concentrators publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConcentratorFormat {
    /// JSON batches on `concentrator/{cid}/readings`.
    #[default]
    Json,
    /// One raw CJ/T 188 read-data reply per reading on `concentrator/{cid}/frame`.
    Frames,
}

/// MQTT data concentrators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcentratorConfig {
    /// JSON batches or raw frames.
    pub format: ConcentratorFormat,
    /// Number of concentrators (`conc-000`…).
    pub count: u32,
    /// CJ/T 188 meters read through concentrators, spread round-robin.
    pub meters: u32,
    /// Upload schedule.
    pub upload: Upload,
}

/// What an NB-IoT meter's uplink (CoAP or HTTP push) carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NbiotUplink {
    /// One frame, the current reading, every [`FleetConfig::nbiot_report_every`] steps.
    #[default]
    Hourly,
    /// Once a simulated day, at the meter's own hour: one 901F reply per hourly reading taken
    /// since the previous uplink (24 a day; fewer on the first), oldest first, back to back,
    /// each with its own clock and SER. A reading lost to a `comm_loss` fault is not in it; a
    /// `corrupted_frames` fault corrupts its frame, so the gateway refuses the whole uplink; a
    /// `duplicate_frames` fault sends the whole uplink twice. Needs 60-minute steps;
    /// `nbiot_report_every` does not apply. Readings taken after a meter's last uplink of a
    /// bounded run are not sent.
    Daily,
}

/// NB-IoT CJ/T 188 meters posting CoAP uplinks to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoapConfig {
    /// Gateway CoAP address (`/up` is posted there).
    pub gateway: SocketAddr,
    /// Number of CJ/T 188 meters using CoAP.
    pub meters: u32,
}

/// NB-IoT meters whose uplinks reach the gateway through an IoT platform's HTTP push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPushConfig {
    /// Gateway HTTP address.
    pub gateway: SocketAddr,
    /// Path, `/v1/push`.
    pub path: String,
    /// Shared HMAC secret.
    pub secret: String,
    /// Envelope format.
    pub platform: Platform,
    /// Number of CJ/T 188 meters using the platform.
    pub meters: u32,
}

/// Wireless M-Bus meters whose telegrams go to the gateway's UDP receiver interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WmbusConfig {
    /// Gateway wM-Bus UDP address.
    pub gateway: SocketAddr,
    /// Number of M-Bus-addressed meters sending telegrams.
    pub meters: u32,
    /// Encrypt with per-meter keys ([`crate::frames::wmbus_key`]), security mode 5.
    pub encrypted: bool,
}

/// Wired M-Bus slaves on a socat pty pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbusConfig {
    /// Number of M-Bus-addressed meters on the bus (primary addresses 1, 2, …; at most 250).
    pub meters: u32,
    /// Directory where the pty links `slave` and `master` are created.
    pub dir: std::path::PathBuf,
}

/// Modbus TCP instruments (DMA inlet flow meters and pressure transmitters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModbusConfig {
    /// Listen address (`127.0.0.1:0` picks a free port; see [`FleetHandle::modbus_addr`]).
    pub bind: SocketAddr,
}

/// What a fleet runs and where it sends.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The population, faults and simulated time span.
    pub scenario: Scenario,
    /// Real time per simulation step (`Duration::ZERO`: as fast as the transports go).
    pub step_every: Duration,
    /// Stop after this many steps (default: the whole scenario).
    pub max_steps: Option<u64>,
    /// Never run ahead of the wall clock: a step whose readings would lie in the future waits
    /// until their time, so a run that starts in the past replays its history at `step_every`
    /// and then goes on in real time (one reading an interval), as a live fleet does.
    pub not_ahead_of_wall_clock: bool,
    /// Broker for concentrators and hydrants.
    pub mqtt: Option<MqttConfig>,
    /// Concentrators (need `mqtt`).
    pub concentrators: Option<ConcentratorConfig>,
    /// Number of hydrant controllers (need `mqtt`).
    pub hydrants: u32,
    /// Scripted hydrant illegal use: (hydrant index, step) at which a locked, closed hydrant
    /// is opened without authorisation (in the ground truth like the random ones).
    pub hydrant_illegal_use: Vec<(u32, u64)>,
    /// NB-IoT meters (CoAP and HTTP push) report every this many steps, each meter at its own
    /// phase (hourly steps and 24: one uplink a day, spread over the day). 0 and 1: every step.
    pub nbiot_report_every: u32,
    /// What NB-IoT uplinks carry: the current reading (hourly) or a day of hourly readings.
    pub nbiot_uplink: NbiotUplink,
    /// Indices of NB-IoT meters built without a valve: they answer a valve command with the
    /// CJ/T 188 abnormal reply (C = 0xC4, status word) and do not change state. Every other
    /// CoAP meter has a valve.
    pub nbiot_without_valve: BTreeSet<u32>,
    /// NB-IoT CoAP meters.
    pub coap: Option<CoapConfig>,
    /// Seed of the CoAP meters' keys ([`crate::nbiot::meter_key`]): with one, they seal every
    /// uplink and check every downlink (the gateway's `auth = "frame_mac"`); without, plain.
    pub nbiot_key_seed: Option<String>,
    /// IoT-platform HTTP push.
    pub http_push: Option<HttpPushConfig>,
    /// wM-Bus meters.
    pub wmbus: Option<WmbusConfig>,
    /// Wired M-Bus slaves.
    pub mbus: Option<MbusConfig>,
    /// Modbus TCP instruments, one pair per DMA.
    pub modbus: Option<ModbusConfig>,
    /// Each DMA's inlet is also a wM-Bus bulk meter ([`crate::engine::dma_inlet_meter`],
    /// needs `wmbus`) that sends its totaliser with its own clock after every step, so the
    /// inflow is stamped with the simulated time (a polled Modbus instrument is stamped with
    /// the gateway's receive time).
    pub wmbus_dma_inlets: bool,
}

impl FleetConfig {
    /// A config that runs `scenario` one step per 100 ms with no transports enabled.
    pub fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            step_every: Duration::from_millis(100),
            max_steps: None,
            not_ahead_of_wall_clock: false,
            mqtt: None,
            concentrators: None,
            hydrants: 0,
            hydrant_illegal_use: Vec::new(),
            nbiot_report_every: 1,
            nbiot_uplink: NbiotUplink::Hourly,
            nbiot_without_valve: BTreeSet::new(),
            coap: None,
            nbiot_key_seed: None,
            http_push: None,
            wmbus: None,
            mbus: None,
            modbus: None,
            wmbus_dma_inlets: false,
        }
    }

    /// Checks what can be checked before anything starts: a valid scenario, hourly steps for
    /// daily NB-IoT uplinks, a broker for concentrators and hydrants.
    ///
    /// # Errors
    /// The first inconsistency, naming the fields.
    pub fn check(&self) -> anyhow::Result<()> {
        self.scenario.validate().context("invalid fleet scenario")?;
        if self.nbiot_uplink == NbiotUplink::Daily && self.scenario.interval_minutes != 60 {
            bail!(
                "a daily NB-IoT uplink carries hourly readings: the scenario's interval_minutes must be 60, not {}",
                self.scenario.interval_minutes
            );
        }
        if (self.concentrators.is_some() || self.hydrants > 0) && self.mqtt.is_none() {
            bail!("concentrators and hydrants need an MQTT broker (mqtt config)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(interval_minutes: u32) -> Scenario {
        let mut s = Scenario::plain(10, 1, 1, time::macros::datetime!(2026-11-01 0:00 UTC));
        s.interval_minutes = interval_minutes;
        s
    }

    #[test]
    fn new_enables_no_transport() {
        let c = FleetConfig::new(scenario(60));
        assert_eq!(c.step_every, Duration::from_millis(100));
        assert_eq!(
            (c.max_steps, c.hydrants, c.nbiot_report_every),
            (None, 0, 1)
        );
        assert_eq!(c.nbiot_uplink, NbiotUplink::Hourly);
        assert!(c.mqtt.is_none() && c.coap.is_none() && c.http_push.is_none());
        assert!(c.wmbus.is_none() && c.mbus.is_none() && c.modbus.is_none());
        assert!(c.check().is_ok());
    }

    #[test]
    fn daily_uplinks_need_hourly_steps() {
        let mut c = FleetConfig::new(scenario(15));
        c.nbiot_uplink = NbiotUplink::Daily;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("interval_minutes must be 60, not 15"), "{e}");
        c.scenario = scenario(60);
        assert!(c.check().is_ok());
    }

    #[test]
    fn concentrators_and_hydrants_need_a_broker() {
        let mut c = FleetConfig::new(scenario(60));
        c.hydrants = 1;
        assert!(c.check().unwrap_err().to_string().contains("MQTT broker"));
        c.mqtt = Some(MqttConfig::from_url("mqtt://127.0.0.1:1883", "t", "id").unwrap());
        assert!(c.check().is_ok());
    }
}
