//! Values of a record: raw integers, reals, BCD, dates, text; scaling by the VIF; conversion to `Record` (written in place by `decode`).

use super::readings::{int_number, whole_f32};
use super::*;

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
    pub(super) fn meaning(&self) -> (VifInfo, Option<i32>) {
        let m = self.meaning_ref();
        let quantity = if m.known == m.entry.known {
            m.entry.quantity
        } else {
            "volume_reverse"
        };
        let info = VifInfo {
            quantity,
            known: m.known,
            exponent: m.exponent,
            ..*m.entry
        };
        (info, m.additive)
    }

    /// [`RawRecord::meaning`] with the table entry by reference and only what the VIFEs change
    /// beside it: a copy of the whole entry stayed live on the stack through the record's
    /// value computation.
    #[inline(always)]
    pub(super) fn meaning_ref(&self) -> Meaning {
        if self.is_manufacturer_data() {
            let entry = if self.dif == 0x1F {
                &MORE_RECORDS_FOLLOW
            } else {
                &MANUFACTURER_SPECIFIC
            };
            return Meaning {
                entry,
                exponent: entry.exponent,
                additive: None,
                known: entry.known,
            };
        }
        let (entry, combinable) = match (self.vif, self.vife.split_first()) {
            (0xFD, Some((code, rest))) => (table_entry(&FD_VIF, *code), rest),
            (0xFB, Some((code, rest))) => (table_entry(&FB_VIF, *code), rest),
            (0x7C | 0xFC, _) => (&PLAIN_TEXT, self.vife),
            (v, _) => (table_entry(&PRIMARY_VIF, v), self.vife),
        };
        let mut m = Meaning {
            entry,
            exponent: entry.exponent,
            additive: None,
            known: entry.known,
        };
        for v in combinable {
            match v & 0x7F {
                // Multiplicative correction 10^(nnn-6).
                c @ 0x70..=0x77 => m.exponent = m.exponent.wrapping_add(exp(c, 7, -6)),
                // Additive correction constant 10^(nn-3); the first one counts.
                c @ 0x78..=0x7B => {
                    m.additive.get_or_insert(exp(c, 3, -3));
                }
                // Multiplicative correction 10^3.
                0x7D => m.exponent = m.exponent.wrapping_add(3),
                // E011 1100: accumulation of abs value only if negative contributions (EN
                // 13757-3 combinable VIFE; 0x3D is reserved): the reverse register.
                0x3C if m.known == VOLUME_INDEX => {
                    m.known = const { RecordQuantity::known_index("volume_reverse") };
                }
                // A manufacturer-specific VIFE: what follows is vendor data, stop interpreting.
                0x7F => break,
                _ => {}
            }
        }
        m
    }

    /// Decodes the data field without VIF scaling (no allocation).
    pub fn raw_value(&self) -> RawValue<'a> {
        if self.is_manufacturer_data() {
            return RawValue::Bytes(self.data);
        }
        self.raw_value_with(self.vif_info().date)
    }

    #[inline(always)]
    pub(super) fn raw_value_with(&self, info_date: bool) -> RawValue<'a> {
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
    /// table; only plain-text VIFs, long text and long raw bytes allocate.
    pub fn to_record(&self) -> Record {
        self.make_record()
    }

    /// The record, built once from values in registers and returned whole: `decode` pushes
    /// it. (Writing into a placeholder already in the vector cost a placeholder write, a drop
    /// check per field and spills, more instructions than the one move of the record.)
    #[inline(always)]
    pub(super) fn make_record(&self) -> Record {
        // In the order that lets each part of the record die before the next call: the DIFE
        // chain and the VIFE chain are read before any out-of-line value code runs, so they
        // are not kept on the stack across it.
        let (storage, tariff, subunit) = self.dife_fields();
        let function = self.function();
        let m = self.meaning_ref();
        let quantity = if self.plain_text.is_empty() {
            RecordQuantity::from_indexed(m.known, m.entry.quantity)
        } else {
            plain_text_quantity(self.plain_text)
        };
        let raw = self.raw_value_with(m.entry.date);
        let number = match raw {
            RawValue::Int(v) => int_number(v, m.exponent, m.entry.factor, m.additive),
            // A whole-numbered real is scaled as its integer: the same value
            // (`readings::whole_f32`), without the float conversion.
            RawValue::Real(f) => match whole_f32(f) {
                Some(v) => int_number(v, m.exponent, m.entry.factor, m.additive),
                None => real_number(raw, &m),
            },
            _ => None,
        };
        let (value, unit) = match number {
            Some(d) => (RecordValue::Number(d), m.entry.unit),
            None => (non_number(raw, self.lvar, self.data), None),
        };
        Record {
            quantity,
            value,
            unit,
            storage: u32::try_from(storage).unwrap_or(u32::MAX),
            tariff,
            subunit,
            function,
        }
    }

    /// Storage number, tariff and subunit from DIF and DIFEs in one pass.
    ///
    /// The record parser refuses a tariff wider than 16 bits ([`MbusError::TariffTooWide`])
    /// and at most 10 DIFEs give a 10-bit subunit, so both fit the `u16`s of
    /// [`model::Reading`].
    pub(super) fn dife_fields(&self) -> (u64, u16, u16) {
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
}

/// [`RecordQuantity::known_index`] of `volume`, the quantity VIFE 3C turns into `volume_reverse`.
pub(super) const VOLUME_INDEX: u8 = RecordQuantity::known_index("volume");

/// `raw` scaled by the VIF's exponent and factor plus the additive correction; `None` when it
/// is not a number or does not fit a `Decimal`.
pub(super) fn scaled(raw: RawValue<'_>, info: &VifInfo, additive: Option<i32>) -> Option<Decimal> {
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

/// The value of a record that is not a number: dates as ISO text, text, raw hex.
// Out of line and given the record's fields, not the record: taking `&self` made
// `decode` keep every record in memory for this call.
#[inline(never)]
fn non_number(raw: RawValue<'_>, lvar: Option<u8>, data: &[u8]) -> RecordValue {
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
        RawValue::Bytes(b) if lvar.is_some_and(|l| l >= 0xE0) => {
            let mut out = AsciiWriter::new(b.len().saturating_mul(2));
            for x in b.iter().rev() {
                out.hex(*x);
            }
            RecordValue::Raw(out.finish())
        }
        RawValue::Bytes(b) => RecordValue::Raw(hex_lower(b)),
        RawValue::Int(_) | RawValue::Real(_) => RecordValue::Raw(hex_lower(data)),
    }
}

/// A non-whole real scaled and normalised; out of line, as it is rare and its
/// float-to-decimal conversion is large.
#[inline(never)]
fn real_number(raw: RawValue<'_>, m: &Meaning) -> Option<Decimal> {
    let info = VifInfo {
        exponent: m.exponent,
        ..*m.entry
    };
    scaled(raw, &info, m.additive).map(|d| d.normalize())
}

/// What [`RawRecord::meaning_ref`] gives: the VIF table entry and what the VIFEs change.
#[derive(Clone, Copy)]
pub(super) struct Meaning {
    /// The table entry of the VIF (or of the extension code).
    pub(super) entry: &'static VifInfo,
    /// The entry's exponent with the multiplicative corrections applied.
    pub(super) exponent: i32,
    /// Exponent of the additive correction, if any.
    pub(super) additive: Option<i32>,
    /// [`RecordQuantity::known_index`] of the quantity (VIFE 3C turns `volume` into
    /// `volume_reverse`).
    pub(super) known: u8,
}

/// A plain-text VIF's unit as the record's quantity (rare: out of line).
#[inline(never)]
fn plain_text_quantity(sent: &[u8]) -> RecordQuantity {
    RecordQuantity::from_name(String::from(text(sent)))
}

/// `(v, scale)` with the trailing zeros of `v` moved out of the scale, as far as it goes:
/// `(1200, 3)` is `(12, 1)`; zero is `(0, 0)`.
pub(super) fn strip_trailing_zeros(mut v: i64, mut scale: u32) -> (i64, u32) {
    if v == 0 {
        return (0, 0);
    }
    while scale > 0 && v.wrapping_rem(10) == 0 {
        v = v.wrapping_div(10);
        scale = scale.saturating_sub(1);
    }
    (v, scale)
}

/// Text fields are sent last character first.
pub(super) fn text(bytes: &[u8]) -> SmallString {
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

pub(super) fn pow10(exp: i32) -> Decimal {
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
pub(super) fn int_le(data: &[u8]) -> i64 {
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
pub(super) fn bcd(data: &[u8]) -> Option<i64> {
    // Up to 8 bytes (every fixed BCD coding, 16 digits, which cannot overflow an `i64`) are
    // checked and converted as one 64-bit word: a byte-at-a-time loop with its overflow
    // checks was 3 % of `decode`'s instructions. Longer LVAR BCD takes the loop.
    let n = data.len();
    if n > 8 {
        return bcd_bytewise(data);
    }
    let mut x = le_word(data);
    // The most significant digit F is the minus sign (EN 13757-3 annex B).
    let top = n.wrapping_sub(1).wrapping_mul(8).wrapping_add(4) as u32;
    let negative = n > 0 && (x >> top) & 0x0F == 0x0F;
    if negative {
        x &= !(0x0Fu64 << top);
    }
    const LOW: u64 = 0x0F0F_0F0F_0F0F_0F0F;
    let (lo, hi) = (x & LOW, (x >> 4) & LOW);
    // A nibble above 9 carries into bit 4 of its byte when 6 is added.
    if (lo.wrapping_add(0x0606_0606_0606_0606) | hi.wrapping_add(0x0606_0606_0606_0606))
        & 0x1010_1010_1010_1010
        != 0
    {
        return None;
    }
    // Bytes to 0..=99, then pairs to 0..=9999, quads to 0..=99_999_999, and the two halves.
    let b = lo.wrapping_add(hi.wrapping_mul(10));
    let p = (b & 0x00FF_00FF_00FF_00FF)
        .wrapping_add(((b >> 8) & 0x00FF_00FF_00FF_00FF).wrapping_mul(100));
    let q = (p & 0x0000_FFFF_0000_FFFF)
        .wrapping_add(((p >> 16) & 0x0000_FFFF_0000_FFFF).wrapping_mul(10_000));
    let value = (q & 0xFFFF_FFFF).wrapping_add((q >> 32).wrapping_mul(100_000_000)) as i64;
    Some(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

/// Up to 8 bytes, least significant first, as one word (zero-extended). The usual widths
/// are loaded whole: a byte loop over a stack buffer became a `memcpy` call per record.
#[inline(always)]
fn le_word(data: &[u8]) -> u64 {
    match *data {
        [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
        [a, b] => u64::from(u16::from_le_bytes([a, b])),
        [a] => u64::from(a),
        [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
        _ => data
            .iter()
            .rev()
            .fold(0u64, |acc, b| acc.wrapping_shl(8) | u64::from(*b)),
    }
}

/// [`bcd`] a byte at a time with overflow checks: for LVAR BCD longer than 8 bytes.
pub(super) fn bcd_bytewise(data: &[u8]) -> Option<i64> {
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
pub(super) fn full_year(year: u8) -> i32 {
    let base = if year <= 80 { 2000i32 } else { 1900 };
    base.wrapping_add(i32::from(year))
}

pub(super) fn date_g(d: &[u8]) -> RawValue<'static> {
    let [b0, b1] = <[u8; 2]>::try_from(d).unwrap_or([0, 0]);
    let year = ((b0 & 0xE0) >> 5) | ((b1 & 0xF0) >> 1);
    RawValue::Date(full_year(year), b1 & 0x0F, b0 & 0x1F)
}

pub(super) fn date_f(d: &[u8]) -> Option<RawValue<'static>> {
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

pub(super) fn date_i(d: &[u8]) -> Option<RawValue<'static>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bcd_reads_digits_sign_and_refuses_hex_nibbles() {
        assert_eq!(bcd(&[]), Some(0));
        assert_eq!(bcd(&[0x78, 0x56, 0x34, 0x12]), Some(12_345_678));
        assert_eq!(bcd(&[0x34, 0x12, 0xF0]), Some(-1234));
        assert_eq!(bcd(&[0x99; 8]), Some(9_999_999_999_999_999));
        assert_eq!(bcd(&[0x1A]), None);
        assert_eq!(bcd(&[0x00, 0xA0]), None);
        // F is a sign only in the most significant digit.
        assert_eq!(bcd(&[0xF1, 0x00]), None);
    }

    proptest! {
        /// The word-at-a-time `bcd` equals the byte-at-a-time loop it replaced, on any bytes
        /// (valid digits, hex nibbles, the F sign) up to 8 bytes.
        #[test]
        fn bcd_equals_the_bytewise_loop(
            data in prop::collection::vec(
                prop_oneof![
                    (0u8..10, 0u8..10).prop_map(|(h, l)| (h << 4) | l),
                    (0u8..10).prop_map(|l| 0xF0 | l),
                    any::<u8>(),
                ],
                0..=8,
            )
        ) {
            prop_assert_eq!(bcd(&data), bcd_bytewise(&data));
        }
    }
}
