//! Hydrant permits (EXT-1001 取水权限): a holder may draw water from a hydrant inside a time
//! window. The outlet is unlocked only inside an active permit, locked at the end of the
//! window (or on revocation), and an open outlet with no active permit raises
//! `hydrant_illegal_use` here, from the readings — not only from the device's own event bit.

use model::{CommandAction, MeterId};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::{ControlError, IssueRequest, Issued, PRIORITY_DEFAULT, PRIORITY_HIGHEST, db, rfc3339};

/// A permit.
#[derive(Debug, Clone, PartialEq)]
pub struct Permit {
    /// Permit number (idempotency key).
    pub id: String,
    /// Hydrant meter id (`hydrant:<id>`).
    pub hydrant: String,
    /// Who may draw water.
    pub holder: String,
    /// Window start (UTC).
    pub valid_from: OffsetDateTime,
    /// Window end, exclusive (UTC).
    pub valid_to: OffsetDateTime,
    /// Volume limit, m³ (recorded; enforcing it needs flow/volume from the hydrant, not yet on
    /// the wire).
    pub volume_limit_m3: Option<Decimal>,
    /// Who issued it.
    pub issued_by: String,
}

/// Stores a permit. Idempotent by id (the same permit again is a no-op; a different one with
/// the same id is refused).
///
/// # Errors
/// [`ControlError::Invalid`] for a bad window or hydrant id, [`ControlError::Permit`] for a
/// conflicting id; database errors.
pub async fn create_permit(pool: &PgPool, p: &Permit) -> Result<bool, ControlError> {
    if !p.hydrant.starts_with("hydrant:") {
        return Err(ControlError::Invalid(format!(
            "permit {}: `{}` is not a hydrant id (expected hydrant:<id>)",
            p.id, p.hydrant
        )));
    }
    if p.valid_to <= p.valid_from {
        return Err(ControlError::Invalid(format!(
            "permit {}: the window ends ({}) before it starts ({})",
            p.id, p.valid_to, p.valid_from
        )));
    }
    if p.volume_limit_m3.is_some_and(|v| v <= Decimal::ZERO) {
        return Err(ControlError::Invalid(format!(
            "permit {}: the volume limit must be positive",
            p.id
        )));
    }
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let n = sqlx::query(
        "INSERT INTO hydrant_permits (permit_id, hydrant_id, holder, valid_from, valid_to, \
             volume_limit_m3, issued_by) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (permit_id) DO NOTHING",
    )
    .bind(&p.id)
    .bind(&p.hydrant)
    .bind(&p.holder)
    .bind(p.valid_from)
    .bind(p.valid_to)
    .bind(p.volume_limit_m3)
    .bind(&p.issued_by)
    .execute(&mut *tx)
    .await
    .map_err(db("storing a permit"))?
    .rows_affected();
    if n == 0 {
        let same: Option<bool> = sqlx::query_scalar(
            "SELECT hydrant_id = $2 AND holder = $3 AND valid_from = $4 AND valid_to = $5 \
             FROM hydrant_permits WHERE permit_id = $1",
        )
        .bind(&p.id)
        .bind(&p.hydrant)
        .bind(&p.holder)
        .bind(p.valid_from)
        .bind(p.valid_to)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("comparing permits"))?;
        if same != Some(true) {
            return Err(ControlError::Permit {
                hydrant: p.hydrant.clone(),
                why: format!("permit id {} exists with other terms", p.id),
            });
        }
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) \
         VALUES ($1, 'permit.create', 'hydrant_permit', $2, $3)",
    )
    .bind(&p.issued_by)
    .bind(&p.id)
    .bind(
        json!({"hydrant": p.hydrant, "holder": p.holder, "valid_from": rfc3339(p.valid_from),
                 "valid_to": rfc3339(p.valid_to), "volume_limit_m3": p.volume_limit_m3}),
    )
    .execute(&mut *tx)
    .await
    .map_err(db("writing the audit log"))?;
    tx.commit().await.map_err(db("committing a permit"))?;
    Ok(true)
}

/// Unlocks the permit's hydrant for the rest of its window, at `now`. Refused outside the
/// window or for a revoked permit. Idempotent (the command id is `permit:<id>:unlock`).
///
/// # Errors
/// [`ControlError::Permit`] with the window; the errors of [`super::issue`].
pub async fn unlock(
    pool: &PgPool,
    permit_id: &str,
    by: &str,
    now: OffsetDateTime,
) -> Result<Issued, ControlError> {
    let row: Option<(
        String,
        String,
        OffsetDateTime,
        OffsetDateTime,
        Option<OffsetDateTime>,
    )> = sqlx::query_as(
        "SELECT hydrant_id, holder, valid_from, valid_to, revoked_at FROM hydrant_permits \
             WHERE permit_id = $1",
    )
    .bind(permit_id)
    .fetch_optional(pool)
    .await
    .map_err(db("reading a permit"))?;
    let (hydrant, holder, from, to, revoked) = row.ok_or_else(|| ControlError::Permit {
        hydrant: "?".into(),
        why: format!("permit {permit_id} does not exist"),
    })?;
    let refuse = |why: String| ControlError::Permit {
        hydrant: hydrant.clone(),
        why,
    };
    if let Some(r) = revoked {
        return Err(refuse(format!("permit {permit_id} was revoked at {r}")));
    }
    if now < from || now >= to {
        return Err(refuse(format!(
            "unlock refused at {now}: outside permit {permit_id}'s window {from} .. {to}"
        )));
    }
    // Rounded up: the unlock lasts to the end of the window, not a fraction short of it.
    let left = to - now;
    let secs = left.whole_seconds() + i64::from(left.subsec_nanoseconds() > 0);
    let duration_s = u32::try_from(secs.max(1)).unwrap_or(u32::MAX);
    let device = MeterId::new(hydrant.clone())
        .map_err(|e| ControlError::Invalid(format!("hydrant `{hydrant}`: {e}")))?;
    let mut req = IssueRequest::new(
        format!("permit:{permit_id}:unlock"),
        device,
        CommandAction::HydrantUnlock { duration_s },
        by,
        format!("permit {permit_id} for {holder}"),
    );
    req.priority = PRIORITY_DEFAULT;
    req.cause = json!({"rule": "hydrant_permit", "permit": permit_id, "holder": holder,
                       "valid_from": rfc3339(from), "valid_to": rfc3339(to)});
    req.ttl = to - now;
    let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
    let out = super::issue_in(&mut tx, &req, true).await?;
    tx.commit().await.map_err(db("committing an unlock"))?;
    Ok(out)
}

/// Revokes a permit; the next [`lock_ended`] locks its hydrant.
///
/// # Errors
/// [`ControlError::Permit`] for an unknown permit; database errors.
pub async fn revoke(
    pool: &PgPool,
    permit_id: &str,
    by: &str,
    now: OffsetDateTime,
) -> Result<(), ControlError> {
    let n = sqlx::query(
        "UPDATE hydrant_permits SET revoked_at = $2 WHERE permit_id = $1 AND revoked_at IS NULL",
    )
    .bind(permit_id)
    .bind(now)
    .execute(pool)
    .await
    .map_err(db("revoking a permit"))?
    .rows_affected();
    if n == 0 {
        return Err(ControlError::Permit {
            hydrant: "?".into(),
            why: format!("permit {permit_id} does not exist or is already revoked"),
        });
    }
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) \
         VALUES ($1, 'permit.revoke', 'hydrant_permit', $2, '{}')",
    )
    .bind(by)
    .bind(permit_id)
    .execute(pool)
    .await
    .map_err(db("writing the audit log"))?;
    Ok(())
}

/// Locks the hydrants of permits that ended (or were revoked) at `now` and had been
/// unlocked; returns the lock command ids. Idempotent (`permit:<id>:lock`).
///
/// # Errors
/// Database errors and the errors of [`super::issue`].
pub async fn lock_ended(pool: &PgPool, now: OffsetDateTime) -> Result<Vec<String>, ControlError> {
    let ended: Vec<(String, String)> = sqlx::query_as(
        "SELECT p.permit_id, p.hydrant_id FROM hydrant_permits p \
         WHERE p.lock_command_id IS NULL AND (p.valid_to <= $1 OR p.revoked_at IS NOT NULL) \
           AND EXISTS (SELECT 1 FROM commands c WHERE c.command_id = 'permit:' || p.permit_id || ':unlock')",
    )
    .bind(now)
    .fetch_all(pool)
    .await
    .map_err(db("finding ended permits"))?;
    let mut out = Vec::new();
    for (permit, hydrant) in ended {
        let device = MeterId::new(hydrant.clone())
            .map_err(|e| ControlError::Invalid(format!("hydrant `{hydrant}`: {e}")))?;
        let mut req = IssueRequest::new(
            format!("permit:{permit}:lock"),
            device,
            CommandAction::HydrantLock,
            "rule:hydrant_permit",
            format!("permit {permit} ended"),
        );
        req.priority = PRIORITY_HIGHEST;
        req.cause = json!({"rule": "hydrant_permit", "permit": permit});
        let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
        let issued = super::issue_in(&mut tx, &req, false).await?;
        sqlx::query("UPDATE hydrant_permits SET lock_command_id = $2 WHERE permit_id = $1")
            .bind(&permit)
            .bind(&issued.command.id)
            .execute(&mut *tx)
            .await
            .map_err(db("recording the lock"))?;
        tx.commit().await.map_err(db("committing a lock"))?;
        out.push(issued.command.id);
    }
    Ok(out)
}

/// Raises `hydrant_illegal_use` for every hydrant whose outlet was reported open
/// (`outlet_state` = 1) in a reading received after `since` at a time no active permit
/// covers. Returns (hydrant, time of the open reading) of each alarm newly raised (a hydrant
/// whose alarm is already open is counted again, not returned).
///
/// # Errors
/// Database errors.
pub async fn detect_illegal_use(
    pool: &PgPool,
    since: OffsetDateTime,
) -> Result<Vec<(String, OffsetDateTime)>, ControlError> {
    let open: Vec<(String, OffsetDateTime)> = sqlx::query_as(
        "SELECT r.meter_id, max(r.ts) FROM readings r \
         WHERE r.quantity = 'outlet_state' AND r.value = 1 AND r.meter_id LIKE 'hydrant:%' \
           AND r.received_at > $1 AND r.ts > $1 - interval '2 days' \
           AND NOT EXISTS (SELECT 1 FROM hydrant_permits p WHERE p.hydrant_id = r.meter_id \
               AND (p.revoked_at IS NULL OR p.revoked_at > r.ts) \
               AND r.ts >= p.valid_from AND r.ts < p.valid_to) \
         GROUP BY r.meter_id ORDER BY r.meter_id",
    )
    .bind(since)
    .fetch_all(pool)
    .await
    .map_err(db("looking for unpermitted hydrant use"))?;
    let mut raised = Vec::new();
    for (hydrant, ts) in open {
        let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
        let new = super::raise_alarm(
            &mut tx,
            &hydrant,
            "hydrant_illegal_use",
            ts,
            json!({"source": "control", "outlet_open_at": rfc3339(ts), "reason": "outlet open with no active permit"}),
        )
        .await?;
        tx.commit().await.map_err(db("committing an alarm"))?;
        if new {
            raised.push((hydrant, ts));
        }
    }
    Ok(raised)
}
