//! Decoder for wireless M-Bus / OMS telegrams (EN 13757-4, OMS Vol.2).
//!
//! Layers handled, outermost first:
//! - data link layer: frame format A or B with the block CRCs present (verified and removed) or
//!   already stripped by the receiver (the usual `L C M A CI ...` hex log), trailing RSSI ignored;
//! - extended link layer ELL I–IV (CI 8C–8F), including AES-128-CTR session encryption, whose
//!   payload CRC tells a right key from a wrong one;
//! - authentication and fragmentation layer AFL (CI 90): message counter and CMAC;
//! - transport layer: no header (CI 78, compact 79), short (7A) or long (72) header, with
//!   security mode 0, 5 (AES-128-CBC, IV = M‖A‖ACC×8) or 7 (AES-128-CBC, IV 0, keys derived per
//!   message by AES-CMAC); a decrypted part must start with the `2F2F` check bytes.
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

mod compact;
mod crc;
mod crypto;
mod diehl;
pub mod encode;
mod error;
mod link;
mod reader;

use std::collections::HashMap;
use std::fmt;

use aes::Aes128;
use serde::Serialize;

use crate::frame::{DecodedFrame, MeterInfo, Protocol, Record};
pub use error::WmbusError;
pub use link::{Address, FrameFormat, manufacturer_code, manufacturer_from_code};
use reader::Reader;

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
        let meter = Address {
            manufacturer,
            id,
            version: 0,
            device_type: 0,
        }
        .meter_id();
        self.get(&meter).copied()
    }
}

/// Upper bound on cached entries per map, so a flood of fake meters cannot grow memory forever.
const MAX_CACHE_ENTRIES: usize = 100_000;

/// Per-meter decoder state: record formats seen in full frames (for compact frames, CI 79) and
/// the expanded AES key of each meter (so a telegram costs no key schedule).
#[derive(Default)]
pub struct FormatCache {
    formats: HashMap<(u16, u32, u16), Vec<u8>>,
    ciphers: HashMap<(u16, u32), ([u8; 16], Aes128)>,
}

impl fmt::Debug for FormatCache {
    // Hand-written so that key material can never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FormatCache")
            .field("formats", &self.formats.len())
            .field("ciphers", &self.ciphers.len())
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

    /// Remembers the format of a full frame's records.
    fn learn(&mut self, meter: Address, records: &[u8]) {
        if let Some((sig, format)) = compact::format_of(records) {
            let k = (meter.manufacturer, meter.id, sig);
            if !self.formats.contains_key(&k) {
                if self.formats.len() >= MAX_CACHE_ENTRIES {
                    self.formats.clear();
                }
                self.formats.insert(k, format);
            }
        }
    }

    fn format(&self, meter: Address, sig: u16) -> Option<&[u8]> {
        self.formats
            .get(&(meter.manufacturer, meter.id, sig))
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
    let (frame, format) = link::strip_crcs(raw)?;
    let frame: &[u8] = &frame;
    let mut r = Reader::new(frame, 0);
    let _l = r.u8("L field")?;
    let c_field = r.u8("C field")?;
    let m = r.le_u16("manufacturer")?;
    let a = r.array::<6>("address")?;
    // `dll_raw` keeps the wire order for IVs; `dll` is the identity users know.
    let dll_raw = Address::from_wire(m, a);
    let dll = match frame.get(10) {
        Some(&ci) if diehl::has_prios_address(m, ci) => diehl::prios_address(m, a),
        _ => dll_raw,
    };

    // Extended link layer.
    let ci_offset = r.offset();
    let ci = r.u8("CI field")?;
    let mut ell = None;
    let ell_owned: Option<Vec<u8>>;
    let body_offset;
    match ci {
        0x8C | 0x8E => {
            let cc = r.u8("ELL communication control")?;
            let access_number = r.u8("ELL access number")?;
            let meter = if ci == 0x8E {
                let em = r.le_u16("ELL manufacturer")?;
                let ea = r.array::<6>("ELL address")?;
                Some(Address::from_wire(em, ea))
            } else {
                None
            };
            ell = Some(Ell {
                ci,
                cc,
                access_number,
                session_number: None,
                meter,
                encrypted: false,
            });
            ell_owned = None;
            body_offset = r.offset();
        }
        0x8D | 0x8F => {
            let cc = r.u8("ELL communication control")?;
            let access_number = r.u8("ELL access number")?;
            let meter = if ci == 0x8F {
                let em = r.le_u16("ELL manufacturer")?;
                let ea = r.array::<6>("ELL address")?;
                Some(Address::from_wire(em, ea))
            } else {
                None
            };
            let sn = r.le_u32("ELL session number")?;
            let enc_offset = r.offset();
            let mut plain = r.rest().to_vec();
            let encrypted = (sn >> 29) & 0x07 == ELL_ENC_AES_CTR;
            let owner = meter.unwrap_or(dll);
            let owner_raw = meter.unwrap_or(dll_raw);
            if encrypted && !ell_crc_ok(&plain) {
                let key = keys.key_for(owner.manufacturer, owner.id).ok_or_else(|| {
                    WmbusError::MissingKey {
                        meter: owner.meter_id(),
                        mode: ELL_MODE,
                    }
                })?;
                let mut iv = [0u8; 16];
                let sn_bytes = sn.to_le_bytes();
                for (slot, b) in iv.iter_mut().zip(
                    owner_raw
                        .to_wire()
                        .iter()
                        .chain(std::iter::once(&(cc & !0x12)))
                        .chain(sn_bytes.iter()),
                ) {
                    *slot = *b;
                }
                crypto::ctr_apply(cache.cipher(owner, key), iv, &mut plain);
                if !ell_crc_ok(&plain) {
                    return Err(WmbusError::WrongKey {
                        meter: owner.meter_id(),
                        mode: ELL_MODE,
                        check: "ELL payload CRC",
                    });
                }
            } else if !ell_crc_ok(&plain) {
                let actual = plain
                    .get(..2)
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map_or(0, u16::from_le_bytes);
                return Err(WmbusError::BadCrc {
                    format: 'E',
                    block: 0,
                    offset: enc_offset,
                    expected: crc::crc16(plain.get(2..).unwrap_or_default()),
                    actual,
                });
            }
            ell = Some(Ell {
                ci,
                cc,
                access_number,
                session_number: Some(sn),
                meter,
                encrypted,
            });
            plain.drain(..2.min(plain.len()));
            ell_owned = Some(plain);
            body_offset = enc_offset.saturating_add(2);
        }
        _ => {
            ell_owned = None;
            body_offset = ci_offset;
        }
    }
    let body: &[u8] = match &ell_owned {
        Some(v) => v,
        None => frame.get(body_offset..).unwrap_or_default(),
    };
    let mut r = Reader::new(body, body_offset);

    // Authentication and fragmentation layer.
    let mut afl = None;
    let mut afl_mac: Option<&[u8]> = None;
    if body.first() == Some(&0x90) {
        let _ci = r.u8("AFL CI")?;
        let afl_len = usize::from(r.u8("AFL length")?);
        let afl_start = r.offset();
        let mut ar = Reader::new(r.bytes(afl_len, "AFL fields")?, afl_start);
        let fcl = ar.le_u16("AFL fragmentation control")?;
        if fcl & 0x4000 != 0 || fcl & 0x00FF > 1 {
            return Err(WmbusError::Fragmented {
                fragment: u8::try_from(fcl & 0xFF).unwrap_or(0),
            });
        }
        let mcl = if fcl & 0x2000 != 0 {
            Some(ar.u8("AFL message control")?)
        } else {
            None
        };
        let key_info = if fcl & 0x0200 != 0 {
            Some(ar.le_u16("AFL key information")?)
        } else {
            None
        };
        let mcr = if fcl & 0x0800 != 0 {
            Some(ar.array::<4>("AFL message counter")?)
        } else {
            None
        };
        if fcl & 0x0400 != 0 {
            let mac_len = match mcl.map(|m| m & 0x0F) {
                Some(3) => 2,
                Some(4) => 4,
                Some(5) => 8,
                Some(6) | Some(8) => 12,
                Some(7) => 16,
                _ => 8,
            };
            afl_mac = Some(ar.bytes(mac_len, "AFL MAC")?);
        }
        let message_length = if fcl & 0x1000 != 0 {
            Some(ar.le_u16("AFL message length")?)
        } else {
            None
        };
        afl = Some(Afl {
            fcl,
            mcl,
            key_info,
            mcr,
            mac: afl_mac.map(hex::encode),
            message_length,
        });
    }

    // Transport layer.
    let tpl_start = r.rest();
    let tpl_ci_offset = r.offset();
    let tpl_ci = r.u8("TPL CI")?;
    let mut tpl = Tpl {
        ci: tpl_ci,
        access_number: None,
        status: None,
        config_word: None,
        address: None,
    };
    let mut kind = match tpl_ci {
        0x7A | 0x5A | 0x61 | 0x65 | 0x6E | 0x74 | 0x7D | 0x7F | 0x8A => {
            tpl.access_number = Some(r.u8("TPL access number")?);
            tpl.status = Some(r.u8("TPL status")?);
            tpl.config_word = Some(r.le_u16("TPL configuration word")?);
            PayloadKind::Records
        }
        0x72 | 0x53 | 0x60 | 0x64 | 0x6B | 0x6F | 0x73 | 0x7C | 0x7E | 0x80 | 0x8B => {
            let tm_id = r.array::<4>("TPL identification")?;
            let tm = r.le_u16("TPL manufacturer")?;
            let tv = r.u8("TPL version")?;
            let tt = r.u8("TPL device type")?;
            let [i0, i1, i2, i3] = tm_id;
            tpl.address = Some(Address::from_wire(tm, [i0, i1, i2, i3, tv, tt]));
            tpl.access_number = Some(r.u8("TPL access number")?);
            tpl.status = Some(r.u8("TPL status")?);
            tpl.config_word = Some(r.le_u16("TPL configuration word")?);
            PayloadKind::Records
        }
        0x78 => PayloadKind::Records,
        0x79 => PayloadKind::Compact,
        0xA0..=0xB7 => PayloadKind::ManufacturerSpecific,
        _ => {
            return Err(WmbusError::UnsupportedCi {
                ci: tpl_ci,
                offset: tpl_ci_offset,
            });
        }
    };
    let meter = tpl
        .address
        .or_else(|| ell.as_ref().and_then(|e| e.meter))
        .unwrap_or(dll);
    let meter_raw = tpl
        .address
        .or_else(|| ell.as_ref().and_then(|e| e.meter))
        .unwrap_or(dll_raw);

    // Security.
    if kind == PayloadKind::ManufacturerSpecific
        && ell.is_none()
        && diehl::is_prios(m, tpl_ci)
        && let Some(plain) = diehl::descramble(frame)
    {
        kind = PayloadKind::DiehlPrios;
        let mut payload = frame.get(11..15).unwrap_or_default().to_vec();
        payload.extend_from_slice(&plain);
        return Ok(Telegram {
            format,
            c_field,
            dll,
            ell,
            afl,
            tpl,
            meter,
            protection: Protection::None,
            kind,
            payload,
            payload_offset: 11,
        });
    }
    let mode = tpl.security_mode();
    let cw_offset = tpl_ci_offset.saturating_add(if tpl.address.is_some() { 11 } else { 3 });
    if mode == 7 {
        let _cfe = r.u8("TPL configuration field extension")?;
    }
    let payload_offset = r.offset();
    let mut payload = r.rest().to_vec();
    let protection = match mode {
        0 => Protection::None,
        5 | 7 => {
            let enc_len = match tpl.encrypted_blocks() {
                0 => payload.len().saturating_sub(payload.len() % crypto::BLOCK),
                n => n.saturating_mul(crypto::BLOCK),
            };
            if enc_len > payload.len() {
                return Err(WmbusError::BadEncryptedLength {
                    offset: payload_offset,
                    len: payload.len(),
                });
            }
            if payload.starts_with(&[0x2F, 0x2F]) {
                Protection::AlreadyDecrypted
            } else {
                let key = keys.key_for(meter.manufacturer, meter.id).ok_or_else(|| {
                    WmbusError::MissingKey {
                        meter: meter.meter_id(),
                        mode,
                    }
                })?;
                let enc = payload.get_mut(..enc_len).unwrap_or_default();
                if mode == 5 {
                    let mut iv = [0u8; 16];
                    let acc = tpl.access_number.unwrap_or(0);
                    for (slot, b) in iv
                        .iter_mut()
                        .zip(meter_raw.to_wire().iter().chain(std::iter::repeat(&acc)))
                    {
                        *slot = *b;
                    }
                    crypto::cbc_decrypt(cache.cipher(meter, key), iv, enc);
                } else {
                    let afl_ref = afl.as_ref();
                    let mcr = afl_ref.and_then(|a| a.mcr).ok_or(WmbusError::Truncated {
                        field: "AFL message counter (needed by security mode 7)",
                        offset: tpl_ci_offset,
                        needed: 4,
                    })?;
                    let id = meter.id.to_le_bytes();
                    if let (Some(mac), Some(mcl)) = (afl_mac, afl_ref.and_then(|a| a.mcl)) {
                        let kmac = crypto::mode7_key(&key, 0x01, mcr, id);
                        let full = crypto::cmac(&kmac, &[&[mcl], &mcr, tpl_start]);
                        if !full.starts_with(mac) {
                            return Err(WmbusError::WrongKey {
                                meter: meter.meter_id(),
                                mode,
                                check: "AFL MAC",
                            });
                        }
                    }
                    let kenc = crypto::mode7_key(&key, 0x00, mcr, id);
                    crypto::cbc_decrypt(&crypto::cipher(&kenc), [0u8; 16], enc);
                }
                if !payload.starts_with(&[0x2F, 0x2F]) {
                    return Err(WmbusError::WrongKey {
                        meter: meter.meter_id(),
                        mode,
                        check: "2F2F check bytes",
                    });
                }
                Protection::Decrypted
            }
        }
        _ => {
            return Err(WmbusError::UnsupportedSecurityMode {
                mode,
                offset: cw_offset,
            });
        }
    };
    let payload = match kind {
        PayloadKind::Compact => {
            let mut cr = Reader::new(&payload, payload_offset);
            let sig = cr.le_u16("compact format signature")?;
            let full_crc = cr.le_u16("compact full-frame CRC")?;
            let format =
                cache
                    .format(meter, sig)
                    .ok_or_else(|| WmbusError::UnknownCompactFormat {
                        meter: meter.meter_id(),
                        signature: sig,
                    })?;
            let full = compact::expand(format, cr.rest()).map_err(|reason| {
                WmbusError::CompactMismatch {
                    meter: meter.meter_id(),
                    signature: sig,
                    reason,
                }
            })?;
            if crc::crc16(&full) != full_crc {
                return Err(WmbusError::CompactMismatch {
                    meter: meter.meter_id(),
                    signature: sig,
                    reason: "full-frame CRC differs",
                });
            }
            full
        }
        PayloadKind::Records => {
            cache.learn(meter, &payload);
            payload
        }
        PayloadKind::ManufacturerSpecific => payload,
        PayloadKind::DiehlPrios => payload,
    };

    Ok(Telegram {
        format,
        c_field,
        dll,
        ell,
        afl,
        tpl,
        meter,
        protection,
        kind,
        payload,
        payload_offset,
    })
}

/// ELL payload CRC check: the first two bytes are the little-endian CRC of the rest.
fn ell_crc_ok(plain: &[u8]) -> bool {
    match (plain.get(..2), plain.get(2..)) {
        (Some(c), Some(rest)) => <[u8; 2]>::try_from(c)
            .map(u16::from_le_bytes)
            .is_ok_and(|c| c == crc::crc16(rest)),
        _ => false,
    }
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
        PayloadKind::Records | PayloadKind::Compact => application_records(&telegram.payload)
            .map_err(|source| WmbusError::Application {
                offset: telegram.payload_offset,
                source,
            })?,
        PayloadKind::DiehlPrios => diehl::izar_records(&telegram.payload).ok_or_else(|| {
            WmbusError::ManufacturerSpecific {
                meter: telegram.meter.meter_id(),
                ci: telegram.tpl.ci,
            }
        })?,
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
    MeterInfo {
        id: a.id_string(),
        manufacturer: Some(a.manufacturer_code()),
        version: Some(a.version),
        medium: Some(link::medium_name(a.device_type).to_owned()),
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
                    quantity: "undecoded_tail".to_owned(),
                    value: crate::frame::RecordValue::Raw(hex::encode(tail)),
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
        assert_eq!(
            parse(&frame, &None, &mut FormatCache::new()).unwrap_err(),
            WmbusError::MissingKey {
                meter: "mbus:KAM12345678".into(),
                mode: 5
            }
        );
        let mut keys = HashMap::new();
        keys.insert("mbus:KAM12345678".to_owned(), KEY);
        assert!(parse(&frame, &keys, &mut FormatCache::new()).is_ok());
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
