//! Modbus TCP slaves: one DMA inlet flow meter (`generic-emf` map) and one pressure
//! transmitter (`pressure-transmitter` map) per DMA, behind one TCP listener with a unit id
//! per device, their registers encoded from the engine with `decoders::modbus::encode_image`.
//!
//! Inlet meters measure the DMA's system input volume, so a Modbus poll of every inlet minus
//! the billed customer registers gives the DMA's non-revenue water (see the ground truth).

use std::collections::HashMap;
use std::future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use decoders::modbus::{RegisterFunction, RegisterImage, RegisterMap, RegisterSpec, encode_image};
use rust_decimal::Decimal;
use tokio::net::TcpListener;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};

/// Register map model of DMA inlet flow meters.
pub const FLOW_METER_MODEL: &str = "generic-emf";
/// Register map model of pressure transmitters.
pub const PRESSURE_MODEL: &str = "pressure-transmitter";

/// One simulated Modbus instrument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModbusDevice {
    /// Unit id on the shared listener.
    pub unit: u8,
    /// Device name for the gateway config (meter id `modbus:<name>`).
    pub name: String,
    /// Register map model (`edge-config/maps/<model>.toml`).
    pub model: String,
    /// DMA measured.
    pub dma: u32,
}

/// Returns the devices of `dmas` DMAs: unit 2d+1 the inlet flow meter, 2d+2 the pressure
/// transmitter of DMA d (at most 123 DMAs fit the 247 unit ids).
pub fn devices(dmas: u32) -> Vec<ModbusDevice> {
    (0..dmas.min(123))
        .flat_map(|d| {
            let unit = (2 * d + 1) as u8;
            [
                ModbusDevice {
                    unit,
                    name: format!("dma-{d}-inlet"),
                    model: FLOW_METER_MODEL.into(),
                    dma: d,
                },
                ModbusDevice {
                    unit: unit + 1,
                    name: format!("dma-{d}-pressure"),
                    model: PRESSURE_MODEL.into(),
                    dma: d,
                },
            ]
        })
        .collect()
}

/// What the instruments of one DMA measure at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DmaMeasurement {
    /// Cumulative inflow, millilitres.
    pub inflow_ml: i64,
    /// Current inflow, litres per hour.
    pub flow_lph: f64,
}

impl DmaMeasurement {
    /// Returns the network pressure at the DMA inlet, MPa: 0.40 at no flow, falling with
    /// head loss as the flow grows (never below 0.10).
    pub fn pressure_mpa(&self) -> f64 {
        (0.40 - self.flow_lph * 2.0e-5).max(0.10)
    }
}

/// Returns the value a device of `model` shows for `spec`, or `None` (register stays 0).
pub fn value_for(model: &str, m: &DmaMeasurement, spec: &RegisterSpec) -> Option<Decimal> {
    let dec = |v: f64| Decimal::from_f64_retain(v).map(|d| d.round_dp(4));
    // Totalisers count litres (scale 0.001 m³), wrapping like a 32-bit counter.
    let litres = (m.inflow_ml / 1000).rem_euclid(1 << 31);
    match (model, spec.name.as_str()) {
        (FLOW_METER_MODEL, "flow") => dec(m.flow_lph / 1000.0),
        // DN200 main: velocity = Q / area (0.0314 m²).
        (FLOW_METER_MODEL, "velocity") => dec(m.flow_lph / 1000.0 / 3600.0 / 0.0314),
        (FLOW_METER_MODEL, "flow_percent") => dec(m.flow_lph / 1000.0 / 400.0 * 100.0),
        (FLOW_METER_MODEL, "forward_total" | "net_total") => Some(Decimal::new(litres, 3)),
        (FLOW_METER_MODEL, "reverse_total" | "alarm") => Some(Decimal::ZERO),
        (FLOW_METER_MODEL, "pressure") => dec(m.pressure_mpa()),
        (PRESSURE_MODEL, "unit_code") => Some(Decimal::ONE),
        (PRESSURE_MODEL, "decimal_places") => Some(Decimal::from(3)),
        (PRESSURE_MODEL, "pressure") => Some(Decimal::new((m.pressure_mpa() * 1000.0) as i64, 3)),
        (PRESSURE_MODEL, "pressure_float") => dec(m.pressure_mpa() * 10.0),
        // Hydrostatic level equivalent: 1 MPa ≈ 102 m of water.
        (PRESSURE_MODEL, "level") => dec(m.pressure_mpa() * 102.0),
        (PRESSURE_MODEL, "temperature") => Some(Decimal::new(128, 1)),
        _ => None,
    }
}

/// Register images by unit id, updated by the fleet after every step.
pub type Images = Arc<Mutex<HashMap<u8, RegisterImage>>>;

/// The maps of the shipped models, by model name.
///
/// # Errors
/// Fails when a shipped map does not load (a build problem).
pub fn maps() -> anyhow::Result<HashMap<String, RegisterMap>> {
    [FLOW_METER_MODEL, PRESSURE_MODEL]
        .into_iter()
        .map(|m| {
            edge_config::register_map::builtin(m)
                .map(|map| (m.to_owned(), map))
                .with_context(|| format!("loading register map {m}"))
        })
        .collect()
}

/// Re-encodes every device's registers from the DMA measurements.
pub fn update(
    images: &Images,
    devices: &[ModbusDevice],
    maps: &HashMap<String, RegisterMap>,
    measure: impl Fn(u32) -> Option<DmaMeasurement>,
) {
    let mut out = HashMap::new();
    for d in devices {
        let (Some(map), Some(m)) = (maps.get(&d.model), measure(d.dma)) else {
            continue;
        };
        match encode_image(map, &|spec: &RegisterSpec| value_for(&d.model, &m, spec)) {
            Ok(image) => {
                out.insert(d.unit, image);
            }
            Err(e) => tracing::warn!(device = %d.name, error = %e, "cannot encode registers"),
        }
    }
    images
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(out);
}

#[derive(Debug, Clone)]
struct Slaves {
    images: Images,
    requests: Arc<AtomicU64>,
}

impl tokio_modbus::server::Service for Slaves {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let images = self.images.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(image) = images.get(&req.slave) else {
            return future::ready(Err(ExceptionCode::GatewayTargetDevice));
        };
        let words = |f: RegisterFunction, a: u16, n: u16| {
            image
                .read_words(f, a, n)
                .ok_or(ExceptionCode::IllegalDataAddress)
        };
        let bits = |f: RegisterFunction, a: u16, n: u16| {
            image
                .read_bits(f, a, n)
                .ok_or(ExceptionCode::IllegalDataAddress)
        };
        let result = match req.request {
            Request::ReadHoldingRegisters(a, n) => {
                words(RegisterFunction::Holding, a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(a, n) => {
                words(RegisterFunction::Input, a, n).map(Response::ReadInputRegisters)
            }
            Request::ReadCoils(a, n) => bits(RegisterFunction::Coil, a, n).map(Response::ReadCoils),
            Request::ReadDiscreteInputs(a, n) => {
                bits(RegisterFunction::DiscreteInput, a, n).map(Response::ReadDiscreteInputs)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        future::ready(result)
    }
}

/// Binds `addr` and serves the images until the returned task is aborted.
///
/// # Errors
/// Fails when the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    images: Images,
    requests: Arc<AtomicU64>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind Modbus TCP listener {addr}"))?;
    let local = listener.local_addr().context("listener address")?;
    let slaves = Slaves { images, requests };
    let task = tokio::spawn(async move {
        let server = Server::new(listener);
        let new_service = |_peer| Ok(Some(slaves.clone()));
        let on_connected =
            |stream, peer| async move { accept_tcp_connection(stream, peer, new_service) };
        if let Err(e) = server
            .serve(&on_connected, |e| {
                tracing::debug!(error = %e, "modbus connection ended");
            })
            .await
        {
            tracing::warn!(error = %e, "modbus listener stopped");
        }
    });
    Ok((local, task))
}
