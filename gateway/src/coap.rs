//! NB-IoT CoAP source: meters POST one CJ/T 188 frame to `/up`; the gateway spools the
//! readings and answers 2.04 Changed whose payload is the meter's next pending downlink frame
//! (valve control) or empty.
//!
//! - Confirmable retransmissions (same peer and message id within the exchange lifetime) get the
//!   cached answer and are not processed again.
//! - A frame that does not decode is counted by error kind, logged, and answered 4.00.
//! - When the spool cannot take the readings the answer is 5.03, so the meter retries later.
//! - A valve reply (control 0x84) completes the command sent in an earlier reply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapResponse, MessageClass, MessageType, Packet, RequestType, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Payload};
use model::{CommandAction, MeterId, SourceKind};
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
    let mut buf = vec![0u8; 2048];
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
            self.uplink(&packet.payload).await
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

    /// Handles one CJ/T 188 frame; returns the CoAP status and reply payload.
    async fn uplink(&mut self, raw: &[u8]) -> (ResponseType, Vec<u8>) {
        let source_id = self.ctx.source_id.clone();
        self.ctx.sink.frame_received(&source_id);
        let frame = match cjt188::parse(raw) {
            Ok(f) => f,
            Err(e) => {
                self.ctx.sink.decode_failed(&source_id, &error_kind(&e));
                tracing::warn!(source = %source_id, error = %e, frame = %hex::encode(raw), "undecodable CJ/T 188 frame");
                return (ResponseType::BadRequest, e.to_string().into_bytes());
            }
        };
        let decoded = cjt188::to_decoded(&frame);
        let meter = match normalise::meter_id(&decoded) {
            Ok(m) => m,
            Err(e) => {
                self.ctx.sink.decode_failed(&source_id, "meter_id");
                tracing::warn!(source = %source_id, error = %e, "CJ/T 188 frame with an unusable address");
                return (ResponseType::BadRequest, e.to_string().into_bytes());
            }
        };
        if frame.di == cjt188::DI_VALVE && frame.is_reply() {
            // The meter's answer to a valve command sent in an earlier reply.
            let result = match (&frame.payload, frame.is_abnormal()) {
                (_, true) => Err("meter answered the valve command abnormally".to_owned()),
                (Payload::Status(st), false) if st & cjt188::ST_VALVE_ABNORMAL != 0 => {
                    Err(format!("valve abnormal (status {st:#06x})"))
                }
                _ => Ok(()),
            };
            self.downlink.meter_replied(&meter, result);
        } else {
            let received_at = OffsetDateTime::now_utc();
            let meter_ts = match (&frame.payload, self.opts.meter_utc_offset) {
                (Payload::Reading(r), Some(offset)) => Some(r.clock.assume_offset(offset)),
                _ => None,
            };
            let ctx = FrameContext {
                gateway: &self.ctx.gateway,
                source: SourceKind::Coap,
                source_id: &source_id,
                received_at,
                raw,
            };
            let readings = normalise::to_readings(&decoded, &meter, meter_ts, &ctx);
            if let Err(e) = self.ctx.sink.submit(readings).await {
                tracing::error!(source = %source_id, error = %e, "could not spool readings; meter will retry");
                return (ResponseType::ServiceUnavailable, Vec::new());
            }
        }
        (ResponseType::Changed, self.pending_frame(&meter, &frame))
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
