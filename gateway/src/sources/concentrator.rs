//! MQTT subscriber source for concentrators (MQTT 3.1.1 or 5): JSON reading lists or raw binary
//! frames, by topic → format mapping from the configuration.
//!
//! Messages are received with manual acknowledgement: the PUBACK goes to the site broker only
//! after the readings are durable in the spool, so the broker re-delivers anything the gateway
//! had not stored. Up to [`MAX_IN_FLIGHT`] messages are being synced at once (one group
//! commit for many), acknowledged in arrival order. A message that cannot be decoded is counted by kind, logged with its topic
//! and then acknowledged (re-delivering it would fail the same way).

use std::time::Duration;

use decoders::cjt188;
use edge_config::{MqttProtocol, MqttSourceConfig, PayloadFormat, TopicMapping, Valid};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use model::{ClockSource, MeterId, Provenance, Quality, Quantity, Reading, SourceKind, Unit};
use rumqttc::{Event, Packet, QoS};
use rust_decimal::Decimal;
use serde::Deserialize;
use time::OffsetDateTime;

use super::{
    Commands, ErrorCode, IntakeError, Received, Source, SourceContext, SourceEnv, SourceError,
};
use crate::mqtt::{self, MqttEndpoint};
use crate::normalise::{self, MbusFrameError};
use crate::sink::Durable;

/// The configured password for a CONNECT (empty when none).
fn password(p: Option<&edge_config::Secret>) -> String {
    p.map(|p| p.expose().to_owned()).unwrap_or_default()
}

/// Returns true when `topic` matches the MQTT filter (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The concentrator JSON of `concentrator/{cid}/readings`.
#[derive(Debug, Deserialize)]
struct ConcentratorBatch {
    v: u16,
    #[serde(default)]
    concentrator: String,
    readings: Vec<ConcentratorReading>,
}

#[derive(Debug, Deserialize)]
struct ConcentratorReading {
    meter: MeterId,
    #[serde(with = "time::serde::rfc3339")]
    ts: OffsetDateTime,
    volume_m3: Decimal,
}

/// Why a message could not be turned into readings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// No `[[source.topics]]` mapping matches the topic.
    #[error("no format mapping for the topic")]
    UnmappedTopic,
    /// Not the concentrator JSON.
    #[error("not concentrator JSON: {0}")]
    Json(String),
    /// Unknown concentrator JSON version.
    #[error("unsupported version {0}")]
    Version(u16),
    /// The binary frame did not decode.
    #[error(transparent)]
    Frame(#[from] decoders::DecodeError),
    /// The frame's address is not a usable meter id.
    #[error("unusable meter address: {0}")]
    MeterId(#[from] model::MeterIdError),
}

impl ErrorCode for MessageError {
    fn code(&self) -> &'static str {
        match self {
            Self::UnmappedTopic => "unmapped_topic",
            Self::Json(_) => "json",
            Self::Version(_) => "version",
            Self::Frame(e) => e.code(),
            Self::MeterId(_) => "meter_id",
        }
    }
}

/// Whether a binary payload is decoded as M-Bus (else CJ/T 188).
fn is_mbus(format: PayloadFormat, raw: &[u8]) -> bool {
    match format {
        PayloadFormat::Cjt188 => false,
        PayloadFormat::Mbus => true,
        // CJ/T 188: optional FE preamble, 0x68, then the meter type (never 0x68); an M-Bus long
        // frame repeats 0x68 after its two length bytes.
        _ => {
            let body = raw
                .get(raw.iter().take_while(|b| **b == 0xFE).count()..)
                .unwrap_or(&[]);
            body.first() == Some(&0x68) && body.get(3) == Some(&0x68)
        }
    }
}

/// Turns one message, received on `topic`, into readings (the topic is their channel).
pub fn readings_of(
    ctx: &SourceContext,
    format: PayloadFormat,
    topic: &str,
    payload: &[u8],
    received_at: OffsetDateTime,
) -> Result<Vec<Reading>, MessageError> {
    let fctx = ctx.frame_context(&Received {
        raw: payload,
        channel: Some(topic),
        received_at,
    });
    if format == PayloadFormat::Json {
        let batch: ConcentratorBatch =
            serde_json::from_slice(payload).map_err(|e| MessageError::Json(e.to_string()))?;
        if batch.v != 1 {
            return Err(MessageError::Version(batch.v));
        }
        let provenance = Provenance {
            gateway: ctx.gateway.clone(),
            source: SourceKind::Mqtt,
            source_id: ctx.source_id.clone(),
            frame_hash: normalise::frame_hash(payload),
            received_at,
            channel: Some(topic.to_owned()),
        };
        tracing::debug!(concentrator = %batch.concentrator, n = batch.readings.len(), "concentrator batch");
        return Ok(batch
            .readings
            .into_iter()
            .map(|r| Reading {
                meter: r.meter,
                ts: r.ts,
                clock: ClockSource::Meter,
                quantity: Quantity::Volume,
                value: r.volume_m3,
                unit: Unit::CubicMetre,
                storage: 0,
                tariff: 0,
                subunit: 0,
                quality: Quality::Actual,
                flags: vec![],
                provenance: provenance.clone(),
            })
            .collect());
    }
    if is_mbus(format, payload) {
        // Bytes to readings directly, without the `DecodedFrame` (the same readings).
        return match normalise::mbus_readings(&fctx, None) {
            Ok((_, readings)) => Ok(readings),
            Err(MbusFrameError::Decode(e)) => Err(MessageError::Frame(e.into())),
            Err(MbusFrameError::MeterId(e)) => Err(MessageError::MeterId(e)),
        };
    }
    let decoded = cjt188::decode(payload).map_err(|e| MessageError::Frame(e.into()))?;
    let meter = normalise::meter_id(&decoded)?;
    Ok(normalise::to_readings(&decoded, &meter, None, &fctx))
}

/// What became of a message: acknowledge it once its readings are durable, or reconnect.
enum Handled {
    /// Handed to the spool (or counted as undecodable, with nothing to wait for): PUBACK it
    /// when `Durable` says the readings are on disk.
    Spooling(Durable),
    /// The spool is closed: leave it unacknowledged and reconnect, so the broker re-delivers.
    Retry(String),
}

/// Decodes one message and hands its readings to the spool (without waiting for the sync).
async fn on_message(
    ctx: &SourceContext,
    epoch: &crate::sink::Epoch,
    topics: &[TopicMapping],
    topic: &str,
    payload: &[u8],
) -> Handled {
    let readings = match topics.iter().find(|m| topic_matches(&m.filter, topic)) {
        Some(mapping) => readings_of(
            ctx,
            mapping.format,
            topic,
            payload,
            OffsetDateTime::now_utc(),
        ),
        None => Err(MessageError::UnmappedTopic),
    };
    match ctx.intake_pipelined(epoch, readings).await {
        Ok(durable) => Handled::Spooling(durable),
        Err(IntakeError::Rejected { code, message }) => {
            tracing::warn!(source = %ctx.source_id, %topic, kind = code, error = %message, "undecodable concentrator message");
            // Re-delivering it would fail the same way: acknowledged with nothing to wait for.
            Handled::Spooling(Durable::ready())
        }
        Err(IntakeError::Spool(e)) => {
            tracing::error!(source = %ctx.source_id, error = %e, "could not spool; leaving the message unacknowledged");
            Handled::Retry(format!("spool: {e}"))
        }
    }
}

/// Messages decoded and handed to the spool but not yet acknowledged, at most. While earlier
/// ones wait for their `fsync`, later ones are decoded and join the same group commit (one
/// `fsync` per message capped a backlog at about 950 messages/s), and undecodable ones do not
/// queue behind a sync. PUBACKs still go out in the order the messages came, each only once
/// its readings (and those of every message before it) are durable.
const MAX_IN_FLIGHT: usize = 512;

/// A message waiting for its readings to become durable; resolves to the message and the
/// spool's answer.
fn settle<P: Send + 'static>(message: P, durable: Durable) -> Settling<P> {
    Box::pin(async move {
        let result = durable.wait().await;
        (message, result)
    })
}

/// [`settle`]'s future, named so the in-flight queue has a type before its first push.
type Settling<P> =
    std::pin::Pin<Box<dyn std::future::Future<Output = (P, Result<(), crate::SinkError>)> + Send>>;

/// How long the site broker keeps the session (and unacknowledged messages) of an MQTT 5
/// connection after a disconnect.
const SESSION_EXPIRY_S: u32 = 3600;

/// The concentrator MQTT subscriber: TLS built at build, connects in `run`.
#[derive(Debug)]
pub struct ConcentratorSource {
    config: Valid<MqttSourceConfig>,
    tls: Option<native_tls::TlsConnector>,
}

impl Source for ConcentratorSource {
    type Config = Valid<MqttSourceConfig>;
    const KIND: SourceKind = SourceKind::Mqtt;

    async fn build(
        config: &Valid<MqttSourceConfig>,
        _env: &SourceEnv,
    ) -> Result<Self, SourceError> {
        let tls = config
            .tls()
            .map(|t| crate::mqtt::tls_connector(&t))
            .transpose()?;
        Ok(Self {
            config: config.clone(),
            tls,
        })
    }

    fn commands(&self) -> Commands {
        Commands::Unavailable("(concentrator MQTT) takes no commands".into())
    }

    /// Runs the source until `ctx.shutdown`, reconnecting with backoff; ready once every
    /// topic filter is subscribed, connecting again after a lost connection.
    ///
    /// The session is persistent (MQTT 3.1.1 `clean_session = false`, MQTT 5 session expiry
    /// one hour) so messages not yet acknowledged are re-delivered after a reconnect.
    async fn run(self, ctx: SourceContext) -> Result<(), SourceError> {
        let Self { config, tls } = self;
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", ctx.gateway, ctx.source_id));
        let mut backoff = Duration::from_millis(200);
        loop {
            let failure = match config.protocol {
                MqttProtocol::V311 => {
                    session_v311(&config, tls.as_ref(), &ctx, &client_id, &mut backoff).await
                }
                MqttProtocol::V5 => {
                    session_v5(&config, tls.as_ref(), &ctx, &client_id, &mut backoff).await
                }
            };
            ctx.readiness.set_connecting();
            let Some(failure) = failure else {
                return Ok(());
            };
            tracing::warn!(source = %ctx.source_id, error = %failure, "concentrator broker connection lost");
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// One MQTT 3.1.1 connection; `None` on shutdown, else why it ended.
async fn session_v311(
    config: &MqttSourceConfig,
    tls: Option<&native_tls::TlsConnector>,
    ctx: &SourceContext,
    client_id: &str,
    backoff: &mut Duration,
) -> Option<String> {
    let endpoint = MqttEndpoint {
        host: config.broker.host.clone(),
        port: config.broker.port,
        credentials: config
            .username
            .clone()
            .map(|u| (u, password(config.password.as_ref()))),
        keep_alive: Duration::from_secs(15),
        tls: tls.cloned(),
    };
    let mut options = endpoint.options(client_id, None);
    options.set_manual_acks(true);
    options.set_clean_session(false);
    let (client, mut events) = mqtt::connect(options, 64);
    // After a failed spool write the rest of this session is refused (see `Epoch`).
    let epoch = ctx.sink.epoch();
    let mut awaiting_subacks = usize::MAX;
    let mut in_flight: FuturesOrdered<Settling<rumqttc::Publish>> = FuturesOrdered::new();
    loop {
        let ev = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                // What is already handed to the spool is acknowledged first, so a clean stop
                // leaves nothing for the broker to deliver twice.
                while let Some((p, result)) = in_flight.next().await {
                    if result.is_err() {
                        break;
                    }
                    client.ack(&p).await.ok();
                }
                client.disconnect().await.ok();
                return None;
            }
            Some((p, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = result {
                    // This and every later message stay unacknowledged: re-delivered after
                    // the reconnect (those already spooled then twice, which the pipeline
                    // deduplicates).
                    tracing::error!(source = %ctx.source_id, error = %e, "could not spool; leaving the message unacknowledged");
                    return Some(format!("spool: {e}"));
                }
                client.ack(&p).await.ok();
                continue;
            }
            ev = events.recv(), if in_flight.len() < MAX_IN_FLIGHT => ev,
        };
        match ev {
            None => return Some("event loop ended".to_owned()),
            Some(Err(e)) => return Some(e.to_string()),
            Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                *backoff = Duration::from_millis(200);
                tracing::info!(source = %ctx.source_id, broker = %endpoint.host, "concentrator broker connected (MQTT 3.1.1)");
                for TopicMapping { filter, .. } in &config.topics {
                    client.subscribe(filter, QoS::AtLeastOnce).await.ok();
                }
                awaiting_subacks = config.topics.len();
                if awaiting_subacks == 0 {
                    ctx.readiness.set_ready();
                }
            }
            Some(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                awaiting_subacks = awaiting_subacks.saturating_sub(1);
                if awaiting_subacks == 0 {
                    ctx.readiness.set_ready();
                }
            }
            Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                match on_message(ctx, &epoch, &config.topics, &p.topic, &p.payload).await {
                    Handled::Spooling(durable) => in_flight.push_back(settle(p, durable)),
                    Handled::Retry(why) => return Some(why),
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

/// One MQTT 5 connection; `None` on shutdown, else why it ended.
async fn session_v5(
    config: &MqttSourceConfig,
    tls: Option<&native_tls::TlsConnector>,
    ctx: &SourceContext,
    client_id: &str,
    backoff: &mut Duration,
) -> Option<String> {
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::{AsyncClient, Event as Event5, MqttOptions};

    let mut options = MqttOptions::new(client_id, config.broker.host.clone(), config.broker.port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_manual_acks(true);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(SESSION_EXPIRY_S));
    options.set_max_packet_size(Some(16 * 1024 * 1024));
    options.set_transport(mqtt::transport(tls));
    if let Some(u) = &config.username {
        options.set_credentials(u.clone(), password(config.password.as_ref()));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    // Polled on its own task: the event loop must not be cancelled mid-write.
    // Unbounded for the reason given at `mqtt::drive`: a bounded channel deadlocks with the
    // handler's `ack()` under a burst.
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).is_err() || failed {
                break;
            }
        }
    });
    let epoch = ctx.sink.epoch();
    let mut awaiting_subacks = usize::MAX;
    let mut in_flight: FuturesOrdered<Settling<rumqttc::v5::mqttbytes::v5::Publish>> =
        FuturesOrdered::new();
    loop {
        let ev = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                while let Some((p, result)) = in_flight.next().await {
                    if result.is_err() {
                        break;
                    }
                    client.ack(&p).await.ok();
                }
                client.disconnect().await.ok();
                return None;
            }
            Some((p, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = result {
                    tracing::error!(source = %ctx.source_id, error = %e, "could not spool; leaving the message unacknowledged");
                    return Some(format!("spool: {e}"));
                }
                client.ack(&p).await.ok();
                continue;
            }
            ev = events.recv(), if in_flight.len() < MAX_IN_FLIGHT => ev,
        };
        match ev {
            None => return Some("event loop ended".to_owned()),
            Some(Err(e)) => return Some(e.to_string()),
            Some(Ok(Event5::Incoming(Packet5::ConnAck(_)))) => {
                *backoff = Duration::from_millis(200);
                tracing::info!(source = %ctx.source_id, broker = %config.broker.host, "concentrator broker connected (MQTT 5)");
                for TopicMapping { filter, .. } in &config.topics {
                    client
                        .subscribe(filter.clone(), QoS5::AtLeastOnce)
                        .await
                        .ok();
                }
                awaiting_subacks = config.topics.len();
                if awaiting_subacks == 0 {
                    ctx.readiness.set_ready();
                }
            }
            Some(Ok(Event5::Incoming(Packet5::SubAck(_)))) => {
                awaiting_subacks = awaiting_subacks.saturating_sub(1);
                if awaiting_subacks == 0 {
                    ctx.readiness.set_ready();
                }
            }
            Some(Ok(Event5::Incoming(Packet5::Publish(p)))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                match on_message(ctx, &epoch, &config.topics, &topic, &p.payload).await {
                    Handled::Spooling(durable) => in_flight.push_back(settle(p, durable)),
                    Handled::Retry(why) => return Some(why),
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(topic_matches(
            "concentrator/+/readings",
            "concentrator/c1/readings"
        ));
        assert!(!topic_matches(
            "concentrator/+/readings",
            "concentrator/c1/frame"
        ));
        assert!(topic_matches("concentrator/#", "concentrator/c1/frame"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }

    #[test]
    fn json_batch_becomes_readings() {
        let (sink, _rx) = crate::IngestSink::new(1);
        let (_tx, commands) = tokio::sync::mpsc::channel(1);
        let ctx = SourceContext::new(
            model::GatewayId::new("gw-1").unwrap(),
            "conc",
            SourceKind::Mqtt,
            sink,
            commands,
            tokio_util::sync::CancellationToken::new(),
        );
        let body = br#"{"v":1,"concentrator":"c1","sent_at":"2026-11-24T10:00:00Z","readings":[{"meter":"cjt188:78330011223344","ts":"2026-11-24T09:00:00Z","volume_m3":"123.456"}]}"#;
        let topic = "concentrator/c1/readings";
        let rs = readings_of(
            &ctx,
            PayloadFormat::Json,
            topic,
            body,
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].provenance.channel.as_deref(), Some(topic));
        assert_eq!(rs[0].value, Decimal::new(123_456, 3));
        assert_eq!(rs[0].meter.as_str(), "cjt188:78330011223344");
        let e = readings_of(
            &ctx,
            PayloadFormat::Json,
            topic,
            b"{",
            OffsetDateTime::now_utc(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "json");
        let e = readings_of(
            &ctx,
            PayloadFormat::Cjt188,
            topic,
            &[0x68, 1, 2],
            OffsetDateTime::now_utc(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "truncated");
    }
}
