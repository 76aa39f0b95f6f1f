//! Wireless M-Bus receiver: raw telegrams (L field first, no CRCs) as UDP datagrams from a
//! USB receiver, decoded with per-meter keys and a per-source format cache.
//!
//! The socket's kernel receive buffer is sized from the config (`recv_buffer_bytes`) and
//! datagrams are read in batches; the kernel's drop counter of the socket is exported.
//!
//! A compact telegram (CI 79) whose format no full frame has taught yet (after a restart, or
//! a meter first heard between its full frames) is counted as `unknown_compact_format` and
//! held, bounded by `compact_hold_frames` and `compact_hold_max_age`; when a full frame of
//! that meter (or a new format of its model) decodes, the held telegrams are decoded again
//! with their own receive time and their readings join that batch. What became of them is
//! counted as `wm_gateway_wmbus_compact_total{outcome}`.
//!
//! The same telegram often arrives several times (the meter's own transmission and one or more
//! repeaters); copies within `dedup_window` are dropped before decoding. Copies are recognised
//! by the bytes after the L and C fields, since repeaters may change the C field.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use decoders::wmbus::{CompactHold, FormatCache, Held, WmbusError};
use edge_config::wmbus::WmbusUdpSourceConfig;
use model::SourceKind;
use sha2::{Digest, Sha256};
use time::{OffsetDateTime, UtcOffset};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::{Commands, Received, Source, SourceContext, SourceEnv, SourceError};
use crate::CompactOutcome;
use crate::normalise::{self, FrameContext, frame_clock};

/// Receiver counters beyond the sink's frames and decode errors.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Copies dropped as duplicates.
    pub duplicates: AtomicU64,
    /// Telegrams decoded and submitted.
    pub decoded: AtomicU64,
}

/// Remembers telegram fingerprints for a time window.
#[derive(Debug)]
struct Dedup {
    window: Duration,
    seen: HashMap<[u8; 32], Instant>,
    order: VecDeque<([u8; 32], Instant)>,
}

impl Dedup {
    fn new(window: Duration) -> Self {
        Self {
            window,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// True if the telegram is new (and remembers it).
    fn first_time(&mut self, raw: &[u8], now: Instant) -> bool {
        while let Some((key, at)) = self.order.front().copied() {
            if now.duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&key) == Some(&at) {
                self.seen.remove(&key);
            }
        }
        let key: [u8; 32] = Sha256::digest(raw.get(2..).unwrap_or(raw)).into();
        if self.seen.contains_key(&key) {
            return false;
        }
        self.seen.insert(key, now);
        self.order.push_back((key, now));
        true
    }
}

/// Most datagrams read before their readings go to the spool together (one group commit).
const MAX_BATCH: usize = 256;
/// How often the kernel's drop counter of the socket is read.
const DROP_POLL: Duration = Duration::from_secs(1);
/// How often held compact telegrams are checked for age when no datagram arrives.
const HOLD_EXPIRY: Duration = Duration::from_secs(1);

/// Binds the UDP socket with the configured kernel receive buffer.
fn bind(config: &WmbusUdpSourceConfig) -> std::io::Result<UdpSocket> {
    use std::net::ToSocketAddrs;
    let addr = config
        .listen
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("address resolves to nothing"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Set before bind so the queue is large from the first datagram on. The kernel caps the
    // size at net.core.rmem_max (and reports twice what it grants, for its bookkeeping).
    if let Err(e) = socket.set_recv_buffer_size(config.recv_buffer_bytes) {
        tracing::warn!(source = %config.id, error = %e, "could not size the wmbus receive buffer");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < config.recv_buffer_bytes {
        tracing::warn!(
            source = %config.id,
            requested = config.recv_buffer_bytes,
            granted,
            "wmbus receive buffer smaller than configured (raise net.core.rmem_max)"
        );
    } else {
        tracing::info!(source = %config.id, granted, "wmbus receive buffer");
    }
    UdpSocket::from_std(socket.into())
}

/// [`bind`], waiting up to [`REBIND_WAIT`] while the address is still in use: a receiver
/// restarted by a configuration reload binds the port its predecessor is still releasing.
/// (A restart for new device keys does not bind at all: it takes the predecessor's socket, see
/// `Gateway::apply_device_set`; a device set applied while the machine was loaded once lost
/// the demo's DMA inlets to a refused rebind.)
async fn bind_when_free(config: &WmbusUdpSourceConfig) -> std::io::Result<UdpSocket> {
    let deadline = tokio::time::Instant::now() + REBIND_WAIT;
    loop {
        match bind(config) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// How long [`bind_when_free`] waits for a port being released.
const REBIND_WAIT: Duration = Duration::from_secs(3);

/// The kernel's count of datagrams dropped for `socket` (receive buffer full, bad checksum):
/// the `drops` column of its line in `/proc/net/udp` or `/proc/net/udp6`, found by inode.
/// `None` where procfs is not available.
fn kernel_drops(socket: &UdpSocket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_owned();
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            drops_of_inode(&text, &inode)
        })
}

/// The `drops` column (the last) of the line of `inode` (the tenth column) in a
/// `/proc/net/udp`-format table.
fn drops_of_inode(table: &str, inode: &str) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols.get(9) == Some(&inode))
            .then(|| cols.last()?.parse().ok())
            .flatten()
    })
}

/// The wM-Bus receiver: its socket is bound at build, so a port in use stops the start. A
/// receiver restarted for new device keys takes its predecessor's socket instead (shared, as
/// the runtime keeps it across the restart).
#[derive(Debug)]
pub struct WmbusSource {
    socket: Arc<UdpSocket>,
    listen: String,
    receiver: Receiver,
    stats: Arc<ReceiverStats>,
}

impl WmbusSource {
    /// The receiver's counters (duplicates, decoded telegrams); watch them before `run`.
    pub fn stats(&self) -> Arc<ReceiverStats> {
        Arc::clone(&self.stats)
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.socket.local_addr().ok()
    }
}

/// A compact telegram held until its format is known: its bytes and receive context.
#[derive(Debug)]
struct HeldTelegram {
    raw: Vec<u8>,
    channel: String,
    received_at: OffsetDateTime,
}

/// What the receive loop keeps between datagrams.
#[derive(Debug)]
struct Receiver {
    keys: std::collections::HashMap<String, [u8; 16]>,
    cache: FormatCache,
    dedup: Dedup,
    meter_offset: Option<UtcOffset>,
    /// Compact telegrams waiting for their full frame.
    hold: CompactHold<HeldTelegram>,
    /// [`FormatCache::model_count`] after the last decoded telegram: when it grows, a model
    /// format other meters may borrow was learned and every held telegram is tried again.
    models_seen: usize,
    /// The hold's `dropped_full` and `dropped_old` already exported.
    evicted_counted: u64,
    expired_counted: u64,
}

impl Receiver {
    /// Decodes one datagram into readings through the intake; counts duplicates. Readings of
    /// held compact telegrams that the datagram's full frame made decodable come with them.
    fn readings(
        &mut self,
        raw: &[u8],
        peer: std::net::SocketAddr,
        ctx: &SourceContext,
        stats: &ReceiverStats,
    ) -> Vec<model::Reading> {
        if !self.dedup.first_time(raw, Instant::now()) {
            ctx.count_frames(1);
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let channel = peer.to_string();
        let frame = Received {
            raw,
            channel: Some(&channel),
            received_at: OffsetDateTime::now_utc(),
        };
        // The telegram's own date-time record is the reading time when the meters' zone is
        // configured (clock source `meter`, checked against the receive time by VEE's skew
        // rule); otherwise, or without the record, the receive time.
        let meter_offset = self.meter_offset;
        let (keys, cache) = (&self.keys, &mut self.cache);
        let mut unknown_format = None;
        let decoded = ctx.decode(
            &frame,
            |raw| {
                let decoded = decoders::wmbus::decode(raw, keys, &mut *cache);
                if let Err(WmbusError::UnknownCompactFormat { meter, signature }) = &decoded {
                    unknown_format = Some((meter.clone(), *signature));
                }
                decoded
            },
            |f| meter_offset.and_then(|offset| Some(frame_clock(f)?.assume_offset(offset))),
        );
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                if let Some((meter, signature)) = unknown_format {
                    tracing::debug!(source = %ctx.source_id, %peer, %meter, signature = format_args!("{signature:#06x}"), "compact wmbus telegram held: format not known yet");
                    let received_at = frame.received_at;
                    let held = HeldTelegram {
                        raw: raw.to_vec(),
                        channel,
                        received_at,
                    };
                    self.hold
                        .hold(meter, signature, std::time::Instant::now(), held);
                    ctx.sink
                        .counters()
                        .add_compact(&ctx.source_id, CompactOutcome::Held, 1);
                    self.count_drops(ctx);
                } else {
                    tracing::debug!(source = %ctx.source_id, %peer, error = %e, "wmbus telegram not decodable");
                }
                return Vec::new();
            }
        };
        // No downgrade: a meter with a key accepts only telegrams encrypted under it.
        if self.keys.contains_key(decoded.meter.as_str())
            && let Err(e) = keyed_protection(raw, &self.keys, &mut self.cache)
        {
            tracing::warn!(source = %ctx.source_id, %peer, meter = %decoded.meter, error = %e, "refused a wM-Bus downgrade");
            ctx.reject(&e);
            return Vec::new();
        }
        stats.decoded.fetch_add(1, Ordering::Relaxed);
        let mut readings = decoded.readings;
        let models = self.cache.model_count();
        if !self.hold.is_empty() {
            let now = std::time::Instant::now();
            let taken = if models == self.models_seen {
                self.hold.take(decoded.meter.as_str(), now)
            } else {
                self.hold.take_all(now)
            };
            for held in taken {
                readings.extend(self.retry(held, ctx, stats));
            }
            self.count_drops(ctx);
        }
        self.models_seen = models;
        readings
    }

    /// Decodes a held compact telegram again, with its own receive time and channel; one
    /// whose format is still unknown is held again (not counted twice).
    fn retry(
        &mut self,
        held: Held<HeldTelegram>,
        ctx: &SourceContext,
        stats: &ReceiverStats,
    ) -> Vec<model::Reading> {
        let counters = ctx.sink.counters();
        let t = &held.item;
        let frame = match decoders::wmbus::decode(&t.raw, &self.keys, &mut self.cache) {
            Ok(frame) => frame,
            Err(WmbusError::UnknownCompactFormat { meter, signature }) => {
                self.hold.hold(meter, signature, held.received, held.item);
                return Vec::new();
            }
            Err(e) => {
                tracing::debug!(source = %ctx.source_id, meter = %held.meter, error = %e, "held compact wmbus telegram not decodable with its format");
                ctx.reject(&e);
                counters.add_compact(&ctx.source_id, CompactOutcome::Failed, 1);
                return Vec::new();
            }
        };
        let meter = match normalise::meter_id(&frame) {
            Ok(meter) => meter,
            Err(e) => {
                ctx.reject(&e);
                counters.add_compact(&ctx.source_id, CompactOutcome::Failed, 1);
                return Vec::new();
            }
        };
        if self.keys.contains_key(meter.as_str())
            && let Err(e) = keyed_protection(&t.raw, &self.keys, &mut self.cache)
        {
            tracing::warn!(source = %ctx.source_id, %meter, error = %e, "refused a held wM-Bus downgrade");
            ctx.reject(&e);
            counters.add_compact(&ctx.source_id, CompactOutcome::Failed, 1);
            return Vec::new();
        }
        let meter_ts = self
            .meter_offset
            .and_then(|offset| Some(frame_clock(&frame)?.assume_offset(offset)));
        let fc = FrameContext {
            gateway: &ctx.gateway,
            source: ctx.kind,
            source_id: &ctx.source_id,
            channel: Some(&t.channel),
            received_at: t.received_at,
            raw: &t.raw,
        };
        stats.decoded.fetch_add(1, Ordering::Relaxed);
        counters.add_compact(&ctx.source_id, CompactOutcome::Decoded, 1);
        normalise::to_readings(&frame, &meter, meter_ts, &fc)
    }

    /// Drops held telegrams older than their bound; called when no datagram arrives too.
    fn expire(&mut self, ctx: &SourceContext) {
        if !self.hold.is_empty() {
            self.hold.expire(std::time::Instant::now());
            self.count_drops(ctx);
        }
    }

    /// Exports the hold's drops (full, too old) not exported yet.
    fn count_drops(&mut self, ctx: &SourceContext) {
        let counters = ctx.sink.counters();
        let (evicted, expired) = (self.hold.dropped_full(), self.hold.dropped_old());
        let new_evicted = evicted.saturating_sub(self.evicted_counted);
        let new_expired = expired.saturating_sub(self.expired_counted);
        if new_evicted > 0 || new_expired > 0 {
            tracing::warn!(source = %ctx.source_id, evicted = new_evicted, expired = new_expired, "held compact wmbus telegrams dropped before their full frame came");
        }
        counters.add_compact(&ctx.source_id, CompactOutcome::Evicted, new_evicted);
        counters.add_compact(&ctx.source_id, CompactOutcome::Expired, new_expired);
        (self.evicted_counted, self.expired_counted) = (evicted, expired);
    }
}

impl Source for WmbusSource {
    type Config = edge_config::Valid<WmbusUdpSourceConfig>;
    const KIND: SourceKind = SourceKind::Wmbus;

    async fn build(config: &Self::Config, env: &SourceEnv) -> Result<Self, SourceError> {
        // Checked by edge-config (`Valid`): nothing to validate here.
        let socket =
            match env.udp_socket() {
                Some(socket) => Arc::clone(socket),
                None => Arc::new(bind_when_free(config).await.map_err(|source| {
                    SourceError::Socket {
                        what: "wM-Bus UDP socket",
                        addr: config.listen.clone(),
                        source,
                    }
                })?),
            };
        // Keys given on [[device]] entries of this source join the source's own.
        let mut keys = config.key_map();
        let mut extra = (**config).clone();
        extra.keys.clear();
        for d in env.devices() {
            if d.source.get_ref() == env.source_id()
                && let Some(key) = &d.key
            {
                extra
                    .keys
                    .insert(d.id.as_str().to_owned(), key.get_ref().clone());
            }
        }
        for (meter, key) in extra.key_map() {
            keys.entry(meter).or_insert(key);
        }
        Ok(Self {
            socket,
            listen: config.listen.clone(),
            receiver: Receiver {
                keys,
                cache: FormatCache::new(),
                dedup: Dedup::new(config.dedup_window),
                meter_offset: config.meter_utc_offset_minutes.and_then(|m| {
                    UtcOffset::from_whole_seconds(i32::from(m).saturating_mul(60)).ok()
                }),
                hold: CompactHold::new(config.compact_hold_frames, config.compact_hold_max_age),
                models_seen: 0,
                evicted_counted: 0,
                expired_counted: 0,
            },
            stats: Arc::default(),
        })
    }

    fn commands(&self) -> Commands {
        Commands::Unavailable("wM-Bus receiver is receive-only".into())
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        WmbusSource::local_addr(self)
    }

    fn udp_socket(&self) -> Option<Arc<UdpSocket>> {
        Some(Arc::clone(&self.socket))
    }

    /// Datagrams are read in batches: every datagram waiting in the socket (up to
    /// [`MAX_BATCH`]) is decoded and their readings go to the spool in one submit, so a burst
    /// of hundreds of meters costs a few group commits instead of one each, while the kernel
    /// buffer (`recv_buffer_bytes`) holds what arrives meanwhile. Datagrams the kernel still
    /// drops are counted as `wm_gateway_udp_kernel_drops_total`.
    async fn run(self, mut ctx: SourceContext) -> Result<(), SourceError> {
        let Self {
            socket,
            listen,
            mut receiver,
            stats,
        } = self;
        // wM-Bus meters are receive-only here (no bidirectional mode): commands are refused.
        let mut commands = std::mem::replace(&mut ctx.commands, tokio::sync::mpsc::channel(1).1);
        let refuse = tokio::spawn(async move {
            while let Some(req) = commands.recv().await {
                let _gone = req.reply.send(crate::CommandOutcome::Failed(
                    "wM-Bus meters take no commands through this receiver".into(),
                ));
            }
        });
        // The drop counter is read by its own task: it must keep counting while the receive
        // loop waits for the spool, which is exactly when the kernel buffer overflows.
        let drop_watch = {
            let socket = Arc::clone(&socket);
            let sink = ctx.sink.clone();
            let source_id = ctx.source_id.clone();
            tokio::spawn(async move {
                let mut seen = kernel_drops(&socket).unwrap_or(0);
                let mut poll = tokio::time::interval(DROP_POLL);
                poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    poll.tick().await;
                    let Some(total) = kernel_drops(&socket) else {
                        continue;
                    };
                    let new = total.saturating_sub(seen);
                    if new > 0 {
                        tracing::warn!(source = %source_id, dropped = new, "kernel dropped wmbus datagrams (receive buffer full)");
                        sink.counters().add_kernel_drops(&source_id, new);
                    }
                    seen = total;
                }
            })
        };
        ctx.readiness.set_ready();
        tracing::debug!(source = %ctx.source_id, %listen, "wmbus receiver ready");
        let mut buf = vec![0u8; 1024];
        let mut expiry = tokio::time::interval(HOLD_EXPIRY);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = ctx.shutdown.cancelled() => break,
                _ = expiry.tick() => {
                    receiver.expire(&ctx);
                    continue;
                }
                r = socket.readable() => {
                    if let Err(e) = r {
                        tracing::warn!(source = %ctx.source_id, error = %e, "wmbus socket not readable");
                        continue;
                    }
                }
            }
            let mut readings = Vec::new();
            for _ in 0..MAX_BATCH {
                match socket.try_recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        let raw = buf.get(..n).unwrap_or(&[]);
                        readings.extend(receiver.readings(raw, peer, &ctx, &stats));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(source = %ctx.source_id, error = %e, "wmbus receive failed");
                        break;
                    }
                }
            }
            // Radio has no acknowledgement: a refused submit is logged, the meter sends again
            // at its next interval.
            if let Err(e) = ctx.submit(readings).await {
                tracing::warn!(source = %ctx.source_id, error = %e, "spool refused wmbus readings");
            }
        }
        refuse.abort();
        drop_watch.abort();
        Ok(())
    }
}

/// The no-downgrade check of a telegram of a meter with a key (issue 16): parsed again for its
/// protection (only keyed meters pay for it), which must be decryption under the key. A
/// telegram that decodes but does not parse as wireless (a wired frame) is plaintext too.
fn keyed_protection(
    raw: &[u8],
    keys: &std::collections::HashMap<String, [u8; 16]>,
    cache: &mut FormatCache,
) -> Result<(), Downgrade> {
    match decoders::wmbus::parse(raw, keys, cache) {
        Ok(t) => decoders::wmbus::downgrade::check_keyed(&t).map_err(|e| Downgrade(e.to_string())),
        Err(_) => Err(Downgrade("not a wireless telegram".into())),
    }
}

/// A telegram of a meter with a key that was not encrypted under it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Downgrade(String);

impl super::ErrorCode for Downgrade {
    fn code(&self) -> &'static str {
        "security_downgrade"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_ignores_c_field_and_expires() {
        let mut d = Dedup::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(d.first_time(&[5, 0x44, 1, 2, 3, 4], t0));
        assert!(!d.first_time(&[5, 0x46, 1, 2, 3, 4], t0 + Duration::from_secs(1)));
        assert!(d.first_time(&[5, 0x44, 1, 2, 3, 5], t0 + Duration::from_secs(1)));
        assert!(d.first_time(&[5, 0x44, 1, 2, 3, 4], t0 + Duration::from_secs(11)));
        assert_eq!(d.seen.len(), 1);
    }

    #[test]
    fn drops_are_read_from_the_socket_line() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1234: 0100007F:2333 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 55501 2 0000000000000000 0
 1235: 0100007F:2334 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 55502 2 0000000000000000 17
";
        assert_eq!(drops_of_inode(table, "55502"), Some(17));
        assert_eq!(drops_of_inode(table, "55501"), Some(0));
        assert_eq!(drops_of_inode(table, "5550"), None);
    }

    #[tokio::test]
    async fn the_kernel_drop_counter_of_a_live_socket_is_found() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(kernel_drops(&socket), Some(0));
    }
}
