//! MQTT subscriber source for concentrators (MQTT 3.1.1): JSON reading lists or raw binary
//! frames, by topic → format mapping from the configuration.
//!
//! Messages are received with manual acknowledgement: the PUBACK goes to the site broker only
//! after the readings are durable in the spool, so the broker re-delivers anything the gateway
//! had not stored. A message that cannot be decoded is counted by kind, logged with its topic
//! and then acknowledged (re-delivering it would fail the same way).

use std::time::Duration;

use decoders::{DecodedFrame, cjt188, mbus};
use edge_config::{MqttSourceConfig, PayloadFormat, TopicMapping};
use model::{ClockSource, MeterId, Provenance, Quality, Quantity, Reading, SourceKind, Unit};
use rumqttc::{Event, Packet, QoS};
use rust_decimal::Decimal;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::coap::error_kind;
use crate::mqtt::{self, MqttEndpoint};
use crate::normalise::{self, FrameContext};
use crate::source::SourceContext;

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

/// Why a message could not be turned into readings: (error kind, message).
type Failure = (String, String);

fn decode_frame(format: PayloadFormat, raw: &[u8]) -> Result<DecodedFrame, Failure> {
    let cjt = |raw: &[u8]| cjt188::decode(raw).map_err(|e| (error_kind(&e), e.to_string()));
    let mb = |raw: &[u8]| {
        mbus::decode(raw).map_err(|e| (format!("mbus_{}", error_kind(&e)), e.to_string()))
    };
    match format {
        PayloadFormat::Cjt188 => cjt(raw),
        PayloadFormat::Mbus => mb(raw),
        // CJ/T 188: optional FE preamble, 0x68, then the meter type (never 0x68); an M-Bus long
        // frame repeats 0x68 after its two length bytes.
        _ => {
            let body = raw
                .get(raw.iter().take_while(|b| **b == 0xFE).count()..)
                .unwrap_or(&[]);
            if body.first() == Some(&0x68) && body.get(3) == Some(&0x68) {
                mb(raw)
            } else {
                cjt(raw)
            }
        }
    }
}

/// Turns one message into readings.
pub fn readings_of(
    ctx: &SourceContext,
    format: PayloadFormat,
    payload: &[u8],
    received_at: OffsetDateTime,
) -> Result<Vec<Reading>, (String, String)> {
    let fctx = FrameContext {
        gateway: &ctx.gateway,
        source: SourceKind::Mqtt,
        source_id: &ctx.source_id,
        received_at,
        raw: payload,
    };
    if format == PayloadFormat::Json {
        let batch: ConcentratorBatch =
            serde_json::from_slice(payload).map_err(|e| ("json".to_owned(), e.to_string()))?;
        if batch.v != 1 {
            return Err(("version".into(), format!("unsupported version {}", batch.v)));
        }
        let provenance = Provenance {
            gateway: ctx.gateway.clone(),
            source: SourceKind::Mqtt,
            source_id: ctx.source_id.clone(),
            frame_hash: normalise::frame_hash(payload),
            received_at,
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
    let decoded = decode_frame(format, payload)?;
    let meter =
        normalise::meter_id(&decoded).map_err(|e| ("meter_id".to_owned(), e.to_string()))?;
    Ok(normalise::to_readings(&decoded, &meter, None, &fctx))
}

/// Runs the source until `ctx.shutdown`, reconnecting with backoff.
pub async fn run(config: MqttSourceConfig, ctx: SourceContext) {
    let endpoint = MqttEndpoint {
        host: config.broker.host.clone(),
        port: config.broker.port,
        credentials: config
            .username
            .clone()
            .map(|u| (u, config.password.clone().unwrap_or_default())),
        keep_alive: Duration::from_secs(15),
    };
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", ctx.gateway, ctx.source_id));
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut options = endpoint.options(&client_id, None);
        options.set_manual_acks(true);
        let (client, mut events) = mqtt::connect(options, 64);
        let failure = loop {
            let ev = tokio::select! {
                _ = ctx.shutdown.cancelled() => {
                    client.disconnect().await.ok();
                    return;
                }
                ev = events.recv() => ev,
            };
            match ev {
                None => break "event loop ended".to_owned(),
                Some(Err(e)) => break e.to_string(),
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!(source = %ctx.source_id, broker = %endpoint.host, "concentrator broker connected");
                    for TopicMapping { filter, .. } in &config.topics {
                        client.subscribe(filter, QoS::AtLeastOnce).await.ok();
                    }
                }
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    ctx.sink.frame_received(&ctx.source_id);
                    let Some(mapping) = config
                        .topics
                        .iter()
                        .find(|m| topic_matches(&m.filter, &p.topic))
                    else {
                        ctx.sink.decode_failed(&ctx.source_id, "unmapped_topic");
                        tracing::warn!(source = %ctx.source_id, topic = %p.topic, "message on a topic without a format mapping");
                        client.ack(&p).await.ok();
                        continue;
                    };
                    match readings_of(&ctx, mapping.format, &p.payload, OffsetDateTime::now_utc()) {
                        Ok(readings) => {
                            if let Err(e) = ctx.sink.submit(readings).await {
                                // Not acknowledged: the broker re-delivers after reconnect.
                                tracing::error!(source = %ctx.source_id, error = %e, "could not spool; leaving the message unacknowledged");
                                break format!("spool: {e}");
                            }
                        }
                        Err((kind, msg)) => {
                            ctx.sink.decode_failed(&ctx.source_id, &kind);
                            tracing::warn!(source = %ctx.source_id, topic = %p.topic, kind = %kind, error = %msg, "undecodable concentrator message");
                        }
                    }
                    client.ack(&p).await.ok();
                }
                Some(Ok(_)) => {}
            }
        };
        tracing::warn!(source = %ctx.source_id, error = %failure, "concentrator broker connection lost");
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
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
        let ctx = SourceContext {
            gateway: model::GatewayId::new("gw-1").unwrap(),
            source_id: "conc".into(),
            sink,
            commands,
            shutdown: tokio_util::sync::CancellationToken::new(),
        };
        let body = br#"{"v":1,"concentrator":"c1","sent_at":"2026-11-24T10:00:00Z","readings":[{"meter":"cjt188:78330011223344","ts":"2026-11-24T09:00:00Z","volume_m3":"123.456"}]}"#;
        let rs = readings_of(&ctx, PayloadFormat::Json, body, OffsetDateTime::now_utc()).unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!(rs[0].value, Decimal::new(123_456, 3));
        assert_eq!(rs[0].meter.as_str(), "cjt188:78330011223344");
        let e =
            readings_of(&ctx, PayloadFormat::Json, b"{", OffsetDateTime::now_utc()).unwrap_err();
        assert_eq!(e.0, "json");
        let e = readings_of(
            &ctx,
            PayloadFormat::Cjt188,
            &[0x68, 1, 2],
            OffsetDateTime::now_utc(),
        )
        .unwrap_err();
        assert!(!e.0.is_empty());
    }
}
