//! EN 13757-2 link layer: single character, short, control and long frames.

use super::*;

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
