//! Wired M-Bus: EN 13757-2 link layer and EN 13757-3 application layer (decoder and encoders).
//!
//! * [`parse_link`] splits a link frame: single character `E5`, short frame `10 C A CS 16`,
//!   control frame and long frame `68 L L 68 C A CI .. CS 16`.
//! * [`decode`] turns an RSP_UD long frame into a [`DecodedFrame`];
//!   [`decode_application`] does the same from the CI byte on (reused by wM-Bus) and
//!   [`records`] iterates the data records of a payload without allocating.
//! * [`encode`] builds the master requests and slave answers the simulators and the gateway
//!   master need.
//!
//! Conformance against the libmbus corpus is described in `decoders/CONFORMANCE.md`.
//!
//! ```
//! use decoders::mbus;
//! let frame = hex::decode(
//!     "681515680801720100000096150107180000000C13785634127A16",
//! ).unwrap();
//! let decoded = mbus::decode(&frame).unwrap();
//! assert_eq!(decoded.meter.id, "00000001");
//! assert_eq!(decoded.records[0].quantity, "volume");
//! ```

use model::{Decimal, Unit};

use crate::cursor::checksum;
use crate::frame::{
    DecodedFrame, Function, MeterInfo, Protocol, Record, RecordQuantity, RecordValue,
};
use crate::small_string::SmallString;

/// Single-character acknowledgement.
pub const ACK: u8 = 0xE5;
/// Start byte of a short frame.
pub const START_SHORT: u8 = 0x10;
/// Start byte of a control or long frame.
pub const START_LONG: u8 = 0x68;
/// Stop byte.
pub const STOP: u8 = 0x16;

/// CI: application error from the slave (EN 13757-3 §6.6).
pub const CI_APPLICATION_ERROR: u8 = 0x70;
/// CI: variable data response, long header (mode 1, LSB first).
pub const CI_RSP_LONG: u8 = 0x72;
/// CI: variable data response, long header, mode 2 (MSB first).
pub const CI_RSP_LONG_MSB: u8 = 0x76;
/// CI: variable data response without header.
pub const CI_RSP_NONE: u8 = 0x78;
/// CI: variable data response, short header.
pub const CI_RSP_SHORT: u8 = 0x7A;
/// CI: fixed data structure (EN 13757-3 annex G, LSB first).
pub const CI_RSP_FIXED: u8 = 0x73;
/// CI: fixed data structure, MSB first.
pub const CI_RSP_FIXED_MSB: u8 = 0x77;
/// CI: application reset (master to slave).
pub const CI_APPLICATION_RESET: u8 = 0x50;
/// CI: data send (master to slave).
pub const CI_DATA_SEND: u8 = 0x51;
/// CI: select slave by secondary address.
pub const CI_SELECT: u8 = 0x52;

/// At most this many DIFEs per record (EN 13757-3 §6.3.2).
pub const MAX_DIFE: usize = 10;
/// At most this many VIFEs per record (EN 13757-3 §6.3.3).
pub const MAX_VIFE: usize = 10;

/// Why an M-Bus frame could not be decoded. Offsets count from the first byte of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MbusError {
    /// The input ended before the frame or field did.
    #[error("truncated at byte {offset}: {field} needs {needed} more byte(s)")]
    Truncated {
        /// Offset of the field.
        offset: usize,
        /// Field being read.
        field: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// The input is empty.
    #[error("empty input")]
    Empty,
    /// The first byte is not E5, 10 or 68.
    #[error("expected a frame start (0xE5, 0x10 or 0x68) at byte {offset}, found {found:#04x}")]
    BadStart {
        /// Offset of the byte.
        offset: usize,
        /// The byte.
        found: u8,
    },
    /// The two length bytes of a long frame differ, or the second 0x68 is missing.
    #[error("bad long-frame header at byte {offset}: L {first:#04x} / {second:#04x}")]
    BadHeader {
        /// Offset of the field.
        offset: usize,
        /// First length byte.
        first: u8,
        /// Second length byte (or the byte found instead of the second 0x68).
        second: u8,
    },
    /// The length field is below 3 (C, A, CI).
    #[error("length {length} at byte {offset} is too short (needs C, A and CI)")]
    BadLength {
        /// Offset of L.
        offset: usize,
        /// The length.
        length: u8,
    },
    /// Checksum mismatch.
    #[error("bad checksum at byte {offset}: expected {expected:#04x}, found {found:#04x}")]
    BadChecksum {
        /// Offset of CS.
        offset: usize,
        /// Computed.
        expected: u8,
        /// On the wire.
        found: u8,
    },
    /// Stop byte missing.
    #[error("expected stop byte 0x16 at byte {offset}, found {found:#04x}")]
    BadStop {
        /// Offset.
        offset: usize,
        /// The byte.
        found: u8,
    },
    /// Bytes after the stop byte.
    #[error("{count} unexpected byte(s) after the stop byte, from byte {offset}")]
    TrailingBytes {
        /// Offset of the first extra byte.
        offset: usize,
        /// Count.
        count: usize,
    },
    /// [`decode`] needs a long frame with data.
    #[error("expected a long frame with user data, got {kind}")]
    NotLongFrame {
        /// What was found.
        kind: &'static str,
    },
    /// CI value this decoder does not handle.
    #[error("unsupported CI {ci:#04x} at byte {offset}")]
    UnsupportedCi {
        /// Offset of CI.
        offset: usize,
        /// The CI.
        ci: u8,
    },
    /// The slave reported an application error (CI 70).
    #[error("slave reported application error {code:?} ({meaning}) at byte {offset}")]
    ApplicationError {
        /// Offset of the error byte (or of CI when absent).
        offset: usize,
        /// Error code, `None` when the frame carried none.
        code: Option<u8>,
        /// Meaning of the code.
        meaning: &'static str,
    },
    /// More than [`MAX_DIFE`] DIFEs.
    #[error("more than 10 DIFEs in the record at byte {offset}")]
    TooManyDife {
        /// Offset of the DIF.
        offset: usize,
    },
    /// More than [`MAX_VIFE`] VIFEs.
    #[error("more than 10 VIFEs in the record at byte {offset}")]
    TooManyVife {
        /// Offset of the DIF.
        offset: usize,
    },
    /// The DIFE chain gives a tariff wider than 16 bits (a tariff bit in the 9th or 10th
    /// DIFE), beyond what a reading can carry.
    #[error("tariff wider than 16 bits in the record at byte {offset}")]
    TariffTooWide {
        /// Offset of the DIF.
        offset: usize,
    },
    /// Variable-length data with an LVAR this decoder cannot size.
    #[error("unsupported variable-length LVAR {lvar:#04x} at byte {offset}")]
    UnsupportedLvar {
        /// Offset of LVAR.
        offset: usize,
        /// The LVAR byte.
        lvar: u8,
    },
}

impl MbusError {
    /// A stable snake_case code for metrics labels (`decoder_errors_total{error_code}`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "truncated",
            Self::Empty => "empty",
            Self::BadStart { .. } => "bad_start",
            Self::BadHeader { .. } => "bad_header",
            Self::BadLength { .. } => "bad_length",
            Self::BadChecksum { .. } => "bad_checksum",
            Self::BadStop { .. } => "bad_stop",
            Self::TrailingBytes { .. } => "trailing_bytes",
            Self::NotLongFrame { .. } => "not_long_frame",
            Self::UnsupportedCi { .. } => "unsupported_ci",
            Self::ApplicationError { .. } => "application_error",
            Self::TooManyDife { .. } => "too_many_dife",
            Self::TooManyVife { .. } => "too_many_vife",
            Self::TariffTooWide { .. } => "tariff_too_wide",
            Self::UnsupportedLvar { .. } => "unsupported_lvar",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cursor

type Cursor<'a> = crate::cursor::Cursor<'a, MbusError>;

impl From<crate::cursor::Truncated> for MbusError {
    fn from(t: crate::cursor::Truncated) -> Self {
        Self::Truncated {
            offset: t.offset,
            field: t.field,
            needed: t.needed,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Link layer

/// One EN 13757-2 link-layer frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFrame<'a> {
    /// Single character E5 (acknowledgement).
    Ack,
    /// Short frame `10 C A CS 16` (SND_NKE, REQ_UD2...).
    Short {
        /// Control field.
        control: u8,
        /// Primary address.
        address: u8,
    },
    /// Control frame: a long frame with L = 3 (no user data).
    Control {
        /// Control field.
        control: u8,
        /// Primary address.
        address: u8,
        /// Control information.
        ci: u8,
    },
    /// Long frame with user data after CI.
    Long {
        /// Control field.
        control: u8,
        /// Primary address.
        address: u8,
        /// Control information.
        ci: u8,
        /// User data after CI.
        data: &'a [u8],
        /// Offset of `data` in the input (for error offsets).
        data_offset: usize,
    },
}

impl LinkFrame<'_> {
    /// Returns the secondary address of a selection frame (CI 52, 8 data bytes).
    pub fn secondary_selection(&self) -> Option<SecondaryAddress> {
        match self {
            LinkFrame::Long {
                ci: CI_SELECT,
                data,
                ..
            } => SecondaryAddress::from_wire(data),
            _ => None,
        }
    }
}

/// Parses one link frame that fills the whole input.
///
/// # Errors
/// [`MbusError`] with the byte offset of the first problem.
pub fn parse_link(bytes: &[u8]) -> Result<LinkFrame<'_>, MbusError> {
    let (frame, used) = parse_link_prefix(bytes)?;
    if used < bytes.len() {
        return Err(MbusError::TrailingBytes {
            offset: used,
            count: bytes.len().saturating_sub(used),
        });
    }
    Ok(frame)
}

/// Parses one link frame at the start of `bytes`; returns it and the number of bytes used.
///
/// # Errors
/// [`MbusError`] with the byte offset of the first problem.
pub fn parse_link_prefix(bytes: &[u8]) -> Result<(LinkFrame<'_>, usize), MbusError> {
    let mut cur = Cursor::new(bytes, 0);
    let start = match bytes.first() {
        Some(b) => *b,
        None => return Err(MbusError::Empty),
    };
    match start {
        ACK => Ok((LinkFrame::Ack, 1)),
        START_SHORT => {
            cur.byte("start")?;
            let [control, address] = cur.array::<2>("C and A")?;
            let cs_offset = cur.offset;
            let cs = cur.byte("checksum")?;
            let expected = control.wrapping_add(address);
            if cs != expected {
                return Err(MbusError::BadChecksum {
                    offset: cs_offset,
                    expected,
                    found: cs,
                });
            }
            let stop_offset = cur.offset;
            let stop = cur.byte("stop")?;
            if stop != STOP {
                return Err(MbusError::BadStop {
                    offset: stop_offset,
                    found: stop,
                });
            }
            Ok((LinkFrame::Short { control, address }, cur.offset))
        }
        START_LONG => {
            let [_, l1, l2, start2] = cur.array::<4>("long-frame header")?;
            if l1 != l2 {
                return Err(MbusError::BadHeader {
                    offset: 1,
                    first: l1,
                    second: l2,
                });
            }
            if start2 != START_LONG {
                return Err(MbusError::BadHeader {
                    offset: 3,
                    first: l1,
                    second: start2,
                });
            }
            if l1 < 3 {
                return Err(MbusError::BadLength {
                    offset: 1,
                    length: l1,
                });
            }
            let body_offset = cur.offset;
            let body = cur.take(usize::from(l1), "user data")?;
            let cs_offset = cur.offset;
            let cs = cur.byte("checksum")?;
            let expected = checksum(body);
            if cs != expected {
                return Err(MbusError::BadChecksum {
                    offset: cs_offset,
                    expected,
                    found: cs,
                });
            }
            let stop_offset = cur.offset;
            let stop = cur.byte("stop")?;
            if stop != STOP {
                return Err(MbusError::BadStop {
                    offset: stop_offset,
                    found: stop,
                });
            }
            let used = cur.offset;
            let mut body = Cursor::new(body, body_offset);
            let [control, address, ci] = body.array::<3>("C, A and CI")?;
            let frame = if body.rest.is_empty() {
                LinkFrame::Control {
                    control,
                    address,
                    ci,
                }
            } else {
                LinkFrame::Long {
                    control,
                    address,
                    ci,
                    data: body.rest,
                    data_offset: body.offset,
                }
            };
            Ok((frame, used))
        }
        other => Err(MbusError::BadStart {
            offset: 0,
            found: other,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Headers

/// The 12-byte long header of CI 72/76 (identification, manufacturer, version, medium...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RspUdHeader {
    /// Identification number as BCD coded into a u32: `0x12345678` is meter 12345678.
    pub id: u32,
    /// Manufacturer code (three letters packed, see [`manufacturer_code`]).
    pub manufacturer: u16,
    /// Version.
    pub version: u8,
    /// Medium (EN 13757-3 table 3: 07 water, 04 heat...).
    pub medium: u8,
    /// Access number.
    pub access_number: u8,
    /// Status byte.
    pub status: u8,
    /// Signature (0 when not encrypted).
    pub signature: u16,
}

impl RspUdHeader {
    /// The identification as the 8 digits printed on the meter.
    pub fn id_digits(&self) -> String {
        id_text(self.id).into()
    }

    fn to_wire(self) -> [u8; 12] {
        let [i0, i1, i2, i3] = self.id.to_le_bytes();
        let [m0, m1] = self.manufacturer.to_le_bytes();
        let [s0, s1] = self.signature.to_le_bytes();
        [
            i0,
            i1,
            i2,
            i3,
            m0,
            m1,
            self.version,
            self.medium,
            self.access_number,
            self.status,
            s0,
            s1,
        ]
    }
}

/// A secondary address used for selection (F nibbles / FF bytes are wildcards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecondaryAddress {
    /// Identification, BCD coded (`0x1234FFFF` matches 1234xxxx).
    pub id: u32,
    /// Manufacturer (0xFFFF = any).
    pub manufacturer: u16,
    /// Version (0xFF = any).
    pub version: u8,
    /// Medium (0xFF = any).
    pub medium: u8,
}

impl SecondaryAddress {
    fn from_wire(data: &[u8]) -> Option<Self> {
        let [i0, i1, i2, i3, m0, m1, version, medium] = <[u8; 8]>::try_from(data).ok()?;
        Some(Self {
            id: u32::from_le_bytes([i0, i1, i2, i3]),
            manufacturer: u16::from_le_bytes([m0, m1]),
            version,
            medium,
        })
    }

    /// True when a slave with `header` is selected by this address (wildcards honoured).
    pub fn matches(&self, header: &RspUdHeader) -> bool {
        let id_ok = (0..8u32).all(|i| {
            let shift = i.wrapping_mul(4);
            let want = (self.id >> shift) & 0xF;
            want == 0xF || want == (header.id >> shift) & 0xF
        });
        id_ok
            && (self.manufacturer == 0xFFFF || self.manufacturer == header.manufacturer)
            && (self.version == 0xFF || self.version == header.version)
            && (self.medium == 0xFF || self.medium == header.medium)
    }
}

/// Returns the three-letter code of a packed manufacturer id (`0x2C2D` = "KAM").
pub fn manufacturer_code(man: u16) -> String {
    manufacturer_letters(man)
        .iter()
        .map(|b| char::from(*b))
        .collect()
}

pub(crate) const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";
pub(crate) const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes` (what `hex::encode` gives), on the stack when it fits a
/// [`SmallString`], otherwise allocated once at its exact size.
pub(crate) fn hex_lower(bytes: &[u8]) -> SmallString {
    if bytes.len().saturating_mul(2) <= crate::small_string::INLINE {
        let mut buf = [0u8; crate::small_string::INLINE];
        for (pair, b) in buf.chunks_exact_mut(2).zip(bytes) {
            for (slot, nibble) in pair.iter_mut().zip([b >> 4, b & 0x0F]) {
                *slot = HEX_LOWER.get(usize::from(nibble)).copied().unwrap_or(b'0');
            }
        }
        return SmallString::from_ascii_buf(buf, bytes.len().saturating_mul(2));
    }
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        for nibble in [b >> 4, b & 0x0F] {
            out.push(HEX_LOWER.get(usize::from(nibble)).copied().unwrap_or(b'0'));
        }
    }
    String::from_utf8(out)
        .map(SmallString::from)
        .unwrap_or_default()
}

/// The 8 upper-case hex digits of a BCD-coded identification (`{:08X}`).
fn id_text(id: u32) -> SmallString {
    hex_u32(id, HEX_UPPER)
}

/// The 8 hex digits of `id`, most significant first, from `digits` (upper or lower case).
pub(crate) fn hex_u32(id: u32, digits: &[u8; 16]) -> SmallString {
    let mut out = [0u8; crate::small_string::INLINE];
    for (slot, shift) in out.iter_mut().zip((0..8u32).rev()) {
        let nibble = (id >> shift.wrapping_mul(4)) & 0x0F;
        *slot = digits.get(nibble as usize).copied().unwrap_or(b'0');
    }
    SmallString::from_ascii_buf(out, 8)
}

/// The three letters of a packed manufacturer id.
pub(crate) fn manufacturer_letters(man: u16) -> [u8; 3] {
    let mut letters = [0u8; 3];
    for (slot, shift) in letters.iter_mut().zip([10u16, 5, 0]) {
        // 5 bits, so at most 0x1F + 64: always ASCII.
        *slot = (((man >> shift) & 0x1F) as u8).wrapping_add(64);
    }
    letters
}

/// [`manufacturer_code`] without an allocation.
pub(crate) fn manufacturer_text(man: u16) -> SmallString {
    let [a, b, c] = manufacturer_letters(man);
    let mut buf = [0u8; crate::small_string::INLINE];
    for (slot, letter) in buf.iter_mut().zip([a, b, c]) {
        *slot = letter;
    }
    SmallString::from_ascii_buf(buf, 3)
}

/// Packs a three-letter manufacturer code (`"KAM"` = 0x2C2D); `None` unless 3 letters A-Z.
pub fn manufacturer_id(code: &str) -> Option<u16> {
    let bytes = code.as_bytes();
    let [a, b, c] = <[u8; 3]>::try_from(bytes).ok()?;
    let mut out = 0u16;
    for ch in [a, b, c] {
        let ch = ch.to_ascii_uppercase();
        if !ch.is_ascii_uppercase() {
            return None;
        }
        out = (out << 5) | u16::from(ch.wrapping_sub(64));
    }
    Some(out)
}

/// Medium name for the header medium byte (EN 13757-3 table 3), snake_case.
pub fn medium_name(medium: u8) -> &'static str {
    match medium {
        0x00 => "other",
        0x01 => "oil",
        0x02 => "electricity",
        0x03 => "gas",
        0x04 => "heat_outlet",
        0x05 => "steam",
        0x06 => "warm_water",
        0x07 => "water",
        0x08 => "heat_cost_allocator",
        0x09 => "compressed_air",
        0x0A => "cooling_outlet",
        0x0B => "cooling_inlet",
        0x0C => "heat_inlet",
        0x0D => "heat_cooling",
        0x0E => "bus_system",
        0x0F => "unknown",
        0x15 => "hot_water",
        0x16 => "cold_water",
        0x17 => "dual_water",
        0x18 => "pressure",
        0x19 => "ad_converter",
        _ => "reserved",
    }
}

/// Header that precedes the data records, by CI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppHeader {
    /// CI 78: no header.
    None,
    /// CI 7A: short header.
    Short {
        /// Access number.
        access_number: u8,
        /// Status.
        status: u8,
        /// Signature / configuration field.
        signature: u16,
    },
    /// CI 72/76: long header.
    Long(RspUdHeader),
    /// CI 73/77: fixed data structure header.
    Fixed {
        /// Identification, BCD coded.
        id: u32,
        /// Access number.
        access_number: u8,
        /// Status (bit 7: counters binary, bit 6: stored values).
        status: u8,
        /// Medium (EN 13757-3 table 3 code, from the medium/unit bits).
        medium: u8,
    },
}

/// The application layer of a variable data response.
#[derive(Debug, Clone, PartialEq)]
pub struct Application {
    /// The CI byte.
    pub ci: u8,
    /// The header.
    pub header: AppHeader,
    /// The data records, decoded.
    pub records: Vec<Record>,
    /// True when the slave ended with DIF 1F: another telegram follows (toggle FCB and ask again).
    pub more_records_follow: bool,
}

fn application_error_meaning(code: u8) -> &'static str {
    match code {
        0 => "unspecified error",
        1 => "unimplemented CI",
        2 => "buffer too long, truncated",
        3 => "too many records",
        4 => "premature end of record",
        5 => "more than 10 DIFEs",
        6 => "more than 10 VIFEs",
        8 => "application busy",
        9 => "too many readouts",
        _ => "reserved",
    }
}

/// Parses the header selected by `ci` and returns it with the cursor at the first record.
fn parse_header<'a>(
    ci: u8,
    ci_offset: usize,
    cur: &mut Cursor<'a>,
) -> Result<AppHeader, MbusError> {
    match ci {
        CI_RSP_LONG | CI_RSP_LONG_MSB => {
            let mut h = cur.array::<12>("long header")?;
            if ci == CI_RSP_LONG_MSB {
                // Mode 2 sends every multi-byte field most significant byte first.
                if let Some(id) = h.get_mut(0..4) {
                    id.reverse();
                }
                if let Some(man) = h.get_mut(4..6) {
                    man.reverse();
                }
                if let Some(sig) = h.get_mut(10..12) {
                    sig.reverse();
                }
            }
            let [
                i0,
                i1,
                i2,
                i3,
                m0,
                m1,
                version,
                medium,
                access_number,
                status,
                s0,
                s1,
            ] = h;
            Ok(AppHeader::Long(RspUdHeader {
                id: u32::from_le_bytes([i0, i1, i2, i3]),
                manufacturer: u16::from_le_bytes([m0, m1]),
                version,
                medium,
                access_number,
                status,
                signature: u16::from_le_bytes([s0, s1]),
            }))
        }
        CI_RSP_SHORT => {
            let [access_number, status, s0, s1] = cur.array::<4>("short header")?;
            Ok(AppHeader::Short {
                access_number,
                status,
                signature: u16::from_le_bytes([s0, s1]),
            })
        }
        CI_RSP_NONE => Ok(AppHeader::None),
        CI_APPLICATION_ERROR => {
            let offset = cur.offset;
            match cur.rest.first() {
                Some(code) => Err(MbusError::ApplicationError {
                    offset,
                    code: Some(*code),
                    meaning: application_error_meaning(*code),
                }),
                None => Err(MbusError::ApplicationError {
                    offset: ci_offset,
                    code: None,
                    meaning: "no error code given",
                }),
            }
        }
        other => Err(MbusError::UnsupportedCi {
            offset: ci_offset,
            ci: other,
        }),
    }
}

/// Decodes the application layer from the CI byte on (`CI header records`).
///
/// # Errors
/// [`MbusError`]; offsets count from the CI byte.
pub fn decode_application(bytes: &[u8]) -> Result<Application, MbusError> {
    decode_application_at(bytes, 0)
}

fn decode_application_at(bytes: &[u8], base: usize) -> Result<Application, MbusError> {
    let mut cur = Cursor::new(bytes, base);
    let ci = cur.byte("CI")?;
    if ci == CI_RSP_FIXED || ci == CI_RSP_FIXED_MSB {
        return parse_fixed(ci, &mut cur);
    }
    let header = parse_header(ci, base, &mut cur)?;
    let msb_first = ci == CI_RSP_LONG_MSB;
    // The vector is filled with placeholders first (a tight loop of constant stores) and each
    // record is then written into its slot: a record built aside and moved into the vector
    // is read back right after its fields were written, which stalls on store forwarding.
    let count = count_records(cur.rest);
    let mut records_out: Vec<Record> = Vec::with_capacity(count);
    records_out.extend(std::iter::repeat_with(empty_record).take(count));
    let mut more = false;
    let mut iter = RecordIter::with_offset(cur.rest, cur.offset, msb_first);
    let mut slots = records_out.iter_mut();
    let mut filled = 0usize;
    // `next_record` rather than the iterator: its `Option<Result<..>>` is one more copy of
    // every record.
    while let Some(rec) = iter.next_record()? {
        more |= rec.dif == 0x1F;
        match slots.next() {
            Some(slot) => rec.write_record(slot),
            // Only if the counting pass and the parser disagreed; kept correct regardless.
            None => {
                let mut record = empty_record();
                rec.write_record(&mut record);
                records_out.push(record);
                slots = [].iter_mut();
            }
        }
        filled = filled.saturating_add(1);
    }
    records_out.truncate(filled);
    Ok(Application {
        ci,
        header,
        records: records_out,
        more_records_follow: more,
    })
}

/// Fixed data structure: id(4) access status medium/units(2) counter1(4) counter2(4).
fn parse_fixed(ci: u8, cur: &mut Cursor<'_>) -> Result<Application, MbusError> {
    let msb = ci == CI_RSP_FIXED_MSB;
    let order = |mut b: [u8; 4]| {
        if msb {
            b.reverse();
        }
        b
    };
    let id = u32::from_le_bytes(order(cur.array::<4>("identification")?));
    let access_number = cur.byte("access number")?;
    let status = cur.byte("status")?;
    let [mu0, mu1] = cur.array::<2>("medium and units")?;
    let medium = ((mu1 & 0xC0) >> 6) | ((mu0 & 0xC0) >> 4);
    let mut records = Vec::with_capacity(2);
    for unit_code in [mu0 & 0x3F, mu1 & 0x3F] {
        let counter = order(cur.array::<4>("counter")?);
        let raw = if status & 0x80 == 0 {
            bcd(&counter).map(Decimal::from)
        } else {
            Some(Decimal::from(i32::from_le_bytes(counter)))
        };
        let info = fixed_unit(unit_code);
        let value = raw
            .and_then(|v| v.checked_mul(pow10(info.exponent)))
            .map(|v| RecordValue::Number(v.normalize()))
            .unwrap_or_else(|| RecordValue::Raw(hex_lower(&counter)));
        let unit = if matches!(value, RecordValue::Number(_)) {
            info.unit
        } else {
            None
        };
        records.push(Record {
            quantity: RecordQuantity::from_indexed(info.known, info.quantity),
            value,
            unit,
            storage: u32::from(status & 0x40 != 0),
            tariff: 0,
            subunit: 0,
            function: Function::Instantaneous,
        });
    }
    Ok(Application {
        ci,
        header: AppHeader::Fixed {
            id,
            access_number,
            status,
            medium,
        },
        records,
        more_records_follow: false,
    })
}

/// Unit codes of the fixed data structure (EN 13757-3 annex G table).
fn fixed_unit(code: u8) -> VifInfo {
    use Unit as U;
    let e = |base: u8, offset: i32| i32::from(code.wrapping_sub(base)).wrapping_add(offset);
    match code {
        0x02..=0x0A => vi("energy", Some(U::WattHour), e(0x02, 0)),
        0x0B..=0x13 => vi("energy", Some(U::Joule), e(0x0B, 3)),
        0x14..=0x1C => vi("power", Some(U::Watt), e(0x14, 0)),
        0x1D..=0x25 => vi("power_j_per_h", None, e(0x1D, 3)),
        0x26..=0x2E => vi("volume", Some(U::CubicMetre), e(0x26, -6)),
        0x2F..=0x37 => vi("volume_flow", Some(U::CubicMetrePerHour), e(0x2F, -6)),
        0x38 => vi("temperature", Some(U::DegreeCelsius), -3),
        0x39 => vi("hca", None, 0),
        0x3E => vi("historic", None, 0),
        0x3F => vi("dimensionless", None, 0),
        _ => vi("reserved", None, 0),
    }
}

/// A variable data response split without allocation: header plus a record iterator.
#[derive(Debug, Clone)]
pub struct RspUd<'a> {
    /// Link-layer control field.
    pub control: u8,
    /// Primary address.
    pub address: u8,
    /// CI.
    pub ci: u8,
    /// Header.
    pub header: AppHeader,
    /// The data records, parsed lazily.
    pub records: RecordIter<'a>,
}

/// Parses an RSP_UD long frame (CI 72, 76, 7A, 78) without allocating: the hot path.
///
/// Fixed-structure frames (CI 73/77) are refused with [`MbusError::UnsupportedCi`]; use
/// [`decode`] for them.
///
/// # Errors
/// [`MbusError`] for framing and header problems; record errors come from the iterator.
pub fn parse(bytes: &[u8]) -> Result<RspUd<'_>, MbusError> {
    let (control, address, ci, data, data_offset) = match parse_link(bytes)? {
        LinkFrame::Long {
            control,
            address,
            ci,
            data,
            data_offset,
        } => (control, address, ci, data, data_offset),
        LinkFrame::Control { .. } => {
            return Err(MbusError::NotLongFrame {
                kind: "control frame",
            });
        }
        LinkFrame::Short { .. } => {
            return Err(MbusError::NotLongFrame {
                kind: "short frame",
            });
        }
        LinkFrame::Ack => {
            return Err(MbusError::NotLongFrame {
                kind: "single character E5",
            });
        }
    };
    let ci_offset = data_offset.saturating_sub(1);
    let mut cur = Cursor::new(data, data_offset);
    let header = parse_header(ci, ci_offset, &mut cur)?;
    let records = RecordIter::with_offset(cur.rest, cur.offset, ci == CI_RSP_LONG_MSB);
    Ok(RspUd {
        control,
        address,
        ci,
        header,
        records,
    })
}

/// Decodes the data records of a payload (after any header), e.g. a decrypted wM-Bus payload.
///
/// # Errors
/// [`MbusError`] for structural problems; offsets count from the payload start.
pub fn decode_records(payload: &[u8]) -> Result<Vec<Record>, MbusError> {
    records(payload).map(|r| r.map(|r| r.to_record())).collect()
}

/// Decodes an RSP_UD long frame (CI 72, 76, 7A or 78).
///
/// Frames without a long header have no identification; their meter id is then the primary
/// address as three digits.
///
/// # Errors
/// [`MbusError`] with the byte offset of the first problem; CI 70 frames are refused with
/// [`MbusError::ApplicationError`].
pub fn decode(bytes: &[u8]) -> Result<DecodedFrame, MbusError> {
    let (address, ci_offset, app_bytes) = match parse_link(bytes)? {
        LinkFrame::Long {
            address,
            data_offset,
            ..
        } => {
            let ci_offset = data_offset.saturating_sub(1);
            (address, ci_offset, bytes.get(ci_offset..).unwrap_or(&[]))
        }
        LinkFrame::Control { ci, .. } => {
            // A control frame may still carry an application error (CI 70 without code).
            let mut cur = Cursor::new(&[], 6);
            parse_header(ci, 6, &mut cur)?;
            return Err(MbusError::NotLongFrame {
                kind: "control frame",
            });
        }
        LinkFrame::Short { .. } => {
            return Err(MbusError::NotLongFrame {
                kind: "short frame",
            });
        }
        LinkFrame::Ack => {
            return Err(MbusError::NotLongFrame {
                kind: "single character E5",
            });
        }
    };
    // The app bytes include CS and stop; cut them off.
    let app_len = app_bytes.len().saturating_sub(2);
    let app = decode_application_at(app_bytes.get(..app_len).unwrap_or(&[]), ci_offset)?;
    let meter = match app.header {
        AppHeader::Long(h) => MeterInfo {
            id: id_text(h.id),
            manufacturer: Some(manufacturer_text(h.manufacturer)),
            version: Some(h.version),
            medium: Some(SmallString::from_static(medium_name(h.medium))),
        },
        AppHeader::Fixed { id, medium, .. } => MeterInfo {
            id: id_text(id),
            manufacturer: None,
            version: None,
            medium: Some(SmallString::from_static(medium_name(medium))),
        },
        _ => MeterInfo {
            id: {
                let mut out = AsciiWriter::new(3);
                out.push(b'0'.wrapping_add(address.wrapping_div(100)));
                out.two(address.wrapping_rem(100));
                out.finish()
            },
            manufacturer: None,
            version: None,
            medium: None,
        },
    };
    Ok(DecodedFrame {
        protocol: Protocol::Mbus,
        meter,
        records: app.records,
    })
}

// ---------------------------------------------------------------------------------------------
// Data records

/// One data record, borrowed from the frame (no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Offset of the DIF in the input.
    pub offset: usize,
    /// DIF.
    pub dif: u8,
    /// DIFE chain.
    pub dife: &'a [u8],
    /// VIF (0 for DIF 0F/1F records, which have none).
    pub vif: u8,
    /// Plain-text VIF (7C/FC): the unit text as sent (reversed ASCII).
    pub plain_text: &'a [u8],
    /// VIFE chain.
    pub vife: &'a [u8],
    /// Data bytes (for LVAR records without the LVAR byte).
    pub data: &'a [u8],
    /// LVAR byte of variable-length records.
    pub lvar: Option<u8>,
    /// Data sent most significant byte first (CI 76).
    pub msb_first: bool,
}

/// Iterator over the data records of a payload; see [`records`].
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    rest: &'a [u8],
    offset: usize,
    msb_first: bool,
    done: bool,
}

/// Iterates the data records of `payload` (the bytes after the header) without allocating.
///
/// Idle fillers (2F) are skipped; a 0F/1F record takes the rest of the payload.
pub fn records(payload: &[u8]) -> RecordIter<'_> {
    RecordIter::with_offset(payload, 0, false)
}

impl<'a> RecordIter<'a> {
    fn with_offset(rest: &'a [u8], offset: usize, msb_first: bool) -> Self {
        Self {
            rest,
            offset,
            msb_first,
            done: false,
        }
    }

    #[inline(always)]
    fn next_record(&mut self) -> Result<Option<RawRecord<'a>>, MbusError> {
        // Idle fillers (2F) are skipped.
        let fillers = self.rest.iter().take_while(|b| **b == 0x2F).count();
        let mut r = RecordReader {
            bytes: self.rest,
            pos: fillers,
            base: self.offset,
        };
        let offset = r.offset();
        let Some(&dif) = self.rest.get(fillers) else {
            return Ok(None);
        };
        r.pos = r.pos.saturating_add(1);
        let msb_first = self.msb_first;
        let record = if dif == 0x0F || dif == 0x1F {
            // Manufacturer data: the rest of the payload.
            let data = r.rest();
            r.pos = r.bytes.len();
            RawRecord {
                offset,
                dif,
                dife: &[],
                vif: 0,
                plain_text: &[],
                vife: &[],
                data,
                lvar: None,
                msb_first,
            }
        } else {
            let dife = r.chain(dif, MAX_DIFE, "DIFE", || MbusError::TooManyDife { offset })?;
            // Two tariff bits per DIFE: the 9th and 10th would go beyond the 16 bits a
            // reading's tariff has, so refuse rather than cut them.
            if dife.iter().skip(8).any(|d| d & 0x30 != 0) {
                return Err(MbusError::TariffTooWide { offset });
            }
            let vif = r.byte("VIF")?;
            let plain_text = if vif & 0x7F == 0x7C {
                // libmbus and the old ELV/Itron devices put the text right after the VIF.
                let len = r.byte("plain-text VIF length")?;
                r.take(usize::from(len), "plain-text VIF")?
            } else {
                &[]
            };
            let vife = r.chain(vif, MAX_VIFE, "VIFE", || MbusError::TooManyVife { offset })?;
            let (data, lvar) = match dif & 0x0F {
                0x0D => {
                    let lvar_offset = r.offset();
                    let lvar = r.byte("LVAR")?;
                    let len = lvar_len(lvar).ok_or(MbusError::UnsupportedLvar {
                        offset: lvar_offset,
                        lvar,
                    })?;
                    (r.take(len, "variable-length data")?, Some(lvar))
                }
                coding => (r.take(data_len(coding), "data")?, None),
            };
            RawRecord {
                offset,
                dif,
                dife,
                vif,
                plain_text,
                vife,
                data,
                lvar,
                msb_first,
            }
        };
        self.rest = r.rest();
        self.offset = r.offset();
        Ok(Some(record))
    }
}

/// Number of records in `payload` by structure alone (the lengths, no values): sizes the
/// record vector exactly. Stops at the first malformed record, which the parser reports.
fn count_records(payload: &[u8]) -> usize {
    let mut count = 0usize;
    let mut pos = 0usize;
    let at = |i: usize| payload.get(i).copied();
    // Skips an extension chain starting after `first`; `None` when it runs off the end.
    let skip_chain = |mut i: usize, first: u8| -> Option<usize> {
        let mut ext = first & 0x80 != 0;
        while ext {
            ext = at(i)? & 0x80 != 0;
            i = i.saturating_add(1);
        }
        Some(i)
    };
    loop {
        while at(pos) == Some(0x2F) {
            pos = pos.saturating_add(1);
        }
        let Some(dif) = at(pos) else {
            return count;
        };
        count = count.saturating_add(1);
        if dif == 0x0F || dif == 0x1F {
            return count;
        }
        let Some(after_dife) = skip_chain(pos.saturating_add(1), dif) else {
            return count;
        };
        let Some(vif) = at(after_dife) else {
            return count;
        };
        let mut i = after_dife.saturating_add(1);
        if vif & 0x7F == 0x7C {
            let Some(len) = at(i) else {
                return count;
            };
            i = i.saturating_add(1).saturating_add(usize::from(len));
        }
        let Some(after_vife) = skip_chain(i, vif) else {
            return count;
        };
        i = after_vife;
        let len = if dif & 0x0F == 0x0D {
            let Some(len) = at(i).and_then(lvar_len) else {
                return count;
            };
            i = i.saturating_add(1);
            len
        } else {
            data_len(dif & 0x0F)
        };
        pos = i.saturating_add(len);
        if pos > payload.len() {
            return count;
        }
    }
}

/// Length of variable-length data from its LVAR byte (EN 13757-3 §6.3.3); `None` if reserved.
fn lvar_len(lvar: u8) -> Option<usize> {
    Some(match lvar {
        0x00..=0xBF => usize::from(lvar),
        0xC0..=0xCF => usize::from(lvar.wrapping_sub(0xC0)),
        0xD0..=0xDF => usize::from(lvar.wrapping_sub(0xD0)),
        0xE0..=0xEF => usize::from(lvar.wrapping_sub(0xE0)),
        // Binary numbers of 4 * (LVAR - EC) bytes, then 48 and 64 bytes.
        0xF0..=0xF4 => usize::from(lvar.wrapping_sub(0xEC)).wrapping_mul(4),
        0xF5 => 48,
        0xF6 => 64,
        _ => return None,
    })
}

/// The record parser's reader: an index into the payload instead of a re-sliced cursor, as
/// this runs for every byte of every record. Errors name the field and its offset exactly as
/// [`Cursor`] does.
struct RecordReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Offset of `bytes[0]` in the input.
    base: usize,
}

impl<'a> RecordReader<'a> {
    fn offset(&self) -> usize {
        self.base.saturating_add(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or(&[])
    }

    #[inline]
    fn byte(&mut self, field: &'static str) -> Result<u8, MbusError> {
        match self.bytes.get(self.pos) {
            Some(b) => {
                self.pos = self.pos.saturating_add(1);
                Ok(*b)
            }
            None => Err(MbusError::Truncated {
                offset: self.offset(),
                field,
                needed: 1,
            }),
        }
    }

    #[inline]
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MbusError> {
        let end = self.pos.saturating_add(n);
        match self.bytes.get(self.pos..end) {
            Some(taken) => {
                self.pos = end;
                Ok(taken)
            }
            None => Err(MbusError::Truncated {
                offset: self.offset(),
                field,
                needed: n.saturating_sub(self.bytes.len().saturating_sub(self.pos)),
            }),
        }
    }

    /// An extension chain (DIFEs or VIFEs) after `first`, while the extension bit is set; at
    /// most `max` bytes, else `too_many`.
    #[inline]
    fn chain(
        &mut self,
        first: u8,
        max: usize,
        field: &'static str,
        too_many: impl FnOnce() -> MbusError,
    ) -> Result<&'a [u8], MbusError> {
        let start = self.pos;
        let mut ext = first & 0x80 != 0;
        while ext {
            if self.pos.saturating_sub(start) >= max {
                return Err(too_many());
            }
            ext = self.byte(field)? & 0x80 != 0;
        }
        Ok(self.bytes.get(start..self.pos).unwrap_or(&[]))
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RawRecord<'a>, MbusError>;

    // Inlined so that the record is built in the caller's frame: returned by value through
    // `Option<Result<..>>` it was copied twice and the copy stalled on store forwarding.
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Data length for DIF data-field codings other than LVAR (EN 13757-3 table 5).
fn data_len(coding: u8) -> usize {
    match coding {
        0x01 | 0x09 => 1,
        0x02 | 0x0A => 2,
        0x03 | 0x0B => 3,
        0x04 | 0x05 | 0x0C => 4,
        0x06 | 0x0E => 6,
        0x07 => 8,
        _ => 0,
    }
}

/// A decoded number or other value of a record, without allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawValue<'a> {
    /// No data.
    None,
    /// Integer or BCD value before VIF scaling.
    Int(i64),
    /// 32-bit real before VIF scaling.
    Real(f32),
    /// Date type G: (year, month, day).
    Date(i32, u8, u8),
    /// Time of day type J: (hour, minute, second).
    Time(u8, u8, u8),
    /// Date-time type F (seconds `None`) or I.
    DateTime(i32, u8, u8, u8, u8, Option<u8>),
    /// Text (reversed on the wire; give the bytes as sent).
    Text(&'a [u8]),
    /// Bytes this decoder does not interpret as a number (manufacturer data, bad BCD...).
    Bytes(&'a [u8]),
}

/// What a VIF (with extension) means: quantity name, unit and decimal exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VifInfo {
    /// Quantity, snake_case (`volume`, `energy`, `error_flags`...).
    pub quantity: &'static str,
    /// Unit of the scaled value; `None` for plain numbers.
    pub unit: Option<Unit>,
    /// Power of ten applied to the raw value.
    pub exponent: i32,
    /// Extra factor (minutes → seconds = 60, m³/min → m³/h = 60), 1 otherwise.
    pub factor: u32,
    /// The value is a date/time (VIF 6C/6D, FD 30/70).
    pub date: bool,
    /// [`RecordQuantity::known_index`] of `quantity`: the table stays `Copy` (a
    /// `RecordQuantity` in it made every lookup a clone and a drop, 20 % of the record
    /// iterator's time) and the record's quantity is still no search.
    known: u8,
}

const fn vi(quantity: &'static str, unit: Option<Unit>, exponent: i32) -> VifInfo {
    VifInfo {
        quantity,
        known: RecordQuantity::known_index(quantity),
        unit,
        exponent,
        factor: 1,
        date: false,
    }
}

/// A date or date-time VIF (the value is read as a date type).
const fn dated(quantity: &'static str) -> VifInfo {
    VifInfo {
        quantity,
        known: RecordQuantity::known_index(quantity),
        unit: None,
        exponent: 0,
        factor: 1,
        date: true,
    }
}

const fn vf(quantity: &'static str, unit: Option<Unit>, exponent: i32, factor: u32) -> VifInfo {
    VifInfo {
        quantity,
        known: RecordQuantity::known_index(quantity),
        unit,
        exponent,
        factor,
        date: false,
    }
}

/// Duration codes nn: 0 s, 1 min, 2 h, 3 d.
const fn duration(quantity: &'static str, nn: u8) -> VifInfo {
    match nn & 3 {
        0 => vi(quantity, Some(Unit::Second), 0),
        1 => vf(quantity, Some(Unit::Second), 0, 60),
        2 => vi(quantity, Some(Unit::Hour), 0),
        _ => vi(quantity, Some(Unit::Day), 0),
    }
}

const fn exp(vif: u8, mask: u8, offset: i32) -> i32 {
    // `as` because `From` is not const; a u8 always fits an i32.
    ((vif & mask) as i32).wrapping_add(offset)
}

/// Primary VIF table (EN 13757-3 table 10), VIF without the extension bit.
const fn primary_vif(vif: u8) -> VifInfo {
    use Unit as U;
    match vif {
        0x00..=0x07 => vi("energy", Some(U::KilowattHour), exp(vif, 7, -6)),
        0x08..=0x0F => vi("energy", Some(U::Joule), exp(vif, 7, 0)),
        0x10..=0x17 => vi("volume", Some(U::CubicMetre), exp(vif, 7, -6)),
        0x18..=0x1F => vi("mass_kg", None, exp(vif, 7, -3)),
        0x20..=0x23 => duration("on_time", vif),
        0x24..=0x27 => duration("operating_time", vif),
        0x28..=0x2F => vi("power", Some(U::Watt), exp(vif, 7, -3)),
        0x30..=0x37 => vi("power_j_per_h", None, exp(vif, 7, 0)),
        0x38..=0x3F => vi("volume_flow", Some(U::CubicMetrePerHour), exp(vif, 7, -6)),
        0x40..=0x47 => vf(
            "volume_flow",
            Some(U::CubicMetrePerHour),
            exp(vif, 7, -7),
            60,
        ),
        0x48..=0x4F => vi("volume_flow", Some(U::CubicMetrePerSecond), exp(vif, 7, -9)),
        0x50..=0x57 => vi("mass_flow_kg_per_h", None, exp(vif, 7, -3)),
        0x58..=0x5B => vi("flow_temperature", Some(U::DegreeCelsius), exp(vif, 3, -3)),
        0x5C..=0x5F => vi(
            "return_temperature",
            Some(U::DegreeCelsius),
            exp(vif, 3, -3),
        ),
        0x60..=0x63 => vi("temperature_difference", Some(U::Kelvin), exp(vif, 3, -3)),
        0x64..=0x67 => vi(
            "external_temperature",
            Some(U::DegreeCelsius),
            exp(vif, 3, -3),
        ),
        0x68..=0x6B => vi("pressure", Some(U::Bar), exp(vif, 3, -3)),
        0x6C => dated("date"),
        0x6D => dated("date_time"),
        0x6E => vi("hca", None, 0),
        0x70..=0x73 => duration("averaging_duration", vif),
        0x74..=0x77 => duration("actuality_duration", vif),
        0x78 => vi("fabrication_no", None, 0),
        0x79 => vi("enhanced_identification", None, 0),
        0x7A => vi("bus_address", None, 0),
        0x7E => vi("any_vif", None, 0),
        0x7F => vi("manufacturer_specific", None, 0),
        _ => vi("reserved", None, 0),
    }
}

/// First extension table, after VIF FD (EN 13757-3 table 14).
const fn fd_vif(code: u8) -> VifInfo {
    use Unit as U;
    match code {
        0x00..=0x03 => vi("credit", None, exp(code, 3, -3)),
        0x04..=0x07 => vi("debit", None, exp(code, 3, -3)),
        0x08 => vi("access_number", None, 0),
        0x09 => vi("medium", None, 0),
        0x0A => vi("manufacturer", None, 0),
        0x0B => vi("parameter_set_id", None, 0),
        0x0C => vi("model_version", None, 0),
        0x0D => vi("hardware_version", None, 0),
        0x0E => vi("firmware_version", None, 0),
        0x0F => vi("software_version", None, 0),
        0x10 => vi("customer_location", None, 0),
        0x11 => vi("customer", None, 0),
        0x12 => vi("access_code_user", None, 0),
        0x13 => vi("access_code_operator", None, 0),
        0x14 => vi("access_code_system_operator", None, 0),
        0x15 => vi("access_code_developer", None, 0),
        0x16 => vi("password", None, 0),
        0x17 => vi("error_flags", None, 0),
        0x18 => vi("error_mask", None, 0),
        0x1A => vi("digital_output", None, 0),
        0x1B => vi("digital_input", None, 0),
        0x1C => vi("baud_rate", None, 0),
        0x1D => vi("response_delay_bit_times", None, 0),
        0x1E => vi("retry", None, 0),
        0x20 => vi("first_storage_cyclic", None, 0),
        0x21 => vi("last_storage_cyclic", None, 0),
        0x22 => vi("storage_block_size", None, 0),
        0x24..=0x27 => duration("storage_interval", code),
        0x28 => vi("storage_interval_months", None, 0),
        0x29 => vi("storage_interval_years", None, 0),
        0x2C..=0x2F => duration("duration_since_readout", code),
        0x30 => dated("tariff_start"),
        0x31..=0x33 => duration("tariff_duration", code),
        0x34..=0x37 => duration("tariff_period", code),
        0x38 => vi("tariff_period_months", None, 0),
        0x39 => vi("tariff_period_years", None, 0),
        0x3A => vi("dimensionless", None, 0),
        0x40..=0x4F => vi("voltage", Some(U::Volt), exp(code, 0x0F, -9)),
        0x50..=0x5F => vi("current_a", None, exp(code, 0x0F, -12)),
        0x60 => vi("reset_counter", None, 0),
        0x61 => vi("cumulation_counter", None, 0),
        0x62 => vi("control_signal", None, 0),
        0x63 => vi("day_of_week", None, 0),
        0x64 => vi("week_number", None, 0),
        0x65 => vi("day_change_time_point", None, 0),
        0x66 => vi("parameter_activation_state", None, 0),
        0x67 => vi("special_supplier_information", None, 0),
        0x68 => vi("duration_since_cumulation", Some(U::Hour), 0),
        0x69 => vi("duration_since_cumulation", Some(U::Day), 0),
        0x6A => vi("duration_since_cumulation_months", None, 0),
        0x6B => vi("duration_since_cumulation_years", None, 0),
        0x6C => vi("battery_operating_time", Some(U::Hour), 0),
        0x6D => vi("battery_operating_time", Some(U::Day), 0),
        0x6E => vi("battery_operating_time_months", None, 0),
        0x6F => vi("battery_operating_time_years", None, 0),
        0x70 => dated("battery_change_date"),
        0x71 => vi("rf_level", Some(U::Dbm), 0),
        0x72 => vi("daylight_saving", None, 0),
        0x73 => vi("listening_window", None, 0),
        0x74 => vi("remaining_battery", Some(U::Day), 0),
        0x75 => vi("meter_stopped_count", None, 0),
        0x76 => vi("manufacturer_container", None, 0),
        _ => vi("reserved", None, 0),
    }
}

/// Second extension table, after VIF FB (EN 13757-3 table 12).
const fn fb_vif(code: u8) -> VifInfo {
    use Unit as U;
    match code {
        0x00..=0x01 => vi("energy", Some(U::MegawattHour), exp(code, 1, -1)),
        0x08..=0x09 => vi("energy", Some(U::Gigajoule), exp(code, 1, -1)),
        // Units without a `model::Unit` keep the unit in the quantity name (as `mass_kg`).
        0x02..=0x03 => vi("reactive_energy_kvarh", None, exp(code, 1, 0)),
        0x04..=0x05 => vi("apparent_energy_kvah", None, exp(code, 1, 0)),
        0x10..=0x11 => vi("volume", Some(U::CubicMetre), exp(code, 1, 2)),
        0x14..=0x17 => vi("reactive_power_kvar", None, exp(code, 3, -3)),
        0x18..=0x19 => vi("mass_kg", None, exp(code, 1, 5)),
        0x1A..=0x1B => vi("relative_humidity", Some(U::Percent), exp(code, 1, -1)),
        0x20 => vi("volume_ft3", None, 0),
        0x21 => vi("volume_ft3", None, -1),
        0x28..=0x29 => vi("power", Some(U::Kilowatt), exp(code, 1, 2)),
        0x2A => vi("phase_u_u", Some(U::Degree), -1),
        0x2B => vi("phase_u_i", Some(U::Degree), -1),
        0x2C..=0x2F => vi("frequency_hz", None, exp(code, 3, -3)),
        0x30..=0x31 => vi("power_gj_per_h", None, exp(code, 1, -1)),
        0x34..=0x37 => vi("apparent_power_kva", None, exp(code, 3, -3)),
        0x58..=0x5B => vi("flow_temperature_f", None, exp(code, 3, -3)),
        0x5C..=0x5F => vi("return_temperature_f", None, exp(code, 3, -3)),
        0x60..=0x63 => vi("temperature_difference_f", None, exp(code, 3, -3)),
        0x64..=0x67 => vi("external_temperature_f", None, exp(code, 3, -3)),
        0x70..=0x73 => vi("cold_warm_temperature_limit_f", None, exp(code, 3, -3)),
        0x74..=0x77 => vi(
            "cold_warm_temperature_limit",
            Some(U::DegreeCelsius),
            exp(code, 3, -3),
        ),
        0x78..=0x7F => vi("cumulative_max_power", Some(U::Watt), exp(code, 7, -3)),
        _ => vi("reserved", None, 0),
    }
}

/// The three VIF tables indexed by code (VIF or extension code without the extension bit),
/// computed at build time: a record costs one indexed load instead of a chain of range tests.
static PRIMARY_VIF: [VifInfo; 128] = vif_table(VifTable::Primary);
static FD_VIF: [VifInfo; 128] = vif_table(VifTable::Fd);
static FB_VIF: [VifInfo; 128] = vif_table(VifTable::Fb);

#[derive(Clone, Copy)]
enum VifTable {
    Primary,
    Fd,
    Fb,
}

// Only evaluated at compile time (the statics above): an index out of range or an overflow
// would fail the build, not panic at run time.
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
const fn vif_table(which: VifTable) -> [VifInfo; 128] {
    let mut table = [vi("reserved", None, 0); 128];
    let mut code = 0u8;
    while code < 128 {
        let info = match which {
            VifTable::Primary => primary_vif(code),
            VifTable::Fd => fd_vif(code),
            VifTable::Fb => fb_vif(code),
        };
        table[code as usize] = info;
        code += 1;
    }
    table
}

fn lookup(table: &'static [VifInfo; 128], code: u8) -> VifInfo {
    table
        .get(usize::from(code & 0x7F))
        .copied()
        .unwrap_or(vi("reserved", None, 0))
}

/// `YYYY-MM-DD`, with `THH:MM[:SS]` when a time is given: the text of
/// `format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}")`, written into a stack buffer at
/// fixed positions (no formatting machinery, no allocation, no per-byte checks: all three
/// showed in the decode profile). Fields the date types cannot produce (a year outside
/// 0..=9999, a field of 100 or more) go through `format!`.
pub(crate) fn iso_date(y: i32, m: u8, d: u8, time: Option<(u8, u8, Option<u8>)>) -> SmallString {
    let (h, mi, s) = time.map_or((0, 0, None), |(h, mi, s)| (h, mi, s));
    let year = u16::try_from(y).ok().filter(|y| *y <= 9999);
    let Some(year) =
        year.filter(|_| m < 100 && d < 100 && h < 100 && mi < 100 && s.unwrap_or(0) < 100)
    else {
        return iso_date_formatted(y, m, d, time);
    };
    let [y0, y1] = digits2(u8::try_from(year.wrapping_div(100)).unwrap_or(0));
    let [y2, y3] = digits2(u8::try_from(year.wrapping_rem(100)).unwrap_or(0));
    let [m0, m1] = digits2(m);
    let [d0, d1] = digits2(d);
    let [h0, h1] = digits2(h);
    let [i0, i1] = digits2(mi);
    let [s0, s1] = digits2(s.unwrap_or(0));
    let buf = [
        y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1, b'T', h0, h1, b':', i0, i1, b':', s0, s1, 0, 0,
        0,
    ];
    let len = match time {
        None => 10,
        Some((_, _, None)) => 16,
        Some((_, _, Some(_))) => 19,
    };
    SmallString::from_ascii_buf(buf, len)
}

/// Two decimal digits of a value below 100.
fn digits2(v: u8) -> [u8; 2] {
    [
        b'0'.wrapping_add(v.wrapping_div(10)),
        b'0'.wrapping_add(v.wrapping_rem(10)),
    ]
}

/// [`iso_date`] through `format!`, for the years it does not write itself.
fn iso_date_formatted(y: i32, m: u8, d: u8, time: Option<(u8, u8, Option<u8>)>) -> SmallString {
    let date = format!("{y:04}-{m:02}-{d:02}");
    SmallString::from(match time {
        None => date,
        Some((h, mi, None)) => format!("{date}T{h:02}:{mi:02}"),
        Some((h, mi, Some(s))) => format!("{date}T{h:02}:{mi:02}:{s:02}"),
    })
}

/// ASCII text built byte by byte: on the stack while it fits a [`SmallString`]'s inline
/// bytes, in a `Vec` (sized once) beyond.
struct AsciiWriter {
    buf: [u8; 22],
    len: usize,
    spill: Vec<u8>,
    expected: usize,
}

impl AsciiWriter {
    fn new(expected: usize) -> Self {
        Self {
            buf: [0; 22],
            len: 0,
            spill: Vec::new(),
            expected,
        }
    }

    #[inline(always)]
    fn push(&mut self, b: u8) {
        if self.spill.is_empty() {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len = self.len.wrapping_add(1);
                return;
            }
            self.spill = Vec::with_capacity(self.expected.max(self.len.wrapping_add(1)));
            self.spill.extend_from_slice(&self.buf);
        }
        self.spill.push(b);
    }

    /// `value` as at least two digits (`{:02}`).
    fn two(&mut self, value: u8) {
        if value >= 100 {
            self.push(b'0'.wrapping_add(value.wrapping_div(100)));
        }
        let value = value.wrapping_rem(100);
        self.push(b'0'.wrapping_add(value.wrapping_div(10)));
        self.push(b'0'.wrapping_add(value.wrapping_rem(10)));
    }

    /// `HH:MM[:SS]`.
    fn time(&mut self, h: u8, mi: u8, s: Option<u8>) {
        self.two(h);
        self.push(b':');
        self.two(mi);
        if let Some(s) = s {
            self.push(b':');
            self.two(s);
        }
    }

    /// Two lowercase hex digits.
    fn hex(&mut self, b: u8) {
        for nibble in [b >> 4, b & 0x0F] {
            self.push(HEX_LOWER.get(usize::from(nibble)).copied().unwrap_or(b'0'));
        }
    }

    fn finish(self) -> SmallString {
        if self.spill.is_empty() {
            // Every byte pushed is ASCII (digits, hex, text checked by the caller).
            SmallString::from_ascii_buf(self.buf, self.len)
        } else {
            String::from_utf8(self.spill)
                .map(SmallString::from)
                .unwrap_or_default()
        }
    }
}

impl<'a> RawRecord<'a> {
    /// Function field (DIF bits 5-4).
    pub fn function(&self) -> Function {
        match (self.dif >> 4) & 3 {
            0 => Function::Instantaneous,
            1 => Function::Maximum,
            2 => Function::Minimum,
            _ => Function::ValueDuringError,
        }
    }

    /// Storage number: DIF bit 6 plus 4 bits per DIFE.
    pub fn storage(&self) -> u64 {
        let mut storage = u64::from((self.dif >> 6) & 1);
        for (i, d) in self.dife.iter().enumerate() {
            let shift = u32::try_from(i)
                .unwrap_or(0)
                .wrapping_mul(4)
                .wrapping_add(1);
            storage |= u64::from(d & 0x0F).checked_shl(shift).unwrap_or(0);
        }
        storage
    }

    /// Tariff: 2 bits per DIFE.
    pub fn tariff(&self) -> u16 {
        self.dife_fields().1
    }

    /// Subunit (libmbus "Device"): 1 bit per DIFE.
    pub fn subunit(&self) -> u16 {
        self.dife_fields().2
    }

    /// True for DIF 0F/1F manufacturer data records.
    pub fn is_manufacturer_data(&self) -> bool {
        self.dif == 0x0F || self.dif == 0x1F
    }

    /// Meaning of the VIF (and its extension-table VIFE).
    pub fn vif_info(&self) -> VifInfo {
        self.meaning().0
    }

    /// The VIF's meaning with the combinable VIFEs applied, and the exponent of the additive
    /// correction (VIFE 78..7B: 10^(nn-3) units), in one pass over the chain.
    #[inline(always)]
    fn meaning(&self) -> (VifInfo, Option<i32>) {
        if self.is_manufacturer_data() {
            let q = if self.dif == 0x1F {
                "more_records_follow"
            } else {
                "manufacturer_specific"
            };
            return (vi(q, None, 0), None);
        }
        let (mut info, combinable) = match (self.vif, self.vife.split_first()) {
            (0xFD, Some((code, rest))) => (lookup(&FD_VIF, *code), rest),
            (0xFB, Some((code, rest))) => (lookup(&FB_VIF, *code), rest),
            (0x7C | 0xFC, _) => (vi("plain_text", None, 0), self.vife),
            (v, _) => (lookup(&PRIMARY_VIF, v), self.vife),
        };
        let mut additive = None;
        for v in combinable {
            match v & 0x7F {
                // Multiplicative correction 10^(nnn-6).
                c @ 0x70..=0x77 => info.exponent = info.exponent.wrapping_add(exp(c, 7, -6)),
                // Additive correction constant 10^(nn-3); the first one counts.
                c @ 0x78..=0x7B => {
                    additive.get_or_insert(exp(c, 3, -3));
                }
                // Multiplicative correction 10^3.
                0x7D => info.exponent = info.exponent.wrapping_add(3),
                // E011 1100: accumulation of abs value only if negative contributions (EN
                // 13757-3 combinable VIFE; 0x3D is reserved): the reverse register.
                0x3C if info.quantity == "volume" => {
                    info.quantity = "volume_reverse";
                    info.known = const { RecordQuantity::known_index("volume_reverse") };
                }
                // A manufacturer-specific VIFE: what follows is vendor data, stop interpreting.
                0x7F => break,
                _ => {}
            }
        }
        (info, additive)
    }

    /// Decodes the data field without VIF scaling (no allocation).
    pub fn raw_value(&self) -> RawValue<'a> {
        if self.is_manufacturer_data() {
            return RawValue::Bytes(self.data);
        }
        self.raw_value_with(self.vif_info().date)
    }

    #[inline(always)]
    fn raw_value_with(&self, info_date: bool) -> RawValue<'a> {
        if self.is_manufacturer_data() {
            return RawValue::Bytes(self.data);
        }
        let mut buf = [0u8; 8];
        let data = if self.msb_first && self.data.len() <= 8 {
            let n = self.data.len();
            for (d, s) in buf.iter_mut().zip(self.data.iter().rev()) {
                *d = *s;
            }
            buf.get(..n).unwrap_or(&[])
        } else {
            self.data
        };
        match self.dif & 0x0F {
            0x00 | 0x08 => RawValue::None,
            0x02 if info_date => date_g(data),
            0x04 if info_date => date_f(data).unwrap_or(RawValue::Bytes(self.data)),
            0x06 if info_date => date_i(data).unwrap_or(RawValue::Bytes(self.data)),
            // Type J: ss mm hh (VIF 6D with 3 bytes).
            0x03 if info_date => match data {
                [s, m, h] => RawValue::Time(h & 0x1F, m & 0x3F, s & 0x3F),
                _ => RawValue::Bytes(self.data),
            },
            0x01..=0x04 | 0x06 | 0x07 => RawValue::Int(int_le(data)),
            0x05 => match <[u8; 4]>::try_from(data) {
                Ok(b) => RawValue::Real(f32::from_le_bytes(b)),
                Err(_) => RawValue::Bytes(self.data),
            },
            0x09..=0x0C | 0x0E => bcd(data).map_or(RawValue::Bytes(self.data), RawValue::Int),
            0x0D => match self.lvar {
                Some(0x00..=0xBF) => RawValue::Text(self.data),
                Some(l @ 0xC0..=0xDF) => match bcd(self.data) {
                    Some(v) if l >= 0xD0 => RawValue::Int(v.saturating_neg()),
                    Some(v) => RawValue::Int(v),
                    None => RawValue::Bytes(self.data),
                },
                _ => RawValue::Bytes(self.data),
            },
            _ => RawValue::Bytes(self.data),
        }
    }

    /// The value scaled to the record's unit, when it is a number (no allocation).
    ///
    /// The decimal is not normalized (`12.345000` and `12.345` compare equal).
    pub fn number(&self) -> Option<(Decimal, Option<Unit>)> {
        let (info, additive) = self.meaning();
        let raw = self.raw_value_with(info.date);
        scaled(raw, &info, additive).map(|v| (v, info.unit))
    }

    /// Converts to the protocol-neutral record. The quantity name is borrowed from the VIF
    /// table; only plain-text VIFs, dates, text and raw bytes allocate.
    pub fn to_record(&self) -> Record {
        let mut record = empty_record();
        self.write_record(&mut record);
        record
    }

    /// Fills `out` (every field) with this record. `decode` writes into the slot of its
    /// vector: a record built aside and then moved was read back right after its fields were
    /// written, which stalls on store forwarding (a quarter of the decode time).
    #[inline(always)]
    fn write_record(&self, out: &mut Record) {
        let (info, additive) = self.meaning();
        let raw = self.raw_value_with(info.date);
        let is_number = match raw {
            RawValue::Int(v) => {
                write_int_number(v, info.exponent, info.factor, additive, &mut out.value)
            }
            RawValue::Real(_) => match scaled(raw, &info, additive) {
                Some(d) => {
                    out.value = RecordValue::Number(d.normalize());
                    true
                }
                None => false,
            },
            _ => false,
        };
        if is_number {
            out.unit = info.unit;
        } else {
            out.value = self.non_number(raw);
            out.unit = None;
        }
        let (storage, tariff, subunit) = self.dife_fields();
        out.storage = u32::try_from(storage).unwrap_or(u32::MAX);
        out.tariff = tariff;
        out.subunit = subunit;
        out.function = self.function();
        out.quantity = if self.plain_text.is_empty() {
            RecordQuantity::from_indexed(info.known, info.quantity)
        } else {
            RecordQuantity::from_name(String::from(text(self.plain_text)))
        };
    }

    /// Storage number, tariff and subunit from DIF and DIFEs in one pass.
    ///
    /// The record parser refuses a tariff wider than 16 bits ([`MbusError::TariffTooWide`])
    /// and at most 10 DIFEs give a 10-bit subunit, so both fit the `u16`s of
    /// [`model::Reading`].
    fn dife_fields(&self) -> (u64, u16, u16) {
        let mut storage = u64::from((self.dif >> 6) & 1);
        let (mut tariff, mut subunit) = (0u16, 0u16);
        // At most 10 DIFEs (the parser refuses more), so the shifts stay below 64 and 32.
        for (i, d) in (0u32..).zip(self.dife) {
            storage |= u64::from(d & 0x0F)
                .checked_shl(i.wrapping_mul(4).wrapping_add(1))
                .unwrap_or(0);
            tariff |= u16::from((d >> 4) & 3)
                .checked_shl(i.wrapping_mul(2))
                .unwrap_or(0);
            subunit |= u16::from((d >> 6) & 1).checked_shl(i).unwrap_or(0);
        }
        (storage, tariff, subunit)
    }

    /// The value of a record that is not a number: dates as ISO text, text, raw hex.
    fn non_number(&self, raw: RawValue<'_>) -> RecordValue {
        match raw {
            RawValue::Date(y, m, d) => RecordValue::Date(iso_date(y, m, d, None)),
            RawValue::DateTime(y, mo, d, h, mi, s) => {
                RecordValue::Date(iso_date(y, mo, d, Some((h, mi, s))))
            }
            RawValue::Time(h, mi, s) => {
                let mut out = AsciiWriter::new(8);
                out.time(h, mi, Some(s));
                RecordValue::Date(out.finish())
            }
            RawValue::Text(t) => RecordValue::Text(text(t)),
            RawValue::None => RecordValue::Raw(SmallString::new()),
            // Variable-length binary numbers are little-endian: print them MSB first.
            RawValue::Bytes(b) if self.lvar.is_some_and(|l| l >= 0xE0) => {
                let mut out = AsciiWriter::new(b.len().saturating_mul(2));
                for x in b.iter().rev() {
                    out.hex(*x);
                }
                RecordValue::Raw(out.finish())
            }
            RawValue::Bytes(b) => RecordValue::Raw(hex_lower(b)),
            RawValue::Int(_) | RawValue::Real(_) => RecordValue::Raw(hex_lower(self.data)),
        }
    }
}

/// `raw` scaled by the VIF's exponent and factor plus the additive correction; `None` when it
/// is not a number or does not fit a `Decimal`.
fn scaled(raw: RawValue<'_>, info: &VifInfo, additive: Option<i32>) -> Option<Decimal> {
    let mut value = match raw {
        // Scaling an integer down is only a change of scale: no multiplication needed.
        RawValue::Int(v) if (-28..0).contains(&info.exponent) => {
            Decimal::try_new(v, info.exponent.unsigned_abs()).ok()?
        }
        RawValue::Int(v) => Decimal::from(v).checked_mul(pow10(info.exponent))?,
        RawValue::Real(f) => Decimal::try_from(f)
            .ok()?
            .checked_mul(pow10(info.exponent))?,
        _ => return None,
    };
    if info.factor != 1 {
        value = value.checked_mul(Decimal::from(info.factor))?;
    }
    if let Some(add) = additive {
        value = value.checked_add(Decimal::ONE.checked_mul(pow10(add)).unwrap_or_default())?;
    }
    Some(value)
}

/// Writes an integer record's value, in normal form, into `out`; false (and `out` untouched)
/// when it does not fit a `Decimal`.
///
/// Not inlined, and writing through `out`, on purpose: the `Decimal` is stored once, straight
/// into the record. Inlined, it went through the stack and was read back as 16 bytes right
/// after being written as four words, a store-forwarding stall per record.
#[inline(never)]
fn write_int_number(
    v: i64,
    exponent: i32,
    factor: u32,
    additive: Option<i32>,
    out: &mut RecordValue,
) -> bool {
    // The common case, an integer scaled down by a power of ten, is built directly in normal
    // form (no trailing fractional zeros) instead of through `Decimal::normalize`, and
    // without an `Option`/`Result` around it (those live on the stack).
    if factor == 1 && additive.is_none() && (-28..=0).contains(&exponent) {
        // The old value is dropped first (a possible call that would otherwise force the new
        // `Decimal` onto the stack), then the number is stored straight from registers.
        *out = RecordValue::Number(Decimal::ZERO);
        if let RecordValue::Number(slot) = out {
            let (mantissa, scale) = strip_trailing_zeros(v, exponent.unsigned_abs());
            // `Decimal::new(mantissa, scale)` by its parts: `new` is not inlined across
            // crates and returns through memory (the same stall again); `from_parts` is.
            let magnitude = mantissa.unsigned_abs();
            *slot = Decimal::from_parts(
                (magnitude & 0xFFFF_FFFF) as u32,
                (magnitude >> 32) as u32,
                0,
                mantissa < 0,
                scale,
            );
        }
        return true;
    }
    let info = VifInfo {
        exponent,
        factor,
        ..vi("", None, 0)
    };
    match scaled(RawValue::Int(v), &info, additive) {
        Some(d) => {
            *out = RecordValue::Number(d.normalize());
            true
        }
        None => false,
    }
}

/// `(v, scale)` with the trailing zeros of `v` moved out of the scale, as far as it goes:
/// `(1200, 3)` is `(12, 1)`; zero is `(0, 0)`.
fn strip_trailing_zeros(mut v: i64, mut scale: u32) -> (i64, u32) {
    if v == 0 {
        return (0, 0);
    }
    while scale > 0 && v.wrapping_rem(10) == 0 {
        v = v.wrapping_div(10);
        scale = scale.saturating_sub(1);
    }
    (v, scale)
}

/// A placeholder that [`RawRecord::write_record`] overwrites; nothing in it allocates.
fn empty_record() -> Record {
    Record {
        quantity: RecordQuantity::Volume,
        value: RecordValue::Raw(SmallString::new()),
        unit: None,
        storage: 0,
        tariff: 0,
        subunit: 0,
        function: Function::Instantaneous,
    }
}

/// Text fields are sent last character first.
fn text(bytes: &[u8]) -> SmallString {
    if bytes.is_ascii() {
        let mut out = AsciiWriter::new(bytes.len());
        for b in bytes.iter().rev() {
            out.push(*b);
        }
        return out.finish();
    }
    // Latin-1 beyond ASCII: each byte is one `char`.
    SmallString::from(
        bytes
            .iter()
            .rev()
            .map(|b| char::from(*b))
            .collect::<String>(),
    )
}

fn pow10(exp: i32) -> Decimal {
    match exp {
        // Decimal holds at most 28 fractional digits.
        -28..=-1 => Decimal::new(1, exp.unsigned_abs()),
        0..=18 => Decimal::from(10i64.pow(exp.unsigned_abs())),
        _ if exp < 0 => Decimal::ZERO,
        _ => Decimal::from(10i64.pow(18))
            .checked_mul(pow10(exp.saturating_sub(18)))
            .unwrap_or(Decimal::MAX),
    }
}

/// Little-endian two's-complement integer of 1..8 bytes.
fn int_le(data: &[u8]) -> i64 {
    // Sign-extend from the most significant byte, then shift the rest in (no memcpy call).
    let data = data.get(..data.len().min(8)).unwrap_or(&[]);
    let mut value: i64 = match data.last() {
        Some(top) if top & 0x80 != 0 => -1,
        _ => 0,
    };
    for b in data.iter().rev() {
        value = value.wrapping_shl(8) | i64::from(*b);
    }
    value
}

/// BCD, low byte first; an F in the most significant digit means negative (EN 13757-3 annex).
/// Other non-decimal nibbles give `None` (the record is kept raw).
fn bcd(data: &[u8]) -> Option<i64> {
    let mut value: i64 = 0;
    let mut negative = false;
    for (i, b) in data.iter().rev().enumerate() {
        let (mut hi, lo) = (b >> 4, b & 0x0F);
        if i == 0 && hi == 0x0F {
            negative = true;
            hi = 0;
        }
        if hi > 9 || lo > 9 {
            return None;
        }
        value = value
            .checked_mul(100)?
            .checked_add(i64::from(hi.wrapping_mul(10).wrapping_add(lo)))?;
    }
    Some(if negative {
        value.saturating_neg()
    } else {
        value
    })
}

/// Two-digit years: 00-80 are 2000-2080, the rest 1900+ (EN 13757-3 recommendation, as libmbus).
fn full_year(year: u8) -> i32 {
    let base = if year <= 80 { 2000i32 } else { 1900 };
    base.wrapping_add(i32::from(year))
}

fn date_g(d: &[u8]) -> RawValue<'static> {
    let [b0, b1] = <[u8; 2]>::try_from(d).unwrap_or([0, 0]);
    let year = ((b0 & 0xE0) >> 5) | ((b1 & 0xF0) >> 1);
    RawValue::Date(full_year(year), b1 & 0x0F, b0 & 0x1F)
}

fn date_f(d: &[u8]) -> Option<RawValue<'static>> {
    let [b0, b1, b2, b3] = <[u8; 4]>::try_from(d).unwrap_or([0; 4]);
    if b0 & 0x80 != 0 {
        // IV bit: the meter marks its own clock invalid; keep the bytes.
        return None;
    }
    let year = full_year(((b2 & 0xE0) >> 5) | ((b3 & 0xF0) >> 1));
    Some(RawValue::DateTime(
        year,
        b3 & 0x0F,
        b2 & 0x1F,
        b1 & 0x1F,
        b0 & 0x3F,
        None,
    ))
}

fn date_i(d: &[u8]) -> Option<RawValue<'static>> {
    let [b0, b1, b2, b3, b4, _] = <[u8; 6]>::try_from(d).unwrap_or([0; 6]);
    if b1 & 0x80 != 0 {
        return None;
    }
    let year = full_year(((b3 & 0xE0) >> 5) | ((b4 & 0xF0) >> 1));
    Some(RawValue::DateTime(
        year,
        b4 & 0x0F,
        b3 & 0x1F,
        b2 & 0x1F,
        b1 & 0x3F,
        Some(b0 & 0x3F),
    ))
}

// ---------------------------------------------------------------------------------------------
// Encoders

/// One data record to encode (DIF/DIFE/VIF/VIFE and data as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRecord {
    /// DIF (the extension bit is set by the encoder when `dife` is not empty).
    pub dif: u8,
    /// DIFEs (extension bits set by the encoder).
    pub dife: Vec<u8>,
    /// VIF (the extension bit is set by the encoder when `vife` is not empty).
    pub vif: u8,
    /// VIFEs (extension bits set by the encoder).
    pub vife: Vec<u8>,
    /// Data bytes, little-endian, as sent.
    pub data: Vec<u8>,
}

impl DataRecord {
    /// A 32-bit integer record (DIF 04) with the given VIF, e.g. VIF 0x13 = volume in litres.
    pub fn int32(vif: u8, value: i32) -> Self {
        Self::raw(0x04, vif, value.to_le_bytes().to_vec())
    }

    /// A 16-bit integer record (DIF 02).
    pub fn int16(vif: u8, value: i16) -> Self {
        Self::raw(0x02, vif, value.to_le_bytes().to_vec())
    }

    /// An 8-digit BCD record (DIF 0C); negative values use the F sign digit.
    pub fn bcd8(vif: u8, value: i64) -> Self {
        Self::raw(0x0C, vif, bcd_bytes(value, 4))
    }

    /// A date-time type F record (DIF 04, VIF 6D).
    pub fn date_time(t: time::PrimitiveDateTime) -> Self {
        Self::raw(0x04, 0x6D, type_f(t).to_vec())
    }

    /// A date type G record (DIF 02, VIF 6C).
    pub fn date(d: time::Date) -> Self {
        let year = u8::try_from(d.year().rem_euclid(100)).unwrap_or(0);
        let b0 = (d.day() & 0x1F) | ((year & 0x07) << 5);
        let b1 = (u8::from(d.month()) & 0x0F) | ((year & 0x78) << 1);
        Self::raw(0x02, 0x6C, vec![b0, b1])
    }

    /// A record from its parts.
    pub fn raw(dif: u8, vif: u8, data: Vec<u8>) -> Self {
        Self {
            dif,
            dife: Vec::new(),
            vif,
            vife: Vec::new(),
            data,
        }
    }

    /// Sets the VIFE chain (extension bits are set by the encoder).
    pub fn vife_chain(mut self, vife: &[u8]) -> Self {
        self.vife = vife.to_vec();
        self
    }

    /// Sets the storage number (DIF bit 6 + DIFEs as needed).
    pub fn storage(mut self, storage: u32) -> Self {
        self.dif = (self.dif & !0x40) | (u8::from(storage & 1 != 0) << 6);
        let mut rest = storage >> 1;
        let mut i = 0usize;
        while rest != 0 {
            self.ensure_dife(i);
            if let Some(d) = self.dife.get_mut(i) {
                *d = (*d & 0xF0) | (rest & 0x0F) as u8;
            }
            rest >>= 4;
            i = i.saturating_add(1);
        }
        self
    }

    /// Sets the tariff (2 bits per DIFE).
    pub fn tariff(mut self, tariff: u32) -> Self {
        let mut rest = tariff;
        let mut i = 0usize;
        while rest != 0 {
            self.ensure_dife(i);
            if let Some(d) = self.dife.get_mut(i) {
                *d = (*d & !0x30) | (((rest & 3) as u8) << 4);
            }
            rest >>= 2;
            i = i.saturating_add(1);
        }
        self
    }

    /// Sets the subunit (1 bit per DIFE).
    pub fn subunit(mut self, subunit: u32) -> Self {
        let mut rest = subunit;
        let mut i = 0usize;
        while rest != 0 {
            self.ensure_dife(i);
            if let Some(d) = self.dife.get_mut(i) {
                *d = (*d & !0x40) | (((rest & 1) as u8) << 6);
            }
            rest >>= 1;
            i = i.saturating_add(1);
        }
        self
    }

    /// Sets the function field.
    pub fn function(mut self, function: Function) -> Self {
        let f = match function {
            Function::Instantaneous => 0,
            Function::Maximum => 1,
            Function::Minimum => 2,
            Function::ValueDuringError => 3,
        };
        self.dif = (self.dif & !0x30) | (f << 4);
        self
    }

    fn ensure_dife(&mut self, i: usize) {
        while self.dife.len() <= i {
            self.dife.push(0);
        }
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let ext = |b: u8, more: bool| if more { b | 0x80 } else { b & 0x7F };
        out.push(ext(self.dif, !self.dife.is_empty()));
        for (i, d) in self.dife.iter().enumerate() {
            out.push(ext(*d, i.saturating_add(1) < self.dife.len()));
        }
        out.push(ext(self.vif, !self.vife.is_empty()));
        for (i, v) in self.vife.iter().enumerate() {
            out.push(ext(*v, i.saturating_add(1) < self.vife.len()));
        }
        out.extend_from_slice(&self.data);
    }
}

fn bcd_bytes(value: i64, n: usize) -> Vec<u8> {
    let mut raw = value.unsigned_abs();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let two = (raw % 100) as u8;
        out.push(((two / 10) << 4) | (two % 10));
        raw /= 100;
    }
    if let (true, Some(last)) = (value < 0, out.last_mut()) {
        *last = (*last & 0x0F) | 0xF0;
    }
    out
}

fn type_f(t: time::PrimitiveDateTime) -> [u8; 4] {
    let year = u8::try_from(t.year().rem_euclid(100)).unwrap_or(0);
    [
        t.minute() & 0x3F,
        t.hour() & 0x1F,
        (t.day() & 0x1F) | ((year & 0x07) << 5),
        (u8::from(t.month()) & 0x0F) | ((year & 0x78) << 1),
    ]
}

/// Encoders for master requests and slave answers.
pub mod encode {
    use super::{
        ACK, CI_APPLICATION_RESET, CI_DATA_SEND, CI_RSP_LONG, CI_SELECT, DataRecord, RspUdHeader,
        START_LONG, START_SHORT, STOP, checksum, type_f,
    };

    /// C field SND_NKE (link reset).
    pub const C_SND_NKE: u8 = 0x40;
    /// C field REQ_UD2 without FCB (FCB adds 0x20).
    pub const C_REQ_UD2: u8 = 0x5B;
    /// C field SND_UD (send user data to the slave).
    pub const C_SND_UD: u8 = 0x53;
    /// C field RSP_UD (slave response).
    pub const C_RSP_UD: u8 = 0x08;
    /// Primary address used for secondary-address selection and network-layer communication.
    pub const ADDRESS_NETWORK: u8 = 0xFD;

    fn short(control: u8, address: u8) -> Vec<u8> {
        vec![
            START_SHORT,
            control,
            address,
            control.wrapping_add(address),
            STOP,
        ]
    }

    /// Builds a long frame `68 L L 68 C A CI data CS 16`; data beyond 252 bytes is cut.
    pub fn long(control: u8, address: u8, ci: u8, data: &[u8]) -> Vec<u8> {
        let data = data.get(..data.len().min(252)).unwrap_or(&[]);
        let len = u8::try_from(data.len().saturating_add(3)).unwrap_or(u8::MAX);
        let mut out = Vec::with_capacity(data.len().saturating_add(9));
        out.extend_from_slice(&[START_LONG, len, len, START_LONG, control, address, ci]);
        out.extend_from_slice(data);
        let cs = checksum(out.get(4..).unwrap_or(&[]));
        out.push(cs);
        out.push(STOP);
        out
    }

    /// SND_NKE: link reset `10 40 A CS 16`.
    pub fn snd_nke(primary: u8) -> Vec<u8> {
        short(C_SND_NKE, primary)
    }

    /// REQ_UD2: request class 2 data `10 5B/7B A CS 16`.
    pub fn req_ud2(primary: u8, fcb: bool) -> Vec<u8> {
        short(C_REQ_UD2 | if fcb { 0x20 } else { 0 }, primary)
    }

    /// Selects a slave by secondary address (SND_UD to FD, CI 52).
    ///
    /// `id` is BCD coded (`0x12345678`); F nibbles are wildcards. `None` fields are wildcards.
    pub fn select_secondary(
        id: u32,
        man: Option<u16>,
        version: Option<u8>,
        medium: Option<u8>,
    ) -> Vec<u8> {
        let mut data = Vec::with_capacity(8);
        data.extend_from_slice(&id.to_le_bytes());
        data.extend_from_slice(&man.unwrap_or(0xFFFF).to_le_bytes());
        data.push(version.unwrap_or(0xFF));
        data.push(medium.unwrap_or(0xFF));
        long(C_SND_UD, ADDRESS_NETWORK, CI_SELECT, &data)
    }

    /// Application reset (SND_UD, CI 50).
    pub fn application_reset(primary: u8) -> Vec<u8> {
        long(C_SND_UD, primary, CI_APPLICATION_RESET, &[])
    }

    /// Sets the slave clock (SND_UD, CI 51, record 04 6D type F), in the slave's local time.
    pub fn set_time(primary: u8, t: time::OffsetDateTime) -> Vec<u8> {
        let t = time::PrimitiveDateTime::new(t.date(), t.time());
        let mut data = vec![0x04, 0x6D];
        data.extend_from_slice(&type_f(t));
        long(C_SND_UD, primary, CI_DATA_SEND, &data)
    }

    /// Single-character acknowledgement E5.
    pub fn ack() -> Vec<u8> {
        vec![ACK]
    }

    /// RSP_UD with CI 72, the long header and `records`.
    pub fn rsp_ud(primary: u8, header: &RspUdHeader, records: &[DataRecord]) -> Vec<u8> {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&header.to_wire());
        for r in records {
            r.encode_into(&mut data);
        }
        long(C_RSP_UD, primary, CI_RSP_LONG, &data)
    }

    /// RSP_UD that ends with DIF 1F: tells the master that more records follow.
    pub fn rsp_ud_more(primary: u8, header: &RspUdHeader, records: &[DataRecord]) -> Vec<u8> {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&header.to_wire());
        for r in records {
            r.encode_into(&mut data);
        }
        data.push(0x1F);
        long(C_RSP_UD, primary, CI_RSP_LONG, &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates_match_the_format_macro() {
        for y in [0, 7, 99, 1900, 1996, 2026, 2080, 9999, 12_345, -5] {
            for (mo, d, h, mi, s) in [(1, 1, 0, 0, 0), (12, 31, 23, 59, 59), (2, 29, 9, 5, 7)] {
                assert_eq!(iso_date(y, mo, d, None), format!("{y:04}-{mo:02}-{d:02}"));
                assert_eq!(
                    iso_date(y, mo, d, Some((h, mi, None))),
                    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}")
                );
                assert_eq!(
                    iso_date(y, mo, d, Some((h, mi, Some(s)))),
                    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
                );
            }
        }
        for v in [0u8, 5, 10, 99, 100, 255] {
            let mut out = AsciiWriter::new(2);
            out.two(v);
            assert_eq!(out.finish(), format!("{v:02}"));
        }
        for len in [0usize, 11, 12, 40] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            assert_eq!(hex_lower(&bytes), hex::encode(&bytes));
        }
    }
}
