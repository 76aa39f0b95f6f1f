//! The central command state machine (pure): which reported state moves a command on.

use model::CommandState;

/// A command's state as the centre keeps it (the `commands.state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CentralState {
    /// Written, waiting to be published or waiting at the gateway (NB-IoT: the next uplink).
    Queued,
    /// Handed to the device's transport.
    Sent,
    /// The transport acknowledged delivery.
    Delivered,
    /// The device reported successful execution.
    Acknowledged,
    /// A later `valve_state` / hydrant status reading shows the commanded state.
    ConfirmedByTelemetry,
    /// The device or transport reported failure, or telemetry contradicts the command.
    Failed,
    /// Its TTL passed before execution.
    Expired,
    /// Cancelled (by a person, or superseded by a newer valve command) before delivery.
    Cancelled,
}

impl CentralState {
    /// Every state, in life order.
    pub const ALL: [CentralState; 8] = [
        Self::Queued,
        Self::Sent,
        Self::Delivered,
        Self::Acknowledged,
        Self::ConfirmedByTelemetry,
        Self::Failed,
        Self::Expired,
        Self::Cancelled,
    ];

    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Acknowledged => "acknowledged",
            Self::ConfirmedByTelemetry => "confirmed_by_telemetry",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a column value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The state a gateway ack reports.
    pub fn from_ack(s: &CommandState) -> Self {
        match s {
            CommandState::Queued => Self::Queued,
            CommandState::Sent => Self::Sent,
            CommandState::Delivered => Self::Delivered,
            CommandState::Acknowledged => Self::Acknowledged,
            CommandState::ConfirmedByTelemetry => Self::ConfirmedByTelemetry,
            CommandState::Failed { .. } => Self::Failed,
            CommandState::Expired => Self::Expired,
            CommandState::Cancelled => Self::Cancelled,
        }
    }

    /// Still counts against the per-device bound (not yet executed, failed or withdrawn).
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Sent | Self::Delivered)
    }

    fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Sent => 1,
            Self::Delivered => 2,
            Self::Acknowledged => 3,
            _ => 4,
        }
    }
}

/// The state after `reported` arrives for a command in `current`, or `None` when it changes
/// nothing. Acks repeat and arrive out of order (re-published after reconnects), so a state
/// never moves backwards; the device's facts beat the centre's clock (a command the centre
/// expired but the gateway executed is what the gateway says); `acknowledged` moves on only by
/// telemetry (confirmed, or failed on a contradiction).
pub fn next_state(current: CentralState, reported: CentralState) -> Option<CentralState> {
    use CentralState as S;
    if current == reported {
        return None;
    }
    match current {
        S::ConfirmedByTelemetry | S::Failed | S::Cancelled => None,
        S::Acknowledged => {
            matches!(reported, S::ConfirmedByTelemetry | S::Failed).then_some(reported)
        }
        S::Expired => matches!(
            reported,
            S::Sent | S::Delivered | S::Acknowledged | S::Failed
        )
        .then_some(reported),
        S::Queued | S::Sent | S::Delivered => {
            (reported.rank() > current.rank()).then_some(reported)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CentralState as S;
    use super::*;

    #[test]
    fn never_backwards_and_terminal_stays() {
        assert_eq!(next_state(S::Queued, S::Sent), Some(S::Sent));
        assert_eq!(next_state(S::Sent, S::Queued), None);
        assert_eq!(next_state(S::Acknowledged, S::Sent), None);
        assert_eq!(
            next_state(S::Queued, S::Acknowledged),
            Some(S::Acknowledged)
        );
        assert_eq!(
            next_state(S::Acknowledged, S::ConfirmedByTelemetry),
            Some(S::ConfirmedByTelemetry)
        );
        assert_eq!(next_state(S::Acknowledged, S::Failed), Some(S::Failed));
        assert_eq!(next_state(S::Acknowledged, S::Cancelled), None);
        assert_eq!(next_state(S::Cancelled, S::Acknowledged), None);
        assert_eq!(next_state(S::Failed, S::Acknowledged), None);
        assert_eq!(
            next_state(S::Expired, S::Acknowledged),
            Some(S::Acknowledged)
        );
        assert_eq!(next_state(S::Expired, S::Queued), None);
        assert_eq!(next_state(S::Sent, S::Cancelled), Some(S::Cancelled));
        assert_eq!(next_state(S::Sent, S::Sent), None);
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
    }
}
