//! Holding compact frames (CI 79) until their meter's full frame arrives.
//!
//! A compact frame carries only a format signature; its records can be rebuilt once a full
//! frame of the same meter has taught the [`super::FormatCache`] that format. A meter that
//! sends a full frame every few minutes and compact frames in between would otherwise lose
//! every compact frame received before its first full one (after a gateway restart, or when
//! the cache evicted the meter). [`CompactHold`] keeps them, bounded by count and age, keyed
//! by meter and signature, and hands a meter's frames back when a full frame from it decoded.
//!
//! It is pure: the caller passes the times in (its receive times), so it reads no clock, and
//! what is held is the caller's (`T`: the raw frame with its receive context).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One held compact frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<T> {
    /// The meter, as [`super::Address::meter_id`] and [`super::WmbusError::UnknownCompactFormat`]
    /// spell it (`mbus:KAM12345678`).
    pub meter: String,
    /// The compact frame's format signature.
    pub signature: u16,
    /// When it was received (the time its readings belong to).
    pub received: Instant,
    /// What the caller stored (the raw frame and its context).
    pub item: T,
}

/// Compact frames waiting for their format, oldest first; see the module documentation.
///
/// Bounded twice: at most `max_frames` frames (the oldest is dropped for a new one) and at
/// most `max_age` old (older ones are dropped by [`CompactHold::expire`], and never handed
/// back). Both drops are counted, so the caller can export them as metrics.
#[derive(Debug, Clone)]
pub struct CompactHold<T> {
    held: VecDeque<Held<T>>,
    max_frames: usize,
    max_age: Duration,
    dropped_full: u64,
    dropped_old: u64,
}

impl<T> CompactHold<T> {
    /// An empty hold for at most `max_frames` frames of at most `max_age`.
    pub fn new(max_frames: usize, max_age: Duration) -> Self {
        Self {
            held: VecDeque::new(),
            max_frames,
            max_age,
            dropped_full: 0,
            dropped_old: 0,
        }
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Frames dropped so far because the hold was full.
    pub fn dropped_full(&self) -> u64 {
        self.dropped_full
    }

    /// Frames dropped so far because they were older than `max_age`.
    pub fn dropped_old(&self) -> u64 {
        self.dropped_old
    }

    /// Holds a compact frame that failed with `UnknownCompactFormat { meter, signature }`.
    /// Returns the frame dropped to make room, if the hold was full (the oldest one; with
    /// `max_frames` 0 the new frame itself).
    pub fn hold(
        &mut self,
        meter: impl Into<String>,
        signature: u16,
        received: Instant,
        item: T,
    ) -> Option<Held<T>> {
        let new = Held {
            meter: meter.into(),
            signature,
            received,
            item,
        };
        if self.max_frames == 0 {
            self.dropped_full = self.dropped_full.saturating_add(1);
            return Some(new);
        }
        let evicted = if self.held.len() >= self.max_frames {
            self.dropped_full = self.dropped_full.saturating_add(1);
            self.held.pop_front()
        } else {
            None
        };
        // Kept in receive order even when a caller hands in an older time, so eviction and
        // expiry stay "oldest first".
        let at = self
            .held
            .iter()
            .rposition(|h| h.received <= received)
            .map_or(0, |i| i.saturating_add(1));
        self.held.insert(at, new);
        evicted
    }

    /// Drops the frames older than `max_age` at `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.held.len();
        let max_age = self.max_age;
        self.held
            .retain(|h| now.saturating_duration_since(h.received) <= max_age);
        let dropped = before.saturating_sub(self.held.len());
        self.dropped_old = self
            .dropped_old
            .saturating_add(u64::try_from(dropped).unwrap_or(u64::MAX));
        dropped
    }

    /// Takes every frame of `meter` (all signatures), oldest first, after a full frame from
    /// it decoded: the caller decodes them again, through the same `FormatCache`. Frames
    /// older than `max_age` at `now` are dropped first, never returned. One whose signature
    /// the full frame did not teach fails again and may be held again.
    pub fn take(&mut self, meter: &str, now: Instant) -> Vec<Held<T>> {
        self.expire(now);
        if !self.held.iter().any(|h| h.meter == meter) {
            return Vec::new();
        }
        let (taken, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.meter == meter);
        self.held = kept;
        taken.into()
    }
}

impl<T> CompactHold<T> {
    /// Takes every frame still held (after dropping those older than `max_age` at `now`),
    /// oldest first: for when a full frame taught a format that meters of the same model may
    /// borrow ([`super::FormatCache::model_count`] grew). Frames that fail again may be held
    /// again.
    pub fn take_all(&mut self, now: Instant) -> Vec<Held<T>> {
        self.expire(now);
        std::mem::take(&mut self.held).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn frames_come_back_for_their_meter_only_oldest_first() {
        let t0 = Instant::now();
        let mut hold = CompactHold::new(10, 10 * MIN);
        assert!(hold.hold("mbus:KAM00000001", 0x1234, t0, 1).is_none());
        assert!(hold.hold("mbus:KAM00000002", 0x1234, t0 + MIN, 2).is_none());
        assert!(
            hold.hold("mbus:KAM00000001", 0x9999, t0 + 2 * MIN, 3)
                .is_none()
        );
        assert_eq!(hold.len(), 3);
        let got = hold.take("mbus:KAM00000001", t0 + 3 * MIN);
        assert_eq!(got.iter().map(|h| h.item).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(got[1].signature, 0x9999);
        assert_eq!(got[0].received, t0);
        assert_eq!(hold.len(), 1);
        assert!(hold.take("mbus:KAM00000001", t0 + 3 * MIN).is_empty());
        assert_eq!(hold.take("mbus:KAM00000002", t0 + 3 * MIN)[0].item, 2);
        assert!(hold.is_empty());
        hold.hold("b", 1, t0 + 3 * MIN, 5);
        hold.hold("a", 2, t0 + 2 * MIN, 4);
        hold.hold("c", 2, t0, 9);
        // At t0 + 10.5 min "c" is 10.5 minutes old: dropped, never returned.
        let all = hold.take_all(t0 + 10 * MIN + Duration::from_secs(30));
        assert_eq!(all.iter().map(|h| h.item).collect::<Vec<_>>(), [4, 5]);
        assert!(hold.is_empty());
    }

    #[test]
    fn the_count_bound_drops_the_oldest_and_counts_it() {
        let t0 = Instant::now();
        let mut hold = CompactHold::new(2, 10 * MIN);
        hold.hold("a", 1, t0, "first");
        hold.hold("b", 1, t0 + MIN, "second");
        let evicted = hold.hold("c", 1, t0 + 2 * MIN, "third").unwrap();
        assert_eq!(evicted.item, "first");
        assert_eq!(hold.len(), 2);
        assert_eq!(hold.dropped_full(), 1);
        let mut none = CompactHold::new(0, MIN);
        assert_eq!(none.hold("a", 1, t0, 7).unwrap().item, 7);
        assert!(none.is_empty());
    }

    #[test]
    fn the_age_bound_drops_old_frames_and_never_returns_them() {
        let t0 = Instant::now();
        let mut hold = CompactHold::new(10, 5 * MIN);
        hold.hold("a", 1, t0, 1);
        hold.hold("a", 1, t0 + 4 * MIN, 2);
        hold.hold("b", 1, t0 + 4 * MIN, 3);
        // At t0 + 6 min the first frame is 6 minutes old: dropped, the others are kept.
        let got = hold.take("a", t0 + 6 * MIN);
        assert_eq!(got.iter().map(|h| h.item).collect::<Vec<_>>(), [2]);
        assert_eq!(hold.dropped_old(), 1);
        assert_eq!(hold.expire(t0 + 20 * MIN), 1);
        assert!(hold.is_empty());
        assert_eq!(hold.dropped_old(), 2);
    }

    #[test]
    fn an_older_receive_time_is_kept_in_order() {
        let t0 = Instant::now();
        let mut hold = CompactHold::new(2, 10 * MIN);
        hold.hold("a", 1, t0 + MIN, "newer");
        hold.hold("a", 1, t0, "older");
        let evicted = hold.hold("a", 1, t0 + 2 * MIN, "newest").unwrap();
        assert_eq!(evicted.item, "older");
    }
}
