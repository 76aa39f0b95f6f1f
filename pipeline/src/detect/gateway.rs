//! Gateways' own alarms into the `alarms` table: `{root}/{gateway}/alarms` (`model::Alarm`, e.g.
//! `spool_overflow`) and the retained `{root}/{gateway}/status` (`online` / `offline`, the last
//! will) as `gateway_offline` on device `gateway:<id>`. Run by worker 0 only (`pipeline run`), on
//! its own MQTT connection.

use std::time::Duration;

use model::{AlarmKind, AlarmSeverity};
use rumqttc::{Event, Packet, QoS};
use sqlx::PgPool;
use tokio::sync::watch;

use super::store::{self, AlarmWrite};
use super::{AlarmEvent, Transition};

/// What one gateway message means for the alarms table, if anything.
pub fn interpret(topic: &str, payload: &[u8], now: i64) -> Option<AlarmEvent> {
    let mut parts = topic.rsplitn(3, '/');
    let leaf = parts.next()?;
    let gateway = parts.next()?;
    match leaf {
        "alarms" => {
            let alarm: model::Alarm = serde_json::from_slice(payload).ok()?;
            Some(AlarmEvent {
                meter: alarm.meter.as_str().to_owned(),
                kind: alarm.kind,
                transition: if alarm.cleared_at.is_some() {
                    Transition::Cleared
                } else {
                    Transition::Raised
                },
                severity: alarm.severity,
                first_seen: alarm.raised_at.unix_timestamp(),
                at: alarm.cleared_at.unwrap_or(alarm.raised_at).unix_timestamp(),
                detail: alarm.detail,
            })
        }
        "status" => {
            #[derive(serde::Deserialize)]
            struct Status {
                state: String,
                #[serde(default, with = "time::serde::rfc3339::option")]
                at: Option<time::OffsetDateTime>,
            }
            let s: Status = serde_json::from_slice(payload).ok()?;
            let at = s.at.map_or(now, |t| t.unix_timestamp());
            let transition = match s.state.as_str() {
                "offline" => Transition::Raised,
                "online" => Transition::Cleared,
                _ => return None,
            };
            model::GatewayId::new(gateway).ok()?;
            Some(AlarmEvent {
                meter: format!("gateway:{gateway}"),
                kind: AlarmKind::GatewayOffline,
                transition,
                severity: AlarmSeverity::Warning,
                first_seen: at,
                at,
                detail: serde_json::Map::new(),
            })
        }
        _ => None,
    }
}

/// Consumes gateway alarms and status until `shutdown`; database errors are logged and the
/// message skipped (the status is retained and re-read at the next connect).
pub async fn run(
    pool: PgPool,
    broker: model::BrokerUrl,
    client_id: String,
    root: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let connected = crate::config::mqtt_client(&broker, client_id, 64, |o| {
        o.set_keep_alive(Duration::from_secs(30));
    });
    let (client, mut eventloop) = match connected {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "gateway alarm listener not started");
            return;
        }
    };
    let topics = [format!("{root}/+/alarms"), format!("{root}/+/status")];
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => return,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for t in &topics {
                    if let Err(e) = client.try_subscribe(t.as_str(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, "cannot subscribe to gateway alarms");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let Some(event) = interpret(&p.topic, &p.payload, now) else {
                    continue;
                };
                let write = AlarmWrite {
                    events: vec![event],
                    states: Vec::new(),
                };
                let result = async {
                    let mut tx =
                        pool.begin()
                            .await
                            .map_err(|source| crate::db::StoreError::Stage {
                                stage: "beginning",
                                source,
                            })?;
                    store::write(&mut tx, &write).await?;
                    tx.commit()
                        .await
                        .map_err(|source| crate::db::StoreError::Stage {
                            stage: "committing",
                            source,
                        })
                }
                .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, topic = %p.topic, "cannot store a gateway alarm");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "gateway alarm connection failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interprets_spool_overflow_and_status() {
        let alarm = serde_json::json!({"meter": "gateway:gw-1", "kind": "spool_overflow",
            "severity": "critical", "raised_at": "2026-03-02T10:00:00Z", "detail": {"evicted": 5}});
        let e = interpret("wm/v1/gw-1/alarms", alarm.to_string().as_bytes(), 0).unwrap();
        assert_eq!(
            (e.kind, e.transition),
            (AlarmKind::SpoolOverflow, Transition::Raised)
        );
        assert_eq!(e.meter, "gateway:gw-1");
        let off = br#"{"v":1,"gateway":"gw-1","state":"offline","at":"2026-03-02T11:00:00Z"}"#;
        let e = interpret("wm/v1/gw-1/status", off, 0).unwrap();
        assert_eq!(
            (e.kind, e.transition),
            (AlarmKind::GatewayOffline, Transition::Raised)
        );
        assert_eq!(e.first_seen, 1_772_449_200);
        let on = br#"{"state":"online"}"#;
        let e = interpret("wm/v1/gw-1/status", on, 7).unwrap();
        assert_eq!((e.transition, e.at), (Transition::Cleared, 7));
        assert!(interpret("wm/v1/gw-1/status", b"garbage", 0).is_none());
        assert!(interpret("wm/v1/gw-1/cmd-ack", b"{}", 0).is_none());
    }
}
