//! Anomaly detectors: pure, streaming per meter in event time (DOMAIN.md §2, `docs/detectors.md`).
//!
//! [`Detectors`] keeps one compact [`MeterDetect`] per meter and turns observations (validated
//! readings, in any order, duplicates possible) into [`AlarmEvent`]s: an alarm is *raised* when
//! its condition starts to hold, *seen* again while it holds and *cleared* when it stops (tamper
//! never clears by itself). No I/O and no clock: the caller passes event times, and
//! [`Detectors::sweep`] judges silence (communication loss) against a time the caller chooses —
//! the wall clock in the live worker, the newest timestamp of the input in `detect-replay`.
//!
//! Hour-based detectors (leak, burst, night flow) work on hourly steps: the consumption of each
//! clock hour in event time, summed from the register deltas that end in it. A step longer than
//! 70 minutes (a missed read, a daily reporter) is *coarse*: it never counts as a burst hour or a
//! flow hour, so single missing reads cannot raise anything. Reads at or before the newest one
//! already seen are ignored for register detectors (duplicates, late out-of-order reads): they
//! can neither raise nor clear; estimated reads are ignored altogether.

pub mod config;
pub mod dma;
pub mod gateway;
pub mod replay;
pub mod store;

use std::collections::HashMap;

use model::{AlarmKind, AlarmSeverity, Quality, Quantity, Reading, RejectReason};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

pub use config::{DetectConfig, Thresholds};

/// Role of a meter in the network (registry column `meters.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// A customer's revenue meter.
    #[default]
    Customer,
    /// A DMA inlet (system input volume).
    Inlet,
    /// A DMA outlet (export to a neighbouring DMA).
    Outlet,
    /// A hydrant controller.
    Hydrant,
    /// A pressure logger.
    Pressure,
}

impl Role {
    /// Parses the registry spelling (`customer`, `inlet`, `outlet`, `hydrant`, `pressure`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "customer" | "" => Self::Customer,
            "inlet" => Self::Inlet,
            "outlet" => Self::Outlet,
            "hydrant" => Self::Hydrant,
            "pressure" => Self::Pressure,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Self::Customer => 0,
            Self::Inlet => 1,
            Self::Outlet => 2,
            Self::Hydrant => 3,
            Self::Pressure => 4,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => Self::Inlet,
            2 => Self::Outlet,
            3 => Self::Hydrant,
            4 => Self::Pressure,
            _ => Self::Customer,
        }
    }
}

/// What the detectors need to know about a meter (from `meters` or `meters.csv`).
#[derive(Debug, Clone, PartialEq)]
pub struct MeterProfile {
    /// Meter class (`residential_dn15`, ...): selects the thresholds.
    pub class: String,
    /// Nominal flow Q3, m³/h.
    pub q3_m3h: f64,
    /// District metered area, if any.
    pub dma: Option<String>,
    /// Role in the network.
    pub role: Role,
    /// UTC offset of the meter's time zone, seconds east (for the local night window).
    pub utc_offset_s: i32,
    /// Device model (registry `meters.model_code`): selects the status-bit map set with
    /// [`Detectors::set_model_bits`]; `None` or an unknown model uses `[status_bits]`.
    pub model: Option<String>,
}

/// One observation handed to the detectors: a reading reduced to what they use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation<'a> {
    /// Meter id.
    pub meter: &'a str,
    /// Event time, unix seconds.
    pub ts: i64,
    /// Receive time, unix seconds (live; `None` in replay).
    pub received: Option<i64>,
    /// What was measured.
    pub quantity: Quantity,
    /// Value in the quantity's base unit (m³, bar, %, degrees, dimensionless).
    pub value: Decimal,
    /// Estimated reads never raise or clear an alarm.
    pub estimated: bool,
}

/// How an alarm changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// The condition started to hold.
    Raised,
    /// The condition still holds (refreshes `last_seen`, may raise the severity).
    Seen,
    /// The condition stopped holding (auto-close).
    Cleared,
}

/// A change of one (meter, kind) alarm, in event time.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmEvent {
    /// Meter (or `dma:<name>`, `gateway:<id>`).
    pub meter: String,
    /// Alarm kind.
    pub kind: AlarmKind,
    /// What happened.
    pub transition: Transition,
    /// Severity now.
    pub severity: AlarmSeverity,
    /// When the condition began, unix seconds (for `Raised`; the episode's start otherwise).
    pub first_seen: i64,
    /// When this transition was observed, unix seconds.
    pub at: i64,
    /// Evidence (rule, rates, thresholds) for `Raised`.
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Which clock [`Detectors::sweep`] compares silence against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepClock {
    /// Event time (`detect-replay`: the newest timestamp of the input).
    Event,
    /// Receive time (live: the wall clock), with the meter's uplink cadence learned from receive
    /// times (a daily reporter sends 24 hourly reads at once).
    Received,
}

const NO_TS: i64 = i64::MIN;
const NO_HOUR: i32 = i32::MIN;
const NO_REV: u32 = u32::MAX;
/// Steps up to this long count as hourly (fine) steps.
const FINE_STEP_S: i64 = 4_200;
/// Bucket flag: part of the current hour's consumption went into a coarse step.
const FLAG_PARTIAL: u8 = 1;
/// The local 02:00 hour of the night being measured was the previous hour and had data.
const FLAG_NIGHT: u8 = 2;
/// The current hour bucket has had no step yet (the previous read closed the hour before).
const FLAG_EMPTY: u8 = 4;

/// Bit of each per-meter alarm kind in [`MeterDetect::active`].
fn kind_bit(kind: AlarmKind) -> u16 {
    let i = match kind {
        AlarmKind::Leak => 0,
        AlarmKind::Burst => 1,
        AlarmKind::ReverseFlow => 2,
        AlarmKind::Tamper => 3,
        AlarmKind::LowBattery => 4,
        AlarmKind::CommunicationLoss => 5,
        AlarmKind::StoppedMeter => 6,
        AlarmKind::EmptyPipe => 7,
        AlarmKind::HydrantIllegalUse => 8,
        AlarmKind::HydrantTilt => 9,
        AlarmKind::HydrantPressure => 10,
        AlarmKind::ValveFault => 11,
        AlarmKind::ProlongedEstimation => 12,
        AlarmKind::SpoolOverflow | AlarmKind::DmaImbalance | AlarmKind::GatewayOffline => {
            return 0;
        }
    };
    1 << i
}

/// Detector state of one meter (see `docs/detectors.md` for the measured size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterDetect {
    /// Newest volume read: unix seconds ([`i64::MIN`] when none) and register in mL.
    last_ts: i64,
    last_ml: i64,
    /// When the register last advanced (start of a zero-consumption period), unix seconds.
    zero_since: i64,
    /// Register (mL) at the start of the usage history, for the average daily use.
    base_ml: i64,
    /// Newest event time of any observation.
    heard_ts: i64,
    /// Hour index (unix hours) of `base_ml`.
    base_h: i32,
    /// Current hour bucket and its consumption (mL).
    hour: i32,
    hour_ml: u32,
    /// Start hour of the current run of hours with flow, or [`NO_HOUR`].
    run_start: i32,
    /// Start hour of the current run of burst hours.
    burst_start: i32,
    /// Hour of the 02:00 hour of the last night counted in the streak.
    night_last: i32,
    /// Usual interval between event times, seconds (0 = unknown), and its confidence.
    interval_s: u32,
    /// Usual interval between receive times (uplink cadence), seconds.
    rx_interval_s: u32,
    /// Receive time of the newest observation minus its event time, seconds.
    rx_lag_s: i32,
    /// Hour of the last reverse-flow evidence.
    rev_hour: i32,
    /// Reverse register, litres ([`NO_REV`] when none seen).
    rev_l: u32,
    /// Q3, L/h.
    q3_lph: u32,
    /// Smallest hourly flow of the current run, L/h (saturating).
    run_min_lph: u16,
    /// The 02:00 hour's consumption of the night being measured, dL (saturating).
    night_min_dl: u16,
    /// UTC offset of the meter's zone, minutes.
    offset_min: i16,
    /// Active alarm kinds ([`kind_bit`]).
    active: u16,
    /// Consecutive zero hours, burst hours, counted nights (saturating).
    zero_hours: u8,
    burst_hours: u8,
    nights: u8,
    /// Confidence in `interval_s` and `rx_interval_s` (0..=7 each, packed).
    confidence: u8,
    /// [`FLAG_PARTIAL`], [`FLAG_NIGHT`].
    flags: u8,
    /// Class index into [`DetectConfig`], role code.
    class: u8,
    role: u8,
    /// Status-bit map index ([`Detectors::set_model_bits`]; 0 = the configured default). A
    /// profile field like `class`: set from the registry, not persisted.
    model: u8,
}

impl MeterDetect {
    fn new(class: u8, role: Role, q3_m3h: f64, utc_offset_s: i32) -> Self {
        Self {
            last_ts: NO_TS,
            last_ml: 0,
            zero_since: NO_TS,
            base_ml: 0,
            heard_ts: NO_TS,
            base_h: NO_HOUR,
            hour: NO_HOUR,
            hour_ml: 0,
            run_start: NO_HOUR,
            burst_start: NO_HOUR,
            night_last: NO_HOUR,
            interval_s: 0,
            rx_interval_s: 0,
            rx_lag_s: 0,
            rev_hour: NO_HOUR,
            rev_l: NO_REV,
            q3_lph: q3_lph(q3_m3h),
            run_min_lph: u16::MAX,
            night_min_dl: 0,
            offset_min: i16::try_from(utc_offset_s / 60).unwrap_or(0),
            active: 0,
            zero_hours: 0,
            burst_hours: 0,
            nights: 0,
            confidence: 0,
            flags: 0,
            class,
            role: role.code(),
            model: 0,
        }
    }

    /// Returns true when `kind` is active.
    pub fn is_active(&self, kind: AlarmKind) -> bool {
        let bit = kind_bit(kind);
        bit != 0 && self.active & bit != 0
    }

    /// Returns the active kinds.
    pub fn active_kinds(&self) -> Vec<AlarmKind> {
        AlarmKind::ALL
            .into_iter()
            .filter(|k| self.is_active(*k))
            .collect()
    }

    fn set_active(&mut self, kind: AlarmKind, on: bool) {
        if on {
            self.active |= kind_bit(kind);
        } else {
            self.active &= !kind_bit(kind);
        }
    }

    /// Marks `kind` active without an event: for state rebuilt from open alarms at start.
    pub fn restore_active(&mut self, kind: AlarmKind) {
        self.set_active(kind, true);
    }

    /// Leak rules (continuous flow, night flow) are for customer meters (DOMAIN.md §2): an inlet,
    /// outlet or open hydrant flows day and night by nature; the DMA balance judges losses there.
    fn judges_leaks(&self) -> bool {
        Role::from_code(self.role) == Role::Customer
    }

    fn is_hydrant(&self, meter: &str) -> bool {
        Role::from_code(self.role) == Role::Hydrant || meter.starts_with("hydrant:")
    }

    fn local_hour(&self, hour: i32) -> i64 {
        (i64::from(hour) * 3600 + i64::from(self.offset_min) * 60)
            .div_euclid(3600)
            .rem_euclid(24)
    }
}

/// Version byte of [`MeterDetect::to_bytes`].
const STATE_VERSION: u8 = 1;

impl MeterDetect {
    /// Serialises the state (little endian, fixed layout, versioned) for `detector_state`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(112);
        b.push(STATE_VERSION);
        for v in [
            self.last_ts,
            self.last_ml,
            self.zero_since,
            self.base_ml,
            self.heard_ts,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            self.base_h,
            self.hour,
            self.run_start,
            self.burst_start,
            self.night_last,
            self.rx_lag_s,
            self.rev_hour,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            self.hour_ml,
            self.interval_s,
            self.rx_interval_s,
            self.rev_l,
            self.q3_lph,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [self.run_min_lph, self.night_min_dl, self.active] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.offset_min.to_le_bytes());
        b.extend_from_slice(&[
            self.zero_hours,
            self.burst_hours,
            self.nights,
            self.confidence,
            self.flags,
            self.class,
            self.role,
        ]);
        b
    }

    /// Reads a state written by [`MeterDetect::to_bytes`]; `None` for another version or a
    /// truncated record (the meter then starts afresh).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        if r.take::<1>()? != [STATE_VERSION] {
            return None;
        }
        let i64v = |r: &mut Reader<'_>| r.take::<8>().map(i64::from_le_bytes);
        let i32v = |r: &mut Reader<'_>| r.take::<4>().map(i32::from_le_bytes);
        let u32v = |r: &mut Reader<'_>| r.take::<4>().map(u32::from_le_bytes);
        let u16v = |r: &mut Reader<'_>| r.take::<2>().map(u16::from_le_bytes);
        let st = Self {
            last_ts: i64v(&mut r)?,
            last_ml: i64v(&mut r)?,
            zero_since: i64v(&mut r)?,
            base_ml: i64v(&mut r)?,
            heard_ts: i64v(&mut r)?,
            base_h: i32v(&mut r)?,
            hour: i32v(&mut r)?,
            run_start: i32v(&mut r)?,
            burst_start: i32v(&mut r)?,
            night_last: i32v(&mut r)?,
            rx_lag_s: i32v(&mut r)?,
            rev_hour: i32v(&mut r)?,
            hour_ml: u32v(&mut r)?,
            interval_s: u32v(&mut r)?,
            rx_interval_s: u32v(&mut r)?,
            rev_l: u32v(&mut r)?,
            q3_lph: u32v(&mut r)?,
            run_min_lph: u16v(&mut r)?,
            night_min_dl: u16v(&mut r)?,
            active: u16v(&mut r)?,
            offset_min: r.take::<2>().map(i16::from_le_bytes)?,
            zero_hours: r.take::<1>()?[0],
            burst_hours: r.take::<1>()?[0],
            nights: r.take::<1>()?[0],
            confidence: r.take::<1>()?[0],
            flags: r.take::<1>()?[0],
            class: r.take::<1>()?[0],
            role: r.take::<1>()?[0],
            model: 0,
        };
        Some(st)
    }
}

impl MeterDetect {
    /// Number of integers [`MeterDetect::words`] returns.
    pub const WORDS: usize = 27;

    /// The persisted fields as integers, in a fixed order, for the ingest journal's varint
    /// encoding (about 60 bytes instead of [`MeterDetect::to_bytes`]'s 104). Profile fields
    /// (class, role, model, Q3, offset) are reloaded from the registry, but `q3_lph` and
    /// `offset_min` are kept so a state read back equals the one written.
    pub fn words(&self) -> [i128; Self::WORDS] {
        [
            i128::from(self.last_ts),
            i128::from(self.last_ml),
            i128::from(self.zero_since),
            i128::from(self.base_ml),
            i128::from(self.heard_ts),
            i128::from(self.base_h),
            i128::from(self.hour),
            i128::from(self.run_start),
            i128::from(self.burst_start),
            i128::from(self.night_last),
            i128::from(self.rx_lag_s),
            i128::from(self.rev_hour),
            i128::from(self.hour_ml),
            i128::from(self.interval_s),
            i128::from(self.rx_interval_s),
            i128::from(self.rev_l),
            i128::from(self.q3_lph),
            i128::from(self.run_min_lph),
            i128::from(self.night_min_dl),
            i128::from(self.active),
            i128::from(self.offset_min),
            i128::from(self.zero_hours),
            i128::from(self.burst_hours),
            i128::from(self.nights),
            i128::from(self.confidence),
            i128::from(self.flags),
            i128::from(self.class) | (i128::from(self.role) << 8),
        ]
    }

    /// The inverse of [`MeterDetect::words`]; `None` when a value is out of its field's range.
    pub fn from_words(w: &[i128; Self::WORDS]) -> Option<Self> {
        fn f<T: TryFrom<i128>>(v: i128) -> Option<T> {
            T::try_from(v).ok()
        }
        let [
            last_ts,
            last_ml,
            zero_since,
            base_ml,
            heard_ts,
            base_h,
            hour,
            run_start,
            burst_start,
            night_last,
            rx_lag_s,
            rev_hour,
            hour_ml,
            interval_s,
            rx_interval_s,
            rev_l,
            q3_lph,
            run_min_lph,
            night_min_dl,
            active,
            offset_min,
            zero_hours,
            burst_hours,
            nights,
            confidence,
            flags,
            class_role,
        ] = *w;
        Some(Self {
            last_ts: f(last_ts)?,
            last_ml: f(last_ml)?,
            zero_since: f(zero_since)?,
            base_ml: f(base_ml)?,
            heard_ts: f(heard_ts)?,
            base_h: f(base_h)?,
            hour: f(hour)?,
            run_start: f(run_start)?,
            burst_start: f(burst_start)?,
            night_last: f(night_last)?,
            rx_lag_s: f(rx_lag_s)?,
            rev_hour: f(rev_hour)?,
            hour_ml: f(hour_ml)?,
            interval_s: f(interval_s)?,
            rx_interval_s: f(rx_interval_s)?,
            rev_l: f(rev_l)?,
            q3_lph: f(q3_lph)?,
            run_min_lph: f(run_min_lph)?,
            night_min_dl: f(night_min_dl)?,
            active: f(active)?,
            offset_min: f(offset_min)?,
            zero_hours: f(zero_hours)?,
            burst_hours: f(burst_hours)?,
            nights: f(nights)?,
            confidence: f(confidence)?,
            flags: f(flags)?,
            class: f(class_role & 0xff)?,
            role: f(class_role >> 8)?,
            model: 0,
        })
    }

    /// A state with every persisted field random (round-trip tests).
    #[cfg(test)]
    pub(crate) fn random(rng: &mut impl rand::Rng) -> Self {
        Self {
            last_ts: rng.random(),
            last_ml: rng.random(),
            zero_since: rng.random(),
            base_ml: rng.random(),
            heard_ts: rng.random(),
            base_h: rng.random(),
            hour: rng.random(),
            run_start: rng.random(),
            burst_start: rng.random(),
            night_last: rng.random(),
            rx_lag_s: rng.random(),
            rev_hour: rng.random(),
            hour_ml: rng.random(),
            interval_s: rng.random(),
            rx_interval_s: rng.random(),
            rev_l: rng.random(),
            q3_lph: rng.random(),
            run_min_lph: rng.random(),
            night_min_dl: rng.random(),
            active: rng.random(),
            offset_min: rng.random(),
            zero_hours: rng.random(),
            burst_hours: rng.random(),
            nights: rng.random(),
            confidence: rng.random(),
            flags: rng.random(),
            class: rng.random(),
            role: rng.random(),
            model: 0,
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

fn q3_lph(q3_m3h: f64) -> u32 {
    if q3_m3h.is_finite() && q3_m3h > 0.0 {
        (q3_m3h * 1000.0).round().min(f64::from(u32::MAX)) as u32
    } else {
        2_500
    }
}

fn hour_of(ts: i64) -> i32 {
    i32::try_from((ts - 1).div_euclid(3600)).unwrap_or(NO_HOUR)
}

/// Learns a usual interval: a new delta within ±25 % of the estimate strengthens it (and moves
/// it by an eighth of the difference); any other delta weakens it, and replaces it once the
/// confidence is gone. One gap or one extra read therefore never changes the interval.
fn learn_interval(interval: &mut u32, confidence: u8, delta: i64) -> u8 {
    let d = u32::try_from(delta.clamp(60, i64::from(u32::MAX))).unwrap_or(u32::MAX);
    if *interval == 0 || confidence == 0 {
        *interval = d;
        return 1;
    }
    let c = i64::from(*interval);
    if (i64::from(d) - c).abs() * 4 <= c {
        *interval = u32::try_from(c + (i64::from(d) - c) / 8).unwrap_or(*interval);
        (confidence + 1).min(7)
    } else {
        confidence - 1
    }
}

/// All detectors of one worker (or one replay), with the state of every meter.
///
/// The states are a dense array (grown by an eighth at a time: at most 1/8 spare, see
/// [`Detectors::state_bytes`]); which slot is a meter's is kept by a [`MeterIndex`]. The live
/// worker keeps it in VEE's meter state ([`crate::vee::MeterState::detect_slot`], former padding
/// bytes) and works through [`Detectors::on`]; without VEE (`detect-replay`, tests) the
/// methods of `Detectors` itself use a map of their own. Use one or the other for a given
/// `Detectors`: states reached through one index are invisible through the other.
#[derive(Debug, Clone)]
pub struct Detectors {
    config: DetectConfig,
    states: Vec<MeterDetect>,
    /// Status-bit maps by model; index 0 (name `""`) is the configuration's `[status_bits]`.
    models: Vec<(String, config::StatusBits)>,
    /// The slots of the meters when no other index is given.
    own: OwnIndex,
}

/// Where the detectors find a meter's slot in their dense state array.
pub trait MeterIndex: Send {
    /// The meter's slot, if it has one.
    fn slot(&self, meter: &str) -> Option<u32>;
    /// Records the meter's slot.
    fn set_slot(&mut self, meter: &str, slot: u32);
    /// Calls `f` with every meter that has a slot, and the slot.
    fn each_slot(&self, f: &mut dyn FnMut(&str, u32));
}

/// The live worker's index: the slot is a field of VEE's per-meter state (no extra byte).
impl MeterIndex for crate::vee::Vee {
    fn slot(&self, meter: &str) -> Option<u32> {
        self.detect_slot(meter)
    }

    fn set_slot(&mut self, meter: &str, slot: u32) {
        self.set_detect_slot(meter, slot);
    }

    fn each_slot(&self, f: &mut dyn FnMut(&str, u32)) {
        self.each_detect_slot(f);
    }
}

/// A map of its own from meter id to slot, for detectors without VEE (`detect-replay`).
#[derive(Debug, Clone, Default)]
pub struct OwnIndex(HashMap<Box<str>, u32, foldhash::fast::RandomState>);

impl OwnIndex {
    /// Bytes of the map, counted as [`crate::vee::Vee::state_bytes`] counts VEE's map (slots
    /// of key + slot number and a control byte, the keys' heap bytes).
    pub fn bytes(&self) -> usize {
        let cap = self.0.capacity();
        let buckets = if cap == 0 {
            0
        } else {
            (cap * 8 / 7).next_power_of_two()
        };
        let slot = std::mem::size_of::<(Box<str>, u32)>() + 1;
        let keys: usize = self.0.keys().map(|k| k.len().div_ceil(16) * 16).sum();
        buckets * slot + keys
    }
}

impl MeterIndex for OwnIndex {
    fn slot(&self, meter: &str) -> Option<u32> {
        self.0.get(meter).copied()
    }

    fn set_slot(&mut self, meter: &str, slot: u32) {
        match self.0.get_mut(meter) {
            Some(s) => *s = slot,
            None => {
                self.0.insert(meter.into(), slot);
            }
        }
    }

    fn each_slot(&self, f: &mut dyn FnMut(&str, u32)) {
        for (meter, slot) in &self.0 {
            f(meter, *slot);
        }
    }
}

/// The detectors through their own map of slots: what `&mut Detectors` means where a
/// [`DetectorsOn`] is taken.
impl<'a> From<&'a mut Detectors> for DetectorsOn<'a> {
    fn from(det: &'a mut Detectors) -> Self {
        det.view()
    }
}

/// [`Detectors`] working through a given [`MeterIndex`] ([`Detectors::on`], [`Detectors::view`]).
pub struct DetectorsOn<'a> {
    config: &'a DetectConfig,
    states: &'a mut Vec<MeterDetect>,
    models: &'a mut Vec<(String, config::StatusBits)>,
    index: &'a mut dyn MeterIndex,
}

/// Converts an m³ decimal to whole millilitres.
fn to_ml(m3: Decimal) -> Option<i64> {
    (m3 * Decimal::from(1_000_000)).round().to_i64()
}

/// Output of one detector step: appends events for a meter.
struct Out<'a> {
    meter: &'a str,
    events: &'a mut Vec<AlarmEvent>,
}

impl Out<'_> {
    /// The condition holds: raise (if not active) or refresh.
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &mut self,
        st: &mut MeterDetect,
        kind: AlarmKind,
        first_seen: i64,
        at: i64,
        severity: AlarmSeverity,
        detail: &[(&str, serde_json::Value)],
    ) {
        let transition = if st.is_active(kind) {
            Transition::Seen
        } else {
            st.set_active(kind, true);
            Transition::Raised
        };
        self.events.push(AlarmEvent {
            meter: self.meter.to_owned(),
            kind,
            transition,
            severity,
            first_seen,
            at,
            detail: if transition == Transition::Raised {
                detail
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect()
            } else {
                serde_json::Map::new()
            },
        });
    }

    /// The condition no longer holds: clear it if active.
    fn release(&mut self, st: &mut MeterDetect, kind: AlarmKind, at: i64) {
        if kind == AlarmKind::Tamper || !st.is_active(kind) {
            return;
        }
        st.set_active(kind, false);
        self.events.push(AlarmEvent {
            meter: self.meter.to_owned(),
            kind,
            transition: Transition::Cleared,
            severity: AlarmSeverity::Info,
            first_seen: at,
            at,
            detail: serde_json::Map::new(),
        });
    }
}

fn json(v: impl Into<serde_json::Value>) -> serde_json::Value {
    v.into()
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

impl DetectorsOn<'_> {
    /// Sets the status-bit map of a device model (from the registry's
    /// `meter_model_status_bits`); meters whose profile names it use it from their next status
    /// word. Returns false when the table of models is full (255): the model then keeps the
    /// default map.
    pub fn set_model_bits(&mut self, model: &str, bits: config::StatusBits) -> bool {
        if model.is_empty() {
            return false;
        }
        if let Some(slot) = self.models.iter_mut().find(|(m, _)| m == model) {
            slot.1 = bits;
            return true;
        }
        if self.models.len() > usize::from(u8::MAX) {
            return false;
        }
        self.models.push((model.to_owned(), bits));
        true
    }

    fn model_index(&self, model: Option<&str>) -> u8 {
        model
            .and_then(|m| self.models.iter().position(|(name, _)| name == m))
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(0)
    }

    /// The status-bit map a meter's status words are read with.
    pub fn status_bits_of(&self, meter: &str) -> config::StatusBits {
        let i = self.state(meter).map_or(0, |s| usize::from(s.model));
        self.models
            .get(i)
            .map_or(self.config.status_bits, |(_, b)| *b)
    }

    /// Sets (or updates) a meter's profile; its detector state is kept.
    pub fn set_profile(&mut self, meter: &str, profile: &MeterProfile) {
        let class = self.config.class_index(&profile.class);
        let mut fresh = MeterDetect::new(class, profile.role, profile.q3_m3h, profile.utc_offset_s);
        fresh.model = self.model_index(profile.model.as_deref());
        let i = self.slot_or_insert(meter, || fresh);
        if let Some(st) = self.states.get_mut(i) {
            st.class = fresh.class;
            st.role = fresh.role;
            st.q3_lph = fresh.q3_lph;
            st.offset_min = fresh.offset_min;
            st.model = fresh.model;
        }
    }

    /// Returns a meter's state, if it has one.
    pub fn state(&self, meter: &str) -> Option<&MeterDetect> {
        self.slot(meter).and_then(|i| self.states.get(i))
    }

    /// Returns a meter's state for restoring (creates a default one).
    pub fn state_mut(&mut self, meter: &str) -> &mut MeterDetect {
        let default_offset = self.config.default_utc_offset_s;
        let i = self.slot_or_insert(meter, || {
            MeterDetect::new(0, Role::Customer, 2.5, default_offset)
        });
        &mut self.states[i]
    }

    /// Inserts a state restored from `detector_state`, keeping the profile fields of a state
    /// already set by [`Detectors::set_profile`].
    pub fn restore(&mut self, meter: &str, mut state: MeterDetect) {
        let i = self.slot_or_insert(meter, || state);
        if let Some(cur) = self.states.get_mut(i) {
            state.class = cur.class;
            state.role = cur.role;
            state.q3_lph = cur.q3_lph;
            state.offset_min = cur.offset_min;
            state.model = cur.model;
            *cur = state;
        }
    }

    /// Clears an active kind without an event (a person closed the alarm: it may raise again).
    pub fn forget_active(&mut self, meter: &str, kind: AlarmKind) {
        if let Some(st) = self.slot(meter).and_then(|i| self.states.get_mut(i)) {
            st.set_active(kind, false);
        }
    }

    /// Number of meters with state.
    pub fn meters(&self) -> usize {
        self.states.len()
    }

    /// The meter's slot in `states`, if it has a valid one.
    fn slot(&self, meter: &str) -> Option<usize> {
        self.index
            .slot(meter)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| *s < self.states.len())
    }

    /// The meter's slot, creating its state with `fresh` when it has none. The array grows by
    /// an eighth at a time (not doubled): at most 1/8 of it is ever spare.
    fn slot_or_insert(&mut self, meter: &str, fresh: impl FnOnce() -> MeterDetect) -> usize {
        if let Some(i) = self.slot(meter) {
            return i;
        }
        if self.states.len() == self.states.capacity() {
            self.states.reserve_exact(self.states.len() / 8 + 1);
        }
        let i = self.states.len();
        self.states.push(fresh());
        // More than u32::MAX meters cannot be indexed; such a state is used once and lost.
        if let Ok(slot) = u32::try_from(i) {
            self.index.set_slot(meter, slot);
        }
        i
    }

    /// Runs the detectors over validated readings (the live worker's batch, in any order):
    /// rejected reads are skipped except register decreases (reverse-flow evidence), estimated
    /// ones never raise or clear. Returns the alarm events in the order they happened.
    pub fn observe_readings<'r>(
        &mut self,
        readings: impl IntoIterator<Item = &'r Reading>,
    ) -> Vec<AlarmEvent> {
        let mut obs: Vec<(Observation<'r>, u32)> = Vec::new();
        for r in readings {
            if r.storage != 0 || r.tariff != 0 || r.subunit != 0 {
                continue;
            }
            let estimated = match &r.quality {
                Quality::Estimated { .. } => true,
                // A placeholder for an expected read: no value to judge, nothing billed on it.
                Quality::Missing => continue,
                Quality::Rejected { reason } => {
                    if *reason != RejectReason::RegisterDecrease {
                        continue;
                    }
                    false
                }
                Quality::Actual | Quality::Validated | Quality::Edited { .. } => false,
            };
            let (_, value) = r.unit.to_base(r.value);
            obs.push((
                Observation {
                    meter: r.meter.as_str(),
                    ts: r.ts.unix_timestamp(),
                    received: Some(r.provenance.received_at.unix_timestamp()),
                    quantity: r.quantity,
                    value,
                    estimated,
                },
                0,
            ));
        }
        // Event time order per meter, so a batch holding several hours of one meter (daily
        // NB-IoT uplinks, a gateway's replay) is judged as it happened.
        obs.sort_by(|a, b| (a.0.meter, a.0.ts).cmp(&(b.0.meter, b.0.ts)));
        // Estimates that an actual read of the same batch follows fill a gap that is already
        // closed: nothing is billed on them beyond this batch, so they cannot be a prolonged
        // estimation. Walking backwards, remember whether an actual volume read comes later.
        let mut actual_after: Option<&str> = None;
        for (o, skip) in obs.iter_mut().rev() {
            if o.quantity != Quantity::Volume {
                continue;
            }
            if actual_after != Some(o.meter) {
                actual_after = None;
            }
            if o.estimated {
                *skip = u32::from(actual_after.is_some());
            } else {
                actual_after = Some(o.meter);
            }
        }
        let mut events = Vec::new();
        for (o, skip) in &obs {
            if *skip == 0 {
                self.observe(o, &mut events);
            }
        }
        events
    }

    /// Runs the detectors over one observation, appending alarm events to `events`.
    pub fn observe(&mut self, obs: &Observation<'_>, events: &mut Vec<AlarmEvent>) {
        if obs.estimated {
            if obs.quantity == Quantity::Volume {
                self.estimated_volume(obs, events);
            }
            return;
        }
        let default_offset = self.config.default_utc_offset_s;
        let i = self.slot_or_insert(obs.meter, || {
            MeterDetect::new(0, Role::Customer, 2.5, default_offset)
        });
        let Some(st) = self.states.get_mut(i) else {
            return;
        };
        let t = self.config.thresholds(st.class).clone();
        let mut out = Out {
            meter: obs.meter,
            events,
        };
        // Anything from the meter ends a communication loss: it reported again.
        let newer_rx = obs
            .received
            .is_some_and(|r| st.heard_ts == NO_TS || r > st.heard_ts + i64::from(st.rx_lag_s));
        if obs.ts > st.heard_ts || newer_rx {
            out.release(st, AlarmKind::CommunicationLoss, obs.ts.max(st.heard_ts));
        }
        if obs.ts > st.heard_ts {
            if st.heard_ts != NO_TS {
                let c = st.confidence & 0x0f;
                let c = learn_interval(&mut st.interval_s, c, obs.ts - st.heard_ts);
                st.confidence = (st.confidence & 0xf0) | c;
            }
            if let Some(r) = obs.received {
                let prev_rx = st.heard_ts.saturating_add(i64::from(st.rx_lag_s));
                if st.heard_ts != NO_TS && r - prev_rx > 60 {
                    let c = st.confidence >> 4;
                    let c = learn_interval(&mut st.rx_interval_s, c, r - prev_rx);
                    st.confidence = (st.confidence & 0x0f) | (c << 4);
                }
                st.rx_lag_s = i32::try_from((r - obs.ts).clamp(-(1 << 30), 1 << 30)).unwrap_or(0);
            }
            st.heard_ts = obs.ts;
        }
        let hydrant = st.is_hydrant(obs.meter);
        let v = obs.value;
        let f = v.to_f64().unwrap_or(0.0);
        match obs.quantity {
            Quantity::Volume => {
                if let Some(ml) = to_ml(v) {
                    if obs.ts > st.last_ts {
                        out.release(st, AlarmKind::ProlongedEstimation, obs.ts);
                    }
                    volume(st, &t, obs.ts, ml, &mut out);
                }
            }
            Quantity::VolumeReverse => {
                let litres = (v * Decimal::from(1000)).round().to_u32().unwrap_or(NO_REV);
                if st.rev_l != NO_REV
                    && litres != NO_REV
                    && f64::from(litres.saturating_sub(st.rev_l)) > t.reverse_min_m3 * 1000.0
                {
                    let from = if st.last_ts != NO_TS && st.last_ts < obs.ts {
                        st.last_ts
                    } else {
                        obs.ts
                    };
                    st.rev_hour = hour_of(obs.ts);
                    out.hold(
                        st,
                        AlarmKind::ReverseFlow,
                        from,
                        obs.ts,
                        AlarmSeverity::Warning,
                        &[
                            ("rule", json("reverse_register")),
                            ("reverse_m3", json(f64::from(litres - st.rev_l) / 1000.0)),
                        ],
                    );
                }
                if litres != NO_REV {
                    st.rev_l = litres;
                }
            }
            Quantity::StatusWord => {
                let word = v.to_u32().unwrap_or(0);
                if hydrant {
                    let bits = self.config.hydrant_bits;
                    if bits.tilt != 0 && word & bits.tilt != 0 {
                        out.hold(
                            st,
                            AlarmKind::HydrantTilt,
                            obs.ts,
                            obs.ts,
                            AlarmSeverity::Critical,
                            &[("rule", json("status_bit")), ("status", json(word))],
                        );
                    }
                    if bits.illegal_use != 0 && word & bits.illegal_use != 0 {
                        out.hold(
                            st,
                            AlarmKind::HydrantIllegalUse,
                            obs.ts,
                            obs.ts,
                            AlarmSeverity::Critical,
                            &[("rule", json("status_bit")), ("status", json(word))],
                        );
                    }
                } else {
                    let bits = self
                        .models
                        .get(usize::from(st.model))
                        .map_or(self.config.status_bits, |(_, b)| *b);
                    status_word(st, bits, word, obs.ts, &mut out);
                }
            }
            Quantity::BatteryPercent => {
                if f < t.low_battery_pct {
                    out.hold(
                        st,
                        AlarmKind::LowBattery,
                        obs.ts,
                        obs.ts,
                        AlarmSeverity::Warning,
                        &[("battery_pct", json(f))],
                    );
                } else if f >= t.low_battery_pct + 5.0 {
                    out.release(st, AlarmKind::LowBattery, obs.ts);
                }
            }
            Quantity::ValveState => {
                if v == Decimal::from(3) {
                    out.hold(
                        st,
                        AlarmKind::ValveFault,
                        obs.ts,
                        obs.ts,
                        AlarmSeverity::Warning,
                        &[("valve_state", json(3))],
                    );
                } else {
                    out.release(st, AlarmKind::ValveFault, obs.ts);
                }
            }
            Quantity::Pressure if hydrant => {
                if f < t.hydrant_pressure_min_bar || f > t.hydrant_pressure_max_bar {
                    out.hold(
                        st,
                        AlarmKind::HydrantPressure,
                        obs.ts,
                        obs.ts,
                        AlarmSeverity::Warning,
                        &[
                            ("pressure_bar", json(f)),
                            ("min_bar", json(t.hydrant_pressure_min_bar)),
                            ("max_bar", json(t.hydrant_pressure_max_bar)),
                        ],
                    );
                } else {
                    out.release(st, AlarmKind::HydrantPressure, obs.ts);
                }
            }
            Quantity::Tilt => {
                if f.abs() >= t.hydrant_tilt_deg {
                    out.hold(
                        st,
                        AlarmKind::HydrantTilt,
                        obs.ts,
                        obs.ts,
                        AlarmSeverity::Critical,
                        &[("tilt_deg", json(f))],
                    );
                } else {
                    out.release(st, AlarmKind::HydrantTilt, obs.ts);
                }
            }
            Quantity::OutletState if v.is_zero() => {
                out.release(st, AlarmKind::HydrantIllegalUse, obs.ts);
            }
            _ => {}
        }
    }

    /// An estimated register read: the only thing it may raise is `prolonged_estimation`, when
    /// it reaches `prolonged_estimation_days` past the meter's last actual read (an actual read
    /// clears it). It changes no other detector's state.
    fn estimated_volume(&mut self, obs: &Observation<'_>, events: &mut Vec<AlarmEvent>) {
        let Some(st) = self.slot(obs.meter).and_then(|i| self.states.get_mut(i)) else {
            return;
        };
        if st.last_ts == NO_TS || obs.ts <= st.last_ts {
            return;
        }
        let t = self.config.thresholds(st.class);
        let days = (obs.ts - st.last_ts) as f64 / 86_400.0;
        if days >= t.prolonged_estimation_days {
            let mut out = Out {
                meter: obs.meter,
                events,
            };
            out.hold(
                st,
                AlarmKind::ProlongedEstimation,
                st.last_ts,
                obs.ts,
                AlarmSeverity::Warning,
                &[
                    ("rule", json("estimated_beyond_last_actual")),
                    ("estimated_days", json(round1(days))),
                ],
            );
        }
    }

    /// Judges silence: raises `communication_loss` for every meter silent for longer than
    /// `comm_intervals` usual intervals before `now` (event time or receive time, see
    /// [`SweepClock`]), and refreshes the ones already raised. `first_seen` is the event time of
    /// the meter's last observation (when the silence began).
    pub fn sweep(&mut self, now: i64, clock: SweepClock, events: &mut Vec<AlarmEvent>) {
        let config = self.config;
        let states = &mut *self.states;
        self.index.each_slot(&mut |meter, slot| {
            let Some(st) = usize::try_from(slot).ok().and_then(|i| states.get_mut(i)) else {
                return;
            };
            if st.heard_ts == NO_TS {
                return;
            }
            let t = config.thresholds(st.class);
            let default = (t.comm_default_interval_h * 3600.0) as i64;
            let event_interval = if st.interval_s > 0 && st.confidence & 0x0f > 0 {
                i64::from(st.interval_s)
            } else {
                default
            };
            let (last, interval) = match clock {
                SweepClock::Event => (st.heard_ts, event_interval),
                SweepClock::Received => (
                    st.heard_ts.saturating_add(i64::from(st.rx_lag_s)),
                    event_interval.max(i64::from(st.rx_interval_s)),
                ),
            };
            let limit = (t.comm_intervals * interval as f64) as i64;
            if now - last > limit {
                let mut out = Out {
                    meter,
                    events: &mut *events,
                };
                out.hold(
                    st,
                    AlarmKind::CommunicationLoss,
                    st.heard_ts,
                    now,
                    AlarmSeverity::Warning,
                    &[
                        ("silent_s", json(now - last)),
                        ("usual_interval_s", json(interval)),
                    ],
                );
            }
        });
    }
}

impl Detectors {
    /// Creates detectors with no meter state.
    pub fn new(config: DetectConfig) -> Self {
        let default_bits = config.status_bits;
        Self {
            config,
            states: Vec::new(),
            models: vec![(String::new(), default_bits)],
            own: OwnIndex::default(),
        }
    }

    /// The detectors working through `index` for the meters' slots (the live worker passes its
    /// [`crate::vee::Vee`]).
    pub fn on<'a>(&'a mut self, index: &'a mut dyn MeterIndex) -> DetectorsOn<'a> {
        DetectorsOn {
            config: &self.config,
            states: &mut self.states,
            models: &mut self.models,
            index,
        }
    }

    /// The detectors working through their own map of slots (no VEE).
    pub fn view(&mut self) -> DetectorsOn<'_> {
        DetectorsOn {
            config: &self.config,
            states: &mut self.states,
            models: &mut self.models,
            index: &mut self.own,
        }
    }

    /// Returns the configuration.
    pub fn config(&self) -> &DetectConfig {
        &self.config
    }

    /// Number of meters with state.
    pub fn meters(&self) -> usize {
        self.states.len()
    }

    /// Bytes held for detector state: the dense array's capacity (grown by an eighth at a
    /// time, so at most 1/8 more than its length, plus one). The index is not counted: in the
    /// worker it is VEE's map (no byte added); without VEE see [`Detectors::own_index_bytes`].
    pub fn state_bytes(&self) -> usize {
        self.states.capacity() * std::mem::size_of::<MeterDetect>()
    }

    /// Bytes of the map of slots used without VEE (`detect-replay`; 0 in the worker).
    pub fn own_index_bytes(&self) -> usize {
        self.own.bytes()
    }

    /// Sets a device model's status-bit map: [`DetectorsOn::set_model_bits`].
    pub fn set_model_bits(&mut self, model: &str, bits: config::StatusBits) -> bool {
        self.view().set_model_bits(model, bits)
    }

    /// [`DetectorsOn::status_bits_of`] with the own map.
    pub fn status_bits_of(&self, meter: &str) -> config::StatusBits {
        let i = self.state(meter).map_or(0, |s| usize::from(s.model));
        self.models
            .get(i)
            .map_or(self.config.status_bits, |(_, b)| *b)
    }

    /// [`DetectorsOn::set_profile`] with the own map.
    pub fn set_profile(&mut self, meter: &str, profile: &MeterProfile) {
        self.view().set_profile(meter, profile);
    }

    /// Returns a meter's state (own map), if it has one.
    pub fn state(&self, meter: &str) -> Option<&MeterDetect> {
        self.own
            .slot(meter)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.states.get(i))
    }

    /// [`DetectorsOn::state_mut`] with the own map.
    pub fn state_mut(&mut self, meter: &str) -> &mut MeterDetect {
        let default_offset = self.config.default_utc_offset_s;
        let i = self.view().slot_or_insert(meter, || {
            MeterDetect::new(0, Role::Customer, 2.5, default_offset)
        });
        &mut self.states[i]
    }

    /// [`DetectorsOn::restore`] with the own map.
    pub fn restore(&mut self, meter: &str, state: MeterDetect) {
        self.view().restore(meter, state);
    }

    /// [`DetectorsOn::forget_active`] with the own map.
    pub fn forget_active(&mut self, meter: &str, kind: AlarmKind) {
        self.view().forget_active(meter, kind);
    }

    /// [`DetectorsOn::observe_readings`] with the own map.
    pub fn observe_readings<'r>(
        &mut self,
        readings: impl IntoIterator<Item = &'r Reading>,
    ) -> Vec<AlarmEvent> {
        self.view().observe_readings(readings)
    }

    /// [`DetectorsOn::observe`] with the own map.
    pub fn observe(&mut self, obs: &Observation<'_>, events: &mut Vec<AlarmEvent>) {
        self.view().observe(obs, events);
    }

    /// [`DetectorsOn::sweep`] with the own map.
    pub fn sweep(&mut self, now: i64, clock: SweepClock, events: &mut Vec<AlarmEvent>) {
        self.view().sweep(now, clock, events);
    }
}

fn status_word(
    st: &mut MeterDetect,
    bits: config::StatusBits,
    word: u32,
    ts: i64,
    out: &mut Out<'_>,
) {
    let rule = [("rule", json("status_bit")), ("status", json(word))];
    if bits.tamper != 0 && word & bits.tamper != 0 {
        out.hold(
            st,
            AlarmKind::Tamper,
            ts,
            ts,
            AlarmSeverity::Critical,
            &rule,
        );
    }
    // Each configured bit holds its alarm while set and releases it once clear (a bit mask of
    // 0 means the model has no such bit). The valve fault is the two-bit pattern itself.
    let flags = [
        (
            bits.low_battery,
            word & bits.low_battery != 0,
            AlarmKind::LowBattery,
        ),
        (
            bits.empty_pipe,
            word & bits.empty_pipe != 0,
            AlarmKind::EmptyPipe,
        ),
        (
            bits.valve_fault,
            word & bits.valve_fault == bits.valve_fault,
            AlarmKind::ValveFault,
        ),
    ];
    for (mask, set, kind) in flags {
        if mask == 0 {
            continue;
        }
        if set {
            out.hold(st, kind, ts, ts, AlarmSeverity::Warning, &rule);
        } else {
            out.release(st, kind, ts);
        }
    }
    if bits.reverse_flow != 0 && word & bits.reverse_flow != 0 {
        // The bit covers the step that ended at this read; the volume detector clears it.
        let from = if st.last_ts != NO_TS && st.last_ts < ts {
            st.last_ts
        } else {
            ts.saturating_sub(i64::from(st.interval_s.max(3600)))
        };
        st.rev_hour = hour_of(ts);
        out.hold(
            st,
            AlarmKind::ReverseFlow,
            from,
            ts,
            AlarmSeverity::Warning,
            &rule,
        );
    }
}

/// Severity of a leak by its rate.
fn leak_severity(t: &Thresholds, lph: f64) -> AlarmSeverity {
    if lph >= t.leak_critical_lph {
        AlarmSeverity::Critical
    } else if lph >= t.leak_warning_lph {
        AlarmSeverity::Warning
    } else {
        AlarmSeverity::Info
    }
}

/// Handles one volume register read.
fn volume(st: &mut MeterDetect, t: &Thresholds, ts: i64, ml: i64, out: &mut Out<'_>) {
    if st.last_ts == NO_TS {
        reset_history(st, ts, ml);
        st.last_ts = ts;
        st.last_ml = ml;
        return;
    }
    if ts <= st.last_ts {
        // A duplicate or a late read: the span is already judged.
        return;
    }
    let dt = ts - st.last_ts;
    let delta = ml - st.last_ml;
    // Largest volume the meter can pass in dt (Q4 = 1.25 × Q3), plus 10 L of resolution.
    let max_ml = (f64::from(st.q3_lph) * t.max_flow_factor * dt as f64 / 3.6) as i64 + 10_000;
    let reverse_min_ml = (t.reverse_min_m3 * 1e6) as i64;
    let h = hour_of(ts);
    if delta < 0 {
        let dec = -delta;
        if dec > max_ml {
            // A register reset (replacement, rollover, a swapped meter): not flow.
            reset_history(st, ts, ml);
        } else if dec > reverse_min_ml && !off_grid(st, dt) {
            st.rev_hour = h;
            out.hold(
                st,
                AlarmKind::ReverseFlow,
                st.last_ts,
                ts,
                AlarmSeverity::Warning,
                &[
                    ("rule", json("register_decrease")),
                    ("decrease_m3", json(dec as f64 / 1e6)),
                ],
            );
            mark_unknown(st, h);
        } else {
            // Jitter below the threshold: keep the higher register as the baseline (so a slow
            // reverse flow still adds up), count the step as no consumption.
            st.last_ts = ts;
            hour_step(st, t, ts, dt, 0, out);
            return;
        }
        st.last_ts = ts;
        st.last_ml = ml;
        return;
    }
    if delta > max_ml {
        // Impossible usage (a jump, a wrong register): start a new history.
        reset_history(st, ts, ml);
        st.last_ts = ts;
        st.last_ml = ml;
        return;
    }
    // Reverse flow ends once a step without evidence follows the last evidence.
    if st.is_active(AlarmKind::ReverseFlow) && h > st.rev_hour.saturating_add(1) {
        out.release(st, AlarmKind::ReverseFlow, st.last_ts);
    }
    // Stopped meter: zero consumption for stopped_days on a meter that used to consume.
    if delta > 0 {
        out.release(st, AlarmKind::StoppedMeter, ts);
        st.zero_since = ts;
    } else if st.zero_since != NO_TS {
        let zero_s = ts - st.zero_since;
        let history_s = st.zero_since - i64::from(st.base_h) * 3600;
        if zero_s as f64 >= t.stopped_days * 86_400.0 && history_s >= 86_400 {
            let adu_m3 = (ml - st.base_ml) as f64 / 1e6 / (history_s as f64 / 86_400.0);
            if adu_m3 >= t.stopped_min_adu_m3 {
                out.hold(
                    st,
                    AlarmKind::StoppedMeter,
                    st.zero_since,
                    ts,
                    AlarmSeverity::Warning,
                    &[
                        ("zero_days", json(round1(zero_s as f64 / 86_400.0))),
                        ("adu_m3", json((adu_m3 * 1000.0).round() / 1000.0)),
                    ],
                );
            }
        }
    }
    st.last_ts = ts;
    st.last_ml = ml;
    hour_step(st, t, ts, dt, delta, out);
}

/// True when a step is shorter than three quarters of the meter's usual interval: a read off its grid, as a
/// meter clock that jumped back produces (its reads sort before older, higher registers). A
/// decrease over such a step is misordering, not flow.
fn off_grid(st: &MeterDetect, dt: i64) -> bool {
    st.interval_s > 0 && st.confidence & 0x0f >= 3 && dt * 4 < 3 * i64::from(st.interval_s)
}

/// Starts a new usage history at a read (first read, register reset, impossible jump).
fn reset_history(st: &mut MeterDetect, ts: i64, ml: i64) {
    st.base_h = hour_of(ts).saturating_add(1);
    st.base_ml = ml;
    st.zero_since = ts;
    st.run_start = NO_HOUR;
    st.run_min_lph = u16::MAX;
    st.burst_hours = 0;
    st.flags &= !FLAG_NIGHT;
    st.hour = hour_of(ts);
    st.hour_ml = 0;
    st.flags |= FLAG_PARTIAL;
    st.flags &= !FLAG_EMPTY;
}

/// The current hour bucket cannot be judged (part of it is unknown).
fn mark_unknown(st: &mut MeterDetect, h: i32) {
    if h != st.hour {
        st.hour = h;
        st.hour_ml = 0;
    }
    st.flags |= FLAG_PARTIAL;
    st.flags &= !FLAG_EMPTY;
}

/// Accounts a non-negative step of `delta` mL over `dt` seconds ending at `ts`.
fn hour_step(
    st: &mut MeterDetect,
    t: &Thresholds,
    ts: i64,
    dt: i64,
    delta: i64,
    out: &mut Out<'_>,
) {
    let h = hour_of(ts);
    let delta_u = u32::try_from(delta).unwrap_or(u32::MAX);
    if dt <= FINE_STEP_S {
        if h == st.hour {
            st.hour_ml = st.hour_ml.saturating_add(delta_u);
            st.flags &= !FLAG_EMPTY;
            close_on_boundary(st, t, ts, out);
            return;
        }
        if st.hour != NO_HOUR && h > st.hour {
            let full = st.flags & (FLAG_PARTIAL | FLAG_EMPTY) == 0;
            finish_hour(st, t, st.hour, st.hour_ml, full, out);
            // Hours with no read at all in between are unknown.
            let mut missing = st.hour.saturating_add(1);
            while missing < h {
                finish_hour(st, t, missing, 0, false, out);
                missing += 1;
            }
        }
        st.hour = h;
        st.hour_ml = delta_u;
        st.flags &= !(FLAG_PARTIAL | FLAG_EMPTY);
        close_on_boundary(st, t, ts, out);
        return;
    }
    // A coarse step: close the current hour (unless no step reached it yet: the coarse step
    // covers it), then judge what a multi-hour step can tell.
    if st.hour != NO_HOUR && h > st.hour && st.flags & FLAG_EMPTY == 0 {
        let full = st.flags & FLAG_PARTIAL == 0;
        finish_hour(st, t, st.hour, st.hour_ml, full, out);
    }
    let hours = dt.div_euclid(3600) + i64::from(dt.rem_euclid(3600) != 0);
    st.burst_hours = 0;
    if hours >= 24 {
        st.nights = 0;
    }
    st.flags &= !FLAG_NIGHT;
    if delta == 0 {
        st.run_start = NO_HOUR;
        st.run_min_lph = u16::MAX;
        st.zero_hours = st
            .zero_hours
            .saturating_add(u8::try_from(hours).unwrap_or(u8::MAX));
        if u32::from(st.zero_hours) >= t.leak_clear_zero_hours && st.nights == 0 {
            out.release(st, AlarmKind::Leak, ts);
        }
    } else if hours > 3 {
        // Flow over a long gap proves nothing about every hour in it.
        st.run_start = NO_HOUR;
        st.run_min_lph = u16::MAX;
    }
    st.hour = h;
    st.hour_ml = 0;
    st.flags |= FLAG_PARTIAL;
    st.flags &= !FLAG_EMPTY;
    if ts.rem_euclid(3600) == 0 {
        // The coarse step covered this hour to its end: the next one starts clean.
        st.hour = h.saturating_add(1);
        st.flags &= !FLAG_PARTIAL;
        st.flags |= FLAG_EMPTY;
    }
}

/// A read exactly at the end of the current hour completes it: judge it now rather than at the
/// next read (an hourly meter's burst is raised with the read that shows it).
fn close_on_boundary(st: &mut MeterDetect, t: &Thresholds, ts: i64, out: &mut Out<'_>) {
    if ts.rem_euclid(3600) != 0 || st.flags & FLAG_PARTIAL != 0 {
        return;
    }
    finish_hour(st, t, st.hour, st.hour_ml, true, out);
    st.hour = st.hour.saturating_add(1);
    st.hour_ml = 0;
    st.flags |= FLAG_EMPTY;
}

/// Judges one closed hour: continuous flow, burst and night flow.
fn finish_hour(
    st: &mut MeterDetect,
    t: &Thresholds,
    h: i32,
    ml: u32,
    full: bool,
    out: &mut Out<'_>,
) {
    let local = st.local_hour(h);
    let night_measured = st.flags & FLAG_NIGHT != 0;
    st.flags &= !FLAG_NIGHT;
    if !full {
        st.burst_hours = 0;
        return;
    }
    let end = (i64::from(h) + 1) * 3600;
    let litres = f64::from(ml) / 1000.0;
    // Continuous flow.
    if ml > 0 {
        st.zero_hours = 0;
        if st.run_start == NO_HOUR {
            st.run_start = h;
            st.run_min_lph = u16::MAX;
        }
        st.run_min_lph = st
            .run_min_lph
            .min(u16::try_from(ml / 1000).unwrap_or(u16::MAX));
        let hours = i64::from(h) + 1 - i64::from(st.run_start);
        if hours >= i64::from(t.leak_hours) && st.judges_leaks() {
            let lph = f64::from(st.run_min_lph);
            out.hold(
                st,
                AlarmKind::Leak,
                i64::from(st.run_start) * 3600,
                end,
                leak_severity(t, lph),
                &[
                    ("rule", json("continuous_flow")),
                    ("hours", json(hours)),
                    ("min_lph", json(lph)),
                ],
            );
        }
    } else {
        st.run_start = NO_HOUR;
        st.run_min_lph = u16::MAX;
        st.zero_hours = st.zero_hours.saturating_add(1);
        // A leak raised on night flow stays until a night is quiet again.
        if u32::from(st.zero_hours) >= t.leak_clear_zero_hours && st.nights == 0 {
            out.release(st, AlarmKind::Leak, end);
        }
    }
    // Burst: hourly consumption at least a share of Q3 for consecutive hours.
    if litres >= t.burst_q3_share * f64::from(st.q3_lph) {
        if st.burst_hours == 0 {
            st.burst_start = h;
        }
        st.burst_hours = st.burst_hours.saturating_add(1);
        if u32::from(st.burst_hours) >= t.burst_hours {
            let severity = if litres >= f64::from(st.q3_lph) {
                AlarmSeverity::Critical
            } else {
                AlarmSeverity::Warning
            };
            out.hold(
                st,
                AlarmKind::Burst,
                i64::from(st.burst_start) * 3600,
                end,
                severity,
                &[
                    ("rule", json("hourly_share_of_q3")),
                    ("lph", json(litres)),
                    ("q3_lph", json(st.q3_lph)),
                ],
            );
        }
    } else {
        st.burst_hours = 0;
        out.release(st, AlarmKind::Burst, i64::from(h) * 3600);
    }
    // Minimum night flow: the smaller of the local 02:00 and 03:00 hours.
    if local == 2 {
        st.flags |= FLAG_NIGHT;
        st.night_min_dl = u16::try_from(ml / 100).unwrap_or(u16::MAX);
    } else if local == 3 && night_measured {
        let min_lph = (f64::from(ml) / 1000.0).min(f64::from(st.night_min_dl) / 10.0);
        if min_lph > t.night_flow_lph {
            let night = h - 1;
            if st.nights > 0 && st.night_last == night - 24 {
                st.nights = st.nights.saturating_add(1);
            } else {
                st.nights = 1;
            }
            st.night_last = night;
            if u32::from(st.nights) >= t.night_nights && st.judges_leaks() {
                let first_night = i64::from(night) - 24 * (i64::from(st.nights) - 1);
                let first = match st.run_start {
                    NO_HOUR => first_night,
                    r => i64::from(r).min(first_night),
                };
                out.hold(
                    st,
                    AlarmKind::Leak,
                    first * 3600,
                    end,
                    leak_severity(t, min_lph),
                    &[
                        ("rule", json("night_flow")),
                        ("nights", json(st.nights)),
                        ("min_night_lph", json(min_lph)),
                    ],
                );
            }
        } else {
            st.nights = 0;
        }
    }
}

/// The topic alarms are published on for consumers (`docs/detectors.md`): `{root}/alarms`,
/// QoS 1, one `model::Alarm` JSON per raise and per auto-close, after the commit.
pub fn alarms_topic(root: &str) -> String {
    format!("{root}/alarms")
}

/// Runs the detectors over a validated batch and returns what its transaction must write: the
/// events and the states of the meters the batch touched.
pub fn batch_write<'d>(det: impl Into<DetectorsOn<'d>>, readings: &[Reading]) -> store::AlarmWrite {
    let mut det = det.into();
    let events = det.observe_readings(readings);
    let mut touched: Vec<&str> = readings.iter().map(|r| r.meter.as_str()).collect();
    touched.sort_unstable();
    touched.dedup();
    let states = touched
        .into_iter()
        .filter_map(|m| det.state(m).map(|s| (Box::<str>::from(m), *s)))
        .collect();
    store::AlarmWrite { events, states }
}

/// What the live worker's communication-loss sweep takes as "now" (`pipeline run
/// --sweep-clock`, docs/detectors.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SweepNow {
    /// The wall clock, against each meter's receive times and uplink cadence (production).
    #[default]
    Wall,
    /// The newest meter- or platform-clock timestamp the worker has validated (not a gateway's
    /// receive time, not rejected, not after the wall clock): for a fleet that replays or simulates time faster than the clock (`run-demo.sh`),
    /// where silence against the wall clock never exceeds three usual intervals.
    EventTime,
}

/// Runs the communication-loss sweep against the wall clock; returns what to write.
pub fn sweep_write<'d>(det: impl Into<DetectorsOn<'d>>) -> store::AlarmWrite {
    sweep_write_at(
        det,
        time::OffsetDateTime::now_utc().unix_timestamp(),
        SweepClock::Received,
    )
}

/// Runs the communication-loss sweep at `now` (unix seconds) on `clock`; returns what to write.
pub fn sweep_write_at<'d>(
    det: impl Into<DetectorsOn<'d>>,
    now: i64,
    clock: SweepClock,
) -> store::AlarmWrite {
    let mut det = det.into();
    let mut events = Vec::new();
    det.sweep(now, clock, &mut events);
    let mut meters: Vec<&str> = events.iter().map(|e| e.meter.as_str()).collect();
    meters.sort_unstable();
    meters.dedup();
    let states = meters
        .into_iter()
        .filter_map(|m| det.state(m).map(|s| (Box::<str>::from(m), *s)))
        .collect();
    store::AlarmWrite { events, states }
}

/// The messages announcing raises and clears (not refreshes) on [`alarms_topic`], to publish
/// after their commit. Best effort: the `alarms` table is the record; a consumer that missed a
/// message reads it there.
pub fn alarm_messages(events: &[AlarmEvent]) -> Vec<Vec<u8>> {
    let at = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    events
        .iter()
        .filter(|e| e.transition != Transition::Seen)
        .filter_map(|e| {
            let meter = model::MeterId::new(e.meter.clone()).ok()?;
            let alarm = model::Alarm {
                meter,
                kind: e.kind,
                severity: e.severity,
                raised_at: at(e.first_seen),
                cleared_at: (e.transition == Transition::Cleared).then(|| at(e.at)),
                detail: e.detail.clone(),
            };
            serde_json::to_vec(&alarm).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests;
