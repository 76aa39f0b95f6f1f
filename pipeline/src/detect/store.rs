//! Alarms and detector state in PostgreSQL (migration `0031_detectors.sql`).
//!
//! [`write`] applies a batch's [`AlarmEvent`]s to `alarms` and upserts the changed detector
//! states, inside the caller's ingest transaction: the alarms commit with the readings that
//! raised them or not at all. [`load`] rebuilds the detectors at start. [`acknowledge`] and
//! [`close`] are the people's steps of the lifecycle.

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use super::{AlarmEvent, DetectConfig, Detectors, MeterDetect, MeterProfile, Role, Transition};
use crate::store::StoreError;

/// What one ingest transaction writes for the detectors.
#[derive(Debug, Clone, Default)]
pub struct AlarmWrite {
    /// Alarm events in the order they happened.
    pub events: Vec<AlarmEvent>,
    /// Changed detector states: (meter, [`MeterDetect::to_bytes`]).
    pub states: Vec<(String, Vec<u8>)>,
}

impl AlarmWrite {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.states.is_empty()
    }
}

fn stage(stage: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Stage { stage, source }
}

fn ts(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

const SEVERITY_RANK: &str = "array_position(ARRAY['info','warning','critical']";

/// Applies alarm events and detector states inside `tx`.
///
/// # Errors
/// [`StoreError::Stage`] when a statement fails (the caller's transaction then rolls back).
pub async fn write(tx: &mut Transaction<'_, Postgres>, w: &AlarmWrite) -> Result<(), StoreError> {
    for e in coalesce(&w.events) {
        let detail = serde_json::Value::Object(e.detail.clone());
        match e.transition {
            Transition::Raised => {
                sqlx::query(&format!(
                    "INSERT INTO alarms (meter_id, kind, severity, raised_at, first_seen, last_seen, \
                        occurrences, state, detail) \
                     VALUES ($1, $2, $3, $4, $4, $5, 1, 'open', $6) \
                     ON CONFLICT (meter_id, kind) WHERE cleared_at IS NULL DO UPDATE SET \
                        occurrences = alarms.occurrences + 1, \
                        last_seen = GREATEST(alarms.last_seen, EXCLUDED.last_seen), \
                        severity = CASE WHEN {SEVERITY_RANK}, EXCLUDED.severity) > \
                            {SEVERITY_RANK}, alarms.severity) THEN EXCLUDED.severity \
                            ELSE alarms.severity END, \
                        updated_at = now()"
                ))
                .bind(&e.meter)
                .bind(e.kind.as_str())
                .bind(e.severity.as_str())
                .bind(ts(e.first_seen))
                .bind(ts(e.at))
                .bind(detail)
                .execute(&mut **tx)
                .await
                .map_err(stage("raising an alarm"))?;
                if e.kind == model::AlarmKind::Tamper {
                    sqlx::query(
                        "UPDATE meters SET tampered_at = COALESCE(tampered_at, $2) WHERE meter_id = $1",
                    )
                    .bind(&e.meter)
                    .bind(ts(e.first_seen))
                    .execute(&mut **tx)
                    .await
                    .map_err(stage("flagging a tampered meter"))?;
                }
            }
            Transition::Seen => {
                sqlx::query(&format!(
                    "UPDATE alarms SET last_seen = GREATEST(last_seen, $3), \
                        severity = CASE WHEN {SEVERITY_RANK}, $4) > {SEVERITY_RANK}, severity) \
                            THEN $4 ELSE severity END, updated_at = now() \
                     WHERE meter_id = $1 AND kind = $2 AND cleared_at IS NULL"
                ))
                .bind(&e.meter)
                .bind(e.kind.as_str())
                .bind(ts(e.at))
                .bind(e.severity.as_str())
                .execute(&mut **tx)
                .await
                .map_err(stage("refreshing an alarm"))?;
            }
            Transition::Cleared => {
                sqlx::query(
                    "UPDATE alarms SET cleared_at = $3, state = 'closed', closed_by = 'auto', \
                        updated_at = now() \
                     WHERE meter_id = $1 AND kind = $2 AND cleared_at IS NULL AND kind <> 'tamper'",
                )
                .bind(&e.meter)
                .bind(e.kind.as_str())
                .bind(ts(e.at))
                .execute(&mut **tx)
                .await
                .map_err(stage("closing an alarm"))?;
            }
        }
    }
    if !w.states.is_empty() {
        let (ids, states): (Vec<&str>, Vec<&[u8]>) = w
            .states
            .iter()
            .map(|(m, s)| (m.as_str(), s.as_slice()))
            .unzip();
        sqlx::query(
            "INSERT INTO detector_state (meter_id, state) \
             SELECT * FROM unnest($1::text[], $2::bytea[]) \
             ON CONFLICT (meter_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
        )
        .bind(ids)
        .bind(states)
        .execute(&mut **tx)
        .await
        .map_err(stage("writing detector state"))?;
    }
    Ok(())
}

/// Keeps every raise and clear, and of consecutive `Seen`s of one alarm only the last (fewer
/// updates; `last_seen` is monotonic anyway).
fn coalesce(events: &[AlarmEvent]) -> Vec<&AlarmEvent> {
    let mut out: Vec<&AlarmEvent> = Vec::with_capacity(events.len());
    let mut last_seen: std::collections::HashMap<(&str, model::AlarmKind), usize> =
        std::collections::HashMap::new();
    for e in events {
        let key = (e.meter.as_str(), e.kind);
        if e.transition == Transition::Seen {
            if let Some(&i) = last_seen.get(&key)
                && let Some(slot) = out.get_mut(i)
            {
                if slot.at <= e.at && slot.severity <= e.severity {
                    *slot = e;
                }
                continue;
            }
            last_seen.insert(key, out.len());
        } else {
            last_seen.remove(&key);
        }
        out.push(e);
    }
    out
}

/// Loads meter profiles, detector states and open alarms of the meters `owns` accepts.
///
/// # Errors
/// [`StoreError::Stage`] when a query fails.
pub async fn load(
    pool: &PgPool,
    config: DetectConfig,
    owns: impl Fn(&str) -> bool,
) -> Result<Detectors, StoreError> {
    let default_offset = config.default_utc_offset_s;
    let mut det = Detectors::new(config);
    let rows: Vec<(
        String,
        String,
        rust_decimal::Decimal,
        Option<String>,
        String,
        String,
    )> = sqlx::query_as(
        "SELECT meter_id, meter_class, nominal_flow_q3, dma, role, time_zone FROM meters",
    )
    .fetch_all(pool)
    .await
    .map_err(stage("loading meter profiles"))?;
    for (id, class, q3, dma, role, tz) in rows {
        if !owns(&id) {
            continue;
        }
        let profile = MeterProfile {
            class,
            q3_m3h: rust_decimal::prelude::ToPrimitive::to_f64(&q3).unwrap_or(2.5),
            dma,
            role: Role::parse(&role).unwrap_or_default(),
            utc_offset_s: super::config::parse_utc_offset(&tz).unwrap_or(default_offset),
        };
        det.set_profile(&id, &profile);
    }
    let states: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT meter_id, state FROM detector_state")
            .fetch_all(pool)
            .await
            .map_err(stage("loading detector state"))?;
    for (id, bytes) in states {
        if !owns(&id) {
            continue;
        }
        if let Some(st) = MeterDetect::from_bytes(&bytes) {
            det.restore(&id, st);
        }
    }
    // A kind active in the state but without an open alarm was closed by a person: it may be
    // raised again.
    let open: Vec<(String, String)> =
        sqlx::query_as("SELECT meter_id, kind FROM alarms WHERE cleared_at IS NULL")
            .fetch_all(pool)
            .await
            .map_err(stage("loading open alarms"))?;
    let open: std::collections::HashSet<(String, String)> = open.into_iter().collect();
    let mut closed = Vec::new();
    for id in det.states.keys() {
        if let Some(st) = det.states.get(id) {
            for k in st.active_kinds() {
                if !open.contains(&(id.to_string(), k.as_str().to_owned())) {
                    closed.push((id.to_string(), k));
                }
            }
        }
    }
    for (id, k) in closed {
        det.forget_active(&id, k);
    }
    Ok(det)
}

/// Acknowledges an open alarm (`who` has seen it). Returns false when it is not open.
///
/// # Errors
/// [`StoreError::Stage`] when the update fails.
pub async fn acknowledge(
    conn: &mut PgConnection,
    alarm_id: i64,
    who: &str,
) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE alarms SET state = 'acknowledged', acknowledged_by = $2, acknowledged_at = now(), \
            updated_at = now() WHERE alarm_id = $1 AND state = 'open'",
    )
    .bind(alarm_id)
    .bind(who)
    .execute(conn)
    .await
    .map_err(stage("acknowledging an alarm"))?;
    Ok(n.rows_affected() == 1)
}

/// Closes an alarm by hand (the only way a tamper alarm closes; it also makes the meter
/// billable again). Returns false when it is already closed.
///
/// # Errors
/// [`StoreError::Stage`] when the update fails.
pub async fn close(conn: &mut PgConnection, alarm_id: i64, who: &str) -> Result<bool, StoreError> {
    let row: Option<(String, String)> = sqlx::query_as(
        "UPDATE alarms SET state = 'closed', closed_by = $2, cleared_at = now(), updated_at = now() \
         WHERE alarm_id = $1 AND cleared_at IS NULL RETURNING meter_id, kind",
    )
    .bind(alarm_id)
    .bind(who)
    .fetch_optional(&mut *conn)
    .await
    .map_err(stage("closing an alarm"))?;
    let Some((meter, kind)) = row else {
        return Ok(false);
    };
    if kind == "tamper" {
        sqlx::query("UPDATE meters SET tampered_at = NULL WHERE meter_id = $1")
            .bind(&meter)
            .execute(conn)
            .await
            .map_err(stage("clearing the tamper flag"))?;
    }
    Ok(true)
}
