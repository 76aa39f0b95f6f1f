//! Alarms raised by detectors, devices and the gateway itself.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::MeterId;

/// What an alarm is about (DOMAIN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// Continuous flow without a return to zero.
    Leak,
    /// Flow above a share of Q3 for a sustained time.
    Burst,
    /// Reverse flow beyond a duration.
    ReverseFlow,
    /// Magnetic or mechanical tamper; permanent once set.
    Tamper,
    /// Battery near end of life.
    LowBattery,
    /// No uplink for the expected periods.
    CommunicationLoss,
    /// Zero consumption for N days on a meter with a history of use.
    StoppedMeter,
    /// Empty pipe / dry meter.
    EmptyPipe,
    /// Hydrant opened without authorisation.
    HydrantIllegalUse,
    /// Hydrant tilted beyond threshold (collision).
    HydrantTilt,
    /// Hydrant pressure out of range.
    HydrantPressure,
    /// Valve reported abnormal.
    ValveFault,
    /// Gateway spool evicted readings past its bound.
    SpoolOverflow,
}

/// How urgent an alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmSeverity {
    /// Informational.
    Info,
    /// Needs attention.
    Warning,
    /// Needs action now.
    Critical,
}

/// An alarm on one meter or device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// Affected meter or device.
    pub meter: MeterId,
    /// What.
    pub kind: AlarmKind,
    /// How urgent.
    pub severity: AlarmSeverity,
    /// When the condition started (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub raised_at: OffsetDateTime,
    /// When it cleared, if it has.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub cleared_at: Option<OffsetDateTime>,
    /// Detector-specific detail (rates, thresholds, evidence).
    #[serde(default)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}
