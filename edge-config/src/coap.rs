//! Configuration of the NB-IoT CoAP server (`kind = "coap"`).
//!
//! The raw table is checked once ([`crate::Valid`]); the gateway reads the checked values
//! through the typed accessors of `Valid<CoapSourceConfig>` and never parses them again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Valid;
use crate::nbiot_keys::IpRange;
use crate::valid::{FieldProblem, collected};

/// `kind = "coap"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoapSourceConfig {
    /// Source id.
    pub id: String,
    /// UDP listen address (default port 5683).
    pub listen: SocketAddr,
    /// UTC offset of the meters' clocks in minutes (e.g. 480 for China; -720..=840). Without
    /// it the gateway's receive time is used as the reading time.
    pub meter_utc_offset_minutes: Option<i16>,
    /// How uplinks are authenticated (default `frame_mac`: every payload carries a counter and
    /// a MAC under the meter's key from `key_file`; `none` accepts anyone who reaches the port).
    #[serde(default)]
    pub auth: CoapAuth,
    /// The meters' keys (`nbiot_keys`), relative to the configuration file; needed by
    /// `frame_mac`.
    pub key_file: Option<PathBuf>,
    /// Operator address ranges uplinks may come from (`10.64.0.0/10`, one address...); empty
    /// accepts any address.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Most entries of the retransmission cache (default 10000).
    #[serde(default = "default_exchange_cache_entries")]
    pub exchange_cache_entries: usize,
    /// How long a message id is remembered, seconds (default 247, RFC 7252 EXCHANGE_LIFETIME).
    #[serde(default = "default_exchange_lifetime_s")]
    pub exchange_lifetime_s: u64,
    /// Fingerprint of the key file's content when loaded, so a changed key file makes SIGHUP
    /// restart the source (the keys themselves are read by the source, never kept here).
    #[serde(skip)]
    pub key_file_fingerprint: u64,
}

/// How a CoAP source authenticates uplinks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoapAuth {
    /// Counter and truncated HMAC-SHA256 trailer under the meter's key (`model::auth`).
    #[default]
    FrameMac,
    /// No authentication (test benches, or a network where nothing else can reach the port).
    None,
}

/// The authentication of a checked CoAP source, with what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkAuth<'a> {
    /// Anyone who reaches the port.
    Open,
    /// Counter and MAC under the keys of this file.
    FrameMac {
        /// The meters' key file (resolved against the configuration file's folder).
        key_file: &'a Path,
    },
}

fn default_exchange_cache_entries() -> usize {
    10_000
}

fn default_exchange_lifetime_s() -> u64 {
    247
}

impl CoapSourceConfig {
    /// An unauthenticated source on `listen` with default limits.
    pub fn new(id: impl Into<String>, listen: SocketAddr) -> Self {
        Self {
            id: id.into(),
            listen,
            meter_utc_offset_minutes: None,
            auth: CoapAuth::None,
            key_file: None,
            allow: Vec::new(),
            exchange_cache_entries: default_exchange_cache_entries(),
            exchange_lifetime_s: default_exchange_lifetime_s(),
            key_file_fingerprint: 0,
        }
    }

    /// Checks every field; returns all problems found.
    ///
    /// # Errors
    /// Every problem, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems = Vec::new();
        if let Some(m) = self.meter_utc_offset_minutes
            && !(-720..=840).contains(&m)
        {
            problems.push(FieldProblem::new(
                "meter_utc_offset_minutes",
                format!("{m} is outside -720..=840 (UTC-12:00 to UTC+14:00)"),
            ));
        }
        if self.auth == CoapAuth::FrameMac && self.key_file.is_none() {
            problems.push(FieldProblem::new(
                "key_file",
                "auth = \"frame_mac\" (the default) needs key_file, the meters' keys; set \
                 auth = \"none\" to accept unauthenticated uplinks",
            ));
        }
        for (j, a) in self.allow.iter().enumerate() {
            if IpRange::parse(a).is_none() {
                problems.push(FieldProblem::new(
                    format!("allow[{j}]"),
                    format!("`{a}` is not an address or address/prefix"),
                ));
            }
        }
        if !(1..=1_000_000).contains(&self.exchange_cache_entries) {
            problems.push(FieldProblem::new(
                "exchange_cache_entries",
                format!("{} is outside 1..=1000000", self.exchange_cache_entries),
            ));
        }
        if !(1..=3600).contains(&self.exchange_lifetime_s) {
            problems.push(FieldProblem::new(
                "exchange_lifetime_s",
                format!("{} is outside 1..=3600", self.exchange_lifetime_s),
            ));
        }
        collected(problems)
    }
}

impl Valid<CoapSourceConfig> {
    /// How uplinks are authenticated.
    pub fn uplink_auth(&self) -> UplinkAuth<'_> {
        match (self.auth, self.key_file.as_deref()) {
            (CoapAuth::None, _) => UplinkAuth::Open,
            (CoapAuth::FrameMac, Some(key_file)) => UplinkAuth::FrameMac { key_file },
            // The check refuses frame_mac without key_file, so this is never reached; an empty
            // path fails closed (no key file loads) instead of opening the port.
            (CoapAuth::FrameMac, None) => UplinkAuth::FrameMac {
                key_file: Path::new(""),
            },
        }
    }

    /// The meters' clock offset from UTC, in seconds (`None`: use the receive time).
    pub fn meter_utc_offset_s(&self) -> Option<i32> {
        self.meter_utc_offset_minutes.map(|m| i32::from(m) * 60)
    }

    /// The operator allow-list (empty: any address).
    pub fn allow_ranges(&self) -> Vec<IpRange> {
        // Every entry parsed when checked.
        self.allow
            .iter()
            .filter_map(|a| IpRange::parse(a))
            .collect()
    }

    /// How long a message id is remembered.
    pub fn exchange_lifetime(&self) -> Duration {
        Duration::from_secs(self.exchange_lifetime_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_values_are_typed() {
        let mut c = CoapSourceConfig::new("nb", "127.0.0.1:5683".parse().unwrap());
        c.allow = vec!["10.64.0.0/10".into(), "bogus".into()];
        c.auth = CoapAuth::FrameMac;
        c.meter_utc_offset_minutes = Some(900);
        c.exchange_lifetime_s = 0;
        let text: Vec<String> = Valid::new(c.clone())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            text,
            [
                "meter_utc_offset_minutes: 900 is outside -720..=840 (UTC-12:00 to UTC+14:00)",
                "key_file: auth = \"frame_mac\" (the default) needs key_file, the meters' keys; \
                 set auth = \"none\" to accept unauthenticated uplinks",
                "allow[1]: `bogus` is not an address or address/prefix",
                "exchange_lifetime_s: 0 is outside 1..=3600",
            ]
        );
        c.allow.pop();
        c.key_file = Some("keys.toml".into());
        c.meter_utc_offset_minutes = Some(480);
        c.exchange_lifetime_s = 60;
        let v = Valid::new(c).unwrap();
        assert_eq!(
            v.uplink_auth(),
            UplinkAuth::FrameMac {
                key_file: Path::new("keys.toml")
            }
        );
        assert_eq!(v.allow_ranges().len(), 1);
        assert_eq!(v.meter_utc_offset_s(), Some(480 * 60));
        assert_eq!(v.exchange_lifetime(), Duration::from_secs(60));
    }
}
