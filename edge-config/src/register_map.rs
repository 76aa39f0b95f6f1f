//! Modbus register maps as TOML data (`edge-config/maps/*.toml`), validated into
//! [`decoders::modbus::RegisterMap`].
//!
//! A map file names the device model and lists its values (`[[register]]`) and, for
//! concentrators, tables of N identical rows (`[[table]]` with `[[table.column]]`). Every
//! problem is reported with the file, line, column and field path, all at once. The format is
//! documented in `docs/modbus-maps.md`.
//!
//! ```
//! let map = edge_config::register_map::builtin("generic-emf").unwrap();
//! assert!(map.spec("flow").is_some());
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use decoders::modbus::{
    ByteOrder, DataType, RegisterFunction, RegisterMap, RegisterSpec, TableSpec,
};
use model::{Decimal, Unit};
use serde::Deserialize;
use toml::Spanned;

/// The maps shipped in `edge-config/maps/`, by model name.
const BUILTIN: [(&str, &str); 5] = [
    ("generic-emf", include_str!("../maps/generic-emf.toml")),
    (
        "pressure-transmitter",
        include_str!("../maps/pressure-transmitter.toml"),
    ),
    ("tuf-2000m", include_str!("../maps/tuf-2000m.toml")),
    (
        "xintai-water-meter",
        include_str!("../maps/xintai-water-meter.toml"),
    ),
    ("concentrator", include_str!("../maps/concentrator.toml")),
];

/// Returns the names of the shipped maps.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// Returns a shipped map by model name (`generic-emf`, `pressure-transmitter`, `tuf-2000m`,
/// `xintai-water-meter`, `concentrator`).
///
/// # Errors
/// [`RegisterMapError::UnknownBuiltin`] for another name.
pub fn builtin(name: &str) -> Result<RegisterMap, RegisterMapError> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        RegisterMapError::UnknownBuiltin {
            name: name.to_owned(),
            available: builtin_names().join(", "),
        }
    })?;
    parse(&format!("maps/{name}.toml"), text)
}

/// Reads and validates a map file.
///
/// # Errors
/// [`RegisterMapError::Io`] when the file cannot be read, otherwise as [`parse`].
pub fn load(path: impl AsRef<Path>) -> Result<RegisterMap, RegisterMapError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RegisterMapError::Io {
        file: file.clone(),
        message: e.to_string(),
    })?;
    parse(&file, &text)
}

/// Parses and validates map text; `file` is only used in error messages.
///
/// # Errors
/// [`RegisterMapError::Syntax`] for TOML syntax errors or unknown/missing/mistyped fields,
/// [`RegisterMapError::Invalid`] listing every semantic problem.
pub fn parse(file: &str, text: &str) -> Result<RegisterMap, RegisterMapError> {
    let raw: RawMap = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |span| line_col(text, span.start));
        RegisterMapError::Syntax {
            file: file.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    let mut v = Validator {
        text,
        issues: Vec::new(),
    };
    let map = v.map(raw);
    if v.issues.is_empty() {
        Ok(map)
    } else {
        Err(RegisterMapError::Invalid {
            file: file.to_owned(),
            issues: v.issues,
        })
    }
}

/// One problem in a map file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapIssue {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Field path (`register[2].scale`, `table[0].column[1].type`).
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

/// Why a register map could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterMapError {
    /// The file could not be read.
    #[error("{file}: cannot read register map: {message}")]
    Io {
        /// File path.
        file: String,
        /// Operating-system error.
        message: String,
    },
    /// TOML syntax error or a field of the wrong shape (unknown, missing, wrong type).
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        /// File path.
        file: String,
        /// 1-based line (0 if unknown).
        line: usize,
        /// 1-based column (0 if unknown).
        column: usize,
        /// Parser message.
        message: String,
    },
    /// The map is well-formed TOML but describes impossible registers.
    #[error("{file}: invalid register map:{}", IssueList(issues, file))]
    Invalid {
        /// File path.
        file: String,
        /// Every problem found.
        issues: Vec<MapIssue>,
    },
    /// No shipped map has this name.
    #[error("no built-in register map {name:?} (available: {available})")]
    UnknownBuiltin {
        /// Requested name.
        name: String,
        /// Names of the shipped maps.
        available: String,
    },
}

struct IssueList<'a>(&'a [MapIssue], &'a str);

impl fmt::Display for IssueList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for issue in self.0 {
            write!(
                f,
                "\n  {}:{}:{}: {}: {}",
                self.1, issue.line, issue.column, issue.field, issue.message
            )?;
        }
        Ok(())
    }
}

/// Returns 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count().saturating_add(1);
    let column = before
        .rfind('\n')
        .map_or(before.chars().count(), |nl| {
            before
                .get(nl..)
                .map_or(0, |s| s.chars().count().saturating_sub(1))
        })
        .saturating_add(1);
    (line, column)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    model: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default, rename = "register")]
    registers: Vec<Spanned<RawRegister>>,
    #[serde(default, rename = "table")]
    tables: Vec<Spanned<RawTable>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    function: Option<Spanned<toml::Value>>,
    byte_order: Option<Spanned<String>>,
}

/// Fields shared by a `[[register]]` and a `[[table.column]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegister {
    name: Spanned<String>,
    quantity: Spanned<String>,
    /// Absolute address for registers; offset within the row for table columns.
    #[serde(alias = "offset_in_row")]
    address: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    data_type: Spanned<String>,
    registers: Option<Spanned<i64>>,
    function: Option<Spanned<toml::Value>>,
    byte_order: Option<Spanned<String>>,
    scale: Option<Spanned<toml::Value>>,
    offset: Option<Spanned<toml::Value>>,
    unit: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: Spanned<String>,
    function: Option<Spanned<toml::Value>>,
    start: Spanned<i64>,
    rows: Spanned<i64>,
    stride: Spanned<i64>,
    #[serde(rename = "column")]
    columns: Vec<Spanned<RawRegister>>,
}

/// Checks that a quantity the pipeline stores has a unit of its dimension, so a map cannot
/// send a flow as a volume or a volume without a unit. Returns what is wrong.
fn unit_mismatch(quantity: &str, unit: Option<Unit>) -> Option<String> {
    use model::Quantity as Q;
    let record = decoders::Record {
        quantity: quantity.to_owned().into(),
        value: decoders::RecordValue::Number(Decimal::ZERO),
        unit,
        storage: 0,
        tariff: 0,
        subunit: 0,
        function: decoders::Function::Instantaneous,
    };
    let q = record.reading_quantity()?;
    let bases: &[Unit] = match q {
        Q::Volume | Q::VolumeReverse | Q::VolumeNet | Q::VolumeSettlement => &[Unit::CubicMetre],
        Q::Flow => &[Unit::CubicMetrePerHour],
        Q::Pressure => &[Unit::Bar],
        Q::Temperature | Q::ReturnTemperature => &[Unit::DegreeCelsius],
        Q::Energy => &[Unit::KilowattHour, Unit::Joule],
        Q::Power => &[Unit::Kilowatt],
        Q::Level => &[Unit::Metre],
        Q::BatteryVoltage => &[Unit::Volt],
        Q::BatteryPercent => &[Unit::Percent],
        Q::OperatingTime => &[Unit::Hour],
        Q::SignalRsrp => &[Unit::Dbm],
        Q::SignalSinr => &[Unit::Decibel],
        Q::Tilt => &[Unit::Degree],
        // Codes and states: no unit or the dimensionless one.
        Q::SignalEcl | Q::ValveState | Q::StatusWord | Q::OutletState => {
            return unit
                .filter(|u| *u != Unit::Dimensionless)
                .map(|u| format!("{quantity} is a code; it takes no unit (got {u})"));
        }
    };
    let names = || {
        bases
            .iter()
            .map(|b| b.symbol())
            .collect::<Vec<_>>()
            .join(" or ")
    };
    match unit {
        None => Some(format!(
            "{quantity} needs a unit convertible to {}",
            names()
        )),
        Some(u) if !bases.contains(&u.base().0) => Some(format!(
            "{u} is not a unit of {quantity} (expected one convertible to {})",
            names()
        )),
        Some(_) => None,
    }
}

struct Validator<'a> {
    text: &'a str,
    issues: Vec<MapIssue>,
}

impl Validator<'_> {
    fn issue<T>(&mut self, at: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, at.span().start);
        self.issues.push(MapIssue {
            line,
            column,
            field: field.into(),
            message: message.into(),
        });
    }

    fn map(&mut self, raw: RawMap) -> RegisterMap {
        if raw.model.get_ref().trim().is_empty() {
            self.issue(&raw.model, "model", "must not be empty");
        }
        let default_function = match &raw.defaults.function {
            Some(f) => self
                .function(f, "defaults.function")
                .unwrap_or(RegisterFunction::Holding),
            None => RegisterFunction::Holding,
        };
        let default_order = match &raw.defaults.byte_order {
            Some(o) => self
                .byte_order(o, "defaults.byte_order")
                .unwrap_or_default(),
            None => ByteOrder::Abcd,
        };
        let defaults = (default_function, default_order);

        let mut registers = Vec::new();
        for (i, reg) in raw.registers.iter().enumerate() {
            let path = format!("register[{i}]");
            let Some(address) = reg.get_ref().address.as_ref() else {
                self.issue(
                    reg,
                    format!("{path}.address"),
                    "missing (0-based protocol address)",
                );
                continue;
            };
            let Some(address) = self.u16_field(address, &format!("{path}.address")) else {
                continue;
            };
            if let Some(spec) = self.spec(reg.get_ref(), &path, defaults, address, None, 0x1_0000) {
                registers.push((spec, reg.span().start));
            }
        }

        let mut tables = Vec::new();
        for (t, table) in raw.tables.iter().enumerate() {
            let path = format!("table[{t}]");
            let tr = table.get_ref();
            if tr.name.get_ref().trim().is_empty() {
                self.issue(&tr.name, format!("{path}.name"), "must not be empty");
            }
            let function = match &tr.function {
                Some(f) => self.function(f, &format!("{path}.function")),
                None => Some(default_function),
            };
            let start = self.u16_field(&tr.start, &format!("{path}.start"));
            let rows = self.positive(&tr.rows, &format!("{path}.rows"));
            let stride = self.positive(&tr.stride, &format!("{path}.stride"));
            let (Some(function), Some(start), Some(rows), Some(stride)) =
                (function, start, rows, stride)
            else {
                continue;
            };
            let end =
                u32::from(start).saturating_add(u32::from(rows).saturating_mul(u32::from(stride)));
            if end > 0x1_0000 {
                self.issue(
                    &tr.rows,
                    format!("{path}.rows"),
                    format!(
                        "{rows} rows of {stride} registers from {start} run past address 65535"
                    ),
                );
                continue;
            }
            if tr.columns.is_empty() {
                self.issue(
                    table,
                    format!("{path}.column"),
                    "a table needs at least one [[table.column]]",
                );
            }
            for row in 1..=rows {
                let row_base = u32::from(start).saturating_add(
                    u32::from(row.saturating_sub(1)).saturating_mul(u32::from(stride)),
                );
                for (c, col) in tr.columns.iter().enumerate() {
                    let cpath = format!("{path}.column[{c}]");
                    // Column problems are the same in every row: report them for row 1 only.
                    let before = self.issues.len();
                    let Some(offset) = col.get_ref().address.as_ref() else {
                        if row == 1 {
                            self.issue(
                                col,
                                format!("{cpath}.address"),
                                "missing (offset within the row)",
                            );
                        }
                        continue;
                    };
                    let Some(offset) = self.u16_field(offset, &format!("{cpath}.address")) else {
                        continue;
                    };
                    let Some(address) = row_base
                        .checked_add(u32::from(offset))
                        .and_then(|a| u16::try_from(a).ok())
                    else {
                        continue;
                    };
                    if let Some(f) = &col.get_ref().function {
                        if row == 1 {
                            self.issue(
                                f,
                                format!("{cpath}.function"),
                                "columns use the table's function; set it on the [[table]]",
                            );
                        }
                        continue;
                    }
                    let spec = self.spec_with_function(
                        col.get_ref(),
                        &cpath,
                        (function, default_order),
                        address,
                        Some(row),
                        u32::from(offset),
                        u32::from(stride),
                    );
                    if row > 1 {
                        self.issues.truncate(before);
                    }
                    if let Some(spec) = spec {
                        registers.push((spec, col.span().start));
                    }
                }
            }
            tables.push(TableSpec {
                name: tr.name.get_ref().clone(),
                function,
                start,
                stride,
                rows,
            });
        }

        self.check_unique_and_disjoint(&registers);
        let mut map = RegisterMap::new(
            raw.model.get_ref().clone(),
            registers.into_iter().map(|(s, _)| s).collect(),
        );
        map.description = raw.description;
        map.tables = tables;
        map
    }

    fn check_unique_and_disjoint(&mut self, registers: &[(RegisterSpec, usize)]) {
        let mut names = HashSet::new();
        let mut taken: BTreeMap<(RegisterFunction, u16), (usize, &str)> = BTreeMap::new();
        for (index, (spec, at)) in registers.iter().enumerate() {
            let (line, column) = line_col(self.text, *at);
            if !names.insert(spec.name.as_str()) {
                self.issues.push(MapIssue {
                    line,
                    column,
                    field: spec.name.clone(),
                    message: "duplicate name".into(),
                });
            }
            for addr in spec.address..spec.address.saturating_add(spec.data_type.width()) {
                if let Some((other_index, other)) =
                    taken.insert((spec.function, addr), (index, spec.name.as_str()))
                    && other_index != index
                {
                    self.issues.push(MapIssue {
                        line,
                        column,
                        field: spec.name.clone(),
                        message: format!(
                            "{} address {addr} already used by {other}",
                            spec.function.as_str()
                        ),
                    });
                    break;
                }
            }
        }
    }

    fn spec(
        &mut self,
        raw: &RawRegister,
        path: &str,
        defaults: (RegisterFunction, ByteOrder),
        address: u16,
        row: Option<u16>,
        limit: u32,
    ) -> Option<RegisterSpec> {
        let function = match &raw.function {
            Some(f) => self.function(f, &format!("{path}.function"))?,
            None => defaults.0,
        };
        self.spec_with_function(
            raw,
            path,
            (function, defaults.1),
            address,
            row,
            u32::from(address),
            limit,
        )
    }

    /// Builds a spec; `position`/`limit` is where the value starts and may end (absolute for
    /// registers, within the row for table columns).
    #[allow(clippy::too_many_arguments)]
    fn spec_with_function(
        &mut self,
        raw: &RawRegister,
        path: &str,
        (function, default_order): (RegisterFunction, ByteOrder),
        address: u16,
        row: Option<u16>,
        position: u32,
        limit: u32,
    ) -> Option<RegisterSpec> {
        let mut ok = true;
        let name = raw.name.get_ref().trim();
        if name.is_empty() {
            self.issue(&raw.name, format!("{path}.name"), "must not be empty");
            ok = false;
        }
        let quantity = raw.quantity.get_ref();
        if quantity.is_empty()
            || !quantity
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            self.issue(
                &raw.quantity,
                format!("{path}.quantity"),
                format!("{quantity:?} is not a snake_case quantity name (e.g. volume, volume_flow, pressure)"),
            );
            ok = false;
        }
        let data_type = self.data_type(raw, path, function);
        let byte_order = match &raw.byte_order {
            Some(o) => self.byte_order(o, &format!("{path}.byte_order")),
            None => Some(default_order),
        };
        let scale = match &raw.scale {
            Some(s) => self.decimal(s, &format!("{path}.scale")),
            None => Some(Decimal::ONE),
        };
        if let (Some(s), Some(raw_scale)) = (scale, &raw.scale)
            && s.is_zero()
        {
            self.issue(raw_scale, format!("{path}.scale"), "must not be zero");
            ok = false;
        }
        let offset = match &raw.offset {
            Some(o) => self.decimal(o, &format!("{path}.offset")),
            None => Some(Decimal::ZERO),
        };
        let unit = match &raw.unit {
            Some(u) => match Unit::from_str(u.get_ref()) {
                Ok(unit) => Some(Some(unit)),
                Err(e) => {
                    self.issue(
                        u,
                        format!("{path}.unit"),
                        format!("{e} (expected a symbol such as m3, m3/h, bar, MPa, degC, V, %)"),
                    );
                    None
                }
            },
            None => Some(None),
        };
        let (Some(data_type), Some(byte_order), Some(scale), Some(offset), Some(unit)) =
            (data_type, byte_order, scale, offset, unit)
        else {
            return None;
        };
        if let Some(message) = unit_mismatch(quantity, unit) {
            match &raw.unit {
                Some(u) => self.issue(u, format!("{path}.unit"), message),
                None => self.issue(&raw.quantity, format!("{path}.unit"), message),
            }
            ok = false;
        }
        let end = position.saturating_add(u32::from(data_type.width()));
        if end > limit {
            let what = if row.is_some() {
                format!(
                    "{} at offset {position} does not fit a row of {limit} registers",
                    data_type.as_str()
                )
            } else {
                format!(
                    "{} at {position} runs past address 65535",
                    data_type.as_str()
                )
            };
            match &raw.address {
                Some(a) => self.issue(a, format!("{path}.address"), what),
                None => self.issue(&raw.data_type, format!("{path}.address"), what),
            }
            return None;
        }
        if !ok {
            return None;
        }
        let display_name = match row {
            Some(r) => format!("{name}[{r}]"),
            None => name.to_owned(),
        };
        Some(RegisterSpec {
            name: display_name,
            quantity: quantity.clone(),
            function,
            address,
            data_type,
            byte_order,
            scale,
            offset,
            unit,
            row,
        })
    }

    fn data_type(
        &mut self,
        raw: &RawRegister,
        path: &str,
        function: RegisterFunction,
    ) -> Option<DataType> {
        let field = format!("{path}.type");
        let t = match raw.data_type.get_ref().as_str() {
            "bool" => DataType::Bool,
            "u16" => DataType::U16,
            "i16" => DataType::I16,
            "u32" => DataType::U32,
            "i32" => DataType::I32,
            "u64" => DataType::U64,
            "f32" => DataType::F32,
            "f64" => DataType::F64,
            "bcd" => {
                let registers = match &raw.registers {
                    Some(n) => match u8::try_from(*n.get_ref()) {
                        Ok(r @ 1..=4) => r,
                        _ => {
                            self.issue(
                                n,
                                format!("{path}.registers"),
                                format!("{} is not 1..=4 (4 BCD digits per register)", n.get_ref()),
                            );
                            return None;
                        }
                    },
                    None => 1,
                };
                DataType::Bcd { registers }
            }
            other => {
                self.issue(
                    &raw.data_type,
                    field,
                    format!("unknown type {other:?} (expected bool, u16, i16, u32, i32, u64, f32, f64 or bcd)"),
                );
                return None;
            }
        };
        if let Some(n) = &raw.registers
            && !matches!(t, DataType::Bcd { .. })
        {
            self.issue(
                n,
                format!("{path}.registers"),
                format!(
                    "only bcd takes a register count; {} has a fixed width",
                    t.as_str()
                ),
            );
            return None;
        }
        if function.is_bit() != (t == DataType::Bool) {
            let message = if function.is_bit() {
                format!(
                    "{} table holds bits: type must be bool, not {}",
                    function.as_str(),
                    t.as_str()
                )
            } else {
                format!(
                    "bool lives in the coil or discrete_input table, not {}",
                    function.as_str()
                )
            };
            self.issue(&raw.data_type, field, message);
            return None;
        }
        Some(t)
    }

    fn function(&mut self, v: &Spanned<toml::Value>, field: &str) -> Option<RegisterFunction> {
        let parsed = match v.get_ref() {
            toml::Value::String(s) => RegisterFunction::from_str(s),
            toml::Value::Integer(i) => u8::try_from(*i)
                .ok()
                .and_then(RegisterFunction::from_code)
                .ok_or_else(|| format!("function code {i} is not a read function (1..=4)")),
            other => Err(format!(
                "expected a function name or code, got {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(f) => Some(f),
            Err(message) => {
                self.issue(v, field, message);
                None
            }
        }
    }

    fn byte_order(&mut self, v: &Spanned<String>, field: &str) -> Option<ByteOrder> {
        match ByteOrder::from_str(v.get_ref()) {
            Ok(o) => Some(o),
            Err(message) => {
                self.issue(v, field, message);
                None
            }
        }
    }

    /// Reads an exact decimal from a string (`"0.001"`), an integer, or a float (taken by its
    /// shortest decimal repr, so `0.001` is exactly 0.001).
    fn decimal(&mut self, v: &Spanned<toml::Value>, field: &str) -> Option<Decimal> {
        let parsed = match v.get_ref() {
            toml::Value::String(s) => Decimal::from_str_exact(s.trim()).map_err(|e| e.to_string()),
            toml::Value::Integer(i) => Ok(Decimal::from(*i)),
            toml::Value::Float(f) if f.is_finite() => {
                Decimal::from_str_exact(&f.to_string()).map_err(|e| e.to_string())
            }
            other => Err(format!(
                "expected a decimal number, got {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(d) => Some(d),
            Err(message) => {
                self.issue(v, field, format!("not an exact decimal: {message}"));
                None
            }
        }
    }

    fn u16_field(&mut self, v: &Spanned<i64>, field: &str) -> Option<u16> {
        match u16::try_from(*v.get_ref()) {
            Ok(a) => Some(a),
            Err(_) => {
                self.issue(
                    v,
                    field,
                    format!("{} is not an address (0..=65535)", v.get_ref()),
                );
                None
            }
        }
    }

    fn positive(&mut self, v: &Spanned<i64>, field: &str) -> Option<u16> {
        match u16::try_from(*v.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.issue(v, field, format!("{} is not in 1..=65535", v.get_ref()));
                None
            }
        }
    }
}
