//! Commands to devices (valves, hydrants, meters) and their acknowledgements.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{GatewayId, MeterId};

/// Idempotency key of a command: a re-sent command with the same id is never executed twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CommandId(pub String);

impl std::fmt::Display for CommandId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the device is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommandAction {
    /// Open a valve-control meter's valve (CJ/T 188 A017 = 55, Modbus valve register).
    ValveOpen,
    /// Close a valve-control meter's valve (CJ/T 188 A017 = 99).
    ValveClose,
    /// Unlock a hydrant outlet for authorised use for a bounded time.
    HydrantUnlock {
        /// How long the unlock lasts, in seconds.
        duration_s: u32,
    },
    /// Lock a hydrant outlet (never blocks mechanical emergency opening).
    HydrantLock,
    /// Write one Modbus holding register.
    ModbusWrite {
        /// Register address (0-based).
        register: u16,
        /// Value to write.
        value: u16,
    },
    /// M-Bus application reset (SND_UD CI 50).
    MbusApplicationReset,
    /// Set the meter clock to the gateway's time.
    SetTime,
    /// Read the meter now: one extra poll, outside its schedule, by the gateway source that
    /// owns it (Modbus and wired M-Bus, which the gateway polls; NB-IoT and wM-Bus meters only
    /// speak when they wake, so the centre refuses it for them). The reading arrives on the
    /// normal readings path; the ack says whether the poll succeeded.
    ReadNow,
    /// Cancel a command still waiting in the gateway's queue (NB-IoT: not yet sent to the
    /// meter); the target is reported `cancelled`, this command `acknowledged`, or `failed`
    /// when the target is no longer queued.
    Cancel {
        /// The command to cancel.
        command: CommandId,
    },
}

impl CommandAction {
    /// Returns true for valve open/close, where a newer command supersedes a queued older one.
    pub fn is_valve(&self) -> bool {
        matches!(self, Self::ValveOpen | Self::ValveClose)
    }
}

/// Where a command is in its life. Follows carrier IoT platforms' states plus telemetry
/// confirmation: queued → sent → delivered → acknowledged | failed, or expired / cancelled,
/// and `confirmed_by_telemetry` when a later status word shows the effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CommandState {
    /// Waiting at the gateway (for sleepy NB-IoT devices: until their next uplink).
    Queued,
    /// Handed to the transport.
    Sent,
    /// The transport acknowledged delivery.
    Delivered,
    /// The device reported successful execution.
    Acknowledged,
    /// A later telemetry frame shows the commanded state.
    ConfirmedByTelemetry,
    /// The device or transport reported failure.
    Failed {
        /// Why.
        reason: String,
    },
    /// TTL elapsed before delivery.
    Expired,
    /// Cancelled by an operator before delivery.
    Cancelled,
}

impl CommandState {
    /// Returns true when no further transition is expected.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Acknowledged
                | Self::ConfirmedByTelemetry
                | Self::Failed { .. }
                | Self::Expired
                | Self::Cancelled
        )
    }
}

/// A command sent down `wm/v1/{gateway}/cmd/{device}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCommand {
    /// Wire version, [`crate::WIRE_VERSION`].
    pub v: u16,
    /// Idempotency key.
    pub id: CommandId,
    /// Gateway that owns the device.
    pub gateway: GatewayId,
    /// Target device.
    pub device: MeterId,
    /// What to do.
    pub action: CommandAction,
    /// Who issued it (user or rule), for the audit log.
    pub issued_by: String,
    /// When it was issued (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// After this instant the command must not be executed (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl DeviceCommand {
    /// Returns true if the command may no longer be executed at `now`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        now >= self.expires_at
    }
}

/// An acknowledgement published on `wm/v1/{gateway}/cmd-ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    /// Wire version, [`crate::WIRE_VERSION`].
    pub v: u16,
    /// The command.
    pub id: CommandId,
    /// Reporting gateway.
    pub gateway: GatewayId,
    /// Target device.
    pub device: MeterId,
    /// New state.
    #[serde(flatten)]
    pub state: CommandState,
    /// When the state was reached (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn command_json_form() {
        let cmd = DeviceCommand {
            v: 1,
            id: CommandId("c-1".into()),
            gateway: GatewayId::new("gw-1").unwrap(),
            device: MeterId::new("cjt188:78330011223344").unwrap(),
            action: CommandAction::ValveClose,
            issued_by: "ops:alice".into(),
            issued_at: datetime!(2026-11-24 08:00 UTC),
            expires_at: datetime!(2026-11-26 08:00 UTC),
        };
        let json = serde_json::to_value(&cmd).unwrap();
        assert_eq!(json["action"], serde_json::json!({"type": "valve_close"}));
        assert!(!cmd.is_expired(datetime!(2026-11-25 08:00 UTC)));
        assert!(cmd.is_expired(datetime!(2026-11-26 08:00 UTC)));
        let ack = CommandAck {
            v: 1,
            id: cmd.id.clone(),
            gateway: cmd.gateway.clone(),
            device: cmd.device.clone(),
            state: CommandState::Failed {
                reason: "valve stuck".into(),
            },
            at: datetime!(2026-11-24 08:01 UTC),
        };
        let json = serde_json::to_value(&ack).unwrap();
        assert_eq!(json["state"], "failed");
        assert_eq!(json["reason"], "valve stuck");
        assert_eq!(serde_json::from_value::<CommandAck>(json).unwrap(), ack);
        assert!(ack.state.is_terminal());
        assert!(!CommandState::Sent.is_terminal());
    }
}
