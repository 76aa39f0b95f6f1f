//! The entry points from bytes to records: `decode` (link frame), `decode_application` (from the CI, reused by wM-Bus), `parse` (allocation-free) and `decode_records`.

use super::*;

/// Decodes the application layer from the CI byte on (`CI header records`).
///
/// # Errors
/// [`MbusError`]; offsets count from the CI byte.
pub fn decode_application(bytes: &[u8]) -> Result<Application, MbusError> {
    decode_application_at(bytes, 0)
}

pub(super) fn decode_application_at(bytes: &[u8], base: usize) -> Result<Application, MbusError> {
    let mut cur = Cursor::new(bytes, base);
    let ci = cur.byte("CI")?;
    if ci == CI_RSP_FIXED || ci == CI_RSP_FIXED_MSB {
        return parse_fixed(ci, &mut cur);
    }
    let header = parse_header(ci, base, &mut cur)?;
    let msb_first = ci == CI_RSP_LONG_MSB;
    // One pass: the vector is sized by a guess from the payload length (a typical record is
    // DIF, VIF and 2 to 4 data bytes) instead of a separate counting pass over the records;
    // a frame of unusually short records only grows it.
    let mut records_out: Vec<Record> = Vec::with_capacity((cur.rest.len() >> 2).wrapping_add(1));
    let mut more = false;
    let mut iter = RecordIter::with_offset(cur.rest, cur.offset, msb_first);
    // `next_record` rather than the iterator: its `Option<Result<..>>` is one more copy of
    // every record.
    while let Some(rec) = iter.next_record()? {
        more |= rec.dif == 0x1F;
        records_out.push(rec.make_record());
    }
    Ok(Application {
        ci,
        header,
        records: records_out,
        more_records_follow: more,
    })
}

/// Fixed data structure: id(4) access status medium/units(2) counter1(4) counter2(4).
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
    let (address, ci_offset, app_bytes) = long_frame_application(bytes)?;
    let app = decode_application_at(app_bytes, ci_offset)?;
    Ok(DecodedFrame {
        protocol: Protocol::Mbus,
        meter: meter_info(&app.header, address),
        records: app.records,
    })
}

/// The link layer of an RSP_UD long frame: its primary address, the offset of its CI byte and
/// the application bytes (CI to the last data byte, without CS and stop). Other frames are
/// refused as [`decode`] refuses them.
pub(super) fn long_frame_application(bytes: &[u8]) -> Result<(u8, usize, &[u8]), MbusError> {
    match long_frame_in_place(bytes) {
        Some(found) => Ok(found),
        None => long_frame_general(bytes),
    }
}

/// [`long_frame_application`] for a well-formed long frame with data, checked in place
/// without the general link parser's cursor and `LinkFrame`; `None` for anything else, which
/// [`long_frame_general`] then handles, so every error is still the one (and at the offset)
/// `parse_link` gives.
#[inline(always)]
fn long_frame_in_place(bytes: &[u8]) -> Option<(u8, usize, &[u8])> {
    let [START_LONG, l1, l2, START_LONG, body @ .., cs, STOP] = bytes else {
        return None;
    };
    // C, A, CI and at least one data byte: `body.len() > 3`.
    if l1 != l2 || usize::from(*l1) != body.len() || body.len() <= 3 || checksum(body) != *cs {
        return None;
    }
    let [_, address, ..] = body else {
        return None;
    };
    Some((*address, 6, bytes.get(6..bytes.len().wrapping_sub(2))?))
}

/// [`long_frame_application`] through the general link parser.
fn long_frame_general(bytes: &[u8]) -> Result<(u8, usize, &[u8]), MbusError> {
    match parse_link(bytes)? {
        LinkFrame::Long {
            address,
            data_offset,
            ..
        } => {
            let ci_offset = data_offset.saturating_sub(1);
            let app_bytes = bytes.get(ci_offset..).unwrap_or(&[]);
            // The app bytes include CS and stop; cut them off.
            let app_len = app_bytes.len().saturating_sub(2);
            Ok((address, ci_offset, app_bytes.get(..app_len).unwrap_or(&[])))
        }
        LinkFrame::Control { ci, .. } => {
            // A control frame may still carry an application error (CI 70 without code).
            let mut cur = Cursor::new(&[], 6);
            parse_header(ci, 6, &mut cur)?;
            Err(MbusError::NotLongFrame {
                kind: "control frame",
            })
        }
        LinkFrame::Short { .. } => Err(MbusError::NotLongFrame {
            kind: "short frame",
        }),
        LinkFrame::Ack => Err(MbusError::NotLongFrame {
            kind: "single character E5",
        }),
    }
}

/// The meter's identity from the application header; frames without a long header are
/// named by their primary address as three digits.
pub(super) fn meter_info(header: &AppHeader, address: u8) -> MeterInfo {
    match header {
        AppHeader::Long(h) => MeterInfo {
            id: id_text(h.id),
            manufacturer: Some(manufacturer_text(h.manufacturer)),
            version: Some(h.version),
            medium: Some(SmallString::from_static(medium_name(h.medium))),
        },
        AppHeader::Fixed { id, medium, .. } => MeterInfo {
            id: id_text(*id),
            manufacturer: None,
            version: None,
            medium: Some(SmallString::from_static(medium_name(*medium))),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Wherever the in-place check accepts a frame, the general link parser gives the
        /// same address, CI offset and application bytes; and it accepts every well-formed
        /// long frame with data (so this compares something).
        #[test]
        fn in_place_long_frame_equals_the_link_parser(
            address in any::<u8>(),
            data in prop::collection::vec(any::<u8>(), 2..=253),
            edit in prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
            cut in prop::option::of(any::<prop::sample::Index>()),
            extra in prop::collection::vec(any::<u8>(), 0..3),
        ) {
            let frame = encode::long(0x08, address, data[0], &data[1..]);
            let fast = long_frame_in_place(&frame);
            prop_assert_eq!(fast, Some((address, 6, &frame[6..frame.len() - 2])));
            prop_assert_eq!(Ok(fast.unwrap()), long_frame_general(&frame));
            let mut bad = frame.clone();
            if let Some((i, b)) = edit {
                let i = i.index(bad.len());
                bad[i] = b;
            }
            if let Some(i) = cut {
                bad.truncate(i.index(bad.len() + 1));
            }
            bad.extend_from_slice(&extra);
            if let Some(found) = long_frame_in_place(&bad) {
                prop_assert_eq!(Ok(found), long_frame_general(&bad));
            }
            prop_assert_eq!(long_frame_application(&bad), long_frame_general(&bad));
        }
    }
}
