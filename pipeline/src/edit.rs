//! Editing and manual reads: the library calls behind the API's read-editing and manual-read
//! endpoints (IF-REV-004, IF-METER-004). Both go through VEE's rules and the same storage path
//! as MQTT ingest, and every edit is audited.

use model::{ClockSource, Quality, Quantity, Reading, SourceKind};
use rust_decimal::Decimal;
use sqlx::{Connection, PgPool};
use time::OffsetDateTime;

use crate::db::{self, StoreError, StoreOptions, WriteMode, WriteSet};
use crate::vee::VeeConfig;

/// Why an edit or manual read failed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// No stored reading at that key.
    #[error("no reading of meter {meter} at {ts} for quantity {quantity}")]
    NotFound {
        /// Meter.
        meter: String,
        /// Time.
        ts: OffsetDateTime,
        /// Quantity.
        quantity: &'static str,
    },
    /// User or reason is empty: an edit must say who and why.
    #[error("an edit needs a user and a reason")]
    Unattributed,
    /// The manual read is not a manual or API read.
    #[error("manual reads must come from source `api` (got {0:?})")]
    NotManual(SourceKind),
    /// An estimate needs billable reads on both sides.
    #[error(
        "no billable volume read on both sides of {ts} for meter {meter}: nothing to interpolate"
    )]
    NoNeighbours {
        /// Meter.
        meter: String,
        /// Time of the read to estimate.
        ts: OffsetDateTime,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn db(stage: &'static str) -> impl FnOnce(sqlx::Error) -> EditError {
    move |source| EditError::Store(StoreError::Stage { stage, source })
}

/// What an edit replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditOutcome {
    /// The value before the edit.
    pub old_value: Decimal,
    /// Its quality status before the edit.
    pub old_quality: String,
}

/// Replaces the value of a stored reading (tariff 0, subunit 0) with `new_value`, quality
/// `edited` (by, reason). The old row goes to `reading_history`, the edit to `audit_log`, and
/// the meter's rollups are recomputed around it. The ingest worker's in-memory state of the
/// meter is not told: edit historic reads, not the latest one, while a worker runs.
///
/// # Errors
/// [`EditError::NotFound`] when no reading exists at the key, [`EditError::Unattributed`]
/// without user or reason, [`EditError::Store`] on database errors (nothing is written then).
#[allow(clippy::too_many_arguments)]
pub async fn edit_reading(
    pool: &PgPool,
    meter: &str,
    ts: OffsetDateTime,
    quantity: Quantity,
    new_value: Decimal,
    user: &str,
    reason: &str,
) -> Result<EditOutcome, EditError> {
    let quality = Quality::Edited {
        by: user.to_owned(),
        reason: reason.to_owned(),
    };
    replace_reading(pool, meter, ts, quantity, new_value, &quality, user, reason).await
}

/// Replaces a stored volume reading (tariff 0, subunit 0) by the linear interpolation between
/// the billable reads around it (quality `estimated`, method linear), with the same history,
/// audit and rollup recompute as [`edit_reading`]; for a read a person judged wrong when no
/// better value is known. Returns what it replaced and the estimate.
///
/// # Errors
/// [`EditError::NoNeighbours`] without a billable read on both sides, else as [`edit_reading`].
pub async fn estimate_reading(
    pool: &PgPool,
    meter: &str,
    ts: OffsetDateTime,
    user: &str,
    reason: &str,
) -> Result<(EditOutcome, Decimal), EditError> {
    let before = db::readings::neighbour(pool, meter, ts, db::readings::Side::Before).await?;
    let after = db::readings::neighbour(pool, meter, ts, db::readings::Side::After).await?;
    let (Some((t0, v0)), Some((t1, v1))) = (before, after) else {
        return Err(EditError::NoNeighbours {
            meter: meter.to_owned(),
            ts,
        });
    };
    let span = Decimal::from((t1 - t0).whole_seconds());
    let part = Decimal::from((ts - t0).whole_seconds());
    let value = (v0 + (v1 - v0) * part / span).round_dp(6);
    let quality = Quality::Estimated {
        method: model::EstimationMethod::Linear,
    };
    let outcome = replace_reading(
        pool,
        meter,
        ts,
        Quantity::Volume,
        value,
        &quality,
        user,
        reason,
    )
    .await?;
    Ok((outcome, value))
}

/// The one write path of [`edit_reading`] and [`estimate_reading`]: history, new value and
/// quality, audit, rollups and meter state, in one transaction.
#[allow(clippy::too_many_arguments)]
async fn replace_reading(
    pool: &PgPool,
    meter: &str,
    ts: OffsetDateTime,
    quantity: Quantity,
    new_value: Decimal,
    quality: &Quality,
    user: &str,
    reason: &str,
) -> Result<EditOutcome, EditError> {
    if user.trim().is_empty() || reason.trim().is_empty() {
        return Err(EditError::Unattributed);
    }
    let mut conn = pool.acquire().await.map_err(db("acquiring a connection"))?;
    let mut tx = conn.begin().await.map_err(db("beginning"))?;
    // Before any row lock: the rollup recompute must not race a worker's journal.
    crate::db::journal::lock_out_ingest(&mut tx).await?;
    // A packed month (migration 0120) goes back to row form first, so the row can be locked
    // and changed; the next retention run packs it again.
    db::readings::unpack_month(&mut tx, meter, ts).await?;
    let (old_value, old_quality) = db::readings::lock_for_edit(&mut tx, meter, ts, quantity)
        .await?
        .ok_or_else(|| EditError::NotFound {
            meter: meter.to_owned(),
            ts,
            quantity: quantity.as_str(),
        })?;
    db::readings::keep_history(
        &mut tx,
        meter,
        ts,
        quantity,
        &format!("edit:{user}"),
        reason,
    )
    .await?;
    db::readings::set_value(&mut tx, meter, ts, quantity, new_value, quality).await?;
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail)
         VALUES ($1, $4, 'reading', $2, $3)",
    )
    .bind(user)
    .bind(format!("{meter}@{ts}/{}", quantity.as_str()))
    .bind(serde_json::json!({
        "meter": meter,
        "quantity": quantity.as_str(),
        "old_value": old_value.to_string(),
        "old_quality": old_quality,
        "new_value": new_value.to_string(),
        "new_quality": quality.status(),
        "reason": reason,
    }))
    .bind(if matches!(quality, Quality::Estimated { .. }) {
        "reading.estimate"
    } else {
        "reading.edit"
    })
    .execute(&mut *tx)
    .await
    .map_err(db("auditing the edit"))?;
    if quantity == Quantity::Volume {
        let next = db::readings::next_volume_ts(&mut *tx, meter, ts).await?;
        db::rollups::recompute_rollups(
            &mut tx,
            meter,
            ts,
            next.unwrap_or(ts),
            StoreOptions::default(),
        )
        .await?;
        // Keep meter_state in step when the latest read was edited.
        db::meter_state::set_last_value(&mut tx, meter, ts, new_value).await?;
    }
    tx.commit().await.map_err(db("committing the edit"))?;
    Ok(EditOutcome {
        old_value,
        old_quality,
    })
}

/// Validates and stores a manual or API read (source `api`, clock `manual` or `platform`)
/// through the same VEE rules and storage as MQTT ingest; returns the stored reading (with its
/// quality and flags) and any estimates it created. `None` when it was an exact duplicate.
///
/// The meter's `meter_state` row is locked for the transaction. A running ingest worker keeps
/// its own in-memory copy of the state; a manual read newer than the worker's state is seen by
/// the worker as the previous read only after its restart (see docs/vee.md).
///
/// # Errors
/// [`EditError::NotManual`] for a reading from another source, [`EditError::Store`] on
/// database errors.
pub async fn ingest_manual(
    pool: &PgPool,
    reading: Reading,
    config: VeeConfig,
) -> Result<Option<(Reading, Vec<Reading>)>, EditError> {
    if reading.provenance.source != SourceKind::Api {
        return Err(EditError::NotManual(reading.provenance.source));
    }
    let meter = reading.meter.as_str().to_owned();
    let mut conn = pool.acquire().await.map_err(db("acquiring a connection"))?;
    let mut tx = conn.begin().await.map_err(db("beginning"))?;
    // Before any row lock: the rollup recompute must not race a worker's journal.
    crate::db::journal::lock_out_ingest(&mut tx).await?;
    let mut vee =
        db::meter_state::load_vee_filtered(&mut tx, config, Some(&meter), |_| true).await?;
    // A state still in the ingest journal is newer than its `meter_state` row.
    if let Some(state) = crate::db::journal::latest_state(&mut tx, &meter).await? {
        vee.insert_state(&meter, state);
    }
    let out = vee.validate(vec![reading], OffsetDateTime::now_utc());
    let rejects: Vec<db::rejects::RejectRecord> = out
        .conflicts
        .iter()
        .map(db::rejects::RejectRecord::conflict)
        .collect();
    db::write_batch(
        &mut tx,
        &WriteSet {
            readings: &out.readings,
            mode: WriteMode::Direct {
                usage: &out.usage,
                states: Some(&out.states),
            },
            progress: &[],
            rejects: &rejects,
            out_of_order: &out.out_of_order,
            alarms: None,
        },
        StoreOptions::default(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(db("committing the manual read"))?;
    let (estimates, actual): (Vec<Reading>, Vec<Reading>) = out
        .readings
        .into_iter()
        .partition(|r| r.clock == ClockSource::Pipeline);
    Ok(actual.into_iter().next().map(|r| (r, estimates)))
}
