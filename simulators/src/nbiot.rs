//! NB-IoT meters: CoAP uplinks to the gateway, IoT-platform HTTP pushes, and wM-Bus radio
//! telegrams injected into the gateway's UDP receiver interface.
//!
//! CoAP follows CONTRACTS.md: CON POST `/up` with CJ/T 188 read-data replies (one, or a day of
//! hourly ones back to back, see [`crate::fleet::NbiotUplink`]); the 2.04 response's payload
//! is the next queued downlink (valve control) or empty; the meter executes a valve command
//! and answers with the valve reply (C=84) as another POST, or, without a valve, refuses it
//! with the abnormal reply (C=C4).
//!
//! With a key ([`meter_key`], from the fleet's `nbiot_key_seed`) a meter speaks the gateway's
//! `frame_mac` scheme (`model::auth`): every uplink is sealed with a fresh counter
//! ([`next_counter`]) and a MAC, and a downlink is executed only if it is sealed under the
//! meter's key for the counter of the uplink it answers.

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Payload};
use hmac::{Hmac, Mac};
use model::auth::{self, Direction};
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Why a device could not deliver a frame.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Socket error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer after every retransmission.
    #[error("no answer from {peer} after {attempts} attempts")]
    Timeout {
        /// Gateway address.
        peer: SocketAddr,
        /// Attempts made.
        attempts: u32,
    },
    /// The gateway answered something other than success.
    #[error("gateway {peer} answered {status}")]
    Rejected {
        /// Gateway address.
        peer: SocketAddr,
        /// Status (CoAP code or HTTP status line).
        status: String,
    },
    /// CoAP message could not be built or parsed.
    #[error("coap message: {0}")]
    Coap(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Io { what, source }
}

/// CoAP retransmission: initial timeout and attempts (RFC 7252 uses 2 s and 4 retries; the
/// simulator is on a LAN, so shorter).
const COAP_TIMEOUT: Duration = Duration::from_millis(1500);
const COAP_ATTEMPTS: u32 = 3;

/// Sends one CON POST `/up` with `payload` from `socket` and returns the response payload
/// (piggybacked in the ACK, or a separate CON response which is acknowledged).
///
/// # Errors
/// [`DeviceError::Timeout`] after the retransmissions, [`DeviceError::Rejected`] for a
/// non-2.xx response.
pub async fn coap_post(
    socket: &UdpSocket,
    gateway: SocketAddr,
    message_id: u16,
    token: [u8; 4],
    payload: Vec<u8>,
) -> Result<Vec<u8>, DeviceError> {
    let mut req = Packet::new();
    req.header.set_type(MessageType::Confirmable);
    req.header.code = MessageClass::Request(RequestType::Post);
    req.header.message_id = message_id;
    req.set_token(token.to_vec());
    req.add_option(CoapOption::UriPath, b"up".to_vec());
    req.payload = payload;
    let bytes = req
        .to_bytes()
        .map_err(|e| DeviceError::Coap(e.to_string()))?;
    let mut buf = vec![0u8; 2048];
    let mut acked = false;
    for attempt in 0..COAP_ATTEMPTS {
        if !acked {
            socket
                .send_to(&bytes, gateway)
                .await
                .map_err(io("sending coap request"))?;
        }
        let wait = COAP_TIMEOUT * 2u32.pow(attempt);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let recv = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await;
            let Ok(recv) = recv else {
                break;
            };
            let (n, from) = recv.map_err(io("receiving coap response"))?;
            let Some(data) = buf.get(..n) else { continue };
            let Ok(resp) = Packet::from_bytes(data) else {
                continue;
            };
            let ours_by_id = resp.header.message_id == message_id
                && matches!(
                    resp.header.get_type(),
                    MessageType::Acknowledgement | MessageType::Reset
                );
            let ours_by_token = resp.get_token() == token;
            if resp.header.get_type() == MessageType::Reset && ours_by_id {
                return Err(DeviceError::Rejected {
                    peer: gateway,
                    status: "RST".into(),
                });
            }
            if ours_by_id && resp.header.code == MessageClass::Empty {
                // Empty ACK: a separate response follows.
                acked = true;
                continue;
            }
            if !(ours_by_id || ours_by_token) {
                continue;
            }
            if resp.header.get_type() == MessageType::Confirmable {
                let mut ack = Packet::new();
                ack.header.set_type(MessageType::Acknowledgement);
                ack.header.message_id = resp.header.message_id;
                ack.header.code = MessageClass::Empty;
                if let Ok(ack) = ack.to_bytes() {
                    socket
                        .send_to(&ack, from)
                        .await
                        .map_err(io("acknowledging coap response"))?;
                }
            }
            return match resp.header.code {
                MessageClass::Response(
                    ResponseType::Changed
                    | ResponseType::Created
                    | ResponseType::Content
                    | ResponseType::Valid
                    | ResponseType::Continue,
                ) => Ok(resp.payload),
                other => Err(DeviceError::Rejected {
                    peer: gateway,
                    status: other.to_string(),
                }),
            };
        }
    }
    Err(DeviceError::Timeout {
        peer: gateway,
        attempts: COAP_ATTEMPTS,
    })
}

/// A downlink a meter received and executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValveCommand {
    /// Open (true) or close.
    pub open: bool,
    /// SER of the command (echoed in the reply).
    pub ser: u8,
}

/// Interprets a 2.04 payload addressed to the meter at `address`: a valve-control write is
/// returned; anything else (empty, other meter, other DI) is ignored.
pub fn downlink_valve(payload: &[u8], address: &[u8; 7]) -> Option<ValveCommand> {
    if payload.is_empty() {
        return None;
    }
    let frame = match cjt188::parse(payload) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "meter ignored an undecodable downlink");
            return None;
        }
    };
    if frame.address != *address && frame.address != [0xAA; 7] {
        return None;
    }
    match frame.payload {
        Payload::Valve { open } => Some(ValveCommand {
            open,
            ser: frame.ser,
        }),
        _ => None,
    }
}

/// Builds the valve reply (C=84, DI A017) a meter sends after executing `cmd`.
pub fn valve_reply(meter_type: u8, address: [u8; 7], cmd: ValveCommand, status: u16) -> Vec<u8> {
    cjt188::encode(&Cjt188Frame::valve_reply(
        meter_type, address, cmd.ser, status,
    ))
}

/// Builds the abnormal reply (C = 0xC4, DI A017, SER echoed, the meter's status word) a meter
/// without a valve sends instead of executing `cmd` (CJ/T 188 §3.3: abnormal response to a
/// write).
pub fn valve_refusal(meter_type: u8, address: [u8; 7], cmd: ValveCommand, status: u16) -> Vec<u8> {
    let request = Cjt188Frame::valve_control(meter_type, address, cmd.ser, cmd.open);
    cjt188::encode(&Cjt188Frame::abnormal_reply(&request, status))
}

/// The NB-IoT key of `meter` derived from the fleet's key seed:
/// `HMAC-SHA256(seed, "wm-sim-nbiot-key" ‖ meter id)[..16]`. Simulation only: real meters get
/// random keys at provisioning.
pub fn meter_key(seed: &str, meter: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    // HMAC accepts keys of any length, so this cannot fail.
    if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(seed.as_bytes()) {
        mac.update(b"wm-sim-nbiot-key");
        mac.update(meter.as_bytes());
        for (k, b) in key.iter_mut().zip(mac.finalize().into_bytes()) {
            *k = b;
        }
    }
    key
}

/// The next uplink counter. One process-wide sequence started at the wall clock in
/// microseconds, so every meter's counters grow, also across simulator restarts.
pub fn next_counter() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut current = NEXT.load(Ordering::Relaxed);
    loop {
        let next = current.saturating_add(1).max(now);
        match NEXT.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => current = seen,
        }
    }
}

/// Seals an uplink payload of `meter` with `key` and a fresh counter; returns it with the
/// counter (the gateway's reply to it is sealed for that counter).
pub fn seal_uplink(key: &[u8; 16], meter: &str, payload: &[u8]) -> (Vec<u8>, u64) {
    let counter = next_counter();
    (
        auth::seal_uplink(key, Direction::Uplink, meter, counter, payload),
        counter,
    )
}

/// The body of a sealed downlink for `meter` answering the uplink with `counter`; `None` (and
/// a warning) if it is not sealed under the meter's key for that counter: the meter ignores it.
pub fn open_downlink(key: &[u8; 16], meter: &str, counter: u64, payload: &[u8]) -> Option<Vec<u8>> {
    if payload.is_empty() {
        return Some(Vec::new());
    }
    match auth::open_uplink(key, Direction::Downlink, meter, payload) {
        Ok((body, c)) if c == counter => Some(body.to_vec()),
        Ok(_) => {
            tracing::warn!(meter, "downlink sealed for another uplink; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(meter, error = %e, "unauthenticated downlink; ignored");
            None
        }
    }
}

/// A nonce no other push of this process uses.
fn push_nonce() -> String {
    format!("sim-{}-{}", std::process::id(), next_counter())
}

/// Returns the push signature over the canonical request (`model::auth::sign_request`).
pub fn push_signature(
    secret: &[u8],
    path: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    auth::sign_request(secret, "POST", path, timestamp, nonce, body)
}

/// POSTs `body` to `http://{addr}{path}` with the push headers (timestamp = wall clock now)
/// and returns the HTTP status code. A minimal HTTP/1.1 client: one request per connection.
///
/// # Errors
/// [`DeviceError::Io`] on connection problems, [`DeviceError::Rejected`] for an unparsable
/// status line.
pub async fn http_push(
    addr: SocketAddr,
    path: &str,
    secret: &[u8],
    body: &[u8],
) -> Result<u16, DeviceError> {
    let ts = time::OffsetDateTime::now_utc().unix_timestamp();
    let nonce = push_nonce();
    let sig = push_signature(secret, path, ts, &nonce, body);
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(io("connecting to the push endpoint"))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nX-Timestamp: {ts}\r\nX-Nonce: {nonce}\r\nX-Signature: {sig}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(io("sending push headers"))?;
    stream
        .write_all(body)
        .await
        .map_err(io("sending push body"))?;
    let mut response = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    // Only the status line matters; stop once it is complete.
    while !response.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .map_err(|_| DeviceError::Timeout {
                peer: addr,
                attempts: 1,
            })?
            .map_err(io("reading push response"))?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(buf.get(..n).unwrap_or(&[]));
    }
    let line = String::from_utf8_lossy(&response);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| DeviceError::Rejected {
            peer: addr,
            status: line.lines().next().unwrap_or("").to_owned(),
        })?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_the_canonical_request_hmac() {
        // The reference pinned in model::auth's tests (computed with openssl).
        assert_eq!(
            push_signature(
                b"secret",
                "/v1/push",
                1_700_000_000,
                "n-0123456789abcdef",
                b"{}"
            ),
            "30a14b2f8db96ad37995955e1350a6bfd5feacf1b29c13da236591e1d3301294"
        );
        let (a, b) = (push_nonce(), push_nonce());
        assert_ne!(a, b);
        assert!((16..=64).contains(&a.len()), "{a}");
    }

    #[test]
    fn sealed_exchange_round_trip() {
        let key = meter_key("seed", "cjt188:78330000000042");
        assert_ne!(key, meter_key("seed", "cjt188:78330000000043"));
        let (sealed, counter) = seal_uplink(&key, "cjt188:78330000000042", b"frame");
        let (_, next) = seal_uplink(&key, "cjt188:78330000000042", b"frame");
        assert!(next > counter);
        assert_eq!(
            auth::open_uplink(&key, Direction::Uplink, "cjt188:78330000000042", &sealed),
            Ok((&b"frame"[..], counter))
        );
        let down = auth::seal_uplink(
            &key,
            Direction::Downlink,
            "cjt188:78330000000042",
            counter,
            b"cmd",
        );
        assert_eq!(
            open_downlink(&key, "cjt188:78330000000042", counter, &down),
            Some(b"cmd".to_vec())
        );
        // Sealed for another uplink, or not sealed at all: ignored.
        assert_eq!(
            open_downlink(&key, "cjt188:78330000000042", next, &down),
            None
        );
        assert_eq!(
            open_downlink(
                &key,
                "cjt188:78330000000042",
                counter,
                b"cmd-plain-long-enough"
            ),
            None
        );
        assert_eq!(
            open_downlink(&key, "cjt188:78330000000042", counter, b""),
            Some(vec![])
        );
    }

    #[test]
    fn valve_downlink_is_recognised_only_for_this_meter() {
        let addr = [0x42, 0, 0, 0, 0, 0x33, 0x78];
        let close = cjt188::encode(&Cjt188Frame::valve_control(0x10, addr, 9, false));
        assert_eq!(
            downlink_valve(&close, &addr),
            Some(ValveCommand {
                open: false,
                ser: 9
            })
        );
        let other = [0x43, 0, 0, 0, 0, 0x33, 0x78];
        assert_eq!(downlink_valve(&close, &other), None);
        assert_eq!(downlink_valve(&[], &addr), None);
    }
}
