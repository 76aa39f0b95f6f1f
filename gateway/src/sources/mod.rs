//! Field-bus sources: Modbus TCP/RTU poller, serial M-Bus master, wM-Bus UDP receiver and the
//! hydrant MQTT bridge. Each exposes `run(config, SourceContext)`.

use std::time::Duration;

pub mod hydrant;
pub mod mbus;
pub mod modbus;
pub mod wmbus;

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
