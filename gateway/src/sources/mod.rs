//! Every protocol source behind one boundary: the [`Source`] trait.
//!
//! A source is built from its validated configuration ([`Source::build`]: bind sockets, open
//! serial ports, resolve register maps, build TLS; everything that can fail at start fails
//! there, with a [`SourceError`]) and then runs until its context's shutdown
//! ([`Source::run`]). Every received frame goes through the intake step of its
//! [`SourceContext`] (count, decode, normalise, submit), and the source acknowledges its device
//! only when the intake returned `Ok`. A source sets its [`Readiness`] when it can receive.
//!
//! Adding a protocol: a decoder in `decoders`, a configuration type in `edge-config`, a module
//! here implementing [`Source`] (the wM-Bus receiver, [`wmbus`], is the smallest example), and
//! one line in `Gateway::start_source`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

pub mod coap;
pub mod concentrator;
pub mod context;
pub mod http_push;
pub mod hydrant;
pub mod mbus;
pub mod modbus;
pub mod wmbus;

pub use context::{
    CommandOutcome, CommandRequest, Decoded, ErrorCode, IntakeError, Readiness, Received,
    SourceContext, SourceState,
};

/// A protocol source: built from its configuration, then run until shutdown.
pub trait Source: Sized + Send + 'static {
    /// The configuration of this kind of source.
    type Config: Send + Sync;
    /// The provenance kind of its readings.
    const KIND: model::SourceKind;

    /// Acquires everything that can fail at start (sockets, serial ports, register maps, TLS,
    /// key files), so a bad configuration stops the start or reload instead of a task.
    fn build(
        config: &Self::Config,
        env: &SourceEnv,
    ) -> impl std::future::Future<Output = Result<Self, SourceError>> + Send;

    /// How commands for this source's devices are executed.
    fn commands(&self) -> Commands {
        Commands::Channel
    }

    /// The bound address of a listening source (CoAP, HTTP push), e.g. when configured with
    /// port 0.
    fn local_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// The bound UDP socket of a receiver the runtime restarts with new device keys: it is
    /// handed to the successor ([`SourceEnv::with_udp_socket`]) instead of closed and bound
    /// again, so the port is never free for another process to take and a restart cannot
    /// leave the gateway without the receiver.
    fn udp_socket(&self) -> Option<Arc<tokio::net::UdpSocket>> {
        None
    }

    /// Receives (and executes commands) until `ctx.shutdown`. A source marks
    /// `ctx.readiness` ready once it receives, and connecting while it reconnects.
    fn run(
        self,
        ctx: SourceContext,
    ) -> impl std::future::Future<Output = Result<(), SourceError>> + Send;
}

/// How commands reach a source's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commands {
    /// The source executes them itself from `SourceContext::commands`.
    Channel,
    /// Queued until the meter's next uplink (NB-IoT CoAP).
    CoapQueue,
    /// The source takes none (reason).
    Unavailable(String),
}

/// Why a source could not be built, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The configuration is unusable (what is wrong).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket could not be bound or used.
    #[error("{what} {addr}: {source}")]
    Socket {
        /// Which socket.
        what: &'static str,
        /// Its address as configured.
        addr: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The serial port could not be opened.
    #[error("serial port {port}: {reason}")]
    Serial {
        /// Port path.
        port: String,
        /// Why.
        reason: String,
    },
    /// A device's register map could not be loaded.
    #[error("device {device:?}: register map {map:?}: {reason}")]
    Map {
        /// Device name.
        device: String,
        /// Map name or path.
        map: String,
        /// Why.
        reason: String,
    },
    /// A key file could not be loaded (the message names no key).
    #[error("{0}")]
    Keys(String),
    /// The TLS material of an MQTT connection is unusable.
    #[error(transparent)]
    Tls(#[from] crate::mqtt::TlsSetupError),
}

/// A register map resolver: a configured map name or path → the map.
pub type MapResolver =
    dyn Fn(&str) -> Result<decoders::modbus::RegisterMap, String> + Send + Sync + 'static;

/// What the runtime offers a source while it is built: shared registries and the gateway-wide
/// configuration a source needs (named register maps, `[[device]]` keys, the state folder).
#[derive(Clone)]
pub struct SourceEnv {
    source_id: String,
    state_dir: Option<PathBuf>,
    register_maps: BTreeMap<String, PathBuf>,
    devices: Vec<edge_config::DeviceConfig>,
    health: crate::metrics::HealthRegistry,
    listeners: crate::listener::ListenerRegistry,
    downlink: Option<Arc<crate::downlink::Downlink>>,
    resolver: Arc<MapResolver>,
    udp_socket: Option<Arc<tokio::net::UdpSocket>>,
}

impl std::fmt::Debug for SourceEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceEnv")
            .field("source_id", &self.source_id)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl SourceEnv {
    /// An environment for source `source_id` outside a gateway (tests, tools): no state folder,
    /// no named maps, no devices, no downlink, fresh registries, maps resolved by
    /// [`modbus::resolve_map`].
    pub fn new(source_id: impl Into<String>) -> Self {
        Self {
            source_id: source_id.into(),
            state_dir: None,
            register_maps: BTreeMap::new(),
            devices: Vec::new(),
            health: crate::metrics::HealthRegistry::default(),
            listeners: crate::listener::ListenerRegistry::default(),
            downlink: None,
            resolver: Arc::new(modbus::resolve_map),
            udp_socket: None,
        }
    }

    /// With a folder for state kept across restarts (CoAP meter counters).
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        self.state_dir = Some(dir);
        self
    }

    /// With the `[register_maps]` names.
    pub fn with_register_maps(mut self, maps: BTreeMap<String, PathBuf>) -> Self {
        self.register_maps = maps;
        self
    }

    /// With the `[[device]]` entries in force.
    pub fn with_devices(mut self, devices: Vec<edge_config::DeviceConfig>) -> Self {
        self.devices = devices;
        self
    }

    /// With the registries `/metrics` renders.
    pub fn with_registries(
        mut self,
        health: crate::metrics::HealthRegistry,
        listeners: crate::listener::ListenerRegistry,
    ) -> Self {
        self.health = health;
        self.listeners = listeners;
        self
    }

    /// With the gateway's downlink (CoAP replies carry queued commands).
    pub fn with_downlink(mut self, downlink: Arc<crate::downlink::Downlink>) -> Self {
        self.downlink = Some(downlink);
        self
    }

    /// With another register map resolver (tests).
    pub fn with_map_resolver(mut self, resolver: Arc<MapResolver>) -> Self {
        self.resolver = resolver;
        self
    }

    /// With the bound socket of the predecessor (see [`Source::udp_socket`]): a UDP receiver
    /// takes it instead of binding its configured address.
    pub fn with_udp_socket(mut self, socket: Arc<tokio::net::UdpSocket>) -> Self {
        self.udp_socket = Some(socket);
        self
    }

    /// The predecessor's bound UDP socket, if handed over.
    pub fn udp_socket(&self) -> Option<&Arc<tokio::net::UdpSocket>> {
        self.udp_socket.as_ref()
    }

    /// The source's id.
    pub fn source_id(&self) -> &str {
        &self.source_id
    }

    /// Folder for state kept across restarts, if any.
    pub fn state_dir(&self) -> Option<&PathBuf> {
        self.state_dir.as_ref()
    }

    /// The `[[device]]` entries in force.
    pub fn devices(&self) -> impl Iterator<Item = &edge_config::DeviceConfig> {
        self.devices.iter()
    }

    /// The gateway's downlink, if any.
    pub fn downlink(&self) -> Option<&Arc<crate::downlink::Downlink>> {
        self.downlink.as_ref()
    }

    /// Resolves a register map: a name under `[register_maps]` is its file; built-in names
    /// and paths go to the resolver as they are.
    pub fn register_map(&self, map: &str) -> Result<decoders::modbus::RegisterMap, String> {
        match self.register_maps.get(map) {
            Some(path) => (self.resolver)(&path.display().to_string()),
            None => (self.resolver)(map),
        }
    }

    /// This source's device-health registry (polling sources), shown by `/metrics`; the same
    /// handle on every call.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(self.source_id.clone())
            .or_default()
            .clone()
    }

    /// This source's listener counters (CoAP, push), shown by `/metrics`.
    pub fn listener_stats(&self) -> Arc<crate::listener::ListenerStats> {
        self.listeners.register(&self.source_id)
    }
}

/// Builds a source and runs it to the end with `ctx` (tests and tools; the gateway spawns
/// the run as a task).
pub async fn build_and_run<S: Source>(
    config: &S::Config,
    env: &SourceEnv,
    ctx: SourceContext,
) -> Result<(), SourceError> {
    S::build(config, env).await?.run(ctx).await
}

/// Health of one device, as the metrics endpoint shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Last poll that returned every block.
    pub last_ok: Option<OffsetDateTime>,
    /// Failed polls since the last good one.
    pub consecutive_failures: u32,
    /// Why the last failed poll failed.
    pub last_error: Option<String>,
    /// Good polls so far.
    pub polls_ok: u64,
    /// Failed polls so far.
    pub polls_failed: u64,
}

/// Shared per-device health of a source; clone it before `run` to watch it.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, DeviceHealth>>>);

impl Health {
    /// Health of `device`, if it was polled at least once.
    pub fn get(&self, device: &str) -> Option<DeviceHealth> {
        self.lock().get(device).cloned()
    }

    /// Appends `wm_gateway_device_consecutive_failures` and `wm_gateway_device_last_ok_seconds`
    /// gauges to `out`.
    pub fn render_prometheus(&self, source: &str, out: &mut String) {
        let map = self.lock();
        out.push_str("# TYPE wm_gateway_device_consecutive_failures gauge\n");
        for (d, h) in map.iter() {
            out.push_str(&format!(
                "wm_gateway_device_consecutive_failures{{source=\"{source}\",device=\"{d}\"}} {}\n",
                h.consecutive_failures
            ));
        }
        out.push_str("# TYPE wm_gateway_device_last_ok_seconds gauge\n");
        for (d, h) in map.iter() {
            if let Some(t) = h.last_ok {
                out.push_str(&format!(
                    "wm_gateway_device_last_ok_seconds{{source=\"{source}\",device=\"{d}\"}} {}\n",
                    t.unix_timestamp()
                ));
            }
        }
    }

    pub(crate) fn update(&self, device: &str, f: impl FnOnce(&mut DeviceHealth)) {
        f(self.lock().entry(device.to_owned()).or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceHealth>> {
        // Health stays meaningful even if a holder panicked.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Exponential backoff with jitter, so many devices failing together do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    /// A backoff starting at `initial` and doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Truncation is fine: only the low bits seed the jitter.
        let seed = (nanos as u64) | 1;
        Self {
            initial,
            max: max.max(initial),
            current: initial,
            seed,
        }
    }

    /// The next delay: the current step scaled by a random factor in [0.5, 1.0], then doubled.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: good enough for jitter, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let factor = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let delay = self.current.mul_f64(factor);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The undelayed step the next call starts from.
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d2 = b.next_delay();
        assert!(d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200));
        b.next_delay();
        assert_eq!(b.current(), Duration::from_millis(350));
        b.reset();
        assert_eq!(b.current(), Duration::from_millis(100));
    }
}
