//! The bench's own Mosquitto (`--own-broker`, the default in `pipeline-bench`; also used by
//! `examples/control-bench.rs` through `#[path]`).
//!
//! The shared broker keeps at most 1000 queued QoS 1 messages per client (Mosquitto's default
//! `max_queued_messages`) and drops the rest; on a loaded machine a slow bench worker lost
//! messages there and the bench waited for them forever. It is also shared with everything
//! else on the machine, so its CPU is not the bench's. This broker is private: a free port on
//! 127.0.0.1, no queue limit, no persistence, Nagle off when the installed Mosquitto knows
//! `set_tcp_nodelay` (2.0 and later), stopped when dropped. `/etc/mosquitto` is not touched.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running private Mosquitto.
pub(crate) struct OwnBroker {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// True when the broker runs with `set_tcp_nodelay true`.
    pub(crate) tcp_nodelay: bool,
}

/// The configuration file: one listener, anonymous, unbounded queues, no persistence.
fn config(port: u16, tcp_nodelay: bool) -> String {
    let mut c = format!(
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         max_queued_messages 0\n\
         max_queued_bytes 0\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    );
    if tcp_nodelay {
        c.push_str("set_tcp_nodelay true\n");
    }
    c
}

/// A port free on 127.0.0.1 right now (the OS picks it).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

impl OwnBroker {
    /// Starts `mosquitto` and waits until it accepts connections (at most 10 s). `tcp_nodelay`
    /// `None` tries `set_tcp_nodelay true` and falls back to Mosquitto's default; `Some(b)`
    /// asks for exactly that (to compare the two).
    ///
    /// # Errors
    /// When `mosquitto` is not installed or does not come up; its log is in the message.
    pub(crate) async fn start(tcp_nodelay: Option<bool>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("wm-bench-mosquitto-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut last_log = String::new();
        // An older Mosquitto refuses the unknown `set_tcp_nodelay`: then without it.
        let attempts: &[bool] = match tcp_nodelay {
            None => &[true, false],
            Some(true) => &[true],
            Some(false) => &[false],
        };
        for &tcp_nodelay in attempts {
            let port = free_port()?;
            let conf = dir.join("mosquitto.conf");
            std::fs::write(&conf, config(port, tcp_nodelay))?;
            let log = dir.join("mosquitto.log");
            let child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context(
                    "starting mosquitto (is it installed? `--own-broker false` uses MQTT_URL)",
                )?;
            let mut broker = Self {
                child,
                port,
                dir: dir.clone(),
                tcp_nodelay,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Ok(broker);
                }
                if broker.child.try_wait()?.is_some() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
            // Dropping stops it (if still running) and removes the directory: made again.
            drop(broker);
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::remove_dir_all(&dir).ok();
        anyhow::bail!(
            "the bench's own mosquitto did not start: {}",
            last_log.trim()
        )
    }

    /// The broker's URL.
    pub(crate) fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's process id (for its CPU).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // Nothing to save (no persistence): killed, reaped, its files removed.
        self.child.kill().ok();
        self.child.wait().ok();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
