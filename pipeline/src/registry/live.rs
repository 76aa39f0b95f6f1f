//! Registry changes reach running workers live: the migration's statement triggers on
//! `meters` and `meter_replacements` send the changed meter ids on channel `wm_registry`
//! (`*` for "too many, reload all"); [`spawn_listener`] turns them into [`Change`]s and
//! [`refresh`] applies one to a worker's VEE state between two batches.

use std::collections::BTreeSet;
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::db::StoreError;
use crate::vee::{MeterExtras, MeterState, Replacement, Vee};

/// The notification channel of registry changes.
pub const CHANNEL: &str = "wm_registry";

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These meters (ids) changed.
    Meters(BTreeSet<String>),
    /// Unknown or many changes (or notifications may have been missed): reload every meter.
    All,
}

impl Change {
    /// Parses a notification payload.
    pub fn parse(payload: &str) -> Change {
        if payload == "*" {
            return Change::All;
        }
        Change::Meters(
            payload
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// Merges another change into this one (coalescing a burst of notifications); a huge
    /// id set becomes one full reload, which is cheaper.
    pub fn merge(&mut self, other: Change) {
        let all = match (&mut *self, other) {
            (Change::All, _) => false,
            (_, Change::All) => true,
            (Change::Meters(a), Change::Meters(b)) => {
                a.extend(b);
                a.len() > 10_000
            }
        };
        if all {
            *self = Change::All;
        }
    }
}

/// Listens on [`CHANNEL`] with its own connection until the receiver is dropped, and sends
/// each change (bursts within 100 ms coalesced). After a lost connection it reconnects and
/// sends [`Change::All`], since notifications sent meanwhile are lost.
pub fn spawn_listener(pool: PgPool) -> mpsc::Receiver<Change> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut first = true;
        loop {
            if tx.is_closed() {
                return;
            }
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "registry listener cannot connect; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = listener.listen(CHANNEL).await {
                tracing::warn!(error = %e, "LISTEN wm_registry failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if !first && tx.send(Change::All).await.is_err() {
                return;
            }
            first = false;
            loop {
                // Ends with the worker (receiver dropped), not at the next notification.
                let n = tokio::select! {
                    () = tx.closed() => return,
                    n = listener.recv() => n,
                };
                let n = match n {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "registry listener lost its connection");
                        break;
                    }
                };
                let mut change = Change::parse(n.payload());
                // Coalesce what else arrives right now.
                while let Ok(Ok(Some(n))) =
                    tokio::time::timeout(Duration::from_millis(100), listener.try_recv()).await
                {
                    change.merge(Change::parse(n.payload()));
                }
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn stage(stage: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Stage { stage, source }
}

/// Applies a registry change to a worker's VEE state: for each changed meter it owns, the
/// capacity and Q3 of its state, its installation and retirement times and its replacements
/// are reloaded. The learnt state (last read, profile) is kept, unless `meter_state` holds a
/// newer last read than memory (a replacement re-validated held reads), which is then taken.
/// Returns the number of meters refreshed.
///
/// # Errors
/// [`StoreError::Stage`] when a query fails (the state is then unchanged).
pub async fn refresh(
    pool: &PgPool,
    vee: &mut Vee,
    change: &Change,
    owns: impl Fn(&str) -> bool,
) -> Result<usize, StoreError> {
    let only: Option<Vec<String>> = match change {
        Change::All => None,
        Change::Meters(ids) if ids.contains("*") => None,
        Change::Meters(ids) => Some(ids.iter().filter(|m| owns(m)).cloned().collect()),
    };
    if only.as_ref().is_some_and(Vec::is_empty) {
        return Ok(0);
    }
    type MeterRow = (
        String,
        Decimal,
        Decimal,
        Option<OffsetDateTime>,
        Option<OffsetDateTime>,
    );
    let meters: Vec<MeterRow> = sqlx::query_as(
        "SELECT meter_id, register_capacity, nominal_flow_q3, installed_at, retired_at
         FROM meters WHERE $1::text[] IS NULL OR meter_id = ANY($1)",
    )
    .bind(&only)
    .fetch_all(pool)
    .await
    .map_err(stage("reloading meters"))?;
    let reps: Vec<(String, OffsetDateTime, Decimal, Decimal)> = sqlx::query_as(
        "SELECT meter_id, replaced_at, old_final_value, new_initial_value
         FROM meter_replacements WHERE $1::text[] IS NULL OR meter_id = ANY($1)",
    )
    .bind(&only)
    .fetch_all(pool)
    .await
    .map_err(stage("reloading replacements"))?;
    // Newer persisted states matter only for a few meters (after a replacement); never
    // reload them on a full refresh.
    let newer: Vec<(String, OffsetDateTime)> = match &only {
        None => Vec::new(),
        Some(ids) => crate::db::meter_state::last_times(pool, ids).await?,
    };
    let mut refreshed = 0;
    for (id, cap, q3, installed, retired) in meters {
        if !owns(&id) {
            continue;
        }
        let cap = cap
            .round()
            .to_u32()
            .unwrap_or(crate::vee::DEFAULT_CAPACITY_M3);
        let q3 = (q3 * Decimal::from(1000))
            .round()
            .to_u32()
            .unwrap_or(crate::vee::DEFAULT_Q3_LPH);
        let mut state = vee
            .state(&id)
            .copied()
            .unwrap_or_else(|| MeterState::new(cap, q3));
        if let Some((_, ts)) = newer.iter().find(|(m, _)| *m == id)
            && ts.unix_timestamp() > state.last_ts
        {
            let mut conn = pool
                .acquire()
                .await
                .map_err(stage("acquiring a connection"))?;
            let one = crate::db::meter_state::load_vee_filtered(
                &mut conn,
                vee.config().clone(),
                Some(&id),
                |_| true,
            )
            .await?;
            if let Some(s) = one.state(&id) {
                state = *s;
            }
        }
        state.capacity_m3 = cap;
        state.q3_lph = q3;
        vee.insert_state(&id, state);
        let extras = MeterExtras {
            installed_at: installed,
            retired_at: retired,
            replacements: reps
                .iter()
                .filter(|r| r.0 == id)
                .map(|r| Replacement {
                    replaced_at: r.1,
                    old_final_value: r.2,
                    new_initial_value: r.3,
                })
                .collect(),
        };
        // Empty extras are stored only for named meters (they may have had some before); a
        // full reload would otherwise give every meter an entry.
        if only.is_some() || extras != MeterExtras::default() {
            vee.insert_extras(&id, extras);
        }
        refreshed += 1;
    }
    tracing::info!(
        meters = refreshed,
        full = only.is_none(),
        "registry change applied"
    );
    Ok(refreshed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_merge() {
        let mut c = Change::parse("a,b");
        c.merge(Change::parse("b,c"));
        assert_eq!(
            c,
            Change::Meters(["a", "b", "c"].map(String::from).into_iter().collect())
        );
        c.merge(Change::parse("*"));
        assert_eq!(c, Change::All);
        c.merge(Change::parse("d"));
        assert_eq!(c, Change::All);
    }
}
