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
//! - A valve reply (control 0x84) completes the command sent in an earlier reply, if it echoes
//!   that command's SER.
//!
//! Security (`docs/reliability.md`, "Security"):
//! - `auth = "frame_mac"` (the default): the payload is the frames followed by the trailer of
//!   [`model::auth::seal_uplink`] (8-byte counter, 8-byte truncated HMAC-SHA256 under the
//!   meter's key from the key file). The meter is the one named by the frames' address, and
//!   its key must verify the trailer; the counter must grow (a repeat of the last counter gets
//!   the last answer again, an older one is refused), and the last counters are kept in
//!   `nbiot-counters.json` in the spool directory across restarts. Anything else is answered
//!   4.01 and counted (`wm_gateway_security_refused_total{reason}`). Only then are readings
//!   spooled, a queued command released (sealed under the same key, direction downlink, with
//!   the uplink's counter) and a valve reply applied: a command reaches and is acknowledged by
//!   only the meter that holds the key.
//! - `allow`: datagrams from addresses outside the operator ranges are dropped unanswered.
//! - The retransmission cache is bounded by count (oldest dropped first) and age.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use coap_lite::{CoapResponse, MessageClass, MessageType, Packet, RequestType, ResponseType};
use decoders::cjt188::{self, Cjt188Frame, Payload};
use model::{CommandAction, MeterId, MeterIdError, SourceKind};
use time::{OffsetDateTime, UtcOffset};
use tokio::net::UdpSocket;

use super::{Commands, ErrorCode, Received, Source, SourceContext, SourceEnv, SourceError};
use crate::downlink::Downlink;
use crate::listener::ListenerStats;
use crate::normalise;
use edge_config::coap::UplinkAuth;
use edge_config::nbiot_keys::{IpRange, NbiotKeys};
use model::auth::{self, Direction};

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

impl ErrorCode for UplinkError {
    fn code(&self) -> &'static str {
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

/// How a CoAP source authenticates uplinks.
#[derive(Debug, Clone)]
pub enum CoapAuthMode {
    /// Nobody is authenticated (commands are then bound only to the frame's address).
    None,
    /// Counter + MAC trailer under each meter's key.
    FrameMac(Arc<NbiotKeys>),
}

/// CoAP source settings (from `edge_config::CoapSourceConfig`).
#[derive(Debug, Clone)]
pub struct CoapOptions {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// UTC offset of the meters' clocks; `None` = use the receive time.
    pub meter_utc_offset: Option<UtcOffset>,
    /// Uplink authentication.
    pub auth: CoapAuthMode,
    /// Operator address ranges (empty: any).
    pub allow: Vec<IpRange>,
    /// Most entries of the retransmission cache.
    pub cache_entries: usize,
    /// How long a message id is remembered.
    pub exchange_lifetime: Duration,
    /// Where the meters' last counters are kept (`nbiot-counters.json`); `None`: memory only.
    pub state_dir: Option<PathBuf>,
    /// Counters shown on `/metrics`.
    pub stats: Arc<ListenerStats>,
}

impl CoapOptions {
    /// Unauthenticated options with default limits (tests, benches).
    pub fn open(listen: SocketAddr) -> Self {
        Self {
            listen,
            meter_utc_offset: None,
            auth: CoapAuthMode::None,
            allow: Vec::new(),
            cache_entries: 10_000,
            exchange_lifetime: EXCHANGE_LIFETIME,
            state_dir: None,
            stats: Arc::default(),
        }
    }

    /// Options of a configured (checked) source; reads its key file.
    ///
    /// # Errors
    /// [`SourceError::Keys`] if the key file cannot be read.
    pub fn from_config(
        c: &edge_config::Valid<edge_config::CoapSourceConfig>,
        state_dir: Option<PathBuf>,
    ) -> Result<Self, SourceError> {
        let auth = match c.uplink_auth() {
            UplinkAuth::Open => CoapAuthMode::None,
            UplinkAuth::FrameMac { key_file } => CoapAuthMode::FrameMac(Arc::new(
                edge_config::nbiot_keys::load(key_file)
                    .map_err(|e| SourceError::Keys(format!("CoAP key file: {e}")))?,
            )),
        };
        Ok(Self {
            listen: c.listen,
            // Within -12:00..=+14:00 (checked), which `UtcOffset` always represents.
            meter_utc_offset: c
                .meter_utc_offset_s()
                .and_then(|s| UtcOffset::from_whole_seconds(s).ok()),
            auth,
            allow: c.allow_ranges(),
            cache_entries: c.exchange_cache_entries,
            exchange_lifetime: c.exchange_lifetime(),
            state_dir,
            stats: Arc::default(),
        })
    }
}

/// RFC 7252 EXCHANGE_LIFETIME: how long a message id is remembered for deduplication.
const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

type ExchangeKey = (SocketAddr, u16);

/// Replies by (peer, message id), bounded by count and age. A flood of distinct message ids
/// pushes the oldest entries out instead of growing memory (it was a `HashMap` pruned only of
/// expired entries: 60,000 requests doubled the gateway's memory).
#[derive(Debug)]
pub struct ExchangeCache {
    map: HashMap<ExchangeKey, (Instant, Vec<u8>)>,
    /// Insertion order; an entry whose key was re-inserted later is skipped when popped.
    order: VecDeque<(Instant, ExchangeKey)>,
    max_entries: usize,
    lifetime: Duration,
}

impl ExchangeCache {
    /// A cache of at most `max_entries` replies, each kept for `lifetime`.
    pub fn new(max_entries: usize, lifetime: Duration) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            max_entries: max_entries.max(1),
            lifetime,
        }
    }

    /// The cached reply of an exchange still within its lifetime.
    pub fn get(&self, key: &ExchangeKey, now: Instant) -> Option<&[u8]> {
        self.map
            .get(key)
            .filter(|(at, _)| now.duration_since(*at) < self.lifetime)
            .map(|(_, r)| r.as_slice())
    }

    fn pop_front(&mut self) {
        if let Some((at, key)) = self.order.pop_front()
            && self.map.get(&key).is_some_and(|(t, _)| *t == at)
        {
            self.map.remove(&key);
        }
    }

    /// Remembers a reply; returns how many live entries were dropped to make room.
    pub fn insert(&mut self, key: ExchangeKey, now: Instant, reply: Vec<u8>) -> u64 {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.lifetime)
        {
            self.pop_front();
        }
        let mut evicted = 0;
        while self.map.len() >= self.max_entries && !self.order.is_empty() {
            let before = self.map.len();
            self.pop_front();
            evicted += u64::from(self.map.len() < before);
        }
        self.map.insert(key, (now, reply));
        self.order.push_back((now, key));
        evicted
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The last accepted counter of each authenticated meter and the answer it got.
#[derive(Debug, Default)]
struct MeterCounters {
    last: HashMap<MeterId, (u64, ResponseType, Vec<u8>)>,
    path: Option<PathBuf>,
    dirty: bool,
}

impl MeterCounters {
    fn load(dir: Option<PathBuf>) -> Self {
        let path = dir.map(|d| d.join("nbiot-counters.json"));
        let mut last = HashMap::new();
        if let Some(p) = &path
            && let Ok(text) = std::fs::read_to_string(p)
        {
            match serde_json::from_str::<HashMap<MeterId, u64>>(&text) {
                Ok(m) => {
                    last = m
                        .into_iter()
                        .map(|(k, c)| (k, (c, ResponseType::Changed, Vec::new())))
                        .collect();
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "unreadable NB-IoT counters; starting afresh")
                }
            }
        }
        Self {
            last,
            path,
            dirty: false,
        }
    }

    /// Writes the counters (atomically) if they changed.
    fn flush(&mut self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        let map: HashMap<&MeterId, u64> = self.last.iter().map(|(k, v)| (k, v.0)).collect();
        let tmp = path.with_extension("json.tmp");
        let result = serde_json::to_vec(&map)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        match result {
            Ok(()) => self.dirty = false,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "could not save NB-IoT counters")
            }
        }
    }
}

struct Server {
    ctx: SourceContext,
    opts: CoapOptions,
    downlink: Arc<Downlink>,
    seen: ExchangeCache,
    counters: MeterCounters,
    ser: u8,
}

/// An uplink that passed authentication: its meter, frames, the frames' bytes and, under
/// `frame_mac`, the key and counter that sealed it.
struct Authenticated<'a> {
    meter: MeterId,
    frames: Vec<UplinkFrame>,
    body: &'a [u8],
    seal: Option<([u8; 16], u64)>,
}

/// The NB-IoT CoAP server: its socket is bound and its key file read at build.
#[derive(Debug)]
pub struct CoapSource {
    socket: UdpSocket,
    opts: CoapOptions,
    downlink: Arc<Downlink>,
}

impl CoapSource {
    /// A server on an already bound socket (tests, benches).
    pub fn new(socket: UdpSocket, opts: CoapOptions, downlink: Arc<Downlink>) -> Self {
        Self {
            socket,
            opts,
            downlink,
        }
    }
}

impl Source for CoapSource {
    type Config = edge_config::Valid<edge_config::CoapSourceConfig>;
    const KIND: SourceKind = SourceKind::Coap;

    async fn build(c: &Self::Config, env: &SourceEnv) -> Result<Self, SourceError> {
        let socket = UdpSocket::bind(c.listen)
            .await
            .map_err(|source| SourceError::Socket {
                what: "CoAP socket",
                addr: c.listen.to_string(),
                source,
            })?;
        let mut opts = CoapOptions::from_config(c, env.state_dir().cloned())?;
        opts.stats = env.listener_stats();
        let downlink = env.downlink().cloned().ok_or_else(|| {
            SourceError::Config("a CoAP source needs the gateway's downlink".into())
        })?;
        Ok(Self::new(socket, opts, downlink))
    }

    fn commands(&self) -> Commands {
        Commands::CoapQueue
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// Serves CoAP until `ctx.shutdown` is cancelled.
    async fn run(self, ctx: SourceContext) -> Result<(), SourceError> {
        let Self {
            socket,
            opts,
            downlink,
        } = self;
        let shutdown = ctx.shutdown.clone();
        let counters = MeterCounters::load(opts.state_dir.clone());
        ctx.readiness.set_ready();
        let mut server = Server {
            seen: ExchangeCache::new(opts.cache_entries, opts.exchange_lifetime),
            ctx,
            opts,
            downlink,
            counters,
            ser: 0,
        };
        // The largest UDP datagram: a meter that missed days sends a long history, and a
        // shorter buffer would silently cut it.
        let mut buf = vec![0u8; 65_535];
        let mut flush = tokio::time::interval(Duration::from_secs(5));
        loop {
            let (n, peer) = tokio::select! {
                _ = shutdown.cancelled() => {
                    server.counters.flush();
                    return Ok(());
                }
                _ = flush.tick() => {
                    server.counters.flush();
                    continue;
                }
                r = socket.recv_from(&mut buf) => r.map_err(|source| SourceError::Socket {
                    what: "CoAP socket",
                    addr: server.opts.listen.to_string(),
                    source,
                })?,
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
}

/// A datagram that is not a CoAP message.
#[derive(Debug, thiserror::Error)]
#[error("not a CoAP message: {0}")]
struct NotCoap(String);

impl ErrorCode for NotCoap {
    fn code(&self) -> &'static str {
        "coap_message"
    }
}

impl Server {
    async fn handle(&mut self, datagram: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
        let source_id = self.ctx.source_id.clone();
        if !self.opts.allow.is_empty() && !self.opts.allow.iter().any(|r| r.contains(peer.ip())) {
            // Dropped unanswered: no reply traffic towards spoofed or foreign addresses.
            self.opts.stats.refuse("address_not_allowed");
            tracing::debug!(source = %source_id, %peer, "CoAP datagram from outside the operator ranges");
            return None;
        }
        let packet = match Packet::from_bytes(datagram) {
            Ok(p) => p,
            Err(e) => {
                self.ctx.count_frames(1);
                self.ctx.reject(&NotCoap(format!("{e:?}")));
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
        if let Some(reply) = self.seen.get(&key, now) {
            tracing::debug!(%peer, mid = key.1, "CoAP retransmission; resending the cached reply");
            return Some(reply.to_vec());
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
        let evicted = self.seen.insert(key, now, bytes.clone());
        let stats = &self.opts.stats;
        stats.cache_evicted.fetch_add(evicted, Ordering::Relaxed);
        stats
            .cache_entries
            .store(self.seen.len() as u64, Ordering::Relaxed);
        Some(bytes)
    }

    /// Handles one uplink payload (one or more CJ/T 188 frames of one meter); returns the CoAP
    /// status and reply payload.
    /// Checks an uplink under `frame_mac`: the frames' meter, its key, the trailer and the
    /// counter. `Err` is the answer to send (a repeat of the last counter gets the last
    /// answer; anything else 4.01, counted by reason).
    fn authenticate<'a>(
        &mut self,
        raw: &'a [u8],
        keys: &NbiotKeys,
        peer: SocketAddr,
    ) -> Result<Authenticated<'a>, (ResponseType, Vec<u8>)> {
        let refuse = |stats: &ListenerStats, reason: &'static str, meter: Option<&MeterId>| {
            stats.refuse(reason);
            // Debug, not warn: a flood of junk must not flood the log too; the counter
            // `wm_gateway_security_refused_total{reason}` is what alerts.
            tracing::debug!(%peer, reason, meter = ?meter.map(MeterId::as_str), "refused an unauthenticated CoAP uplink");
            Err((ResponseType::Unauthorized, Vec::new()))
        };
        let stats = Arc::clone(&self.opts.stats);
        let Some((body, _, _)) = auth::split_sealed(raw) else {
            return refuse(&stats, "no_trailer", None);
        };
        let Ok((meter, frames)) = parse_uplink(body) else {
            return refuse(&stats, "unparsable", None);
        };
        let Some(key) = keys.get(&meter).copied() else {
            return refuse(&stats, "unknown_meter", Some(&meter));
        };
        let Ok((body, counter)) = auth::open_uplink(&key, Direction::Uplink, meter.as_str(), raw)
        else {
            return refuse(&stats, "bad_mac", Some(&meter));
        };
        if let Some((last, status, reply)) = self.counters.last.get(&meter) {
            if counter == *last {
                // The meter repeats its last uplink (its retransmission outlived the exchange
                // cache): the same answer again, nothing processed twice.
                return Err((*status, reply.clone()));
            }
            if counter <= *last {
                return refuse(&stats, "stale_counter", Some(&meter));
            }
        }
        Ok(Authenticated {
            meter,
            frames,
            body,
            seal: Some((key, counter)),
        })
    }

    async fn uplink(&mut self, raw: &[u8], peer: SocketAddr) -> (ResponseType, Vec<u8>) {
        let source_id = self.ctx.source_id.clone();
        let channel = peer.to_string();
        let authenticated = match &self.opts.auth {
            CoapAuthMode::FrameMac(keys) => {
                let keys = Arc::clone(keys);
                self.authenticate(raw, &keys, peer)
            }
            CoapAuthMode::None => match parse_uplink(raw) {
                Ok((meter, frames)) => Ok(Authenticated {
                    meter,
                    frames,
                    body: raw,
                    seal: None,
                }),
                Err(e) => {
                    self.ctx.count_frames(1);
                    self.ctx.reject(&e);
                    tracing::warn!(source = %source_id, error = %e, payload = %hex::encode(raw), "refused a CoAP uplink");
                    Err((ResponseType::BadRequest, e.to_string().into_bytes()))
                }
            },
        };
        let Authenticated {
            meter,
            frames,
            body: raw,
            seal,
        } = match authenticated {
            Ok(a) => a,
            Err(answer) => return answer,
        };
        let received_at = OffsetDateTime::now_utc();
        // Without a configured zone the meter clocks only order the frames (see
        // `normalise::relative_timestamps`); with one they are the readings' time.
        let clocks: Vec<_> = frames.iter().map(|(f, _)| frame_clock(f)).collect();
        let relative = normalise::relative_timestamps(&clocks, received_at);
        let mut readings = Vec::new();
        let mut valve_replies = Vec::new();
        for ((frame, range), relative_ts) in frames.iter().zip(relative) {
            if frame.di == cjt188::DI_VALVE && frame.is_reply() {
                // The meter's answer to a valve command sent in an earlier reply; applied once
                // the payload's readings are spooled.
                valve_replies.push((
                    frame.ser,
                    match (&frame.payload, frame.is_abnormal()) {
                        (_, true) => Err("meter answered the valve command abnormally".to_owned()),
                        (Payload::Status(st), false) if st & cjt188::ST_VALVE_ABNORMAL != 0 => {
                            Err(format!("valve abnormal (status {st:#06x})"))
                        }
                        _ => Ok(()),
                    },
                ));
                continue;
            }
            let meter_ts = match (&frame.payload, self.opts.meter_utc_offset) {
                (Payload::Reading(r), Some(offset)) => Some(r.clock.assume_offset(offset)),
                _ => None,
            };
            let ctx = self.ctx.frame_context(&Received {
                raw: raw.get(range.clone()).unwrap_or(raw),
                channel: Some(&channel),
                received_at,
            });
            let mut rs = normalise::to_readings(&cjt188::to_decoded(frame), &meter, meter_ts, &ctx);
            if meter_ts.is_none() {
                for r in &mut rs {
                    r.ts = relative_ts;
                }
            }
            readings.extend(rs);
        }
        // The meter is answered 2.04 (and its valve replies applied) only once its readings
        // are durable.
        self.ctx.count_frames(frames.len());
        if let Err(e) = self.ctx.submit(readings).await {
            tracing::error!(source = %source_id, error = %e, "could not spool readings; meter will retry");
            return (ResponseType::ServiceUnavailable, Vec::new());
        }
        for (ser, result) in valve_replies {
            self.downlink.meter_replied(&meter, Some(ser), result);
        }
        let mut reply = match frames.first() {
            Some((first, _)) => self.pending_frame(&meter, first),
            None => Vec::new(),
        };
        if let Some((key, counter)) = seal {
            if !reply.is_empty() {
                // Only the meter holding the key can check (and act on) the command.
                reply =
                    auth::seal_uplink(&key, Direction::Downlink, meter.as_str(), counter, &reply);
            }
            self.counters
                .last
                .insert(meter, (counter, ResponseType::Changed, reply.clone()));
            self.counters.dirty = true;
        }
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
            self.downlink.sent_to_meter(&cmd, Some(self.ser));
            return cjt188::encode(&frame);
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_error_labels_are_the_frame_codes() {
        let e = parse_uplink(&[0x68, 0x10]).unwrap_err();
        assert_eq!(ErrorCode::code(&e), "truncated");
        let mut frame = cjt188::encode(&Cjt188Frame::read_address_reply(
            0x10,
            [0x78, 0x56, 0x34, 0x12, 0x00, 0x00, 0x00],
            1,
        ));
        let last = frame.len() - 2;
        frame[last] ^= 0xFF;
        let e = parse_uplink(&frame).unwrap_err();
        assert_eq!(ErrorCode::code(&e), "bad_checksum");
    }

    #[test]
    fn exchange_cache_is_bounded_by_count_and_age() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut cache = ExchangeCache::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let mut evicted = 0;
        for mid in 0..5u16 {
            evicted += cache.insert((peer, mid), t0, vec![mid as u8]);
        }
        assert_eq!((cache.len(), evicted), (3, 2));
        assert_eq!(cache.get(&(peer, 0), t0), None);
        assert_eq!(cache.get(&(peer, 4), t0), Some(&[4u8][..]));
        // Past the lifetime nothing is returned, and the next insert drops the expired ones.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(cache.get(&(peer, 4), later), None);
        assert_eq!(cache.insert((peer, 9), later, vec![9]), 0);
        assert_eq!(cache.len(), 1);
        // Re-inserting a key keeps one entry for it.
        cache.insert((peer, 9), later + Duration::from_secs(11), vec![10]);
        assert_eq!(cache.len(), 1);
    }
}
