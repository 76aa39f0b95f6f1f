//! Modbus TCP and RTU poller.
//!
//! Devices are grouped by bus (one TCP endpoint, or the serial line); each bus is one task
//! that sends one request at a time, polls each device on its own schedule, retries a
//! timed-out request with exponential backoff, reconnects with jittered backoff (so a site
//! full of devices coming back does not reconnect in lockstep), and keeps per-device health.
//! Register blocks are decoded by the device's [`DeviceDecoder`]; commands (`modbus_write`)
//! are executed between polls on the same bus.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use decoders::modbus::{self as modbus_decoder, RegisterFunction, RegisterMap};
use decoders::{DecodedFrame, MeterInfo, Protocol, Record};
use edge_config::modbus::{
    ModbusRtuSourceConfig, ModbusTcpSourceConfig, ModbusTiming, ModbusValve, Parity,
};
use model::{CommandAction, SourceKind};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client as _, Context, Reader as _, Writer as _};
use tokio_modbus::prelude::SlaveContext as _;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_util::sync::CancellationToken;

use super::{Backoff, ErrorCode, Received, Source, SourceContext, SourceEnv, SourceError};
use crate::normalise;
use crate::{CommandOutcome, CommandRequest};

/// Which table a block is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Function 01.
    Coils,
    /// Function 02.
    DiscreteInputs,
    /// Function 03.
    Holding,
    /// Function 04.
    Input,
}

/// One read request of a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Table.
    pub table: Table,
    /// First address.
    pub start: u16,
    /// Registers (or bits).
    pub count: u16,
}

/// What a block read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockData {
    /// Registers (03/04).
    Words(Vec<u16>),
    /// Bits (01/02).
    Bits(Vec<bool>),
}

impl BlockData {
    /// Bytes of the response as on the wire (big-endian words, one byte per bit), hashed into
    /// the readings' provenance.
    fn raw(&self) -> Vec<u8> {
        match self {
            Self::Words(w) => w.iter().flat_map(|w| w.to_be_bytes()).collect(),
            Self::Bits(b) => b.iter().map(|b| u8::from(*b)).collect(),
        }
    }
}

/// Turns a device's register blocks into records; built from a register map.
pub trait DeviceDecoder: Send + Sync + std::fmt::Debug {
    /// The reads one poll makes.
    fn plan(&self) -> Vec<Block>;
    /// Decodes one block. The error names the value and address.
    fn decode(
        &self,
        block: Block,
        data: &BlockData,
    ) -> Result<Vec<Record>, modbus_decoder::ModbusError>;
}

/// A device ready to poll.
#[derive(Debug, Clone)]
pub struct PolledDevice {
    /// Name (meter id `modbus:<name>`).
    pub name: String,
    /// Unit id.
    pub unit_id: u8,
    /// Poll interval.
    pub poll_interval: Duration,
    /// Reads and decoding.
    pub decoder: Arc<dyn DeviceDecoder>,
    /// Valve register, if the device has one.
    pub valve: Option<ModbusValve>,
}

pub use super::{DeviceHealth, Health};

/// How a bus is reached.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Modbus TCP endpoint `host:port`.
    Tcp(String),
    /// Serial line.
    Rtu {
        /// Device path.
        port: String,
        /// Baud rate.
        baud_rate: u32,
        /// Parity.
        parity: Parity,
        /// Data bits.
        data_bits: u8,
        /// Stop bits.
        stop_bits: u8,
    },
}

impl Transport {
    /// `host:port` of a TCP bus, the device path of a serial one.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::Tcp(address) => address,
            Self::Rtu { port, .. } => port,
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<Context, String> {
        match self {
            Self::Tcp(address) => {
                let addr: SocketAddr = tokio::net::lookup_host(address)
                    .await
                    .map_err(|e| format!("resolve {address}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("resolve {address}: no address"))?;
                let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("connect {address}: timed out"))?
                    .map_err(|e| format!("connect {address}: {e}"))?;
                // Small requests must not wait for Nagle.
                stream.set_nodelay(true).ok();
                Ok(tokio_modbus::client::tcp::attach(stream))
            }
            Self::Rtu {
                port,
                baud_rate,
                parity,
                data_bits,
                stop_bits,
            } => {
                let builder = tokio_serial::new(port, *baud_rate)
                    .parity(match parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    })
                    .data_bits(if *data_bits == 7 {
                        tokio_serial::DataBits::Seven
                    } else {
                        tokio_serial::DataBits::Eight
                    })
                    .stop_bits(if *stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    });
                let stream = tokio_serial::SerialStream::open(&builder)
                    .map_err(|e| format!("open {port}: {e}"))?;
                Ok(tokio_modbus::client::rtu::attach(stream))
            }
        }
    }
}

/// Polls and decodes a device with a register map (`decoders::modbus`).
#[derive(Debug, Clone)]
pub struct MapDecoder {
    map: RegisterMap,
    plan: Vec<Block>,
}

impl MapDecoder {
    /// Plans reads of at most `max_block` registers, merging values `max_gap` apart.
    pub fn new(map: RegisterMap, max_block: u16, max_gap: u16) -> Self {
        let plan = map
            .read_plan(max_block, max_gap)
            .into_iter()
            .map(|b| Block {
                table: match b.function {
                    RegisterFunction::Coil => Table::Coils,
                    RegisterFunction::DiscreteInput => Table::DiscreteInputs,
                    RegisterFunction::Holding => Table::Holding,
                    RegisterFunction::Input => Table::Input,
                },
                start: b.start,
                count: b.count,
            })
            .collect();
        Self { map, plan }
    }
}

impl DeviceDecoder for MapDecoder {
    fn plan(&self) -> Vec<Block> {
        self.plan.clone()
    }

    fn decode(
        &self,
        block: Block,
        data: &BlockData,
    ) -> Result<Vec<Record>, modbus_decoder::ModbusError> {
        let function = match block.table {
            Table::Coils => RegisterFunction::Coil,
            Table::DiscreteInputs => RegisterFunction::DiscreteInput,
            Table::Holding => RegisterFunction::Holding,
            Table::Input => RegisterFunction::Input,
        };
        match data {
            BlockData::Words(words) => {
                modbus_decoder::decode_function(&self.map, function, block.start, words)
            }
            BlockData::Bits(bits) => {
                modbus_decoder::decode_bits(&self.map, function, block.start, bits)
            }
        }
    }
}

/// Resolves a configured map name: a shipped model (`edge_config::register_map::builtin_names`)
/// or else a path to a map TOML.
pub fn resolve_map(map: &str) -> Result<RegisterMap, String> {
    use edge_config::register_map;
    if register_map::builtin_names().contains(&map) {
        register_map::builtin(map)
    } else {
        register_map::load(map)
    }
    .map_err(|e| e.to_string())
}

fn devices_of(
    config: &[edge_config::modbus::ModbusDeviceConfig],
    timing: &ModbusTiming,
    env: &SourceEnv,
) -> Result<Vec<(Option<String>, PolledDevice)>, SourceError> {
    config
        .iter()
        .map(|d| {
            let map = env
                .register_map(&d.map)
                .map_err(|reason| SourceError::Map {
                    device: d.name.clone(),
                    map: d.map.clone(),
                    reason,
                })?;
            Ok((
                d.address.clone(),
                PolledDevice {
                    name: d.name.clone(),
                    unit_id: d.unit_id,
                    poll_interval: d.poll_interval,
                    decoder: Arc::new(MapDecoder::new(map, timing.max_block, timing.max_gap)),
                    valve: d.valve,
                },
            ))
        })
        .collect()
}

/// A Modbus TCP poller: maps resolved at build; connections are per bus, made (and remade
/// with backoff) while polling, with their state in the device health.
#[derive(Debug)]
pub struct ModbusTcpSource {
    buses: Vec<(Transport, Vec<PolledDevice>)>,
    timing: ModbusTiming,
    health: Health,
}

impl Source for ModbusTcpSource {
    type Config = edge_config::Valid<ModbusTcpSourceConfig>;
    const KIND: SourceKind = SourceKind::ModbusTcp;

    async fn build(config: &Self::Config, env: &SourceEnv) -> Result<Self, SourceError> {
        // Checked by edge-config (`Valid`): nothing to validate here.
        let mut buses: BTreeMap<String, Vec<PolledDevice>> = BTreeMap::new();
        for (address, device) in devices_of(&config.devices, &config.timing, env)? {
            buses
                .entry(address.unwrap_or_default())
                .or_default()
                .push(device);
        }
        Ok(Self {
            buses: buses
                .into_iter()
                .map(|(a, d)| (Transport::Tcp(a), d))
                .collect(),
            timing: config.timing.clone(),
            health: env.health(),
        })
    }

    /// Polls until shutdown; ready once the bus tasks run.
    async fn run(self, ctx: SourceContext) -> Result<(), SourceError> {
        run_buses(self.buses, self.timing, ctx, self.health).await;
        Ok(())
    }
}

/// A Modbus RTU poller on one serial line: maps resolved at build.
#[derive(Debug)]
pub struct ModbusRtuSource {
    bus: (Transport, Vec<PolledDevice>),
    timing: ModbusTiming,
    health: Health,
}

impl Source for ModbusRtuSource {
    type Config = edge_config::Valid<ModbusRtuSourceConfig>;
    const KIND: SourceKind = SourceKind::ModbusRtu;

    async fn build(config: &Self::Config, env: &SourceEnv) -> Result<Self, SourceError> {
        // Checked by edge-config (`Valid`): nothing to validate here.
        let devices = devices_of(&config.devices, &config.timing, env)?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let transport = Transport::Rtu {
            port: config.port.clone(),
            baud_rate: config.baud_rate,
            parity: config.parity,
            data_bits: config.data_bits,
            stop_bits: config.stop_bits,
        };
        Ok(Self {
            bus: (transport, devices),
            timing: config.timing.clone(),
            health: env.health(),
        })
    }

    /// Polls until shutdown; ready once the bus task runs.
    async fn run(self, ctx: SourceContext) -> Result<(), SourceError> {
        run_buses(vec![self.bus], self.timing, ctx, self.health).await;
        Ok(())
    }
}

async fn run_buses(
    buses: Vec<(Transport, Vec<PolledDevice>)>,
    timing: ModbusTiming,
    mut ctx: SourceContext,
    health: Health,
) {
    let mut commands = std::mem::replace(&mut ctx.commands, mpsc::channel(1).1);
    let shutdown = ctx.shutdown.clone();
    let ctx = Arc::new(ctx);
    let mut routes: HashMap<String, mpsc::Sender<CommandRequest>> = HashMap::new();
    let mut tasks = Vec::new();
    for (transport, devices) in buses {
        let (tx, rx) = mpsc::channel(32);
        for d in &devices {
            routes.insert(format!("modbus:{}", d.name), tx.clone());
        }
        let bus = Bus {
            transport,
            devices,
            timing: timing.clone(),
            ctx: Arc::clone(&ctx),
            health: health.clone(),
            shutdown: shutdown.clone(),
            context: None,
            reconnect: Backoff::new(timing.backoff_initial, timing.backoff_max),
            connect_not_before: Instant::now(),
        };
        tasks.push(tokio::spawn(bus.run(rx)));
    }
    ctx.readiness.set_ready();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            req = commands.recv() => {
                let Some(req) = req else {
                    // No router any more: keep polling until shutdown.
                    shutdown.cancelled().await;
                    break;
                };
                match routes.get(req.command.device.as_str()) {
                    Some(tx) => {
                        if let Err(e) = tx.send(req).await {
                            let _gone = e.0.reply.send(CommandOutcome::Failed("modbus bus stopped".into()));
                        }
                    }
                    None => {
                        let reason = format!("device {} is not on this modbus source", req.command.device);
                        let _gone = req.reply.send(CommandOutcome::Failed(reason));
                    }
                }
            }
        }
    }
    for t in tasks {
        if let Err(e) = t.await {
            tracing::error!(source = %ctx.source_id, error = %e, "modbus bus task failed");
        }
    }
}

/// Why one request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RequestError {
    /// The device answered with an exception.
    Exception(ExceptionCode),
    /// No usable answer after every attempt.
    Transport(String),
    /// Shutdown while waiting.
    Shutdown,
}

impl ErrorCode for RequestError {
    fn code(&self) -> &'static str {
        match self {
            Self::Exception(_) => "exception",
            Self::Transport(_) => "transport",
            Self::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exception(code) => write!(f, "device answered exception {code:?}"),
            Self::Transport(e) => f.write_str(e),
            Self::Shutdown => f.write_str("shutting down"),
        }
    }
}

enum Op {
    Read(Block),
    WriteSingle(u16, u16),
}

enum OpResult {
    Data(BlockData),
    Written,
}

struct Bus {
    transport: Transport,
    devices: Vec<PolledDevice>,
    timing: ModbusTiming,
    ctx: Arc<SourceContext>,
    health: Health,
    shutdown: CancellationToken,
    context: Option<Context>,
    reconnect: Backoff,
    connect_not_before: Instant,
}

impl Bus {
    async fn run(mut self, mut commands: mpsc::Receiver<CommandRequest>) {
        let start = Instant::now();
        let mut due: Vec<Instant> = vec![start; self.devices.len()];
        let mut commands_open = true;
        loop {
            let Some((idx, at)) = due.iter().copied().enumerate().min_by_key(|(_, t)| *t) else {
                return;
            };
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                req = commands.recv(), if commands_open => match req {
                    Some(req) => self.command(req).await,
                    None => commands_open = false,
                },
                () = tokio::time::sleep_until(at) => {
                    self.poll(idx).await;
                    if let (Some(slot), Some(dev)) = (due.get_mut(idx), self.devices.get(idx)) {
                        // Keep the schedule's phase; skip ticks missed while the bus was busy.
                        let mut next = at + dev.poll_interval;
                        let now = Instant::now();
                        while next <= now {
                            next += dev.poll_interval;
                        }
                        *slot = next;
                    }
                }
            }
        }
        if let Some(mut ctx) = self.context.take() {
            let _closing = tokio::time::timeout(Duration::from_millis(200), ctx.disconnect()).await;
        }
    }

    async fn poll(&mut self, idx: usize) {
        let Some(device) = self.devices.get(idx).cloned() else {
            return;
        };
        let source_id = self.ctx.source_id.clone();
        let received_at = OffsetDateTime::now_utc();
        let mut records = Vec::new();
        let mut raw = Vec::new();
        let mut failure = None;
        for block in device.decoder.plan() {
            match self.request(device.unit_id, Op::Read(block)).await {
                Ok(OpResult::Data(data)) => {
                    // Every register block is one frame of the intake.
                    self.ctx.count_frames(1);
                    raw.extend(data.raw());
                    match device.decoder.decode(block, &data) {
                        Ok(r) => records.extend(r),
                        Err(e) => {
                            tracing::warn!(source = %source_id, device = %device.name, error = %e, "modbus block not decodable");
                            self.ctx.reject(&e);
                        }
                    }
                }
                Ok(OpResult::Written) => {}
                Err(RequestError::Shutdown) => return,
                Err(e) => {
                    if matches!(e, RequestError::Exception(_)) {
                        self.ctx.reject(&e);
                    }
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(error) = failure {
            tracing::warn!(source = %source_id, device = %device.name, %error, "modbus poll failed");
            self.health.update(&device.name, |h| {
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                h.polls_failed += 1;
                h.last_error = Some(error);
            });
            return;
        }
        self.health.update(&device.name, |h| {
            h.consecutive_failures = 0;
            h.polls_ok += 1;
            h.last_ok = Some(received_at);
        });
        let frame = DecodedFrame {
            protocol: Protocol::Modbus,
            meter: MeterInfo {
                id: device.name.as_str().into(),
                manufacturer: None,
                version: None,
                medium: None,
            },
            records,
        };
        let meter = match normalise::meter_id(&frame) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(device = %device.name, error = %e, "modbus device name is not a meter id");
                return;
            }
        };
        let channel = format!("{} unit {}", self.transport.endpoint(), device.unit_id);
        let fctx = self.ctx.frame_context(&Received {
            raw: &raw,
            channel: Some(&channel),
            received_at,
        });
        let readings = normalise::to_readings(&frame, &meter, None, &fctx);
        // A poll has no acknowledgement: a refused submit is logged, the next poll reads again.
        if let Err(e) = self.ctx.submit(readings).await {
            tracing::warn!(source = %source_id, device = %device.name, error = %e, "spool refused modbus readings");
        }
    }

    async fn command(&mut self, req: CommandRequest) {
        let CommandRequest { command, reply } = req;
        let Some(device) = self
            .devices
            .iter()
            .find(|d| command.device.as_str().strip_prefix("modbus:") == Some(d.name.as_str()))
            .cloned()
        else {
            let _gone = reply.send(CommandOutcome::Failed(format!(
                "device {} is not on this bus",
                command.device
            )));
            return;
        };
        // read-now hook (issue 21): one extra poll of this device through the normal poll path
        // (readings go to the spool as usual); the ack says whether that poll succeeded.
        if command.action == CommandAction::ReadNow {
            let outcome = self.read_now(&device.name).await;
            let _gone = reply.send(outcome);
            return;
        }
        let write = match (&command.action, device.valve) {
            (CommandAction::ModbusWrite { register, value }, _) => Ok((*register, *value)),
            (CommandAction::ValveOpen, Some(v)) => Ok((v.register, v.open)),
            (CommandAction::ValveClose, Some(v)) => Ok((v.register, v.close)),
            (CommandAction::ValveOpen | CommandAction::ValveClose, None) => Err(format!(
                "device {} has no valve register configured",
                command.device
            )),
            (other, _) => Err(format!("the modbus source cannot execute {other:?}")),
        };
        let outcome = match write {
            Ok((register, value)) => {
                match self
                    .request(device.unit_id, Op::WriteSingle(register, value))
                    .await
                {
                    // The device echoes a write only after applying it.
                    Ok(_) => CommandOutcome::Acknowledged,
                    Err(RequestError::Exception(code)) => CommandOutcome::Failed(format!(
                        "device refused the write to register {register}: {code:?}"
                    )),
                    Err(e) => {
                        CommandOutcome::Failed(format!("write to register {register} failed: {e}"))
                    }
                }
            }
            Err(reason) => CommandOutcome::Failed(reason),
        };
        let _gone = reply.send(outcome);
    }

    /// Polls one device now (a read-now command): acknowledged when the poll succeeded.
    async fn read_now(&mut self, name: &str) -> CommandOutcome {
        let Some(idx) = self.devices.iter().position(|d| d.name == name) else {
            return CommandOutcome::Failed(format!("device {name} is not on this bus"));
        };
        let before = self.health.get(name).map_or(0, |h| h.polls_ok);
        self.poll(idx).await;
        match self.health.get(name) {
            Some(h) if h.polls_ok > before => CommandOutcome::Acknowledged,
            h => CommandOutcome::Failed(format!(
                "read-now poll failed: {}",
                h.and_then(|h| h.last_error)
                    .unwrap_or_else(|| "no answer".into())
            )),
        }
    }

    /// One request with retries: transport errors and timeouts drop the connection (a late
    /// answer would desynchronise the next request) and are retried after a backoff.
    async fn request(&mut self, unit: u8, op: Op) -> Result<OpResult, RequestError> {
        let mut retry = Backoff::new(self.timing.backoff_initial, self.timing.backoff_max);
        let mut last = String::new();
        for attempt in 0..=self.timing.retries {
            if attempt > 0 {
                let delay = retry.next_delay();
                tokio::select! {
                    () = self.shutdown.cancelled() => return Err(RequestError::Shutdown),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            let ctx = match self.context.as_mut() {
                Some(ctx) => ctx,
                None => {
                    tokio::select! {
                        () = self.shutdown.cancelled() => return Err(RequestError::Shutdown),
                        () = tokio::time::sleep_until(self.connect_not_before) => {}
                    }
                    match self.transport.connect(self.timing.timeout).await {
                        Ok(ctx) => {
                            self.reconnect.reset();
                            self.context.insert(ctx)
                        }
                        Err(e) => {
                            self.connect_not_before = Instant::now() + self.reconnect.next_delay();
                            last = e;
                            continue;
                        }
                    }
                }
            };
            ctx.set_slave(Slave(unit));
            let call = async {
                match op {
                    Op::Read(b) => match b.table {
                        Table::Holding => ctx
                            .read_holding_registers(b.start, b.count)
                            .await
                            .map(|r| r.map(|w| OpResult::Data(BlockData::Words(w)))),
                        Table::Input => ctx
                            .read_input_registers(b.start, b.count)
                            .await
                            .map(|r| r.map(|w| OpResult::Data(BlockData::Words(w)))),
                        Table::Coils => ctx
                            .read_coils(b.start, b.count)
                            .await
                            .map(|r| r.map(|w| OpResult::Data(BlockData::Bits(w)))),
                        Table::DiscreteInputs => ctx
                            .read_discrete_inputs(b.start, b.count)
                            .await
                            .map(|r| r.map(|w| OpResult::Data(BlockData::Bits(w)))),
                    },
                    Op::WriteSingle(register, value) => ctx
                        .write_single_register(register, value)
                        .await
                        .map(|r| r.map(|()| OpResult::Written)),
                }
            };
            match tokio::time::timeout(self.timing.timeout, call).await {
                Ok(Ok(Ok(result))) => return Ok(result),
                Ok(Ok(Err(code))) => return Err(RequestError::Exception(code)),
                Ok(Err(e)) => last = format!("unit {unit}: {e}"),
                Err(_) => last = format!("unit {unit}: no answer within {:?}", self.timing.timeout),
            }
            self.context = None;
        }
        Err(RequestError::Transport(last))
    }
}
