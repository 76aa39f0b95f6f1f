//! Alarms and detector state in PostgreSQL (migration `0031_detectors.sql`).
//!
//! [`write`] applies a batch's [`AlarmEvent`]s to `alarms` and upserts the changed detector
//! states, inside the caller's ingest transaction: the alarms commit with the readings that
//! raised them or not at all. [`load`] rebuilds the detectors at start. [`acknowledge`] and
//! [`close`] are the people's steps of the lifecycle.

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use super::{
    AlarmEvent, DetectConfig, Detectors, DetectorsOn, MeterDetect, MeterIndex, MeterProfile, Role,
    Transition,
};
use crate::db::StoreError;

/// What one ingest transaction writes for the detectors.
#[derive(Debug, Clone, Default)]
pub struct AlarmWrite {
    /// Alarm events in the order they happened.
    pub events: Vec<AlarmEvent>,
    /// Changed detector states. The worker moves them into its ingest journal (written
    /// behind, see [`crate::journal`]); anyone else has [`write`] upsert them.
    pub states: Vec<(Box<str>, MeterDetect)>,
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
/// Set-based: an alarm storm (a gateway outage makes the sweep raise, and its return clear,
/// `communication_loss` for every meter behind it) is a few statements, not one per alarm. The
/// events are cut into rounds holding at most one event per (meter, kind) (the first event of
/// every alarm, then the second, ...), so within a round the statements touch distinct alarms
/// and their order does not matter, while the rounds keep each alarm's own order.
///
/// # Errors
/// [`StoreError::Stage`] when a statement fails (the caller's transaction then rolls back).
pub async fn write(tx: &mut Transaction<'_, Postgres>, w: &AlarmWrite) -> Result<(), StoreError> {
    let mut rounds: Vec<Vec<&AlarmEvent>> = Vec::new();
    let mut next: std::collections::HashMap<(&str, model::AlarmKind), usize> =
        std::collections::HashMap::new();
    for e in coalesce(&w.events) {
        let k = next.entry((e.meter.as_str(), e.kind)).or_insert(0);
        if rounds.len() <= *k {
            rounds.push(Vec::new());
        }
        if let Some(round) = rounds.get_mut(*k) {
            round.push(e);
        }
        *k += 1;
    }
    for mut round in rounds {
        // Key order: concurrent writers (two workers, the DMA judge) lock rows alike.
        round.sort_by(|a, b| (&a.meter, a.kind.as_str()).cmp(&(&b.meter, b.kind.as_str())));
        write_round(tx, &round).await?;
    }
    if !w.states.is_empty() {
        write_states(tx, w.states.iter().map(|(m, s)| (&**m, s))).await?;
    }
    Ok(())
}

/// Columns of one kind of transition, for UNNEST.
#[derive(Default)]
struct Columns<'a> {
    meter: Vec<&'a str>,
    kind: Vec<&'a str>,
    severity: Vec<&'a str>,
    first: Vec<OffsetDateTime>,
    at: Vec<OffsetDateTime>,
    detail: Vec<String>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, e: &'a AlarmEvent, with_detail: bool) {
        self.meter.push(&e.meter);
        self.kind.push(e.kind.as_str());
        self.severity.push(e.severity.as_str());
        self.first.push(ts(e.first_seen));
        self.at.push(ts(e.at));
        if with_detail {
            self.detail
                .push(serde_json::Value::Object(e.detail.clone()).to_string());
        }
    }
}

/// Writes events of distinct alarms (see [`write`]).
async fn write_round(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&AlarmEvent],
) -> Result<(), StoreError> {
    let mut raised = Columns::default();
    let mut seen = Columns::default();
    let mut cleared = Columns::default();
    let mut tampered: Vec<(&str, OffsetDateTime)> = Vec::new();
    for e in events {
        match e.transition {
            Transition::Raised => {
                raised.push(e, true);
                if e.kind == model::AlarmKind::Tamper {
                    tampered.push((&e.meter, ts(e.first_seen)));
                }
            }
            Transition::Seen => seen.push(e, false),
            Transition::Cleared => cleared.push(e, false),
        }
    }
    if !raised.meter.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO alarms (meter_id, kind, severity, raised_at, first_seen, last_seen, \
                occurrences, state, detail) \
             SELECT u.m, u.k, u.s, u.f, u.f, u.l, 1, 'open', u.d::jsonb \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], \
                         $5::timestamptz[], $6::text[]) AS u(m, k, s, f, l, d) \
             ON CONFLICT (meter_id, kind) WHERE cleared_at IS NULL DO UPDATE SET \
                occurrences = alarms.occurrences + 1, \
                last_seen = GREATEST(alarms.last_seen, EXCLUDED.last_seen), \
                severity = CASE WHEN {SEVERITY_RANK}, EXCLUDED.severity) > \
                    {SEVERITY_RANK}, alarms.severity) THEN EXCLUDED.severity \
                    ELSE alarms.severity END, \
                updated_at = now()"
        ))
        .bind(&raised.meter)
        .bind(&raised.kind)
        .bind(&raised.severity)
        .bind(&raised.first)
        .bind(&raised.at)
        .bind(&raised.detail)
        .execute(&mut **tx)
        .await
        .map_err(stage("raising alarms"))?;
    }
    if !tampered.is_empty() {
        let (meters, at): (Vec<&str>, Vec<OffsetDateTime>) = tampered.into_iter().unzip();
        sqlx::query(
            "UPDATE meters SET tampered_at = COALESCE(meters.tampered_at, u.f) \
             FROM unnest($1::text[], $2::timestamptz[]) AS u(m, f) WHERE meters.meter_id = u.m",
        )
        .bind(&meters)
        .bind(&at)
        .execute(&mut **tx)
        .await
        .map_err(stage("flagging tampered meters"))?;
    }
    if !seen.meter.is_empty() {
        sqlx::query(&format!(
            "UPDATE alarms a SET last_seen = GREATEST(a.last_seen, u.l), \
                severity = CASE WHEN {SEVERITY_RANK}, u.s) > {SEVERITY_RANK}, a.severity) \
                    THEN u.s ELSE a.severity END, updated_at = now() \
             FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[]) AS u(m, k, l, s) \
             WHERE a.meter_id = u.m AND a.kind = u.k AND a.cleared_at IS NULL"
        ))
        .bind(&seen.meter)
        .bind(&seen.kind)
        .bind(&seen.at)
        .bind(&seen.severity)
        .execute(&mut **tx)
        .await
        .map_err(stage("refreshing alarms"))?;
    }
    if !cleared.meter.is_empty() {
        sqlx::query(
            "UPDATE alarms a SET cleared_at = u.c, state = 'closed', closed_by = 'auto', \
                updated_at = now() \
             FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(m, k, c) \
             WHERE a.meter_id = u.m AND a.kind = u.k AND a.cleared_at IS NULL \
               AND a.kind <> 'tamper'",
        )
        .bind(&cleared.meter)
        .bind(&cleared.kind)
        .bind(&cleared.at)
        .execute(&mut **tx)
        .await
        .map_err(stage("closing alarms"))?;
    }
    Ok(())
}

/// Upserts detector states into `detector_state` (one statement, in meter order so that
/// concurrent writers lock rows in the same order).
///
/// # Errors
/// [`StoreError::Stage`] when the statement fails.
pub async fn write_states<'a>(
    conn: &mut PgConnection,
    states: impl Iterator<Item = (&'a str, &'a MeterDetect)>,
) -> Result<usize, StoreError> {
    let mut rows: Vec<(&str, Vec<u8>)> = states.map(|(m, s)| (m, s.to_bytes())).collect();
    if rows.is_empty() {
        return Ok(0);
    }
    rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let n = rows.len();
    let (ids, states): (Vec<&str>, Vec<Vec<u8>>) = rows.into_iter().unzip();
    sqlx::query(
        "INSERT INTO detector_state (meter_id, state) \
         SELECT * FROM unnest($1::text[], $2::bytea[]) \
         ON CONFLICT (meter_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
    )
    .bind(ids)
    .bind(states)
    .execute(conn)
    .await
    .map_err(stage("writing detector state"))?;
    Ok(n)
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
    load_with(pool, config, owns, std::iter::empty()).await
}

/// The status-bit map a registry model's bit meanings give (`meter_model_status_bits`):
/// `magnetic_tamper` and `cover_open` are tamper, `battery_low`, `reverse_flow`, `empty_pipe`
/// their alarms, and `valve_fault` bits must all be set. `valve_closed`, `leak` and `other`
/// raise nothing (the volume detectors judge leaks).
pub fn status_bits_of_model(bits: &[(i16, String)]) -> super::config::StatusBits {
    let mut out = super::config::StatusBits {
        low_battery: 0,
        tamper: 0,
        reverse_flow: 0,
        empty_pipe: 0,
        valve_fault: 0,
    };
    for (bit, meaning) in bits {
        let Some(mask) = u32::try_from(*bit).ok().and_then(|b| 1u32.checked_shl(b)) else {
            continue;
        };
        match meaning.as_str() {
            "magnetic_tamper" | "cover_open" => out.tamper |= mask,
            "battery_low" => out.low_battery |= mask,
            "reverse_flow" => out.reverse_flow |= mask,
            "empty_pipe" => out.empty_pipe |= mask,
            "valve_fault" => out.valve_fault |= mask,
            _ => {}
        }
    }
    out
}

/// Loads the registry's status-bit maps (every model with at least one bit) into `det`.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn load_models(pool: &PgPool, det: &mut DetectorsOn<'_>) -> Result<usize, StoreError> {
    let rows: Vec<(String, i16, String)> = sqlx::query_as(
        "SELECT model_code, bit, meaning FROM meter_model_status_bits ORDER BY model_code, bit",
    )
    .fetch_all(pool)
    .await
    .map_err(stage("loading status-bit maps"))?;
    let mut by_model: std::collections::BTreeMap<String, Vec<(i16, String)>> =
        std::collections::BTreeMap::new();
    for (model, bit, meaning) in rows {
        by_model.entry(model).or_default().push((bit, meaning));
    }
    let n = by_model.len();
    for (model, bits) in by_model {
        if !det.set_model_bits(&model, status_bits_of_model(&bits)) {
            tracing::warn!(
                model,
                "too many meter models; this one uses the default status bits"
            );
        }
    }
    Ok(n)
}

/// A meter's profile as `meters` holds it.
type ProfileRow = (
    String,
    String,
    rust_decimal::Decimal,
    Option<String>,
    String,
    String,
    Option<String>,
);

fn profile_of(row: ProfileRow, default_offset: i32) -> (String, MeterProfile) {
    let (id, class, q3, dma, role, tz, model) = row;
    let profile = MeterProfile {
        class,
        q3_m3h: rust_decimal::prelude::ToPrimitive::to_f64(&q3).unwrap_or(2.5),
        dma,
        role: Role::parse(&role).unwrap_or_default(),
        utc_offset_s: super::config::parse_utc_offset(&tz).unwrap_or(default_offset),
        model,
    };
    (id, profile)
}

const PROFILE_SQL: &str =
    "SELECT meter_id, meter_class, nominal_flow_q3, dma, role, time_zone, model_code FROM meters";

/// Reloads the profiles of changed meters (all of them for `None`) and the status-bit maps:
/// what a registry change (`NOTIFY wm_registry`) means for the detectors. The learnt state
/// is kept; class, Q3, role, zone and model take effect from the next reading.
///
/// # Errors
/// [`StoreError::Stage`] when a query fails (the detectors are then unchanged).
pub async fn refresh_profiles<'d>(
    pool: &PgPool,
    det: impl Into<DetectorsOn<'d>>,
    meters: Option<&[String]>,
    owns: impl Fn(&str) -> bool,
) -> Result<usize, StoreError> {
    let det = &mut det.into();
    let rows: Vec<ProfileRow> = match meters {
        None => sqlx::query_as(PROFILE_SQL).fetch_all(pool).await,
        Some(ids) => {
            sqlx::query_as(&format!("{PROFILE_SQL} WHERE meter_id = ANY($1)"))
                .bind(ids)
                .fetch_all(pool)
                .await
        }
    }
    .map_err(stage("reloading meter profiles"))?;
    load_models(pool, det).await?;
    let default_offset = det.config.default_utc_offset_s;
    let mut n = 0;
    for row in rows {
        if !owns(&row.0) {
            continue;
        }
        let (id, profile) = profile_of(row, default_offset);
        det.set_profile(&id, &profile);
        n += 1;
    }
    Ok(n)
}

/// [`load`], then the detector states a worker's journal still holds (newer than
/// `detector_state`: see [`crate::db::journal::recover`]) on top.
///
/// # Errors
/// [`StoreError::Stage`] when a query fails.
pub async fn load_with<'a>(
    pool: &PgPool,
    config: DetectConfig,
    owns: impl Fn(&str) -> bool,
    journalled: impl Iterator<Item = (&'a str, &'a MeterDetect)>,
) -> Result<Detectors, StoreError> {
    let mut det = Detectors::new(config);
    fill(pool, &mut det.view(), owns, journalled).await?;
    Ok(det)
}

/// [`load_with`] for the live worker: the meters' slots are kept by `index` (its
/// [`crate::vee::Vee`], loaded first), so the returned detectors are used through
/// [`Detectors::on`] with the same index.
///
/// # Errors
/// [`StoreError::Stage`] when a query fails.
pub async fn load_on<'a>(
    pool: &PgPool,
    config: DetectConfig,
    owns: impl Fn(&str) -> bool,
    journalled: impl Iterator<Item = (&'a str, &'a MeterDetect)>,
    index: &mut dyn MeterIndex,
) -> Result<Detectors, StoreError> {
    let mut det = Detectors::new(config);
    fill(pool, &mut det.on(index), owns, journalled).await?;
    Ok(det)
}

/// Loads models, profiles, states and open alarms into fresh detectors.
async fn fill<'a>(
    pool: &PgPool,
    det: &mut DetectorsOn<'_>,
    owns: impl Fn(&str) -> bool,
    journalled: impl Iterator<Item = (&'a str, &'a MeterDetect)>,
) -> Result<(), StoreError> {
    let default_offset = det.config.default_utc_offset_s;
    load_models(pool, det).await?;
    let rows: Vec<ProfileRow> = sqlx::query_as(PROFILE_SQL)
        .fetch_all(pool)
        .await
        .map_err(stage("loading meter profiles"))?;
    // The registered meters are (nearly) all the meters: no spare room from growing.
    det.states.reserve_exact(rows.len());
    for row in rows {
        if !owns(&row.0) {
            continue;
        }
        let (id, profile) = profile_of(row, default_offset);
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
    for (id, st) in journalled {
        if owns(id) {
            det.restore(id, *st);
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
    let states = &*det.states;
    det.index.each_slot(&mut |id, slot| {
        let Some(st) = usize::try_from(slot).ok().and_then(|i| states.get(i)) else {
            return;
        };
        for k in st.active_kinds() {
            if !open.contains(&(id.to_owned(), k.as_str().to_owned())) {
                closed.push((id.to_owned(), k));
            }
        }
    });
    for (id, k) in closed {
        det.forget_active(&id, k);
    }
    Ok(())
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
