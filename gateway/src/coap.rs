//! NB-IoT CoAP source: meters POST CJ/T 188 frames to `/up`; the gateway spools the readings
//! and answers 2.04 Changed whose payload is the meter's next pending downlink frame (valve
//! control) or empty.
//!
//! - The payload is one or more whole frames back to back (an hourly meter sends its current
//!   901F reply; a daily meter sends the hourly 901F replies since its last uplink, oldest
//!   first, each with its own clock). Every reading of every frame is spooled in one submit
//!   before the 2.04.
//! - All or nothing: if any frame does not decode, or the frames are not all from one meter,
//!   the whole payload is refused with 4.00 ([`UplinkError`], counted once in
//!   `wm_gateway_decode_errors_total{kind}`) and nothing of it is spooled. Accepting the good
//!   frames would answer 2.04 for a payload that was partly dropped, and the meter, which does
//!   not retry a 2.xx, would lose those hours silently; a 4.00 at least shows up in the
//!   meter's and the platform's logs and in the counter.
//! - Confirmable retransmissions (same peer and message id within the exchange lifetime) get the
//!   cached answer and are not processed again.
//! - When the spool cannot take the readings the answer is 5.03, so the meter retries later.
//! - A valve reply (control 0x84) completes the command sent in an earlier reply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapResponse, MessageClass, MessageType, Packet, RequestType, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Payload};
use model::{CommandAction, MeterId, MeterIdError, SourceKind};
use time::{OffsetDateTime, UtcOffset};
use tokio::net::UdpSocket;

use crate::downlink::Downlink;
use crate::normalise::{self, FrameContext};
use crate::source::SourceContext;

/// Why the CoAP source stopped.
#[derive(Debug, thiserror::Error)]
pub enum CoapError {
    /// The UDP socket could not be bound or failed.
    #[error("CoAP socket {addr}: {source}")]
    Socket {
        /// Listen address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Why an uplink payload (CoAP `/up` body, push envelope payload) was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// A frame of the payload did not parse.
    #[error(transparent)]
    Frame(#[from] cjt188::ConcatenatedError),
    /// The frames are not all from the same meter.
    #[error("frame {index} is from meter {found}, the payload's first frame from {first}")]
    MixedMeters {
        /// Position of the odd frame.
        index: usize,
        /// Meter of the first frame (`A6..A0` digits).
        first: String,
        /// Meter of the odd frame.
        found: String,
    },
    /// The address is not a usable meter id.
    #[error("unusable meter address: {0}")]
    MeterId(#[from] MeterIdError),
}

impl UplinkError {
    /// A stable snake_case code, the `kind` label of `wm_gateway_decode_errors_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Frame(e) => e.code(),
            Self::MixedMeters { .. } => "mixed_meters",
            Self::MeterId(_) => "meter_id",
        }
    }
}

/// One frame of an uplink payload with the bytes it came in.
pub type UplinkFrame = (Cjt188Frame, std::ops::Range<usize>);

/// Splits an uplink payload into its frames and checks they are all from one meter, whose
/// id (address checked as BCD, as [`cjt188::decode`] does) is returned with them.
///
/// # Errors
/// [`UplinkError`] for the first problem; the payload is then refused as a whole.
pub fn parse_uplink(raw: &[u8]) -> Result<(MeterId, Vec<UplinkFrame>), UplinkError> {
    let frames = cjt188::parse_concatenated(raw)?;
    let Some((first, _)) = frames.first() else {
        // parse_concatenated never returns an empty list; refuse rather than panic.
        return Err(UplinkError::Frame(cjt188::ConcatenatedError {
            index: 0,
            start: 0,
            source: cjt188::Cjt188Error::Truncated {
                offset: 0,
                field: "start byte",
                needed: 1,
            },
        }));
    };
    if let Some((index, (odd, _))) = frames
        .iter()
        .enumerate()
        .find(|(_, (f, _))| f.address != first.address)
    {
        return Err(UplinkError::MixedMeters {
            index,
            first: cjt188::address_digits(&first.address),
            found: cjt188::address_digits(&odd.address),
        });
    }
    // One address for all frames (checked above), so its digits are validated once.
    let first_bytes = frames
        .first()
        .and_then(|(_, range)| raw.get(range.clone()))
        .unwrap_or(raw);
    let decoded = cjt188::decode(first_bytes).map_err(|source| cjt188::ConcatenatedError {
        index: 0,
        start: 0,
        source,
    })?;
    let meter = normalise::meter_id(&decoded)?;
    Ok((meter, frames))
}

/// The meter clock of a 901F reading frame, `None` for other frames.
pub(crate) fn frame_clock(frame: &Cjt188Frame) -> Option<time::PrimitiveDateTime> {
    match &frame.payload {
        Payload::Reading(r) => Some(r.clock),
        _ => None,
    }
}

/// CoAP source settings (from `edge_config::CoapSourceConfig`).
#[derive(Debug, Clone)]
pub struct CoapOptions {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// UTC offset of the meters' clocks; `None` = use the receive time.
    pub meter_utc_offset: Option<UtcOffset>,
}

/// RFC 7252 EXCHANGE_LIFETIME: how long a message id is remembered for deduplication.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// Returns a short, stable error kind (`bad_checksum`...) from an error's variant name.
pub fn error_kind(e: &impl std::fmt::Debug) -> String {
    let dbg = format!("{e:?}");
    let name = dbg
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .next()
        .unwrap_or("unknown");
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

struct Server {
    ctx: SourceContext,
    opts: CoapOptions,
    downlink: Arc<Downlink>,
    seen: HashMap<(SocketAddr, u16), (Instant, Vec<u8>)>,
    ser: u8,
}

/// Binds the UDP socket (so errors surface at start) and returns the bound address.
pub async fn bind(listen: SocketAddr) -> Result<UdpSocket, CoapError> {
    UdpSocket::bind(listen)
        .await
        .map_err(|source| CoapError::Socket {
            addr: listen,
            source,
        })
}

/// Serves CoAP on `socket` until `ctx.shutdown` is cancelled.
pub async fn run(
    socket: UdpSocket,
    opts: CoapOptions,
    ctx: SourceContext,
    downlink: Arc<Downlink>,
) -> Result<(), CoapError> {
    let shutdown = ctx.shutdown.clone();
    let mut server = Server {
        ctx,
        opts,
        downlink,
        seen: HashMap::new(),
        ser: 0,
    };
    // The largest UDP datagram: a meter that missed days sends a long history, and a shorter
    // buffer would silently cut it.
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = socket.recv_from(&mut buf) => r.map_err(|source| CoapError::Socket { addr: server.opts.listen, source })?,
        };
        let Some(datagram) = buf.get(..n) else {
            continue;
        };
        if let Some(reply) = server.handle(datagram, peer).await
            && let Err(e) = socket.send_to(&reply, peer).await
        {
            tracing::warn!(%peer, error = %e, "could not send CoAP reply");
        }
    }
}

impl Server {
    async fn handle(&mut self, datagram: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
        let source_id = self.ctx.source_id.clone();
        let packet = match Packet::from_bytes(datagram) {
            Ok(p) => p,
            Err(e) => {
                self.ctx.sink.frame_received(&source_id);
                self.ctx.sink.decode_failed(&source_id, "coap_message");
                tracing::warn!(source = %source_id, %peer, error = ?e, "undecodable CoAP datagram");
                return None;
            }
        };
        if !matches!(
            packet.header.get_type(),
            MessageType::Confirmable | MessageType::NonConfirmable
        ) {
            // ACK/RST from a peer: nothing to answer.
            return None;
        }
        let key = (peer, packet.header.message_id);
        let now = Instant::now();
        if let Some((at, reply)) = self.seen.get(&key)
            && now.duration_since(*at) < EXCHANGE_LIFETIME
        {
            tracing::debug!(%peer, mid = key.1, "CoAP retransmission; resending the cached reply");
            return Some(reply.clone());
        }
        let mut response = CoapResponse::new(&packet)?;
        let path: Vec<String> = packet
            .get_option(coap_lite::CoapOption::UriPath)
            .map(|l| {
                l.iter()
                    .map(|seg| String::from_utf8_lossy(seg).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let (status, payload) = if path != ["up"] {
            (ResponseType::NotFound, Vec::new())
        } else if packet.header.code != MessageClass::Request(RequestType::Post) {
            (ResponseType::MethodNotAllowed, Vec::new())
        } else {
            self.uplink(&packet.payload, peer).await
        };
        response.set_status(status);
        response.message.payload = payload;
        let bytes = match response.message.to_bytes() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = ?e, "could not encode CoAP reply");
                return None;
            }
        };
        if self.seen.len() > 10_000 {
            self.seen
                .retain(|_, (at, _)| now.duration_since(*at) < EXCHANGE_LIFETIME);
        }
        self.seen.insert(key, (now, bytes.clone()));
        Some(bytes)
    }

    /// Handles one uplink payload (one or more CJ/T 188 frames of one meter); returns the CoAP
    /// status and reply payload.
    async fn uplink(&mut self, raw: &[u8], peer: SocketAddr) -> (ResponseType, Vec<u8>) {
        let source_id = self.ctx.source_id.clone();
        let channel = peer.to_string();
        let (meter, frames) = match parse_uplink(raw) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.ctx.sink.frame_received(&source_id);
                self.ctx.sink.decode_failed(&source_id, e.code());
                tracing::warn!(source = %source_id, error = %e, payload = %hex::encode(raw), "refused a CoAP uplink");
                return (ResponseType::BadRequest, e.to_string().into_bytes());
            }
        };
        let received_at = OffsetDateTime::now_utc();
        // Without a configured zone the meter clocks only order the frames (see
        // `normalise::relative_timestamps`); with one they are the readings' time.
        let clocks: Vec<_> = frames.iter().map(|(f, _)| frame_clock(f)).collect();
        let relative = normalise::relative_timestamps(&clocks, received_at);
        let mut readings = Vec::new();
        let mut valve_replies = Vec::new();
        for ((frame, range), relative_ts) in frames.iter().zip(relative) {
            self.ctx.sink.frame_received(&source_id);
            if frame.di == cjt188::DI_VALVE && frame.is_reply() {
                // The meter's answer to a valve command sent in an earlier reply; applied once
                // the payload's readings are spooled.
                valve_replies.push(match (&frame.payload, frame.is_abnormal()) {
                    (_, true) => Err("meter answered the valve command abnormally".to_owned()),
                    (Payload::Status(st), false) if st & cjt188::ST_VALVE_ABNORMAL != 0 => {
                        Err(format!("valve abnormal (status {st:#06x})"))
                    }
                    _ => Ok(()),
                });
                continue;
            }
            let meter_ts = match (&frame.payload, self.opts.meter_utc_offset) {
                (Payload::Reading(r), Some(offset)) => Some(r.clock.assume_offset(offset)),
                _ => None,
            };
            let ctx = FrameContext {
                gateway: &self.ctx.gateway,
                source: SourceKind::Coap,
                source_id: &source_id,
                channel: Some(&channel),
                received_at,
                raw: raw.get(range.clone()).unwrap_or(raw),
            };
            let mut rs = normalise::to_readings(&cjt188::to_decoded(frame), &meter, meter_ts, &ctx);
            if meter_ts.is_none() {
                for r in &mut rs {
                    r.ts = relative_ts;
                }
            }
            readings.extend(rs);
        }
        if !readings.is_empty()
            && let Err(e) = self.ctx.sink.submit(readings).await
        {
            tracing::error!(source = %source_id, error = %e, "could not spool readings; meter will retry");
            return (ResponseType::ServiceUnavailable, Vec::new());
        }
        for result in valve_replies {
            self.downlink.meter_replied(&meter, result);
        }
        let reply = match frames.first() {
            Some((first, _)) => self.pending_frame(&meter, first),
            None => Vec::new(),
        };
        (ResponseType::Changed, reply)
    }

    /// The next queued command for this meter as a CJ/T 188 frame, or empty.
    fn pending_frame(&mut self, meter: &MeterId, uplink: &Cjt188Frame) -> Vec<u8> {
        while let Some(cmd) = self.downlink.next_for(meter) {
            let open = match cmd.action {
                CommandAction::ValveOpen => true,
                CommandAction::ValveClose => false,
                ref other => {
                    self.downlink.failed(
                        &cmd,
                        format!("action {other:?} is not supported by CJ/T 188 NB-IoT meters"),
                    );
                    continue;
                }
            };
            self.ser = self.ser.wrapping_add(1);
            let frame =
                Cjt188Frame::valve_control(uplink.meter_type, uplink.address, self.ser, open);
            self.downlink.sent_to_meter(&cmd);
            return cjt188::encode(&frame);
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_snake_case_variant_names() {
        let e = cjt188::parse(&[0x68, 0x10]).unwrap_err();
        let kind = error_kind(&e);
        assert!(
            kind.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{kind}"
        );
        assert!(!kind.is_empty());
        #[derive(Debug)]
        enum E {
            BadChecksum { _x: u8 },
        }
        assert_eq!(error_kind(&E::BadChecksum { _x: 1 }), "bad_checksum");
    }
}
