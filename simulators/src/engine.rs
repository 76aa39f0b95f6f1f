//! The simulation engine: a population of meters stepped on a simulated clock.
//!
//! The engine is pure computation (no I/O, no wall clock), so it runs as fast as the CPU
//! allows: transports in [`crate::fleet`] pace it against real time, `simulate backfill` does
//! not. Registers are integer millilitres so they never drift and never go backwards unless a
//! fault says so (reverse flow, rollover, replacement).

use std::collections::HashMap;

use model::{MeterAddress, MeterId};
use rust_decimal::Decimal;
use time::OffsetDateTime;

use crate::profile::{HourFactors, Profile, unit};
use crate::scenario::{Fault, Scenario};
use crate::truth::{DmaBalance, GroundTruth, TruthEvent, TruthKind};

/// Three-letter manufacturer code of simulated M-Bus meters.
pub const MBUS_MANUFACTURER: &str = "SIM";
/// CJ/T 188 meter type of simulated meters (0x10: cold water).
pub const CJT188_COLD_WATER: u8 = 0x10;
/// EN 13757-3 medium byte for water.
pub const MBUS_MEDIUM_WATER: u8 = 0x07;
/// Battery level below which a low-battery truth event is recorded (DOMAIN.md: ~10 %).
pub const LOW_BATTERY_PCT: f64 = 10.0;

/// One simulated meter's fixed characteristics.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterSpec {
    /// Protocol address.
    pub address: MeterAddress,
    /// Canonical id (derived from the address).
    pub id: MeterId,
    /// Demand profile.
    pub profile: Profile,
    /// Mean daily use, litres.
    pub daily_litres: f64,
    /// DMA index.
    pub dma: u32,
}

/// Returns the CJ/T 188 address (A0..A6 wire order, BCD) of simulated meter `index`:
/// printed A6..A0 it reads `7833` followed by the index as 10 digits.
pub fn cjt188_address(index: u32) -> [u8; 7] {
    let n = 78_330_000_000_000u64 + u64::from(index);
    let mut out = [0u8; 7];
    let mut rest = n;
    for byte in &mut out {
        let lo = (rest % 10) as u8;
        rest /= 10;
        let hi = (rest % 10) as u8;
        rest /= 10;
        *byte = (hi << 4) | lo;
    }
    out
}

/// First M-Bus identification number of the DMA inlet bulk meters (`+ dma`); the fleet's
/// meters ([`mbus_id`]) reach it only past 89 million meters.
pub const DMA_INLET_MBUS_ID: u32 = 99_000_000;

/// Index given to [`crate::frames::wmbus_key`] for the inlet meter of `dma` (from the top of
/// the range, clear of the fleet's indices).
pub fn dma_inlet_key_index(dma: u32) -> u32 {
    u32::MAX - dma
}

/// The wM-Bus bulk meter at the inlet of `dma` (`simulate demo --wmbus-dma-inlets`): it
/// measures the DMA's system input volume ([`Engine::dma_inflow`]).
pub fn dma_inlet_meter(dma: u32) -> MeterSpec {
    let address = MeterAddress::Mbus {
        id: DMA_INLET_MBUS_ID + dma % 1_000_000,
        manufacturer: MBUS_MANUFACTURER.into(),
        version: 1,
        medium: MBUS_MEDIUM_WATER,
    };
    MeterSpec {
        id: MeterId::from(&address),
        address,
        profile: Profile::Commercial,
        daily_litres: 0.0,
        dma,
    }
}

/// Returns the 8-digit M-Bus identification number of simulated meter `index`.
pub fn mbus_id(index: u32) -> u32 {
    10_000_000 + index % 90_000_000
}

/// The simulated population, built deterministically from a [`Scenario`].
#[derive(Debug, Clone)]
pub struct Population {
    /// Meters by index.
    pub meters: Vec<MeterSpec>,
    /// Number of DMAs.
    pub dmas: u32,
}

impl Population {
    /// Builds the population of a scenario.
    pub fn new(scenario: &Scenario) -> Self {
        let fleet = &scenario.fleet;
        let total = fleet.meters();
        let first_mbus = total.saturating_sub(fleet.mbus_meters);
        let meters = (0..total)
            .map(|i| {
                let profile = if i < fleet.households {
                    Profile::Household
                } else {
                    Profile::Commercial
                };
                let (lo, hi) = profile.daily_litres_range();
                let daily_litres = lo + (hi - lo) * unit(scenario.seed, u64::from(i), u64::MAX);
                let address = if i >= first_mbus {
                    MeterAddress::Mbus {
                        id: mbus_id(i),
                        manufacturer: MBUS_MANUFACTURER.into(),
                        version: 1,
                        medium: MBUS_MEDIUM_WATER,
                    }
                } else {
                    MeterAddress::Cjt188 {
                        meter_type: CJT188_COLD_WATER,
                        address: cjt188_address(i),
                    }
                };
                MeterSpec {
                    id: MeterId::from(&address),
                    address,
                    profile,
                    daily_litres,
                    dma: i % fleet.dmas.max(1),
                }
            })
            .collect();
        Self {
            meters,
            dmas: fleet.dmas.max(1),
        }
    }
}

/// Status bits a meter reports with a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Valve closed (valve-control meters).
    pub valve_closed: bool,
    /// Battery low.
    pub battery_low: bool,
    /// Magnetic tamper detected (latched).
    pub tamper: bool,
    /// Reverse flow seen during the step.
    pub reverse_flow: bool,
}

/// How the transport must deliver a reading (fault injection on the link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Send once.
    Normal,
    /// Do not send (communication loss); counted, never transmitted.
    Lost,
    /// Send twice.
    Duplicate,
    /// Send with one byte flipped so the checksum fails.
    Corrupt,
}

/// One reading produced by a meter at the end of a step, in delivery order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Emission {
    /// Meter index into [`Population::meters`].
    pub meter: u32,
    /// True measurement time, unix seconds (UTC).
    pub ts: i64,
    /// Timestamp on the meter's clock (skewed), unix seconds.
    pub meter_ts: i64,
    /// Register, millilitres (wrapped at capacity).
    pub register_ml: u64,
    /// Reverse register, millilitres.
    pub reverse_ml: u64,
    /// Register at the last monthly settlement (local midnight on the 1st), millilitres.
    pub settlement_ml: u64,
    /// Flow during the step, litres per hour (true flow through the meter).
    pub flow_lph: f64,
    /// Battery level, percent.
    pub battery_pct: u8,
    /// Status bits.
    pub status: Status,
    /// How to deliver it.
    pub delivery: Delivery,
}

impl Emission {
    /// An all-zero emission of `meter` (for identity-only uses such as address matching).
    pub fn idle(meter: u32) -> Self {
        Self {
            meter,
            ts: 0,
            meter_ts: 0,
            register_ml: 0,
            reverse_ml: 0,
            settlement_ml: 0,
            flow_lph: 0.0,
            battery_pct: 100,
            status: Status::default(),
            delivery: Delivery::Normal,
        }
    }

    /// Returns the register as m³ with litre resolution (what the meter displays; truncated).
    pub fn register_m3(&self) -> Decimal {
        ml_to_m3(self.register_ml)
    }

    /// Returns the measurement time on the meter's clock.
    pub fn meter_time(&self) -> OffsetDateTime {
        unix(self.meter_ts)
    }
}

/// Converts millilitres to m³ with 3 decimals (litres), truncating.
pub fn ml_to_m3(ml: u64) -> Decimal {
    Decimal::new(i64::try_from(ml / 1000).unwrap_or(i64::MAX), 3)
}

/// Converts unix seconds to a UTC date-time (saturating to the epoch on overflow).
pub fn unix(ts: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ts).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[derive(Debug, Clone, Default)]
struct MeterState {
    register_ml: u64,
    settlement_ml: u64,
    reverse_ml: u64,
    battery_start: f64,
    valve_closed: bool,
    tamper: bool,
}

#[derive(Debug, Clone, Default)]
struct DmaAcc {
    meters: u32,
    last_step_ml: i64,
    consumption_ml: i64,
    losses_ml: i64,
    registered_ml: i64,
}

/// Counts of what the engine produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Steps run.
    pub steps: u64,
    /// Readings produced (including lost ones).
    pub readings: u64,
    /// Readings not delivered (communication loss).
    pub lost: u64,
    /// Readings delivered twice.
    pub duplicated: u64,
    /// Readings delivered corrupted.
    pub corrupted: u64,
    /// Readings delivered after their successor.
    pub reordered: u64,
}

/// The simulation engine.
#[derive(Debug)]
pub struct Engine {
    scenario: Scenario,
    population: Population,
    state: Vec<MeterState>,
    faults_by_meter: Vec<Vec<u32>>,
    mains: Vec<u32>,
    fired: Vec<bool>,
    fault_frames: Vec<u64>,
    held: HashMap<u32, Emission>,
    now: i64,
    end: i64,
    step_s: i64,
    capacity_ml: u64,
    dmas: Vec<DmaAcc>,
    truth: Vec<TruthEvent>,
    stats: EngineStats,
}

/// Sub-step length in seconds: demand is computed hour by hour (or finer).
fn sub_step_seconds(interval_minutes: u32) -> i64 {
    i64::from(interval_minutes.min(60)) * 60
}

impl Engine {
    /// Creates an engine at the scenario's start. The scenario should be validated.
    pub fn new(scenario: Scenario) -> Self {
        let population = Population::new(&scenario);
        let n = population.meters.len();
        let capacity_ml = scenario
            .fleet
            .register_capacity_m3
            .saturating_mul(1_000_000);
        let mut state: Vec<MeterState> = (0..n)
            .map(|i| {
                let idx = i as u64;
                // Installed registers spread over 0..2000 m³; batteries 60–100 %.
                let register_ml =
                    (unit(scenario.seed ^ 0x5eed, idx, 1) * 2_000_000_000.0) as u64 % capacity_ml;
                MeterState {
                    register_ml,
                    settlement_ml: register_ml,
                    reverse_ml: 0,
                    battery_start: 60.0 + 40.0 * unit(scenario.seed ^ 0xba77, idx, 2),
                    valve_closed: false,
                    tamper: false,
                }
            })
            .collect();
        let mut faults_by_meter = vec![Vec::new(); n];
        let mut mains = Vec::new();
        let mut truth = Vec::new();
        let start = scenario.start;
        let end = scenario.end();
        for (fi, fault) in scenario.faults.iter().enumerate() {
            let fi32 = u32::try_from(fi).unwrap_or(u32::MAX);
            match fault.meter() {
                Some(m) => {
                    if let Some(list) = faults_by_meter.get_mut(m as usize) {
                        list.push(fi32);
                    }
                }
                None => mains.push(fi32),
            }
            let meter_id = |m: &u32| {
                population
                    .meters
                    .get(*m as usize)
                    .map(|s| s.id.as_str().to_owned())
                    .unwrap_or_default()
            };
            let clip = |t: OffsetDateTime| if t > end { None } else { Some(t) };
            let event = match fault {
                Fault::Leak {
                    meter,
                    from,
                    until,
                    rate_lph,
                } => Some(
                    TruthEvent::new(
                        TruthKind::Leak,
                        meter_id(meter),
                        *from,
                        until.and_then(clip),
                    )
                    .with("rate_lph", *rate_lph),
                ),
                Fault::Burst {
                    meter,
                    from,
                    until,
                    rate_lph,
                } => Some(
                    TruthEvent::new(TruthKind::Burst, meter_id(meter), *from, clip(*until))
                        .with("rate_lph", *rate_lph),
                ),
                Fault::MainsBurst {
                    dma,
                    from,
                    until,
                    rate_lph,
                } => Some(
                    TruthEvent::new(
                        TruthKind::MainsBurst,
                        format!("dma:{dma}"),
                        *from,
                        clip(*until),
                    )
                    .with("rate_lph", *rate_lph),
                ),
                Fault::ReverseFlow {
                    meter,
                    from,
                    until,
                    rate_lph,
                } => Some(
                    TruthEvent::new(TruthKind::ReverseFlow, meter_id(meter), *from, clip(*until))
                        .with("rate_lph", *rate_lph),
                ),
                Fault::MagneticTamper {
                    meter,
                    from,
                    registered_share,
                } => Some(
                    TruthEvent::new(TruthKind::Tamper, meter_id(meter), *from, None)
                        .with("registered_share", *registered_share),
                ),
                Fault::MeterStopped { meter, from } => Some(TruthEvent::new(
                    TruthKind::StoppedMeter,
                    meter_id(meter),
                    *from,
                    None,
                )),
                Fault::CommLoss { meter, from, until } => Some(TruthEvent::new(
                    TruthKind::CommunicationLoss,
                    meter_id(meter),
                    *from,
                    clip(*until),
                )),
                Fault::ClockSkew {
                    meter,
                    from,
                    until,
                    skew_s,
                } => Some(
                    TruthEvent::new(
                        TruthKind::ClockSkew,
                        meter_id(meter),
                        *from,
                        until.and_then(clip),
                    )
                    .with("skew_s", *skew_s),
                ),
                Fault::RegisterRollover {
                    meter, headroom_m3, ..
                } => {
                    if let Some(s) = state.get_mut(*meter as usize) {
                        let headroom = (*headroom_m3 * 1_000_000.0) as u64;
                        s.register_ml = capacity_ml.saturating_sub(headroom);
                    }
                    None
                }
                // Traps carry no truth: nothing should be reported for them.
                Fault::ExtraUse { .. } | Fault::Absence { .. } | Fault::DroppedRead { .. } => None,
                // Frame-level faults and dynamic events are recorded while running.
                Fault::BatteryDecline { .. }
                | Fault::DuplicateFrames { .. }
                | Fault::OutOfOrder { .. }
                | Fault::CorruptedFrames { .. }
                | Fault::MeterReplacement { .. } => None,
            };
            truth.extend(event);
        }
        let mut dmas = vec![DmaAcc::default(); population.dmas as usize];
        for m in &population.meters {
            if let Some(d) = dmas.get_mut(m.dma as usize) {
                d.meters += 1;
            }
        }
        let n_faults = scenario.faults.len();
        Self {
            now: start.unix_timestamp(),
            end: end.unix_timestamp(),
            step_s: i64::from(scenario.interval_minutes) * 60,
            capacity_ml,
            population,
            state,
            faults_by_meter,
            mains,
            fired: vec![false; n_faults],
            fault_frames: vec![0; n_faults],
            held: HashMap::new(),
            dmas,
            truth,
            stats: EngineStats::default(),
            scenario,
        }
    }

    /// Returns the population.
    pub fn population(&self) -> &Population {
        &self.population
    }

    /// Returns the scenario.
    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }

    /// Returns the simulated time at the start of the next step.
    pub fn now(&self) -> OffsetDateTime {
        unix(self.now)
    }

    /// Returns true when the run has reached the scenario's end.
    pub fn finished(&self) -> bool {
        self.now >= self.end
    }

    /// Returns what has been produced so far.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Returns the current register of a meter, millilitres.
    pub fn register_ml(&self, meter: u32) -> Option<u64> {
        self.state.get(meter as usize).map(|s| s.register_ml)
    }

    /// Returns the meter's state now as a no-flow reading (what a polled meter answers
    /// before the first simulation step).
    pub fn snapshot(&self, meter: u32) -> Option<Emission> {
        let st = self.state.get(meter as usize)?;
        Some(Emission {
            meter,
            ts: self.now,
            meter_ts: self.now,
            register_ml: st.register_ml,
            reverse_ml: st.reverse_ml,
            settlement_ml: st.settlement_ml,
            flow_lph: 0.0,
            battery_pct: st.battery_start.clamp(0.0, 100.0) as u8,
            status: Status {
                valve_closed: st.valve_closed,
                battery_low: false,
                tamper: st.tamper,
                reverse_flow: false,
            },
            delivery: Delivery::Normal,
        })
    }

    /// Returns a DMA's cumulative inflow since the start (millilitres) and its mean inflow
    /// during the last step (litres per hour): what the DMA inlet flow meter measures.
    pub fn dma_inflow(&self, dma: u32) -> Option<(i64, f64)> {
        let d = self.dmas.get(dma as usize)?;
        let hours = self.step_s as f64 / 3600.0;
        Some((
            d.consumption_ml + d.losses_ml,
            d.last_step_ml as f64 / 1000.0 / hours,
        ))
    }

    /// Opens or closes a meter's valve (a closed valve stops all flow through the meter).
    pub fn set_valve(&mut self, meter: u32, open: bool) {
        if let Some(s) = self.state.get_mut(meter as usize) {
            s.valve_closed = !open;
        }
    }

    /// Returns true when the meter's valve is closed.
    pub fn valve_closed(&self, meter: u32) -> bool {
        self.state
            .get(meter as usize)
            .is_some_and(|s| s.valve_closed)
    }

    /// Runs one step for every meter and hands each reading to `sink` in delivery order.
    /// Does nothing once the run is finished.
    pub fn step(&mut self, mut sink: impl FnMut(&Emission)) {
        if self.finished() {
            return;
        }
        let step_start = self.now;
        let step_end = step_start + self.step_s;
        let sub_s = sub_step_seconds(self.scenario.interval_minutes);
        let sub_hours = sub_s as f64 / 3600.0;
        let offset = i64::from(self.scenario.utc_offset_hours) * 3600;
        // Per sub-step factors for both profiles: computed once for the whole population.
        let subs: Vec<(i64, HourFactors, HourFactors)> = (0..(self.step_s / sub_s).max(1))
            .map(|k| {
                let t = step_start + k * sub_s;
                let local = unix(t + offset);
                let weekend = matches!(
                    local.weekday(),
                    time::Weekday::Saturday | time::Weekday::Sunday
                );
                let (hour, doy) = (local.hour(), local.ordinal());
                (
                    t.div_euclid(sub_s),
                    HourFactors::new(Profile::Household, hour, weekend, doy),
                    HourFactors::new(Profile::Commercial, hour, weekend, doy),
                )
            })
            .collect();
        let seed = self.scenario.seed;
        let seed2 = seed ^ 0xa5a5_a5a5_5a5a_5a5a;
        let t_start = unix(step_start);
        let local_start = unix(step_start + offset);
        let settle = local_start.day() == 1 && local_start.hour() == 0 && local_start.minute() == 0;

        let dma_before: Vec<i64> = self
            .dmas
            .iter()
            .map(|d| d.consumption_ml + d.losses_ml)
            .collect();
        for idx in 0..self.population.meters.len() {
            let Some(spec) = self.population.meters.get(idx) else {
                continue;
            };
            let Some(st) = self.state.get_mut(idx) else {
                continue;
            };
            let midx = idx as u64;
            if settle {
                st.settlement_ml = st.register_ml;
            }
            let mut litres = 0.0;
            for (counter, hh, cc) in &subs {
                let f = match spec.profile {
                    Profile::Household => hh,
                    Profile::Commercial => cc,
                };
                let c = *counter as u64;
                litres += f.litres(spec.daily_litres, unit(seed, midx, c), unit(seed2, midx, c));
            }
            let step_hours = sub_hours * subs.len() as f64;
            let mut reverse_litres = 0.0;
            let mut registered_share = 1.0;
            let mut stopped = false;
            let mut delivery = Delivery::Normal;
            let mut skew = 0i64;
            let mut reorder = false;
            let mut battery = st.battery_start;
            let mut battery_fault = None;
            let mut replacement = None;
            let mut absent = false;
            let faults = self.faults_by_meter.get(idx).map_or(&[][..], |v| &v[..]);
            for &fi in faults {
                let Some(fault) = self.scenario.faults.get(fi as usize) else {
                    continue;
                };
                let active = |from: &OffsetDateTime, until: Option<&OffsetDateTime>| {
                    *from <= t_start && until.is_none_or(|u| t_start < *u)
                };
                match fault {
                    Fault::Leak {
                        from,
                        until,
                        rate_lph,
                        ..
                    } if active(from, until.as_ref()) => litres += rate_lph * step_hours,
                    Fault::Burst {
                        from,
                        until,
                        rate_lph,
                        ..
                    } if active(from, Some(until)) => litres += rate_lph * step_hours,
                    Fault::ReverseFlow {
                        from,
                        until,
                        rate_lph,
                        ..
                    } if active(from, Some(until)) => reverse_litres += rate_lph * step_hours,
                    Fault::MagneticTamper {
                        from,
                        registered_share: share,
                        ..
                    } if active(from, None) => {
                        registered_share = *share;
                        st.tamper = true;
                    }
                    Fault::MeterStopped { from, .. } if active(from, None) => stopped = true,
                    Fault::BatteryDecline {
                        from,
                        days_to_empty,
                        ..
                    } if active(from, None) => {
                        let days = (step_end - from.unix_timestamp()) as f64 / 86_400.0;
                        battery = (st.battery_start * (1.0 - days / days_to_empty)).max(0.0);
                        battery_fault = Some(fi);
                    }
                    Fault::CommLoss { from, until, .. } if active(from, Some(until)) => {
                        delivery = Delivery::Lost;
                    }
                    Fault::ExtraUse {
                        from,
                        until,
                        rate_lph,
                        ..
                    } if active(from, Some(until)) => litres += rate_lph * step_hours,
                    Fault::Absence { from, until, .. } if active(from, Some(until)) => {
                        absent = true;
                    }
                    Fault::DroppedRead { at, .. } if *at == t_start => delivery = Delivery::Lost,
                    Fault::ClockSkew {
                        from,
                        until,
                        skew_s,
                        ..
                    } if active(from, until.as_ref()) => skew = *skew_s,
                    Fault::DuplicateFrames { from, until, .. }
                        if active(from, Some(until)) && delivery == Delivery::Normal =>
                    {
                        delivery = Delivery::Duplicate;
                        if let Some(c) = self.fault_frames.get_mut(fi as usize) {
                            *c += 1;
                        }
                    }
                    Fault::CorruptedFrames { from, until, .. }
                        if active(from, Some(until)) && delivery == Delivery::Normal =>
                    {
                        delivery = Delivery::Corrupt;
                        if let Some(c) = self.fault_frames.get_mut(fi as usize) {
                            *c += 1;
                        }
                    }
                    Fault::OutOfOrder { from, until, .. } if active(from, Some(until)) => {
                        reorder = true;
                    }
                    Fault::MeterReplacement {
                        at,
                        new_register_m3,
                        ..
                    } if active(at, None)
                        && !self.fired.get(fi as usize).copied().unwrap_or(true) =>
                    {
                        replacement = Some((fi, *new_register_m3));
                    }
                    _ => {}
                }
            }
            if st.valve_closed {
                litres = 0.0;
                reverse_litres = 0.0;
            }
            if absent {
                litres = 0.0;
            }
            let true_ml = (litres * 1000.0).round() as u64;
            let reverse_ml = (reverse_litres * 1000.0).round() as u64;
            let registered_ml = if stopped {
                0
            } else {
                (true_ml as f64 * registered_share).round() as u64
            };
            if let Some((fi, new_register_m3)) = replacement {
                let old = st.register_ml;
                st.register_ml = ((new_register_m3 * 1_000_000.0) as u64) % self.capacity_ml;
                st.reverse_ml = 0;
                if let Some(f) = self.fired.get_mut(fi as usize) {
                    *f = true;
                }
                self.truth.push(
                    TruthEvent::new(TruthKind::MeterReplacement, spec.id.as_str(), t_start, None)
                        .with("old_register_m3", ml_to_m3(old).to_string())
                        .with("new_register_m3", ml_to_m3(st.register_ml).to_string()),
                );
            }
            let before = st.register_ml;
            let sum = before + registered_ml;
            if sum >= self.capacity_ml {
                st.register_ml = sum % self.capacity_ml;
                self.truth.push(
                    TruthEvent::new(TruthKind::Rollover, spec.id.as_str(), unix(step_end), None)
                        .with("before_m3", ml_to_m3(before).to_string())
                        .with("after_m3", ml_to_m3(st.register_ml).to_string()),
                );
            } else {
                st.register_ml = sum;
            }
            // Reverse flow runs the (net) register backwards and counts on the reverse register.
            st.register_ml = st.register_ml.saturating_sub(reverse_ml);
            st.reverse_ml += reverse_ml;

            if let Some(fi) = battery_fault
                && battery < LOW_BATTERY_PCT
                && !self.fired.get(fi as usize).copied().unwrap_or(true)
            {
                if let Some(f) = self.fired.get_mut(fi as usize) {
                    *f = true;
                }
                self.truth.push(
                    TruthEvent::new(
                        TruthKind::LowBattery,
                        spec.id.as_str(),
                        unix(step_end),
                        None,
                    )
                    .with("battery_pct", battery.floor()),
                );
            }
            if let Some(d) = self.dmas.get_mut(spec.dma as usize) {
                let net = i64::try_from(true_ml).unwrap_or(i64::MAX)
                    - i64::try_from(reverse_ml).unwrap_or(i64::MAX);
                d.consumption_ml += net;
                d.registered_ml += i64::try_from(registered_ml).unwrap_or(i64::MAX)
                    - i64::try_from(reverse_ml).unwrap_or(i64::MAX);
            }

            let emission = Emission {
                meter: idx as u32,
                ts: step_end,
                meter_ts: step_end + skew,
                register_ml: st.register_ml,
                reverse_ml: st.reverse_ml,
                settlement_ml: st.settlement_ml,
                flow_lph: (litres - reverse_litres) / step_hours,
                battery_pct: battery.clamp(0.0, 100.0) as u8,
                status: Status {
                    valve_closed: st.valve_closed,
                    battery_low: battery < LOW_BATTERY_PCT,
                    tamper: st.tamper,
                    reverse_flow: reverse_ml > 0,
                },
                delivery,
            };
            self.stats.readings += 1;
            match delivery {
                Delivery::Lost => self.stats.lost += 1,
                Delivery::Duplicate => self.stats.duplicated += 1,
                Delivery::Corrupt => self.stats.corrupted += 1,
                Delivery::Normal => {}
            }
            let id = idx as u32;
            if reorder && delivery != Delivery::Lost {
                match self.held.remove(&id) {
                    // Deliver the newer reading first, then the one held back.
                    Some(older) => {
                        self.stats.reordered += 1;
                        sink(&emission);
                        sink(&older);
                    }
                    None => {
                        self.held.insert(id, emission);
                    }
                }
            } else {
                // Checking emptiness first keeps the common path free of hashing.
                if !self.held.is_empty()
                    && let Some(older) = self.held.remove(&id)
                {
                    sink(&older);
                }
                sink(&emission);
            }
        }
        // Network losses per DMA: background leakage plus active mains bursts.
        let step_hours = self.step_s as f64 / 3600.0;
        let background = (self.scenario.fleet.background_loss_lph * step_hours * 1000.0).round();
        for d in &mut self.dmas {
            d.losses_ml += background as i64;
        }
        for &fi in &self.mains {
            if let Some(Fault::MainsBurst {
                dma,
                from,
                until,
                rate_lph,
            }) = self.scenario.faults.get(fi as usize)
                && *from <= t_start
                && t_start < *until
                && let Some(d) = self.dmas.get_mut(*dma as usize)
            {
                d.losses_ml += (rate_lph * step_hours * 1000.0).round() as i64;
            }
        }
        for (d, b) in self.dmas.iter_mut().zip(&dma_before) {
            d.last_step_ml = d.consumption_ml + d.losses_ml - b;
        }
        self.stats.steps += 1;
        self.now = step_end;
    }

    /// Runs to the end of the scenario, handing every reading to `sink`, then flushes any
    /// reading still held back for reordering.
    pub fn run(&mut self, mut sink: impl FnMut(&Emission)) {
        while !self.finished() {
            self.step(&mut sink);
        }
        let mut held: Vec<Emission> = self.held.drain().map(|(_, e)| e).collect();
        held.sort_by_key(|e| e.meter);
        for e in &held {
            sink(e);
        }
    }

    /// Returns the ground truth recorded so far (complete once the run is finished).
    pub fn ground_truth(&self) -> GroundTruth {
        let mut events = self.truth.clone();
        for (fi, fault) in self.scenario.faults.iter().enumerate() {
            let frames = self.fault_frames.get(fi).copied().unwrap_or(0);
            let meter = fault
                .meter()
                .and_then(|m| self.population.meters.get(m as usize))
                .map(|s| s.id.as_str().to_owned())
                .unwrap_or_default();
            let end = unix(self.end);
            let clip = |t: OffsetDateTime| if t > end { None } else { Some(t) };
            match fault {
                Fault::DuplicateFrames { from, until, .. } => events.push(
                    TruthEvent::new(TruthKind::DuplicateFrames, meter, *from, clip(*until))
                        .with("frames", frames),
                ),
                Fault::CorruptedFrames { from, until, .. } => events.push(
                    TruthEvent::new(TruthKind::CorruptedFrames, meter, *from, clip(*until))
                        .with("frames", frames),
                ),
                Fault::OutOfOrder { from, until, .. } => events.push(TruthEvent::new(
                    TruthKind::OutOfOrder,
                    meter,
                    *from,
                    clip(*until),
                )),
                _ => {}
            }
        }
        events.sort_by(|a, b| (a.from, &a.meter, a.kind).cmp(&(b.from, &b.meter, b.kind)));
        let dmas = self
            .dmas
            .iter()
            .enumerate()
            .map(|(i, d)| DmaBalance {
                dma: i as u32,
                meters: d.meters,
                inflow_l: d.consumption_ml / 1000 + d.losses_ml / 1000,
                consumption_l: d.consumption_ml / 1000,
                losses_l: d.losses_ml / 1000,
                registered_l: d.registered_ml / 1000,
            })
            .collect();
        GroundTruth {
            scenario: self.scenario.name.clone(),
            seed: self.scenario.seed,
            start: self.scenario.start,
            end: unix(self.end),
            events,
            dmas,
        }
    }
}

/// Runs a scenario to the end without any transport and returns its ground truth.
pub fn ground_truth(scenario: &Scenario) -> GroundTruth {
    let mut engine = Engine::new(scenario.clone());
    engine.run(|_| {});
    engine.ground_truth()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn cjt188_address_prints_as_index() {
        let addr = MeterAddress::Cjt188 {
            meter_type: CJT188_COLD_WATER,
            address: cjt188_address(42),
        };
        assert_eq!(MeterId::from(&addr).as_str(), "cjt188:78330000000042");
        assert_eq!(cjt188_address(42)[0], 0x42);
    }

    #[test]
    fn registers_never_go_backwards_without_faults() {
        let s = Scenario::plain(50, 3, 9, datetime!(2026-03-01 0:00 UTC));
        let mut engine = Engine::new(s);
        let mut last = vec![0u64; 50];
        let mut count = 0;
        let mut first = true;
        while !engine.finished() {
            engine.step(|e| {
                let slot = &mut last[e.meter as usize];
                if !first {
                    assert!(e.register_ml >= *slot, "meter {} went backwards", e.meter);
                }
                *slot = e.register_ml;
                count += 1;
            });
            first = false;
        }
        assert_eq!(count, 50 * 24 * 3);
    }

    #[test]
    fn same_seed_same_readings() {
        let s = Scenario::plain(20, 2, 5, datetime!(2026-03-01 0:00 UTC));
        let collect = |s: Scenario| {
            let mut v = Vec::new();
            Engine::new(s).run(|e| v.push((e.meter, e.ts, e.register_ml)));
            v
        };
        assert_eq!(collect(s.clone()), collect(s.clone()));
        let mut other = s.clone();
        other.seed = 6;
        assert_ne!(collect(s), collect(other));
    }
}
