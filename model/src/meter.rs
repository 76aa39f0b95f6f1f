//! Meter and gateway identity.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest accepted length of a [`MeterId`] or [`GatewayId`], in bytes.
const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeterIdError {
    /// The identifier is empty.
    #[error("identifier is empty")]
    Empty,
    /// The identifier is longer than [`MAX_ID_LEN`] bytes.
    #[error("identifier is {len} bytes long (at most {MAX_ID_LEN})")]
    TooLong {
        /// Length seen.
        len: usize,
    },
    /// The identifier has a character outside `[A-Za-z0-9:._-]`.
    #[error("identifier has {character:?} at byte {offset} (expected A-Z a-z 0-9 : . _ -)")]
    BadCharacter {
        /// The offending character.
        character: char,
        /// Its byte offset.
        offset: usize,
    },
}

fn validate_id(s: &str) -> Result<(), MeterIdError> {
    if s.is_empty() {
        return Err(MeterIdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(MeterIdError::TooLong { len: s.len() });
    }
    match s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-')))
    {
        Some((offset, character)) => Err(MeterIdError::BadCharacter { character, offset }),
        None => Ok(()),
    }
}

/// The one identity of a meter across protocols: `<protocol>:<address digits>`.
///
/// Protocol addresses map to it through [`MeterAddress`]; meters registered by hand (an
/// IoT-platform device id, a Modbus instrument tag) use any string of `[A-Za-z0-9:._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MeterId(String);

impl MeterId {
    /// Parses and validates a meter id.
    ///
    /// # Errors
    /// Returns [`MeterIdError`] when the string is empty, too long or has a forbidden character.
    pub fn new(s: impl Into<String>) -> Result<Self, MeterIdError> {
        let s = s.into();
        validate_id(&s)?;
        Ok(Self(s))
    }

    /// Returns the id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the uplink partition of this meter for `partitions` partitions.
    pub fn partition(&self, partitions: u16) -> u16 {
        partition_of(self.as_str(), partitions)
    }
}

impl TryFrom<String> for MeterId {
    type Error = MeterIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<MeterId> for String {
    fn from(id: MeterId) -> Self {
        id.0
    }
}

impl fmt::Display for MeterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for MeterId {
    type Err = MeterIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Returns the partition of a meter id: FNV-1a 64 of its bytes modulo `partitions`.
///
/// FNV-1a is fixed here (not `std`'s `DefaultHasher`, whose output may change between Rust
/// releases) because gateways and pipeline workers built at different times must agree.
/// `partitions == 0` is treated as 1.
pub fn partition_of(meter_id: &str, partitions: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = meter_id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    let p = u64::from(partitions.max(1));
    // The remainder is < partitions, which is a u16.
    u16::try_from(hash % p).unwrap_or(0)
}

/// A protocol-specific meter address, as read off a frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum MeterAddress {
    /// CJ/T 188: meter type T and the 7-byte BCD address A0..A6 as on the wire (A0 first).
    Cjt188 {
        /// Meter type byte T (0x10 cold water, 0x20 heat, ...).
        meter_type: u8,
        /// Address bytes A0..A6, low byte first as transmitted.
        address: [u8; 7],
    },
    /// EN 13757 (wired or wireless M-Bus): 8-digit identification, manufacturer, version, medium.
    Mbus {
        /// Identification number, 8 BCD digits, as a number (e.g. 12345678).
        id: u32,
        /// Three-letter manufacturer code (FLAG association), e.g. `KAM`.
        manufacturer: String,
        /// Version byte.
        version: u8,
        /// Medium / device type byte (0x07 water, 0x06 warm water, ...).
        medium: u8,
    },
    /// A Modbus instrument, named in the gateway configuration.
    Modbus {
        /// Device name from the configuration.
        device: String,
    },
    /// A device known by a platform or configuration id (IMEI, hydrant tag...).
    Named {
        /// The id.
        id: String,
    },
}

impl From<&MeterAddress> for MeterId {
    /// Maps an address to its canonical meter id. CJ/T 188 addresses are displayed A6..A0 as
    /// 14 BCD digits (the form printed on the meter); M-Bus ids are `mbus:<MAN><8 digits>`.
    fn from(addr: &MeterAddress) -> Self {
        let s = match addr {
            MeterAddress::Cjt188 { address, .. } => {
                let mut digits = String::with_capacity(14);
                for b in address.iter().rev() {
                    digits.push_str(&format!("{b:02X}"));
                }
                format!("cjt188:{digits}")
            }
            MeterAddress::Mbus {
                id, manufacturer, ..
            } => format!("mbus:{manufacturer}{id:08}"),
            MeterAddress::Modbus { device } => format!("modbus:{device}"),
            MeterAddress::Named { id } => id.clone(),
        };
        // Every constructed form is within the alphabet; fall back to a sanitised id otherwise.
        MeterId::new(s.clone()).unwrap_or_else(|_| {
            let cleaned: String = s
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-') {
                        c
                    } else {
                        '_'
                    }
                })
                .take(MAX_ID_LEN)
                .collect();
            MeterId(if cleaned.is_empty() {
                "unknown".into()
            } else {
                cleaned
            })
        })
    }
}

/// The identity of an edge gateway (also the MQTT topic segment `wm/v1/{gateway}/...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayId(String);

impl GatewayId {
    /// Parses and validates a gateway id (same alphabet as [`MeterId`]; no `/`, `+` or `#`).
    ///
    /// # Errors
    /// Returns [`MeterIdError`] when the string is not a valid identifier.
    pub fn new(s: impl Into<String>) -> Result<Self, MeterIdError> {
        let s = s.into();
        validate_id(&s)?;
        Ok(Self(s))
    }

    /// Returns the id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GatewayId {
    type Error = MeterIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<GatewayId> for String {
    fn from(id: GatewayId) -> Self {
        id.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cjt188_id_is_a6_to_a0() {
        let addr = MeterAddress::Cjt188 {
            meter_type: 0x10,
            address: [0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78],
        };
        assert_eq!(MeterId::from(&addr).as_str(), "cjt188:78330011223344");
    }

    #[test]
    fn mbus_id_has_manufacturer_and_eight_digits() {
        let addr = MeterAddress::Mbus {
            id: 1234,
            manufacturer: "KAM".into(),
            version: 1,
            medium: 7,
        };
        assert_eq!(MeterId::from(&addr).as_str(), "mbus:KAM00001234");
    }

    #[test]
    fn rejects_topic_wildcards() {
        assert_eq!(
            MeterId::new("a/b"),
            Err(MeterIdError::BadCharacter {
                character: '/',
                offset: 1
            })
        );
        assert!(GatewayId::new("gw#1").is_err());
        assert_eq!(MeterId::new(""), Err(MeterIdError::Empty));
    }

    #[test]
    fn partition_is_stable_and_bounded() {
        // Pinned values: changing the hash would silently move meters between workers.
        assert_eq!(
            partition_of("cjt188:78330011223344", 16),
            partition_of("cjt188:78330011223344", 16)
        );
        assert_eq!(
            partition_of("", 16),
            (0xcbf2_9ce4_8422_2325_u64 % 16) as u16
        );
        for i in 0..1000 {
            assert!(partition_of(&format!("m{i}"), 7) < 7);
        }
        assert_eq!(partition_of("x", 0), 0);
    }
}
