//! Application headers (CI 72/76 long, 7A short, 78 none, 73/77 fixed structure), manufacturer codes and medium names.

use super::*;

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

    pub(super) fn to_wire(self) -> [u8; 12] {
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
    pub(super) fn from_wire(data: &[u8]) -> Option<Self> {
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

pub(super) fn application_error_meaning(code: u8) -> &'static str {
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
pub(super) fn parse_header<'a>(
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

pub(super) fn parse_fixed(ci: u8, cur: &mut Cursor<'_>) -> Result<Application, MbusError> {
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
pub(super) fn fixed_unit(code: u8) -> VifInfo {
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
