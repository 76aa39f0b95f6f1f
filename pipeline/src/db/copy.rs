//! PostgreSQL binary COPY encoding of readings: the narrow `reading_rows` and their `frames`
//! (migration 0080, see docs/storage.md), and the wide row form of the `readings` view, which
//! [`super::readings::find_refused`] still uses to let PostgreSQL judge values.
//!
//! Binary COPY is the fastest way into PostgreSQL: no SQL parsing per row and no text
//! conversion of numerics and timestamps on the server. The layout is the one documented in
//! the PostgreSQL manual ("COPY — Binary Format"): a 19-byte header, per row a 16-bit field
//! count and per field a 32-bit length plus the type's binary send format, and a -1 trailer.

use model::{ClockSource, Quality, QualityFlag, Reading, SourceKind};
use rust_decimal::Decimal;
use time::OffsetDateTime;

/// Column list of `reading_rows` matching [`CopyBuffer::encode_row`].
pub const ROW_COLUMNS: &str =
    "ts, frame_id, meter_key, series_id, unit_id, storage, quality, flags, value";

/// Column list of `frames` matching [`CopyBuffer::encode_frame`].
pub const FRAME_COLUMNS: &str =
    "frame_id, received_at, spool_seq, source_key, frame_hash, frame_label";

/// One narrow reading row: every column of `reading_rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarrowRow {
    /// Reading time.
    pub ts: OffsetDateTime,
    /// `frames.frame_id` of its provenance.
    pub frame_id: i64,
    /// `meter_keys.meter_key`.
    pub meter_key: i32,
    /// `reading_series.series_id` of (quantity, tariff, subunit).
    pub series_id: i16,
    /// `reading_units.unit_id`.
    pub unit_id: i16,
    /// Storage number.
    pub storage: i16,
    /// [`quality_code`].
    pub quality: i16,
    /// [`flag_bits`].
    pub flags: i16,
    /// Exact value.
    pub value: Decimal,
}

/// Column list of the wide row form matching [`CopyBuffer::encode_reading`].
pub const READING_COLUMNS: &str = "meter_id, ts, quantity, tariff, subunit, storage, value, unit, \
     quality, quality_detail, flags, clock, source, source_id, gateway_id, spool_seq, \
     frame_hash, received_at, channel";

/// Number of columns in [`READING_COLUMNS`].
const FIELD_COUNT: i16 = 19;

/// `PGCOPY\n\377\r\n\0`, flags, header extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// PostgreSQL epoch (2000-01-01) in Unix seconds.
const PG_EPOCH_UNIX: i64 = 946_684_800;

/// OID of `text`, the element type of `flags`.
const TEXT_OID: i32 = 25;

/// A buffer of binary COPY data.
#[derive(Debug)]
pub struct CopyBuffer {
    buf: Vec<u8>,
    rows: u64,
}

impl Default for CopyBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyBuffer {
    /// Starts a buffer with the binary COPY header.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(1 << 16);
        buf.extend_from_slice(HEADER);
        Self { buf, rows: 0 }
    }

    /// Rows encoded so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends the trailer and returns the bytes to send.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }

    fn field(&mut self, bytes: &[u8]) {
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn text(&mut self, s: &str) {
        self.field(s.as_bytes());
    }

    fn i16(&mut self, v: i16) {
        self.field(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.field(&v.to_be_bytes());
    }

    fn timestamptz(&mut self, ts: OffsetDateTime) {
        self.field(&pg_micros(ts).to_be_bytes());
    }

    fn numeric(&mut self, d: Decimal) {
        // Straight into the buffer: this runs once per reading on the ingest path.
        let at = self.buf.len();
        self.buf.extend_from_slice(&0i32.to_be_bytes());
        let len = numeric_into(&mut self.buf, d);
        let len = i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes();
        if let Some(prefix) = self.buf.get_mut(at..at + 4) {
            prefix.copy_from_slice(&len);
        }
    }

    fn text_array(&mut self, items: &[&str]) {
        let mut b = Vec::with_capacity(20 + items.len() * 16);
        if items.is_empty() {
            b.extend_from_slice(&0i32.to_be_bytes());
            b.extend_from_slice(&0i32.to_be_bytes());
            b.extend_from_slice(&TEXT_OID.to_be_bytes());
        } else {
            b.extend_from_slice(&1i32.to_be_bytes());
            b.extend_from_slice(&0i32.to_be_bytes());
            b.extend_from_slice(&TEXT_OID.to_be_bytes());
            let n = i32::try_from(items.len()).unwrap_or(i32::MAX);
            b.extend_from_slice(&n.to_be_bytes());
            b.extend_from_slice(&1i32.to_be_bytes());
            for item in items {
                let len = i32::try_from(item.len()).unwrap_or(i32::MAX);
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(item.as_bytes());
            }
        }
        self.field(&b);
    }

    fn jsonb(&mut self, json: &str) {
        let mut b = Vec::with_capacity(json.len() + 1);
        b.push(1); // jsonb binary format version
        b.extend_from_slice(json.as_bytes());
        self.field(&b);
    }

    /// Appends one row of [`ROW_COLUMNS`].
    pub fn encode_row(&mut self, r: &NarrowRow) {
        self.buf.extend_from_slice(&9i16.to_be_bytes());
        self.timestamptz(r.ts);
        self.field(&r.frame_id.to_be_bytes());
        self.i32(r.meter_key);
        self.i16(r.series_id);
        self.i16(r.unit_id);
        self.i16(r.storage);
        self.i16(r.quality);
        self.i16(r.flags);
        self.numeric(r.value);
        self.rows += 1;
    }

    /// Appends one frame as a row of [`FRAME_COLUMNS`]: a 64-hex-digit hash as its 32 bytes,
    /// any other hash text verbatim in `frame_label`.
    pub fn encode_frame(
        &mut self,
        frame_id: i64,
        received_at: OffsetDateTime,
        spool_seq: Option<i64>,
        source_key: i32,
        frame_hash: &str,
    ) {
        self.buf.extend_from_slice(&6i16.to_be_bytes());
        self.field(&frame_id.to_be_bytes());
        self.timestamptz(received_at);
        match spool_seq {
            Some(seq) => self.field(&seq.to_be_bytes()),
            None => self.null(),
        }
        self.i32(source_key);
        match hash_bytes(frame_hash) {
            Some(bytes) => {
                self.field(&bytes);
                self.null();
            }
            None => {
                self.null();
                self.text(frame_hash);
            }
        }
        self.rows += 1;
    }

    /// Appends one reading as a row of [`READING_COLUMNS`]. Tariff and subunit above
    /// `i16::MAX` and storage above `i32::MAX` are clamped (the decoders never produce them).
    pub fn encode_reading(&mut self, r: &Reading, spool_seq: Option<i64>) {
        self.buf.extend_from_slice(&FIELD_COUNT.to_be_bytes());
        self.text(r.meter.as_str());
        self.timestamptz(r.ts);
        self.text(r.quantity.as_str());
        self.i16(i16::try_from(r.tariff).unwrap_or(i16::MAX));
        self.i16(i16::try_from(r.subunit).unwrap_or(i16::MAX));
        self.i32(i32::try_from(r.storage).unwrap_or(i32::MAX));
        self.numeric(r.value);
        self.text(r.unit.symbol());
        self.text(r.quality.status());
        match quality_detail(&r.quality) {
            Some(json) => self.jsonb(&json),
            None => self.null(),
        }
        let flags: Vec<&str> = r.flags.iter().map(|f| flag_name(*f)).collect();
        self.text_array(&flags);
        self.text(clock_name(r.clock));
        self.text(source_name(r.provenance.source));
        self.text(&r.provenance.source_id);
        self.text(r.provenance.gateway.as_str());
        match spool_seq {
            Some(seq) => self.field(&seq.to_be_bytes()),
            None => self.null(),
        }
        self.text(&r.provenance.frame_hash);
        self.timestamptz(r.provenance.received_at);
        match &r.provenance.channel {
            Some(channel) => self.text(channel),
            None => self.null(),
        }
        self.rows += 1;
    }
}

/// Microseconds since the PostgreSQL epoch.
pub fn pg_micros(ts: OffsetDateTime) -> i64 {
    let secs = ts.unix_timestamp() - PG_EPOCH_UNIX;
    secs * 1_000_000 + i64::from(ts.microsecond())
}

/// Returns the `quality_detail` JSON of a quality that carries more than its status.
pub fn quality_detail(q: &Quality) -> Option<String> {
    match q {
        Quality::Estimated { .. } | Quality::Edited { .. } | Quality::Rejected { .. } => {
            serde_json::to_string(q).ok()
        }
        _ => None,
    }
}

/// The 32 bytes of a frame hash written as 64 lowercase hex digits (what `encode(.., 'hex')`
/// gives back); `None` for any other text, which is then stored verbatim.
pub fn hash_bytes(hash: &str) -> Option<[u8; 32]> {
    let b = hash.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let (hi, lo) = (nibble(pair[0])?, nibble(pair[1])?);
        if let Some(o) = out.get_mut(i) {
            *o = hi << 4 | lo;
        }
    }
    Some(out)
}

/// `reading_rows.quality` of a quality (`wm_quality_code` in migration 0080).
pub fn quality_code(q: &Quality) -> i16 {
    match q {
        Quality::Actual => 0,
        Quality::Validated => 1,
        Quality::Estimated { .. } => 2,
        Quality::Edited { .. } => 3,
        Quality::Missing => 4,
        Quality::Rejected { .. } => 5,
    }
}

/// Bit of a flag in `reading_rows.flags` (`wm_flag_names` in migration 0080).
pub fn flag_bit(f: QualityFlag) -> i16 {
    let i = match f {
        QualityFlag::ClockSkew => 0,
        QualityFlag::OutOfOrder => 1,
        QualityFlag::Rollover => 2,
        QualityFlag::ReverseFlow => 3,
        QualityFlag::MeterReplaced => 4,
        QualityFlag::Spike => 5,
        QualityFlag::ZeroConsumption => 6,
        QualityFlag::UnitConverted => 7,
        QualityFlag::Superseded => 8,
    };
    1 << i
}

/// `reading_rows.flags` of a flag list.
pub fn flag_bits(flags: &[QualityFlag]) -> i16 {
    flags.iter().fold(0, |acc, f| acc | flag_bit(*f))
}

/// Returns the snake_case name of a flag (its JSON form).
pub fn flag_name(f: QualityFlag) -> &'static str {
    match f {
        QualityFlag::ClockSkew => "clock_skew",
        QualityFlag::OutOfOrder => "out_of_order",
        QualityFlag::Rollover => "rollover",
        QualityFlag::ReverseFlow => "reverse_flow",
        QualityFlag::MeterReplaced => "meter_replaced",
        QualityFlag::Spike => "spike",
        QualityFlag::ZeroConsumption => "zero_consumption",
        QualityFlag::UnitConverted => "unit_converted",
        QualityFlag::Superseded => "superseded",
    }
}

/// Returns the snake_case name of a clock source.
pub fn clock_name(c: ClockSource) -> &'static str {
    match c {
        ClockSource::Meter => "meter",
        ClockSource::Gateway => "gateway",
        ClockSource::Platform => "platform",
        ClockSource::Manual => "manual",
        ClockSource::Pipeline => "pipeline",
    }
}

/// Returns the snake_case name of a source kind.
pub fn source_name(s: SourceKind) -> &'static str {
    match s {
        SourceKind::Mqtt => "mqtt",
        SourceKind::ModbusTcp => "modbus_tcp",
        SourceKind::ModbusRtu => "modbus_rtu",
        SourceKind::MbusSerial => "mbus_serial",
        SourceKind::Wmbus => "wmbus",
        SourceKind::Coap => "coap",
        SourceKind::HttpPush => "http_push",
        SourceKind::Api => "api",
        SourceKind::Pipeline => "pipeline",
    }
}

/// Encodes a decimal in PostgreSQL's binary `numeric` form: digit count, weight (in base-10000
/// digits), sign, display scale, then base-10000 digits.
pub fn numeric_bytes(d: Decimal) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 2 * NUMERIC_GROUPS);
    numeric_into(&mut out, d);
    out
}

/// Most base-10000 digits of a `Decimal`: a 96-bit mantissa (< 7.93e28) scaled by at most
/// 10^3 to align the point to a digit has at most 32 decimal digits.
const NUMERIC_GROUPS: usize = 8;

/// Appends the binary `numeric` form of `d` to `out` (see [`numeric_bytes`]) without
/// allocating; returns the bytes appended.
fn numeric_into(out: &mut Vec<u8>, d: Decimal) -> usize {
    let scale = d.scale();
    let negative = d.is_sign_negative() && !d.is_zero();
    // Scale the mantissa so the decimal point falls between two base-10000 digits:
    // value = m · 10^-scale = (m · 10^pad) · 10000^-(scale + pad) / 4.
    let pad = (4 - scale % 4) % 4;
    let mut m = d.mantissa().unsigned_abs() * 10u128.pow(pad);
    let frac_groups = i16::try_from((scale + pad) / 4).unwrap_or(0);
    // Base-10000 digits, least significant first.
    let mut groups = [0i16; NUMERIC_GROUPS + 2];
    let mut n = 0usize;
    while m > 0 {
        if let Some(g) = groups.get_mut(n) {
            *g = i16::try_from(m % 10_000).unwrap_or(0);
        }
        m /= 10_000;
        n += 1;
    }
    let n = n.min(groups.len());
    // The weight is that of the most significant digit (there are no leading zero digits);
    // trailing zero digits are dropped, which leaves the weight as it is.
    let weight = if n == 0 {
        0
    } else {
        i16::try_from(n).unwrap_or(i16::MAX) - 1 - frac_groups
    };
    let digits = groups.get(..n).unwrap_or(&[]);
    let zeros = digits.iter().take_while(|g| **g == 0).count();
    let digits = digits.get(zeros..).unwrap_or(&[]);
    let start = out.len();
    out.extend_from_slice(&i16::try_from(digits.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&u16::try_from(scale).unwrap_or(0).to_be_bytes());
    for g in digits.iter().rev() {
        out.extend_from_slice(&g.to_be_bytes());
    }
    out.len() - start
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn digits(b: &[u8]) -> (i16, i16, u16, u16, Vec<i16>) {
        let h = |i: usize| [b[i], b[i + 1]];
        let n = i16::from_be_bytes(h(0));
        let ds = (0..n as usize)
            .map(|k| i16::from_be_bytes(h(8 + 2 * k)))
            .collect();
        (
            n,
            i16::from_be_bytes(h(2)),
            u16::from_be_bytes(h(4)),
            u16::from_be_bytes(h(6)),
            ds,
        )
    }

    #[test]
    fn numeric_binary_form() {
        // 556677.01 = 55 6677 . 0100 -> weight 1, digits [55, 6677, 100], dscale 2
        assert_eq!(
            digits(&numeric_bytes(dec!(556677.01))),
            (3, 1, 0, 2, vec![55, 6677, 100])
        );
        // 0.000123 -> weight -2, digits [123*... ] = 0.0001 23 -> [1, 2300]
        assert_eq!(
            digits(&numeric_bytes(dec!(0.000123))),
            (2, -1, 0, 6, vec![1, 2300])
        );
        assert_eq!(
            digits(&numeric_bytes(dec!(-12.5))),
            (2, 0, 0x4000, 1, vec![12, 5000])
        );
        assert_eq!(digits(&numeric_bytes(dec!(0.000))), (0, 0, 0, 3, vec![]));
        assert_eq!(digits(&numeric_bytes(dec!(10000))), (1, 1, 0, 0, vec![1]));
        assert_eq!(digits(&numeric_bytes(dec!(0.5))), (1, -1, 0, 1, vec![5000]));
        assert_eq!(
            digits(&numeric_bytes(dec!(1001.000000))),
            (1, 0, 0, 6, vec![1001])
        );
        assert_eq!(
            digits(&numeric_bytes(dec!(99999999999999.999999))),
            (6, 3, 0, 6, vec![99, 9999, 9999, 9999, 9999, 9900])
        );
        // The largest mantissa a Decimal holds, at the scale that needs the most padding.
        assert_eq!(
            digits(&numeric_bytes(Decimal::from_i128_with_scale(
                79_228_162_514_264_337_593_543_950_335,
                1
            ))),
            (
                8,
                6,
                0,
                1,
                vec![7922, 8162, 5142, 6433, 7593, 5439, 5033, 5000]
            )
        );
    }

    #[test]
    fn numeric_in_a_row_matches_numeric_bytes() {
        for d in [dec!(0), dec!(-0.000001), dec!(123.456), dec!(1000), dec!(5)] {
            let mut b = CopyBuffer::new();
            b.numeric(d);
            let bytes = b.finish();
            let body = &bytes[HEADER.len()..bytes.len() - 2];
            let len = i32::from_be_bytes(body[..4].try_into().unwrap());
            assert_eq!(&body[4..], numeric_bytes(d).as_slice(), "{d}");
            assert_eq!(len as usize, body.len() - 4);
        }
    }

    #[test]
    fn frame_hashes_are_bytes_only_when_lowercase_hex() {
        let h = "ab".repeat(32);
        assert_eq!(hash_bytes(&h), Some([0xab; 32]));
        assert_eq!(hash_bytes(&"AB".repeat(32)), None);
        assert_eq!(hash_bytes("ab"), None);
        assert_eq!(hash_bytes(""), None);
    }

    #[test]
    fn flag_bits_follow_the_sql_order() {
        // wm_flag_names() in migration 0080 lists the flags in this order.
        let sql = [
            "clock_skew",
            "out_of_order",
            "rollover",
            "reverse_flow",
            "meter_replaced",
            "spike",
            "zero_consumption",
            "unit_converted",
            "superseded",
        ];
        for (i, name) in sql.iter().enumerate() {
            let flag: QualityFlag =
                serde_json::from_value(serde_json::json!(name)).expect("flag name");
            assert_eq!(flag_bit(flag), 1 << i, "{name}");
            assert_eq!(flag_name(flag), *name);
        }
        assert_eq!(
            flag_bits(&[QualityFlag::Rollover, QualityFlag::Superseded]),
            4 | 256
        );
    }

    #[test]
    fn timestamps_count_from_2000() {
        assert_eq!(
            pg_micros(time::macros::datetime!(2000-01-01 00:00:01.5 UTC)),
            1_500_000
        );
    }
}
