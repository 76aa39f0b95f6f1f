//! What every running source gets from the runtime ([`SourceContext`]), the intake step every
//! received frame goes through, the readiness signal, and how commands reach a source.
//!
//! The intake step is the only way readings reach the spool from a source: it counts the
//! frame (`wm_gateway_frames_total`), decodes it with the protocol's decoder from `decoders`,
//! counts a failure under the error's stable [`ErrorCode::code`]
//! (`wm_gateway_decode_errors_total{kind}`), derives the meter id, normalises the frame into
//! readings with provenance and submits them. It returns `Ok` only once the readings are
//! durable, so a source acknowledges its device (CoAP 2.04, HTTP 202, PUBACK) on `Ok` only.

use model::{DeviceCommand, GatewayId, MeterId, Reading, SourceKind};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::normalise::{self, FrameContext};
use crate::sink::{Durable, Epoch};
use crate::{IngestSink, SinkError};

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

/// A decode failure with a stable snake_case code: the `kind` label of
/// `wm_gateway_decode_errors_total`. Every label comes from a `code()` like this, never from
/// `Debug` output.
pub trait ErrorCode: std::fmt::Display {
    /// The stable code (`bad_checksum`, `meter_id`, ...).
    fn code(&self) -> &'static str;
}

impl ErrorCode for decoders::DecodeError {
    fn code(&self) -> &'static str {
        decoders::DecodeError::code(self)
    }
}

impl ErrorCode for decoders::cjt188::Cjt188Error {
    fn code(&self) -> &'static str {
        decoders::cjt188::Cjt188Error::code(self)
    }
}

impl ErrorCode for decoders::mbus::MbusError {
    fn code(&self) -> &'static str {
        decoders::mbus::MbusError::code(self)
    }
}

impl ErrorCode for decoders::wmbus::WmbusError {
    fn code(&self) -> &'static str {
        decoders::wmbus::WmbusError::code(self)
    }
}

impl ErrorCode for decoders::modbus::ModbusError {
    fn code(&self) -> &'static str {
        decoders::modbus::ModbusError::code(self)
    }
}

impl ErrorCode for decoders::envelope::EnvelopeError {
    fn code(&self) -> &'static str {
        decoders::envelope::EnvelopeError::code(self)
    }
}

impl ErrorCode for model::MeterIdError {
    fn code(&self) -> &'static str {
        "meter_id"
    }
}

/// Why an intake did not end with durable readings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    /// The payload could not be decoded (already counted under `code`). Re-sending it would
    /// fail the same way: a source refuses it (CoAP 4.00, HTTP 400) or acknowledges it to
    /// drop it (MQTT).
    #[error("{code}: {message}")]
    Rejected {
        /// The decode-error label.
        code: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The spool did not take the readings: do not acknowledge, the device re-sends.
    #[error(transparent)]
    Spool(#[from] SinkError),
}

/// One received frame, as the intake step needs it.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// The frame's bytes (hashed into the provenance).
    pub raw: &'a [u8],
    /// Where on the source it came from: topic, peer, bus address.
    pub channel: Option<&'a str>,
    /// Receive time (UTC).
    pub received_at: OffsetDateTime,
}

/// A frame through the decode half of the intake: its meter and readings.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The meter the frame came from.
    pub meter: MeterId,
    /// Its normalised readings.
    pub readings: Vec<Reading>,
}

/// Whether a source can receive yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Connecting to its broker or bus, or subscribing: what is sent now may not arrive.
    Connecting,
    /// Receiving: listeners bound, subscriptions confirmed, bus open.
    Ready,
}

/// A source's readiness, set by the source, watched by the runtime, `/metrics` and tests.
#[derive(Debug, Clone)]
pub struct Readiness(std::sync::Arc<watch::Sender<SourceState>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(std::sync::Arc::new(watch::Sender::new(
            SourceState::Connecting,
        )))
    }
}

impl Readiness {
    /// The current state.
    pub fn state(&self) -> SourceState {
        *self.0.borrow()
    }

    /// Marks the source receiving.
    pub fn set_ready(&self) {
        self.0.send_replace(SourceState::Ready);
    }

    /// Marks the source (re)connecting.
    pub fn set_connecting(&self) {
        self.0.send_replace(SourceState::Connecting);
    }

    /// Waits until the source is ready (returns at once when it is).
    pub async fn wait_ready(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _open = rx.wait_for(|s| *s == SourceState::Ready).await;
    }
}

/// Everything a running source needs from the gateway runtime.
#[derive(Debug)]
pub struct SourceContext {
    /// This gateway's id (for provenance).
    pub gateway: GatewayId,
    /// Source instance id from the configuration.
    pub source_id: String,
    /// The provenance kind of this source's readings.
    pub kind: SourceKind,
    /// Where readings go; use the intake methods below rather than submitting directly.
    pub sink: IngestSink,
    /// Commands for devices behind this source.
    pub commands: mpsc::Receiver<CommandRequest>,
    /// Cancelled when the gateway shuts down or reloads this source.
    pub shutdown: CancellationToken,
    /// Set by the source when it can receive (and back when it reconnects).
    pub readiness: Readiness,
}

impl SourceContext {
    /// A context with a fresh readiness signal (state [`SourceState::Connecting`]).
    pub fn new(
        gateway: GatewayId,
        source_id: impl Into<String>,
        kind: SourceKind,
        sink: IngestSink,
        commands: mpsc::Receiver<CommandRequest>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            gateway,
            source_id: source_id.into(),
            kind,
            sink,
            commands,
            shutdown,
            readiness: Readiness::default(),
        }
    }

    /// Counts `n` received frames.
    pub fn count_frames(&self, n: usize) {
        for _ in 0..n {
            self.sink.frame_received(&self.source_id);
        }
    }

    /// Counts a decode failure under its code and turns it into [`IntakeError::Rejected`].
    /// The frame itself is counted by the caller (or by [`SourceContext::decode`]).
    pub fn reject(&self, error: &dyn ErrorCode) -> IntakeError {
        self.sink.decode_failed(&self.source_id, error.code());
        IntakeError::Rejected {
            code: error.code(),
            message: error.to_string(),
        }
    }

    /// The provenance context of `frame` for [`normalise::to_readings`].
    pub fn frame_context<'a>(&'a self, frame: &Received<'a>) -> FrameContext<'a> {
        FrameContext {
            gateway: &self.gateway,
            source: self.kind,
            source_id: &self.source_id,
            channel: frame.channel,
            received_at: frame.received_at,
            raw: frame.raw,
        }
    }

    /// The decode half of the intake: counts the frame, decodes it with `decode` (a decoder
    /// from `decoders`), derives the meter id and normalises; `meter_ts` gives the reading
    /// time from the decoded frame when the meter's clock is trusted. Failures are counted
    /// under their code. For sources that batch several frames into one submit.
    pub fn decode<E: ErrorCode>(
        &self,
        frame: &Received<'_>,
        decode: impl FnOnce(&[u8]) -> Result<decoders::DecodedFrame, E>,
        meter_ts: impl FnOnce(&decoders::DecodedFrame) -> Option<OffsetDateTime>,
    ) -> Result<Decoded, IntakeError> {
        self.sink.frame_received(&self.source_id);
        let decoded = decode(frame.raw).map_err(|e| self.reject(&e))?;
        let meter = normalise::meter_id(&decoded).map_err(|e| self.reject(&e))?;
        let readings = normalise::to_readings(
            &decoded,
            &meter,
            meter_ts(&decoded),
            &self.frame_context(frame),
        );
        Ok(Decoded { meter, readings })
    }

    /// The whole intake of one frame: [`SourceContext::decode`], then submit. `Ok` (the
    /// meter) only once the readings are durable.
    pub async fn intake<E: ErrorCode>(
        &self,
        frame: &Received<'_>,
        decode: impl FnOnce(&[u8]) -> Result<decoders::DecodedFrame, E>,
    ) -> Result<MeterId, IntakeError> {
        let Decoded { meter, readings } = self.decode(frame, decode, |_| None)?;
        self.submit(readings).await?;
        Ok(meter)
    }

    /// The intake of a payload the source decoded itself (several frames with relative
    /// times, JSON): counts `frames` frames, counts a failure under its code, submits the
    /// readings on success. `Ok` only once they are durable.
    pub async fn intake_readings<E: ErrorCode>(
        &self,
        frames: usize,
        readings: Result<Vec<Reading>, E>,
    ) -> Result<(), IntakeError> {
        self.count_frames(frames);
        let readings = readings.map_err(|e| self.reject(&e))?;
        self.submit(readings).await
    }

    /// [`SourceContext::intake_readings`] for a pipelining source: hands the readings to the
    /// spool within the session that began at `epoch` without waiting for the sync; the
    /// returned [`Durable`] says when to acknowledge.
    pub async fn intake_pipelined<E: ErrorCode>(
        &self,
        epoch: &Epoch,
        readings: Result<Vec<Reading>, E>,
    ) -> Result<Durable, IntakeError> {
        self.sink.frame_received(&self.source_id);
        let readings = readings.map_err(|e| self.reject(&e))?;
        Ok(self.sink.enqueue_in(epoch, readings).await?)
    }

    /// The submit half of the intake: hands readings (already counted and normalised) to the
    /// spool and waits until they are durable.
    pub async fn submit(&self, readings: Vec<Reading>) -> Result<(), IntakeError> {
        Ok(self.sink.submit(readings).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> (SourceContext, mpsc::Receiver<crate::SubmitRequest>) {
        let (sink, rx) = IngestSink::new(4);
        let (_tx, commands) = mpsc::channel(1);
        let ctx = SourceContext::new(
            GatewayId::new("gw-1").unwrap(),
            "bus",
            SourceKind::MbusSerial,
            sink,
            commands,
            CancellationToken::new(),
        );
        (ctx, rx)
    }

    fn frame(raw: &[u8]) -> Received<'_> {
        Received {
            raw,
            channel: Some("/dev/ttyUSB0 primary 1"),
            received_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[tokio::test]
    async fn intake_counts_decodes_submits_and_answers_after_the_sync() {
        let (ctx, mut rx) = context();
        let mut data = vec![0x78, 0x56, 0x34, 0x12, 0x2D, 0x2C, 0x01, 0x07, 0, 0, 0, 0];
        data.extend_from_slice(&[0x0C, 0x13, 0x45, 0x23, 0x01, 0x00]);
        let raw = decoders::mbus::encode::long(0x08, 1, 0x72, &data);
        let spool = tokio::spawn(async move {
            let req = rx.recv().await.unwrap();
            let n = req.readings.len();
            let first = req.readings[0].clone();
            req.done.send(Ok(())).unwrap();
            (n, first)
        });
        let meter = ctx
            .intake(&frame(&raw), decoders::mbus::decode)
            .await
            .unwrap();
        assert_eq!(meter.as_str(), "mbus:KAM12345678");
        let (n, reading) = spool.await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(reading.value.to_string(), "12.345");
        assert_eq!(reading.provenance.source, SourceKind::MbusSerial);
        assert_eq!(
            reading.provenance.channel.as_deref(),
            Some("/dev/ttyUSB0 primary 1")
        );
        assert_eq!(ctx.sink.counters().frames("bus"), 1);

        // A corrupt checksum: counted under the decoder's code, nothing submitted.
        let mut bad = raw.clone();
        let cs = bad.len() - 2;
        bad[cs] ^= 0xFF;
        let e = ctx
            .intake(&frame(&bad), decoders::mbus::decode)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                IntakeError::Rejected {
                    code: "bad_checksum",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(ctx.sink.counters().frames("bus"), 2);
        assert_eq!(ctx.sink.counters().decode_errors("bus", "bad_checksum"), 1);
    }

    #[tokio::test]
    async fn a_closed_spool_is_a_spool_error_not_a_rejection() {
        let (ctx, rx) = context();
        drop(rx);
        let reading = Err::<Vec<Reading>, model::MeterIdError>(model::MeterIdError::Empty);
        let e = ctx.intake_readings(1, reading).await.unwrap_err();
        assert!(matches!(
            e,
            IntakeError::Rejected {
                code: "meter_id",
                ..
            }
        ));
        let (ctx, rx) = context();
        drop(rx);
        let mut data = vec![0x78, 0x56, 0x34, 0x12, 0x2D, 0x2C, 0x01, 0x07, 0, 0, 0, 0];
        data.extend_from_slice(&[0x0C, 0x13, 0x45, 0x23, 0x01, 0x00]);
        let raw = decoders::mbus::encode::long(0x08, 1, 0x72, &data);
        let e = ctx
            .intake(&frame(&raw), decoders::mbus::decode)
            .await
            .unwrap_err();
        assert_eq!(e, IntakeError::Spool(SinkError::Closed));
    }

    #[tokio::test]
    async fn readiness_is_waited_on() {
        let r = Readiness::default();
        assert_eq!(r.state(), SourceState::Connecting);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        r.set_ready();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        r.set_connecting();
        assert_eq!(r.state(), SourceState::Connecting);
    }
}
