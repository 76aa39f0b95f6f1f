//! Ground truth injected by a scenario, and scoring of detector output against it.
//!
//! Every fault the engine injects leaves a [`TruthEvent`] naming the meter, the span and what a
//! correct pipeline should report (an alarm kind or a quality flag). [`score`] matches
//! [`Detection`]s (alarms or flags the system produced) to the truth and returns precision and
//! recall per kind.

use std::collections::BTreeMap;

use model::{Alarm, AlarmKind, QualityFlag};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What was injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruthKind {
    /// Continuous customer-side leak.
    Leak,
    /// High flow for a bounded time at a meter.
    Burst,
    /// Network burst in a DMA (visible only in the DMA balance).
    MainsBurst,
    /// Register ran backwards.
    ReverseFlow,
    /// Magnetic tamper.
    Tamper,
    /// Register stopped while water flowed.
    StoppedMeter,
    /// Battery fell below 10 %.
    LowBattery,
    /// No frame delivered.
    CommunicationLoss,
    /// Meter clock off.
    ClockSkew,
    /// Frames delivered twice.
    DuplicateFrames,
    /// Frames delivered pairwise swapped.
    OutOfOrder,
    /// Frames corrupted in transit.
    CorruptedFrames,
    /// Register wrapped at capacity.
    Rollover,
    /// Meter replaced; register restarted.
    MeterReplacement,
    /// Hydrant opened while locked (the `meter` is the hydrant id).
    HydrantIllegalUse,
    /// Hydrant tilted (collision).
    HydrantTilt,
}

impl TruthKind {
    /// Returns the alarm a detector should raise for this truth, if any.
    pub fn alarm(self) -> Option<AlarmKind> {
        Some(match self {
            Self::Leak => AlarmKind::Leak,
            Self::Burst => AlarmKind::Burst,
            Self::ReverseFlow => AlarmKind::ReverseFlow,
            Self::Tamper => AlarmKind::Tamper,
            Self::StoppedMeter => AlarmKind::StoppedMeter,
            Self::LowBattery => AlarmKind::LowBattery,
            Self::CommunicationLoss => AlarmKind::CommunicationLoss,
            Self::HydrantIllegalUse => AlarmKind::HydrantIllegalUse,
            Self::HydrantTilt => AlarmKind::HydrantTilt,
            _ => return None,
        })
    }

    /// Returns the quality flag validation should set on affected readings, if any.
    pub fn flag(self) -> Option<QualityFlag> {
        Some(match self {
            Self::ClockSkew => QualityFlag::ClockSkew,
            Self::OutOfOrder => QualityFlag::OutOfOrder,
            Self::Rollover => QualityFlag::Rollover,
            Self::ReverseFlow => QualityFlag::ReverseFlow,
            Self::MeterReplacement => QualityFlag::MeterReplaced,
            _ => return None,
        })
    }

    /// Maps a raised alarm back to the truth kind it detects.
    pub fn from_alarm(kind: AlarmKind) -> Option<Self> {
        Some(match kind {
            AlarmKind::Leak => Self::Leak,
            AlarmKind::Burst => Self::Burst,
            AlarmKind::ReverseFlow => Self::ReverseFlow,
            AlarmKind::Tamper => Self::Tamper,
            AlarmKind::StoppedMeter => Self::StoppedMeter,
            AlarmKind::LowBattery => Self::LowBattery,
            AlarmKind::CommunicationLoss => Self::CommunicationLoss,
            AlarmKind::HydrantIllegalUse => Self::HydrantIllegalUse,
            AlarmKind::HydrantTilt => Self::HydrantTilt,
            _ => return None,
        })
    }

    /// Maps a quality flag back to the truth kind it detects (reverse flow maps via its alarm).
    pub fn from_flag(flag: QualityFlag) -> Option<Self> {
        Some(match flag {
            QualityFlag::ClockSkew => Self::ClockSkew,
            QualityFlag::OutOfOrder => Self::OutOfOrder,
            QualityFlag::Rollover => Self::Rollover,
            QualityFlag::MeterReplaced => Self::MeterReplacement,
            _ => return None,
        })
    }
}

/// One injected condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthEvent {
    /// What.
    pub kind: TruthKind,
    /// Meter id (or `dma:<n>` for DMA events).
    pub meter: String,
    /// When it started (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// When it ended, if it did within the run.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    /// Alarm a detector should raise (snake_case `AlarmKind`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm: Option<AlarmKind>,
    /// Quality flag validation should set, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<QualityFlag>,
    /// Facts a test can check (rates, registers, frame counts).
    #[serde(default)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl TruthEvent {
    /// Creates an event with the alarm and flag implied by `kind`.
    pub fn new(
        kind: TruthKind,
        meter: impl Into<String>,
        from: OffsetDateTime,
        until: Option<OffsetDateTime>,
    ) -> Self {
        Self {
            kind,
            meter: meter.into(),
            from,
            until,
            alarm: kind.alarm(),
            flag: kind.flag(),
            detail: serde_json::Map::new(),
        }
    }

    /// Adds a detail entry.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.detail.insert(key.to_owned(), value.into());
        self
    }
}

/// The ground truth of one scenario run: what `simulate ground-truth` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// Scenario name.
    pub scenario: String,
    /// Seed used.
    pub seed: u64,
    /// Start of the run (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// End of the run (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub end: OffsetDateTime,
    /// Injected events, ordered by (from, meter, kind).
    pub events: Vec<TruthEvent>,
    /// Per-DMA water balance over the run.
    pub dmas: Vec<DmaBalance>,
}

/// Water balance of one DMA over a run: inflow = consumption + losses (net of reverse flow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaBalance {
    /// DMA index.
    pub dma: u32,
    /// Meters in the DMA.
    pub meters: u32,
    /// System input volume, litres.
    pub inflow_l: i64,
    /// Water that passed customer meters (true consumption, including customer-side leaks), litres.
    pub consumption_l: i64,
    /// Network losses (background + mains bursts), litres.
    pub losses_l: i64,
    /// Water the customer registers recorded (what billing sees), litres.
    pub registered_l: i64,
}

/// Something a detector or validator reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    /// Meter id.
    pub meter: String,
    /// Kind, in truth vocabulary.
    pub kind: TruthKind,
    /// When it was reported as starting (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl Detection {
    /// Converts a raised alarm, if its kind is one the simulator injects.
    pub fn from_alarm(alarm: &Alarm) -> Option<Self> {
        Some(Self {
            meter: alarm.meter.as_str().to_owned(),
            kind: TruthKind::from_alarm(alarm.kind)?,
            at: alarm.raised_at,
        })
    }
}

/// Precision and recall for one kind (or overall).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct KindScore {
    /// Truth events matched by at least one detection.
    pub detected: u32,
    /// Truth events.
    pub truth: u32,
    /// Detections that matched a truth event.
    pub true_positives: u32,
    /// Detections.
    pub detections: u32,
}

impl KindScore {
    /// Returns matched detections / detections (1.0 when there were none).
    pub fn precision(&self) -> f64 {
        if self.detections == 0 {
            1.0
        } else {
            f64::from(self.true_positives) / f64::from(self.detections)
        }
    }

    /// Returns detected truth events / truth events (1.0 when there were none).
    pub fn recall(&self) -> f64 {
        if self.truth == 0 {
            1.0
        } else {
            f64::from(self.detected) / f64::from(self.truth)
        }
    }

    fn add(&mut self, other: &Self) {
        self.detected += other.detected;
        self.truth += other.truth;
        self.true_positives += other.true_positives;
        self.detections += other.detections;
    }
}

/// The result of [`score`].
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Score {
    /// Per kind.
    pub by_kind: BTreeMap<TruthKind, KindScore>,
    /// Summed over kinds.
    pub overall: KindScore,
}

/// Scores detections against the truth.
///
/// A detection matches a truth event of the same meter and kind when its time falls in
/// `[from − tolerance, until + tolerance]` (open-ended events run to `run_end`). Only kinds in
/// `kinds` are scored (pass the kinds the detector under test claims to detect), so a leak
/// detector is not penalised for missing tampers.
pub fn score(
    truth: &GroundTruth,
    detections: &[Detection],
    kinds: &[TruthKind],
    tolerance: time::Duration,
) -> Score {
    let mut result = Score::default();
    for &kind in kinds {
        let events: Vec<&TruthEvent> = truth.events.iter().filter(|e| e.kind == kind).collect();
        let dets: Vec<&Detection> = detections.iter().filter(|d| d.kind == kind).collect();
        let matches = |e: &TruthEvent, d: &Detection| {
            e.meter == d.meter
                && d.at >= e.from - tolerance
                && d.at <= e.until.unwrap_or(truth.end) + tolerance
        };
        let s = KindScore {
            detected: count(events.iter().filter(|e| dets.iter().any(|d| matches(e, d)))),
            truth: count(events.iter()),
            true_positives: count(dets.iter().filter(|d| events.iter().any(|e| matches(e, d)))),
            detections: count(dets.iter()),
        };
        result.overall.add(&s);
        result.by_kind.insert(kind, s);
    }
    result
}

fn count<I: Iterator>(it: I) -> u32 {
    u32::try_from(it.count()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn truth() -> GroundTruth {
        GroundTruth {
            scenario: "t".into(),
            seed: 1,
            start: datetime!(2026-06-01 0:00 UTC),
            end: datetime!(2026-06-08 0:00 UTC),
            events: vec![
                TruthEvent::new(TruthKind::Leak, "m1", datetime!(2026-06-02 0:00 UTC), None),
                TruthEvent::new(
                    TruthKind::Burst,
                    "m2",
                    datetime!(2026-06-03 0:00 UTC),
                    Some(datetime!(2026-06-03 6:00 UTC)),
                ),
                TruthEvent::new(TruthKind::Leak, "m3", datetime!(2026-06-04 0:00 UTC), None),
            ],
            dmas: vec![],
        }
    }

    fn det(meter: &str, kind: TruthKind, at: OffsetDateTime) -> Detection {
        Detection {
            meter: meter.into(),
            kind,
            at,
        }
    }

    #[test]
    fn scores_precision_and_recall_per_kind() {
        let dets = vec![
            det("m1", TruthKind::Leak, datetime!(2026-06-03 0:00 UTC)), // tp
            det("m9", TruthKind::Leak, datetime!(2026-06-03 0:00 UTC)), // fp: wrong meter
            det("m3", TruthKind::Leak, datetime!(2026-06-01 0:00 UTC)), // fp: before start
            det("m2", TruthKind::Burst, datetime!(2026-06-03 6:30 UTC)), // tp within tolerance
        ];
        let s = score(
            &truth(),
            &dets,
            &[TruthKind::Leak, TruthKind::Burst],
            time::Duration::hours(1),
        );
        let leak = s.by_kind[&TruthKind::Leak];
        assert_eq!((leak.detected, leak.truth), (1, 2));
        assert_eq!((leak.true_positives, leak.detections), (1, 3));
        assert!((leak.precision() - 1.0 / 3.0).abs() < 1e-9);
        assert!((leak.recall() - 0.5).abs() < 1e-9);
        let burst = s.by_kind[&TruthKind::Burst];
        assert_eq!((burst.precision(), burst.recall()), (1.0, 1.0));
        assert_eq!(s.overall.truth, 3);
        assert_eq!(s.overall.detected, 2);
    }

    #[test]
    fn truth_json_carries_alarm_and_flag() {
        let e = TruthEvent::new(
            TruthKind::ReverseFlow,
            "m1",
            datetime!(2026-06-02 0:00 UTC),
            None,
        )
        .with("rate_lph", 20.0);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["alarm"], "reverse_flow");
        assert_eq!(json["flag"], "reverse_flow");
        assert_eq!(json["detail"]["rate_lph"], 20.0);
        assert_eq!(serde_json::from_value::<TruthEvent>(json).unwrap(), e);
    }
}
