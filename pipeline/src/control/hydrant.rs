//! Hydrant permits (EXT-1001 取水权限): a holder may draw water from a hydrant inside a time
//! window. The outlet is unlocked only inside an active permit, locked at the end of the
//! window (or on revocation), and an open outlet with no active permit raises
//! `hydrant_illegal_use` here, from the readings — not only from the device's own event bit.
//! A permit's volume limit is enforced from the hydrant's cumulative outlet volume register
//! ([`enforce_volume`]): the hydrant is locked when the water drawn since the unlock reaches
//! the limit, and water drawn after that lock raises `hydrant_illegal_use`.

use model::{CommandAction, MeterId};
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::{ControlError, IssueRequest, Issued, PRIORITY_DEFAULT, PRIORITY_HIGHEST, db, rfc3339};

/// Rule name of the lock when a permit's volume limit is reached.
pub const VOLUME_RULE: &str = "permit_volume_exhausted";

/// The volume register in m³ of a `readings` row (hydrants report m³; litres converted).
const VOLUME_M3: &str = "CASE r.unit WHEN 'L' THEN r.value / 1000 ELSE r.value END";

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
    /// Volume limit, m³, enforced by [`enforce_volume`] from the hydrant's volume register.
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
    // A repeated unlock of the same permit is the same request although less of the window is
    // left now: it gets the command issued first, not an id conflict over its duration.
    if let Some(existing) = super::find_in(&mut tx, &req.id.0).await?
        && existing.device == req.device.as_str()
        && matches!(existing.action, CommandAction::HydrantUnlock { .. })
    {
        req.action = existing.action;
    }
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
/// covers (a permit whose volume was exhausted covers no reading after its lock was
/// acknowledged, or after five minutes when the lock is not acknowledged). Returns (hydrant, time of the open reading) of each alarm newly raised (a hydrant
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
               AND r.ts >= p.valid_from AND r.ts < p.valid_to \
               AND (p.exhausted_at IS NULL OR r.ts <= coalesce((SELECT c.acknowledged_at \
                   FROM commands c WHERE c.command_id = p.lock_command_id), \
                   p.exhausted_at + interval '5 minutes'))) \
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

/// What [`enforce_volume`] did in one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeReport {
    /// (permit, lock command id) of each permit locked because its volume was exhausted.
    pub locked: Vec<(String, String)>,
    /// (hydrant, m³ drawn after the lock, time of the reading) of each
    /// `hydrant_illegal_use` newly raised for water drawn after a volume lock.
    pub drawn_after_lock: Vec<(String, Decimal, OffsetDateTime)>,
}

/// Enforces permit volume limits at `now` from the hydrants' volume registers.
///
/// For every unlocked permit with a limit, inside its window and not yet locked: the register
/// at the unlock (the last `volume` reading at or before the unlock's acknowledgement, else the
/// first after it) is stored once as `volume_start_m3`; the latest register minus it is the
/// volume drawn (`volume_drawn_m3`). When it reaches the limit, a `hydrant_lock` is issued
/// (`permit:<id>:volume-lock`, highest priority, cause = the permit and the registers), the
/// decision stored under rule [`VOLUME_RULE`], and the permit marked exhausted; the window-end
/// lock is then not issued again.
///
/// For every exhausted permit whose lock was acknowledged: a register rising after the
/// acknowledgement (water drawn after the lock) raises `hydrant_illegal_use`.
///
/// # Errors
/// Database errors and the errors of [`super::issue`].
pub async fn enforce_volume(
    pool: &PgPool,
    now: OffsetDateTime,
) -> Result<VolumeReport, ControlError> {
    let mut report = VolumeReport::default();
    // Permits under way: unlock acknowledged (the outlet can flow only after it).
    let active: Vec<(String, String, Decimal, OffsetDateTime, Option<Decimal>)> = sqlx::query_as(
        "SELECT p.permit_id, p.hydrant_id, p.volume_limit_m3, c.acknowledged_at, p.volume_start_m3 \
         FROM hydrant_permits p JOIN commands c ON c.command_id = 'permit:' || p.permit_id || ':unlock' \
         WHERE p.volume_limit_m3 IS NOT NULL AND p.lock_command_id IS NULL \
           AND p.revoked_at IS NULL AND p.exhausted_at IS NULL \
           AND p.valid_from <= $1 AND p.valid_to > $1 AND c.acknowledged_at IS NOT NULL",
    )
    .bind(now)
    .fetch_all(pool)
    .await
    .map_err(db("finding permits with a volume limit"))?;
    for (permit, hydrant, limit, unlocked_at, start) in active {
        let start = match start {
            Some(s) => s,
            None => {
                let before: Option<Decimal> = sqlx::query_scalar(&format!(
                    "SELECT {VOLUME_M3} FROM readings r WHERE r.meter_id = $1 \
                       AND r.quantity = 'volume' AND r.ts <= $2 ORDER BY r.ts DESC LIMIT 1"
                ))
                .bind(&hydrant)
                .bind(unlocked_at)
                .fetch_optional(pool)
                .await
                .map_err(db("reading the register at the unlock"))?;
                let start = match before {
                    Some(v) => Some(v),
                    // No register before the unlock: the first after it (undercounts by what
                    // flowed before that report, never overcounts).
                    None => sqlx::query_scalar(&format!(
                        "SELECT {VOLUME_M3} FROM readings r WHERE r.meter_id = $1 \
                           AND r.quantity = 'volume' AND r.ts > $2 ORDER BY r.ts LIMIT 1"
                    ))
                    .bind(&hydrant)
                    .bind(unlocked_at)
                    .fetch_optional(pool)
                    .await
                    .map_err(db("reading the first register after the unlock"))?,
                };
                let Some(start) = start else {
                    continue; // No register reported yet (older firmware, or not yet stored).
                };
                sqlx::query("UPDATE hydrant_permits SET volume_start_m3 = $2 WHERE permit_id = $1")
                    .bind(&permit)
                    .bind(start)
                    .execute(pool)
                    .await
                    .map_err(db("storing the register at the unlock"))?;
                start
            }
        };
        let latest: Option<(Decimal, OffsetDateTime)> = sqlx::query_as(&format!(
            "SELECT {VOLUME_M3}, r.ts FROM readings r WHERE r.meter_id = $1 \
               AND r.quantity = 'volume' AND r.ts >= $2 ORDER BY r.ts DESC LIMIT 1"
        ))
        .bind(&hydrant)
        .bind(unlocked_at)
        .fetch_optional(pool)
        .await
        .map_err(db("reading the latest register"))?;
        let Some((register, at)) = latest else {
            continue;
        };
        // A register below the start (meter exchanged, reset) draws nothing rather than a
        // negative volume.
        let drawn = (register - start).max(Decimal::ZERO);
        let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
        sqlx::query("UPDATE hydrant_permits SET volume_drawn_m3 = $2 WHERE permit_id = $1")
            .bind(&permit)
            .bind(drawn)
            .execute(&mut *tx)
            .await
            .map_err(db("storing the volume drawn"))?;
        if drawn < limit {
            tx.commit()
                .await
                .map_err(db("committing the volume drawn"))?;
            continue;
        }
        let device = MeterId::new(hydrant.clone())
            .map_err(|e| ControlError::Invalid(format!("hydrant `{hydrant}`: {e}")))?;
        let inputs = json!({"permit": permit, "volume_limit_m3": limit,
            "register_at_unlock_m3": start, "register_m3": register,
            "register_at": rfc3339(at), "drawn_m3": drawn, "unlocked_at": rfc3339(unlocked_at)});
        let mut req = IssueRequest::new(
            format!("permit:{permit}:volume-lock"),
            device,
            model::CommandAction::HydrantLock,
            "rule:permit_volume_exhausted",
            format!("permit {permit}: {drawn} m³ drawn of {limit} m³ allowed"),
        );
        req.priority = PRIORITY_HIGHEST;
        req.cause = json!({"rule": VOLUME_RULE, "permit": permit, "inputs": inputs});
        let issued = super::issue_in(&mut tx, &req, false).await?;
        let id = issued.command.id.clone();
        super::rules::decide(
            &mut tx,
            &super::rules::Decision {
                rule: VOLUME_RULE.into(),
                meter: hydrant.clone(),
                outcome: "issued".into(),
                reason: format!(
                    "permit {permit}: {drawn} m³ drawn since the unlock reached the limit of {limit} m³"
                ),
                inputs: inputs.clone(),
                command: Some(id.clone()),
            },
        )
        .await?;
        sqlx::query(
            "UPDATE hydrant_permits SET lock_command_id = $2, exhausted_at = $3 \
             WHERE permit_id = $1",
        )
        .bind(&permit)
        .bind(&id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db("marking the permit exhausted"))?;
        sqlx::query(
            "INSERT INTO audit_log (actor, action, entity, entity_id, detail) \
             VALUES ('rule:permit_volume_exhausted', 'permit.volume_exhausted', \
                     'hydrant_permit', $1, $2)",
        )
        .bind(&permit)
        .bind(&inputs)
        .execute(&mut *tx)
        .await
        .map_err(db("writing the audit log"))?;
        tx.commit().await.map_err(db("committing a volume lock"))?;
        tracing::info!(permit, hydrant, %drawn, %limit, command = %id, "permit volume exhausted: hydrant locked");
        report.locked.push((permit, id));
    }

    // Water drawn after a volume lock: the register rose after the lock was acknowledged.
    let locked: Vec<(String, String, OffsetDateTime)> = sqlx::query_as(
        "SELECT p.permit_id, p.hydrant_id, c.acknowledged_at FROM hydrant_permits p \
         JOIN commands c ON c.command_id = p.lock_command_id \
         WHERE p.exhausted_at IS NOT NULL AND c.acknowledged_at IS NOT NULL \
           AND p.exhausted_at > $1 - interval '2 days'",
    )
    .bind(now)
    .fetch_all(pool)
    .await
    .map_err(db("finding volume-locked permits"))?;
    for (permit, hydrant, locked_at) in locked {
        // Registers are monotone: the first report after the lock holds all water drawn
        // before it; any rise above that is water drawn after the lock.
        let span: Option<(Option<Decimal>, Option<Decimal>, Option<OffsetDateTime>)> =
            sqlx::query_as(&format!(
                "SELECT min({VOLUME_M3}), max({VOLUME_M3}), max(r.ts) FROM readings r \
                 WHERE r.meter_id = $1 AND r.quantity = 'volume' AND r.ts >= $2"
            ))
            .bind(&hydrant)
            .bind(locked_at)
            .fetch_optional(pool)
            .await
            .map_err(db("reading registers after the lock"))?;
        let Some((Some(first), Some(last), Some(at))) = span else {
            continue;
        };
        let after = last - first;
        if after <= Decimal::ZERO {
            continue;
        }
        let mut tx = pool.begin().await.map_err(db("starting a transaction"))?;
        let new = super::raise_alarm(
            &mut tx,
            &hydrant,
            "hydrant_illegal_use",
            at,
            json!({"source": "control", "permit": permit, "reason": "water drawn after the permit's volume lock",
                   "locked_at": rfc3339(locked_at), "drawn_after_lock_m3": after, "register_m3": last}),
        )
        .await?;
        tx.commit().await.map_err(db("committing an alarm"))?;
        if new {
            report.drawn_after_lock.push((hydrant, after, at));
        }
    }
    Ok(report)
}
