//! A running fleet: the engine paced against real time, its readings sent over real
//! transports, and counters of every frame sent.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use simulators::fleet::{Fleet, FleetConfig, ConcentratorConfig};
//! use simulators::mqtt::MqttConfig;
//! use simulators::scenario::Scenario;
//! let scenario = Scenario::plain(100, 1, 1, time::macros::datetime!(2026-11-01 0:00 UTC));
//! let mut config = FleetConfig::new(scenario);
//! config.mqtt = Some(MqttConfig::from_url("mqtt://127.0.0.1:1883", "test/x", "fleet-1").unwrap());
//! config.concentrators = Some(ConcentratorConfig {
//!     format: Default::default(), count: 2, meters: 100, upload: Default::default(),
//! });
//! let mut fleet = Fleet::start(config).await?;
//! let counts = fleet.wait_finished().await;
//! println!("{} concentrator readings", counts.concentrator_readings);
//! fleet.stop().await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use decoders::envelope::{Envelope, Platform, encode_envelope};
use rumqttc::{AsyncClient, QoS};
use time::format_description::well_known::Rfc3339;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use std::collections::{BTreeSet, HashMap};

use crate::engine::{Delivery, MeterSpec};
use crate::frames::{cjt188_reply, cjt188_status, corrupt_checksummed, corrupt_wmbus, wmbus_key};
use crate::mbus_serial::{Latest, MbusBank, MbusBus};
use crate::modbus_tcp;
use crate::nbiot::{coap_post, downlink_valve, http_push, valve_refusal, valve_reply};

use crate::engine::{Emission, Engine, unix};
use crate::mqtt::{
    ConcentratorBatch, ConcentratorReading, Hydrant, HydrantCommand, MqttConfig,
    concentrator_entries,
};
use crate::scenario::Scenario;
use crate::truth::{GroundTruth, TruthEvent, TruthKind};

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
        }
    }
}

/// How a meter's readings leave the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Not transmitted (simulated only).
    None,
    /// Through concentrator `n`.
    Concentrator(u32),
    /// CoAP uplink.
    Coap,
    /// IoT-platform HTTP push.
    Http,
    /// wM-Bus telegram over UDP.
    Wmbus,
    /// Polled on the M-Bus serial line.
    Mbus,
}

macro_rules! counts {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counts of frames and messages sent, by kind.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct FrameCounts {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        struct Counters {
            $($name: AtomicU64,)*
        }

        impl Counters {
            fn snapshot(&self) -> FrameCounts {
                FrameCounts {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counts! {
    /// Simulation steps run.
    steps,
    /// Concentrator JSON batches published.
    concentrator_batches,
    /// Readings inside those batches (duplicates counted twice).
    concentrator_readings,
    /// Raw frames published on `concentrator/{cid}/frame`.
    concentrator_frames,
    /// Hydrant status messages published.
    hydrant_ups,
    /// Hydrant acks published.
    hydrant_acks,
    /// Hydrant commands executed (repeats of a command id not counted).
    hydrant_commands_executed,
    /// CoAP uplinks (read-data replies) acknowledged by the gateway.
    coap_uplinks,
    /// Valve commands received in CoAP responses and executed.
    coap_valve_commands,
    /// Valve replies (C=84) acknowledged by the gateway.
    coap_valve_replies,
    /// Valve commands refused by meters without a valve (abnormal reply C=C4 acknowledged).
    coap_valve_refused,
    /// Readings carried by NB-IoT uplinks (CoAP and HTTP push, one frame each).
    nbiot_frames,
    /// HTTP pushes answered 202.
    http_pushes,
    /// HTTP pushes answered with another status.
    http_rejected,
    /// wM-Bus telegrams sent as UDP datagrams.
    wmbus_telegrams,
    /// M-Bus requests answered (E5 or RSP_UD) on the serial line.
    mbus_replies,
    /// RSP_UD frames among them.
    mbus_rsp_ud,
    /// Modbus requests answered.
    modbus_requests,
    /// Frames sent corrupted on purpose (fault injection).
    corrupted,
    /// Extra copies sent on purpose (duplicate-frame faults).
    duplicated,
    /// Readings not sent because of communication-loss faults.
    lost,
    /// Transport errors (timeouts, refused connections) while sending.
    errors,
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Entry point: see [`Fleet::start`].
#[derive(Debug)]
pub struct Fleet;

/// A running fleet. Dropping it without [`FleetHandle::stop`] aborts its tasks.
#[derive(Debug)]
pub struct FleetHandle {
    counters: Arc<Counters>,
    engine: Arc<Mutex<Engine>>,
    shutdown: watch::Sender<bool>,
    finished: watch::Receiver<bool>,
    driver: Option<JoinHandle<anyhow::Result<()>>>,
    tasks: Vec<JoinHandle<()>>,
    mqtt: Option<AsyncClient>,
    mqtt_task: Option<JoinHandle<()>>,
    mqtt_stop: watch::Sender<bool>,
    mqtt_acked: Option<watch::Receiver<u64>>,
    mbus_bus: Option<MbusBus>,
    modbus_info: Option<(SocketAddr, Vec<modbus_tcp::ModbusDevice>)>,
    modbus_requests: Arc<AtomicU64>,
    hydrant_truth: Arc<Mutex<Vec<TruthEvent>>>,
}

impl Fleet {
    /// Starts the fleet: connects transports, waits until they are ready (MQTT subscription
    /// acknowledged, listeners bound), then starts stepping the simulated clock.
    ///
    /// # Errors
    /// Fails when the config is inconsistent (more meters routed than exist, a transport
    /// enabled without its endpoint) or a transport does not become ready within 10 s.
    pub async fn start(config: FleetConfig) -> anyhow::Result<FleetHandle> {
        config
            .scenario
            .validate()
            .context("invalid fleet scenario")?;
        if config.nbiot_uplink == NbiotUplink::Daily && config.scenario.interval_minutes != 60 {
            bail!(
                "a daily NB-IoT uplink carries hourly readings: the scenario's interval_minutes must be 60, not {}",
                config.scenario.interval_minutes
            );
        }
        let engine = Engine::new(config.scenario.clone());
        let routes = routes(&config, &engine)?;
        let counters = Arc::new(Counters::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (finished_tx, finished) = watch::channel(false);
        let mut tasks = Vec::new();

        let clock = Arc::new(AtomicI64::new(engine.now().unix_timestamp()));
        let (mqtt_stop, mqtt_stop_rx) = watch::channel(false);
        let mut mqtt_task = None;
        let mut mqtt_acked = None;
        let needs_mqtt = config.concentrators.is_some() || config.hydrants > 0;
        let mut mqtt_client = None;
        let mut hydrant_bank = None;
        if needs_mqtt {
            let mqtt = config
                .mqtt
                .clone()
                .context("concentrators and hydrants need an MQTT broker (mqtt config)")?;
            let sub = (config.hydrants > 0).then(|| mqtt.topic("hydrant/+/cmd"));
            let crate::mqtt::Connection {
                client,
                incoming,
                mut ready,
                acked,
                task,
            } = crate::mqtt::connect(&mqtt, sub, mqtt_stop_rx);
            mqtt_task = Some(task);
            mqtt_acked = Some(acked);
            tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
                .await
                .with_context(|| {
                    format!(
                        "MQTT broker {}:{} not ready within 10 s (is Mosquitto running?)",
                        mqtt.host, mqtt.port
                    )
                })?
                .context("mqtt event loop ended")?;
            if config.hydrants > 0 {
                let bank: Arc<Mutex<Vec<Hydrant>>> = Arc::new(Mutex::new(
                    (0..config.hydrants)
                        .map(|i| {
                            Hydrant::new(i).with_illegal_use_at(
                                config
                                    .hydrant_illegal_use
                                    .iter()
                                    .filter(|(h, _)| *h == i)
                                    .map(|(_, step)| *step),
                            )
                        })
                        .collect(),
                ));
                tasks.push(tokio::spawn(hydrant_commands(
                    incoming,
                    client.clone(),
                    mqtt.clone(),
                    Arc::clone(&bank),
                    Arc::clone(&clock),
                    Arc::clone(&counters),
                )));
                hydrant_bank = Some(bank);
            }
            mqtt_client = Some(client);
        }

        let wmbus_socket = match &config.wmbus {
            Some(w) => Some(
                UdpSocket::bind(unspecified(w.gateway))
                    .await
                    .context("binding the wM-Bus sender socket")?,
            ),
            None => None,
        };
        let population = Arc::new(engine.population().meters.clone());
        let latest: Latest = Arc::new(Mutex::new(HashMap::new()));
        let mut mbus_bus = None;
        if let Some(m) = &config.mbus {
            let meters: Vec<(u32, MeterSpec)> = routes
                .iter()
                .enumerate()
                .filter(|(_, r)| **r == Route::Mbus)
                .filter_map(|(i, _)| Some((i as u32, population.get(i)?.clone())))
                .collect();
            {
                let mut l = lock(&latest);
                for (i, _) in &meters {
                    if let Some(e) = engine.snapshot(*i) {
                        l.insert(*i, e);
                    }
                }
            }
            let bank = Arc::new(Mutex::new(MbusBank::new(
                &meters,
                Arc::clone(&latest),
                config.scenario.utc_offset_hours,
            )));
            let c = Arc::clone(&counters);
            let bus = MbusBus::start(&m.dir, bank, shutdown_rx.clone(), move |b: &MbusBank| {
                c.mbus_replies.store(b.replies, Ordering::Relaxed);
                c.mbus_rsp_ud.store(b.rsp_ud, Ordering::Relaxed);
            })
            .await?;
            mbus_bus = Some(bus);
        }
        let modbus_requests = Arc::new(AtomicU64::new(0));
        let mut modbus = None;
        if let Some(m) = &config.modbus {
            let devices = modbus_tcp::devices(engine.population().dmas);
            let maps = modbus_tcp::maps()?;
            let images: modbus_tcp::Images = Arc::new(Mutex::new(HashMap::new()));
            modbus_tcp::update(&images, &devices, &maps, |d| dma_measurement(&engine, d));
            let (addr, task) =
                modbus_tcp::serve(m.bind, Arc::clone(&images), Arc::clone(&modbus_requests))
                    .await?;
            tasks.push(task);
            modbus = Some(ModbusState {
                addr,
                devices,
                maps,
                images,
            });
        }
        let modbus_info = modbus.as_ref().map(|m| (m.addr, m.devices.clone()));
        let engine = Arc::new(Mutex::new(engine));
        let hydrant_truth = Arc::new(Mutex::new(Vec::new()));
        let driver = Driver {
            hydrant_truth: Arc::clone(&hydrant_truth),
            modbus,
            latest,
            population,
            wmbus_socket,
            message_id: Arc::new(AtomicU16::new(1)),
            nbiot_history: Mutex::new(HashMap::new()),
            engine: Arc::clone(&engine),
            routes,
            config,
            counters: Arc::clone(&counters),
            mqtt: mqtt_client.clone(),
            hydrants: hydrant_bank,
            clock,
        };
        let driver = tokio::spawn(driver.run(shutdown_rx, finished_tx));
        Ok(FleetHandle {
            counters,
            engine,
            shutdown,
            finished,
            driver: Some(driver),
            tasks,
            mqtt: mqtt_client,
            mqtt_task,
            mqtt_stop,
            mqtt_acked,
            mbus_bus,
            modbus_info,
            modbus_requests,
            hydrant_truth,
        })
    }
}

/// Returns the any-address of the same family as `peer`, port 0.
fn unspecified(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

fn routes(config: &FleetConfig, engine: &Engine) -> anyhow::Result<Vec<Route>> {
    let pop = &engine.population().meters;
    let mut routes = vec![Route::None; pop.len()];
    let cjt: Vec<usize> = pop
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.address, model::MeterAddress::Cjt188 { .. }))
        .map(|(i, _)| i)
        .collect();
    let mbus: Vec<usize> = pop
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.address, model::MeterAddress::Mbus { .. }))
        .map(|(i, _)| i)
        .collect();
    let mut next = cjt.iter();
    let mut take = |n: u32, what: &str| -> anyhow::Result<Vec<usize>> {
        let picked: Vec<usize> = next.by_ref().take(n as usize).copied().collect();
        if picked.len() < n as usize {
            bail!(
                "{what}.meters: not enough CJ/T 188 meters in the scenario ({} in all)",
                cjt.len()
            );
        }
        Ok(picked)
    };
    let mut assign = |idx: usize, route: Route| {
        if let Some(r) = routes.get_mut(idx) {
            *r = route;
        }
    };
    if let Some(c) = &config.coap {
        for i in take(c.meters, "coap")? {
            assign(i, Route::Coap);
        }
    }
    if let Some(h) = &config.http_push {
        for i in take(h.meters, "http_push")? {
            assign(i, Route::Http);
        }
    }
    if let Some(c) = &config.concentrators {
        if c.count == 0 {
            bail!("concentrators.count is 0");
        }
        for (k, i) in take(c.meters, "concentrators")?.into_iter().enumerate() {
            assign(i, Route::Concentrator(k as u32 % c.count));
        }
    }
    if let Some(w) = &config.wmbus {
        if w.meters as usize > mbus.len() {
            bail!(
                "wmbus.meters = {} but the scenario has only {} M-Bus-addressed meters (fleet.mbus_meters)",
                w.meters,
                mbus.len()
            );
        }
        for &i in mbus.iter().take(w.meters as usize) {
            assign(i, Route::Wmbus);
        }
    }
    if let Some(m) = &config.mbus {
        let skip = config.wmbus.as_ref().map_or(0, |w| w.meters as usize);
        if m.meters > 250 || skip + m.meters as usize > mbus.len() {
            bail!(
                "mbus.meters = {} (at most 250) but only {} M-Bus-addressed meters are left after wM-Bus",
                m.meters,
                mbus.len().saturating_sub(skip)
            );
        }
        for &i in mbus.iter().skip(skip).take(m.meters as usize) {
            assign(i, Route::Mbus);
        }
    }
    Ok(routes)
}

struct Driver {
    engine: Arc<Mutex<Engine>>,
    routes: Vec<Route>,
    config: FleetConfig,
    counters: Arc<Counters>,
    mqtt: Option<AsyncClient>,
    hydrants: Option<Arc<Mutex<Vec<Hydrant>>>>,
    clock: Arc<AtomicI64>,
    population: Arc<Vec<MeterSpec>>,
    hydrant_truth: Arc<Mutex<Vec<TruthEvent>>>,
    latest: Latest,
    modbus: Option<ModbusState>,
    wmbus_socket: Option<UdpSocket>,
    message_id: Arc<AtomicU16>,
    /// Daily NB-IoT meters: readings (with the SER of their step) since the last uplink.
    nbiot_history: Mutex<HashMap<u32, Vec<(Emission, u8)>>>,
}

struct ModbusState {
    addr: SocketAddr,
    devices: Vec<modbus_tcp::ModbusDevice>,
    maps: HashMap<String, decoders::modbus::RegisterMap>,
    images: modbus_tcp::Images,
}

fn dma_measurement(engine: &Engine, dma: u32) -> Option<modbus_tcp::DmaMeasurement> {
    engine
        .dma_inflow(dma)
        .map(|(inflow_ml, flow_lph)| modbus_tcp::DmaMeasurement {
            inflow_ml,
            flow_lph,
        })
}

/// At most this many CoAP / HTTP exchanges run at once (one socket each).
const MAX_CONCURRENT_EXCHANGES: usize = 32;

impl Driver {
    async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        finished: watch::Sender<bool>,
    ) -> anyhow::Result<()> {
        let result = tokio::select! {
            r = self.steps() => r,
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        };
        finished.send_replace(true);
        result
    }

    async fn steps(&self) -> anyhow::Result<()> {
        let conc = self.config.concentrators.clone();
        let n_conc = conc.as_ref().map_or(0, |c| c.count as usize);
        let frames_format = conc
            .as_ref()
            .is_some_and(|c| c.format == ConcentratorFormat::Frames);
        let mut buffers: Vec<Vec<ConcentratorReading>> = vec![Vec::new(); n_conc];
        let mut frame_buffers: Vec<Vec<Vec<u8>>> = vec![Vec::new(); n_conc];
        let ids: Vec<String> = lock(&self.engine)
            .population()
            .meters
            .iter()
            .map(|m| m.id.as_str().to_owned())
            .collect();
        let offset = i64::from(self.config.scenario.utc_offset_hours) * 3600;
        let seed = self.config.scenario.seed;
        let mut ticker =
            tokio::time::interval(self.config.step_every.max(Duration::from_micros(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut step = 0u64;
        loop {
            if self.config.max_steps.is_some_and(|m| step >= m) {
                break;
            }
            if !self.config.step_every.is_zero() {
                ticker.tick().await;
            }
            if self.config.not_ahead_of_wall_clock {
                // The step's readings are stamped at its end.
                let step_end = {
                    let engine = lock(&self.engine);
                    engine.now().unix_timestamp()
                        + i64::from(engine.scenario().interval_minutes) * 60
                };
                let ahead = step_end - time::OffsetDateTime::now_utc().unix_timestamp();
                if ahead > 0 {
                    tokio::time::sleep(Duration::from_secs(ahead.unsigned_abs())).await;
                }
            }
            let mut emissions: Vec<Emission> = Vec::new();
            let now = {
                let mut engine = lock(&self.engine);
                if engine.finished() {
                    break;
                }
                engine.step(|e| emissions.push(*e));
                engine.now().unix_timestamp()
            };
            step += 1;
            self.clock.store(now, Ordering::Relaxed);
            for e in &emissions {
                match self.routes.get(e.meter as usize) {
                    Some(Route::Concentrator(c)) => {
                        if e.delivery == crate::engine::Delivery::Lost {
                            add(&self.counters.lost, 1);
                        }
                        if e.delivery == Delivery::Corrupt && !frames_format {
                            add(&self.counters.corrupted, 1);
                        }
                        if frames_format {
                            if let Some(buf) = frame_buffers.get_mut(*c as usize) {
                                buf.extend(self.concentrator_frames(e, step));
                            }
                        } else if let (Some(buf), Some(id)) =
                            (buffers.get_mut(*c as usize), ids.get(e.meter as usize))
                        {
                            buf.extend(concentrator_entries(id, e));
                        }
                    }
                    Some(Route::Wmbus) => self.send_wmbus(e, step).await,
                    Some(Route::Mbus) => {
                        // Polled devices answer with their latest reading; a lost reading
                        // (comm loss) leaves the previous one in place.
                        if e.delivery == Delivery::Lost {
                            add(&self.counters.lost, 1);
                        } else {
                            lock(&self.latest).insert(e.meter, *e);
                        }
                    }
                    Some(Route::Coap | Route::Http) => {}
                    Some(Route::None) | None => {}
                }
            }
            self.exchanges(&emissions, step).await;
            if let Some(m) = &self.modbus {
                let engine = lock(&self.engine);
                modbus_tcp::update(&m.images, &m.devices, &m.maps, |d| {
                    dma_measurement(&engine, d)
                });
            }
            if let Some(c) = &conc {
                let midnight = (now + offset).rem_euclid(86_400) == 0;
                if c.upload == Upload::EveryStep || midnight {
                    self.upload(&mut buffers, now).await?;
                    self.upload_frames(&mut frame_buffers).await?;
                }
            }
            if let Some(bank) = &self.hydrants {
                let ups: Vec<_> = lock(bank)
                    .iter_mut()
                    .map(|h| h.tick(now, seed, step))
                    .collect();
                {
                    let mut truth = lock(&self.hydrant_truth);
                    for up in &ups {
                        for ev in &up.events {
                            let kind = match ev.as_str() {
                                "illegal_use" => TruthKind::HydrantIllegalUse,
                                "tilt" => TruthKind::HydrantTilt,
                                _ => continue,
                            };
                            // The gateway names hydrant readings and alarms `hydrant:{id}`.
                            let id = format!("hydrant:{}", up.hydrant);
                            truth.push(TruthEvent::new(kind, id, unix(now), None));
                        }
                    }
                }
                if let Some(client) = &self.mqtt
                    && let Some(mqtt) = &self.config.mqtt
                {
                    for up in ups {
                        let topic = mqtt.topic(&format!("hydrant/{}/up", up.hydrant));
                        let body = serde_json::to_vec(&up)?;
                        client
                            .publish(topic, QoS::AtLeastOnce, false, body)
                            .await
                            .context("publishing hydrant status")?;
                        add(&self.counters.hydrant_ups, 1);
                    }
                }
            }
            add(&self.counters.steps, 1);
        }
        let now = lock(&self.engine).now().unix_timestamp();
        self.upload(&mut buffers, now).await?;
        self.upload_frames(&mut frame_buffers).await?;
        Ok(())
    }

    /// Returns the raw frames a concentrator forwards for one reading (delivery faults applied).
    fn concentrator_frames(&self, e: &Emission, step: u64) -> Vec<Vec<u8>> {
        let Some(spec) = self.population.get(e.meter as usize) else {
            return Vec::new();
        };
        let offset_h = self.config.scenario.utc_offset_hours;
        let Some(mut frame) = cjt188_reply(spec, e, (step & 0xFF) as u8, offset_h) else {
            return Vec::new();
        };
        match e.delivery {
            Delivery::Lost => Vec::new(),
            Delivery::Normal => vec![frame],
            Delivery::Duplicate => {
                add(&self.counters.duplicated, 1);
                vec![frame.clone(), frame]
            }
            Delivery::Corrupt => {
                add(&self.counters.corrupted, 1);
                corrupt_checksummed(&mut frame);
                vec![frame]
            }
        }
    }

    async fn upload_frames(&self, buffers: &mut [Vec<Vec<u8>>]) -> anyhow::Result<()> {
        let (Some(client), Some(mqtt)) = (&self.mqtt, &self.config.mqtt) else {
            return Ok(());
        };
        for (k, buf) in buffers.iter_mut().enumerate() {
            let topic = mqtt.topic(&format!("concentrator/conc-{k:03}/frame"));
            for frame in std::mem::take(buf) {
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, frame)
                    .await
                    .context("publishing concentrator frame")?;
                add(&self.counters.concentrator_frames, 1);
            }
        }
        Ok(())
    }

    /// Runs the step's CoAP and HTTP exchanges concurrently and waits for all of them, so a
    /// meter's readings always leave in time order.
    async fn exchanges(&self, emissions: &[Emission], step: u64) {
        let semaphore = Arc::new(Semaphore::new(MAX_CONCURRENT_EXCHANGES));
        let mut set = JoinSet::new();
        for e in emissions {
            let route = self.routes.get(e.meter as usize).copied();
            if !matches!(route, Some(Route::Coap | Route::Http)) {
                continue;
            }
            let Some(spec) = self.population.get(e.meter as usize).cloned() else {
                continue;
            };
            let Some((frame, copies, e)) = self.nbiot_uplink(&spec, e, step) else {
                continue;
            };
            let Ok(permit) = Arc::clone(&semaphore).acquire_owned().await else {
                break;
            };
            let counters = Arc::clone(&self.counters);
            match route {
                Some(Route::Coap) => {
                    let Some(c) = &self.config.coap else { continue };
                    let key = self
                        .config
                        .nbiot_key_seed
                        .as_deref()
                        .map(|seed| crate::nbiot::meter_key(seed, spec.id.as_str()));
                    let job = CoapJob {
                        gateway: c.gateway,
                        engine: Arc::clone(&self.engine),
                        message_id: Arc::clone(&self.message_id),
                        counters,
                        spec,
                        e,
                        frame,
                        copies,
                        valve: !self.config.nbiot_without_valve.contains(&e.meter),
                        key,
                        token: (crate::profile::mix(u64::from(e.meter) ^ (step << 32)) as u32)
                            .to_be_bytes(),
                    };
                    set.spawn(async move {
                        job.run().await;
                        drop(permit);
                    });
                }
                Some(Route::Http) => {
                    let Some(h) = self.config.http_push.clone() else {
                        continue;
                    };
                    let mut envelope =
                        Envelope::new(h.platform, format!("nb-{:08}", e.meter), frame);
                    envelope.imei = Some(format!("86{:013}", e.meter));
                    envelope.received_at = Some(unix(e.ts));
                    let body = encode_envelope(h.platform, &envelope);
                    set.spawn(async move {
                        for _ in 0..copies {
                            match http_push(h.gateway, &h.path, h.secret.as_bytes(), &body).await {
                                Ok(202) => add(&counters.http_pushes, 1),
                                Ok(status) => {
                                    tracing::warn!(status, "http push refused");
                                    add(&counters.http_rejected, 1);
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "http push failed");
                                    add(&counters.errors, 1);
                                }
                            }
                        }
                        drop(permit);
                    });
                }
                _ => {}
            }
        }
        while set.join_next().await.is_some() {}
    }

    /// Returns the payload an NB-IoT meter sends at this step (if it sends), how many times
    /// (duplicate faults) and its newest reading; counts lost, corrupted and duplicated.
    fn nbiot_uplink(
        &self,
        spec: &MeterSpec,
        e: &Emission,
        step: u64,
    ) -> Option<(Vec<u8>, u32, Emission)> {
        let offset_h = self.config.scenario.utc_offset_hours;
        let ser = (step & 0xFF) as u8;
        let readings = match self.config.nbiot_uplink {
            NbiotUplink::Hourly => {
                let every = u64::from(self.config.nbiot_report_every.max(1));
                if !(step + u64::from(e.meter)).is_multiple_of(every) {
                    // Between uplinks the meter is asleep (PSM); the register keeps counting.
                    return None;
                }
                if e.delivery == Delivery::Lost {
                    add(&self.counters.lost, 1);
                    return None;
                }
                vec![(*e, ser)]
            }
            NbiotUplink::Daily => {
                let mut history = lock(&self.nbiot_history);
                let taken = history.entry(e.meter).or_default();
                if e.delivery == Delivery::Lost {
                    add(&self.counters.lost, 1);
                } else {
                    taken.push((*e, ser));
                }
                // 60-minute steps (checked at start): 24 steps a day.
                if !(step + u64::from(e.meter)).is_multiple_of(24) {
                    return None;
                }
                std::mem::take(taken)
            }
        };
        let newest = readings.last()?.0;
        let mut payload = Vec::new();
        let mut copies = 1;
        for (r, ser) in &readings {
            let mut frame = cjt188_reply(spec, r, *ser, offset_h)?;
            match r.delivery {
                Delivery::Corrupt => {
                    corrupt_checksummed(&mut frame);
                    add(&self.counters.corrupted, 1);
                }
                Delivery::Duplicate => {
                    add(&self.counters.duplicated, 1);
                    copies = 2;
                }
                Delivery::Normal | Delivery::Lost => {}
            }
            payload.extend(frame);
        }
        add(
            &self.counters.nbiot_frames,
            readings.len() as u64 * u64::from(copies),
        );
        Some((payload, copies, newest))
    }

    async fn send_wmbus(&self, e: &Emission, step: u64) {
        let (Some(socket), Some(w)) = (&self.wmbus_socket, &self.config.wmbus) else {
            return;
        };
        if e.delivery == Delivery::Lost {
            add(&self.counters.lost, 1);
            return;
        }
        let Some(spec) = self.population.get(e.meter as usize) else {
            return;
        };
        let key = w
            .encrypted
            .then(|| wmbus_key(self.config.scenario.seed, e.meter));
        let Some(mut telegram) = crate::frames::wmbus_telegram(
            spec,
            (step & 0xFF) as u8,
            key,
            e,
            self.config.scenario.utc_offset_hours,
        ) else {
            return;
        };
        if e.delivery == Delivery::Corrupt {
            corrupt_wmbus(&mut telegram, w.encrypted);
            add(&self.counters.corrupted, 1);
        }
        let copies = if e.delivery == Delivery::Duplicate {
            add(&self.counters.duplicated, 1);
            2
        } else {
            1
        };
        for _ in 0..copies {
            match socket.send_to(&telegram, w.gateway).await {
                Ok(_) => add(&self.counters.wmbus_telegrams, 1),
                Err(err) => {
                    tracing::warn!(error = %err, "wm-bus datagram not sent");
                    add(&self.counters.errors, 1);
                }
            }
        }
    }

    async fn upload(
        &self,
        buffers: &mut [Vec<ConcentratorReading>],
        now: i64,
    ) -> anyhow::Result<()> {
        let (Some(client), Some(mqtt)) = (&self.mqtt, &self.config.mqtt) else {
            return Ok(());
        };
        let sent_at = unix(now).format(&Rfc3339)?;
        for (k, buf) in buffers.iter_mut().enumerate() {
            let cid = format!("conc-{k:03}");
            let readings = std::mem::take(buf);
            // Large concentrators split their upload so one message stays well under 1 MB.
            for chunk in readings.chunks(1000) {
                let batch = ConcentratorBatch {
                    v: 1,
                    concentrator: cid.clone(),
                    sent_at: sent_at.clone(),
                    readings: chunk.to_vec(),
                };
                client
                    .publish(
                        mqtt.topic(&format!("concentrator/{cid}/readings")),
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&batch)?,
                    )
                    .await
                    .context("publishing concentrator batch")?;
                add(&self.counters.concentrator_batches, 1);
                add(&self.counters.concentrator_readings, chunk.len() as u64);
            }
        }
        Ok(())
    }
}

/// One NB-IoT meter's uplink (and the valve command it may get back).
struct CoapJob {
    gateway: SocketAddr,
    engine: Arc<Mutex<Engine>>,
    message_id: Arc<AtomicU16>,
    counters: Arc<Counters>,
    spec: MeterSpec,
    e: Emission,
    frame: Vec<u8>,
    copies: u32,
    /// The meter has a valve; without one it refuses valve commands.
    valve: bool,
    /// The meter's key: uplinks sealed, downlinks checked.
    key: Option<[u8; 16]>,
    token: [u8; 4],
}

impl CoapJob {
    /// The payload as sent: sealed with a fresh counter when the meter has a key.
    fn seal(&self, payload: &[u8]) -> (Vec<u8>, Option<u64>) {
        match &self.key {
            Some(key) => {
                let (sealed, counter) =
                    crate::nbiot::seal_uplink(key, self.spec.id.as_str(), payload);
                (sealed, Some(counter))
            }
            None => (payload.to_vec(), None),
        }
    }

    async fn run(self) {
        let socket = match UdpSocket::bind(unspecified(self.gateway)).await {
            Ok(s) => s,
            Err(err) => {
                tracing::warn!(error = %err, "cannot bind a coap socket");
                add(&self.counters.errors, 1);
                return;
            }
        };
        let model::MeterAddress::Cjt188 {
            meter_type,
            address,
        } = self.spec.address
        else {
            return;
        };
        for _ in 0..self.copies {
            let mid = self.message_id.fetch_add(1, Ordering::Relaxed);
            let (payload, counter) = self.seal(&self.frame);
            let response = match coap_post(&socket, self.gateway, mid, self.token, payload).await {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(meter = %self.spec.id, error = %err, "coap uplink failed");
                    add(&self.counters.errors, 1);
                    continue;
                }
            };
            add(&self.counters.coap_uplinks, 1);
            let response = match (&self.key, counter) {
                (Some(key), Some(counter)) => {
                    match crate::nbiot::open_downlink(
                        key,
                        self.spec.id.as_str(),
                        counter,
                        &response,
                    ) {
                        Some(body) => body,
                        None => {
                            add(&self.counters.errors, 1);
                            continue;
                        }
                    }
                }
                _ => response,
            };
            let Some(cmd) = downlink_valve(&response, &address) else {
                continue;
            };
            if !self.valve {
                let refusal = valve_refusal(meter_type, address, cmd, cjt188_status(&self.e));
                let (refusal, _) = self.seal(&refusal);
                let mid = self.message_id.fetch_add(1, Ordering::Relaxed);
                match coap_post(&socket, self.gateway, mid, self.token, refusal).await {
                    Ok(_) => add(&self.counters.coap_valve_refused, 1),
                    Err(err) => {
                        tracing::warn!(meter = %self.spec.id, error = %err, "valve refusal failed");
                        add(&self.counters.errors, 1);
                    }
                }
                continue;
            }
            lock(&self.engine).set_valve(self.e.meter, cmd.open);
            add(&self.counters.coap_valve_commands, 1);
            let mut after = self.e;
            after.status.valve_closed = !cmd.open;
            let reply = valve_reply(meter_type, address, cmd, cjt188_status(&after));
            let (reply, _) = self.seal(&reply);
            let mid = self.message_id.fetch_add(1, Ordering::Relaxed);
            match coap_post(&socket, self.gateway, mid, self.token, reply).await {
                Ok(_) => add(&self.counters.coap_valve_replies, 1),
                Err(err) => {
                    tracing::warn!(meter = %self.spec.id, error = %err, "valve reply failed");
                    add(&self.counters.errors, 1);
                }
            }
        }
    }
}

async fn hydrant_commands(
    mut incoming: mpsc::Receiver<rumqttc::Publish>,
    client: AsyncClient,
    mqtt: MqttConfig,
    bank: Arc<Mutex<Vec<Hydrant>>>,
    clock: Arc<AtomicI64>,
    counters: Arc<Counters>,
) {
    while let Some(p) = incoming.recv().await {
        // Topic: {prefix}hydrant/{hid}/cmd
        let Some(rest) = p.topic.strip_prefix(&mqtt.topic("hydrant/")) else {
            continue;
        };
        let Some(hid) = rest.strip_suffix("/cmd") else {
            continue;
        };
        let cmd: HydrantCommand = match serde_json::from_slice(&p.payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(hydrant = hid, error = %e, "bad hydrant command ignored");
                continue;
            }
        };
        let ack = {
            let mut bank = lock(&bank);
            let Some(h) = bank.iter_mut().find(|h| h.id == hid) else {
                continue;
            };
            let before = h.executed;
            let ack = h.handle(&cmd, clock.load(Ordering::Relaxed));
            add(&counters.hydrant_commands_executed, h.executed - before);
            ack
        };
        let body = match serde_json::to_vec(&ack) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode hydrant ack");
                continue;
            }
        };
        let topic = mqtt.topic(&format!("hydrant/{hid}/ack"));
        if client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .is_err()
        {
            return;
        }
        add(&counters.hydrant_acks, 1);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FleetHandle {
    /// Returns the pty path the gateway's M-Bus master opens, when M-Bus slaves run.
    pub fn mbus_master_path(&self) -> Option<&std::path::Path> {
        self.mbus_bus.as_ref().map(|b| b.master_path.as_path())
    }

    /// Returns the address of the Modbus TCP listener, when instruments run.
    pub fn modbus_addr(&self) -> Option<SocketAddr> {
        self.modbus_info.as_ref().map(|(a, _)| *a)
    }

    /// Returns the Modbus instruments (unit id, name, map model, DMA).
    pub fn modbus_devices(&self) -> &[modbus_tcp::ModbusDevice] {
        self.modbus_info.as_ref().map_or(&[], |(_, d)| d.as_slice())
    }

    /// Returns the counts of frames sent so far.
    pub fn counts(&self) -> FrameCounts {
        let mut c = self.counters.snapshot();
        c.modbus_requests = self.modbus_requests.load(Ordering::Relaxed);
        c
    }

    /// Returns the ground truth recorded so far. Hydrant events (illegal use, tilt) are
    /// included with `hydrant:{id}` as `meter`, the gateway's id for hydrants.
    pub fn ground_truth(&self) -> GroundTruth {
        let mut truth = lock(&self.engine).ground_truth();
        truth
            .events
            .extend(lock(&self.hydrant_truth).iter().cloned());
        truth
            .events
            .sort_by(|a, b| (a.from, &a.meter, a.kind).cmp(&(b.from, &b.meter, b.kind)));
        truth
    }

    /// Waits until every simulation step has run and its frames were handed to the
    /// transports (devices keep answering commands until [`FleetHandle::stop`]).
    pub async fn wait_finished(&mut self) -> FrameCounts {
        // An error means the driver is gone, which also means it finished.
        if self.finished.wait_for(|f| *f).await.is_err() {
            tracing::debug!("fleet driver already gone");
        }
        self.counts()
    }

    /// Stops every device (steps and exchanges still in flight are cancelled: call
    /// [`FleetHandle::wait_finished`] first to let a bounded run complete), disconnects
    /// cleanly and returns the final counts.
    ///
    /// # Errors
    /// Returns the driver's error if a transport failed during the run.
    pub async fn stop(mut self) -> anyhow::Result<FrameCounts> {
        self.shutdown.send_replace(true);
        let result = match self.driver.take() {
            Some(d) => d.await.context("fleet driver panicked")?,
            None => Ok(()),
        };
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(client) = self.mqtt.take() {
            // Wait for the broker to acknowledge every QoS 1 publish, so nothing queued in
            // the client or the socket is lost, then disconnect cleanly.
            let c = self.counters.snapshot();
            let published =
                c.concentrator_batches + c.concentrator_frames + c.hydrant_ups + c.hydrant_acks;
            if let Some(acked) = self.mqtt_acked.as_mut() {
                let waited = tokio::time::timeout(
                    Duration::from_secs(10),
                    acked.wait_for(|n| *n >= published),
                )
                .await;
                if !matches!(waited, Ok(Ok(_))) {
                    tracing::warn!(published, "broker did not acknowledge every publish");
                }
            }
            if let Err(e) = client.disconnect().await {
                tracing::debug!(error = %e, "mqtt event loop already gone");
            }
            if let Some(task) = self.mqtt_task.take()
                && tokio::time::timeout(Duration::from_secs(5), task)
                    .await
                    .is_err()
            {
                tracing::warn!("mqtt event loop did not end within 5 s");
            }
        }
        self.mqtt_stop.send_replace(true);
        if let Some(bus) = self.mbus_bus.take() {
            bus.stop().await;
        }
        result.map(|()| self.counts())
    }
}

impl Drop for FleetHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.mqtt_stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
        if let Some(d) = &self.driver {
            d.abort();
        }
    }
}
