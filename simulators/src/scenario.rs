//! Scenario files: a seeded fleet, a time span and the faults injected into it.
//!
//! A scenario is TOML (or JSON, the same serde form). It is deterministic: the same file
//! always produces the same readings, frames and ground truth. See `docs/simulators.md` for
//! the format and `simulators/scenarios/*.toml` for examples.

use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read scenario {path}")]
    Io {
        /// File path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse into a scenario.
    #[error("scenario {path} is not valid TOML for a scenario")]
    Toml {
        /// File path.
        path: String,
        /// Cause (carries line and column).
        #[source]
        source: toml::de::Error,
    },
    /// The scenario parsed but is inconsistent.
    #[error("scenario {name}: {field}: {problem}")]
    Invalid {
        /// Scenario name.
        name: String,
        /// Field path (`faults[2].meter`).
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
}

/// A complete scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (used in truth output and topic prefixes).
    pub name: String,
    /// What the scenario exercises.
    #[serde(default)]
    pub description: String,
    /// Seed of every random draw.
    pub seed: u64,
    /// Start of simulated time (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Length of the run in days.
    pub days: u32,
    /// Simulation step and reading interval, in minutes (divides a day; divides 60 or is a
    /// multiple of 60).
    #[serde(default = "default_interval")]
    pub interval_minutes: u32,
    /// Local time offset of the customers in hours (China: +8), for the diurnal curve.
    #[serde(default = "default_utc_offset")]
    pub utc_offset_hours: i8,
    /// The population.
    pub fleet: FleetSpec,
    /// Faults injected, in any order.
    #[serde(default)]
    pub faults: Vec<Fault>,
}

const fn default_interval() -> u32 {
    60
}
const fn default_utc_offset() -> i8 {
    8
}

/// The simulated population of meters and district metered areas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// Household meters (indices `0..households`).
    pub households: u32,
    /// Commercial meters (indices after the households).
    #[serde(default)]
    pub commercial: u32,
    /// Number of district metered areas; meter `i` is in DMA `i % dmas`.
    #[serde(default = "default_dmas")]
    pub dmas: u32,
    /// Background (unreported) network leakage per DMA, litres per hour.
    #[serde(default)]
    pub background_loss_lph: f64,
    /// Register capacity in m³ (the register wraps to zero there): 100 000 for 5 integer digits.
    #[serde(default = "default_capacity")]
    pub register_capacity_m3: u64,
    /// The last `mbus_meters` meters are addressed as M-Bus / wM-Bus meters (`mbus:SIM…`)
    /// instead of CJ/T 188.
    #[serde(default)]
    pub mbus_meters: u32,
}

const fn default_dmas() -> u32 {
    1
}
const fn default_capacity() -> u64 {
    100_000
}

impl FleetSpec {
    /// Returns the total number of meters.
    pub fn meters(&self) -> u32 {
        self.households.saturating_add(self.commercial)
    }
}

/// A fault injected into one meter (or one DMA), with the time it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Customer-side continuous leak: constant extra flow through the meter.
    Leak {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End (open-ended when absent).
        #[serde(default, with = "time::serde::rfc3339::option")]
        until: Option<OffsetDateTime>,
        /// Leak flow, litres per hour.
        rate_lph: f64,
    },
    /// Customer-side burst: high flow through the meter for a bounded time.
    Burst {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
        /// Burst flow, litres per hour.
        rate_lph: f64,
    },
    /// Network main burst inside a DMA: a loss seen only in the DMA balance.
    MainsBurst {
        /// DMA index.
        dma: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
        /// Lost flow, litres per hour.
        rate_lph: f64,
    },
    /// Reverse flow: the register runs backwards at a rate.
    ReverseFlow {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
        /// Reverse flow, litres per hour.
        rate_lph: f64,
    },
    /// Magnetic tamper: the tamper status bit is set and the meter under-registers.
    MagneticTamper {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// Share of true flow still registered (0.0–1.0).
        #[serde(default = "default_registered_share")]
        registered_share: f64,
    },
    /// The meter mechanism stops: water still flows, the register no longer advances.
    MeterStopped {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
    },
    /// The battery declines linearly to empty.
    BatteryDecline {
        /// Meter index.
        meter: u32,
        /// Start of the decline.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// Days from `from` until the battery reads 0 %.
        days_to_empty: f64,
    },
    /// No frame from the meter reaches the gateway.
    CommLoss {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The meter's clock is off by a fixed amount.
    ClockSkew {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End (open-ended when absent).
        #[serde(default, with = "time::serde::rfc3339::option")]
        until: Option<OffsetDateTime>,
        /// Offset added to the meter's timestamps, seconds (negative = behind).
        skew_s: i64,
    },
    /// Every frame in the span is delivered twice.
    DuplicateFrames {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// Consecutive frames in the span are delivered pairwise swapped.
    OutOfOrder {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// Frames in the span are corrupted in transit (one byte flipped: checksum fails).
    CorruptedFrames {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The register starts this close to its capacity, so it wraps during the run.
    RegisterRollover {
        /// Meter index.
        meter: u32,
        /// Headroom below capacity at the start of the run, m³.
        headroom_m3: f64,
    },
    /// Legitimate extra use (garden watering, a busy day): extra flow through the meter that no
    /// detector should report (no truth event; a false-positive trap).
    ExtraUse {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
        /// Extra flow, litres per hour.
        rate_lph: f64,
    },
    /// The occupants are away (a vacation): no use at all, no truth event (a trap for the
    /// stopped-meter detector).
    Absence {
        /// Meter index.
        meter: u32,
        /// Start.
        #[serde(with = "time::serde::rfc3339")]
        from: OffsetDateTime,
        /// End.
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// One reading is lost on the link (the frame of the step starting at `at`); no truth
    /// event (a trap for the communication-loss detector).
    DroppedRead {
        /// Meter index.
        meter: u32,
        /// Start of the step whose frame is lost.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// The meter is replaced: the register restarts at `new_register_m3`.
    MeterReplacement {
        /// Meter index.
        meter: u32,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        /// Register of the new meter, m³.
        #[serde(default)]
        new_register_m3: f64,
    },
}

const fn default_registered_share() -> f64 {
    0.5
}

impl Fault {
    /// Returns the meter index the fault applies to (`None` for DMA faults).
    pub fn meter(&self) -> Option<u32> {
        match self {
            Self::Leak { meter, .. }
            | Self::Burst { meter, .. }
            | Self::ReverseFlow { meter, .. }
            | Self::MagneticTamper { meter, .. }
            | Self::MeterStopped { meter, .. }
            | Self::BatteryDecline { meter, .. }
            | Self::CommLoss { meter, .. }
            | Self::ClockSkew { meter, .. }
            | Self::DuplicateFrames { meter, .. }
            | Self::OutOfOrder { meter, .. }
            | Self::CorruptedFrames { meter, .. }
            | Self::RegisterRollover { meter, .. }
            | Self::ExtraUse { meter, .. }
            | Self::Absence { meter, .. }
            | Self::DroppedRead { meter, .. }
            | Self::MeterReplacement { meter, .. } => Some(*meter),
            Self::MainsBurst { .. } => None,
        }
    }

    /// Returns the snake_case kind name as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Leak { .. } => "leak",
            Self::Burst { .. } => "burst",
            Self::MainsBurst { .. } => "mains_burst",
            Self::ReverseFlow { .. } => "reverse_flow",
            Self::MagneticTamper { .. } => "magnetic_tamper",
            Self::MeterStopped { .. } => "meter_stopped",
            Self::BatteryDecline { .. } => "battery_decline",
            Self::CommLoss { .. } => "comm_loss",
            Self::ClockSkew { .. } => "clock_skew",
            Self::DuplicateFrames { .. } => "duplicate_frames",
            Self::OutOfOrder { .. } => "out_of_order",
            Self::CorruptedFrames { .. } => "corrupted_frames",
            Self::RegisterRollover { .. } => "register_rollover",
            Self::MeterReplacement { .. } => "meter_replacement",
            Self::ExtraUse { .. } => "extra_use",
            Self::Absence { .. } => "absence",
            Self::DroppedRead { .. } => "dropped_read",
        }
    }
}

impl Scenario {
    /// Parses a scenario from TOML text; `origin` names it in errors.
    ///
    /// # Errors
    /// Returns [`ScenarioError::Toml`] on syntax or shape errors and
    /// [`ScenarioError::Invalid`] when the content is inconsistent.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let scenario: Self = toml::from_str(text).map_err(|source| ScenarioError::Toml {
            path: origin.to_owned(),
            source,
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Loads and validates a scenario file.
    ///
    /// # Errors
    /// Returns [`ScenarioError`] when the file cannot be read, parsed or validated.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: origin.clone(),
            source,
        })?;
        Self::from_toml(&text, &origin)
    }

    /// Serialises the scenario back to TOML.
    ///
    /// # Errors
    /// Returns the serialiser's error (not expected for a validated scenario).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Returns the end of simulated time.
    pub fn end(&self) -> OffsetDateTime {
        self.start + time::Duration::days(i64::from(self.days))
    }

    /// A scenario with `meters` households and no faults, for back-fill runs and benches.
    pub fn plain(meters: u32, days: u32, seed: u64, start: OffsetDateTime) -> Self {
        let households = meters - meters / 10;
        Self {
            name: format!("plain-{meters}"),
            description: "households and shops without faults".into(),
            seed,
            start,
            days,
            interval_minutes: default_interval(),
            utc_offset_hours: default_utc_offset(),
            fleet: FleetSpec {
                households,
                commercial: meters - households,
                dmas: (meters / 2_000).max(1),
                // About 2 L/h per service connection: 5-8 % non-revenue water depending on
                // the season, below CJJ 92's grade-1 limit of 10 %.
                background_loss_lph: 2.0 * f64::from(meters.min(2_000)),
                register_capacity_m3: default_capacity(),
                mbus_meters: 0,
            },
            faults: Vec::new(),
        }
    }

    /// Checks the scenario is consistent, collecting every problem into one error.
    ///
    /// # Errors
    /// Returns [`ScenarioError::Invalid`] listing every problem found.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let meters = self.fleet.meters();
        if meters == 0 {
            problems.push((
                "fleet".into(),
                "has no meters (expected households > 0)".into(),
            ));
        }
        if self.fleet.dmas == 0 {
            problems.push(("fleet.dmas".into(), "is 0 (expected at least 1)".into()));
        }
        if self.fleet.mbus_meters > meters {
            problems.push((
                "fleet.mbus_meters".into(),
                format!(
                    "{} is more than the {meters} meters",
                    self.fleet.mbus_meters
                ),
            ));
        }
        if self.fleet.register_capacity_m3 == 0 {
            problems.push(("fleet.register_capacity_m3".into(), "is 0".into()));
        }
        if self.days == 0 {
            problems.push(("days".into(), "is 0 (expected at least 1)".into()));
        }
        let m = self.interval_minutes;
        if m == 0 || !1440u32.is_multiple_of(m) || (m > 60 && !m.is_multiple_of(60)) {
            problems.push((
                "interval_minutes".into(),
                format!("{m} (expected a divisor of 1440 that divides 60 or is a multiple of 60)"),
            ));
        }
        let end = self.end();
        for (i, fault) in self.faults.iter().enumerate() {
            if let Some(meter) = fault.meter()
                && meter >= meters
            {
                problems.push((
                    format!("faults[{i}].meter"),
                    format!("{meter} is not a meter index (0..{meters})"),
                ));
            }
            if let Fault::MainsBurst { dma, .. } = fault
                && *dma >= self.fleet.dmas
            {
                problems.push((
                    format!("faults[{i}].dma"),
                    format!("{dma} is not a DMA index (0..{})", self.fleet.dmas),
                ));
            }
            let (from, until) = fault_span(fault);
            if let Some(from) = from
                && (from < self.start || from >= end)
            {
                problems.push((
                    format!("faults[{i}].from"),
                    format!("{from} is outside the run {} .. {end}", self.start),
                ));
            }
            if let (Some(from), Some(until)) = (from, until)
                && until <= from
            {
                problems.push((format!("faults[{i}].until"), "is not after `from`".into()));
            }
            let rate = match fault {
                Fault::Leak { rate_lph, .. }
                | Fault::Burst { rate_lph, .. }
                | Fault::MainsBurst { rate_lph, .. }
                | Fault::ReverseFlow { rate_lph, .. }
                | Fault::ExtraUse { rate_lph, .. } => Some(*rate_lph),
                _ => None,
            };
            if let Some(rate) = rate
                && !(rate.is_finite() && rate > 0.0)
            {
                problems.push((
                    format!("faults[{i}].rate_lph"),
                    format!("{rate} (expected > 0)"),
                ));
            }
            match fault {
                Fault::MagneticTamper {
                    registered_share, ..
                } if !(0.0..=1.0).contains(registered_share) => problems.push((
                    format!("faults[{i}].registered_share"),
                    format!("{registered_share} (expected 0.0..=1.0)"),
                )),
                Fault::BatteryDecline { days_to_empty, .. }
                    if !(days_to_empty.is_finite() && *days_to_empty > 0.0) =>
                {
                    problems.push((
                        format!("faults[{i}].days_to_empty"),
                        format!("{days_to_empty} (expected > 0)"),
                    ));
                }
                Fault::RegisterRollover { headroom_m3, .. }
                    if !(*headroom_m3 > 0.0
                        && *headroom_m3 < self.fleet.register_capacity_m3 as f64) =>
                {
                    problems.push((
                        format!("faults[{i}].headroom_m3"),
                        format!("{headroom_m3} (expected 0 < headroom < capacity)"),
                    ));
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            let (field, problem) = if problems.len() == 1 {
                problems.swap_remove(0)
            } else {
                (
                    "several fields".into(),
                    problems
                        .iter()
                        .map(|(f, p)| format!("{f}: {p}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            };
            Err(ScenarioError::Invalid {
                name: self.name.clone(),
                field,
                problem,
            })
        }
    }
}

/// Returns the (start, end) of a fault, where it has them.
pub fn fault_span(fault: &Fault) -> (Option<OffsetDateTime>, Option<OffsetDateTime>) {
    match fault {
        Fault::Leak { from, until, .. } | Fault::ClockSkew { from, until, .. } => {
            (Some(*from), *until)
        }
        Fault::Burst { from, until, .. }
        | Fault::MainsBurst { from, until, .. }
        | Fault::ReverseFlow { from, until, .. }
        | Fault::CommLoss { from, until, .. }
        | Fault::DuplicateFrames { from, until, .. }
        | Fault::OutOfOrder { from, until, .. }
        | Fault::CorruptedFrames { from, until, .. }
        | Fault::ExtraUse { from, until, .. }
        | Fault::Absence { from, until, .. } => (Some(*from), Some(*until)),
        Fault::DroppedRead { at, .. } => (Some(*at), None),
        Fault::MagneticTamper { from, .. }
        | Fault::MeterStopped { from, .. }
        | Fault::BatteryDecline { from, .. } => (Some(*from), None),
        Fault::MeterReplacement { at, .. } => (Some(*at), None),
        Fault::RegisterRollover { .. } => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
name = "t"
seed = 1
start = "2026-06-01T00:00:00Z"
days = 2
[fleet]
households = 10
[[faults]]
kind = "leak"
meter = 3
from = "2026-06-01T05:00:00Z"
rate_lph = 20.0
"#;

    #[test]
    fn parses_and_round_trips() {
        let s = Scenario::from_toml(SAMPLE, "inline").unwrap();
        assert_eq!(s.fleet.dmas, 1);
        assert_eq!(s.interval_minutes, 60);
        assert_eq!(s.faults.len(), 1);
        let back = Scenario::from_toml(&s.to_toml().unwrap(), "again").unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let text = SAMPLE
            .replace("meter = 3", "meter = 30")
            .replace("days = 2", "days = 0");
        let err = Scenario::from_toml(&text, "inline")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("faults[0].meter: 30 is not a meter index (0..10)"),
            "{err}"
        );
        assert!(err.contains("days: is 0"), "{err}");
    }

    #[test]
    fn unknown_fault_kind_is_a_toml_error() {
        let text = SAMPLE.replace("kind = \"leak\"", "kind = \"flood\"");
        let err = Scenario::from_toml(&text, "inline").unwrap_err();
        assert!(matches!(err, ScenarioError::Toml { .. }));
    }
}
