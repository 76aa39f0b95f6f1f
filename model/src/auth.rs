//! Message authentication shared by the gateway, the simulators and the API (pure: the caller
//! passes the clock).
//!
//! - **Signed HTTP requests** (IoT-platform push, IF-METER-004): one canonical string,
//!   [`canonical_request`], covers method, path, timestamp, nonce and the body's SHA-256;
//!   `X-Signature` is `hex(HMAC-SHA256(secret, canonical))`. [`verify_request`] checks the
//!   signature and the clock skew; [`NonceWindow`] refuses a nonce seen within the window, so
//!   a captured request cannot be replayed while its timestamp is still accepted.
//! - **NB-IoT uplink trailer** ([`seal_uplink`], [`open_uplink`]): a meter appends an 8-byte
//!   frame counter and an 8-byte truncated HMAC-SHA256 under its own key to the CJ/T 188
//!   frames it posts; the gateway's reply (a queued command) is sealed the same way in the
//!   other direction, so a command reaches, and an acknowledgement comes from, only the meter
//!   that holds the key.

use std::collections::{HashMap, VecDeque};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Name and version of the request-signing scheme; the first line of the canonical string.
pub const REQUEST_SCHEME: &str = "WM-HMAC-SHA256-V1";

/// The canonical string a signed request's `X-Signature` is computed over:
///
/// ```text
/// WM-HMAC-SHA256-V1\n<METHOD>\n<path>\n<timestamp>\n<nonce>\n<hex(sha256(body))>
/// ```
///
/// The method is upper-cased; the path is the request target's path without the query.
pub fn canonical_request(
    method: &str,
    path: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    format!(
        "{REQUEST_SCHEME}\n{}\n{path}\n{timestamp}\n{nonce}\n{}",
        method.to_ascii_uppercase(),
        hex::encode(Sha256::digest(body))
    )
}

/// `hex(HMAC-SHA256(secret, canonical_request(..)))`, the `X-Signature` value.
pub fn sign_request(
    secret: &[u8],
    method: &str,
    path: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    let mut mac = hmac_with(secret);
    mac.update(canonical_request(method, path, timestamp, nonce, body).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn hmac_with(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; the fallback is unreachable but keeps this panic-free.
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

/// The signature headers of a request, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    /// `X-Timestamp`: unix seconds.
    pub timestamp: Option<&'a str>,
    /// `X-Nonce`: 16 to 64 characters of `[A-Za-z0-9_-]`, unique per request.
    pub nonce: Option<&'a str>,
    /// `X-Signature`: hex HMAC.
    pub signature: Option<&'a str>,
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthError {
    /// A signature header is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// `X-Timestamp` is not unix seconds.
    #[error("X-Timestamp is not unix seconds")]
    BadTimestamp,
    /// `X-Timestamp` is too far from now.
    #[error("X-Timestamp {timestamp} is more than {max_skew_s} s from now")]
    Skew {
        /// The request's timestamp.
        timestamp: i64,
        /// Largest accepted difference.
        max_skew_s: u64,
    },
    /// `X-Nonce` has the wrong length or characters.
    #[error("X-Nonce must be 16 to 64 characters of [A-Za-z0-9_-]")]
    BadNonce,
    /// `X-Signature` is not hex.
    #[error("X-Signature is not hex")]
    NotHex,
    /// The signature does not match.
    #[error("signature mismatch")]
    Mismatch,
    /// The nonce was already used within the window.
    #[error("nonce already used")]
    Replay,
    /// The replay window is full of unexpired nonces; refused rather than forgetting one.
    #[error("too many requests in the replay window")]
    WindowFull,
}

impl RequestAuthError {
    /// A stable snake_case code (metric label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing_header",
            Self::BadTimestamp => "bad_timestamp",
            Self::Skew { .. } => "clock_skew",
            Self::BadNonce => "bad_nonce",
            Self::NotHex | Self::Mismatch => "bad_signature",
            Self::Replay => "replay",
            Self::WindowFull => "replay_window_full",
        }
    }
}

fn nonce_ok(nonce: &str) -> bool {
    (16..=64).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a signed request's headers, skew and signature (not the nonce's freshness: see
/// [`NonceWindow`]). Returns the request's timestamp.
///
/// # Errors
/// The first problem found, as a [`RequestAuthError`].
pub fn verify_request(
    secret: &[u8],
    method: &str,
    path: &str,
    headers: SignedHeaders<'_>,
    body: &[u8],
    now: i64,
    max_skew_s: u64,
) -> Result<i64, RequestAuthError> {
    let ts = headers
        .timestamp
        .ok_or(RequestAuthError::Missing("X-Timestamp"))?;
    let timestamp: i64 = ts
        .trim()
        .parse()
        .map_err(|_| RequestAuthError::BadTimestamp)?;
    if now.abs_diff(timestamp) > max_skew_s {
        return Err(RequestAuthError::Skew {
            timestamp,
            max_skew_s,
        });
    }
    let nonce = headers.nonce.ok_or(RequestAuthError::Missing("X-Nonce"))?;
    if !nonce_ok(nonce) {
        return Err(RequestAuthError::BadNonce);
    }
    let sig = headers
        .signature
        .ok_or(RequestAuthError::Missing("X-Signature"))?;
    let sig = hex::decode(sig.trim()).map_err(|_| RequestAuthError::NotHex)?;
    let mut mac = hmac_with(secret);
    mac.update(canonical_request(method, path, timestamp, nonce, body).as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&sig)
        .map_err(|_| RequestAuthError::Mismatch)?;
    Ok(timestamp)
}

/// Nonces seen within the replay window (twice the accepted skew: a request is accepted for
/// timestamps in `now ± skew`, so its nonce must be remembered until `timestamp + skew`).
/// Bounded: when `capacity` unexpired nonces are held, new requests are refused
/// ([`RequestAuthError::WindowFull`]) rather than an old nonce forgotten, which would make its
/// request replayable.
#[derive(Debug)]
pub struct NonceWindow {
    capacity: usize,
    max_skew_s: u64,
    seen: HashMap<String, i64>,
    /// (expiry, nonce) in insertion order; expiries are not monotonic (timestamps vary within
    /// the skew), so an entry is dropped once it and everything before it have expired.
    order: VecDeque<(i64, String)>,
}

impl NonceWindow {
    /// A window for requests accepted within `max_skew_s`, holding at most `capacity` nonces.
    pub fn new(capacity: usize, max_skew_s: u64) -> Self {
        Self {
            capacity,
            max_skew_s,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `nonce` of a verified request with `timestamp`.
    ///
    /// # Errors
    /// [`RequestAuthError::Replay`] if it was seen and has not expired,
    /// [`RequestAuthError::WindowFull`] if the window holds `capacity` live nonces.
    pub fn check_and_insert(
        &mut self,
        nonce: &str,
        timestamp: i64,
        now: i64,
    ) -> Result<(), RequestAuthError> {
        self.expire(now);
        if let Some(expiry) = self.seen.get(nonce)
            && *expiry >= now
        {
            return Err(RequestAuthError::Replay);
        }
        if self.seen.len() >= self.capacity {
            return Err(RequestAuthError::WindowFull);
        }
        let skew = i64::try_from(self.max_skew_s).unwrap_or(i64::MAX);
        let expiry = timestamp.saturating_add(skew);
        self.seen.insert(nonce.to_owned(), expiry);
        self.order.push_back((expiry, nonce.to_owned()));
        Ok(())
    }

    fn expire(&mut self, now: i64) {
        // Dropping only from the front keeps this O(1) amortised; an entry behind a later
        // expiry waits a little longer, which only makes the check stricter.
        while let Some((expiry, _)) = self.order.front()
            && *expiry < now
        {
            if let Some((expiry, nonce)) = self.order.pop_front()
                && self.seen.get(&nonce) == Some(&expiry)
            {
                self.seen.remove(&nonce);
            }
        }
    }

    /// Nonces held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Length of the NB-IoT uplink trailer: 8-byte counter + 8-byte tag.
pub const UPLINK_TRAILER_LEN: usize = 16;

/// Direction byte of a sealed NB-IoT message (meter → gateway or gateway → meter), so a
/// gateway reply can never be replayed to the gateway as an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Meter to gateway (CoAP request payload).
    Uplink,
    /// Gateway to meter (CoAP reply payload).
    Downlink,
}

fn uplink_tag(
    key: &[u8; 16],
    direction: Direction,
    meter: &str,
    counter: u64,
    body: &[u8],
) -> [u8; 8] {
    let mut mac = hmac_with(key);
    mac.update(b"WM-NBIOT-V1");
    mac.update(&[match direction {
        Direction::Uplink => 0x55,
        Direction::Downlink => 0xDD,
    }]);
    mac.update(meter.as_bytes());
    mac.update(&[0]);
    mac.update(&counter.to_be_bytes());
    mac.update(body);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; 8];
    for (t, f) in tag.iter_mut().zip(full.iter()) {
        *t = *f;
    }
    tag
}

/// Appends the trailer `counter (u64 BE) ‖ HMAC-SHA256(key, "WM-NBIOT-V1" ‖ dir ‖ meter ‖ 0 ‖
/// counter ‖ body)[..8]` to `body`. `meter` is the meter id (`cjt188:…`); a downlink carries
/// the counter of the uplink it answers.
pub fn seal_uplink(
    key: &[u8; 16],
    direction: Direction,
    meter: &str,
    counter: u64,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + UPLINK_TRAILER_LEN);
    out.extend_from_slice(body);
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(&uplink_tag(key, direction, meter, counter, body));
    out
}

/// Splits a sealed message into body and counter without checking the tag (to find the
/// meter, whose key checks it, from the body).
pub fn split_sealed(sealed: &[u8]) -> Option<(&[u8], u64, &[u8])> {
    let split = sealed.len().checked_sub(UPLINK_TRAILER_LEN)?;
    let (body, trailer) = sealed.split_at(split);
    let (counter, tag) = trailer.split_at(8);
    let counter = u64::from_be_bytes(counter.try_into().ok()?);
    Some((body, counter, tag))
}

/// Why a sealed NB-IoT message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Shorter than the trailer.
    #[error("message of {len} bytes has no {UPLINK_TRAILER_LEN}-byte trailer")]
    NoTrailer {
        /// Message length.
        len: usize,
    },
    /// The tag does not match (wrong key, altered body or counter).
    #[error("authentication tag mismatch")]
    BadTag,
}

/// Checks a sealed message of `meter` and returns its body and counter (the caller checks that
/// the counter grows).
///
/// # Errors
/// [`SealError`] if there is no trailer or the tag does not verify.
pub fn open_uplink<'a>(
    key: &[u8; 16],
    direction: Direction,
    meter: &str,
    sealed: &'a [u8],
) -> Result<(&'a [u8], u64), SealError> {
    let (body, counter, tag) =
        split_sealed(sealed).ok_or(SealError::NoTrailer { len: sealed.len() })?;
    let expected = uplink_tag(key, direction, meter, counter, body);
    // Constant-time comparison of the truncated tag.
    let diff = expected
        .iter()
        .zip(tag.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 || tag.len() != expected.len() {
        return Err(SealError::BadTag);
    }
    Ok((body, counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "n-0123456789abcdef";

    fn headers<'a>(ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            timestamp: Some(ts),
            nonce: Some(NONCE),
            signature: Some(sig),
        }
    }

    #[test]
    fn canonical_string_is_pinned() {
        assert_eq!(
            canonical_request("post", "/v1/push", 1_700_000_000, NONCE, b"{}"),
            "WM-HMAC-SHA256-V1\nPOST\n/v1/push\n1700000000\nn-0123456789abcdef\n\
             44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        // Reference: printf '%s' "$canonical" | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign_request(b"secret", "POST", "/v1/push", 1_700_000_000, NONCE, b"{}"),
            "30a14b2f8db96ad37995955e1350a6bfd5feacf1b29c13da236591e1d3301294"
        );
    }

    #[test]
    fn signature_covers_every_part() {
        let sig = sign_request(b"k", "POST", "/v1/push", 1000, NONCE, b"body");
        let ok = verify_request(
            b"k",
            "POST",
            "/v1/push",
            headers("1000", &sig),
            b"body",
            1100,
            300,
        );
        assert_eq!(ok, Ok(1000));
        for (method, path, body) in [
            ("PUT", "/v1/push", &b"body"[..]),
            ("POST", "/v1/other", b"body"),
            ("POST", "/v1/push", b"bodx"),
        ] {
            assert_eq!(
                verify_request(b"k", method, path, headers("1000", &sig), body, 1100, 300),
                Err(RequestAuthError::Mismatch)
            );
        }
        // Another timestamp or nonce under the same signature.
        assert_eq!(
            verify_request(
                b"k",
                "POST",
                "/v1/push",
                headers("1001", &sig),
                b"body",
                1100,
                300
            ),
            Err(RequestAuthError::Mismatch)
        );
        let other_nonce = SignedHeaders {
            nonce: Some("n-0123456789abcdeX"),
            ..headers("1000", &sig)
        };
        assert_eq!(
            verify_request(b"k", "POST", "/v1/push", other_nonce, b"body", 1100, 300),
            Err(RequestAuthError::Mismatch)
        );
        assert_eq!(
            verify_request(
                b"k",
                "POST",
                "/v1/push",
                headers("1000", &sig),
                b"body",
                1400,
                300
            )
            .map_err(|e| e.code()),
            Err("clock_skew")
        );
        let short = SignedHeaders {
            nonce: Some("short"),
            ..headers("1000", &sig)
        };
        assert_eq!(
            verify_request(b"k", "POST", "/v1/push", short, b"body", 1100, 300),
            Err(RequestAuthError::BadNonce)
        );
        let missing = SignedHeaders {
            nonce: None,
            ..headers("1000", &sig)
        };
        assert_eq!(
            verify_request(b"k", "POST", "/v1/push", missing, b"body", 1100, 300),
            Err(RequestAuthError::Missing("X-Nonce"))
        );
    }

    #[test]
    fn nonce_window_refuses_replays_until_expiry_and_is_bounded() {
        let mut w = NonceWindow::new(2, 300);
        assert_eq!(w.check_and_insert("a", 1000, 1000), Ok(()));
        assert_eq!(
            w.check_and_insert("a", 1000, 1200),
            Err(RequestAuthError::Replay)
        );
        assert_eq!(w.check_and_insert("b", 1000, 1000), Ok(()));
        assert_eq!(
            w.check_and_insert("c", 1000, 1000),
            Err(RequestAuthError::WindowFull)
        );
        // After timestamp + skew the request itself is refused by the skew check, so its
        // nonce can be forgotten.
        assert_eq!(w.check_and_insert("c", 1301, 1301), Ok(()));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn sealed_uplink_round_trip_and_tamper() {
        let key = [7u8; 16];
        let sealed = seal_uplink(&key, Direction::Uplink, "cjt188:1", 42, b"frames");
        assert_eq!(sealed.len(), 6 + UPLINK_TRAILER_LEN);
        assert_eq!(
            open_uplink(&key, Direction::Uplink, "cjt188:1", &sealed),
            Ok((&b"frames"[..], 42))
        );
        assert_eq!(
            open_uplink(&key, Direction::Downlink, "cjt188:1", &sealed),
            Err(SealError::BadTag)
        );
        assert_eq!(
            open_uplink(&key, Direction::Uplink, "cjt188:2", &sealed),
            Err(SealError::BadTag)
        );
        assert_eq!(
            open_uplink(&[8u8; 16], Direction::Uplink, "cjt188:1", &sealed),
            Err(SealError::BadTag)
        );
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(
            open_uplink(&key, Direction::Uplink, "cjt188:1", &flipped),
            Err(SealError::BadTag)
        );
        let mut counter = sealed.clone();
        counter[6 + 7] ^= 1;
        assert_eq!(
            open_uplink(&key, Direction::Uplink, "cjt188:1", &counter),
            Err(SealError::BadTag)
        );
        assert_eq!(
            open_uplink(&key, Direction::Uplink, "cjt188:1", b"short"),
            Err(SealError::NoTrailer { len: 5 })
        );
    }
}
