//! Field-bus sources: Modbus TCP/RTU poller, serial M-Bus master, wM-Bus UDP receiver and the
//! hydrant MQTT bridge. Each exposes `run(config, SourceContext)`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

pub mod hydrant;
pub mod mbus;
pub mod modbus;
pub mod wmbus;

/// Health of one device, as the metrics endpoint shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceHealth {
    /// Last poll that returned every block.
    pub last_ok: Option<OffsetDateTime>,
    /// Failed polls since the last good one.
    pub consecutive_failures: u32,
    /// Why the last failed poll failed.
    pub last_error: Option<String>,
    /// Good polls so far.
    pub polls_ok: u64,
    /// Failed polls so far.
    pub polls_failed: u64,
}

/// Shared per-device health of a source; clone it before `run` to watch it.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, DeviceHealth>>>);

impl Health {
    /// Health of `device`, if it was polled at least once.
    pub fn get(&self, device: &str) -> Option<DeviceHealth> {
        self.lock().get(device).cloned()
    }

    /// Appends `wm_gateway_device_consecutive_failures` and `wm_gateway_device_last_ok_seconds`
    /// gauges to `out`.
    pub fn render_prometheus(&self, source: &str, out: &mut String) {
        let map = self.lock();
        out.push_str("# TYPE wm_gateway_device_consecutive_failures gauge\n");
        for (d, h) in map.iter() {
            out.push_str(&format!(
                "wm_gateway_device_consecutive_failures{{source=\"{source}\",device=\"{d}\"}} {}\n",
                h.consecutive_failures
            ));
        }
        out.push_str("# TYPE wm_gateway_device_last_ok_seconds gauge\n");
        for (d, h) in map.iter() {
            if let Some(t) = h.last_ok {
                out.push_str(&format!(
                    "wm_gateway_device_last_ok_seconds{{source=\"{source}\",device=\"{d}\"}} {}\n",
                    t.unix_timestamp()
                ));
            }
        }
    }

    pub(crate) fn update(&self, device: &str, f: impl FnOnce(&mut DeviceHealth)) {
        f(self.lock().entry(device.to_owned()).or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DeviceHealth>> {
        // Health stays meaningful even if a holder panicked.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Exponential backoff with jitter, so many devices failing together do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    /// A backoff starting at `initial` and doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Truncation is fine: only the low bits seed the jitter.
        let seed = (nanos as u64) | 1;
        Self {
            initial,
            max: max.max(initial),
            current: initial,
            seed,
        }
    }

    /// The next delay: the current step scaled by a random factor in [0.5, 1.0], then doubled.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: good enough for jitter, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let factor = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let delay = self.current.mul_f64(factor);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The undelayed step the next call starts from.
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d1 = b.next_delay();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d2 = b.next_delay();
        assert!(d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200));
        b.next_delay();
        assert_eq!(b.current(), Duration::from_millis(350));
        b.reset();
        assert_eq!(b.current(), Duration::from_millis(100));
    }
}
