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

mod config;
mod driver;
mod routes;

use crate::truth::{GroundTruth, TruthEvent, TruthKind};
pub use config::{
    CoapConfig, ConcentratorConfig, ConcentratorFormat, FleetConfig, HttpPushConfig, MbusConfig,
    ModbusConfig, NbiotUplink, Upload, WmbusConfig,
};
use driver::{Driver, ModbusState, dma_measurement, hydrant_commands};
use routes::{Route, routes};

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
        config.check()?;
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
