//! Configuration of the wireless M-Bus UDP receiver (`kind = "wmbus_udp"`).
//!
//! A USB receiver (IM871A, rtl-wmbus...) forwards each telegram, L field first and without
//! CRCs, as one UDP datagram to `listen`. Per-meter AES keys decrypt mode 5/7 telegrams.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Why a wM-Bus source configuration is invalid; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WmbusConfigError {
    /// A field has a value outside its allowed range or form.
    #[error("{field}: {reason}")]
    Invalid {
        /// Field path (`keys."mbus:KAM12345678"`).
        field: String,
        /// What is wrong and what was expected (never the key itself).
        reason: String,
    },
}

impl crate::FieldPath for WmbusConfigError {
    fn field_path(&self) -> &str {
        match self {
            Self::Invalid { field, .. } => field,
        }
    }
}

/// The wM-Bus UDP receiver.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WmbusUdpSourceConfig {
    /// Source instance id (the `[[source]]` table's `id`; the runtime passes it to the source
    /// as `SourceContext::source_id`).
    #[serde(default)]
    pub id: String,
    /// Address to bind, `host:port`.
    pub listen: String,
    /// The same telegram received again (through several repeaters) within this window is
    /// dropped.
    #[serde(default = "default_dedup_window", with = "humantime_serde")]
    pub dedup_window: Duration,
    /// AES-128 keys by meter id `mbus:<MAN><8 digits>`, 32 hex digits each.
    #[serde(default)]
    pub keys: BTreeMap<String, crate::Secret>,
    /// UTC offset of the meters' clocks in minutes (e.g. 60 for CET). With it, a telegram's own
    /// date-time record (type F/I) is the readings' time (clock source `meter`); without it,
    /// or for a telegram without one, the receive time is used.
    #[serde(default)]
    pub meter_utc_offset_minutes: Option<i16>,
    /// Kernel receive buffer of the UDP socket (`SO_RCVBUF`), bytes: holds the datagrams of a
    /// burst (hundreds of meters at once) while the receiver decodes. The kernel caps it at
    /// `net.core.rmem_max`; the gateway logs the size it got.
    #[serde(default = "default_recv_buffer_bytes")]
    pub recv_buffer_bytes: usize,
    /// Most compact telegrams (CI 79) held while their format is unknown (no full frame of
    /// that meter or model seen yet, e.g. after a restart); the oldest is dropped for a new
    /// one. 0 turns holding off (such telegrams are only counted).
    #[serde(default = "default_compact_hold_frames")]
    pub compact_hold_frames: usize,
    /// How long a held compact telegram waits for its full frame before it is dropped (and
    /// counted as expired). Meters send a full frame every few minutes to hours.
    #[serde(default = "default_compact_hold_max_age", with = "humantime_serde")]
    pub compact_hold_max_age: Duration,
}

// Hand-written so keys never reach a log.
impl std::fmt::Debug for WmbusUdpSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WmbusUdpSourceConfig")
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("dedup_window", &self.dedup_window)
            .field("meter_utc_offset_minutes", &self.meter_utc_offset_minutes)
            .field("recv_buffer_bytes", &self.recv_buffer_bytes)
            .field("compact_hold_frames", &self.compact_hold_frames)
            .field("compact_hold_max_age", &self.compact_hold_max_age)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn default_dedup_window() -> Duration {
    Duration::from_secs(10)
}

/// 4 MiB: about 4 000 queued telegrams (each datagram costs about 1 KiB of kernel memory).
fn default_recv_buffer_bytes() -> usize {
    4 * 1024 * 1024
}

/// 1 024 held compact telegrams: at most about 256 KiB (a telegram is at most 256 bytes).
fn default_compact_hold_frames() -> usize {
    1024
}

/// 1 h: covers the full-frame interval of common meters (every 8th or 16th telegram at
/// 16–120 s intervals) with room to spare.
fn default_compact_hold_max_age() -> Duration {
    Duration::from_secs(3600)
}

/// Most held compact telegrams accepted (16 MiB at 256 bytes each).
const MAX_COMPACT_HOLD: usize = 65_536;
/// Longest accepted hold of a compact telegram.
const MAX_COMPACT_HOLD_AGE: Duration = Duration::from_secs(24 * 3600);

/// Smallest accepted receive buffer (below it the kernel's own minimum applies anyway).
const MIN_RECV_BUFFER: usize = 4096;
/// Largest accepted receive buffer.
const MAX_RECV_BUFFER: usize = 1 << 30;

/// Whether `id` has the form `mbus:<3 upper-case letters><8 digits>`.
fn is_mbus_meter_id(id: &str) -> bool {
    id.strip_prefix("mbus:").is_some_and(|rest| {
        rest.len() == 11
            && rest.bytes().take(3).all(|b| b.is_ascii_uppercase())
            && rest.bytes().skip(3).all(|b| b.is_ascii_digit())
    })
}

impl WmbusUdpSourceConfig {
    /// A config listening on `listen` with no keys.
    pub fn new(listen: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            listen: listen.into(),
            dedup_window: default_dedup_window(),
            keys: BTreeMap::new(),
            meter_utc_offset_minutes: None,
            recv_buffer_bytes: default_recv_buffer_bytes(),
            compact_hold_frames: default_compact_hold_frames(),
            compact_hold_max_age: default_compact_hold_max_age(),
        }
    }

    /// Checks every field; returns all problems found.
    pub fn validate(&self) -> Result<(), Vec<WmbusConfigError>> {
        let mut errors = Vec::new();
        let invalid = |field: String, reason: String| WmbusConfigError::Invalid { field, reason };
        match self.listen.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => errors.push(invalid(
                "listen".into(),
                format!("{:?} is not host:port", self.listen),
            )),
        }
        if self.dedup_window > Duration::from_secs(3600) {
            errors.push(invalid("dedup_window".into(), "must be at most 1 h".into()));
        }
        if let Some(m) = self.meter_utc_offset_minutes
            && !(-18 * 60..=18 * 60).contains(&m)
        {
            errors.push(invalid(
                "meter_utc_offset_minutes".into(),
                format!("{m} is outside -1080..=1080 (±18 h)"),
            ));
        }
        if !(MIN_RECV_BUFFER..=MAX_RECV_BUFFER).contains(&self.recv_buffer_bytes) {
            errors.push(invalid(
                "recv_buffer_bytes".into(),
                format!(
                    "{} is outside {MIN_RECV_BUFFER}..={MAX_RECV_BUFFER}",
                    self.recv_buffer_bytes
                ),
            ));
        }
        if self.compact_hold_frames > MAX_COMPACT_HOLD {
            errors.push(invalid(
                "compact_hold_frames".into(),
                format!(
                    "{} is more than {MAX_COMPACT_HOLD}",
                    self.compact_hold_frames
                ),
            ));
        }
        if self.compact_hold_max_age > MAX_COMPACT_HOLD_AGE {
            errors.push(invalid(
                "compact_hold_max_age".into(),
                "must be at most 24 h".into(),
            ));
        }
        for (meter, key) in &self.keys {
            let field = format!("keys.{meter:?}");
            if !is_mbus_meter_id(meter) {
                errors.push(invalid(
                    field.clone(),
                    "meter id must be mbus:<MAN><8 digits>, e.g. mbus:KAM12345678".into(),
                ));
            }
            if key.len() != 32 || !key.expose().bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.push(invalid(
                    field,
                    format!("key must be 32 hex digits (got {} characters)", key.len()),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The keys as bytes, by meter id; entries that fail [`Self::validate`] are left out.
    pub fn key_map(&self) -> std::collections::HashMap<String, [u8; 16]> {
        self.keys
            .iter()
            .filter_map(|(meter, key)| {
                let bytes = hex::decode(key.expose()).ok()?;
                Some((meter.clone(), <[u8; 16]>::try_from(bytes).ok()?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_validates_and_hides_keys() {
        let c: WmbusUdpSourceConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:9011"
            dedup_window = "5s"
            meter_utc_offset_minutes = 60
            recv_buffer_bytes = 8388608
            compact_hold_frames = 50
            compact_hold_max_age = "10m"
            [keys]
            "mbus:KAM12345678" = "000102030405060708090A0B0C0D0E0F"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.dedup_window, Duration::from_secs(5));
        assert_eq!(c.meter_utc_offset_minutes, Some(60));
        assert_eq!(c.recv_buffer_bytes, 8 << 20);
        assert_eq!(c.compact_hold_frames, 50);
        assert_eq!(c.compact_hold_max_age, Duration::from_secs(600));
        let defaults = WmbusUdpSourceConfig::new("0.0.0.0:1");
        assert_eq!(defaults.recv_buffer_bytes, 4 << 20);
        assert_eq!(defaults.meter_utc_offset_minutes, None);
        assert_eq!(defaults.compact_hold_frames, 1024);
        assert_eq!(defaults.compact_hold_max_age, Duration::from_secs(3600));
        let keys = c.key_map();
        assert_eq!(keys["mbus:KAM12345678"][15], 0x0F);
        let debug = format!("{c:?}");
        assert!(!debug.contains("0A0B"), "{debug}");
        assert!(debug.contains("mbus:KAM12345678"));
    }

    #[test]
    fn errors_name_the_field_not_the_key() {
        let mut c = WmbusUdpSourceConfig::new("nowhere");
        c.keys.insert("kam1".into(), "secretsecret".into());
        c.meter_utc_offset_minutes = Some(-1200);
        c.recv_buffer_bytes = 10;
        c.compact_hold_frames = 100_000;
        c.compact_hold_max_age = Duration::from_secs(2 * 24 * 3600);
        let text: Vec<String> = c
            .validate()
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "listen: \"nowhere\" is not host:port",
                "meter_utc_offset_minutes: -1200 is outside -1080..=1080 (±18 h)",
                "recv_buffer_bytes: 10 is outside 4096..=1073741824",
                "compact_hold_frames: 100000 is more than 65536",
                "compact_hold_max_age: must be at most 24 h",
                "keys.\"kam1\": meter id must be mbus:<MAN><8 digits>, e.g. mbus:KAM12345678",
                "keys.\"kam1\": key must be 32 hex digits (got 12 characters)",
            ]
        );
    }
}
