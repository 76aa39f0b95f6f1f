//! `ingest_rejects`: payloads and reads refused before storage, kept for review.

use sqlx::PgConnection;
use time::OffsetDateTime;

use super::error::{StoreError, stage};
use crate::vee::Conflict;

/// A payload or read refused before storage, recorded in `ingest_rejects`.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectRecord {
    /// `unknown_version` | `malformed` | `duplicate_conflict` | `wrong_partition` | an
    /// [`crate::ingest::Unstorable::code`] | `database_refused` (isolated by splitting).
    pub kind: &'static str,
    /// MQTT topic, when it came from the broker.
    pub topic: Option<String>,
    /// Meter, when known.
    pub meter: Option<String>,
    /// Reading time, when known.
    pub ts: Option<OffsetDateTime>,
    /// Anything useful for review (the payload, values).
    pub detail: serde_json::Value,
}

impl RejectRecord {
    /// Builds the record of a VEE duplicate conflict.
    pub fn conflict(c: &Conflict) -> Self {
        Self {
            kind: "duplicate_conflict",
            topic: None,
            meter: Some(c.reading.meter.as_str().to_owned()),
            ts: Some(c.reading.ts),
            detail: serde_json::json!({
                "quantity": c.reading.quantity.as_str(),
                "value": c.reading.value.to_string(),
                "stored_value": c.stored_value.to_string(),
                "gateway": c.reading.provenance.gateway.as_str(),
            }),
        }
    }
}

/// Replaces NUL characters in every string of a JSON value (jsonb cannot hold `\u0000`), so a
/// reject record about a NUL byte can itself be stored.
pub fn strip_nul(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{2400}"),
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nul),
        serde_json::Value::Object(map) => map.values_mut().for_each(strip_nul),
        _ => {}
    }
}

/// Inserts reject records (one statement each; rejects are rare).
pub(super) async fn write_rejects(
    conn: &mut PgConnection,
    rejects: &[RejectRecord],
) -> Result<(), StoreError> {
    for r in rejects {
        // A reject about a NUL byte carries that byte in its detail; jsonb cannot hold it.
        let mut detail = r.detail.clone();
        strip_nul(&mut detail);
        sqlx::query(
            "INSERT INTO ingest_rejects (kind, topic, meter_id, ts, detail) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(r.kind)
        .bind(&r.topic)
        .bind(&r.meter)
        .bind(r.ts)
        .bind(&detail)
        .execute(&mut *conn)
        .await
        .map_err(stage("recording rejects"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_nul_reaches_nested_strings() {
        let mut v = serde_json::json!({"a": ["x\0y"], "b": "\0"});
        strip_nul(&mut v);
        assert!(!v.to_string().contains("\\u0000"));
    }
}
