//! Wired M-Bus slaves on a serial pseudo-terminal (a socat pty pair), as the gateway's
//! M-Bus master sees them at 2400 baud 8E1.
//!
//! The slaves answer SND_NKE with E5, REQ_UD2 with RSP_UD (a repeated FCB gets the previous
//! answer again, as EN 13757-2 requires), secondary-address selection (wildcard nibbles F)
//! with E5, application reset and set-time with E5. A selection matching several slaves
//! answers with an unreadable byte pair, which is what a collision looks like on a real bus.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use decoders::mbus::{self, LinkFrame, MbusError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::engine::{Emission, MeterSpec};
use crate::frames::{mbus_header, mbus_rsp_ud};

/// Primary address that addresses the selected slave (secondary addressing).
const ADDRESS_SELECTED: u8 = 0xFD;
/// Bytes a collision produces on the line in this simulator (no valid frame start).
pub const COLLISION: [u8; 2] = [0x55, 0xAA];

/// The latest reading of each simulated meter, shared with the fleet driver.
pub type Latest = Arc<Mutex<HashMap<u32, Emission>>>;

#[derive(Debug, Clone)]
struct Slave {
    primary: u8,
    meter: u32,
    last_fcb: Option<bool>,
    access: u8,
    last_reply: Option<Vec<u8>>,
}

/// The slaves on one bus and the link-layer state of each.
#[derive(Debug)]
pub struct MbusBank {
    slaves: Vec<Slave>,
    specs: HashMap<u32, MeterSpec>,
    latest: Latest,
    selected: Option<usize>,
    utc_offset_hours: i8,
    /// RSP_UD frames sent.
    pub rsp_ud: u64,
    /// Replies of any kind sent.
    pub replies: u64,
}

impl MbusBank {
    /// Creates slaves with primary addresses 1, 2, … for `meters` (population indices).
    pub fn new(meters: &[(u32, MeterSpec)], latest: Latest, utc_offset_hours: i8) -> Self {
        let slaves = meters
            .iter()
            .zip(1u8..=250)
            .map(|((meter, _), primary)| Slave {
                primary,
                meter: *meter,
                last_fcb: None,
                access: 0,
                last_reply: None,
            })
            .collect();
        Self {
            slaves,
            specs: meters.iter().cloned().collect(),
            latest,
            selected: None,
            utc_offset_hours,
            rsp_ud: 0,
            replies: 0,
        }
    }

    fn target(&self, address: u8) -> Option<usize> {
        if address == ADDRESS_SELECTED {
            return self.selected;
        }
        self.slaves.iter().position(|s| s.primary == address)
    }

    /// Returns the answer to one frame from the master, if the bus answers at all.
    pub fn handle(&mut self, frame: &LinkFrame<'_>) -> Option<Vec<u8>> {
        let reply = match *frame {
            LinkFrame::Ack => None,
            LinkFrame::Short { control, address } => match control & 0x4F {
                // SND_NKE (0x40): link reset.
                0x40 => {
                    let i = self.target(address)?;
                    if let Some(s) = self.slaves.get_mut(i) {
                        s.last_fcb = None;
                    }
                    if address == ADDRESS_SELECTED {
                        self.selected = None;
                    }
                    Some(mbus::encode::ack())
                }
                // REQ_UD2 (0x5B / 0x7B): class 2 data, FCB in bit 5.
                0x4B => {
                    let i = self.target(address)?;
                    self.req_ud2(i, control & 0x20 != 0)
                }
                _ => None,
            },
            LinkFrame::Control { address, ci, .. } | LinkFrame::Long { address, ci, .. } => {
                match ci {
                    mbus::CI_SELECT if address == ADDRESS_SELECTED => {
                        let wanted = frame.secondary_selection()?;
                        let matching: Vec<usize> = self
                            .slaves
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| {
                                self.specs
                                    .get(&s.meter)
                                    .and_then(|spec| mbus_header(spec, 0, &Emission::idle(s.meter)))
                                    .is_some_and(|h| wanted.matches(&h))
                            })
                            .map(|(i, _)| i)
                            .collect();
                        match matching.as_slice() {
                            [] => {
                                self.selected = None;
                                None
                            }
                            [one] => {
                                self.selected = Some(*one);
                                Some(mbus::encode::ack())
                            }
                            _ => {
                                self.selected = None;
                                Some(COLLISION.to_vec())
                            }
                        }
                    }
                    mbus::CI_APPLICATION_RESET | mbus::CI_DATA_SEND => {
                        self.target(address)?;
                        Some(mbus::encode::ack())
                    }
                    _ => None,
                }
            }
        };
        if reply.is_some() {
            self.replies += 1;
        }
        reply
    }

    fn req_ud2(&mut self, i: usize, fcb: bool) -> Option<Vec<u8>> {
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let slave = self.slaves.get_mut(i)?;
        if slave.last_fcb == Some(fcb)
            && let Some(reply) = &slave.last_reply
        {
            // Same FCB: the master did not get our answer; repeat it unchanged.
            self.rsp_ud += 1;
            return Some(reply.clone());
        }
        let spec = self.specs.get(&slave.meter)?;
        let e = latest
            .get(&slave.meter)
            .copied()
            .unwrap_or_else(|| Emission::idle(slave.meter));
        slave.access = slave.access.wrapping_add(1);
        let reply = mbus_rsp_ud(spec, slave.primary, slave.access, &e, self.utc_offset_hours)?;
        slave.last_fcb = Some(fcb);
        slave.last_reply = Some(reply.clone());
        self.rsp_ud += 1;
        Some(reply)
    }
}

/// A running bus: the socat pty pair and the slaves answering on one end.
#[derive(Debug)]
pub struct MbusBus {
    /// Path the gateway's master opens (`…/master`).
    pub master_path: PathBuf,
    socat: Child,
    task: tokio::task::JoinHandle<()>,
}

impl MbusBus {
    /// Creates the pty pair in `dir` (links `slave` and `master`) and starts answering as
    /// `bank` on the slave end.
    ///
    /// # Errors
    /// Fails when socat is missing or the ptys do not appear within 5 s.
    pub async fn start(
        dir: &Path,
        bank: Arc<Mutex<MbusBank>>,
        shutdown: watch::Receiver<bool>,
        on_reply: impl Fn(&MbusBank) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let slave_path = dir.join("slave");
        let master_path = dir.join("master");
        let socat = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", slave_path.display()))
            .arg(format!("pty,raw,echo=0,link={}", master_path.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start socat (install socat)")?;
        // socat creates the links right after start; wait for both (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let ready = slave_path.try_exists().unwrap_or(false)
                && master_path.try_exists().unwrap_or(false);
            if ready {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("socat did not create {} within 5 s", slave_path.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let port = tokio_serial::SerialStream::open(
            &tokio_serial::new(slave_path.to_string_lossy(), 2400)
                .data_bits(tokio_serial::DataBits::Eight)
                .parity(tokio_serial::Parity::Even)
                .stop_bits(tokio_serial::StopBits::One),
        )
        .with_context(|| format!("cannot open {}", slave_path.display()))?;
        let task = tokio::spawn(serve(port, bank, shutdown, on_reply));
        Ok(Self {
            master_path,
            socat,
            task,
        })
    }

    /// Stops answering and ends socat.
    pub async fn stop(mut self) {
        self.task.abort();
        if let Err(e) = self.socat.kill().await {
            tracing::debug!(error = %e, "socat already gone");
        }
    }
}

impl Drop for MbusBus {
    fn drop(&mut self) {
        // socat itself is killed on drop (kill_on_drop); stop answering too.
        self.task.abort();
    }
}

async fn serve(
    mut port: tokio_serial::SerialStream,
    bank: Arc<Mutex<MbusBank>>,
    mut shutdown: watch::Receiver<bool>,
    on_reply: impl Fn(&MbusBank),
) {
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 256];
    loop {
        let n = tokio::select! {
            r = port.read(&mut chunk) => match r {
                Ok(0) | Err(_) => {
                    // The master closed its end; the pty stays, wait a little and retry.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(n) => n,
            },
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => return,
        };
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
        loop {
            let (reply, used) = match mbus::parse_link_prefix(&buf) {
                Ok((frame, used)) => {
                    let mut bank = bank.lock().unwrap_or_else(PoisonError::into_inner);
                    let reply = bank.handle(&frame);
                    if reply.is_some() {
                        on_reply(&bank);
                    }
                    (reply, used)
                }
                Err(MbusError::Truncated { .. } | MbusError::Empty) => break,
                Err(e) => {
                    // Resynchronise: drop one byte and try again (line noise, partial frame).
                    tracing::debug!(error = %e, "m-bus slave dropped a byte");
                    (None, 1)
                }
            };
            buf.drain(..used.min(buf.len()));
            if let Some(reply) = reply
                && let Err(e) = port.write_all(&reply).await
            {
                tracing::warn!(error = %e, "m-bus slave cannot write to the pty");
            }
        }
    }
}
