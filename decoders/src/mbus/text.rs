//! Text of decoded values written without the formatting machinery: ISO dates, hex, ids, into a `SmallString`'s inline buffer.

use super::*;

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
    // Written as a `String` of ASCII chars: building bytes and validating them with
    // `String::from_utf8` afterwards read the whole text a second time.
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        for nibble in [b >> 4, b & 0x0F] {
            out.push(char::from(
                HEX_LOWER.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    SmallString::from(out)
}

/// The 8 upper-case hex digits of a BCD-coded identification (`{:08X}`).
pub(super) fn id_text(id: u32) -> SmallString {
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

/// Two decimal digits of a value below 100 (a table entry: a division and a remainder by 10
/// per field were a third of `iso_date`'s instructions).
pub(super) fn digits2(v: u8) -> [u8; 2] {
    TWO_DIGITS
        .get(usize::from(v))
        .copied()
        .unwrap_or([b'0', b'0'])
}

/// `"00"` to `"99"`.
static TWO_DIGITS: [[u8; 2]; 100] = {
    let mut table = [[0u8; 2]; 100];
    let mut i = 0u8;
    while i < 100 {
        // Bounded by the loop condition (and evaluated at build time); `[]` because
        // `get_mut` is not const.
        #[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
        {
            table[i as usize] = [b'0' + i / 10, b'0' + i % 10];
            i += 1;
        }
    }
    table
};

/// [`iso_date`] through `format!`, for the years it does not write itself.
pub(super) fn iso_date_formatted(
    y: i32,
    m: u8,
    d: u8,
    time: Option<(u8, u8, Option<u8>)>,
) -> SmallString {
    let date = format!("{y:04}-{m:02}-{d:02}");
    SmallString::from(match time {
        None => date,
        Some((h, mi, None)) => format!("{date}T{h:02}:{mi:02}"),
        Some((h, mi, Some(s))) => format!("{date}T{h:02}:{mi:02}:{s:02}"),
    })
}

/// ASCII text built byte by byte: on the stack while it fits a [`SmallString`]'s inline
/// bytes, in a `Vec` (sized once) beyond.
pub(super) struct AsciiWriter {
    buf: [u8; 22],
    len: usize,
    spill: Vec<u8>,
    expected: usize,
}

impl AsciiWriter {
    pub(super) fn new(expected: usize) -> Self {
        Self {
            buf: [0; 22],
            len: 0,
            spill: Vec::new(),
            expected,
        }
    }

    #[inline(always)]
    pub(super) fn push(&mut self, b: u8) {
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
    pub(super) fn two(&mut self, value: u8) {
        if value >= 100 {
            self.push(b'0'.wrapping_add(value.wrapping_div(100)));
        }
        let value = value.wrapping_rem(100);
        self.push(b'0'.wrapping_add(value.wrapping_div(10)));
        self.push(b'0'.wrapping_add(value.wrapping_rem(10)));
    }

    /// `HH:MM[:SS]`.
    pub(super) fn time(&mut self, h: u8, mi: u8, s: Option<u8>) {
        self.two(h);
        self.push(b':');
        self.two(mi);
        if let Some(s) = s {
            self.push(b':');
            self.two(s);
        }
    }

    /// Two lowercase hex digits.
    pub(super) fn hex(&mut self, b: u8) {
        for nibble in [b >> 4, b & 0x0F] {
            self.push(HEX_LOWER.get(usize::from(nibble)).copied().unwrap_or(b'0'));
        }
    }

    pub(super) fn finish(self) -> SmallString {
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
