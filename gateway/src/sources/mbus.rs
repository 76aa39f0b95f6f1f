//! Serial M-Bus master (EN 13757-2 link layer over tokio-serial, 8E1).
//!
//! Each cycle reads every meter: primary meters with SND_NKE then REQ_UD2, secondary meters
//! by selecting (SND_UD CI 52 to 253, which deselects every other slave) and REQ_UD2 to 253. The
//! FCB starts at 1 after SND_NKE and toggles per new request; a retry after a timeout or a
//! garbled answer repeats the same FCB so the slave repeats its last telegram. Telegrams
//! ending in DIF 1F ("more records follow") are followed by further REQ_UD2 up to a limit.
//! A wildcard secondary search walks the standard digit tree (F = any digit): no answer →
//! nobody there, one clean E5 → one meter (read it to learn its address), anything else →
//! several answered at once (collision) → refine the next digit.

use std::collections::HashMap;
use std::time::Duration;

use edge_config::mbus::MbusSerialSourceConfig;
use model::{CommandAction, SourceKind};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_serial::{SerialPort as _, SerialStream};
use tokio_util::sync::CancellationToken;

use super::{ErrorCode, Health, Received, Source, SourceContext, SourceEnv, SourceError};
use crate::normalise;
use crate::{CommandOutcome, CommandRequest};

/// Why one exchange on the bus failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasterError {
    /// No answer within the timeout, after every retry.
    #[error("no answer from {0} after retries")]
    NoAnswer(String),
    /// Answers were garbled (bad checksum, framing) after every retry.
    #[error("garbled answer from {address}: {detail}")]
    Garbled {
        /// Address asked.
        address: String,
        /// What was wrong.
        detail: String,
    },
    /// A secondary address did not select exactly one meter.
    #[error("secondary address {0} selected no single meter")]
    NotSelected(String),
    /// The serial port failed.
    #[error("serial I/O: {0}")]
    Io(String),
}

impl ErrorCode for MasterError {
    fn code(&self) -> &'static str {
        match self {
            Self::NoAnswer(_) => "no_answer",
            Self::Garbled { .. } => "garbled",
            Self::NotSelected(_) => "not_selected",
            Self::Io(_) => "io",
        }
    }
}

/// A meter address on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// Primary address 0..=250.
    Primary(u8),
    /// Secondary address: identification number as 8 digits.
    Secondary(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Primary(p) => write!(f, "primary {p}"),
            Self::Secondary(s) => write!(f, "secondary {s}"),
        }
    }
}

/// Link-layer frames (EN 13757-2 / IEC 60870-5-2 FT1.2).
pub mod link {
    /// Single-character acknowledgement.
    pub const ACK: u8 = 0xE5;
    /// Address that talks to the selected meter.
    pub const SELECTED: u8 = 0xFD;

    use decoders::mbus::{self, LinkFrame, MbusError, encode};

    /// SND_NKE (link reset) to `a`.
    pub fn snd_nke(a: u8) -> Vec<u8> {
        encode::snd_nke(a)
    }

    /// REQ_UD2 to `a` with the frame count bit.
    pub fn req_ud2(a: u8, fcb: bool) -> Vec<u8> {
        encode::req_ud2(a, fcb)
    }

    /// SND_UD to `a` with CI and data (FCB 0: commands are not repeated by FCB logic).
    pub fn snd_ud(a: u8, ci: u8, data: &[u8]) -> Vec<u8> {
        encode::long(encode::C_SND_UD, a, ci, data)
    }

    /// Selection by secondary address: 8 digit nibbles, most significant first, 0xF = any.
    /// Manufacturer, version and medium are wildcards.
    pub fn select_secondary(digits: [u8; 8]) -> Vec<u8> {
        let id = digits
            .iter()
            .fold(0u32, |acc, d| (acc << 4) | u32::from(d & 0x0F));
        encode::select_secondary(id, None, None, None)
    }

    /// Checks a long frame's framing and checksum with `decoders::mbus`.
    ///
    /// # Errors
    /// The decoder's [`MbusError`] (bad checksum, length, start or stop byte...), or
    /// [`MbusError::NotLongFrame`] for a short frame or E5.
    pub fn check_long(frame: &[u8]) -> Result<(), MbusError> {
        match mbus::parse_link(frame)? {
            LinkFrame::Long { .. } | LinkFrame::Control { .. } => Ok(()),
            LinkFrame::Short { .. } => Err(MbusError::NotLongFrame {
                kind: "short frame",
            }),
            LinkFrame::Ack => Err(MbusError::NotLongFrame {
                kind: "single character E5",
            }),
        }
    }

    /// The identification number of an RSP_UD (CI 72) as 8 digits.
    pub fn identification(frame: &[u8]) -> Option<String> {
        let rsp = mbus::parse(frame).ok()?;
        match rsp.header {
            mbus::AppHeader::Long(h) if rsp.ci == 0x72 => {
                let s = h.id_digits();
                s.bytes().all(|b| b.is_ascii_digit()).then_some(s)
            }
            _ => None,
        }
    }

    /// Whether the telegram has a DIF 1F record (more records follow in another telegram),
    /// by the decoder's record walk; a telegram that does not parse answers `false`.
    pub fn more_records_follow(frame: &[u8]) -> bool {
        let Ok(rsp) = mbus::parse(frame) else {
            return false;
        };
        let mut more = false;
        for record in rsp.records {
            match record {
                Ok(r) => more |= r.dif == 0x1F,
                Err(_) => return false,
            }
        }
        more
    }
}

/// What came back after a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing within the timeout.
    Nothing,
    /// A single E5 and nothing after it.
    Ack,
    /// A valid long frame.
    Long(Vec<u8>),
    /// Anything else (collision, noise, bad checksum).
    Garbled(String),
}

/// Result of a secondary-address selection probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// No meter matched.
    None,
    /// Exactly one meter matched and is now selected.
    Single,
    /// Several meters answered at once.
    Collision,
}

/// The bus master: one request at a time on one serial line.
#[derive(Debug)]
pub struct Master {
    port: SerialStream,
    timeout: Duration,
    /// Quiet time after which an answer is complete.
    gap: Duration,
    retries: u32,
    /// Last FCB sent to each secondary-addressed meter. SND_NKE to 253 would deselect, so a
    /// selected meter's FCB cannot be reset; continuing the alternation across cycles makes
    /// each cycle's first REQ_UD2 a new request instead of a repeat of last cycle's answer.
    last_fcb: HashMap<String, bool>,
}

impl Master {
    /// Opens `port` at `baud` 8E1.
    pub fn open(
        port: &str,
        baud: u32,
        timeout: Duration,
        retries: u32,
    ) -> Result<Self, MasterError> {
        let builder = tokio_serial::new(port, baud)
            .parity(tokio_serial::Parity::Even)
            .data_bits(tokio_serial::DataBits::Eight)
            .stop_bits(tokio_serial::StopBits::One);
        let port = SerialStream::open(&builder).map_err(|e| MasterError::Io(e.to_string()))?;
        // 11 bits per character; an answer is over after ~20 silent character times (min 30 ms).
        let char_time = Duration::from_secs_f64(11.0 / f64::from(baud.max(1)));
        Ok(Self {
            port,
            timeout,
            gap: (char_time * 20).max(Duration::from_millis(30)),
            retries,
            last_fcb: HashMap::new(),
        })
    }

    async fn send(&mut self, frame: &[u8]) -> Result<(), MasterError> {
        // Stale bytes (a late answer to a timed-out request) must not be read as this answer.
        self.port
            .clear(tokio_serial::ClearBuffer::Input)
            .map_err(|e| MasterError::Io(e.to_string()))?;
        self.port
            .write_all(frame)
            .await
            .map_err(|e| MasterError::Io(e.to_string()))?;
        self.port
            .flush()
            .await
            .map_err(|e| MasterError::Io(e.to_string()))
    }

    async fn read_byte(&mut self, wait: Duration) -> Result<Option<u8>, MasterError> {
        let mut b = [0u8; 1];
        match tokio::time::timeout(wait, self.port.read(&mut b)).await {
            Err(_) => Ok(None),
            Ok(Ok(0)) => Err(MasterError::Io("serial port closed".into())),
            Ok(Ok(_)) => Ok(Some(b[0])),
            Ok(Err(e)) => Err(MasterError::Io(e.to_string())),
        }
    }

    /// Reads bytes until the line is quiet, after the first byte arrived within `timeout`.
    async fn read_reply(&mut self) -> Result<Reply, MasterError> {
        let Some(first) = self.read_byte(self.timeout).await? else {
            return Ok(Reply::Nothing);
        };
        let mut bytes = vec![first];
        while let Some(b) = self.read_byte(self.gap).await? {
            bytes.push(b);
            if bytes.len() > 300 {
                break;
            }
        }
        Ok(classify(bytes))
    }

    /// Sends `frame` and reads the answer, retrying (same frame) on silence or garbage.
    async fn exchange(&mut self, frame: &[u8], address: &str) -> Result<Reply, MasterError> {
        let mut last = Reply::Nothing;
        for _ in 0..=self.retries {
            self.send(frame).await?;
            let reply = self.read_reply().await?;
            match reply {
                Reply::Ack | Reply::Long(_) => return Ok(reply),
                other => last = other,
            }
        }
        match last {
            Reply::Garbled(detail) => Err(MasterError::Garbled {
                address: address.to_owned(),
                detail,
            }),
            _ => Err(MasterError::NoAnswer(address.to_owned())),
        }
    }

    async fn expect_ack(&mut self, frame: &[u8], address: &str) -> Result<(), MasterError> {
        match self.exchange(frame, address).await? {
            Reply::Ack => Ok(()),
            _ => Err(MasterError::Garbled {
                address: address.to_owned(),
                detail: "expected E5, got a long frame".into(),
            }),
        }
    }

    /// Probes a secondary-address mask once (no retries: silence is an answer here).
    pub async fn probe(&mut self, digits: [u8; 8]) -> Result<Probe, MasterError> {
        self.send(&link::select_secondary(digits)).await?;
        Ok(match self.read_reply().await? {
            Reply::Nothing => Probe::None,
            Reply::Ack => Probe::Single,
            Reply::Long(_) | Reply::Garbled(_) => Probe::Collision,
        })
    }

    async fn select(&mut self, id: &str) -> Result<(), MasterError> {
        let mut digits = [0u8; 8];
        for (slot, b) in digits.iter_mut().zip(id.bytes()) {
            *slot = b.wrapping_sub(b'0');
        }
        // No deselect first: a selection deselects every slave whose address does not match.
        for _ in 0..=self.retries {
            match self.probe(digits).await? {
                Probe::Single => return Ok(()),
                Probe::None | Probe::Collision => {}
            }
        }
        Err(MasterError::NotSelected(id.to_owned()))
    }

    /// Reads every telegram of one meter: SND_NKE, then REQ_UD2 with FCB 1, 0, 1... while the
    /// telegram ends with DIF 1F, at most `max_telegrams`.
    pub async fn read(
        &mut self,
        address: &Address,
        max_telegrams: u8,
    ) -> Result<Vec<Vec<u8>>, MasterError> {
        let name = address.to_string();
        let a = match address {
            Address::Primary(p) => {
                self.expect_ack(&link::snd_nke(*p), &name).await?;
                *p
            }
            Address::Secondary(id) => {
                self.select(id).await?;
                link::SELECTED
            }
        };
        // After SND_NKE the slave takes either FCB as new; start with 1.
        let mut fcb = match address {
            Address::Primary(_) => true,
            Address::Secondary(id) => !self.last_fcb.get(id).copied().unwrap_or(false),
        };
        let mut telegrams = Vec::new();
        for _ in 0..max_telegrams {
            if let Address::Secondary(id) = address {
                self.last_fcb.insert(id.clone(), fcb);
            }
            match self.exchange(&link::req_ud2(a, fcb), &name).await? {
                Reply::Long(frame) => {
                    let more = link::more_records_follow(&frame);
                    telegrams.push(frame);
                    if !more {
                        break;
                    }
                }
                _ => {
                    return Err(MasterError::Garbled {
                        address: name,
                        detail: "expected RSP_UD, got E5".into(),
                    });
                }
            }
            fcb = !fcb;
        }
        Ok(telegrams)
    }

    /// Sends SND_UD with `ci` and `data` to a meter and waits for its E5.
    pub async fn snd_ud(
        &mut self,
        address: &Address,
        ci: u8,
        data: &[u8],
    ) -> Result<(), MasterError> {
        let name = address.to_string();
        let a = match address {
            Address::Primary(p) => *p,
            Address::Secondary(id) => {
                self.select(id).await?;
                link::SELECTED
            }
        };
        self.expect_ack(&link::snd_ud(a, ci, data), &name).await
    }

    /// Wildcard secondary search over the digit tree; returns the identification numbers found.
    pub async fn search(&mut self) -> Result<Vec<String>, MasterError> {
        let mut found = Vec::new();
        // Depth-first over positions 0..8, most significant digit first; a stack avoids
        // recursion in async code.
        let mut stack: Vec<[u8; 8]> = vec![];
        for d in (0..10u8).rev() {
            let mut m = [0x0F; 8];
            m[0] = d;
            stack.push(m);
        }
        self.send(&link::snd_nke(link::SELECTED)).await?;
        let _ack = self.read_reply().await?;
        while let Some(mask) = stack.pop() {
            match self.probe(mask).await? {
                Probe::None => {}
                Probe::Single => {
                    // One meter matches: read it through 253 to learn its full number.
                    let reply = self
                        .exchange(&link::req_ud2(link::SELECTED, true), "selected")
                        .await;
                    if let Ok(Reply::Long(frame)) = reply
                        && let Some(id) = link::identification(&frame)
                        && !found.contains(&id)
                    {
                        self.last_fcb.insert(id.clone(), true);
                        found.push(id);
                    }
                }
                Probe::Collision => {
                    let Some(pos) = mask.iter().position(|d| *d == 0x0F) else {
                        // All digits fixed and still several answers: same number twice on
                        // the bus (only manufacturer/version could tell them apart).
                        tracing::warn!(?mask, "secondary address collision on a full number");
                        continue;
                    };
                    for d in (0..10u8).rev() {
                        let mut m = mask;
                        if let Some(slot) = m.get_mut(pos) {
                            *slot = d;
                        }
                        stack.push(m);
                    }
                }
            }
        }
        found.sort();
        Ok(found)
    }
}

fn classify(bytes: Vec<u8>) -> Reply {
    match bytes.as_slice() {
        [link::ACK] => Reply::Ack,
        [0x68, ..] => match link::check_long(&bytes) {
            Ok(()) => Reply::Long(bytes),
            Err(e) => Reply::Garbled(e.to_string()),
        },
        other => Reply::Garbled(format!(
            "unexpected {} byte(s) starting {:02x?}",
            other.len(),
            other.iter().take(4).collect::<Vec<_>>()
        )),
    }
}

/// The serial M-Bus master: the port is opened at build.
#[derive(Debug)]
pub struct MbusSource {
    master: Master,
    config: MbusSerialSourceConfig,
    health: Health,
}

impl Source for MbusSource {
    type Config = edge_config::Valid<MbusSerialSourceConfig>;
    const KIND: SourceKind = SourceKind::MbusSerial;

    async fn build(config: &Self::Config, env: &SourceEnv) -> Result<Self, SourceError> {
        // Checked by edge-config (`Valid`): nothing to validate here.
        let master = Master::open(
            &config.port,
            config.baud_rate,
            config.timeout,
            config.retries,
        )
        .map_err(|e| SourceError::Serial {
            port: config.port.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            master,
            config: (**config).clone(),
            health: env.health(),
        })
    }

    /// Runs the master until shutdown, keeping per-meter health (keyed `primary 5` /
    /// `secondary 12345678`); ready once the secondary search (if any) is done.
    async fn run(self, mut ctx: SourceContext) -> Result<(), SourceError> {
        let Self {
            master,
            config,
            health,
        } = self;
        let commands = std::mem::replace(&mut ctx.commands, mpsc::channel(1).1);
        let shutdown = ctx.shutdown.clone();
        let mut meters: Vec<Address> = config
            .meters
            .iter()
            .filter_map(|m| match (m.primary, &m.secondary) {
                (Some(p), _) => Some(Address::Primary(p)),
                (None, Some(s)) => Some(Address::Secondary(s.clone())),
                (None, None) => None,
            })
            .collect();
        let mut bus = Bus {
            master,
            config,
            ctx,
            health,
            known: HashMap::new(),
        };
        if bus.config.search_secondary {
            match bus.master.search().await {
                Ok(found) => {
                    tracing::info!(source = %bus.ctx.source_id, ?found, "secondary search done");
                    for id in found {
                        let a = Address::Secondary(id);
                        if !meters.contains(&a) {
                            meters.push(a);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(source = %bus.ctx.source_id, error = %e, "secondary search failed")
                }
            }
        }
        bus.ctx.readiness.set_ready();
        bus.cycle_loop(meters, commands, shutdown).await;
        Ok(())
    }
}

struct Bus {
    master: Master,
    config: MbusSerialSourceConfig,
    ctx: SourceContext,
    health: Health,
    /// Meter id → bus address, learnt from reads (commands name meters by id).
    known: HashMap<String, Address>,
}

impl Bus {
    async fn cycle_loop(
        &mut self,
        meters: Vec<Address>,
        mut commands: mpsc::Receiver<CommandRequest>,
        shutdown: CancellationToken,
    ) {
        let mut next = tokio::time::Instant::now();
        let mut commands_open = true;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                req = commands.recv(), if commands_open => match req {
                    Some(req) => self.command(req).await,
                    None => commands_open = false,
                },
                () = tokio::time::sleep_until(next) => {
                    for a in &meters {
                        if shutdown.is_cancelled() {
                            return;
                        }
                        // Commands wait at most one meter read.
                        while let Ok(req) = commands.try_recv() {
                            self.command(req).await;
                        }
                        self.read_meter(a).await;
                    }
                    next += self.config.poll_interval;
                    let now = tokio::time::Instant::now();
                    while next <= now {
                        next += self.config.poll_interval;
                    }
                }
            }
        }
    }

    async fn read_meter(&mut self, address: &Address) {
        let source_id = self.ctx.source_id.as_str();
        let telegrams = match self.master.read(address, self.config.max_telegrams).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(source = %source_id, %address, error = %e, "m-bus read failed");
                if let MasterError::Garbled { .. } = e {
                    self.ctx.reject(&e);
                }
                self.health.update(&address.to_string(), |h| {
                    h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                    h.polls_failed += 1;
                    h.last_error = Some(e.to_string());
                });
                return;
            }
        };
        let received_at = OffsetDateTime::now_utc();
        // `/dev/ttyUSB0 primary 5`, `/dev/ttyUSB0 secondary 12345678`.
        let channel = format!("{} {address}", self.config.port);
        let mut readings = Vec::new();
        for raw in &telegrams {
            let frame = Received {
                raw,
                channel: Some(&channel),
                received_at,
            };
            // Bytes to readings directly (no `DecodedFrame`): the same readings and failure
            // counts as `SourceContext::decode` with `mbus::decode`.
            self.ctx.count_frames(1);
            let decoded = normalise::mbus_readings(&self.ctx.frame_context(&frame), None)
                .map_err(|e| self.ctx.reject(&e));
            match decoded {
                Ok((meter, decoded)) => {
                    self.known.insert(meter.to_string(), address.clone());
                    readings.extend(decoded);
                }
                Err(e) => {
                    tracing::warn!(source = %source_id, %address, error = %e, "m-bus telegram not decodable");
                }
            }
        }
        self.health.update(&address.to_string(), |h| {
            h.consecutive_failures = 0;
            h.polls_ok += 1;
            h.last_ok = Some(received_at);
        });
        // M-Bus has no acknowledgement: the meter is read again next cycle.
        if let Err(e) = self.ctx.submit(readings).await {
            tracing::warn!(source = %source_id, error = %e, "spool refused m-bus readings");
        }
    }

    async fn command(&mut self, req: CommandRequest) {
        let CommandRequest { command, reply } = req;
        let Some(address) = self.known.get(command.device.as_str()).cloned() else {
            let _gone = reply.send(CommandOutcome::Failed(format!(
                "meter {} has not been read on this bus yet",
                command.device
            )));
            return;
        };
        // read-now hook (issue 21): one extra read through the normal read path (readings go
        // to the spool as usual); acknowledged when that read succeeded.
        if command.action == CommandAction::ReadNow {
            let key = address.to_string();
            let before = self.health.get(&key).map_or(0, |h| h.polls_ok);
            self.read_meter(&address).await;
            let _gone = reply.send(match self.health.get(&key) {
                Some(h) if h.polls_ok > before => CommandOutcome::Acknowledged,
                h => CommandOutcome::Failed(format!(
                    "read-now failed: {}",
                    h.and_then(|h| h.last_error)
                        .unwrap_or_else(|| "no answer".into())
                )),
            });
            return;
        }
        let result = match command.action {
            CommandAction::MbusApplicationReset => self.master.snd_ud(&address, 0x50, &[]).await,
            CommandAction::SetTime => {
                // The gateway's UTC time: the config has no per-meter time zone yet.
                let frame = decoders::mbus::encode::set_time(0, OffsetDateTime::now_utc());
                // From CI on, without CS and stop: reuse the encoder's record bytes.
                let data = frame.get(7..frame.len().saturating_sub(2)).unwrap_or(&[]);
                self.master.snd_ud(&address, 0x51, data).await
            }
            other => {
                let _gone = reply.send(CommandOutcome::Failed(format!(
                    "the m-bus master cannot execute {other:?}"
                )));
                return;
            }
        };
        let _gone = reply.send(match result {
            // E5 only confirms receipt at the link layer; M-Bus has no execution result.
            Ok(()) => CommandOutcome::Sent,
            Err(e) => CommandOutcome::Failed(e.to_string()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsp(records: &[u8]) -> Vec<u8> {
        let mut data = vec![0x78, 0x56, 0x34, 0x12, 0x2D, 0x2C, 0x01, 0x07, 0, 0, 0, 0];
        data.extend_from_slice(records);
        decoders::mbus::encode::long(0x08, 1, 0x72, &data)
    }

    #[test]
    fn more_records_follow_walks_records() {
        // 0C 13 + 4 bytes, then 1F.
        assert!(link::more_records_follow(&rsp(&[
            0x0C, 0x13, 1, 2, 3, 4, 0x1F
        ])));
        assert!(!link::more_records_follow(&rsp(&[0x0C, 0x13, 1, 2, 3, 4])));
        // A value byte 1F is data, not the marker.
        assert!(!link::more_records_follow(&rsp(&[0x01, 0x13, 0x1F])));
        // DIFE chain, VIFE chain, LVAR text, plain-text VIF, then 1F.
        let records = [
            0x8C, 0x10, 0x13, 1, 2, 3, 4, // DIF+DIFE
            0x04, 0xFD, 0x17, 0, 0, 0, 0, // VIF FD + VIFE
            0x0D, 0x78, 3, b'a', b'b', b'c', // LVAR 3 ASCII
            0x02, 0x7C, 2, b'x', b'y', 9, 9, // plain-text VIF
            0x2F, 0x1F,
        ];
        assert!(link::more_records_follow(&rsp(&records)));
        assert_eq!(link::identification(&rsp(&[])).as_deref(), Some("12345678"));
    }

    #[test]
    fn check_long_reports_what_is_wrong() {
        let mut f = rsp(&[0x0C, 0x13, 1, 2, 3, 4]);
        assert!(link::check_long(&f).is_ok());
        let cs = f.len() - 2;
        f[cs] ^= 1;
        assert_eq!(link::check_long(&f).unwrap_err().code(), "bad_checksum");
        assert_eq!(classify(vec![0xE5]), Reply::Ack);
        assert!(matches!(classify(vec![0xE5, 0xE5]), Reply::Garbled(_)));
    }

    #[test]
    fn select_mask_encodes_digits_little_endian_with_wildcards() {
        let f = link::select_secondary([1, 2, 3, 4, 0xF, 0xF, 0xF, 0xF]);
        assert_eq!(&f[7..15], &[0xFF, 0xFF, 0x34, 0x12, 0xFF, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..2000usize {
            let mut bytes = Vec::with_capacity(len % 300);
            for _ in 0..len % 300 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push((seed >> 24) as u8);
            }
            if let Some(b) = bytes.first_mut() {
                *b = if len % 2 == 0 { 0x68 } else { *b };
            }
            link::check_long(&bytes).ok();
            let _ = link::more_records_follow(&bytes);
            let _ = link::identification(&bytes);
            let _ = classify(bytes.clone());
            // Also as the records of a valid frame.
            let _ = link::more_records_follow(&rsp(bytes.get(..200).unwrap_or(&bytes)));
        }
    }
}
