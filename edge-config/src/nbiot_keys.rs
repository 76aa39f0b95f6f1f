//! The NB-IoT key file a CoAP source refers to (`key_file`), and the operator allow-list.
//!
//! The key file is a TOML table of meter id → 32 hex digits (AES-128-sized HMAC key):
//!
//! ```toml
//! "cjt188:78330011223344" = "000102030405060708090a0b0c0d0e0f"
//! ```
//!
//! Keys live only in that file (mode 0600, owned by the gateway user), never in the main
//! configuration, so the configuration can be shared, logged and diffed. Errors name the line,
//! never the content: a typo must not print a key into a log.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use model::MeterId;

/// The meters' keys, by meter id. `Debug` shows the count only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NbiotKeys(BTreeMap<MeterId, [u8; 16]>);

impl fmt::Debug for NbiotKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NbiotKeys({} keys)", self.0.len())
    }
}

impl NbiotKeys {
    /// The key of `meter`.
    pub fn get(&self, meter: &MeterId) -> Option<&[u8; 16]> {
        self.0.get(meter)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Keys from (meter, key) pairs (tests, simulators).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (MeterId, [u8; 16])>) -> Self {
        Self(pairs.into_iter().collect())
    }

    /// The pairs, for writing a key file.
    pub fn iter(&self) -> impl Iterator<Item = (&MeterId, &[u8; 16])> {
        self.0.iter()
    }

    /// The key file text of these keys.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# NB-IoT meter keys: meter id = 32 hex digits\n");
        for (m, k) in &self.0 {
            out.push_str(&format!("\"{m}\" = \"{}\"\n", hex::encode(k)));
        }
        out
    }
}

/// Why a key file was refused (no key material in the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read the key file: {0}")]
    Read(String),
    /// The file is not a TOML table of strings.
    #[error("line {line}: not a `\"meter id\" = \"32 hex digits\"` entry")]
    Syntax {
        /// 1-based line.
        line: usize,
    },
    /// An entry's name is not a meter id.
    #[error("`{0}` is not a meter id")]
    Meter(String),
    /// An entry's key is not 32 hex digits.
    #[error("the key of `{0}` is not 32 hex digits")]
    Key(String),
}

/// Parses key file text.
///
/// # Errors
/// The first [`KeyFileError`].
pub fn parse(text: &str) -> Result<NbiotKeys, KeyFileError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| KeyFileError::Syntax {
        line: e.span().map_or(0, |s| {
            text.get(..s.start).unwrap_or("").matches('\n').count() + 1
        }),
    })?;
    let mut keys = BTreeMap::new();
    for (name, value) in table {
        let meter = MeterId::new(name.clone()).map_err(|_| KeyFileError::Meter(name.clone()))?;
        let key = value
            .as_str()
            .and_then(|v| hex::decode(v.trim()).ok())
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .ok_or(KeyFileError::Key(name))?;
        keys.insert(meter, key);
    }
    Ok(NbiotKeys(keys))
}

/// Reads a key file.
///
/// # Errors
/// [`KeyFileError`] if it cannot be read or parsed.
pub fn load(path: &Path) -> Result<NbiotKeys, KeyFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KeyFileError::Read(format!("{}: {e}", path.display())))?;
    parse(&text)
}

/// An address range of the operator allow-list: `10.64.0.0/10`, `2001:db8::/32` or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl IpRange {
    /// Parses `addr[/prefix]`.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.trim().parse::<IpAddr>().ok()?,
                Some(p.trim().parse::<u8>().ok()?),
            ),
            None => (s.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { addr, prefix })
    }

    /// Whether `ip` is inside the range (an IPv4-mapped IPv6 peer counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_parses_and_never_shows_keys() {
        let keys =
            parse("# comment\n\"cjt188:78330011223344\" = \"000102030405060708090a0b0c0d0e0f\"\n")
                .unwrap();
        let m = MeterId::new("cjt188:78330011223344").unwrap();
        assert_eq!(keys.get(&m).unwrap()[15], 0x0f);
        assert_eq!(format!("{keys:?}"), "NbiotKeys(1 keys)");
        assert_eq!(parse(&keys.to_toml()).unwrap(), keys);
        let bad = parse("\"cjt188:1\" = \"00112233445566778899aabbccddeefX\"\n").unwrap_err();
        assert!(!bad.to_string().contains("0011"), "{bad}");
        assert_eq!(
            parse("\"cjt188:1\" = 00112233\n"),
            Err(KeyFileError::Syntax { line: 1 })
        );
        assert_eq!(
            parse("\"bad id!\" = \"000102030405060708090a0b0c0d0e0f\"\n"),
            Err(KeyFileError::Meter("bad id!".into()))
        );
    }

    #[test]
    fn ip_ranges() {
        let r = IpRange::parse("10.64.0.0/10").unwrap();
        assert!(r.contains("10.100.1.2".parse().unwrap()));
        assert!(!r.contains("10.128.0.1".parse().unwrap()));
        assert!(r.contains("::ffff:10.64.0.9".parse().unwrap()));
        let one = IpRange::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(
            IpRange::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            IpRange::parse("2001:db8::/32")
                .unwrap()
                .contains("2001:db8::1".parse().unwrap())
        );
        assert_eq!(IpRange::parse("10.0.0.0/33"), None);
        assert_eq!(IpRange::parse("nonsense"), None);
    }
}
