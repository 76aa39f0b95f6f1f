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
    /// District metered area: inflow minus customer consumption above the loss threshold.
    DmaImbalance,
    /// A gateway's retained status went `offline` (or its last will fired).
    GatewayOffline,
    /// A meter billed on estimates for longer than allowed (field visit needed).
    ProlongedEstimation,
}

impl AlarmKind {
    /// Every kind, in declaration order.
    pub const ALL: [AlarmKind; 16] = [
        Self::Leak,
        Self::Burst,
        Self::ReverseFlow,
        Self::Tamper,
        Self::LowBattery,
        Self::CommunicationLoss,
        Self::StoppedMeter,
        Self::EmptyPipe,
        Self::HydrantIllegalUse,
        Self::HydrantTilt,
        Self::HydrantPressure,
        Self::ValveFault,
        Self::SpoolOverflow,
        Self::DmaImbalance,
        Self::GatewayOffline,
        Self::ProlongedEstimation,
    ];

    /// Returns the wire name (`leak`, `stopped_meter`, ...), as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leak => "leak",
            Self::Burst => "burst",
            Self::ReverseFlow => "reverse_flow",
            Self::Tamper => "tamper",
            Self::LowBattery => "low_battery",
            Self::CommunicationLoss => "communication_loss",
            Self::StoppedMeter => "stopped_meter",
            Self::EmptyPipe => "empty_pipe",
            Self::HydrantIllegalUse => "hydrant_illegal_use",
            Self::HydrantTilt => "hydrant_tilt",
            Self::HydrantPressure => "hydrant_pressure",
            Self::ValveFault => "valve_fault",
            Self::SpoolOverflow => "spool_overflow",
            Self::DmaImbalance => "dma_imbalance",
            Self::GatewayOffline => "gateway_offline",
            Self::ProlongedEstimation => "prolonged_estimation",
        }
    }
}

impl std::str::FromStr for AlarmKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown alarm kind {s:?}"))
    }
}

impl AlarmSeverity {
    /// Returns the wire name (`info`, `warning`, `critical`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for k in AlarmKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(k.as_str().parse::<AlarmKind>(), Ok(k));
        }
        assert_eq!(AlarmSeverity::Critical.as_str(), "critical");
    }
}
