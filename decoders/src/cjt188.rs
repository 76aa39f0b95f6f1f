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

// ---------------------------------------------------------------------------------------------
// Parsing

type Cursor<'a> = crate::cursor::Cursor<'a, Cjt188Error>;

impl From<crate::cursor::Truncated> for Cjt188Error {
    fn from(t: crate::cursor::Truncated) -> Self {
        Self::Truncated {
            offset: t.offset,
            field: t.field,
            needed: t.needed,
        }
    }
}

fn is_known_di(di: u16) -> bool {
    matches!(
        di,
        0x901F
            | 0x903F..=0x907F
            | 0xD120..=0xD12B
            | 0xD200..=0xD4FF
            | 0x8102..=0x8106
            | 0x810A
            | 0xA010..=0xA019
            | 0xA101..=0xA107
    )
}

/// Resolves the wire DI bytes into the logical DI and the order it was sent in.
fn resolve_di(di0: u8, di1: u8) -> (u16, DiOrder) {
    let high_first = u16::from_be_bytes([di0, di1]);
    let low_first = u16::from_le_bytes([di0, di1]);
    if !is_known_di(high_first) && is_known_di(low_first) {
        (low_first, DiOrder::LowFirst)
    } else {
        (high_first, DiOrder::HighFirst)
    }
}

/// Parses one frame (with optional FE preamble); bytes after the end byte are an error.
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn parse(bytes: &[u8]) -> Result<Cjt188Frame, Cjt188Error> {
    let (frame, used) = parse_prefix(bytes)?;
    if used < bytes.len() {
        return Err(Cjt188Error::TrailingBytes {
            offset: used,
            count: bytes.len().saturating_sub(used),
        });
    }
    Ok(frame)
}

/// Why a payload of concatenated frames was refused: the first frame that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "frame {index} of the payload (from byte {start}; offsets below count from there): {source}"
)]
pub struct ConcatenatedError {
    /// Position of the bad frame in the payload (0 = first).
    pub index: usize,
    /// Payload offset where the bad frame (its preamble, if any) starts.
    pub start: usize,
    /// What was wrong with it; its offsets count from `start`.
    #[source]
    pub source: Cjt188Error,
}

impl ConcatenatedError {
    /// The stable code of the underlying frame error (metrics label).
    pub fn code(&self) -> &'static str {
        self.source.code()
    }
}

/// Parses a payload made of one or more whole frames back to back, each with its own optional
/// FE preamble, as NB-IoT meters send their history (one 901F reply per reading). Returns
/// every frame with the byte range it occupies in `bytes` (preamble included).
///
/// All or nothing: an empty payload, a bad frame anywhere or bytes that do not form a whole
/// frame at the end refuse the whole payload.
///
/// # Errors
/// [`ConcatenatedError`] naming the first frame that did not parse.
pub fn parse_concatenated(
    bytes: &[u8],
) -> Result<Vec<(Cjt188Frame, std::ops::Range<usize>)>, ConcatenatedError> {
    let mut frames = Vec::new();
    let mut start = 0usize;
    loop {
        let rest = bytes.get(start..).unwrap_or(&[]);
        let (frame, used) = parse_prefix(rest).map_err(|source| ConcatenatedError {
            index: frames.len(),
            start,
            source,
        })?;
        let end = start.saturating_add(used);
        frames.push((frame, start..end));
        start = end;
        if start >= bytes.len() {
            return Ok(frames);
        }
    }
}

/// Parses one frame at the start of `bytes` and returns it with the number of bytes used.
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn parse_prefix(bytes: &[u8]) -> Result<(Cjt188Frame, usize), Cjt188Error> {
    let preamble = bytes.iter().take_while(|b| **b == PREAMBLE).count();
    let mut cur = Cursor::new(bytes, 0);
    cur.take(preamble, "preamble")?;
    let frame_start = cur.rest;
    let start_offset = cur.offset;
    let start = cur.byte("start byte")?;
    if start != START {
        return Err(Cjt188Error::BadStart {
            offset: start_offset,
            found: start,
        });
    }
    let meter_type = cur.byte("meter type")?;
    let address = cur.array::<7>("address")?;
    let control = cur.byte("control code")?;
    let len_offset = cur.offset;
    let length = cur.byte("length")?;
    if length < 3 {
        return Err(Cjt188Error::BadLength {
            offset: len_offset,
            length,
        });
    }
    let body_offset = cur.offset;
    let body = cur.take(usize::from(length), "data")?;
    let cs_offset = cur.offset;
    let cs = cur.byte("checksum")?;
    let end_offset = cur.offset;
    let end = cur.byte("end byte")?;
    // The checksum covers 68 through the last data byte: 11 header bytes + L.
    let summed = frame_start
        .get(..usize::from(length).saturating_add(11))
        .unwrap_or(&[]);
    let expected = checksum(summed);
    if cs != expected {
        return Err(Cjt188Error::BadChecksum {
            offset: cs_offset,
            expected,
            found: cs,
        });
    }
    if end != END {
        return Err(Cjt188Error::BadEnd {
            offset: end_offset,
            found: end,
        });
    }
    let used = cur.offset;

    let mut body_cur = Cursor::new(body, body_offset);
    let [di0, di1] = body_cur.array::<2>("DI")?;
    let (di, di_order) = resolve_di(di0, di1);
    let ser = body_cur.byte("SER")?;
    let payload = parse_payload(meter_type, control, di, body_cur)?;
    let frame = Cjt188Frame {
        meter_type,
        address,
        control,
        di,
        di_order,
        ser,
        payload,
    };
    Ok((frame, used))
}

fn parse_payload(
    meter_type: u8,
    control: u8,
    di: u16,
    mut cur: Cursor<'_>,
) -> Result<Payload, Cjt188Error> {
    let data_offset = cur.offset;
    let data = cur.rest;
    if data.is_empty() {
        return Ok(Payload::Empty);
    }
    let reply = control & C_REPLY != 0;
    let abnormal = control & C_ABNORMAL != 0;
    let function = control & 0x3F;
    let expect_len = |expected: usize| {
        if data.len() == expected {
            Ok(())
        } else {
            Err(Cjt188Error::BadDataLength {
                offset: data_offset,
                di,
                expected,
                found: data.len(),
            })
        }
    };
    if abnormal {
        if let [lo, hi] = data {
            return Ok(Payload::Status(u16::from_le_bytes([*lo, *hi])));
        }
        return Ok(Payload::Raw(data.to_vec()));
    }
    match (reply, function, di) {
        (true, C_READ_DATA, DI_CURRENT) if is_heat(meter_type) => {
            expect_len(43)?;
            parse_heat(&mut cur).map(|h| Payload::Heat(Box::new(h)))
        }
        (true, C_READ_DATA, DI_CURRENT) => {
            expect_len(19)?;
            parse_water(&mut cur)
        }
        (true, C_READ_DATA, DI_HISTORY_FIRST..=DI_HISTORY_LAST) => {
            expect_len(5)?;
            let (volume_m3, unit) = volume_m3(&mut cur, "settlement history volume")?;
            Ok(Payload::History { volume_m3, unit })
        }
        (false, C_WRITE_DATA | C_VENDOR_VALVE, DI_VALVE) => {
            expect_len(1)?;
            match cur.byte("valve command")? {
                VALVE_OPEN => Ok(Payload::Valve { open: true }),
                VALVE_CLOSE => Ok(Payload::Valve { open: false }),
                other => Err(Cjt188Error::BadValveCommand {
                    offset: data_offset,
                    byte: other,
                }),
            }
        }
        (true, C_WRITE_DATA | C_VENDOR_VALVE, DI_VALVE) => {
            expect_len(2)?;
            let st = cur.array::<2>("status")?;
            Ok(Payload::Status(u16::from_le_bytes(st)))
        }
        _ => Ok(Payload::Raw(data.to_vec())),
    }
}

fn is_heat(meter_type: u8) -> bool {
    (0x20..=0x2F).contains(&meter_type)
}

/// Decodes `digits`-digit BCD, low byte first, into an integer.
fn bcd_le(bytes: &[u8], offset: usize, field: &'static str) -> Result<u64, Cjt188Error> {
    let mut value: u64 = 0;
    for (i, b) in bytes.iter().enumerate().rev() {
        let (hi, lo) = (b >> 4, b & 0x0F);
        if hi > 9 || lo > 9 {
            return Err(Cjt188Error::BadBcd {
                offset: offset.saturating_add(i),
                field,
                byte: *b,
            });
        }
        // At most 7 bytes (14 digits) are ever read, far below u64::MAX.
        value = value
            .wrapping_mul(100)
            .wrapping_add(u64::from(hi.wrapping_mul(10).wrapping_add(lo)));
    }
    Ok(value)
}

fn bcd_field(
    cur: &mut Cursor<'_>,
    n: usize,
    scale: u32,
    field: &'static str,
) -> Result<Decimal, Cjt188Error> {
    let offset = cur.offset;
    let bytes = cur.take(n, field)?;
    let raw = bcd_le(bytes, offset, field)?;
    let raw = i64::try_from(raw).unwrap_or(i64::MAX);
    Ok(Decimal::new(raw, scale))
}

/// Volume unit codes and their factor to m³ as (mantissa, scale).
fn volume_factor(unit: u8) -> Option<Decimal> {
    Some(match unit {
        0x29 => Decimal::new(1, 3),
        0x2A => Decimal::new(1, 2),
        0x2B => Decimal::new(1, 1),
        0x2C => Decimal::ONE,
        0x2D => Decimal::TEN,
        0x2E => Decimal::ONE_HUNDRED,
        _ => return None,
    })
}

/// Reads a 4-byte BCD XXXXXX.XX volume followed by its unit and returns it in m³.
fn volume_m3(cur: &mut Cursor<'_>, field: &'static str) -> Result<(Decimal, u8), Cjt188Error> {
    let value = bcd_field(cur, 4, 2, field)?;
    let unit_offset = cur.offset;
    let unit = cur.byte("unit")?;
    if unit == UNIT_M3 {
        return Ok((value, unit));
    }
    let factor = volume_factor(unit).ok_or(Cjt188Error::BadUnit {
        offset: unit_offset,
        code: unit,
        expected: "volume",
    })?;
    let m3 = value.checked_mul(factor).ok_or(Cjt188Error::BadUnit {
        offset: unit_offset,
        code: unit,
        expected: "volume",
    })?;
    Ok((m3, unit))
}

/// Reads the 7-byte clock `ss mm hh DD MM YYlo YYhi`; all zeros = not set.
fn clock(cur: &mut Cursor<'_>) -> Result<Option<PrimitiveDateTime>, Cjt188Error> {
    let offset = cur.offset;
    let bytes = cur.array::<7>("real-time clock")?;
    if bytes == [0; 7] {
        return Ok(None);
    }
    let mut digits = [0u8; 7];
    for ((d, b), i) in digits.iter_mut().zip(bytes).zip(0usize..) {
        let (hi, lo) = (b >> 4, b & 0x0F);
        if hi > 9 || lo > 9 {
            let offset = offset.saturating_add(i);
            return Err(Cjt188Error::BadBcd {
                offset,
                field: "real-time clock",
                byte: b,
            });
        }
        *d = hi.wrapping_mul(10).wrapping_add(lo);
    }
    let [ss, mi, hh, dd, mo, ylo, yhi] = digits;
    let year = i32::from(yhi)
        .wrapping_mul(100)
        .wrapping_add(i32::from(ylo));
    let bad = Cjt188Error::BadClock { offset };
    let month = Month::try_from(mo).map_err(|_| bad.clone())?;
    let date = Date::from_calendar_date(year, month, dd).map_err(|_| bad.clone())?;
    let time = Time::from_hms(hh, mi, ss).map_err(|_| bad)?;
    Ok(Some(PrimitiveDateTime::new(date, time)))
}

fn status(cur: &mut Cursor<'_>) -> Result<u16, Cjt188Error> {
    Ok(u16::from_le_bytes(cur.array::<2>("status")?))
}

/// Two BCD digits, `None` if a nibble is above 9.
fn bcd2(b: u8) -> Option<u8> {
    let (hi, lo) = (b >> 4, b & 0x0F);
    (hi <= 9 && lo <= 9).then(|| hi.wrapping_mul(10).wrapping_add(lo))
}

/// The common case in registers: m³ units, valid BCD and clock. `None` sends the frame to
/// [`parse_water`], which finds and reports the exact problem.
fn fast_water(data: &[u8]) -> Option<Payload> {
    let [
        c0,
        c1,
        c2,
        c3,
        cu,
        s0,
        s1,
        s2,
        s3,
        su,
        t0,
        t1,
        t2,
        t3,
        t4,
        t5,
        t6,
        st0,
        st1,
    ] = <[u8; 19]>::try_from(data).ok()?;
    if cu != UNIT_M3 || su != UNIT_M3 {
        return None;
    }
    let volume = |b: [u8; 4]| -> Option<Decimal> {
        let mut v: i64 = 0;
        for x in b.iter().rev() {
            v = v.wrapping_mul(100).wrapping_add(i64::from(bcd2(*x)?));
        }
        Some(Decimal::new(v, 2))
    };
    let current_m3 = volume([c0, c1, c2, c3])?;
    let settlement_m3 = volume([s0, s1, s2, s3])?;
    let status = u16::from_le_bytes([st0, st1]);
    if [t0, t1, t2, t3, t4, t5, t6] == [0; 7] {
        return Some(Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            unit: UNIT_M3,
            status,
        });
    }
    let year = i32::from(bcd2(t6)?)
        .wrapping_mul(100)
        .wrapping_add(i32::from(bcd2(t5)?));
    let month = Month::try_from(bcd2(t4)?).ok()?;
    let date = Date::from_calendar_date(year, month, bcd2(t3)?).ok()?;
    let time = Time::from_hms(bcd2(t2)?, bcd2(t1)?, bcd2(t0)?).ok()?;
    let clock = PrimitiveDateTime::new(date, time);
    Some(Payload::Reading(Cjt188Reading {
        current_m3,
        settlement_m3,
        unit: UNIT_M3,
        clock,
        status,
    }))
}

fn parse_water(cur: &mut Cursor<'_>) -> Result<Payload, Cjt188Error> {
    match fast_water(cur.rest) {
        Some(payload) => Ok(payload),
        None => parse_water_detailed(cur),
    }
}

fn parse_water_detailed(cur: &mut Cursor<'_>) -> Result<Payload, Cjt188Error> {
    let (current_m3, unit) = volume_m3(cur, "current cumulative volume")?;
    let (settlement_m3, _) = volume_m3(cur, "settlement-date cumulative volume")?;
    let clock = clock(cur)?;
    let status = status(cur)?;
    Ok(match clock {
        Some(clock) => Payload::Reading(Cjt188Reading {
            current_m3,
            settlement_m3,
            unit,
            clock,
            status,
        }),
        None => Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            unit,
            status,
        },
    })
}

/// Map a CJ/T 188 unit code to a model unit and the factor from wire units to it.
fn unit_of(code: u8) -> Option<(Unit, Decimal)> {
    let step = |base: u8| -> Decimal {
        match code.wrapping_sub(base) {
            0 => Decimal::ONE,
            1 => Decimal::TEN,
            _ => Decimal::ONE_HUNDRED,
        }
    };
    let thousand = Decimal::new(1000, 0);
    let milli = Decimal::new(1, 3);
    let (unit, base, factor) = match code {
        0x01 => (Unit::Joule, 0x01, Decimal::ONE),
        0x02..=0x04 => (Unit::WattHour, 0x02, Decimal::ONE),
        0x05..=0x07 => (Unit::KilowattHour, 0x05, Decimal::ONE),
        0x08..=0x0A => (Unit::MegawattHour, 0x08, Decimal::ONE),
        0x0B..=0x0D => (Unit::Joule, 0x0B, thousand),
        0x0E..=0x10 => (Unit::Gigajoule, 0x0E, milli),
        0x11..=0x13 => (Unit::Gigajoule, 0x11, Decimal::ONE),
        0x14..=0x16 => (Unit::Watt, 0x14, Decimal::ONE),
        0x17..=0x19 => (Unit::Kilowatt, 0x17, Decimal::ONE),
        0x1A..=0x1C => (Unit::Kilowatt, 0x1A, thousand),
        0x29..=0x2B => (Unit::Litre, 0x29, Decimal::ONE),
        0x2C..=0x2E => (Unit::CubicMetre, 0x2C, Decimal::ONE),
        0x32..=0x34 => (Unit::LitrePerHour, 0x32, Decimal::ONE),
        0x35..=0x37 => (Unit::CubicMetrePerHour, 0x35, Decimal::ONE),
        _ => return None,
    };
    factor.checked_mul(step(base)).map(|f| (unit, f))
}

fn heat_value(
    cur: &mut Cursor<'_>,
    unit_first: bool,
    scale: u32,
    field: &'static str,
) -> Result<UnitValue, Cjt188Error> {
    let (unit_offset, unit, value) = if unit_first {
        let unit_offset = cur.offset;
        let unit = cur.byte("unit")?;
        (unit_offset, unit, bcd_field(cur, 4, scale, field)?)
    } else {
        let value = bcd_field(cur, 4, scale, field)?;
        (cur.offset, cur.byte("unit")?, value)
    };
    if unit_of(unit).is_none() {
        return Err(Cjt188Error::BadUnit {
            offset: unit_offset,
            code: unit,
            expected: field,
        });
    }
    Ok(UnitValue { value, unit })
}

fn parse_heat(cur: &mut Cursor<'_>) -> Result<HeatReading, Cjt188Error> {
    // JY meters send the unit byte first: detect it when byte 4 is not a unit but byte 0 is.
    let unit_first = match cur.rest {
        [first, _, _, _, fifth, ..] => unit_of(*fifth).is_none() && unit_of(*first).is_some(),
        _ => false,
    };
    let settlement_heat = heat_value(cur, unit_first, 2, "settlement heat")?;
    let current_heat = heat_value(cur, unit_first, 2, "current heat")?;
    let power = heat_value(cur, unit_first, 2, "heat power")?;
    let flow = heat_value(cur, unit_first, 4, "flow")?;
    let volume = heat_value(cur, unit_first, 2, "cumulative volume")?;
    let supply_c = bcd_field(cur, 3, 2, "supply temperature")?;
    let return_c = bcd_field(cur, 3, 2, "return temperature")?;
    let hours = bcd_field(cur, 3, 0, "working time")?;
    let working_hours = u32::try_from(hours.mantissa()).unwrap_or(u32::MAX);
    let clock = clock(cur)?;
    let status = status(cur)?;
    Ok(HeatReading {
        settlement_heat,
        current_heat,
        power,
        flow,
        volume,
        supply_c,
        return_c,
        working_hours,
        clock,
        status,
        unit_first,
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Encodes `value` (scaled by `scale` decimals) as `n` BCD bytes, low byte first.
///
/// Negative values encode as 0; values too large for the field keep their low digits, the
/// way a meter register rolls over.
fn push_bcd(out: &mut Vec<u8>, value: Decimal, scale: u32, n: usize) {
    let mut scaled = value.round_dp(scale);
    scaled.rescale(scale);
    let mut raw = u128::try_from(scaled.mantissa()).unwrap_or(0);
    for _ in 0..n {
        let two = (raw % 100) as u8;
        out.push(((two / 10) << 4) | (two % 10));
        raw /= 100;
    }
}

fn push_clock(out: &mut Vec<u8>, clock: Option<PrimitiveDateTime>) {
    let Some(c) = clock else {
        out.extend_from_slice(&[0; 7]);
        return;
    };
    let year = u16::try_from(c.year()).unwrap_or(0);
    let fields = [
        c.second(),
        c.minute(),
        c.hour(),
        c.day(),
        u8::from(c.month()),
        (year % 100) as u8,
        (year / 100 % 100) as u8,
    ];
    for f in fields {
        out.push(((f / 10) << 4) | (f % 10));
    }
}

/// Volume unit codes, smallest first.
const VOLUME_UNITS: [u8; 6] = [0x29, 0x2A, 0x2B, 0x2C, 0x2D, 0x2E];

/// Writes `m3` as XXXXXX.XX in `unit`, or, when it does not fit that unit exactly (a settlement
/// volume a meter sent in another unit than its current volume: fuzz find, `cjt188_roundtrip`),
/// in the first unit that holds it exactly, so no digit is silently dropped.
fn push_volume(out: &mut Vec<u8>, m3: Decimal, unit: u8) {
    let limit = Decimal::new(1_000_000, 0);
    let fits = |u: u8| {
        let wire = m3.checked_div(volume_factor(u)?)?;
        (!wire.is_sign_negative() && wire.round_dp(2) == wire && wire < limit).then_some((wire, u))
    };
    let (wire, unit) = fits(unit)
        .or_else(|| VOLUME_UNITS.iter().find_map(|&u| fits(u)))
        .unwrap_or_else(|| {
            let factor = volume_factor(unit).unwrap_or(Decimal::ONE);
            (m3.checked_div(factor).unwrap_or(m3), unit)
        });
    push_bcd(out, wire, 2, 4);
    out.push(unit);
}

fn push_water(out: &mut Vec<u8>, current: Decimal, settlement: Decimal, unit: u8) {
    push_volume(out, current, unit);
    push_volume(out, settlement, unit);
}

fn push_heat_value(out: &mut Vec<u8>, v: &UnitValue, scale: u32, unit_first: bool) {
    if unit_first {
        out.push(v.unit);
        push_bcd(out, v.value, scale, 4);
    } else {
        push_bcd(out, v.value, scale, 4);
        out.push(v.unit);
    }
}

fn push_payload(out: &mut Vec<u8>, payload: &Payload) {
    match payload {
        Payload::Empty => {}
        Payload::Reading(r) => {
            push_water(out, r.current_m3, r.settlement_m3, r.unit);
            push_clock(out, Some(r.clock));
            out.extend_from_slice(&r.status.to_le_bytes());
        }
        Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            unit,
            status,
        } => {
            push_water(out, *current_m3, *settlement_m3, *unit);
            push_clock(out, None);
            out.extend_from_slice(&status.to_le_bytes());
        }
        Payload::Heat(h) => {
            push_heat_value(out, &h.settlement_heat, 2, h.unit_first);
            push_heat_value(out, &h.current_heat, 2, h.unit_first);
            push_heat_value(out, &h.power, 2, h.unit_first);
            push_heat_value(out, &h.flow, 4, h.unit_first);
            push_heat_value(out, &h.volume, 2, h.unit_first);
            push_bcd(out, h.supply_c, 2, 3);
            push_bcd(out, h.return_c, 2, 3);
            push_bcd(out, Decimal::from(h.working_hours), 0, 3);
            push_clock(out, h.clock);
            out.extend_from_slice(&h.status.to_le_bytes());
        }
        Payload::History { volume_m3, unit } => push_volume(out, *volume_m3, *unit),
        Payload::Valve { open } => out.push(if *open { VALVE_OPEN } else { VALVE_CLOSE }),
        Payload::Status(st) => out.extend_from_slice(&st.to_le_bytes()),
        Payload::Raw(bytes) => out.extend_from_slice(bytes),
    }
}

/// Encodes a frame without preamble (`68 .. CS 16`).
///
/// Raw payloads longer than 252 bytes are cut so that L fits in one byte.
pub fn encode(frame: &Cjt188Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(frame, &mut out);
    out
}

/// Encodes a frame preceded by `preamble` FE wake-up bytes (serial links use 2 to 4).
pub fn encode_with_preamble(frame: &Cjt188Frame, preamble: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(preamble.saturating_add(64));
    out.resize(preamble, PREAMBLE);
    encode_into(frame, &mut out);
    out
}

/// Appends the encoded frame to `out` (lets callers reuse a buffer).
pub fn encode_into(frame: &Cjt188Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(START);
    out.push(frame.meter_type);
    out.extend_from_slice(&frame.address);
    out.push(frame.control);
    let len_pos = out.len();
    out.push(0);
    let di = match frame.di_order {
        DiOrder::HighFirst => frame.di.to_be_bytes(),
        DiOrder::LowFirst => frame.di.to_le_bytes(),
    };
    out.extend_from_slice(&di);
    out.push(frame.ser);
    push_payload(out, &frame.payload);
    let data_len = out.len().saturating_sub(len_pos.saturating_add(1));
    if data_len > 255 {
        out.truncate(len_pos.saturating_add(256));
    }
    let len = u8::try_from(data_len).unwrap_or(u8::MAX);
    if let Some(l) = out.get_mut(len_pos) {
        *l = len;
    }
    let cs = checksum(out.get(start..).unwrap_or(&[]));
    out.push(cs);
    out.push(END);
}

// ---------------------------------------------------------------------------------------------
// Mapping to DecodedFrame

/// Medium name of a meter type code.
pub fn medium_name(meter_type: u8) -> &'static str {
    match meter_type {
        0x10 => "cold_water",
        0x11 => "hot_water",
        0x12 => "drinking_water",
        0x13 => "reclaimed_water",
        0x14..=0x19 => "water",
        0x20 => "heat",
        0x21 => "cooling",
        0x22 => "heat_cooling",
        0x23..=0x29 => "heat",
        0x30..=0x39 => "gas",
        0x40..=0x49 => "custom",
        0xAA => "wildcard",
        _ => "unknown",
    }
}

fn record(quantity: impl Into<RecordQuantity>, value: RecordValue, unit: Option<Unit>) -> Record {
    Record {
        quantity: quantity.into(),
        value,
        unit,
        storage: 0,
        tariff: 0,
        subunit: 0,
        function: Function::Instantaneous,
    }
}

fn number(quantity: RecordQuantity, value: Decimal, unit: Option<Unit>) -> Record {
    record(quantity, RecordValue::Number(value), unit)
}

fn clock_string(clock: PrimitiveDateTime) -> SmallString {
    crate::mbus::iso_date(
        clock.year(),
        u8::from(clock.month()),
        clock.day(),
        Some((clock.hour(), clock.minute(), Some(clock.second()))),
    )
}

/// Where a vendor puts the valve and battery bits in ST byte 0 (PROTOCOLS.md §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StatusBits {
    /// D1D0 valve (00 open, 01 closed, 11 abnormal), D2 battery low: the standard.
    #[default]
    Standard,
    /// Bit-mirrored reading of some vendors (sdqr): D7D6 valve (00 open, 01 closed, 11
    /// abnormal), D5 battery low.
    Mirrored,
}

impl StatusBits {
    /// Valve state: 0 open, 1 closed, 3 abnormal.
    pub fn valve_state(self, st: u16) -> u8 {
        let (closed, abnormal) = match self {
            Self::Standard => (st & ST_VALVE_CLOSED != 0, st & ST_VALVE_ABNORMAL != 0),
            Self::Mirrored => (st & 0x0040 != 0, st & 0x0080 != 0),
        };
        if abnormal { 3 } else { u8::from(closed) }
    }

    /// True when the battery-low bit is set.
    pub fn battery_low(self, st: u16) -> bool {
        match self {
            Self::Standard => st & ST_BATTERY_LOW != 0,
            Self::Mirrored => st & 0x0020 != 0,
        }
    }
}

fn status_records(records: &mut Vec<Record>, st: u16, bits: StatusBits) {
    records.push(number(
        q!("valve_state"),
        Decimal::from(bits.valve_state(st)),
        None,
    ));
    records.push(number(
        q!("battery_low"),
        Decimal::from(u8::from(bits.battery_low(st))),
        None,
    ));
    records.push(number(q!("status_word"), Decimal::from(st), None));
}

fn unit_record(quantity: RecordQuantity, v: &UnitValue) -> Option<Record> {
    let (unit, factor) = unit_of(v.unit)?;
    let value = v.value.checked_mul(factor)?.normalize();
    Some(number(quantity, value, Some(unit)))
}

/// Returns the records of a parsed frame (empty for requests), standard status bits.
pub fn records(frame: &Cjt188Frame) -> Vec<Record> {
    records_with(frame, StatusBits::Standard)
}

/// Returns the records of a parsed frame, reading ST with the vendor's bit layout.
pub fn records_with(frame: &Cjt188Frame, bits: StatusBits) -> Vec<Record> {
    let mut out = Vec::new();
    let volume = |q: RecordQuantity, v: Decimal| number(q, v.normalize(), Some(Unit::CubicMetre));
    match &frame.payload {
        Payload::Reading(r) => {
            out.push(volume(q!("volume"), r.current_m3));
            out.push(volume(q!("volume_settlement"), r.settlement_m3));
            out.push(record(
                q!("date_time"),
                RecordValue::Date(clock_string(r.clock)),
                None,
            ));
            status_records(&mut out, r.status, bits);
        }
        Payload::ReadingClockUnset {
            current_m3,
            settlement_m3,
            status,
            ..
        } => {
            out.push(volume(q!("volume"), *current_m3));
            out.push(volume(q!("volume_settlement"), *settlement_m3));
            status_records(&mut out, *status, bits);
        }
        Payload::Heat(h) => {
            let pairs = [
                (q!("energy_settlement"), &h.settlement_heat),
                (q!("energy"), &h.current_heat),
                (q!("power"), &h.power),
                (q!("volume_flow"), &h.flow),
                (q!("volume"), &h.volume),
            ];
            out.extend(pairs.into_iter().filter_map(|(q, v)| unit_record(q, v)));
            out.push(number(
                q!("flow_temperature"),
                h.supply_c.normalize(),
                Some(Unit::DegreeCelsius),
            ));
            out.push(number(
                q!("return_temperature"),
                h.return_c.normalize(),
                Some(Unit::DegreeCelsius),
            ));
            out.push(number(
                q!("operating_time"),
                Decimal::from(h.working_hours),
                Some(Unit::Hour),
            ));
            if let Some(clock) = h.clock {
                out.push(record(
                    q!("date_time"),
                    RecordValue::Date(clock_string(clock)),
                    None,
                ));
            }
            status_records(&mut out, h.status, bits);
        }
        Payload::History { volume_m3, .. } => {
            let mut r = volume(q!("volume_settlement"), *volume_m3);
            r.storage = u32::from(frame.di.saturating_sub(DI_HISTORY_FIRST)).saturating_add(1);
            out.push(r);
        }
        Payload::Valve { open } => {
            out.push(number(
                q!("valve_command"),
                Decimal::from(u8::from(!*open)),
                None,
            ));
        }
        Payload::Status(st) => status_records(&mut out, *st, bits),
        Payload::Raw(bytes) => {
            out.push(record(
                format!("di_{:04x}", frame.di),
                RecordValue::Raw(crate::mbus::hex_lower(bytes)),
                None,
            ));
        }
        Payload::Empty => {}
    }
    out
}

/// Parses a frame and maps it to records (the address must be BCD digits or the all-AA wildcard).
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn decode(bytes: &[u8]) -> Result<DecodedFrame, Cjt188Error> {
    decode_with(bytes, StatusBits::Standard)
}

/// Like [`decode`], reading the status word with the vendor's bit layout.
///
/// # Errors
/// [`Cjt188Error`] with the byte offset of the first problem.
pub fn decode_with(bytes: &[u8], bits: StatusBits) -> Result<DecodedFrame, Cjt188Error> {
    let frame = parse(bytes)?;
    let preamble = bytes.iter().take_while(|b| **b == PREAMBLE).count();
    let address_offset = preamble.saturating_add(2);
    if frame.address != [0xAA; 7] {
        bcd_le(&frame.address, address_offset, "address")?;
    }
    Ok(to_decoded_with(&frame, bits))
}

/// Maps a parsed frame to the protocol-neutral form (standard status bits).
pub fn to_decoded(frame: &Cjt188Frame) -> DecodedFrame {
    to_decoded_with(frame, StatusBits::Standard)
}

/// Maps a parsed frame to the protocol-neutral form with the vendor's status bit layout.
pub fn to_decoded_with(frame: &Cjt188Frame, bits: StatusBits) -> DecodedFrame {
    DecodedFrame {
        protocol: Protocol::Cjt188,
        meter: MeterInfo {
            id: address_text(&frame.address),
            manufacturer: None,
            version: None,
            medium: Some(SmallString::from_static(medium_name(frame.meter_type))),
        },
        records: records_with(frame, bits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn concatenated_frames_parse_all_or_nothing() {
        let addr = [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78];
        let reply = |hour: u8, cents: i64| {
            let r = Cjt188Reading {
                current_m3: Decimal::new(cents, 2),
                settlement_m3: Decimal::new(0, 2),
                unit: UNIT_M3,
                clock: PrimitiveDateTime::new(
                    Date::from_calendar_date(2026, Month::November, 24).unwrap(),
                    Time::from_hms(hour, 0, 0).unwrap(),
                ),
                status: 0,
            };
            encode(&Cjt188Frame::read_data_reply(0x10, addr, hour, &r))
        };
        let mut payload = reply(0, 100);
        let first_len = payload.len();
        payload.extend(encode_with_preamble(
            &Cjt188Frame::read_data_request(0x10, addr),
            2,
        ));
        payload.extend(reply(1, 105));
        let frames = parse_concatenated(&payload).unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].1, 0..first_len);
        assert_eq!(frames[2].1.end, payload.len());
        assert_eq!(frames[2].0.ser, 1);
        // One frame alone is a payload too.
        assert_eq!(parse_concatenated(&reply(5, 1)).unwrap().len(), 1);
        // A bad checksum in the last frame refuses the whole payload and names the frame.
        let mut bad = payload.clone();
        let cs = bad.len() - 2;
        bad[cs] ^= 0xFF;
        let e = parse_concatenated(&bad).unwrap_err();
        assert_eq!((e.index, e.code()), (2, "bad_checksum"));
        assert_eq!(e.start, frames[2].1.start);
        // A partial frame at the end is refused, and so is an empty payload.
        let e = parse_concatenated(&payload[..payload.len() - 3]).unwrap_err();
        assert_eq!((e.index, e.code()), (2, "truncated"));
        assert_eq!(parse_concatenated(&[]).unwrap_err().index, 0);
    }

    fn near_valid_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            8 => (0u8..10, 0u8..10).prop_map(|(h, l)| (h << 4) | l),
            1 => Just(UNIT_M3),
            1 => any::<u8>(),
        ]
    }

    fn to_bcd(v: u8) -> u8 {
        ((v / 10) << 4) | (v % 10)
    }

    proptest! {
        /// The fast path accepts only what the detailed parser accepts, with the same result.
        #[test]
        fn fast_path_agrees_with_detailed_parser(
            volumes in proptest::collection::vec(near_valid_byte(), 8),
            clock in (0u8..61, 0u8..61, 0u8..25, 0u8..32, 0u8..14, 0u8..100, 19u8..22),
            status in any::<u16>(),
            corrupt in proptest::option::of((0usize..19, any::<u8>())),
            units in prop_oneof![3 => Just(UNIT_M3), 1 => any::<u8>()],
        ) {
            let (ss, mi, hh, dd, mo, yy, cc) = clock;
            let mut data = volumes[..4].to_vec();
            data.push(units);
            data.extend_from_slice(&volumes[4..]);
            data.push(UNIT_M3);
            data.extend([ss, mi, hh, dd, mo, yy, cc].map(to_bcd));
            data.extend_from_slice(&status.to_le_bytes());
            if let Some((i, b)) = corrupt {
                data[i] = b;
            }
            let detailed = parse_water_detailed(&mut Cursor::new(&data, 0));
            match fast_water(&data) {
                Some(fast) => prop_assert_eq!(detailed, Ok(fast)),
                // When the fast path declines, only non-m3 units may still parse.
                None => prop_assert!(detailed.is_err() || data[4] != UNIT_M3 || data[9] != UNIT_M3),
            }
        }
    }
}
