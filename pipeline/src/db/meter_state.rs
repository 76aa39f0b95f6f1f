//! `meter_state` and the VEE state loaded at start: meter configuration, replacements and the
//! persisted per-meter state.

use std::collections::HashMap;

use rust_decimal::Decimal;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use sqlx::{PgConnection, PgPool, Row};
use time::OffsetDateTime;

use super::error::{StoreError, stage};
use crate::vee::{MeterExtras, MeterState, Replacement, Vee, VeeConfig};

/// The persisted part of [`MeterState`] that has no column of its own (`meter_state.profile`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ProfileJson {
    /// Reporting interval, seconds.
    i: u32,
    /// Seconds of zero consumption up to the last read.
    z: u32,
    /// Validated reads seen.
    n: u16,
    /// Hourly profile, L/h.
    h: [u16; 24],
}

/// Upserts meter states (one statement, in key order).
pub(crate) async fn write_states(
    conn: &mut PgConnection,
    states: &crate::vee::StateMap,
) -> Result<(), StoreError> {
    if states.is_empty() {
        return Ok(());
    }
    let n = states.len();
    let mut meter = Vec::with_capacity(n);
    let mut last_ts = Vec::with_capacity(n);
    let mut last_value = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut adu = Vec::with_capacity(n);
    let mut profile = Vec::with_capacity(n);
    // Key order, like the rollups: index-ordered lookups, one lock order across writers.
    let mut sorted: Vec<(&str, &MeterState)> = states.iter().map(|(m, s)| (&**m, s)).collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (m, s) in sorted {
        if !s.has_read() {
            continue;
        }
        meter.push(m);
        last_ts.push(OffsetDateTime::from_unix_timestamp(s.last_ts).ok());
        last_value.push(s.last_value);
        received.push(
            OffsetDateTime::from_unix_timestamp(s.last_ts + i64::from(s.received_lag_s)).ok(),
        );
        adu.push(Decimal::from_f32(s.adu).map(|d| d.round_dp(6)));
        profile.push(
            serde_json::to_string(&ProfileJson {
                i: s.interval_s,
                z: s.zero_s,
                n: s.reads,
                h: s.hour_profile,
            })
            .unwrap_or_else(|_| "{}".into()),
        );
    }
    sqlx::query(
        "INSERT INTO meter_state AS t (meter_id, last_ts, last_value, last_received_at,
             avg_daily_usage, profile, updated_at)
         SELECT m, ts, v, r, a, p::jsonb, now()
         FROM UNNEST($1::text[], $2::timestamptz[], $3::numeric[], $4::timestamptz[],
                     $5::numeric[], $6::text[]) AS u(m, ts, v, r, a, p)
         ON CONFLICT (meter_id) DO UPDATE SET
             last_ts = excluded.last_ts, last_value = excluded.last_value,
             last_received_at = excluded.last_received_at,
             avg_daily_usage = excluded.avg_daily_usage, profile = excluded.profile,
             updated_at = excluded.updated_at",
    )
    .bind(meter)
    .bind(last_ts)
    .bind(last_value)
    .bind(received)
    .bind(adu)
    .bind(profile)
    .execute(&mut *conn)
    .await
    .map_err(stage("upserting meter state"))?;
    Ok(())
}

/// Loads the VEE state of the meters `owns` accepts: meter configuration (capacity, Q3,
/// installation, retirement), replacements and persisted `meter_state`.
///
/// # Errors
/// Returns [`StoreError::Stage`] when a query fails.
pub async fn load_vee(
    pool: &PgPool,
    config: VeeConfig,
    owns: impl Fn(&str) -> bool,
) -> Result<Vee, StoreError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(stage("acquiring a connection"))?;
    load_vee_filtered(&mut conn, config, None, owns).await
}

/// Like [`load_vee`] on one connection, optionally for one meter only (`FOR UPDATE` on its
/// `meter_state` row, so concurrent manual reads of one meter serialise).
///
/// # Errors
/// Returns [`StoreError::Stage`] when a query fails.
pub async fn load_vee_filtered(
    conn: &mut PgConnection,
    config: VeeConfig,
    only: Option<&str>,
    owns: impl Fn(&str) -> bool,
) -> Result<Vee, StoreError> {
    let lock = if only.is_some() { " FOR UPDATE" } else { "" };
    let mut vee = Vee::new(config);
    let mut base: HashMap<String, (u32, u32)> = HashMap::new();
    let meters = sqlx::query(
        "SELECT meter_id, register_capacity, nominal_flow_q3, installed_at, retired_at FROM meters
         WHERE $1::text IS NULL OR meter_id = $1",
    )
    .bind(only)
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("loading meters"))?;
    for row in meters {
        let id: String = row.try_get("meter_id").map_err(stage("reading meters"))?;
        if !owns(&id) {
            continue;
        }
        let cap: Decimal = row
            .try_get("register_capacity")
            .map_err(stage("reading meters"))?;
        let q3: Decimal = row
            .try_get("nominal_flow_q3")
            .map_err(stage("reading meters"))?;
        let installed: Option<OffsetDateTime> = row.try_get("installed_at").ok().flatten();
        let retired: Option<OffsetDateTime> = row.try_get("retired_at").ok().flatten();
        let cap = cap
            .round()
            .to_u32()
            .unwrap_or(crate::vee::DEFAULT_CAPACITY_M3);
        let q3 = (q3 * Decimal::from(1000))
            .round()
            .to_u32()
            .unwrap_or(crate::vee::DEFAULT_Q3_LPH);
        base.insert(id.clone(), (cap, q3));
        vee.insert_state(&id, MeterState::new(cap, q3));
        if installed.is_some() || retired.is_some() {
            vee.insert_extras(
                &id,
                MeterExtras {
                    installed_at: installed,
                    retired_at: retired,
                    replacements: Vec::new(),
                },
            );
        }
    }
    let reps = sqlx::query(
        "SELECT meter_id, replaced_at, old_final_value, new_initial_value FROM meter_replacements
         WHERE $1::text IS NULL OR meter_id = $1",
    )
    .bind(only)
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("loading meter replacements"))?;
    for row in reps {
        let id: String = row.try_get(0).map_err(stage("reading replacements"))?;
        if !owns(&id) {
            continue;
        }
        vee.add_replacement(
            &id,
            Replacement {
                replaced_at: row.try_get(1).map_err(stage("reading replacements"))?,
                old_final_value: row.try_get(2).map_err(stage("reading replacements"))?,
                new_initial_value: row.try_get(3).map_err(stage("reading replacements"))?,
            },
        );
    }
    let states = sqlx::query(&format!(
        "SELECT meter_id, last_ts, last_value, last_received_at, avg_daily_usage, profile::text
         FROM meter_state WHERE last_ts IS NOT NULL AND last_value IS NOT NULL
           AND ($1::text IS NULL OR meter_id = $1){lock}"
    ))
    .bind(only)
    .fetch_all(&mut *conn)
    .await
    .map_err(stage("loading meter state"))?;
    for row in states {
        let id: String = row.try_get(0).map_err(stage("reading meter state"))?;
        if !owns(&id) {
            continue;
        }
        let (cap, q3) = base
            .get(&id)
            .copied()
            .unwrap_or((crate::vee::DEFAULT_CAPACITY_M3, crate::vee::DEFAULT_Q3_LPH));
        let mut st = MeterState::new(cap, q3);
        let last_ts: OffsetDateTime = row.try_get(1).map_err(stage("reading meter state"))?;
        st.last_ts = last_ts.unix_timestamp();
        st.last_value = row.try_get(2).map_err(stage("reading meter state"))?;
        let received: Option<OffsetDateTime> = row.try_get(3).ok().flatten();
        st.received_lag_s = received.map_or(0, |r| {
            i32::try_from(r.unix_timestamp() - st.last_ts).unwrap_or(0)
        });
        let adu: Option<Decimal> = row.try_get(4).ok().flatten();
        st.adu = adu.and_then(|d| d.to_f32()).unwrap_or(0.0);
        let profile: String = row.try_get(5).map_err(stage("reading meter state"))?;
        if let Ok(p) = serde_json::from_str::<ProfileJson>(&profile) {
            st.interval_s = p.i;
            st.zero_s = p.z;
            st.reads = p.n;
            st.hour_profile = p.h;
        } else {
            st.zero_s = 0;
            st.reads = 1;
        }
        vee.insert_state(&id, st);
    }
    vee.shrink();
    Ok(vee)
}

/// Loads the recorded replacements of some meters (after a register decrease).
///
/// # Errors
/// Returns [`StoreError::Stage`] when the query fails.
pub async fn load_replacements(
    pool: &PgPool,
    meters: &[String],
) -> Result<Vec<(String, Replacement)>, StoreError> {
    let rows = sqlx::query(
        "SELECT meter_id, replaced_at, old_final_value, new_initial_value
         FROM meter_replacements WHERE meter_id = ANY($1)",
    )
    .bind(meters)
    .fetch_all(pool)
    .await
    .map_err(stage("loading meter replacements"))?;
    rows.into_iter()
        .map(|row| {
            Ok((
                row.try_get(0).map_err(stage("reading replacements"))?,
                Replacement {
                    replaced_at: row.try_get(1).map_err(stage("reading replacements"))?,
                    old_final_value: row.try_get(2).map_err(stage("reading replacements"))?,
                    new_initial_value: row.try_get(3).map_err(stage("reading replacements"))?,
                },
            ))
        })
        .collect()
}

/// Sets the persisted `last_value` of `meter` when its last read is the one at `ts` (an edit
/// of the latest read keeps `meter_state` in step).
///
/// # Errors
/// Returns [`StoreError::Stage`] when the statement fails.
pub async fn set_last_value(
    conn: &mut PgConnection,
    meter: &str,
    ts: OffsetDateTime,
    value: Decimal,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE meter_state SET last_value = $3 WHERE meter_id = $1 AND last_ts = $2")
        .bind(meter)
        .bind(ts)
        .bind(value)
        .execute(conn)
        .await
        .map_err(stage("updating meter state"))?;
    Ok(())
}

/// Returns `(meter, last_ts)` of the persisted states of `meters` that have a last read.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the query fails.
pub async fn last_times(
    pool: &PgPool,
    meters: &[String],
) -> Result<Vec<(String, OffsetDateTime)>, StoreError> {
    sqlx::query_as(
        "SELECT meter_id, last_ts FROM meter_state
         WHERE meter_id = ANY($1) AND last_ts IS NOT NULL",
    )
    .bind(meters)
    .fetch_all(pool)
    .await
    .map_err(stage("reloading meter state"))
}
