//! `detect-replay`: the detectors over CSV history (pure: text in, alarms out).
//!
//! `meters.csv`: `meter_id, meter_class, nominal_flow_q3_m3h, dma, role, time_zone`;
//! `readings.csv`: `meter_id, ts (RFC 3339), quantity, value, unit`. Columns are found by their
//! header names (any order; a file without a header uses this order). Rows may come in any order
//! and twice; a bad row is reported with its line number and skipped. The readings are replayed
//! in event time through [`Detectors::observe`] (the live worker's code path), with a
//! communication-loss [`Detectors::sweep`] at every hour of event time and one at the newest
//! timestamp of the input.

use std::collections::HashMap;
use std::str::FromStr as _;

use model::{AlarmKind, AlarmSeverity, Quantity, Unit};
use rust_decimal::Decimal;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::config::parse_utc_offset;
use super::{
    AlarmEvent, DetectConfig, Detectors, MeterProfile, Observation, Role, SweepClock, Transition,
};

/// A row refused, with where it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct RowError {
    /// File label (`meters.csv`, `readings.csv`).
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with the row.
    pub message: String,
}

/// One parsed reading row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Meter id.
    pub meter: String,
    /// Event time, unix seconds.
    pub ts: i64,
    /// Quantity.
    pub quantity: Quantity,
    /// Value in the quantity's base unit.
    pub value: Decimal,
    /// Line number (duplicates: the first line wins).
    pub line: usize,
}

/// One alarm as `detect-replay` prints it (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlarmRecord {
    /// Meter id.
    pub meter_id: String,
    /// Alarm kind (wire name).
    pub kind: AlarmKind,
    /// When the condition began, event time.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// When it was last observed to hold, event time.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Highest severity reached.
    pub severity: AlarmSeverity,
    /// When it auto-closed, if it did within the input.
    #[serde(with = "time::serde::rfc3339::option")]
    pub cleared_at: Option<OffsetDateTime>,
    /// How many times the condition was raised while this alarm was open.
    pub occurrences: u32,
    /// Evidence from the raise.
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Alarms built from events: one open alarm per (meter, kind), closed on `Cleared`.
#[derive(Debug, Default)]
pub struct AlarmBook {
    records: Vec<AlarmRecord>,
    open: HashMap<(String, AlarmKind), usize>,
}

fn at(ts: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ts).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl AlarmBook {
    /// Applies one event.
    pub fn apply(&mut self, e: AlarmEvent) {
        let key = (e.meter.clone(), e.kind);
        match (e.transition, self.open.get(&key).copied()) {
            (Transition::Raised, None) => {
                self.open.insert(key, self.records.len());
                self.records.push(AlarmRecord {
                    meter_id: e.meter,
                    kind: e.kind,
                    first_seen: at(e.first_seen),
                    last_seen: at(e.at),
                    severity: e.severity,
                    cleared_at: None,
                    occurrences: 1,
                    detail: e.detail,
                });
            }
            (Transition::Raised | Transition::Seen, Some(i)) => {
                if let Some(r) = self.records.get_mut(i) {
                    if e.transition == Transition::Raised {
                        r.occurrences += 1;
                    }
                    r.last_seen = r.last_seen.max(at(e.at));
                    r.severity = r.severity.max(e.severity);
                }
            }
            (Transition::Cleared, Some(i)) => {
                self.open.remove(&key);
                if let Some(r) = self.records.get_mut(i) {
                    r.cleared_at = Some(at(e.at));
                }
            }
            (Transition::Seen | Transition::Cleared, None) => {}
        }
    }

    /// Returns the alarms ordered by (first_seen, meter, kind).
    pub fn into_records(mut self) -> Vec<AlarmRecord> {
        self.records.sort_by(|a, b| {
            (a.first_seen, &a.meter_id, a.kind).cmp(&(b.first_seen, &b.meter_id, b.kind))
        });
        self.records
    }
}

/// Splits one CSV line (RFC 4180 quoting on one line; `""` is a quote inside quotes).
fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (false, ',') => fields.push(std::mem::take(&mut cur).trim().to_owned()),
            (_, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    fields.push(cur.trim().to_owned());
    Ok(fields)
}

/// Column positions found from a header (or the documented order without one).
struct Columns {
    index: Vec<usize>,
    header: bool,
}

fn columns(first: &str, names: &[&str]) -> Columns {
    let fields = split_csv(first.trim_start_matches('\u{feff}')).unwrap_or_default();
    let lower: Vec<String> = fields.iter().map(|f| f.to_ascii_lowercase()).collect();
    if lower.iter().any(|f| names.first().is_some_and(|n| f == n)) {
        let index = names
            .iter()
            .map(|n| lower.iter().position(|f| f == n).unwrap_or(usize::MAX))
            .collect();
        Columns {
            index,
            header: true,
        }
    } else {
        Columns {
            index: (0..names.len()).collect(),
            header: false,
        }
    }
}

fn field<'a>(fields: &'a [String], cols: &Columns, i: usize) -> &'a str {
    cols.index
        .get(i)
        .and_then(|c| fields.get(*c))
        .map_or("", String::as_str)
}

/// Iterates over the data lines of a CSV text: (1-based line number, line), skipping the
/// header and blank lines.
fn data_lines<'a>(text: &'a str, cols: &Columns) -> impl Iterator<Item = (usize, &'a str)> {
    let skip = usize::from(cols.header);
    text.lines()
        .enumerate()
        .skip(skip)
        .map(|(i, l)| {
            (
                i + 1,
                l.trim_start_matches('\u{feff}').trim_end_matches('\r'),
            )
        })
        .filter(|(_, l)| !l.trim().is_empty())
}

/// The row loop both CSV files share: header columns, data lines, CSV fields and a valid
/// `meter_id` (column 0); `row` parses the rest of a row. A bad row becomes a [`RowError`] with
/// its line number and the run goes on.
fn parse_rows<T>(
    text: &str,
    file: &str,
    names: &[&str],
    mut row: impl FnMut(usize, &str, &[String], &Columns) -> Result<T, String>,
) -> (Vec<T>, Vec<RowError>) {
    let cols = columns(text.lines().next().unwrap_or(""), names);
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (line, l) in data_lines(text, &cols) {
        let result = split_csv(l).and_then(|fields| {
            let id = field(&fields, &cols, 0);
            model::MeterId::new(id).map_err(|e| format!("meter_id {id:?}: {e}"))?;
            row(line, id, &fields, &cols)
        });
        match result {
            Ok(t) => parsed.push(t),
            Err(message) => errors.push(RowError {
                file: file.into(),
                line,
                message,
            }),
        }
    }
    (parsed, errors)
}

/// Parses `meters.csv`. Meters missing from it get the default class, DN15 Q3 and zone.
pub fn parse_meters(
    text: &str,
    config: &DetectConfig,
) -> (Vec<(String, MeterProfile)>, Vec<RowError>) {
    const NAMES: [&str; 6] = [
        "meter_id",
        "meter_class",
        "nominal_flow_q3_m3h",
        "dma",
        "role",
        "time_zone",
    ];
    parse_rows(text, "meters.csv", &NAMES, |_line, id, fields, cols| {
        let q3_text = field(fields, cols, 2);
        let q3_m3h = if q3_text.is_empty() {
            2.5
        } else {
            match q3_text.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => v,
                _ => {
                    return Err(format!(
                        "nominal_flow_q3_m3h {q3_text:?} is not a positive number"
                    ));
                }
            }
        };
        let role_text = field(fields, cols, 4);
        let Some(role) = Role::parse(role_text) else {
            return Err(format!(
                "role {role_text:?} (expected customer, inlet, outlet, hydrant or pressure)"
            ));
        };
        let tz = field(fields, cols, 5);
        let utc_offset_s = if tz.is_empty() {
            config.default_utc_offset_s
        } else {
            parse_utc_offset(tz)
                .ok_or_else(|| format!("time_zone {tz:?} is not a UTC offset like +08:00"))?
        };
        let dma = field(fields, cols, 3);
        Ok((
            id.to_owned(),
            MeterProfile {
                class: field(fields, cols, 1).to_owned(),
                q3_m3h,
                dma: (!dma.is_empty()).then(|| dma.to_owned()),
                role,
                utc_offset_s,
                model: None,
            },
        ))
    })
}

/// Parses a unit symbol, with the spellings people type (`l`, `m³`, `litre`).
fn parse_unit(s: &str) -> Option<Unit> {
    if let Ok(u) = Unit::from_str(s) {
        return Some(u);
    }
    Some(match s.to_ascii_lowercase().as_str() {
        "" | "m3" | "m³" | "m^3" | "cubic_metre" | "cubic_meter" => Unit::CubicMetre,
        "l" | "litre" | "liter" | "litres" | "liters" => Unit::Litre,
        "pct" | "percent" => Unit::Percent,
        "mpa" => Unit::Megapascal,
        "kpa" => Unit::Kilopascal,
        "degree" | "degrees" | "°" => Unit::Degree,
        "none" | "-" => Unit::Dimensionless,
        _ => return None,
    })
}

/// Parses `readings.csv`.
pub fn parse_readings(text: &str) -> (Vec<Row>, Vec<RowError>) {
    const NAMES: [&str; 5] = ["meter_id", "ts", "quantity", "value", "unit"];
    parse_rows(text, "readings.csv", &NAMES, |line, id, fields, cols| {
        let ts_text = field(fields, cols, 1);
        let ts = OffsetDateTime::parse(ts_text, &Rfc3339)
            .map_err(|_| format!("ts {ts_text:?} is not RFC 3339"))?
            .unix_timestamp();
        let q_text = field(fields, cols, 2);
        let quantity = if q_text.is_empty() {
            Quantity::Volume
        } else {
            Quantity::from_str(&q_text.to_ascii_lowercase()).map_err(|e| e.to_string())?
        };
        let v_text = field(fields, cols, 3);
        let value = Decimal::from_str(v_text)
            .or_else(|_| Decimal::from_scientific(v_text))
            .map_err(|_| format!("value {v_text:?} is not a number"))?;
        let u_text = field(fields, cols, 4);
        let unit = match parse_unit(u_text) {
            Some(_) if u_text.is_empty() && quantity != Quantity::Volume => Unit::Dimensionless,
            Some(u) => u,
            None => return Err(format!("unit {u_text:?} is unknown")),
        };
        let (base, value) = unit.to_base(value);
        let cumulative_volume = matches!(
            quantity,
            Quantity::Volume | Quantity::VolumeReverse | Quantity::VolumeNet
        );
        if cumulative_volume && base != Unit::CubicMetre {
            return Err(format!(
                "unit {u_text:?} is not a volume (expected m3 or L)"
            ));
        }
        Ok(Row {
            meter: id.to_owned(),
            ts,
            quantity,
            value,
            line,
        })
    })
}

/// What a replay did besides raising alarms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Rows replayed.
    pub rows: usize,
    /// Exact duplicates dropped.
    pub duplicates: usize,
    /// Rows with an already seen (meter, ts, quantity) but another value, dropped.
    pub conflicts: usize,
    /// Meters with detector state at the end.
    pub meters: usize,
    /// Detector state bytes at the end ([`Detectors::state_bytes`]: what the detectors add in
    /// the live worker, where the meter index is VEE's map).
    pub state_bytes: usize,
    /// Bytes of the replay's own meter-id map (the worker has VEE's map instead).
    pub index_bytes: usize,
}

/// Replays rows through the detectors and returns the alarms.
pub fn run(
    config: DetectConfig,
    meters: &[(String, MeterProfile)],
    mut rows: Vec<Row>,
) -> (Vec<AlarmRecord>, ReplayStats) {
    let mut det = Detectors::new(config);
    for (id, p) in meters {
        det.set_profile(id, p);
    }
    let mut stats = ReplayStats::default();
    // Duplicates: the first line of each (meter, ts, quantity) wins.
    rows.sort_by(|a, b| {
        (&a.meter, a.ts, a.quantity.as_str(), a.line).cmp(&(
            &b.meter,
            b.ts,
            b.quantity.as_str(),
            b.line,
        ))
    });
    let mut kept: Vec<Row> = Vec::with_capacity(rows.len());
    for r in rows {
        match kept.last() {
            Some(p) if p.meter == r.meter && p.ts == r.ts && p.quantity == r.quantity => {
                if p.value == r.value {
                    stats.duplicates += 1;
                } else {
                    stats.conflicts += 1;
                }
            }
            _ => kept.push(r),
        }
    }
    // Event-time order across meters, so the hourly sweep sees the fleet as it was.
    kept.sort_by(|a, b| {
        (a.ts, &a.meter, a.quantity.as_str()).cmp(&(b.ts, &b.meter, b.quantity.as_str()))
    });
    stats.rows = kept.len();
    let mut book = AlarmBook::default();
    let mut events = Vec::new();
    let mut next_sweep = kept.first().map(|r| (r.ts.div_euclid(3600) + 1) * 3600);
    for r in &kept {
        while let Some(s) = next_sweep.filter(|s| *s < r.ts) {
            det.sweep(s, SweepClock::Event, &mut events);
            next_sweep = Some(s + 3600);
        }
        det.observe(
            &Observation {
                meter: &r.meter,
                ts: r.ts,
                received: None,
                quantity: r.quantity,
                value: r.value,
                estimated: false,
            },
            &mut events,
        );
        for e in events.drain(..) {
            book.apply(e);
        }
    }
    if let Some(newest) = kept.iter().map(|r| r.ts).max() {
        det.sweep(newest, SweepClock::Event, &mut events);
    }
    for e in events.drain(..) {
        book.apply(e);
    }
    stats.meters = det.meters();
    stats.state_bytes = det.state_bytes();
    stats.index_bytes = det.own_index_bytes();
    (book.into_records(), stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_and_quotes() {
        assert_eq!(split_csv("a, b ,\"c,d\"").unwrap(), vec!["a", "b", "c,d"]);
        assert_eq!(split_csv("\"x\"\"y\"").unwrap(), vec!["x\"y"]);
        assert!(split_csv("\"open").is_err());
    }

    #[test]
    fn bad_rows_are_reported_with_line_numbers_and_skipped() {
        let text = "meter_id,ts,quantity,value,unit\n\
            m1,2026-01-01T00:00:00Z,volume,1.5,m3\n\
            m1,yesterday,volume,1.5,m3\n\
            \n\
            m/1,2026-01-01T00:00:00Z,volume,1,m3\n\
            m1,2026-01-01T01:00:00+08:00,volume,1500,L\n\
            m1,2026-01-01T02:00:00Z,volume,abc,m3\n\
            m1,2026-01-01T02:00:00Z,volume,1,kWh\n\
            m1,2026-01-01T02:00:00Z,flux,1,m3\n";
        let (rows, errors) = parse_readings(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].value, Decimal::new(15, 1));
        assert_eq!(rows[1].ts, rows[0].ts - 7 * 3600);
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 5, 7, 8, 9]);
        assert!(
            errors[0].to_string().starts_with("readings.csv:3: ts"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn header_columns_in_any_order() {
        let text = "unit,value,meter_id,quantity,ts\nL,250,m1,volume,2026-01-01T00:00:00Z\n";
        let (rows, errors) = parse_readings(text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(rows[0].value, Decimal::new(25, 2));
        let meters = "meter_id,meter_class,nominal_flow_q3_m3h,dma,role,time_zone\n\
            m1,residential,2.5,d1,customer,+08:00\n\
            m2,residential,-1,d1,customer,+08:00\n\
            m3,residential,2.5,d1,valve,+08:00\n\
            m4,commercial,6.3,,inlet,-05:30\n";
        let (m, errors) = parse_meters(meters, &DetectConfig::default());
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].1.utc_offset_s, -19_800);
        assert_eq!(m[1].1.role, Role::Inlet);
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }
}
