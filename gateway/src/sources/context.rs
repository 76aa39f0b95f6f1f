//! What every protocol source gets from the runtime, and how commands reach a source.
//!
//! A source is an async task `run(config, SourceContext)`: it reads frames from its devices,
//! decodes them, hands readings to [`IngestSink::submit`] before acknowledging the device, and
//! executes the [`CommandRequest`]s the downlink router sends it for its devices.

use model::{DeviceCommand, GatewayId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::IngestSink;

/// How a device answered a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Written to the device (bus write done, frame sent) but the device gives no confirmation.
    Sent,
    /// The device confirmed it executed the command.
    Acknowledged,
    /// The device refused it or could not be reached; the reason is reported upstream.
    Failed(String),
}

/// A command routed to the source that owns the device, with where to report the outcome.
#[derive(Debug)]
pub struct CommandRequest {
    /// The command (already checked for expiry and duplicates by the downlink router).
    pub command: DeviceCommand,
    /// Answered once the device confirmed, refused, or could not be reached.
    pub reply: oneshot::Sender<CommandOutcome>,
}

/// Everything a running source needs from the gateway runtime.
#[derive(Debug)]
pub struct SourceContext {
    /// This gateway's id (for provenance).
    pub gateway: GatewayId,
    /// Source instance id from the configuration.
    pub source_id: String,
    /// Where readings go; submit before acknowledging a device.
    pub sink: IngestSink,
    /// Commands for devices behind this source.
    pub commands: mpsc::Receiver<CommandRequest>,
    /// Cancelled when the gateway shuts down or reloads this source.
    pub shutdown: CancellationToken,
}
