//! Downlink: commands from `{root}/{gateway}/cmd/{device}` to the device's source.
//!
//! - Idempotent by command id: every command's state is appended to a small log
//!   (`commands.jsonl` in the spool directory, `fsync`ed) *before* it is executed, so a re-sent
//!   command — also after a restart — is never executed twice; its last state is re-published.
//! - Expired commands (`expires_at` passed) are not executed and reported `expired`.
//! - Commands for NB-IoT (CoAP) meters wait in a queue until the meter's next uplink and go out
//!   in the CoAP reply; other devices get a [`CommandRequest`] on their source's channel.
//! - Every state change is published as a `model::CommandAck` on `{root}/{gateway}/cmd-ack`;
//!   after each (re)connect the latest state of recently changed commands is published again
//!   (at least once: consumers keep the latest state per command id).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use model::{
    CommandAck, CommandAction, CommandId, CommandState, DeviceCommand, GatewayId, MeterId,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::sources::{CommandOutcome, CommandRequest};

/// Why the downlink could not start.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    /// The command log could not be read or written.
    #[error("command log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// One line of the command log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogLine {
    ack: CommandAck,
    /// The command itself while it waits in the NB-IoT queue (so a restart re-queues it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<DeviceCommand>,
    /// The CJ/T 188 SER the command went out with (NB-IoT `sent`): only a reply echoing it
    /// completes the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ser: Option<u8>,
}

/// Persistent last state per command id.
#[derive(Debug)]
struct CommandLog {
    path: PathBuf,
    file: File,
    latest: HashMap<CommandId, LogLine>,
}

impl CommandLog {
    fn open(path: &Path) -> Result<Self, DownlinkError> {
        let io = |source| DownlinkError::Io {
            path: path.to_owned(),
            source,
        };
        let mut latest = HashMap::new();
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io)?;
                // A torn last line (crash mid-append) is skipped; its command was not run yet.
                match serde_json::from_str::<LogLine>(&line) {
                    Ok(l) => {
                        latest.insert(l.ack.id.clone(), l);
                    }
                    Err(e) => tracing::warn!(error = %e, "skipping unreadable command log line"),
                }
            }
        }
        // Compact: rewrite only the latest state of each command, atomically.
        let tmp = path.with_extension("jsonl.tmp");
        {
            let mut f = File::create(&tmp).map_err(io)?;
            for l in latest.values() {
                let mut s = serde_json::to_string(l).unwrap_or_default();
                s.push('\n');
                f.write_all(s.as_bytes()).map_err(io)?;
            }
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, path).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            latest,
        })
    }

    fn record(&mut self, line: LogLine) {
        let mut s = serde_json::to_string(&line).unwrap_or_default();
        s.push('\n');
        if let Err(e) = self
            .file
            .write_all(s.as_bytes())
            .and_then(|()| self.file.sync_data())
        {
            tracing::error!(path = %self.path.display(), error = %e, "could not persist command state");
        }
        self.latest.insert(line.ack.id.clone(), line);
    }
}

/// Most commands one NB-IoT meter may have waiting at the gateway, as carrier platforms allow
/// (DOMAIN.md §3); a further one is refused, not queued.
pub const MAX_QUEUED_PER_DEVICE: usize = 20;

/// Where commands for one source go.
#[derive(Debug, Clone)]
pub enum Route {
    /// NB-IoT CoAP source: queued until the meter's next uplink.
    CoapQueue,
    /// A source that executes commands itself.
    Channel(mpsc::Sender<CommandRequest>),
    /// The source exists but cannot execute commands (reason).
    Unavailable(String),
}

/// Device → source id and source id → route, rebuilt on every (re)configuration.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Configured device → source id.
    pub devices: HashMap<String, String>,
    /// Source id → route.
    pub sources: HashMap<String, Route>,
    /// Meter-id prefix (`cjt188:`, `mbus:`, `hydrant:`) → the one source serving that kind,
    /// for devices not listed explicitly.
    pub by_prefix: HashMap<String, String>,
}

/// The downlink router; shared by the control connection and the CoAP source.
#[derive(Debug)]
pub struct Downlink {
    gateway: GatewayId,
    log: Mutex<CommandLog>,
    routes: RwLock<Routes>,
    queue: Mutex<HashMap<MeterId, VecDeque<DeviceCommand>>>,
    /// Commands sent in a CoAP reply, waiting for the meter's confirmation, with the SER
    /// they went out with.
    awaiting: Mutex<HashMap<MeterId, (DeviceCommand, Option<u8>)>>,
    acks: mpsc::UnboundedSender<CommandAck>,
    states: Mutex<BTreeMap<&'static str, u64>>,
}

fn state_name(s: &CommandState) -> &'static str {
    match s {
        CommandState::Queued => "queued",
        CommandState::Sent => "sent",
        CommandState::Delivered => "delivered",
        CommandState::Acknowledged => "acknowledged",
        CommandState::ConfirmedByTelemetry => "confirmed_by_telemetry",
        CommandState::Failed { .. } => "failed",
        CommandState::Expired => "expired",
        CommandState::Cancelled => "cancelled",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Downlink {
    /// Opens the command log in `dir`; acks to publish arrive on the returned receiver.
    pub fn open(
        gateway: GatewayId,
        dir: &Path,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<CommandAck>), DownlinkError> {
        fs::create_dir_all(dir).map_err(|source| DownlinkError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let log = CommandLog::open(&dir.join("commands.jsonl"))?;
        let mut queue: HashMap<MeterId, VecDeque<DeviceCommand>> = HashMap::new();
        let mut pending: Vec<&DeviceCommand> = log
            .latest
            .values()
            .filter(|l| l.ack.state == CommandState::Queued)
            .filter_map(|l| l.command.as_ref())
            .collect();
        pending.sort_by_key(|c| c.issued_at);
        for c in pending {
            queue
                .entry(c.device.clone())
                .or_default()
                .push_back(c.clone());
        }
        let awaiting: HashMap<MeterId, (DeviceCommand, Option<u8>)> = log
            .latest
            .values()
            .filter(|l| l.ack.state == CommandState::Sent)
            .filter_map(|l| l.command.clone().map(|c| (c, l.ser)))
            .map(|(c, ser)| (c.device.clone(), (c, ser)))
            .collect();
        let (acks, rx) = mpsc::unbounded_channel();
        Ok((
            Arc::new(Self {
                gateway,
                log: Mutex::new(log),
                routes: RwLock::new(Routes::default()),
                queue: Mutex::new(queue),
                awaiting: Mutex::new(awaiting),
                acks,
                states: Mutex::new(BTreeMap::new()),
            }),
            rx,
        ))
    }

    /// Replaces the routing table (startup and reload).
    pub fn set_routes(&self, routes: Routes) {
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
    }

    fn transition(&self, cmd: &DeviceCommand, state: CommandState, keep_command: bool) {
        self.transition_ser(cmd, state, keep_command, None);
    }

    fn transition_ser(
        &self,
        cmd: &DeviceCommand,
        state: CommandState,
        keep_command: bool,
        ser: Option<u8>,
    ) {
        let ack = CommandAck {
            v: model::WIRE_VERSION,
            id: cmd.id.clone(),
            gateway: self.gateway.clone(),
            device: cmd.device.clone(),
            state,
            at: OffsetDateTime::now_utc(),
        };
        *lock(&self.states)
            .entry(state_name(&ack.state))
            .or_default() += 1;
        tracing::info!(command = %cmd.id, device = %cmd.device, state = state_name(&ack.state), "command state");
        lock(&self.log).record(LogLine {
            ack: ack.clone(),
            command: keep_command.then(|| cmd.clone()),
            ser,
        });
        // The control connection may be gone at shutdown; the state is in the log anyway.
        self.acks.send(ack).ok();
    }

    /// Handles a command received from the broker.
    pub async fn handle(self: &Arc<Self>, cmd: DeviceCommand) {
        let seen = lock(&self.log).latest.get(&cmd.id).map(|l| l.ack.clone());
        if let Some(prev) = seen {
            tracing::info!(command = %cmd.id, state = state_name(&prev.state), "duplicate command id; not executed again");
            self.acks.send(prev).ok();
            return;
        }
        if cmd.gateway != self.gateway {
            self.transition(
                &cmd,
                CommandState::Failed {
                    reason: format!(
                        "command is for gateway `{}`, this is `{}`",
                        cmd.gateway, self.gateway
                    ),
                },
                false,
            );
            return;
        }
        if cmd.is_expired(OffsetDateTime::now_utc()) {
            self.transition(&cmd, CommandState::Expired, false);
            return;
        }
        if let CommandAction::Cancel { command } = &cmd.action {
            self.cancel(&cmd, command);
            return;
        }
        let route =
            {
                let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
                let source = routes
                    .devices
                    .get(cmd.device.as_str())
                    .cloned()
                    .or_else(|| {
                        routes
                            .by_prefix
                            .iter()
                            .find(|(p, _)| cmd.device.as_str().starts_with(p.as_str()))
                            .map(|(_, s)| s.clone())
                    });
                source.map(|s| {
                    routes.sources.get(&s).cloned().unwrap_or_else(|| {
                        Route::Unavailable(format!("source `{s}` is not running"))
                    })
                })
            };
        match route {
            None => self.transition(
                &cmd,
                CommandState::Failed {
                    reason: format!("unknown device `{}` at this gateway", cmd.device),
                },
                false,
            ),
            Some(Route::Unavailable(reason)) => {
                self.transition(&cmd, CommandState::Failed { reason }, false);
            }
            Some(Route::CoapQueue) => {
                // A newer valve command makes an older queued one meaningless (the meter would
                // toggle twice); the older is reported cancelled, both stay in the journal.
                let superseded: Vec<DeviceCommand> = if cmd.action.is_valve() {
                    let mut q = lock(&self.queue);
                    q.get_mut(&cmd.device)
                        .map(|entry| {
                            let (old, keep): (VecDeque<_>, VecDeque<_>) =
                                entry.drain(..).partition(|c| c.action.is_valve());
                            *entry = keep;
                            old.into_iter().collect()
                        })
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                for old in &superseded {
                    tracing::info!(command = %old.id, by = %cmd.id, "queued valve command superseded");
                    self.transition(old, CommandState::Cancelled, false);
                }
                let waiting = lock(&self.queue).get(&cmd.device).map_or(0, VecDeque::len);
                if waiting >= MAX_QUEUED_PER_DEVICE {
                    self.transition(
                        &cmd,
                        CommandState::Failed {
                            reason: format!(
                                "device `{}` already has {waiting} commands queued (at most {MAX_QUEUED_PER_DEVICE})",
                                cmd.device
                            ),
                        },
                        false,
                    );
                    return;
                }
                // Logged with the command before queueing, so a restart re-queues it.
                self.transition(&cmd, CommandState::Queued, true);
                lock(&self.queue)
                    .entry(cmd.device.clone())
                    .or_default()
                    .push_back(cmd);
            }
            Some(Route::Channel(tx)) => {
                // Logged before execution: after a crash the command is not run again.
                self.transition(&cmd, CommandState::Queued, false);
                let (reply, wait) = oneshot::channel();
                if tx
                    .send(CommandRequest {
                        command: cmd.clone(),
                        reply,
                    })
                    .await
                    .is_err()
                {
                    self.transition(
                        &cmd,
                        CommandState::Failed {
                            reason: "source stopped".into(),
                        },
                        false,
                    );
                    return;
                }
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    let ttl = (cmd.expires_at - OffsetDateTime::now_utc())
                        .try_into()
                        .unwrap_or(Duration::ZERO)
                        .max(Duration::from_secs(1))
                        .min(Duration::from_secs(600));
                    let state = match tokio::time::timeout(ttl, wait).await {
                        Ok(Ok(CommandOutcome::Sent)) => CommandState::Sent,
                        Ok(Ok(CommandOutcome::Acknowledged)) => CommandState::Acknowledged,
                        Ok(Ok(CommandOutcome::Failed(reason))) => CommandState::Failed { reason },
                        Ok(Err(_)) => CommandState::Failed {
                            reason: "source dropped the command".into(),
                        },
                        Err(_) => CommandState::Failed {
                            reason: "no answer from the device before the TTL".into(),
                        },
                    };
                    this.transition(&cmd, state, false);
                });
            }
        }
    }

    /// Cancels `target` if it still waits in the NB-IoT queue of `cancel.device`.
    fn cancel(&self, cancel: &DeviceCommand, target: &CommandId) {
        let removed = {
            let mut q = lock(&self.queue);
            let removed = q.get_mut(&cancel.device).and_then(|entry| {
                let pos = entry.iter().position(|c| &c.id == target)?;
                entry.remove(pos)
            });
            if q.get(&cancel.device).is_some_and(VecDeque::is_empty) {
                q.remove(&cancel.device);
            }
            removed
        };
        match removed {
            Some(old) => {
                self.transition(&old, CommandState::Cancelled, false);
                self.transition(cancel, CommandState::Acknowledged, false);
            }
            None => {
                let state = lock(&self.log)
                    .latest
                    .get(target)
                    .map_or("unknown here", |l| state_name(&l.ack.state));
                self.transition(
                    cancel,
                    CommandState::Failed {
                        reason: format!(
                            "command `{target}` is not queued for `{}` at this gateway (state: {state})",
                            cancel.device
                        ),
                    },
                    false,
                );
            }
        }
    }

    /// The next queued command for an NB-IoT meter that just sent an uplink; expired ones are
    /// reported and skipped. The caller sends it in the CoAP reply and then calls
    /// [`Downlink::sent_to_meter`].
    pub fn next_for(&self, meter: &MeterId) -> Option<DeviceCommand> {
        let now = OffsetDateTime::now_utc();
        loop {
            let cmd = {
                let mut q = lock(&self.queue);
                let entry = q.get_mut(meter)?;
                let c = entry.pop_front();
                if entry.is_empty() {
                    q.remove(meter);
                }
                c?
            };
            if cmd.is_expired(now) {
                self.transition(&cmd, CommandState::Expired, false);
                continue;
            }
            return Some(cmd);
        }
    }

    /// Reports and drops NB-IoT commands whose TTL has passed: queued ones, and sent ones the
    /// meter never confirmed (so a command cannot sit in `sent` forever).
    pub fn expire_queued(&self) {
        let now = OffsetDateTime::now_utc();
        let expired: Vec<DeviceCommand> = {
            let mut q = lock(&self.queue);
            let mut out = Vec::new();
            for cmds in q.values_mut() {
                let (gone, keep): (VecDeque<_>, VecDeque<_>) =
                    cmds.drain(..).partition(|c| c.is_expired(now));
                *cmds = keep;
                out.extend(gone);
            }
            q.retain(|_, c| !c.is_empty());
            let mut awaiting = lock(&self.awaiting);
            let gone: Vec<MeterId> = awaiting
                .iter()
                .filter(|(_, (c, _))| c.is_expired(now))
                .map(|(m, _)| m.clone())
                .collect();
            out.extend(
                gone.iter()
                    .filter_map(|m| awaiting.remove(m))
                    .map(|(c, _)| c),
            );
            out
        };
        for cmd in expired {
            self.transition(&cmd, CommandState::Expired, false);
        }
    }

    /// The command went out in a CoAP reply with CJ/T 188 SER `ser`; the meter's confirmation
    /// is awaited until the command's TTL.
    pub fn sent_to_meter(&self, cmd: &DeviceCommand, ser: Option<u8>) {
        // Kept with the command so a restart still matches the meter's reply to it.
        self.transition_ser(cmd, CommandState::Sent, true, ser);
        lock(&self.awaiting).insert(cmd.device.clone(), (cmd.clone(), ser));
    }

    /// The command could not be encoded or sent; it is reported failed.
    pub fn failed(&self, cmd: &DeviceCommand, reason: String) {
        self.transition(cmd, CommandState::Failed { reason }, false);
    }

    /// The meter answered the command sent to it (valve reply with SER `ser`): acknowledged or
    /// failed. A reply whose SER is not the one the command went out with completes nothing
    /// (a stale or forged reply); returns whether a command was completed.
    pub fn meter_replied(&self, meter: &MeterId, ser: Option<u8>, ok: Result<(), String>) -> bool {
        let cmd = {
            let mut awaiting = lock(&self.awaiting);
            match awaiting.get(meter) {
                None => {
                    tracing::debug!(%meter, "command reply without a command awaiting it");
                    return false;
                }
                Some((_, Some(sent))) if ser.is_some_and(|s| s != *sent) => {
                    tracing::warn!(%meter, ?ser, sent, "command reply with another SER; ignored");
                    return false;
                }
                Some(_) => {}
            }
            match awaiting.remove(meter) {
                Some((cmd, _)) => cmd,
                None => return false,
            }
        };
        let state = match ok {
            Ok(()) => CommandState::Acknowledged,
            Err(reason) => CommandState::Failed { reason },
        };
        self.transition(&cmd, state, false);
        true
    }

    /// The latest state of every command that changed state at or after `since`, oldest
    /// first: what the control connection re-publishes after a (re)connect, so an ack lost with
    /// a dropped connection or a crash still reaches the centre (at least once).
    pub fn recent_acks(&self, since: OffsetDateTime) -> Vec<CommandAck> {
        let mut acks: Vec<CommandAck> = lock(&self.log)
            .latest
            .values()
            .filter(|l| l.ack.at >= since)
            .map(|l| l.ack.clone())
            .collect();
        acks.sort_by_key(|a| a.at);
        acks
    }

    /// Commands waiting for NB-IoT uplinks.
    pub fn queued(&self) -> usize {
        lock(&self.queue).values().map(VecDeque::len).sum()
    }

    /// Appends `wm_gateway_commands_total{state}` in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        out.push_str("# TYPE wm_gateway_commands_total counter\n");
        for (state, n) in lock(&self.states).iter() {
            out.push_str(&format!(
                "wm_gateway_commands_total{{state=\"{state}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "# TYPE wm_gateway_commands_queued gauge\nwm_gateway_commands_queued {}\n",
            self.queued()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::CommandAction;
    use time::Duration as TimeDuration;

    fn cmd(id: &str, device: &str, ttl_s: i64) -> DeviceCommand {
        let now = OffsetDateTime::now_utc();
        DeviceCommand {
            v: 1,
            id: CommandId(id.into()),
            gateway: GatewayId::new("gw-1").unwrap(),
            device: MeterId::new(device).unwrap(),
            action: CommandAction::ValveClose,
            issued_by: "test".into(),
            issued_at: now,
            expires_at: now + TimeDuration::seconds(ttl_s),
        }
    }

    fn routes(tx: mpsc::Sender<CommandRequest>) -> Routes {
        let mut r = Routes::default();
        r.devices.insert("modbus:v1".into(), "bus".into());
        r.sources.insert("bus".into(), Route::Channel(tx));
        r.sources.insert("nbiot".into(), Route::CoapQueue);
        r.by_prefix.insert("cjt188:".into(), "nbiot".into());
        r
    }

    #[tokio::test]
    async fn same_id_twice_executes_once_even_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewayId::new("gw-1").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let (dl, mut acks) = Downlink::open(gw.clone(), dir.path()).unwrap();
        dl.set_routes(routes(tx.clone()));
        let executor = tokio::spawn(async move {
            let mut n = 0;
            while let Some(req) = rx.recv().await {
                n += 1;
                req.reply.send(CommandOutcome::Acknowledged).unwrap();
            }
            n
        });
        let c = cmd("c-1", "modbus:v1", 60);
        dl.handle(c.clone()).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Queued);
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Acknowledged);
        dl.handle(c.clone()).await;
        // The duplicate only re-publishes the last state.
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Acknowledged);
        drop(dl);
        // Restart: the log still knows c-1.
        let (dl, mut acks) = Downlink::open(gw, dir.path()).unwrap();
        dl.set_routes(routes(tx));
        dl.handle(c).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Acknowledged);
        drop(dl);
        assert_eq!(executor.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn expired_unknown_and_coap_queue() {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewayId::new("gw-1").unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let (dl, mut acks) = Downlink::open(gw.clone(), dir.path()).unwrap();
        dl.set_routes(routes(tx.clone()));
        dl.handle(cmd("old", "modbus:v1", -5)).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Expired);
        dl.handle(cmd("u", "mbus:ABC12345678", 60)).await;
        assert!(matches!(
            acks.recv().await.unwrap().state,
            CommandState::Failed { .. }
        ));
        let meter = MeterId::new("cjt188:78330011223344").unwrap();
        dl.handle(cmd("v", meter.as_str(), 60)).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Queued);
        assert_eq!(dl.queued(), 1);
        drop(dl);
        // A restart keeps the NB-IoT queue.
        let (dl, mut acks) = Downlink::open(gw, dir.path()).unwrap();
        dl.set_routes(routes(tx.clone()));
        let next = dl.next_for(&meter).unwrap();
        assert_eq!(next.id.0, "v");
        dl.sent_to_meter(&next, Some(7));
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Sent);
        drop(dl);
        // A restart between sending and the meter's reply still completes the command.
        let (dl, mut acks) = Downlink::open(GatewayId::new("gw-1").unwrap(), dir.path()).unwrap();
        dl.set_routes(routes(tx.clone()));
        // A reply with another SER (stale or forged) completes nothing.
        assert!(!dl.meter_replied(&meter, Some(8), Ok(())));
        assert!(dl.meter_replied(&meter, Some(7), Ok(())));
        let ack = acks.recv().await.unwrap();
        assert_eq!(
            (ack.id.0.as_str(), ack.state),
            ("v", CommandState::Acknowledged)
        );
        assert!(dl.next_for(&meter).is_none());
        // A queued command whose TTL passes is expired by the sweep, without an uplink.
        dl.handle(cmd("short", meter.as_str(), 1)).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Queued);
        dl.expire_queued();
        assert_eq!(dl.queued(), 1);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        dl.expire_queued();
        let ack = acks.recv().await.unwrap();
        assert_eq!(
            (ack.id.0.as_str(), ack.state),
            ("short", CommandState::Expired)
        );
        assert_eq!(dl.queued(), 0);
        // A sent command the meter never confirms expires by its TTL too.
        dl.handle(cmd("silent", meter.as_str(), 1)).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Queued);
        let sent = dl.next_for(&meter).unwrap();
        dl.sent_to_meter(&sent, Some(1));
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Sent);
        dl.expire_queued();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        dl.expire_queued();
        let ack = acks.recv().await.unwrap();
        assert_eq!(
            (ack.id.0.as_str(), ack.state),
            ("silent", CommandState::Expired)
        );
        // Its late reply no longer acknowledges anything.
        assert!(!dl.meter_replied(&meter, Some(1), Ok(())));
        let mut text = String::new();
        dl.render_prometheus(&mut text);
        assert!(
            text.contains("wm_gateway_commands_total{state=\"acknowledged\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn nbiot_queue_supersedes_bounds_and_cancels() {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewayId::new("gw-1").unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let (dl, mut acks) = Downlink::open(gw, dir.path()).unwrap();
        dl.set_routes(routes(tx));
        let meter = "cjt188:78330011223344";
        let mut open = cmd("open-1", meter, 600);
        open.action = CommandAction::ValveOpen;
        dl.handle(open).await;
        assert_eq!(acks.recv().await.unwrap().state, CommandState::Queued);
        // A newer valve command supersedes the queued one: it is reported cancelled.
        dl.handle(cmd("close-1", meter, 600)).await;
        let a = acks.recv().await.unwrap();
        assert_eq!(
            (a.id.0.as_str(), a.state),
            ("open-1", CommandState::Cancelled)
        );
        let a = acks.recv().await.unwrap();
        assert_eq!(
            (a.id.0.as_str(), a.state),
            ("close-1", CommandState::Queued)
        );
        assert_eq!(dl.queued(), 1);
        // Cancel of the queued one: target cancelled, the cancel acknowledged.
        let mut cancel = cmd("close-1.cancel", meter, 600);
        cancel.action = CommandAction::Cancel {
            command: CommandId("close-1".into()),
        };
        dl.handle(cancel).await;
        let a = acks.recv().await.unwrap();
        assert_eq!(
            (a.id.0.as_str(), a.state),
            ("close-1", CommandState::Cancelled)
        );
        let a = acks.recv().await.unwrap();
        assert_eq!(
            (a.id.0.as_str(), a.state),
            ("close-1.cancel", CommandState::Acknowledged)
        );
        assert_eq!(dl.queued(), 0);
        // Cancel of something not queued fails with the reason.
        let mut late = cmd("late.cancel", meter, 600);
        late.action = CommandAction::Cancel {
            command: CommandId("close-1".into()),
        };
        dl.handle(late).await;
        match acks.recv().await.unwrap().state {
            CommandState::Failed { reason } => {
                assert!(reason.contains("not queued"), "{reason}");
                assert!(reason.contains("cancelled"), "{reason}");
            }
            other => panic!("expected failed, got {other:?}"),
        }
        // At most MAX_QUEUED_PER_DEVICE non-valve commands wait; the next is refused.
        for i in 0..MAX_QUEUED_PER_DEVICE {
            let mut c = cmd(&format!("t-{i}"), meter, 600);
            c.action = CommandAction::SetTime;
            dl.handle(c).await;
            assert_eq!(acks.recv().await.unwrap().state, CommandState::Queued);
        }
        let mut c = cmd("t-over", meter, 600);
        c.action = CommandAction::SetTime;
        dl.handle(c).await;
        match acks.recv().await.unwrap().state {
            CommandState::Failed { reason } => assert!(reason.contains("at most 20"), "{reason}"),
            other => panic!("expected failed, got {other:?}"),
        }
        assert_eq!(dl.queued(), MAX_QUEUED_PER_DEVICE);
    }
}
