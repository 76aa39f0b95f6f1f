//! Detector thresholds: defaults from DOMAIN.md §2 and the issue, overridable per meter class
//! from a TOML file (`detectors.toml`, format in `docs/detectors.md`).

use std::collections::HashMap;

use serde::Deserialize;

/// Why a detector configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse (the message carries line and column).
    #[error("{origin}: {source}")]
    Toml {
        /// File name or other origin.
        origin: String,
        /// Parser error.
        #[source]
        source: toml::de::Error,
    },
    /// A value parsed but is out of range.
    #[error("{origin}: {field}: {problem}")]
    Invalid {
        /// File name or other origin.
        origin: String,
        /// Field path, e.g. `classes.commercial.burst_q3_share`.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

/// Thresholds of every per-meter detector for one meter class.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Continuous flow: every hourly step > 0 for at least this many hours raises `leak`.
    pub leak_hours: u32,
    /// Minimum night flow (min of the local 02:00–03:00 and 03:00–04:00 hours) above this, L/h ...
    pub night_flow_lph: f64,
    /// ... on this many consecutive nights (with data) raises `leak`.
    pub night_nights: u32,
    /// `leak` clears after this many consecutive hours of zero consumption.
    pub leak_clear_zero_hours: u32,
    /// Leak severity: at least this rate (L/h) is `warning` (below: `info`) ...
    pub leak_warning_lph: f64,
    /// ... and at least this rate is `critical`.
    pub leak_critical_lph: f64,
    /// `burst`: hourly consumption at least this share of Q3 ...
    pub burst_q3_share: f64,
    /// ... for at least this many consecutive hours.
    pub burst_hours: u32,
    /// `reverse_flow`: a register decrease of more than this many m³ between consecutive reads.
    pub reverse_min_m3: f64,
    /// Decreases above Q3 × this factor × elapsed hours cannot be flow: they are register resets
    /// (replacement, rollover) and raise nothing; increases above it are not consumption.
    pub max_flow_factor: f64,
    /// `stopped_meter`: zero consumption for at least this many days ...
    pub stopped_days: f64,
    /// ... on a meter whose average daily use before was at least this many m³/day.
    pub stopped_min_adu_m3: f64,
    /// `communication_loss`: silence longer than this many usual intervals.
    pub comm_intervals: f64,
    /// Usual interval assumed until one is learned, hours.
    pub comm_default_interval_h: f64,
    /// `low_battery` below this percentage (device percent register).
    pub low_battery_pct: f64,
    /// `hydrant_pressure` below this many bar ...
    pub hydrant_pressure_min_bar: f64,
    /// ... or above this many bar.
    pub hydrant_pressure_max_bar: f64,
    /// `hydrant_tilt` at or beyond this angle, degrees.
    pub hydrant_tilt_deg: f64,
    /// `prolonged_estimation`: estimated register reads reaching this many days past the
    /// meter's last actual read.
    pub prolonged_estimation_days: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            leak_hours: 24,
            night_flow_lph: 2.0,
            night_nights: 3,
            leak_clear_zero_hours: 3,
            leak_warning_lph: 10.0,
            leak_critical_lph: 75.0,
            burst_q3_share: 0.4,
            burst_hours: 2,
            reverse_min_m3: 0.005,
            max_flow_factor: 1.25,
            stopped_days: 7.0,
            stopped_min_adu_m3: 0.05,
            comm_intervals: 3.0,
            comm_default_interval_h: 24.0,
            low_battery_pct: 10.0,
            // 0.15 MPa and 1.0 MPa (DOMAIN.md §2, marked "verify": configuration, not code).
            hydrant_pressure_min_bar: 1.5,
            hydrant_pressure_max_bar: 10.0,
            hydrant_tilt_deg: 10.0,
            prolonged_estimation_days: 7.0,
        }
    }
}

/// Status-word bits (per device model) and the alarm each one means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusBits {
    /// Battery low.
    pub low_battery: u32,
    /// Magnetic / mechanical tamper.
    pub tamper: u32,
    /// Reverse flow seen.
    pub reverse_flow: u32,
    /// Empty pipe.
    pub empty_pipe: u32,
    /// Valve fault: every bit of this mask set (CJ/T 188 D1D0 = 11: valve abnormal).
    pub valve_fault: u32,
}

impl Default for StatusBits {
    /// CJ/T 188 ST byte as the simulated meter model sets it (PROTOCOLS.md §3.5): D2 battery
    /// low, D1D0 = 11 valve abnormal, D5 magnetic, D6 reverse flow; no empty-pipe bit.
    fn default() -> Self {
        Self {
            low_battery: 0x04,
            tamper: 0x20,
            reverse_flow: 0x40,
            empty_pipe: 0,
            valve_fault: 0x03,
        }
    }
}

/// Hydrant status-word bits (the gateway's hydrant bridge, `docs/field-buses.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HydrantBits {
    /// Tilt event (collision).
    pub tilt: u32,
    /// Illegal use event.
    pub illegal_use: u32,
}

impl Default for HydrantBits {
    fn default() -> Self {
        Self {
            tilt: 0x02,
            illegal_use: 0x04,
        }
    }
}

/// DMA balance thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmaThresholds {
    /// Loss share of the daily inflow ((inflow − customers) / inflow) above this ...
    pub loss_share: f64,
    /// ... on this many consecutive days raises `dma_imbalance`.
    pub days: u32,
    /// A day is judged only when at least this share of the DMA's customer meters have a
    /// daily rollup (otherwise a silent meter would look like a loss).
    pub min_coverage: f64,
}

impl Default for DmaThresholds {
    fn default() -> Self {
        // CJJ 92 grade 2 (12 %) as the alarm line; grade 1 is 10 %.
        Self {
            loss_share: 0.12,
            days: 2,
            min_coverage: 0.95,
        }
    }
}

/// One TOML table of thresholds where every field is optional (an override).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdOverrides {
    leak_hours: Option<u32>,
    night_flow_lph: Option<f64>,
    night_nights: Option<u32>,
    leak_clear_zero_hours: Option<u32>,
    leak_warning_lph: Option<f64>,
    leak_critical_lph: Option<f64>,
    burst_q3_share: Option<f64>,
    burst_hours: Option<u32>,
    reverse_min_m3: Option<f64>,
    max_flow_factor: Option<f64>,
    stopped_days: Option<f64>,
    stopped_min_adu_m3: Option<f64>,
    comm_intervals: Option<f64>,
    comm_default_interval_h: Option<f64>,
    low_battery_pct: Option<f64>,
    hydrant_pressure_min_bar: Option<f64>,
    hydrant_pressure_max_bar: Option<f64>,
    hydrant_tilt_deg: Option<f64>,
    prolonged_estimation_days: Option<f64>,
}

impl ThresholdOverrides {
    fn apply(&self, t: &mut Thresholds) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { t.$f = v; } )* };
        }
        set!(
            leak_hours,
            night_flow_lph,
            night_nights,
            leak_clear_zero_hours,
            leak_warning_lph,
            leak_critical_lph,
            burst_q3_share,
            burst_hours,
            reverse_min_m3,
            max_flow_factor,
            stopped_days,
            stopped_min_adu_m3,
            comm_intervals,
            comm_default_interval_h,
            low_battery_pct,
            hydrant_pressure_min_bar,
            hydrant_pressure_max_bar,
            hydrant_tilt_deg,
            prolonged_estimation_days
        );
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    defaults: ThresholdOverrides,
    #[serde(default)]
    classes: HashMap<String, ThresholdOverrides>,
    #[serde(default)]
    status_bits: StatusBits,
    #[serde(default)]
    hydrant_bits: HydrantBits,
    #[serde(default)]
    dma: DmaThresholds,
    #[serde(default)]
    default_time_zone: Option<String>,
}

/// The whole detector configuration: thresholds per meter class (index 0 is the default for
/// classes not named in the file), status bit maps, DMA balance.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectConfig {
    /// Class names; the index is what a meter's state stores. Index 0 is `""` (default).
    classes: Vec<String>,
    /// Thresholds by class index.
    thresholds: Vec<Thresholds>,
    /// Status-word bits of customer meters.
    pub status_bits: StatusBits,
    /// Status-word bits of hydrants.
    pub hydrant_bits: HydrantBits,
    /// DMA balance.
    pub dma: DmaThresholds,
    /// UTC offset (seconds) of meters without a known time zone.
    pub default_utc_offset_s: i32,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            classes: vec![String::new()],
            thresholds: vec![Thresholds::default()],
            status_bits: StatusBits::default(),
            hydrant_bits: HydrantBits::default(),
            dma: DmaThresholds::default(),
            // The meters table's default zone is Asia/Shanghai.
            default_utc_offset_s: 8 * 3600,
        }
    }
}

impl DetectConfig {
    /// Parses a `detectors.toml`; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError::Toml`] for syntax, unknown keys or wrong types (with line and column);
    /// [`ConfigError::Invalid`] for out-of-range values.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|source| ConfigError::Toml {
            origin: origin.to_owned(),
            source,
        })?;
        let mut base = Thresholds::default();
        file.defaults.apply(&mut base);
        let mut config = Self {
            classes: vec![String::new()],
            thresholds: vec![base.clone()],
            status_bits: file.status_bits,
            hydrant_bits: file.hydrant_bits,
            dma: file.dma,
            default_utc_offset_s: 8 * 3600,
        };
        if let Some(tz) = &file.default_time_zone {
            config.default_utc_offset_s =
                parse_utc_offset(tz).ok_or_else(|| ConfigError::Invalid {
                    origin: origin.to_owned(),
                    field: "default_time_zone".into(),
                    problem: format!("{tz:?} is not a UTC offset (+08:00) or a known zone"),
                })?;
        }
        let mut names: Vec<&String> = file.classes.keys().collect();
        names.sort();
        for name in names {
            let mut t = base.clone();
            if let Some(o) = file.classes.get(name) {
                o.apply(&mut t);
            }
            config.classes.push(name.clone());
            config.thresholds.push(t);
        }
        for (name, t) in config.classes.iter().zip(&config.thresholds) {
            let field = |f: &str| {
                if name.is_empty() {
                    format!("defaults.{f}")
                } else {
                    format!("classes.{name}.{f}")
                }
            };
            let problem = validate(t);
            if let Some((f, p)) = problem {
                return Err(ConfigError::Invalid {
                    origin: origin.to_owned(),
                    field: field(f),
                    problem: p,
                });
            }
        }
        Ok(config)
    }

    /// Returns the class index of a class name (0, the defaults, for unknown classes).
    pub fn class_index(&self, class: &str) -> u8 {
        self.classes
            .iter()
            .position(|c| c == class)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(0)
    }

    /// Returns the thresholds of a class index (the defaults for an unknown index).
    pub fn thresholds(&self, class: u8) -> &Thresholds {
        self.thresholds
            .get(usize::from(class))
            .or_else(|| self.thresholds.first())
            .unwrap_or(&DEFAULT_THRESHOLDS)
    }
}

static DEFAULT_THRESHOLDS: std::sync::LazyLock<Thresholds> =
    std::sync::LazyLock::new(Thresholds::default);

fn validate(t: &Thresholds) -> Option<(&'static str, String)> {
    let positive = [
        ("burst_q3_share", t.burst_q3_share),
        ("max_flow_factor", t.max_flow_factor),
        ("stopped_days", t.stopped_days),
        ("comm_intervals", t.comm_intervals),
        ("comm_default_interval_h", t.comm_default_interval_h),
        ("prolonged_estimation_days", t.prolonged_estimation_days),
    ];
    for (f, v) in positive {
        if !(v.is_finite() && v > 0.0) {
            return Some((f, format!("{v} (expected > 0)")));
        }
    }
    let non_negative = [
        ("night_flow_lph", t.night_flow_lph),
        ("leak_warning_lph", t.leak_warning_lph),
        ("leak_critical_lph", t.leak_critical_lph),
        ("reverse_min_m3", t.reverse_min_m3),
        ("stopped_min_adu_m3", t.stopped_min_adu_m3),
        ("low_battery_pct", t.low_battery_pct),
        ("hydrant_pressure_min_bar", t.hydrant_pressure_min_bar),
        ("hydrant_pressure_max_bar", t.hydrant_pressure_max_bar),
        ("hydrant_tilt_deg", t.hydrant_tilt_deg),
    ];
    for (f, v) in non_negative {
        if !(v.is_finite() && v >= 0.0) {
            return Some((f, format!("{v} (expected >= 0)")));
        }
    }
    for (f, v) in [
        ("leak_hours", t.leak_hours),
        ("night_nights", t.night_nights),
        ("burst_hours", t.burst_hours),
        ("leak_clear_zero_hours", t.leak_clear_zero_hours),
    ] {
        if v == 0 || v > 240 {
            return Some((f, format!("{v} (expected 1..=240)")));
        }
    }
    None
}

/// Parses a UTC offset (`+08:00`, `-0530`, `+8`, `Z`, `UTC`, `UTC+8`) or one of the fixed-offset
/// zones a Chinese utility meets (`Asia/Shanghai` and its aliases), into seconds east of UTC.
/// Zones with daylight saving are not accepted (no time-zone database here): give an offset.
pub fn parse_utc_offset(s: &str) -> Option<i32> {
    let s = s.trim();
    let fixed = [
        ("Asia/Shanghai", 8 * 3600),
        ("Asia/Chongqing", 8 * 3600),
        ("Asia/Harbin", 8 * 3600),
        ("Asia/Urumqi", 6 * 3600),
        ("Asia/Hong_Kong", 8 * 3600),
        ("Asia/Macau", 8 * 3600),
        ("Asia/Taipei", 8 * 3600),
        ("Asia/Singapore", 8 * 3600),
        ("Asia/Tokyo", 9 * 3600),
        ("Asia/Seoul", 9 * 3600),
        ("Asia/Kolkata", 5 * 3600 + 1800),
        ("PRC", 8 * 3600),
        ("Etc/UTC", 0),
        ("UTC", 0),
        ("GMT", 0),
        ("Z", 0),
    ];
    if let Some((_, off)) = fixed.iter().find(|(name, _)| name.eq_ignore_ascii_case(s)) {
        return Some(*off);
    }
    let rest = s
        .strip_prefix("UTC")
        .or_else(|| s.strip_prefix("GMT"))
        .unwrap_or(s);
    let (sign, digits) = match rest.as_bytes().first()? {
        b'+' => (1, rest.get(1..)?),
        b'-' => (-1, rest.get(1..)?),
        _ => return None,
    };
    let (h, m) = match digits.split_once(':') {
        Some((h, m)) => (h, m),
        None if digits.len() == 4 => (digits.get(..2)?, digits.get(2..)?),
        None => (digits, "0"),
    };
    if h.is_empty() || h.len() > 2 || m.is_empty() || m.len() > 2 {
        return None;
    }
    let h: i32 = h.parse().ok()?;
    let m: i32 = m.parse().ok()?;
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse() {
        for (s, want) in [
            ("+08:00", Some(28_800)),
            ("-05:30", Some(-19_800)),
            ("+0800", Some(28_800)),
            ("+8", Some(28_800)),
            ("UTC+8", Some(28_800)),
            ("Z", Some(0)),
            ("Asia/Shanghai", Some(28_800)),
            ("utc", Some(0)),
            ("+25:00", None),
            ("08:00", None),
            ("Europe/Berlin", None),
            ("", None),
        ] {
            assert_eq!(parse_utc_offset(s), want, "{s}");
        }
    }

    #[test]
    fn class_overrides_inherit_defaults() {
        let c = DetectConfig::from_toml(
            "[defaults]\nburst_hours = 3\n[classes.commercial]\nleak_hours = 48\n",
            "t.toml",
        )
        .unwrap();
        let com = c.thresholds(c.class_index("commercial"));
        assert_eq!((com.leak_hours, com.burst_hours), (48, 3));
        let other = c.thresholds(c.class_index("residential"));
        assert_eq!((other.leak_hours, other.burst_hours), (24, 3));
        assert_eq!(
            DetectConfig::default().thresholds(0),
            &Thresholds::default()
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = DetectConfig::from_toml("[classes.x]\nburst_q3_share = -1.0\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("classes.x.burst_q3_share"), "{err}");
        let err = DetectConfig::from_toml("[defaults]\nleak_hourz = 3\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("leak_hourz"), "{err}");
    }
}
