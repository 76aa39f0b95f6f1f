//! The gateway's path: from a frame's bytes straight to the typed values the pipeline stores
//! (`readings`), in one pass over the allocation-free record iterator, without building
//! [`DecodedFrame`]'s per-record texts (dates, hex, quantity names) that the gateway drops.

use super::*;
use crate::frame::READING_OF_KNOWN;

/// One record the pipeline stores, typed: an instantaneous record whose quantity the pipeline
/// has ([`RecordQuantity::reading_quantity`]) and whose value is a number.
///
/// Exactly the records, in frame order and with the same values (the same `Decimal`, scale
/// included), that the gateway's normalisation keeps from [`decode`]'s [`DecodedFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumericReading {
    /// The pipeline's quantity.
    pub quantity: model::Quantity,
    /// The value, scaled to `unit`, in normal form.
    pub value: Decimal,
    /// Unit of the value; `None` for a plain number.
    pub unit: Option<Unit>,
    /// Storage number (0 = current).
    pub storage: u32,
    /// Tariff (0 = total).
    pub tariff: u16,
    /// Sub-unit.
    pub subunit: u16,
}

impl NumericReading {
    /// The reading of a decoded record, if the pipeline stores it (the filter the gateway
    /// applies to [`DecodedFrame::records`]).
    pub fn of_record(record: &Record) -> Option<Self> {
        if record.function != Function::Instantaneous {
            return None;
        }
        let RecordValue::Number(value) = record.value else {
            return None;
        };
        Some(Self {
            quantity: record.reading_quantity()?,
            value,
            unit: record.unit,
            storage: record.storage,
            tariff: record.tariff,
            subunit: record.subunit,
        })
    }
}

/// Decodes an RSP_UD long frame as [`decode`] does, but appends only the records the pipeline
/// stores, typed, to `out` (which is not cleared) and returns the meter's identity.
///
/// The same frames succeed and fail with the same errors as [`decode`]; on an error `out` may
/// hold the readings of the records before the bad one. Nothing is allocated apart from
/// `out`'s growth (and the records of a fixed-structure frame, CI 73/77, which takes
/// `decode`'s path).
///
/// # Errors
/// [`MbusError`], as [`decode`].
pub fn readings(bytes: &[u8], out: &mut Vec<NumericReading>) -> Result<MeterInfo, MbusError> {
    let (address, ci_offset, app) = long_frame_application(bytes)?;
    let mut cur = Cursor::new(app, ci_offset);
    let ci = cur.byte("CI")?;
    if ci == CI_RSP_FIXED || ci == CI_RSP_FIXED_MSB {
        // Fixed-structure frames (two counters) are rare: the general path.
        let fixed = decode_application_at(app, ci_offset)?;
        out.extend(fixed.records.iter().filter_map(NumericReading::of_record));
        return Ok(meter_info(&fixed.header, address));
    }
    let header = parse_header(ci, ci_offset, &mut cur)?;
    let mut iter = RecordIter::with_offset(cur.rest, cur.offset, ci == CI_RSP_LONG_MSB);
    while let Some(rec) = iter.next_record()? {
        if let Some(reading) = rec.numeric_reading() {
            out.push(reading);
        }
    }
    Ok(meter_info(&header, address))
}

impl RawRecord<'_> {
    /// This record as a [`NumericReading`], when the pipeline stores it: the function field
    /// is checked first, then the quantity, and only then is the value computed.
    #[inline]
    pub fn numeric_reading(&self) -> Option<NumericReading> {
        // Instantaneous only (DIF bits 5-4 zero).
        if self.dif & 0x30 != 0 {
            return None;
        }
        // `meaning` for the records that can be readings, reading only the table fields it
        // needs (by reference, not a copy of the whole entry): manufacturer data never is
        // one, and a VIF whose quantity the pipeline does not store is dropped before its
        // VIFE chain (only VIFE 3C changes a quantity, and it turns `volume` into
        // `volume_reverse`, both stored).
        if self.is_manufacturer_data() {
            return None;
        }
        let (base, combinable, plain) = match (self.vif, self.vife.split_first()) {
            (0xFD, Some((code, rest))) => (table_entry(&FD_VIF, *code), rest, false),
            (0xFB, Some((code, rest))) => (table_entry(&FB_VIF, *code), rest, false),
            (0x7C | 0xFC, _) => (&PLAIN_TEXT, self.vife, true),
            (v, _) => (table_entry(&PRIMARY_VIF, v), self.vife, false),
        };
        let mut quantity = if plain {
            // A plain-text unit is a reading only if it spells a known name (never in
            // practice): checked on the bytes, without building the text.
            RecordQuantity::reading_quantity_of_reversed(self.plain_text)?
        } else {
            // Names without an index (`u8::MAX`) have no reading either.
            READING_OF_KNOWN
                .get(usize::from(base.known))
                .copied()
                .flatten()?
        };
        let (mut exponent, mut known) = (base.exponent, base.known);
        let mut additive = None;
        for v in combinable {
            match v & 0x7F {
                c @ 0x70..=0x77 => exponent = exponent.wrapping_add(exp(c, 7, -6)),
                c @ 0x78..=0x7B => {
                    additive.get_or_insert(exp(c, 3, -3));
                }
                0x7D => exponent = exponent.wrapping_add(3),
                0x3C if known == VOLUME_INDEX => {
                    known = const { RecordQuantity::known_index("volume_reverse") };
                    quantity = model::Quantity::VolumeReverse;
                }
                0x7F => break,
                _ => {}
            }
        }
        let value = match self.raw_value_with(base.date) {
            RawValue::Int(v) => int_number(v, exponent, base.factor, additive)?,
            // A whole-numbered real takes the integer path (see `whole_f32`).
            RawValue::Real(f) if whole_f32(f).is_some() => {
                int_number(whole_f32(f)?, exponent, base.factor, additive)?
            }
            raw @ RawValue::Real(_) => {
                scaled(raw, &VifInfo { exponent, ..*base }, additive)?.normalize()
            }
            _ => return None,
        };
        let (storage, tariff, subunit) = self.dife_fields();
        Some(NumericReading {
            quantity,
            value,
            unit: base.unit,
            storage: u32::try_from(storage).unwrap_or(u32::MAX),
            tariff,
            subunit,
        })
    }
}

/// A whole-numbered `f32` as the integer it is, for the integer path: `Decimal::try_from(f32)`
/// of it is that integer at scale 0 (its binary exponent is cancelled by exact halvings or
/// doublings), so scaling it as an integer gives the same normalised value as scaling the
/// converted float, without the float conversion (3/4 of the cost of a real-valued record).
/// `None` for fractions, non-finite values, magnitudes from 1e18 on and negative zero (which
/// keeps its sign as a `Decimal`).
#[inline(always)]
pub(super) fn whole_f32(f: f32) -> Option<i64> {
    if f.trunc() == f && f.abs() < 1e18 && f.to_bits() != 1 << 31 {
        // Whole and below 1e18 in magnitude, so the cast is exact.
        #[allow(clippy::cast_possible_truncation)]
        Some(f as i64)
    } else {
        None
    }
}

/// An integer record's value scaled and in normal form (the common case, an integer scaled
/// down by a power of ten, built directly in normal form instead of through
/// `Decimal::normalize`); `None` when it does not fit a `Decimal`.
#[inline(always)]
pub(super) fn int_number(
    v: i64,
    exponent: i32,
    factor: u32,
    additive: Option<i32>,
) -> Option<Decimal> {
    if factor == 1 && additive.is_none() && (-28..=0).contains(&exponent) {
        let (mantissa, scale) = strip_trailing_zeros(v, exponent.unsigned_abs());
        let magnitude = mantissa.unsigned_abs();
        return Some(Decimal::from_parts(
            (magnitude & 0xFFFF_FFFF) as u32,
            (magnitude >> 32) as u32,
            0,
            mantissa < 0,
            scale,
        ));
    }
    let info = VifInfo {
        exponent,
        factor,
        ..const { vi("", None, 0) }
    };
    scaled(RawValue::Int(v), &info, additive).map(|d| d.normalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the general path gives for a real: the float converted, scaled, normalised.
    fn via_float(f: f32, exponent: i32, factor: u32, additive: Option<i32>) -> Option<Decimal> {
        let info = VifInfo {
            exponent,
            factor,
            ..const { vi("", None, 0) }
        };
        scaled(RawValue::Real(f), &info, additive).map(|d| d.normalize())
    }

    fn via_integer(f: f32, exponent: i32, factor: u32, additive: Option<i32>) -> Option<Decimal> {
        int_number(whole_f32(f)?, exponent, factor, additive)
    }

    #[test]
    fn whole_reals_scale_as_their_integer() {
        for f in [
            0.0f32,
            1.0,
            -1.0,
            7.0,
            100.0,
            12_345.0,
            -65_536.0,
            16_777_216.0,
            1e17,
            -9.9e17,
        ] {
            for exponent in [-9, -6, -3, -1, 0, 1, 3] {
                for (factor, additive) in [(1, None), (60, None), (1, Some(-3)), (60, Some(0))] {
                    assert_eq!(
                        format!("{:?}", via_integer(f, exponent, factor, additive)),
                        format!("{:?}", via_float(f, exponent, factor, additive)),
                        "{f} e{exponent} x{factor} +{additive:?}"
                    );
                }
            }
        }
        assert_eq!(whole_f32(-0.0), None);
        assert_eq!(whole_f32(0.5), None);
        assert_eq!(whole_f32(f32::NAN), None);
        assert_eq!(whole_f32(f32::INFINITY), None);
        assert_eq!(whole_f32(1e18), None);
    }

    proptest! {
        /// On any bit pattern (whole ones included by the second strategy), the integer path
        /// of a whole real equals the float path, `Debug` form (so the scale) included.
        #[test]
        fn whole_real_fast_path_equals_the_float_conversion(
            f in prop_oneof![
                any::<u32>().prop_map(f32::from_bits),
                any::<i32>().prop_map(|i| i as f32),
                (any::<i16>(), 0i32..40).prop_map(|(m, e)| f32::from(m) * 2f32.powi(e)),
            ],
            exponent in -12i32..8,
            factor in prop_oneof![Just(1u32), Just(60), Just(3600)],
            additive in proptest::option::of(-3i32..4),
        ) {
            if whole_f32(f).is_some() {
                prop_assert_eq!(
                    format!("{:?}", via_integer(f, exponent, factor, additive)),
                    format!("{:?}", via_float(f, exponent, factor, additive))
                );
            }
        }
    }
}
