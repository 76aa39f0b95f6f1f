//! The protocol-neutral result of decoding one frame; its serde form is `meter-decode`'s JSON.

use std::borrow::Cow;
use std::fmt;

use model::{Decimal, Unit};
use serde::Serialize;

use crate::small_string::SmallString;

/// Which protocol a frame was decoded as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// CJ/T 188.
    Cjt188,
    /// Wired M-Bus (EN 13757-2/-3).
    Mbus,
    /// Wireless M-Bus / OMS (EN 13757-4).
    Wmbus,
    /// Modbus register block.
    Modbus,
}

/// Identity of the meter that sent the frame.
///
/// The text fields are [`SmallString`]s: ids, codes and names are short, so decoding a frame
/// does not allocate for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterInfo {
    /// Address digits as printed on the meter (CJ/T 188: A6..A0; M-Bus: 8 BCD digits).
    pub id: SmallString,
    /// Three-letter manufacturer code, where the protocol has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<SmallString>,
    /// Version byte, where the protocol has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u8>,
    /// Medium / meter type as a name (`water`, `heat`, `gas`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub medium: Option<SmallString>,
}

/// Function field of a record (EN 13757-3 DIF bits 5-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    /// Instantaneous value.
    Instantaneous,
    /// Maximum value.
    Maximum,
    /// Minimum value.
    Minimum,
    /// Value during error state.
    ValueDuringError,
}

/// A decoded value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RecordValue {
    /// A number, already scaled to the record's unit. Serialised as a JSON number.
    #[serde(with = "rust_decimal::serde::float")]
    Number(Decimal),
    /// A date or date-time as an ISO 8601 string (`2026-10-31`, `2026-11-24T10:43`); kept
    /// inline, no allocation.
    Date(SmallString),
    /// Text (plain-text VIF, ASCII variable-length data).
    Text(SmallString),
    /// Bytes kept raw (manufacturer-specific or unknown), as lowercase hex (inline up to 11
    /// bytes).
    Raw(SmallString),
}

/// One decoded data record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// What it measures (`volume`, `volume_flow`, `flow_temperature`, `error_flags`,
    /// `date_time`...); [`Record::reading_quantity`] maps it to the pipeline's
    /// [`model::Quantity`].
    pub quantity: RecordQuantity,
    /// The value.
    pub value: RecordValue,
    /// Unit of a number; `None` for plain numbers, dates and text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    /// Storage number (0 = current).
    pub storage: u32,
    /// Tariff (0 = total); the width of [`model::Reading::tariff`]: a wider one is refused
    /// by the decoder, not cut.
    pub tariff: u16,
    /// Sub-unit; the width of [`model::Reading::subunit`].
    pub subunit: u16,
    /// Function field.
    pub function: Function,
}

impl Record {
    /// Maps the record's quantity to the pipeline's vocabulary, if the pipeline stores it.
    pub fn reading_quantity(&self) -> Option<model::Quantity> {
        self.quantity.reading_quantity()
    }
}

/// The [`RecordQuantity`] for a name literal, resolved at compile time (no run-time lookup).
macro_rules! q {
    ($name:literal) => {
        const { $crate::frame::RecordQuantity::from_static($name) }
    };
}
pub(crate) use q;

/// What a record measures, in the decoders' snake_case vocabulary.
///
/// The names the gateway acts on (everything [`RecordQuantity::reading_quantity`] maps to the
/// pipeline, the meter clock, error flags, vendor data) are variants, so mapping a record is a
/// `match`, not a string comparison; every other protocol name (the rest of the M-Bus VIF
/// tables, plain-text VIF units, register-map names) is [`RecordQuantity::Other`]. Built from
/// a name with [`RecordQuantity::from_static`] / `From`, which always picks the variant for a
/// known name, so `Other` never holds one of them. Compares equal to its name (`== "volume"`);
/// `Debug`, `Display` and the serde form are the name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum RecordQuantity {
    /// `volume`.
    Volume,
    /// `volume_reverse`.
    VolumeReverse,
    /// `volume_net`.
    VolumeNet,
    /// `volume_settlement`.
    VolumeSettlement,
    /// `volume_flow`.
    VolumeFlow,
    /// `pressure`.
    Pressure,
    /// `flow_temperature`.
    FlowTemperature,
    /// `temperature`.
    Temperature,
    /// `external_temperature`.
    ExternalTemperature,
    /// `return_temperature`.
    ReturnTemperature,
    /// `energy`.
    Energy,
    /// `power`.
    Power,
    /// `level`.
    Level,
    /// `battery_voltage`.
    BatteryVoltage,
    /// `battery_percent`.
    BatteryPercent,
    /// `operating_time`.
    OperatingTime,
    /// `signal_rsrp`.
    SignalRsrp,
    /// `signal_sinr`.
    SignalSinr,
    /// `signal_ecl`.
    SignalEcl,
    /// `valve_state`.
    ValveState,
    /// `status_word`.
    StatusWord,
    /// `date_time`.
    DateTime,
    /// `date`.
    Date,
    /// `error_flags`.
    ErrorFlags,
    /// `manufacturer_specific`.
    ManufacturerSpecific,
    /// `more_records_follow`.
    MoreRecordsFollow,
    /// Any other name: borrowed from a decoder's static tables (no allocation), owned only
    /// for names read at run time (plain-text VIF units, register maps).
    Other(Cow<'static, str>),
}

/// The names that have a variant, in declaration order.
const KNOWN_NAMES: [&str; 26] = [
    "volume",
    "volume_reverse",
    "volume_net",
    "volume_settlement",
    "volume_flow",
    "pressure",
    "flow_temperature",
    "temperature",
    "external_temperature",
    "return_temperature",
    "energy",
    "power",
    "level",
    "battery_voltage",
    "battery_percent",
    "operating_time",
    "signal_rsrp",
    "signal_sinr",
    "signal_ecl",
    "valve_state",
    "status_word",
    "date_time",
    "date",
    "error_flags",
    "manufacturer_specific",
    "more_records_follow",
];

/// The pipeline's quantity of each [`RecordQuantity::known_index`] (`None` for the names it
/// does not store and for every index without a name): the record-to-reading step of the
/// gateway's path is then one load, not a variant built and matched.
pub(crate) static READING_OF_KNOWN: [Option<model::Quantity>; 256] = {
    let mut table = [None; 256];
    let mut i = 0;
    while i < KNOWN_NAMES.len() {
        let quantity = RecordQuantity::known(i);
        // Bounded by the loop condition (fewer than 256 names); `[]` because `get_mut` is not
        // const.
        #[allow(clippy::indexing_slicing)]
        {
            table[i] = quantity.reading_quantity();
        }
        // A known variant owns nothing; forgotten because a `const` cannot run its drop.
        std::mem::forget(quantity);
        i = i.wrapping_add(1);
    }
    table
};

/// Byte-wise string equality usable in a `const fn`.
const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        // Bounded by the length checks above; `[]` because `get` is not const.
        #[allow(clippy::indexing_slicing)]
        if a[i] != b[i] {
            return false;
        }
        i = i.wrapping_add(1);
    }
    true
}

impl RecordQuantity {
    /// The variant for a name from a static table (usable in `const` tables).
    pub const fn from_static(name: &'static str) -> Self {
        let i = Self::known_index(name);
        if (i as usize) < KNOWN_NAMES.len() {
            Self::known(i as usize)
        } else {
            Self::Other(Cow::Borrowed(name))
        }
    }

    /// Where `name` is among the names with a variant; `u8::MAX` when it has none. The VIF
    /// tables keep this index beside the name (a `Copy` value), so turning a table entry into
    /// a record's quantity is a jump, not a search.
    pub(crate) const fn known_index(name: &str) -> u8 {
        let mut i = 0;
        while i < KNOWN_NAMES.len() {
            #[allow(clippy::indexing_slicing)]
            if const_eq(KNOWN_NAMES[i], name) {
                // Fewer than 255 names, so the index fits.
                #[allow(clippy::cast_possible_truncation)]
                return i as u8;
            }
            i = i.wrapping_add(1);
        }
        u8::MAX
    }

    /// The quantity of a static `name` whose [`RecordQuantity::known_index`] is `index`.
    #[inline]
    pub(crate) fn from_indexed(index: u8, name: &'static str) -> Self {
        if usize::from(index) < KNOWN_NAMES.len() {
            Self::known(usize::from(index))
        } else {
            Self::Other(Cow::Borrowed(name))
        }
    }

    /// The pipeline's quantity of a name sent last character first (a plain-text VIF's
    /// unit as on the wire), without building the name: only a known name can have one.
    pub(crate) fn reading_quantity_of_reversed(sent: &[u8]) -> Option<model::Quantity> {
        let i = KNOWN_NAMES
            .iter()
            .position(|k| k.len() == sent.len() && k.bytes().eq(sent.iter().rev().copied()))?;
        Self::known(i).reading_quantity()
    }

    /// The variant for a name read at run time (a known name never stays `Other`).
    pub fn from_name(name: impl Into<Cow<'static, str>>) -> Self {
        let name = name.into();
        match KNOWN_NAMES.iter().position(|k| *k == name.as_ref()) {
            Some(i) => Self::known(i),
            None => Self::Other(name),
        }
    }

    const fn known(i: usize) -> Self {
        match i {
            0 => Self::Volume,
            1 => Self::VolumeReverse,
            2 => Self::VolumeNet,
            3 => Self::VolumeSettlement,
            4 => Self::VolumeFlow,
            5 => Self::Pressure,
            6 => Self::FlowTemperature,
            7 => Self::Temperature,
            8 => Self::ExternalTemperature,
            9 => Self::ReturnTemperature,
            10 => Self::Energy,
            11 => Self::Power,
            12 => Self::Level,
            13 => Self::BatteryVoltage,
            14 => Self::BatteryPercent,
            15 => Self::OperatingTime,
            16 => Self::SignalRsrp,
            17 => Self::SignalSinr,
            18 => Self::SignalEcl,
            19 => Self::ValveState,
            20 => Self::StatusWord,
            21 => Self::DateTime,
            22 => Self::Date,
            23 => Self::ErrorFlags,
            24 => Self::ManufacturerSpecific,
            25 => Self::MoreRecordsFollow,
            _ => Self::Other(Cow::Borrowed("")),
        }
    }

    /// The snake_case name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Volume => "volume",
            Self::VolumeReverse => "volume_reverse",
            Self::VolumeNet => "volume_net",
            Self::VolumeSettlement => "volume_settlement",
            Self::VolumeFlow => "volume_flow",
            Self::Pressure => "pressure",
            Self::FlowTemperature => "flow_temperature",
            Self::Temperature => "temperature",
            Self::ExternalTemperature => "external_temperature",
            Self::ReturnTemperature => "return_temperature",
            Self::Energy => "energy",
            Self::Power => "power",
            Self::Level => "level",
            Self::BatteryVoltage => "battery_voltage",
            Self::BatteryPercent => "battery_percent",
            Self::OperatingTime => "operating_time",
            Self::SignalRsrp => "signal_rsrp",
            Self::SignalSinr => "signal_sinr",
            Self::SignalEcl => "signal_ecl",
            Self::ValveState => "valve_state",
            Self::StatusWord => "status_word",
            Self::DateTime => "date_time",
            Self::Date => "date",
            Self::ErrorFlags => "error_flags",
            Self::ManufacturerSpecific => "manufacturer_specific",
            Self::MoreRecordsFollow => "more_records_follow",
            Self::Other(name) => name,
        }
    }

    /// The pipeline's quantity for this name, if the pipeline stores it.
    pub const fn reading_quantity(&self) -> Option<model::Quantity> {
        use model::Quantity as Q;
        Some(match self {
            Self::Volume => Q::Volume,
            Self::VolumeReverse => Q::VolumeReverse,
            Self::VolumeNet => Q::VolumeNet,
            Self::VolumeSettlement => Q::VolumeSettlement,
            Self::VolumeFlow => Q::Flow,
            Self::Pressure => Q::Pressure,
            Self::FlowTemperature | Self::Temperature | Self::ExternalTemperature => Q::Temperature,
            Self::ReturnTemperature => Q::ReturnTemperature,
            Self::Energy => Q::Energy,
            Self::Power => Q::Power,
            Self::Level => Q::Level,
            Self::BatteryVoltage => Q::BatteryVoltage,
            Self::BatteryPercent => Q::BatteryPercent,
            Self::OperatingTime => Q::OperatingTime,
            Self::SignalRsrp => Q::SignalRsrp,
            Self::SignalSinr => Q::SignalSinr,
            Self::SignalEcl => Q::SignalEcl,
            Self::ValveState => Q::ValveState,
            Self::StatusWord => Q::StatusWord,
            _ => return None,
        })
    }
}

impl fmt::Debug for RecordQuantity {
    // The name as a string: the same text the `Cow<str>` field printed before the enum.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for RecordQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RecordQuantity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl AsRef<str> for RecordQuantity {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for RecordQuantity {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for RecordQuantity {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&'static str> for RecordQuantity {
    fn from(name: &'static str) -> Self {
        Self::from_name(name)
    }
}

impl From<String> for RecordQuantity {
    fn from(name: String) -> Self {
        Self::from_name(name)
    }
}

impl From<Cow<'static, str>> for RecordQuantity {
    fn from(name: Cow<'static, str>) -> Self {
        Self::from_name(name)
    }
}

/// One decoded frame: who sent it and what it said.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodedFrame {
    /// Protocol.
    pub protocol: Protocol,
    /// Sender.
    pub meter: MeterInfo,
    /// Records in frame order.
    pub records: Vec<Record>,
}
