//! VEE: validation, estimation and editing of readings before anything is billable.
//!
//! This module is pure: no I/O, no clock (the caller passes `now`). [`Vee`] holds one compact
//! [`MeterState`] per meter (last validated register value and time, reporting interval,
//! average daily usage, a 24-hour usage profile); [`Vee::validate`] checks a batch against it and
//! returns what to store ([`VeeOutput`]) plus the new states, which the caller applies with
//! [`Vee::commit`] only after the database transaction succeeded — so a failed write never
//! leaves the in-memory state ahead of the database.
//!
//! Rules (each sets a quality flag or a reject reason; thresholds in [`VeeConfig`], see
//! `docs/vee.md`): duplicate, out of order, clock (future / far from receive time), unit,
//! inactive meter, register decrease (meter replacement, rollover, small reverse flow, else
//! reject), physically impossible usage (Q3 × overload factor × elapsed time), spike (k × average
//! daily usage), long zero consumption, and gaps (filled with linear or profile estimates).

use std::collections::HashMap;

use model::{
    ClockSource, EstimationMethod, MeterId, Provenance, Quality, QualityFlag, Quantity, Reading,
    RejectReason, SourceKind, Unit,
};
use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use time::{Duration, OffsetDateTime};

/// Sentinel for "no validated read yet".
const NO_TS: i64 = i64::MIN;
/// Register resolution of estimates: 1 L.
const ESTIMATE_SCALE: u32 = 3;

/// Thresholds of the validation and estimation rules (per deployment; per meter class later).
#[derive(Debug, Clone, PartialEq)]
pub struct VeeConfig {
    /// A timestamp later than `now` by more than this is rejected (implausible).
    pub future_tolerance: Duration,
    /// A current read whose meter clock differs from the receive time by more than this is
    /// flagged `clock_skew` (both times are kept).
    pub clock_skew_tolerance: Duration,
    /// A timestamp older than the receive time by more than this is rejected (implausible).
    pub max_age: Duration,
    /// A decrease is a rollover only when the previous value is within this share of the
    /// register capacity from the top (0.1 = top 10 %).
    pub rollover_band: Decimal,
    /// Decreases up to this many m³ are reverse flow (flagged, accepted); larger ones without a
    /// replacement or rollover are rejected.
    pub reverse_flow_max_m3: Decimal,
    /// Usage above `spike_factor` × average daily usage × elapsed days is flagged `spike`.
    pub spike_factor: f64,
    /// ... but only when the usage is also above this many m³ (small meters stay quiet).
    pub spike_min_m3: f64,
    /// Physical maximum flow = Q3 × this factor (Q4 overload = 1.25 × Q3, ISO 4064).
    pub max_flow_factor: f64,
    /// Allowance added to the physical maximum for register resolution and clock jitter (m³).
    pub max_flow_allowance_m3: f64,
    /// Zero consumption for at least this long on a meter that used to consume is flagged.
    pub zero_span: Duration,
    /// "Used to consume": average daily usage at least this many m³/day.
    pub zero_min_adu_m3: f64,
    /// A span longer than this multiple of the meter's usual interval is a gap.
    pub gap_factor: f64,
    /// Gaps of at most this many missing reads are filled by linear interpolation; longer ones
    /// by the meter's hourly profile.
    pub linear_max_slots: u32,
    /// At most this many estimates are created for one gap (longer gaps: the first ones).
    pub max_estimates_per_gap: u32,
    /// Weight of one day of new data in the average daily usage (exponential average).
    pub adu_alpha: f64,
}

impl Default for VeeConfig {
    fn default() -> Self {
        Self {
            future_tolerance: Duration::minutes(5),
            clock_skew_tolerance: Duration::minutes(15),
            max_age: Duration::days(400),
            rollover_band: Decimal::new(1, 1),
            reverse_flow_max_m3: Decimal::new(1, 1),
            spike_factor: 10.0,
            spike_min_m3: 1.0,
            max_flow_factor: 1.25,
            max_flow_allowance_m3: 0.01,
            zero_span: Duration::days(7),
            zero_min_adu_m3: 0.05,
            gap_factor: 2.5,
            linear_max_slots: 3,
            max_estimates_per_gap: 96,
            adu_alpha: 0.1,
        }
    }
}

/// Meter states by meter id. Hashed with foldhash (randomly seeded per map) instead of
/// SipHash: hashing meter ids was a visible share of the ingest path's CPU.
pub type StateMap = HashMap<Box<str>, MeterState, foldhash::fast::RandomState>;

/// Per-meter state kept in memory (104 bytes; see [`Vee::state_bytes`]).
#[derive(Debug, Clone, Copy)]
pub struct MeterState {
    /// Unix seconds of the last validated volume read ([`i64::MIN`] when none).
    pub last_ts: i64,
    /// Its register value, m³.
    pub last_value: Decimal,
    /// Receive time of that read minus its timestamp, seconds (clamped to `i32`).
    pub received_lag_s: i32,
    /// Seconds, up to `last_ts`, for which the register has not moved (saturating).
    pub zero_s: u32,
    /// Average daily usage, m³/day (exponential average; analytics only, never billed).
    pub adu: f32,
    /// Usual reporting interval, seconds (0 = unknown).
    pub interval_s: u32,
    /// Register capacity (rollover point), whole m³.
    pub capacity_m3: u32,
    /// Nominal flow Q3 in L/h.
    pub q3_lph: u32,
    /// Usage by hour of day (UTC), exponential average in L/h.
    pub hour_profile: [u16; 24],
    /// Validated reads seen (saturating).
    pub reads: u16,
    /// Where the meter's detector state is in [`crate::detect::Detectors`] ([`NO_SLOT`] when
    /// none). It lives in what were padding bytes (the struct stays 104 bytes), so the
    /// detectors need no map of their own. Not VEE state: not persisted, not compared, and kept
    /// by [`Vee::insert_state`] and [`Vee::commit`] when they replace a state.
    pub detect_slot: u32,
}

/// [`MeterState::detect_slot`] of a meter without detector state.
pub const NO_SLOT: u32 = u32::MAX;

/// Equality of the VEE state: [`MeterState::detect_slot`] (an in-memory index) is not compared.
impl PartialEq for MeterState {
    fn eq(&self, other: &Self) -> bool {
        self.last_ts == other.last_ts
            && self.last_value == other.last_value
            && self.received_lag_s == other.received_lag_s
            && self.zero_s == other.zero_s
            && self.adu == other.adu
            && self.interval_s == other.interval_s
            && self.capacity_m3 == other.capacity_m3
            && self.q3_lph == other.q3_lph
            && self.hour_profile == other.hour_profile
            && self.reads == other.reads
    }
}

impl MeterState {
    /// Returns an empty state for a meter with the given register capacity and Q3.
    pub fn new(capacity_m3: u32, q3_lph: u32) -> Self {
        Self {
            last_ts: NO_TS,
            last_value: Decimal::ZERO,
            received_lag_s: 0,
            zero_s: 0,
            adu: 0.0,
            interval_s: 0,
            capacity_m3,
            q3_lph,
            hour_profile: [0; 24],
            reads: 0,
            detect_slot: NO_SLOT,
        }
    }

    /// Returns true when a validated read has been seen.
    pub fn has_read(&self) -> bool {
        self.last_ts != NO_TS
    }
}

/// Defaults for meters missing from the `meters` table (its column defaults: 5-digit register,
/// DN15 Q3 = 2.5 m³/h).
pub const DEFAULT_CAPACITY_M3: u32 = 100_000;
/// Default Q3 in L/h.
pub const DEFAULT_Q3_LPH: u32 = 2_500;

/// A recorded meter replacement (table `meter_replacements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    /// When the meter was replaced.
    pub replaced_at: OffsetDateTime,
    /// Final register value of the old meter.
    pub old_final_value: Decimal,
    /// Initial register value of the new meter.
    pub new_initial_value: Decimal,
}

/// Rarely present per-meter facts, kept out of [`MeterState`] to keep it small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterExtras {
    /// Installation time: earlier reads are refused.
    pub installed_at: Option<OffsetDateTime>,
    /// Retirement time: later reads are refused.
    pub retired_at: Option<OffsetDateTime>,
    /// Recorded replacements, any order.
    pub replacements: Vec<Replacement>,
}

/// Consumption of one billable volume read since the previous one, for the rollups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The meter.
    pub meter: MeterId,
    /// Time of the read that closes the span.
    pub ts: OffsetDateTime,
    /// Its register value.
    pub value: Decimal,
    /// Consumption since the previous billable read (0 for a meter's first read; negative for
    /// reverse flow).
    pub delta: Decimal,
    /// True for estimates.
    pub estimated: bool,
}

/// A duplicate key with a different value: refused, kept in `ingest_rejects`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The refused read.
    pub reading: Reading,
    /// The value already validated at that key.
    pub stored_value: Decimal,
}

/// What [`Vee::validate`] decided for a batch.
#[derive(Debug, Default)]
pub struct VeeOutput {
    /// Readings to store, with quality and flags set (including rejected ones, kept for audit,
    /// and estimates).
    pub readings: Vec<Reading>,
    /// Consumption per billable in-order volume read and estimate, for the rollups.
    pub usage: Vec<Usage>,
    /// Reads older than the meter's last validated read (stored as `actual` + `out_of_order`);
    /// the store supersedes estimates around them and recomputes their rollups.
    pub out_of_order: Vec<(MeterId, OffsetDateTime)>,
    /// Exact duplicates dropped.
    pub duplicates: u64,
    /// Duplicates with a different value.
    pub conflicts: Vec<Conflict>,
    /// Readings rejected (stored with quality `rejected`).
    pub rejected: u64,
    /// Estimates created.
    pub estimated: u64,
    /// New states of the meters touched, to apply with [`Vee::commit`] after storage.
    pub states: StateMap,
}

/// The VEE engine: configuration plus the state of every meter this worker owns.
#[derive(Debug, Default)]
pub struct Vee {
    config: VeeConfig,
    states: StateMap,
    extras: HashMap<Box<str>, MeterExtras, foldhash::fast::RandomState>,
    defaults: (u32, u32),
}

fn unix(ts: OffsetDateTime) -> i64 {
    ts.unix_timestamp()
}

fn from_unix(s: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn to_f64(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

/// Returns true for the register VEE tracks: the current total forward volume.
pub fn is_tracked(r: &Reading) -> bool {
    r.quantity == Quantity::Volume && r.storage == 0 && r.tariff == 0 && r.subunit == 0
}

impl Vee {
    /// Creates an engine with no meter state.
    pub fn new(config: VeeConfig) -> Self {
        Self {
            config,
            states: StateMap::default(),
            extras: HashMap::default(),
            defaults: (DEFAULT_CAPACITY_M3, DEFAULT_Q3_LPH),
        }
    }

    /// Returns the configuration.
    pub fn config(&self) -> &VeeConfig {
        &self.config
    }

    /// Sets (or replaces) the state of a meter, e.g. when rebuilding from `meter_state`. The
    /// meter's detector slot is kept.
    pub fn insert_state(&mut self, meter: &str, mut state: MeterState) {
        match self.states.get_mut(meter) {
            Some(s) => {
                state.detect_slot = s.detect_slot;
                *s = state;
            }
            None => {
                state.detect_slot = NO_SLOT;
                self.states.insert(meter.into(), state);
            }
        }
    }

    /// The meter's detector slot ([`MeterState::detect_slot`]), if it has one.
    pub fn detect_slot(&self, meter: &str) -> Option<u32> {
        self.states
            .get(meter)
            .map(|s| s.detect_slot)
            .filter(|s| *s != NO_SLOT)
    }

    /// Records the meter's detector slot; a meter without VEE state gets the state VEE would
    /// assume for it anyway (no read, the default capacity and Q3), so nothing VEE decides
    /// changes.
    pub fn set_detect_slot(&mut self, meter: &str, slot: u32) {
        match self.states.get_mut(meter) {
            Some(s) => s.detect_slot = slot,
            None => {
                let mut st = MeterState::new(self.defaults.0, self.defaults.1);
                st.detect_slot = slot;
                self.states.insert(meter.into(), st);
            }
        }
    }

    /// Calls `f` with every meter that has a detector slot, and the slot.
    pub fn each_detect_slot(&self, f: &mut dyn FnMut(&str, u32)) {
        for (meter, s) in &self.states {
            if s.detect_slot != NO_SLOT {
                f(meter, s.detect_slot);
            }
        }
    }

    /// Returns the state of a meter.
    pub fn state(&self, meter: &str) -> Option<&MeterState> {
        self.states.get(meter)
    }

    /// Sets the rarely present facts of a meter (installation, retirement, replacements).
    pub fn insert_extras(&mut self, meter: &str, extras: MeterExtras) {
        self.extras.insert(meter.into(), extras);
    }

    /// Adds a replacement recorded after start (the worker looks them up on a decrease).
    pub fn add_replacement(&mut self, meter: &str, replacement: Replacement) {
        let e = self.extras.entry(meter.into()).or_default();
        if !e.replacements.contains(&replacement) {
            e.replacements.push(replacement);
        }
    }

    /// Releases spare hash-table capacity (after a rebuild).
    pub fn shrink(&mut self) {
        self.states.shrink_to_fit();
        self.extras.shrink_to_fit();
    }

    /// Drops the state of meters for which `keep` is false (partition lost).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.states.retain(|k, _| keep(k));
        self.extras.retain(|k, _| keep(k));
        self.states.shrink_to_fit();
    }

    /// Number of meters with state.
    pub fn meters(&self) -> usize {
        self.states.len()
    }

    /// Returns the bytes held for meter state: hash-table slots (key + state + control byte)
    /// plus the heap bytes of the keys (rounded up to the allocator's 16-byte granule) and of
    /// the extras.
    pub fn state_bytes(&self) -> usize {
        // hashbrown keeps a power-of-two number of buckets, 7/8 of them usable, each with a
        // slot and a control byte.
        let buckets = |capacity: usize| {
            if capacity == 0 {
                0
            } else {
                (capacity * 8 / 7).next_power_of_two()
            }
        };
        let slot = std::mem::size_of::<(Box<str>, MeterState)>() + 1;
        let keys: usize = self.states.keys().map(|k| k.len().div_ceil(16) * 16).sum();
        let extra_slot = std::mem::size_of::<(Box<str>, MeterExtras)>() + 1;
        let extras: usize = self
            .extras
            .iter()
            .map(|(k, e)| {
                k.len().div_ceil(16) * 16
                    + e.replacements.capacity() * std::mem::size_of::<Replacement>()
            })
            .sum();
        buckets(self.states.capacity()) * slot
            + keys
            + buckets(self.extras.capacity()) * extra_slot
            + extras
    }

    /// Applies the states of a successfully stored batch (keeping the detector slots).
    pub fn commit(&mut self, states: &StateMap) {
        for (meter, state) in states {
            // Known meters are updated in place: no key allocation per reading.
            match self.states.get_mut(meter) {
                Some(s) => {
                    let slot = s.detect_slot;
                    *s = *state;
                    s.detect_slot = slot;
                }
                None => {
                    let mut state = *state;
                    state.detect_slot = NO_SLOT;
                    self.states.insert(meter.clone(), state);
                }
            }
        }
    }

    /// Meters in `readings` whose register went down: the caller refreshes their replacements
    /// from the database before [`Vee::validate`] (rare, so a lookup per case is fine).
    pub fn decreasing_meters<'a>(
        &self,
        readings: impl Iterator<Item = &'a Reading>,
    ) -> Vec<String> {
        let mut out: Vec<String> = readings
            .filter(|r| is_tracked(r))
            .filter(|r| {
                self.states
                    .get(r.meter.as_str())
                    .is_some_and(|s| s.has_read() && r.value < s.last_value)
            })
            .map(|r| r.meter.as_str().to_owned())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Validates a batch (in order) against the committed state and returns what to store.
    /// Does not change `self`: apply `output.states` with [`Vee::commit`] after storage.
    pub fn validate(&self, readings: Vec<Reading>, now: OffsetDateTime) -> VeeOutput {
        let mut out = VeeOutput::default();
        for reading in readings {
            self.validate_one(reading, now, &mut out);
        }
        out
    }

    fn current_state(&self, overlay: &StateMap, meter: &str) -> MeterState {
        overlay
            .get(meter)
            .or_else(|| self.states.get(meter))
            .copied()
            .unwrap_or_else(|| MeterState::new(self.defaults.0, self.defaults.1))
    }

    fn validate_one(&self, mut r: Reading, now: OffsetDateTime, out: &mut VeeOutput) {
        let c = &self.config;
        r.flags.clear();
        // Clock rules apply to every quantity.
        if r.ts > now + c.future_tolerance || r.ts < r.provenance.received_at - c.max_age {
            return reject(r, RejectReason::ImplausibleTimestamp, out);
        }
        if r.clock == ClockSource::Meter
            && r.storage == 0
            && (r.ts - r.provenance.received_at).abs() > c.clock_skew_tolerance
        {
            r.flags.push(QualityFlag::ClockSkew);
        }
        // Unit: cumulative volumes are kept in m³.
        if matches!(r.quantity, Quantity::Volume | Quantity::VolumeReverse)
            && r.unit != Unit::CubicMetre
        {
            match r.unit.convert(r.value, Unit::CubicMetre) {
                Ok(v) => {
                    r.value = v.normalize();
                    r.unit = Unit::CubicMetre;
                    r.flags.push(QualityFlag::UnitConverted);
                }
                Err(_) => return reject(r, RejectReason::UnitMismatch, out),
            }
        }
        let extras = self.extras.get(r.meter.as_str());
        if let Some(e) = extras
            && (e.installed_at.is_some_and(|t| r.ts < t) || e.retired_at.is_some_and(|t| r.ts >= t))
        {
            return reject(r, RejectReason::InactiveMeter, out);
        }
        if !is_tracked(&r) {
            r.quality = Quality::Validated;
            out.readings.push(r);
            return;
        }
        self.validate_register(r, extras, out);
    }

    fn validate_register(&self, mut r: Reading, extras: Option<&MeterExtras>, out: &mut VeeOutput) {
        let c = &self.config;
        let mut st = self.current_state(&out.states, r.meter.as_str());
        let ts = unix(r.ts);
        if !st.has_read() {
            st.last_ts = ts;
            st.last_value = r.value;
            st.received_lag_s = lag(&r);
            st.zero_s = 0;
            st.reads = 1;
            r.quality = Quality::Validated;
            out.usage.push(Usage {
                meter: r.meter.clone(),
                ts: r.ts,
                value: r.value,
                delta: Decimal::ZERO,
                estimated: false,
            });
            out.states.insert(r.meter.as_str().into(), st);
            out.readings.push(r);
            return;
        }
        if ts == st.last_ts {
            if r.value == st.last_value {
                out.duplicates += 1;
            } else {
                out.conflicts.push(Conflict {
                    reading: r,
                    stored_value: st.last_value,
                });
            }
            return;
        }
        if ts < st.last_ts {
            // Stored for audit and re-validation of the span; never billed as is.
            r.flags.push(QualityFlag::OutOfOrder);
            r.quality = Quality::Actual;
            out.out_of_order.push((r.meter.clone(), r.ts));
            out.readings.push(r);
            return;
        }
        let elapsed_s = ts - st.last_ts;
        let elapsed_h = elapsed_s as f64 / 3600.0;
        let max_physical =
            f64::from(st.q3_lph) / 1000.0 * c.max_flow_factor * elapsed_h + c.max_flow_allowance_m3;
        let raw_delta = r.value - st.last_value;
        let mut gap_fill = true;
        let consumption = if raw_delta >= Decimal::ZERO {
            raw_delta
        } else if let Some(rep) = extras.and_then(|e| {
            e.replacements
                .iter()
                .filter(|p| unix(p.replaced_at) > st.last_ts && unix(p.replaced_at) <= ts)
                .max_by_key(|p| p.replaced_at)
        }) {
            r.flags.push(QualityFlag::MeterReplaced);
            gap_fill = false;
            (rep.old_final_value - st.last_value).max(Decimal::ZERO)
                + (r.value - rep.new_initial_value)
        } else {
            let capacity = Decimal::from(st.capacity_m3);
            let wrapped = capacity - st.last_value + r.value;
            if st.last_value >= capacity * (Decimal::ONE - c.rollover_band)
                && to_f64(wrapped) <= max_physical
            {
                r.flags.push(QualityFlag::Rollover);
                gap_fill = false;
                wrapped
            } else if -raw_delta <= c.reverse_flow_max_m3 {
                r.flags.push(QualityFlag::ReverseFlow);
                gap_fill = false;
                raw_delta
            } else {
                return reject(r, RejectReason::RegisterDecrease, out);
            }
        };
        let usage_m3 = to_f64(consumption);
        if usage_m3 > max_physical {
            return reject(r, RejectReason::PhysicallyImpossible, out);
        }
        let elapsed_days = elapsed_s as f64 / 86_400.0;
        if st.reads >= 3
            && usage_m3 > c.spike_min_m3
            && usage_m3 > c.spike_factor * f64::from(st.adu) * elapsed_days.max(1.0)
        {
            r.flags.push(QualityFlag::Spike);
        }
        if consumption == Decimal::ZERO {
            st.zero_s = st
                .zero_s
                .saturating_add(u32::try_from(elapsed_s).unwrap_or(u32::MAX));
            if i64::from(st.zero_s) >= c.zero_span.whole_seconds()
                && f64::from(st.adu) >= c.zero_min_adu_m3
            {
                r.flags.push(QualityFlag::ZeroConsumption);
            }
        } else {
            st.zero_s = 0;
        }
        r.quality = Quality::Validated;
        // Gap: estimates between the last read and this one.
        let is_gap = st.interval_s > 0
            && st.reads >= 2
            && elapsed_s as f64 > c.gap_factor * f64::from(st.interval_s);
        let mut prev_value = st.last_value;
        if is_gap && gap_fill && consumption >= Decimal::ZERO {
            for est in estimates(&st, &r, consumption, c) {
                out.usage.push(Usage {
                    meter: est.meter.clone(),
                    ts: est.ts,
                    value: est.value,
                    delta: est.value - prev_value,
                    estimated: true,
                });
                prev_value = est.value;
                out.estimated += 1;
                out.readings.push(est);
            }
        }
        let delta = if prev_value == st.last_value {
            consumption
        } else {
            r.value - prev_value
        };
        out.usage.push(Usage {
            meter: r.meter.clone(),
            ts: r.ts,
            value: r.value,
            delta,
            estimated: false,
        });
        // Learn: interval, average daily usage, hourly profile.
        let elapsed_u32 = u32::try_from(elapsed_s).unwrap_or(u32::MAX);
        st.interval_s = if st.interval_s == 0 {
            elapsed_u32
        } else {
            let ewma = (u64::from(st.interval_s) * 7 + u64::from(elapsed_u32)) / 8;
            u32::try_from(ewma).unwrap_or(u32::MAX)
        };
        let rate = (usage_m3 / elapsed_days.max(1e-6)).max(0.0);
        if st.reads < 2 {
            st.adu = rate as f32;
        } else {
            let w = 1.0 - (1.0 - c.adu_alpha).powf(elapsed_days.min(30.0));
            st.adu = (f64::from(st.adu) + w * (rate - f64::from(st.adu))) as f32;
        }
        if elapsed_h <= 2.0 && usage_m3 >= 0.0 {
            let hour = usize::from(r.ts.hour());
            let lph = (usage_m3 * 1000.0 / elapsed_h.max(1e-6)).min(f64::from(u16::MAX));
            if let Some(p) = st.hour_profile.get_mut(hour) {
                let old = f64::from(*p);
                *p = (old + 0.2 * (lph - old))
                    .round()
                    .clamp(0.0, f64::from(u16::MAX)) as u16;
            }
        }
        st.last_ts = ts;
        st.last_value = r.value;
        st.received_lag_s = lag(&r);
        st.reads = st.reads.saturating_add(1);
        out.states.insert(r.meter.as_str().into(), st);
        out.readings.push(r);
    }
}

/// Receive time minus reading time, seconds, clamped.
fn lag(r: &Reading) -> i32 {
    let s = (r.provenance.received_at - r.ts).whole_seconds();
    i32::try_from(s).unwrap_or(if s < 0 { i32::MIN } else { i32::MAX })
}

fn reject(mut r: Reading, reason: RejectReason, out: &mut VeeOutput) {
    r.quality = Quality::Rejected { reason };
    out.rejected += 1;
    out.readings.push(r);
}

/// Creates estimates at the meter's usual interval between its last read and `r`: linear for
/// short gaps, shaped by the hourly profile for longer ones; scaled to meet `r` exactly.
fn estimates(st: &MeterState, r: &Reading, consumption: Decimal, c: &VeeConfig) -> Vec<Reading> {
    let interval = i64::from(st.interval_s.max(1));
    let end = unix(r.ts);
    let mut slots = Vec::new();
    let mut t = st.last_ts + interval;
    while t < end && slots.len() < c.max_estimates_per_gap as usize {
        slots.push(t);
        t += interval;
    }
    if slots.is_empty() {
        return Vec::new();
    }
    let profiled =
        slots.len() > c.linear_max_slots as usize && st.hour_profile.iter().any(|p| *p > 0);
    let method = if profiled {
        EstimationMethod::Profile
    } else {
        EstimationMethod::Linear
    };
    // Cumulative weight at each slot and at the end; linear weights are the elapsed seconds,
    // profile weights the elapsed seconds times the profile of the hour (plus 1 L/h so that
    // hours never seen still get a share).
    let weight = |from: i64, to: i64| -> f64 {
        let span = (to - from) as f64;
        if profiled {
            let hour = usize::from(from_unix(to).hour());
            span * (f64::from(st.hour_profile.get(hour).copied().unwrap_or(0)) + 1.0)
        } else {
            span
        }
    };
    let mut cumulative = Vec::with_capacity(slots.len());
    let mut acc = 0.0;
    let mut prev = st.last_ts;
    for s in &slots {
        acc += weight(prev, *s);
        cumulative.push(acc);
        prev = *s;
    }
    let total = acc + weight(prev, end);
    if total <= 0.0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(slots.len());
    for (s, cum) in slots.iter().zip(cumulative) {
        let share = Decimal::from_f64(cum / total).unwrap_or(Decimal::ZERO);
        let value = (st.last_value + consumption * share)
            .round_dp(ESTIMATE_SCALE)
            .clamp(st.last_value, r.value);
        let meter = r.meter.clone();
        out.push(Reading {
            meter,
            ts: from_unix(*s),
            clock: ClockSource::Pipeline,
            quantity: Quantity::Volume,
            value,
            unit: Unit::CubicMetre,
            storage: 0,
            tariff: 0,
            subunit: 0,
            quality: Quality::Estimated { method },
            flags: Vec::new(),
            provenance: Provenance {
                gateway: r.provenance.gateway.clone(),
                source: SourceKind::Pipeline,
                source_id: "vee".into(),
                frame_hash: r.provenance.frame_hash.clone(),
                received_at: r.provenance.received_at,
                channel: None,
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::GatewayId;
    use rust_decimal_macros::dec;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-11-01 00:00 UTC);

    fn read(meter: &str, minutes: i64, value: Decimal) -> Reading {
        let ts = T0 + Duration::minutes(minutes);
        Reading {
            meter: MeterId::new(meter).unwrap(),
            ts,
            clock: ClockSource::Meter,
            quantity: Quantity::Volume,
            value,
            unit: Unit::CubicMetre,
            storage: 0,
            tariff: 0,
            subunit: 0,
            quality: Quality::Actual,
            flags: vec![],
            provenance: Provenance {
                gateway: GatewayId::new("gw").unwrap(),
                source: SourceKind::Coap,
                source_id: "nb".into(),
                frame_hash: "ab".into(),
                received_at: ts + Duration::seconds(5),
                channel: None,
            },
        }
    }

    /// Validates `history` then `last`, committing after each; returns the output of `last`.
    fn run(vee: &mut Vee, history: &[(i64, Decimal)], last: Reading) -> VeeOutput {
        let now = last.ts + Duration::minutes(1);
        for (m, v) in history {
            let out = vee.validate(vec![read(last.meter.as_str(), *m, *v)], now);
            vee.commit(&out.states);
        }
        vee.validate(vec![last], now)
    }

    fn last_of(out: &VeeOutput) -> &Reading {
        out.readings
            .iter()
            .rev()
            .find(|r| r.clock != ClockSource::Pipeline)
            .expect("a non-estimate reading")
    }

    fn hourly(n: i64, start: Decimal, step: Decimal) -> Vec<(i64, Decimal)> {
        (0..n)
            .map(|i| (i * 60, start + step * Decimal::from(i)))
            .collect()
    }

    /// Table of register rules: history (hourly, 0.01 m³/h unless given), last read, expected
    /// quality status, flags and consumption delta of the last read.
    #[test]
    fn register_rules_table() {
        struct Case {
            name: &'static str,
            history: Vec<(i64, Decimal)>,
            last: (i64, Decimal),
            capacity: u32,
            status: &'static str,
            reason: Option<RejectReason>,
            flags: Vec<QualityFlag>,
            delta: Option<Decimal>,
        }
        let base = hourly(6, dec!(100), dec!(0.01));
        let cases = vec![
            Case {
                name: "normal increase",
                history: base.clone(),
                last: (360, dec!(100.07)),
                capacity: DEFAULT_CAPACITY_M3,
                status: "validated",
                reason: None,
                flags: vec![],
                delta: Some(dec!(0.02)),
            },
            Case {
                name: "small decrease is reverse flow",
                history: base.clone(),
                last: (360, dec!(100.02)),
                capacity: DEFAULT_CAPACITY_M3,
                status: "validated",
                reason: None,
                flags: vec![QualityFlag::ReverseFlow],
                delta: Some(dec!(-0.03)),
            },
            Case {
                name: "large decrease is rejected",
                history: base.clone(),
                last: (360, dec!(50)),
                capacity: DEFAULT_CAPACITY_M3,
                status: "rejected",
                reason: Some(RejectReason::RegisterDecrease),
                flags: vec![],
                delta: None,
            },
            Case {
                name: "rollover near capacity",
                history: hourly(4, dec!(99999.90), dec!(0.01)),
                last: (240, dec!(0.05)),
                capacity: 100_000,
                status: "validated",
                reason: None,
                flags: vec![QualityFlag::Rollover],
                delta: Some(dec!(0.12)),
            },
            Case {
                name: "decrease far from capacity is not a rollover",
                history: hourly(4, dec!(5000), dec!(0.01)),
                last: (240, dec!(0.05)),
                capacity: 100_000,
                status: "rejected",
                reason: Some(RejectReason::RegisterDecrease),
                flags: vec![],
                delta: None,
            },
            Case {
                name: "usage above Q4 x elapsed is impossible",
                history: base.clone(),
                last: (360, dec!(110)),
                capacity: DEFAULT_CAPACITY_M3,
                status: "rejected",
                reason: Some(RejectReason::PhysicallyImpossible),
                flags: vec![],
                delta: None,
            },
            Case {
                name: "spike above k x ADU",
                history: hourly(30, dec!(100), dec!(0.001)),
                last: (1800, dec!(101.5)),
                capacity: DEFAULT_CAPACITY_M3,
                status: "validated",
                reason: None,
                flags: vec![QualityFlag::Spike],
                delta: Some(dec!(1.471)),
            },
        ];
        for case in cases {
            let mut vee = Vee::new(VeeConfig::default());
            vee.insert_state("m1", MeterState::new(case.capacity, DEFAULT_Q3_LPH));
            let out = run(
                &mut vee,
                &case.history,
                read("m1", case.last.0, case.last.1),
            );
            let r = last_of(&out);
            assert_eq!(r.quality.status(), case.status, "{}", case.name);
            if let Some(reason) = case.reason {
                assert_eq!(r.quality, Quality::Rejected { reason }, "{}", case.name);
            }
            assert_eq!(r.flags, case.flags, "{}", case.name);
            let usage = out.usage.last().map(|u| u.delta);
            assert_eq!(usage, case.delta, "{}", case.name);
            if case.status == "rejected" {
                assert!(out.states.is_empty(), "{}: state unchanged", case.name);
            }
        }
    }

    #[test]
    fn meter_replacement_bridges_the_reset() {
        let mut vee = Vee::new(VeeConfig::default());
        vee.insert_extras(
            "m1",
            MeterExtras {
                replacements: vec![Replacement {
                    replaced_at: T0 + Duration::minutes(150),
                    old_final_value: dec!(500.05),
                    new_initial_value: dec!(0.01),
                }],
                ..MeterExtras::default()
            },
        );
        let out = run(
            &mut vee,
            &hourly(3, dec!(500), dec!(0.02)),
            read("m1", 180, dec!(0.03)),
        );
        let r = last_of(&out);
        assert_eq!(r.quality, Quality::Validated);
        assert_eq!(r.flags, vec![QualityFlag::MeterReplaced]);
        // old meter: 500.04 -> 500.05 (0.01), new meter 0.01 -> 0.03 (0.02)
        assert_eq!(out.usage.last().map(|u| u.delta), Some(dec!(0.03)));
    }

    #[test]
    fn timestamp_rules_table() {
        // (minutes from T0 of the read, received_at offset in minutes, now offset from read,
        // expected status, expected flags)
        type Case = (&'static str, i64, i64, i64, &'static str, Vec<QualityFlag>);
        let cases: Vec<Case> = vec![
            ("on time", 0, 0, 1, "validated", vec![]),
            ("future beyond tolerance", 0, 0, -10, "rejected", vec![]),
            (
                "meter clock 1 h behind receive",
                0,
                60,
                61,
                "validated",
                vec![QualityFlag::ClockSkew],
            ),
            (
                "older than max age",
                0,
                60 * 24 * 500,
                60 * 24 * 500,
                "rejected",
                vec![],
            ),
        ];
        for (name, m, recv, now, status, flags) in cases {
            let vee = Vee::new(VeeConfig::default());
            let mut r = read("m1", m, dec!(1));
            r.provenance.received_at = r.ts + Duration::minutes(recv);
            let now = r.ts + Duration::minutes(now);
            let out = vee.validate(vec![r], now);
            assert_eq!(out.readings[0].quality.status(), status, "{name}");
            assert_eq!(out.readings[0].flags, flags, "{name}");
        }
    }

    #[test]
    fn duplicates_dropped_conflicts_reported_out_of_order_held() {
        let mut vee = Vee::new(VeeConfig::default());
        let out = run(
            &mut vee,
            &hourly(3, dec!(10), dec!(0.1)),
            read("m1", 120, dec!(10.2)),
        );
        assert_eq!((out.duplicates, out.readings.len()), (1, 0));
        let out = vee.validate(vec![read("m1", 120, dec!(10.25))], T0 + Duration::hours(3));
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(out.conflicts[0].stored_value, dec!(10.2));
        let out = vee.validate(vec![read("m1", 30, dec!(10.05))], T0 + Duration::hours(3));
        assert_eq!(out.readings[0].quality, Quality::Actual);
        assert_eq!(out.readings[0].flags, vec![QualityFlag::OutOfOrder]);
        assert_eq!(out.out_of_order.len(), 1);
        assert!(out.usage.is_empty());
    }

    #[test]
    fn litres_are_converted_and_bad_units_rejected() {
        let vee = Vee::new(VeeConfig::default());
        let mut r = read("m1", 0, dec!(1234.5));
        r.unit = Unit::Litre;
        let mut bad = read("m2", 0, dec!(1));
        bad.unit = Unit::Bar;
        let out = vee.validate(vec![r, bad], T0 + Duration::minutes(1));
        assert_eq!(out.readings[0].value, dec!(1.2345));
        assert_eq!(out.readings[0].flags, vec![QualityFlag::UnitConverted]);
        assert_eq!(
            out.readings[1].quality,
            Quality::Rejected {
                reason: RejectReason::UnitMismatch
            }
        );
    }

    #[test]
    fn inactive_meter_is_rejected() {
        let mut vee = Vee::new(VeeConfig::default());
        vee.insert_extras(
            "m1",
            MeterExtras {
                retired_at: Some(T0),
                ..MeterExtras::default()
            },
        );
        let out = vee.validate(vec![read("m1", 10, dec!(1))], T0 + Duration::hours(1));
        assert_eq!(
            out.readings[0].quality,
            Quality::Rejected {
                reason: RejectReason::InactiveMeter
            }
        );
    }

    #[test]
    fn long_zero_consumption_is_flagged() {
        let mut vee = Vee::new(VeeConfig::default());
        // Daily reads using 0.5 m3/day for 5 days, then flat for 8 days.
        let mut history: Vec<(i64, Decimal)> = (0..5)
            .map(|d| (d * 1440, dec!(10) + dec!(0.5) * Decimal::from(d)))
            .collect();
        history.extend((5..12).map(|d| (d * 1440, dec!(12))));
        let out = run(&mut vee, &history, read("m1", 12 * 1440, dec!(12)));
        assert_eq!(last_of(&out).flags, vec![QualityFlag::ZeroConsumption]);
        // Six days of zero only: no flag yet.
        let mut vee = Vee::new(VeeConfig::default());
        let out = run(&mut vee, &history[..10], read("m1", 10 * 1440, dec!(12)));
        assert!(last_of(&out).flags.is_empty());
    }

    #[test]
    fn short_gap_gets_linear_estimates_meeting_the_next_read() {
        let mut vee = Vee::new(VeeConfig::default());
        // Hourly reads, then 3 hours missing.
        let out = run(
            &mut vee,
            &hourly(4, dec!(1), dec!(0.1)),
            read("m1", 420, dec!(1.7)),
        );
        let est: Vec<&Reading> = out
            .readings
            .iter()
            .filter(|r| r.clock == ClockSource::Pipeline)
            .collect();
        assert_eq!(est.len(), 3);
        assert_eq!(
            est.iter().map(|r| r.value).collect::<Vec<_>>(),
            vec![dec!(1.4), dec!(1.5), dec!(1.6)]
        );
        assert!(est.iter().all(|r| r.quality
            == Quality::Estimated {
                method: EstimationMethod::Linear
            }));
        let deltas: Decimal = out.usage.iter().map(|u| u.delta).sum();
        assert_eq!(deltas, dec!(0.4));
        assert_eq!(out.estimated, 3);
    }

    #[test]
    fn long_gap_follows_the_hourly_profile() {
        let mut vee = Vee::new(VeeConfig::default());
        // One day of hourly reads: 10 L/h at night (hours 0-5), 100 L/h afterwards.
        let mut v = dec!(100);
        let mut history = vec![(0, v)];
        for h in 1..24 {
            v += if h <= 6 { dec!(0.01) } else { dec!(0.1) };
            history.push((h * 60, v));
        }
        // 12 hours missing (00:00..12:00 of day 2), total 0.66 m3.
        let out = run(&mut vee, &history, read("m1", 36 * 60, v + dec!(1.2)));
        let est: Vec<&Reading> = out
            .readings
            .iter()
            .filter(|r| r.clock == ClockSource::Pipeline)
            .collect();
        assert_eq!(est.len(), 12);
        assert!(est.iter().all(|r| r.quality
            == Quality::Estimated {
                method: EstimationMethod::Profile
            }));
        // Night hours get less than day hours; values rise monotonically to the actual read.
        let night = est[2].value - est[1].value;
        let day = est[10].value - est[9].value;
        assert!(night < day, "night {night} day {day}");
        assert!(est.windows(2).all(|w| w[0].value <= w[1].value));
        let total: Decimal = out.usage.iter().map(|u| u.delta).sum();
        assert_eq!(total, dec!(1.2));
    }

    #[test]
    fn rollover_and_replacement_spans_are_not_estimated() {
        let mut vee = Vee::new(VeeConfig::default());
        vee.insert_state("m1", MeterState::new(1000, DEFAULT_Q3_LPH));
        let out = run(
            &mut vee,
            &hourly(4, dec!(999.8), dec!(0.01)),
            read("m1", 600, dec!(0.1)),
        );
        assert_eq!(out.estimated, 0);
        assert_eq!(last_of(&out).flags, vec![QualityFlag::Rollover]);
    }

    #[test]
    fn failed_batch_leaves_state_untouched() {
        let mut vee = Vee::new(VeeConfig::default());
        let out = vee.validate(vec![read("m1", 0, dec!(1))], T0 + Duration::hours(1));
        assert_eq!(out.states.len(), 1);
        // Not committed: validating again sees no state, so it is a first read again.
        let again = vee.validate(vec![read("m1", 0, dec!(1))], T0 + Duration::hours(1));
        assert_eq!(again.duplicates, 0);
        vee.commit(&out.states);
        let third = vee.validate(vec![read("m1", 0, dec!(1))], T0 + Duration::hours(1));
        assert_eq!(third.duplicates, 1);
    }

    #[test]
    fn state_is_compact() {
        assert!(std::mem::size_of::<MeterState>() <= 104);
        let mut vee = Vee::new(VeeConfig::default());
        for i in 0..10_000 {
            vee.insert_state(&format!("cjt188:{i:014}"), MeterState::new(1, 1));
        }
        let per_meter = vee.state_bytes() / vee.meters();
        assert!(per_meter < 300, "{per_meter} bytes per meter");
    }

    #[test]
    fn replacing_a_state_keeps_its_detector_slot() {
        let mut vee = Vee::new(VeeConfig::default());
        vee.insert_state("m1", MeterState::new(1000, DEFAULT_Q3_LPH));
        assert_eq!(vee.detect_slot("m1"), None);
        vee.set_detect_slot("m1", 7);
        // A meter without VEE state gets the state VEE assumes anyway.
        vee.set_detect_slot("m2", 8);
        assert_eq!(
            vee.state("m2"),
            Some(&MeterState::new(DEFAULT_CAPACITY_M3, DEFAULT_Q3_LPH))
        );
        let mut fresh = MeterState::new(5, 5);
        fresh.detect_slot = 99;
        vee.insert_state("m1", fresh);
        assert_eq!(vee.detect_slot("m1"), Some(7));
        assert_eq!(vee.state("m1"), Some(&fresh), "the rest is replaced");
        // A batch validated and committed: the slot of the committed state stays.
        let mut states = run(&mut vee, &[], read("m1", 60, dec!(1))).states;
        let Some(st) = states.get_mut("m1") else {
            panic!("m1 validated without a new state");
        };
        st.detect_slot = 3;
        vee.commit(&states);
        assert_eq!(vee.state("m1").map(|s| s.last_value), Some(dec!(1)));
        assert_eq!(vee.detect_slot("m1"), Some(7));
        let mut slots = Vec::new();
        vee.each_detect_slot(&mut |m, s| slots.push((m.to_owned(), s)));
        slots.sort();
        assert_eq!(slots, vec![("m1".to_owned(), 7), ("m2".to_owned(), 8)]);
    }
}
