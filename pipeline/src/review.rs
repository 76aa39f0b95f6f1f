//! The review queue (异常复核, REV-002): one list of what needs a person — reads VEE held
//! (`out_of_order`) or refused, ingest rejects, meters a bill run held for review, alarms that
//! need a field visit — each with an owner, an age and an audited resolution.
//!
//! [`collect`] gathers new items from where they arise (idempotent: an item is keyed by its
//! source, so collecting twice adds nothing); [`assign`] gives one an owner; [`resolve`] applies
//! a person's decision (accept, edit, reject, dismiss) and records who, when and why in the item
//! and in `audit_log`. Accepting or editing a read goes through [`crate::edit::edit_reading`], so
//! its history, audit and rollups follow the same path as any edit.

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::edit::{self, EditError};
use model::Quantity;

/// Errors of the review queue.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// No item with this id.
    #[error("review item {0} does not exist")]
    NotFound(i64),
    /// The item was resolved already.
    #[error("review item {id} is already resolved ({resolution} by {by})")]
    AlreadyResolved {
        /// The item.
        id: i64,
        /// How it was resolved.
        resolution: String,
        /// By whom.
        by: String,
    },
    /// The action does not apply to this kind of item.
    #[error("review item {id} is a {kind}: {action} does not apply (allowed: {allowed})")]
    NotApplicable {
        /// The item.
        id: i64,
        /// Its kind.
        kind: &'static str,
        /// The refused action.
        action: &'static str,
        /// What the kind allows.
        allowed: &'static str,
    },
    /// A resolution needs who and why.
    #[error("a review decision needs the person and a note saying why")]
    Unattributed,
    /// The item kept nothing that could be sent again.
    #[error("review item {id} cannot be reprocessed: {reason}")]
    NothingToReprocess {
        /// The item.
        id: i64,
        /// Why.
        reason: &'static str,
    },
    /// Publishing the payload again failed; the item stays open.
    #[error("reprocessing review item {id} failed: {message}")]
    Republish {
        /// The item.
        id: i64,
        /// What the broker or connection said.
        message: String,
    },
    /// The read behind the item is gone or its edit failed.
    #[error("applying the decision to the read failed: {0}")]
    Edit(#[from] EditError),
    /// The database refused a query.
    #[error("review queue query ({what}) failed: {source}")]
    Database {
        /// Which query.
        what: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> ReviewError {
    move |source| ReviewError::Database { what, source }
}

/// A database-layer error as the queue's own: a failed statement keeps its stage as `what`.
fn store(e: crate::db::StoreError) -> ReviewError {
    match e {
        crate::db::StoreError::Stage { stage, source } => ReviewError::Database {
            what: stage,
            source,
        },
        other => ReviewError::Edit(EditError::Store(other)),
    }
}

/// What an item is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// A read older than the meter's last validated read, stored `actual` + `out_of_order`.
    OutOfOrderRead,
    /// A read VEE refused (`register_decrease`, `physically_impossible`, …).
    RejectedRead,
    /// A message or reading refused before storage (`ingest_rejects`).
    IngestReject,
    /// A meter a bill run skipped as "held for review".
    BillHeld,
    /// An open alarm that needs someone on site.
    FieldVisit,
}

impl ItemKind {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::OutOfOrderRead => "out_of_order_read",
            ItemKind::RejectedRead => "rejected_read",
            ItemKind::IngestReject => "ingest_reject",
            ItemKind::BillHeld => "bill_held",
            ItemKind::FieldVisit => "field_visit",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<ItemKind> {
        [
            ItemKind::OutOfOrderRead,
            ItemKind::RejectedRead,
            ItemKind::IngestReject,
            ItemKind::BillHeld,
            ItemKind::FieldVisit,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    fn allowed(self) -> &'static str {
        match self {
            ItemKind::OutOfOrderRead => "accept, edit, estimate, reject",
            ItemKind::RejectedRead => "accept, edit, estimate, dismiss",
            ItemKind::IngestReject => "reprocess, dismiss",
            ItemKind::BillHeld | ItemKind::FieldVisit => "dismiss",
        }
    }
}

/// Alarm kinds that send someone on site.
pub const FIELD_VISIT_ALARMS: &[&str] = &[
    "magnetic_tamper",
    "stopped_meter",
    "valve_fault",
    "empty_pipe",
    "hydrant_tilt",
    "hydrant_illegal_use",
    "cover_open",
];

/// A person's decision on an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The read is right: it becomes billable (`edited`, same value).
    Accept,
    /// The read is wrong: it becomes billable with this value.
    Edit(Decimal),
    /// The held read is wrong and stays out of billing (`rejected`).
    Reject,
    /// The read is wrong and no better value is known: it is replaced by the linear
    /// interpolation between the billable reads around it (`estimated`).
    Estimate,
    /// Nothing to change in the data (handled elsewhere, e.g. billed by hand, visit done).
    Dismiss,
}

impl Decision {
    fn name(&self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Edit(_) => "edit",
            Decision::Reject => "reject",
            Decision::Estimate => "estimate",
            Decision::Dismiss => "dismiss",
        }
    }
}

/// One item of the queue.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ReviewItem {
    /// Id.
    pub item_id: i64,
    /// Kind (database spelling).
    pub kind: String,
    /// Key of its source (reading key, reject id, run + meter, alarm id).
    pub source_key: String,
    /// The meter, when there is one.
    pub meter_id: Option<String>,
    /// What the source says (reason, value, times).
    pub subject: serde_json::Value,
    /// When it entered the queue.
    pub opened_at: OffsetDateTime,
    /// Who owns it.
    pub owner: Option<String>,
    /// `open` or `resolved`.
    pub status: String,
    /// accept, edit, reject or dismiss.
    pub resolution: Option<String>,
    /// Who decided.
    pub resolved_by: Option<String>,
    /// When.
    pub resolved_at: Option<OffsetDateTime>,
    /// Why.
    pub note: Option<String>,
}

/// New items per kind added by one [`collect`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Collected {
    /// Out-of-order reads.
    pub out_of_order_reads: u64,
    /// Rejected reads.
    pub rejected_reads: u64,
    /// Ingest rejects.
    pub ingest_rejects: u64,
    /// Meters held by bill runs.
    pub bills_held: u64,
    /// Alarms needing a field visit.
    pub field_visits: u64,
}

/// Adds what arose since the last collect (everything not yet an item), in the order it arose
/// (reads by meter and time), so the queue's order is stable; idempotent.
pub async fn collect(pool: &PgPool) -> Result<Collected, ReviewError> {
    let run = |sql: &'static str, what: &'static str| async move {
        sqlx::query(sql)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(db(what))
    };
    Ok(Collected {
        out_of_order_reads: run(
            "INSERT INTO review_items (kind, source_key, meter_id, subject)
             SELECT 'out_of_order_read',
                    format('%s|%s|%s|%s|%s', meter_id, extract(epoch FROM ts), quantity, tariff, subunit),
                    meter_id,
                    jsonb_build_object('ts', ts, 'quantity', quantity, 'tariff', tariff,
                        'subunit', subunit, 'value', value::text, 'received_at', received_at)
             FROM readings
             WHERE quality = 'actual' AND 'out_of_order' = ANY (flags)
             ORDER BY meter_id, ts
             ON CONFLICT (kind, source_key) DO NOTHING",
            "collecting out-of-order reads",
        )
        .await?,
        rejected_reads: run(
            "INSERT INTO review_items (kind, source_key, meter_id, subject)
             SELECT 'rejected_read',
                    format('%s|%s|%s|%s|%s', meter_id, extract(epoch FROM ts), quantity, tariff, subunit),
                    meter_id,
                    jsonb_build_object('ts', ts, 'quantity', quantity, 'tariff', tariff,
                        'subunit', subunit, 'value', value::text, 'reason', quality_detail)
             FROM readings
             WHERE quality = 'rejected'
             ORDER BY meter_id, ts
             ON CONFLICT (kind, source_key) DO NOTHING",
            "collecting rejected reads",
        )
        .await?,
        ingest_rejects: run(
            "INSERT INTO review_items (kind, source_key, meter_id, subject)
             SELECT 'ingest_reject', reject_id::text, meter_id,
                    jsonb_build_object('kind', kind, 'at', at, 'ts', ts, 'topic', topic,
                        'detail', detail)
             FROM ingest_rejects
             ORDER BY reject_id
             ON CONFLICT (kind, source_key) DO NOTHING",
            "collecting ingest rejects",
        )
        .await?,
        bills_held: run(
            "INSERT INTO review_items (kind, source_key, meter_id, subject)
             SELECT 'bill_held', format('%s|%s', r.cycle_id, s->>'meter_id'), s->>'meter_id',
                    jsonb_build_object('run_id', r.run_id, 'cycle_id', r.cycle_id,
                        'meter_book', c.meter_book, 'period_start', c.period_start,
                        'period_end', c.period_end, 'reason', s->>'reason')
             FROM bill_runs r
             JOIN billing_cycles c USING (cycle_id)
             CROSS JOIN LATERAL jsonb_array_elements(coalesce(r.detail->'skipped', '[]'::jsonb)) s
             WHERE s->>'reason' LIKE 'held for review%'
             ORDER BY r.run_id
             ON CONFLICT (kind, source_key) DO NOTHING",
            "collecting meters held by bill runs",
        )
        .await?,
        field_visits: sqlx::query(
            "INSERT INTO review_items (kind, source_key, meter_id, subject)
             SELECT 'field_visit', alarm_id::text, meter_id,
                    jsonb_build_object('alarm', kind, 'severity', severity,
                        'raised_at', raised_at, 'detail', detail)
             FROM alarms
             WHERE cleared_at IS NULL AND kind = ANY ($1)
             ORDER BY alarm_id
             ON CONFLICT (kind, source_key) DO NOTHING",
        )
        .bind(FIELD_VISIT_ALARMS)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
        .map_err(db("collecting alarms that need a field visit"))?,
    })
}

/// Filter of [`list`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only open items (else all).
    pub open_only: bool,
    /// Only this kind.
    pub kind: Option<ItemKind>,
    /// Only this owner.
    pub owner: Option<String>,
    /// At most this many, oldest first.
    pub limit: i64,
}

const ITEM_COLUMNS: &str = "item_id, kind, source_key, meter_id, subject, opened_at, owner, status,
     resolution, resolved_by, resolved_at, note";

/// Items matching `filter`, oldest first (the queue's order).
pub async fn list(pool: &PgPool, filter: &Filter) -> Result<Vec<ReviewItem>, ReviewError> {
    sqlx::query_as(&format!(
        "SELECT {ITEM_COLUMNS} FROM review_items
         WHERE (NOT $1 OR status = 'open') AND ($2::text IS NULL OR kind = $2)
           AND ($3::text IS NULL OR owner = $3)
         ORDER BY opened_at, item_id LIMIT $4"
    ))
    .bind(filter.open_only)
    .bind(filter.kind.map(ItemKind::as_str))
    .bind(&filter.owner)
    .bind(if filter.limit > 0 { filter.limit } else { 100 })
    .fetch_all(pool)
    .await
    .map_err(db("listing review items"))
}

async fn get(pool: &PgPool, id: i64) -> Result<ReviewItem, ReviewError> {
    sqlx::query_as(&format!(
        "SELECT {ITEM_COLUMNS} FROM review_items WHERE item_id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db("reading a review item"))?
    .ok_or(ReviewError::NotFound(id))
}

/// Gives an open item to `owner` (audited).
pub async fn assign(
    pool: &PgPool,
    id: i64,
    owner: &str,
    actor: &str,
) -> Result<ReviewItem, ReviewError> {
    if owner.trim().is_empty() || actor.trim().is_empty() {
        return Err(ReviewError::Unattributed);
    }
    let item = get(pool, id).await?;
    refuse_resolved(&item)?;
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    sqlx::query("UPDATE review_items SET owner = $2, assigned_at = now() WHERE item_id = $1")
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(db("assigning"))?;
    audit(
        &mut tx,
        actor,
        "review.assign",
        id,
        serde_json::json!({ "owner": owner, "previous_owner": item.owner }),
    )
    .await?;
    tx.commit().await.map_err(db("committing the assignment"))?;
    get(pool, id).await
}

fn refuse_resolved(item: &ReviewItem) -> Result<(), ReviewError> {
    if item.status == "resolved" {
        return Err(ReviewError::AlreadyResolved {
            id: item.item_id,
            resolution: item.resolution.clone().unwrap_or_default(),
            by: item.resolved_by.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

async fn audit(
    tx: &mut sqlx::PgConnection,
    actor: &str,
    action: &str,
    id: i64,
    detail: serde_json::Value,
) -> Result<(), ReviewError> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail)
         VALUES ($1, $2, 'review_item', $3, $4)",
    )
    .bind(actor)
    .bind(action)
    .bind(id.to_string())
    .bind(detail)
    .execute(tx)
    .await
    .map_err(db("auditing"))?;
    Ok(())
}

/// Applies `decision` to an open item: the read is accepted or edited (billable, through the
/// edit path), or rejected; the item is closed with who, when and why; the whole is audited.
pub async fn resolve(
    pool: &PgPool,
    id: i64,
    decision: Decision,
    actor: &str,
    note: &str,
) -> Result<ReviewItem, ReviewError> {
    let item = open_item(pool, id, actor, note).await?;
    let kind = ItemKind::parse(&item.kind).unwrap_or(ItemKind::IngestReject);
    let applicable = match (kind, &decision) {
        (ItemKind::OutOfOrderRead, Decision::Dismiss) => false,
        (ItemKind::OutOfOrderRead, _) => true,
        (ItemKind::RejectedRead, Decision::Reject) => false,
        (ItemKind::RejectedRead, _) => true,
        (_, Decision::Dismiss) => true,
        _ => false,
    };
    if !applicable {
        return Err(ReviewError::NotApplicable {
            id,
            kind: kind.as_str(),
            action: decision.name(),
            allowed: kind.allowed(),
        });
    }
    let read = || -> Option<(String, OffsetDateTime, Quantity, Decimal)> {
        let meter = item.meter_id.clone()?;
        let ts = time::OffsetDateTime::parse(
            item.subject.get("ts")?.as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        let quantity: Quantity =
            serde_json::from_value(item.subject.get("quantity")?.clone()).ok()?;
        let value: Decimal = item.subject.get("value")?.as_str()?.parse().ok()?;
        Some((meter, ts, quantity, value))
    };
    let reason = format!("review item {id}: {note}");
    match (&decision, read()) {
        (Decision::Accept, Some((meter, ts, quantity, value))) => {
            edit::edit_reading(pool, &meter, ts, quantity, value, actor, &reason).await?;
        }
        (Decision::Edit(v), Some((meter, ts, quantity, _))) => {
            edit::edit_reading(pool, &meter, ts, quantity, *v, actor, &reason).await?;
        }
        (Decision::Estimate, Some((meter, ts, quantity, _))) => {
            if quantity != Quantity::Volume {
                return Err(ReviewError::NotApplicable {
                    id,
                    kind: kind.as_str(),
                    action: "estimate (of a quantity other than volume)",
                    allowed: "accept, edit",
                });
            }
            edit::estimate_reading(pool, &meter, ts, actor, &reason).await?;
        }
        (Decision::Reject, Some((meter, ts, quantity, _))) => {
            // A held (actual, out-of-order) read is not in the rollups: marking it rejected
            // changes no consumption.
            crate::db::readings::reject_reviewed(pool, &meter, ts, quantity, actor)
                .await
                .map_err(store)?;
        }
        (Decision::Dismiss, _) => {}
        (_, None) => {
            return Err(ReviewError::Database {
                what: "reading the item's read key",
                source: sqlx::Error::RowNotFound,
            });
        }
    }
    let value = match &decision {
        Decision::Edit(v) => Some(v.to_string()),
        _ => None,
    };
    let detail = serde_json::json!({ "kind": item.kind, "source_key": item.source_key,
        "decision": decision.name(), "new_value": value, "note": note });
    close_item(
        pool,
        id,
        decision.name(),
        actor,
        note,
        value,
        "review.resolve",
        detail,
    )
    .await
}

/// Closes an item with its resolution and audits it, in one transaction.
#[allow(clippy::too_many_arguments)]
async fn close_item(
    pool: &PgPool,
    id: i64,
    resolution: &str,
    actor: &str,
    note: &str,
    new_value: Option<String>,
    audit_action: &str,
    audit_detail: serde_json::Value,
) -> Result<ReviewItem, ReviewError> {
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    sqlx::query(
        "UPDATE review_items SET status = 'resolved', resolution = $2, resolved_by = $3,
             resolved_at = now(), note = $4, new_value = $5
         WHERE item_id = $1",
    )
    .bind(id)
    .bind(resolution)
    .bind(actor)
    .bind(note)
    .bind(&new_value)
    .execute(&mut *tx)
    .await
    .map_err(db("resolving"))?;
    audit(&mut tx, actor, audit_action, id, audit_detail).await?;
    tx.commit().await.map_err(db("committing the resolution"))?;
    get(pool, id).await
}

/// The open item `id`, if the decision is attributed (who and why).
async fn open_item(
    pool: &PgPool,
    id: i64,
    actor: &str,
    note: &str,
) -> Result<ReviewItem, ReviewError> {
    if actor.trim().is_empty() || note.trim().is_empty() {
        return Err(ReviewError::Unattributed);
    }
    let item = get(pool, id).await?;
    refuse_resolved(&item)?;
    Ok(item)
}

/// Publishes a payload again onto the topic it first came on; `Ok` once the broker has it.
pub trait Republish: Send + Sync {
    /// Publishes `payload` on `topic` (QoS 1) and waits for the broker's acknowledgement.
    fn republish<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

/// A [`Republish`] over one short MQTT connection per call (a person's decision, not a stream).
pub struct MqttRepublisher {
    /// The broker (`mqtts://` connects over TLS).
    pub broker: model::BrokerUrl,
}

impl Republish for MqttRepublisher {
    fn republish<'a>(
        &'a self,
        topic: &'a str,
        payload: &'a [u8],
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        use rumqttc::{Event, Packet, QoS};
        Box::pin(async move {
            let id = format!("wm-review-{}-{}", std::process::id(), rand::random::<u32>());
            let (client, mut eventloop) = crate::config::mqtt_client(&self.broker, id, 8, |o| {
                o.set_clean_session(true);
            })
            .map_err(|e| e.to_string())?;
            client
                .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                .await
                .map_err(|e| e.to_string())?;
            // This task drains the event loop itself: the publish above only queued the packet.
            let acked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("broker {}: {e}", self.broker)),
                    }
                }
            })
            .await
            .map_err(|_| "no PUBACK within 10 s".to_owned())?;
            if let Err(e) = client.disconnect().await {
                // The message is acknowledged; a failed goodbye changes nothing.
                tracing::debug!(error = %e, "disconnecting after a reprocess");
            }
            acked
        })
    }
}

/// Sends an ingest reject's message again onto the topic it came on (after the cause was fixed:
/// a worker upgraded to a new wire version, a registry correction), and closes the item with
/// who, when and why. The workers judge it again like any message; only message-level rejects
/// (`unknown_version`, `malformed`) kept their payload.
pub async fn reprocess(
    pool: &PgPool,
    id: i64,
    republisher: &dyn Republish,
    actor: &str,
    note: &str,
) -> Result<ReviewItem, ReviewError> {
    let item = open_item(pool, id, actor, note).await?;
    if item.kind != ItemKind::IngestReject.as_str() {
        return Err(ReviewError::NotApplicable {
            id,
            kind: ItemKind::parse(&item.kind).map_or("item", ItemKind::as_str),
            action: "reprocess",
            allowed: ItemKind::parse(&item.kind).map_or("dismiss", ItemKind::allowed),
        });
    }
    let topic = item.subject.get("topic").and_then(|t| t.as_str());
    let payload = item
        .subject
        .get("detail")
        .and_then(|d| d.get("payload"))
        .and_then(|p| p.as_str());
    let (Some(topic), Some(payload)) = (topic, payload) else {
        return Err(ReviewError::NothingToReprocess {
            id,
            reason: "a reading-level refusal keeps no message to send again (dismiss it, or edit the read)",
        });
    };
    republisher
        .republish(topic, payload.as_bytes())
        .await
        .map_err(|message| ReviewError::Republish { id, message })?;
    let detail = serde_json::json!({ "topic": topic, "bytes": payload.len(), "note": note });
    close_item(
        pool,
        id,
        "reprocess",
        actor,
        note,
        None,
        "review.reprocess",
        detail,
    )
    .await
}
