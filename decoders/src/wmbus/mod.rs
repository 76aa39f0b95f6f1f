//! Decoder for wireless M-Bus / OMS telegrams (EN 13757-4, OMS Vol.2).
//!
//! Layers handled, outermost first:
//! - data link layer: frame format A or B with the block CRCs present (verified and removed) or
//!   already stripped by the receiver (the usual `L C M A CI ...` hex log), trailing RSSI ignored;
//! - extended link layer ELL I–IV (CI 8C–8F), including AES-128-CTR session encryption, whose
//!   payload CRC tells a right key from a wrong one;
//! - authentication and fragmentation layer AFL (CI 90): message counter and CMAC, fragments
//!   reassembled per sender in the [`FormatCache`];
//! - transport layer: no header (CI 78, compact 79), short (7A) or long (72) header, with
//!   security mode 0, 5 (AES-128-CBC, IV = M‖A‖ACC×8), 7 (AES-128-CBC, IV 0, keys derived per
//!   message by AES-CMAC) or 10 (AES-CCM under the mode-7 derived key); a mode 5/7 plaintext
//!   must start with the `2F2F` check bytes, a mode-10 one must match its CCM tag.
//!
//! Telegrams replayed already decrypted (`2F2F` first, or a matching ELL payload CRC) decode
//! without a key. A missing or wrong key is a typed [`WmbusError`], never garbage values. Keys
//! come from a [`KeyLookup`] and are never logged or printed. A [`FormatCache`] remembers the
//! record formats of full frames (for compact frames) and the expanded AES key per meter.
//!
//! ```
//! use decoders::wmbus::{self, FormatCache};
//! // A CRC-stripped T1 telegram, unencrypted, CI 7A.
//! let frame = hex::decode("1b442d2c7856341201 07 7a 01 00 0000 2f2f 0413 39300000 02fd170000".replace(' ', "")).unwrap();
//! let mut cache = FormatCache::default();
//! let telegram = wmbus::parse(&frame, &None, &mut cache).unwrap();
//! assert_eq!(telegram.meter.meter_id(), "mbus:KAM12345678");
//! ```

mod apator;
mod compact;
mod crc;
mod crypto;
mod diehl;
pub mod downgrade;
pub mod encode;
mod error;
mod hold;
mod layers;
mod link;
mod reader;
mod techem;

use std::collections::HashMap;
use std::fmt;

use aes::Aes128;
use serde::Serialize;

use crate::frame::{DecodedFrame, MeterInfo, Protocol, Record};
use crate::small_string::SmallString;
pub use error::WmbusError;
pub use hold::{CompactHold, Held};
pub use link::{Address, FrameFormat, manufacturer_code, manufacturer_from_code};

/// Supplies the AES key of a meter. Implementations must not log the key.
pub trait KeyLookup {
    /// Returns the 128-bit key for the meter (manufacturer code, id as the little-endian wire
    /// field, e.g. `0x12345678` for meter `12345678`), if one is configured.
    fn key_for(&self, manufacturer: u16, id: u32) -> Option<[u8; 16]>;
}

/// A single key used for every meter (or none).
impl KeyLookup for Option<[u8; 16]> {
    fn key_for(&self, _manufacturer: u16, _id: u32) -> Option<[u8; 16]> {
        *self
    }
}

/// Keys per meter id `mbus:<MAN><8 digits>` (e.g. `mbus:KAM12345678`).
impl KeyLookup for HashMap<String, [u8; 16]> {
    fn key_for(&self, manufacturer: u16, id: u32) -> Option<[u8; 16]> {
        // `mbus:` + 3 letters + 8 hex digits is exactly 16 bytes: build it on the stack, as
        // this runs for every telegram.
        let mut buf = *b"mbus:MMMdddddddd";
        let letters = [
            (manufacturer >> 10) & 0x1F,
            (manufacturer >> 5) & 0x1F,
            manufacturer & 0x1F,
        ];
        for (slot, l) in buf.iter_mut().skip(5).zip(letters) {
            *slot = u8::try_from(l).unwrap_or(0).saturating_add(64);
        }
        for (slot, shift) in buf.iter_mut().skip(8).zip((0..8u32).rev()) {
            let nibble = u8::try_from((id >> shift.saturating_mul(4)) & 0x0F).unwrap_or(0);
            *slot = char::from_digit(u32::from(nibble), 16).map_or(b'0', |c| c as u8);
        }
        self.get(std::str::from_utf8(&buf).ok()?).copied()
    }
}

/// Upper bound on cached entries per map, so a flood of fake meters cannot grow memory forever.
const MAX_CACHE_ENTRIES: usize = 100_000;

/// Per-meter decoder state: record formats seen in full frames (for compact frames, CI 79) and
/// the expanded AES key of each meter (so a telegram costs no key schedule).
///
/// A compact frame is expanded with the format its own meter sent in a full frame; failing
/// that, with a format a meter of the same model (manufacturer, version, device type) sent
/// under the same signature. Either way the rebuilt records must match the compact frame's
/// full-frame CRC, so a borrowed format cannot produce wrong values.
#[derive(Default)]
pub struct FormatCache {
    formats: HashMap<(u16, u32, u16), Vec<u8>, foldhash::fast::RandomState>,
    models: HashMap<(u16, u8, u8, u16), Vec<u8>, foldhash::fast::RandomState>,
    ciphers: HashMap<(u16, u32), ([u8; 16], Aes128), foldhash::fast::RandomState>,
    /// AFL fragments received so far, per sender (DLL manufacturer and id).
    fragments: HashMap<(u16, u32), PartialMessage, foldhash::fast::RandomState>,
}

/// The fragments of one AFL message received so far (EN 13757-7 §6: fragment ids 1, 2, ...,
/// "more fragments" on all but the last; the first fragment carries the message control,
/// key information, counter and total length, the transport layer starts in it).
#[derive(Debug, Default)]
struct PartialMessage {
    /// Fragment id expected next.
    next: u8,
    mcl: Option<u8>,
    key_info: Option<u16>,
    mcr: Option<[u8; 4]>,
    message_length: Option<u16>,
    /// The message bytes so far (from the TPL CI on).
    bytes: Vec<u8>,
}

impl fmt::Debug for FormatCache {
    // Hand-written so that key material can never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FormatCache")
            .field("formats", &self.formats.len())
            .field("ciphers", &self.ciphers.len())
            .field("fragments", &self.fragments.len())
            .finish()
    }
}

impl FormatCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached record formats.
    pub fn format_count(&self) -> usize {
        self.formats.len()
    }

    /// Number of distinct model formats (manufacturer, version, device type, signature) cached:
    /// when it grows, a full frame taught a format other meters of that model may borrow, so
    /// a caller holding compact frames (see [`CompactHold`]) retries all of them.
    pub fn model_count(&self) -> usize {
        self.models.len()
    }

    /// Remembers the format of a full frame's records.
    fn learn(&mut self, meter: Address, records: &[u8]) {
        // Signature first (no allocation): most full frames repeat a known format.
        let Some(sig) = compact::signature_of(records) else {
            return;
        };
        let k = (meter.manufacturer, meter.id, sig);
        if self.formats.contains_key(&k) {
            return;
        }
        if let Some((_, format)) = compact::format_of(records) {
            if self.formats.len() >= MAX_CACHE_ENTRIES {
                self.formats.clear();
            }
            if self.models.len() >= MAX_CACHE_ENTRIES {
                self.models.clear();
            }
            let model = (meter.manufacturer, meter.version, meter.device_type, sig);
            self.models.entry(model).or_insert_with(|| format.clone());
            self.formats.insert(k, format);
        }
    }

    fn format(&self, meter: Address, sig: u16) -> Option<&[u8]> {
        self.formats
            .get(&(meter.manufacturer, meter.id, sig))
            .or_else(|| {
                self.models
                    .get(&(meter.manufacturer, meter.version, meter.device_type, sig))
            })
            .map(Vec::as_slice)
    }

    /// The expanded key for `meter`, expanding (and caching) it when new or changed.
    fn cipher(&mut self, meter: Address, key: [u8; 16]) -> &Aes128 {
        let k = (meter.manufacturer, meter.id);
        if self.ciphers.len() >= MAX_CACHE_ENTRIES && !self.ciphers.contains_key(&k) {
            self.ciphers.clear();
        }
        let entry = self
            .ciphers
            .entry(k)
            .or_insert_with(|| (key, crypto::cipher(&key)));
        if entry.0 != key {
            *entry = (key, crypto::cipher(&key));
        }
        &entry.1
    }
}

/// Extended link layer (CI 8C–8F).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ell {
    /// CI (8C ELL-I, 8D ELL-II, 8E ELL-III, 8F ELL-IV).
    pub ci: u8,
    /// Communication control.
    pub cc: u8,
    /// Access number.
    pub access_number: u8,
    /// Session number (ELL-II/IV).
    pub session_number: Option<u32>,
    /// Meter address (ELL-III/IV: the DLL address is then the radio adapter's).
    pub meter: Option<Address>,
    /// Whether the ELL payload was AES-CTR encrypted on the air.
    pub encrypted: bool,
}

/// Authentication and fragmentation layer (CI 90).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Afl {
    /// Fragmentation control.
    pub fcl: u16,
    /// Message control.
    pub mcl: Option<u8>,
    /// Key information.
    pub key_info: Option<u16>,
    /// Message counter (wire bytes).
    pub mcr: Option<[u8; 4]>,
    /// Message authentication code (truncated CMAC), as hex.
    pub mac: Option<String>,
    /// Message length.
    pub message_length: Option<u16>,
}

/// Transport layer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tpl {
    /// CI field.
    pub ci: u8,
    /// Access number (short and long headers).
    pub access_number: Option<u8>,
    /// Status byte (short and long headers).
    pub status: Option<u8>,
    /// Configuration word (short and long headers).
    pub config_word: Option<u16>,
    /// Long-header meter address (CI 72).
    pub address: Option<Address>,
}

impl Tpl {
    /// Security mode (configuration word bits 12..8); 0 without a header.
    pub fn security_mode(&self) -> u8 {
        self.config_word
            .map_or(0, |cw| u8::try_from((cw >> 8) & 0x1F).unwrap_or(0))
    }

    /// Number of encrypted 16-byte blocks (configuration word bits 7..4).
    fn encrypted_blocks(&self) -> usize {
        self.config_word
            .map_or(0, |cw| usize::from((cw >> 4) & 0x0F))
    }
}

/// How the application data was protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// Sent in clear.
    None,
    /// Decrypted here with the configured key.
    Decrypted,
    /// Marked encrypted but received already decrypted (replayed log).
    AlreadyDecrypted,
}

/// What the application data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadKind {
    /// EN 13757-3 data records.
    Records,
    /// Compact frame (CI 79): expanded to data records through the [`FormatCache`].
    Compact,
    /// Manufacturer-specific payload (CI A0–B7) not decoded here.
    ManufacturerSpecific,
    /// Diehl PRIOS (Izar) payload, descrambled with the published default keys: the 4 clear
    /// header bytes after the CI, then the descrambled bytes (check byte 0x4B first).
    DiehlPrios,
}

/// A telegram with every layer parsed and the application data decrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Telegram {
    /// Frame format on the wire.
    pub format: FrameFormat,
    /// C field.
    pub c_field: u8,
    /// DLL address (the sender; a radio adapter for ELL-III/IV or CI 72 converters).
    pub dll: Address,
    /// Extended link layer, if present.
    pub ell: Option<Ell>,
    /// Authentication and fragmentation layer, if present.
    pub afl: Option<Afl>,
    /// Transport layer.
    pub tpl: Tpl,
    /// The meter the data belongs to (long TPL header, else ELL-III/IV, else DLL).
    pub meter: Address,
    /// How the application data was protected.
    pub protection: Protection,
    /// What the application data is.
    pub kind: PayloadKind,
    /// Application data after the TPL header, decrypted; for compact frames the expanded records.
    pub payload: Vec<u8>,
    /// Byte offset of the application data in the CRC-free telegram.
    pub payload_offset: usize,
}

/// ELL-II/IV session-number bits 31..29: encryption method (1 = AES-128-CTR).
const ELL_ENC_AES_CTR: u32 = 1;
/// Pseudo security mode used in errors for ELL AES-CTR.
const ELL_MODE: u8 = 128;

/// Parses all layers of a telegram and decrypts its application data.
///
/// # Errors
/// Truncation, bad CRCs, unsupported CI or security modes, missing or wrong keys, unknown
/// compact formats and fragmented messages are reported as [`WmbusError`].
pub fn parse(
    raw: &[u8],
    keys: &dyn KeyLookup,
    cache: &mut FormatCache,
) -> Result<Telegram, WmbusError> {
    let link::Readings { frames, crc_error } = link::readings(raw)?;
    // Several readings only when a single format-B CRC verified: a CRC-less telegram whose
    // last two bytes match it by chance (one in 65 536) would lose them. Keep the first reading
    // whose records decode cleanly, else the first that parses at all.
    let mut parsed = None;
    let mut first_error = None;
    for (frame, format) in &frames {
        match layers::parse_layers(raw, frame, *format, keys, cache) {
            Ok(t) if frames.len() == 1 || records_are_clean(&t) => return Ok(t),
            Ok(t) => {
                parsed.get_or_insert(t);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(t) = parsed {
        return Ok(t);
    }
    Err(match (crc_error, first_error) {
        (Some(crc), _) => crc,
        (None, Some(e)) => e,
        (None, None) => WmbusError::LengthMismatch {
            declared: raw.first().map_or(0, |&l| usize::from(l)),
            available: raw.len().saturating_sub(1),
        },
    })
}

/// True unless the telegram carries data records of which one fails to decode (a reading cut
/// two bytes short ends in a truncated record).
fn records_are_clean(t: &Telegram) -> bool {
    match t.kind {
        PayloadKind::Records => crate::mbus::records(&t.payload).all(|r| r.is_ok()),
        _ => true,
    }
}

/// True when `payload` is a non-empty run of data records that all decode (no tail).
fn reads_cleanly(payload: &[u8]) -> bool {
    !payload.is_empty() && crate::mbus::records(payload).all(|r| r.is_ok())
}

/// Decodes one telegram (or a wired M-Bus long frame `68 L L 68 ..`) into records.
///
/// # Errors
/// See [`parse`]; manufacturer-specific payloads and record errors are errors too.
pub fn decode(
    raw: &[u8],
    keys: &dyn KeyLookup,
    cache: &mut FormatCache,
) -> Result<DecodedFrame, WmbusError> {
    if is_wired_long_frame(raw) {
        return decode_wired(raw);
    }
    let telegram = parse(raw, keys, cache)?;
    let records = match telegram.kind {
        PayloadKind::Records | PayloadKind::Compact => {
            let mut records = application_records(&telegram.payload).map_err(|source| {
                WmbusError::Application {
                    offset: telegram.payload_offset,
                    source,
                }
            })?;
            // Apator 16-2 hides its volume in the manufacturer block: put it first.
            if apator::is_apator162(telegram.meter)
                && let Some(volume) = apator::records(&telegram.payload)
            {
                records.splice(0..0, volume);
            }
            records
        }
        PayloadKind::DiehlPrios => diehl::izar_records(&telegram.payload).ok_or_else(|| {
            WmbusError::ManufacturerSpecific {
                meter: telegram.meter.meter_id(),
                ci: telegram.tpl.ci,
            }
        })?,
        PayloadKind::ManufacturerSpecific if techem::is_techem(telegram.meter, telegram.tpl.ci) => {
            techem::records(telegram.meter, telegram.tpl.ci, &telegram.payload).ok_or_else(
                || WmbusError::ManufacturerSpecific {
                    meter: telegram.meter.meter_id(),
                    ci: telegram.tpl.ci,
                },
            )?
        }
        PayloadKind::ManufacturerSpecific => {
            return Err(WmbusError::ManufacturerSpecific {
                meter: telegram.meter.meter_id(),
                ci: telegram.tpl.ci,
            });
        }
    };
    Ok(DecodedFrame {
        protocol: Protocol::Wmbus,
        meter: meter_info(telegram.meter),
        records,
    })
}

/// Identity of a meter as [`MeterInfo`].
fn meter_info(a: Address) -> MeterInfo {
    // Built on the stack (`SmallString`): the same text as `id_string` and
    // `manufacturer_code`, without their allocations.
    MeterInfo {
        id: crate::mbus::hex_u32(a.id, crate::mbus::HEX_LOWER),
        manufacturer: Some(crate::mbus::manufacturer_text(a.manufacturer)),
        version: Some(a.version),
        medium: Some(SmallString::from_static(link::medium_name(a.device_type))),
    }
}

/// `68 L L 68 ... CS 16` with a consistent length: a wired frame, as some logs carry.
fn is_wired_long_frame(raw: &[u8]) -> bool {
    match raw {
        [0x68, l1, l2, 0x68, ..] => {
            l1 == l2
                && usize::from(*l1).checked_add(6) == Some(raw.len())
                && raw.last() == Some(&0x16)
        }
        _ => false,
    }
}

/// Wired long frames go to the wired decoder.
fn decode_wired(raw: &[u8]) -> Result<DecodedFrame, WmbusError> {
    crate::mbus::decode(raw).map_err(WmbusError::Wired)
}

/// EN 13757-3 data records of decrypted application data (no TPL header).
///
/// Records are decoded in order; if one is malformed (wireless meters often end with truncated
/// or vendor bytes), the records before it are kept and the undecoded rest is returned as one
/// raw `undecoded_tail` record, so no value is invented and nothing is silently dropped. A
/// payload whose first record already fails is an error.
fn application_records(payload: &[u8]) -> Result<Vec<Record>, crate::mbus::MbusError> {
    let mut out = Vec::new();
    let mut end = 0usize;
    for rec in crate::mbus::records(payload) {
        match rec {
            Ok(rec) => {
                end = raw_record_end(&rec);
                out.push(rec.to_record());
            }
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => {
                let tail = payload.get(end..).unwrap_or_default();
                out.push(Record {
                    quantity: crate::frame::q!("undecoded_tail"),
                    value: crate::frame::RecordValue::Raw(crate::mbus::hex_lower(tail)),
                    unit: None,
                    storage: 0,
                    tariff: 0,
                    subunit: 0,
                    function: crate::frame::Function::Instantaneous,
                });
                break;
            }
        }
    }
    Ok(out)
}

/// Offset just past a decoded record (DIF, DIFEs, VIF, plain text, VIFEs, LVAR, data).
fn raw_record_end(rec: &crate::mbus::RawRecord<'_>) -> usize {
    let vif = usize::from(rec.dif & 0x0F != 0x0F);
    let text = if rec.plain_text.is_empty() {
        0
    } else {
        rec.plain_text.len().saturating_add(1)
    };
    [
        1,
        rec.dife.len(),
        vif,
        text,
        rec.vife.len(),
        usize::from(rec.lvar.is_some()),
        rec.data.len(),
    ]
    .iter()
    .fold(rec.offset, |acc, n| acc.saturating_add(*n))
}

#[cfg(test)]
mod tests {
    use super::encode::{WmbusMeter, telegram};
    use super::*;

    const KEY: [u8; 16] = [
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
        0x10,
    ];
    /// 04 13 volume 12.345 m³ (int32, 10⁻³ m³), 02 FD 17 error flags 0.
    const RECORDS: [u8; 11] = [
        0x04, 0x13, 0x39, 0x30, 0x00, 0x00, 0x02, 0xFD, 0x17, 0x00, 0x00,
    ];

    fn meter() -> WmbusMeter {
        WmbusMeter {
            manufacturer: manufacturer_from_code("KAM").unwrap(),
            id: 0x1234_5678,
            version: 0x1B,
            device_type: 0x07,
        }
    }

    #[test]
    fn afl_fragments_are_reassembled_in_order() {
        // A mode-5 telegram in three fragments decodes, once the last arrives, exactly like
        // the unfragmented telegram.
        let whole = telegram(&meter(), &RECORDS, 0x42, Some(KEY));
        let expected = decode(&whole, &Some(KEY), &mut FormatCache::new()).unwrap();
        let parts = encode::fragments(&whole, 8);
        assert_eq!(parts.len(), 3);
        let mut cache = FormatCache::new();
        for (i, part) in parts.iter().enumerate().take(2) {
            assert_eq!(
                decode(part, &Some(KEY), &mut cache).unwrap_err(),
                WmbusError::Fragmented {
                    fragment: u8::try_from(i + 1).unwrap()
                }
            );
        }
        let t = parse(&parts[2], &Some(KEY), &mut FormatCache::new());
        assert!(t.is_err(), "a last fragment alone is not a message");
        let got = decode(&parts[2], &Some(KEY), &mut cache).unwrap();
        assert_eq!(got, expected);

        // Out of sequence (fragment 2 lost): the message is dropped, nothing is decoded.
        let mut cache = FormatCache::new();
        assert!(decode(&parts[0], &Some(KEY), &mut cache).is_err());
        assert_eq!(
            decode(&parts[2], &Some(KEY), &mut cache).unwrap_err(),
            WmbusError::Fragmented { fragment: 3 }
        );
        assert_eq!(
            decode(&parts[1], &Some(KEY), &mut cache).unwrap_err(),
            WmbusError::Fragmented { fragment: 2 }
        );

        // A message length that does not match the reassembled bytes is refused.
        let mut bad = parts.clone();
        bad[0][14] ^= 0x01; // low byte of AFL.ML
        let mut cache = FormatCache::new();
        for part in &bad[..2] {
            assert!(decode(part, &Some(KEY), &mut cache).is_err());
        }
        assert!(matches!(
            decode(&bad[2], &Some(KEY), &mut cache).unwrap_err(),
            WmbusError::LengthMismatch { .. }
        ));

        // One fragment of one is a whole message too.
        let single = encode::fragments(&whole, 255);
        assert_eq!(single.len(), 1);
        assert_eq!(
            decode(&single[0], &Some(KEY), &mut FormatCache::new()).unwrap(),
            expected
        );
    }

    /// TPL mode 10 (AES-CCM, OMS security profile D): the public telegram and key of
    /// wmbusmeters issue #1667 (a Kamstrup water meter, ELL-I then CI 7A); its derived key,
    /// nonce and plaintext are the ones printed in that issue and in PR #2085.
    #[test]
    fn mode10_public_vector_decrypts_and_authenticates() {
        let frame = hex::decode(
            "4544372C060382533C168C20307A3010FF2A10018C570E006DA7632471F42B0A3CECCD461353573E\
             D02B87118BC5FFE982F7F00A0274543BC51938F8B9C8BB8928114D60788A",
        )
        .unwrap();
        let key: [u8; 16] = hex::decode("BF902DD6DFADAFE83E4AE6832B5FA14C")
            .unwrap()
            .try_into()
            .unwrap();
        let t = parse(&frame, &Some(key), &mut FormatCache::new()).unwrap();
        assert_eq!(t.tpl.security_mode(), 10);
        assert_eq!(t.protection, Protection::Decrypted);
        assert_eq!(t.meter.meter_id(), "mbus:KAW53820306");
        assert_eq!(
            hex::encode_upper(&t.payload),
            "046D1C2A2F3C04150000000002FF25010406FF1BFFFFFFFFFFFF446D0020213C441500000000"
        );
        let decoded = decode(&frame, &Some(key), &mut FormatCache::new()).unwrap();
        assert_eq!(decoded.records[0].quantity, "date_time");
        assert_eq!(
            decoded.records[0].value,
            crate::frame::RecordValue::Date("2025-12-15T10:28".into())
        );
        assert_eq!(decoded.records[1].quantity, "volume");
        assert_eq!(
            decoded.records[1].value,
            crate::frame::RecordValue::Number(0.into())
        );
        assert_eq!(decoded.records[1].unit, Some(model::Unit::CubicMetre));

        // No key, a wrong key, and one flipped ciphertext or header bit are typed errors.
        assert_eq!(
            parse(&frame, &None, &mut FormatCache::new()).unwrap_err(),
            WmbusError::MissingKey {
                meter: "mbus:KAW53820306".into(),
                mode: 10
            }
        );
        let wrong_key = WmbusError::WrongKey {
            meter: "mbus:KAW53820306".into(),
            mode: 10,
            check: "AES-CCM tag",
        };
        let mut wrong = key;
        wrong[0] ^= 1;
        assert_eq!(
            parse(&frame, &Some(wrong), &mut FormatCache::new()).unwrap_err(),
            wrong_key
        );
        for at in [14usize, 30, 69] {
            let mut tampered = frame.clone();
            tampered[at] ^= 0x01;
            assert_eq!(
                parse(&tampered, &Some(key), &mut FormatCache::new()).unwrap_err(),
                wrong_key,
                "byte {at}"
            );
        }
    }

    #[test]
    fn mode5_round_trip_decrypts_with_the_right_key() {
        let frame = telegram(&meter(), &RECORDS, 0x42, Some(KEY));
        assert_eq!(frame.len(), usize::from(frame[0]) + 1);
        let t = parse(&frame, &Some(KEY), &mut FormatCache::new()).unwrap();
        assert_eq!(t.protection, Protection::Decrypted);
        assert_eq!(t.tpl.security_mode(), 5);
        assert_eq!(t.meter.meter_id(), "mbus:KAM12345678");
        assert_eq!(&t.payload[..2], &[0x2F, 0x2F]);
        assert_eq!(&t.payload[2..13], &RECORDS);
        assert!(t.payload[13..].iter().all(|&b| b == 0x2F));
    }

    #[test]
    fn mode5_wrong_or_missing_key_is_typed_error() {
        let frame = telegram(&meter(), &RECORDS, 0x42, Some(KEY));
        let mut wrong = KEY;
        wrong[15] ^= 0xFF;
        assert_eq!(
            parse(&frame, &Some(wrong), &mut FormatCache::new()).unwrap_err(),
            WmbusError::WrongKey {
                meter: "mbus:KAM12345678".into(),
                mode: 5,
                check: "2F2F check bytes"
            }
        );
        let missing = parse(&frame, &None, &mut FormatCache::new()).unwrap_err();
        assert_eq!(
            missing,
            WmbusError::MissingKey {
                meter: "mbus:KAM12345678".into(),
                mode: 5
            }
        );
        assert_eq!(missing.code(), "missing_key");
        let mut keys = HashMap::new();
        keys.insert("mbus:KAM12345678".to_owned(), KEY);
        assert!(parse(&frame, &keys, &mut FormatCache::new()).is_ok());
        // The stack-built id matches `Address::meter_id` for any manufacturer and id.
        for (m, id) in [
            (0x0421u16, 0xABCD_0042u32),
            (0x7FFF, 0),
            (0x2C2D, 0x9999_9999),
        ] {
            let meter = Address {
                manufacturer: m,
                id,
                version: 0,
                device_type: 0,
            };
            let keys: HashMap<String, [u8; 16]> = [(meter.meter_id(), KEY)].into();
            assert_eq!(keys.key_for(m, id), Some(KEY), "{}", meter.meter_id());
        }
    }

    #[test]
    fn ciphertext_starting_with_2f2f_is_still_decrypted() {
        // Found by search: with this key and access number 0 the ciphertext starts 2F2F.
        let key = [
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E,
            0xA5, 0xBC,
        ];
        let frame = telegram(&meter(), &RECORDS, 0, Some(key));
        assert_eq!(&frame[15..17], &[0x2F, 0x2F]);
        let t = parse(&frame, &Some(key), &mut FormatCache::new()).unwrap();
        assert_eq!(t.protection, Protection::Decrypted);
        assert_eq!(&t.payload[2..13], &RECORDS);
        // Without the key it looks like a replayed plaintext; the records then fail or differ,
        // which is why a configured key always wins.
        let t = parse(&frame, &None, &mut FormatCache::new()).unwrap();
        assert_eq!(t.protection, Protection::AlreadyDecrypted);
    }

    #[test]
    fn cached_cipher_follows_key_changes() {
        let frame = telegram(&meter(), &RECORDS, 1, Some(KEY));
        let mut cache = FormatCache::new();
        let mut wrong = KEY;
        wrong[0] ^= 1;
        assert!(parse(&frame, &Some(wrong), &mut cache).is_err());
        assert!(parse(&frame, &Some(KEY), &mut cache).is_ok());
        assert!(format!("{cache:?}").starts_with("FormatCache"));
    }

    #[test]
    fn decode_maps_records_and_identity() {
        let frame = telegram(&meter(), &RECORDS, 0x42, Some(KEY));
        let f = decode(&frame, &Some(KEY), &mut FormatCache::new()).unwrap();
        assert_eq!(f.protocol, Protocol::Wmbus);
        assert_eq!(f.meter.id, "12345678");
        assert_eq!(f.meter.manufacturer.as_deref(), Some("KAM"));
        assert_eq!(f.meter.medium.as_deref(), Some("water"));
        assert_eq!(f.records.len(), 2);
        assert_eq!(f.records[0].quantity, "volume");
        assert_eq!(
            f.records[0].value,
            crate::frame::RecordValue::Number(model::Decimal::new(12345, 3))
        );
        assert_eq!(f.records[0].unit, Some(model::Unit::CubicMetre));
    }

    #[test]
    fn a_held_compact_frame_decodes_once_its_full_frame_arrived() {
        let full = [&[0x78u8][..], &RECORDS].concat();
        let (sig, _) = compact::format_of(&RECORDS).unwrap();
        let mut compact_payload = vec![0x79];
        compact_payload.extend_from_slice(&sig.to_le_bytes());
        compact_payload.extend_from_slice(&crc::crc16(&RECORDS).to_le_bytes());
        compact_payload.extend_from_slice(&[0x39, 0x30, 0x00, 0x00, 0x00, 0x00]);
        let with_header = |ci_and_data: &[u8]| {
            let mut f = vec![0u8, 0x44];
            f.extend_from_slice(&meter().address().to_wire());
            f.extend_from_slice(ci_and_data);
            f[0] = u8::try_from(f.len() - 1).unwrap();
            f
        };
        let t0 = std::time::Instant::now();
        let mut cache = FormatCache::new();
        let mut hold = CompactHold::new(16, std::time::Duration::from_secs(3600));
        let compact_frame = with_header(&compact_payload);
        match decode(&compact_frame, &None, &mut cache) {
            Err(WmbusError::UnknownCompactFormat { meter, signature }) => {
                assert_eq!(signature, sig);
                assert!(
                    hold.hold(meter, signature, t0, compact_frame.clone())
                        .is_none()
                );
            }
            other => panic!("expected an unknown format, got {other:?}"),
        }
        let from_full = decode(&with_header(&full), &None, &mut cache).unwrap();
        let meter_id = format!(
            "mbus:{}{}",
            from_full.meter.manufacturer.as_deref().unwrap(),
            from_full.meter.id
        );
        let released = hold.take(&meter_id, t0 + std::time::Duration::from_secs(60));
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].received, t0);
        let from_compact = decode(&released[0].item, &None, &mut cache).unwrap();
        assert_eq!(from_compact.records, from_full.records);
        assert!(hold.is_empty());
    }

    #[test]
    fn compact_frame_needs_the_full_frame_first() {
        // Full frame CI 78 then the same values as a compact frame CI 79.
        let full = [&[0x78u8][..], &RECORDS].concat();
        let (sig, _) = compact::format_of(&RECORDS).unwrap();
        let data = [0x39, 0x30, 0x00, 0x00, 0x00, 0x00];
        let mut compact_payload = vec![0x79];
        compact_payload.extend_from_slice(&sig.to_le_bytes());
        compact_payload.extend_from_slice(&crc::crc16(&RECORDS).to_le_bytes());
        compact_payload.extend_from_slice(&data);
        let with_header = |ci_and_data: &[u8]| {
            let mut f = vec![0u8, 0x44];
            f.extend_from_slice(&meter().address().to_wire());
            f.extend_from_slice(ci_and_data);
            f[0] = u8::try_from(f.len() - 1).unwrap();
            f
        };
        let mut cache = FormatCache::new();
        let compact_frame = with_header(&compact_payload);
        assert!(matches!(
            decode(&compact_frame, &None, &mut cache),
            Err(WmbusError::UnknownCompactFormat { .. })
        ));
        let from_full = decode(&with_header(&full), &None, &mut cache).unwrap();
        assert_eq!(cache.format_count(), 1);
        let from_compact = decode(&compact_frame, &None, &mut cache).unwrap();
        assert_eq!(from_full.records, from_compact.records);

        // Another meter of the same model borrows the format; its CRC must still match.
        let mut other = compact_frame.clone();
        other[4] ^= 0x01;
        let borrowed = decode(&other, &None, &mut cache).unwrap();
        assert_eq!(borrowed.records, from_full.records);
        let last = other.len() - 1;
        other[last] ^= 0x01;
        assert!(matches!(
            decode(&other, &None, &mut cache),
            Err(WmbusError::CompactMismatch { .. })
        ));
    }

    #[test]
    fn malformed_tail_is_kept_raw_not_invented() {
        // A good record, then a DIF announcing 4 bytes with only 1 present.
        let mut payload = RECORDS.to_vec();
        payload.extend_from_slice(&[0x04, 0x13, 0x01]);
        let frame = telegram(&meter(), &payload, 1, None);
        let f = decode(&frame, &None, &mut FormatCache::new()).unwrap();
        assert_eq!(f.records.len(), 3);
        assert_eq!(f.records[2].quantity, "undecoded_tail");
        assert_eq!(
            f.records[2].value,
            crate::frame::RecordValue::Raw("041301".into())
        );
    }

    /// Adds format-A block CRCs (after byte 10, then every 16 bytes) to a stripped telegram.
    fn with_format_a_crcs(stripped: &[u8]) -> Vec<u8> {
        let (first, rest) = stripped.split_at(10);
        let mut out = first.to_vec();
        out.extend_from_slice(&crc::crc16(first).to_be_bytes());
        for block in rest.chunks(16) {
            out.extend_from_slice(block);
            out.extend_from_slice(&crc::crc16(block).to_be_bytes());
        }
        out
    }

    #[test]
    fn format_a_and_b_crcs_are_verified_and_removed() {
        let stripped = telegram(&meter(), &RECORDS, 9, Some(KEY));
        let a = with_format_a_crcs(&stripped);
        let t = parse(&a, &Some(KEY), &mut FormatCache::new()).unwrap();
        assert_eq!(t.format, FrameFormat::A);
        assert_eq!(&t.payload[2..13], &RECORDS);
        let mut bad = a.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert!(matches!(
            parse(&bad, &Some(KEY), &mut FormatCache::new()),
            Err(WmbusError::BadCrc { format: 'A', .. })
        ));

        // Format B: L counts the CRC, one CRC over everything before it.
        let mut b = stripped.clone();
        b[0] += 2;
        let crc = crc::crc16(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        let t = parse(&b, &Some(KEY), &mut FormatCache::new()).unwrap();
        assert_eq!(t.format, FrameFormat::B);
        assert_eq!(&t.payload[2..13], &RECORDS);
    }

    /// `L C M A` of the test meter followed by `rest`, with L set.
    fn frame_with(rest: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8, 0x44];
        f.extend_from_slice(&meter().address().to_wire());
        f.extend_from_slice(rest);
        f[0] = u8::try_from(f.len() - 1).unwrap();
        f
    }

    #[test]
    fn ell_aes_ctr_decrypts_and_checks_the_payload_crc() {
        let sn: u32 = 0x2000_1234; // bits 31..29 = 001: AES-128-CTR
        let mut inner = vec![0x78];
        inner.extend_from_slice(&RECORDS);
        let mut enc = crc::crc16(&inner).to_le_bytes().to_vec();
        enc.extend_from_slice(&inner);
        let cc = 0x30u8;
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&meter().address().to_wire());
        iv[8] = cc & !0x12;
        iv[9..13].copy_from_slice(&sn.to_le_bytes());
        crypto::ctr_apply(&crypto::cipher(&KEY), iv, &mut enc);
        let mut rest = vec![0x8D, cc, 0x07];
        rest.extend_from_slice(&sn.to_le_bytes());
        rest.extend_from_slice(&enc);
        let frame = frame_with(&rest);

        let t = parse(&frame, &Some(KEY), &mut FormatCache::new()).unwrap();
        assert!(t.ell.as_ref().unwrap().encrypted);
        assert_eq!(t.protection, Protection::Decrypted);
        assert_eq!(t.payload, RECORDS);
        let mut wrong = KEY;
        wrong[3] ^= 0x40;
        assert!(matches!(
            parse(&frame, &Some(wrong), &mut FormatCache::new()),
            Err(WmbusError::WrongKey {
                check: "ELL payload CRC",
                mode: 128,
                ..
            })
        ));
        assert!(matches!(
            parse(&frame, &None, &mut FormatCache::new()),
            Err(WmbusError::MissingKey { mode: 128, .. })
        ));
    }

    #[test]
    fn mode7_with_afl_mac_decrypts_and_rejects_a_bad_mac() {
        let mcr = [0x05, 0x00, 0x00, 0x00];
        let id = meter().id.to_le_bytes();
        let mut plain = vec![0x2F, 0x2F];
        plain.extend_from_slice(&RECORDS);
        plain.resize(32, 0x2F);
        let kenc = crypto::mode7_key(&KEY, 0x00, mcr, id);
        crypto::cbc_encrypt(&crypto::cipher(&kenc), [0u8; 16], &mut plain);
        // TPL: CI 7A, ACC, ST, CW = mode 7 with 2 blocks, CFE.
        let mut tpl = vec![0x7A, 0x09, 0x00, 0x20, 0x07, 0x10];
        tpl.extend_from_slice(&plain);
        let mcl = 0x25; // AES-CMAC, 8 bytes
        let kmac = crypto::mode7_key(&KEY, 0x01, mcr, id);
        let mac = crypto::cmac(&kmac, &[&[mcl], &mcr, &tpl]);
        // AFL: CI 90, AFL.L 15, FCL 0x2C00 (MCL, MCR and MAC present), MCL, MCR, MAC.
        let mut rest = vec![0x90, 0x0F, 0x00, 0x2C, mcl];
        rest.extend_from_slice(&mcr);
        rest.extend_from_slice(&mac[..8]);
        rest.extend_from_slice(&tpl);
        let frame = frame_with(&rest);

        let t = parse(&frame, &Some(KEY), &mut FormatCache::new()).unwrap();
        assert_eq!(t.tpl.security_mode(), 7);
        assert_eq!(t.protection, Protection::Decrypted);
        assert_eq!(&t.payload[2..13], &RECORDS);
        let mut wrong = KEY;
        wrong[0] ^= 0x01;
        assert!(matches!(
            parse(&frame, &Some(wrong), &mut FormatCache::new()),
            Err(WmbusError::WrongKey {
                check: "AFL MAC",
                mode: 7,
                ..
            })
        ));
    }

    #[test]
    fn plain_telegram_needs_no_key() {
        let frame = telegram(&meter(), &RECORDS, 7, None);
        let t = parse(&frame, &None, &mut FormatCache::new()).unwrap();
        assert_eq!(t.protection, Protection::None);
        assert_eq!(t.payload, RECORDS);
    }

    #[test]
    fn truncated_and_unknown_ci_are_errors() {
        let mut frame = telegram(&meter(), &RECORDS, 7, None);
        frame[10] = 0x55;
        assert_eq!(
            parse(&frame, &None, &mut FormatCache::new()).unwrap_err(),
            WmbusError::UnsupportedCi {
                ci: 0x55,
                offset: 10
            }
        );
        for n in 0..12 {
            let mut cut = frame[..n].to_vec();
            if let Some(l) = cut.first_mut() {
                *l = u8::try_from(n.saturating_sub(1)).unwrap();
            }
            assert!(parse(&cut, &None, &mut FormatCache::new()).is_err(), "{n}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            drop(decode(&bytes, &Some(KEY), &mut FormatCache::new()));
        }

        #[test]
        fn mutated_telegrams_never_panic(
            at in 0usize..64,
            byte in proptest::num::u8::ANY,
            ci in proptest::sample::select(vec![0x72u8, 0x78, 0x79, 0x7A, 0x8C, 0x8D, 0x8E, 0x8F, 0x90, 0xA2]),
        ) {
            let mut frame = telegram(&meter(), &RECORDS, 3, Some(KEY));
            frame[10] = ci;
            if let Some(b) = frame.get_mut(at) {
                *b = byte;
            }
            let mut cache = FormatCache::new();
            drop(decode(&frame, &Some(KEY), &mut cache));
            drop(decode(&frame, &None, &mut cache));
        }
    }
}
