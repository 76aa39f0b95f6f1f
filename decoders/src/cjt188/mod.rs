//! CJ/T 188 (户用计量仪表数据传输技术条件) frames: parser, encoder and builders.
//!
//! Frame layout (`../shared/design/PROTOCOLS.md` §3.1):
//! `[FE..]  68  T  A0..A6  C  L  DI0 DI1 SER  DATA..  CS  16`, where `L` counts DI0 through the
//! end of DATA and `CS` is the byte sum from `68` through the last DATA byte.
//!
//! Vendor variants accepted (§3.8): any number of `FE` wake-up bytes, both DI byte orders
//! (`90 1F` and `1F 90`; the order is kept in [`Cjt188Frame::di_order`] so replies can echo it),
//! the valve control code `2A`/`AA` next to `04`/`84`, and heat-meter replies that put the
//! unit byte before each value (JY meters).
//!
//! ```
//! use decoders::cjt188;
//! let bytes = hex::decode(
//!     "FEFEFEFE6810443322110033788116 1F9000007766552C007766552C310122110515202184 1316"
//!         .replace(' ', ""),
//! ).unwrap();
//! let frame = cjt188::decode(&bytes).unwrap();
//! assert_eq!(frame.meter.id, "78330011223344");
//! assert_eq!(frame.records[0].quantity, "volume");
//! ```

use model::{Decimal, Unit};
use time::{Date, Month, PrimitiveDateTime, Time};

use crate::cursor::checksum;
use crate::frame::{
    DecodedFrame, Function, MeterInfo, Protocol, Record, RecordQuantity, RecordValue, q,
};
use crate::small_string::SmallString;

/// Start byte of a frame.
pub const START: u8 = 0x68;
/// End byte of a frame.
pub const END: u8 = 0x16;
/// Wake-up byte sent before a frame.
pub const PREAMBLE: u8 = 0xFE;

/// Control function: read data (C=01, reply 81).
pub const C_READ_DATA: u8 = 0x01;
/// Control function: read address (C=03, reply 83, DI 810A).
pub const C_READ_ADDRESS: u8 = 0x03;
/// Control function: write data (C=04, reply 84), used for valve control DI A017.
pub const C_WRITE_DATA: u8 = 0x04;
/// Control function: read key version (C=09, reply 89, DI 8106).
pub const C_READ_KEY_VERSION: u8 = 0x09;
/// Control function: write address (C=15, reply 95, DI A018).
pub const C_WRITE_ADDRESS: u8 = 0x15;
/// Control function: write motor sync data (C=16, reply 96, DI A016).
pub const C_WRITE_SYNC: u8 = 0x16;
/// Vendor control code for valve operation instead of 04 (Fox Edge meters; reply AA).
pub const C_VENDOR_VALVE: u8 = 0x2A;
/// Control bit D7: set on frames sent by the meter.
pub const C_REPLY: u8 = 0x80;
/// Control bit D6: set on abnormal (error) replies.
pub const C_ABNORMAL: u8 = 0x40;

/// DI 901F: current measurement data.
pub const DI_CURRENT: u16 = 0x901F;
/// DI 810A: read address.
pub const DI_ADDRESS: u16 = 0x810A;
/// DI 8106: key version.
pub const DI_KEY_VERSION: u16 = 0x8106;
/// DI A017: valve control.
pub const DI_VALVE: u16 = 0xA017;
/// DI A018: write address.
pub const DI_WRITE_ADDRESS: u16 = 0xA018;
/// First settlement-history DI (last month); D120..D12B are months 1..12.
pub const DI_HISTORY_FIRST: u16 = 0xD120;
/// Last settlement-history DI (12 months ago).
pub const DI_HISTORY_LAST: u16 = 0xD12B;

/// Valve command byte: open (§3.6).
pub const VALVE_OPEN: u8 = 0x55;
/// Valve command byte: close (§3.6).
pub const VALVE_CLOSE: u8 = 0x99;

/// Unit code 2C: m³ (the usual volume unit of water meters).
pub const UNIT_M3: u8 = 0x2C;

/// Status bits D1D0: valve state (00 open, 01 closed, 11 abnormal).
pub const ST_VALVE_MASK: u16 = 0x0003;
/// Status bit D0: valve closed.
pub const ST_VALVE_CLOSED: u16 = 0x0001;
/// Status bit D1: valve abnormal.
pub const ST_VALVE_ABNORMAL: u16 = 0x0002;
/// Status bit D2: battery low.
pub const ST_BATTERY_LOW: u16 = 0x0004;

/// Why a CJ/T 188 frame could not be parsed. Offsets count from the first input byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cjt188Error {
    /// The input ended before the frame did.
    #[error("frame truncated at byte {offset}: {field} needs {needed} more byte(s)")]
    Truncated {
        /// Offset where the missing field starts.
        offset: usize,
        /// Field being read.
        field: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// After the FE preamble the start byte 0x68 was not found.
    #[error("expected start byte 0x68 at byte {offset}, found {found:#04x}")]
    BadStart {
        /// Offset of the byte found.
        offset: usize,
        /// The byte found.
        found: u8,
    },
    /// The length field is too small to hold DI and SER.
    #[error("length field {length} at byte {offset} is below 3 (DI + SER)")]
    BadLength {
        /// Offset of the L byte.
        offset: usize,
        /// Value of L.
        length: u8,
    },
    /// The checksum did not match.
    #[error("bad checksum at byte {offset}: expected {expected:#04x}, found {found:#04x}")]
    BadChecksum {
        /// Offset of the CS byte.
        offset: usize,
        /// Sum computed from 0x68 through the data.
        expected: u8,
        /// Byte on the wire.
        found: u8,
    },
    /// The end byte was not 0x16.
    #[error("expected end byte 0x16 at byte {offset}, found {found:#04x}")]
    BadEnd {
        /// Offset of the byte found.
        offset: usize,
        /// The byte found.
        found: u8,
    },
    /// Bytes followed the end byte.
    #[error("{count} unexpected byte(s) after the end byte, from byte {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// Number of extra bytes.
        count: usize,
    },
    /// A BCD field held a nibble above 9.
    #[error("non-BCD byte {byte:#04x} at byte {offset} in {field}")]
    BadBcd {
        /// Offset of the byte.
        offset: usize,
        /// Field being read.
        field: &'static str,
        /// The byte.
        byte: u8,
    },
    /// A unit code is not in the CJ/T 188 unit table, or not valid for the field.
    #[error("unit code {code:#04x} at byte {offset} is not a valid {expected} unit")]
    BadUnit {
        /// Offset of the unit byte.
        offset: usize,
        /// The code.
        code: u8,
        /// What kind of unit was expected (`volume`, `energy`...).
        expected: &'static str,
    },
    /// The real-time clock is not a calendar date and time.
    #[error("real-time clock at byte {offset} is not a valid date/time")]
    BadClock {
        /// Offset of the clock's first byte (seconds).
        offset: usize,
    },
    /// A known data identifier carried data of the wrong size.
    #[error("data of DI {di:04X} at byte {offset} is {found} byte(s), expected {expected}")]
    BadDataLength {
        /// Offset of the data (after SER).
        offset: usize,
        /// The DI.
        di: u16,
        /// Expected data size.
        expected: usize,
        /// Data size found.
        found: usize,
    },
    /// A valve command byte was neither 55 (open) nor 99 (close).
    #[error("valve command {byte:#04x} at byte {offset} is neither 0x55 (open) nor 0x99 (close)")]
    BadValveCommand {
        /// Offset of the byte.
        offset: usize,
        /// The byte.
        byte: u8,
    },
}

impl Cjt188Error {
    /// A stable snake_case code for metrics labels (`decoder_errors_total{error_code}`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::BadStart { .. } => "bad_start",
            Self::BadLength { .. } => "bad_length",
            Self::BadChecksum { .. } => "bad_checksum",
            Self::BadEnd { .. } => "bad_end",
            Self::TrailingBytes { .. } => "trailing_bytes",
            Self::BadBcd { .. } => "bad_bcd",
            Self::BadUnit { .. } => "bad_unit",
            Self::BadClock { .. } => "bad_clock",
            Self::BadDataLength { .. } => "bad_data_length",
            Self::BadValveCommand { .. } => "bad_valve_command",
        }
    }
}

/// Byte order of the data identifier on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DiOrder {
    /// High byte first (`90 1F` for 901F): CJ/T 188-2004 and most vendors.
    #[default]
    HighFirst,
    /// Low byte first (`1F 90` for 901F): CJ/T 188-2018 and some 2004 meters.
    LowFirst,
}

/// A read-data (901F) reply of a water or gas meter, as the simulators build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cjt188Reading {
    /// Current cumulative volume in m³ (sent in the unit `unit`).
    pub current_m3: Decimal,
    /// Cumulative volume at the last settlement date in m³ (sent in the unit `unit`).
    pub settlement_m3: Decimal,
    /// Unit code on the wire for both volumes: 29..2B (L, ×10, ×100) or 2C..2E (m³, ×10, ×100).
    pub unit: u8,
    /// The meter's real-time clock (local time of the meter).
    pub clock: PrimitiveDateTime,
    /// Status word ST (byte 0 = low byte): D1D0 valve (00 open, 01 closed, 11 abnormal), D2 battery low.
    pub status: u16,
}

/// A value with its CJ/T 188 unit code, as a heat meter sends it (value in that unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitValue {
    /// The value in the unit `unit` (2 decimals; flow 4 decimals).
    pub value: Decimal,
    /// Unit code.
    pub unit: u8,
}

/// A read-data (901F) reply of a heat meter (T = 2x, L = 0x2E).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeatReading {
    /// Heat at the settlement date.
    pub settlement_heat: UnitValue,
    /// Current cumulative heat.
    pub current_heat: UnitValue,
    /// Heat power.
    pub power: UnitValue,
    /// Flow rate (4 decimals).
    pub flow: UnitValue,
    /// Cumulative volume.
    pub volume: UnitValue,
    /// Supply temperature, °C (2 decimals).
    pub supply_c: Decimal,
    /// Return temperature, °C (2 decimals).
    pub return_c: Decimal,
    /// Cumulative working time, hours.
    pub working_hours: u32,
    /// Real-time clock; `None` when the meter sent all zeros.
    pub clock: Option<PrimitiveDateTime>,
    /// Status word ST (byte 0 = low byte).
    pub status: u16,
    /// The vendor variant that sends each unit byte before its value (JY meters).
    pub unit_first: bool,
}

/// What follows DI and SER, interpreted according to control code and DI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Nothing (requests, read-address reply, write acknowledgements).
    Empty,
    /// Water/gas 901F reply with a set clock.
    Reading(Cjt188Reading),
    /// Water/gas 901F reply whose clock is all zeros (not set); volumes in m³.
    ReadingClockUnset {
        /// Current cumulative volume, m³.
        current_m3: Decimal,
        /// Settlement-date cumulative volume, m³.
        settlement_m3: Decimal,
        /// Unit code on the wire.
        unit: u8,
        /// Status word.
        status: u16,
    },
    /// Heat meter 901F reply (boxed: it is four times the size of the other variants).
    Heat(Box<HeatReading>),
    /// Settlement history reply (DI D120..D12B): cumulative volume of that month, m³.
    History {
        /// Volume, m³.
        volume_m3: Decimal,
        /// Unit code on the wire.
        unit: u8,
    },
    /// Valve control request (A017): open or close.
    Valve {
        /// True = open (55), false = close (99).
        open: bool,
    },
    /// Status word of a valve reply or an abnormal reply (2 bytes, byte 0 low).
    Status(u16),
    /// Data of a DI this crate does not interpret, kept raw.
    Raw(Vec<u8>),
}

/// One CJ/T 188 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cjt188Frame {
    /// Meter type T (10h cold water, 20h heat, 30h gas, AAh wildcard...).
    pub meter_type: u8,
    /// Address A0..A6 in wire order (A0 = lowest digits).
    pub address: [u8; 7],
    /// Control code C.
    pub control: u8,
    /// Data identifier, logical value (0x901F whichever order it was sent in).
    pub di: u16,
    /// Byte order of the DI on the wire (kept so a reply can echo the request).
    pub di_order: DiOrder,
    /// Sequence number SER (echoed by the reply).
    pub ser: u8,
    /// Data.
    pub payload: Payload,
}

/// Returns the pipeline meter id `cjt188:` + A6..A0 as 14 digits.
pub fn meter_id(address: &[u8; 7]) -> String {
    format!("cjt188:{}", address_digits(address))
}

/// Returns A6..A0 as 14 hex digits (the address as printed on the meter).
pub fn address_digits(address: &[u8; 7]) -> String {
    address_text(address).into()
}

/// [`address_digits`] on the stack (14 characters fit a [`SmallString`]).
fn address_text(address: &[u8; 7]) -> SmallString {
    let mut out = [0u8; crate::small_string::INLINE];
    for (pair, b) in out.chunks_exact_mut(2).zip(address.iter().rev()) {
        for (slot, nibble) in pair.iter_mut().zip([b >> 4, b & 0x0F]) {
            *slot = crate::mbus::HEX_UPPER
                .get(usize::from(nibble))
                .copied()
                .unwrap_or(b'0');
        }
    }
    SmallString::from_ascii_buf(out, 14)
}

/// Parses a 14-digit address as printed (A6..A0) into wire order A0..A6.
pub fn parse_address(digits: &str) -> Option<[u8; 7]> {
    let bytes = hex::decode(digits).ok()?;
    let mut address: [u8; 7] = bytes.try_into().ok()?;
    address.reverse();
    Some(address)
}

impl Cjt188Frame {
    /// Builds a read-data request (C=01, DI 901F, SER 0).
    pub fn read_data_request(meter_type: u8, address: [u8; 7]) -> Self {
        Self::new(
            meter_type,
            address,
            C_READ_DATA,
            DI_CURRENT,
            0,
            Payload::Empty,
        )
    }

    /// Builds a valve-control write (C=04, DI A017, 55 open / 99 close).
    pub fn valve_control(meter_type: u8, address: [u8; 7], ser: u8, open: bool) -> Self {
        Self::new(
            meter_type,
            address,
            C_WRITE_DATA,
            DI_VALVE,
            ser,
            Payload::Valve { open },
        )
    }

    /// Builds a water/gas read-data reply (C=81, DI 901F, L=0x16).
    pub fn read_data_reply(
        meter_type: u8,
        address: [u8; 7],
        ser: u8,
        reading: &Cjt188Reading,
    ) -> Self {
        let control = C_READ_DATA | C_REPLY;
        let payload = Payload::Reading(reading.clone());
        Self::new(meter_type, address, control, DI_CURRENT, ser, payload)
    }

    /// Builds a valve-control reply (C=84, DI A017) carrying the status word after the action.
    pub fn valve_reply(meter_type: u8, address: [u8; 7], ser: u8, status: u16) -> Self {
        let control = C_WRITE_DATA | C_REPLY;
        Self::new(
            meter_type,
            address,
            control,
            DI_VALVE,
            ser,
            Payload::Status(status),
        )
    }

    /// Builds a read-address request to the broadcast address (C=03, DI 810A).
    pub fn read_address_request() -> Self {
        Self::new(
            0xAA,
            [0xAA; 7],
            C_READ_ADDRESS,
            DI_ADDRESS,
            0,
            Payload::Empty,
        )
    }

    /// Builds a read-address reply (C=83, DI 810A); the address is in the header.
    pub fn read_address_reply(meter_type: u8, address: [u8; 7], ser: u8) -> Self {
        let control = C_READ_ADDRESS | C_REPLY;
        Self::new(
            meter_type,
            address,
            control,
            DI_ADDRESS,
            ser,
            Payload::Empty,
        )
    }

    /// Builds an abnormal reply to `request` (C | C0) with a status word.
    pub fn abnormal_reply(request: &Cjt188Frame, status: u16) -> Self {
        let mut frame = request.clone();
        frame.control = request.control | C_REPLY | C_ABNORMAL;
        frame.payload = Payload::Status(status);
        frame
    }

    /// Returns the same frame with the DI sent in `order`.
    pub fn with_di_order(mut self, order: DiOrder) -> Self {
        self.di_order = order;
        self
    }

    fn new(
        meter_type: u8,
        address: [u8; 7],
        control: u8,
        di: u16,
        ser: u8,
        payload: Payload,
    ) -> Self {
        Self {
            meter_type,
            address,
            control,
            di,
            di_order: DiOrder::HighFirst,
            ser,
            payload,
        }
    }

    /// True for frames sent by the meter (control bit D7).
    pub fn is_reply(&self) -> bool {
        self.control & C_REPLY != 0
    }

    /// True for abnormal replies (control bit D6).
    pub fn is_abnormal(&self) -> bool {
        self.control & C_ABNORMAL != 0
    }

    /// Function code D5..D0 (01 read, 03 address, 04 write, 2A vendor valve...).
    pub fn function(&self) -> u8 {
        self.control & 0x3F
    }

    /// Returns the meter id (`cjt188:` + A6..A0).
    pub fn meter_id(&self) -> String {
        meter_id(&self.address)
    }
}

mod encode;
mod parse;
mod records;

pub use encode::*;
pub use parse::*;
pub use records::*;
