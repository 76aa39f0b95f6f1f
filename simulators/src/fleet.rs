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
//! config.concentrators = Some(ConcentratorConfig { count: 2, meters: 100, upload: Default::default() });
//! let mut fleet = Fleet::start(config).await?;
//! let counts = fleet.wait_finished().await;
//! println!("{} concentrator readings", counts.concentrator_readings);
//! fleet.stop().await?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rumqttc::{AsyncClient, QoS};
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::engine::{Emission, Engine, unix};
use crate::mqtt::{
    ConcentratorBatch, ConcentratorReading, Hydrant, HydrantCommand, MqttConfig,
    concentrator_entries,
};
use crate::scenario::Scenario;
use crate::truth::GroundTruth;

/// When concentrators upload what they collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Upload {
    /// Once a day at local midnight (what real concentrators do), and at the end of the run.
    #[default]
    Midnight,
    /// After every simulation step.
    EveryStep,
}

/// MQTT data concentrators (JSON batches on `concentrator/{cid}/readings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcentratorConfig {
    /// Number of concentrators (`conc-000`…).
    pub count: u32,
    /// CJ/T 188 meters read through concentrators, spread round-robin.
    pub meters: u32,
    /// Upload schedule.
    pub upload: Upload,
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
    /// Broker for concentrators and hydrants.
    pub mqtt: Option<MqttConfig>,
    /// Concentrators (need `mqtt`).
    pub concentrators: Option<ConcentratorConfig>,
    /// Number of hydrant controllers (need `mqtt`).
    pub hydrants: u32,
}

impl FleetConfig {
    /// A config that runs `scenario` one step per 100 ms with no transports enabled.
    pub fn new(scenario: Scenario) -> Self {
        Self {
            scenario,
            step_every: Duration::from_millis(100),
            max_steps: None,
            mqtt: None,
            concentrators: None,
            hydrants: 0,
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
}

/// Counts of frames and messages sent, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameCounts {
    /// Simulation steps run.
    pub steps: u64,
    /// Concentrator JSON batches published.
    pub concentrator_batches: u64,
    /// Readings inside those batches (duplicates counted twice).
    pub concentrator_readings: u64,
    /// Hydrant status messages published.
    pub hydrant_ups: u64,
    /// Hydrant acks published.
    pub hydrant_acks: u64,
    /// Hydrant commands executed (repeats of a command id not counted).
    pub hydrant_commands_executed: u64,
    /// Readings not sent because of communication-loss faults.
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    concentrator_batches: AtomicU64,
    concentrator_readings: AtomicU64,
    hydrant_ups: AtomicU64,
    hydrant_acks: AtomicU64,
    hydrant_commands_executed: AtomicU64,
    lost: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FrameCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FrameCounts {
            steps: g(&self.steps),
            concentrator_batches: g(&self.concentrator_batches),
            concentrator_readings: g(&self.concentrator_readings),
            hydrant_ups: g(&self.hydrant_ups),
            hydrant_acks: g(&self.hydrant_acks),
            hydrant_commands_executed: g(&self.hydrant_commands_executed),
            lost: g(&self.lost),
        }
    }
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
                let bank: Arc<Mutex<Vec<Hydrant>>> =
                    Arc::new(Mutex::new((0..config.hydrants).map(Hydrant::new).collect()));
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

        let engine = Arc::new(Mutex::new(engine));
        let driver = Driver {
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
        })
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
    let mut next = cjt.iter();
    if let Some(c) = &config.concentrators {
        if c.count == 0 {
            bail!("concentrators.count is 0");
        }
        for k in 0..c.meters {
            let Some(&i) = next.next() else {
                bail!(
                    "concentrators.meters = {} but the scenario has only {} CJ/T 188 meters",
                    c.meters,
                    cjt.len()
                );
            };
            if let Some(r) = routes.get_mut(i) {
                *r = Route::Concentrator(k % c.count);
            }
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
}

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
        let mut buffers: Vec<Vec<ConcentratorReading>> =
            vec![Vec::new(); conc.as_ref().map_or(0, |c| c.count as usize)];
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
                        if let (Some(buf), Some(id)) =
                            (buffers.get_mut(*c as usize), ids.get(e.meter as usize))
                        {
                            buf.extend(concentrator_entries(id, e));
                        }
                    }
                    Some(Route::None) | None => {}
                }
            }
            if let Some(c) = &conc {
                let midnight = (now + offset).rem_euclid(86_400) == 0;
                if c.upload == Upload::EveryStep || midnight {
                    self.upload(&mut buffers, now).await?;
                }
            }
            if let Some(bank) = &self.hydrants {
                let ups: Vec<_> = lock(bank)
                    .iter_mut()
                    .map(|h| h.tick(now, seed, step))
                    .collect();
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
        Ok(())
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
    /// Returns the counts of frames sent so far.
    pub fn counts(&self) -> FrameCounts {
        self.counters.snapshot()
    }

    /// Returns the ground truth recorded so far.
    pub fn ground_truth(&self) -> GroundTruth {
        lock(&self.engine).ground_truth()
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

    /// Stops every device, disconnects cleanly and returns the final counts.
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
            let published = c.concentrator_batches + c.hydrant_ups + c.hydrant_acks;
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
        result.map(|()| self.counters.snapshot())
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
