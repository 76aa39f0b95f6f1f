//! CRC-less wM-Bus telegrams must never be mistaken for CRC-carrying frames (format A/B), even
//! when their bytes happen to form a valid block CRC (gateway report: 2 of 50 000 telegrams
//! were refused or cut short because their last two bytes looked like a format-B CRC).

use decoders::wmbus::encode::{WmbusMeter, telegram};
use decoders::wmbus::{FormatCache, FrameFormat, decode, parse};
use decoders::{Record, mbus};

/// CRC-16/EN-13757 (poly 0x3D65, init 0, xor-out 0xFFFF), bitwise: an independent check of the
/// crate's table version.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x3D65
            } else {
                crc << 1
            };
        }
    }
    !crc
}

/// Small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

/// Header bytes before the records in `encode::telegram` output (L C M A CI ACC ST CW).
const HEADER: usize = 15;

/// A random meter and payload of 1-38 `04 13` (volume, 32-bit) records: every record has data
/// bytes, so a reading cut two bytes short always ends in a truncated record.
fn random_telegram(rng: &mut Rng) -> (WmbusMeter, Vec<u8>) {
    let meter = WmbusMeter {
        manufacturer: 0x2C2D,
        id: u32::try_from(rng.next() >> 32).unwrap(),
        version: rng.byte(),
        device_type: 0x07,
    };
    let n = 1 + rng.below(38);
    let mut payload = Vec::new();
    for _ in 0..n {
        payload.extend_from_slice(&[0x04, 0x13]);
        for _ in 0..4 {
            payload.push(rng.byte());
        }
    }
    (meter, payload)
}

/// The records `payload` must decode to.
fn expected(payload: &[u8]) -> Vec<Record> {
    mbus::records(payload)
        .map(|r| r.unwrap().to_record())
        .collect()
}

fn check(meter: &WmbusMeter, raw: &[u8]) {
    let payload = &raw[HEADER..];
    let mut cache = FormatCache::new();
    let t = parse(raw, &None, &mut cache).unwrap_or_else(|e| panic!("{}: {e}", hex(raw)));
    assert_eq!(t.format, FrameFormat::Stripped, "{}", hex(raw));
    assert_eq!(t.payload, payload, "{}", hex(raw));
    let frame = decode(raw, &None, &mut cache).unwrap();
    assert_eq!(frame.meter.id, format!("{:08x}", meter.id));
    assert_eq!(frame.records, expected(payload), "{}", hex(raw));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Makes the last two bytes the format-B CRC of the rest: the CRC-less telegram now also reads
/// as a valid short format-B frame.
fn force_single_b_crc(raw: &mut [u8]) {
    let n = raw.len();
    let crc = crc16(&raw[..n - 2]).to_be_bytes();
    raw[n - 2..].copy_from_slice(&crc);
}

#[test]
fn random_crc_less_telegrams_all_decode() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut collisions = 0;
    for _ in 0..50_000 {
        let (meter, payload) = random_telegram(&mut rng);
        let raw = telegram(&meter, &payload, rng.byte(), None);
        let n = raw.len();
        if n <= 128 && crc16(&raw[..n - 2]).to_be_bytes() == raw[n - 2..] {
            collisions += 1;
        }
        check(&meter, &raw);
    }
    // Not asserted: how many of these happened to carry a valid-looking CRC (about 0.5).
    println!("chance format-B CRC collisions: {collisions}");
}

#[test]
fn crc_less_telegram_ending_in_a_valid_format_b_crc_is_not_cut() {
    let mut rng = Rng(7);
    for _ in 0..2_000 {
        let (meter, mut payload) = random_telegram(&mut rng);
        // Short enough for a single format-B CRC (wire length <= 128).
        payload.truncate(6 * 18);
        let mut raw = telegram(&meter, &payload, 1, None);
        force_single_b_crc(&mut raw);
        check(&meter, &raw);
    }
}

#[test]
fn crc_less_telegram_with_a_valid_first_format_b_crc_is_not_refused() {
    // Over 128 bytes, format B has a CRC after byte 126 and one at the end; a CRC-less
    // telegram whose bytes 126-127 match the first (data bytes of record 18) used to be
    // refused as `BadCrc`.
    let mut rng = Rng(11);
    for _ in 0..500 {
        let meter = WmbusMeter {
            manufacturer: 0x2C2D,
            id: 0x1234_5678,
            version: 1,
            device_type: 7,
        };
        let mut payload = Vec::new();
        for _ in 0..25 {
            payload.extend_from_slice(&[0x04, 0x13]);
            for _ in 0..4 {
                payload.push(rng.byte());
            }
        }
        let mut raw = telegram(&meter, &payload, 1, None);
        assert!(raw.len() > 128);
        let crc = crc16(&raw[..126]).to_be_bytes();
        raw[126..128].copy_from_slice(&crc);
        check(&meter, &raw);
    }
}

#[test]
fn real_format_b_frame_still_decodes_as_format_b() {
    // The same telegram with its format-B CRC appended (L counts it): read as format B.
    let meter = WmbusMeter {
        manufacturer: 0x2C2D,
        id: 0x1234_5678,
        version: 1,
        device_type: 7,
    };
    let payload = [0x04, 0x13, 0x10, 0x27, 0x00, 0x00];
    let mut raw = telegram(&meter, &payload, 1, None);
    raw[0] += 2;
    let crc = crc16(&raw).to_be_bytes();
    raw.extend_from_slice(&crc);
    let mut cache = FormatCache::new();
    let t = parse(&raw, &None, &mut cache).unwrap();
    assert_eq!(t.format, FrameFormat::B);
    assert_eq!(t.payload, payload);
    let frame = decode(&raw, &None, &mut cache).unwrap();
    assert_eq!(frame.records, expected(&payload));
}
