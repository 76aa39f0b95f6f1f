//! Modbus register maps: decoding polled register blocks into [`Record`]s, and the inverse
//! (values → registers) for simulated slaves.
//!
//! A [`RegisterMap`] describes one device model: for each value, the Modbus function that reads
//! it (01 coils, 02 discrete inputs, 03 holding, 04 input registers), its 0-based protocol
//! address, data type, byte order, exact scale and offset, unit and quantity. Maps are data:
//! `edge-config` loads and validates them from TOML (`edge-config/maps/*.toml`). Polling
//! belongs to the gateway; this module is pure.
//!
//! ```
//! use decoders::modbus::{decode, ByteOrder, DataType, RegisterFunction, RegisterMap, RegisterSpec};
//! use decoders::RecordValue;
//! use rust_decimal::Decimal;
//!
//! let mut flow = RegisterSpec::new("flow", "volume_flow", RegisterFunction::Holding, 0, DataType::F32);
//! flow.byte_order = ByteOrder::Dcba;
//! flow.unit = Some(model::Unit::CubicMetrePerHour);
//! let map = RegisterMap::new("xintai", vec![flow]);
//! // 0.545 m³/h as a little-endian (DCBA) IEEE float: bytes 1F 85 0B 3F.
//! let records = decode(&map, 0, &[0x1F85, 0x0B3F]).unwrap();
//! assert_eq!(records[0].value, RecordValue::Number(Decimal::new(545, 3)));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use model::{Decimal, Unit};
use rust_decimal::RoundingStrategy;

use crate::{Function, Record, RecordValue};

/// Highest number of registers one Modbus read (03/04) may return (Modbus spec, 125 words).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Highest number of bits one Modbus read (01/02) may return (Modbus spec, 2000 bits).
pub const MAX_READ_BITS: u16 = 2000;

/// Which Modbus table a value lives in, named by its read function code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegisterFunction {
    /// Function 01, read coils (read/write bits).
    Coil,
    /// Function 02, read discrete inputs (read-only bits).
    DiscreteInput,
    /// Function 03, read holding registers (read/write words).
    Holding,
    /// Function 04, read input registers (read-only words).
    Input,
}

impl RegisterFunction {
    /// Returns the Modbus read function code (1, 2, 3 or 4).
    pub fn code(self) -> u8 {
        match self {
            Self::Coil => 1,
            Self::DiscreteInput => 2,
            Self::Holding => 3,
            Self::Input => 4,
        }
    }

    /// Returns the function for a read function code (1..=4).
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Coil),
            2 => Some(Self::DiscreteInput),
            3 => Some(Self::Holding),
            4 => Some(Self::Input),
            _ => None,
        }
    }

    /// Returns true for the bit tables (01 coils, 02 discrete inputs).
    pub fn is_bit(self) -> bool {
        matches!(self, Self::Coil | Self::DiscreteInput)
    }

    /// Returns the name used in map files (`coil`, `discrete_input`, `holding`, `input`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Coil => "coil",
            Self::DiscreteInput => "discrete_input",
            Self::Holding => "holding",
            Self::Input => "input",
        }
    }
}

impl FromStr for RegisterFunction {
    type Err = String;
    /// Parses `coil`/`01`/`1`, `discrete_input`/`02`, `holding`/`03`, `input`/`04`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coil" | "coils" | "1" | "01" => Ok(Self::Coil),
            "discrete_input" | "discrete" | "2" | "02" => Ok(Self::DiscreteInput),
            "holding" | "3" | "03" => Ok(Self::Holding),
            "input" | "4" | "04" => Ok(Self::Input),
            other => Err(format!(
                "unknown function {other:?} (expected coil, discrete_input, holding, input or 01..04)"
            )),
        }
    }
}

/// How a value is stored in its register(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// One bit (coils and discrete inputs only); decodes to 0 or 1.
    Bool,
    /// Unsigned 16-bit, one register.
    U16,
    /// Signed 16-bit (two's complement), one register.
    I16,
    /// Unsigned 32-bit, two registers.
    U32,
    /// Signed 32-bit, two registers.
    I32,
    /// Unsigned 64-bit, four registers.
    U64,
    /// IEEE 754 single, two registers.
    F32,
    /// IEEE 754 double, four registers.
    F64,
    /// Packed BCD over 1..=4 registers (4 decimal digits per register, most significant first
    /// after byte ordering).
    Bcd {
        /// Number of registers (1..=4).
        registers: u8,
    },
}

impl DataType {
    /// Returns how many registers (or bits, for [`DataType::Bool`]) the value occupies.
    pub fn width(self) -> u16 {
        match self {
            Self::Bool | Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U64 | Self::F64 => 4,
            Self::Bcd { registers } => u16::from(registers),
        }
    }

    /// Returns the name used in map files (`u16`, `f32`, `bcd`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::U64 => "u64",
            Self::F32 => "f32",
            Self::F64 => "f64",
            Self::Bcd { .. } => "bcd",
        }
    }
}

/// Byte order of a multi-byte value, named as the Modbus world does for 32 bits: the bytes of
/// the big-endian value `A B C D` as they appear in register order. 64-bit values extend the
/// same rule (CDAB = word-swapped, BADC = byte-swapped within words, DCBA = little endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ByteOrder {
    /// Big endian: most significant word first, bytes big endian (the Modbus default).
    #[default]
    Abcd,
    /// Word-swapped: least significant word first, bytes big endian within each word.
    Cdab,
    /// Byte-swapped: most significant word first, bytes swapped within each word.
    Badc,
    /// Little endian: least significant word first, bytes swapped within each word.
    Dcba,
}

impl ByteOrder {
    /// Returns the name used in map files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Abcd => "ABCD",
            Self::Cdab => "CDAB",
            Self::Badc => "BADC",
            Self::Dcba => "DCBA",
        }
    }

    fn swaps_words(self) -> bool {
        matches!(self, Self::Cdab | Self::Dcba)
    }

    fn swaps_bytes(self) -> bool {
        matches!(self, Self::Badc | Self::Dcba)
    }
}

impl FromStr for ByteOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "ABCD" => Ok(Self::Abcd),
            "CDAB" => Ok(Self::Cdab),
            "BADC" => Ok(Self::Badc),
            "DCBA" => Ok(Self::Dcba),
            _ => Err(format!(
                "unknown byte order {s:?} (expected ABCD, CDAB, BADC or DCBA)"
            )),
        }
    }
}

/// One value of a device: where it is and how to turn its registers into a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterSpec {
    /// Unique name within the map (`flow`, `forward_total`; table cells `volume[3]`).
    pub name: String,
    /// Record quantity (`volume`, `volume_flow`, `pressure`...; see [`Record::reading_quantity`]).
    pub quantity: String,
    /// Which table (read function) holds it.
    pub function: RegisterFunction,
    /// 0-based protocol address of the first register (or bit).
    pub address: u16,
    /// Storage type.
    pub data_type: DataType,
    /// Byte order of multi-byte values.
    pub byte_order: ByteOrder,
    /// Exact factor applied to the raw value (`value = raw × scale + offset`).
    pub scale: Decimal,
    /// Exact offset added after scaling.
    pub offset: Decimal,
    /// Unit of the scaled value.
    pub unit: Option<Unit>,
    /// Table row (1-based meter slot) for values expanded from a [`TableSpec`]; becomes the
    /// record's `subunit`.
    pub row: Option<u16>,
}

impl RegisterSpec {
    /// Returns a spec with byte order ABCD, scale 1, offset 0, no unit and no row.
    pub fn new(
        name: impl Into<String>,
        quantity: impl Into<String>,
        function: RegisterFunction,
        address: u16,
        data_type: DataType,
    ) -> Self {
        Self {
            name: name.into(),
            quantity: quantity.into(),
            function,
            address,
            data_type,
            byte_order: ByteOrder::Abcd,
            scale: Decimal::ONE,
            offset: Decimal::ZERO,
            unit: None,
            row: None,
        }
    }

    /// Returns the address one past the value's last register, or `None` past 65 535.
    pub fn end(&self) -> Option<u32> {
        u32::from(self.address).checked_add(u32::from(self.data_type.width()))
    }
}

/// A table of N identical rows (a concentrator's meters), already expanded into the map's
/// [`RegisterSpec`]s; kept so that empty rows can be recognised and skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// Table name (`meters`).
    pub name: String,
    /// Read function of the whole table.
    pub function: RegisterFunction,
    /// Address of row 1.
    pub start: u16,
    /// Registers per row.
    pub stride: u16,
    /// Number of rows.
    pub rows: u16,
}

impl TableSpec {
    /// Returns the address range `[start, end)` of row `row` (1-based).
    fn row_range(&self, row: u16) -> Option<(u32, u32)> {
        let index = u32::from(row.checked_sub(1)?);
        let start =
            u32::from(self.start).checked_add(index.checked_mul(u32::from(self.stride))?)?;
        Some((start, start.checked_add(u32::from(self.stride))?))
    }
}

/// The register map of one device model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterMap {
    /// Model name (`generic-emf`, `tuf-2000m`).
    pub model: String,
    /// Free text (manufacturer, manual reference).
    pub description: String,
    /// Every value, tables expanded, in map order (the order records come out in).
    pub registers: Vec<RegisterSpec>,
    /// Tables, for empty-row detection.
    pub tables: Vec<TableSpec>,
}

impl RegisterMap {
    /// Returns a map without description or tables.
    pub fn new(model: impl Into<String>, registers: Vec<RegisterSpec>) -> Self {
        Self {
            model: model.into(),
            description: String::new(),
            registers,
            tables: Vec::new(),
        }
    }

    /// Returns the spec with this name.
    pub fn spec(&self, name: &str) -> Option<&RegisterSpec> {
        self.registers.iter().find(|s| s.name == name)
    }

    /// Returns `(start, count)` covering every word register (03/04) of the map, or `None` if
    /// it has none. [`encode`] returns exactly this block.
    pub fn register_span(&self) -> Option<(u16, u16)> {
        span(self.registers.iter().filter(|s| !s.function.is_bit()))
    }

    /// Plans the reads that fetch every value: per function, consecutive values merged into
    /// blocks of at most `max_count` registers (bits) when the gap between them is at most
    /// `max_gap` unused registers. Values wider than `max_count` get a block of their own.
    pub fn read_plan(&self, max_count: u16, max_gap: u16) -> Vec<ReadBlock> {
        let mut by_function: BTreeMap<RegisterFunction, Vec<(u32, u32)>> = BTreeMap::new();
        for spec in &self.registers {
            if let Some(end) = spec.end() {
                by_function
                    .entry(spec.function)
                    .or_default()
                    .push((u32::from(spec.address), end));
            }
        }
        let mut blocks = Vec::new();
        for (function, mut ranges) in by_function {
            let limit = if function.is_bit() {
                max_count.min(MAX_READ_BITS)
            } else {
                max_count.min(MAX_READ_REGISTERS)
            };
            ranges.sort_unstable();
            let mut current: Option<(u32, u32)> = None;
            for (start, end) in ranges {
                current = match current {
                    Some((cs, ce))
                        if start <= ce.saturating_add(u32::from(max_gap))
                            && end.max(ce).saturating_sub(cs) <= u32::from(limit) =>
                    {
                        Some((cs, ce.max(end)))
                    }
                    Some(done) => {
                        push_block(&mut blocks, function, done);
                        Some((start, end))
                    }
                    None => Some((start, end)),
                };
            }
            if let Some(done) = current {
                push_block(&mut blocks, function, done);
            }
        }
        blocks
    }
}

fn push_block(blocks: &mut Vec<ReadBlock>, function: RegisterFunction, (start, end): (u32, u32)) {
    if let (Ok(start), Ok(count)) = (
        u16::try_from(start),
        u16::try_from(end.saturating_sub(start)),
    ) {
        blocks.push(ReadBlock {
            function,
            start,
            count,
        });
    }
}

fn span<'a>(specs: impl Iterator<Item = &'a RegisterSpec>) -> Option<(u16, u16)> {
    let mut lo: Option<u32> = None;
    let mut hi: u32 = 0;
    for spec in specs {
        let end = spec.end()?;
        lo = Some(lo.map_or(u32::from(spec.address), |l| l.min(u32::from(spec.address))));
        hi = hi.max(end);
    }
    let lo = lo?;
    Some((
        u16::try_from(lo).ok()?,
        u16::try_from(hi.checked_sub(lo)?).ok()?,
    ))
}

/// One Modbus read request the gateway should issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBlock {
    /// Read function.
    pub function: RegisterFunction,
    /// First address.
    pub start: u16,
    /// Number of registers (or bits).
    pub count: u16,
}

/// Why a register block could not be decoded, or values not encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModbusError {
    /// The block runs past address 65 535.
    #[error("block at {start} with {count} registers runs past address 65535")]
    AddressOverflow {
        /// First address of the block.
        start: u16,
        /// Number of registers.
        count: usize,
    },
    /// A BCD register held a nibble above 9.
    #[error("{name} at address {address}: register {word:#06x} is not BCD")]
    BadBcd {
        /// Spec name.
        name: String,
        /// Address of the offending register.
        address: u16,
        /// Register value.
        word: u16,
    },
    /// A float register held NaN or an infinity.
    #[error("{name} at address {address}: float is not finite")]
    NotFinite {
        /// Spec name.
        name: String,
        /// Address of the value.
        address: u16,
    },
    /// Scaling or offsetting left the exact decimal range.
    #[error("{name} at address {address}: value out of decimal range after scale and offset")]
    Overflow {
        /// Spec name.
        name: String,
        /// Address of the value.
        address: u16,
    },
    /// A value does not fit its data type when encoding.
    #[error("{name}: {value} does not fit {data_type} after scale and offset")]
    OutOfRange {
        /// Spec name.
        name: String,
        /// The value given.
        value: Decimal,
        /// Data type name.
        data_type: &'static str,
    },
    /// The spec's data type does not fit its function (a word type on a coil, or bool on a
    /// register).
    #[error("{name}: data type {data_type} cannot live in the {function} table")]
    TypeMismatch {
        /// Spec name.
        name: String,
        /// Data type name.
        data_type: &'static str,
        /// Function name.
        function: &'static str,
    },
}

/// Decodes a block of word registers read with function 03 or 04 starting at `start_addr`:
/// one [`Record`] per register spec of the map lying wholly inside the block, in map order.
/// Values partly or wholly outside the block are skipped (poll them in another block), as
/// are table rows whose registers are all 0x0000 or all 0xFFFF (empty concentrator slots).
///
/// Specs of both 03 and 04 are considered; for a map that reads both tables at overlapping
/// addresses use [`decode_function`].
///
/// # Errors
/// [`ModbusError`] naming the spec and address when a register holds invalid BCD or a
/// non-finite float, or scaling overflows.
pub fn decode(
    map: &RegisterMap,
    start_addr: u16,
    registers: &[u16],
) -> Result<Vec<Record>, ModbusError> {
    decode_words(map, None, start_addr, registers)
}

/// Decodes a block of word registers read with `function` (03 or 04): like [`decode`] but only
/// the specs of that table.
///
/// # Errors
/// As [`decode`].
pub fn decode_function(
    map: &RegisterMap,
    function: RegisterFunction,
    start_addr: u16,
    registers: &[u16],
) -> Result<Vec<Record>, ModbusError> {
    if function.is_bit() {
        return Ok(Vec::new());
    }
    decode_words(map, Some(function), start_addr, registers)
}

/// Decodes a block of bits read with function 01 or 02 starting at `start_addr`: one record
/// (value 0 or 1) per bool spec of that table inside the block.
///
/// # Errors
/// [`ModbusError::AddressOverflow`] when the block runs past 65 535.
pub fn decode_bits(
    map: &RegisterMap,
    function: RegisterFunction,
    start_addr: u16,
    bits: &[bool],
) -> Result<Vec<Record>, ModbusError> {
    let block_end = block_end(start_addr, bits.len())?;
    let mut out = Vec::new();
    for spec in map.registers.iter().filter(|s| s.function == function) {
        let Some(offset) = offset_in(spec, start_addr, block_end) else {
            continue;
        };
        let Some(&bit) = bits.get(offset) else {
            continue;
        };
        let raw = if bit { Decimal::ONE } else { Decimal::ZERO };
        out.push(record(spec, scale(spec, raw)?));
    }
    Ok(out)
}

fn block_end(start: u16, len: usize) -> Result<u32, ModbusError> {
    u32::try_from(len)
        .ok()
        .and_then(|l| u32::from(start).checked_add(l))
        .filter(|&end| end <= 0x1_0000)
        .ok_or(ModbusError::AddressOverflow { start, count: len })
}

/// Returns the spec's offset inside `[start, end)` if the whole value lies there.
fn offset_in(spec: &RegisterSpec, start: u16, end: u32) -> Option<usize> {
    let spec_end = spec.end()?;
    if spec.address < start || spec_end > end {
        return None;
    }
    Some(usize::from(spec.address.checked_sub(start)?))
}

fn decode_words(
    map: &RegisterMap,
    only: Option<RegisterFunction>,
    start_addr: u16,
    registers: &[u16],
) -> Result<Vec<Record>, ModbusError> {
    let end = block_end(start_addr, registers.len())?;
    let mut out = Vec::new();
    for spec in &map.registers {
        if spec.function.is_bit() || only.is_some_and(|f| f != spec.function) {
            continue;
        }
        let Some(offset) = offset_in(spec, start_addr, end) else {
            continue;
        };
        if let Some(row) = spec.row
            && row_is_empty(map, spec, row, start_addr, registers)
        {
            continue;
        }
        let Some(words) = offset
            .checked_add(usize::from(spec.data_type.width()))
            .and_then(|e| registers.get(offset..e))
        else {
            continue;
        };
        let raw = raw_value(spec, words)?;
        out.push(record(spec, scale(spec, raw)?));
    }
    Ok(out)
}

/// A row is empty when all its registers inside the block are 0x0000, or all are 0xFFFF.
fn row_is_empty(
    map: &RegisterMap,
    spec: &RegisterSpec,
    row: u16,
    start_addr: u16,
    registers: &[u16],
) -> bool {
    let Some(table) = map.tables.iter().find(|t| {
        t.function == spec.function
            && t.row_range(row).is_some_and(|(s, e)| {
                u32::from(spec.address) >= s && spec.end().is_some_and(|se| se <= e)
            })
    }) else {
        return false;
    };
    let Some((row_start, row_end)) = table.row_range(row) else {
        return false;
    };
    let base = u32::from(start_addr);
    let lo = usize::try_from(row_start.saturating_sub(base)).unwrap_or(usize::MAX);
    let hi = usize::try_from(row_end.saturating_sub(base)).unwrap_or(usize::MAX);
    let words = registers.get(lo.min(registers.len())..hi.min(registers.len()));
    match words {
        Some(w) if !w.is_empty() => w.iter().all(|&x| x == 0) || w.iter().all(|&x| x == 0xFFFF),
        _ => false,
    }
}

fn record(spec: &RegisterSpec, value: Decimal) -> Record {
    Record {
        quantity: spec.quantity.clone().into(),
        value: RecordValue::Number(value),
        unit: spec.unit,
        storage: 0,
        tariff: 0,
        subunit: spec.row.unwrap_or(0),
        function: Function::Instantaneous,
    }
}

/// Puts the registers' bytes into big-endian value order according to the byte order.
/// Every byte order is an involution, so the same function serves encoding.
fn reorder(order: ByteOrder, words: &[u16]) -> Vec<u8> {
    let mut ordered: Vec<u16> = words.to_vec();
    if order.swaps_words() {
        ordered.reverse();
    }
    ordered
        .into_iter()
        .flat_map(|w| {
            let [hi, lo] = w.to_be_bytes();
            if order.swaps_bytes() {
                [lo, hi]
            } else {
                [hi, lo]
            }
        })
        .collect()
}

fn bytes_to_words(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks(2)
        .map(|c| match c {
            [hi, lo] => u16::from_be_bytes([*hi, *lo]),
            [hi] => u16::from_be_bytes([*hi, 0]),
            _ => 0,
        })
        .collect()
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}

fn raw_value(spec: &RegisterSpec, words: &[u16]) -> Result<Decimal, ModbusError> {
    let bytes = reorder(spec.byte_order, words);
    let not_finite = || ModbusError::NotFinite {
        name: spec.name.clone(),
        address: spec.address,
    };
    Ok(match spec.data_type {
        DataType::Bool => {
            return Err(ModbusError::TypeMismatch {
                name: spec.name.clone(),
                data_type: spec.data_type.as_str(),
                function: spec.function.as_str(),
            });
        }
        DataType::U16 => Decimal::from(u16::from_be_bytes(array(&bytes))),
        DataType::I16 => Decimal::from(i16::from_be_bytes(array(&bytes))),
        DataType::U32 => Decimal::from(u32::from_be_bytes(array(&bytes))),
        DataType::I32 => Decimal::from(i32::from_be_bytes(array(&bytes))),
        DataType::U64 => Decimal::from(u64::from_be_bytes(array(&bytes))),
        DataType::F32 => {
            let f = f32::from_be_bytes(array(&bytes));
            if !f.is_finite() {
                return Err(not_finite());
            }
            float_to_decimal(&f.to_string()).ok_or_else(|| overflow(spec))?
        }
        DataType::F64 => {
            let f = f64::from_be_bytes(array(&bytes));
            if !f.is_finite() {
                return Err(not_finite());
            }
            float_to_decimal(&f.to_string()).ok_or_else(|| overflow(spec))?
        }
        DataType::Bcd { .. } => {
            // Validate on the registers as read (reordering keeps nibble pairs), so the error
            // names the register's own address and value.
            for (address, &word) in (spec.address..=u16::MAX).zip(words) {
                if [12u32, 8, 4, 0].iter().any(|s| (word >> s) & 0xF > 9) {
                    return Err(ModbusError::BadBcd {
                        name: spec.name.clone(),
                        address,
                        word,
                    });
                }
            }
            let mut value: u64 = 0;
            for word in bytes_to_words(&bytes) {
                for shift in [12u32, 8, 4, 0] {
                    let digit = (word >> shift) & 0xF;
                    value = value
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(digit)))
                        .ok_or_else(|| overflow(spec))?;
                }
            }
            Decimal::from(value)
        }
    })
}

/// Converts a float's shortest round-trip decimal text (Rust's `Display`) into a Decimal;
/// digits beyond the 28th fractional place are rounded (denormal noise), too large is `None`.
fn float_to_decimal(text: &str) -> Option<Decimal> {
    Decimal::from_str_exact(text)
        .ok()
        .or_else(|| Decimal::from_str(text).ok())
        .map(|d| d.normalize())
}

fn overflow(spec: &RegisterSpec) -> ModbusError {
    ModbusError::Overflow {
        name: spec.name.clone(),
        address: spec.address,
    }
}

fn scale(spec: &RegisterSpec, raw: Decimal) -> Result<Decimal, ModbusError> {
    raw.checked_mul(spec.scale)
        .and_then(|v| v.checked_add(spec.offset))
        .ok_or_else(|| overflow(spec))
}

/// Where [`encode`] finds the value of each spec.
pub trait Values {
    /// Returns the (scaled) value for a spec; `None` leaves its registers zero.
    fn value_for(&self, spec: &RegisterSpec) -> Option<Decimal>;
}

impl<S: std::hash::BuildHasher> Values for HashMap<String, Decimal, S> {
    fn value_for(&self, spec: &RegisterSpec) -> Option<Decimal> {
        self.get(&spec.name).copied()
    }
}

impl Values for BTreeMap<String, Decimal> {
    fn value_for(&self, spec: &RegisterSpec) -> Option<Decimal> {
        self.get(&spec.name).copied()
    }
}

impl Values for [(&str, Decimal)] {
    fn value_for(&self, spec: &RegisterSpec) -> Option<Decimal> {
        self.iter().find(|(n, _)| *n == spec.name).map(|(_, v)| *v)
    }
}

impl<const N: usize> Values for [(&str, Decimal); N] {
    fn value_for(&self, spec: &RegisterSpec) -> Option<Decimal> {
        self.as_slice().value_for(spec)
    }
}

impl<F: Fn(&RegisterSpec) -> Option<Decimal>> Values for F {
    fn value_for(&self, spec: &RegisterSpec) -> Option<Decimal> {
        self(spec)
    }
}

/// The registers and bits of a simulated slave, per table, sparse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterImage {
    /// Function 01 bits.
    pub coils: BTreeMap<u16, bool>,
    /// Function 02 bits.
    pub discrete_inputs: BTreeMap<u16, bool>,
    /// Function 03 words.
    pub holding: BTreeMap<u16, u16>,
    /// Function 04 words.
    pub input: BTreeMap<u16, u16>,
}

impl RegisterImage {
    /// Returns `count` words of a word table from `start` (unmapped addresses read 0), as a
    /// slave answers a 03/04 request; `None` for a bit table.
    pub fn read_words(
        &self,
        function: RegisterFunction,
        start: u16,
        count: u16,
    ) -> Option<Vec<u16>> {
        let table = match function {
            RegisterFunction::Holding => &self.holding,
            RegisterFunction::Input => &self.input,
            _ => return None,
        };
        Some(
            (u32::from(start)..u32::from(start).saturating_add(u32::from(count)))
                .map(|a| {
                    u16::try_from(a)
                        .ok()
                        .and_then(|a| table.get(&a))
                        .copied()
                        .unwrap_or(0)
                })
                .collect(),
        )
    }

    /// Returns `count` bits of a bit table from `start` (unmapped addresses read false);
    /// `None` for a word table.
    pub fn read_bits(
        &self,
        function: RegisterFunction,
        start: u16,
        count: u16,
    ) -> Option<Vec<bool>> {
        let table = match function {
            RegisterFunction::Coil => &self.coils,
            RegisterFunction::DiscreteInput => &self.discrete_inputs,
            _ => return None,
        };
        Some(
            (u32::from(start)..u32::from(start).saturating_add(u32::from(count)))
                .map(|a| {
                    u16::try_from(a)
                        .ok()
                        .and_then(|a| table.get(&a))
                        .copied()
                        .unwrap_or(false)
                })
                .collect(),
        )
    }
}

/// Encodes values into the map's word registers: the block [`RegisterMap::register_span`]
/// (unmapped registers and specs without a value are 0), so that
/// `decode(map, span.0, &encode(map, values)?)` gives the values back. Integer types round
/// half-even to the nearest raw step (a real meter quantises the same way); floats take the
/// nearest representable value.
///
/// # Errors
/// [`ModbusError::OutOfRange`] when a value does not fit its type after removing offset and
/// scale.
pub fn encode(map: &RegisterMap, values: &(impl Values + ?Sized)) -> Result<Vec<u16>, ModbusError> {
    let image = encode_image(map, values)?;
    let Some((start, count)) = map.register_span() else {
        return Ok(Vec::new());
    };
    // The span may cover both word tables; a map mixing them at the same address is read
    // with decode_function and simulated with the image.
    Ok(
        (u32::from(start)..u32::from(start).saturating_add(u32::from(count)))
            .map(|a| {
                u16::try_from(a)
                    .ok()
                    .and_then(|a| image.holding.get(&a).or_else(|| image.input.get(&a)))
                    .copied()
                    .unwrap_or(0)
            })
            .collect(),
    )
}

/// Encodes values into every table of a simulated slave.
///
/// # Errors
/// As [`encode`].
pub fn encode_image(
    map: &RegisterMap,
    values: &(impl Values + ?Sized),
) -> Result<RegisterImage, ModbusError> {
    let mut image = RegisterImage::default();
    for spec in &map.registers {
        let value = values.value_for(spec);
        match spec.function {
            RegisterFunction::Coil | RegisterFunction::DiscreteInput => {
                if spec.data_type != DataType::Bool {
                    return Err(mismatch(spec));
                }
                let bit = match value {
                    Some(v) => unscale(spec, v)? != Decimal::ZERO,
                    None => false,
                };
                let table = if spec.function == RegisterFunction::Coil {
                    &mut image.coils
                } else {
                    &mut image.discrete_inputs
                };
                table.insert(spec.address, bit);
            }
            RegisterFunction::Holding | RegisterFunction::Input => {
                let words = match value {
                    Some(v) => encode_value(spec, v)?,
                    None => vec![0; usize::from(spec.data_type.width())],
                };
                let table = if spec.function == RegisterFunction::Holding {
                    &mut image.holding
                } else {
                    &mut image.input
                };
                for (addr, word) in (spec.address..=u16::MAX).zip(words) {
                    table.insert(addr, word);
                }
            }
        }
    }
    Ok(image)
}

fn mismatch(spec: &RegisterSpec) -> ModbusError {
    ModbusError::TypeMismatch {
        name: spec.name.clone(),
        data_type: spec.data_type.as_str(),
        function: spec.function.as_str(),
    }
}

fn unscale(spec: &RegisterSpec, value: Decimal) -> Result<Decimal, ModbusError> {
    value
        .checked_sub(spec.offset)
        .and_then(|v| v.checked_div(spec.scale))
        .ok_or_else(|| out_of_range(spec, value))
}

fn out_of_range(spec: &RegisterSpec, value: Decimal) -> ModbusError {
    ModbusError::OutOfRange {
        name: spec.name.clone(),
        value,
        data_type: spec.data_type.as_str(),
    }
}

/// Encodes one scaled value into the spec's registers (register order).
pub fn encode_value(spec: &RegisterSpec, value: Decimal) -> Result<Vec<u16>, ModbusError> {
    let raw = unscale(spec, value)?;
    let integer = || {
        raw.round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven)
            .to_string()
    };
    let range = || out_of_range(spec, value);
    let bytes: Vec<u8> = match spec.data_type {
        DataType::Bool => return Err(mismatch(spec)),
        DataType::U16 => integer()
            .parse::<u16>()
            .map_err(|_| range())?
            .to_be_bytes()
            .to_vec(),
        DataType::I16 => integer()
            .parse::<i16>()
            .map_err(|_| range())?
            .to_be_bytes()
            .to_vec(),
        DataType::U32 => integer()
            .parse::<u32>()
            .map_err(|_| range())?
            .to_be_bytes()
            .to_vec(),
        DataType::I32 => integer()
            .parse::<i32>()
            .map_err(|_| range())?
            .to_be_bytes()
            .to_vec(),
        DataType::U64 => integer()
            .parse::<u64>()
            .map_err(|_| range())?
            .to_be_bytes()
            .to_vec(),
        DataType::F32 => {
            let f = raw.to_string().parse::<f32>().map_err(|_| range())?;
            if !f.is_finite() {
                return Err(range());
            }
            f.to_be_bytes().to_vec()
        }
        DataType::F64 => {
            let f = raw.to_string().parse::<f64>().map_err(|_| range())?;
            if !f.is_finite() {
                return Err(range());
            }
            f.to_be_bytes().to_vec()
        }
        DataType::Bcd { registers } => {
            let n = integer().parse::<u64>().map_err(|_| range())?;
            let digits = usize::from(registers).saturating_mul(4);
            let text = format!("{n:0digits$}");
            if text.len() > digits {
                return Err(range());
            }
            let mut out = Vec::with_capacity(usize::from(registers).saturating_mul(2));
            let nibbles: Vec<u8> = text.bytes().map(|b| b.saturating_sub(b'0')).collect();
            for pair in nibbles.chunks(2) {
                if let [hi, lo] = pair {
                    out.push((hi << 4) | lo);
                }
            }
            out
        }
    };
    Ok(bytes_to_words(&reorder_bytes(spec.byte_order, &bytes)))
}

/// Inverse of [`reorder`] on bytes: value order → register order.
fn reorder_bytes(order: ByteOrder, value_bytes: &[u8]) -> Vec<u8> {
    reorder(order, &bytes_to_words(value_bytes))
}
