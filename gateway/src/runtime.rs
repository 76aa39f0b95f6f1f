//! Wires the gateway together from a [`GatewayConfig`]: spool and its writer, uplink, control
//! connection (status, commands), metrics and the sources; reloads sources on a new config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_config::{GatewayConfig, SourceConfig};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::IngestSink;
use crate::control::{self, ControlOptions};
use crate::downlink::{Downlink, DownlinkError, Route, Routes};
use crate::metrics::{self, Metrics};
use crate::mqtt::MqttEndpoint;
use crate::sources::{Commands, Readiness, Source, SourceContext, SourceEnv, SourceState};
use crate::spool::{Spool, SpoolConfig, SpoolError, spawn_writer};
use crate::uplink::{self, UplinkOptions, UplinkStats};

/// Why the gateway could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The command log could not be opened.
    #[error(transparent)]
    Downlink(#[from] DownlinkError),
    /// A listener could not be bound.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// Address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A source could not be built (socket, serial port, register map, key file, TLS).
    #[error("source `{source_id}`: {source}")]
    Source {
        /// The source.
        source_id: String,
        /// What is wrong.
        source: crate::sources::SourceError,
    },
    /// The TLS material of an MQTT connection is unusable.
    #[error("{what}: {source}")]
    Tls {
        /// Which connection.
        what: String,
        /// What is wrong with it.
        source: crate::mqtt::TlsSetupError,
    },
}

/// The TLS connector of one MQTT connection (`None` for plain TCP), built once at start so a
/// bad certificate stops the start instead of every reconnect.
pub(crate) fn tls_for(
    what: &str,
    tls: Option<edge_config::MqttTls>,
) -> Result<Option<native_tls::TlsConnector>, RuntimeError> {
    tls.map(|t| crate::mqtt::tls_connector(&t))
        .transpose()
        .map_err(|source| RuntimeError::Tls {
            what: what.to_owned(),
            source,
        })
}

struct RunningSource {
    config: SourceConfig,
    token: CancellationToken,
    task: JoinHandle<()>,
    route: Route,
    addr: Option<SocketAddr>,
    readiness: Readiness,
    /// Handed to the successor when the source restarts for new device keys.
    udp: Option<Arc<tokio::net::UdpSocket>>,
}

/// A running gateway.
pub struct Gateway {
    config: GatewayConfig,
    shutdown: CancellationToken,
    sink: IngestSink,
    spool: Spool,
    downlink: Arc<Downlink>,
    uplink_stats: Arc<UplinkStats>,
    sources: BTreeMap<String, RunningSource>,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    metrics_addr: SocketAddr,
    health: crate::metrics::HealthRegistry,
    readiness: crate::metrics::ReadinessRegistry,
    /// Version of the registry device set in force (0: the TOML's `[[device]]` tables).
    device_set_version: u64,
    /// Device sets received from the registry, until taken by the caller's loop.
    device_set_updates: Option<mpsc::Receiver<crate::device_set::DeviceSetUpdate>>,
    listeners: crate::listener::ListenerRegistry,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("gateway", &self.config.gateway_id)
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn endpoint(config: &GatewayConfig) -> Result<MqttEndpoint, RuntimeError> {
    let u = &config.uplink;
    Ok(MqttEndpoint {
        host: u.broker.host.clone(),
        port: u.broker.port,
        credentials: u.username.clone().map(|name| {
            let password = u.password.as_ref().map(|p| p.expose().to_owned());
            (name, password.unwrap_or_default())
        }),
        keep_alive: Duration::from_secs(u64::from(u.keep_alive_s)),
        tls: tls_for("uplink broker", u.tls())?,
    })
}

impl Gateway {
    /// Opens the spool and starts every component.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, RuntimeError> {
        let shutdown = CancellationToken::new();
        let uplink_endpoint = endpoint(&config)?;
        let device_set_endpoint = uplink_endpoint.clone();
        let (spool, writer) =
            Spool::open(SpoolConfig::new(&config.spool.dir, config.spool.max_bytes))?;
        let stats = spool.stats();
        tracing::info!(
            depth = stats.depth,
            next_seq = stats.next_seq,
            truncated = stats.truncated,
            "spool opened"
        );
        let (sink, rx) = IngestSink::new(1024);
        let writer = spawn_writer(writer, rx);
        let (downlink, acks) = Downlink::open(config.gateway_id.clone(), &config.spool.dir)?;
        let uplink_stats = Arc::new(UplinkStats::default());
        let client_base = config
            .uplink
            .client_id
            .clone()
            .unwrap_or_else(|| config.gateway_id.to_string());
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(uplink::run(
            UplinkOptions {
                endpoint: uplink_endpoint.clone(),
                client_id: format!("{client_base}-up"),
                topic_root: config.uplink.topic_root.clone(),
                gateway: config.gateway_id.clone(),
                partitions: config.uplink.partitions,
                batch_size: config.uplink.batch_size,
                window: config.uplink.window,
                ack_timeout: (config.uplink.ack_timeout_s > 0)
                    .then(|| Duration::from_secs(u64::from(config.uplink.ack_timeout_s))),
                max_unacked: config
                    .uplink
                    .batch_size
                    .saturating_mul(usize::from(config.uplink.window))
                    .saturating_mul(8),
            },
            spool.clone(),
            Arc::clone(&uplink_stats),
            shutdown.clone(),
        )));
        // Spool overflow raises an alarm to the centre, not only a log line and a counter.
        let (alarm_tx, alarm_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(control::watch_spool_overflow(
            spool.clone(),
            config.gateway_id.clone(),
            config.spool.dir.display().to_string(),
            alarm_tx,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(control::run(
            ControlOptions {
                endpoint: uplink_endpoint,
                client_id: format!("{client_base}-ctl"),
                topic_root: config.uplink.topic_root.clone(),
                gateway: config.gateway_id.clone(),
                health: Some(control::HealthSource {
                    spool: spool.clone(),
                    uplink: Arc::clone(&uplink_stats),
                }),
                health_every: Duration::from_secs(u64::from(config.uplink.health_interval_s)),
            },
            Arc::clone(&downlink),
            acks,
            alarm_rx,
            shutdown.clone(),
        )));
        // Queued NB-IoT commands expire on time even if the meter never calls in.
        let sweeper = Arc::clone(&downlink);
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => sweeper.expire_queued(),
                }
            }
        }));
        let health = crate::metrics::HealthRegistry::default();
        let readiness = crate::metrics::ReadinessRegistry::default();
        let listeners = crate::listener::ListenerRegistry::default();
        let metrics_addr = metrics::serve(
            config.metrics.listen,
            Metrics {
                health: Arc::clone(&health),
                readiness: Arc::clone(&readiness),
                sources: Arc::clone(sink.counters()),
                spool: spool.clone(),
                uplink: Arc::clone(&uplink_stats),
                downlink: Arc::clone(&downlink),
                listeners: listeners.clone(),
            },
            shutdown.clone(),
        )
        .await
        .map_err(|source| RuntimeError::Bind {
            what: "metrics listener".into(),
            addr: config.metrics.listen,
            source,
        })?;
        tracing::info!(%metrics_addr, "metrics at /metrics");
        let mut gw = Gateway {
            config,
            shutdown,
            sink,
            spool,
            downlink,
            uplink_stats,
            sources: BTreeMap::new(),
            tasks,
            writer: Some(writer),
            metrics_addr,
            health,
            readiness,
            device_set_version: 0,
            device_set_updates: None,
            listeners,
        };
        if gw.config.registry.device_sets {
            gw.start_device_sets(device_set_endpoint, &client_base);
        }
        for entry in gw.config.sources.clone() {
            let running = gw.start_source(&entry.config).await?;
            gw.sources.insert(entry.config.id().to_owned(), running);
        }
        gw.update_routes();
        Ok(gw)
    }

    /// Starts with the device set kept on disk (if it still passes the checks) and spawns the
    /// registry's device-set connection (docs/registry.md).
    fn start_device_sets(&mut self, endpoint: MqttEndpoint, client_base: &str) {
        let state_file = crate::device_set::state_file(&self.config.spool.dir);
        if let Some(set) = crate::device_set::load_state(&state_file) {
            match edge_config::device_set::devices_of_set(&set, &self.config) {
                Ok(devices) => {
                    tracing::info!(
                        version = set.version,
                        devices = devices.len(),
                        "starting with the kept device set"
                    );
                    self.config.devices = devices;
                    self.device_set_version = set.version;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the kept device set no longer passes the checks; using the TOML's devices")
                }
            }
        }
        let (tx, rx) = mpsc::channel(4);
        self.device_set_updates = Some(rx);
        self.tasks.push(tokio::spawn(crate::device_set::run(
            crate::device_set::DeviceSetOptions {
                endpoint,
                client_id: format!("{client_base}-cfg"),
                topic_root: self.config.uplink.topic_root.clone(),
                gateway: self.config.gateway_id.clone(),
                state_file,
            },
            self.device_set_version,
            self.config.devices.len(),
            tx,
            self.shutdown.clone(),
        )));
    }

    /// The registry's device sets as they arrive (once; `None` after the first call or when
    /// `[registry] device_sets` is off). The caller's loop passes each to
    /// [`Gateway::apply_device_set`] and answers on its `reply`.
    pub fn take_device_set_updates(
        &mut self,
    ) -> Option<mpsc::Receiver<crate::device_set::DeviceSetUpdate>> {
        self.device_set_updates.take()
    }

    /// Checks a registry device set like the TOML's `[[device]]` tables (key references
    /// resolved in the key file) and applies it without a restart: devices re-routed, wM-Bus
    /// receivers whose keys changed restarted. On error nothing changes: the receivers in
    /// force keep running with their keys. Returns the number of devices in force.
    ///
    /// A receiver takes its keys when it is built, so new keys need a new receiver; it is
    /// built with its predecessor's bound socket ([`Source::udp_socket`]) while the
    /// predecessor still runs, and only then swapped in. Closing the socket and binding the
    /// port again (what this did before) left a window in which the port was free: another
    /// process, or the predecessor's socket not yet released on a loaded machine, made the
    /// bind fail after the old receiver had stopped, and the gateway received no wM-Bus at
    /// all. `SO_REUSEPORT` is no way out either: the kernel would split the datagrams between
    /// the two sockets. With the socket handed over the port is never released, and datagrams
    /// arriving during the swap wait in its kernel buffer.
    pub async fn apply_device_set(&mut self, set: &model::DeviceSet) -> Result<usize, String> {
        let devices = edge_config::device_set::devices_of_set(set, &self.config)
            .map_err(|e| e.to_string())?;
        // wM-Bus receivers take their devices' keys when they start.
        let keys_of = |devices: &[edge_config::Spanned<edge_config::DeviceConfig>],
                       source: &str| {
            devices
                .iter()
                .map(edge_config::Spanned::get_ref)
                .filter(|d| d.source.get_ref() == source)
                .map(|d| {
                    (
                        d.id.to_string(),
                        d.key.as_ref().map(|k| k.get_ref().clone()),
                    )
                })
                .collect::<BTreeMap<_, _>>()
        };
        let mut successors = Vec::new();
        for (id, s) in &self.sources {
            let SourceConfig::WmbusUdp(c) = &s.config else {
                continue;
            };
            if keys_of(&self.config.devices, id) == keys_of(&devices, id) {
                continue;
            }
            let mut env = self.env_for(id, devices.iter().map(|d| d.get_ref().clone()).collect());
            if let Some(socket) = &s.udp {
                env = env.with_udp_socket(Arc::clone(socket));
            }
            let source = crate::sources::wmbus::WmbusSource::build(c, &env)
                .await
                .map_err(|source| {
                    RuntimeError::Source {
                        source_id: id.clone(),
                        source,
                    }
                    .to_string()
                })?;
            successors.push((id.clone(), s.config.clone(), source));
        }
        // Nothing has changed up to here. Each predecessor stops (its in-flight submit
        // finishes) before its successor reads from the shared socket: two readers would
        // decode the same port's datagrams with different keys.
        for (id, cfg, source) in successors {
            if let Some(old) = self.sources.remove(&id) {
                tracing::info!(source = %id, "restarting for new device keys (socket kept)");
                old.token.cancel();
                let abort = old.task.abort_handle();
                if tokio::time::timeout(Duration::from_secs(10), old.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(source = %id, "source did not stop within 10 s; aborted");
                    abort.abort();
                }
            }
            let running = self.spawn_source(&cfg, source);
            self.sources.insert(id, running);
        }
        let n = devices.len();
        self.config.devices = devices;
        self.device_set_version = set.version;
        self.update_routes();
        Ok(n)
    }

    /// The devices in force (the TOML's, or the registry's device set).
    pub fn devices(&self) -> impl Iterator<Item = &edge_config::DeviceConfig> {
        self.config
            .devices
            .iter()
            .map(edge_config::Spanned::get_ref)
    }

    /// Version of the registry device set in force (0: none, the TOML's devices).
    pub fn device_set_version(&self) -> u64 {
        self.device_set_version
    }

    /// Builds and spawns the source of `cfg`: one line per kind, the rest is [`Source`].
    async fn start_source(&self, cfg: &SourceConfig) -> Result<RunningSource, RuntimeError> {
        use crate::sources::{
            coap::CoapSource, concentrator::ConcentratorSource, http_push::HttpPushSource,
            hydrant::HydrantSource, mbus::MbusSource, modbus::ModbusRtuSource,
            modbus::ModbusTcpSource, wmbus::WmbusSource,
        };
        match cfg {
            SourceConfig::Coap(c) => self.launch::<CoapSource>(cfg, c).await,
            SourceConfig::HttpPush(c) => self.launch::<HttpPushSource>(cfg, c).await,
            SourceConfig::Mqtt(c) => self.launch::<ConcentratorSource>(cfg, c).await,
            SourceConfig::ModbusTcp(c) => self.launch::<ModbusTcpSource>(cfg, c).await,
            SourceConfig::ModbusRtu(c) => self.launch::<ModbusRtuSource>(cfg, c).await,
            SourceConfig::MbusSerial(c) => self.launch::<MbusSource>(cfg, c).await,
            SourceConfig::WmbusUdp(c) => self.launch::<WmbusSource>(cfg, c).await,
            SourceConfig::HydrantMqtt(c) => self.launch::<HydrantSource>(cfg, c).await,
        }
    }

    /// What source `id` is built with, given the devices in force.
    fn env_for(&self, id: &str, devices: Vec<edge_config::DeviceConfig>) -> SourceEnv {
        SourceEnv::new(id)
            .with_state_dir(self.config.spool.dir.clone())
            .with_register_maps(self.config.register_maps.clone())
            .with_devices(devices)
            .with_registries(Arc::clone(&self.health), self.listeners.clone())
            .with_downlink(Arc::clone(&self.downlink))
    }

    /// Builds source `S` (a failure stops the start or reload), then runs it.
    async fn launch<S: Source>(
        &self,
        cfg: &SourceConfig,
        config: &S::Config,
    ) -> Result<RunningSource, RuntimeError> {
        let id = cfg.id().to_owned();
        let env = self.env_for(&id, self.devices().cloned().collect());
        let source = S::build(config, &env)
            .await
            .map_err(|source| RuntimeError::Source {
                source_id: id.clone(),
                source,
            })?;
        Ok(self.spawn_source(cfg, source))
    }

    /// Runs a built source as a task whose commands, readiness, address and UDP socket the
    /// gateway keeps.
    fn spawn_source<S: Source>(&self, cfg: &SourceConfig, source: S) -> RunningSource {
        let id = cfg.id().to_owned();
        let token = self.shutdown.child_token();
        let (cmd_tx, commands) = mpsc::channel(16);
        let ctx = SourceContext::new(
            self.config.gateway_id.clone(),
            id.clone(),
            S::KIND,
            self.sink.clone(),
            commands,
            token.clone(),
        );
        let readiness = ctx.readiness.clone();
        self.readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone(), readiness.clone());
        let addr = source.local_addr();
        let udp = source.udp_socket();
        let route = match source.commands() {
            Commands::Channel => Route::Channel(cmd_tx),
            Commands::CoapQueue => Route::CoapQueue,
            Commands::Unavailable(why) => Route::Unavailable(format!("source `{id}` {why}")),
        };
        let sid = id.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = source.run(ctx).await {
                tracing::error!(source = %sid, error = %e, "source stopped");
            }
        });
        tracing::info!(source = %id, kind = cfg.kind(), ?addr, "source started");
        RunningSource {
            config: cfg.clone(),
            token,
            task,
            route,
            addr,
            readiness,
            udp,
        }
    }

    fn update_routes(&self) {
        let mut routes = Routes::default();
        // Devices a source lists itself, and meter-id prefixes served by exactly one source.
        let mut by_prefix: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
        for (id, src) in &self.sources {
            match &src.config {
                SourceConfig::ModbusTcp(c) => {
                    for d in &c.devices {
                        routes
                            .devices
                            .insert(format!("modbus:{}", d.name), id.clone());
                    }
                }
                SourceConfig::ModbusRtu(c) => {
                    for d in &c.devices {
                        routes
                            .devices
                            .insert(format!("modbus:{}", d.name), id.clone());
                    }
                }
                SourceConfig::Coap(_) => by_prefix.entry("cjt188:").or_default().push(id),
                SourceConfig::MbusSerial(_) => by_prefix.entry("mbus:").or_default().push(id),
                SourceConfig::HydrantMqtt(_) => {
                    by_prefix.entry("hydrant:").or_default().push(id);
                }
                _ => {}
            }
        }
        for (prefix, ids) in by_prefix {
            if let [only] = ids.as_slice() {
                routes.by_prefix.insert(prefix.to_owned(), (*only).clone());
            }
        }
        // Explicit [[device]] entries win over both.
        for d in &self.config.devices {
            let d = d.get_ref();
            routes
                .devices
                .insert(d.id.as_str().to_owned(), d.source.get_ref().clone());
        }
        for (id, s) in &self.sources {
            routes.sources.insert(id.clone(), s.route.clone());
        }
        self.downlink.set_routes(routes);
    }

    /// Applies a new configuration: sources that changed or disappeared are stopped (their
    /// in-flight submits finish first), new and changed ones started, devices re-routed.
    /// Uplink, spool and metrics settings need a restart; a change there is logged.
    pub async fn reload(&mut self, mut new: GatewayConfig) -> Result<(), RuntimeError> {
        // A registry device set in force outlives a reload of the file.
        if self.device_set_version > 0 {
            new.devices = self.config.devices.clone();
        }
        self.reload_inner(new).await
    }

    async fn reload_inner(&mut self, new: GatewayConfig) -> Result<(), RuntimeError> {
        if new.gateway_id != self.config.gateway_id
            || new.uplink != self.config.uplink
            || new.spool != self.config.spool
            || new.metrics != self.config.metrics
        {
            tracing::warn!(
                "gateway_id, [uplink], [spool] and [metrics] changes take effect only after a restart"
            );
        }
        let wanted: BTreeMap<String, SourceConfig> = new
            .sources
            .iter()
            .map(|e| (e.config.id().to_owned(), e.config.clone()))
            .collect();
        let stale: Vec<String> = self
            .sources
            .iter()
            .filter(|(id, s)| wanted.get(*id) != Some(&s.config))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(s) = self.sources.remove(&id) {
                self.health
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                self.readiness
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                tracing::info!(source = %id, "stopping source for reload");
                s.token.cancel();
                if tokio::time::timeout(Duration::from_secs(10), s.task)
                    .await
                    .is_err()
                {
                    tracing::warn!(source = %id, "source did not stop within 10 s");
                }
            }
        }
        self.config.devices = new.devices.clone();
        self.config.register_maps = new.register_maps.clone();
        self.config.sources = new.sources.clone();
        for (id, cfg) in wanted {
            if !self.sources.contains_key(&id) {
                let running = self.start_source(&cfg).await?;
                self.sources.insert(id, running);
            }
        }
        self.update_routes();
        Ok(())
    }

    /// Bound address of a source's listener (CoAP, HTTP push), e.g. when configured with port 0.
    pub fn source_addr(&self, id: &str) -> Option<SocketAddr> {
        self.sources.get(id).and_then(|s| s.addr)
    }

    /// Whether source `id` receives yet (`None`: no such source).
    pub fn source_state(&self, id: &str) -> Option<SourceState> {
        self.sources.get(id).map(|s| s.readiness.state())
    }

    /// Waits until every running source is ready, or `timeout` passes; returns the ids of
    /// those still connecting. Tests wait on this instead of sleeping.
    pub async fn wait_ready(&self, timeout: Duration) -> Vec<String> {
        let all = self
            .sources
            .values()
            .map(|s| s.readiness.clone())
            .collect::<Vec<_>>();
        let _in_time = tokio::time::timeout(timeout, async {
            for r in &all {
                r.wait_ready().await;
            }
        })
        .await;
        self.sources
            .iter()
            .filter(|(_, s)| s.readiness.state() != SourceState::Ready)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Bound address of the metrics listener.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The spool (statistics).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Uplink counters.
    pub fn uplink_stats(&self) -> &Arc<UplinkStats> {
        &self.uplink_stats
    }

    /// Stops sources first (finishing in-flight submits), then uplink, control and metrics.
    pub async fn shutdown(mut self) {
        for (id, s) in std::mem::take(&mut self.sources) {
            s.token.cancel();
            if tokio::time::timeout(Duration::from_secs(10), s.task)
                .await
                .is_err()
            {
                tracing::warn!(source = %id, "source did not stop within 10 s");
            }
        }
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(5), t).await.ok();
        }
        drop(self.sink);
        if let Some(w) = self.writer.take() {
            // The writer thread ends once the last sink clone is gone.
            tokio::task::spawn_blocking(move || w.join()).await.ok();
        }
    }
}
