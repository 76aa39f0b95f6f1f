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

use crate::control::{self, ControlOptions};
use crate::downlink::{Downlink, DownlinkError, Route, Routes};
use crate::metrics::{self, Metrics};
use crate::mqtt::MqttEndpoint;
use crate::source::SourceContext;
use crate::spool::{Spool, SpoolConfig, SpoolError, spawn_writer};
use crate::uplink::{self, UplinkOptions, UplinkStats};
use crate::{IngestSink, coap, http_push, mqtt_source, sources};

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
        credentials: u
            .username
            .clone()
            .map(|name| (name, u.password.clone().unwrap_or_default())),
        keep_alive: Duration::from_secs(u64::from(u.keep_alive_s)),
        tls: tls_for("uplink broker", u.tls())?,
    })
}

/// Spawns a field source; commands for its devices go to its channel.
fn field_task<E: std::fmt::Display>(
    id: &str,
    run: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    commands: mpsc::Sender<crate::CommandRequest>,
) -> (JoinHandle<()>, Route, Option<SocketAddr>) {
    let sid = id.to_owned();
    let task = tokio::spawn(async move {
        if let Err(e) = run.await {
            tracing::error!(source = %sid, error = %e, "source stopped");
        }
    });
    (task, Route::Channel(commands), None)
}

impl Gateway {
    /// Opens the spool and starts every component.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, RuntimeError> {
        let shutdown = CancellationToken::new();
        let uplink_endpoint = endpoint(&config)?;
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
        let metrics_addr = metrics::serve(
            config.metrics.listen,
            Metrics {
                health: Arc::clone(&health),
                sources: Arc::clone(sink.counters()),
                spool: spool.clone(),
                uplink: Arc::clone(&uplink_stats),
                downlink: Arc::clone(&downlink),
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
        };
        for entry in gw.config.sources.clone() {
            let running = gw.start_source(&entry.config).await?;
            gw.sources.insert(entry.config.id().to_owned(), running);
        }
        gw.update_routes();
        Ok(gw)
    }

    async fn start_source(&self, cfg: &SourceConfig) -> Result<RunningSource, RuntimeError> {
        let token = self.shutdown.child_token();
        let (cmd_tx, commands) = mpsc::channel(16);
        let id = cfg.id().to_owned();
        let ctx = SourceContext {
            gateway: self.config.gateway_id.clone(),
            source_id: id.clone(),
            sink: self.sink.clone(),
            commands,
            shutdown: token.clone(),
        };
        let (task, route, addr) = match cfg {
            SourceConfig::Coap(c) => {
                let socket = coap::bind(c.listen).await.map_err(|e| match e {
                    coap::CoapError::Socket { addr, source } => RuntimeError::Bind {
                        what: format!("CoAP source `{id}`"),
                        addr,
                        source,
                    },
                })?;
                let addr = socket.local_addr().ok();
                let opts = coap::CoapOptions {
                    listen: c.listen,
                    meter_utc_offset: c
                        .meter_utc_offset_minutes
                        .and_then(|m| time::UtcOffset::from_whole_seconds(i32::from(m) * 60).ok()),
                };
                let dl = Arc::clone(&self.downlink);
                let sid = id.clone();
                let task = tokio::spawn(async move {
                    if let Err(e) = coap::run(socket, opts, ctx, dl).await {
                        tracing::error!(source = %sid, error = %e, "CoAP source stopped");
                    }
                });
                (task, Route::CoapQueue, addr)
            }
            SourceConfig::HttpPush(c) => {
                let (listener, addr) =
                    http_push::bind(c.listen)
                        .await
                        .map_err(|source| RuntimeError::Bind {
                            what: format!("HTTP push source `{id}`"),
                            addr: c.listen,
                            source,
                        })?;
                let opts = http_push::HttpPushOptions {
                    secret: c.secret.clone(),
                    max_skew_s: c.max_skew_s,
                };
                let sid = id.clone();
                let task = tokio::spawn(async move {
                    if let Err(e) = http_push::run(listener, opts, ctx).await {
                        tracing::error!(source = %sid, error = %e, "HTTP push source stopped");
                    }
                });
                let route = Route::Unavailable(format!(
                    "source `{id}` (HTTP push) has no downlink; send commands through the IoT platform"
                ));
                (task, route, Some(addr))
            }
            SourceConfig::Mqtt(c) => {
                let tls = tls_for(&format!("source `{id}`"), c.tls())?;
                let task = tokio::spawn(mqtt_source::run(c.clone(), tls, ctx));
                let route = Route::Unavailable(format!(
                    "source `{id}` (concentrator MQTT) takes no commands"
                ));
                (task, route, None)
            }
            SourceConfig::ModbusTcp(c) => {
                let mut c = c.clone();
                for d in &mut c.devices {
                    d.map = self.map_path(&d.map);
                }
                let health = self.health_of(&id);
                let run =
                    sources::modbus::run_tcp_with(c, ctx, health, &sources::modbus::resolve_map);
                field_task(&id, run, cmd_tx)
            }
            SourceConfig::ModbusRtu(c) => {
                let mut c = c.clone();
                for d in &mut c.devices {
                    d.map = self.map_path(&d.map);
                }
                let health = self.health_of(&id);
                let run =
                    sources::modbus::run_rtu_with(c, ctx, health, &sources::modbus::resolve_map);
                field_task(&id, run, cmd_tx)
            }
            SourceConfig::MbusSerial(c) => {
                let health = self.health_of(&id);
                field_task(&id, sources::mbus::run_with(c.clone(), ctx, health), cmd_tx)
            }
            SourceConfig::WmbusUdp(c) => {
                // Keys given on [[device]] entries of this source join the source's own.
                let mut c = c.clone();
                for d in &self.config.devices {
                    let d = d.get_ref();
                    if d.source.get_ref() == &id
                        && let Some(key) = &d.key
                    {
                        c.keys
                            .entry(d.id.as_str().to_owned())
                            .or_insert_with(|| key.get_ref().clone());
                    }
                }
                let (task, _, addr) = field_task(&id, sources::wmbus::run(c, ctx), cmd_tx);
                let route =
                    Route::Unavailable(format!("source `{id}` (wM-Bus receiver) is receive-only"));
                (task, route, addr)
            }
            SourceConfig::HydrantMqtt(c) => {
                let tls = tls_for(&format!("source `{id}`"), c.tls())?;
                field_task(&id, sources::hydrant::run(c.clone(), tls, ctx), cmd_tx)
            }
        };
        tracing::info!(source = %cfg.id(), kind = cfg.kind(), ?addr, "source started");
        Ok(RunningSource {
            config: cfg.clone(),
            token,
            task,
            route,
            addr,
        })
    }

    /// A fresh device-health registry for a polling source, shown by the metrics endpoint.
    fn health_of(&self, id: &str) -> sources::Health {
        let h = sources::Health::default();
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned(), h.clone());
        h
    }

    /// A register map named under `[register_maps]` becomes its file path; built-in names
    /// and paths pass through.
    fn map_path(&self, map: &str) -> String {
        self.config
            .register_maps
            .get(map)
            .map_or_else(|| map.to_owned(), |p| p.display().to_string())
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
    pub async fn reload(&mut self, new: GatewayConfig) -> Result<(), RuntimeError> {
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
