//! The protocol-neutral result of decoding one frame; its serde form is `meter-decode`'s JSON.

use std::borrow::Cow;

use model::{Decimal, Unit};
use serde::Serialize;

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterInfo {
    /// Address digits as printed on the meter (CJ/T 188: A6..A0; M-Bus: 8 BCD digits).
    pub id: String,
    /// Three-letter manufacturer code, where the protocol has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    /// Version byte, where the protocol has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u8>,
    /// Medium / meter type as a name (`water`, `heat`, `gas`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
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
    /// A date or date-time as an ISO 8601 string (`2026-10-31`, `2026-11-24T10:43`).
    Date(String),
    /// Text (plain-text VIF, ASCII variable-length data).
    Text(String),
    /// Bytes kept raw (manufacturer-specific or unknown), as lowercase hex.
    Raw(String),
}

/// One decoded data record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// What it measures, snake_case (`volume`, `volume_flow`, `flow_temperature`,
    /// `error_flags`, `date_time`...). Protocol vocabulary; [`Record::reading_quantity`]
    /// maps it to the pipeline's [`model::Quantity`]. Borrowed from the decoders' static
    /// tables (no allocation per record); owned only for names built at run time (plain-text
    /// VIFs, register maps).
    pub quantity: Cow<'static, str>,
    /// The value.
    pub value: RecordValue,
    /// Unit of a number; `None` for plain numbers, dates and text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    /// Storage number (0 = current).
    pub storage: u32,
    /// Tariff.
    pub tariff: u32,
    /// Sub-unit.
    pub subunit: u32,
    /// Function field.
    pub function: Function,
}

impl Record {
    /// Maps the record's quantity to the pipeline's vocabulary, if the pipeline stores it.
    pub fn reading_quantity(&self) -> Option<model::Quantity> {
        use model::Quantity as Q;
        Some(match self.quantity.as_ref() {
            "volume" => Q::Volume,
            "volume_reverse" => Q::VolumeReverse,
            "volume_net" => Q::VolumeNet,
            "volume_settlement" => Q::VolumeSettlement,
            "volume_flow" => Q::Flow,
            "pressure" => Q::Pressure,
            "flow_temperature" | "temperature" | "external_temperature" => Q::Temperature,
            "return_temperature" => Q::ReturnTemperature,
            "energy" => Q::Energy,
            "power" => Q::Power,
            "level" => Q::Level,
            "battery_voltage" => Q::BatteryVoltage,
            "battery_percent" => Q::BatteryPercent,
            "operating_time" => Q::OperatingTime,
            "signal_rsrp" => Q::SignalRsrp,
            "signal_sinr" => Q::SignalSinr,
            "signal_ecl" => Q::SignalEcl,
            "valve_state" => Q::ValveState,
            "status_word" => Q::StatusWord,
            _ => return None,
        })
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
